"""Measuring samples: class accuracy and FID, both through a small MNIST classifier.

"Are these digits good?" becomes two numbers:

  * class accuracy: the share of samples for digit d that a strong classifier (its accuracy on MNIST test is reported beside every score)
    labels d. It measures fidelity to the label, and rewards guidance.
  * FID in the classifier's feature space (Heusel et al. 2017): fit a Gaussian to the 128-d penultimate
    features of the samples and of the MNIST test set and take the Frechet distance

        FID = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1^1/2 S_2 S_1^1/2)^1/2)

    It measures whether the samples are distributed like real digits -- diversity as well as quality.
    Inception-v3 features would be the ImageNet convention; on 28x28 digits an MNIST classifier's own
    features are the meaningful space.

The reference must hold the same digits as the samples. The test set is not balanced (892 fives, 1,135
ones), while we ask for 1,000 of each; and in a classifier's features every digit is its own tight cluster,
so the mix of digits alone moves the mean and covariance (docs/experiments.md has the measurement). So the
test set is weighted, image by image, to the samples' label mix (`label_weights`); a run of one digit is then
compared with real images of that digit only, not with the whole test set.

The number means little alone, so we report it beside the "real-data floor": the same FID for real
*training* images with the same labels as the samples -- what a perfect generator would score.

`Judge` puts the pieces together for evaluate.py and bench.py: the classifier (trained once, then cached),
the test set's features, and the floor of each label mix.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from model.data import batches, from_uint8, load_mnist, to_uint8
from model.styles import STYLE_NAMES, apply_style
from model.training import autocast

from .files import fingerprint, load_file, save_file

CLASSIFIER_KIND = "mnist-classifier"
FLOOR_DRAWS = 5
MIN_TRAINING_IMAGES = 10_000


# ---- how much of a style an image has ------------------------------------------------------------

def ink(x):
    """bold: the share of pixels brighter than mid-grey."""
    return (x > 0).float().mean(dim=(1, 2, 3))  # [N]


def slant(x):
    """italic: -cov(col, row) / var(row) of the ink, from image moments (0 upright, > 0 leaning right)."""
    w = (x[:, 0] + 1) / 2                                             # [N, 28, 28] ink weights in [0, 1]
    rows = torch.arange(28, device=x.device, dtype=w.dtype)[:, None]  # [28, 1]
    cols = torch.arange(28, device=x.device, dtype=w.dtype)[None, :]  # [1, 28]
    mass = w.sum(dim=(1, 2)).clamp(min=1e-6)
    r_mean = (w * rows).sum(dim=(1, 2)) / mass
    c_mean = (w * cols).sum(dim=(1, 2)) / mass
    dr, dc = rows - r_mean[:, None, None], cols - c_mean[:, None, None]
    cov = (w * dr * dc).sum(dim=(1, 2)) / mass
    var = (w * dr * dr).sum(dim=(1, 2)) / mass
    return -cov / var.clamp(min=1e-6)  # [N]; rows grow downwards, so a right lean has cov < 0


def brightness(x):
    """inverted: the mean pixel value in [0, 1]."""
    return ((x + 1) / 2).mean(dim=(1, 2, 3))  # [N]


STYLE_METRICS = {"bold": ("ink", ink), "italic": ("slant", slant), "inverted": ("brightness", brightness)}


def style_metric(name, images):
    """(metric name, its mean over images [N,1,28,28])."""
    metric_name, metric = STYLE_METRICS[name]
    return metric_name, float(metric(images).mean())


def gap_closed(off, on, target):
    """Share of the way from `off` to `target` that `on` went: 0 = no change, 1 = all the way."""
    return (on - off) / (target - off) if target != off else float("nan")


# ---- how closely a ControlNet's digits follow their controls ---------------------------------------

def control_f1(given, drawn, tolerance=0):
    """F1 of control pixels, per image, then the mean: the control computed from each drawn digit against the
    control it was given, both [N, 1, 28, 28] in {0, 1}. A pixel counts as matched if the other image has one
    within `tolerance` pixels (0: exactly there), as ControlNet++ (Li et al. 2024) scores edges."""
    near = lambda c: F.max_pool2d(c, 2 * tolerance + 1, 1, tolerance) if tolerance else c
    precision = (drawn * near(given)).sum((1, 2, 3)) / drawn.sum((1, 2, 3)).clamp(min=1)
    recall = (given * near(drawn)).sum((1, 2, 3)) / given.sum((1, 2, 3)).clamp(min=1)
    return float((2 * precision * recall / (precision + recall).clamp(min=1e-12)).mean())


# ---- class accuracy and FID ----------------------------------------------------------------------

class Classifier(nn.Module):
    """Three conv stages (28 -> 14 -> 7) with batch norm, and an MLP; `features` is the 128-d layer FID is
    computed in."""

    def __init__(self):
        super().__init__()
        conv = lambda c_in, c_out: [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.conv = nn.Sequential(
            *conv(1, 32), *conv(32, 32), nn.MaxPool2d(2),                          # [B, 32, 14, 14]
            *conv(32, 64), *conv(64, 64), nn.MaxPool2d(2),                         # [B, 64, 7, 7]
            *conv(64, 128), nn.Flatten(),                                          # [B, 128 * 7 * 7]
            nn.Linear(128 * 7 * 7, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU())  # [B, 128]
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def features(self, x):
        return self.conv(x)

    def forward(self, x):
        return self.head(self.features(x))


def random_affine(x, generator, degrees=10.0, scale=0.1, shift=2.0):
    """Each digit turned by up to `degrees`, scaled by up to 1 +- `scale` and moved by up to `shift` pixels:
    the handwriting a generator may draw that MNIST's centred digits do not show."""
    n = len(x)
    u = lambda: torch.rand(n, generator=generator, device=x.device) * 2 - 1  # uniform in [-1, 1]
    angle, zoom = u() * degrees * torch.pi / 180, 1 + u() * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, u() * shift / 14], 1), torch.stack([sin, cos, u() * shift / 14], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [N, 28, 28, 2]
    return F.grid_sample(x + 1, grid, align_corners=False) - 1  # +1/-1: the border it fills in 0 is background


def train_classifier(images, labels, epochs=8, batch_size=128, lr=3e-3, seed=0, augment=True):
    """AdamW with a one-cycle schedule; each digit randomly turned, scaled and moved (`random_affine`, unless
    `augment` is off), and drawn in a random style (styles.py, 'none' included) so that it also reads the
    styled digits a LoRA adapter learns to draw."""
    torch.manual_seed(seed)
    device = images.device
    model = Classifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(total, 1))
    generator = torch.Generator(device=device).manual_seed(seed)
    model.train()
    for _, (x, y) in zip(tqdm(range(total), desc="classifier", unit="step"), batches(images, labels, batch_size, seed)):
        x = random_affine(x, generator) if augment else x
        styled = torch.stack([apply_style(name, x) for name in STYLE_NAMES])  # [styles, B, 1, 28, 28]
        pick = torch.randint(len(STYLE_NAMES), (len(x),), device=device, generator=generator)
        x = styled[pick, torch.arange(len(x), device=device)]
        with autocast(device):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.inference_mode()
