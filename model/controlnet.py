"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

The trained UNet is *locked*: its weights never change, so nothing it could draw is lost. A *trainable
copy* of its encoder (stem, down path, middle) reads the noisy image, the label and, through a small
condition encoder (`hint`), the control image c. The copy's features reach the locked UNet through
*zero convolutions*, 1 x 1 convs whose weights and biases start at 0, added to each skip and to the middle
(eq. 2 of the paper, with Z the zero convs and F the copy):

    y_c = F_locked(x) + Z(F_copy(x + Z(c)))

At the start every Z is 0, so the controlled model *is* the base model, bit for bit, and training begins
from what the base already draws. The zero convs still learn: for y = w x + b, dy/dw = x, which is not 0,
so the first step makes w non-zero, and from then on gradients flow back into the copy and the hint.

Training follows the paper's recipe: the diffusion loss of the locked UNet with the copy's residuals,
through the copy, the hint and the zero convs alone; and half of the labels replaced by the null label, so
that the copy must learn what a digit is from the control itself.
"""
import copy

import torch.nn as nn

from .unet import UNet


def zero(module):
    """A layer whose weights and bias start at exactly 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlNet(nn.Module):
    """The trainable copy of a UNet's encoder, the condition encoder and the zero convs: one residual per skip
    of the locked UNet and one for its middle, from (x_t, t, y, control image [B, 1, 28, 28])."""

    def __init__(self, unet, kind="skeleton", train_copy=True):
        super().__init__()
        if not isinstance(unet, UNet):
            raise ValueError(f"a ControlNet copies a UNet's encoder and adds to its skip connections; a "
                             f"{type(unet).__name__} has none: steer a UNet checkpoint")
        self.kind = kind
        self.copy = copy.deepcopy(unet)
        del self.copy.up, self.copy.upsample, self.copy.out  # only the encoder is copied
        self.copy.requires_grad_(train_copy)
        self.config = unet.config
        channels = unet.config["channels"]
        # The condition encoder: the control image to the stem's width, at 28 x 28 (pixel space needs no
        # downsampling, unlike Stable Diffusion's 512 -> 64). Its last conv starts at zero, like Z(c) above.
        self.hint = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(),
                                  zero(nn.Conv2d(32, channels[0], 3, padding=1)))
        self.zero_convs = nn.ModuleList(zero(nn.Conv2d(c, c, 1)) for c in [*channels, channels[-1]])  # skips, middle

    def forward(self, x_t, t, y, control):
        h, skips, _, _ = self.copy.encode(x_t, t, y, hint=self.hint(control))
        return [z(f) for z, f in zip(self.zero_convs, [*skips, h])]  # [B, c, H, W] for each skip, then the middle


class Controlled(nn.Module):
    """The locked UNet steered by a ControlNet with a fixed control image: eps_theta(x_t, t, y | c), ready for
    the samplers. A batch of 2B (guidance: conditional and null labels) sees each control twice."""

    def __init__(self, unet, controlnet, control, strength=1.0):
        super().__init__()
        self.unet, self.controlnet, self.control, self.strength = unet, controlnet, control, strength
        self.config = unet.config

    def forward(self, x_t, t, y):
        c = self.control.repeat(len(x_t) // len(self.control), 1, 1, 1)
        residuals = [self.strength * r for r in self.controlnet(x_t, t, y, c)]
        return self.unet(x_t, t, y, control=residuals)
