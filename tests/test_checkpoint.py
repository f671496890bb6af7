"""Checkpoints round-trip exactly, are written atomically, load across devices and fail in one line."""
import os
import subprocess
import sys

import pytest
import torch

from harness import files as checkpoint
from harness.files import fingerprint, load_model, model_file, save_file
from model.diffusion import Diffusion
from model.ema import EMA
from harness.runs import training_state


def _save(model, path, device="cpu"):
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1, 28, 28, device=device), torch.tensor([1, 2], device=device),
          torch.tensor([3, 4], device=device)).mean().backward()
    opt.step()
    state = training_state(7, [1.0, 0.5], 1.5, torch.device(device))
    save_file(model_file(model, EMA(model), Diffusion(T=200), opt, "cpu", {"lr": 1e-3}, state), path)
    return model


def test_round_trip_is_exact(tiny_model, tmp_path):
    path = str(tmp_path / "m.pt")
    model = _save(tiny_model, path)
    loaded, diffusion, ckpt = load_model(path, "cpu", weights="model")
    assert loaded.config == model.config and diffusion.T == 200 and ckpt["step"] == 7
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert fingerprint(model) == fingerprint(loaded)
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, y), loaded.eval()(x, t, y))
    assert set(os.listdir(tmp_path)) == {"m.pt"}  # no temporary file left behind


@pytest.mark.skipif(os.name != "posix", reason="stale temporaries are found by process id on POSIX")
def test_a_save_removes_temporaries_of_killed_saves_only(tiny_model, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-{int(dead.stdout)}-abc123.pt"  # a save whose process was killed mid-write
    running = tmp_path / f".tmp-{os.getpid()}-xyz789.pt"    # a save still in progress (this very process)
    stale.write_bytes(b"partial"), running.write_bytes(b"partial")
    _save(tiny_model, str(tmp_path / "m.pt"))
    assert not stale.exists() and running.exists() and (tmp_path / "m.pt").exists()


def test_a_failed_write_is_one_error_and_keeps_the_previous_file(tiny_model, tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    checkpoint.save_file(dict(kind="x", step=1), path)
    before = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError, match="disk full.*unchanged"):
        checkpoint.save_file(dict(kind="x", step=2), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.pt"]  # no temporary left either


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to write a GPU checkpoint")
def test_gpu_checkpoint_loads_on_cpu(tiny_model, tmp_path):
    path = str(tmp_path / "m.pt")
    model = _save(tiny_model, path, device="cuda")
    loaded, _, _ = load_model(path, "cpu", weights="model")
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a.cpu(), b)


def test_save_is_atomic(tiny_model, tmp_path, monkeypatch):
    path = str(tmp_path / "m.pt")
    _save(tiny_model, path)
    before = open(path, "rb").read()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        _save(tiny_model, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["m.pt"]


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a valid checkpoint"):
        load_model(str(tmp_path / "junk.pt"))
    torch.save({"kind": "lora-adapter"}, tmp_path / "adapter.pt")
    with pytest.raises(ValueError, match="not a mnist-diffusion file"):
        load_model(str(tmp_path / "adapter.pt"))
    torch.save({"kind": "mnist-diffusion", "config": {"channels": (8, 8, 8)}, "ema": {}}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="does not match"):
        load_model(str(tmp_path / "old.pt"))


def test_non_finite_weights_are_refused(tiny_model, tmp_path):
    path = str(tmp_path / "m.pt")
    _save(tiny_model, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["ema"]["stem.weight"][0, 0, 0, 0] = float("nan")
    save_file({k: v for k, v in ckpt.items() if k != "checksum"}, path)  # written so, with its own checksum
    with pytest.raises(ValueError, match="non-finite"):
        load_model(path)


def test_a_second_ctrl_c_cannot_cut_a_save_short(tmp_path):
    import signal

    from harness.runs import save_uninterrupted
    written = []

    def save(path):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C pressed again while the checkpoint is being written
        checkpoint.save_file(dict(kind="x"), path)
        written.append(path)

    with pytest.raises(KeyboardInterrupt):  # passed on, but only after the save
        save_uninterrupted(save, str(tmp_path / "m.pt"))
    assert written and (tmp_path / "m.pt").exists()


def test_flipped_bytes_are_refused_not_loaded(tiny_model, tmp_path):
    path = tmp_path / "m.pt"
    _save(tiny_model, str(path))
    data = bytearray(path.read_bytes())
    ema = torch.load(path, weights_only=True)["ema"]["stem.weight"]
    at = bytes(data).find(ema.numpy().tobytes())  # where the averaged stem's weights lie in the file
    assert at > 0
    for i in range(at, at + 50):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        load_model(str(path))


def test_files_written_together_change_together_or_not_at_all(tmp_path, monkeypatch):
    """An adapter and its resume file: if the second cannot be written (a full disk), the first keeps its
    previous contents too, and the error names the file."""
    a, b = str(tmp_path / "a.pt"), str(tmp_path / "a.pt.resume")
    checkpoint.write_files((dict(kind="x", step=1), a), (dict(kind="x", step=1), b))
    real_save = torch.save
    calls = []

    def save_then_fail(obj, f):
        calls.append(obj)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc] file write failed")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="cannot write .*a.pt.resume.*unchanged"):
        checkpoint.write_files((dict(kind="x", step=2), a), (dict(kind="x", step=2), b))
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.load_file(a, "x")["step"] == checkpoint.load_file(b, "x")["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "a.pt.resume"]  # no temporary file left behind
