"""Chapter 5: the benchmark -- training speed, sampling speed and sample quality, measured in one run.

    python bench.py                 # trains the default model and adapter, then measures (one GPU)
    python bench.py --skip-train    # measures existing checkpoints only
    python bench.py --speed --device cpu   # speed only: the preset's setting against plain fp32, FLOP rate, ControlNet

Writes a markdown report (--out) and the figures guidance.png (one row per guidance scale) and steps.png
(quality against sampling steps). Every number comes from this run on this machine; the report names the
device. Sampling times exclude a short warm-up, reported beside them (cuDNN's first call of each shape;
on CUDA one extra row runs through torch.compile, whose compilation is that row's warm-up). The sampler,
guidance scale and interval are the checkpoint's preset's unless --guidance / --guidance-interval say otherwise.
"""
import json
import os
import re
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import lora_finetune  # noqa: E402
import train  # noqa: E402
from harness.cli import (OUTPUTS, Parser, check_new_output, check_writable, fused_adamw, hardware_name,  # noqa: E402
                         pick_device, positive_int, prepare_model, run_cli)
from harness.config import PRESETS, TrainConfig, preset_for, sample_config  # noqa: E402
from harness.figures import save_grid  # noqa: E402
from harness.files import resume_path  # noqa: E402
from harness.metrics import FLOOR_DRAWS, Judge  # noqa: E402
from harness.sampling import (describe, digit_labels, generate, guidance_scale, load_sampler, parse_interval,  # noqa: E402
                              resolve_interval)
from model.adapters import merge_lora  # noqa: E402
from model.controlnet import ControlNet  # noqa: E402
from model.diffusion import Diffusion  # noqa: E402
from model.unet import UNet  # noqa: E402

SAMPLERS = "ddim-50,ddim-20,ddim-10,ddim-100,ddpm-1000"
GUIDANCE = [1.0, 1.5, 2.0, 3.0, 5.0]
GUIDANCE_EVERY_STEP = [1.5, 2.0]
BENCH_RUN = os.path.join(OUTPUTS, "bench-run")  # where bench.py trains its own model and adapter


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--ckpt", help=f"model checkpoint: trained to {BENCH_RUN}/model.pt unless --skip-train "
                                  "(then default checkpoints/model.pt)")
    p.add_argument("--lora", help=f"adapter file: trained to {BENCH_RUN}/lora.pt unless --skip-train "
                                  "(then default checkpoints/lora.pt)")
    p.add_argument("--skip-train", action="store_true", help="measure existing checkpoints only")
    p.add_argument("--force", action="store_true", help="let the training replace a --ckpt or --lora that exists")
    p.add_argument("--per-digit", type=positive_int, default=1000, help="samples per digit for every row")
    p.add_argument("--guidance", type=guidance_scale, help="guidance scale of the sampler rows (default: the preset's)")
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
    print(f"benchmark on {hardware_name(device)}, PyTorch {torch.__version__}")
    if args.speed:
        return speed(args, device)
    args.out = args.out or os.path.join(OUTPUTS, "benchmark.md")
    check_writable(args.out)  # a report that cannot be written fails now, not after the whole run
    if args.skip_train:
        args.ckpt, args.lora = args.ckpt or "checkpoints/model.pt", args.lora or "checkpoints/lora.pt"
    else:  # bench's own files, unless named: a benchmark never replaces the user's models without --force
        args.ckpt, args.lora = args.ckpt or os.path.join(BENCH_RUN, "model.pt"), args.lora or os.path.join(BENCH_RUN, "lora.pt")
        check_new_output(False, args.force, args.ckpt, args.lora, resume_path(args.lora))
        if max(steps for _, steps, _ in samplers) > TrainConfig.T:
            raise ValueError(f"--samplers: at most T = {TrainConfig.T} steps, got {args.samplers}")
    bench = Bench(args, device)
    if not args.skip_train:
        bench.train()
    bench.load(samplers)
    bench.guidance_sweep()
    bench.lora()
    bench.samplers(samplers)
    print(to_markdown(bench.report, args))


