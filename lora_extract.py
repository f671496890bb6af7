"""Is a style low-rank? Read the spectrum of a full fine-tune, and cut a LoRA of any rank out of it.

    python lora_finetune.py --variant full --out checkpoints/bold-full.pt       # dW itself (model/lowrank.py)
    python lora_extract.py --full checkpoints/bold-full.pt --rank 4 --out checkpoints/bold-r4.pt
    python denoise.py --lora checkpoints/bold-r4.pt --compare                   # the cut LoRA, off and on
    python lora_extract.py --full pretrained/bold-full.pt --adapters pretrained/bold.pt pretrained/bold-adalora.pt \
        --spectrum figure/lowrank_bold.png

Prints a table, one row per group of layers (the attention projections; the convolutions of each UNet
level): how many of dW's directions hold all but 10% and all but 1% of its energy (the effective rank of
model/lowrank.py), the share the first --rank directions hold, and beside them the rank of each adapter
given with --adapters (a trained LoRA's, AdaLoRA's per layer) and how many of its own update's directions
hold 90% of its energy. With --out, writes the truncated SVD of
every layer's dW as an ordinary LoRA file (alpha = rank), which denoise.py and evaluate.py load as any
other; with --spectrum, draws the energy curves and the ranks.
"""
import os

import torch

from harness.cli import Parser, check_new_output, check_writable, positive_int, run_cli
from harness.figures import save_spectrum
from harness.files import ADAPTER_KIND, load_file, load_lora, load_model, save_file
from harness.sampling import default_checkpoint
from model.adalora import AdaLoraMixin
from model.lowrank import FullUpdate, effective_rank, energy_captured, singular_values, truncate

EPS = (0.1, 0.01)  # the energy rule's tolerances: all but 10%, all but 1%
GROUP_ORDER = ("attention", "MLP", "convs 28x28", "convs 14x14", "convs 7x7", "convs middle")
LEVELS = {"down.0": "28x28", "up.2": "28x28", "down.1": "14x14", "up.1": "14x14", "down.2": "7x7", "up.0": "7x7",
          "mid1": "middle", "mid2": "middle"}


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--full", required=True, help="a full fine-tune (lora_finetune.py --variant full --out)")
    p.add_argument("--base", help="the model it was trained on (default: checkpoints/model.pt if it exists, "
                                  "else pretrained/model.pt)")
    p.add_argument("--rank", type=positive_int, default=8, help="the rank to cut every layer's update to (default 8)")
    p.add_argument("--out", help="write the rank --rank LoRA here")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--adapters", nargs="+", default=[], metavar="ADAPTER",
                   help="adapters of the same base whose ranks to show beside (LoRA, AdaLoRA, DoRA)")
    p.add_argument("--spectrum", metavar="FIGURE.png", help="draw the energy curves and the ranks here")
    p.add_argument("--device", default="cpu", help="where the SVDs run (default cpu)")
    return p.parse_args(argv)


def layer_group(path):
    """'down.2.attn.w_q' -> 'attention'; 'up.1.res.conv1' -> 'convs 14x14'; a DiT's 'blocks.0.mlp.fc1' -> 'MLP'."""
    name = path.rsplit(".", 1)[-1]
    if name in ("w_q", "w_k", "w_v", "w_o"):
        return "attention"
    if name in ("fc1", "fc2"):
        return "MLP"
    level = next((label for prefix, label in LEVELS.items() if path.startswith(prefix + ".")), None)
    return f"convs {level}" if level and name.startswith("conv") else name


def updates(base, path, device):
    """{layer path: dW (at blend 1)} of the adapter file at `path`, loaded onto a fresh copy of the base,
    and the layers themselves."""
    model, _, _ = load_model(base, device, weights="ema")
    _, layers = load_lora(model, path, device)
    with torch.no_grad():
        return {p: layer.delta_weight(1.0) for p, layer in layers.items()}, layers


def adapter_rank(layer):
    """The rank a layer's adapter holds: AdaLoRA's kept triplets, a LoRA's rank."""
    return int(layer.kept.sum()) if isinstance(layer, AdaLoraMixin) else layer.rank


