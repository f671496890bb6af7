"""Chapter 7: store the trained model in 4 bits (QLoRA's NF4), and fine-tune and sample on top of it.

    python quantize.py                              # checkpoints/model.pt (else the shipped) -> checkpoints/model-nf4.pt
    python quantize.py --block 32                   # smaller blocks: less error, more constants
    python quantize.py --keep stem,out --out checkpoints/model-nf4-keep.pt   # layers left in full precision
    python lora_finetune.py --base checkpoints/model-nf4.pt --out checkpoints/bold-nf4.pt     # QLoRA
    python denoise.py --ckpt checkpoints/model-nf4.pt --lora checkpoints/bold-nf4.pt --compare
    python evaluate.py --ckpt checkpoints/model-nf4.pt --per-digit 200

Quantises every linear and convolution layer of the model's averaged weights to NF4 (model/quant.py) but those
--keep names, and writes a 4-bit checkpoint that the other scripts take as --ckpt or --base with no new flag:
the packed codes and the block constants of the 4-bit layers, everything else (embeddings, norms, biases,
kept layers) in fp16 as in the shipped model. It prints, per layer, the relative error ||W - deq(W)|| / ||W||
and the bytes, and for the whole model the bytes in fp32, fp16 and NF4 and the bits per quantised weight.
An adapter trained on the full-precision model loads onto the 4-bit one; one trained on the 4-bit model
(QLoRA) fits that model alone.
"""
import argparse
import os

from harness.cli import Parser, check_new_output, pick_device, positive_int, run_cli
from harness.files import MODEL_KIND, load_file, load_model, quantized_file, save_file
from harness.sampling import default_checkpoint
from model.quant import BLOCK, quantize_model, storage_bytes

# The first and the last convolution, the layers that touch pixels, stay in fp16: they are where 4 bits cost
# the samples most (measured in docs/quantization.md).
KEEP = ("stem", "out")
DIT_KEEP = ("embed", "final.linear")  # a DiT's layers that touch pixels: the patch embedding and the last linear
MAX_BLOCK = 4096  # past a few thousand weights a block is one constant for a whole layer: no longer blockwise


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--base", help="the model to quantise (default: checkpoints/model.pt if it exists, else the shipped one)")
    p.add_argument("--out", default="checkpoints/model-nf4.pt", help="4-bit checkpoint to write")
    p.add_argument("--block", type=even_block, default=BLOCK, help="weights per absmax constant (an even number)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="keep the block constants in fp32 instead of quantising them to 8 bits")
    p.add_argument("--keep", type=layer_names,
                   help=f"layers to leave in full precision (default {','.join(KEEP)}; on a DiT {','.join(DIT_KEEP)}), "
                        "comma-separated: names (stem, t_proj, w_q), paths "
                        "(out.2) or modules (time_mlp, mid_attn); none quantises every layer")
    p.add_argument("--device", help="cuda, mps or cpu (default: cuda if available, else mps, else cpu)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    return p.parse_args(argv)


def layer_names(text):
    """'stem,out' -> ('stem', 'out'); 'none' -> ()."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    return () if names == ("none",) else names


def even_block(text):
    value = positive_int(text)
    if value % 2 or value > MAX_BLOCK:
        raise argparse.ArgumentTypeError(f"an even number of weights up to {MAX_BLOCK} (two 4-bit codes share a byte), got {value}")
    return value


def main(argv=None):
    args = parse_args(argv)
    base = default_checkpoint(args.base)
    if os.path.abspath(base) == os.path.abspath(args.out):
        raise ValueError("--out would write over the model it quantises; choose another --out")
    check_new_output(False, args.force, args.out)
    if "quantized" in load_file(base, MODEL_KIND):
        raise ValueError(f"{base} is already a 4-bit model: quantise the full-precision checkpoint it came from")
    if args.keep is None:
        args.keep = DIT_KEEP if load_file(base, MODEL_KIND).get("backbone") == "dit" else KEEP
    device = pick_device(args.device)
    contents, layers = quantized_file(base, args.block, args.double_quant, args.keep, device)
    save_file(contents, args.out)
    report = measure(base, layers, args, device)
    print(report)
    return dict(report=report, layers=len(layers), out=args.out)


def measure(base, layers, args, device):
    """The per-layer table and the totals, as text."""
    source = load_model(base, device)[0]  # the full-precision model, for the errors and the byte counts
    rows, quantised, nf4_bytes = [], 0, 0
    for path, layer in layers.items():
        w = source.get_submodule(path).weight.detach().float()
        error = ((w - layer.weight).norm() / w.norm().clamp_min(1e-12)).item()
        quantised, nf4_bytes = quantised + w.numel(), nf4_bytes + storage_bytes(layer)
        rows.append(f"| {path} | {tuple(w.shape)} | {w.numel():,} | {100 * error:.1f}% | {storage_bytes(layer):,} |")
    single = sum(storage_bytes(l) for l in quantize_model(load_model(base, device)[0], args.block, False, args.keep)[1].values())
    total = sum(t.numel() for t in source.state_dict().values() if t.is_floating_point())
    rest = total - quantised
    errors = [float(r.split("|")[4].strip("% ")) for r in rows]
    lines = [f"{base} -> {args.out}: {len(layers)} layers in NF4, blocks of {args.block}"
             + (", constants double-quantised" if args.double_quant else "")
             + (f", kept in full precision: {', '.join(args.keep)}" if args.keep else ""),
             "| layer | shape | weights | relative error | NF4 bytes |", "|---|---|---|---|---|", *rows,
             f"relative error: {min(errors):.1f}% to {max(errors):.1f}% by layer",
             f"quantised weights: {quantised:,} of {total:,} numbers; {8 * nf4_bytes / quantised:.3f} bits a weight "
             f"({8 * single / quantised:.3f} without double quantisation), {nf4_bytes / (4 * quantised):.3f} of their fp32 bytes",
             f"whole model: fp32 {4 * total:,} bytes, fp16 {2 * total:,}, NF4 {nf4_bytes + 2 * rest:,} "
             f"({(nf4_bytes + 2 * rest) / (4 * total):.3f} of fp32; the rest, {rest:,} numbers, in fp16)"]
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
