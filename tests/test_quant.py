"""NF4 (model/quant.py): the code book, blockwise absmax, packing, double quantisation, the 4-bit layers,
LoRA on a 4-bit base, merging into it, and the 4-bit checkpoint through the scripts."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import denoise
import lora_finetune
import quantize
import train
from harness.files import fingerprint, load_model, load_lora
from model.adapters import inject_lora, lora_layers, merge_lora
from model.quant import (CODE_BOOK, Conv2d4bit, Linear4bit, NF4Weight, dequantize_blockwise, dequantize_constants,
                         four_bit_layers, merge_requantized, pack, quantize_blockwise, quantize_constants,
                         quantize_model, storage_bytes, unpack)
from model.unet import UNet
from tests.conftest import TINY

# Table 2 / Appendix E of Dettmers et al. 2023 (as bitsandbytes ships them): the NF4 data type.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
HALF_GAP = ((CODE_BOOK[1:] - CODE_BOOK[:-1]) / 2).max()


def test_the_code_book_is_the_papers_with_an_exact_zero():
    assert torch.allclose(CODE_BOOK, torch.tensor(PUBLISHED_NF4), atol=1e-6, rtol=0)
    assert CODE_BOOK[7] == 0 and CODE_BOOK[0] == -1 and CODE_BOOK[-1] == 1
    assert (CODE_BOOK[1:] > CODE_BOOK[:-1]).all()


def test_packing_round_trips_two_codes_a_byte():
    codes = torch.randint(0, 16, (1000,))
    packed = pack(codes)
    assert packed.dtype == torch.uint8 and len(packed) == 500
    assert torch.equal(unpack(packed), codes)


@pytest.mark.parametrize("block", [64, 32])
def test_each_weight_goes_to_the_nearest_level_within_the_bound(block):
    torch.manual_seed(0)
    w = torch.randn(37, 29) * torch.logspace(-3, 0, 29)  # 1,073 weights: the last block is padded
    codes, absmax = quantize_blockwise(w, block)
    w_hat = dequantize_blockwise(codes, absmax, w.shape)
    c = absmax.repeat_interleave(block)[:w.numel()].view(w.shape)  # each weight's block absmax
    assert ((w - w_hat).abs() <= c * HALF_GAP + 1e-7).all()
    nearest = (w.flatten()[:, None] / c.flatten()[:, None] - CODE_BOOK).abs().argmin(1)  # brute force
    assert torch.equal(unpack(codes)[:w.numel()], nearest)
    assert len(absmax) == -(-w.numel() // block)


def test_zeros_stay_exact_and_a_zero_block_does_not_divide_by_zero():
    w = torch.zeros(3, 64)
    w[1, 5] = 0.3
    w_hat = dequantize_blockwise(*quantize_blockwise(w), w.shape)
    assert torch.isfinite(w_hat).all() and torch.equal(w_hat == 0, w == 0) and w_hat[1, 5] == pytest.approx(0.3)


def test_double_quantisation_keeps_the_constants_within_half_a_step():
    torch.manual_seed(1)
    absmax = torch.rand(600) + 0.5
    codes, scale, mean = quantize_constants(absmax)
    assert codes.dtype == torch.int8 and len(codes) == 600 and len(scale) == 3  # blocks of 256
    error = (dequantize_constants(codes, scale, mean) - absmax).abs()
    step = scale.repeat_interleave(256)[:600]
    assert (error <= step / 2 + 1e-6).all()


def test_double_quantisation_saves_about_three_eighths_of_a_bit_a_weight():
    w = torch.randn(512, 512)
    bits = lambda double: 8 * sum(b.numel() * b.element_size() for b in NF4Weight(w, 64, double).buffers()) / w.numel()
    assert bits(False) == pytest.approx(4.5)  # 4 bits + one fp32 per 64
    assert bits(False) - bits(True) == pytest.approx(0.373, abs=0.002)


def test_the_4bit_layers_compute_with_the_dequantised_weight_and_keep_no_full_copy():
    torch.manual_seed(0)
    linear, conv = nn.Linear(64, 32), nn.Conv2d(8, 16, 3, stride=2, padding=1)
    x, image = torch.randn(5, 64), torch.randn(2, 8, 12, 12)
    four_bits = Linear4bit(linear, double_quant=False), Conv2d4bit(conv, double_quant=False)
    for plain, four_bit, inp in zip((linear, conv), four_bits, (x, image)):
        w_hat = dequantize_blockwise(*quantize_blockwise(plain.weight), plain.weight.shape)
        assert torch.equal(four_bit.weight, w_hat)
        reference = F.linear(inp, w_hat, plain.bias) if plain is linear else F.conv2d(inp, w_hat, plain.bias, 2, 1)
        assert torch.allclose(four_bit(inp), reference, atol=1e-6, rtol=0)
        assert not list(four_bit.parameters())  # frozen, and nothing of the weight in full precision:
        floats = [b for b in four_bit.buffers() if b.is_floating_point()]
        assert sum(b.numel() for b in floats) <= plain.bias.numel() + plain.weight.numel() // 64 + 2
        assert storage_bytes(four_bit) < plain.weight.numel() * 4 / 6


def quantised_tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = UNet(**TINY)
    for p in model.parameters():  # trained weights are not zero-initialised: make every layer matter
        p.data.normal_(0, 0.1)
    return quantize_model(model, **kwargs)[0]


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 1, 28, 28, generator=g), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 3, 7, 10])


def test_quantize_model_replaces_every_linear_and_conv_but_those_kept():
    model = quantised_tiny(keep=("stem", "out", "time_mlp"))
    kinds = {path: type(m) for path, m in model.named_modules()}
    assert kinds["stem"] is nn.Conv2d and kinds["out.2"] is nn.Conv2d and kinds["time_mlp.0"] is nn.Linear
    assert kinds["down.0.res.conv1"] is Conv2d4bit and kinds["mid_attn.w_q"] is Linear4bit
    assert not any(t in (nn.Linear, nn.Conv2d) for p, t in kinds.items() if not p.startswith(("stem", "out", "time_mlp")))
    assert isinstance(model.context.embed, nn.Embedding)  # the label's embedding stays as it is
    with pytest.raises(ValueError, match="--keep names no linear or conv layer: nowhere"):
        quantised_tiny(keep=("nowhere",))


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_a_lora_on_the_4bit_base_starts_exactly_at_the_4bit_base_and_trains(variant):
    model = quantised_tiny()
    x, t, y = inputs()
    with torch.no_grad():
        before = model(x, t, y)
    codes = {k: v.clone() for k, v in model.state_dict().items()}
    layers = inject_lora(model, ("attn", "conv"), rank=2, alpha=2.0, variant=variant)
    assert layers and all(isinstance(l.base, (Linear4bit, Conv2d4bit)) for l in layers.values())
    with torch.no_grad():
        assert torch.equal(model(x, t, y), before)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model(x, t, y).square().mean().backward()
    assert all(layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0 for layer in layers.values())
    optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y), before)
    base = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k and "magnitude" not in k}
    assert all(torch.equal(base[k], v) for k, v in codes.items())  # the 4-bit codes and constants never move


def test_merging_into_4bit_is_refused_and_merge_requantized_quantises_the_sum():
    model = quantised_tiny()
    layers = inject_lora(model, ("attn",), rank=2, alpha=2.0)
    for layer in layers.values():
        nn.init.normal_(layer.lora_B, std=0.05)
    with pytest.raises(ValueError, match="4-bit"):
        merge_lora(model)
    expected = {path: quantize_blockwise(layer.weight + layer.delta_weight()) for path, layer in layers.items()}
    merge_requantized(model)
    assert not lora_layers(model)
    for path, (codes, absmax) in expected.items():
        layer = model.get_submodule(path)
        assert isinstance(layer, Linear4bit) and torch.equal(layer.weight_4bit.codes, codes)
        w = layer.weight_4bit
        assert torch.allclose(w.constants(), dequantize_constants(*quantize_constants(absmax)))


def test_lossy_merge_loses_more_of_a_small_update_than_keeping_it_beside():
    model = quantised_tiny()
    layer = inject_lora(model, ("w_q",), rank=2, alpha=2.0)["mid_attn.w_q"]
    nn.init.normal_(layer.lora_B, std=0.01)
    target = layer.weight + layer.delta_weight()  # what the adapted layer computes with, kept beside
    merge_requantized(model)
    lost = (model.mid_attn.w_q.weight - target).norm() / layer.delta_weight().norm()
    assert lost > 0.5  # the rounding is as large as a small update itself


# ---- the 4-bit checkpoint, through the scripts ----------------------------------------------------

TINY_TRAIN = ["--channels", "16,32,32", "--batch-size", "16", "--epochs", "1", "--device", "cpu", "--max-steps", "2"]


@pytest.fixture
def base(data_dir, tmp_path):
    out = str(tmp_path / "model.pt")
    train.main(["--data-dir", data_dir, "--out", out, "--figures", str(tmp_path / "fig"), *TINY_TRAIN])
    return out


def test_a_4bit_checkpoint_round_trips_and_samples_like_the_model_it_holds(base, data_dir, tmp_path):
    out = str(tmp_path / "nf4.pt")
    result = quantize.main(["--base", base, "--out", out, "--keep", "stem", "--block", "32"])
    assert "bits a weight" in result["report"] and "relative error" in result["report"]
    model, _, ckpt = load_model(out)
    assert ckpt["quantized"]["block"] == 32 and isinstance(model.stem, nn.Conv2d) and four_bit_layers(model)
    expected = quantize_model(load_model(base)[0], 32, True, ("stem",))[0]
    x, t, y = inputs()
    with torch.no_grad():  # the file's model is the one quantised in memory (its fp16 rest aside)
        assert torch.allclose(model(x, t, y), expected(x, t, y), atol=2e-3)
    assert ckpt["quantized"]["source_fingerprint"] == fingerprint(load_model(base)[0])
    common = ["--data-dir", data_dir, "--per-digit", "1", "--steps", "2", "--device", "cpu", "--figures", str(tmp_path)]
    assert denoise.main(["--ckpt", out, *common])["images"].shape == (10, 28, 28)


def test_qlora_trains_on_the_4bit_file_and_is_tied_to_it(base, data_dir, tmp_path):
    nf4 = str(tmp_path / "nf4.pt")
    quantize.main(["--base", base, "--out", nf4])
    train_flags = ["--data-dir", data_dir, "--device", "cpu", "--max-steps", "2", "--batch-size", "8",
                   "--figures", str(tmp_path / "fig")]
    qlora, plain = str(tmp_path / "qlora.pt"), str(tmp_path / "plain.pt")
    lora_finetune.main(["--base", nf4, "--out", qlora, *train_flags])
    lora_finetune.main(["--base", base, "--out", plain, *train_flags])
    model = load_model(nf4)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_lora(model, qlora)  # trained on this 4-bit model: fits
    with pytest.raises(ValueError, match="different base"):
        load_lora(load_model(base)[0], qlora)  # not on the model it was quantised from
    _, _, ckpt = load_model(nf4)
    load_lora(load_model(nf4)[0], plain, base_fingerprint=(fingerprint(model), ckpt["quantized"]["source_fingerprint"]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    common = ["--data-dir", data_dir, "--per-digit", "1", "--steps", "2", "--device", "cpu", "--figures", str(tmp_path)]
    merged = denoise.main(["--ckpt", nf4, "--lora", qlora, "--merge", *common])
    assert merged["merged"]
    assert denoise.main(["--ckpt", nf4, "--lora", plain, *common])["images"].shape == (10, 28, 28)


def test_bad_4bit_inputs_are_refused_before_any_work(base, tmp_path, capsys):
    nf4 = str(tmp_path / "nf4.pt")
    quantize.main(["--base", base, "--out", nf4])
    for argv, message in [(["--base", base, "--out", nf4], "already exists"),
                          (["--base", nf4, "--out", str(tmp_path / "again.pt")], "already a 4-bit model"),
                          (["--base", base, "--out", base], "write over the model"),
                          (["--base", base, "--out", str(tmp_path / "k.pt"), "--keep", "nowhere"], "--keep"),
                          (["--base", base, "--out", str(tmp_path / "b.pt"), "--block", "33"], "even number")]:
        with pytest.raises((ValueError, SystemExit)) as e:
            quantize.main(argv)
        assert message in (str(e.value) + capsys.readouterr().err)
    data = bytearray(open(nf4, "rb").read())
    codes = torch.load(nf4, weights_only=True)["ema"]["mid_attn.w_q.weight_4bit.codes"]
    at = bytes(data).find(codes.numpy().tobytes())  # where one layer's 4-bit codes lie in the file
    assert at > 0
    data[at] ^= 0x11  # two codes of one byte changed
    open(nf4, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        load_model(nf4)
    assert not os.path.exists(str(tmp_path / "again.pt")) and not os.path.exists(str(tmp_path / "k.pt"))
