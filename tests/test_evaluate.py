"""evaluate.py: FID behaves like a distance, and class accuracy is computed per requested digit."""
import json

import numpy as np
import torch

import evaluate
from model.checkpoint import save_file
from model.data import load_mnist
from model.metrics import classify, frechet_distance, score, train_classifier

from conftest import fake_digits


def test_fid_is_zero_for_identical_sets_and_large_for_different_ones():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-8
    b = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    assert frechet_distance(a, b) < 0.05                        # two samples of one distribution
    assert abs(frechet_distance(a, b * 2 + 1) - 16) < 0.5      # 8 * 1^2 (means) + 8 * (1 + 4 - 2*2) (covs)


def _classifier(data_dir):
    images, labels = load_mnist(data_dir, train=True)
    torch.manual_seed(0)
    return train_classifier(images, labels, epochs=40, batch_size=16, lr=3e-3, max_shift=0), images, labels


def test_accuracy_and_fid_on_a_tiny_synthetic_set(data_dir):
    model, images, labels = _classifier(data_dir)
    reference = classify(model, images)[1]
    real = score(model, images, labels, reference)
    assert real["accuracy"] == 1.0 and set(real["per_digit"]) == set(range(10))
    assert abs(real["fid"]) < 1e-3  # 64 samples in 128-d: a rank-deficient covariance, float error only
    wrong = score(model, images, (labels + 1) % 10, reference)   # right images, wrong requested digits
    assert wrong["accuracy"] == 0.0
    noise = score(model, torch.rand_like(images) * 2 - 1, labels, reference)
    assert noise["fid"] > 10 * max(real["fid"], 1e-3) and noise["fid"] > 1.0


def test_evaluate_scores_an_exported_npz(data_dir, tmp_path, capsys):
    model, _, _ = _classifier(data_dir)
    classifier = str(tmp_path / "classifier.pt")
    save_file(dict(kind=evaluate.CLASSIFIER_KIND, model=model.state_dict(), test_accuracy=1.0), classifier)
    images, labels = fake_digits(30, seed=5)
    npz = str(tmp_path / "s.npz")
    np.savez_compressed(npz, images=images.numpy(), labels=labels.numpy())
    evaluate.main(["--samples", npz, "--classifier", classifier, "--data-dir", data_dir, "--device", "cpu",
                   "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["accuracy"] == 1.0 and result["n"] == 30 and result["fid_floor"] >= 0
    evaluate.main(["--samples", npz, "--classifier", classifier, "--data-dir", data_dir, "--device", "cpu"])
    assert "| accuracy % |" in capsys.readouterr().out
