"""The hand-written adapters against peft's LoRA tuner, number for number (fp32, CPU).

Our LoRA, rsLoRA and DoRA layers, with their A, B (and magnitude) copied into peft's `LoraModel` under the
names peft uses (`harness.files.peft_state_dict`), give the same outputs and the same merged weights as
`merge_and_unload`. Where the two differ by design: our `scale` (denoise.py --lora-scale) blends a DoRA
adapter's magnitude from the base's as well as its direction, while peft's scale multiplies only the
low-rank term; both are the trained adapter at scale 1, which is what is compared.
"""
import copy
import json

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

from harness.files import adapter_tensors, export_peft, fingerprint, load_lora, peft_state_dict, save_lora
from model.adapters import inject_lora, merge_lora
from model.unet import UNet

from conftest import TINY

RANK, ALPHA = 3, 5.0
VARIANTS = {"lora": dict(variant="lora"), "rslora": dict(variant="lora", rslora=True), "dora": dict(variant="dora")}


class Layers(nn.Module):
    """One Linear and one strided Conv2d, named as the UNet names the layers LoRA adapts."""

    def __init__(self):
        super().__init__()
        self.w_q = nn.Linear(12, 10)
        self.conv1 = nn.Conv2d(4, 6, 3, stride=2, padding=1)

    def forward(self, x, image):
        return self.w_q(x), self.conv1(image)


def trained_like(layers, seed=0):
    """Give every adapter tensor random values, as training would: B non-zero, a magnitude off ||W0||."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            if hasattr(layer, "magnitude"):
                layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))


def ours_and_peft(name):
    torch.manual_seed(0)
    base = Layers()
    ours = copy.deepcopy(base)
    layers = inject_lora(ours, ("w_q", "conv1"), RANK, ALPHA, **VARIANTS[name])
    trained_like(layers)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["w_q", "conv1"],
                        use_rslora=VARIANTS[name].get("rslora", False), use_dora=name == "dora")
    theirs = get_peft_model(copy.deepcopy(base), config)
    result = set_peft_model_state_dict(theirs, peft_state_dict(adapter_tensors(layers)))
    assert not result.unexpected_keys
    return ours, theirs, base


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 12, generator=g), torch.randn(2, 4, 9, 9, generator=g)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_adapted_layers_compute_what_peft_computes(name):
    ours, theirs, base = ours_and_peft(name)
    with torch.no_grad():
        for a, b, plain in zip(ours(*inputs()), theirs(*inputs()), base(*inputs())):
            assert (a - b).abs().max() < 1e-5, name
            assert (a - plain).abs().max() > 1e-2, name  # and the adapter does act


@pytest.mark.parametrize("name", list(VARIANTS))
def test_merged_weights_are_peft_merge_and_unload(name):
    ours, theirs, _ = ours_and_peft(name)
    merge_lora(ours)
    merged = theirs.merge_and_unload()
    for path in ("w_q", "conv1"):
        w_ours = getattr(ours, path).weight
        w_theirs = getattr(merged, path).weight
        assert (w_ours - w_theirs).abs().max() < 1e-5, (name, path)


def test_rslora_and_lora_differ_as_alpha_over_sqrt_rank_against_alpha_over_rank():
    """The check above would pass if both sides ignored rsLoRA: show the two scalings give other outputs."""
    (lora, _, _), (rs, _, _) = ours_and_peft("lora"), ours_and_peft("rslora")
    x = inputs()
    assert (lora(*x)[0] - rs(*x)[0]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_an_exported_adapter_loads_in_peft_onto_the_unet(name, tmp_path):
    """An adapter file, written in peft's layout, loads with PeftModel.from_pretrained onto a UNet of its
    base and gives the eps_hat our own loading gives."""
    torch.manual_seed(0)
    base = UNet(**TINY).eval()
    trained = copy.deepcopy(base)
    layers = inject_lora(trained, ("attn", "conv"), RANK, ALPHA, **VARIANTS[name])
    trained_like(layers)
    adapter = str(tmp_path / "adapter.pt")
    save_lora(adapter, layers, dict(rank=RANK, alpha=ALPHA, targets=["attn", "conv"], style="bold", **VARIANTS[name]),
              fingerprint(base), step=1)
    export_peft(adapter, str(tmp_path / "peft"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == RANK and config["use_dora"] == (name == "dora")
    ours = copy.deepcopy(base)
    load_lora(ours, adapter)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([5, 400, 900]), torch.tensor([1, 7, 10])
    with torch.no_grad():
        assert (ours(x, t, y) - theirs(x, t, y)).abs().max() < 1e-5
        assert (ours(x, t, y) - base(x, t, y)).abs().max() > 1e-3  # and the adapter changes eps_hat
