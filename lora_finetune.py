"""Chapter 2: teach the trained model a style with LoRA, training nothing but the adapter.

    python lora_finetune.py                           # base checkpoints/model.pt, style bold -> checkpoints/lora.pt
    python lora_finetune.py --style italic --out checkpoints/italic.pt
    python lora_finetune.py --targets attn --rank 4   # cross-attention projections only
    python lora_finetune.py --variant dora            # or --rslora, or --lr-ratio 16 (LoRA+)
    python lora_finetune.py --variant adalora         # ranks that move between layers
    python lora_finetune.py --variant full --out checkpoints/bold-full.pt   # full fine-tuning: dW itself

Loads the base model (its averaged weights, the ones we sample with), wraps the layers named by --targets
in LoRA layers (model/adapters.py: `attn` = the attention's w_q, w_k, w_v; `conv` = the ResBlock convs; on a
Diffusion Transformer `mlp` = its MLPs, and the default is DIT_LORA_TARGETS in harness/config.py),
freezes everything else and runs the training step of train.py over the adapter alone, on MNIST redrawn in
--style (model/styles.py), with the objective the base was trained with. `--variant full` trains the same
layers' whole weights instead (model/lowrank.py), at its own preset's learning rate, and saves only their
change; `--variant adalora` adds the orthogonality penalty to the loss and, after every step, scores and
masks the triplets (model/adalora.py). The output file holds only the adapter: its tensors (averaged, as
for the base), its config (rank, alpha, targets, style; AdaLoRA's final ranks) and the base model's
fingerprint. What --resume needs (the live tensors, the optimizer, the random state) goes to a file
beside it (lora.pt -> lora.pt.resume), written together with it.
"""
import os
import time
from dataclasses import asdict, replace

import torch

from harness.cli import (Parser, add_training_flags, at_most, below_one, check_new_output, check_writable, fused_adamw,
                         pick_device, positive_float, positive_int, prepare_model, run_cli, seed_everything)
from harness.config import (DIT_LORA_TARGETS, PRESETS, LoraConfig, base_train_config, objective_on, preset_for, preset_named, resumed_config,
                            starting_rank, with_flags)
from harness.figures import save_loss_curve
from harness.files import (ADAPTER_KIND, RESUME_KIND, adapter_file, checksum, fingerprint, load_file, load_model, resume_path,
                           write_files)
from harness.runs import Run, plan_run, restore, training_state
from model.adalora import RankAllocator, orthogonality
from model.adapters import TARGET_GROUPS, VARIANTS, inject_lora, param_groups
from model.data import batches, load_mnist
from model.ema import EMA
from model.styles import STYLE_NAMES, apply_style
from model.training import lr_at, train_step

MAX_ALPHA = 1e4  # alpha / rank scales the update; far past this the adapter's gradients vanish or explode


def parse_args(argv=None):
    default = PRESETS["cpu"]["lora"]
    p = Parser(__doc__)
    p.add_argument("--base", default="checkpoints/model.pt", help="trained model checkpoint (train.py --out)")
    p.add_argument("--out", default="checkpoints/lora.pt", help="adapter file to write (and to --resume)")
    p.add_argument("--style", choices=STYLE_NAMES, help=f"what the adapter learns (default: the preset's, {default.style})")
    p.add_argument("--variant", choices=tuple(VARIANTS), help="lora; dora: a learned magnitude per output; adalora: "
                   "ranks that move between layers; full: the layers' whole weights "
                   f"(default: the preset's, {default.variant})")
    p.add_argument("--rank", type=positive_int, help=f"LoRA rank; AdaLoRA's average final rank (default: the preset's, "
                                                     f"{default.rank})")
    p.add_argument("--init-rank", type=positive_int, help="AdaLoRA: every layer's rank at the start (default 1.5 x --rank)")
    p.add_argument("--alpha", type=at_most(MAX_ALPHA, "alpha / rank scales the update", positive_float), help="LoRA alpha; the update is scaled by alpha / rank "
                                                     f"(default: the preset's, {default.alpha:g}; AdaLoRA's "
                                                     f"{PRESETS['cpu']['adalora'].alpha:g})")
    p.add_argument("--rslora", action="store_const", const=True, help="scale the update by alpha / sqrt(rank) (rsLoRA)")
    p.add_argument("--lr-ratio", type=positive_float,
                   help="LoRA+: B's learning rate = this times A's (--lr); default 1, plain LoRA")
    p.add_argument("--dropout", type=below_one, help="dropout on the adapter's input (default 0)")
    p.add_argument("--targets", type=lambda s: tuple(t.strip() for t in s.split(",") if t.strip()),
                   help=f"layers to adapt: groups ({', '.join(TARGET_GROUPS)}) or layer names such as stem, "
                        f"comma-separated (default: the preset's, {','.join(default.targets)})")
    add_training_flags(p, "the adapter")
    return p.parse_args(argv)


