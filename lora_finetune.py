"""Chapter 2: teach the trained model a style with LoRA, training nothing but the adapter.

    python lora_finetune.py                           # base checkpoints/model.pt, style bold -> checkpoints/lora.pt
    python lora_finetune.py --style italic --out checkpoints/italic.pt
    python lora_finetune.py --targets attn --rank 4   # cross-attention projections only
    python lora_finetune.py --variant dora            # or --rslora, or --lr-ratio 16 (LoRA+)

Loads the base model (its averaged weights, the ones we sample with), wraps the layers named by --targets
in LoRA layers (model/lora.py: `attn` = the cross-attention w_q, w_k, w_v; `conv` = the ResBlock convs),
freezes everything else and trains only the adapter on MNIST redrawn in --style (model/styles.py), with the
objective the base was trained with. The output file holds only the adapter: its tensors (averaged, as for
the base), its config (rank, alpha, targets, style) and the base model's fingerprint. What --resume needs
(the live tensors, the optimizer, the random state) goes to a file beside it (lora.pt -> lora.resume.pt).
"""
import os
import time
from dataclasses import asdict, replace

import torch

from model.checkpoint import fingerprint, load_file, load_model, save_file
from model.cli import (Parser, add_training_flags, below_one, check_new_output, check_writable, plan_run,
                       fused_adamw, pick_device, positive_float, positive_int, prepare_model, run_cli, seed_everything)
from model.config import PRESETS, LoraConfig, TrainConfig, preset_for, resumed_config, with_flags
from model.data import load_mnist
from model.ema import EMA
from model.figures import save_loss_curve
from model.lora import TARGET_GROUPS, VARIANTS, inject_lora, param_groups, parameter_report, save_lora
from model.styles import STYLE_NAMES, apply_style
from model.trainer import fit, rng_state, set_rng_state

RESUME_KIND = "lora-resume"


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--base", default="checkpoints/model.pt", help="trained model checkpoint (train.py --out)")
    p.add_argument("--out", default="checkpoints/lora.pt", help="adapter file to write (and to --resume)")
    p.add_argument("--style", choices=STYLE_NAMES, help="what the adapter learns (default: the preset's, bold)")
    p.add_argument("--variant", choices=tuple(VARIANTS), help="lora (default), or dora: a learned magnitude per output")
    p.add_argument("--rank", type=positive_int, help="LoRA rank r (default: the preset's, 8)")
    p.add_argument("--alpha", type=positive_float, help="LoRA alpha; the update is scaled by alpha / r (default 8)")
    p.add_argument("--rslora", action="store_const", const=True, help="scale the update by alpha / sqrt(r) (rsLoRA)")
    p.add_argument("--lr-ratio", type=positive_float,
                   help="LoRA+: B's learning rate = this times A's (--lr); default 1, plain LoRA")
    p.add_argument("--dropout", type=below_one, help="dropout on the adapter's input (default 0)")
    p.add_argument("--targets", type=lambda s: tuple(t.strip() for t in s.split(",") if t.strip()),
                   help=f"layers to adapt: groups ({', '.join(TARGET_GROUPS)}) or layer names, comma-separated "
                        "(default: the preset's, attn,conv)")
    add_training_flags(p, "the adapter")
    return p.parse_args(argv)


def resume_path(out):
    return os.path.splitext(out)[0] + ".resume.pt"


