"""Is a style really low-rank? Full fine-tuning as an adapter, the spectrum of its update, a LoRA cut from it.

LoRA (lora.py) bets that the weight update a new task needs has a low intrinsic rank. Here is the test
of that bet. `FullUpdate` trains the update itself, one free number per weight of the layer:

    h = (W0 + dW) x + b,     dW: out x in (x k x k), zero at the start

-- full fine-tuning of the same layers, written as an adapter, so that it is saved, switched, blended
and merged exactly like one. Its singular values (Eckart & Young 1936) say how low-rank it came out:

    dW = U diag(sigma) V^T,                      sigma_1 >= sigma_2 >= ... >= 0    (`singular_values`)
    energy(k) = sum_{i<=k} sigma_i^2 / sum_i sigma_i^2                               (`energy_captured`)
    r_eps = the smallest k with sum_{i>k} sigma_i^2 / sum_i sigma_i^2 <= eps        (`effective_rank`)

r_eps is AdaLoRA's energy rule (Zhang et al. 2023). And its first r directions are the best rank-r update
there is (Eckart-Young: no B A of rank r is nearer dW in the Frobenius norm), so they make a LoRA
(`truncate`, as kohya-ss/sd-scripts extracts LoRAs from fine-tuned Stable Diffusion models):

    B = U_r diag(sqrt(sigma_r)),   A = diag(sqrt(sigma_r)) V_r^T,   B A = the rank-r truncation of dW

A convolution's kernel [out, in, k, k] is read as the out x (in k k) matrix, the same reading LoCon's
B A has (lora.py), so the cut factors are a LoraConv2d's A (a k x k conv) and B (a 1 x 1 conv).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora import Adapter, bottom


class FullUpdate(Adapter):
    """Full fine-tuning of a Linear or Conv2d: dW is a trainable tensor shaped like W0, zero at the start."""

    def __init__(self, base, rank=None, alpha=None, dropout=0.0, rslora=False):  # LoRA's knobs do not apply
        if isinstance(base, Adapter):
            raise ValueError("a full update is trained on the plain layer; stack adapters on top of it instead")
        if dropout > 0:
            raise ValueError("a full update forms the fine-tuned weight itself and takes no dropout")
        super().__init__(base)
        self.delta = nn.Parameter(torch.zeros_like(self.weight))

    def update(self, x):
        return self.layer_with(x, self.delta, bias=False)

    def delta_weight(self, scale=None):
        return self.delta * (self.scale if scale is None else scale)

    def layer_with(self, x, weight, bias=True):
        layer = bottom(self)
        b = layer.bias if bias else None
        if weight.dim() == 2:
            return F.linear(x, weight, b)
        return F.conv2d(x, weight, b, layer.stride, layer.padding)

    def forward(self, x):
        # One layer with W0 + s dW: as cheap as training the layer itself, and dW's gradient is W's.
        return self.layer_with(x, self.weight + self.delta_weight()) if self.active else self.base(x)


def as_matrix(dW):
    """[out, in] or [out, in, k, k] -> the out x (in k k) matrix whose rank a LoRA limits."""
    return dW.detach().float().flatten(1)


def singular_values(dW):
    """sigma_1 >= ... >= sigma_min(out, in k k) of an update."""
    return torch.linalg.svdvals(as_matrix(dW))


def energy_captured(sigma):
    """energy[k - 1] = the share of ||dW||_F^2 in the first k directions, k = 1 .. len(sigma)."""
    energy = sigma.double() ** 2
    return (energy.cumsum(0) / energy.sum()).float()


def effective_rank(sigma, eps):
    """The smallest k whose tail sum_{i>k} sigma_i^2 is at most eps of the total (0 for dW = 0)."""
    if not sigma.any():
        return 0
    tail = 1 - energy_captured(sigma)  # tail[k - 1] = the share the first k leave out; it falls to 0
    return int((tail > eps).sum()) + 1


def truncate(dW, rank):
    """A rank-`rank` LoRA of the update dW: (A, B) shaped as LoraLayer's or LoraConv2d's, with B A the best
    rank-`rank` approximation of dW (gamma = 1: save it with alpha = rank)."""
    U, sigma, Vh = torch.linalg.svd(as_matrix(dW), full_matrices=False)
    if not 1 <= rank <= len(sigma):
        raise ValueError(f"rank {rank} is outside 1 .. {len(sigma)}, the width of this layer's update")
    root = sigma[:rank].sqrt()
    A = root[:, None] * Vh[:rank]   # [rank, in k k]
    B = U[:, :rank] * root          # [out, rank]
    if dW.dim() == 4:
        return A.view(rank, *dW.shape[1:]), B[:, :, None, None]  # a k x k conv, then a 1 x 1 conv
    return A, B
