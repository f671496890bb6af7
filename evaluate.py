"""Chapter 4: put numbers on the samples -- class accuracy and FID in an MNIST classifier's features.

    python evaluate.py --ckpt checkpoints/model.pt                    # sample 1,000 per digit, then score
    python evaluate.py --ckpt checkpoints/model.pt --lora checkpoints/lora.pt --per-digit 200   # a style
    python evaluate.py --samples samples.npz                          # score denoise.py --export output
    python evaluate.py --ckpt pretrained/model.pt --controlnet pretrained/controlnet-skeleton.pt --per-digit 100
    python evaluate.py --ckpt pretrained/model-nf4.pt --lora pretrained/bold-nf4.pt --per-digit 100   # QLoRA
    python evaluate.py --results docs/results.md                      # re-score every shipped file

The classifier is the committed pretrained/classifier.pt (trained by `python evaluate.py --classifier
PATH` when PATH does not exist, as it was). Metrics are explained in harness/metrics.py. FID is measured
against the test set weighted to the samples' digits; the "real-data floor" is the FID of real training
images with the samples' labels, scored the same way: what a perfect generator would score.

With an adapter that learned a style (lora_finetune.py --style), the samples are drawn with LoRA off and
on from the same seeds and scored against real digits in that style: the style's own metric (ink, slant
or brightness; harness/metrics.py), the share of the style gap closed, class accuracy and FID. With a
ControlNet, each digit is drawn through the control of a test digit of its label, and the control computed
from what was drawn is compared with it (F1, exactly and within a pixel), beside the base model's digits of
the same labels and seeds.
"""
import json
import os
import time

import numpy as np
import torch

from harness.cli import (Parser, check_writable, code_version, hardware_name, parse_digits, pick_device, positive_int,
                         run_cli)
from harness.metrics import Judge, control_f1
from harness.sampling import (add_sampling_flags, control_inputs, default_checkpoint, describe, digit_labels,
                              generate, load_sampler, lora_scales, parse_interval, presets_text, sampling_settings)
from model.adapters import set_lora
from model.controls import control_image
from model.data import from_uint8

CLASSIFIER = "pretrained/classifier.pt"


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


def format_style_report(r, title):
    off, on = r["off"], r["on"]
    return "\n".join([
        title,
        f"| {r['style']} | {r['metric']} | class accuracy | FID vs real {r['style']} digits |",
        "|---|---|---|---|",
        f"| real MNIST (test) | {r['real']:.3f} | | |",
        f"| real {r['style']} MNIST (target) | {r['target']:.3f} | {100 * r['target_accuracy']:.2f}% | "
        f"{off['fid_floor']:.2f} (floor) |",
        f"| LoRA off | {off['value']:.3f} | {100 * off['accuracy']:.2f}% | {off['fid']:.2f} |",
        f"| LoRA on | {on['value']:.3f} | {100 * on['accuracy']:.2f}% | {on['fid']:.2f} |",
        f"style gap closed: {100 * r['gap_closed']:.0f}%   FID off/on: {off['fid'] / on['fid']:.1f}x   "
        f"accuracy on - off: {100 * (on['accuracy'] - off['accuracy']):+.2f} points   ({on['n']:,} samples each)"])


def parse_args(argv=None):
    p = Parser(__doc__ + presets_text())
    add_sampling_flags(p)
    p.add_argument("--samples", metavar="FILE.npz", help="score samples written by denoise.py --export instead")
    p.add_argument("--per-digit", type=positive_int, default=1000, help="samples per digit")
    p.add_argument("--classifier", default=CLASSIFIER, help="evaluation classifier (trained there if absent)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    p.add_argument("--results", metavar="FILE.md",
                   help="re-score every shipped file in pretrained/ as the README quotes it, and write the table there "
                        "(the other flags are ignored)")
    return p.parse_args(argv)