class Bench:
    """The report, filled section by section and rewritten after each, so a stopped run keeps what it has."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.report = dict(hardware=hardware_name(device), torch=torch.__version__)

    def write(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
        with open(self.args.out, "w") as f:
            f.write(to_markdown(self.report, self.args))
        with open(os.path.splitext(self.args.out)[0] + ".json", "w") as f:
            json.dump(self.report, f, indent=1, default=float)

    def train(self):
        a = self.args
        start = time.time()
        info = train.main(["--out", a.ckpt, "--force", "--figures", a.figures, "--data-dir", a.data_dir,
                           *a.train_args.split()])
        self.report["train"] = dict(info, wall=time.time() - start)
        start = time.time()
        info = lora_finetune.main(["--base", a.ckpt, "--out", a.lora, "--force", "--figures", a.figures,
                                   "--data-dir", a.data_dir])
        self.report["lora_train"] = dict(info, wall=time.time() - start)

    def load(self, samplers):
        """Both models and the settings, checked before the classifier and the first row spend any time."""
        a, device, report = self.args, self.device, self.report
        plain, adapted = load_sampler(a.ckpt, device), load_sampler(a.ckpt, device, loras=[a.lora])
        self.model, self.diffusion, ckpt = plain.model, plain.diffusion, plain.checkpoint
        self.lora_model, self.adapters = adapted.model, adapted.adapters
        preset = sample_config(ckpt, device)
        guidance = preset.guidance if a.guidance is None else a.guidance
        self.default = dict(sampler="ddim", steps=preset.steps, eta=preset.eta, guidance=guidance)
        interval = parse_interval(a.guidance_interval or preset.guidance_interval)
        self.interval = report["guidance_interval"] = resolve_interval(interval, self.diffusion)
        report["sampling"] = dict(steps=preset.steps, eta=preset.eta, guidance=guidance)
        if max(steps for _, steps, _ in samplers) > self.diffusion.T:
            raise ValueError(f"--samplers: at most T = {self.diffusion.T} steps, got {a.samplers}")
        self.net = torch.compile(self.model, dynamic=False) if a.compile else self.model
        report["params"] = sum(p.numel() for p in self.model.parameters())
        start = time.time()
        self.judge = Judge(a.classifier, a.data_dir, device)
        report["classifier"] = dict(test_accuracy=self.judge.test_accuracy, fingerprint=self.judge.fingerprint,
                                    seconds=time.time() - start)
        report["fid_floor"] = self.judge.floor(digit_labels(range(10), a.per_digit, device))

    def run(self, name, net=None, per_digit=None, guidance_interval="preset", **sampling):
        """One row: sample 10 x per_digit digits, time them, score them."""
        interval = self.interval if guidance_interval == "preset" else guidance_interval
        labels = digit_labels(range(10), per_digit or self.args.per_digit, self.device)
        images, seconds, warmup = timed_generate(net or self.net, self.diffusion, labels, self.device,
                                                 self.args.batch_size, guidance_interval=interval, **sampling)
        row = dict(name=name, seconds=seconds, warmup_seconds=warmup, **self.judge(images, labels),
                   guidance_interval=interval, **sampling)
        print(f"{name} ({describe(guidance_interval=interval, **sampling)}): {seconds:.2f} s for "
              f"{len(labels):,} digits, accuracy {100 * row['accuracy']:.2f}%, "
              f"FID {row['fid']:.3f} (floor {row['fid_floor']:.3f})")
        return row, images

    def guidance_sweep(self):
        a, rows, grids = self.args, [], {}
        for s in GUIDANCE:
            row, images = self.run(f"s={s:g}", **dict(self.default, guidance=s))
            rows.append(row)
            grids[f"s={s:g}"] = images.view(10, a.per_digit, 28, 28)[:, 0]  # the first sample of each digit
        os.makedirs(a.figures, exist_ok=True)
        d = self.default
        save_grid(os.path.join(a.figures, "guidance.png"), {"": torch.stack(list(grids.values()))}, list(grids),
                  [str(d) for d in range(10)], title=f"guidance scale s (DDIM-{d['steps']}, eta {d['eta']:g}, "
                  f"guidance on t in {list(self.interval) if self.interval else 'all'}, same seed)")
        for s in GUIDANCE_EVERY_STEP:  # the same scales with guidance at every step: what the interval buys
            rows.append(self.run(f"s={s:g}, every step", guidance_interval=None, **dict(self.default, guidance=s))[0])
        self.report["guidance"] = rows
        self.write()

    def lora(self):
        a, params = self.args, self.report["params"]
        trainable = sum(t.numel() for t in self.adapters[0][0]["tensors"].values())
        rows = [self.run("base", **self.default)[0], self.run("LoRA unmerged", net=self.lora_model, **self.default)[0]]
        merge_lora(self.lora_model)
        rows.append(self.run("LoRA merged", net=self.lora_model, **self.default)[0])
        self.report["lora"] = dict(adapter_params=trainable, base_params=params, adapter_bytes=os.path.getsize(a.lora),
                                   base_bytes=os.path.getsize(a.ckpt), adapter_weight_bytes=4 * trainable,
                                   base_weight_bytes=4 * params, rows=rows)
        self.write()

    def samplers(self, samplers):
        rows = self.report["samplers"] = []
        if self.device.type == "cuda" and not self.args.compile:  # one compiled row; compiling is its warm-up
            compiled = torch.compile(self.model, dynamic=False)
            rows.append(dict(self.run(f"DDIM-{self.default['steps']}, torch.compile", net=compiled, **self.default)[0],
                             compiled=True))
            self.write()
        for sampler, n_steps, per_digit in samplers:
            rows.append(self.run(f"{sampler.upper()}-{n_steps}", per_digit=per_digit,
                                 **dict(self.default, sampler=sampler, steps=n_steps))[0])
            save_steps_plot(os.path.join(self.args.figures, "steps.png"), [r for r in rows if "compiled" not in r])
            self.write()


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


def build(train_config, device, chosen):
    """The preset's UNet, freshly seeded: as the scripts run it (`chosen`), or plain fp32 eager."""
    torch.manual_seed(0)
    model = UNet(channels=train_config.channels, attn_levels=train_config.attn_levels).to(device)
    return prepare_model(model, device) if chosen else model


