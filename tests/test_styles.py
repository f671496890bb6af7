"""Each style's transform moves its own metric the right way on real MNIST digits, and the gap is measured
as documented."""
import math

import pytest
import torch

from harness.metrics import STYLE_METRICS, gap_closed, style_metric
from model.data import load_mnist
from model.styles import STYLE_NAMES, STYLES, apply_style


@pytest.fixture(scope="module")
def digits():
    images, _ = load_mnist("data", train=False)  # the shipped MNIST, real digits
    return images[:500]


@pytest.mark.parametrize("style", list(STYLES))
def test_a_style_moves_its_metric_far_toward_itself(style, digits):
    styled = apply_style(style, digits)
    assert styled.shape == digits.shape and styled.min() >= -1 and styled.max() <= 1
    _, plain = style_metric(style, digits)
    _, target = style_metric(style, styled)
    assert target > plain + {"bold": 0.1, "italic": 0.3, "inverted": 0.6}[style], (plain, target)


def test_the_metrics_read_what_they_say(digits):
    assert style_metric("bold", digits)[1] == pytest.approx(float((digits > 0).float().mean()))
    upright = -torch.ones(1, 1, 28, 28)
    upright[0, 0, 4:24, 13:15] = 1  # a vertical bar
    leaning = apply_style("italic", upright)
    assert abs(style_metric("italic", upright)[1]) < 1e-6 and style_metric("italic", leaning)[1] > 0.3
    assert style_metric("inverted", -torch.ones(2, 1, 28, 28))[1] == 0.0


def test_none_is_plain_mnist_and_unknown_styles_are_refused(digits):
    assert apply_style("none", digits) is digits and STYLE_NAMES[0] == "none"
    with pytest.raises(ValueError, match="unknown style"):
        apply_style("gothic", digits)


def test_gap_closed():
    assert gap_closed(off=0.1, on=0.2, target=0.3) == pytest.approx(0.5)
    assert gap_closed(off=0.1, on=0.1, target=0.3) == 0 and math.isnan(gap_closed(0.2, 0.3, 0.2))
