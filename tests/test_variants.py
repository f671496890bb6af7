"""The LoRA family (rsLoRA, LoRA+, DoRA) and v-prediction pass the same checks as plain LoRA and eps."""
import math
import os

import pytest
import torch

import lora_finetune
import train
from harness.files import fingerprint, load_lora, load_model, save_lora
from model.adapters import inject_lora, merge_lora, param_groups, set_lora, unmerge_lora
from model.attention import CrossAttention
from model.diffusion import Diffusion
from model.dora import DoraConv2d, DoraLayer
from model.lora import LoraLayer
from model.unet import UNet

from conftest import TINY
from test_lora import base_model, run

VARIANTS = [dict(variant="lora"), dict(variant="lora", rslora=True), dict(variant="dora")]


def adapted(targets=("attn", "conv"), **variant):
    """A tiny base model and a copy with an adapter of `variant` whose tensors are all moved off their init."""
    base, model = base_model(frozen=True), base_model()
    layers = inject_lora(model, targets, rank=4, alpha=8, **variant)
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in layers.values():
            for p in layer.parameters(recurse=False):
                p.add_(0.05 * torch.randn_like(p))
    return base, model, layers


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_every_variant_starts_bit_identical_to_the_base(variant):
    base, model = base_model(frozen=True), base_model()
    inject_lora(model, ("attn", "conv"), rank=4, alpha=8, **variant)
    assert torch.equal(run(model), run(base))


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_every_variant_merges_and_unmerges_exactly(variant):
    base, model, _ = adapted(**variant)
    unmerged = run(model)
    assert not torch.allclose(unmerged, run(base), atol=1e-3)  # the adapter does something
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    assert torch.allclose(run(model), unmerged, atol=1e-5)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-6), k
    set_lora(model, enabled=False)  # unmerged and switched off: the base again (LoRA's W0 + dW - dW to rounding)
    assert torch.allclose(run(model), run(base), atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_every_variant_round_trips_through_the_adapter_file(variant, tmp_path):
    base, model, layers = adapted(**variant)
    config = dict(rank=4, alpha=8, targets=["attn", "conv"], style="bold", **variant)
    save_lora(tmp_path / "a.pt", layers, config, fingerprint(base), step=1)
    fresh = base_model()
    adapter, loaded = load_lora(fresh, tmp_path / "a.pt")
    assert adapter["config"]["variant"] == variant["variant"]
    assert all(isinstance(l, DoraLayer | DoraConv2d) == (variant["variant"] == "dora") for l in loaded.values())
    assert torch.equal(run(fresh), run(model))


def test_rslora_scales_by_alpha_over_sqrt_r():
    plain, rs = LoraLayer(torch.nn.Linear(16, 16), rank=4, alpha=8), LoraLayer(torch.nn.Linear(16, 16), rank=4, alpha=8, rslora=True)
    assert plain.gamma == 2.0 and rs.gamma == 8 / math.sqrt(4)


def test_dora_is_magnitude_times_direction_with_the_norm_detached():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5)
    layer = DoraLayer(linear, rank=2, alpha=2.0)
    assert torch.equal(layer.magnitude, linear.weight.norm(dim=1))  # m starts at the row norms of W0
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.magnitude.mul_(torch.linspace(0.5, 2, 5))
    x = torch.randn(3, 6)
    W = linear.weight + layer.lora_B @ layer.lora_A  # alpha / r = 1
    expected = x @ (layer.magnitude[:, None] * W / W.norm(dim=1, keepdim=True)).T + linear.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    # The norm is a constant for the gradient (DoRA sec. 4.3): the gradient of the formula with it detached.
    layer(x).sum().backward()
    B = layer.lora_B.detach().clone().requires_grad_()
    W = linear.weight + B @ layer.lora_A.detach()
    (x @ (layer.magnitude.detach()[:, None] * W / W.norm(dim=1, keepdim=True).detach()).T).sum().backward()
    assert torch.allclose(layer.lora_B.grad, B.grad, atol=1e-6)
    # A scale blends both parts from the base: m0 + s (m - m0) and s B A. Scale 0 is the base itself.
    layer.scale = 0.5
    m = layer.m0 + 0.5 * (layer.magnitude - layer.m0)
    W = linear.weight + 0.5 * layer.lora_B @ layer.lora_A
    assert torch.allclose(layer(x), x @ (m[:, None] * W / W.norm(dim=1, keepdim=True)).T + linear.bias, atol=1e-6)
    layer.scale = 0.0
    assert torch.equal(layer(x), linear(x))
    with pytest.raises(ValueError, match="stacked"):
        DoraLayer(LoraLayer(torch.nn.Linear(6, 5), rank=2), rank=2)


