"""Chapter 6: steer the frozen model with a drawn shape -- a ControlNet in miniature.

    python controlnet_train.py                         # a skeleton ControlNet for checkpoints/model.pt
    python controlnet_train.py --control edges --out checkpoints/edges.pt
    python controlnet_train.py --freeze-copy           # train only the condition encoder and the zero convs

Locks the base model (its averaged weights), builds a ControlNet on it (model/controlnet.py: a trainable
copy of the encoder, a condition encoder, zero convolutions) and trains it with the step of train.py on
MNIST digits and their --control (model/controls.py), half of the labels replaced by the null label so
that the control itself must say which digit it is. The output file holds the ControlNet alone, its
control kind and the base model's fingerprint; what --resume needs goes to a file beside it
(controlnet.pt -> controlnet.pt.resume), written together with it. Draw with it:
`python denoise.py --controlnet checkpoints/controlnet.pt`.
"""
import os
import time
from dataclasses import asdict, replace

import torch

from harness.cli import (Parser, add_training_flags, check_new_output, check_writable, fused_adamw, pick_device,
                         run_cli, seed_everything)
from harness.config import (PRESETS, ControlConfig, base_train_config, objective_on, preset_for, preset_named, resumed_config,
                            with_flags)
from harness.figures import save_loss_curve
from harness.files import (CONTROLNET_KIND, CONTROLNET_RESUME_KIND, checksum, controlnet_file, fingerprint, load_file, load_model,
                           resume_path, write_files)
from harness.runs import Run, plan_run, restore, training_state
from harness.sampling import default_checkpoint
from model.controlnet import ControlNet, Controlled
from model.controls import CONTROLS, control_image
from model.data import batches, load_mnist
from model.ema import EMA
from model.training import lr_at, train_step


def parse_args(argv=None):
    default = PRESETS["cpu"]["control"]
    p = Parser(__doc__)
    p.add_argument("--base", help="the model to steer (default: checkpoints/model.pt if it exists, else the shipped one)")
    p.add_argument("--out", default="checkpoints/controlnet.pt", help="ControlNet file to write (and to --resume)")
    p.add_argument("--control", choices=tuple(CONTROLS), help=f"what it learns to follow (default {default.control})")
    p.add_argument("--freeze-copy", dest="train_copy", action="store_const", const=False,
                   help="keep the copy of the encoder frozen: train only the condition encoder and the zero convs")
    add_training_flags(p, "the ControlNet")
    return p.parse_args(argv)


def resolve_config(args, base, saved, preset):
    """The ControlConfig of this run: the saved run's on --resume, else the base's preset's; flags win."""
    if saved is not None:
        if saved.get("out_checksum") != load_file(args.out, CONTROLNET_KIND)["checksum"]:
            raise ValueError(f"--resume: {args.out} and {resume_path(args.out)} are from different saves; "
                             "start over with --force")
        return resumed_config(ControlConfig(**saved["config"]), args)
    config = with_flags(preset_named(preset)["control"], args)
    if config.min_snr_gamma is None:  # the objective the base was trained with
        config = replace(config, min_snr_gamma=base_train_config(base).min_snr_gamma)
    return config


def main(argv=None):
    args = parse_args(argv)
    args.base = default_checkpoint(args.base)
    if os.path.abspath(args.base) in (os.path.abspath(args.out), os.path.abspath(resume_path(args.out))):
        raise ValueError("--out would write over the base checkpoint it steers; choose another --out")
    check_new_output(args.resume, args.force, args.out, resume_path(args.out))
    check_writable(os.path.join(args.figures, "loss_controlnet.png"))
    device = pick_device(args.device)
    unet, diffusion, base = load_model(args.base, device, weights="ema")
    unet.eval().requires_grad_(False)  # locked
    base_fp = fingerprint(unet)
    saved = load_file(resume_path(args.out), CONTROLNET_RESUME_KIND, device) if args.resume else None
    if saved is not None and saved["base_fingerprint"] != base_fp:
        raise ValueError(f"--resume: {resume_path(args.out)} was trained on another base than {args.base}")
    preset = base.get("preset") or preset_for(device)
    config = resolve_config(args, base, saved, preset)
    seed_everything(config.seed)

    images, labels = load_mnist(args.data_dir, train=True, device=device)
    total_steps, stop_at = plan_run(len(images), config, args.max_steps, saved and saved["step"])
    controlnet = ControlNet(unet, config.control, config.train_copy).to(device)
    ema = EMA(controlnet, config.ema_decay)
    trainable = [p for p in controlnet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0, fused=fused_adamw(device))
    first, losses, seconds = 0, [], 0.0
    if saved is not None:
        controlnet.load_state_dict(saved["live"])
        ema.model.load_state_dict(saved["ema"])
        first, losses, seconds = restore(saved, optimizer, device)
        print(f"resuming {args.out} at step {first}")
    print(f"preset {preset}: ControlNet ({config.control}) on {args.base}, copy {'trained' if config.train_copy else 'frozen'}, "
          f"{total_steps:,} steps of {config.batch_size} images, null label {config.p_uncond:.0%} of the time; trainable: "
          f"{sum(p.numel() for p in trainable):,} parameters (the locked UNet: {sum(p.numel() for p in unet.parameters()):,})")

    def save(at_step, at_losses, at_seconds):
        shared = controlnet_file(ema.model, asdict(config), base_fp, at_step)  # the averaged weights, as a base's
        state = dict(kind=CONTROLNET_RESUME_KIND, config=asdict(config), base_fingerprint=base_fp,
                     out_checksum=checksum(shared), live=controlnet.state_dict(), ema=ema.model.state_dict(),
                     optimizer=optimizer.state_dict(), **training_state(at_step, at_losses, at_seconds, device))
        write_files((shared, args.out), (state, resume_path(args.out)))

    # The loop of train.py; the network is the locked UNet steered by the ControlNet, through the batch's controls.
    objective = objective_on(base, config)
    run = Run(save, first, stop_at, total_steps, len(images) // config.batch_size, losses, seconds, desc="controlnet")
    start = time.time()
    for step, (x_0, y) in run.steps(batches(images, labels, config.batch_size, config.seed, start=first)):
        steered = Controlled(unet, controlnet, control_image(config.control, x_0))
        lr = lr_at(step, config.lr, config.warmup, total_steps)
        run.record(train_step(controlnet, diffusion, optimizer, ema, x_0, y, step, lr, **objective, forward=steered))
    elapsed = time.time() - start
    size, base_size = os.path.getsize(args.out), os.path.getsize(args.base)
    print(f"trained {stop_at - first} steps in {elapsed:.1f} s; ControlNet: {args.out} {size / 2**20:.2f} MiB "
          f"(base: {args.base} {base_size / 2**20:.2f} MiB)")
    save_loss_curve(os.path.join(args.figures, "loss_controlnet.png"), run.losses,
                    title=f"ControlNet training loss ({config.control})")
    return dict(seconds=elapsed, bytes=size, base_bytes=base_size)


if __name__ == "__main__":
    run_cli(main)
