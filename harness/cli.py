"""What the scripts share: picking a device, seeding, and turning bad input into one line.

Every script is a thin argparse front end whose `main()` runs inside `run_cli`. The library raises ordinary
exceptions for what the user can get wrong -- `ValueError` for a bad value, `FileNotFoundError` for a missing
file, `OSError` for a disk that is full or read-only -- and `run_cli` prints the message as a single
`error: ...` line with exit status 2, instead of a Python traceback.
"""
import argparse
import math
import os
import platform
import random
import subprocess
import sys
import tempfile

import torch

# Where the scripts write their figures: an ignored folder, so a run never replaces the README's figure/.
OUTPUTS = "outputs"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the script's docstring as written and shows each flag's default (where it has one)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (`error: ...`) rather than the usage block plus a line."""

    def __init__(self, doc):
        super().__init__(description=doc, formatter_class=_HelpFormatter)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run_cli(main):
    """Run `main()`, reporting a bad value, a missing file or a failed write as one line (exit 2), and
    Ctrl-C as exit 130."""
    try:
        main()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and "memory" not in str(e).lower():
            raise
        print("error: out of memory: try a smaller --batch-size (or fewer --per-digit)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def pick_device(name=None):
    """`cuda` if available, else Apple's `mps`, else `cpu` -- or the device the user named."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps was asked for, but this machine has no MPS backend")
    return device


def hardware_name(device):
    """'one NVIDIA H200', or 'AMD EPYC, 2 threads (AVX512)': what a measurement names beside its numbers."""
    if device.type == "cuda":
        return f"one {torch.cuda.get_device_name()}"
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {torch.get_num_threads()} threads ({torch.backends.cpu.get_cpu_capability()})"


def code_version():
    """'code at `abc1234`' (plus ' with uncommitted changes'): what a generated table says made it, so that a
    docs page can keep its history. Outside a git checkout: 'code outside git'."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    try:
        commit, changed = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "code outside git"
    return f"code at `{commit}`" + (" with uncommitted changes" if changed else "")


def seed_everything(seed):
    """Seed Python and PyTorch (all devices) so that a run can be repeated."""
    random.seed(seed)
    torch.manual_seed(seed)


def prepare_model(model, device):
    """On a CPU, keep conv weights (and so every feature map) channels-last: the same numbers, in the memory
    order the CPU's convolution kernels read fastest (docs/cpu.md has the measurements)."""
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model


def fused_adamw(device):
    """Whether AdamW runs fused here: one kernel updates every tensor, instead of a loop of small ones."""
    return device.type in ("cuda", "cpu")


