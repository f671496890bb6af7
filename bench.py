"""Chapter 5: the benchmark -- training speed, sampling speed and sample quality, measured in one run.

    python bench.py                 # trains the default model and adapter, then measures (one GPU)
    python bench.py --skip-train    # measures existing checkpoints only
    python bench.py --speed --device cpu   # speed only: the preset's setting against plain fp32, FLOP rate

Writes a markdown report (--out) and the figures guidance.png (one row per guidance scale) and steps.png
(quality against sampling steps). Every number comes from this run on this machine; the report names the
device. Sampling times exclude a short warm-up, reported beside them (cuDNN's first call of each shape;
on CUDA one extra row runs through torch.compile, whose compilation is that row's warm-up). The sampler,
guidance scale and interval are the checkpoint's preset's unless --guidance / --guidance-interval say otherwise.
"""
import json
import os
import platform
import re
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import lora_finetune  # noqa: E402
import train  # noqa: E402
from model.cli import OUTPUTS, Parser, check_writable, nonnegative_float, pick_device, positive_int, run_cli  # noqa: E402
from model.config import PRESETS, TrainConfig, preset_for  # noqa: E402
from model.figures import save_grid  # noqa: E402
from model.lora import merge_lora  # noqa: E402
from model.metrics import FLOOR_DRAWS, Judge  # noqa: E402
from model.sampling import describe, generate, load_sampler, parse_interval, resolve_interval  # noqa: E402

SAMPLERS = "ddim-50,ddim-20,ddim-10,ddim-100,ddpm-1000"
GUIDANCE = [1.0, 1.5, 2.0, 3.0, 5.0]
GUIDANCE_EVERY_STEP = [1.5, 2.0]


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--ckpt", default="checkpoints/model.pt", help="model checkpoint (trained unless --skip-train)")
    p.add_argument("--lora", default="checkpoints/lora.pt", help="adapter file (trained unless --skip-train)")
    p.add_argument("--skip-train", action="store_true", help="measure existing checkpoints only")
    p.add_argument("--per-digit", type=positive_int, default=1000, help="samples per digit for every row")
    p.add_argument("--guidance", type=nonnegative_float, help="guidance scale of the sampler rows (default: the preset's)")
    p.add_argument("--guidance-interval",
                   help="steps where guidance acts in every row but the 'every step' ones: auto, all or FIRST,LAST "
                        "(default: the preset's)")
    p.add_argument("--batch-size", type=positive_int, default=10000, help="images sampled at once")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet for every sampling row (CUDA always gets one compiled row too)")
    p.add_argument("--samplers", default=SAMPLERS,
                   help="sampler rows, e.g. ddim-50,ddpm-1000; '@N' sets N samples per digit for one row")
    p.add_argument("--device", help="cuda, mps or cpu (default: cuda if available)")
    p.add_argument("--data-dir", default="data", help="folder holding MNIST/raw/")
    p.add_argument("--classifier", default="pretrained/classifier.pt", help="evaluation classifier")
    p.add_argument("--figures", default=OUTPUTS, help="folder for guidance.png and steps.png")
    p.add_argument("--out", help="markdown report, a .json beside it (default outputs/benchmark.md; with --speed: "
                                 "printed only)")
    p.add_argument("--train-args", default="", help="extra flags for train.py, e.g. '--epochs 5'")
    p.add_argument("--speed", action="store_true",
                   help="measure speed only (no training, no scoring): the training step and the sampler, with the "
                        "preset's setting and with plain fp32, and the FLOP rate against the machine's peak")
    p.add_argument("--preset", choices=("auto", "cpu", "gpu"), default="auto", help="the model --speed measures")
    return p.parse_args(argv)


