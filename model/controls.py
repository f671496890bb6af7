"""Controls: the shape a ControlNet is told to draw, computed from a digit by a transform a reader can follow.

Each takes digits [N, 1, 28, 28] in [-1, 1] and returns a control image [N, 1, 28, 28] of 0s and 1s:

    edges     the outline: the digit's ink minus its 3 x 3 erosion (a pixel of ink with background beside it)
    skeleton  the strokes thinned to one pixel (Zhang & Suen 1984), the thinnest and hardest to follow
    sketch    a coarse blob: the digit at 7 x 7 (a cell inked if 4 of its 16 pixels are), blown up x4

So a ControlNet learns "draw a digit through these pixels"; how well it did is measured by computing the same
control from what it drew and comparing the two (harness/metrics.py).
"""
import torch
import torch.nn.functional as F


def ink(x):
    return (x > 0).float()  # [N, 1, 28, 28]: 1 where the pen went


def edges(x):
    inked = ink(x)
    eroded = -F.max_pool2d(-inked, 3, stride=1, padding=1)  # erosion: the 3 x 3 minimum
    return inked - eroded


def sketch(x):
    coarse = (F.avg_pool2d(ink(x), 4) >= 0.25).float()  # [N, 1, 7, 7]
    return F.interpolate(coarse, scale_factor=4, mode="nearest")


def neighbours(p):
    """The 8 neighbours of every pixel, clockwise from the one above: P2, P3, ..., P9 in Zhang & Suen's names."""
    padded = F.pad(p, (1, 1, 1, 1))
    shifts = [(0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0), (0, 0)]  # (row, col) offsets into the pad
    H, W = p.shape[-2:]
    return [padded[..., r:r + H, c:c + W] for r, c in shifts]


def skeleton(x, max_iterations=30):
    """Zhang-Suen thinning: peel removable boundary pixels in two alternating sub-steps until none is left.
    A pixel goes if it has 2-6 inked neighbours, exactly one 0 -> 1 transition around it (it is not a
    bridge), and the sub-step's two products of neighbours are 0 (it lies on that side of the stroke)."""
    p = ink(x)
    for _ in range(max_iterations):
        changed = False
        for first in (True, False):
            n = neighbours(p)
            count = sum(n)
            transitions = sum((1 - n[i]) * n[(i + 1) % 8] for i in range(8))
            P2, P4, P6, P8 = n[0], n[2], n[4], n[6]
            side = (P2 * P4 * P6 == 0) & (P4 * P6 * P8 == 0) if first else (P2 * P4 * P8 == 0) & (P2 * P6 * P8 == 0)
            remove = (p == 1) & (count >= 2) & (count <= 6) & (transitions == 1) & side
            if remove.any():
                p = p.masked_fill(remove, 0.0)
                changed = True
        if not changed:
            break
    return p


CONTROLS = {"edges": edges, "skeleton": skeleton, "sketch": sketch}


def control_image(kind, digits):
    """Digits [N,1,28,28] in [-1,1] -> their `kind` control [N,1,28,28] in {0, 1}."""
    if kind not in CONTROLS:
        raise ValueError(f"unknown control {kind!r}; choose one of {', '.join(CONTROLS)}")
    return CONTROLS[kind](digits)
