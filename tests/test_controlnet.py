"""ControlNet: the zero convs make it the base model at the start, and still learn; the controls are what
they say."""
import os

import torch

from model.controlnet import ControlNet, Controlled
from model.controls import control_image, edges, sketch, skeleton
from model.data import load_mnist
from model.diffusion import Diffusion
from model.unet import UNet

from conftest import TINY


def setup(seed=0):
    torch.manual_seed(seed)
    unet = UNet(**TINY).requires_grad_(False)
    x_0 = torch.rand(6, 1, 28, 28) * 2 - 1
    return unet, ControlNet(unet), x_0, control_image("edges", x_0), torch.arange(6) % 10


def test_with_its_zero_convs_at_zero_the_controlled_model_is_the_base_bit_for_bit():
    unet, controlnet, x_t, control, y = setup()
    t = torch.tensor([0, 100, 300, 500, 700, 999])
    with torch.no_grad():
        assert torch.equal(Controlled(unet, controlnet, control)(x_t, t, y), unet(x_t, t, y))


def test_the_first_step_reaches_the_zero_convs_and_leaves_the_locked_unet_alone():
    unet, controlnet, x_0, control, y = setup()
    locked = {k: v.clone() for k, v in unet.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in controlnet.parameters() if p.requires_grad], lr=1e-3)
    loss = Diffusion().loss(Controlled(unet, controlnet, control), x_0, y, p_uncond=0.5)
    loss.backward()
    # dy/dw = x: the zero convs get a gradient at once; everything behind them gets none until they move.
    assert all(z.weight.grad.abs().sum() > 0 for z in controlnet.zero_convs)
    assert controlnet.hint[0].weight.grad.abs().sum() == 0
    optimizer.step()
    assert all(z.weight.abs().sum() > 0 for z in controlnet.zero_convs)  # moved
    assert all(torch.equal(v, locked[k]) for k, v in unet.state_dict().items())  # the locked UNet has not
    assert all(p.grad is None for p in unet.parameters())
    optimizer.zero_grad()
    Diffusion().loss(Controlled(unet, controlnet, control), x_0, y).backward()
    # The second step reaches the copy and the hint's zero-initialised last conv (its first conv waits one more).
    assert controlnet.copy.stem.weight.grad.abs().sum() > 0 and controlnet.hint[-1].weight.grad.abs().sum() > 0


def test_the_controlled_output_depends_on_the_control_once_trained():
    unet, controlnet, x_t, control, y = setup()
    with torch.no_grad():
        for z in controlnet.zero_convs:
            z.weight.normal_(0, 0.1)
        controlnet.hint[-1].weight.normal_(0, 0.1)
        t = torch.full((6,), 500)
        a = Controlled(unet, controlnet, control)(x_t, t, y)
        b = Controlled(unet, controlnet, torch.zeros_like(control))(x_t, t, y)
    assert (a - b).abs().max() > 1e-3


def test_the_controls_are_what_they_say():
    digits, _ = load_mnist("data", train=False)
    digits = digits[:200]
    ink = (digits > 0).float()
    e, s, k = edges(digits), skeleton(digits), sketch(digits)
    for c in (e, s, k):
        assert c.shape == digits.shape and set(c.unique().tolist()) <= {0.0, 1.0}
    assert (e <= ink).all() and (s <= ink).all()  # outline and skeleton lie on the ink
    assert (s.sum() < 0.6 * e.sum()) and s.flatten(1).sum(1).min() > 0  # thinner than the outline, never empty
    blocks = torch.nn.functional.avg_pool2d(s, 2, stride=1)  # a 1-pixel stroke has no 2 x 2 block of ink
    assert (blocks == 1).float().mean() < 1e-3
    assert torch.equal(k, torch.nn.functional.interpolate(k[..., ::4, ::4], scale_factor=4))  # 4 x 4 cells


