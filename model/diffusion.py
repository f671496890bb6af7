"""DDPM in one page: the noise schedule, the forward process, the loss, and the reverse samplers.

Notation follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM), and Song et al. 2021,
"Denoising Diffusion Implicit Models" (DDIM). Steps are 0-indexed: t = 0 .. T-1.

    beta_t        linear from beta_start to beta_end                          (DDPM sec. 4)
    alpha_t       = 1 - beta_t
    alpha_bar_t   = prod_{s<=t} alpha_s
    forward:      x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,  eps ~ N(0, I)   (DDPM eq. 4)
    loss:         || eps - eps_theta(x_t, t, y) ||^2                            (DDPM eq. 14)
    Min-SNR-gamma: the loss at step t weighted by min(SNR_t, gamma) / SNR_t,  SNR_t = alpha_bar_t / (1 - alpha_bar_t)
                  (Hang et al. 2023)
    t's draw:     uniform over 0..T-1 (DDPM), or logit-normal: t = floor(T sigmoid(z)), z ~ N(0, 1)
                  (Esser et al. 2024, the Stable Diffusion 3 paper)

What the network predicts (`prediction`): the noise eps (DDPM), or the velocity (Salimans & Ho 2022,
"Progressive Distillation", sec. 4)

    v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0,   and back:  eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t

eps is easy to predict at the noisiest steps and v stays informative there (at alpha_bar -> 0, v -> -x_0).
The samplers read every output as eps through `eps_from`; Min-SNR's weight for v is min(SNR_t, gamma) / (SNR_t + 1).

Reverse step, from x_t to x_{t'} with t' < t (t' = t - 1 for plain DDPM; larger jumps for fewer steps):

    x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t), clipped to [-1, 1]  (DDPM eq. 15)
    DDPM:  x_t' = mu~(x_t, x0_hat) + sqrt(beta~) z                              (DDPM eqs. 6-7)
    DDIM:  x_t' = sqrt(alpha_bar_t') x0_hat + sqrt(1 - alpha_bar_t' - sigma^2) eps_hat + sigma z  (DDIM eq. 12)

We clip the *predicted clean image* x0_hat, not x_t: x_t is legitimately outside [-1, 1] (it is mostly
noise early on), while x0_hat must be a valid image.

Classifier-free guidance (Ho & Salimans 2022): one network predicts both eps(x_t, y) and the unconditional
eps(x_t, null), having seen the null label for ~10% of training examples. Sampling extrapolates

    eps_hat = eps_null + s (eps_y - eps_null)

with s = 1 plain conditional sampling and s > 1 pushing harder toward the label (diffusers' convention).
Guidance can be limited to an interval of steps t_lo <= t <= t_hi (Kynkaanniemi et al. 2024): at the
noisiest steps it pulls every sample toward the same prototype (less diversity), at the cleanest it has
nothing left to decide; outside the interval one conditional pass suffices, which also saves time. The
interval is naturally stated in noise levels, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t);
`steps_with_sigma` turns it into steps of this schedule.
"""
import torch


