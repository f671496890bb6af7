"""The low-rank study: full fine-tuning as an adapter, the spectrum rule, LoRA cut from a full update, AdaLoRA."""
import os

import pytest
import torch
import torch.nn as nn

import denoise
import lora_extract
import lora_finetune
from harness.files import load_lora, load_model
from model.adalora import AdaLoraConv2d, AdaLoraLayer, RankAllocator, orthogonality
from model.adapters import inject_lora, merge_lora, set_lora, unmerge_lora
from model.lora import LoraConv2d, LoraLayer
from model.lowrank import FullUpdate, effective_rank, energy_captured, singular_values, truncate
from test_scripts import _cli, _one_line_error, _train


def _layers():
    torch.manual_seed(0)
    return nn.Linear(12, 10), nn.Conv2d(4, 6, 3, padding=1)


def _inputs():
    return torch.randn(5, 12), torch.randn(2, 4, 7, 7)


def test_full_update_starts_as_the_base_and_is_the_layer_with_w0_plus_dw():
    for layer, x in zip(_layers(), _inputs()):
        full = FullUpdate(layer)
        assert torch.equal(full(x), layer(x))  # dW = 0 at the start: bit-identical
        with torch.no_grad():
            full.delta.normal_()
        plain = type(layer)(*layer.weight.shape[1::-1], *([3] if layer.weight.dim() == 4 else []),
                            **(dict(padding=1) if layer.weight.dim() == 4 else {}))
        plain.load_state_dict(dict(weight=layer.weight + full.delta, bias=layer.bias))
        torch.testing.assert_close(full(x), plain(x))
        full.scale = 0.0
        assert torch.equal(full(x), layer(x))
        full.scale = 1.0
        merged_before = full(x)
        full.merge()
        torch.testing.assert_close(full(x), merged_before, atol=1e-5, rtol=1e-5)
        full.unmerge()
        torch.testing.assert_close(full(x), merged_before, atol=1e-5, rtol=1e-5)
        full.enabled = False
        torch.testing.assert_close(full(x), layer(x), atol=1e-5, rtol=1e-5)


def test_effective_rank_is_the_energy_rule():
    sigma = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: tails 5/14, 1/14, 0
    torch.testing.assert_close(energy_captured(sigma), torch.tensor([9 / 14, 13 / 14, 1.0]))
    assert effective_rank(sigma, 0.4) == 1 and effective_rank(sigma, 0.1) == 2 and effective_rank(sigma, 0.01) == 3
    assert effective_rank(torch.zeros(4), 0.1) == 0
    low = torch.randn(20, 3) @ torch.randn(3, 30)  # rank 3 exactly
    assert effective_rank(singular_values(low), 1e-6) == 3


def test_truncation_is_the_best_rank_r_update_and_loads_as_a_lora():
    torch.manual_seed(1)
    for shape, kind in (((10, 12), LoraLayer), ((6, 4, 3, 3), LoraConv2d)):
        dW = torch.randn(shape)
        sigma = singular_values(dW)
        for r in (1, 3):
            A, B = truncate(dW, r)
            layer = kind(nn.Linear(12, 10) if len(shape) == 2 else nn.Conv2d(4, 6, 3, padding=1), rank=r, alpha=r)
            with torch.no_grad():
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B)
            error = (layer.delta_weight() - dW).flatten().norm() ** 2
            torch.testing.assert_close(error, (sigma[r:] ** 2).sum(), rtol=1e-4, atol=1e-4)  # Eckart-Young
        A, B = truncate(dW, len(sigma))
        torch.testing.assert_close((B.flatten(1) @ A.flatten(1)).view(shape), dW, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="outside"):
            truncate(dW, len(sigma) + 1)


