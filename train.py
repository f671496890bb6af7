"""Chapter 1: train a conditional diffusion model on MNIST.

    python train.py                      # the default config (a few minutes on one GPU)
    python train.py --max-steps 200      # a smoke run

Writes the checkpoint (--out), figure/loss.png (the training loss) and figure/forward_noising.png (one
digit pushed through the forward process). Ctrl-C saves a checkpoint; --resume continues from it.
"""
import os
import time

import torch

from model.checkpoint import load_model, save_model
from model.cli import (Parser, UserError, check_writable, fraction, pick_device, positive_float, positive_int,
                       run_cli, seed_everything)
from model.data import load_mnist
from model.diffusion import Diffusion
from model.ema import EMA
from model.figures import save_grid, save_loss_curve
from model.trainer import fit, plan_steps
from model.unet import DEFAULT_CONFIG, UNet


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--data-dir", default="data", help="folder holding MNIST/raw/ (torchvision's layout)")
    p.add_argument("--out", default="checkpoints/model.pt", help="checkpoint to write (and to --resume)")
    p.add_argument("--epochs", type=positive_int, default=12, help="passes over the 60,000 training images")
    p.add_argument("--batch-size", type=positive_int, default=512, help="images per optimizer step")
    p.add_argument("--lr", type=positive_float, default=2e-3,
                   help="peak learning rate (AdamW; warm-up, then cosine)")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps in all")
    p.add_argument("--device", help="cuda, mps or cpu (default: cuda if available, else mps, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data order and noise")
    p.add_argument("--resume", action="store_true", help="continue the run saved at --out")
    p.add_argument("--channels", default=",".join(map(str, DEFAULT_CONFIG["channels"])),
                   help="UNet widths at 28x28, 14x14 and 7x7, comma-separated")
    p.add_argument("--T", type=positive_int, default=1000, help="number of diffusion steps")
    p.add_argument("--ema-decay", type=fraction, default=0.999,
                   help="cap on the decay of the weights' moving average; below it the decay is (1+k)/(10+k) at "
                        "step k, which reaches 0.999 only at step 8,990 (model/ema.py)")
    p.add_argument("--p-uncond", type=fraction, default=0.1,
                   help="probability of training on the null label (for classifier-free guidance)")
    p.add_argument("--min-snr-gamma", type=float, default=5.0,
                   help="Min-SNR-gamma loss weight min(SNR_t, gamma)/SNR_t (0 = the plain DDPM loss)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA; slower start)")
    p.add_argument("--figures", default="figure", help="folder for loss.png and forward_noising.png")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    seed_everything(args.seed)
    check_writable(args.out)
    if args.min_snr_gamma < 0:
        raise UserError(f"--min-snr-gamma must be >= 0 (0 = the plain loss), got {args.min_snr_gamma:g}")
    os.makedirs(args.figures, exist_ok=True)
    if device.type == "cuda":
        # cudnn.benchmark stays off: timing every conv algorithm for every shape, forward and backward,
        # cost 12 s before the first step on one H100, more than it ever saved in a one-minute run.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    images, labels = load_mnist(args.data_dir, train=True, device=device)
    print(f"MNIST: {len(images):,} training images on {device}")

    if args.resume:
        if not os.path.exists(args.out):
            raise UserError(f"--resume: no checkpoint at {args.out} to continue from")
        model, diffusion, ckpt = load_model(args.out, device, weights="model")
        step, losses, seconds = ckpt["step"], ckpt["losses"], ckpt["seconds"]
        print(f"resuming {args.out} at step {step}")
    else:
        try:
            channels = tuple(int(c) for c in args.channels.split(","))
        except ValueError:
            raise UserError(f"--channels must be integers separated by commas, got {args.channels!r}")
        if len(channels) != 3 or min(channels) < 8 or any(c % 8 for c in channels):
            raise UserError(f"--channels needs three multiples of 8 (GroupNorm uses 8 groups), got {args.channels}")
        model = UNet(**{**DEFAULT_CONFIG, "channels": channels}).to(device)
        diffusion = Diffusion(T=args.T)
        step, losses, seconds, ckpt = 0, [], 0.0, None
    print(f"UNet: {sum(p.numel() for p in model.parameters()):,} parameters")
    if device.type == "cpu" and model.config["channels"] == DEFAULT_CONFIG["channels"]:
        print("note: the default model is sized for a GPU and takes hours on a CPU; the README's small CPU config "
              "(--channels 32,64,64 --batch-size 64 --epochs 1) draws recognisable digits in minutes")

    ema = EMA(model, args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0,
                                  fused=device.type == "cuda")
    if ckpt is not None:
        ema.model.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])

    total_steps = plan_steps(len(images), args.batch_size, args.epochs, args.max_steps)

    save_forward_noising(diffusion, images, labels, os.path.join(args.figures, "forward_noising.png"))

    start = time.time()

    def save(at_step, at_losses):
        save_model(args.out, model, ema, diffusion, optimizer, at_step, at_losses,
                   seconds + time.time() - start, vars(args))

    forward = torch.compile(model, dynamic=False) if args.compile else model
    losses = fit(model, diffusion, images, labels, optimizer, ema, total_steps=total_steps,
                 batch_size=args.batch_size, lr=args.lr, p_uncond=args.p_uncond,
                 min_snr_gamma=args.min_snr_gamma, seed=args.seed,
                 start_step=step, losses=losses, save=save, forward=forward)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.time() - start
    trained = total_steps - step
    print(f"trained {trained} steps in {elapsed:.1f} s ({trained * args.batch_size / max(elapsed, 1e-9):,.0f} "
          f"images/s); checkpoint: {args.out}")
    if losses:
        save_loss_curve(os.path.join(args.figures, "loss.png"), losses)
    return dict(seconds=elapsed, steps=trained, images_per_s=trained * args.batch_size / max(elapsed, 1e-9))


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