class Diffusion:
    """The fixed schedule and everything computed from it. Holds no learned weights."""

    def __init__(self, T=1000, beta_start=1e-4, beta_end=0.02, prediction="eps"):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.T, self.beta_start, self.beta_end, self.prediction = T, beta_start, beta_end, prediction
        # Computed in float64 on the host: these are constants, and 1000 cumulative products in float32
        # would lose digits exactly where alpha_bar is tiny.
        self.betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        self._on_device = {}  # device -> float32 copy of alpha_bar, so training steps do no host-to-device copies

    def alpha_bar_at(self, t):
        """alpha_bar_t, the one way every formula below reads it.

        t a tensor of steps [B] (training: a random step per image) -> float32 [B,1,1,1] on t's device,
        ready to multiply images. t an int (sampling: one step for the whole batch) -> a Python float, with
        alpha_bar_{-1} = 1 (the clean image) for the step after the last.
        """
        if isinstance(t, int):
            return 1.0 if t < 0 else float(self.alpha_bar[t])
        if t.device not in self._on_device:
            self._on_device[t.device] = self.alpha_bar.to(t.device, torch.float32)
        return self._on_device[t.device][t].view(-1, 1, 1, 1)

    def config(self):
        return dict(T=self.T, beta_start=self.beta_start, beta_end=self.beta_end, prediction=self.prediction)

    def steps_with_sigma(self, sigma_lo, sigma_hi):
        """(t_lo, t_hi): the steps whose noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) lies in
        (sigma_lo, sigma_hi]. sigma_t grows with t, so they are one run of consecutive steps."""
        sigma = ((1 - self.alpha_bar) / self.alpha_bar).sqrt()
        inside = ((sigma > sigma_lo) & (sigma <= sigma_hi)).nonzero().flatten().tolist()
        if not inside:
            raise ValueError(f"no step of this schedule has sigma in ({sigma_lo}, {sigma_hi}]")
        return inside[0], inside[-1]

    # ---- forward process and training -------------------------------------------------------------

    def q_sample(self, x_0, t, eps):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, for a batch of steps t [B]."""
        alpha_bar = self.alpha_bar_at(t)  # [B,1,1,1]
        return alpha_bar.sqrt() * x_0 + (1 - alpha_bar).sqrt() * eps

    def velocity(self, x_0, t, eps):
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0: the v-prediction target, for steps t [B]."""
        alpha_bar = self.alpha_bar_at(t)
        return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x_0

    def draw_t(self, n, device, how="uniform"):
        """n training steps t [n]: `uniform` over 0..T-1, or `logit-normal`, which draws the middle steps,
        where a digit takes its shape, more often than the nearly clean or nearly pure-noise ends: the
        density at T/2 is 1.6x uniform's, and the outer tenth on either side gets 1.4% of the draws, not 10%."""
        if how == "uniform":
            return torch.randint(0, self.T, (n,), device=device)
        if how == "logit-normal":
            return (torch.sigmoid(torch.randn(n, device=device)) * self.T).long().clamp(0, self.T - 1)
        raise ValueError(f"t sampling must be 'uniform' or 'logit-normal', got {how!r}")

    def loss(self, model, x_0, y, p_uncond=0.0, min_snr_gamma=None, t_sampling="uniform"):
        """The simple DDPM loss: MSE between the true noise and the predicted noise at a random step
        (or between the true and predicted velocity v, with prediction = 'v').

        With probability `p_uncond` a label is replaced by the null label, so the same network also learns
        the unconditional prediction that classifier-free guidance needs.

        With `min_snr_gamma` each example's error is weighted by min(SNR_t, gamma) / SNR_t (Min-SNR-gamma,
        Hang et al. 2023). Nearly clean inputs (small t, huge SNR) are easy and their gradients fight those of
        the noisy steps; capping their weight lets training spend its few steps where the digit is decided.
        `t_sampling` chooses how t is drawn (`draw_t`).
        """
        B = x_0.shape[0]
        t = self.draw_t(B, x_0.device, t_sampling)
        eps = torch.randn_like(x_0)
        x_t = self.q_sample(x_0, t, eps)
        if p_uncond > 0:
            drop = torch.rand(B, device=x_0.device) < p_uncond
            y = torch.where(drop, torch.full_like(y, model.config["num_classes"]), y)
        target = eps if self.prediction == "eps" else self.velocity(x_0, t, eps)
        err = (model(x_t, t, y).float() - target).pow(2).mean(dim=(1, 2, 3))    # [B]: per-example MSE
        if min_snr_gamma:
            err = err * self.min_snr_weight(t, min_snr_gamma)
        return err.mean()

    def min_snr_weight(self, t, gamma):
        """Min-SNR-gamma's weight of the loss at steps t [B]: min(SNR_t, gamma) / SNR_t, SNR_t = alpha_bar_t /
        (1 - alpha_bar_t). The v loss already weighs step t by SNR_t + 1 relative to the eps loss: divide that out."""
        alpha_bar = self.alpha_bar_at(t).flatten()  # [B]
        snr = alpha_bar / (1 - alpha_bar)
        return snr.clamp(max=gamma) / (snr if self.prediction == "eps" else snr + 1)

    # ---- reverse process ---------------------------------------------------------------------------

    def eps_from(self, x_t, t, out):
        """The network's output read as eps_hat: itself, or from v: eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t."""
        if self.prediction == "eps":
            return out
        alpha_bar = self.alpha_bar_at(t)
        return alpha_bar ** 0.5 * out + (1 - alpha_bar) ** 0.5 * x_t

    def predict_x0(self, x_t, t, eps):
        """x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), clipped to the pixel range."""
        alpha_bar = self.alpha_bar_at(t)
        return ((x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5).clamp(-1, 1)

    def ddpm_step(self, x_t, t, t_prev, eps, noise):
        """Ancestral step x_t -> x_{t_prev}: the Gaussian posterior q(x_{t_prev} | x_t, x0_hat).

            mu~   = sqrt(alpha_bar_prev) beta / (1 - alpha_bar_t) x0_hat
                    + sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t
            beta~ = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta

        with alpha_t = alpha_bar_t / alpha_bar_prev and beta = 1 - alpha_t. For t_prev = t - 1 these are
        DDPM's beta_t and alpha_t; for a larger jump they are the "respaced" values of Nichol & Dhariwal
        (2021), which lets DDPM run with fewer steps too.
        """
        alpha_bar, alpha_bar_prev = self.alpha_bar_at(t), self.alpha_bar_at(t_prev)
        alpha = alpha_bar / alpha_bar_prev
        beta = 1 - alpha
        x0_hat = self.predict_x0(x_t, t, eps)
        mean = (alpha_bar_prev ** 0.5 * beta / (1 - alpha_bar)) * x0_hat \
            + (alpha ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)) * x_t
        var = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta  # 0 at the last step: return the mean
        return mean + var ** 0.5 * noise

    def ddim_step(self, x_t, t, t_prev, eps, eta, noise):
        """DDIM step x_t -> x_{t_prev} (DDIM eq. 12). eta = 0: deterministic; eta = 1: the DDPM step.

            sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)
        """
        alpha_bar, alpha_bar_prev = self.alpha_bar_at(t), self.alpha_bar_at(t_prev)
        x0_hat = self.predict_x0(x_t, t, eps)
        # Re-derive eps from the clipped x0_hat so that the two agree; then eta = 1 is exactly DDPM.
        eps = (x_t - alpha_bar ** 0.5 * x0_hat) / (1 - alpha_bar) ** 0.5
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)) ** 0.5
        x_prev = alpha_bar_prev ** 0.5 * x0_hat + max(1 - alpha_bar_prev - sigma ** 2, 0.0) ** 0.5 * eps
        return x_prev + sigma * noise if sigma > 0 else x_prev

    def timesteps(self, steps):
        """`steps` evenly spaced steps from T-1 down to 0 (all T of them when steps = T)."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps must be in 1..{self.T}, got {steps}")
        return torch.linspace(self.T - 1, 0, steps).round().long().tolist()

    @torch.inference_mode()
    def sample(self, model, y, steps=None, sampler="ddpm", eta=None, guidance=1.0, guidance_interval=None,
               generator=None, x_T=None, callback=None):
        """Draw one image per label in y [B], starting from x_T ~ N(0, I). Returns x_0 [B,1,28,28] in [-1,1].

        `guidance` applies at steps t with t_lo <= t <= t_hi when `guidance_interval` = (t_lo, t_hi) is
        given, at every step otherwise. `callback(i, t_prev, x, eps)`, if given, is called after step i with
        the new x_{t_prev} (t_prev = -1: x_0) and the step's eps_hat: a progress bar's update, or a figure's
        snapshots (which can rebuild the clean digit the step aimed at with `predict_x0`). Everything stays
        on the device: no host copies per step.
        """
        steps = self.T if steps is None else steps
        eta = (1.0 if sampler == "ddpm" else 0.0) if eta is None else eta
        device = y.device
        x = torch.randn(len(y), 1, 28, 28, device=device, generator=generator) if x_T is None else x_T
        ts = self.timesteps(steps)
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            in_interval = guidance_interval is None or guidance_interval[0] <= t <= guidance_interval[1]
            # Guidance mixes outputs with weights summing to 1, so guiding v and then converting equals guiding eps.
            out = guided_eps(model, x, torch.full_like(y, t), y, guidance if in_interval else 1.0)
            eps = self.eps_from(x, t, out)
            # Fresh noise only where the step uses it (not DDIM with eta = 0, not the last step).
            stochastic = t_prev >= 0 and (sampler == "ddpm" or eta > 0)
            noise = torch.randn(x.shape, device=device, generator=generator) if stochastic else 0.0
            if sampler == "ddpm":
                x = self.ddpm_step(x, t, t_prev, eps, noise)
            else:
                x = self.ddim_step(x, t, t_prev, eps, eta, noise)
            if callback is not None:
                callback(i, t_prev, x, eps)
        return x


def guided_eps(model, x_t, t, y, guidance=1.0):
    """Classifier-free guidance: eps_null + s (eps_y - eps_null). s = 1 is the conditional prediction itself.
    (With v-prediction the same mix applies to v.)

    For s != 1 the conditional and unconditional inputs go through the network as one batch of 2B.
    """
    if guidance == 1.0:
        return model(x_t, t, y).float()
    null = torch.full_like(y, model.config["num_classes"])
    eps_y, eps_null = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
    return eps_null + guidance * (eps_y - eps_null)

