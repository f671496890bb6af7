"""The three scripts end to end on a tiny synthetic data set, and their one-line errors."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import bench
import denoise
import evaluate
import lora_finetune
import train
from harness.files import load_model, save_file
from harness import runs
from harness.config import PRESETS
from model.diffusion import Diffusion
from model.unet import UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFIER = os.path.join(ROOT, "pretrained", "classifier.pt")  # the committed one: the fake data is too small to train one
TINY = ["--channels", "16,32,32", "--batch-size", "16", "--epochs", "3", "--device", "cpu"]  # 4 steps an epoch


def _train(data_dir, tmp_path, *extra):
    out = str(tmp_path / "model.pt")
    train.main(["--data-dir", data_dir, "--out", out, "--figures", str(tmp_path / "fig"), *TINY, *extra])
    return out


def test_train_writes_checkpoint_and_figures_and_resumes(data_dir, tmp_path):
    out = _train(data_dir, tmp_path, "--max-steps", "3")
    _, _, ckpt = load_model(out)
    assert ckpt["step"] == 3 and len(ckpt["losses"]) == 3 and ckpt["config"]["channels"] == (16, 32, 32)
    assert ckpt["preset"] == "cpu" and ckpt["train"]["batch_size"] == 16
    assert {"loss.png", "forward_noising.png"} <= set(os.listdir(tmp_path / "fig"))
    _train(data_dir, tmp_path, "--max-steps", "6", "--resume")  # 64 images / 16 = 4 steps an epoch
    _, _, ckpt = load_model(out)
    assert ckpt["step"] == 6 and len(ckpt["losses"]) == 6


def test_attn_levels_flag_chooses_where_the_label_is_read(data_dir, tmp_path):
    for flag, levels in (("none", ()), ("2,0", (0, 2))):
        model, _, ckpt = load_model(_train(data_dir, tmp_path, "--max-steps", "1", "--attn-levels", flag, "--force"))
        assert ckpt["config"]["attn_levels"] == levels and ckpt["train"]["attn_levels"] == levels
        blocks = [(level, block) for level, block in enumerate(model.down)]
        blocks += [(len(model.up) - 1 - i, block) for i, block in enumerate(model.up)]
        assert all((block.attn is not None) == (level in levels) for level, block in blocks)
        assert model.mid_attn is not None  # the middle always reads the label


def test_presets_follow_the_device_and_the_checkpoint_and_flags_win(data_dir, tmp_path, capsys):
    common = ["--data-dir", data_dir, "--figures", str(tmp_path / "fig"), "--batch-size", "16", "--max-steps", "1",
              "--device", "cpu"]
    train.main([*common, "--out", str(tmp_path / "cpu.pt")])  # no GPU here: the cpu preset
    _, _, ckpt = load_model(str(tmp_path / "cpu.pt"))
    assert ckpt["preset"] == "cpu" and ckpt["config"]["channels"] == PRESETS["cpu"]["train"].channels
    assert ckpt["train"]["batch_size"] == 16 and ckpt["train"]["lr"] == PRESETS["cpu"]["train"].lr  # a flag wins
    train.main([*common, "--out", str(tmp_path / "gpu.pt"), "--preset", "gpu", "--channels", "16,32,32"])
    _, _, ckpt = load_model(str(tmp_path / "gpu.pt"))
    assert ckpt["preset"] == "gpu" and ckpt["config"]["channels"] == (16, 32, 32)
    assert ckpt["train"]["epochs"] == PRESETS["gpu"]["train"].epochs
    for preset in ("cpu", "gpu"):  # lora_finetune.py and denoise.py follow the checkpoint's preset
        adapter = str(tmp_path / f"{preset}-lora.pt")
        lora_finetune.main(["--base", str(tmp_path / f"{preset}.pt"), "--out", adapter, "--data-dir", data_dir,
                            "--max-steps", "1", "--batch-size", "16", "--targets", "attn", "--device", "cpu",
                            "--figures", str(tmp_path / "fig")])
        config = torch.load(adapter, weights_only=True)["config"]
        expected = PRESETS[preset]["lora"]
        assert (config["total_steps"], config["epochs"], config["rank"]) == \
            (expected.total_steps, expected.epochs, expected.rank)
        capsys.readouterr()
        denoise.main(["--ckpt", str(tmp_path / f"{preset}.pt"), "--per-digit", "1", "--digits", "3", "--device", "cpu",
                      "--out", str(tmp_path / "s.png"), "--process", ""])
        sample, out = PRESETS[preset]["sample"], capsys.readouterr().out
        assert f"DDIM-{sample.steps}, " + (f"eta {sample.eta:g}, " if sample.eta else "") + "guidance" in out
    assert PRESETS["cpu"]["sample"].eta > 0  # so the flag below changes something
    denoise.main(["--ckpt", str(tmp_path / "cpu.pt"), "--steps", "3", "--eta", "0", "--per-digit", "1", "--digits",
                  "3", "--device", "cpu", "--out", str(tmp_path / "s.png"), "--process", ""])
    assert "DDIM-3, guidance" in capsys.readouterr().out


def test_resume_is_bit_identical_to_an_uninterrupted_run(data_dir, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = _train(data_dir, tmp_path / "a", "--max-steps", "8")  # 4 steps an epoch
    stopped = _train(data_dir, tmp_path / "b", "--max-steps", "3")  # stopped mid-epoch, then trained on
    _train(data_dir, tmp_path / "b", "--max-steps", "8", "--resume")
    _assert_the_same_run(straight, stopped, steps=8)


def _assert_the_same_run(path_a, path_b, steps):
    """Two checkpoints hold the same run, bit for bit: losses, live and averaged weights, optimizer state."""
    a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
    assert a["losses"] == b["losses"] and a["step"] == b["step"] == steps
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in state.items()), f"optimizer {i}"


def test_nothing_is_overwritten_or_mixed_without_being_asked(data_dir, tmp_path):
    ckpt = _train(data_dir, tmp_path, "--max-steps", "2")
    before = open(ckpt, "rb").read()
    with pytest.raises(ValueError, match="--resume .* --force"):
        _train(data_dir, tmp_path, "--max-steps", "2")
    with pytest.raises(ValueError, match="--lr"):  # resuming with another learning rate would mix two runs
        _train(data_dir, tmp_path, "--max-steps", "4", "--resume", "--lr", "1e-3")
    with pytest.raises(ValueError, match="already at step 2"):
        _train(data_dir, tmp_path, "--max-steps", "1", "--resume")
    assert open(ckpt, "rb").read() == before
    _train(data_dir, tmp_path, "--max-steps", "1", "--force")
    assert load_model(ckpt)[2]["step"] == 1
    with pytest.raises(ValueError, match="base checkpoint"):
        lora_finetune.main(["--base", ckpt, "--out", ckpt, "--device", "cpu"])


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    ckpt = _train(data_dir, tmp_path, "--max-steps", "4")
    before = open(ckpt, "rb").read()
    real_loss = Diffusion.loss
    monkeypatch.setattr(Diffusion, "loss", lambda self, *a, **k: real_loss(self, *a, **k) * float("nan"))
    with pytest.raises(runs.NonFiniteLoss, match="non-finite"):
        _train(data_dir, tmp_path, "--max-steps", "8", "--resume")
    assert open(ckpt, "rb").read() == before


def test_a_short_schedule_trains_and_samples(data_dir, tmp_path):
    """--T below the forward-process figure's fixed steps (0 .. 700) still works, and sampling follows T."""
    ckpt = _train(data_dir, tmp_path, "--max-steps", "1", "--T", "20")
    out = denoise.main(["--ckpt", ckpt, "--steps", "20", "--per-digit", "1", "--digits", "3", "--device", "cpu",
                        "--guidance-interval", "all", "--out", str(tmp_path / "s.png"), "--process", ""])
    assert out["images"].shape == (1, 28, 28)