SHIPPED = "--ckpt pretrained/model.pt"
RESULTS = [  # what the README quotes: (row, evaluate.py flags)
    ("the shipped model, the preset's sampler", f"{SHIPPED} --per-digit 200"),
    ("the same, sampling seed 1", f"{SHIPPED} --per-digit 200 --seed 1"),
    ("guidance 1.2", f"{SHIPPED} --per-digit 200 --guidance 1.2"),
    ("guidance 1.4", f"{SHIPPED} --per-digit 200 --guidance 1.4"),
    ("deterministic DDIM (eta 0), guidance 2", f"{SHIPPED} --per-digit 200 --eta 0 --guidance 2"),
    ("bold adapter", f"{SHIPPED} --lora pretrained/bold.pt --per-digit 100"),
    ("italic adapter", f"{SHIPPED} --lora pretrained/italic.pt --per-digit 100"),
    ("inverted adapter", f"{SHIPPED} --lora pretrained/inverted.pt --per-digit 100"),
    ("skeleton ControlNet", f"{SHIPPED} --controlnet pretrained/controlnet-skeleton.pt --per-digit 100"),
    ("skeleton ControlNet + bold adapter",
     f"{SHIPPED} --controlnet pretrained/controlnet-skeleton.pt --lora pretrained/bold.pt --per-digit 100"),
    ("the 4-bit model (NF4)", "--ckpt pretrained/model-nf4.pt --per-digit 200"),
    ("the 4-bit model + the bold adapter trained on it (QLoRA)",
     "--ckpt pretrained/model-nf4.pt --lora pretrained/bold-nf4.pt --per-digit 100"),
    ("the 4-bit model + the full-precision bold adapter", "--ckpt pretrained/model-nf4.pt --lora pretrained/bold.pt --per-digit 100"),
    ("the Diffusion Transformer (DiT preset)", "--ckpt pretrained/dit.pt --per-digit 200"),
    ("the DiT + its bold adapter", "--ckpt pretrained/dit.pt --lora pretrained/dit-bold.pt --per-digit 100"),
    ("bold, full fine-tuning of the adapter's layers", f"{SHIPPED} --lora pretrained/bold-full.pt --per-digit 100"),
    ("italic, full fine-tuning of the adapter's layers", f"{SHIPPED} --lora pretrained/italic-full.pt --per-digit 100"),
    ("bold AdaLoRA adapter", f"{SHIPPED} --lora pretrained/bold-adalora.pt --per-digit 100"),
    ("italic AdaLoRA adapter", f"{SHIPPED} --lora pretrained/italic-adalora.pt --per-digit 100"),
]


def write_results(path):
    """Run every row of RESULTS and write one markdown table: the numbers the README quotes, each with its command."""
    check_writable(path)
    lines = ["| what | class accuracy | FID (floor) | style: gap closed, FID off -> on | control F1 exact, 1 px "
             "(base) | command |", "|---" * 6 + "|"]
    for name, flags in RESULTS:
        row, r = result_row(name, flags)
        lines.append(row)
    text = "\n".join([f"# Results\n", f"Written by `python evaluate.py --results {path}` on "
                      f"{hardware_name(pick_device())}, PyTorch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
                      f"{code_version()}; classifier {r['classifier_fingerprint']} "
                      f"({100 * r['classifier_test_accuracy']:.2f}% on MNIST test). Style rows: accuracy and FID with "
                      "the adapter on, against real digits in that style.\n", *lines]) + "\n"
    with open(path, "w") as f:
        f.write(text)
    print(text)
    return text


def result_row(name, flags):
    """One row of the results table, scored by this script with `flags`; and the report it came from."""
    r = main([*flags.split(), "--json"])
    style = (f"{100 * r['gap_closed']:.0f}%, {r['off']['fid']:.2f} -> {r['on']['fid']:.2f}" if "gap_closed" in r else "")
    score = r["on"] if "gap_closed" in r else r
    c = r.get("control")
    control = f"{c['f1_exact']:.3f}, {c['f1_1px']:.3f} ({c['base_f1_exact']:.3f}, {c['base_f1_1px']:.3f})" if c else ""
    return (f"| {name} | {100 * score['accuracy']:.2f}% | {score['fid']:.2f} ({score['fid_floor']:.2f}) | "
            f"{style} | {control} | `python evaluate.py {flags}` |"), r


