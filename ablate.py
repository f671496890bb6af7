"""The ablations: what each LoRA variant and each training objective buys, measured on this machine.

    python ablate.py lora     # rank 1/4/8/16, rsLoRA, DoRA, LoRA+, target layers; on the bold and italic styles
    python ablate.py base     # the base model: eps vs v prediction, Min-SNR-gamma 5 vs off, along its training
    python ablate.py controlnet   # the preset's ControlNet along its run; null labels, a frozen copy, other controls

Every row is a real run of lora_finetune.py, train.py or controlnet_train.py at this machine's preset (the flags in the table are
the only change), each in a process of its own so that its time and peak memory are its own, then scored
like evaluate.py: the same seeds, the committed classifier, FID beside the real-data floor. `lora` adapts
--base (default: the shipped model) for the preset's steps; `base` trains four models and scores each
at a quarter, half, three quarters and all of its run (--max-steps, then --resume: the same run as one
uninterrupted). Each takes tens of minutes on a 2-core CPU (docs/ablation-*.md say how long they took).
Every run's flags are checked before the first one starts. Writes a markdown table (--out).
"""
import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr

import torch

import controlnet_train
import lora_finetune
import train
from harness.cli import Parser, check_writable, hardware_name, pick_device, positive_int, run_cli
from harness.config import PRESETS, preset_for, with_flags
from harness.metrics import Judge, classify
from harness.runs import plan_steps
from harness.sampling import SHIPPED_CHECKPOINT, describe, digit_labels, generate, load_sampler, sampling_settings
from model.adapters import set_lora
from model.controls import control_image

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
CONTROLNET_RUNS = {
    "skeleton, half the labels null (preset)": [],
    "a tenth of the labels null": ["--p-uncond", "0.1"],
    "copy frozen: hint and zero convs only": ["--freeze-copy"],
    "edges": ["--control", "edges"],
    "sketch": ["--control", "sketch"],
}
BASE_RUNS = {
    "eps, Min-SNR-5 (preset)": [],
    "eps, plain loss": ["--min-snr-gamma", "0"],
    "v, Min-SNR-5": ["--prediction", "v"],
    "v, plain loss": ["--prediction", "v", "--min-snr-gamma", "0"],
}


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("study", choices=("lora", "base", "controlnet"), help="which ablation to run")
    p.add_argument("--base", default=SHIPPED_CHECKPOINT, help="the model the adapters adapt (lora)")
    p.add_argument("--per-digit", type=positive_int, default=100, help="samples per digit for every score")
    p.add_argument("--work", default="checkpoints/ablation", help="folder for the runs' files (overwritten)")
    p.add_argument("--out", help="markdown table to write (default docs/ablation-STUDY.md)")
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


def lora_study(args, device, judge, labels):
    rows, off = {}, {}
    for style in STYLES:
        for i, (name, flags) in enumerate(LORA_RUNS.items()):
            out = os.path.join(args.work, f"{style}-{i}.pt")
            print(f"== {style}: {name}", flush=True)
            seconds, peak = run_script(["lora_finetune.py", "--base", args.base, "--out", out, "--style", style,
                                        "--force", "--data-dir", args.data_dir, "--figures", args.work, *args.flags.split(), *flags], device)
            s = load_sampler(args.base, device, loras=[out])
            model, diffusion, ckpt, adapters = s.model, s.diffusion, s.checkpoint, s.adapters
            sampling, batch_size = sampling_for(ckpt, diffusion, device)
            draw = lambda: generate(model, diffusion, labels, seed=0, batch_size=batch_size, **sampling)
            on = draw()
            if style not in off:  # the base model's samples: the same for every adapter of the style
                set_lora(model, enabled=False)
                off[style] = draw()
            report = judge.style_report(style, off[style], on, labels)
            params = sum(t.numel() for t in adapters[0][0]["tensors"].values())
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


def base_sampler(path, device):
    s = load_sampler(path, device)
    return describe(**sampling_for(s.checkpoint, s.diffusion, device)[0])


def check_runs(args):
    """Every run's flags parse and agree, and none fights what the study sets itself, before the first run."""
    own = dict(lora=("--base", "--out", "--style", "--force", "--resume"),
               base=("--out", "--max-steps", "--resume", "--force"),
               controlnet=("--base", "--out", "--max-steps", "--resume", "--force"))[args.study]
    clash = [f for f in args.flags.split() if f.split("=")[0] in own]
    if clash:
        hint = " (plan a shorter run with --total-steps)" if "--max-steps" in clash and args.study == "base" else ""
        raise ValueError(f"--flags: the study sets {', '.join(clash)} itself{hint}")
    script, runs = dict(lora=(lora_finetune, LORA_RUNS), base=(train, BASE_RUNS),
                        controlnet=(controlnet_train, CONTROLNET_RUNS))[args.study]
    for name, flags in runs.items():
        said = io.StringIO()
        try:
            with redirect_stderr(said):
                parsed = script.parse_args([*args.flags.split(), *flags])
        except SystemExit:
            raise ValueError(f"--flags: the run '{name}' would fail: {said.getvalue().strip().removeprefix('error: ')}")
        if args.study == "lora" and parsed.variant == "dora" and parsed.dropout:
            raise ValueError(f"--flags: the run '{name}' takes no --dropout (DoRA forms the adapted weight itself)")


def main(argv=None):
    args = parse_args(argv)
    out = args.out or f"docs/ablation-{args.study}.md"
    check_writable(out)
    check_runs(args)
    if args.study in ("lora", "controlnet") and not os.path.isfile(args.base):
        raise FileNotFoundError(f"--base {args.base} not found (train.py writes one; the shipped one is "
                                f"{SHIPPED_CHECKPOINT})")
    device = pick_device(args.device)
    os.makedirs(args.work, exist_ok=True)
    judge = Judge(args.classifier, args.data_dir, device)
    labels = digit_labels(range(10), args.per_digit, device)
    start = time.time()
    study = dict(lora=lora_study, base=base_study, controlnet=controlnet_study)[args.study]
    lines, notes, sampler = study(args, device, judge, labels)
    header = [f"# Ablation: {args.study}\n",
              f"`python ablate.py {args.study}` on {hardware_name(device)}, PyTorch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d')}, {time.time() - start:.0f} s in all. Scores: {len(labels):,} samples "
              f"({args.per_digit} per digit, {sampler}, seed 0), classifier {judge.fingerprint}"
              + (f"; every run with `{args.flags}`" if args.flags else "") + ".\n"]
    text = "\n".join(header + lines + [""] + notes) + "\n"
    with open(out, "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    run_cli(main)