def check_writable(path):
    """Fail early, with one line, if `path` cannot be written (before minutes of work are done). Files are
    written to a temporary file in their folder and renamed (files.py), so the folder must take a new file."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        if os.path.isdir(path):
            raise IsADirectoryError(21, "it is a folder")
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror or e}")


def _number(text, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")


def positive_float(text):
    """argparse type: a finite number > 0 (a learning rate, say)."""
    value = _number(text, float)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def nonnegative_float(text):
    """argparse type: a finite number >= 0 (a LoRA scale, Min-SNR's gamma)."""
    value = _number(text, float)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def channel_list(text):
    """argparse type: '16,32,64' -> (16, 32, 64): three multiples of 8 (GroupNorm uses 8 groups)."""
    try:
        channels = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")
    if len(channels) != 3 or min(channels) < 8 or any(c % 8 for c in channels):
        raise argparse.ArgumentTypeError(f"expected three multiples of 8 (GroupNorm uses 8 groups), got {text}")
    return channels


def level_list(text):
    """argparse type: '1,2' -> (1, 2): UNet levels (0 = 28x28, 1 = 14x14, 2 = 7x7); 'none' -> () (the middle only)."""
    if text.strip().lower() == "none":
        return ()
    try:
        levels = tuple(sorted({int(c) for c in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected levels 0, 1, 2 separated by commas, or none; got {text!r}")
    if any(level not in (0, 1, 2) for level in levels):
        raise argparse.ArgumentTypeError(f"levels are 0 (28x28), 1 (14x14) and 2 (7x7); got {text}")
    return levels


def at_most(limit, what, kind=None):
    """An argparse type: a number of `kind` (nonnegative_float unless given) up to `limit`; `what` says what
    the number does."""
    def parse(text):
        value = (kind or nonnegative_float)(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"expected at most {limit:g} ({what}), got {text}")
        return value
    return parse


def fraction(text):
    """argparse type: a number in [0, 1] (a probability, a decay, DDIM's eta)."""
    value = _number(text, float)
    if not 0 <= value <= 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text}")
    return value


def below_one(text):
    """argparse type: a number in [0, 1) (dropout: 1 would drop everything)."""
    value = fraction(text)
    if value == 1:
        raise argparse.ArgumentTypeError("expected a number below 1, got 1")
    return value


def seed_int(text):
    """argparse type: a seed, an integer from 0 to 2^31 - 1."""
    value = _number(text, int)
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {2**31 - 1}, got {value}")
    return value


def positive_int(text):
    """argparse type: an integer >= 1 (so `--epochs 0` is a clear usage error)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_digits(text):
    """'0-9', '3', '1,4,7' or '0-4,9' -> [digits]; anything outside 0-9 is a ValueError."""
    digits = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            lo, hi = int(lo), int(hi if dash else lo)
        except ValueError:
            raise ValueError(f"--digits: expected digits like 0-9 or 1,4,7, got {text!r}")
        if hi < lo:
            raise ValueError(f"--digits: a range goes from low to high, like 1-3; got {part.strip()!r}")
        digits += range(lo, hi + 1)
    if any(not 0 <= d <= 9 for d in digits):
        raise ValueError(f"--digits: MNIST digits are 0-9, got {text!r}")
    return digits


PRESET_HELP = "sizes for the machine: auto (gpu with CUDA, else cpu), cpu or gpu"


def add_training_flags(p, what):
    """The flags train.py and lora_finetune.py share. Their defaults (None) come from the preset, so a flag
    given on the command line is exactly what overrides it."""
    p.add_argument("--data-dir", default="data", help="folder holding MNIST/raw/ (torchvision's layout)")
    p.add_argument("--device", help="cuda, mps or cpu (default: cuda if available, else mps, else cpu)")
    p.add_argument("--epochs", type=positive_int, help="passes over the training images (default: the preset's)")
    p.add_argument("--total-steps", type=positive_int,
                   help="optimizer steps of the whole run, overriding --epochs (default: the preset's)")
    p.add_argument("--max-steps", type=positive_int,
                   help="stop at this step, as if interrupted (the schedule still plans for the whole run); "
                        "--resume with a larger value goes on")
    p.add_argument("--batch-size", type=positive_int, help="images per optimizer step (default: the preset's)")
    p.add_argument("--lr", type=positive_float, help=f"peak learning rate of {what} (AdamW; warm-up, then cosine)")
    p.add_argument("--warmup", type=positive_int, help="learning-rate warm-up steps (default: the preset's)")
    p.add_argument("--ema-decay", type=fraction,
                   help="cap on the decay of the weights' moving average; below it the decay is (1+k)/(10+k) at "
                        "step k (model/ema.py)")
    p.add_argument("--p-uncond", type=fraction,
                   help="probability of training on the null label (for classifier-free guidance)")
    p.add_argument("--min-snr-gamma", type=nonnegative_float,
                   help="Min-SNR-gamma loss weight min(SNR_t, gamma)/SNR_t; 0 = the plain DDPM loss")
    p.add_argument("--seed", type=seed_int, help=f"seed for {what}'s init, the data order and the noise")
    p.add_argument("--resume", action="store_true", help="continue the run saved at --out")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out and start over")
    p.add_argument("--figures", default=OUTPUTS, help=f"folder for the figures (default {OUTPUTS}/; "
                                                       "--figures figure refreshes the README's)")


def check_new_output(resume, force, *paths):
    """A run never replaces work the user has without being asked: --resume continues it, --force overwrites.
    `paths` are the files the run writes (an adapter and its resume file); the first is the one to resume."""
    if resume and force:
        raise ValueError("--resume continues the run at --out and --force starts it over: give one of them")
    if resume and not os.path.exists(paths[0]):
        raise FileNotFoundError(f"--resume: nothing at {paths[0]} to continue from")
    for path in paths:
        if os.path.exists(path) and not (resume or force):
            raise ValueError(f"{path} already exists: add --resume to continue it, or --force to overwrite it")
        check_writable(path)
