"""The noise-prediction network eps_theta(x_t, t, y): a small UNet with cross-attention to the label.

    x_t [B,1,28,28] --stem--> 28x28 --down--> 14x14 --down--> 7x7 --mid--> 7x7 --up--> 14x14 --up--> 28x28
                                |                |              |________________|          |
                                |                |_____________________________skip_________|
                                |____________________________________________skip___________________...

Why two down-samplings and no padding: 28 -> 14 -> 7 halves cleanly twice; a third would need 3.5, so we
stop at 7x7 rather than pad MNIST to 32x32 and spend 30% more compute on empty border.

Building blocks:
  * ResBlock: GroupNorm -> SiLU -> conv, plus the time embedding, twice, with a residual path. GroupNorm,
    not BatchNorm: batch statistics would make a sample depend on the rest of its batch, and break when
    sampling small batches.
  * Sinusoidal time embedding (Vaswani et al. 2017; Ho et al. 2020): the step t as sines and cosines of
    geometrically spaced frequencies, then an MLP.
  * CrossAttention (attention.py) after the blocks of the levels in `attn_levels` (0 = 28x28, 1 = 14x14,
    2 = 7x7) and always in the middle: the label's way in.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import CrossAttention, LabelContext
from .norm import GroupNorm

def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer steps: t [B] -> [B, dim] = [sin(t w_i), cos(t w_i)], w_i = 10000^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]  # [B, half]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """Two 3x3 convs with GroupNorm and SiLU; the time embedding is added between them, per channel."""

    def __init__(self, c_in, c_out, t_dim):
        super().__init__()
        self.norm1 = GroupNorm(8, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2 = GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.t_proj(t_emb)[:, :, None, None]  # [B, c_out] -> broadcast over H, W
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Block(nn.Module):
    """A ResBlock, followed by cross-attention to the label context when `attn` is set."""

    def __init__(self, c_in, c_out, t_dim, attn, context_dim, heads):
        super().__init__()
        self.res = ResBlock(c_in, c_out, t_dim)
        self.attn = CrossAttention(c_out, context_dim, heads) if attn else None

    def forward(self, x, t_emb, context):
        x = self.res(x, t_emb)
        return self.attn(x, context) if self.attn is not None else x


class UNet(nn.Module):
    """eps_theta(x_t, t, y): predicts the noise in x_t at step t, for digit label y (10 = null label)."""

    def __init__(self, channels=(64, 128, 128), attn_levels=(1, 2), heads=4, context_tokens=4,
                 context_dim=64, num_classes=10):
        """channels: widths at 28x28, 14x14, 7x7; attn_levels: the levels whose blocks read the label;
        context_tokens: tokens per label (>= 2, attention.py)."""
        super().__init__()
        self.config = dict(channels=tuple(channels), attn_levels=tuple(attn_levels), heads=heads,
                           context_tokens=context_tokens, context_dim=context_dim, num_classes=num_classes)
        c0, t_dim = channels[0], 4 * channels[0]
        self.context = LabelContext(num_classes, context_tokens, context_dim)
        self.time_mlp = nn.Sequential(nn.Linear(c0, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.stem = nn.Conv2d(1, c0, 3, padding=1)

        block = lambda c_in, c_out, level: Block(c_in, c_out, t_dim, level in attn_levels, context_dim, heads)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        c_prev = c0
        for level, c in enumerate(channels):
            self.down.append(block(c_prev, c, level))
            if level < len(channels) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # H -> H/2
            c_prev = c
        self.mid1 = ResBlock(c_prev, c_prev, t_dim)
        self.mid_attn = CrossAttention(c_prev, context_dim, heads)
        self.mid2 = ResBlock(c_prev, c_prev, t_dim)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(channels))):
            c = channels[level]
            self.up.append(block(c_prev + c, c, level))  # input: features + the skip from the down path
            c_prev = c
            if level > 0:  # after nearest x2 (H -> 2H), a conv that also narrows to the next level's width
                c_prev = channels[level - 1]
                self.upsample.append(nn.Conv2d(c, c_prev, 3, padding=1))
        self.out = nn.Sequential(GroupNorm(8, c0), nn.SiLU(), nn.Conv2d(c0, 1, 3, padding=1))

    def forward(self, x_t, t, y, control=None):
        """eps_hat [B, 1, 28, 28]. `control`, from a ControlNet (controlnet.py), is one residual per skip and one
        for the middle, added where the encoder hands its features to the decoder."""
        h, skips, t_emb, context = self.encode(x_t, t, y)
        if control is not None:
            *to_skips, to_middle = control
            skips, h = [s + c for s, c in zip(skips, to_skips)], h + to_middle
        return self.decode(h, skips, t_emb, context)

    def encode(self, x_t, t, y, hint=None):
        """The down path and the middle: (features at 7x7, the skips, t_emb, context). `hint` is added after the stem."""
        context = self.context(y)                                             # [B, L, d_ctx]
        t_emb = self.time_mlp(timestep_embedding(t, self.config["channels"][0]))  # [B, t_dim]
        h = self.stem(x_t)                                                    # [B, c0, 28, 28]
        if hint is not None:
            h = h + hint
        skips = []
        for level, block in enumerate(self.down):
            h = block(h, t_emb, context)
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)                                 # 28 -> 14 -> 7
        h = self.mid2(self.mid_attn(self.mid1(h, t_emb), context), t_emb)     # [B, c_last, 7, 7]
        return h, skips, t_emb, context

    def decode(self, h, skips, t_emb, context):
        """The up path, reading the skips from the last to the first."""
        skips = list(skips)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), t_emb, context)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))  # 7 -> 14 -> 28
        return self.out(h)                                                    # [B, 1, 28, 28]: eps_hat
