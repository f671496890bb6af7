"""MNIST as one tensor on the training device.

torchvision's `MNIST` class reads the four uncompressed IDX files in `<data-dir>/MNIST/raw/`. The repo
ships the `.gz` originals; `load_mnist` unpacks them once (a torchvision utility) and then keeps the whole
split as a single tensor on the device:

    images: [N, 1, 28, 28] float in [-1, 1]  (the diffusion model's pixel range; 0 is mid-grey)
    labels: [N] int64 in 0..9

Batches are drawn by indexing that tensor with a shuffled permutation, so the training loop never touches
PIL images, Python lists or a DataLoader worker: on a GPU an epoch is a few hundred index operations.
"""
import os

import torch
from torchvision.datasets import MNIST
from torchvision.datasets.utils import extract_archive


IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _unpack(raw_dir):
    """Unpack `name.gz` to `name` next to it when only the compressed file is there.

    torchvision's MNIST checks that all four files exist before it reads either split, so unpack all four.
    """
    for name in IDX_FILES[True] + IDX_FILES[False]:
        path = os.path.join(raw_dir, name)
        if os.path.exists(path):
            continue
        if not os.path.exists(path + ".gz"):
            raise FileNotFoundError(
                f"MNIST not found: expected {name} or {name}.gz in {raw_dir} "
                "(torchvision's layout: <data-dir>/MNIST/raw/)")
        try:
            extract_archive(path + ".gz", raw_dir)
        except (OSError, EOFError) as e:
            raise ValueError(f"cannot unpack {path}.gz ({e}); the file may be corrupt")


def load_mnist(data_dir="data", train=True, device="cpu"):
    """Return (images [N,1,28,28] in [-1,1], labels [N]) of one MNIST split, on `device`."""
    raw_dir = os.path.join(data_dir, "MNIST", "raw")
    _unpack(raw_dir)
    try:
        ds = MNIST(data_dir, train=train, download=False)
    except Exception as e:  # torchvision raises assorted errors on a truncated or foreign IDX file
        raise ValueError(f"cannot read MNIST from {raw_dir}: {e}; the IDX files may be corrupt")
    data, labels = ds.data, ds.targets  # uint8 [N,28,28], int64 [N]
    if data.ndim != 3 or data.shape[1:] != (28, 28) or len(data) != len(labels) or len(data) == 0:
        raise ValueError(f"MNIST in {raw_dir} has unexpected shapes: images {tuple(data.shape)}, "
                        f"labels {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"MNIST labels in {raw_dir} are outside 0..9; the label file may be corrupt")
    images = from_uint8(data.to(device).unsqueeze(1))  # [N,1,28,28] in [-1,1]
    return images, labels.to(device)


def from_uint8(pixels):
    """uint8 pixels 0..255 -> floats in [-1,1]: the diffusion model's range, with 0 in the middle."""
    return pixels.float() / 127.5 - 1.0


def to_uint8(x):
    """[-1,1] floats -> uint8 pixels 0..255 (0 = black background), the inverse of from_uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def batches(images, labels, batch_size, generator=None, start=0):
    """Yield shuffled (x_0, y) batches covering one epoch, from batch number `start` on.

    The last, smaller batch is dropped.

    Dropping it keeps every step the same shape (no recompilation under torch.compile) and costs at most
    one batch of an epoch's worth of data.
    """
    n = len(images)
    perm = torch.randperm(n, device=images.device, generator=generator)
    for i in range(start * batch_size, n - batch_size + 1, batch_size):
        idx = perm[i:i + batch_size]
        yield images[idx], labels[idx]


def write_idx(folder, images, labels, train=True):
    """Write uint8 images [N,28,28] and labels [N] as MNIST IDX files (used by tests to fake a data set)."""
    import gzip

    os.makedirs(folder, exist_ok=True)
    image_name, label_name = IDX_FILES[train]
    n = len(images)
    with gzip.open(os.path.join(folder, image_name + ".gz"), "wb") as f:
        f.write((2051).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
        f.write(images.to(torch.uint8).contiguous().numpy().tobytes())
    with gzip.open(os.path.join(folder, label_name + ".gz"), "wb") as f:
        f.write((2049).to_bytes(4, "big") + n.to_bytes(4, "big"))
        f.write(labels.to(torch.uint8).contiguous().numpy().tobytes())
