"""Drawing digits from a trained checkpoint: what denoise.py, evaluate.py and bench.py share.

    model, diffusion = load_sampler("checkpoints/model.pt", device, lora="checkpoints/lora.pt")
    interval = resolve_interval("auto", diffusion)                     # (82, 578) for T = 1000
    x = generate(model, diffusion, labels, steps=50, sampler="ddim", guidance=1.5, guidance_interval=interval)

The samplers themselves are in diffusion.py; this file adds what a run needs around them: the model (its
averaged weights, with or without an adapter), the default guidance interval worked out for the model's
own schedule, and sampling in seeded batches under bf16 autocast, with a progress bar.
"""
import torch
from tqdm import tqdm

from .checkpoint import load_model
from .cli import UserError, autocast
from .lora import load_lora, merge_lora, set_lora

GUIDANCE_SIGMAS = (0.28, 5.42)  # guide where sigma_t is in (0.28, 5.42]: Kynkaanniemi et al. 2024, ImageNet


def parse_interval(text):
    """'auto' -> 'auto' (resolved by resolve_interval); 'all' -> None (every step); '82,578' -> (82, 578)."""
    if text.strip().lower() in ("auto", "all"):
        return None if text.strip().lower() == "all" else "auto"
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--guidance-interval: expected auto, all or two steps like 82,578; got {text!r}")
    if not 0 <= lo <= hi:
        raise UserError(f"--guidance-interval: need 0 <= first <= second, got {text!r}")
    return lo, hi


def resolve_interval(interval, diffusion):
    """'auto' -> the steps of this schedule with sigma_t in GUIDANCE_SIGMAS ([82, 578] for T = 1000)."""
    if interval != "auto":
        return interval
    try:
        return diffusion.steps_with_sigma(*GUIDANCE_SIGMAS)
    except ValueError as e:
        raise UserError(f"--guidance-interval auto: {e}; give the steps as FIRST,LAST or use all")


def sampling_settings(args, interval, diffusion):
    """Diffusion.sample's keyword arguments from the command line, checked against the model's schedule."""
    if not 1 <= args.steps <= diffusion.T:
        raise UserError(f"--steps must be between 1 and T = {diffusion.T}, got {args.steps}")
    return dict(steps=args.steps, sampler=args.sampler, eta=args.eta, guidance=args.guidance,
                guidance_interval=resolve_interval(interval, diffusion))


def describe(sampler, steps, guidance, guidance_interval=None, **_):
    """A short human name for a sampling setting, e.g. 'DDIM-50, guidance 1.5 on t in [82, 578]'."""
    name = f"{sampler.upper()}-{steps}, guidance {guidance:g}"
    if guidance != 1 and guidance_interval is not None:
        name += f" on t in [{guidance_interval[0]}, {guidance_interval[1]}]"
    return name


def load_sampler(ckpt, device, weights="ema", lora=None, lora_scale=1.0, merge=False):
    """The model to sample from: a checkpoint's weights, optionally with a LoRA adapter (blended/merged)."""
    model, diffusion, _ = load_model(ckpt, device, weights=weights)
    model.eval()
    if lora:
        load_lora(model, lora, device)
        set_lora(model, enabled=True, scale=lora_scale)
        if merge:
            merge_lora(model)
    return model, diffusion


def generate(model, diffusion, labels, steps=50, sampler="ddim", eta=None, guidance=1.0, seed=0,
             batch_size=1000, **extra):
    """One sample per label in `labels` [N] -> [N,1,28,28] in [-1,1], `batch_size` at a time; bf16 on CUDA.

    Batching is what makes sampling fast: 10,000 digits at batch 1,000 are 10 passes down the chain, not
    10,000. One generator, seeded with `seed` and drawn from batch after batch, makes the result depend only
    on the seed and the batch size. `extra` goes on to Diffusion.sample, e.g. guidance_interval=(82, 578).
    """
    generator = torch.Generator(device=labels.device).manual_seed(seed)
    batches = labels.split(batch_size)
    # The bar counts steps, not batches: on a CPU one batch of 1,000 guided digits takes minutes.
    with tqdm(total=len(batches) * steps, desc="sampling", unit="step", leave=False) as bar, autocast(labels.device):
        return torch.cat([diffusion.sample(model, y, steps=steps, sampler=sampler, eta=eta, guidance=guidance,
                                           generator=generator, callback=bar.update, **extra) for y in batches])