def check_paths(args):
    """Refuse, before any work, an --out that would replace the base, another run's files, or a resume file
    that does not belong to the adapter beside it."""
    if not args.targets and args.targets is not None:
        raise ValueError(f"--targets is empty: name groups ({', '.join(TARGET_GROUPS)}) or layers such as stem")
    base = os.path.abspath(args.base)
    if base in (os.path.abspath(args.out), os.path.abspath(resume_path(args.out))):
        raise ValueError("--out would write over the base checkpoint it adapts; choose another --out")
    check_new_output(args.resume, args.force, args.out, resume_path(args.out))
    if args.resume and not os.path.isfile(resume_path(args.out)):
        raise FileNotFoundError(f"--resume: {resume_path(args.out)} not found; it is written beside an adapter that "
                                "lora_finetune.py trains (shipped adapters have none): start a new run with --force "
                                "or another --out")
    check_writable(os.path.join(args.figures, "loss_lora.png"))


def resolve_config(args, base, saved, base_fp, preset):
    """The LoraConfig of this run: the saved run's on --resume, else the base's preset's; flags win."""
    if saved is not None:
        if saved["base_fingerprint"] != base_fp:
            raise ValueError(f"--resume: {resume_path(args.out)} was trained on another base than {args.base}")
        if saved.get("out_checksum") not in (None, load_file(args.out, ADAPTER_KIND)["checksum"]):
            raise ValueError(f"--resume: {args.out} and {resume_path(args.out)} are from different saves; "
                             "start over with --force")
        return resumed_config(LoraConfig(**saved["config"]), args)
    config = with_flags(preset_named(preset)[args.variant if args.variant in ("full", "adalora") else "lora"], args)
    if base.get("backbone") == "dit" and args.targets is None:
        config = replace(config, targets=DIT_LORA_TARGETS)
    if config.min_snr_gamma is None:  # train on the objective the base was trained with
        config = replace(config, min_snr_gamma=base_train_config(base).min_snr_gamma)
    if config.variant in ("dora", "full") and config.dropout > 0:
        raise ValueError(f"--variant {config.variant} forms the adapted weight itself and takes no --dropout")
    if config.variant == "adalora" and (config.rslora or starting_rank(asdict(config)) < config.rank):
        raise ValueError("--variant adalora prunes from --init-rank down to --rank: --init-rank must be at least "
                         "--rank, and AdaLoRA takes no --rslora")
    lora_only = [f"--{f.replace('_', '-')}" for f in ("rank", "alpha", "rslora", "lr_ratio")
                 if getattr(args, f, None) is not None]
    if config.variant == "full" and lora_only:
        raise ValueError(f"--variant full trains the whole weights: {', '.join(lora_only)} do not apply")
    if config.variant != "adalora" and config.init_rank:
        raise ValueError("--init-rank is AdaLoRA's: add --variant adalora")
    return config


