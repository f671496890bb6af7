"""Chapter 1: train a conditional diffusion model on MNIST.

    python train.py                      # the preset for this machine: minutes on a CPU, a minute on a GPU
    python train.py --preset gpu         # the full-size run, wherever you are
    python train.py --max-steps 200      # stop early (a smoke run); --resume --max-steps 400 goes on
    python train.py --backbone dit --out checkpoints/dit.pt   # a Diffusion Transformer instead of the UNet

Writes the checkpoint (--out), outputs/loss.png (the training loss) and outputs/forward_noising.png (one
digit pushed through the forward process). Ctrl-C saves a checkpoint after the step in flight; --resume
continues from it exactly. Every setting comes from the preset (harness/config.py) unless a flag says
otherwise.
"""
import os
import time
from dataclasses import asdict

import torch

from harness.cli import (PRESET_HELP, Parser, add_training_flags, channel_list, check_new_output, check_writable,
                         fused_adamw, level_list, pick_device, positive_int, prepare_model, run_cli, seed_everything)
from harness.config import PRESETS, TrainConfig, describe, network, preset_for, resumed_config, with_flags
from harness.figures import save_grid, save_loss_curve
from harness.files import load_model, model_file, save_file
from harness.runs import Run, plan_run, restore, training_state
from model.data import batches, load_mnist
from model.diffusion import Diffusion
from model.ema import EMA
from model.dit import LABEL_IN
from model.training import lr_at, train_step


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--preset", choices=("auto", "cpu", "gpu"), default="auto", help=PRESET_HELP)
    p.add_argument("--out", default="checkpoints/model.pt", help="checkpoint to write (and to --resume)")
    add_training_flags(p, "the network")
    p.add_argument("--backbone", choices=("unet", "dit"), help="the network: the UNet (default) or a Diffusion "
                                                                 "Transformer, with its own preset (model/dit.py)")
    p.add_argument("--patch", type=int, choices=(2, 4, 7, 14), help="DiT: patch size, (28 / patch)^2 tokens "
                                                                    "(default: the preset's)")
    p.add_argument("--width", type=positive_int, help="DiT: token width, a multiple of 4 (default: the preset's)")
    p.add_argument("--depth", type=positive_int, help="DiT: number of blocks (default: the preset's)")
    p.add_argument("--label-in", choices=LABEL_IN, help="DiT: how the label gets in: the adaptive norm with zero "
                                                        "gates, cross-attention, or extra tokens (default adaln-zero)")
    p.add_argument("--channels", type=channel_list, help="UNet widths at 28x28, 14x14 and 7x7, e.g. 16,32,64")
    p.add_argument("--attn-levels", type=level_list,
                   help="levels whose blocks read the label by cross-attention: 0 = 28x28, 1 = 14x14, 2 = 7x7, "
                        "comma-separated, or none (the middle block always does; default: the preset's)")
    p.add_argument("--T", type=positive_int, help=f"number of diffusion steps (default {TrainConfig.T})")
    p.add_argument("--prediction", choices=("eps", "v"), help="what the network learns to predict: the noise eps "
                                                                "or the velocity v (default: the preset's)")
    p.add_argument("--t-sampling", choices=("uniform", "logit-normal"),
                   help="how training draws the step t: uniform, or logit-normal, the middle steps more often "
                        f"(default: the preset's; {PRESETS['cpu']['train'].t_sampling} on a CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA; slower start)")
    return p.parse_args(argv)


def resolve_config(args, device, saved=None):
    """(preset name, TrainConfig): the saved run's on --resume, else the preset's; flags override either."""
    if saved is not None:
        return saved["preset"], resumed_config(TrainConfig(**saved["train"]), args)
    preset = preset_for(device) if args.preset == "auto" else args.preset
    dit = args.backbone == "dit"
    wrong = [f for f in (("channels", "attn_levels") if dit else ("patch", "width", "depth", "label_in"))
             if getattr(args, f) is not None]
    if wrong:
        flags = ", ".join("--" + f.replace("_", "-") for f in wrong)
        raise ValueError(f"{flags} shape{'s' if len(wrong) == 1 else ''} the {'UNet' if dit else 'DiT'}: leave "
                         f"{'it' if len(wrong) == 1 else 'them'} out, or {'drop' if dit else 'add'} --backbone dit")
    return preset, with_flags(PRESETS[preset]["dit" if dit else "train"], args)


def main(argv=None):
    args = parse_args(argv)
    check_new_output(args.resume, args.force, args.out)
    check_writable(os.path.join(args.figures, "loss.png"))
    device = pick_device(args.device)
    model, diffusion, saved = load_model(args.out, device, weights="model") if args.resume else (None, None, None)
    if saved is not None and "train" not in saved:
        raise ValueError(f"{args.out} was written by an older version that cannot be resumed exactly; "
                         "start a new run with --force")
    preset, config = resolve_config(args, device, saved)
    seed_everything(config.seed)
    if device.type == "cuda":  # TF32 matmuls; cudnn.benchmark stays off: it costs more than a short run saves
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    images, labels = load_mnist(args.data_dir, train=True, device=device)
    total_steps, stop_at = plan_run(len(images), config, args.max_steps, saved and saved["step"])
    print(f"preset {preset}: {describe(config)}, {total_steps:,} steps of {config.batch_size} "
          f"images ({len(images):,} on {device}), lr {config.lr:g}, t drawn {config.t_sampling}, "
          f"predicting {config.prediction}")

    if saved is None:
        model = network(config).to(device)
        diffusion = Diffusion(T=config.T, prediction=config.prediction)
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters")
    model = prepare_model(model, device)
    ema = EMA(model, config.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0, fused=fused_adamw(device))
    first, losses, seconds = 0, [], 0.0
    if saved is not None:
        ema.model.load_state_dict(saved["ema"])
        first, losses, seconds = restore(saved, optimizer, device)
        print(f"resuming {args.out} at step {first}")
    save_forward_noising(diffusion, images, labels, os.path.join(args.figures, "forward_noising.png"))

    def save(at_step, at_losses, at_seconds):
        save_file(model_file(model, ema, diffusion, optimizer, preset, asdict(config),
                             training_state(at_step, at_losses, at_seconds, device)), args.out)

    # The loop: one DDPM step per batch (model/training.py); Run saves, reports and takes Ctrl-C between steps.
    forward = torch.compile(model, dynamic=False) if args.compile else model
    objective = dict(p_uncond=config.p_uncond, min_snr_gamma=config.min_snr_gamma, t_sampling=config.t_sampling)
    run = Run(save, first, stop_at, total_steps, len(images) // config.batch_size, losses, seconds)
    start = time.time()
    for step, (x_0, y) in run.steps(batches(images, labels, config.batch_size, config.seed, start=first)):
        lr = lr_at(step, config.lr, config.warmup, total_steps)
        run.record(train_step(model, diffusion, optimizer, ema, x_0, y, step, lr, **objective, forward=forward))
    elapsed = time.time() - start
    rate = (stop_at - first) * config.batch_size / max(elapsed, 1e-9)
    print(f"trained {stop_at - first} steps in {elapsed:.1f} s ({rate:,.0f} images/s); checkpoint: {args.out}")
    save_loss_curve(os.path.join(args.figures, "loss.png"), run.losses)
    print(f"wrote {os.path.join(args.figures, 'loss.png')} and forward_noising.png beside it")
    return dict(seconds=elapsed, steps=stop_at - first, images_per_s=rate)


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
