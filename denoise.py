"""Chapter 3: draw digits by running the diffusion backwards, with or without LoRA adapters.

    python denoise.py                                        # outputs/samples.png: digits 0-9, ten of each
    python denoise.py --lora checkpoints/lora.pt --compare   # LoRA off | on from the same noise
    python denoise.py --lora checkpoints/lora.pt --sweep     # the style fading in: scale 0 -> 1.5 (PNG and GIF)
    python denoise.py --ckpt pretrained/model.pt --lora pretrained/bold.pt pretrained/italic.pt --compare
    python denoise.py --export samples.npz --per-digit 1000  # for evaluate.py
    python denoise.py --ckpt pretrained/model-nf4.pt --lora pretrained/bold-nf4.pt --compare --beside pretrained/model.pt
    python denoise.py --ckpt pretrained/model.pt --attention outputs/attention.png   # where pixels look in the label
    python denoise.py --ckpt pretrained/dit.pt --beside pretrained/model.pt     # the Diffusion Transformer beside the UNet
    python denoise.py --ckpt pretrained/model.pt --controlnet pretrained/controlnet-skeleton.pt   # control | drawn
    python denoise.py --ckpt pretrained/model.pt --controlnet pretrained/controlnet-skeleton.pt --control-from my.png

Samplers: DDIM (default; deterministic with --eta 0, a fresh noise draw each step with --eta 1) or DDPM
(ancestral; --steps 1000 is the original chain); the number of steps, eta, the guidance scale, the steps
where guidance acts and the batch size follow the checkpoint's preset (listed below). Guidance follows
diffusers: eps = eps_null + s (eps_y - eps_null); s = 1 is plain conditional sampling, s > 1 trades
diversity for fidelity to the label. --guidance-interval auto guides the steps whose noise level
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) lies in the interval of Kynkaanniemi et al. (2024);
all guides every step; FIRST,LAST picks the steps by hand. Several adapters stack (each with its own
--lora-scale), as Stable Diffusion LoRAs do.
"""
import math
import os
import time

import torch

from harness.cli import OUTPUTS, Parser, check_writable, parse_digits, pick_device, positive_int, run_cli
from harness.figures import save_attention, save_grid, save_schedule, save_strip_gif
from harness.files import save_npz
from harness.sampling import (add_sampling_flags, adapter_name, control_inputs, default_checkpoint, describe, guidance_scale,
                              digit_labels, generate, load_sampler, lora_scales, parse_interval, presets_text,
                              sampling_settings)
from model.adapters import lora_layers, set_lora
from model.attention import CrossAttention
from model.data import to_uint8
from model.training import autocast

SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # rows of the --sweep figure; past 1 the style is exaggerated
GIF_FRAMES = 16                                   # scale 0 -> 1.5 in the --sweep animation


def parse_args(argv=None):
    p = Parser(__doc__ + presets_text())
    add_sampling_flags(p)
    p.add_argument("--merge", action="store_true",
                   help="fold the adapters into the weights before sampling (same images, base model's speed; "
                        "into a 4-bit model's weights, quantised again with them, which is lossy)")
    p.add_argument("--compare", action="store_true",
                   help="also draw LoRA off | on from the same noise (FIGURES/compare_STYLE.png)")
    p.add_argument("--sweep", action="store_true",
                   help="also draw the adapters at scales 0 .. 1.5 from the same noise "
                        "(FIGURES/sweep_STYLE.png and an animated .gif)")
    p.add_argument("--beside", metavar="CKPT", help="also draw the same digits from the same noise with another "
                   "model (no adapters), as the first panel: e.g. the full-precision model beside its 4-bit copy")
    p.add_argument("--per-digit", type=positive_int, default=10, help="samples per digit")
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="the averaged (default) or the last training weights")
    p.add_argument("--figures", default=OUTPUTS, help=f"folder for the figures, named below (default {OUTPUTS}/; "
                                                       "--figures figure refreshes the README's)")
    p.add_argument("--out", help="PNG grid (default FIGURES/samples.png, or FIGURES/samples_STYLE.png with --lora)")
    p.add_argument("--process", help="PNG of the reverse chain, one digit per row "
                   "(default FIGURES/denoise_process.png without --lora; '' to skip)")
    p.add_argument("--guidance-sweep", type=guidance_scale, nargs="+", metavar="S",
                   help="draw the same noise at each guidance scale S, one panel each -> FIGURES/guidance_sweep.png")
    p.add_argument("--attention", metavar="PNG", help="also draw the first cross-attention layer's map halfway "
                   "down the chain: for one digit of each label, which of its context tokens each location reads")
    p.add_argument("--export", metavar="FILE.npz",
                   help="also save all samples: uint8 images [N,28,28] (0 = black) and int labels [N]")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA; slower start)")
    p.add_argument("--max-grid", type=positive_int, default=20, help="at most this many samples per row")
    return p.parse_args(argv)