def autocast_if(chosen, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=chosen and device.type == "cuda")


def train_rate(config, diffusion, device, chosen, steps):
    """Training images/s of `steps` steps after three of warm-up, on random images."""
    model = build(config, device, chosen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=chosen and fused_adamw(device))
    x = torch.rand(config.batch_size, 1, 28, 28, device=device) * 2 - 1
    y = torch.randint(0, 10, (config.batch_size,), device=device)

    def step():
        with autocast_if(chosen, device):
            loss = diffusion.loss(model, x, y, config.p_uncond, config.min_snr_gamma, config.t_sampling)
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
    return config.batch_size * steps / (time.time() - start)


def sample_rate(config, sample, diffusion, device, chosen, digits, controlled=False):
    """Sampling digits/s with the preset's sampler, after a 2-step warm-up; steered by a ControlNet if `controlled`."""
    model = build(config, device, chosen).eval()
    labels = digit_labels(range(10), digits // 10, device)
    settings = dict(eta=sample.eta, guidance=sample.guidance,
                    guidance_interval=resolve_interval(parse_interval(sample.guidance_interval), diffusion))
    if controlled:
        settings.update(controlnet=ControlNet(model).to(device).eval(), controls=torch.zeros(len(labels), 1, 28, 28, device=device))
    with autocast_if(chosen, device):
        generate(model, diffusion, labels, steps=2, **settings)
        sync(device)
        start = time.time()
        generate(model, diffusion, labels, steps=sample.steps, **settings)
        sync(device)
    return digits / (time.time() - start)


def speed(args, device, steps=60, digits=100):
    """Training images/s and sampling digits/s of the preset's model, the way the scripts run it and as plain
    fp32 eager (contiguous tensors, no autocast), and the training step's FLOP rate."""
    from torch.utils.flop_counter import FlopCounterMode

    preset = preset_for(device) if args.preset == "auto" else args.preset
    config, sample = PRESETS[preset]["train"], PRESETS[preset]["sample"]
    diffusion = Diffusion(config.T)
    x = torch.rand(config.batch_size, 1, 28, 28, device=device) * 2 - 1
    with FlopCounterMode(display=False) as counter:
        diffusion.loss(build(config, device, False), x, torch.zeros(len(x), dtype=torch.long, device=device),
                       0.0, config.min_snr_gamma).backward()
    flop_per_image = counter.get_total_flops() / config.batch_size
    rows = [(name, train_rate(config, diffusion, device, chosen, steps),
             sample_rate(config, sample, diffusion, device, chosen, digits))
            for name, chosen in (("the scripts' setting", True), ("plain fp32 eager", False))]
    lines = [f"# Speed: the {preset} preset's UNet ({','.join(map(str, config.channels))}), {hardware_name(device)}, "
             f"PyTorch {torch.__version__}\n",
             f"| setting | training step (batch {config.batch_size}) | sampling {digits} digits "
             f"({describe('ddim', sample.steps, sample.guidance, eta=sample.eta)} on the interval) |", "|---|---|---|"]
    lines += [f"| {name} | {t:,.0f} images/s | {s:,.1f} digits/s ({digits / s:.2f} s) |" for name, t, s in rows]
    steered = sample_rate(config, sample, diffusion, device, True, digits, controlled=True)
    lines += [f"| the scripts' setting, steered by a ControlNet | | {steered:,.1f} digits/s ({digits / steered:.2f} s): "
              f"{rows[0][2] / steered:.2f}x the time of a step |"]
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
    return dict(rows=rows, flop_per_image=flop_per_image, controlnet_digits_per_s=steered)


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
