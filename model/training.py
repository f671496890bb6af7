"""One training step, the same for the whole UNet (train.py) and for an adapter alone (lora_finetune.py).

DDPM's training algorithm (Ho et al. 2020, Algorithm 1), one batch at a time:

    x_0, y  <- a batch of digits and their labels
    t ~ draw_t, eps ~ N(0, I)
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps             (Diffusion.q_sample)
    loss = || eps - eps_theta(x_t, t, y) ||^2, weighted by Min-SNR      (Diffusion.loss)
    gradient step on the parameters that require a gradient

and around it three habits of every diffusion codebase:

  * the learning rate warms up linearly, then follows a cosine down to a tenth (`lr_at`);
  * gradients are clipped to norm 1: the loss has rare, large spikes at small t;
  * after every step the exponential moving average of the weights moves (ema.py): it is what samples.

Which parameters train is decided before, by `requires_grad`: all of them for the base model, only A and
B (and DoRA's magnitude) once adapters.py has frozen the rest.
"""
import math

import torch


def lr_at(step, lr, warmup, total):
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to lr/10 at step `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def autocast(device):
    """bf16 autocast on CUDA (tensor cores, no loss scaling needed); a no-op elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_step(model, diffusion, optimizer, ema, x_0, y, step, lr, p_uncond, min_snr_gamma, t_sampling,
               forward=None, penalty=None):
    """One optimizer step at learning rate `lr` on the batch (x_0 [B,1,28,28], y [B]); returns the loss.

    `forward` runs the network (a torch.compile'd `model`, say); `model` itself owns the parameters and
    the EMA. A parameter group with an `lr_scale` runs at that multiple of `lr` (LoRA+'s B, adapters.py).
    `penalty()`, if given, is added to the loss before the backward pass (AdaLoRA's orthogonality).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    with autocast(x_0.device):
        loss = diffusion.loss(forward or model, x_0, y, p_uncond, min_snr_gamma, t_sampling)
    optimizer.zero_grad(set_to_none=True)
    (loss + penalty() if penalty else loss).backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    ema.update(model, step)
    return loss.detach()  # stays on the device: reading it would make the GPU wait for Python