def check_flags(args):
    """Everything that can be checked before a model is loaded."""
    if (args.merge or args.compare or args.sweep) and not args.lora:
        raise ValueError("--merge, --compare and --sweep need an adapter: add --lora PATH")
    if args.merge and (args.compare or args.sweep):
        raise ValueError("--merge folds the adapters in for good: it cannot be combined with --compare or --sweep")
    if args.export and not args.export.endswith(".npz"):
        raise ValueError(f"--export writes a NumPy .npz file; got {args.export}")
    if args.guidance_interval is not None:
        parse_interval(args.guidance_interval)
    if args.controlnet and (args.sweep or args.process or args.beside or args.guidance_sweep or args.attention):
        raise ValueError("--sweep, --guidance-sweep, --process, --attention and --beside draw without the "
                         "ControlNet's controls: leave them out with --controlnet")


def output_paths(args, tag):
    """{what: path} of the files this run writes, each checked to be writable before any sampling."""
    figure = lambda name: os.path.join(args.figures, name)
    paths = dict(out=args.out if args.out is not None else figure(f"samples{'_' + tag if tag else ''}.png"),
                 process=("" if tag or args.controlnet else figure("denoise_process.png")) if args.process is None
                 else args.process,
                 compare=figure(f"compare_{tag}.png") if args.compare else "",
                 sweep=figure(f"sweep_{tag}.png") if args.sweep else "", export=args.export or "",
                 guidance=figure(f"guidance_sweep{'_' + tag if tag else ''}.png") if args.guidance_sweep else "",
                 attention=args.attention or "")
    # The noise schedule goes with the reverse process's default figure: the same steps, seen as numbers.
    paths["schedule"] = figure("noise_schedule.png") if paths["process"] and args.process is None else ""
    for what, path in paths.items():
        if path and what != "export" and not path.lower().endswith(".png"):
            raise ValueError(f"--{what} writes a PNG image: give a path ending in .png, got {path!r}")
        if path:
            check_writable(path)
    return paths