def main(argv=None):
    args = parse_args(argv)
    if os.path.abspath(args.out) == os.path.abspath(args.base):
        raise ValueError("--out is the base checkpoint: the adapter would replace the model it adapts; "
                        "choose another --out")
    check_new_output(args.out, args.resume, args.force)
    if args.resume and not os.path.isfile(resume_path(args.out)):
        raise FileNotFoundError(f"--resume: {resume_path(args.out)} not found; it is written beside an adapter that "
                                "lora_finetune.py trains (shipped adapters have none): start a new run with --force "
                                "or another --out")
    check_writable(resume_path(args.out))
    check_writable(os.path.join(args.figures, "loss_lora.png"))
    device = pick_device(args.device)

    model, diffusion, base = load_model(args.base, device, weights="ema")
    base_fp = fingerprint(model)
    preset = base.get("preset") or preset_for(device)
    # The adapter learns with its base's objective (a base too old to record one used the plain loss).
    base_config = TrainConfig(**base["train"]) if "train" in base else TrainConfig(min_snr_gamma=0.0)
    saved = load_file(resume_path(args.out), RESUME_KIND, device) if args.resume else None
    if saved is not None:
        config = resumed_config(LoraConfig(**saved["config"]), args)
        if saved["base_fingerprint"] != base_fp:
            raise ValueError(f"--resume: {resume_path(args.out)} was trained on another base than {args.base}")
    else:
        config = with_flags(PRESETS[preset]["lora"], args)
        if config.min_snr_gamma is None:  # train on the objective the base was trained with
            config = replace(config, min_snr_gamma=base_config.min_snr_gamma)
    if config.variant == "dora" and config.dropout > 0:
        raise ValueError("--variant dora forms the adapted weight itself and takes no --dropout")
    seed_everything(config.seed)

    images, labels = load_mnist(args.data_dir, train=True, device=device)
    images = apply_style(config.style, images)  # the whole styled training set, once, as one tensor
    total_steps, stop_at = plan_run(len(images), config, args.max_steps, saved and saved["step"])

    model = prepare_model(model, device)
    layers = inject_lora(model, config.targets, config.rank, config.alpha, config.dropout, config.variant,
                         config.rslora)
    ema = EMA(model, config.ema_decay)
    adapter_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(layers, config.lr, config.lr_ratio), weight_decay=0.0,
                                  fused=fused_adamw(device))
    step, losses, seconds = 0, [], 0.0
    if saved is not None:
        with torch.no_grad():
            for p, t in zip(adapter_params, saved["live"]):
                p.copy_(t)
            for p, t in zip(ema_params(ema, model), saved["ema"]):
                p.copy_(t)
        optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"], device)
        step, losses, seconds = saved["step"], saved["losses"], saved["seconds"]
        print(f"resuming {args.out} at step {step}")

    trainable, total = parameter_report(model)
    variant = config.variant + (" (rsLoRA scaling)" if config.rslora else "") + \
        (f" (LoRA+, lr ratio {config.lr_ratio:g})" if config.lr_ratio != 1 else "")
    print(f"preset {preset}: {variant} r={config.rank} alpha={config.alpha:g} on {','.join(config.targets)} "
          f"({len(layers)} layers), style {config.style}, {total_steps:,} steps of {config.batch_size} images, "
          f"Min-SNR-gamma {config.min_snr_gamma:g}" + PRESETS[preset]["expect"]["lora"])
    print(f"trainable: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

    ema_layers = {path: ema.model.get_submodule(path) for path in layers}
    adapter_config = dict(asdict(config), r=config.rank, targets=list(config.targets))
    start = time.time()

    def save(at_step, at_losses):
        # The shared file: the averaged adapter only. Beside it, everything --resume needs.
        save_lora(args.out, ema_layers, adapter_config, base_fp, at_step)
        save_file(dict(kind=RESUME_KIND, config=asdict(config), base_fingerprint=base_fp, step=at_step,
                       live=[p.detach() for p in adapter_params], ema=[p.detach() for p in ema_params(ema, model)],
                       optimizer=optimizer.state_dict(), losses=list(at_losses),
                       seconds=seconds + time.time() - start, rng=rng_state(device)), resume_path(args.out))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = fit(model, diffusion, images, labels, optimizer, ema, config, min_snr_gamma=config.min_snr_gamma,
                 t_sampling=base_config.t_sampling, total_steps=total_steps, stop_at=stop_at, start_step=step,
                 losses=losses, save=save, desc="lora")
    elapsed = time.time() - start
    print(f"fine-tuned {stop_at - step} steps in {elapsed:.1f} s")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")
    base_size, lora_size = os.path.getsize(args.base), os.path.getsize(args.out)
    print(f"adapter: {args.out} {lora_size / 1024:,.0f} KiB ({trainable:,} numbers); base checkpoint: {args.base} "
          f"{base_size / 2**20:,.1f} MiB; resume state: {resume_path(args.out)}")
    if losses:
        save_loss_curve(os.path.join(args.figures, "loss_lora.png"), losses, title=f"LoRA fine-tuning loss ({config.style})")
        print(f"wrote {os.path.join(args.figures, 'loss_lora.png')}")
    return dict(seconds=elapsed, trainable=trainable, total=total, lora_bytes=lora_size, base_bytes=base_size)


def ema_params(ema, model):
    """The averaged copies of the model's trainable (adapter) parameters, in the same order."""
    return [q for p, q in zip(model.parameters(), ema.model.parameters()) if p.requires_grad]


if __name__ == "__main__":
    run_cli(main)
