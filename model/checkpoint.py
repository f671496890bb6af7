"""Checkpoints: what is saved, how it is written safely, and how it is read back on any device.

A model checkpoint is a plain dict of tensors, numbers and strings -- nothing pickled that could run code,
so it loads with `torch.load(weights_only=True)`:

    kind        "mnist-diffusion"
    config      the UNet's constructor arguments (enough to rebuild it without guessing)
    diffusion   the schedule (T, beta_start, beta_end)
    model, ema  state_dicts of the live and the averaged weights
    optimizer   the optimizer's state_dict, so --resume continues exactly
    preset      the preset the run started from ('cpu' or 'gpu'); lora_finetune.py and denoise.py follow it
    train       the run's TrainConfig as a dict: what --resume compares the flags with
    rng         the random-number state at the save, so a resumed run draws what the uninterrupted one would
    step, losses, seconds

Files are written atomically: to a temporary file in the same folder, then renamed over the target, so a
crash or Ctrl-C during a save never leaves a half-written checkpoint behind. A save killed outright
(SIGKILL, power loss) leaves its temporary file; the next save in that folder deletes it. `map_location` lets a
checkpoint written on a GPU load on a CPU-only machine.
"""
import hashlib
import os
import re
import tempfile

import torch

from .diffusion import Diffusion
from .unet import UNet

MODEL_KIND = "mnist-diffusion"


def save_file(obj, path):
    """torch.save to `path` atomically (temp file + rename). A failed write (a full disk) is one OSError and
    leaves the previous file at `path` as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{os.getpid()}-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o644)  # mkstemp creates the file private (0600); a checkpoint is ordinary data
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a failed write as a RuntimeError
            kept = "; the previous file there is unchanged" if os.path.exists(path) else ""
            raise OSError(f"cannot write {path}: {str(e).splitlines()[0]} (is the disk full?){kept}") from None
        raise


def remove_stale_temporaries(folder):
    """Delete the temporary files of saves that were killed before their rename: `.tmp-PID-*.pt` whose
    process PID is gone. Another process's save in progress is left alone. (POSIX only: on Windows,
    os.kill cannot ask whether a process exists.)"""
    if os.name != "posix":
        return
    for name in os.listdir(folder):
        match = re.fullmatch(r"\.tmp-(\d+)-\w+\.pt", name)
        if match and not process_exists(int(match.group(1))):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass  # gone already, or not ours to delete: either way not worth failing a save for


def process_exists(pid):
    try:
        os.kill(pid, 0)  # signal 0: delivers nothing, only checks
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user's process
    return True


def load_file(path, kind, device="cpu"):
    """torch.load with weights_only=True, checking that the file is a `kind` file; one-line errors."""
    if not os.path.isfile(path):
        hint = {MODEL_KIND: " (train.py writes one)", "lora-adapter": " (lora_finetune.py writes one)"}
        raise FileNotFoundError(f"checkpoint not found: {path}{hint.get(kind, '')}")
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path}: not a valid checkpoint ({type(e).__name__})")
    if not isinstance(obj, dict) or obj.get("kind") != kind:
        found = obj.get("kind") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} is not a {kind} file (found {found!r})")
    return obj


def fingerprint(model):
    """A short hash of a model's weights: names, shapes and exact values. Ties an adapter to its base."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_model(path, model, ema, diffusion, optimizer, step, losses, seconds, preset, train, rng):
    save_file(dict(kind=MODEL_KIND, config=model.config, diffusion=diffusion.config(),
                   model=model.state_dict(), ema=ema.model.state_dict(), optimizer=optimizer.state_dict(),
                   step=step, losses=list(losses), seconds=seconds, preset=preset, train=train, rng=rng), path)


def check_finite(tensors, path):
    """Refuse weights holding NaN or infinity: they sample black images without a word."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{path} holds non-finite numbers in {name}; the checkpoint is broken, retrain it")


def load_model(path, device="cpu", weights="ema"):
    """Rebuild the UNet and its Diffusion from a checkpoint. Returns (model, diffusion, checkpoint dict).

    weights="ema" loads the averaged weights used for sampling; "model" the live training weights.
    """
    ckpt = load_file(path, MODEL_KIND, device)
    try:
        model = UNet(**ckpt["config"]).to(device)
        check_finite(ckpt[weights], path)
        model.load_state_dict(ckpt[weights])
        diffusion = Diffusion(**ckpt["diffusion"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path} does not match this version of the model: {str(e).splitlines()[0]}")
    return model, diffusion, ckpt


def export_model(path, out, dtype=torch.float16):
    """A checkpoint cut down to what sampling and fine-tuning need: the averaged weights in `dtype`, the
    config, the schedule and the preset -- no live weights, no optimizer. fp16 halves the file; adapters
    trained on the exported file fit it exactly (its fingerprint is that of the fp16 weights)."""
    ckpt = load_file(path, MODEL_KIND)
    slim = {k: ckpt[k] for k in ("kind", "config", "diffusion", "preset", "train", "step")}
    slim["ema"] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    save_file(slim, out)
