"""The schedule, the forward process and the reverse steps against their equations."""
import math

import pytest
import torch

from model.diffusion import Diffusion, guided_eps


def test_schedule_endpoints_and_monotone():
    d = Diffusion(T=1000, beta_start=1e-4, beta_end=0.02)
    assert math.isclose(float(d.betas[0]), 1e-4) and math.isclose(float(d.betas[-1]), 0.02)
    assert math.isclose(float(d.alpha_bar[0]), 1 - 1e-4)
    assert torch.all(d.alpha_bar[1:] < d.alpha_bar[:-1])  # strictly decreasing: every step adds noise
    assert float(d.alpha_bar[-1]) < 1e-4                   # x_T is (almost) pure noise
    assert torch.allclose(d.alpha_bar, torch.cumprod(1 - d.betas, 0))


def test_forward_process_matches_closed_form_statistically():
    """Running q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I) step by step gives the closed form."""
    torch.manual_seed(0)
    d = Diffusion(T=1000)
    x_0 = torch.full((20000,), 0.8)
    x = x_0.clone()
    for t in range(300):
        x = d.alphas[t].sqrt().float() * x + d.betas[t].sqrt().float() * torch.randn_like(x)
    alpha_bar = float(d.alpha_bar[299])
    assert abs(x.mean() - math.sqrt(alpha_bar) * 0.8) < 0.02
    assert abs(x.std() - math.sqrt(1 - alpha_bar)) < 0.02
    # ... and q_sample is exactly the closed form
    eps = torch.randn(4, 1, 28, 28)
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    t = torch.tensor([0, 10, 500, 999])
    expected = torch.stack([math.sqrt(d.alpha_bar[k]) * x0[i] + math.sqrt(1 - d.alpha_bar[k]) * eps[i]
                            for i, k in enumerate(t.tolist())])
    assert torch.allclose(d.q_sample(x0, t, eps), expected.float(), atol=1e-5)


def test_ddpm_step_equals_the_formula_on_hand_made_tensors():
    d = Diffusion(T=10, beta_start=0.1, beta_end=0.5)
    x_t = torch.tensor([[0.5, -0.3], [1.5, 0.0]]).view(1, 1, 2, 2)
    eps = torch.tensor([[0.2, 0.1], [-0.4, 0.3]]).view(1, 1, 2, 2)
    z = torch.tensor([[1.0, -1.0], [0.5, 2.0]]).view(1, 1, 2, 2)
    t = 6
    beta, alpha = float(d.betas[t]), 1 - float(d.betas[t])
    ab, ab_prev = float(d.alpha_bar[t]), float(d.alpha_bar[t - 1])
    x0 = ((x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)).clamp(-1, 1)  # DDPM eq. 15, clipped
    mean = math.sqrt(ab_prev) * beta / (1 - ab) * x0 + math.sqrt(alpha) * (1 - ab_prev) / (1 - ab) * x_t
    var = (1 - ab_prev) / (1 - ab) * beta
    assert x0.abs().max() == 1  # the hand-made case does exercise the clipping
    assert torch.allclose(d.ddpm_step(x_t, t, t - 1, eps, z), mean + math.sqrt(var) * z, atol=1e-6)
    # the last step returns the clipped x0 prediction, no noise
    last = ((x_t - math.sqrt(1 - d.alpha_bar[0]) * eps) / math.sqrt(d.alpha_bar[0])).clamp(-1, 1)
    assert torch.allclose(d.ddpm_step(x_t, 0, -1, eps, z), last.float(), atol=1e-6)


def test_ddim_with_eta_1_is_the_ddpm_step():
    torch.manual_seed(0)
    d = Diffusion(T=50)
    x_t, eps, z = torch.randn(3, 8, 1, 28, 28) * 1.5
    for t in (49, 20, 1):
        assert torch.allclose(d.ddim_step(x_t, t, t - 1, eps, 1.0, z), d.ddpm_step(x_t, t, t - 1, eps, z),
                              atol=1e-5)


def test_ddim_eta_1_step_has_the_ddpm_posterior_distribution():
    """One step from a fixed x_t, many noise draws: mean and variance of the Gaussian posterior."""
    torch.manual_seed(0)
    d = Diffusion(T=100)
    t = 40
    x_t = torch.full((40000, 1, 1, 1), 0.3)
    eps = torch.full_like(x_t, 0.1)
    out = d.ddim_step(x_t, t, t - 1, eps, 1.0, torch.randn_like(x_t))
    ab, ab_prev, beta = float(d.alpha_bar[t]), float(d.alpha_bar[t - 1]), float(d.betas[t])
    x0 = (0.3 - math.sqrt(1 - ab) * 0.1) / math.sqrt(ab)
    mean = math.sqrt(ab_prev) * beta / (1 - ab) * x0 + math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * 0.3
    var = (1 - ab_prev) / (1 - ab) * beta
    assert abs(out.mean() - mean) < 3 * math.sqrt(var / 40000) + 1e-6
    assert abs(out.var() / var - 1) < 0.03


