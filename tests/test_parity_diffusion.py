"""The hand-written diffusion against diffusers' schedulers, number for number (fp32, CPU).

The options that make diffusers compute what model/diffusion.py computes, named once here:
  * the schedule: DDPM's linear betas from 1e-4 to 0.02 over T = 1000 steps;
  * clip_sample=True: x0_hat is clipped to [-1, 1] (diffusers' clip_sample_range is 1 by default);
  * DDPM's posterior variance "fixed_small", beta~ = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_t;
  * DDIM: set_alpha_to_one=True (the step after the last lands on alpha_bar = 1, the clean image) and
    use_clipped_model_output=True (eps re-derived from the clipped x0_hat, as ddim_step does).
Where the two differ by design: diffusers' DDIM walks t, t - T/n, ... ("leading" spacing, ending at 0),
ours spreads n steps evenly from T-1 down to 0 (`Diffusion.timesteps`); the step rule is the same, so the
tests compare single steps both samplers take. diffusers multiplies its schedule out in float32, ours in
float64: alpha_bar agrees to 4e-7 relative, but 1 - alpha_bar near t = 0 only to 2e-4, which moves a step
there by 5e-5. So the step tests run our formulas on diffusers' own alpha_bar (`on_their_schedule`), and
the schedule is compared by itself.
"""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.training_utils import compute_snr

from model.diffusion import Diffusion, guided_eps

SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
TOL = 1e-5


def close(a, b, tol=TOL):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def on_their_schedule(scheduler, prediction="eps"):
    """Our Diffusion with diffusers' alpha_bar in place of its own: the step rules compared alone."""
    diffusion = Diffusion(prediction=prediction)
    diffusion.alpha_bar = scheduler.alphas_cumprod.double()
    return diffusion


def test_the_schedule_is_diffusers_linear_schedule():
    theirs = DDPMScheduler(**SCHEDULE).alphas_cumprod.double()
    assert ((Diffusion().alpha_bar - theirs).abs() / theirs).max() < 1e-6


@pytest.fixture
def x_t_and_eps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 28, 28, generator=g)
    eps = torch.randn(4, 1, 28, 28, generator=g)
    return x, eps


def test_forward_process_is_diffusers_add_noise(x_t_and_eps):
    x_0, eps = x_t_and_eps
    x_0 = x_0.clamp(-1, 1)
    t = torch.tensor([0, 1, 500, 999])
    ours = Diffusion().q_sample(x_0, t, eps)
    theirs = DDPMScheduler(**SCHEDULE).add_noise(x_0, eps, t)
    assert close(ours, theirs)


def test_v_target_is_diffusers_get_velocity(x_t_and_eps):
    x_0, eps = x_t_and_eps
    t = torch.tensor([3, 250, 750, 999])
    assert close(Diffusion(prediction="v").velocity(x_0, t, eps), DDPMScheduler(**SCHEDULE).get_velocity(x_0, eps, t))


@pytest.mark.parametrize("t", [999, 500, 20, 1, 0])
def test_one_ddpm_step_is_diffusers_ddpm_step(x_t_and_eps, t):
    x_t, eps = x_t_and_eps
    x_t = 3 * x_t  # a noisy sample: outside [-1, 1], so clipping x0_hat matters
    scheduler = DDPMScheduler(**SCHEDULE, clip_sample=True, variance_type="fixed_small")
    theirs = scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(1)).prev_sample
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1))  # what diffusers drew
    ours = on_their_schedule(scheduler).ddpm_step(x_t, t, t - 1, eps, noise if t > 0 else 0.0)
    assert close(ours, theirs)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("t, t_prev", [(950, 900), (500, 450), (50, 0), (0, -1)])
def test_one_ddim_step_is_diffusers_ddim_step(x_t_and_eps, eta, t, t_prev):
    x_t, eps = x_t_and_eps
    x_t = 3 * x_t
    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=True, set_alpha_to_one=True)
    scheduler.set_timesteps(20)  # steps of T/20 = 50: 950, 900, ..., 50, 0 -- and from 0 to the clean image
    assert t in scheduler.timesteps.tolist()
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(2))
    theirs = scheduler.step(eps, t, x_t, eta=eta, use_clipped_model_output=True, variance_noise=noise).prev_sample
    ours = on_their_schedule(scheduler).ddim_step(x_t, t, t_prev, eps, eta, noise)
    assert close(ours, theirs)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weights_are_the_diffusers_training_examples(prediction):
    """diffusers' train_text_to_image.py: mse weight = min(snr, gamma) / snr (eps) or / (snr + 1) (v)."""
    gamma, t = 5.0, torch.arange(0, 1000, 37)
    snr = compute_snr(DDPMScheduler(**SCHEDULE), t)
    theirs = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    theirs = theirs / snr if prediction == "eps" else theirs / (snr + 1)
    assert close(Diffusion(prediction=prediction).min_snr_weight(t, gamma), theirs)


class Fixed(torch.nn.Module):
    """A 'network' whose conditional and unconditional predictions are fixed tensors."""
    config = dict(num_classes=10)

    def __init__(self, eps_y, eps_null):
        super().__init__()
        self.eps_y, self.eps_null = eps_y, eps_null

    def forward(self, x_t, t, y):
        return torch.where((y == 10).view(-1, 1, 1, 1), self.eps_null.repeat(2, 1, 1, 1)[:len(y)],
                           self.eps_y.repeat(2, 1, 1, 1)[:len(y)])


@pytest.mark.parametrize("s", [0.0, 1.0, 1.3, 3.0])
def test_guidance_is_diffusers_classifier_free_guidance(x_t_and_eps, s):
    """eps_null + s (eps_y - eps_null): diffusers' convention, where s = 1 is plain conditional sampling.
    The paper's own form, eps_y + w (eps_y - eps_null), is the same with w = s - 1, and differs at equal numbers."""
    eps_y, eps_null = x_t_and_eps
    x, t, y = torch.zeros(4, 1, 28, 28), torch.full((4,), 500), torch.tensor([1, 2, 3, 4])
    ours = guided_eps(Fixed(eps_y, eps_null), x, t, y, s)
    assert close(ours, ClassifierFreeGuidance(guidance_scale=s).forward(eps_y, eps_null).pred)
    paper = lambda w: ClassifierFreeGuidance(guidance_scale=w, use_original_formulation=True).forward(eps_y, eps_null).pred
    assert not close(ours, paper(s)) and close(ours, paper(s - 1))
