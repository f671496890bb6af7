"""The training loop, shared by train.py (the whole UNet) and lora_finetune.py (only the adapters).

One step is the DDPM recipe: pick clean digits x_0 and labels y, a random step t and noise eps, make x_t
with the closed-form forward process, and regress eps_theta(x_t, t, y) onto eps (diffusion.py). Around it:

  * the learning rate warms up linearly for `warmup` steps, then follows a cosine down to 10% at the end
    of the planned run (`total_steps`; stopping earlier with `stop_at` does not change the schedule);
    a parameter group with an `lr_scale` runs at that multiple of it (LoRA+'s B, lora.py);
  * gradients are clipped to norm 1 (diffusion losses have rare, large spikes at small t);
  * the EMA of the weights is updated after every step (ema.py);
  * bf16 autocast on CUDA; the loss stays on the device, and is copied to the host once an epoch
    (and read once every 50 steps for the progress bar), so the GPU never waits on Python;
  * a loss that turns NaN or infinite stops the run at the next of those reads, before anything is saved;
  * epoch e shuffles with a generator seeded by (seed, e), and the random-number state (t, eps, the null
    label) is saved with every checkpoint: a resumed run is bit-identical to an uninterrupted one;
  * a checkpoint is written after every epoch and on Ctrl-C, then Ctrl-C is passed on.
"""
import math
import signal
import threading
import time

import torch
from tqdm import tqdm

from .cli import autocast
from .data import batches


def lr_at(step, lr, warmup, total):
    """Linear warm-up to `lr`, then cosine decay to lr/10 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def plan_steps(n_images, config):
    """Optimizer steps of the planned run: `config.total_steps`, or `epochs` passes of whole batches."""
    steps_per_epoch = n_images // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {config.batch_size} is larger than the data set ({n_images} images)")
    return config.total_steps or config.epochs * steps_per_epoch


def rng_state(device):
    """Every random-number state a training step draws from: the CPU's and, on a GPU, the GPU's."""
    state = dict(cpu=torch.get_rng_state())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class NonFiniteLoss(ValueError):
    """The loss became NaN or infinite: training stopped and nothing was saved."""


def _check_finite(values, step):
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteLoss(f"the loss became non-finite by step {step}; nothing was saved "
                            "(the learning rate is probably too high: try a lower --lr)")


def save_uninterrupted(save, *args):
    """Run save(*args) with Ctrl-C held back until it is done, so a second Ctrl-C cannot cut a save short."""
    pending = []
    in_main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous = signal.signal(signal.SIGINT, lambda *_: pending.append(True)) if in_main else None
    try:
        save(*args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def fit(model, diffusion, images, labels, optimizer, ema, config, *, min_snr_gamma, t_sampling, total_steps,
        stop_at=None, start_step=0, losses=None, save=None, forward=None, desc="train"):
    """Train from `start_step` to `stop_at` (default: `total_steps`). Returns the list of per-step losses.

    `config` gives batch_size, lr, warmup, p_uncond and seed (a TrainConfig or LoraConfig); `min_snr_gamma`
    and `t_sampling` choose the objective (diffusion.py). `save(step, losses)` is called after every epoch,
    at the end and on Ctrl-C. `forward` is the callable that runs the network (e.g. a torch.compile'd
    wrapper of `model`); the default is `model` itself.
    """
    forward = forward or model
    stop_at = min(stop_at or total_steps, total_steps)
    losses = [] if losses is None else list(losses)
    params = [p for p in model.parameters() if p.requires_grad]
    device = images.device
    steps_per_epoch = len(images) // config.batch_size
    step = start_step
    pending = []  # this epoch's losses, still on the device
    bar = tqdm(total=stop_at, initial=step, desc=desc, unit="step", dynamic_ncols=True)
    t0 = time.time()
    model.train()
    try:
        while step < stop_at:
            epoch, skip = divmod(step, steps_per_epoch)
            generator = torch.Generator(device=device).manual_seed(config.seed * 100_003 + epoch)
            for x_0, y in batches(images, labels, config.batch_size, generator, start=skip):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, config.lr, config.warmup, total_steps) * group.get("lr_scale", 1.0)
                with autocast(device):
                    loss = diffusion.loss(forward, x_0, y, config.p_uncond, min_snr_gamma, t_sampling)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                ema.update(model, step)
                pending.append(loss.detach())
                step += 1
                bar.update()
                if step % 50 == 0:
                    value = loss.item()  # one host sync per 50 steps
                    _check_finite([value], step)
                    bar.set_postfix(loss=f"{value:.4f}")
                if step >= stop_at:
                    break
            epoch_losses = torch.stack(pending).tolist()  # one host copy per epoch
            _check_finite(epoch_losses, step)
            losses += epoch_losses
            pending = []
            tqdm.write(f"{desc} epoch {epoch + 1}: mean loss {sum(epoch_losses) / len(epoch_losses):.4f}, "
                       f"step {step}/{total_steps}, {time.time() - t0:.0f} s")
            if save:
                save_uninterrupted(save, step, losses)
    except KeyboardInterrupt:
        bar.close()
        if pending:
            epoch_losses = torch.stack(pending).tolist()
            _check_finite(epoch_losses, step)
            losses += epoch_losses
        if save:
            tqdm.write(f"interrupted at step {step}: saving a checkpoint to resume from")
            save_uninterrupted(save, step, losses)
        raise
    bar.close()
    return losses