def test_ddim_sampler_with_eta_1_reproduces_the_ddpm_sampler(tiny_model):
    d = Diffusion(T=20)
    y = torch.arange(4)
    runs = [d.sample(tiny_model.eval(), y, sampler=s, eta=1.0, generator=torch.Generator().manual_seed(3))
            for s in ("ddpm", "ddim")]
    assert torch.allclose(runs[0], runs[1], atol=1e-5)


def test_ddim_eta_0_is_deterministic_given_the_start(tiny_model):
    d = Diffusion(T=100)
    y = torch.arange(5)
    a = d.sample(tiny_model.eval(), y, steps=10, sampler="ddim", generator=torch.Generator().manual_seed(1))
    b = d.sample(tiny_model, y, steps=10, sampler="ddim", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # eta = 0 draws no noise after x_T: the same x_T gives the same image whatever the generator says
    x_T = torch.randn(5, 1, 28, 28)
    c = d.sample(tiny_model, y, steps=10, sampler="ddim", x_T=x_T.clone(), generator=torch.Generator().manual_seed(7))
    e = d.sample(tiny_model, y, steps=10, sampler="ddim", x_T=x_T.clone(), generator=torch.Generator().manual_seed(8))
    assert torch.equal(c, e)
    assert a.min() >= -1 and a.max() <= 1


def test_timesteps_span_the_chain():
    d = Diffusion(T=1000)
    assert d.timesteps(1000) == list(range(999, -1, -1))
    ts = d.timesteps(50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)


def test_guidance_1_is_exactly_the_conditional_prediction(tiny_model):
    model = tiny_model.eval()
    x, t, y = torch.randn(4, 1, 28, 28), torch.tensor([5, 50, 500, 900]), torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        assert torch.equal(guided_eps(model, x, t, y, 1.0), model(x, t, y))
        cond, null = model(x, t, y), model(x, t, torch.full_like(y, 10))
        assert torch.allclose(guided_eps(model, x, t, y, 3.0), null + 3.0 * (cond - null), atol=1e-5)


def test_label_dropout_uses_the_null_label(tiny_model):
    seen = []

    def spy(x_t, t, y):
        seen.append(y.clone())
        return torch.zeros_like(x_t)  # only the labels matter here

    spy.config = tiny_model.config
    d = Diffusion(T=10)
    y = torch.zeros(2000, dtype=torch.long)
    torch.manual_seed(0)
    d.loss(spy, torch.zeros(2000, 1, 28, 28), y, p_uncond=0.1)
    share = (seen[0] == 10).float().mean()
    assert 0.08 < share < 0.12 and set(seen[0].tolist()) == {0, 10}


def test_logit_normal_t_draws_the_middle_steps_more_often():
    d = Diffusion(T=1000)
    torch.manual_seed(0)
    uniform, logit_normal = d.draw_t(100_000, "cpu"), d.draw_t(100_000, "cpu", "logit-normal")
    for t in (uniform, logit_normal):
        assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    share = lambda t, lo, hi: ((t >= lo) & (t < hi)).float().mean().item()
    assert abs(share(uniform, 0, 100) - 0.10) < 0.005 and abs(share(uniform, 450, 550) - 0.10) < 0.005
    assert abs(share(logit_normal, 0, 100) - 0.014) < 0.003 and abs(share(logit_normal, 900, 1000) - 0.014) < 0.003
    assert abs(share(logit_normal, 450, 550) - 0.159) < 0.005  # density 1.6x uniform's at T/2
    # The loss draws its t this way when asked: the same draws by hand give the same Min-SNR-weighted loss.
    x_0, y = torch.rand(256, 1, 28, 28) * 2 - 1, torch.zeros(256, dtype=torch.long)
    zero = lambda x_t, t, y: torch.zeros_like(x_t)  # predicts no noise: the error is eps itself
    torch.manual_seed(0)
    drawn = d.loss(zero, x_0, y, min_snr_gamma=5.0, t_sampling="logit-normal")
    torch.manual_seed(0)
    t = d.draw_t(256, "cpu", "logit-normal")
    eps = torch.randn_like(x_0)
    snr = d.alpha_bar[t] / (1 - d.alpha_bar[t])
    assert torch.allclose(drawn, (eps.pow(2).mean(dim=(1, 2, 3)) * (snr.clamp(max=5.0) / snr).float()).mean())
    with pytest.raises(ValueError, match="logit-normal"):
        d.draw_t(4, "cpu", "normal")


def test_min_snr_weights_each_example_by_min_snr_gamma_over_snr():
    d = Diffusion(T=1000)
    x_0, y = torch.rand(256, 1, 28, 28) * 2 - 1, torch.zeros(256, dtype=torch.long)
    zero = lambda x_t, t, y: torch.zeros_like(x_t)  # predicts no noise: the error is eps itself
    torch.manual_seed(0)
    weighted = d.loss(zero, x_0, y, min_snr_gamma=5.0)
    torch.manual_seed(0)  # the same draws of t and eps, by hand
    t = torch.randint(0, 1000, (256,))
    eps = torch.randn_like(x_0)
    snr = d.alpha_bar[t] / (1 - d.alpha_bar[t])
    expected = (eps.pow(2).mean(dim=(1, 2, 3)) * (snr.clamp(max=5.0) / snr).float()).mean()
    assert torch.allclose(weighted, expected, rtol=1e-5)
    torch.manual_seed(0)
    plain = d.loss(zero, x_0, y)
    torch.manual_seed(0)
    assert torch.allclose(d.loss(zero, x_0, y, min_snr_gamma=1e12), plain, rtol=1e-5)  # gamma -> inf: plain
    assert weighted < 0.95 * plain  # easy steps (SNR > 5: t < 130 or so) count less


def test_guidance_outside_its_interval_is_plain_conditional_sampling(tiny_model):
    d = Diffusion(T=100)
    y, x_T = torch.arange(4), torch.randn(4, 1, 28, 28)
    run = lambda **kw: d.sample(tiny_model.eval(), y, steps=10, sampler="ddim", x_T=x_T.clone(), **kw)
    plain = run(guidance=1.0)
    assert torch.equal(run(guidance=3.0, guidance_interval=(200, 300)), plain)  # no step in [200, 300]
    assert torch.equal(run(guidance=3.0, guidance_interval=(0, 99)), run(guidance=3.0))  # every step inside
    assert not torch.allclose(run(guidance=3.0, guidance_interval=(0, 50)), plain)


def test_the_default_guidance_interval_is_sigma_028_to_542():
    from harness.sampling import parse_interval, resolve_interval

    d = Diffusion(T=1000)
    lo, hi = d.steps_with_sigma(0.28, 5.42)
    assert (lo, hi) == (82, 578)
    sigma = ((1 - d.alpha_bar) / d.alpha_bar).sqrt()
    assert sigma[lo - 1] <= 0.28 < sigma[lo] and sigma[hi] <= 5.42 < sigma[hi + 1]
    assert resolve_interval(parse_interval("auto"), d) == (82, 578)
    assert resolve_interval(parse_interval("auto"), Diffusion(T=200)) != (82, 578)  # follows the schedule
    assert parse_interval("all") is None and parse_interval("10,20") == (10, 20)


def test_generate_samples_in_seeded_batches(tiny_model):
    from harness.sampling import generate

    d, model, sizes = Diffusion(T=20), tiny_model.eval(), []
    spy = lambda x_t, t, y: sizes.append(len(y)) or model(x_t, t, y)
    spy.config = model.config
    labels = torch.arange(6)
    a = generate(spy, d, labels, steps=3, sampler="ddpm", seed=1, batch_size=4)
    assert sizes == [4, 4, 4, 2, 2, 2]  # two batches, each down the whole 3-step chain
    assert a.shape == (6, 1, 28, 28) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(generate(model, d, labels, steps=3, sampler="ddpm", seed=1, batch_size=4), a)
    assert not torch.allclose(generate(model, d, labels, steps=3, sampler="ddpm", seed=2, batch_size=4), a)
    calls = []  # the progress bar's hook: once per step
    d.sample(model, labels, steps=3, callback=lambda *_: calls.append(1))
    assert len(calls) == 3


def test_generate_progress_bar_counts_every_step(tiny_model, monkeypatch):
    import harness.sampling as sampling

    bars = []

    class Bar:  # stands in for tqdm: records the total it was promised and the updates it got
        def __init__(self, total, **_):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(sampling, "tqdm", Bar)
    sampling.generate(tiny_model.eval(), Diffusion(T=20), torch.arange(6), steps=3, batch_size=4)
    assert len(bars) == 1 and bars[0].total == bars[0].n == 6  # two batches of three steps
