"""Drawing digits from a trained checkpoint: what denoise.py, evaluate.py and bench.py share.

    s = load_sampler("checkpoints/model.pt", device, loras=["checkpoints/lora.pt"])  # s.model, s.diffusion, ...
    interval = resolve_interval("auto", diffusion)                     # (82, 578) for T = 1000
    x = generate(model, diffusion, labels, steps=20, sampler="ddim", eta=1.0, guidance=1.3, guidance_interval=interval)

The samplers themselves are in diffusion.py; this file adds what a run needs around them: the model (its
averaged weights, with any number of adapters stacked on it), the sampling settings of the checkpoint's
preset, the default guidance interval worked out for the model's own schedule, and sampling in seeded
batches under bf16 autocast (on CUDA), with a progress bar.
"""
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

from model.adapters import merge_lora
from model.controlnet import Controlled
from model.controls import control_image
from model.data import load_mnist
from model.quant import merge_requantized
from model.training import autocast

from .cli import at_most, fraction, nonnegative_float, positive_int, prepare_model, seed_int
from .config import PRESETS, sample_config, with_flags
from .files import base_fingerprints, load_controlnet, load_lora, load_model, read_drawing

# Where the scripts look for a model when --ckpt is not given: your own, else the one that ships.
OWN_CHECKPOINT, SHIPPED_CHECKPOINT = "checkpoints/model.pt", "pretrained/model.pt"

GUIDANCE_SIGMAS = (0.28, 5.42)  # guide where sigma_t is in (0.28, 5.42]: Kynkaanniemi et al. 2024, ImageNet
MAX_SAMPLES = 200_000            # digits one run holds (on the host, 3 KiB each)
MAX_GUIDANCE = 50.0             # far past any useful scale; beyond it the samples are noise
guidance_scale = at_most(MAX_GUIDANCE, "the guidance scale; 1 = no guidance")


def parse_interval(text):
    """'auto' -> 'auto' (resolved by resolve_interval); 'all' -> None (every step); '82,578' -> (82, 578)."""
    if text.strip().lower() in ("auto", "all"):
        return None if text.strip().lower() == "all" else "auto"
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--guidance-interval: expected auto, all or two steps like 82,578; got {text!r}")
    if not 0 <= lo <= hi:
        raise ValueError(f"--guidance-interval: need 0 <= first <= second, got {text!r}")
    return lo, hi


def resolve_interval(interval, diffusion):
    """'auto' -> the steps of this schedule with sigma_t in GUIDANCE_SIGMAS ([82, 578] for T = 1000)."""
    if interval != "auto":
        return interval
    try:
        return diffusion.steps_with_sigma(*GUIDANCE_SIGMAS)
    except ValueError as e:
        raise ValueError(f"--guidance-interval auto: {e}; give the steps as FIRST,LAST or use all")


def add_sampling_flags(p):
    """The flags denoise.py and evaluate.py share. Defaults of None come from the checkpoint's preset."""
    p.add_argument("--ckpt", help=f"trained model checkpoint (default: {OWN_CHECKPOINT} if it exists, "
                                  f"else the shipped {SHIPPED_CHECKPOINT})")
    p.add_argument("--lora", nargs="+", action="extend", metavar="ADAPTER", default=[],
                   help="LoRA adapter file(s) (lora_finetune.py --out); several stack, e.g. bold.pt italic.pt")
    p.add_argument("--lora-scale", nargs="+", action="extend", type=nonnegative_float, metavar="S",
                   help="blend each adapter: 0 = off, 1 = full (one value for all, or one per adapter)")
    p.add_argument("--digits", default="0-9", help="which digits, e.g. 0-9, 3 or 1,4,7")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="reverse process")
    p.add_argument("--steps", type=positive_int, help="denoising steps, at most T (default: the preset's)")
    p.add_argument("--eta", type=fraction, help="DDIM noise: 0 deterministic, 1 like DDPM (default: the preset's)")
    p.add_argument("--guidance", type=guidance_scale,
                   help="classifier-free guidance scale s: 1 = plain conditional, >1 = stronger (default: the preset's)")
    p.add_argument("--guidance-interval",
                   help="steps where guidance acts: auto, all, or FIRST,LAST (see denoise.py --help; default: the "
                        "preset's)")
    p.add_argument("--controlnet", metavar="FILE", help="steer the model with a ControlNet (controlnet_train.py --out)")
    p.add_argument("--control-from", default="test", metavar="test|DRAWING.png",
                   help="with --controlnet: the controls of real test digits of each label (test), or of a digit you "
                        "drew in any paint program, any size, light or dark paper")
    p.add_argument("--control-scale", type=at_most(MAX_GUIDANCE, "how strongly the ControlNet steers; 0 = not at all"),
                   default=1.0, help="how strongly the ControlNet steers: its residuals times this")
    p.add_argument("--data-dir", default="data", help="folder holding MNIST/raw/ (torchvision's layout)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed for the starting noise and the sampler")
    p.add_argument("--batch-size", type=positive_int, help="digits sampled at once (default: the preset's)")
    p.add_argument("--device", help="cuda, mps or cpu (default: cuda if available, else mps, else cpu)")


