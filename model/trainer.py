"""The training loop, shared by train.py (the whole UNet) and lora_finetune.py (only the adapters).

One step is the DDPM recipe: pick clean digits x_0 and labels y, a random step t and noise eps, make x_t
with the closed-form forward process, and regress eps_theta(x_t, t, y) onto eps (diffusion.py). Around it:

  * the learning rate warms up linearly for `warmup` steps, then follows a cosine down to 10%;
  * gradients are clipped to norm 1 (diffusion losses have rare, large spikes at small t);
  * the EMA of the weights is updated after every step (ema.py);
  * bf16 autocast on CUDA; the loss stays on the device, and is copied to the host once an epoch
    (and read once every 50 steps for the progress bar), so the GPU never waits on Python;
  * epoch e shuffles with a generator seeded by (seed, e): a resumed run sees exactly the batches the
    uninterrupted run would have seen;
  * a checkpoint is written after every epoch and on Ctrl-C, then Ctrl-C is passed on.
"""
import math
import time

import torch
from tqdm import tqdm

from .cli import UserError, autocast
from .data import batches


def lr_at(step, lr, warmup, total):
    """Linear warm-up to `lr`, then cosine decay to lr/10 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def plan_steps(n_images, batch_size, epochs, max_steps=None):
    """Total optimizer steps: `epochs` passes of whole batches, capped at `max_steps`."""
    steps_per_epoch = n_images // batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {batch_size} is larger than the data set ({n_images} images)")
    total = epochs * steps_per_epoch
    return min(total, max_steps) if max_steps else total


def fit(model, diffusion, images, labels, optimizer, ema, *, total_steps, batch_size, lr, warmup=200,
        p_uncond=0.1, min_snr_gamma=None, seed=0, start_step=0, losses=None, save=None, forward=None,
        desc="train"):
    """Train until `total_steps` optimizer steps. Returns the list of per-step losses.

    `save(step, losses)` is called after every epoch, at the end and on Ctrl-C. `forward` is the callable
    that runs the network (e.g. a torch.compile'd wrapper of `model`); the default is `model` itself.
    """
    forward = forward or model
    losses = [] if losses is None else list(losses)
    params = [p for p in model.parameters() if p.requires_grad]
    device = images.device
    steps_per_epoch = len(images) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the data set ({len(images)} images)")
    step = start_step
    pending = []  # this epoch's losses, still on the device
    bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True)
    t0 = time.time()
    model.train()
    try:
        while step < total_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            generator = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)
            for x_0, y in batches(images, labels, batch_size, generator, start=skip):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, lr, warmup, total_steps)
                with autocast(device):
                    loss = diffusion.loss(forward, x_0, y, p_uncond, min_snr_gamma)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                ema.update(model, step)
                pending.append(loss.detach())
                step += 1
                bar.update()
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")  # one host sync per 50 steps
                if step >= total_steps:
                    break
            epoch_losses = torch.stack(pending).tolist()  # one host copy per epoch
            losses += epoch_losses
            pending = []
            tqdm.write(f"{desc} epoch {epoch + 1}: mean loss {sum(epoch_losses) / len(epoch_losses):.4f}, "
                       f"step {step}/{total_steps}, {time.time() - t0:.0f} s")
            if save:
                save(step, losses)
    except KeyboardInterrupt:
        bar.close()
        if pending:
            losses += torch.stack(pending).tolist()
        if save:
            tqdm.write(f"interrupted at step {step}: saving a checkpoint to resume from")
            save(step, losses)
        raise
    bar.close()
    return losses