def main(argv=None):
    args = parse_args(argv)
    check_flags(args)
    labels_wanted = (parse_digits(args.digits), args.per_digit)
    scales = lora_scales(args)
    device = pick_device(args.device)
    ckpt = default_checkpoint(args.ckpt)
    loaded = load_sampler(ckpt, device, args.weights, args.lora, scales, merge=args.merge,
                          controlnet=args.controlnet)
    model, diffusion, adapters = loaded.model, loaded.diffusion, loaded.adapters
    other = load_sampler(args.beside, device, args.weights) if args.beside else None
    controlnet = loaded.controlnet[0] if loaded.controlnet else None
    sampling, batch_size = sampling_settings(args, loaded.checkpoint, diffusion, device)
    # A DiT's and a 4-bit model's figures get names of their own (samples_dit.png, compare_nf4_bold.png, ...),
    # so that they never replace the UNet's.
    dit, four_bit = loaded.checkpoint.get("backbone") == "dit", "quantized" in loaded.checkpoint
    tag = "_".join(filter(None, ["dit" if dit else "", "nf4" if four_bit else "",
                                 controlnet and f"controlnet-{controlnet.kind}", adapter_name(adapters)]))
    paths = output_paths(args, tag)
    if paths["attention"] and not any(isinstance(m, CrossAttention) for m in model.modules()):
        raise ValueError(f"--attention draws the UNet's cross-attention map, and {ckpt} is no UNet: "
                         "give --ckpt a UNet checkpoint (e.g. pretrained/model.pt)")
    digits, labels = labels_wanted[0], digit_labels(*labels_wanted, device)  # [D * per_digit]
    controls = control_inputs(args, controlnet, labels) if controlnet else None  # [N, 1, 28, 28] in {0, 1}
    name = describe(**sampling) + "".join(
        f", LoRA {a['config'].get('style', 'lora')} x{scale:g}" for (a, _), scale in zip(adapters, scales))
    strength = f" x{args.control_scale:g}" if args.control_scale != 1 else ""
    name += (" merged" if args.merge else "") + (f", ControlNet {controlnet.kind}{strength}" if controlnet else "")

    def draw(net, y=labels, schedule=diffusion):
        return generate(net, schedule, y, seed=args.seed, batch_size=batch_size, controlnet=controlnet,
                        controls=controls, control_scale=args.control_scale, **sampling)

    def grid(images):  # [N, 1, 28, 28] -> [D, up to max_grid, 28, 28] uint8 on the host
        return to_uint8(images).view(len(digits), args.per_digit, 28, 28)[:, :args.max_grid].cpu()

    start = time.time()
    x = draw(torch.compile(model, dynamic=False) if args.compile else model)  # [N, 1, 28, 28] in [-1, 1]
    seconds = time.time() - start  # the samples are on the host now, so a GPU has finished too
    print(f"sampled {len(x):,} digits ({name}) in {seconds:.2f} s on {device}")
    rows = [str(d) for d in digits]
    panels = {"": grid(x)} if controls is None else {"control": grid(controls * 2 - 1), "drawn": grid(x)}
    beside = {os.path.basename(args.beside): grid(draw(other.model, schedule=other.diffusion))} if other else {}
    if beside:
        panels = {**beside, os.path.basename(ckpt) + (f" + {adapter_name(adapters)}" if adapters else ""): grid(x)}
    save_grid(paths["out"], panels, rows, title=name)
    images = to_uint8(x[:, 0]).cpu()  # [N, 28, 28], 0 = black background
    result = dict(seconds=seconds, images=images, labels=labels.cpu(),
                  merged=args.merge and all(layer.merged_scale is not None for layer in lora_layers(model)))
    if args.compare:  # the same seed with every adapter switched off: the difference is LoRA alone
        set_lora(model, enabled=False)
        off = draw(model)
        set_lora(model, enabled=True)
        result["off"] = to_uint8(off[:, 0]).cpu()
        on_what = f"{os.path.basename(ckpt)}, " if beside else ""  # beside another model: say which is which
        save_grid(paths["compare"], {**beside, f"{on_what}LoRA off": grid(off),
                                     f"{on_what}LoRA on ({adapter_name(adapters)})": grid(x)}, rows,
                  title=f"same seed, {name}")
    if args.sweep:
        save_sweep(paths["sweep"], model, draw, digits, tag, describe(**sampling))  # the rows name the scales
    if args.guidance_sweep:  # the same noise at each scale: guidance trades variety for the label
        panels = {f"guidance {s:g}": grid(generate(model, diffusion, labels, seed=args.seed, batch_size=batch_size,
                                                   **dict(sampling, guidance=s))) for s in args.guidance_sweep}
        interval = sampling["guidance_interval"]
        where = f" on t in [{interval[0]}, {interval[1]}]" if interval else " at every step"
        save_grid(paths["guidance"], panels, rows, title=f"the same noise at each guidance scale{where}; "
                  f"{sampling['sampler'].upper()}-{sampling['steps']}, eta {sampling['eta']:g}")
    if paths["schedule"]:
        save_schedule(paths["schedule"], diffusion, sampling["guidance_interval"])
    if paths["process"]:
        save_process(paths["process"], model, diffusion, digits, args.seed, name, **sampling)
    if paths["attention"]:
        save_attention_map(paths["attention"], model, diffusion, digits, args.seed, name, **sampling)
    if args.export:
        save_npz(args.export, images=images.numpy(), labels=labels.cpu().numpy())
    print("wrote " + ", ".join(p for p in paths.values() if p) + (" (and the .gif)" if args.sweep else ""))
    return result


