"""Files: model checkpoints, adapter files and resume files; how they are written safely and read back.

Every file is a plain dict of tensors, numbers and strings -- nothing pickled that could run code, so it
loads with `torch.load(weights_only=True)` -- with a `kind` that says what it is and a `checksum` of
everything else in it, checked on load, so a damaged file is refused instead of sampling quietly wrong.

A model checkpoint (kind "mnist-diffusion"):

    backbone    which network: 'unet' (model/unet.py) or 'dit' (model/dit.py); files before it held a UNet
    config      the network's constructor arguments (enough to rebuild it without guessing)
    diffusion   the schedule (T, beta_start, beta_end, prediction)
    model, ema  state_dicts of the live and the averaged weights
    optimizer   the optimizer's state_dict, so --resume continues exactly
    preset      the preset the run started from ('cpu' or 'gpu'); lora_finetune.py and denoise.py follow it
    train       the run's TrainConfig as a dict: what --resume compares the flags with
    rng         the random-number state at the save, so a resumed run draws what the uninterrupted one would
    step, losses, seconds

A 4-bit checkpoint (`quantized_file`, quantize.py) is a model checkpoint with the averaged weights only, its
4-bit layers as packed codes and constants, and a `quantized` entry: the block size, double quantisation,
the layers kept, and the fingerprint of the full-precision model it came from.

An adapter file ("lora-adapter") holds the averaged adapter tensors, its config and the fingerprint of the
base it was trained on; what --resume needs of an adapter run goes to a file of its own beside it
(`resume_path`), written together with the adapter so that the two never disagree.

Files are written atomically: to a temporary file in the same folder, then renamed over the target, so a
crash or Ctrl-C during a save never leaves a half-written file behind. A save killed outright (SIGKILL,
power loss) leaves its temporary file; the next save in that folder deletes it.
"""
import hashlib
import json
import os
import re
import tempfile

import numpy as np
import torch
from torchvision.io import ImageReadMode, read_image
from torchvision.transforms.v2.functional import resize

from model.adalora import AdaLoraMixin
from model.adapters import inject_lora
from model.controlnet import ControlNet
from model.diffusion import Diffusion
from model.dit import DiT
from model.quant import quantize_model
from model.unet import UNet

from .config import starting_rank

BACKBONES = {"unet": UNet, "dit": DiT}

MODEL_KIND, ADAPTER_KIND, RESUME_KIND = "mnist-diffusion", "lora-adapter", "lora-resume"
CONTROLNET_KIND, CONTROLNET_RESUME_KIND = "controlnet", "controlnet-resume"
WRITTEN_BY = {MODEL_KIND: "train.py", ADAPTER_KIND: "lora_finetune.py", RESUME_KIND: "lora_finetune.py",
              CONTROLNET_KIND: "controlnet_train.py", CONTROLNET_RESUME_KIND: "controlnet_train.py"}


# ---- writing and reading any file ----------------------------------------------------------------

def checksum(obj):
    """sha256 of a file's contents (every key, number, string and tensor byte), its `checksum` key aside."""
    h = hashlib.sha256()

    def walk(x, path):
        if isinstance(x, dict):
            for k in sorted(x, key=str):
                if not (path == "" and k == "checksum"):
                    walk(x[k], f"{path}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}/{i}")
        elif isinstance(x, torch.Tensor):
            h.update(f"{path}:{x.dtype}:{tuple(x.shape)}".encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{path}={x!r}".encode())
    walk(obj, "")
    return h.hexdigest()[:32]


def write_files(*pairs):
    """torch.save each (obj, path) atomically, all or none: every file goes to a temporary file first, and
    only when all are written are they renamed over their targets. A failed write (a full disk) is one
    OSError that names the file and leaves every previous file as it was."""
    temporaries = []
    try:
        for obj, path in pairs:
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            remove_stale_temporaries(folder)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{os.getpid()}-", suffix=".pt")
            temporaries.append(tmp)
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save(dict(obj, checksum=checksum(obj)), f)
            except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
                kept = "; every previous file is unchanged" if any(os.path.exists(p) for _, p in pairs) else ""
                raise OSError(f"cannot write {path}: {str(e).splitlines()[0]} (is the disk full?){kept}") from None
            os.chmod(tmp, 0o644)  # mkstemp creates the file private (0600); a checkpoint is ordinary data
        for tmp, (_, path) in zip(temporaries, pairs):
            os.replace(tmp, path)
        temporaries = []
    finally:
        for tmp in temporaries:
            if os.path.exists(tmp):
                os.unlink(tmp)


def save_file(obj, path):
    write_files((obj, path))


def save_npz(path, **arrays):
    """numpy's savez_compressed, atomically: a failed write names the file and keeps the previous one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{os.getpid()}-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e} (is the disk full?); the previous file there, if any, "
                      "is unchanged") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder):
    """Delete the temporary files of saves that were killed before their rename: `.tmp-PID-*.pt` whose
    process PID is gone. Another process's save in progress is left alone. (POSIX only: on Windows,
    os.kill cannot ask whether a process exists.)"""
    if os.name != "posix":
        return
    for name in os.listdir(folder):
        match = re.fullmatch(r"\.tmp-(\d+)-\w+\.(pt|npz)", name)
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
    """torch.load with weights_only=True, checking that the file is a `kind` file and that its checksum
    holds (files written before checksums have none to check); one-line errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} ({WRITTEN_BY.get(kind, 'this project')} writes one)")
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path}: not a valid checkpoint ({type(e).__name__})")
    if not isinstance(obj, dict) or obj.get("kind") != kind:
        found = obj.get("kind") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} is not a {kind} file (found {found!r})")
    if "checksum" in obj and obj["checksum"] != checksum(obj):
        raise ValueError(f"{path} is damaged: its contents do not match the checksum written with them")
    return obj


