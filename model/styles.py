"""Styles: MNIST redrawn by a one-line transform, the new data a LoRA adapter learns.

A LoRA in Stable Diffusion teaches a model a new *style* with a few thousand images. Here a style is
plain MNIST passed once through a transform anyone can read, so that "LoRA off | on" shows something the
base model never drew:

    bold      strokes thickened: every pixel takes the brightest value of its 3x3 neighbourhood (dilation)
    italic    digits lean right: a horizontal shear, x' = x + 0.4 (14 - y) pixels (torchvision's affine)
    inverted  black ink on white paper: x -> -x

Images are [N, 1, 28, 28] floats in [-1, 1] (-1 = background). How much of a style an image has is
measured in harness/metrics.py (ink, slant, brightness).
"""
import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import InterpolationMode, affine

SHEAR = 0.4  # italic: pixels of horizontal shift per pixel of height


def bold(x):
    return F.max_pool2d(x, 3, stride=1, padding=1)  # a 3x3 max filter is grey-scale dilation


def italic(x):
    # torchvision shears x by -tan(angle) * y about the image centre, y pointing down: rows above the centre
    # (y < 0) move right. +1 / -1 make the blank border it fills in 0 become background (-1).
    angle = math.degrees(math.atan(SHEAR))
    return affine(x + 1, angle=0.0, translate=[0, 0], scale=1.0, shear=[angle, 0.0],
                  interpolation=InterpolationMode.BILINEAR) - 1


def inverted(x):
    return -x


STYLES = {"bold": bold, "italic": italic, "inverted": inverted}
STYLE_NAMES = ("none",) + tuple(STYLES)


def apply_style(name, images, batch_size=10_000):
    """MNIST images [N,1,28,28] in [-1,1] -> the same digits in style `name` ('none' returns them as they are)."""
    if name == "none":
        return images
    if name not in STYLES:
        raise ValueError(f"unknown style {name!r}; choose one of {', '.join(STYLE_NAMES)}")
    return torch.cat([STYLES[name](x) for x in images.split(batch_size)])
