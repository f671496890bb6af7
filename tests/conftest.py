"""Shared fixtures: a tiny UNet and a tiny synthetic MNIST written as real IDX files."""
import gzip
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.unet import UNet  # noqa: E402

TINY = dict(channels=(16, 32, 32), attn_levels=(1, 2), heads=2, context_tokens=3, context_dim=16)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return UNet(**TINY)


def fake_digits(n, seed=0):
    """n uint8 28x28 images whose bright bar's position encodes the label, plus the labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = (torch.rand(n, 28, 28, generator=g) * 40).to(torch.uint8)
    for i, y in enumerate(labels.tolist()):
        images[i, 2 + 2 * y:5 + 2 * y, 4:24] = 255
    return images, labels


def write_idx(folder, images, labels, train=True):
    """Write uint8 images [N,28,28] and labels [N] as gzipped MNIST IDX files (LeCun's format: a big-endian
    magic number, the sizes, then the bytes), as the repo ships them."""
    os.makedirs(folder, exist_ok=True)
    split = "train" if train else "t10k"
    n = len(images)
    with gzip.open(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"), "wb") as f:
        f.write((2051).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
        f.write(images.to(torch.uint8).contiguous().numpy().tobytes())
    with gzip.open(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"), "wb") as f:
        f.write((2049).to_bytes(4, "big") + n.to_bytes(4, "big"))
        f.write(labels.to(torch.uint8).contiguous().numpy().tobytes())


@pytest.fixture
def data_dir(tmp_path):
    """A data folder in torchvision's layout with 64 training and 20 test images, .gz only."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    write_idx(raw, *fake_digits(64), train=True)
    write_idx(raw, *fake_digits(20, seed=1), train=False)
    return str(tmp_path / "data")