def classify(model, images, batch_size=2000):
    """images [N,1,28,28] in [-1,1] -> (predicted labels [N], features [N,128] float64)."""
    preds, feats = [], []
    for x in images.split(batch_size):
        with autocast(x.device):
            f = model.features(x)
            preds.append(model.head(f).argmax(1))
        feats.append(f.double())
    return torch.cat(preds), torch.cat(feats)


def _sqrtm_psd(c):
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    w, v = torch.linalg.eigh(c)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def gaussian(features, weights=None):
    """Mean [D] and covariance [D, D] of features [N, D]; with weights [N], of the weighted set."""
    if weights is None:
        return features.mean(0), torch.cov(features.T)
    return weights @ features / weights.sum(), torch.cov(features.T, aweights=weights)


def label_weights(labels, reference_labels):
    """Weights [M] that give a reference set with labels [M] the label mix of samples with labels [N].

    Image i of the reference weighs (share of its digit among the samples) / (count of its digit in the
    reference); digits the samples do not ask for weigh 0.
    """
    n_classes = int(max(labels.max(), reference_labels.max())) + 1
    share = torch.bincount(labels, minlength=n_classes).double() / len(labels)
    count = torch.bincount(reference_labels, minlength=n_classes).double()
    return (share / count.clamp(min=1))[reference_labels]


def frechet_distance(f1, f2, weights2=None):
    """FID between feature sets [N1, D] and [N2, D] (float64); `weights2` [N2] weighs the second set."""
    (mu1, c1), (mu2, c2) = gaussian(f1), gaussian(f2, weights2)
    # Tr (S1^1/2 S2 S1^1/2)^1/2 is the sum of the singular values of S1^1/2 S2^1/2 (that matrix times its
    # transpose is S1^1/2 S2 S1^1/2). Why singular values, not square roots of eigenvalues: with fewer samples
    # than dimensions a covariance is rank-deficient, and an eigenvalue that should be 0 comes out as a
    # rounding error whose square root is far larger. Two identical sets of 64 features in 128-d scored
    # -0.001 that way and 3e-11 this way; on full-rank sets the two agree to 1e-12 relative.
    cross = torch.linalg.svdvals(_sqrtm_psd(c1) @ _sqrtm_psd(c2)).sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(c1) + torch.trace(c2) - 2 * cross)


def score(model, images, labels, reference_features, reference_labels):
    """Class accuracy (overall and per digit) of samples in [-1,1], and their FID against reference features
    weighted to the samples' label mix.

    The samples are scored as 8-bit images, like the real digits they are compared with and like the PNGs
    and .npz files denoise.py writes: digits drawn from a checkpoint then score exactly what the same digits
    exported and read back score.
    """
    images = from_uint8(to_uint8(images))  # [N,1,28,28], rounded to 256 levels
    preds, feats = classify(model, images)
    correct = (preds == labels).double()
    per_digit = {d: float(correct[labels == d].mean()) for d in labels.unique().tolist()}
    fid = frechet_distance(feats, reference_features, label_weights(labels, reference_labels))
    return dict(accuracy=float(correct.mean()), per_digit=per_digit, fid=fid, n=len(images))