def load_samples(path, device):
    """An .npz from denoise.py --export -> (images [N,1,28,28] in [-1,1], labels [N])."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"samples not found: {path}")
    try:
        data = np.load(path)
        images, labels = torch.from_numpy(data["images"]), torch.from_numpy(data["labels"]).long()
    except Exception as e:
        raise ValueError(f"cannot read {path} as denoise.py --export output ({type(e).__name__}: {e})")
    if images.dtype != torch.uint8 or images.shape[1:] != (28, 28) or labels.shape != (len(images),):
        raise ValueError(f"{path}: expected uint8 images [N,28,28] and labels [N]")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
        raise ValueError(f"{path}: labels must be digits 0-9")
    return from_uint8(images.to(device).unsqueeze(1)), labels.to(device)


def main(argv=None):
    args = parse_args(argv)
    if args.results:
        return write_results(args.results)
    if args.guidance_interval is not None:
        parse_interval(args.guidance_interval)  # a bad value fails now, before the model is loaded
    scales = lora_scales(args)
    if args.samples and (args.lora or args.ckpt):
        raise ValueError("--samples scores a file; --ckpt and --lora sample from a model: use one or the other")
    if not os.path.exists(args.classifier):
        check_writable(args.classifier)  # it will be trained and cached there: fail now, not after training
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    if args.samples:
        images, labels = load_samples(args.samples, device)
        draw = lambda: (images, labels, "none", None, f"{len(images):,} samples from {args.samples}", None)
    else:
        draw = sampler(args, scales, device)  # the model and its settings, checked
    judge = Judge(args.classifier, args.data_dir, device)  # the classifier and the data, before any sampling
    images, labels, style, off, title, control = draw()
    if len(images) < 2:
        raise ValueError(f"FID needs at least 2 samples, got {len(images)}")
    result = judge.style_report(style, off, images, labels) if off is not None else judge(images, labels)
    result["classifier_test_accuracy"], result["classifier_fingerprint"] = judge.test_accuracy, judge.fingerprint
    if control is not None:
        result["control"] = control
    if args.json:
        print(json.dumps(result))
    else:
        print(f"classifier: {100 * judge.test_accuracy:.2f}% on MNIST test (weights {judge.fingerprint})")
        print(format_style_report(result, title) if off is not None else format_report(result, title))
        if control is not None:
            c = control
            print(f"ControlNet ({c['kind']}): control F1 {c['f1_exact']:.3f} exact, {c['f1_1px']:.3f} within 1 pixel; "
                  f"the base model, same labels and seeds: {c['base_f1_exact']:.3f}, {c['base_f1_1px']:.3f}")
    return result


def sampler(args, scales, device):
    """Load the model and check the settings; returns a function that draws the digits to score (with one
    style adapter, the same seeds with LoRA off too): (images, labels, style, LoRA-off images or None, title)."""
    ckpt = default_checkpoint(args.ckpt)
    s = load_sampler(ckpt, device, loras=args.lora, scales=scales, controlnet=args.controlnet)
    model, diffusion, checkpoint, adapters = s.model, s.diffusion, s.checkpoint, s.adapters
    controlnet = s.controlnet[0] if s.controlnet else None
    sampling, batch_size = sampling_settings(args, checkpoint, diffusion, device)
    labels = digit_labels(parse_digits(args.digits), args.per_digit, device)
    if len(labels) < 2:
        raise ValueError(f"FID needs at least 2 samples, got {len(labels)}")
    styles = {a["config"].get("style", "none") for a, _ in adapters}
    style = styles.pop() if len(styles) == 1 else "none"  # one style: scored against real digits of that style
    extras = [*args.lora, *([args.controlnet] if controlnet else [])]
    title = f"{len(labels):,} samples from {ckpt}{''.join(f' + {p}' for p in extras)} ({describe(**sampling)})"
    controls = control_inputs(args, controlnet, labels) if controlnet else None
    steer = dict(controlnet=controlnet, controls=controls, control_scale=args.control_scale)
    run = lambda **kw: generate(model, diffusion, labels, seed=args.seed, batch_size=batch_size, **sampling, **kw)

    def draw():
        images, off, control = run(**steer), None, None
        if controlnet is not None:  # how closely the digits follow their controls; the base, same seeds, beside
            plain = run()
            control = dict(kind=controlnet.kind, **fidelity(controlnet.kind, controls, images, "f1"),
                           **fidelity(controlnet.kind, controls, plain, "base_f1"))
        if style != "none":
            set_lora(model, enabled=False)
            off = run(**steer)  # the same seeds without the adapter
        return images, labels, style, off, title, control
    return draw


def fidelity(kind, controls, images, name):
    """Control F1 of drawn digits against the controls they were given: exactly, and within 1 pixel."""
    drawn = control_image(kind, images)
    return {f"{name}_exact": control_f1(controls, drawn), f"{name}_1px": control_f1(controls, drawn, tolerance=1)}


if __name__ == "__main__":
    run_cli(main)