def fingerprint(model):
    """A short hash of a model's weights: names, shapes and exact values. Ties an adapter to its base."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---- model checkpoints ---------------------------------------------------------------------------

def model_file(model, ema, diffusion, optimizer, preset, train, state):
    """A model checkpoint's contents; `state` is training_state() (runs.py): step, losses, seconds, rng."""
    backbone = next(name for name, cls in BACKBONES.items() if isinstance(model, cls))
    return dict(kind=MODEL_KIND, backbone=backbone, config=model.config, diffusion=diffusion.config(), model=model.state_dict(),
                ema=ema.model.state_dict(), optimizer=optimizer.state_dict(), preset=preset, train=train, **state)


def check_finite(tensors, path):
    """Refuse weights holding NaN or infinity: they sample black images without a word."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{path} holds non-finite numbers in {name}; the checkpoint is broken, retrain it")


def load_model(path, device="cpu", weights="ema"):
    """Rebuild the network and its Diffusion from a checkpoint. Returns (model, diffusion, checkpoint dict).

    weights="ema" loads the averaged weights used for sampling; "model" the live training weights. A 4-bit
    checkpoint (`quantized_file`) comes back with its 4-bit layers in place (model/quant.py).
    """
    ckpt = load_file(path, MODEL_KIND, device)
    if weights not in ckpt and "config" in ckpt:
        kept = "a 4-bit" if "quantized" in ckpt else "an exported"
        raise ValueError(f"{path} holds no {weights!r} weights: {kept} checkpoint keeps only the averaged ones "
                         "(sample with them, or --resume the full checkpoint train.py wrote)")
    try:
        backbone = ckpt.get("backbone", "unet")
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}")
        model = BACKBONES[backbone](**ckpt["config"]).to(device)
        if "quantized" in ckpt:  # the layers' shapes first, then the stored codes and constants load into them
            q = ckpt["quantized"]
            quantize_model(model, int(q["block"]), bool(q["double_quant"]), tuple(q["keep"]))
        check_finite(ckpt[weights], path)
        missing, unexpected = model.load_state_dict(ckpt[weights], strict=False)
        if missing or unexpected:
            raise ValueError(f"missing {missing[:2]}, unexpected {unexpected[:2]}")
        diffusion = Diffusion(**ckpt["diffusion"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        message = " ".join(str(e).split())  # a shape mismatch spans lines: keep all of it, on one
        raise ValueError(f"{path} does not match this version of the model: {type(e).__name__}: {message}")
    return model, diffusion, ckpt


def export_model(path, out, dtype=torch.float16):
    """A checkpoint cut down to what sampling and fine-tuning need: the averaged weights in `dtype`, the
    config, the schedule and the preset -- no live weights, no optimizer. fp16 halves the file; adapters
    trained on the exported file fit it exactly (its fingerprint is that of the fp16 weights)."""
    ckpt = load_file(path, MODEL_KIND)
    slim = {k: ckpt[k] for k in ("kind", "backbone", "config", "diffusion", "preset", "train", "step") if k in ckpt}
    slim["ema"] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    save_file(slim, out)


def export_adapter(path, out, dtype=torch.float16):
    """An adapter file with its tensors in `dtype`: a full fine-tune's dW in half the bytes."""
    adapter = {k: v for k, v in load_file(path, ADAPTER_KIND).items() if k != "checksum"}
    adapter["tensors"] = {k: v.to(dtype) for k, v in adapter["tensors"].items()}
    save_file(adapter, out)


