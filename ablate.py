"""The ablations: what each LoRA variant and each training objective buys, measured on this machine.

    python ablate.py lora     # rank 1/4/8/16, rsLoRA, DoRA, LoRA+, target layers; on the bold and italic styles
    python ablate.py base     # the base model: eps vs v prediction, Min-SNR-gamma 5 vs off, along its training
    python ablate.py controlnet   # the preset's ControlNet along its run; null labels, a frozen copy, other controls
    python ablate.py quant    # NF4 settings against the full-precision model; QLoRA adapters on the 4-bit model
    python ablate.py dit      # the DiT's three label designs and the UNet at equal training minutes; LoRA on a DiT
    python ablate.py lowrank  # full fine-tuning, LoRAs cut from it at r = 1..16, LoRAs trained at r, AdaLoRA
    python ablate.py attention    # how sharply --base's cross-attention picks among the label's tokens, and what
                                  # its choice is worth: each layer's weights made equal (w_k = 0), then all

Every row is a real run of lora_finetune.py, train.py, controlnet_train.py or quantize.py at this machine's preset (the flags in the table are
the only change), each in a process of its own so that its time and peak memory are its own, then scored
like evaluate.py: the same seeds, the committed classifier, FID beside the real-data floor. `lora` adapts
--base (default: the shipped model) for the preset's steps; `base` trains four models and scores each
at a quarter, half, three quarters and all of its run (--max-steps, then --resume: the same run as one
uninterrupted); `attention` trains nothing, it samples --base as it is. Each takes minutes to tens of minutes
on a 2-core CPU (docs/ablation-*.md say how long they took).
Every run's flags are checked before the first one starts. Writes a markdown table (--out).
"""
import argparse
import io
import math
import os
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr

import torch
from torch.utils.flop_counter import FlopCounterMode

import controlnet_train
import lora_extract
import lora_finetune
import quantize
import train
from harness.cli import Parser, check_writable, code_version, hardware_name, pick_device, positive_int, run_cli
from harness.config import PRESETS, preset_for, with_flags
from harness.figures import save_grid
from harness.metrics import Judge, classify
from harness.runs import plan_steps
from harness.sampling import SHIPPED_CHECKPOINT, describe, digit_labels, generate, load_sampler, sampling_settings
from model.adapters import set_lora
from model.attention import CrossAttention
from model.controls import control_image
from model.quant import four_bit_layers, storage_bytes

# name -> the flags that differ from the preset (r = 8, alpha = 8, on attn,conv; 500 steps)
LORA_RUNS = {
    "LoRA r=8 (preset)": [],
    "r=1": ["--rank", "1"],
    "r=4": ["--rank", "4"],
    "r=16": ["--rank", "16"],
    "rsLoRA r=16": ["--rank", "16", "--rslora"],
    "DoRA r=8": ["--variant", "dora"],
    "LoRA+ (B at 16x lr)": ["--lr-ratio", "16"],
    "attention only": ["--targets", "attn"],
    "conv only": ["--targets", "conv"],
}
STYLES = ("bold", "italic")
QLORA_STYLES = ("none", "bold", "italic")  # quant's adapters: plain MNIST (a repair of the 4-bit model), then styles
CONTROLNET_RUNS = {
    "skeleton, half the labels null (preset)": [],
    "a tenth of the labels null": ["--p-uncond", "0.1"],
    "copy frozen: hint and zero convs only": ["--freeze-copy"],
    "edges": ["--control", "edges"],
    "sketch": ["--control", "sketch"],
}
QUANT_RUNS = {  # quantize.py flags; the first is the model the adapter rows train on
    "stem and last conv kept in fp16 (quantize.py's default)": [],
    "every layer in NF4 (QLoRA's recipe)": ["--keep", "none"],
    "every layer, constants in fp32": ["--keep", "none", "--no-double-quant"],
    "every layer, blocks of 32": ["--keep", "none", "--block", "32"],
    "stem and last conv kept, blocks of 32": ["--block", "32"],
    "only the last conv kept": ["--keep", "out"],
}
DIT_RUNS = {  # train.py flags of the equal-minutes rows; each DiT row gets the UNet preset's training seconds
    "UNet (the preset)": [],
    "DiT, adaLN-Zero": ["--backbone", "dit", "--label-in", "adaln-zero"],
    "DiT, cross-attention": ["--backbone", "dit", "--label-in", "cross-attn"],
    "DiT, in-context tokens": ["--backbone", "dit", "--label-in", "in-context"],
}
DIT_LORA_RUNS = {  # lora_finetune.py --targets on the DiT preset's model
    "attention: w_q, w_k, w_v, w_o": ["--targets", "attn,w_o"],
    "MLP: fc1, fc2": ["--targets", "mlp"],
    "both (the DiT default)": [],
}
LOWRANK_RANKS = (1, 2, 4, 8, 16)  # the ranks cut from the full fine-tune and trained from scratch
ADALORA_RUN = ["--variant", "adalora"]  # the preset's 8 on average, from 12 a layer
BASE_RUNS = {
    "eps, Min-SNR-5 (preset)": [],
    "eps, plain loss": ["--min-snr-gamma", "0"],
    "v, Min-SNR-5": ["--prediction", "v"],
    "v, plain loss": ["--prediction", "v", "--min-snr-gamma", "0"],
}


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("study", choices=("lora", "base", "controlnet", "quant", "dit", "lowrank", "attention"),
                   help="which ablation to run")
    p.add_argument("--base", default=SHIPPED_CHECKPOINT, help="the model the adapters adapt (lora)")
    p.add_argument("--per-digit", type=positive_int, default=100, help="samples per digit for every score")
    p.add_argument("--work", default="checkpoints/ablation", help="folder for the runs' files (overwritten)")
    p.add_argument("--out", help="markdown table to write (default docs/ablation-STUDY.md)")
    p.add_argument("--figures", default="figure", help="folder for the dit study's figure (dit_designs.png) and the "
                                                       "lowrank study's (lowrank_STYLE.png)")
    p.add_argument("--data-dir", default="data", help="folder holding MNIST/raw/")
    p.add_argument("--classifier", default="pretrained/classifier.pt", help="evaluation classifier")
    p.add_argument("--flags", default="", help="extra flags for every run, before the row's own (e.g. "
                                               "'--total-steps 100' for a quick look; the table then says so)")
    p.add_argument("--device", help="cuda, mps or cpu (default: cuda if available)")
    return p.parse_args(argv)