def test_resume_sees_the_same_batches_as_an_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    seen = []
    real_batches = train.batches

    def spy(*args, **kwargs):
        for x_0, y in real_batches(*args, **kwargs):
            seen.append(y.tolist())
            yield x_0, y

    monkeypatch.setattr(train, "batches", spy)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _train(data_dir, tmp_path / "a", "--max-steps", "7")  # 4 steps an epoch: resume mid-epoch
    whole, seen[:] = list(seen), []
    _train(data_dir, tmp_path / "b", "--max-steps", "3")
    _train(data_dir, tmp_path / "b", "--max-steps", "7", "--resume")
    assert seen == whole and len(whole) == 7


def _ctrl_c_inside_step(monkeypatch, at_call):
    """Press Ctrl-C (a real SIGINT) in the middle of training step `at_call`, after it has drawn its t and eps."""
    calls = {"n": 0}
    real_loss = Diffusion.loss

    def loss_then_ctrl_c(self, *args, **kwargs):
        loss = real_loss(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at_call:
            signal.raise_signal(signal.SIGINT)
        return loss

    monkeypatch.setattr(Diffusion, "loss", loss_then_ctrl_c)


def test_ctrl_c_inside_a_step_then_resume_is_bit_identical(data_dir, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = _train(data_dir, tmp_path / "a", "--max-steps", "8")  # 4 steps an epoch
    with monkeypatch.context() as m:
        _ctrl_c_inside_step(m, at_call=3)
        with pytest.raises(KeyboardInterrupt):
            _train(data_dir, tmp_path / "b", "--max-steps", "8")
    stopped = str(tmp_path / "b" / "model.pt")
    assert load_model(stopped)[2]["step"] == 3  # the step in flight finished, then the run was saved
    _train(data_dir, tmp_path / "b", "--max-steps", "8", "--resume")
    _assert_the_same_run(straight, stopped, steps=8)


def test_ctrl_c_inside_a_lora_step_then_resume_is_bit_identical(data_dir, tmp_path, monkeypatch):
    ckpt = _train(data_dir, tmp_path, "--max-steps", "1")
    tune = ["--base", ckpt, "--data-dir", data_dir, "--batch-size", "16", "--device", "cpu", "--figures",
            str(tmp_path / "fig"), "--max-steps", "6", "--targets", "attn", "--lr", "0.05"]
    lora_finetune.main([*tune, "--out", str(tmp_path / "a.pt")])
    with monkeypatch.context() as m:
        _ctrl_c_inside_step(m, at_call=2)
        with pytest.raises(KeyboardInterrupt):
            lora_finetune.main([*tune, "--out", str(tmp_path / "b.pt")])
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 2
    lora_finetune.main([*tune, "--out", str(tmp_path / "b.pt"), "--resume"])
    a, b = (torch.load(tmp_path / n, weights_only=True) for n in ("a.pt", "b.pt"))
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])


