"""LoRA: low-rank adaptation of a frozen layer (Hu et al. 2021, "LoRA", eq. 3), for linear and conv layers.

A pretrained layer computes h = W0 x + b. Fine-tuning would learn a full update dW (out x in numbers).
LoRA bets that the update has low rank and learns it as a product of two thin matrices:

    h = W0 x + b + (alpha / r) * B A dropout(x),     A: r x in,  B: out x r,  r << min(in, out)

Only A and B are trained; W0 and b stay frozen. Initialisation:
  * B = 0, so BA = 0 and the adapted model starts *bit-identical* to the base model.
  * A ~ Kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)) -- the init of nn.Linear itself and
    of microsoft/LoRA. Each entry of A x then has variance |x|^2 / (3 in), independent of the layer width,
    so the signal that B's gradient sees has the same scale in every adapted layer. A must be random and
    B zero, not both zero: with both zero neither ever gets a gradient.
  * alpha / r scales the update so that changing the rank r does not change the effective step size.

The same idea on a k x k convolution (LoCon, note 002): A is a k x k conv from `in` to r channels and B a
1 x 1 conv from r to `out`. A 1 x 1 conv mixes channels pixel by pixel, so B after A is one k x k conv
whose kernel is dW[o, i] = sum_j B[o, j] A[j, i] -- again a rank-r update of W0, merged the same way.
So the adapted conv runs as one conv with the kernel W0 + (alpha/r) dW, as microsoft/LoRA's ConvLoRA does:
the same sum as three convs (W0, then A, then B), and cheaper, since a thin r-channel conv runs far below
the speed of a wide one.

Which layers (`targets`): `attn`, the cross-attention projections w_q, w_k, w_v through which the label
acts; `conv`, the two 3 x 3 convolutions of every ResBlock, which draw the strokes. Any layer name
(e.g. `w_o`) works too.

After training, (alpha/r) B A can be folded into W0 (`merge`): inference then costs exactly as much as
the base model. `unmerge` takes it out again. Adapters stack: a second adapter wraps the first, and the
layer computes W0 x + b + s1 dW1 x + s2 dW2 x -- two styles at once, each with its own scale.

Three variants from the notes (note 002), each a flag of lora_finetune.py:
  * rsLoRA (Kalajdzievski 2023): scale by alpha / sqrt(r) instead of alpha / r. With alpha / r the update's
    size shrinks as r grows, so a larger rank learns slower; alpha / sqrt(r) keeps it steady.
  * LoRA+ (Hayou et al. 2024): B learns faster than A (`param_groups`, lr_ratio = lr_B / lr_A, e.g. 16).
  * DoRA (Liu et al. 2024): a learned magnitude per output beside the low-rank direction (`DoraMixin`).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import fingerprint, load_file, save_file

ADAPTER_KIND = "lora-adapter"
TARGET_GROUPS = {"attn": ("w_q", "w_k", "w_v"), "conv": ("conv1", "conv2")}


class LoraBase(nn.Module):
    """A frozen layer plus a trainable low-rank update (alpha/r) B A. Subclasses say what A and B are."""

    def __init__(self, base, r, alpha, dropout, a_shape, b_shape, rslora=False):
        super().__init__()
        # dW = B A is an out x (in * k * k) matrix: past the smaller side a "low-rank" update is a larger full one
        width = min(b_shape[0], math.prod(a_shape[1:]))
        if not 1 <= r <= width:
            raise ValueError(f"LoRA rank must be between 1 and the layer's width {width}, got {r}")
        self.base = base.requires_grad_(False)  # W0 and b (or an adapter already stacked on them): frozen
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        device = self.weight.device
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False: behave exactly like the layer underneath
        self.scale = 1.0     # blends the update: 0 = base model, 1 = full adapter
        self.merged_scale = None  # the scale folded into W0 while merged, else None

    @property
    def weight(self):
        """W0: the weight of the plain layer at the bottom of the stack (where merges go)."""
        return self.base.weight

    def forward(self, x):
        h = self.base(x)  # W0 x + b (W0 already holds dW when merged)
        if self.enabled and self.merged_scale is None and self.scale != 0:
            h = h + (self.scaling * self.scale) * self.update(self.dropout(x))
        return h

    @torch.no_grad()
    def merge(self):
        """W0 <- W0 + dW: zero-overhead inference. A disabled adapter merges nothing."""
        if self.merged_scale is None and self.enabled:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged_scale = self.scale

    @torch.no_grad()
    def unmerge(self):
        """W0 <- W0 - dW, with the dW that was merged."""
        if self.merged_scale is not None:
            self.weight.sub_(self.delta_weight(self.merged_scale).to(self.weight.dtype))
            self.merged_scale = None

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}"


class LoraLayer(LoraBase):
    """LoRA on an nn.Linear: A [r, in], B [out, r]."""

    def __init__(self, base, r=4, alpha=4.0, dropout=0.0, rslora=False):
        out_features, in_features = base.weight.shape
        super().__init__(base, r, alpha, dropout, (r, in_features), (out_features, r), rslora)

    def layer_with(self, x, weight):
        """The plain layer, computed with another weight (and its own bias)."""
        return F.linear(x, weight, bottom(self).bias)

    def update(self, x):
        # Two thin products, x -> A x (r numbers) -> B A x: never forms the out x in matrix.
        return F.linear(F.linear(x, self.lora_A), self.lora_B)

    def delta_weight(self, scale=None):
        """dW = scale * (alpha / r) * B A, shape [out, in]."""
        scale = self.scale if scale is None else scale
        return (self.lora_B @ self.lora_A) * (self.scaling * scale)


class LoraConv2d(LoraBase):
    """LoCon on an nn.Conv2d: A a k x k conv [r, in, k, k] (the base's stride and padding), B a 1 x 1 conv [out, r, 1, 1]."""

    def __init__(self, base, r=4, alpha=4.0, dropout=0.0, rslora=False):
        out_channels, in_channels, kh, kw = base.weight.shape
        super().__init__(base, r, alpha, dropout, (r, in_channels, kh, kw), (out_channels, r, 1, 1), rslora)
        conv = bottom(base)
        self.stride, self.padding = conv.stride, conv.padding
        # One conv with W0 + dW needs a plain conv under it, and no dropout (which acts on the update's input alone).
        self.one_conv = dropout == 0 and not isinstance(base, LoraBase)

    def forward(self, x):
        if self.one_conv and self.enabled and self.merged_scale is None and self.scale != 0:
            return self.layer_with(x, self.weight + self.delta_weight())  # gradients reach A and B through dW
        return super().forward(x)  # W0 x + b + s B A x, in three convs

    def layer_with(self, x, weight):
        return F.conv2d(x, weight, bottom(self).bias, self.stride, self.padding)

    def update(self, x):
        return F.conv2d(F.conv2d(x, self.lora_A, stride=self.stride, padding=self.padding), self.lora_B)

    def delta_weight(self, scale=None):
        """dW[o, i] = scale * (alpha / r) * sum_j B[o, j] A[j, i], shape [out, in, k, k]."""
        scale = self.scale if scale is None else scale
        dW = self.lora_B.flatten(1) @ self.lora_A.flatten(1)  # [out, r] @ [r, in*k*k]
        return dW.view(len(dW), *self.lora_A.shape[1:]) * (self.scaling * scale)


class DoraMixin:
    """DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5): magnitude and direction.

        W' = m * (W0 + s B A) / ||W0 + s B A||,        s = alpha / r

    ||.|| is the norm of each output's weights (a row of a Linear, one filter of a conv) and m holds one
    learned number per output, so the adapter can change how *strongly* each output responds (m) apart
    from *what* it responds to (the direction, updated by LoRA's B A). m starts at ||W0||: with B = 0 the
    layer is W0 exactly. As in the paper (sec. 4.3) the norm is treated as a constant in the backward pass
    (detached), which saves memory and barely changes the gradient.

    The adapted weight is formed and used as the layer's weight (cheap at these sizes). At a scale
    lambda (denoise.py --lora-scale) both parts blend from the base: m_lambda = m0 + lambda (m - m0) and
    lambda s B A, so 0 is the base model and 1 the adapter. Because m rescales the whole weight, a DoRA
    adapter cannot be stacked with another adapter on the same layer.
    """

    def __init__(self, base, r=4, alpha=4.0, dropout=0.0, rslora=False):
        if isinstance(base, LoraBase):
            raise ValueError("a DoRA adapter rescales the whole weight, so it cannot be stacked with another adapter")
        if dropout > 0:
            raise ValueError("DoRA forms the adapted weight itself and takes no dropout")
        super().__init__(base, r, alpha, dropout, rslora)
        m0 = output_norms(self.weight)  # [out]
        self.register_buffer("m0", m0, persistent=False)
        self.magnitude = nn.Parameter(m0.clone())
        self.unmerged_weight = None  # W0, kept while merged: merging rescales it, so unmerge restores it

    def adapted_weight(self, scale):
        """W'_lambda = m_lambda * (W0 + lambda s B A) / ||W0 + lambda s B A||, the norm detached."""
        W = self.weight + self.delta_weight(scale)
        m = self.m0 + scale * (self.magnitude - self.m0)
        factor = m / output_norms(W).detach()  # [out]
        return W * factor.view(-1, *[1] * (W.dim() - 1))

    def forward(self, x):
        if not self.enabled or self.merged_scale is not None or self.scale == 0:
            return self.base(x)
        return self.layer_with(x, self.adapted_weight(self.scale))

    @torch.no_grad()
    def merge(self):
        if self.merged_scale is None and self.enabled:
            self.unmerged_weight = self.weight.clone()
            self.weight.copy_(self.adapted_weight(self.scale))
            self.merged_scale = self.scale

    @torch.no_grad()
    def unmerge(self):
        if self.merged_scale is not None:
            self.weight.copy_(self.unmerged_weight)
            self.unmerged_weight, self.merged_scale = None, None


class DoraLayer(DoraMixin, LoraLayer):
    """DoRA on an nn.Linear."""


class DoraConv2d(DoraMixin, LoraConv2d):
    """DoRA on an nn.Conv2d."""


def output_norms(weight):
    """||W||, one number per output: [out, in] or [out, in, k, k] -> [out]."""
    return weight.flatten(1).norm(dim=1)


VARIANTS = {"lora": {nn.Linear: LoraLayer, nn.Conv2d: LoraConv2d},
            "dora": {nn.Linear: DoraLayer, nn.Conv2d: DoraConv2d}}


def bottom(layer):
    """The plain nn.Linear / nn.Conv2d under any stack of adapters."""
    while isinstance(layer, LoraBase):
        layer = layer.base
    return layer


def target_names(targets):
    """('attn', 'conv') -> the layer names they stand for; a name that is no group stands for itself."""
    return {name for t in targets for name in TARGET_GROUPS.get(t, (t,))}


def inject_lora(model, targets=("attn",), r=4, alpha=4.0, dropout=0.0, variant="lora", rslora=False):
    """Wrap every nn.Linear / nn.Conv2d whose attribute name is in `targets` (groups or names) in a LoRA
    layer of `variant` (lora or dora); freeze everything else. Returns {path of the layer in the base model:
    LoRA layer}, in module order.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown LoRA variant {variant!r}: choose {' or '.join(VARIANTS)}")
    names = target_names(targets)
    model.requires_grad_(False)
    layers = {}
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraBase):
            continue  # its children are the layer it wraps; the wrapper itself is what gets stacked on
        for name, child in list(module.named_children()):
            kind = VARIANTS[variant].get(type(bottom(child)))
            if name in names and isinstance(child, DoraMixin):
                raise ValueError(f"{path}.{name} holds a DoRA adapter, which cannot be stacked with another")
            if name in names and kind is not None:
                layer = kind(child, r, alpha, dropout, rslora)
                setattr(module, name, layer)
                layers[f"{path}.{name}" if path else name] = layer
    if not layers:
        raise ValueError(f"no layer named {'/'.join(sorted(names))} found to adapt")
    return layers


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraBase)]


def set_lora(model, enabled=True, scale=1.0):
    """Turn every adapter in `model` on or off, or blend it (scale 0 = base, 1 = full)."""
    for layer in lora_layers(model):
        layer.enabled, layer.scale = enabled, scale


def merge_lora(model):
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model):
    for layer in reversed(lora_layers(model)):
        layer.unmerge()


def parameter_report(model):
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def param_groups(layers, lr, lr_ratio=1.0):
    """The optimizer's parameter groups. LoRA+ (Hayou et al. 2024): B starts at zero and carries the update's
    size, A only its directions; with equal learning rates B learns too slowly in wide layers, so B gets
    lr_ratio times A's rate. `lr_scale` is the group's share of the schedule's learning rate (trainer.py)."""
    b = [layer.lora_B for layer in layers.values()]
    rest = [p for layer in layers.values() for name, p in layer.named_parameters(recurse=False) if name != "lora_B"]
    return [dict(params=rest, lr=lr, lr_scale=1.0), dict(params=b, lr=lr * lr_ratio, lr_scale=lr_ratio)]


def adapter_tensors(layers):
    """{'down.1.attn.w_q.lora_A': [r, in], '...lora_B': [out, r], ...} (and DoRA's '...magnitude': [out]):
    the adapter alone, keyed by layer path."""
    return {f"{path}.{name}": p.detach().clone()
            for path, layer in layers.items() for name, p in layer.named_parameters(recurse=False)}


def save_lora(path, layers, config, base_fingerprint, step, dtype=torch.float32):
    """Write an adapter file: its tensors, its config (r, alpha, targets, style, ...) and the base's fingerprint.

    Only what a user shares; the optimizer state for --resume lives in a file of its own.
    """
    tensors = {k: v.to(dtype) for k, v in adapter_tensors(layers).items()}
    save_file(dict(kind=ADAPTER_KIND, config=config, base_fingerprint=base_fingerprint, step=step,
                   tensors=tensors), path)


def load_lora(model, path, device="cpu", base_fingerprint=None):
    """Inject LoRA into a model using the file's own config, then load the adapter tensors.

    The model must be the base the adapter was trained on: its fingerprint (of the weights without any
    adapter; pass `base_fingerprint` when stacking a second adapter) must match the file's. Refuses, with a
    one-line error, a file from another base, or one whose tensors do not fit the layers it describes.
    Returns (adapter file dict, {path: LoRA layer}).
    """
    adapter = load_file(path, ADAPTER_KIND, device)
    try:
        config, tensors, base_fp = adapter["config"], adapter["tensors"], adapter["base_fingerprint"]
        r, alpha, targets = int(config["r"]), float(config["alpha"]), tuple(config["targets"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is a damaged adapter file (missing {e})")
    this_fp = base_fingerprint or fingerprint(model)
    if base_fp != this_fp:
        raise ValueError(f"{path} was trained on a different base model (fingerprint {base_fp}, "
                        f"this checkpoint is {this_fp})")
    layers = inject_lora(model, targets, r, alpha, float(config.get("dropout", 0.0)),
                         config.get("variant", "lora"), bool(config.get("rslora", False)))
    expected = {k: v.shape for k, v in adapter_tensors(layers).items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:2]}, unexpected {unexpected[:2]}")
    for name, t in tensors.items():
        if t.shape != expected[name]:
            raise ValueError(f"{path} does not fit this model: {name} has shape {tuple(t.shape)}, "
                            f"expected {tuple(expected[name])} (rank {r})")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path} holds non-finite numbers in {name}; the adapter is broken")
    with torch.no_grad():
        for path_, layer in layers.items():
            for name, p in layer.named_parameters(recurse=False):
                p.copy_(tensors[f"{path_}.{name}"])
    return adapter, layers