def quantized_file(path, block, double_quant, keep, device="cpu", dtype=torch.float16):
    """A 4-bit checkpoint of the model at `path` (its averaged weights): the layers of quantize_model in NF4
    (codes and fp32 constants), the rest in `dtype` as export_model writes it. It records how it was quantised
    and the fingerprint of its full-precision source, so that an adapter trained on the source loads onto it
    too. Returns (file dict, {path: 4-bit layer})."""
    model, diffusion, ckpt = load_model(path, device)
    source = fingerprint(model)
    model, layers = quantize_model(model, block, double_quant, keep)
    spec = dict(format="nf4", block=block, double_quant=double_quant, keep=list(keep), source_fingerprint=source)
    slim = {k: ckpt[k] for k in ("kind", "backbone", "config", "diffusion", "preset", "train", "step") if k in ckpt}
    ema = {k: v.to(dtype) if v.is_floating_point() and ".weight_4bit." not in k else v
           for k, v in model.state_dict().items()}
    return dict(slim, ema=ema, quantized=spec), layers


def base_fingerprints(model, checkpoint):
    """The fingerprints an adapter or a ControlNet may have been trained on to fit `model`: its own, and for a
    4-bit model that of the full-precision model it was quantised from."""
    return (fingerprint(model), *([checkpoint["quantized"]["source_fingerprint"]] if "quantized" in checkpoint else []))


# ---- adapters ------------------------------------------------------------------------------------

def resume_path(out):
    """Where the state to --resume an adapter run goes: beside the adapter, named after all of it
    (lora.pt -> lora.pt.resume), so two adapters never share one."""
    return out + ".resume"


def adapter_tensors(layers):
    """{'down.2.attn.w_q.lora_A': [rank, in], '...lora_B': [out, rank], ...} (and DoRA's '...magnitude':
    [out]): the adapter alone, keyed by layer path."""
    return {f"{path}.{name}": p.detach().clone()
            for path, layer in layers.items() for name, p in layer.named_parameters(recurse=False)}


def adapter_file(layers, config, base_fingerprint, step, dtype=torch.float32):
    """An adapter file's contents: its tensors, its config (rank, alpha, targets, style, ...) and the base's
    fingerprint. Only what a user shares; the optimizer state for --resume lives in a file of its own."""
    tensors = {k: v.to(dtype) for k, v in adapter_tensors(layers).items()}
    return dict(kind=ADAPTER_KIND, config=config, base_fingerprint=base_fingerprint, step=step, tensors=tensors)


def save_lora(path, layers, config, base_fingerprint, step, dtype=torch.float32):
    save_file(adapter_file(layers, config, base_fingerprint, step, dtype), path)


def load_lora(model, path, device="cpu", base_fingerprint=None):
    """Inject adapters into a model using the file's own config, then load the adapter tensors.

    The model must be the base the adapter was trained on: its fingerprint (of the weights without any
    adapter; pass `base_fingerprint` when stacking a second adapter, or several that may match) must match
    the file's. Refuses, with a
    one-line error, a file from another base, or one whose tensors do not fit the layers it describes.
    Returns (adapter file dict, {path: adapter layer}).
    """
    adapter = load_file(path, ADAPTER_KIND, device)
    try:
        config, tensors, base_fp = adapter["config"], adapter["tensors"], adapter["base_fingerprint"]
        rank = starting_rank(config)
        alpha, targets = float(config["alpha"]), tuple(config["targets"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is a damaged adapter file (missing {e})")
    accepted = base_fingerprint or fingerprint(model)
    accepted = (accepted,) if isinstance(accepted, str) else tuple(accepted)
    if base_fp not in accepted:
        raise ValueError(f"{path} was trained on a different base model (fingerprint {base_fp}, this "
                         f"checkpoint is {accepted[0]}): give --ckpt the model it was trained on")
    layers = inject_lora(model, targets, rank, alpha, float(config.get("dropout", 0.0)),
                         config.get("variant", "lora"), bool(config.get("rslora", False)))
    expected = {k: v.shape for k, v in adapter_tensors(layers).items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:2]}, unexpected {unexpected[:2]}")
    for name, t in tensors.items():
        if t.shape != expected[name]:
            raise ValueError(f"{path} does not fit this model: {name} has shape {tuple(t.shape)}, "
                             f"expected {tuple(expected[name])} (rank {rank})")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path} holds non-finite numbers in {name}; the adapter is broken")
    with torch.no_grad():
        for path_, layer in layers.items():
            for name, p in layer.named_parameters(recurse=False):
                p.copy_(tensors[f"{path_}.{name}"])
            if isinstance(layer, AdaLoraMixin):
                layer.keep(layer.lora_E != 0)  # the triplets AdaLoRA kept: the others' lambda was saved as 0
    return adapter, layers


