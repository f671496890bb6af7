"""evaluate.py: FID behaves like a distance, and class accuracy is computed per requested digit."""
import json

import numpy as np
import pytest
import torch

import evaluate
from harness import metrics
from harness.files import fingerprint, save_file
from model.data import load_mnist
from harness.metrics import classify, frechet_distance, gaussian, label_weights, score, train_classifier

from conftest import fake_digits


def test_fid_is_zero_for_identical_sets_and_large_for_different_ones():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-8
    b = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    assert frechet_distance(a, b) < 0.05                        # two samples of one distribution
    assert abs(frechet_distance(a, b * 2 + 1) - 16) < 0.5      # 8 * 1^2 (means) + 8 * (1 + 4 - 2*2) (covs)


def test_weighted_moments():
    """A weight acts like a repeated row for the mean; the covariance is the weighted sum of squared deviations
    with the reliability-weights correction, so unit weights give the ordinary covariance."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 3, generator=g, dtype=torch.float64)
    w = torch.tensor([3.0, 1, 1, 1, 1, 1], dtype=torch.float64)
    mu, cov = gaussian(f, w)
    assert torch.allclose(mu, torch.cat([f[:1], f[:1], f]).mean(0))
    d = f - mu
    assert torch.allclose(cov, (w[:, None] * d).T @ d / (w.sum() - w.pow(2).sum() / w.sum()))
    assert torch.allclose(gaussian(f, torch.ones(6, dtype=torch.float64))[1], torch.cov(f.T))


def test_the_reference_is_weighted_to_the_samples_label_mix():
    # Reference: two tight clusters, digit 0 nine times as frequent as digit 1. Samples: the same clusters,
    # half and half. Unweighted, the mix alone looks like a large distance; weighted, it is ~0.
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    ref_labels = torch.tensor([0] * 9000 + [1] * 1000)
    ref = centres[ref_labels] + torch.randn(10000, 2, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1] * 2000)
    samples = centres[labels] + torch.randn(4000, 2, generator=g, dtype=torch.float64)
    weights = label_weights(labels, ref_labels)
    assert torch.allclose(weights[ref_labels == 0].sum(), weights[ref_labels == 1].sum())  # 50/50 now
    assert frechet_distance(samples, ref) > 5
    assert frechet_distance(samples, ref, weights) < 0.05
    one_digit = label_weights(torch.tensor([1, 1, 1]), ref_labels)  # samples of one digit: only its images count
    assert one_digit[ref_labels == 0].abs().sum() == 0
    assert frechet_distance(samples[labels == 1], ref, one_digit) < 0.05


def _classifier(data_dir):
    images, labels = load_mnist(data_dir, train=True)
    torch.manual_seed(0)
    return train_classifier(images, labels, epochs=40, batch_size=16, lr=3e-3, augment=False), images, labels


def test_accuracy_and_fid_on_a_tiny_synthetic_set(data_dir):
    model, images, labels = _classifier(data_dir)
    reference = classify(model, images)[1]
    real = score(model, images, labels, reference, labels)
    assert real["accuracy"] == 1.0 and set(real["per_digit"]) == set(range(10))
    assert abs(real["fid"]) < 1e-6  # 64 samples in 128-d: a rank-deficient covariance (metrics.py: why 1e-6 holds)
    wrong = score(model, images, (labels + 1) % 10, reference, labels)   # right images, wrong requested digits
    assert wrong["accuracy"] == 0.0
    noise = score(model, torch.rand_like(images) * 2 - 1, labels, reference, labels)
    assert noise["fid"] > 10 * max(real["fid"], 1e-3) and noise["fid"] > 1.0


def test_evaluate_scores_an_exported_npz(data_dir, tmp_path, capsys):
    model, _, _ = _classifier(data_dir)
    classifier = str(tmp_path / "classifier.pt")
    save_file(dict(kind=metrics.CLASSIFIER_KIND, model=model.state_dict(), test_accuracy=1.0), classifier)
    images, labels = fake_digits(30, seed=5)
    npz = str(tmp_path / "s.npz")
    np.savez_compressed(npz, images=images.numpy(), labels=labels.numpy())
    evaluate.main(["--samples", npz, "--classifier", classifier, "--data-dir", data_dir, "--device", "cpu",
                   "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["accuracy"] == 1.0 and result["n"] == 30 and result["fid_floor"] >= 0
    assert result["classifier_fingerprint"] == fingerprint(model)  # which classifier scored it
    evaluate.main(["--samples", npz, "--classifier", classifier, "--data-dir", data_dir, "--device", "cpu"])
    assert "| accuracy % |" in capsys.readouterr().out


def test_the_floor_uses_real_images_with_the_samples_labels(data_dir, tmp_path, monkeypatch):
    model, _, _ = _classifier(data_dir)
    classifier = str(tmp_path / "classifier.pt")
    save_file(dict(kind=metrics.CLASSIFIER_KIND, model=model.state_dict(), test_accuracy=1.0), classifier)
    judge = metrics.Judge(classifier, data_dir, torch.device("cpu"))
    judge.reference()  # the test set's features, computed once before we count the floor's draws
    drawn = []
    real_classify = metrics.classify
    monkeypatch.setattr(metrics, "classify", lambda m, x: drawn.append(x) or real_classify(m, x))
    labels = torch.tensor([2, 2, 2, 7, 7, 9])
    floor = judge.floor(labels)
    assert len(drawn) == metrics.FLOOR_DRAWS and floor >= 0
    train_images, train_labels = judge.train_images, judge.train_labels
    for x in drawn:  # every draw: 3 real twos, 2 sevens, 1 nine, no image twice
        rows = [int((train_images.flatten(1) == img.flatten()).all(1).nonzero()[0]) for img in x]
        assert sorted(train_labels[rows].tolist()) == [2, 2, 2, 7, 7, 9] and len(set(rows)) == 6
    assert judge.floor(labels[torch.randperm(6)]) == floor and len(drawn) == metrics.FLOOR_DRAWS  # cached


def test_the_committed_classifier_is_the_one_everyone_scores_with():
    """pretrained/classifier.pt is the default of evaluate.py and bench.py: its weights and its accuracy."""
    import bench
    from model.styles import apply_style

    assert evaluate.parse_args([]).classifier == bench.parse_args([]).classifier == "pretrained/classifier.pt"
    model, accuracy = metrics.get_classifier("pretrained/classifier.pt", "data", torch.device("cpu"))
    assert fingerprint(model) == "7876a84d3f121bb1"
    images, labels = load_mnist("data", train=False)
    measured = float((metrics.classify(model, images)[0] == labels).double().mean())
    assert measured == pytest.approx(accuracy, abs=1e-4) and measured >= 0.995  # it can tell 99% from 99.5%
    for style in ("bold", "italic", "inverted"):  # and it reads the styled digits the adapters draw
        styled = float((metrics.classify(model, apply_style(style, images[:2000]))[0] == labels[:2000]).double().mean())
        assert styled > 0.985, style


def test_no_classifier_is_trained_or_cached_on_too_little_data(data_dir, tmp_path):
    with pytest.raises(ValueError, match="refusing to train"):
        metrics.get_classifier(str(tmp_path / "c.pt"), data_dir, torch.device("cpu"))  # 64 fake digits
    assert not (tmp_path / "c.pt").exists()
