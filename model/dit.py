"""The Diffusion Transformer (Peebles & Xie 2023): eps_theta(x_t, t, y) as a transformer over patches.

    x_t [B,1,28,28] --patchify--> [B, N, p*p] --embed + positions--> [B, N, D] --depth x block--> [B, N, D]
        --final adaptive norm, linear--> [B, N, p*p] --unpatchify--> eps_hat [B,1,28,28]

The image is cut into p x p patches, each one token: N = (28 / p)^2, so p = 4 gives 49 tokens, p = 2 gives
196 (attention costs N^2), p = 7 gives 16. The positions are fixed 2-D sines and cosines, a row code beside a
column code, so that nothing has to learn where a patch sits.

Every block is pre-norm (Xiong et al. 2020): x + Attention(LN(x)), then x + MLP(LN(x)). The residual path is
never normalised, so a deep stack stays easy to optimise; post-norm, LN(x + f(x)), trains worse without
careful warm-up. The condition -- the step t and the label y -- comes in one of three ways (the paper's
section 3.2), chosen by `label_in`:

    in-context  t and y become two extra tokens that the patches attend to like any other; dropped at the end
    cross-attn  after self-attention, the patches attend to [t token, label tokens] through w_q, w_k, w_v,
                as the UNet's pixels do (attention.py)
    adaln-zero  c = emb(t) + emb(y) sets each block's norm: LN(x) (1 + scale) + shift, and a gate alpha per
                channel on each residual branch: x + alpha * Attention(...). The regressions of shift,
                scale and alpha start at zero, so every block starts as the identity.

The final layer is an adaptive norm and a linear layer, both zero at start, so eps_hat = 0 before the first
step: the network begins by predicting the mean of eps and learns corrections, rather than emitting
random noise that the first steps must unlearn. Its norm reads c in adaln-zero, and only t in the other
two designs, so that the label enters through the design under study and nowhere else.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import LabelContext, multi_head
from .unet import timestep_embedding

LABEL_IN = ("adaln-zero", "cross-attn", "in-context")


def patchify(x, p):
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p]: row-major patches, each flattened."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # [B, H/p, W/p, C, p, p]
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens, p, size, channels=1):
    """The inverse of patchify: [B, N, C p p] -> [B, C, size, size]."""
    g = size // p
    x = tokens.view(-1, g, g, channels, p, p).permute(0, 3, 1, 4, 2, 5)  # [B, C, H/p, p, W/p, p]
    return x.reshape(-1, channels, size, size)


def positions_2d(grid, dim):
    """Fixed 2-D sin-cos positions [grid^2, dim]: half the channels encode the row, half the column."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([timestep_embedding(rows.flatten(), dim // 2), timestep_embedding(cols.flatten(), dim // 2)], 1)


def modulate(x, shift, scale):
    """The adaptive norm's affine step: x (1 + scale) + shift, per sample and channel. At zero it is x."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head attention of tokens x [B, N, D] to `context` [B, L, D] (x itself if None): self- or cross-.
    `w_q`, `w_k`, `w_v`, `w_o` are plain nn.Linear layers, named as in the UNet, so LoRA finds them."""

    def __init__(self, dim, heads):
        super().__init__()
        assert dim % heads == 0, "the width must split evenly into heads"
        self.heads = heads
        self.w_q, self.w_k, self.w_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.w_o = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        context = x if context is None else context
        return self.w_o(multi_head(self.w_q(x), self.w_k(context), self.w_v(context), self.heads))


class MLP(nn.Module):
    """The transformer's per-token MLP, D -> 4D -> D. `fc1` and `fc2` are LoRA's 'mlp' group."""

    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """A pre-norm block: self-attention, then (cross-attn design) attention to the condition tokens, then the
    MLP, each added to the residual path. The in-context design uses it with no cross-attention."""

    def __init__(self, dim, heads, cross):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm_c, self.cross = (nn.LayerNorm(dim), Attention(dim, heads)) if cross else (None, None)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim)

    def forward(self, x, c, context):
        x = x + self.attn(self.norm1(x))
        if self.cross is not None:
            x = x + self.cross(self.norm_c(x), context)
        return x + self.mlp(self.norm2(x))


