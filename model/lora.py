"""LoRA: low-rank adaptation of a frozen layer (Hu et al. 2021, "LoRA", eq. 3), for linear and conv layers.

A pretrained layer computes h = W0 x + b. Fine-tuning would learn a full update dW (out x in numbers).
LoRA bets that the update has low rank and learns it as a product of two thin matrices:

    h = W0 x + b + gamma * B A dropout(x),     A: rank x in,  B: out x rank,  rank << min(in, out)

Only A and B are trained; W0 and b stay frozen. Initialisation:
  * B = 0, so BA = 0 and the adapted model starts *bit-identical* to the base model.
  * A ~ Kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)) -- the init of nn.Linear itself and
    of microsoft/LoRA. A must be random and B zero, not both zero: with both zero neither gets a gradient.
  * gamma = alpha / rank (Hu et al.), or alpha / sqrt(rank) with rsLoRA (Kalajdzievski 2023), whose
    analysis shows that alpha / rank shrinks the update as the rank grows, so a larger rank learns slower;
    alpha / sqrt(rank) keeps its size steady.

Two numbers scale the update, and they are not the same thing: `gamma` is fixed by the adapter's
training (alpha and the rank), `scale` is the user's blend at sampling time (0 = the base model, 1 = the
adapter as trained; denoise.py --lora-scale).

The same idea on a k x k convolution (LoCon; Yeh et al. 2024, "LyCORIS"): A is a k x k conv from `in` to
rank channels and B a 1 x 1 conv back to `out`. A 1 x 1 conv mixes channels pixel by pixel, so B after A
is one k x k conv with kernel dW[o, i] = sum_j B[o, j] A[j, i] -- again a rank-limited update of W0. So the
adapted conv runs as one conv with kernel W0 + gamma dW, as microsoft/LoRA's ConvLoRA does: the same sum
as three convs, and cheaper, since a thin rank-channel conv runs far below a wide one's speed.

After training, gamma B A can be folded into W0 (`merge`): inference then costs exactly what the base
model does. `unmerge` takes it out again. A second adapter can wrap the first (adapters.py stacks them).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Adapter(nn.Module):
    """A frozen layer plus a trainable update of its weight, dW; the user blends it in by `scale`.

    What every adapter shares -- on/off, the blend, merging dW into W0 and taking it out -- lives here;
    what dW is (a low-rank B A here, a full tensor in lowrank.py, an SVD in adalora.py) is a subclass's."""

    def __init__(self, base):
        super().__init__()
        self.base = base.requires_grad_(False)  # W0 and b (or an adapter already stacked on them): frozen
        self.enabled = True       # False: behave exactly like the layer underneath
        self.scale = 1.0          # the user's blend: 0 = base model, 1 = full adapter
        self.merged_scale = None  # the scale folded into W0 while merged, else None

    # What a subclass provides, one line each:
    def update(self, x):                      # dW x, the update's output alone (no bias)
        raise NotImplementedError

    def delta_weight(self, scale=None):       # scale * dW, shaped like W0
        raise NotImplementedError

    def layer_with(self, x, weight):          # the plain layer computed with another weight (and its bias)
        raise NotImplementedError

    @property
    def weight(self):
        """W0: the weight of the plain layer at the bottom of the stack (where merges go)."""
        return bottom(self).weight

    @property
    def active(self):
        """Whether the update is added in forward: enabled, not merged into W0, and blended in at all."""
        return self.enabled and self.merged_scale is None and self.scale != 0

    def forward(self, x):
        h = self.base(x)  # W0 x + b (W0 already holds dW when merged)
        if self.active:
            h = h + self.scale * self.update(x)
        return h

    def check_mergeable(self):
        """Merging writes into W0, so W0 must be a stored weight: a 4-bit layer (quant.py) only dequantises one."""
        if not isinstance(self.weight, nn.Parameter):
            raise ValueError("this adapter sits on a 4-bit layer: merging would quantise W0 + dW again, which is lossy "
                             "(quant.merge_requantized does it on purpose)")

    @torch.no_grad()
    def merge(self):
        """W0 <- W0 + dW: zero-overhead inference. A disabled adapter merges nothing."""
        if self.merged_scale is None and self.enabled:
            self.check_mergeable()
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged_scale = self.scale

    @torch.no_grad()
    def unmerge(self):
        """W0 <- W0 - dW, with the dW that was merged."""
        if self.merged_scale is not None:
            self.weight.sub_(self.delta_weight(self.merged_scale).to(self.weight.dtype))
            self.merged_scale = None


