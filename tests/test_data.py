"""MNIST loading: the shipped real data, a synthetic IDX set, and shuffled batches."""
import gzip
import os

import pytest
import torch

from model.data import IDX_FILES, batches, load_mnist, to_uint8

from conftest import fake_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_mnist_loads_as_one_tensor():
    images, labels = load_mnist(os.path.join(ROOT, "data"), train=True)
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() == 1
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # MNIST's original order
    # Checksums of the same files as read by torchvision's MNIST class: the hand-written reader agrees.
    pixels = to_uint8(images).long()
    assert int(pixels.sum()) == 1_567_298_545 and int((pixels[:, 0] * torch.arange(28)).sum()) == 21_952_829_280
    assert torch.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    test_images, test_labels = load_mnist(os.path.join(ROOT, "data"), train=False)
    assert test_images.shape == (10000, 1, 28, 28) and int(to_uint8(test_images).long().sum()) == 264_923_200
    assert torch.bincount(test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_synthetic_idx_round_trip(data_dir):
    images, labels = load_mnist(data_dir, train=True)
    raw, raw_labels = fake_digits(64)
    assert torch.equal(to_uint8(images[:, 0]), raw) and torch.equal(labels, raw_labels)


def test_unpacked_idx_files_read_the_same_and_bad_ones_are_refused(data_dir):
    raw = os.path.join(data_dir, "MNIST", "raw")
    images, labels = load_mnist(data_dir, train=True)
    for name in IDX_FILES[True]:  # unpack both: the plain files are read in place of the .gz
        with gzip.open(os.path.join(raw, name + ".gz")) as f, open(os.path.join(raw, name), "wb") as out:
            out.write(f.read())
        os.remove(os.path.join(raw, name + ".gz"))
    unpacked, unpacked_labels = load_mnist(data_dir, train=True)
    assert torch.equal(unpacked, images) and torch.equal(unpacked_labels, labels)
    image_file = os.path.join(raw, IDX_FILES[True][0])
    data = open(image_file, "rb").read()
    open(image_file, "wb").write(data[:-1])  # one pixel short
    with pytest.raises(ValueError, match="corrupt"):
        load_mnist(data_dir, train=True)
    open(image_file, "wb").write((2049).to_bytes(4, "big") + data[4:])  # a label file's magic number
    with pytest.raises(ValueError, match="not an MNIST IDX file"):
        load_mnist(data_dir, train=True)
    os.remove(image_file)
    with pytest.raises(FileNotFoundError, match="MNIST not found"):
        load_mnist(data_dir, train=True)


def test_batches_cover_an_epoch_once():
    images, labels = torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10)
    seen = [y for _, y in batches(images, labels, 3, torch.Generator().manual_seed(0))]
    assert [len(y) for y in seen] == [3, 3, 3]  # the short last batch is dropped
    flat = torch.cat(seen)
    assert len(set(flat.tolist())) == 9 and flat.tolist() != sorted(flat.tolist())
    later = [y for _, y in batches(images, labels, 3, torch.Generator().manual_seed(0), start=1)]
    assert torch.equal(torch.cat(later), flat[3:])  # `start` skips batches of the same shuffle