def test_lora_plus_gives_b_its_own_learning_rate_through_training(data_dir, tmp_path):
    base = str(tmp_path / "model.pt")
    train.main(["--data-dir", data_dir, "--out", base, "--channels", "16,32,32", "--batch-size", "16",
                "--max-steps", "2", "--device", "cpu", "--figures", str(tmp_path / "fig")])
    out = str(tmp_path / "plus.pt")
    lora_finetune.main(["--base", base, "--out", out, "--data-dir", data_dir, "--max-steps", "3", "--batch-size", "16",
                        "--targets", "attn", "--lr", "1e-3", "--lr-ratio", "16", "--warmup", "1", "--device", "cpu",
                        "--figures", str(tmp_path / "fig")])
    groups = torch.load(lora_finetune.resume_path(out), weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 16.0]
    assert groups[1]["lr"] == pytest.approx(16 * groups[0]["lr"]) and groups[0]["lr"] > 0
    model, _, _ = load_model(base)
    n = 3 * sum(isinstance(m, CrossAttention) for m in model.modules())  # w_q, w_k, w_v of each
    assert n > 0 and len(groups[1]["params"]) == n and len(groups[0]["params"]) == n  # B of each; A of each
    layers = inject_lora(model, ("attn",), rank=8)
    a, b = param_groups(layers, 1e-3, 16)
    assert all(p.shape[1] == 8 for p in b["params"]) and b["lr"] == 16e-3


def test_v_prediction_reads_back_the_same_x0_as_eps_prediction():
    d_eps, d_v = Diffusion(T=1000), Diffusion(T=1000, prediction="v")
    torch.manual_seed(0)
    x_0, eps = torch.rand(4, 1, 28, 28) * 2 - 1, torch.randn(4, 1, 28, 28)
    for t in (0, 250, 999):
        tt = torch.full((4,), t)
        x_t = d_eps.q_sample(x_0, tt, eps)
        v = d_v.velocity(x_0, tt, eps)
        assert torch.allclose(d_v.eps_from(x_t, t, v), eps, atol=1e-4)  # v read back as eps
        x0_eps = d_eps.predict_x0(x_t, t, d_eps.eps_from(x_t, t, eps))
        x0_v = d_v.predict_x0(x_t, t, d_v.eps_from(x_t, t, v))
        assert torch.allclose(x0_eps, x0_v, atol=2e-3 if t == 999 else 1e-4)


def test_v_prediction_trains_on_v_and_is_recorded(data_dir, tmp_path):
    d = Diffusion(T=100, prediction="v")
    x_0 = torch.rand(8, 1, 28, 28) * 2 - 1

    def oracle(x_t, t, y):  # knows x_0, so it can compute the true v from x_t: the loss must be zero
        alpha_bar = d.alpha_bar_at(t)
        eps = (x_t - alpha_bar.sqrt() * x_0) / (1 - alpha_bar).sqrt()
        return d.velocity(x_0, t, eps)

    oracle.config = dict(num_classes=10)
    assert d.loss(oracle, x_0, torch.zeros(8, dtype=torch.long), min_snr_gamma=5.0) < 1e-8
    out = str(tmp_path / "v.pt")
    train.main(["--data-dir", data_dir, "--out", out, "--channels", "16,32,32", "--batch-size", "16",
                "--max-steps", "2", "--device", "cpu", "--prediction", "v", "--figures", str(tmp_path / "fig")])
    _, diffusion, ckpt = load_model(out)
    assert diffusion.prediction == "v" and ckpt["train"]["prediction"] == "v"
    with pytest.raises(ValueError, match="prediction"):
        Diffusion(prediction="x0")