def save_sweep(path, model, draw, digits, tag, name):
    """One digit of each class at LoRA scales 0 .. 1.5 (each adapter's own scale times s), same noise: a PNG
    with one row per scale, and a GIF in which the style fades in."""
    layers = lora_layers(model)
    own = [layer.scale for layer in layers]
    y = torch.tensor(digits, device=next(model.parameters()).device)

    def at(s):
        for layer, base_scale in zip(layers, own):
            layer.scale = s * base_scale
        return to_uint8(draw(model, y)[:, 0]).cpu()  # [D, 28, 28]

    rows = torch.stack([at(s) for s in SWEEP])  # [scales, D, 28, 28]
    save_grid(path, {"": rows}, [f"x{s:g}" for s in SWEEP], [str(d) for d in digits],
              title=f"LoRA scale sweep ({tag}), same seed; {name}")
    frames = [(f"LoRA {tag} x{s:.2f}", at(s)) for s in torch.linspace(0, SWEEP[-1], GIF_FRAMES).tolist()]
    save_strip_gif(path[:-4] + ".gif", frames)
    for layer, base_scale in zip(layers, own):
        layer.scale = base_scale


def save_process(path, model, diffusion, digits, seed, name, **sampling):
    """One chain per digit, from the same starting noise: x_t at ten steps down to x_0 (left), and beside
    each the clean digit x0_hat that the model saw in that x_t (right)."""
    device = next(model.parameters()).device
    y = torch.tensor(digits, device=device)
    x_T = torch.randn(len(y), 1, 28, 28, device=device, generator=torch.Generator(device).manual_seed(seed))
    ts = diffusion.timesteps(sampling["steps"])
    keep = set(torch.linspace(0, len(ts) - 1, 9).round().long().tolist())  # nine steps, evenly spaced
    frames, inputs = [], [x_T]

    def snapshot(i, t_prev, x, eps):
        if i in keep:  # the step's input x_t, and the clean digit it saw in it
            frames.append((ts[i], inputs[-1], diffusion.predict_x0(inputs[-1], ts[i], eps)))
        inputs.append(x)

    with autocast(device):
        diffusion.sample(model, y, x_T=x_T.clone(), generator=torch.Generator(device).manual_seed(seed + 1),
                         callback=snapshot, **sampling)
    x_t = torch.stack([x for _, x, _ in frames] + [inputs[-1]], 1).cpu()    # [D, 10, 1, 28, 28]
    x_0 = torch.stack([x0 for _, _, x0 in frames] + [inputs[-1]], 1).cpu()
    cols = [f"t={t}" for t, _, _ in frames] + ["x_0"]
    save_grid(path, {"x_t": x_t, "x0_hat, the clean digit seen in x_t": x_0}, [str(d) for d in digits], cols,
              title=f"reverse process ({name})")


def save_attention_map(path, model, diffusion, digits, seed, name, **sampling):
    """One chain per digit; halfway down it, the first cross-attention layer's weights over the label's tokens
    (CrossAttention.weights), per head, drawn over the digit the chain ends in."""
    layer_name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, CrossAttention))
    device = next(model.parameters()).device
    y = torch.tensor(digits, device=device)
    ts = diffusion.timesteps(sampling["steps"])
    halfway, calls, maps = len(ts) // 2, [], []

    def grab(module, inputs, output):  # called once per step (a guided step's 2B rows go through as one batch)
        if len(calls) == halfway:
            x, context = inputs
            maps.append(module.weights(x[:len(y)], context[:len(y)]))  # the labelled half: [D, heads, H*W, L]
        calls.append(1)

    hook = layer.register_forward_hook(grab)
    try:
        x_0 = generate(model, diffusion, y, seed=seed, batch_size=len(y), **sampling)
    finally:
        hook.remove()
    heads, n, tokens = maps[0].shape[1:]
    side = math.isqrt(n)
    save_attention(path, to_uint8(x_0[:, 0]), maps[0], [str(d) for d in digits],
                   f"{layer_name} ({side}x{side}, {heads} heads) at t = {ts[halfway]}: which of the label's {tokens} "
                   f"tokens each location reads; {name}")


if __name__ == "__main__":
    run_cli(main)
