"""The UNet, its cross-attention, the EMA, and a training loop that can actually learn."""
import torch

from model.attention import CrossAttention, LabelContext
from model.diffusion import Diffusion
from model.ema import EMA
from model.unet import UNet, timestep_embedding

from conftest import TINY


def test_shapes(tiny_model):
    x, t, y = torch.randn(5, 1, 28, 28), torch.randint(0, 1000, (5,)), torch.tensor([0, 1, 2, 9, 10])
    assert tiny_model(x, t, y).shape == (5, 1, 28, 28)
    assert LabelContext(10, 4, 8)(y).shape == (5, 4, 8)
    assert timestep_embedding(t, 16).shape == (5, 16)
    assert CrossAttention(32, 8, heads=4)(torch.randn(5, 32, 7, 7), torch.randn(5, 4, 8)).shape == (5, 32, 7, 7)


def test_no_batchnorm_and_groupnorm_everywhere(tiny_model):
    kinds = {type(m).__name__ for m in tiny_model.modules()}
    assert "GroupNorm" in kinds and not any("BatchNorm" in k for k in kinds)
    # a sample does not depend on the rest of its batch (it would with BatchNorm statistics)
    tiny_model.eval()
    x, t, y = torch.randn(6, 1, 28, 28), torch.full((6,), 300), torch.arange(6)
    with torch.no_grad():
        assert torch.allclose(tiny_model(x, t, y)[:2], tiny_model(x[:2], t[:2], y[:2]), atol=1e-5)


def _attention_grads(model):
    x, t, y = torch.randn(4, 1, 28, 28), torch.randint(0, 1000, (4,)), torch.tensor([1, 4, 7, 10])
    model(x, t, y).pow(2).mean().backward()
    attn = [m for m in model.modules() if isinstance(m, CrossAttention)]
    assert len(attn) == 5  # 14x14 and 7x7 on the way down and up, and the middle
    return [(name, getattr(a, name).weight.grad) for a in attn for name in ("w_q", "w_k", "w_v")]


def test_cross_attention_gradients_reach_w_q_w_k_w_v(tiny_model):
    for name, grad in _attention_grads(tiny_model):
        assert grad is not None and grad.abs().sum() > 0, f"{name} got no gradient"


def test_the_attention_map_is_the_one_the_fused_forward_uses():
    """CrossAttention.weights is softmax(Q K^T / sqrt(d)) itself: weights @ V, heads joined, then w_o and the
    residual, gives forward's output; each pixel's weights sum to 1; w_k = 0 makes them equal."""
    torch.manual_seed(0)
    attn, x, context = CrossAttention(32, 8, heads=4), torch.randn(3, 32, 7, 7), torch.randn(3, 5, 8)
    w = attn.weights(x, context)                                          # [3, 4, 49, 5]
    assert w.shape == (3, 4, 49, 5) and torch.allclose(w.sum(-1), torch.ones(3, 4, 49))
    assert w.max() > 0.5                                                   # random weights already choose
    v = attn.w_v(context).view(3, 5, 4, 8).transpose(1, 2)                 # [3, heads, 5, 8]
    out = attn.w_o((w @ v).transpose(1, 2).reshape(3, 49, 32)).transpose(1, 2).reshape(3, 32, 7, 7)
    torch.testing.assert_close(x + out, attn(x, context), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        attn.w_k.weight.zero_()
    torch.testing.assert_close(attn.weights(x, context), torch.full_like(w, 1 / 5))


def test_a_single_context_token_starves_w_q_and_w_k():
    """Why the label is several tokens: softmax over one key is 1, so w_q and w_k learn nothing."""
    torch.manual_seed(0)
    grads = dict(_attention_grads(UNet(**{**TINY, "context_tokens": 1})))
    scale = grads["w_v"].abs().max()
    assert scale > 0
    # zero up to float rounding in the softmax's backward (~1e-11 here, against ~1e-2 for w_v)
    assert grads["w_q"].abs().max() < 1e-6 * scale and grads["w_k"].abs().max() < 1e-6 * scale


def test_label_changes_the_prediction(tiny_model):
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([500, 500])
    with torch.no_grad():
        assert not torch.allclose(tiny_model(x, t, torch.tensor([3, 3])), tiny_model(x, t, torch.tensor([3, 8])))


def test_ema_update_formula(tiny_model):
    ema = EMA(tiny_model, decay=0.99)
    before = [p.clone() for p in ema.model.parameters()]
    tiny_model.stem.requires_grad_(False)  # a frozen parameter must not move
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(1.0)
    for step, d in ((0, 1 / 10), (5000, 0.99)):  # warm-up: min(decay, (1+k)/(10+k))
        assert abs(ema.decay_at(step) - d) < 1e-12
    ema.update(tiny_model, step=5000)
    for (name, p), q, old in zip(tiny_model.named_parameters(), ema.model.parameters(), before):
        if name.startswith("stem."):
            assert torch.equal(q, old)
        else:
            assert torch.allclose(q, 0.99 * old + 0.01 * p, atol=1e-6)


def test_ema_of_a_short_run_averages_its_last_tenth():
    """With the warm-up decay (1+k)/(10+k) the cap of 0.999 never binds in a 1,404-step run, and the average
    weighs step k like k^8: centred at 90% of the run, about 9% of it wide (a power-function EMA)."""
    K = 1404
    net = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(net, decay=0.999)
    assert ema.decay_at(K - 1) < 0.999
    with torch.no_grad():
        for k in range(K):
            net.weight.fill_(float(k))  # the live weight after step k is k: the average is the mean step
            ema.update(net, k)
    assert abs(ema.model.weight.item() / K - 0.9) < 0.001
    ema2 = EMA(torch.nn.Linear(1, 1, bias=False), decay=0.999)
    with torch.no_grad():
        for k in range(K):
            net.weight.fill_(float(k) ** 2)
            ema2.update(net, k)
    width = (ema2.model.weight.item() - ema.model.weight.item() ** 2) ** 0.5 / K  # sqrt(E[k^2] - E[k]^2)
    assert abs(width - 0.0908) < 0.001


def test_tiny_model_overfits_a_handful_of_images():
    torch.manual_seed(0)
    model = UNet(**TINY)
    d = Diffusion(T=100)
    x_0 = torch.rand(8, 1, 28, 28).round() * 2 - 1
    y = torch.arange(8)
    # a fixed evaluation set of (t, eps), so the loss is comparable before and after
    t_eval, eps_eval = torch.randint(0, 100, (64,)), torch.randn(64, 1, 28, 28)

    def eval_loss():
        with torch.no_grad():
            x0, yy = x_0.repeat(8, 1, 1, 1), y.repeat(8)
            return torch.nn.functional.mse_loss(model(d.q_sample(x0, t_eval, eps_eval), t_eval, yy), eps_eval)

    start = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = d.loss(model, x_0.repeat(4, 1, 1, 1), y.repeat(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < start / 5


def test_groupnorm_keeps_the_input_dtype_under_autocast():
    from model.norm import GroupNorm
    ours, ref = GroupNorm(4, 16), torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        ref.weight.normal_(), ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())  # same parameters, same names: old checkpoints load
    x = torch.randn(3, 16, 5, 5)
    assert torch.equal(ours(x), ref(x))  # float32 in, float32 math: exactly nn.GroupNorm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16  # autocast would have widened it to float32
    assert torch.allclose(out.float(), ref(x.bfloat16().float()), atol=0.05)
