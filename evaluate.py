"""Chapter 4: put numbers on the samples -- class accuracy and FID in an MNIST classifier's features.

    python evaluate.py --ckpt checkpoints/model.pt                    # sample 1,000 per digit, then score
    python evaluate.py --ckpt checkpoints/model.pt --lora checkpoints/lora.pt --guidance 3
    python evaluate.py --samples samples.npz                          # score denoise.py --export output

The classifier is trained once (a few seconds on a GPU, several minutes on a CPU) and cached at
--classifier. Metrics are explained in model/metrics.py. FID is measured against the test set weighted to
the samples' digits; the "real-data floor" is the FID of real training images with the samples' labels,
scored the same way: what a perfect generator would score.
"""
import json
import os

import numpy as np
import torch

from model.cli import (Parser, UserError, check_writable, fraction, parse_digits, pick_device, positive_int, run_cli,
                       seed_everything)
from model.data import from_uint8
from model.metrics import Judge
from model.sampling import describe, generate, load_sampler, parse_interval, sampling_settings


def format_report(result, title):
    per = result["per_digit"]
    lines = [title,
             "| digit | " + " | ".join(str(d) for d in per) + " | all |",
             "|---" * (len(per) + 2) + "|",
             "| accuracy % | " + " | ".join(f"{100 * a:.1f}" for a in per.values())
             + f" | **{100 * result['accuracy']:.2f}** |",
             f"FID (classifier features): {result['fid']:.3f}   real-data floor: {result['fid_floor']:.3f}   "
             f"ratio: {result['fid'] / max(result['fid_floor'], 1e-12):.2f}x   ({result['n']:,} samples)"]
    return "\n".join(lines)


def parse_args(argv=None):
    p = Parser(__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", metavar="FILE.npz", help="samples written by denoise.py --export")
    src.add_argument("--ckpt", help="model checkpoint to sample from (train.py --out)")
    p.add_argument("--lora", help="with --ckpt: a LoRA adapter to sample with")
    p.add_argument("--lora-scale", type=float, default=1.0, help="blend the adapter: 0 = base, 1 = full")
    p.add_argument("--per-digit", type=positive_int, default=1000, help="with --ckpt: samples per digit")
    p.add_argument("--digits", default="0-9", help="with --ckpt: which digits")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="with --ckpt: reverse process")
    p.add_argument("--steps", type=positive_int, default=50, help="with --ckpt: denoising steps")
    p.add_argument("--eta", type=fraction, help="with --ckpt: DDIM noise (default 0)")
    p.add_argument("--guidance", type=float, default=1.5, help="with --ckpt: classifier-free guidance scale")
    p.add_argument("--guidance-interval", default="auto",
                   help="with --ckpt: steps where guidance acts: auto, all, or FIRST,LAST (see denoise.py --help)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--batch-size", type=positive_int, default=1000, help="images sampled at once")
    p.add_argument("--classifier", default="checkpoints/classifier.pt", help="cached classifier (trained if absent)")
    p.add_argument("--data-dir", default="data", help="folder holding MNIST/raw/ (torchvision's layout)")
    p.add_argument("--device", help="cuda, mps or cpu (default: cuda if available, else mps, else cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    return p.parse_args(argv)


def load_samples(path, device):
    """An .npz from denoise.py --export -> (images [N,1,28,28] in [-1,1], labels [N])."""
    if not os.path.isfile(path):
        raise UserError(f"samples not found: {path}")
    try:
        data = np.load(path)
        images, labels = torch.from_numpy(data["images"]), torch.from_numpy(data["labels"]).long()
    except Exception as e:
        raise UserError(f"cannot read {path} as denoise.py --export output ({type(e).__name__}: {e})")
    if images.dtype != torch.uint8 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise UserError(f"{path}: expected uint8 images [N,28,28] and labels [N]")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
        raise UserError(f"{path}: labels must be digits 0-9")
    return from_uint8(images.to(device).unsqueeze(1)), labels.to(device)


def main(argv=None):
    args = parse_args(argv)
    interval = parse_interval(args.guidance_interval)
    if args.samples and args.lora:
        raise UserError("--lora samples from a checkpoint: use it with --ckpt, not --samples")
    if args.lora_scale != 1.0 and not args.lora:
        raise UserError("--lora-scale needs an adapter: add --lora PATH")
    if not os.path.exists(args.classifier):
        check_writable(args.classifier)  # it will be trained and cached there: fail now, not after training
    device = pick_device(args.device)
    seed_everything(args.seed)
    if args.samples:
        images, labels = load_samples(args.samples, device)
        title = f"{len(images):,} samples from {args.samples}"
    else:
        model, diffusion = load_sampler(args.ckpt, device, lora=args.lora, lora_scale=args.lora_scale)
        sampling = sampling_settings(args, interval, diffusion)
        labels = torch.tensor(parse_digits(args.digits), device=device).repeat_interleave(args.per_digit)
        images = generate(model, diffusion, labels, seed=args.seed, batch_size=args.batch_size, **sampling)
        source = args.ckpt + (f" + {args.lora}" if args.lora else "")
        title = f"{len(images):,} samples from {source} ({describe(**sampling)})"
    if len(images) < 2:
        raise UserError(f"FID needs at least 2 samples, got {len(images)}")
    judge = Judge(args.classifier, args.data_dir, device)
    result = judge(images, labels)
    result["classifier_test_accuracy"], result["classifier_fingerprint"] = judge.test_accuracy, judge.fingerprint
    if args.json:
        print(json.dumps(result))
    else:
        print(f"classifier: {100 * judge.test_accuracy:.2f}% on MNIST test (weights {judge.fingerprint})")
        print(format_report(result, title))
    return result


if __name__ == "__main__":
    run_cli(main)
