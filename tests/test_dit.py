"""The Diffusion Transformer (model/dit.py): patches, adaLN-Zero's identity at start, the zero final layer, the
three ways the label gets in, and a DiT checkpoint through the scripts."""
import pytest
import torch

import controlnet_train
import denoise
import lora_finetune
import quantize
import train
from harness.files import load_model
from model.diffusion import Diffusion
from model.dit import LABEL_IN, AdaLNZeroBlock, DiT, patchify, unpatchify
from model.ema import EMA
from model.training import train_step

TINY_DIT = dict(patch=7, width=16, depth=2, heads=2)


def tiny_dit(label_in, seed=0):
    torch.manual_seed(seed)
    return DiT(label_in=label_in, **TINY_DIT)


def steps(model, n, seed=0):
    """n real training steps (model/training.py) on random digits-shaped data, at a high learning rate."""
    g = torch.Generator().manual_seed(seed)
    x_0, y = torch.rand(16, 1, 28, 28, generator=g) * 2 - 1, torch.arange(16) % 10
    diffusion, ema = Diffusion(T=100), EMA(model, 0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(n):
        train_step(model, diffusion, optimizer, ema, x_0, y, step, 1e-2, p_uncond=0.0, min_snr_gamma=5.0,
                   t_sampling="uniform")
    return model


def test_patchify_cuts_row_major_patches_and_unpatchify_undoes_it():
    x = torch.randn(3, 1, 28, 28)
    for p in (2, 4, 7, 14):
        tokens = patchify(x, p)
        assert tokens.shape == (3, (28 // p) ** 2, p * p)
        assert torch.equal(tokens[:, 1], x[:, 0, :p, p:2 * p].flatten(1))  # the second patch: top row, next along
        assert torch.equal(unpatchify(tokens, p, 28), x)


def test_the_positions_are_fixed_and_tell_every_patch_apart():
    model = DiT(patch=4, width=32)
    assert "pos" not in model.state_dict()  # computed, not learned or stored
    assert model.pos.shape == (49, 32) and len({tuple(row.tolist()) for row in model.pos}) == 49


def test_an_adaln_zero_block_is_exactly_the_identity_at_start():
    torch.manual_seed(0)
    block = AdaLNZeroBlock(16, heads=2)
    x, c = torch.randn(4, 9, 16), torch.randn(4, 16)
    assert torch.equal(block(x, c, None), x)
    with torch.no_grad():
        block.ada.bias[-16:] = 1.0  # open the MLP's gate alpha: now the block adds something
    assert not torch.equal(block(x, c, None), x)


@pytest.mark.parametrize("label_in", LABEL_IN)
def test_the_zero_final_layer_predicts_eps_hat_zero_at_step_zero(label_in):
    model = tiny_dit(label_in)
    out = model(torch.randn(5, 1, 28, 28), torch.randint(0, 1000, (5,)), torch.arange(5))
    assert out.shape == (5, 1, 28, 28) and torch.equal(out, torch.zeros_like(out))


def test_at_the_first_step_only_the_final_layer_learns():
    """The final linear layer is zero, so no gradient passes back through it: at step one everything before it
    gets a zero gradient, which Adam turns into no update at all (facebookresearch/DiT issue 82 asks why)."""
    model = tiny_dit("adaln-zero")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps(model, 1)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"final.linear.weight", "final.linear.bias"}


@pytest.mark.parametrize("label_in", LABEL_IN)
def test_every_design_reads_the_label_once_trained(label_in):
    """A few steps in (after the final layer opens, above), the prediction depends on the label in each design:
    cut the label's way in from any of them and this fails."""
    model = steps(tiny_dit(label_in), 3)
    x_t, t = torch.randn(2, 1, 28, 28), torch.tensor([500, 500])
    with torch.no_grad():
        a, b = model(x_t, t, torch.tensor([3, 3])), model(x_t, t, torch.tensor([5, 5]))
    assert (a - b).abs().max() > 1e-4


def test_a_controlnet_cannot_steer_a_dit():
    with pytest.raises(ValueError, match="skip"):
        tiny_dit("adaln-zero")(torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                              control=[torch.zeros(1)])


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="does not divide"):
        DiT(patch=5)
    with pytest.raises(ValueError, match="multiple of 4"):
        DiT(width=30)
    with pytest.raises(ValueError, match="label design"):
        DiT(label_in="concat")


DIT_FLAGS = ["--backbone", "dit", "--patch", "7", "--width", "16", "--depth", "1", "--batch-size", "16", "--device", "cpu"]


def test_a_dit_checkpoint_trains_resumes_samples_and_takes_an_adapter(data_dir, tmp_path):
    out, fig = str(tmp_path / "dit.pt"), str(tmp_path / "fig")
    common = ["--data-dir", data_dir, "--out", out, "--figures", fig, *DIT_FLAGS, "--label-in", "cross-attn",
              "--lr", "0.05"]  # a high rate, so that four steps open the zero final layer for the adapter's gradients
    train.main([*common, "--max-steps", "2"])
    train.main([*common, "--max-steps", "4", "--resume"])
    model, _, ckpt = load_model(out)
    assert isinstance(model, DiT) and ckpt["backbone"] == "dit" and ckpt["step"] == 4
    assert model.config["label_in"] == "cross-attn" and ckpt["train"]["width"] == 16
    again, _, _ = load_model(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    sample = ["--ckpt", out, "--steps", "2", "--per-digit", "1", "--device", "cpu", "--process", "", "--figures", fig]
    base = denoise.main([*sample, "--out", str(tmp_path / "s.png")])
    assert base["images"].shape == (10, 28, 28)
    adapter = str(tmp_path / "bold.pt")
    info = lora_finetune.main(["--base", out, "--out", adapter, "--data-dir", data_dir, "--batch-size", "16",
                               "--device", "cpu", "--figures", fig, "--max-steps", "2", "--lr", "0.05"])
    assert info["layers"] > 0 and torch.load(adapter, weights_only=True)["config"]["targets"] == ("attn", "w_o", "mlp")
    styled = denoise.main([*sample, "--lora", adapter, "--compare"])
    assert torch.equal(styled["off"], base["images"]) and not torch.equal(styled["images"], base["images"])
    four_bit = str(tmp_path / "dit-nf4.pt")
    info = quantize.main(["--base", out, "--out", four_bit, "--device", "cpu"])  # keeps embed and final.linear
    assert info["layers"] > 0 and "kept in full precision: embed, final.linear" in info["report"]
    assert denoise.main([*sample, "--ckpt", four_bit, "--out", str(tmp_path / "q.png")])["images"].shape == (10, 28, 28)
    with pytest.raises(ValueError, match="steer a UNet"):
        controlnet_train.main(["--base", out, "--out", str(tmp_path / "cn.pt"), "--data-dir", data_dir,
                               "--device", "cpu", "--figures", fig, "--max-steps", "1"])
    assert not (tmp_path / "cn.pt").exists()


def test_unet_flags_on_a_dit_and_dit_flags_on_a_unet_are_refused(data_dir, tmp_path):
    out = ["--data-dir", data_dir, "--out", str(tmp_path / "x.pt"), "--device", "cpu"]
    for argv, match in ((["--backbone", "dit", "--channels", "16,32,32"], "--channels shapes the UNet"),
                        (["--width", "32"], "--width shapes the DiT")):
        with pytest.raises(ValueError, match=match):
            train.main([*out, *argv])
        assert not (tmp_path / "x.pt").exists()
