"""Cross-attention: how the digit label gets into the picture.

In Stable Diffusion the UNet reads the text prompt through cross-attention. Here the "prompt" is a digit,
and the "text encoder" is a learned embedding that turns it into a short sequence of context tokens:

    context = LabelContext(y)                        # [B, L, d_ctx], L >= 2 tokens per label

Each pixel asks a question of those tokens (Vaswani et al. 2017, eq. 1):

    Q = w_q(pixels)   K = w_k(context)   V = w_v(context)
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head)) V

Why at least two tokens: with a single key the softmax over keys is identically 1, the output is just V,
and `w_q` and `w_k` receive exactly zero gradient -- a LoRA on them could never learn. Several tokens give
the softmax something to choose between.

The map itself, softmax(Q K^T / sqrt(d_head)) -- for each pixel, its weights over the tokens -- is what
`CrossAttention.weights` returns; the forward pass never forms it, since `scaled_dot_product_attention`
fuses it away.

Label index `num_classes` (10 for MNIST) is the learned "null" label: the context of an unconditional
prediction, used by classifier-free guidance (see diffusion.py).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norm import GroupNorm


class LabelContext(nn.Module):
    """Digit label -> a sequence of `tokens` learned context vectors: [B] -> [B, tokens, dim]."""

    def __init__(self, num_classes=10, tokens=4, dim=128):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.null_label = num_classes
        # One row per digit plus the null label; each row is cut into `tokens` vectors.
        self.embed = nn.Embedding(num_classes + 1, tokens * dim)

    def forward(self, y):
        return self.embed(y).view(-1, self.tokens, self.dim)  # [B, L, d_ctx]


class CrossAttention(nn.Module):
    """Residual multi-head cross-attention: queries from the feature map, keys and values from the context.

    `w_q`, `w_k`, `w_v` and `w_o` are plain nn.Linear layers on purpose: they are what LoRA adapts.
    """

    def __init__(self, channels, context_dim, heads=4):
        super().__init__()
        assert channels % heads == 0, "channels must split evenly into heads"
        self.heads = heads
        self.norm = GroupNorm(8, channels)
        self.w_q = nn.Linear(channels, channels, bias=False)
        self.w_k = nn.Linear(context_dim, channels, bias=False)
        self.w_v = nn.Linear(context_dim, channels, bias=False)
        self.w_o = nn.Linear(channels, channels)

    def forward(self, x, context):
        B, C, H, W = x.shape
        pixels = self.norm(x).flatten(2).transpose(1, 2)  # [B, H*W, C]: one query per pixel
        q = self.w_q(pixels)                               # [B, H*W, C]
        k = self.w_k(context)                              # [B, L, C]
        v = self.w_v(context)                              # [B, L, C]
        out = self.w_o(multi_head(q, k, v, self.heads))    # [B, H*W, C]
        return x + out.transpose(1, 2).reshape(B, C, H, W)  # residual: the block only adds what the label says

    def weights(self, x, context):
        """The attention map: each pixel's weights over the context tokens, summing to 1. [B, heads, H*W, L]"""
        q = split_heads(self.w_q(self.norm(x).flatten(2).transpose(1, 2)), self.heads)  # [B, heads, H*W, d_head]
        k = split_heads(self.w_k(context), self.heads)                                   # [B, heads, L, d_head]
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def multi_head(q, k, v, heads):
    """softmax(Q K^T / sqrt(d_head)) V in `heads` heads: q [B, n, C], k and v [B, L, C] -> [B, n, C]."""
    B, n, C = q.shape
    out = F.scaled_dot_product_attention(*(split_heads(t, heads) for t in (q, k, v)))  # [B, heads, n, C/heads]
    return out.transpose(1, 2).reshape(B, n, C)            # the heads side by side again


def split_heads(t, heads):
    """[B, n, C] -> [B, heads, n, C/heads]: each head attends with its own slice of the channels."""
    B, n, C = t.shape
    return t.view(B, n, heads, C // heads).transpose(1, 2)