def get_classifier(path, data_dir, device, epochs=8):
    """Load the cached classifier, or train it on MNIST train and cache it. Returns (model, test accuracy)."""
    if os.path.exists(path):
        ckpt = load_file(path, CLASSIFIER_KIND, device)
        model = Classifier().to(device)
        try:
            model.load_state_dict(ckpt["model"])
        except (KeyError, RuntimeError):
            raise ValueError(f"{path} is a classifier of another version of metrics.py; point --classifier at "
                             "pretrained/classifier.pt, or at a path that does not exist to train one there")
        return model.eval(), ckpt["test_accuracy"]
    images, labels = load_mnist(data_dir, train=True, device=device)
    if len(images) < MIN_TRAINING_IMAGES:  # a classifier trained on a handful of digits would judge nothing
        raise ValueError(f"refusing to train the evaluation classifier on {len(images):,} images (it needs at least "
                         f"{MIN_TRAINING_IMAGES:,}); point --classifier at a trained one, e.g. pretrained/classifier.pt")
    model = train_classifier(images, labels, epochs=epochs)
    test_images, test_labels = load_mnist(data_dir, train=False, device=device)
    accuracy = float((classify(model, test_images)[0] == test_labels).float().mean())
    save_file(dict(kind=CLASSIFIER_KIND, model=model.state_dict(), test_accuracy=accuracy), path)
    print(f"trained the classifier: {100 * accuracy:.2f}% on MNIST test; cached at {path}")
    return model, accuracy


class Judge:
    """The classifier, the (styled) test sets' features, and real-data floors (computed once per label mix)."""

    def __init__(self, classifier_path, data_dir, device):
        self.classifier, self.test_accuracy = get_classifier(classifier_path, data_dir, device)
        # FIDs are comparable only under one classifier: every report carries this hash of its weights.
        self.fingerprint = fingerprint(self.classifier)
        self.train_images, self.train_labels = load_mnist(data_dir, train=True, device=device)
        self.test_images, self.test_labels = load_mnist(data_dir, train=False, device=device)
        self._references, self._floors = {}, {}

    def reference(self, style="none"):
        """Features of the MNIST test set drawn in `style`: what samples of that style are compared with."""
        if style not in self._references:
            self._references[style] = classify(self.classifier, apply_style(style, self.test_images))[1]
        return self._references[style]

    def floor(self, labels, style="none", draws=FLOOR_DRAWS):
        """What a perfect generator would score: real training images (in `style`) with the same labels as
        the samples, scored against the same weighted test set. The mean of `draws` random draws: a single
        draw varies too much to be the denominator of a ratio (docs/experiments.md)."""
        counts = torch.bincount(labels, minlength=10).tolist()
        key = (style, tuple(counts))
        if key not in self._floors:
            weights = label_weights(labels, self.test_labels)
            by_digit = [(self.train_labels == d).nonzero().flatten() for d in range(len(counts))]
            generator = torch.Generator().manual_seed(0)
            fids = []
            for _ in range(draws):
                pick = torch.cat([idx[torch.randperm(len(idx), generator=generator)[:n].to(idx.device)]
                                  for idx, n in zip(by_digit, counts)])
                features = classify(self.classifier, apply_style(style, self.train_images[pick]))[1]
                fids.append(frechet_distance(features, self.reference(style), weights))
            self._floors[key] = sum(fids) / draws
        return self._floors[key]

    def __call__(self, images, labels, style="none"):
        """Scores samples [N,1,28,28] in [-1,1] with labels [N] against real digits in `style`; adds the floor."""
        result = score(self.classifier, images, labels, self.reference(style), self.test_labels)
        result["fid_floor"] = self.floor(labels, style)
        return result

    def style_report(self, style, off, on, labels):
        """How far an adapter moved samples toward `style`: its metric for real MNIST, real styled MNIST (the
        target), LoRA off and LoRA on (same seeds), the share of the gap closed, and accuracy and FID against
        real styled digits for off and on."""
        metric_name, _ = style_metric(style, off[:1])
        test = self.test_images
        real = style_metric(style, test)[1]
        target = style_metric(style, apply_style(style, test))[1]
        target_accuracy = float((classify(self.classifier, apply_style(style, test))[0] == self.test_labels).double().mean())
        off_score, on_score = self(off, labels, style), self(on, labels, style)
        off_metric, on_metric = style_metric(style, off)[1], style_metric(style, on)[1]
        return dict(style=style, metric=metric_name, real=real, target=target, target_accuracy=target_accuracy,
                    off=dict(off_score, value=off_metric), on=dict(on_score, value=on_metric),
                    gap_closed=gap_closed(off_metric, on_metric, target))
