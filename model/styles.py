"""Styles: MNIST redrawn by a one-line transform, and a number that says how much of a style an image has.

A LoRA in Stable Diffusion teaches a model a new *style* with a few thousand images. Here a style is
plain MNIST passed once through a transform anyone can read, so that "LoRA off | on" shows something the
base model never drew, and the change can be measured:

    bold      strokes thickened: every pixel takes the brightest value of its 3x3 neighbourhood (dilation)
    italic    digits lean right: a horizontal shear, x' = x + 0.4 (14 - y) pixels
    inverted  black ink on white paper: x -> -x

Images are [N, 1, 28, 28] floats in [-1, 1] (-1 = background). Each style comes with a metric computed
on images, so that the share of the style gap an adapter closes is a number:

    bold      ink      share of pixels brighter than mid-grey
    italic    slant    -cov(col, row) / var(row) of the ink, from image moments (0 upright, > 0 leaning right)
    inverted  brightness mean pixel value in [0, 1]

    gap closed = (metric(LoRA on) - metric(LoRA off)) / (metric(real styled digits) - metric(LoRA off))
"""
import torch
import torch.nn.functional as F

SHEAR = 0.4  # italic: pixels of horizontal shift per pixel of height


def bold(x):
    return F.max_pool2d(x, 3, stride=1, padding=1)  # a 3x3 max filter is grey-scale dilation


def italic(x):
    # affine_grid maps each output pixel to the input point it reads: (u, v) -> (u + SHEAR v, v) in [-1, 1]
    # coordinates, so rows above the centre (v < 0) read from the left, i.e. their ink moves right.
    theta = torch.tensor([[1.0, SHEAR, 0.0], [0.0, 1.0, 0.0]], device=x.device).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1  # +1/-1: the zero padding becomes background


def inverted(x):
    return -x


def ink(x):
    return (x > 0).float().mean(dim=(1, 2, 3))  # [N]


def slant(x):
    w = (x[:, 0] + 1) / 2                                             # [N, 28, 28] ink weights in [0, 1]
    rows = torch.arange(28, device=x.device, dtype=w.dtype)[:, None]  # [28, 1]
    cols = torch.arange(28, device=x.device, dtype=w.dtype)[None, :]  # [1, 28]
    mass = w.sum(dim=(1, 2)).clamp(min=1e-6)
    r_mean = (w * rows).sum(dim=(1, 2)) / mass
    c_mean = (w * cols).sum(dim=(1, 2)) / mass
    dr, dc = rows - r_mean[:, None, None], cols - c_mean[:, None, None]
    cov = (w * dr * dc).sum(dim=(1, 2)) / mass
    var = (w * dr * dr).sum(dim=(1, 2)) / mass
    return -cov / var.clamp(min=1e-6)  # [N]; rows grow downwards, so a right lean has cov < 0


def brightness(x):
    return ((x + 1) / 2).mean(dim=(1, 2, 3))  # [N]


# name -> (transform, metric name, metric)
STYLES = {
    "bold": (bold, "ink", ink),
    "italic": (italic, "slant", slant),
    "inverted": (inverted, "brightness", brightness),
}
STYLE_NAMES = ("none",) + tuple(STYLES)


def apply_style(name, images, batch_size=10_000):
    """MNIST images [N,1,28,28] in [-1,1] -> the same digits in style `name` ('none' returns them as they are)."""
    if name == "none":
        return images
    if name not in STYLES:
        raise ValueError(f"unknown style {name!r}; choose one of {', '.join(STYLE_NAMES)}")
    transform = STYLES[name][0]
    return torch.cat([transform(x) for x in images.split(batch_size)])


def style_metric(name, images):
    """(metric name, its mean over images [N,1,28,28])."""
    _, metric_name, metric = STYLES[name]
    return metric_name, float(metric(images).mean())


def gap_closed(off, on, target):
    """Share of the way from `off` to `target` that `on` went: 0 = no change, 1 = all the way."""
    return (on - off) / (target - off) if target != off else float("nan")
