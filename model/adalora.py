"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"): a LoRA
that moves its rank to the layers that need it.

A LoRA gives every layer the same rank, chosen by hand. AdaLoRA writes each layer's update as an SVD and
lets training decide how many of its directions each layer keeps (sec. 3.1):

    dW = gamma * P diag(lambda) Q,    P = lora_B [out, r],  lambda = lora_E [r],  Q = lora_A [r, in]

with gamma = alpha / r for the starting rank r (as LoRA's). lambda starts at zero, so the adapted model
starts as the base; P and Q start small and random (they must not be zero, or lambda gets no gradient).
Three more pieces, each a function or method below:

  * `orthogonality`: P and Q are pulled towards orthonormal by a penalty added to the loss, so that the
    lambdas act as singular values and a triplet can be dropped without disturbing the others:
        R = ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2,  averaged over the layers, times a weight.
  * `RankAllocator.update_importance` (sec. 3.2): every number w of P, lambda and Q has a sensitivity
    s = |w dL/dw| (how much the loss would change without it), smoothed and weighted by its uncertainty:
        I <- beta1 I + (1 - beta1) s,   U <- beta2 U + (1 - beta2) |s - I|,   score = I U
    and triplet i of a layer scores  S_i = score(lambda_i) + mean_j score(Q_ij) + mean_j score(P_ji).
  * `RankAllocator.budget` (sec. 3.3): the triplets the whole model may keep fall from b_0 (all r of every
    layer) to b_T (target_rank per layer on average) on a cubic, after t_init warm-up steps:
        b(t) = b_T + (b_0 - b_T) (1 - (t - t_init) / (T - t_init - t_final))^3
    and every `every` steps the b(t) highest-scoring triplets of *all* layers keep their lambda, the rest
    are set to 0 (`mask_to`). For the last t_final steps the pattern is frozen and the survivors train on.

A layer's final rank is the number of its lambdas left: some layers keep all r, some none. Convolutions
take the SVD form the way LoCon takes LoRA (lora.py): Q is a k x k conv, P a 1 x 1 conv.
"""
import torch
import torch.nn as nn

from .lora import LoraConv2d, LoraLayer


class AdaLoraMixin:
    """Turns a LoRA layer into an AdaLoRA layer: dW = gamma P diag(lambda) Q, lambdas maskable one by one."""

    def __init__(self, base, rank=4, alpha=4.0, dropout=0.0, rslora=False):
        if rslora:
            raise ValueError("AdaLoRA scales its update by alpha / rank and takes no rsLoRA scaling")
        super().__init__(base, rank, alpha, dropout, rslora)
        nn.init.normal_(self.lora_A, std=0.02)  # Q and P small and random, lambda zero (as peft initialises)
        nn.init.normal_(self.lora_B, std=0.02)
        self.lora_E = nn.Parameter(torch.zeros(rank, device=self.lora_A.device))  # lambda
        self.register_buffer("kept", torch.ones(rank, dtype=torch.bool, device=self.lora_A.device), persistent=False)

    def factor_A(self):
        """diag(lambda) Q: the update runs B (lambda * A) x, LoRA's two thin products."""
        return self.lora_E.view(-1, *[1] * (self.lora_A.dim() - 1)) * self.lora_A

    @torch.no_grad()
    def keep(self, kept):
        """Keep the triplets where `kept` [r] is True; the others' lambda is set to 0."""
        self.kept.copy_(kept)
        self.lora_E.masked_fill_(~self.kept, 0.0)

    def extra_repr(self):
        return super().extra_repr() + f", kept={int(self.kept.sum())}"


class AdaLoraLayer(AdaLoraMixin, LoraLayer):
    """AdaLoRA on an nn.Linear."""


class AdaLoraConv2d(AdaLoraMixin, LoraConv2d):
    """AdaLoRA on an nn.Conv2d."""


def orthogonality(layers):
    """R = ||P^T P - I||^2 + ||Q Q^T - I||^2, the mean over `layers`; zero when P, Q are orthonormal."""
    total = 0.0
    for layer in layers:
        P, Q = layer.lora_B.flatten(1), layer.lora_A.flatten(1)  # [out, r], [r, in k k]
        I = torch.eye(layer.rank, device=P.device)
        total = total + ((P.T @ P - I) ** 2).sum() + ((Q @ Q.T - I) ** 2).sum()
    return total / len(layers)


class RankAllocator:
    """Scores every triplet as training goes and masks the least important to a falling budget.

    Call `step(t)` after optimizer step t, while the gradients are still in place."""

    def __init__(self, layers, target_rank, total_steps, t_init, t_final, every, beta1=0.85, beta2=0.85):
        if not 0 <= t_init < total_steps - t_final:
            raise ValueError(f"AdaLoRA's schedule leaves no steps to prune in: t_init {t_init} and t_final "
                             f"{t_final} of {total_steps} steps")
        self.layers = layers  # {path: AdaLoRA layer}
        self.b_0 = sum(layer.rank for layer in layers.values())
        self.b_T = target_rank * len(layers)
        self.total, self.t_init, self.t_final, self.every = total_steps, t_init, t_final, every
        self.beta1, self.beta2 = beta1, beta2
        self.I = {p: torch.zeros_like(p) for p in self.parameters()}  # smoothed sensitivity
        self.U = {p: torch.zeros_like(p) for p in self.parameters()}  # its uncertainty

    def parameters(self):
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_E, layer.lora_B)]

    def budget(self, t):
        """(b(t), whether to mask at step t): b_0 through warm-up, the cubic, then b_T for the last t_final."""
        if t <= self.t_init:
            return self.b_0, False
        if t > self.total - self.t_final:
            return self.b_T, True
        falling = 1 - (t - self.t_init) / (self.total - self.t_final - self.t_init)
        return int((self.b_0 - self.b_T) * falling ** 3 + self.b_T), t % self.every == 0

    @torch.no_grad()
    def update_importance(self):
        for p in self.parameters():
            s = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)  # sensitivity |w dL/dw|
            self.I[p].mul_(self.beta1).add_(s, alpha=1 - self.beta1)
            self.U[p].mul_(self.beta2).add_((s - self.I[p]).abs(), alpha=1 - self.beta2)

    def triplet_scores(self):
        """{path: S [r]}: lambda_i's score plus the mean score of row i of Q and of column i of P."""
        score = lambda p: self.I[p] * self.U[p]
        return {path: score(layer.lora_E) + score(layer.lora_A).flatten(1).mean(1)
                + score(layer.lora_B).flatten(1).mean(0) for path, layer in self.layers.items()}

    @torch.no_grad()
    def mask_to(self, budget):
        """Keep the `budget` highest-scoring triplets of all layers together; mask the rest."""
        scores = self.triplet_scores()
        cut = self.b_0 - budget
        threshold = torch.cat(list(scores.values())).kthvalue(cut).values if cut > 0 else -float("inf")
        for path, layer in self.layers.items():
            layer.keep(scores[path] > threshold)

    def step(self, t):
        end = self.total - self.t_final
        if t < end:
            self.update_importance()
            budget, now = self.budget(t)
            if now:
                self.mask_to(budget)
        elif t == end:
            self.mask_to(self.b_T)  # the final pattern
        else:
            for layer in self.layers.values():  # frozen: the masked lambdas stay at zero
                layer.keep(layer.kept)

    def ranks(self):
        """{path: the number of triplets the layer keeps}."""
        return {path: int(layer.kept.sum()) for path, layer in self.layers.items()}

    def state_dict(self):
        return dict(I=[self.I[p] for p in self.parameters()], U=[self.U[p] for p in self.parameters()],
                    kept=[layer.kept.clone() for layer in self.layers.values()])

    def load_state_dict(self, state):
        for p, i, u in zip(self.parameters(), state["I"], state["U"]):
            self.I[p].copy_(i)
            self.U[p].copy_(u)
        for layer, kept in zip(self.layers.values(), state["kept"]):
            layer.keep(kept)