class LoraBase(Adapter):
    """dW = gamma * B A, two thin trainable matrices. Subclasses say what A and B are for their layer."""

    def __init__(self, base, rank, alpha, dropout, a_shape, b_shape, rslora=False):
        super().__init__(base)
        # dW = B A is an out x (in * k * k) matrix: past its smaller side a "low-rank" update is a full one
        width = min(b_shape[0], math.prod(a_shape[1:]))
        if not 1 <= rank <= width:
            raise ValueError(f"LoRA rank must be between 1 and the layer's width {width}, got {rank}")
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.gamma = alpha / math.sqrt(rank) if rslora else alpha / rank
        device = self.weight.device
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def update(self, x):
        return self.gamma * self.low_rank(self.dropout(x))

    def low_rank(self, x):                    # B A x, through the two thin factors (a subclass's)
        raise NotImplementedError

    def factor_A(self):
        """A as the update applies it: lora_A itself here; AdaLoRA (adalora.py) scales its rows by lambda."""
        return self.lora_A

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}" + (", rslora" if self.rslora else "")


class LoraLayer(LoraBase):
    """LoRA on an nn.Linear: A [rank, in], B [out, rank]."""

    def __init__(self, base, rank=4, alpha=4.0, dropout=0.0, rslora=False):
        out_features, in_features = base.weight.shape
        super().__init__(base, rank, alpha, dropout, (rank, in_features), (out_features, rank), rslora)

    def low_rank(self, x):
        # Two thin products, x -> A x (rank numbers) -> B A x: never forms the out x in matrix.
        return F.linear(F.linear(x, self.factor_A()), self.lora_B)

    def delta_weight(self, scale=None):
        scale = self.scale if scale is None else scale
        return (self.lora_B @ self.factor_A()) * (self.gamma * scale)  # [out, in]

    def layer_with(self, x, weight):
        return F.linear(x, weight, bottom(self).bias)


class LoraConv2d(LoraBase):
    """LoCon on an nn.Conv2d: A a k x k conv [rank, in, k, k] (the base's stride and padding), B a 1 x 1 conv
    [out, rank, 1, 1]."""

    def __init__(self, base, rank=4, alpha=4.0, dropout=0.0, rslora=False):
        out_channels, in_channels, kh, kw = base.weight.shape
        super().__init__(base, rank, alpha, dropout, (rank, in_channels, kh, kw), (out_channels, rank, 1, 1), rslora)
        conv = bottom(base)
        self.stride, self.padding = conv.stride, conv.padding
        # One conv with W0 + dW needs a plain conv under it, and no dropout (which acts on the update's input alone).
        self.one_conv = dropout == 0 and not isinstance(base, Adapter)

    def forward(self, x):
        if self.one_conv and self.active:
            return self.layer_with(x, self.weight + self.delta_weight())  # gradients reach A and B through dW
        return super().forward(x)  # W0 x + b + s gamma B A x, in three convs

    def low_rank(self, x):
        return F.conv2d(F.conv2d(x, self.factor_A(), stride=self.stride, padding=self.padding), self.lora_B)

    def delta_weight(self, scale=None):
        scale = self.scale if scale is None else scale
        dW = self.lora_B.flatten(1) @ self.factor_A().flatten(1)  # [out, rank] @ [rank, in*k*k]
        return dW.view(len(dW), *self.lora_A.shape[1:]) * (self.gamma * scale)  # [out, in, k, k]

    def layer_with(self, x, weight):
        return F.conv2d(x, weight, bottom(self).bias, self.stride, self.padding)


def bottom(layer):
    """The plain nn.Linear / nn.Conv2d under any stack of adapters."""
    while isinstance(layer, Adapter):
        layer = layer.base
    return layer