def test_denoise_export_grid_and_process(data_dir, tmp_path):
    ckpt = _train(data_dir, tmp_path, "--max-steps", "2")
    npz, out, process = (str(tmp_path / n) for n in ("s.npz", "s.png", "p.png"))
    denoise.main(["--ckpt", ckpt, "--steps", "4", "--per-digit", "3", "--digits", "1,4-5", "--export", npz,
                  "--out", out, "--process", process, "--device", "cpu", "--guidance", "2"])
    data = np.load(npz)
    assert data["images"].shape == (9, 28, 28) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [1, 1, 1, 4, 4, 4, 5, 5, 5]
    assert os.path.getsize(out) > 1000 and os.path.getsize(process) > 1000
    # same seed, same digits; DDPM works with fewer steps too
    again = denoise.main(["--ckpt", ckpt, "--steps", "4", "--per-digit", "3", "--digits", "1,4-5", "--out", out,
                          "--process", "", "--device", "cpu", "--guidance", "2"])
    assert torch.equal(again["images"], torch.from_numpy(data["images"]))
    ddpm = denoise.main(["--ckpt", ckpt, "--sampler", "ddpm", "--steps", "5", "--per-digit", "1", "--out", out,
                         "--process", "", "--device", "cpu"])
    assert ddpm["images"].shape == (10, 28, 28) and ddpm["labels"].tolist() == list(range(10))