def test_controlnet_train_draw_resume_and_refuse_through_the_scripts(data_dir, tmp_path, capsys):
    import json

    import controlnet_train
    import denoise
    import evaluate
    import train

    from test_scripts import CLASSIFIER, _refused

    base = str(tmp_path / "model.pt")
    train.main(["--data-dir", data_dir, "--out", base, "--channels", "16,32,32", "--batch-size", "16",
                "--max-steps", "2", "--device", "cpu", "--figures", str(tmp_path / "fig")])
    out = str(tmp_path / "cn.pt")
    common = ["--base", base, "--out", out, "--data-dir", data_dir, "--batch-size", "16", "--device", "cpu",
              "--figures", str(tmp_path / "fig"), "--lr", "0.01"]
    controlnet_train.main([*common, "--max-steps", "2"])
    controlnet_train.main([*common, "--max-steps", "3", "--resume"])
    saved = torch.load(out, weights_only=True)
    assert saved["step"] == 3 and saved["control"] == "skeleton" and saved["config"]["p_uncond"] == 0.5
    assert not any(k.startswith(("up.", "out.")) for k in saved["state"])  # none of the locked decoder's weights
    assert any(k.startswith("copy.down.") for k in saved["state"]) and os.path.exists(out + ".resume")
    sample = ["--ckpt", base, "--controlnet", out, "--steps", "2", "--per-digit", "2", "--device", "cpu"]
    drawn = denoise.main([*sample, "--figures", str(tmp_path / "fig"), "--data-dir", data_dir])
    assert drawn["images"].shape == (20, 28, 28)
    assert os.path.getsize(tmp_path / "fig" / "samples_controlnet-skeleton.png") > 1000
    drawing = tmp_path / "three.png"  # a dark-on-light drawing, any size: read, resized, inverted
    page = torch.full((3, 90, 60), 255, dtype=torch.uint8)
    page[:, 20:70, 25:35] = 0
    import torchvision.io
    torchvision.io.write_png(page, str(drawing))
    drawn = denoise.main([*sample, "--figures", str(tmp_path / "fig"), "--control-from", str(drawing), "--digits", "1"])
    assert drawn["images"].shape == (2, 28, 28)
    capsys.readouterr()
    evaluate.main([*sample, "--classifier", CLASSIFIER, "--data-dir", data_dir, "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["control"]) == {"kind", "f1_exact", "f1_1px", "base_f1_exact", "base_f1_1px"}
    assert all(0 <= v <= 1 for k, v in report["control"].items() if k != "kind")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    _refused(denoise.main, [*sample, "--control-from", str(tmp_path / "junk.png")], "cannot read", capsys)
    other = str(tmp_path / "other.pt")
    train.main(["--data-dir", data_dir, "--out", other, "--channels", "16,32,32", "--batch-size", "16",
                "--max-steps", "1", "--device", "cpu", "--figures", str(tmp_path / "fig"), "--seed", "3"])
    _refused(denoise.main, ["--ckpt", other, *sample[2:]], "different base model", capsys)
    _refused(denoise.main, [*sample, "--sweep", "--lora", out], "--sweep, --guidance-sweep, --process, --attention and --beside", capsys)
    _refused(denoise.main, [*sample, "--guidance-sweep", "1", "2"], "--guidance-sweep", capsys)
    _refused(controlnet_train.main, [*common, "--max-steps", "2"], "already exists", capsys)


def test_control_fidelity_scores_what_it_says():
    from harness.metrics import control_f1
    given = torch.zeros(1, 1, 28, 28)
    given[0, 0, 5:20, 10] = 1  # a vertical stroke
    beside = torch.roll(given, 1, dims=3)  # the same stroke one pixel to the right
    assert control_f1(given, given) == 1.0
    assert control_f1(given, beside) == 0.0 and control_f1(given, beside, tolerance=1) == 1.0
    assert 0.4 < control_f1(given, given * (torch.arange(28) < 12).view(1, 1, 28, 1).float()) < 0.9  # half drawn


def test_a_controlnet_run_stopped_and_resumed_is_the_straight_run(data_dir, tmp_path):
    import controlnet_train
    import train

    base = str(tmp_path / "model.pt")
    train.main(["--data-dir", data_dir, "--out", base, "--channels", "16,32,32", "--batch-size", "16",
                "--max-steps", "2", "--device", "cpu", "--figures", str(tmp_path / "fig")])
    common = ["--base", base, "--data-dir", data_dir, "--batch-size", "16", "--device", "cpu", "--figures",
              str(tmp_path / "fig"), "--lr", "0.01", "--control", "edges"]
    controlnet_train.main([*common, "--out", str(tmp_path / "a.pt"), "--max-steps", "6"])
    controlnet_train.main([*common, "--out", str(tmp_path / "b.pt"), "--max-steps", "3"])  # stopped mid-epoch
    controlnet_train.main([*common, "--out", str(tmp_path / "b.pt"), "--max-steps", "6", "--resume"])
    a, b = (torch.load(tmp_path / n, weights_only=True) for n in ("a.pt", "b.pt"))
    assert a["step"] == b["step"] == 6 and a["control"] == "edges"
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])


def test_controlnet_training_drops_labels_and_feeds_each_batch_its_control(data_dir, tmp_path, monkeypatch):
    """Through controlnet_train.py's real loop: --p-uncond reaches the labels the copy and the locked UNet see,
    and the control each step gets is the control of that step's digits."""
    import controlnet_train
    import train
    from model.controls import control_image as real_control_image

    base = str(tmp_path / "model.pt")
    train.main(["--data-dir", data_dir, "--out", base, "--channels", "16,32,32", "--batch-size", "16",
                "--max-steps", "1", "--device", "cpu", "--figures", str(tmp_path / "fig")])
    seen_labels, seen_controls, digits = [], [], []
    real_forward = ControlNet.forward

    def forward_spy(self, x_t, t, y, control):
        seen_labels.append(y.clone())
        seen_controls.append(control.clone())
        return real_forward(self, x_t, t, y, control)

    def control_spy(kind, x):
        digits.append(x.clone())
        return real_control_image(kind, x)

    monkeypatch.setattr(ControlNet, "forward", forward_spy)
    monkeypatch.setattr(controlnet_train, "control_image", control_spy)
    controlnet_train.main(["--base", base, "--out", str(tmp_path / "cn.pt"), "--data-dir", data_dir, "--batch-size",
                           "16", "--device", "cpu", "--figures", str(tmp_path / "fig"), "--max-steps", "2",
                           "--p-uncond", "1"])
    assert len(seen_labels) == 2 and all((y == 10).all() for y in seen_labels)  # every label the null label
    for x_0, control in zip(digits, seen_controls):
        assert torch.equal(control, real_control_image("skeleton", x_0)) and control.sum() > 0
