"""LoRA: low-rank adaptation of a frozen linear layer (Hu et al. 2021, "LoRA", eq. 3).

A pretrained layer computes h = W0 x + b. Fine-tuning would learn a full update dW (out x in numbers).
LoRA bets that the update has low rank and learns it as a product of two thin matrices:

    h = W0 x + b + (alpha / r) * B A dropout(x),     A: r x in,  B: out x r,  r << min(in, out)

Only A and B are trained; W0 and b stay frozen. Initialisation:
  * B = 0, so BA = 0 and the adapted model starts *bit-identical* to the base model.
  * A ~ Kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)) -- the init of nn.Linear itself and
    of microsoft/LoRA. Each entry of A x then has variance |x|^2 / (3 in), independent of the layer width,
    so the signal that B's gradient sees has the same scale in every adapted layer. (A Gaussian with
    sigma = 1/sqrt(r), the other common choice, makes A x grow with the input width.) A must be random and
    B zero, not both zero: with both zero neither ever gets a gradient.
  * alpha / r scales the update so that changing the rank r does not change the effective step size.

After training, (alpha/r) B A can be folded into W0 (`merge`): inference then costs exactly as much as
the base model. `unmerge` takes it out again.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import fingerprint, load_file, save_file
from .cli import UserError

ADAPTER_KIND = "lora-adapter"


class LoraLayer(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (alpha/r) B A."""

    def __init__(self, base: nn.Linear, r=4, alpha=4.0, dropout=0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base = base.requires_grad_(False)  # W0 and b: frozen
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False: behave exactly like the base layer
        self.scale = 1.0     # blends the update: 0 = base model, 1 = full adapter
        self.merged_scale = None  # the scale folded into W0 while merged, else None

    def delta_weight(self, scale=None):
        """dW = scale * (alpha / r) * B A, shape [out, in]."""
        scale = self.scale if scale is None else scale
        return (self.lora_B @ self.lora_A) * (self.scaling * scale)

    def forward(self, x):
        h = self.base(x)  # W0 x + b (W0 already holds dW when merged)
        if self.enabled and self.merged_scale is None and self.scale != 0:
            # Two thin products, x -> A x (r numbers) -> B A x: never forms the out x in matrix.
            h = h + (self.scaling * self.scale) * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return h

    @torch.no_grad()
    def merge(self):
        """W0 <- W0 + dW: zero-overhead inference. A disabled adapter merges nothing."""
        if self.merged_scale is None and self.enabled:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged_scale = self.scale

    @torch.no_grad()
    def unmerge(self):
        """W0 <- W0 - dW, with the dW that was merged."""
        if self.merged_scale is not None:
            self.base.weight -= self.delta_weight(self.merged_scale).to(self.base.weight.dtype)
            self.merged_scale = None

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}"


def inject_lora(model, targets=("w_q", "w_k", "w_v"), r=4, alpha=4.0, dropout=0.0):
    """Swap every nn.Linear whose attribute name is in `targets` for a LoraLayer; freeze everything else.

    Returns the injected LoraLayers, in module order.
    """
    model.requires_grad_(False)
    layers = []
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                layer = LoraLayer(child, r, alpha, dropout)
                setattr(module, name, layer)
                layers.append(layer)
    if not layers:
        raise UserError(f"no nn.Linear named {'/'.join(targets)} found to adapt")
    return layers


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def set_lora(model, enabled=True, scale=1.0):
    """Turn every adapter in `model` on or off, or blend it (scale 0 = base, 1 = full)."""
    for layer in lora_layers(model):
        layer.enabled, layer.scale = enabled, scale


def merge_lora(model):
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model):
    for layer in lora_layers(model):
        layer.unmerge()


def parameter_report(model):
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def lora_state_dict(model):
    """Only the adapter tensors: {'...w_q.lora_A': [r, in], '...w_q.lora_B': [out, r], ...}."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B"))}


def save_lora(path, model, config, base_fingerprint, step, optimizer=None, extra=None):
    """Write an adapter-only file: the tensors, their config (r, alpha, targets) and the base's fingerprint."""
    obj = dict(kind=ADAPTER_KIND, config=config, base_fingerprint=base_fingerprint, step=step,
               tensors=lora_state_dict(model), **(extra or {}))
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
    save_file(obj, path)


def load_lora(model, path, device="cpu"):
    """Inject LoRA into a *base* model using the file's own config, then load the adapter tensors.

    Refuses, with a one-line UserError, a file from a different base model (fingerprint), or one whose
    tensor names or shapes do not match the layers it describes. Returns the adapter file's dict.
    """
    adapter = load_file(path, ADAPTER_KIND, device)
    try:
        config, tensors, base_fp = adapter["config"], adapter["tensors"], adapter["base_fingerprint"]
        r, alpha, targets = int(config["r"]), float(config["alpha"]), tuple(config["targets"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is a damaged adapter file (missing {e})")
    if base_fp != fingerprint(model):
        raise UserError(f"{path} was trained on a different base model (fingerprint {base_fp}, "
                        f"this checkpoint is {fingerprint(model)})")
    inject_lora(model, targets, r, alpha, float(config.get("dropout", 0.0)))
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(f"{path} does not fit this model: missing {missing[:2]}, unexpected {unexpected[:2]}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise UserError(f"{path} does not fit this model: {name} has shape {tuple(t.shape)}, "
                            f"expected {tuple(expected[name].shape)} (rank {r})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return adapter