def test_runs_write_their_figures_to_outputs_never_over_the_readmes(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a checkout of its own: figure/ holds the README's images
    (tmp_path / "figure").mkdir()
    train.main(["--data-dir", data_dir, "--out", "model.pt", "--channels", "16,32,32", "--batch-size", "16",
                "--max-steps", "2", "--device", "cpu"])
    denoise.main(["--ckpt", "model.pt", "--steps", "2", "--per-digit", "1", "--device", "cpu"])
    assert {"loss.png", "forward_noising.png", "samples.png", "denoise_process.png"} <= set(os.listdir("outputs"))
    assert os.listdir("figure") == []


def test_evaluate_scores_the_same_digits_the_same_from_a_checkpoint_or_an_export(data_dir, tmp_path, capsys):
    """evaluate.py --ckpt and denoise.py --export + evaluate.py --samples draw the same digits. Scored as the
    8-bit images an export holds, they get the same numbers; scored as floats, the FIDs differed."""
    ckpt, npz = _train(data_dir, tmp_path, "--max-steps", "2"), str(tmp_path / "s.npz")
    sampling = ["--steps", "3", "--per-digit", "4", "--digits", "2-6", "--batch-size", "7", "--device", "cpu"]
    denoise.main(["--ckpt", ckpt, *sampling, "--export", npz, "--out", str(tmp_path / "s.png"), "--process", ""])
    common = ["--classifier", CLASSIFIER, "--data-dir", data_dir, "--json"]
    scores = []
    for source in (["--ckpt", ckpt, *sampling], ["--samples", npz, "--device", "cpu"]):
        evaluate.main([*source, *common])
        scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert scores[0]["n"] == scores[1]["n"] == 20
    assert scores[0] == scores[1]


def test_lora_learns_a_style_and_compare_really_switches_it_off(data_dir, tmp_path, capsys):
    ckpt = _train(data_dir, tmp_path, "--max-steps", "2")
    adapter = str(tmp_path / "lora.pt")
    tune = ["--base", ckpt, "--out", adapter, "--data-dir", data_dir, "--batch-size", "16", "--device", "cpu",
            "--figures", str(tmp_path / "fig"), "--lr", "0.05", "--style", "bold"]
    info = lora_finetune.main([*tune, "--max-steps", "3", "--rank", "2", "--targets", "attn"])
    assert info["lora_bytes"] < info["base_bytes"] / 10 and info["trainable"] / info["total"] < 0.05
    lora_finetune.main([*tune, "--max-steps", "5", "--resume"])
    saved = torch.load(adapter, weights_only=True)
    assert saved["step"] == 5 and saved["config"]["style"] == "bold" and saved["config"]["rank"] == 2
    assert "optimizer" not in saved and os.path.exists(str(tmp_path / "lora.pt.resume"))  # shared file: adapter only
    common = ["--ckpt", ckpt, "--steps", "3", "--per-digit", "2", "--device", "cpu", "--process", "",
              "--figures", str(tmp_path / "fig")]
    base = denoise.main(common + ["--out", str(tmp_path / "b.png")])
    plain = denoise.main(common + ["--lora", adapter, "--compare", "--sweep"])
    merged = denoise.main(common + ["--lora", adapter, "--out", str(tmp_path / "m.png"), "--merge"])
    assert torch.equal(plain["off"], base["images"])  # LoRA off is the base model, seed for seed
    assert not torch.equal(plain["images"], base["images"])  # and LoRA on is not
    assert merged["merged"] and not plain["merged"]
    assert (plain["images"].int() - merged["images"].int()).abs().max() <= 1  # uint8 rounding at most
    for name in ("samples_bold.png", "compare_bold.png", "sweep_bold.png", "sweep_bold.gif"):
        assert os.path.getsize(tmp_path / "fig" / name) > 1000, name
    capsys.readouterr()
    evaluate.main(["--ckpt", ckpt, "--lora", adapter, "--steps", "2", "--per-digit", "2", "--device", "cpu",
                   "--classifier", CLASSIFIER, "--data-dir", data_dir, "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["style"] == "bold" and report["metric"] == "ink" and report["target"] > report["real"]
    assert set(report["on"]) >= {"accuracy", "fid", "fid_floor", "value"} and "gap_closed" in report


def _cli(*args):
    """Run a script as a user would; return (exit code, stderr)."""
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stderr.strip()


def _one_line_error(code_err, match):
    code, err = code_err
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert match in err, err


def test_bad_inputs_are_one_line_errors(data_dir, tmp_path):
    ckpt = _train(data_dir, tmp_path, "--max-steps", "1")
    _one_line_error(_cli("denoise.py", "--ckpt", str(tmp_path / "nope.pt")), "checkpoint not found")
    _one_line_error(_cli("denoise.py", "--ckpt", ckpt, "--digits", "3,12"), "0-9")
    _one_line_error(_cli("denoise.py", "--ckpt", ckpt, "--per-digit", "0"), "positive integer")
    _one_line_error(_cli("denoise.py", "--ckpt", ckpt, "--eta", "-1"), "--eta")
    _one_line_error(_cli("denoise.py", "--ckpt", ckpt, "--guidance-interval", "600,100"), "--guidance-interval")
    _one_line_error(_cli("denoise.py", "--ckpt", ckpt, "--out", "/proc/no/such/dir/x.png"), "cannot write")
    _one_line_error(_cli("denoise.py", "--ckpt", ckpt, "--lora", ckpt), "not a lora-adapter file")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    _one_line_error(_cli("denoise.py", "--ckpt", str(tmp_path / "junk.pt")), "not a valid checkpoint")
    _one_line_error(_cli("train.py", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "x.pt")),
                    "MNIST not found")
    _one_line_error(_cli("lora_finetune.py", "--base", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "l.pt")), "checkpoint not found")
    _one_line_error(_cli("train.py", "--min-snr-gamma", "-1", "--out", str(tmp_path / "x.pt")), "--min-snr-gamma")


def _refused(main, argv, match, capsys):
    """main(argv) stops before doing any work, with an error that names the problem.

    In-process (a subprocess costs seconds of `import torch`): a ValueError or FileNotFoundError is what run_cli prints as one
    `error:` line; a usage error is argparse's exit 2 with one line on stderr.
    """
    capsys.readouterr()  # forget earlier output (progress bars)
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as e:
        assert match in str(e), str(e)
        return
    except SystemExit as e:
        err = capsys.readouterr().err.strip()
        assert e.code == 2 and len(err.splitlines()) == 1 and match in err, err
        return
    raise AssertionError(f"{argv} was accepted")


def test_bad_values_are_refused_before_any_work(data_dir, tmp_path, capsys):
    ckpt = _train(data_dir, tmp_path, "--max-steps", "1")
    out = ["--out", str(tmp_path / "never.pt")]
    _refused(train.main, ["--lr", "-1", *out], "--lr", capsys)
    _refused(train.main, ["--ema-decay", "1.5", *out], "--ema-decay", capsys)
    _refused(train.main, ["--p-uncond", "x", *out], "--p-uncond", capsys)
    _refused(train.main, ["--attn-levels", "3", *out], "--attn-levels", capsys)
    _refused(lora_finetune.main, ["--base", ckpt, "--dropout", "2", *out], "--dropout", capsys)
    _refused(lora_finetune.main, ["--base", ckpt, "--lr-ratio", "0", *out], "--lr-ratio", capsys)
    _refused(lora_finetune.main, ["--base", ckpt, "--variant", "dora", "--dropout", "0.1", "--data-dir",
                                  str(tmp_path / "nowhere"), *out], "takes no --dropout", capsys)  # before the data
    (tmp_path / "shipped.pt").write_bytes(b"an adapter without its resume file")
    _refused(lora_finetune.main, ["--base", ckpt, "--out", str(tmp_path / "shipped.pt"), "--resume"],
             "shipped adapters have none", capsys)
    sample = ["--ckpt", ckpt, "--device", "cpu", "--classifier", str(tmp_path / "c.pt"), "--data-dir", data_dir]
    _refused(evaluate.main, [*sample, "--steps", "2000"], "--steps must be between 1 and T = 1000", capsys)
    _refused(evaluate.main, [*sample, "--eta", "5"], "--eta", capsys)
    _refused(evaluate.main, [*sample, "--lora-scale", "0.5"], "--lora", capsys)
    _refused(evaluate.main, [*sample, "--digits", "3", "--per-digit", "1"], "at least 2 samples", capsys)
    _refused(denoise.main, ["--ckpt", ckpt, "--digits", "1-"], "--digits", capsys)
    np.savez_compressed(tmp_path / "bad.npz", images=np.zeros((2, 28, 28), np.uint8), labels=np.array([3, 12]))
    _refused(evaluate.main, ["--samples", str(tmp_path / "bad.npz"), "--classifier", str(tmp_path / "c.pt")],
             "labels must be digits 0-9", capsys)
    bench_args = ["--skip-train", "--ckpt", ckpt, "--lora", str(tmp_path / "none.pt"), "--device", "cpu"]
    _refused(bench.main, [*bench_args, "--samplers", "ddim-50,dpm-10"], "--samplers", capsys)
    _refused(bench.main, [*bench_args, "--samplers", "ddim-2000"], "checkpoint not found", capsys)  # no adapter
    assert not (tmp_path / "never.pt").exists() and not (tmp_path / "c.pt").exists()


def test_round_two_silent_or_late_mistakes_are_refused_up_front(data_dir, tmp_path, capsys, monkeypatch):
    ckpt = _train(data_dir, tmp_path, "--max-steps", "1")
    adapter = str(tmp_path / "a.pt")
    tune = ["--base", ckpt, "--data-dir", data_dir, "--batch-size", "16", "--device", "cpu", "--figures",
            str(tmp_path / "fig"), "--max-steps", "1", "--targets", "attn"]
    lora_finetune.main([*tune, "--out", adapter])
    monkeypatch.setattr(denoise, "generate", lambda *a, **k: pytest.fail("sampled before refusing"))
    sample = ["--ckpt", ckpt, "--device", "cpu", "--out", str(tmp_path / "s.png"), "--process", ""]
    _refused(denoise.main, [*sample, "--guidance-interval", "5,5", "--steps", "20"], "holds none of the 20 steps", capsys)
    _refused(denoise.main, [*sample, "--sampler", "ddpm", "--eta", "0.5"], "--eta is DDIM's noise", capsys)
    _refused(denoise.main, [*sample, "--guidance", "1e30"], "--guidance", capsys)
    _refused(denoise.main, [*sample, "--lora", adapter, "--lora", adapter], "given twice", capsys)
    _refused(denoise.main, [*sample, "--digits", "3-1"], "from low to high", capsys)
    _refused(denoise.main, [*sample, "--per-digit", "1000000000"], "at most 200,000", capsys)
    _refused(denoise.main, [*sample, "--seed", str(2**62)], "--seed", capsys)
    _refused(train.main, ["--seed", str(2**62), "--out", str(tmp_path / "x.pt")], "--seed", capsys)
    _refused(train.main, ["--resume", "--force", "--out", ckpt], "give one of them", capsys)
    _refused(lora_finetune.main, [*tune, "--out", str(tmp_path / "b.pt"), "--targets", "attn,foo"], "foo", capsys)
    _refused(lora_finetune.main, [*tune, "--out", str(tmp_path / "b.pt"), "--targets", ","], "groups (attn, conv, mlp)", capsys)
    _refused(lora_finetune.main, [*tune, "--out", str(tmp_path / "b.pt"), "--alpha", "1e30"], "--alpha", capsys)
    _refused(lora_finetune.main, [*tune, "--out", str(tmp_path / "b.pt"), "--targets", "stem", "--rank", "99"],
             "stem: LoRA rank", capsys)
    _refused(lora_finetune.main, [*tune, "--base", ckpt + ".resume", "--out", ckpt], "base checkpoint", capsys)
    # Two --out names never share a resume file: a.pt's and a.pth's are a.pt.resume and a.pth.resume.
    lora_finetune.main([*tune, "--out", str(tmp_path / "a.pth"), "--style", "italic"])
    assert torch.load(adapter + ".resume", weights_only=True)["config"]["style"] == "bold"
    # Another model's adapter: the message says to pass the model it was trained on, whoever made it.
    other = _train(data_dir, tmp_path / "o", "--max-steps", "1", "--seed", "1")
    _refused(denoise.main, [*sample[:1], other, *sample[2:], "--lora", adapter], "give --ckpt the model", capsys)
    saved = torch.load(ckpt, weights_only=True)
    for broken, match in ((dict(saved, preset="tpu"), "unknown preset 'tpu'"),
                          (dict(saved, diffusion=dict(saved["diffusion"], T=0)), "T = 0")):
        save_file({k: v for k, v in broken.items() if k != "checksum"}, tmp_path / "broken.pt")
        _refused(denoise.main, ["--ckpt", str(tmp_path / "broken.pt"), *sample[2:]], match, capsys)


def test_a_folder_that_takes_no_new_file_is_found_before_training(data_dir, tmp_path, monkeypatch):
    """Files are written to a temporary file in their folder, then renamed: the up-front check tries exactly that
    (a read-only folder, as a user without root's override meets it)."""
    import tempfile
    real = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir == str(tmp_path / "ro"):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(train, "load_mnist", lambda *a, **k: pytest.fail("read the data before refusing"))
    with pytest.raises(ValueError, match="cannot write .*ro/model.pt: Permission denied"):
        train.main(["--out", str(tmp_path / "ro" / "model.pt"), "--device", "cpu"])


def test_evaluate_checks_its_classifier_and_data_before_sampling(data_dir, tmp_path, monkeypatch):
    ckpt = _train(data_dir, tmp_path, "--max-steps", "1")
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("sampled before refusing"))
    with pytest.raises(FileNotFoundError, match="MNIST not found"):
        evaluate.main(["--ckpt", ckpt, "--device", "cpu", "--classifier", CLASSIFIER, "--data-dir",
                       str(tmp_path / "nowhere")])