class AdaLNZeroBlock(nn.Module):
    """A pre-norm block whose norms and gates come from the condition c [B, D] (adaLN-Zero)."""

    def __init__(self, dim, heads):
        super().__init__()
        # No learned gamma, beta in the norms: the condition supplies them, per sample.
        self.norm1, self.attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6), MLP(dim)
        self.ada = nn.Linear(dim, 6 * dim)  # c -> shift, scale, gate for attention, and again for the MLP
        nn.init.zeros_(self.ada.weight)     # the "Zero": gates alpha = 0, so the block is the identity at start
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c, context):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=1)  # each [B, D]
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Adaptive norm, then a linear map of each token to its patch of eps_hat; both regressions start at 0."""

    def __init__(self, dim, out):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada, self.linear = nn.Linear(dim, 2 * dim), nn.Linear(dim, out)
        for layer in (self.ada, self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c):
        shift, scale = self.ada(F.silu(c)).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))  # [B, N, p*p]


class DiT(nn.Module):
    """eps_theta(x_t, t, y) as a transformer over p x p patches of the 28 x 28 image (10 = the null label)."""

    def __init__(self, patch=4, width=64, depth=4, heads=4, label_in="adaln-zero", context_tokens=4,
                 num_classes=10, size=28):
        """patch must divide 28; width must split into `heads` and be a multiple of 4 (the 2-D positions)."""
        super().__init__()
        if label_in not in LABEL_IN:
            raise ValueError(f"unknown label design {label_in!r}: choose {', '.join(LABEL_IN)}")
        if size % patch:
            raise ValueError(f"patch {patch} does not divide the image's {size} pixels: choose 2, 4, 7 or 14")
        if width % 4 or width % heads:
            raise ValueError(f"width {width} must be a multiple of 4 (the 2-D positions) and of the {heads} heads: "
                             "try 32 or 64")
        self.config = dict(patch=patch, width=width, depth=depth, heads=heads, label_in=label_in,
                           context_tokens=context_tokens, num_classes=num_classes, size=size)
        self.patch, self.size = patch, size
        self.embed = nn.Linear(patch * patch, width)  # one patch -> one token
        self.register_buffer("pos", positions_2d(size // patch, width), persistent=False)  # [N, D]
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        if label_in == "cross-attn":
            self.context = LabelContext(num_classes, context_tokens, width)  # y -> [B, L, D], as in the UNet
        else:
            self.label = nn.Embedding(num_classes + 1, width)                # y -> [B, D]
        block = (lambda: AdaLNZeroBlock(width, heads)) if label_in == "adaln-zero" else \
            (lambda: Block(width, heads, cross=label_in == "cross-attn"))
        self.blocks = nn.ModuleList(block() for _ in range(depth))
        self.final = FinalLayer(width, patch * patch)
        self.initialize()

    def initialize(self):
        """Xavier-uniform linear layers with zero biases, small embeddings (as the paper's code); the zeros of
        adaLN-Zero and of the final layer are set again after, so that nothing here undoes them."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, (AdaLNZeroBlock, FinalLayer)):
                for layer in (m.ada, getattr(m, "linear", m.ada)):
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def forward(self, x_t, t, y, control=None):
        """eps_hat [B, 1, 28, 28] (or v, as the Diffusion asks)."""
        if control is not None:
            raise ValueError("a ControlNet steers a UNet's skip connections; a DiT has none")
        x = self.embed(patchify(x_t, self.patch)) + self.pos                  # [B, N, D]
        N, label_in = x.shape[1], self.config["label_in"]
        t_emb = self.time_mlp(timestep_embedding(t, self.config["width"]))   # [B, D]
        c, context = t_emb, None  # c: what the final norm (and adaLN-Zero's blocks) read
        if label_in == "adaln-zero":
            c = t_emb + self.label(y)
        elif label_in == "in-context":
            x = torch.cat([t_emb[:, None], self.label(y)[:, None], x], dim=1)   # [B, 2 + N, D]
        else:
            context = torch.cat([t_emb[:, None], self.context(y)], dim=1)      # [B, 1 + L, D]
        for block in self.blocks:
            x = block(x, c, context)
        x = self.final(x[:, -N:], c)                                          # the patch tokens only: [B, N, p*p]
        return unpatchify(x, self.patch, self.size)

