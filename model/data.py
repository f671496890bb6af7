"""MNIST as one tensor on the training device.

MNIST comes as four IDX files in `<data-dir>/MNIST/raw/` (torchvision's layout); the repo ships them
gzipped. The format (LeCun's MNIST page) is small enough to read by hand, so no data library is needed:

    bytes 0-3    magic number, big-endian: 2051 for images, 2049 for labels
    bytes 4-7    N, the number of items
    bytes 8-15   images only: rows and columns (28, 28)
    then         N x 28 x 28 unsigned bytes, the pixels row by row (0 = background); or N labels, one byte each

`load_mnist` reads one split and keeps it as a single tensor on the device:

    images: [N, 1, 28, 28] float in [-1, 1]  (the diffusion model's pixel range; 0 is mid-grey)
    labels: [N] int64 in 0..9

Batches are drawn by indexing that tensor with a shuffled permutation, so the training loop never touches
PIL images, Python lists or a DataLoader worker: on a GPU an epoch is a few hundred index operations.
"""
import gzip
import os

import torch


IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def read_idx(raw_dir, name, magic, item_shape):
    """The items of IDX file `name` (or `name.gz`) in `raw_dir`, as a uint8 tensor [N, *item_shape]."""
    path = os.path.join(raw_dir, name)
    if not os.path.exists(path):
        path += ".gz"
    if not os.path.exists(path):
        raise FileNotFoundError(f"MNIST not found: expected {name} or {name}.gz in {raw_dir} "
                                "(torchvision's layout: <data-dir>/MNIST/raw/)")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # not gzip, or cut short
        raise ValueError(f"cannot read {path} ({e}); the file may be corrupt")
    header = 4 * (2 + len(item_shape))  # magic, N, then one size per item dimension
    found_magic, n, *found_shape = (int.from_bytes(data[i:i + 4], "big") for i in range(0, header, 4))
    if (found_magic, tuple(found_shape)) != (magic, item_shape) or len(data) != header + n * item_shape.numel():
        raise ValueError(f"{path} is not an MNIST IDX file of {tuple(item_shape)} items; the file may be corrupt")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).view(n, *item_shape)


def load_mnist(data_dir="data", train=True, device="cpu"):
    """Return (images [N,1,28,28] in [-1,1], labels [N]) of one MNIST split, on `device`."""
    raw_dir = os.path.join(data_dir, "MNIST", "raw")
    image_file, label_file = IDX_FILES[train]
    pixels = read_idx(raw_dir, image_file, IMAGE_MAGIC, torch.Size([28, 28]))  # uint8 [N,28,28]
    labels = read_idx(raw_dir, label_file, LABEL_MAGIC, torch.Size([])).long()  # int64 [N]
    if len(pixels) != len(labels) or len(pixels) == 0:
        raise ValueError(f"MNIST in {raw_dir} has {len(pixels)} images and {len(labels)} labels")
    if labels.max() > 9:
        raise ValueError(f"MNIST labels in {raw_dir} are outside 0..9; the label file may be corrupt")
    images = from_uint8(pixels.to(device).unsqueeze(1))  # [N,1,28,28] in [-1,1]
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
    os.makedirs(folder, exist_ok=True)
    image_name, label_name = IDX_FILES[train]
    n = len(images)
    with gzip.open(os.path.join(folder, image_name + ".gz"), "wb") as f:
        f.write(IMAGE_MAGIC.to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
        f.write(images.to(torch.uint8).contiguous().numpy().tobytes())
    with gzip.open(os.path.join(folder, label_name + ".gz"), "wb") as f:
        f.write(LABEL_MAGIC.to_bytes(4, "big") + n.to_bytes(4, "big"))
        f.write(labels.to(torch.uint8).contiguous().numpy().tobytes())