def parse_samplers(text):
    """'ddim-50,ddpm-1000@100' -> [('ddim', 50, None), ('ddpm', 1000, 100)]: sampler, steps, samples per digit."""
    rows = []
    for spec in text.split(","):
        m = re.fullmatch(r"(ddim|ddpm)-([1-9][0-9]*)(?:@([1-9][0-9]*))?", spec.strip())
        if not m:
            raise ValueError(f"--samplers: expected rows like ddim-50 or ddpm-1000@100, got {spec!r}")
        rows.append((m[1], int(m[2]), int(m[3]) if m[3] else None))
    return rows


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_generate(net, diffusion, labels, device, batch_size, **sampling):
    """Warm up both batch shapes (B for unguided steps, 2B for guided ones), then time the full run.

    Returns (images, seconds, warm-up seconds); the warm-up holds cuDNN's and torch.compile's first calls.
    """
    start = time.time()
    warm = dict(sampling, steps=2, guidance_interval=None)
    generate(net, diffusion, labels[:batch_size], batch_size=batch_size, **warm)  # guided: 2B
    generate(net, diffusion, labels[:batch_size], batch_size=batch_size, **dict(warm, guidance=1.0))  # B
    sync(device)
    warmup = time.time() - start
    start = time.time()
    images = generate(net, diffusion, labels, batch_size=batch_size, **sampling)
    sync(device)
    return images, time.time() - start, warmup


def main(argv=None):
    args = parse_args(argv)
    if args.guidance_interval is not None:
        parse_interval(args.guidance_interval)  # bad values fail now, not after the training
    samplers = parse_samplers(args.samplers)
    device = pick_device(args.device)
    hardware = hardware_name(device)
    report = dict(hardware=hardware, torch=torch.__version__)
    print(f"benchmark on {hardware}, PyTorch {torch.__version__}")
    if args.speed:
        return speed(args, device)
    args.out = args.out or os.path.join(OUTPUTS, "benchmark.md")
    check_writable(args.out)  # a report that cannot be written fails now, not after the whole run
    if not args.skip_train and max(steps for _, steps, _ in samplers) > TrainConfig.T:
        raise ValueError(f"--samplers: at most T = {TrainConfig.T} steps, got {args.samplers}")

    def write():
        """Rewrite the report after every section, so that a long run that is stopped keeps what it has."""
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(to_markdown(report, args))
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(report, f, indent=1, default=float)

    if not args.skip_train:
        start = time.time()
        info = train.main(["--out", args.ckpt, "--force", "--figures", args.figures, "--data-dir", args.data_dir,
                           *args.train_args.split()])
        report["train"] = dict(info, wall=time.time() - start)
        start = time.time()
        info = lora_finetune.main(["--base", args.ckpt, "--out", args.lora, "--force", "--figures", args.figures,
                                   "--data-dir", args.data_dir])
        report["lora_train"] = dict(info, wall=time.time() - start)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:  # keep the training numbers early
            json.dump(report, f, indent=1, default=float)

    # Both models and the settings are checked before the classifier and the first row spend any time.
    model, diffusion, ckpt, _ = load_sampler(args.ckpt, device)
    lora_model, _, _, adapters = load_sampler(args.ckpt, device, loras=[args.lora])
    preset = PRESETS[ckpt.get("preset") or preset_for(device)]["sample"]
    steps, eta, guidance = preset.steps, preset.eta, preset.guidance if args.guidance is None else args.guidance
    interval = parse_interval(args.guidance_interval or preset.guidance_interval)
    interval = report["guidance_interval"] = resolve_interval(interval, diffusion)
    report["sampling"] = dict(steps=steps, eta=eta, guidance=guidance)
    if max(steps for _, steps, _ in samplers) > diffusion.T:
        raise ValueError(f"--samplers: at most T = {diffusion.T} steps, got {args.samplers}")
    net = torch.compile(model, dynamic=False) if args.compile else model
    report["params"] = sum(p.numel() for p in model.parameters())
    start = time.time()
    judge = Judge(args.classifier, args.data_dir, device)
    report["classifier"] = dict(test_accuracy=judge.test_accuracy, fingerprint=judge.fingerprint,
                                seconds=time.time() - start)
    report["fid_floor"] = judge.floor(torch.arange(10, device=device).repeat_interleave(args.per_digit))

    def run(name, net=net, per_digit=args.per_digit, guidance_interval=interval, **sampling):
        labels = torch.arange(10, device=device).repeat_interleave(per_digit)
        images, seconds, warmup = timed_generate(net, diffusion, labels, device, args.batch_size,
                                                 guidance_interval=guidance_interval, **sampling)
        row = dict(name=name, seconds=seconds, warmup_seconds=warmup, **judge(images, labels),
                   guidance_interval=guidance_interval, **sampling)
        print(f"{name} ({describe(guidance_interval=guidance_interval, **sampling)}): {seconds:.2f} s for "
              f"{len(labels):,} digits, accuracy {100 * row['accuracy']:.2f}%, "
              f"FID {row['fid']:.3f} (floor {row['fid_floor']:.3f})")
        return row, images

    os.makedirs(args.figures, exist_ok=True)
    report["guidance"], grids = [], {}
    for s in GUIDANCE:
        row, images = run(f"s={s:g}", sampler="ddim", steps=steps, eta=eta, guidance=s)
        report["guidance"].append(row)
        grids[f"s={s:g}"] = images.view(10, args.per_digit, 28, 28)[:, 0]  # the first sample of each digit
    save_grid(os.path.join(args.figures, "guidance.png"), {"": torch.stack(list(grids.values()))}, list(grids),
              [str(d) for d in range(10)], title=f"guidance scale s (DDIM-{steps}, eta {eta:g}, guidance on t in "
              f"{list(interval) if interval else 'all'}, same seed)")
    for s in GUIDANCE_EVERY_STEP:  # the same scales with guidance at every step: what the interval buys
        report["guidance"].append(run(f"s={s:g}, every step", sampler="ddim", steps=steps, eta=eta, guidance=s,
                                      guidance_interval=None)[0])
    write()

    default = dict(sampler="ddim", steps=steps, eta=eta, guidance=guidance)
    trainable = sum(t.numel() for t in adapters[0][0]["tensors"].values())
    base_row, _ = run("base", **default)
    lora_row, _ = run("LoRA unmerged", net=lora_model, **default)
    merge_lora(lora_model)
    merged_row, _ = run("LoRA merged", net=lora_model, **default)
    report["lora"] = dict(adapter_params=trainable, base_params=report["params"],
                          adapter_bytes=os.path.getsize(args.lora), base_bytes=os.path.getsize(args.ckpt),
                          adapter_weight_bytes=4 * trainable, base_weight_bytes=4 * report["params"],
                          rows=[base_row, lora_row, merged_row])
    write()

    report["samplers"] = []
    if device.type == "cuda" and not args.compile:  # one compiled row; its compile time is its warm-up
        report["samplers"].append(dict(run(f"DDIM-{steps}, torch.compile", net=torch.compile(model, dynamic=False),
                                           **default)[0], compiled=True))
        write()
    for sampler, n_steps, per_digit in samplers:
        row, _ = run(f"{sampler.upper()}-{n_steps}", per_digit=per_digit or args.per_digit, sampler=sampler,
                     steps=n_steps, eta=eta, guidance=guidance)
        report["samplers"].append(row)
        eager = [r for r in report["samplers"] if "compiled" not in r]
        save_steps_plot(os.path.join(args.figures, "steps.png"), eager)
        write()
    print(to_markdown(report, args))


