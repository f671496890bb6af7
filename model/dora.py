"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5): magnitude and direction.

    W' = m * (W0 + gamma B A) / ||W0 + gamma B A||

||.|| is the norm of each output's weights (a row of a Linear, one filter of a conv) and m holds one
learned number per output, so the adapter can change how *strongly* each output responds (m) apart from
*what* it responds to (the direction, moved by LoRA's B A). m starts at ||W0||: with B = 0 the layer is W0
exactly. As in the paper (sec. 4.3) the norm is treated as a constant in the backward pass (detached),
which saves memory and barely changes the gradient.

The adapted weight is formed and used as the layer's weight (cheap at these sizes). At a blend `scale`
lambda (denoise.py --lora-scale) both parts blend from the base: m_lambda = m0 + lambda (m - m0) and
lambda gamma B A, so 0 is the base model and 1 the adapter. Because m rescales the whole weight, a DoRA
adapter cannot be stacked with another adapter on the same layer.
"""
import torch
import torch.nn as nn

from .lora import Adapter, LoraConv2d, LoraLayer


class DoraMixin:
    """Turns a LoRA layer into a DoRA layer: a learned magnitude per output on top of its direction."""

    def __init__(self, base, rank=4, alpha=4.0, dropout=0.0, rslora=False):
        if isinstance(base, Adapter):
            raise ValueError("a DoRA adapter rescales the whole weight, so it cannot be stacked with another adapter")
        if dropout > 0:
            raise ValueError("DoRA forms the adapted weight itself and takes no dropout")
        super().__init__(base, rank, alpha, dropout, rslora)
        m0 = output_norms(self.weight)  # [out]
        self.register_buffer("m0", m0, persistent=False)
        self.magnitude = nn.Parameter(m0.clone())
        self.unmerged_weight = None  # W0, kept while merged: merging rescales it, so unmerge restores it

    def adapted_weight(self, scale):
        """W'_lambda = m_lambda * (W0 + lambda gamma B A) / ||W0 + lambda gamma B A||, the norm detached."""
        W = self.weight + self.delta_weight(scale)
        m = self.m0 + scale * (self.magnitude - self.m0)
        factor = m / output_norms(W).detach()  # [out]
        return W * factor.view(-1, *[1] * (W.dim() - 1))

    def forward(self, x):
        return self.layer_with(x, self.adapted_weight(self.scale)) if self.active else self.base(x)

    @torch.no_grad()
    def merge(self):
        if self.merged_scale is None and self.enabled:
            self.check_mergeable()
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
