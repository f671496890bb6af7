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
    # Checksums of the pixels: the same digits, whichever reader reads them.
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


def test_the_gz_files_are_unpacked_once_for_torchvision_and_bad_ones_are_refused(data_dir):
    raw = os.path.join(data_dir, "MNIST", "raw")
    images, labels = load_mnist(data_dir, train=True)
    for name in IDX_FILES:  # torchvision reads the plain files: unpacked beside the .gz, the same bytes
        with gzip.open(os.path.join(raw, name + ".gz")) as f:
            assert open(os.path.join(raw, name), "rb").read() == f.read()
    os.remove(os.path.join(raw, IDX_FILES[0] + ".gz"))  # once unpacked, the .gz is no longer read
    again, again_labels = load_mnist(data_dir, train=True)
    assert torch.equal(again, images) and torch.equal(again_labels, labels)
    image_file = os.path.join(raw, IDX_FILES[0])
    data = open(image_file, "rb").read()
    open(image_file, "wb").write((2049).to_bytes(4, "big") + data[4:])  # a label file's magic number
    with pytest.raises(ValueError, match="corrupt"):
        load_mnist(data_dir, train=True)
    os.remove(image_file)
    with pytest.raises(FileNotFoundError, match="MNIST not found"):
        load_mnist(data_dir, train=True)
    open(os.path.join(raw, IDX_FILES[0] + ".gz"), "wb").write(b"this is not gzip")
    with pytest.raises(ValueError, match="corrupt"):
        load_mnist(data_dir, train=True)
    assert not os.path.exists(image_file)  # no half-unpacked file left behind under the name torchvision reads


def test_batches_cover_each_epoch_once_and_resume_where_they_stopped():
    images, labels = torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10)
    stream = batches(images, labels, 3, seed=0)
    seen = [next(stream)[1] for _ in range(6)]  # two epochs of three batches: the short last one is dropped
    assert [len(y) for y in seen] == [3] * 6
    first, second = torch.cat(seen[:3]), torch.cat(seen[3:])
    assert len(set(first.tolist())) == 9 and first.tolist() != sorted(first.tolist())
    assert not torch.equal(first, second)  # each epoch its own shuffle
    later = batches(images, labels, 3, seed=0, start=2)  # a run resumed at step 2 sees what step 2 on saw
    assert all(torch.equal(next(later)[1], y) for y in seen[2:])
