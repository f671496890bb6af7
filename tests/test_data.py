"""MNIST loading: the shipped real data, a synthetic IDX set, and shuffled batches."""
import os

import torch

from model.data import batches, load_mnist, to_uint8

from conftest import fake_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_mnist_loads_as_one_tensor():
    images, labels = load_mnist(os.path.join(ROOT, "data"), train=True)
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() == 1
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # MNIST's original order
    test_images, _ = load_mnist(os.path.join(ROOT, "data"), train=False)
    assert test_images.shape == (10000, 1, 28, 28)


def test_synthetic_idx_round_trip(data_dir):
    images, labels = load_mnist(data_dir, train=True)
    raw, raw_labels = fake_digits(64)
    assert torch.equal(to_uint8(images[:, 0]), raw) and torch.equal(labels, raw_labels)


def test_batches_cover_an_epoch_once():
    images, labels = torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10)
    seen = [y for _, y in batches(images, labels, 3, torch.Generator().manual_seed(0))]
    assert [len(y) for y in seen] == [3, 3, 3]  # the short last batch is dropped
    flat = torch.cat(seen)
    assert len(set(flat.tolist())) == 9 and flat.tolist() != sorted(flat.tolist())
    later = [y for _, y in batches(images, labels, 3, torch.Generator().manual_seed(0), start=1)]
    assert torch.equal(torch.cat(later), flat[3:])  # `start` skips batches of the same shuffle
