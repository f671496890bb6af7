"""Chapter 1: train a conditional diffusion model on MNIST.

    python train.py                      # the preset for this machine: minutes on a CPU, a minute on a GPU
    python train.py --preset gpu         # the full-size run, wherever you are
    python train.py --max-steps 200      # stop early (a smoke run); --resume --max-steps 400 goes on

Writes the checkpoint (--out), outputs/loss.png (the training loss) and outputs/forward_noising.png (one
digit pushed through the forward process). Ctrl-C saves a checkpoint; --resume continues from it exactly.
Every setting comes from the preset (model/config.py) unless a flag says otherwise.
"""
import os
import time
from dataclasses import asdict

import torch

from model.checkpoint import load_model, save_model
from model.cli import (PRESET_HELP, Parser, add_training_flags, channel_list, check_new_output, plan_run,
                       check_writable, fused_adamw, level_list, pick_device, positive_int, prepare_model, run_cli,
                       seed_everything)
from model.config import PRESETS, TrainConfig, preset_for, resumed_config, with_flags
from model.data import load_mnist
from model.diffusion import Diffusion
from model.ema import EMA
from model.figures import save_grid, save_loss_curve
from model.trainer import fit, rng_state, set_rng_state
from model.unet import DEFAULT_CONFIG, UNet

def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--preset", choices=("auto", "cpu", "gpu"), default="auto", help=PRESET_HELP)
    p.add_argument("--out", default="checkpoints/model.pt", help="checkpoint to write (and to --resume)")
    add_training_flags(p, "the UNet")
    p.add_argument("--channels", type=channel_list, help="UNet widths at 28x28, 14x14 and 7x7, e.g. 16,32,64")
    p.add_argument("--attn-levels", type=level_list,
                   help="levels whose blocks read the label by cross-attention: 0 = 28x28, 1 = 14x14, 2 = 7x7, "
                        "comma-separated, or none (the middle block always does; default: the preset's)")
    p.add_argument("--T", type=positive_int, help="number of diffusion steps (default 1000)")
    p.add_argument("--prediction", choices=("eps", "v"), help="what the UNet learns to predict: the noise eps "
                                                                "(default) or the velocity v")
    p.add_argument("--t-sampling", choices=("uniform", "logit-normal"),
                   help="how training draws the step t: uniform, or logit-normal, the middle steps more often "
                        "(default: the preset's; logit-normal on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA; slower start)")
    return p.parse_args(argv)


def resolve_config(args, device, saved=None):
    """(preset name, TrainConfig): the saved run's on --resume, else the preset's; flags override either."""
    if saved is not None:
        return saved["preset"], resumed_config(TrainConfig(**saved["train"]), args)
    preset = preset_for(device) if args.preset == "auto" else args.preset
    return preset, with_flags(PRESETS[preset]["train"], args)


def main(argv=None):
    args = parse_args(argv)
    check_new_output(args.out, args.resume, args.force)
    check_writable(os.path.join(args.figures, "loss.png"))
    device = pick_device(args.device)
    saved = None
    if args.resume:
        model, diffusion, saved = load_model(args.out, device, weights="model")
        if "train" not in saved:
            raise ValueError(f"{args.out} was written by an older version that cannot be resumed exactly; "
                            "start a new run with --force")
    preset, config = resolve_config(args, device, saved)
    seed_everything(config.seed)
    if device.type == "cuda":
        # cudnn.benchmark stays off: timing every conv algorithm for every shape, forward and backward,
        # cost 12 s before the first step on one H100, more than it ever saved in a one-minute run.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    images, labels = load_mnist(args.data_dir, train=True, device=device)
    total_steps, stop_at = plan_run(len(images), config, args.max_steps, saved and saved["step"])
    print(f"preset {preset}: UNet {','.join(map(str, config.channels))}, {total_steps:,} steps of {config.batch_size} "
          f"images ({len(images):,} on {device}), lr {config.lr:g}, t drawn {config.t_sampling}, "
          f"predicting {config.prediction}"
          + PRESETS[preset]["expect"]["train"])

    if saved is None:
        model = UNet(**{**DEFAULT_CONFIG, "channels": config.channels, "attn_levels": config.attn_levels})
        model = model.to(device)
        diffusion = Diffusion(T=config.T, prediction=config.prediction)
        step, losses, seconds = 0, [], 0.0
    else:
        step, losses, seconds = saved["step"], saved["losses"], saved["seconds"]
        print(f"resuming {args.out} at step {step}")
    print(f"UNet: {sum(p.numel() for p in model.parameters()):,} parameters")
    model = prepare_model(model, device)

    ema = EMA(model, config.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0, fused=fused_adamw(device))
    if saved is not None:
        ema.model.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"], device)

    save_forward_noising(diffusion, images, labels, os.path.join(args.figures, "forward_noising.png"))
    start = time.time()

    def save(at_step, at_losses):
        save_model(args.out, model, ema, diffusion, optimizer, at_step, at_losses, seconds + time.time() - start,
                   preset, asdict(config), rng_state(device))

    forward = torch.compile(model, dynamic=False) if args.compile else model
    losses = fit(model, diffusion, images, labels, optimizer, ema, config, min_snr_gamma=config.min_snr_gamma,
                 t_sampling=config.t_sampling, total_steps=total_steps, stop_at=stop_at, start_step=step,
                 losses=losses, save=save, forward=forward)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.time() - start
    trained = stop_at - step
    rate = trained * config.batch_size / max(elapsed, 1e-9)
    print(f"trained {trained} steps in {elapsed:.1f} s ({rate:,.0f} images/s); checkpoint: {args.out}")
    if losses:
        save_loss_curve(os.path.join(args.figures, "loss.png"), losses)
        print(f"wrote {os.path.join(args.figures, 'loss.png')} and forward_noising.png beside it")
    return dict(seconds=elapsed, steps=trained, images_per_s=rate)


def save_forward_noising(diffusion, images, labels, path):
    """One training digit of each of three classes at t = 0 .. T-1: the forward process made visible."""
    ts = [t for t in (0, 50, 100, 200, 300, 500, 700) if t < diffusion.T - 1] + [diffusion.T - 1]
    picks = [int((labels == d).nonzero()[0]) for d in (0, 3, 7) if (labels == d).any()]
    x_0 = images[picks].cpu()                                       # [3, 1, 28, 28]
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(x_0.shape, generator=gen)
    strip = torch.stack([diffusion.q_sample(x_0, torch.full((len(picks),), t), eps) for t in ts], 1)
    save_grid(path, {"": strip}, [f"x_0 = {int(labels[i])}" for i in picks],
              [f"t={t}" for t in ts], title="forward process q(x_t | x_0)")


if __name__ == "__main__":
    run_cli(main)