def test_the_lora_ablation_trains_and_scores_each_row(data_dir, tmp_path, monkeypatch):
    import ablate
    base = str(tmp_path / "model.pt")
    train.main(["--data-dir", data_dir, "--out", base, "--channels", "16,32,32", "--batch-size", "16",
                "--max-steps", "2", "--device", "cpu", "--figures", str(tmp_path / "fig")])
    monkeypatch.setattr(ablate, "LORA_RUNS", {"LoRA rank=8 (preset)": [], "DoRA rank=8": ["--variant", "dora"]})
    monkeypatch.setattr(ablate, "STYLES", ("bold",))
    out = tmp_path / "ablation.md"
    text = ablate.main(["lora", "--base", base, "--data-dir", data_dir, "--per-digit", "1", "--device", "cpu",
                        "--work", str(tmp_path / "work"), "--flags", "--max-steps 1 --batch-size 16",
                        "--classifier", os.path.join(os.path.dirname(ablate.__file__), "pretrained", "classifier.pt"),
                        "--out", str(out)])
    assert out.read_text() == text and "`--max-steps 1 --batch-size 16`" in text
    rows = {line.split(" | ")[0]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    lora, dora = rows["| LoRA rank=8 (preset)"], rows["| DoRA rank=8 (`--variant dora`)"]
    assert int(dora[1].replace(",", "")) > int(lora[1].replace(",", ""))  # DoRA adds one magnitude per output
    assert torch.load(tmp_path / "work" / "bold-1.pt", weights_only=True)["config"]["variant"] == "dora"
    assert lora[4].endswith("MiB") and lora[5].count("%") == 2  # peak memory; gap closed and accuracy
    common = ["lora", "--base", base, "--data-dir", data_dir, "--per-digit", "1", "--device", "cpu", "--work",
              str(tmp_path / "work"), "--out", str(out)]
    before = out.read_text()
    for flags, match in (("--rank 0", "would fail: argument --rank"), ("--dropout 0.1", "DoRA rank=8' takes no --dropout"),
                         ("--out x.pt", "sets --out itself")):  # refused before any run starts
        with pytest.raises(ValueError, match=match):
            ablate.main([*common, "--flags", flags])
    with pytest.raises(ValueError, match="lora_finetune.py .* failed: error: .*rank"):  # a run that fails: one line
        ablate.main([*common, "--flags", "--rank 100 --max-steps 1 --batch-size 16"])
    assert out.read_text() == before


def test_the_quant_ablation_scores_each_4bit_model_and_the_adapters_on_it(data_dir, tmp_path, monkeypatch):
    import ablate
    base = str(tmp_path / "model.pt")
    train.main(["--data-dir", data_dir, "--out", base, "--channels", "16,32,32", "--batch-size", "16",
                "--max-steps", "2", "--device", "cpu", "--figures", str(tmp_path / "fig")])
    monkeypatch.setattr(ablate, "QUANT_RUNS", {"default": [], "every layer, blocks of 32": ["--keep", "none", "--block", "32"]})
    monkeypatch.setattr(ablate, "QLORA_STYLES", ("bold",))
    common = ["quant", "--base", base, "--data-dir", data_dir, "--per-digit", "1", "--device", "cpu", "--work",
              str(tmp_path / "work"), "--out", str(tmp_path / "quant.md"),
              "--classifier", os.path.join(os.path.dirname(ablate.__file__), "pretrained", "classifier.pt")]
    with pytest.raises(ValueError, match="sets --base itself"):
        ablate.main([*common, "--flags", "--base x.pt"])
    text = ablate.main([*common, "--flags", "--max-steps 1 --batch-size 16"])
    rows = {line.split(" | ")[0]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert float(rows["| default"][1]) < 4.2 < float(rows["| every layer, blocks of 32 (`--keep none --block 32`)"][1])
    assert torch.load(tmp_path / "work" / "nf4-1.pt", weights_only=True)["quantized"]["block"] == 32
    bold = [line for line in text.splitlines() if line.startswith("| bold |")]
    assert len(bold) == 3 and "merged into NF4" in text and "batch 32" in text  # the forward times


def test_the_dit_ablation_gives_each_design_the_unets_seconds(data_dir, tmp_path, monkeypatch):
    import ablate
    monkeypatch.setattr(ablate, "DIT_RUNS", {"UNet": [], "DiT, in-context": ["--backbone", "dit", "--label-in", "in-context"]})
    monkeypatch.setattr(ablate, "DIT_LORA_RUNS", {"MLP": ["--targets", "mlp"]})
    monkeypatch.setattr(ablate, "STYLES", ("bold",))
    common = ["dit", "--data-dir", data_dir, "--per-digit", "1", "--device", "cpu", "--work", str(tmp_path / "work"),
              "--out", str(tmp_path / "dit.md"), "--figures", str(tmp_path / "fig"),
              "--classifier", os.path.join(os.path.dirname(ablate.__file__), "pretrained", "classifier.pt")]
    with pytest.raises(ValueError, match="sets --backbone itself"):
        ablate.main([*common, "--flags", "--backbone unet"])
    text = ablate.main([*common, "--flags", "--total-steps 2 --batch-size 16"])
    rows = {line.split(" | ")[0]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    unet, dit, preset = rows["| UNet"], rows["| DiT, in-context"], rows["| DiT preset (adaLN-Zero)"]
    assert unet[1] == preset[1] == "2" and int(dit[1].replace(",", "")) >= 1  # its steps: the UNet's seconds at its speed
    assert torch.load(tmp_path / "work" / "dit-1.pt", weights_only=True)["config"]["label_in"] == "in-context"
    assert float(dit[7]) < float(unet[7])  # GFLOP a forward: the small DiT is cheaper than the UNet
    assert rows["| MLP (`--targets mlp`)"][2].count("%") == 2 and "LoRA off" in text
    assert os.path.getsize(tmp_path / "fig" / "dit_designs.png") > 1000


def test_the_lowrank_study_scores_the_full_fine_tune_its_cuts_the_trained_loras_and_adalora(data_dir, tmp_path, monkeypatch):
    import ablate
    base = str(tmp_path / "model.pt")
    train.main(["--data-dir", data_dir, "--out", base, "--channels", "16,32,32", "--batch-size", "16",
                "--max-steps", "2", "--device", "cpu", "--figures", str(tmp_path / "fig")])
    monkeypatch.setattr(ablate, "LOWRANK_RANKS", (1, 2))
    monkeypatch.setattr(ablate, "STYLES", ("bold",))
    common = ["lowrank", "--base", base, "--data-dir", data_dir, "--per-digit", "1", "--device", "cpu", "--work",
              str(tmp_path / "work"), "--out", str(tmp_path / "lowrank.md"), "--figures", str(tmp_path / "fig"),
              "--classifier", os.path.join(os.path.dirname(ablate.__file__), "pretrained", "classifier.pt")]
    with pytest.raises(ValueError, match="sets --variant itself"):
        ablate.main([*common, "--flags", "--variant dora"])
    text = ablate.main([*common, "--flags", "--total-steps 10 --batch-size 16"])
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert {"full fine-tune (`--variant full`)", "cut from the full fine-tune at r=1", "LoRA trained at r=2",
            "AdaLoRA 12 -> 8 (`--variant adalora`)"} <= set(rows)
    cut, trained = rows["cut from the full fine-tune at r=2"], rows["LoRA trained at r=2"]
    assert cut[1] == trained[1] and cut[2] == ""  # the same size; a cut is not trained
    assert int(rows["full fine-tune (`--variant full`)"][1].replace(",", "")) > int(trained[1].replace(",", ""))
    assert "| attention |" in text and os.path.getsize(tmp_path / "fig" / "lowrank_bold.png") > 1000
    assert torch.load(tmp_path / "work" / "bold-cut1.pt", weights_only=True)["config"]["extracted_from"] == "bold-full.pt"