def test_full_fine_tune_trains_only_dw_and_a_lora_cut_from_it_round_trips(data_dir, tmp_path):
    ckpt = _train(data_dir, tmp_path, "--max-steps", "2")
    full, cut = str(tmp_path / "full.pt"), str(tmp_path / "cut.pt")
    tune = ["--base", ckpt, "--data-dir", data_dir, "--batch-size", "16", "--device", "cpu", "--figures", str(tmp_path)]
    lora_finetune.main([*tune, "--out", full, "--variant", "full", "--max-steps", "3"])
    saved = torch.load(full, weights_only=True)
    base, _, _ = load_model(ckpt)
    weights = dict(base.named_parameters())
    assert saved["config"]["variant"] == "full" and all(k.endswith(".delta") for k in saved["tensors"])
    for key, dW in saved["tensors"].items():
        assert dW.shape == weights[key.replace(".delta", ".weight")].shape and dW.abs().sum() > 0
    # Cut at the narrowest layer's full width, the LoRA *is* the full update: the same model, number for number.
    out = lora_extract.main(["--full", full, "--base", ckpt, "--rank", "16", "--out", cut])
    assert any(line.startswith("| attention") for line in out["lines"])
    with_full, _, _ = load_model(ckpt)
    _, full_layers = load_lora(with_full, full)
    with_cut, _, _ = load_model(ckpt)
    _, cut_layers = load_lora(with_cut, cut)
    assert isinstance(next(iter(full_layers.values())), FullUpdate) and cut_layers.keys() == full_layers.keys()
    for path, layer in full_layers.items():
        dW, cut_dW = layer.delta_weight(), cut_layers[path].delta_weight()
        if min(dW.flatten(1).shape) <= 16:  # the narrowest layers are kept whole
            torch.testing.assert_close(cut_dW, dW, atol=1e-5, rtol=1e-4)
    info = denoise.main(["--ckpt", ckpt, "--lora", cut, "--compare", "--steps", "2", "--per-digit", "1",
                         "--device", "cpu", "--process", "", "--figures", str(tmp_path)])
    assert not torch.equal(info["images"], info["off"])
    _one_line_error(_cli("lora_extract.py", "--full", cut, "--base", ckpt), "not a full fine-tune")
    _one_line_error(_cli("lora_extract.py", "--full", full, "--base", ckpt, "--rank", "17", "--out",
                         str(tmp_path / "x.pt")), "at most 16")
    _one_line_error(_cli("lora_extract.py", "--full", full, "--base", ckpt, "--out", cut), "already exists")
    _one_line_error(_cli("lora_finetune.py", *tune, "--out", str(tmp_path / "f2.pt"), "--variant", "full",
                         "--rank", "4"), "do not apply")


# ---- AdaLoRA -----------------------------------------------------------------------------------

def test_adalora_starts_as_the_base_and_its_update_is_p_lambda_q():
    for layer, x in zip(_layers(), _inputs()):
        kind = AdaLoraLayer if isinstance(layer, nn.Linear) else AdaLoraConv2d
        ada = kind(layer, rank=3, alpha=6.0)
        assert torch.equal(ada(x), layer(x))  # lambda = 0
        assert ada.lora_A.abs().sum() > 0 and ada.lora_B.abs().sum() > 0  # but P, Q random: lambda has a gradient
        ada(x).sum().backward()
        assert ada.lora_E.grad.abs().sum() > 0
        with torch.no_grad():
            ada.lora_E.copy_(torch.tensor([1.0, -2.0, 0.5]))
        P, Q = ada.lora_B.flatten(1), ada.lora_A.flatten(1)
        expected = (2.0 * P @ torch.diag(ada.lora_E) @ Q).view(layer.weight.shape)
        torch.testing.assert_close(ada.delta_weight(), expected)
        ada.keep(torch.tensor([True, False, True]))
        assert ada.lora_E[1] == 0 and int(ada.kept.sum()) == 2


def test_orthogonality_penalty_is_zero_only_for_orthonormal_factors():
    layer = AdaLoraLayer(nn.Linear(12, 10), rank=3)
    with torch.no_grad():
        layer.lora_B.copy_(torch.linalg.qr(torch.randn(10, 3)).Q)    # P^T P = I
        layer.lora_A.copy_(torch.linalg.qr(torch.randn(12, 3)).Q.T)  # Q Q^T = I
    assert orthogonality([layer]) < 1e-10
    with torch.no_grad():
        layer.lora_A.mul_(2)  # Q Q^T = 4 I: ||3 I||^2 = 27
    torch.testing.assert_close(orthogonality([layer]), torch.tensor(27.0), rtol=1e-4, atol=1e-4)


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_q, self.w_v, self.w_o = nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 8)

    def forward(self, x):
        return self.w_o(torch.tanh(self.w_q(x)[:, :6] * self.w_v(x)))