# ---- ControlNets ---------------------------------------------------------------------------------

def controlnet_file(controlnet, config, base_fingerprint, step):
    """A ControlNet file's contents: its control kind, its config, the base's fingerprint and its own weights
    (the copy of the encoder, the hint, the zero convs) -- nothing of the locked base."""
    return dict(kind=CONTROLNET_KIND, control=controlnet.kind, config=config, base_fingerprint=base_fingerprint,
                step=step, state=controlnet.state_dict())


def load_controlnet(path, unet, device="cpu", base_fingerprint=None):
    """The ControlNet saved at `path`, for the locked `unet` it was trained on (refused for another base)."""
    saved = load_file(path, CONTROLNET_KIND, device)
    this_fp = base_fingerprint or fingerprint(unet)
    if saved.get("base_fingerprint") != this_fp:
        raise ValueError(f"{path} was trained on a different base model (fingerprint {saved.get('base_fingerprint')}, "
                         f"this checkpoint is {this_fp}): give --ckpt the model it was trained on")
    try:
        controlnet = ControlNet(unet, saved["control"], bool(saved["config"].get("train_copy", True))).to(device)
        missing, unexpected = controlnet.load_state_dict(saved["state"], strict=False)
        if missing or unexpected:
            raise ValueError(f"missing {missing[:2]}, unexpected {unexpected[:2]}")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} does not fit this model: {' '.join(str(e).split())}")
    check_finite(saved["state"], path)
    return controlnet.eval().requires_grad_(False), saved


def read_drawing(path, device="cpu"):
    """A digit drawn in any paint program, as MNIST draws one: [1, 1, 28, 28] in [-1, 1], white ink on black.
    Read with torchvision (PNG, JPEG), made grey, resized to 28 x 28; dark ink on light paper is inverted."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"drawing not found: {path}")
    try:
        pixels = read_image(path, ImageReadMode.GRAY).float() / 255  # [1, H, W] in [0, 1]
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"cannot read {path} as an image (PNG or JPEG): {' '.join(str(e).split())[:80]}")
    image = resize(pixels[None], [28, 28], antialias=True)  # [1, 1, 28, 28]
    if image.mean() > 0.5:  # mostly light: dark ink on paper, the other way round from MNIST
        image = 1 - image
    return (image * 2 - 1).to(device)


# ---- peft's layout -------------------------------------------------------------------------------

def peft_state_dict(tensors):
    """Adapter tensors keyed by our layer paths -> the names peft saves them under ('base_model.model.' +
    path + '.lora_A.weight', '.lora_B.weight', '.lora_magnitude_vector'; a conv's magnitude [1, out, 1, 1])."""
    state = {}
    for key, t in tensors.items():
        path, name = key.rsplit(".", 1)
        prefix = f"base_model.model.{path}"
        if name == "magnitude":
            is_conv = tensors[f"{path}.lora_A"].dim() == 4
            state[f"{prefix}.lora_magnitude_vector"] = t.view(1, -1, 1, 1) if is_conv else t
        else:
            state[f"{prefix}.{name}.weight"] = t
    return state


def export_peft(adapter_path, out_dir):
    """Write an adapter file in peft's directory layout (adapter_config.json, adapter_model.bin), which
    `peft.PeftModel.from_pretrained(unet, out_dir)` loads onto a UNet of the base the adapter was trained on."""
    adapter = load_file(adapter_path, ADAPTER_KIND)
    config, tensors = adapter["config"], adapter["tensors"]
    if config.get("variant", "lora") not in ("lora", "dora"):
        raise ValueError(f"{adapter_path} is a {config['variant']} adapter; peft's LoRA layout holds LoRA and DoRA only")
    paths = sorted({key.rsplit(".", 1)[0] for key in tensors})
    peft_config = dict(peft_type="LORA", r=int(config.get("rank", config.get("r"))), lora_alpha=float(config["alpha"]),
                       target_modules=paths, use_rslora=bool(config.get("rslora", False)),
                       use_dora=config.get("variant", "lora") == "dora", lora_dropout=float(config.get("dropout", 0.0)),
                       bias="none", fan_in_fan_out=False, init_lora_weights=True, inference_mode=True,
                       base_model_name_or_path=None, task_type=None)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(peft_config, f, indent=1)
    torch.save(peft_state_dict(tensors), os.path.join(out_dir, "adapter_model.bin"))