def presets_text():
    """The sampling settings of every preset, for a script's --help."""
    lines = [f"  {name}: {describe('ddim', c.steps, c.guidance, parse_interval(c.guidance_interval), c.eta)}, "
             f"batch {c.batch_size}" for name, c in ((n, p["sample"]) for n, p in PRESETS.items())]
    lines += [f"  {name}, a DiT: guidance {p['dit_sample'].guidance:g}" for name, p in PRESETS.items()
              if p["dit_sample"].guidance != p["sample"].guidance]
    return "\nThe presets sample with (--guidance-interval auto for 'auto'):\n" + "\n".join(lines) + "\n"


def digit_labels(digits, per_digit, device):
    """[d0 x per_digit, d1 x per_digit, ...]: the labels of a run of samples, refused if too many to hold."""
    if len(digits) * per_digit > MAX_SAMPLES:
        raise ValueError(f"{len(digits) * per_digit:,} samples asked for; at most {MAX_SAMPLES:,} fit in one run: "
                         "lower --per-digit, and export several runs with different --seed")
    return torch.tensor(digits, device=device).repeat_interleave(per_digit)


def control_inputs(args, controlnet, labels):
    """The control image [N, 1, 28, 28] for each sample: of the first test digits of its label, one after
    another, or of the digit drawn in the PNG --control-from names, for every sample."""
    kind = controlnet.kind
    if args.control_from != "test":
        return control_image(kind, read_drawing(args.control_from, labels.device)).expand(len(labels), -1, -1, -1)
    images, test_labels = load_mnist(args.data_dir, train=False, device=labels.device)
    pick = torch.empty_like(labels)
    for d in labels.unique().tolist():
        where, of_d = (labels == d).nonzero().flatten(), (test_labels == d).nonzero().flatten()
        pick[where] = of_d[torch.arange(len(where), device=labels.device) % len(of_d)]
    return control_image(kind, images[pick])


def default_checkpoint(path):
    """The checkpoint to sample from: the one named, else your own, else the shipped one."""
    if path:
        return path
    if os.path.exists(OWN_CHECKPOINT) or not os.path.exists(SHIPPED_CHECKPOINT):
        return OWN_CHECKPOINT
    print(f"using the shipped model {SHIPPED_CHECKPOINT} (train your own with train.py)")
    return SHIPPED_CHECKPOINT


def lora_scales(args):
    """One scale per --lora adapter: none given -> 1 each; one given -> that for all."""
    scales = args.lora_scale or [1.0]
    if not args.lora and args.lora_scale:
        raise ValueError("--lora-scale needs an adapter: add --lora PATH")
    twice = sorted({p for p in args.lora if [os.path.abspath(q) for q in args.lora].count(os.path.abspath(p)) > 1})
    if twice:
        raise ValueError(f"--lora: {', '.join(twice)} is given twice; an adapter stacked on itself doubles its style "
                         "(use --lora-scale 2 for that)")
    if len(scales) == 1:
        return scales * len(args.lora)
    if len(scales) != len(args.lora):
        raise ValueError(f"--lora-scale: give one value, or one per adapter ({len(args.lora)}), got {len(scales)}")
    return scales


def sampling_settings(args, ckpt, diffusion, device):
    """Diffusion.sample's keyword arguments and the batch size: the checkpoint's preset, then the flags,
    checked against the model's schedule."""
    config = with_flags(sample_config(ckpt, device), args)
    if diffusion.T < 1:
        raise ValueError(f"the checkpoint's schedule has T = {diffusion.T} steps; it is broken, retrain it")
    if not 1 <= config.steps <= diffusion.T:
        raise ValueError(f"--steps must be between 1 and T = {diffusion.T}, got {config.steps}")
    if args.sampler == "ddpm" and args.eta is not None:
        raise ValueError("--eta is DDIM's noise; DDPM always draws fresh noise: leave --eta out, or use --sampler ddim")
    interval = resolve_interval(parse_interval(config.guidance_interval), diffusion)
    if interval is not None and config.guidance != 1:
        sampled = diffusion.timesteps(config.steps)
        if not any(interval[0] <= t <= interval[1] for t in sampled):
            raise ValueError(f"--guidance-interval {interval[0]},{interval[1]} holds none of the {config.steps} steps "
                             f"sampled ({sampled[0]} down to {sampled[-1]}), so guidance would never act; widen it")
    return dict(steps=config.steps, sampler=args.sampler, eta=config.eta, guidance=config.guidance,
                guidance_interval=interval), config.batch_size


