"""Figures: digit grids in MNIST's own look (white on black, grey colour map) and training curves.

The digits are tiled by torchvision's `make_grid`; matplotlib (Agg backend, so it works on machines
without a display) adds the labels and titles and writes the PNG.
"""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from model.data import to_uint8  # noqa: E402

PAD = 2  # pixels between digits


def _mosaic(images):
    """[R, C, 28, 28] pixels (uint8, or floats in [-1, 1]) -> one [R*30+2, C*30+2] uint8 image."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    R, C, H, W = images.shape
    return make_grid(images.cpu().reshape(R * C, 1, H, W), nrow=C, padding=PAD)[0]  # make_grid gives 3 channels


def _centres(n, size=28):
    """Pixel positions of the centres of n digits in a row (or column) of a mosaic."""
    return [PAD + i * (size + PAD) + size / 2 for i in range(n)]


def save_grid(path, panels, row_labels, col_labels=None, title=None):
    """Write one or more side-by-side panels of digit images, one labelled row each.

    panels: {panel title: images [R, C, 28, 28]} (every panel the same R); row_labels: R strings;
    col_labels: optional C strings shown under each column.
    """
    panels = {k: v.reshape(v.shape[0], v.shape[1], 28, 28) for k, v in panels.items()}
    R, C = next(iter(panels.values())).shape[:2]
    cell = 0.42  # inches per digit
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(len(panels) * (C * cell + 0.5) + 0.3, R * cell + 0.9))
    for ax, (name, images) in zip(axes[0], panels.items()):
        ax.imshow(_mosaic(images).numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_yticks(_centres(R), row_labels)
        if col_labels:
            ax.set_xticks(_centres(C), col_labels, fontsize=7)
        else:
            ax.set_xticks([])
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
        if len(panels) > 1 or name:
            ax.set_title(name)
    if title:
        fig.suptitle(title, wrap=True)  # a long title breaks into lines instead of running off the figure
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_loss_curve(path, losses, title="training loss"):
    """Per-step loss (faint) and its moving average over ~1% of the run, log scale."""
    losses = torch.tensor(losses, dtype=torch.float64)
    k = max(1, len(losses) // 100)
    smooth = losses.unfold(0, k, 1).mean(1) if len(losses) >= k else losses
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, color="tab:blue", alpha=0.25, linewidth=0.5, label="per step")
    ax.plot(range(k - 1, k - 1 + len(smooth)), smooth, color="tab:blue", label=f"mean of {k} steps")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE(eps, eps_hat)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_strip_gif(path, frames, zoom=3, ms=150):
    """An animated GIF, one frame per (caption, images [D, 28, 28] uint8): the images side by side, the
    caption above, played forwards and then backwards (Pillow, which matplotlib already needs)."""
    from PIL import Image, ImageDraw

    pictures = []
    for caption, images in frames:
        strip = _mosaic(images[None])  # [32, D * 30 + 2]
        picture = Image.fromarray(strip.numpy()).resize((strip.shape[1] * zoom, strip.shape[0] * zoom), Image.NEAREST)
        canvas = Image.new("L", (picture.width, picture.height + 16), 0)
        canvas.paste(picture, (0, 16))
        ImageDraw.Draw(canvas).text((4, 2), caption, fill=255)
        pictures.append(canvas)
    pictures += pictures[-2:0:-1]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=ms, loop=0)


def save_spectrum(path, energy, ranks, title, max_k=32):
    """Left: the share of dW's energy in its first k directions, one line per layer group (the mean of its
    layers; energy: {group: [layers, k]}). Right: bars of each group's mean rank, one bar per source
    (ranks: {source: {group: mean rank}}), e.g. the full update's effective rank beside AdaLoRA's ranks."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for group, curves in energy.items():
        mean = curves.mean(0)[:max_k]
        left.plot(range(1, len(mean) + 1), mean, marker=".", label=f"{group} ({len(curves)})")
    left.set_xlabel("k, the first k singular directions")
    left.set_ylabel("share of ||dW||^2 kept")
    left.set_ylim(0, 1.02)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    left.set_title("the full fine-tune's update, per layer group")
    groups = list(energy)
    width = 0.8 / max(1, len(ranks))
    for i, (source, by_group) in enumerate(ranks.items()):
        xs = [g + i * width for g in range(len(groups))]
        right.bar(xs, [by_group.get(g, 0) for g in groups], width, label=source)
    right.set_xticks([g + width * (len(ranks) - 1) / 2 for g in range(len(groups))], groups, rotation=20, fontsize=8)
    right.set_ylabel("rank per layer (group mean)")
    right.legend(fontsize=8)
    right.set_title("where the rank goes")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_schedule(path, diffusion, interval=None):
    """alpha_bar_t and SNR_t = alpha_bar_t / (1 - alpha_bar_t) against t, the guidance interval shaded."""
    t = torch.arange(diffusion.T)
    alpha_bar = diffusion.alpha_bar_at(t).flatten().cpu()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.plot(t, alpha_bar, color="tab:blue", label="alpha_bar_t: the share of x_t's variance that is x_0")
    ax.set_xlabel("step t")
    ax.set_ylabel("alpha_bar_t", color="tab:blue")
    snr = ax.twinx()
    snr.semilogy(t, alpha_bar / (1 - alpha_bar), color="tab:red", label="SNR_t")
    snr.set_ylabel("SNR_t = alpha_bar_t / (1 - alpha_bar_t)", color="tab:red")
    if interval:
        ax.axvspan(interval[0], interval[1], color="gray", alpha=0.2, label=f"guidance on t in [{interval[0]}, {interval[1]}]")
    ax.legend(loc="center right", fontsize=8)
    ax.set_title(f"the noise schedule, T = {diffusion.T}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_attention(path, digits, maps, row_labels, title):
    """Where each location looks: per digit (row), the digit, then one panel per head of its attention map,
    each location coloured by the tokens it weighs (a mix of one colour per token), over the digit; the last
    panel averages the heads. digits: [R, 28, 28] uint8; maps: [R, heads, H*W, L] weights."""
    R, heads, n, L = maps.shape
    side, zoom = math.isqrt(n), 28 // math.isqrt(n)  # the map's grid (7 at 7x7) and its pixels per location
    colours = torch.tensor(plt.cm.tab10(range(L))[:, :3], dtype=torch.float32)  # [L, 3]: one colour per token
    maps = torch.cat([maps, maps.mean(1, keepdim=True)], 1).float().cpu()       # [R, heads + 1, n, L]
    rgb = (maps @ colours).view(R, heads + 1, side, side, 3)                    # each location's colour mix
    rgb = rgb.repeat_interleave(zoom, 2).repeat_interleave(zoom, 3)  # [R, heads + 1, 28, 28, 3]
    ink = digits.float().div(255).cpu()[:, None, :, :, None]                     # [R, 1, 28, 28, 1]
    cells = torch.cat([ink.expand(-1, 1, -1, -1, 3), 0.6 * rgb + 0.4 * ink], 1)  # the digit, then the maps over it
    tiles = torch.ones(R, heads + 2, 30, 30, 3)
    tiles[:, :, 1:29, 1:29] = cells
    mosaic = tiles.permute(0, 2, 1, 3, 4).reshape(R * 30, (heads + 2) * 30, 3)
    fig, ax = plt.subplots(figsize=(0.5 * (heads + 2) + 1.2, 0.5 * R + 1.2))
    ax.imshow(mosaic.clamp(0, 1).numpy(), interpolation="nearest")
    ax.set_yticks([15 + 30 * i for i in range(R)], row_labels)
    ax.set_xticks([15 + 30 * i for i in range(heads + 2)], ["x_0"] + [f"head {h}" for h in range(heads)] + ["mean"],
                  fontsize=7, rotation=30)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c.tolist()) for c in colours]
    ax.legend(handles, [f"token {i}" for i in range(L)], fontsize=7, loc="upper center", ncol=L,
              bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax.set_title(title, fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
