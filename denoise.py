"""Chapter 3: draw digits by running the diffusion backwards, with or without a LoRA adapter.

    python denoise.py                                   # figure/samples.png: digits 0-9, ten of each
    python denoise.py --lora checkpoints/lora.pt        # the same with the adapter (samples_lora.png)
    python denoise.py --lora checkpoints/lora.pt --compare   # LoRA off | on, same noise side by side
    python denoise.py --export samples.npz --per-digit 1000  # for evaluate.py

Samplers: DDIM (default; deterministic with --eta 0, 50 steps) or DDPM (ancestral; --steps 1000 is the
original chain). Guidance follows diffusers: eps = eps_null + s (eps_y - eps_null); s = 1 is plain
conditional sampling, s > 1 trades diversity for fidelity to the label. By default (--guidance-interval
auto) guidance acts only on the steps where sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) is in
(0.28, 5.42], the interval of Kynkaanniemi et al. 2024: t = 82..578 for the default schedule. 'all' guides
every step; FIRST,LAST picks the steps by hand.
"""
import time

import numpy as np
import torch

from model.cli import (Parser, UserError, autocast, check_writable, fraction, parse_digits, pick_device, positive_int,
                       run_cli)
from model.data import to_uint8
from model.figures import save_grid
from model.lora import load_lora, merge_lora, set_lora
from model.sampling import describe, generate, load_sampler, parse_interval, sampling_settings


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--ckpt", default="checkpoints/model.pt", help="trained model checkpoint (train.py --out)")
    p.add_argument("--lora", help="LoRA adapter file (lora_finetune.py --out); default: the base model alone")
    p.add_argument("--lora-scale", type=float, default=1.0, help="blend the adapter: 0 = base, 1 = full")
    p.add_argument("--merge", action="store_true",
                   help="fold the adapter into the weights before sampling (same images, base model's speed)")
    p.add_argument("--compare", action="store_true",
                   help="also draw LoRA off / on from the same noise into figure/compare_lora.png")
    p.add_argument("--per-digit", type=positive_int, default=10, help="samples per digit")
    p.add_argument("--digits", default="0-9", help="which digits, e.g. 0-9, 3 or 1,4,7")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="reverse process")
    p.add_argument("--steps", type=positive_int, default=50, help="denoising steps (at most T, e.g. 1000)")
    p.add_argument("--eta", type=fraction, help="DDIM noise: 0 deterministic (default), 1 like DDPM")
    p.add_argument("--guidance", type=float, default=1.5,
                   help="classifier-free guidance scale s (1 = plain conditional, >1 = stronger)")
    p.add_argument("--guidance-interval", default="auto",
                   help="steps where guidance acts: auto, all, or FIRST,LAST (see the top of --help)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="the averaged (default) or the last training weights")
    p.add_argument("--seed", type=int, default=0, help="seed for the starting noise and the sampler")
    p.add_argument("--batch-size", type=positive_int, default=1000, help="images sampled at once")
    p.add_argument("--device", help="cuda, mps or cpu (default: cuda if available, else mps, else cpu)")
    p.add_argument("--out", help="PNG grid (default figure/samples.png, or figure/samples_lora.png with --lora)")
    p.add_argument("--process", help="PNG of the reverse chain, one digit per row "
                   "(default figure/denoise_process.png; '' to skip)")
    p.add_argument("--compare-out", default="figure/compare_lora.png", help="PNG written by --compare")
    p.add_argument("--export", metavar="FILE.npz",
                   help="also save all samples: uint8 images [N,28,28] (0 = black) and int labels [N]")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA; slower start)")
    p.add_argument("--max-grid", type=positive_int, default=20, help="at most this many samples per row")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    digits = parse_digits(args.digits)
    if (args.merge or args.compare or args.lora_scale != 1.0) and not args.lora:
        raise UserError("--merge, --compare and --lora-scale need an adapter: add --lora PATH")
    suffix = "_lora" if args.lora else ""
    out = args.out or f"figure/samples{suffix}.png"
    process = f"figure/denoise_process{suffix}.png" if args.process is None else args.process
    for path in [out, process, args.export, args.compare and args.compare_out]:
        if path:
            check_writable(path)
    interval = parse_interval(args.guidance_interval)
    if args.export and not args.export.endswith(".npz"):
        raise UserError(f"--export writes a NumPy .npz file; got {args.export}")
    device = pick_device(args.device)

    model, diffusion = load_sampler(args.ckpt, device, args.weights)
    sampling = sampling_settings(args, interval, diffusion)
    labels = torch.tensor(digits, device=device).repeat_interleave(args.per_digit)  # [D * per_digit]

    def draw(net):
        return generate(net, diffusion, labels, seed=args.seed, batch_size=args.batch_size, **sampling)

    name = describe(**sampling)
    compare = {}
    if args.lora:
        load_lora(model, args.lora, device)
        if args.compare:  # the same seed with the adapter switched off: the difference is LoRA alone
            set_lora(model, enabled=False)
            compare["LoRA off"] = draw(model)
        set_lora(model, enabled=True, scale=args.lora_scale)
        if args.merge:
            merge_lora(model)
        name += f", LoRA x{args.lora_scale:g}" + (" merged" if args.merge else "")
    net = torch.compile(model, dynamic=False) if args.compile else model

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.time()
    x = draw(net)  # [N, 1, 28, 28] in [-1, 1]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - start
    print(f"sampled {len(x):,} digits ({name}) in {seconds:.2f} s on {device}")

    images = to_uint8(x[:, 0]).cpu()  # [N, 28, 28], 0 = black background
    grid = images.view(len(digits), args.per_digit, 28, 28)[:, :args.max_grid]
    row_labels = [str(d) for d in digits]
    save_grid(out, {"": grid}, row_labels, title=name)
    print(f"wrote {out}")
    if args.compare:
        compare["LoRA on"] = x
        panels = {k: to_uint8(v).view(len(digits), args.per_digit, 28, 28)[:, :args.max_grid].cpu()
                  for k, v in compare.items()}
        save_grid(args.compare_out, panels, row_labels, title=f"same seed, {name}")
        print(f"wrote {args.compare_out}")
    if process:
        save_process(process, model, diffusion, digits, args.seed, name, **sampling)
        print(f"wrote {process}")
    if args.export:
        np.savez_compressed(args.export, images=images.numpy(), labels=labels.cpu().numpy())
        print(f"wrote {len(images):,} samples to {args.export}")
    return dict(seconds=seconds, images=images, labels=labels.cpu())


def save_process(path, model, diffusion, digits, seed, name, **sampling):
    """One chain per digit: x_T, then nine snapshots down to x_0, from the same starting noise x_T."""
    device = next(model.parameters()).device
    y = torch.tensor(digits, device=device)
    x_T = torch.randn(len(y), 1, 28, 28, device=device, generator=torch.Generator(device).manual_seed(seed))
    with autocast(device):
        _, frames = diffusion.sample(model, y, frames=9, x_T=x_T.clone(),
                                     generator=torch.Generator(device).manual_seed(seed + 1), **sampling)
    strip = torch.stack([x_T] + [x_t for _, x_t in frames], 1).cpu()  # [D, 10, 1, 28, 28]
    cols = [f"t={diffusion.T - 1}"] + [f"t={t}" if t >= 0 else "x_0" for t, _ in frames]
    save_grid(path, {"": strip}, [str(d) for d in digits], cols, title=f"reverse process ({name})")


if __name__ == "__main__":
    run_cli(main)