def describe(sampler, steps, guidance, guidance_interval=None, eta=None, **_):
    """A short human name for a sampling setting, e.g. 'DDIM-20, eta 1, guidance 1.3 on t in [82, 999]'."""
    noise = f"eta {eta:g}, " if sampler == "ddim" and eta else ""  # DDPM is always stochastic: no eta to name
    name = f"{sampler.upper()}-{steps}, {noise}guidance {guidance:g}"
    if guidance != 1 and guidance_interval == "auto":
        name += " on the auto interval"
    elif guidance != 1 and guidance_interval is not None:
        name += f" on t in [{guidance_interval[0]}, {guidance_interval[1]}]"
    return name


@dataclass
class Sampler:
    """What sampling needs: the model (with its adapters in it), its schedule, the checkpoint dict,
    [(adapter file dict, its LoRA layers), ...], and a ControlNet with its file dict, or None."""
    model: torch.nn.Module
    diffusion: object
    checkpoint: dict
    adapters: list
    controlnet: tuple = None


def load_sampler(ckpt, device, weights="ema", loras=(), scales=None, merge=False, controlnet=None):
    """The model to sample from: a checkpoint's weights, with any number of LoRA adapters stacked on it,
    each at its own scale (and folded into the weights with `merge`; on a 4-bit base, quantised again with
    them), and the ControlNet file `controlnet` (built on the base before any adapter goes in: the adapters
    then act on the locked UNet it steers)."""
    model, diffusion, checkpoint = load_model(ckpt, device, weights=weights)
    four_bit = "quantized" in checkpoint
    if four_bit and controlnet:
        raise ValueError(f"{ckpt} is a 4-bit model, and a ControlNet is a copy of its base's encoder in full precision: "
                         "give --ckpt the model the ControlNet was trained on")
    model = prepare_model(model.eval(), device)
    base_fp = base_fingerprints(model, checkpoint)  # every adapter must fit this base, not base + another
    control = load_controlnet(controlnet, model, device, base_fp[0]) if controlnet else None
    adapters = []
    for path, scale in zip(loras, scales or [1.0] * len(loras)):
        adapter, layers = load_lora(model, path, device, base_fingerprint=base_fp)
        for layer in layers.values():
            layer.scale = scale
        adapters.append((adapter, layers))
    if merge:
        merge_requantized(model) if four_bit else merge_lora(model)
    return Sampler(model, diffusion, checkpoint, adapters, control)


def adapter_name(adapters):
    """'bold', or 'bold+italic' for stacked adapters: from the styles recorded in the adapter files."""
    return "+".join(a["config"].get("style", "lora") for a, _ in adapters)


def generate(model, diffusion, labels, steps=50, sampler="ddim", eta=None, guidance=1.0, seed=0,
             batch_size=1000, controlnet=None, controls=None, control_scale=1.0, **extra):
    """One sample per label in `labels` [N] -> [N,1,28,28] in [-1,1], `batch_size` at a time; bf16 on CUDA.

    Batching is what makes sampling fast: 10,000 digits at batch 1,000 are 10 passes down the chain, not
    10,000. One generator, seeded with `seed` and drawn from batch after batch, makes the result depend only
    on the seed and the batch size. With a `controlnet`, sample i is steered by control image controls[i].
    `extra` goes on to Diffusion.sample, e.g. guidance_interval=(82, 578).
    """
    generator = torch.Generator(device=labels.device).manual_seed(seed)
    batches = labels.split(batch_size)
    nets = [model] * len(batches) if controlnet is None else \
        [Controlled(model, controlnet, c, control_scale) for c in controls.split(batch_size)]
    # The bar counts steps, not batches: on a CPU one batch of 1,000 guided digits takes minutes.
    with tqdm(total=len(batches) * steps, desc="sampling", unit="step", leave=False) as bar, autocast(labels.device):
        return torch.cat([diffusion.sample(net, y, steps=steps, sampler=sampler, eta=eta, guidance=guidance,
                                           generator=generator, callback=lambda *_: bar.update(), **extra)
                          for net, y in zip(nets, batches)])
