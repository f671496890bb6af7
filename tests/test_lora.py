"""LoRA: exact at init, trains only the adapter, merges losslessly, and its file refuses the wrong base."""
import math

import pytest
import torch

from harness.files import adapter_tensors, fingerprint, load_lora, save_file, save_lora
from model.adapters import inject_lora, merge_lora, set_lora, unmerge_lora
from model.diffusion import Diffusion
from model.lora import LoraBase, LoraConv2d, LoraLayer
from model.unet import UNet

from conftest import TINY

X, T, Y = torch.randn(4, 1, 28, 28), torch.tensor([3, 300, 600, 999]), torch.tensor([0, 5, 9, 10])


def run(model):
    """The model's output on fixed inputs. The first call is a warm-up: some CPU backends pick their conv
    kernels on the first call of a shape, and "exactly equal" must compare like with like."""
    with torch.no_grad():
        model.eval()(X, T, Y)
        return model(X, T, Y)


def base_model(seed=0, frozen=False):
    """The tiny UNet; `frozen` like the base weights inside a LoraLayer, so that both run the same CPU
    kernels (some builds pick a different matmul path for weights that need no gradient)."""
    torch.manual_seed(seed)
    return UNet(**TINY).requires_grad_(not frozen)


def trained_lora(steps=10, lr=1e-2, targets=("attn",), seed=1):
    """A base model and a copy with a LoRA adapter trained for a few steps (all in fp32, CPU)."""
    base = base_model(frozen=True)
    model = base_model()
    inject_lora(model, targets, rank=4, alpha=8)
    d = Diffusion(T=100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    torch.manual_seed(seed)
    model.train()
    for _ in range(steps):
        loss = d.loss(model, torch.rand(16, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (16,)), p_uncond=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return base, model


def test_layer_formula_and_init():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5)
    layer = LoraLayer(linear, rank=2, alpha=3.0)
    assert torch.equal(layer.lora_B, torch.zeros(5, 2)) and layer.lora_A.shape == (2, 6)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(6)  # Kaiming-uniform(a=sqrt 5) = U(+-1/sqrt(in))
    assert not linear.weight.requires_grad and not linear.bias.requires_grad
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 6)
    expected = x @ linear.weight.T + linear.bias + (3.0 / 2) * x @ layer.lora_A.T @ layer.lora_B.T
    assert torch.allclose(layer(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="width 5"):  # a rank past the layer's width is no low-rank update
        LoraLayer(torch.nn.Linear(6, 5), rank=6)
    LoraConv2d(torch.nn.Conv2d(1, 16, 3), rank=9)  # a conv's update is 16 x (1 * 3 * 3): rank up to 9, one input channel or not
    with pytest.raises(ValueError, match="width 9"):
        LoraConv2d(torch.nn.Conv2d(1, 16, 3), rank=10)


def test_injection_is_bit_identical_at_init_and_freezes_the_base():
    base, model = base_model(frozen=True), base_model()
    layers = inject_lora(model, ("attn",), rank=4, alpha=4)
    assert len(layers) == 15  # w_q, w_k, w_v in each of the 5 attention blocks
    assert all(torch.equal(l.lora_B, torch.zeros_like(l.lora_B)) for l in layers.values())
    assert torch.equal(run(model), run(base))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert trainable == sum(l.lora_A.numel() + l.lora_B.numel() for l in layers.values())
    assert trainable / total < 0.05
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_training_changes_only_the_adapter_and_wakes_up_w_q_and_w_k():
    base, model = trained_lora()
    base_sd = base.state_dict()
    for name, tensor in model.state_dict().items():
        if name.endswith(("lora_A", "lora_B")):
            continue
        assert torch.equal(tensor, base_sd[name.replace(".base.", ".")]), f"{name} changed"
    for name, tensor in adapter_tensors(adapted(model)).items():
        if name.endswith("lora_B"):  # every B, w_q's and w_k's included, has left zero
            assert tensor.abs().max() > 1e-4, f"{name} did not learn"
    assert not torch.equal(run(model), run(base))


def test_scale_and_disable():
    base, model = trained_lora()
    full = run(model)
    set_lora(model, enabled=True, scale=0.0)
    assert torch.equal(run(model), run(base))
    set_lora(model, enabled=False)  # W0 is back up to rounding: so is the base model's output
    assert (run(model) - run(base)).abs().max() < 1e-5
    set_lora(model, enabled=True, scale=0.5)  # a blend lies strictly between the two
    half = run(model)
    assert not torch.equal(half, full) and not torch.equal(half, run(base))
    set_lora(model, enabled=True, scale=1.0)
    assert torch.equal(run(model), full)


@pytest.mark.parametrize("targets", [("attn",), ("conv",)])
def test_merge_and_unmerge(targets):
    base, model = trained_lora(targets=targets)
    W0 = {n: m.base.weight.clone() for n, m in model.named_modules() if isinstance(m, LoraBase)}
    unmerged = run(model)
    merge_lora(model)
    assert (run(model) - unmerged).abs().max() < 1e-5
    assert not torch.equal(run(model), run(base))
    unmerge_lora(model)
    for n, m in model.named_modules():
        if isinstance(m, LoraBase):
            assert (m.base.weight - W0[n]).abs().max() < 1e-6
    assert (run(model) - unmerged).abs().max() < 1e-5


def adapted(model):
    """{path in the base model: LoRA layer} of a model with one adapter."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraBase)}


def _save_adapter(tmp_path, model, base, targets=("attn",), name="lora.pt", style="bold"):
    path = str(tmp_path / name)
    save_lora(path, adapted(model), dict(rank=4, alpha=8.0, targets=list(targets), style=style), fingerprint(base),
              step=10)
    return path


@pytest.mark.parametrize("targets", [("attn",), ("attn", "conv")])
def test_adapter_file_round_trip(tmp_path, targets):
    base, model = trained_lora(targets=targets)
    path = _save_adapter(tmp_path, model, base, targets)
    fresh = base_model()
    adapter, layers = load_lora(fresh, path)
    assert adapter["step"] == 10 and adapter["config"]["style"] == "bold"
    assert set(adapter["tensors"]) == set(adapter_tensors(adapted(model)))
    assert set(adapter) == {"kind", "config", "base_fingerprint", "step", "tensors", "checksum"}  # nothing else
    assert torch.equal(run(fresh), run(model))


def test_adapter_file_refuses_what_does_not_fit(tmp_path):
    base, model = trained_lora(steps=1)
    path = _save_adapter(tmp_path, model, base)
    with pytest.raises(ValueError, match="different base model"):
        load_lora(base_model(seed=1), path)
    adapter = torch.load(path, weights_only=True)
    adapter["config"]["rank"] = 8  # says rank 8, holds rank-4 tensors (written so, with a checksum to match)
    save_file({k: v for k, v in adapter.items() if k != "checksum"}, tmp_path / "rank.pt")
    with pytest.raises(ValueError, match="shape"):
        load_lora(base_model(), str(tmp_path / "rank.pt"))
    adapter = torch.load(path, weights_only=True)
    adapter["tensors"].pop(next(iter(adapter["tensors"])))
    save_file({k: v for k, v in adapter.items() if k != "checksum"}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="missing"):
        load_lora(base_model(), str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_lora(base_model(), str(tmp_path / "nope.pt"))


def test_conv_lora_is_exact_at_init_and_its_merge_is_one_conv():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, stride=2, padding=1)
    layer = LoraConv2d(conv, rank=2, alpha=3.0)
    x = torch.randn(2, 6, 9, 9)
    assert torch.equal(layer(x), conv(x))  # B = 0: bit-identical
    assert layer.lora_A.shape == (2, 6, 3, 3) and layer.lora_B.shape == (5, 2, 1, 1)
    with torch.no_grad():
        layer.lora_B.normal_()
    merged = torch.nn.functional.conv2d(x, conv.weight + layer.delta_weight(), conv.bias, stride=2, padding=1)
    assert (layer(x) - merged).abs().max() < 1e-5  # 1x1 after kxk = one kxk conv with kernel B A


def test_two_adapters_stack_scale_and_unmerge_exactly(tmp_path):
    base, attn_model = trained_lora(targets=("attn",))
    _, both_model = trained_lora(targets=("attn", "conv"), seed=2)
    first = _save_adapter(tmp_path, attn_model, base, ("attn",), "a.pt", "bold")
    second = _save_adapter(tmp_path, both_model, base, ("attn", "conv"), "b.pt", "italic")
    model = base_model()
    base_fp = fingerprint(model)
    _, layers_a = load_lora(model, first, base_fingerprint=base_fp)
    _, layers_b = load_lora(model, second, base_fingerprint=base_fp)  # w_q etc. now wrap an adapter already
    assert isinstance(layers_b["mid_attn.w_q"].base, LoraLayer)
    with_both = run(model)
    for layer in layers_b.values():
        layer.scale = 0.0
    # the second adapter at scale 0: the first alone, up to float rounding (its convs run as one conv with W0 + 0 dW,
    # which another CPU's kernels may sum in another order)
    assert (run(model) - run(attn_model)).abs().max() < 1e-5
    for layer in layers_b.values():
        layer.scale = 1.0
    assert not torch.equal(with_both, run(attn_model)) and not torch.equal(with_both, run(both_model))
    W0 = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    merge_lora(model)
    assert (run(model) - with_both).abs().max() < 1e-5
    unmerge_lora(model)
    for n, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            assert (m.weight - W0[n]).abs().max() < 1e-6, n
    set_lora(model, enabled=False)  # W0 is back up to rounding: so is the base model's output
    assert (run(model) - run(base)).abs().max() < 1e-5


def test_conv_lora_runs_as_one_conv_with_the_gradients_of_three():
    """The adapted conv is one conv with W0 + dW (lora.py); it must equal W0 x + b + s B A x in value and in the
    gradients A and B receive, and a conv adapter stacked on another keeps both updates."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    layer = LoraConv2d(conv, rank=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 6, 9, 9)
    target = torch.randn(2, 5, 9, 9)
    grads = []
    for forward in (layer.forward, lambda x: LoraBase.forward(layer, x)):  # one conv; W0, A and B separately
        layer.zero_grad()
        out = forward(x)
        (out * target).sum().backward()
        grads.append((out.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    assert layer.one_conv and conv.weight.grad is None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layer, "update", None)  # the one-conv path never runs the thin convs
        assert torch.equal(layer(x), grads[0][0])
    for one, three in zip(*grads):
        assert (one - three).abs().max() < 1e-4 * three.abs().max()
    top = LoraConv2d(layer, rank=2)  # stacked: the top adds its update to what the adapter below computes
    assert not top.one_conv
    with torch.no_grad():
        top.lora_B.normal_()
    expected = conv(x) + layer.update(x) + top.update(x)
    assert (top(x) - expected).abs().max() < 1e-4