def test_adalora_budget_and_masks_match_peft_on_the_same_scores():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    plain = nn.Sequential(_Attn(), _Attn())
    ours = nn.Sequential(_Attn(), _Attn())
    ours.load_state_dict(plain.state_dict())
    total, t_init, t_final, every = 40, 5, 10, 3
    config = peft.AdaLoraConfig(init_r=4, target_r=2, tinit=t_init, tfinal=t_final, deltaT=every, total_step=total,
                                lora_alpha=8, target_modules=["w_q", "w_v", "w_o"], lora_dropout=0.0)
    reference = peft.get_peft_model(plain, config)
    layers = inject_lora(ours, ("w_q", "w_v", "w_o"), rank=4, alpha=8.0, variant="adalora")
    with torch.no_grad():  # the same P, lambda, Q: peft keeps lambda as [r, 1]
        for path, layer in layers.items():
            theirs = reference.base_model.model.get_submodule(path)
            layer.lora_A.copy_(theirs.lora_A["default"])
            layer.lora_B.copy_(theirs.lora_B["default"])
            theirs.lora_E["default"].normal_()
            layer.lora_E.copy_(theirs.lora_E["default"].view(-1))
    allocator = RankAllocator(layers, 2, total, t_init, t_final, every)
    peft_allocator = reference.base_model.rankallocator
    assert [allocator.budget(t) for t in range(total + 1)] == [peft_allocator.budget_schedule(t) for t in range(total + 1)]
    x = torch.randn(16, 8)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-4)  # the same update (peft adds 1e-5 to r)
    for t in range(total):
        torch.manual_seed(t)
        x = torch.randn(16, 8)
        for net in (ours, reference):
            net.zero_grad()
            (net(x) ** 2).mean().backward()
        allocator.step(t)
        reference.base_model.update_and_allocate(t)
        for path, layer in layers.items():
            theirs = reference.base_model.model.get_submodule(path).lora_E["default"].view(-1)
            assert torch.equal(layer.lora_E != 0, theirs != 0), (t, path)  # the same triplets masked
    assert sum(allocator.ranks().values()) == 2 * len(layers)


def test_adalora_run_prunes_to_the_budget_keeps_its_factors_orthogonal_and_round_trips(data_dir, tmp_path):
    ckpt = _train(data_dir, tmp_path, "--max-steps", "2")
    adapter = str(tmp_path / "ada.pt")
    tune = ["--base", ckpt, "--data-dir", data_dir, "--batch-size", "16", "--device", "cpu", "--figures", str(tmp_path),
            "--out", adapter, "--variant", "adalora", "--rank", "2", "--init-rank", "4", "--total-steps", "40",
            "--lr", "0.01"]
    lora_finetune.main(tune)
    saved = torch.load(adapter, weights_only=True)
    ranks, tensors = saved["config"]["ranks"], saved["tensors"]
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1  # the budget, unevenly spread
    for path, r in ranks.items():  # masking: exactly the kept triplets have a lambda, in the live and averaged runs
        assert int((tensors[f"{path}.lora_E"] != 0).sum()) == r
    resume = torch.load(adapter + ".resume", weights_only=False)
    assert all(i.abs().sum() > 0 for i in resume["allocator"]["I"])  # importance was scored from the gradients
    model, _, _ = load_model(ckpt)
    _, layers = load_lora(model, adapter)
    assert {p: int(layer.kept.sum()) for p, layer in layers.items()} == ranks
    # The penalty pulls P and Q from their small random start (R = 2 r per layer) towards orthonormal.
    assert orthogonality(layers.values()) < 0.5 * 2 * 4
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([10, 500]), torch.tensor([1, 7])
    with torch.no_grad():
        on = model(x, t, y)
        merge_lora(model)
        torch.testing.assert_close(model(x, t, y), on, atol=1e-4, rtol=1e-4)
        unmerge_lora(model)
        set_lora(model, scale=0.0)
        plain, _, _ = load_model(ckpt)
        torch.testing.assert_close(model(x, t, y), plain(x, t, y), atol=1e-5, rtol=1e-5)
    info = denoise.main(["--ckpt", ckpt, "--lora", adapter, "--compare", "--steps", "2", "--per-digit", "1",
                         "--device", "cpu", "--process", "", "--figures", str(tmp_path)])
    assert not torch.equal(info["images"], info["off"])
    spectrum = str(tmp_path / "spectrum.png")
    full = str(tmp_path / "full.pt")
    lora_finetune.main([*tune[:10], "--out", full, "--variant", "full", "--max-steps", "2"])
    out = lora_extract.main(["--full", full, "--base", ckpt, "--adapters", adapter, "--spectrum", spectrum])
    assert os.path.getsize(spectrum) > 1000 and set(out["ranks"]) >= {"ada.pt"}
    # AdaLoRA stacks on a full update like any adapter: both blend in, and switching both off is the base.
    stacked = denoise.main(["--ckpt", ckpt, "--lora", full, adapter, "--compare", "--steps", "2", "--per-digit", "1",
                            "--device", "cpu", "--process", "", "--figures", str(tmp_path)])
    assert torch.equal(stacked["off"], info["off"]) and not torch.equal(stacked["images"], info["images"])
    _one_line_error(_cli("lora_finetune.py", *tune[:10], "--out", str(tmp_path / "a2.pt"), "--variant", "adalora",
                         "--rank", "4", "--init-rank", "2"), "at least")
    _one_line_error(_cli("lora_finetune.py", *tune[:10], "--out", str(tmp_path / "a3.pt"), "--init-rank", "6"),
                    "--variant adalora")