def spectrum_table(deltas, rank, beside=()):
    """Markdown rows per layer group: effective ranks of dW at EPS (mean, and min-max over the group's
    layers), the energy the first `rank` directions keep, and each (name, {path: rank}) of `beside`."""
    groups = {}
    for path in sorted(deltas, key=lambda p: (GROUP_ORDER + (layer_group(p),)).index(layer_group(p))):
        groups.setdefault(layer_group(path), []).append(path)
    head = (["layer group", "layers", "size of dW"] + [f"rank holding {100 * (1 - e):g}% of the energy" for e in EPS]
            + [f"the same for random noise of that size", f"energy in {rank} directions"]
            + [f"{name}: rank (rank holding {100 * (1 - EPS[0]):g}%)" for name, _, _ in beside])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    energy, mean_ranks = {}, {f"full fine-tune, rank holding {100 * (1 - EPS[0]):g}%": {}}
    mean_ranks.update({name: {} for name, _, _ in beside})
    for group, paths in groups.items():
        sigmas = [singular_values(deltas[p]) for p in paths]
        curves = [energy_captured(s) for s in sigmas]
        cells = [group, str(len(paths)), " / ".join(sorted({"x".join(map(str, deltas[p].flatten(1).shape)) for p in paths}))]
        for e in EPS:
            r = [effective_rank(s, e) for s in sigmas]
            cells.append(f"{sum(r) / len(r):.1f} ({min(r)}-{max(r)})")
            if e == EPS[0]:
                mean_ranks[next(iter(mean_ranks))][group] = sum(r) / len(r)
        noise = [effective_rank(singular_values(torch.randn(deltas[p].flatten(1).shape, generator=torch.Generator()
                                                                .manual_seed(0))), EPS[0]) for p in paths]
        cells.append(f"{sum(noise) / len(noise):.1f}")  # what no structure at all would give
        kept = [c[min(rank, len(c)) - 1].item() for c in curves]
        cells.append(f"{100 * sum(kept) / len(kept):.0f}%")
        for name, ranks, effective in beside:
            r, e = [ranks.get(p, 0) for p in paths], [effective.get(p, 0) for p in paths]
            cells.append(f"{sum(r) / len(r):.1f} ({min(r)}-{max(r)}) ({sum(e) / len(e):.1f})")
            mean_ranks[name][group] = sum(r) / len(r)
        lines.append("| " + " | ".join(cells) + " |")
        width = min(len(c) for c in curves)
        energy[group] = torch.stack([c[:width] for c in curves])
    return lines, energy, mean_ranks


def extracted_file(full, deltas, rank):
    """The adapter file of the rank-`rank` truncation of every dW: an ordinary LoRA (alpha = rank, gamma 1)."""
    tensors = {}
    for path, dW in deltas.items():
        A, B = truncate(dW, rank)
        tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"] = A.contiguous().cpu(), B.contiguous().cpu()
    config = dict(full["config"], variant="lora", rank=rank, alpha=float(rank), rslora=False,
                  extracted_from=os.path.basename(full["path"]))
    return dict(kind=ADAPTER_KIND, config=config, base_fingerprint=full["base_fingerprint"], step=full["step"],
                tensors=tensors)


def main(argv=None):
    args = parse_args(argv)
    if args.out:
        check_new_output(False, args.force, args.out)
    if args.spectrum:
        check_writable(args.spectrum)
    full = load_file(args.full, ADAPTER_KIND, args.device)
    if full["config"].get("variant") != "full":
        raise ValueError(f"{args.full} is a {full['config'].get('variant', 'lora')} adapter, not a full fine-tune: "
                         "make one with lora_finetune.py --variant full")
    base = default_checkpoint(args.base)
    deltas, _ = updates(base, args.full, args.device)
    narrow = min(min(dW.flatten(1).shape) for dW in deltas.values())
    if args.rank > narrow and args.out:
        raise ValueError(f"--rank {args.rank}: the narrowest layer's update has only {narrow} directions; "
                         f"choose --rank at most {narrow}")
    beside = []
    for path in args.adapters:
        their, adapted = updates(base, path, args.device)
        if any(isinstance(layer, FullUpdate) for layer in adapted.values()):
            raise ValueError(f"{path} is a full fine-tune; --adapters takes low-rank adapters")
        beside.append((os.path.basename(path), {p: adapter_rank(layer) for p, layer in adapted.items()},
                       {p: effective_rank(singular_values(dW), EPS[0]) for p, dW in their.items()}))
    lines, energy, ranks = spectrum_table(deltas, args.rank, beside)
    print(f"{args.full}: {len(deltas)} layers, style {full['config'].get('style')}")
    print("\n".join(lines))
    if args.out:
        save_file(extracted_file(dict(full, path=args.full), deltas, args.rank), args.out)
        numbers = sum(args.rank * sum(dW.flatten(1).shape) for dW in deltas.values())
        print(f"wrote {args.out}: rank {args.rank}, {numbers:,} numbers")
    if args.spectrum:
        save_spectrum(args.spectrum, energy, ranks, f"Is the {full['config'].get('style')} style low-rank?")
        print(f"wrote {args.spectrum}")
    return dict(lines=lines, energy=energy, ranks=ranks)


if __name__ == "__main__":
    run_cli(main)