def cpu_peak():
    """A stated estimate of the CPU's fp32 peak: cores x clock x FLOP per cycle (two FMA units of the widest
    vector PyTorch uses: 64 FLOP/cycle with AVX-512, 32 with AVX2). Returns (FLOP/s, how it was estimated)."""
    isa = torch.backends.cpu.get_cpu_capability()
    per_cycle = 64 if "512" in isa else 32 if "AVX2" in isa else 8
    mhz = 0.0
    if os.path.exists("/proc/cpuinfo"):
        mhz = max([float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")] or [0])
    ghz, cores = (mhz / 1000 or 2.0), torch.get_num_threads()
    return cores * ghz * 1e9 * per_cycle, f"{cores} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle ({isa})"


def speed(args, device, steps=60, digits=100):
    """Training images/s and sampling digits/s of the preset's model, the way the scripts run it and as plain
    fp32 eager (contiguous tensors, no autocast), and the training step's FLOP rate."""
    from torch.utils.flop_counter import FlopCounterMode

    from model.cli import fused_adamw, prepare_model
    from model.config import PRESETS, preset_for
    from model.diffusion import Diffusion
    from model.unet import DEFAULT_CONFIG, UNet

    preset = preset_for(device) if args.preset == "auto" else args.preset
    train, sample = PRESETS[preset]["train"], PRESETS[preset]["sample"]
    diffusion = Diffusion(train.T)
    x = torch.rand(train.batch_size, 1, 28, 28, device=device) * 2 - 1
    y = torch.randint(0, 10, (train.batch_size,), device=device)
    autocast = lambda on: torch.autocast(device.type, dtype=torch.bfloat16, enabled=on and device.type == "cuda")

    def build(chosen):
        torch.manual_seed(0)
        model = UNet(**{**DEFAULT_CONFIG, "channels": train.channels, "attn_levels": train.attn_levels}).to(device)
        return prepare_model(model, device) if chosen else model

    def train_rate(chosen):
        model = build(chosen)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=chosen and fused_adamw(device))

        def step():
            with autocast(chosen):
                loss = diffusion.loss(model, x, y, train.p_uncond, train.min_snr_gamma, train.t_sampling)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for _ in range(3):
            step()
        sync(device)
        start = time.time()
        for _ in range(steps):
            step()
        sync(device)
        return train.batch_size * steps / (time.time() - start)

    def sample_rate(chosen):
        model = build(chosen).eval()
        labels = torch.arange(10, device=device).repeat_interleave(digits // 10)
        interval = resolve_interval(parse_interval(sample.guidance_interval), diffusion)  # the preset's
        with autocast(chosen):
            generate(model, diffusion, labels, steps=2, eta=sample.eta, guidance=sample.guidance,
                     guidance_interval=interval)
            sync(device)
            start = time.time()
            generate(model, diffusion, labels, steps=sample.steps, eta=sample.eta, guidance=sample.guidance,
                     guidance_interval=interval)
            sync(device)
        return digits / (time.time() - start)

    model = build(False)
    with FlopCounterMode(display=False) as counter:
        diffusion.loss(model, x, y, 0.0, train.min_snr_gamma).backward()
    flop_per_image = counter.get_total_flops() / train.batch_size
    rows = [("the scripts' setting", train_rate(True), sample_rate(True)),
            ("plain fp32 eager", train_rate(False), sample_rate(False))]
    lines = [f"# Speed: the {preset} preset's UNet ({','.join(map(str, train.channels))}), {hardware_name(device)}, "
             f"PyTorch {torch.__version__}\n",
             f"| setting | training step (batch {train.batch_size}) | sampling {digits} digits "
             f"({describe('ddim', sample.steps, sample.guidance, eta=sample.eta)} on the interval) |", "|---|---|---|"]
    lines += [f"| {name} | {t:,.0f} images/s | {s:,.1f} digits/s ({digits / s:.2f} s) |" for name, t, s in rows]
    lines += ["", f"Training step: {flop_per_image / 1e9:.3f} GFLOP per image (forward + backward, counted by "
                  f"torch.utils.flop_counter); speed-up of the scripts' setting over plain fp32: "
                  f"{rows[0][1] / rows[1][1]:.2f}x."]
    if device.type == "cpu":
        peak, how = cpu_peak()
        achieved = rows[0][1] * flop_per_image
        lines += [f"Achieved {achieved / 1e9:.1f} GFLOP/s against an estimated fp32 peak of {peak / 1e9:.0f} GFLOP/s "
                  f"({how}): {100 * achieved / peak:.0f}%."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        check_writable(args.out)
        with open(args.out, "w") as f:
            f.write(text)
    return dict(rows=rows, flop_per_image=flop_per_image)


def hardware_name(device):
    if device.type == "cuda":
        return f"one {torch.cuda.get_device_name()}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def save_steps_plot(path, rows):
    """Class accuracy and FID / floor against the number of sampling steps."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for sampler, marker in (("ddim", "o-"), ("ddpm", "s")):
        pts = sorted((r["steps"], r) for r in rows if r["sampler"] == sampler)
        if pts:
            a1.plot([s for s, _ in pts], [100 * r["accuracy"] for _, r in pts], marker, label=sampler.upper())
            a2.plot([s for s, _ in pts], [r["fid"] / r["fid_floor"] for _, r in pts], marker, label=sampler.upper())
    a2.axhline(1.0, color="grey", linestyle="--", label="real data")
    for ax, name in ((a1, "class accuracy (%)"), (a2, "FID / real-data floor")):
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(name)
        ax.legend()
    fig.suptitle(f"quality vs sampling steps (guidance {rows[0]['guidance']:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_markdown(r, args):
    """The report as markdown; sections that have not been measured yet are left out."""
    n = 10 * args.per_digit
    out = [f"# Benchmark\n\nMeasured in one run of `python bench.py` on {r['hardware']}, PyTorch {r['torch']}.",
           f"Evaluation classifier: {100 * r['classifier']['test_accuracy']:.2f}% on MNIST test (weights "
           f"{r['classifier']['fingerprint']}; FIDs compare only under the same one). "
           f"FID is measured against the MNIST test set weighted to the samples' digits; real-data floor "
           f"({n:,} real training images, {n // 10:,} of each digit, scored the same way; mean of "
           f"{FLOOR_DRAWS} draws): {r['fid_floor']:.3f}.\n"]
    if "train" in r:
        t, lt = r["train"], r["lora_train"]
        out += ["## Training\n", "| run | wall time | loop time | optimizer steps | images/s |", "|---|---|---|---|---|",
                f"| base UNet ({r['params']:,} parameters) | {t['wall']:.1f} s | {t['seconds']:.1f} s | {t['steps']:,} "
                f"| {t['images_per_s']:,.0f} |",
                f"| LoRA adapter | {lt['wall']:.1f} s | {lt['seconds']:.1f} s | | |", "",
                "Wall time: the script's `main()` from its start to the checkpoint on disk (data loading and figures "
                "included, Python's start and `import torch` not); loop time: the training loop alone.\n"]
    bf16 = ", bf16 autocast" if r["hardware"].startswith("one") else ""
    head = ["| {} | digits | time | warm-up | digits/s | class accuracy | FID | FID / floor |",
            "|---|---|---|---|---|---|---|---|"]
    fmt = lambda row: (f"| {row['name']} | {row['n']:,} | {row['seconds']:.2f} s | {row['warmup_seconds']:.1f} s | "
                       f"{row['n'] / row['seconds']:,.0f} | {100 * row['accuracy']:.2f}% | {row['fid']:.3f} | "
                       f"{row['fid'] / row['fid_floor']:.2f}x |")
    interval = r.get("guidance_interval")
    on = f"t in [{interval[0]}, {interval[1]}]" if interval else "every step"
    sampling = r.get("sampling", {})
    noise = f"eta {sampling['eta']:g}, " if sampling.get("eta") else ""
    where = f"{noise}guidance {sampling.get('guidance', 0):g} on {on}"
    out += ["Time: the timed run of all digits; warm-up: two 2-step runs before it, which hold the one-off costs "
            "(cuDNN's first calls, torch.compile's compilation).\n"]
    if r.get("samplers"):
        out += [f"## Samplers ({where}, batch {args.batch_size:,}{bf16})\n",
                head[0].format("sampler"), head[1]] + [fmt(row) for row in r["samplers"]] + [""]
    if r.get("guidance"):
        autocast_note = "bf16 autocast, " if bf16 else ""
        out += [f"## Guidance sweep (DDIM-{sampling['steps']}, {noise}{autocast_note}guidance on {on} unless the row "
                "says every step)\n",
                head[0].format("guidance s"), head[1]]
        out += [fmt(row) for row in r["guidance"]] + [""]
    if "lora" in r:
        lo = r["lora"]
        out += ["## LoRA\n", "| | parameters | weights (fp32) | file on disk |", "|---|---|---|---|",
                f"| base UNet | {lo['base_params']:,} | {lo['base_weight_bytes'] / 2**20:.2f} MiB | "
                f"{lo['base_bytes'] / 2**20:.2f} MiB (weights, EMA weights, optimizer state) |",
                f"| LoRA adapter | {lo['adapter_params']:,} ({100 * lo['adapter_params'] / lo['base_params']:.2f}%) | "
                f"{lo['adapter_weight_bytes'] / 1024:.0f} KiB | {lo['adapter_bytes'] / 1024:.0f} KiB |",
                "", f"Sampling with DDIM-{sampling['steps']}, {where}:\n", head[0].format("model"), head[1]]
        out += [fmt(row) for row in lo["rows"]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    run_cli(main)
