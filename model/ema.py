"""Exponential moving average of the weights (Polyak averaging), used for sampling.

    theta_ema <- decay_k * theta_ema + (1 - decay_k) * theta,   decay_k = min(decay, (1 + k) / (10 + k))

SGD's last iterate jitters around a good solution; the average sits closer to its centre and gives visibly
cleaner samples. The warm-up term (1 + k)/(10 + k) matters for short runs: with a fixed decay of 0.999 the
average would still hold 0.999^2000 = 14% of the *random initial* weights after 2,000 steps.

The warm-up term stays below the cap 0.999 until step 8,990, so in runs as short as this repo's (a few
hundred to a few thousand steps) it *is* the average. Multiplied out, the weight of step k in the average
after K steps is proportional to k^8 -- a "power-function EMA" (Karras et al. 2024, EDM2, with gamma = 8)
whose length is a fixed share of the run: centred at 90% of it, about 9% of it wide (a test checks both).
That is why the same formula suits a short LoRA run and the base model alike.
"""
import copy

import torch


class EMA:
    """Keeps `self.model`, a frozen copy of a network whose trainable parameters track the live ones."""

    def __init__(self, model, decay=0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step):
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model, step):
        """One EMA step after optimizer step `step` (0-based). Only trainable parameters move."""
        live = [p for p in model.parameters() if p.requires_grad]
        avg = [q for p, q in zip(model.parameters(), self.model.parameters()) if p.requires_grad]
        # lerp(avg, live, w) = avg + w (live - avg) = decay * avg + (1 - decay) * live, for all tensors at once
        torch._foreach_lerp_(avg, live, 1.0 - self.decay_at(step))