def run_script(argv, device):
    """Run `python argv...` in a process of its own. Returns (wall seconds, peak memory in MiB or None).

    The peak is the process's resident memory on a CPU (os.wait4 reports it; not on Windows) and the
    GPU memory the script itself reports on CUDA."""
    with tempfile.TemporaryFile("w+") as log:
        start = time.time()
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), argv[0])
        proc = subprocess.Popen([sys.executable, script, *argv[1:], "--device", device.type], stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        if hasattr(os, "wait4"):
            _, status, usage = os.wait4(proc.pid, 0)
            code = os.waitstatus_to_exitcode(status)
            peak = usage.ru_maxrss / 1024  # KiB on Linux
        else:
            code, peak = proc.wait(), None
        seconds = time.time() - start
        log.seek(0)
        output = log.read()
    if code != 0:  # the script's own last line says why (its `error: ...` line, or a traceback's last)
        last = [line for line in output.replace("\r", "\n").splitlines() if line.strip()][-1:] or ["no output"]
        raise ValueError(f"{argv[0]} {' '.join(argv[1:])} failed: {last[0].strip()}")
    gpu = [line for line in output.splitlines() if line.startswith("peak GPU memory:")]
    if gpu:
        peak = float(gpu[-1].split(":")[1].split()[0].replace(",", ""))
    return seconds, peak


def sampling_for(ckpt, diffusion, device):
    """The preset's sampler for this checkpoint, as denoise.py and evaluate.py use it with no flags."""
    return sampling_settings(argparse.Namespace(sampler="ddim", eta=None), ckpt, diffusion, device)


def score_adapter(args, device, judge, labels, adapter, style, off):
    """Sample --base with `adapter` on (and off, once per style: off[style]) and score the style. Returns
    (report, the sampler's settings, the number of numbers in the adapter file)."""
    s = load_sampler(args.base, device, loras=[adapter])
    sampling, batch_size = sampling_for(s.checkpoint, s.diffusion, device)
    draw = lambda: generate(s.model, s.diffusion, labels, seed=0, batch_size=batch_size, **sampling)
    on = draw()
    if style not in off:  # the base model's samples: the same for every adapter of the style
        set_lora(s.model, enabled=False)
        off[style] = draw()
    params = sum(t.numel() for t in s.adapters[0][0]["tensors"].values())
    return judge.style_report(style, off[style], on, labels), sampling, params


def fine_tune(args, device, out, style, flags):
    """lora_finetune.py on --base in a process of its own: (seconds, peak memory)."""
    return run_script(["lora_finetune.py", "--base", args.base, "--out", out, "--style", style, "--force",
                       "--data-dir", args.data_dir, "--figures", args.work, *args.flags.split(), *flags], device)


def lora_study(args, device, judge, labels):
    rows, off = {}, {}
    for style in STYLES:
        for i, (name, flags) in enumerate(LORA_RUNS.items()):
            out = os.path.join(args.work, f"{style}-{i}.pt")
            print(f"== {style}: {name}", flush=True)
            seconds, peak = fine_tune(args, device, out, style, flags)
            report, sampling, params = score_adapter(args, device, judge, labels, out, style, off)
            rows.setdefault(name, dict(flags=flags, params=params, kib=os.path.getsize(out) / 1024, seconds={},
                                       peak={}))
            rows[name]["seconds"][style], rows[name]["peak"][style] = seconds, peak
            rows[name][style] = report
            print(f"   {seconds:.0f} s, gap closed {100 * report['gap_closed']:.0f}%, accuracy "
                  f"{100 * report['on']['accuracy']:.1f}%, FID {report['on']['fid']:.1f}", flush=True)
    first = next(iter(rows.values()))
    lines = [f"| adapter (flags) | trainable numbers | file | fine-tuning | peak memory | "
             + " | ".join(f"{s}: gap closed, accuracy, FID" for s in STYLES) + " |",
             "|---" * (5 + len(STYLES)) + "|",
             f"| LoRA off (the base model) | | | | | "
             + " | ".join(f"0%, {100 * first[s]['off']['accuracy']:.1f}%, {first[s]['off']['fid']:.1f}" for s in STYLES)
             + " |"]
    for name, r in rows.items():
        flags = f" (`{' '.join(r['flags'])}`)" if r["flags"] else ""
        peak = max(r["peak"].values()) if None not in r["peak"].values() else None
        lines.append(f"| {name}{flags} | {r['params']:,} | {r['kib']:,.0f} KiB | "
                     f"{sum(r['seconds'].values()) / len(STYLES):.0f} s | "
                     + (f"{peak:,.0f} MiB" if peak else "n/a") + " | "
                     + " | ".join(f"{100 * r[s]['gap_closed']:.0f}%, {100 * r[s]['on']['accuracy']:.1f}%, "
                                  f"{r[s]['on']['fid']:.1f}" for s in STYLES) + " |")
    floors = ", ".join(f"{s} {first[s]['on']['fid_floor']:.1f}" for s in STYLES)
    notes = [f"Real-data floor of the FID against real styled digits: {floors}. Fine-tuning: wall time of the "
             "whole lora_finetune.py process, the mean over the two styles; peak memory: "
             + ("its peak GPU memory." if device.type == "cuda" else "its peak resident memory (the process, "
                "PyTorch and MNIST included).")]
    return lines, notes, describe(**sampling)


def base_study(args, device, judge, labels):
    preset = preset_for(device)
    config = with_flags(PRESETS[preset]["train"], train.parse_args(args.flags.split()))
    total = plan_steps(len(judge.train_labels), config)  # the run train.py plans
    stops = [round(total * q) for q in (0.25, 0.5, 0.75, 1.0)]
    rows = {}
    for i, (name, flags) in enumerate(BASE_RUNS.items()):
        out = os.path.join(args.work, f"base-{i}.pt")
        rows[name] = dict(flags=flags, points=[])
        for stop in stops:
            print(f"== {name}: to step {stop}", flush=True)
            resume = ["--resume"] if stop != stops[0] else ["--force"]
            run_script(["train.py", "--out", out, "--max-steps", str(stop), *resume, "--data-dir", args.data_dir,
                        "--figures", args.work, *args.flags.split(), *flags], device)
            s = load_sampler(out, device)
            model, diffusion, ckpt = s.model, s.diffusion, s.checkpoint
            sampling, batch_size = sampling_for(ckpt, diffusion, device)
            result = judge(generate(model, diffusion, labels, seed=0, batch_size=batch_size, **sampling), labels)
            rows[name]["points"].append((stop, ckpt["seconds"], result))
            print(f"   {ckpt['seconds'] / 60:.1f} min of training: accuracy {100 * result['accuracy']:.1f}%, "
                  f"FID {result['fid']:.1f} (floor {result['fid_floor']:.1f})", flush=True)
    lines = ["| objective (flags) | " + " | ".join(f"step {s:,}" for s in stops) + " |",
             "|---" * (1 + len(stops)) + "|"]
    for name, r in rows.items():
        flags = f" (`{' '.join(r['flags'])}`)" if r["flags"] else ""
        lines.append(f"| {name}{flags} | " + " | ".join(
            f"{100 * res['accuracy']:.1f}%, FID {res['fid']:.1f}" for _, _, res in r["points"]) + " |")
    first = next(iter(rows.values()))["points"]
    notes = [f"Each cell: class accuracy and FID (real-data floor {first[-1][2]['fid_floor']:.1f}) of the "
             f"averaged weights at that step of a {total:,}-step run; the preset's run took "
             f"{first[-1][1] / 60:.1f} min of training here."]
    return lines, notes, describe(**sampling)


def controlnet_study(args, device, judge, labels):
    """The preset's ControlNet scored along its run (is there a sudden convergence?), then one change at a time,
    each scored at the end; the base model, with the same labels, seeds and no control, beside them."""
    import evaluate

    preset = PRESETS[load_sampler(args.base, device).checkpoint.get("preset") or preset_for(device)]["control"]
    config = with_flags(preset, controlnet_train.parse_args(args.flags.split()))
    total = plan_steps(len(judge.train_labels), config)
    rows = {}
    for i, (name, flags) in enumerate(CONTROLNET_RUNS.items()):
        out = os.path.join(args.work, f"controlnet-{i}.pt")
        stops = [round(total * q) for q in ((0.1, 0.25, 0.5, 1.0) if i == 0 else (1.0,))]
        rows[name] = dict(flags=flags, points=[])
        for stop in stops:
            print(f"== {name}: to step {stop}", flush=True)
            resume = ["--resume"] if stop != stops[0] else ["--force"]
            run_script(["controlnet_train.py", "--base", args.base, "--out", out, "--max-steps", str(stop), *resume,
                        "--data-dir", args.data_dir, "--figures", args.work, *args.flags.split(), *flags], device)
            per_digit = len(labels) // 10
            result = evaluate.main(["--ckpt", args.base, "--controlnet", out, "--per-digit", str(per_digit), "--json",
                                    "--classifier", args.classifier, "--data-dir", args.data_dir, "--device", device.type])
            rows[name]["points"].append((stop, result))
    lines = ["| ControlNet (flags) | step | control F1 exact, within 1 px | class accuracy | FID |", "|---" * 5 + "|"]
    base = next(iter(rows.values()))["points"][-1][1]
    lines.append(f"| the base model, same labels (no control) | | {base['control']['base_f1_exact']:.3f}, "
                 f"{base['control']['base_f1_1px']:.3f} | | |")
    for name, r in rows.items():
        flags = f" (`{' '.join(r['flags'])}`)" if r["flags"] else ""
        for stop, res in r["points"]:
            c = res["control"]
            lines.append(f"| {name}{flags} | {stop:,} | {c['f1_exact']:.3f}, {c['f1_1px']:.3f} | "
                         f"{100 * res['accuracy']:.2f}% | {res['fid']:.3f} |")
    notes = [f"Controls of the first test digits of each label; FID real-data floor {base['fid_floor']:.3f}.", ""]
    notes += conflict(args, device, judge, os.path.join(args.work, "controlnet-0.pt"), len(labels) // 10)
    return lines, notes, base_sampler(args.base, device)


def conflict(args, device, judge, controlnet, n, control_of=3, label=8):
    """The skeleton of a 3 with the label 8: which wins, as guidance on the label and the control's strength move."""
    s = load_sampler(args.base, device, controlnet=controlnet)
    sampling, batch_size = sampling_for(s.checkpoint, s.diffusion, device)
    threes = judge.test_images[judge.test_labels == control_of][:n]
    controls = control_image(s.controlnet[0].kind, threes)
    labels = torch.full((len(threes),), label, device=device)
    lines = [f"Conflict: the {s.controlnet[0].kind} of {len(threes)} test {control_of}s given the label {label} "
             f"(share of the drawn digits the classifier reads as {control_of} / as {label}):\n",
             "| guidance s \\ control scale | 0.5 | 1 | 2 |", "|---|---|---|---|"]
    for guidance in (1.0, 1.3, 3.0):
        cells = []
        for strength in (0.5, 1.0, 2.0):
            drawn = generate(s.model, s.diffusion, labels, seed=0, batch_size=batch_size, controlnet=s.controlnet[0],
                             controls=controls, control_scale=strength, **dict(sampling, guidance=guidance))
            read = classify(judge.classifier, drawn)[0]
            cells.append(f"{100 * (read == control_of).float().mean():.0f}% / {100 * (read == label).float().mean():.0f}%")
        lines.append(f"| {guidance:g} | " + " | ".join(cells) + " |")
    return lines


def quant_study(args, device, judge, labels):
    """Each NF4 setting against the full-precision model at the same seeds; then adapters trained on the 4-bit
    model (QLoRA) against adapters trained on the full-precision one; merging into 4 bits; the cost in time."""
    full = load_sampler(args.base, device)
    sampling, batch_size = sampling_for(full.checkpoint, full.diffusion, device)
    draw = lambda model: generate(model, full.diffusion, labels, seed=0, batch_size=batch_size, **sampling)
    x_full = draw(full.model)
    read_full = classify(judge.classifier, x_full)[0]
    score = judge(x_full, labels)
    lines = ["| model (quantize.py flags) | bits a quantised weight | whole model, share of fp32 | layer error "
             "| class accuracy | FID | digits that change class |", "|---" * 7 + "|",
             f"| full precision (`{args.base}`) | 32 | 1 | | {100 * score['accuracy']:.2f}% | {score['fid']:.3f} | |"]
    files = {}
    for i, (name, flags) in enumerate(QUANT_RUNS.items()):
        out = files[name] = os.path.join(args.work, f"nf4-{i}.pt")
        print(f"== {name}", flush=True)
        run_script(["quantize.py", "--base", args.base, "--out", out, "--force", *flags], device)
        q = load_sampler(out, device)
        x = draw(q.model)
        r, read = judge(x, labels), classify(judge.classifier, x)[0]
        size = quantised_size(full.model, q.model)
        lines.append(f"| {name}{' (`' + ' '.join(flags) + '`)' if flags else ''} | {size['bits']:.3f} | "
                     f"{size['share']:.3f} | {size['error']} | {100 * r['accuracy']:.2f}% | {r['fid']:.3f} | "
                     f"{100 * (read != read_full).float().mean():.1f}% |")
        print(f"   {lines[-1]}", flush=True)
    nf4 = files[next(iter(QUANT_RUNS))]
    notes = [f"FID real-data floor {score['fid_floor']:.3f}. Layer error: the range over the quantised layers of "
             "||W - deq(W)|| / ||W||. Digits that change class: the share of the samples, drawn from the same noise, "
             "that the classifier reads as another digit than the full-precision model's.", ""]
    notes += qlora_rows(args, device, judge, labels, nf4, draw)
    notes += ["", *forward_times(full.model, load_sampler(nf4, device).model, device)]
    return lines, notes, describe(**sampling)


def quantised_size(full, four_bit):
    """Bits a quantised weight, the 4-bit model's share of the fp32 bytes (its rest in fp16), the error range."""
    layers = four_bit_layers(four_bit)
    weights = sum(math.prod(l.weight_4bit.shape) for l in layers.values())
    nbytes = sum(storage_bytes(l) for l in layers.values())
    total = sum(t.numel() for t in full.state_dict().values() if t.is_floating_point())
    errors = [((full.get_submodule(p).weight - l.weight).norm() / full.get_submodule(p).weight.norm()).item()
              for p, l in layers.items()]
    return dict(bits=8 * nbytes / weights, share=(nbytes + 2 * (total - weights)) / (4 * total),
                error=f"{100 * min(errors):.1f}-{100 * max(errors):.1f}%")


def qlora_rows(args, device, judge, labels, nf4, draw):
    """Adapters trained on the full-precision and on the 4-bit model, each scored on its base, the full-precision
    one on the 4-bit model too; the bold 4-bit adapter merged (quantised again) against kept beside."""
    per_style = labels[::2]  # style rows: half the digits, as evaluate.py --results scores adapters
    lines = ["Adapters, each trained at the preset (`lora_finetune.py --style STYLE`, flags as in the table), scored "
             f"on {len(per_style):,} samples against real digits of the style:\n",
             "| style | adapter trained on | sampled on | fine-tuning (peak memory) | gap closed | class accuracy | FID | "
             "share of the full-precision adapter's gap |", "|---" * 8 + "|"]
    for style in QLORA_STYLES:
        closed = {}
        for trained, base in (("full", args.base), ("nf4", nf4)):
            if style == "none" and trained == "full":
                continue  # a plain-MNIST adapter on the model trained on plain MNIST learns nothing to measure
            out = os.path.join(args.work, f"qlora-{style}-{trained}.pt")
            print(f"== {style} adapter on {trained}", flush=True)
            seconds, peak = run_script(["lora_finetune.py", "--base", base, "--out", out, "--style", style, "--force",
                                     "--data-dir", args.data_dir, "--figures", args.work, *args.flags.split()], device)
            cost = f"{seconds:.0f} s" + (f" ({peak:,.0f} MiB)" if peak else "")
            for sampled in ((args.base, nf4) if trained == "full" else (nf4,)):
                s = load_sampler(sampled, device, loras=[out])
                if style == "none":  # scored like the NF4 models above: all the digits, no style
                    r = judge(generate(s.model, s.diffusion, labels, seed=0, **sampling_kw(s, device)), labels)
                    row = (f"| none: plain MNIST, LoftQ's idea ({len(labels):,} digits) | NF4 | NF4 | {cost} | | "
                           f"{100 * r['accuracy']:.2f}% | {r['fid']:.3f} | |")
                else:
                    on = generate(s.model, s.diffusion, per_style, seed=0, **sampling_kw(s, device))
                    set_lora(s.model, enabled=False)
                    off = generate(s.model, s.diffusion, per_style, seed=0, **sampling_kw(s, device))
                    r = judge.style_report(style, off, on, per_style)
                    key = (trained, sampled)
                    closed[key] = r["gap_closed"]
                    ref = closed.get(("full", args.base))
                    share = f"{100 * r['gap_closed'] / ref:.0f}%" if ref else ""
                    row = (f"| {style} | {'NF4' if trained == 'nf4' else 'full precision'} | "
                           f"{'NF4' if sampled == nf4 else 'full precision'} | {cost} | {100 * r['gap_closed']:.0f}% | "
                           f"{100 * r['on']['accuracy']:.2f}% | {r['on']['fid']:.3f} | {share} |")
                lines.append(row)
                print(f"   {row}", flush=True)
    merged = load_sampler(nf4, device, loras=[os.path.join(args.work, "qlora-bold-nf4.pt")], merge=True)
    on = generate(merged.model, merged.diffusion, per_style, seed=0, **sampling_kw(merged, device))
    base = load_sampler(nf4, device)
    off = generate(base.model, base.diffusion, per_style, seed=0, **sampling_kw(base, device))
    r = judge.style_report("bold", off, on, per_style)
    lines.append(f"| bold, merged into NF4 (quantised again) | NF4 | NF4 | | {100 * r['gap_closed']:.0f}% | "
                 f"{100 * r['on']['accuracy']:.2f}% | {r['on']['fid']:.3f} | |")
    return lines


def sampling_kw(s, device):
    sampling, batch_size = sampling_for(s.checkpoint, s.diffusion, device)
    return dict(sampling, batch_size=batch_size)


@torch.inference_mode()
def forward_times(full, four_bit, device, repeats=10):
    """Milliseconds of one UNet forward at the sampling batch and at the training batch, full precision and NF4."""
    lines = ["| UNet forward | full precision | NF4 (dequantised in the forward) |", "|---|---|---|"]
    for batch in (200, 32):
        x, t = torch.randn(batch, 1, 28, 28, device=device), torch.full((batch,), 500, device=device)
        y = torch.arange(batch, device=device) % 10
        cells = []
        for model in (full, four_bit):
            model(x, t, y)  # warm up
            start = time.perf_counter()
            for _ in range(repeats):
                model(x, t, y)
            cells.append(f"{1000 * (time.perf_counter() - start) / repeats:.1f} ms")
        lines.append(f"| batch {batch} | " + " | ".join(cells) + " |")
    return lines


def dit_study(args, device, judge, labels):
    """The UNet preset, then each DiT design trained for as many seconds as the UNet took (its steps set from a
    short probe of its speed), then the DiT preset; each scored, sized and timed; then LoRA on the DiT preset.
    --flags go to every run; a --total-steps among them shortens the UNet, the preset and the adapters only."""
    rows, unet_seconds, panels = [], None, {}
    runs = [*DIT_RUNS.items(), ("DiT preset (adaLN-Zero)", ["--backbone", "dit"])]
    for i, (name, flags) in enumerate(runs):
        out = os.path.join(args.work, f"dit-{i}.pt")
        steps = []
        if 0 < i < len(DIT_RUNS):  # the DiT rows of the equal-minutes table
            probe = os.path.join(args.work, "probe.pt")
            run_script(["train.py", "--out", probe, "--force", "--max-steps", "150", "--data-dir", args.data_dir,
                        "--figures", args.work, *flags], device)
            probed = torch.load(probe, weights_only=True)
            steps = ["--total-steps", str(round(unet_seconds * probed["step"] / probed["seconds"]))]
        print(f"== {name} {' '.join(steps)}", flush=True)
        run_script(["train.py", "--out", out, "--force", "--data-dir", args.data_dir, "--figures", args.work,
                    *args.flags.split(), *flags, *steps], device)
        s = load_sampler(out, device)
        unet_seconds = unet_seconds or s.checkpoint["seconds"]
        sampling, batch_size = sampling_for(s.checkpoint, s.diffusion, device)
        start = time.perf_counter()
        x = generate(s.model, s.diffusion, labels, seed=0, batch_size=batch_size, **sampling)
        sampling_seconds = time.perf_counter() - start
        r, ckpt = judge(x, labels), s.checkpoint
        panels[f"{name}, {ckpt['seconds'] / 60:.1f} min"] = x.view(10, -1, 28, 28)[:, :6]
        rows.append(f"| {name} | {ckpt['step']:,} | {ckpt['seconds'] / 60:.1f} min | {sampling['guidance']:g} | "
                    f"{100 * r['accuracy']:.2f}% | "
                    f"{r['fid']:.3f} | {sum(p.numel() for p in s.model.parameters()):,} | "
                    f"{forward_gflop(s.model, device):.4f} | "
                    f"{ckpt['step'] * ckpt['train']['batch_size'] / ckpt['seconds']:,.0f} | "
                    f"{len(labels) / sampling_seconds:,.0f} |")
        print(f"   {rows[-1]}", flush=True)
    lines = ["| network | steps | training | guidance | class accuracy | FID | parameters | GFLOP a forward | "
             "training images/s | sampling digits/s |", "|---" * 10 + "|", *rows]
    notes = [f"FID real-data floor {r['fid_floor']:.3f}. Each network samples with its preset's sampler (above; the "
             "guidance column says which scale). Training: the loop's seconds as train.py records them; "
             "GFLOP a forward: one image, one conditional pass, counted by torch.utils.flop_counter; sampling "
             f"digits/s: the {len(labels):,} scored digits with the sampler above, guidance's second pass included.", ""]
    figure = os.path.join(args.figures, "dit_designs.png")
    save_grid(figure, panels, [str(d) for d in range(10)], title="the same seeds, each network after its training")
    notes += [f"The first six samples of each digit: {figure}.", ""]
    notes += dit_lora_rows(args, device, judge, labels, os.path.join(args.work, f"dit-{len(runs) - 1}.pt"))
    return lines, notes, describe(**sampling)


@torch.inference_mode()
def forward_gflop(model, device):
    """GFLOP of one conditional forward of one image, counted by torch.utils.flop_counter."""
    one = (torch.zeros(1, 1, 28, 28, device=device), torch.full((1,), 500, device=device),
           torch.zeros(1, dtype=torch.long, device=device))
    with FlopCounterMode(display=False) as counter:
        model(*one)
    return counter.get_total_flops() / 1e9


def dit_lora_rows(args, device, judge, labels, base):
    """Style adapters on the DiT, one target group at a time: which layers a style needs in a transformer."""
    per_style = labels[::2]
    lines = [f"LoRA on the DiT preset's model (`lora_finetune.py --base DIT --style STYLE`, the preset's steps, rank "
             f"and learning rate; {len(per_style):,} samples against real digits of the style):\n",
             "| targets (flags) | trainable numbers | " + " | ".join(f"{s}: gap closed, accuracy, FID" for s in STYLES)
             + " |", "|---" * (2 + len(STYLES)) + "|"]
    off, reports = {}, {}
    for i, (name, flags) in enumerate(DIT_LORA_RUNS.items()):
        cells = []
        for style in STYLES:
            out = os.path.join(args.work, f"dit-{style}-{i}.pt")
            print(f"== DiT {style}: {name}", flush=True)
            run_script(["lora_finetune.py", "--base", base, "--out", out, "--style", style, "--force",
                        "--data-dir", args.data_dir, "--figures", args.work, *args.flags.split(), *flags], device)
            s = load_sampler(base, device, loras=[out])
            on = generate(s.model, s.diffusion, per_style, seed=0, **sampling_kw(s, device))
            if style not in off:
                set_lora(s.model, enabled=False)
                off[style] = generate(s.model, s.diffusion, per_style, seed=0, **sampling_kw(s, device))
            r = reports[style] = judge.style_report(style, off[style], on, per_style)
            params = sum(t.numel() for t in s.adapters[0][0]["tensors"].values())
            cells.append(f"{100 * r['gap_closed']:.0f}%, {100 * r['on']['accuracy']:.1f}%, {r['on']['fid']:.2f}")
            print(f"   {cells[-1]}", flush=True)
        lines.append(f"| {name}{' (`' + ' '.join(flags) + '`)' if flags else ''} | {params:,} | " + " | ".join(cells) + " |")
    lines.insert(3, "| LoRA off (the DiT preset's model) | | " + " | ".join(
        f"0%, {100 * reports[s]['off']['accuracy']:.1f}%, {reports[s]['off']['fid']:.2f}" for s in STYLES) + " |")
    return lines


def lowrank_study(args, device, judge, labels):
    """Per style: the full fine-tune (the ceiling), LoRAs cut from it at each rank, LoRAs trained at each rank,
    AdaLoRA at the preset's average rank; then the spectrum of the full update beside the trained LoRA's and
    AdaLoRA's ranks (lora_extract.py), and its figure."""
    rows, off, spectra = {}, {}, []
    for style in STYLES:
        work = lambda name: os.path.join(args.work, f"{style}-{name}.pt")
        runs = [("full fine-tune (`--variant full`)", work("full"), ["--variant", "full"])]
        runs += [(f"LoRA trained at r={r}" + (" (the preset)" if r == 8 else ""), work(f"r{r}"), ["--rank", str(r)])
                 for r in LOWRANK_RANKS]
        runs += [("AdaLoRA 12 -> 8 (`--variant adalora`)", work("adalora"), ADALORA_RUN),
                 ("AdaLoRA's SVD form alone: 8 -> 8, no pruning (`--init-rank 8`)", work("svd8"),
                  [*ADALORA_RUN, "--init-rank", "8"])]
        for name, out, flags in runs:
            print(f"== {style}: {name}", flush=True)
            seconds, _ = fine_tune(args, device, out, style, flags)
            loop = torch.load(out + ".resume", weights_only=False, map_location="cpu")["seconds"]
            add_row(rows, name, style, score_adapter(args, device, judge, labels, out, style, off), out, seconds, loop)
            if name.startswith("full"):  # the cuts of this update, right after it
                for r in LOWRANK_RANKS:
                    cut = work(f"cut{r}")
                    lora_extract.main(["--full", out, "--base", args.base, "--rank", str(r), "--out", cut, "--force"])
                    add_row(rows, f"cut from the full fine-tune at r={r}", style,
                            score_adapter(args, device, judge, labels, cut, style, off), cut)
        figure, r = os.path.join(args.figures, f"lowrank_{style}.png"), 8 if 8 in LOWRANK_RANKS else LOWRANK_RANKS[-1]
        table = lora_extract.main(["--full", work("full"), "--base", args.base, "--rank", str(r), "--adapters",
                                   work(f"r{r}"), work("adalora")])["lines"]
        lora_extract.main(["--full", work("full"), "--base", args.base, "--adapters", work("adalora"), "--spectrum", figure])
        spectra += [f"**{style}**: the full fine-tune's update per layer group; beside it the rank of the "
                    f"LoRA trained at r={r} ({os.path.basename(work(f'r{r}'))}) and AdaLoRA's per-layer ranks "
                    f"({os.path.basename(work('adalora'))}); figure: {figure}.\n", *table, ""]
    head = ["| adapter | numbers | fine-tuning (process / loop) | "
            + " | ".join(f"{s}: gap closed, accuracy, FID" for s in STYLES) + " |", "|---" * (3 + len(STYLES)) + "|",
            "| LoRA off (the base model) | | | " + " | ".join(
                f"0%, {100 * rows[next(iter(rows))][s]['off']['accuracy']:.1f}%, {rows[next(iter(rows))][s]['off']['fid']:.2f}"
                for s in STYLES) + " |"]
    order = sorted(rows, key=lambda n: (not n.startswith("full"), "AdaLoRA" in n, "trained" in n))
    lines = head + [lowrank_row(name, rows[name]) for name in order]
    notes = [f"Real-data floor of the FID against real styled digits: "
             + ", ".join(f"{s} {rows[order[0]][s]['on']['fid_floor']:.2f}" for s in STYLES) + ". Numbers: what the "
             "adapter adds (AdaLoRA: the kept triplets only; its file holds every starting triplet, the pruned ones at "
             "zero; per style when they differ). Fine-tuning: the lora_finetune.py process and its training loop, seconds, "
             "the mean over the styles; a cut takes a few SVDs (no training).", "", *spectra]
    return lines, notes, describe(**score_sampling(args, device))


def add_row(rows, name, style, scored, path, seconds=None, loop=None):
    report, _, _ = scored
    adapter = torch.load(path, weights_only=True, map_location="cpu")
    rows.setdefault(name, dict(numbers={}, seconds={}, loop={}))
    rows[name][style] = report
    rows[name]["numbers"][style] = added_numbers(adapter)
    rows[name]["seconds"][style], rows[name]["loop"][style] = seconds, loop
    print(f"   gap closed {100 * report['gap_closed']:.0f}%, accuracy {100 * report['on']['accuracy']:.1f}%, "
          f"FID {report['on']['fid']:.2f}", flush=True)


def added_numbers(adapter):
    """The numbers an adapter adds; for AdaLoRA only its kept triplets (a row of Q, lambda, a column of P)."""
    ranks, tensors = adapter["config"].get("ranks"), adapter["tensors"]
    if ranks is None:
        return sum(t.numel() for t in tensors.values())
    return sum(r * (tensors[f"{p}.lora_A"][0].numel() + len(tensors[f"{p}.lora_B"]) + 1) for p, r in ranks.items())


def lowrank_row(name, r):
    numbers = sorted(set(r["numbers"].values()))
    time = (f"{sum(r['seconds'].values()) / len(STYLES):.0f} / {sum(r['loop'].values()) / len(STYLES):.0f} s"
            if None not in r["seconds"].values() else "")
    return (f"| {name} | {' / '.join(f'{n:,}' for n in numbers)} | {time} | "
            + " | ".join(f"{100 * r[s]['gap_closed']:.0f}%, {100 * r[s]['on']['accuracy']:.1f}%, {r[s]['on']['fid']:.2f}"
                         for s in STYLES) + " |")


def attention_study(args, device, judge, labels):
    """--base's cross-attention layers: the weight of the token each location weighs most, per head and with the
    heads averaged, over every pass of the scored samples (labelled and null alike); then the samples again
    with each layer's choice taken away -- w_k = 0 makes every score Q K^T zero, so every location weighs the
    label's tokens equally."""
    s = load_sampler(args.base, device)
    layers = {name: m for name, m in s.model.named_modules() if isinstance(m, CrossAttention)}
    if not layers:
        raise ValueError(f"--base {args.base} is no UNet: the attention study reads the UNet's cross-attention "
                         f"(e.g. --base {SHIPPED_CHECKPOINT})")
    sampling, batch_size = sampling_for(s.checkpoint, s.diffusion, device)
    draw = lambda: judge(generate(s.model, s.diffusion, labels, seed=0, batch_size=batch_size, **sampling), labels)
    top, shape = {name: [] for name in layers}, {}

    def recorder(name):
        def record(module, inputs, output):
            w = module.weights(*inputs)  # [B, heads, H*W, L]
            top[name].append(torch.stack([w.max(-1).values.mean(), w.mean(1).max(-1).values.mean()]))
            shape[name] = w.shape[1:]
        return record

    hooks = [m.register_forward_hook(recorder(name)) for name, m in layers.items()]
    rows = [("none (the model as trained)", draw())]
    for hook in hooks:
        hook.remove()
    for name in [*layers, "all"]:
        print(f"== equal weights in {name}", flush=True)
        chosen = [m for n, m in layers.items() if name in (n, "all")]
        kept = [m.w_k.weight.clone() for m in chosen]
        with torch.no_grad():
            for m in chosen:
                m.w_k.weight.zero_()
            rows.append((f"{name}: w_k = 0", draw()))
            for m, weight in zip(chosen, kept):
                m.w_k.weight.copy_(weight)
    lines = ["| layer | locations, heads | top token's weight: per head, heads averaged |", "|---|---|---|"]
    for name in layers:
        (per_head, averaged), (heads, n, tokens) = torch.stack(top[name]).mean(0).tolist(), shape[name]
        lines.append(f"| {name} | {math.isqrt(n)}x{math.isqrt(n)}, {heads} | {per_head:.2f}, {averaged:.2f} |")
    lines += ["", "| equal token weights in | class accuracy | FID |", "|---|---|---|"]
    lines += [f"| {name} | {100 * r['accuracy']:.1f}% | {r['fid']:.2f} |" for name, r in rows]
    notes = [f"With {tokens} tokens per label, equal weights would give the top token {1 / tokens:.2f}. FID's "
             f"real-data floor: {rows[0][1]['fid_floor']:.2f}. The map itself: `python denoise.py --ckpt {args.base} "
             "--attention PNG` (figure/attention.png)."]
    return lines, notes, describe(**sampling)


def score_sampling(args, device):
    s = load_sampler(args.base, device)
    return sampling_for(s.checkpoint, s.diffusion, device)[0]


def base_sampler(path, device):
    s = load_sampler(path, device)
    return describe(**sampling_for(s.checkpoint, s.diffusion, device)[0])


def check_runs(args):
    """Every run's flags parse and agree, and none fights what the study sets itself, before the first run."""
    if args.study == "attention":
        if args.flags:
            raise ValueError("--flags: the attention study trains nothing; it samples --base as it is")
        return
    own = dict(lora=("--base", "--out", "--style", "--force", "--resume"),
               base=("--out", "--max-steps", "--resume", "--force"),
               controlnet=("--base", "--out", "--max-steps", "--resume", "--force"),
               quant=("--base", "--out", "--style", "--force", "--resume"),
               dit=("--out", "--max-steps", "--resume", "--force", "--backbone", "--label-in", "--style"),
               lowrank=("--base", "--out", "--style", "--force", "--resume", "--variant", "--rank"))[args.study]
    clash = [f for f in args.flags.split() if f.split("=")[0] in own]
    if clash:
        hint = " (plan a shorter run with --total-steps)" if "--max-steps" in clash and args.study == "base" else ""
        raise ValueError(f"--flags: the study sets {', '.join(clash)} itself{hint}")
    # (script, its runs, whether --flags go to them): quant's --flags go to its adapters, not to quantize.py
    checks = dict(lora=[(lora_finetune, LORA_RUNS, True)], base=[(train, BASE_RUNS, True)],
                  controlnet=[(controlnet_train, CONTROLNET_RUNS, True)],
                  quant=[(quantize, QUANT_RUNS, False), (lora_finetune, {"adapters": []}, True)],
                  dit=[(train, DIT_RUNS, True), (lora_finetune, DIT_LORA_RUNS, True)],
                  lowrank=[(lora_finetune, {"full": ["--variant", "full"], "AdaLoRA": ADALORA_RUN}, True)])[args.study]
    for script, runs, with_flags_ in checks:
        for name, flags in runs.items():
            said = io.StringIO()
            try:
                with redirect_stderr(said):
                    parsed = script.parse_args([*(args.flags.split() if with_flags_ else []), *flags])
            except SystemExit:
                raise ValueError(f"--flags: the run '{name}' would fail: {said.getvalue().strip().removeprefix('error: ')}")
            if args.study == "lora" and parsed.variant == "dora" and parsed.dropout:
                raise ValueError(f"--flags: the run '{name}' takes no --dropout (DoRA forms the adapted weight itself)")


def main(argv=None):
    args = parse_args(argv)
    out = args.out or f"docs/ablation-{args.study}.md"
    check_writable(out)
    for figure in dict(dit=["dit_designs.png"], lowrank=[f"lowrank_{s}.png" for s in STYLES]).get(args.study, []):
        check_writable(os.path.join(args.figures, figure))
    check_runs(args)
    if args.study in ("lora", "controlnet", "quant", "lowrank", "attention") and not os.path.isfile(args.base):
        raise FileNotFoundError(f"--base {args.base} not found (train.py writes one; the shipped one is "
                                f"{SHIPPED_CHECKPOINT})")
    device = pick_device(args.device)
    os.makedirs(args.work, exist_ok=True)
    judge = Judge(args.classifier, args.data_dir, device)
    labels = digit_labels(range(10), args.per_digit, device)
    start = time.time()
    study = dict(lora=lora_study, base=base_study, controlnet=controlnet_study, quant=quant_study,
                 dit=dit_study, lowrank=lowrank_study, attention=attention_study)[args.study]
    lines, notes, sampler = study(args, device, judge, labels)
    header = [f"# Ablation: {args.study}\n",
              f"`python ablate.py {args.study}` on {hardware_name(device)}, PyTorch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d')}, {code_version()}, {time.time() - start:.0f} s in all. "
              f"Scores: {len(labels):,} samples "
              f"({args.per_digit} per digit, {sampler}, seed 0), classifier {judge.fingerprint}"
              + (f"; every run with `{args.flags}`" if args.flags else "") + ".\n"]
    text = "\n".join(header + lines + [""] + notes) + "\n"
    with open(out, "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    run_cli(main)