def main(argv=None):
    args = parse_args(argv)
    check_paths(args)
    device = pick_device(args.device)
    model, diffusion, base = load_model(args.base, device, weights="ema")
    base_fp = fingerprint(model)
    saved = load_file(resume_path(args.out), RESUME_KIND, device) if args.resume else None
    preset = base.get("preset") or preset_for(device)
    config = resolve_config(args, base, saved, base_fp, preset)
    seed_everything(config.seed)

    images, labels = load_mnist(args.data_dir, train=True, device=device)
    images = apply_style(config.style, images)  # the whole styled training set, once, as one tensor
    total_steps, stop_at = plan_run(len(images), config, args.max_steps, saved and saved["step"])

    model = prepare_model(model, device)
    layers = inject_lora(model, config.targets, starting_rank(asdict(config)), config.alpha, config.dropout,
                         config.variant, config.rslora)
    allocator = adalora_allocator(layers, config, total_steps)
    ema = EMA(model, config.ema_decay)
    live, averaged = adapter_parameters(model, ema)
    optimizer = torch.optim.AdamW(param_groups(layers, config.lr, config.lr_ratio), weight_decay=0.0,
                                  fused=fused_adamw(device))
    first, losses, seconds = restore_adapter(saved, live + averaged, optimizer, device) if saved else (0, [], 0.0)
    if saved and allocator:
        allocator.load_state_dict(saved["allocator"])
    trainable, total = sum(p.numel() for p in live), sum(p.numel() for p in model.parameters())
    print(f"preset {preset}: {describe(config)} on {','.join(config.targets)} ({len(layers)} layers), style "
          f"{config.style}, {total_steps:,} steps of {config.batch_size} images, Min-SNR-gamma {config.min_snr_gamma:g}; "
          f"trainable: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")

    def save(at_step, at_losses, at_seconds):
        # The shared file holds the averaged adapter only; beside it, everything --resume needs. Both at once.
        ema_layers = {path: ema.model.get_submodule(path) for path in layers}
        shared = asdict(config)
        if allocator:  # the average holds the masked lambdas too: mask it the same way, and say each layer's rank
            for path, layer in layers.items():
                ema_layers[path].keep(layer.kept)
            shared["ranks"] = allocator.ranks()
        adapter = adapter_file(ema_layers, shared, base_fp, at_step)
        state = dict(kind=RESUME_KIND, config=asdict(config), base_fingerprint=base_fp, out_checksum=checksum(adapter),
                     live=[p.detach() for p in live], ema=[p.detach() for p in averaged],
                     optimizer=optimizer.state_dict(), **training_state(at_step, at_losses, at_seconds, device),
                     **(dict(allocator=allocator.state_dict()) if allocator else {}))
        write_files((adapter, args.out), (state, resume_path(args.out)))

    # The loop of train.py, over the adapter's parameters alone: the base is frozen.
    objective = objective_on(base, config)
    if allocator:
        objective["penalty"] = lambda: config.orth_weight * orthogonality(layers.values())
    run = Run(save, first, stop_at, total_steps, len(images) // config.batch_size, losses, seconds, desc="lora")
    start = time.time()
    for step, (x_0, y) in run.steps(batches(images, labels, config.batch_size, config.seed, start=first)):
        lr = lr_at(step, config.lr, config.warmup, total_steps)
        run.record(train_step(model, diffusion, optimizer, ema, x_0, y, step, lr, **objective))
        if allocator:
            allocator.step(step)  # score the triplets by this step's gradients; mask to the budget
    elapsed = time.time() - start
    if allocator:
        print(f"AdaLoRA kept {sum(allocator.ranks().values())} of {allocator.b_0} triplets; ranks per layer: "
              + ", ".join(f"{path} {r}" for path, r in allocator.ranks().items()))
    base_size, lora_size = os.path.getsize(args.base), os.path.getsize(args.out)
    print(f"fine-tuned {stop_at - first} steps in {elapsed:.1f} s; adapter: {args.out} {lora_size / 1024:,.0f} KiB "
          f"({trainable:,} numbers); base: {args.base} {base_size / 2**20:,.1f} MiB; resume state: {resume_path(args.out)}")
    save_loss_curve(os.path.join(args.figures, "loss_lora.png"), run.losses,
                    title=f"LoRA fine-tuning loss ({config.style})")
    print(f"wrote {os.path.join(args.figures, 'loss_lora.png')}")
    return dict(seconds=elapsed, trainable=trainable, total=total, layers=len(layers), lora_bytes=lora_size,
                base_bytes=base_size)


def restore_adapter(saved, parameters, optimizer, device):
    """Put a saved adapter run back: its live and averaged tensors, optimizer and random state."""
    with torch.no_grad():
        for p, t in zip(parameters, saved["live"] + saved["ema"]):
            p.copy_(t)
    print(f"resuming at step {saved['step']}")
    return restore(saved, optimizer, device)


def adapter_parameters(model, ema):
    """The adapter's live parameters and their averaged copies in the EMA model, in the same order."""
    pairs = [(p, q) for p, q in zip(model.parameters(), ema.model.parameters()) if p.requires_grad]
    return [p for p, _ in pairs], [q for _, q in pairs]


def adalora_allocator(layers, config, total_steps):
    """AdaLoRA's rank allocator over `layers`, its schedule spread over this run; None for other variants."""
    if config.variant != "adalora":
        return None
    t_init, t_end = (round(share * total_steps) for share in config.prune_window)
    return RankAllocator(layers, config.rank, total_steps, t_init, total_steps - t_end, config.prune_every)


def describe(config):
    """'lora rank 8 alpha 8', with rsLoRA and LoRA+ named when they are on."""
    if config.variant == "full":
        return f"full fine-tuning at lr {config.lr:g}"
    rank = f"rank {starting_rank(asdict(config))} -> {config.rank}" if config.variant == "adalora" else f"rank {config.rank}"
    return (f"{config.variant} {rank} alpha {config.alpha:g}" + (" (rsLoRA scaling)" if config.rslora else "")
            + (f" (LoRA+, lr ratio {config.lr_ratio:g})" if config.lr_ratio != 1 else ""))


if __name__ == "__main__":
    run_cli(main)