def test_export_is_atomic(data_dir, tmp_path, monkeypatch):
    ckpt = _train(data_dir, tmp_path, "--max-steps", "1")
    npz = tmp_path / "s.npz"
    sample = ["--ckpt", ckpt, "--steps", "2", "--per-digit", "1", "--device", "cpu", "--out", str(tmp_path / "s.png"),
              "--process", "", "--export", str(npz)]
    denoise.main(sample)
    before = npz.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", disk_full)
    with pytest.raises(OSError, match="cannot write .*s.npz: No space left"):
        denoise.main(sample + ["--seed", "1"])
    assert npz.read_bytes() == before and sorted(p.name for p in tmp_path.glob(".tmp-*")) == []


def test_bench_never_replaces_your_checkpoints(data_dir, tmp_path, monkeypatch):
    ckpt = _train(data_dir, tmp_path, "--max-steps", "1")
    before = open(ckpt, "rb").read()
    monkeypatch.setattr(train, "main", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(ValueError, match="already exists.*--force"):
        bench.main(["--ckpt", ckpt, "--device", "cpu", "--data-dir", data_dir])
    assert open(ckpt, "rb").read() == before
    written = []
    monkeypatch.setattr(bench, "check_new_output", lambda resume, force, *paths: written.extend(paths) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # stopped right after the check: where would it have trained?
        bench.main(["--device", "cpu", "--data-dir", data_dir])
    assert written and all(p.startswith(bench.BENCH_RUN) for p in written)  # its own folder, not checkpoints/


def test_corrupt_data_is_a_one_line_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / (name + ".gz")).write_bytes(b"this is not gzip")
    _one_line_error(_cli("train.py", "--data-dir", str(tmp_path), "--out", str(tmp_path / "x.pt")), "corrupt")


@pytest.mark.parametrize("script", ["train", "lora_finetune", "controlnet_train", "quantize", "denoise", "evaluate",
                                    "bench"])
def test_help_explains_every_flag(script, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    parser_flags = [line.split()[0] for line in text.splitlines() if line.strip().startswith("--")]
    assert len(parser_flags) >= 5
    for line in text.split("options:")[1].split("\n  -")[1:]:
        assert len(line.split()) > 2, f"flag without an explanation: {line.strip()}"


def test_bench_writes_every_section(data_dir, tmp_path):
    """bench.py end to end on the CPU with a tiny model: every section of the report, every row scored."""
    ckpt = _train(data_dir, tmp_path, "--max-steps", "2")
    adapter = str(tmp_path / "lora.pt")
    lora_finetune.main(["--base", ckpt, "--out", adapter, "--data-dir", data_dir, "--max-steps", "2",
                        "--batch-size", "16", "--rank", "2", "--device", "cpu", "--figures", str(tmp_path / "fig")])
    out = tmp_path / "bench" / "report.md"
    bench.main(["--skip-train", "--ckpt", ckpt, "--lora", adapter, "--data-dir", data_dir, "--device", "cpu",
                "--per-digit", "2", "--batch-size", "20", "--samplers", "ddim-3,ddpm-4@1",
                "--classifier", CLASSIFIER, "--figures", str(tmp_path / "fig"),
                "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    text = out.read_text()
    for section in ("## Samplers", "## Guidance sweep", "## LoRA", report["classifier"]["fingerprint"]):
        assert section in text
    names = [row["name"] for row in report["guidance"]]
    assert names == ["s=1", "s=1.5", "s=2", "s=3", "s=5", "s=1.5, every step", "s=2, every step"]
    assert report["guidance"][1]["guidance_interval"] == [82, 999]  # the cpu preset's interval, through JSON
    cpu = PRESETS["cpu"]["sample"]
    assert report["sampling"] == dict(steps=cpu.steps, eta=cpu.eta, guidance=cpu.guidance)
    assert all(row["eta"] == cpu.eta for row in report["guidance"])  # the sweep samples as the preset does
    assert report["guidance"][-1]["guidance_interval"] is None
    assert [row["n"] for row in report["samplers"]] == [20, 10]
    for row in report["guidance"] + report["samplers"] + report["lora"]["rows"]:
        assert 0 <= row["accuracy"] <= 1 and row["fid"] >= 0 and row["seconds"] > 0
    assert os.path.getsize(tmp_path / "fig" / "guidance.png") > 1000
    assert os.path.getsize(tmp_path / "fig" / "steps.png") > 1000


def test_bench_speed_reports_both_settings_and_the_flop_rate(tmp_path, monkeypatch):
    from harness.config import SampleConfig, TrainConfig
    monkeypatch.setitem(PRESETS, "cpu", dict(PRESETS["cpu"], train=TrainConfig(channels=(16, 32, 32), batch_size=8),
                                             sample=SampleConfig(steps=2)))
    out = tmp_path / "speed.md"
    result = bench.main(["--speed", "--device", "cpu", "--out", str(out)])
    text = out.read_text()
    for line in ("the scripts' setting", "plain fp32 eager", "GFLOP per image", "estimated fp32 peak", "steered by a ControlNet"):
        assert line in text
    assert result["flop_per_image"] > 1e6 and all(t > 0 and s > 0 for _, t, s in result["rows"])


def test_training_wiring_the_ema_the_null_label_and_the_objective(data_dir, tmp_path, monkeypatch):
    """Through train.py's real code path: the EMA moves, --p-uncond reaches the labels, --min-snr-gamma and
    --t-sampling the loss; an adapter then trains with its base's objective."""
    seen_labels, seen_gammas, seen_t_sampling = [], [], []
    real_forward, real_loss = UNet.forward, Diffusion.loss

    def forward_spy(self, x_t, t, y):
        seen_labels.append(y.clone())
        return real_forward(self, x_t, t, y)

    def loss_spy(self, model, x_0, y, p_uncond=0.0, min_snr_gamma=None, t_sampling="uniform"):
        seen_gammas.append(min_snr_gamma)
        seen_t_sampling.append(t_sampling)
        return real_loss(self, model, x_0, y, p_uncond, min_snr_gamma, t_sampling)

    monkeypatch.setattr(UNet, "forward", forward_spy)
    monkeypatch.setattr(Diffusion, "loss", loss_spy)
    ckpt = _train(data_dir, tmp_path, "--max-steps", "3", "--p-uncond", "1", "--min-snr-gamma", "2.5",
                  "--t-sampling", "uniform")  # the flag wins over the cpu preset's logit-normal draw
    assert seen_gammas == [2.5] * 3 and seen_t_sampling == ["uniform"] * 3
    assert all((y == 10).all() for y in seen_labels)  # p_uncond = 1: every label is the null label
    saved = torch.load(ckpt, weights_only=True)
    torch.manual_seed(0)  # train.py's seed: the weights the run started from
    init = UNet(**saved["config"]).state_dict()
    moved = [k for k in init if init[k].is_floating_point() and not torch.equal(saved["ema"][k], init[k])]
    assert moved, "the EMA never moved from the initial weights"
    assert any(not torch.equal(saved["ema"][k], saved["model"][k]) for k in moved)  # an average, not a copy
    lora_finetune.main(["--base", ckpt, "--out", str(tmp_path / "lora.pt"), "--data-dir", data_dir, "--max-steps",
                        "2", "--batch-size", "16", "--device", "cpu", "--figures", str(tmp_path / "fig")])
    assert seen_gammas[3:] == [2.5] * 2 and seen_t_sampling[3:] == ["uniform"] * 2


def test_the_adapter_file_holds_the_averaged_adapter(data_dir, tmp_path):
    ckpt = _train(data_dir, tmp_path, "--max-steps", "1")
    adapter = str(tmp_path / "lora.pt")
    lora_finetune.main(["--base", ckpt, "--out", adapter, "--data-dir", data_dir, "--max-steps", "3",
                        "--batch-size", "16", "--targets", "attn", "--lr", "0.05", "--device", "cpu",
                        "--figures", str(tmp_path / "fig")])
    shared = torch.load(adapter, weights_only=True)["tensors"]
    resume = torch.load(str(tmp_path / "lora.pt.resume"), weights_only=True)
    for name, tensor in shared.items():
        if name.endswith("lora_B"):  # B starts at zero: after three steps the average and the live one differ
            assert any(torch.equal(tensor, averaged) for averaged in resume["ema"]), name
            assert not any(torch.equal(tensor, live) for live in resume["live"]), name


def test_running_out_of_memory_is_one_line_that_says_what_to_do(capsys):
    from harness.cli import run_cli

    def main():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    with pytest.raises(SystemExit) as exit_:
        run_cli(main)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: out of memory") and "--batch-size" in err
    with pytest.raises(RuntimeError, match="another failure"):  # any other RuntimeError is not hidden
        run_cli(lambda: (_ for _ in ()).throw(RuntimeError("another failure")))


def test_a_flag_given_twice_adds_to_it_instead_of_replacing_it():
    args = denoise.parse_args(["--lora", "a.pt", "--lora", "b.pt", "--lora-scale", "1", "--lora-scale", "0.5"])
    assert args.lora == ["a.pt", "b.pt"] and args.lora_scale == [1.0, 0.5]


def test_guidance_sweep_and_noise_schedule_figures(data_dir, tmp_path):
    ckpt = _train(data_dir, tmp_path, "--max-steps", "1")
    fig = tmp_path / "fig"
    denoise.main(["--ckpt", ckpt, "--steps", "3", "--per-digit", "1", "--device", "cpu", "--figures", str(fig),
                  "--guidance-sweep", "1", "3"])
    for name in ("guidance_sweep.png", "denoise_process.png", "noise_schedule.png"):
        assert os.path.getsize(fig / name) > 1000, name
    _one_line_error(_cli("denoise.py", "--ckpt", ckpt, "--guidance-sweep", "1", "nan"), "--guidance-sweep")


def test_the_attention_map_figure_and_its_study(data_dir, tmp_path, monkeypatch):
    """denoise.py --attention draws the first cross-attention layer's map halfway down the chain, as it is
    computed in the real sampling run; ablate.py attention takes each layer's choice away (w_k = 0), and the
    weights come back after each row."""
    import ablate
    from model.attention import CrossAttention

    ckpt = _train(data_dir, tmp_path, "--max-steps", "1")
    seen = []
    weights = CrossAttention.weights
    monkeypatch.setattr(CrossAttention, "weights", lambda self, x, c: seen.append(x.shape) or weights(self, x, c))
    out = tmp_path / "attention.png"
    denoise.main(["--ckpt", ckpt, "--steps", "4", "--per-digit", "1", "--digits", "3,7", "--device", "cpu",
                  "--figures", str(tmp_path), "--process", "", "--attention", str(out)])
    assert os.path.getsize(out) > 1000 and seen == [(2, 32, 7, 7)]  # once: step 2 of 4, the two digits' rows
    monkeypatch.setattr(CrossAttention, "weights", weights)
    zeroed, generate = [], ablate.generate  # which layers have w_k = 0 at each scored draw

    def spy(model, *a, **k):
        zeroed.append([bool(m.w_k.weight.eq(0).all()) for m in model.modules() if isinstance(m, CrossAttention)])
        return generate(model, *a, **k)

    monkeypatch.setattr(ablate, "generate", spy)
    text = ablate.main(["attention", "--base", ckpt, "--data-dir", data_dir, "--per-digit", "1", "--device", "cpu",
                        "--out", str(tmp_path / "a.md"), "--classifier", CLASSIFIER])
    assert "| all: w_k = 0 |" in text and "| down.2.attn | 7x7, 4 |" in text
    assert "code at `" in text or "code outside git" in text  # the table says which code made it
    # the model as trained, then each layer alone (the others restored), then all three
    assert zeroed == [[False] * 3, [True, False, False], [False, True, False], [False, False, True], [True] * 3]
    dit = str(tmp_path / "dit.pt")
    train.main(["--data-dir", data_dir, "--out", dit, "--figures", str(tmp_path / "fig"), "--max-steps", "1",
                "--backbone", "dit", "--patch", "7", "--width", "16", "--depth", "1", "--batch-size", "16",
                "--device", "cpu"])
    _one_line_error(_cli("denoise.py", "--ckpt", dit, "--attention", str(out)), "is no UNet")
    _one_line_error(_cli("ablate.py", "attention", "--base", dit, "--data-dir", data_dir, "--per-digit", "1",
                         "--out", str(tmp_path / "b.md")), "is no UNet")
