"""Putting adapters into a model: which layers, switching them off and on, stacking, merging.

`inject_lora` walks the model and wraps every layer whose attribute name is a target in an adapter of
one variant -- LoRA (lora.py), DoRA (dora.py), AdaLoRA (adalora.py) or a full update, full fine-tuning
written as an adapter (lowrank.py) -- then freezes everything but the adapters. The target groups:

    attn   the attention projections w_q, w_k, w_v: the label's way in (attention.py; in a DiT, dit.py,
           its self-attention over patches as well)
    conv   the two 3 x 3 convolutions of every ResBlock, which draw the strokes (unet.py)
    mlp    the two Linears of every transformer block's MLP (dit.py)

and any other layer name (`stem`, `w_o`, ...) stands for itself. Adapters stack as Stable Diffusion LoRAs
do: a second adapter wraps the first, and the layer computes W0 x + b + s1 dW1 x + s2 dW2 x, two styles at
once, each with its own blend scale.

LoRA+ (Hayou et al. 2024) is a choice of optimizer groups, not of layers (`param_groups`): B starts at zero
and carries the update's size, A only its directions; with equal learning rates B learns too slowly in
wide layers, so B gets lr_ratio times A's rate.
"""
import torch.nn as nn

from .adalora import AdaLoraConv2d, AdaLoraLayer
from .dora import DoraConv2d, DoraLayer, DoraMixin
from .lora import Adapter, LoraConv2d, LoraLayer, bottom
from .lowrank import FullUpdate

TARGET_GROUPS = {"attn": ("w_q", "w_k", "w_v"), "conv": ("conv1", "conv2"), "mlp": ("fc1", "fc2")}
VARIANTS = {"lora": {nn.Linear: LoraLayer, nn.Conv2d: LoraConv2d},
            "dora": {nn.Linear: DoraLayer, nn.Conv2d: DoraConv2d},
            "adalora": {nn.Linear: AdaLoraLayer, nn.Conv2d: AdaLoraConv2d},
            "full": {nn.Linear: FullUpdate, nn.Conv2d: FullUpdate}}


def target_names(targets):
    """('attn', 'conv') -> the layer names they stand for; a name that is no group stands for itself."""
    return {name for t in targets for name in TARGET_GROUPS.get(t, (t,))}


def inject_lora(model, targets=("attn",), rank=4, alpha=4.0, dropout=0.0, variant="lora", rslora=False):
    """Wrap every nn.Linear / nn.Conv2d whose attribute name is in `targets` (groups or names) in an adapter
    layer of `variant` (lora, dora, adalora or full); freeze everything else. Returns {path of the layer: adapter layer},
    in module order. A target that names no layer of the model is refused."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown adapter variant {variant!r}: choose {', '.join(VARIANTS)}")
    model.requires_grad_(False)
    found, layers = set(), {}
    for path, module in list(model.named_modules()):
        if isinstance(module, Adapter):
            continue  # its children are the layer it wraps; the wrapper itself is what gets stacked on
        for name, child in list(module.named_children()):
            base = bottom(child)  # a 4-bit layer (quant.py) `stores` a Linear or a Conv2d, and is adapted as one
            kind = VARIANTS[variant].get(getattr(base, "stores", type(base)))
            if name not in target_names(targets) or kind is None:
                continue
            if isinstance(child, DoraMixin):
                raise ValueError(f"{path}.{name} holds a DoRA adapter, which cannot be stacked with another")
            full = f"{path}.{name}" if path else name
            try:
                layer = kind(child, rank, alpha, dropout, rslora)
            except ValueError as e:
                raise ValueError(f"{full}: {e}")
            setattr(module, name, layer)
            layers[full] = layer
            found.add(name)
    unknown = [t for t in targets if not set(TARGET_GROUPS.get(t, (t,))) & found]
    if unknown or not layers:
        raise ValueError(f"no layer to adapt for target(s) {', '.join(unknown or targets)}: use the groups "
                         f"{', '.join(TARGET_GROUPS)} or layer names such as stem or w_o")
    return layers


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, Adapter)]


def set_lora(model, enabled=True, scale=1.0):
    """Turn every adapter in `model` on or off, or blend it (scale 0 = base, 1 = full)."""
    for layer in lora_layers(model):
        layer.enabled, layer.scale = enabled, scale


def merge_lora(model):
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model):
    for layer in reversed(lora_layers(model)):  # the last stacked comes out first
        layer.unmerge()


def param_groups(layers, lr, lr_ratio=1.0):
    """The optimizer's parameter groups: B at lr_ratio x lr (LoRA+), the rest (A, DoRA's magnitude, AdaLoRA's
    lambda, a full update) at `lr`.
    `lr_scale` is the group's share of the schedule's learning rate (training.py)."""
    named = [(name, p) for layer in layers.values() for name, p in layer.named_parameters(recurse=False)]
    b, rest = [p for name, p in named if name == "lora_B"], [p for name, p in named if name != "lora_B"]
    groups = [dict(params=rest, lr=lr, lr_scale=1.0), dict(params=b, lr=lr * lr_ratio, lr_scale=lr_ratio)]
    return [g for g in groups if g["params"]]  # a full update has no B
