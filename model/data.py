"""MNIST as one tensor on the training device.

torchvision's `MNIST` reads the four IDX files of LeCun's MNIST page from `<data-dir>/MNIST/raw/`. The
repo ships them gzipped; torchvision reads them unpacked (with `download=True` it would check them
against its own copies' checksums and go to the network), so `unpack` gunzips each once beside its
`.gz` (git ignores the unpacked copies). `load_mnist` then keeps one split as a single tensor:

    images: [N, 1, 28, 28] float in [-1, 1]  (the diffusion model's pixel range; 0 is mid-grey)
    labels: [N] int64 in 0..9

Batches are drawn by indexing that tensor with a shuffled permutation, so the training loop never touches
PIL images, Python lists or a DataLoader worker: on a GPU an epoch is a few hundred index operations.
"""
import gzip
import os
import shutil

import torch
from torchvision.datasets import MNIST

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def unpack(raw_dir):
    """Gunzip each `name.gz` in `raw_dir` to `name` unless `name` is there already."""
    for name in IDX_FILES:
        path = os.path.join(raw_dir, name)
        if os.path.exists(path):
            continue
        if not os.path.exists(path + ".gz"):
            raise FileNotFoundError(f"MNIST not found: expected {name}.gz (or {name}) in {raw_dir} "
                                    "(torchvision's layout: <data-dir>/MNIST/raw/)")
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with gzip.open(path + ".gz", "rb") as packed, open(tmp, "wb") as out:
                shutil.copyfileobj(packed, out)
            os.replace(tmp, path)  # never a half-written file under the name torchvision reads
        except (OSError, EOFError) as e:  # not gzip, cut short, or a folder we cannot write
            if os.path.exists(tmp):
                os.remove(tmp)
            raise ValueError(f"cannot unpack {path}.gz ({e}); the file may be corrupt, or the folder read-only")


def load_mnist(data_dir="data", train=True, device="cpu"):
    """Return (images [N,1,28,28] in [-1,1], labels [N]) of one MNIST split, on `device`."""
    raw_dir = os.path.join(data_dir, "MNIST", "raw")
    unpack(raw_dir)
    try:
        mnist = MNIST(data_dir, train=train, download=False)
    except Exception as e:  # torchvision checks the IDX header: a damaged file fails here
        raise ValueError(f"cannot read MNIST in {raw_dir} ({e}); a file may be corrupt: delete the unpacked "
                         "files there to unpack the .gz again")
    pixels, labels = mnist.data, mnist.targets  # uint8 [N,28,28], int64 [N]
    if len(pixels) != len(labels) or len(pixels) == 0 or pixels.shape[1:] != (28, 28) or labels.max() > 9:
        raise ValueError(f"MNIST in {raw_dir} is not 28x28 digits with labels 0-9; a file may be corrupt")
    images = from_uint8(pixels.to(device).unsqueeze(1))  # [N,1,28,28] in [-1,1]
    return images, labels.to(device)


def from_uint8(pixels):
    """uint8 pixels 0..255 -> floats in [-1,1]: the diffusion model's range, with 0 in the middle."""
    return pixels.float() / 127.5 - 1.0


def to_uint8(x):
    """[-1,1] floats -> uint8 pixels 0..255 (0 = black background), the inverse of from_uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def batches(images, labels, batch_size, seed=0, start=0):
    """Shuffled (x_0, y) batches of `batch_size`, epoch after epoch, without end, from step `start` on.

    Epoch e is shuffled by a generator seeded with (seed, e), so the batches from step k on are the same
    whether the run started at 0 or was stopped at k and resumed. The last, smaller batch of an epoch is
    dropped: every step has the same shape (no recompilation under torch.compile), at the cost of at most
    one batch of an epoch's worth of data.
    """
    steps_per_epoch = len(images) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the data set ({len(images)} images)")
    epoch, skip = divmod(start, steps_per_epoch)
    while True:
        generator = torch.Generator(device=images.device).manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(len(images), device=images.device, generator=generator)
        for i in range(skip, steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            yield images[idx], labels[idx]
        epoch, skip = epoch + 1, 0
