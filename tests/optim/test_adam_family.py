"""Paper identities and peer comparisons for the Adam-like optimizers.

Each test writes the paper's update out directly (float64, plain tensor arithmetic) or runs an
independent implementation (pytorch-optimizer, torch.optim) on the same gradient stream.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradkit.optim as go
from gradkit.optim.ademamix import alpha_schedule, beta3_schedule

DT = torch.float64


def grad_stream(shape, steps, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=g, dtype=DT) for _ in range(steps)]


def x_init(shape=(40,), seed=11):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def run(opt_cls, x0, grads, opt_kwargs=None, **kw):
    x = x0.clone().requires_grad_()
    opt = opt_cls([x], **(opt_kwargs or {}), **kw)
    out = []
    for g in grads:
        x.grad = g.clone()  # peers may modify the gradient in place
        opt.step()
        out.append(x.detach().clone())
    return torch.stack(out)


def close(a, b, rtol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=0)


# ----------------------------------------------------------------------------------------------
# Grams
# ----------------------------------------------------------------------------------------------
def paper_grams(x0, grads, lr, betas, eps, wd):
    b1, b2 = betas
    x, m, v, out = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0), []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        x = x - lr * (g.sign() * u.abs() + wd * x)
        out.append(x)
    return torch.stack(out)


def test_grams_matches_algorithm_1():
    x0, grads = x_init(), grad_stream((40,), 30)
    ours = run(go.Grams, x0, grads, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    close(ours, paper_grams(x0, grads, 1e-2, (0.8, 0.95), 1e-6, 0.1), rtol=1e-13)


def test_grams_update_never_points_uphill():
    """Grams' update is sign(g) times a non-negative magnitude: with no decay, every coordinate
    moves against its gradient (so <update, g> >= 0), on coordinates where the momentum has the
    other sign too (where Adam would move uphill)."""
    x0, grads = x_init(), grad_stream((40,), 50, seed=1)
    traj = run(go.Grams, x0, grads, lr=1e-2, weight_decay=0.0)
    prev = torch.cat([x0[None], traj[:-1]])
    adam = run(torch.optim.Adam, x0, grads, lr=1e-2, eps=1e-6)
    adam_prev = torch.cat([x0[None], adam[:-1]])
    assert ((adam_prev - adam) * torch.stack(grads) < 0).any()  # Adam does move uphill somewhere
    for g, a, b in zip(grads, prev, traj):
        assert ((a - b) * g >= 0).all()
        assert torch.dot(a - b, g) > 0


def test_grams_against_pytorch_optimizer():
    po = pytest.importorskip("pytorch_optimizer")
    x0, grads = x_init(), grad_stream((40,), 100, seed=2)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    close(run(go.Grams, x0, grads, **kw), run(po.Grams, x0, grads, **kw, foreach=False))


# ----------------------------------------------------------------------------------------------
# AdEMAMix
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
def test_ademamix_with_alpha_zero_is_adamw_exactly(foreach):
    x0, grads = x_init((7, 5)), grad_stream((7, 5), 60, seed=3)
    kw = dict(lr=3e-3, eps=1e-8, weight_decay=0.1)
    ours = run(go.AdEMAMix, x0, grads, betas=(0.9, 0.99, 0.999), alpha=0.0, foreach=foreach, **kw)
    adamw = run(torch.optim.AdamW, x0, grads, betas=(0.9, 0.99), foreach=False, **kw)
    assert torch.equal(ours, adamw)


def paper_ademamix(x0, grads, lr, betas, alpha, eps, weight_decay, T):
    """Algorithm 1 with the reference code's schedulers, written out directly."""
    b1, b2, b3 = betas
    x, m1, m2, v, out = x0.clone(), *(torch.zeros_like(x0) for _ in range(3)), []
    for t, g in enumerate(grads, start=1):
        a = min(t / T, 1.0)
        alpha_t = a * alpha
        hl = (1 - a) * (math.log(0.5) / math.log(b1 + 1e-8) - 1) + a * (math.log(0.5) / math.log(b3 + 1e-8) - 1)
        beta3_t = 0.5 ** (1 / (hl + 1)) if t < T else b3
        m1 = b1 * m1 + (1 - b1) * g
        m2 = beta3_t * m2 + (1 - beta3_t) * g
        v = b2 * v + (1 - b2) * g**2
        u = (m1 / (1 - b1**t) + alpha_t * m2) / ((v / (1 - b2**t)).sqrt() + eps)
        x = x - lr * (u + weight_decay * x)
        out.append(x)
    return torch.stack(out)


def test_ademamix_matches_algorithm_1_with_schedulers():
    x0, grads = x_init(), grad_stream((40,), 60, seed=4)
    kw = dict(lr=1e-2, betas=(0.9, 0.99, 0.999), alpha=4.0, eps=1e-8, weight_decay=0.1)
    ours = run(go.AdEMAMix, x0, grads, t_alpha_beta3=30, **kw)
    close(ours, paper_ademamix(x0, grads, T=30, **kw), rtol=1e-12)


def test_ademamix_schedulers():
    b1, b3, T = 0.9, 0.9999, 100
    assert alpha_schedule(0, 5.0, T) == 0 and alpha_schedule(50, 5.0, T) == 2.5 and alpha_schedule(400, 5.0, T) == 5.0
    assert beta3_schedule(0, b3, b1, T) == pytest.approx(b1, rel=1e-6)
    assert beta3_schedule(T, b3, b1, T) == b3
    half_life = [math.log(0.5) / math.log(beta3_schedule(t, b3, b1, T)) for t in range(0, T, 10)]
    steps = torch.diff(torch.tensor(half_life, dtype=DT))
    torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-5, atol=0)  # linear in half-life


def test_ademamix_slow_ema_is_not_bias_corrected():
    """The stored slow EMA and the first step: m1/(1-b1) = g, v/(1-b2) = g² (bias-corrected),
    slow term (1-b3) g uncorrected, so Δ1 = -lr (g + α(1-b3) g)/(|g| + ε) - lr·wd·x0."""
    lr, alpha, eps, wd = 0.1, 5.0, 1e-8, 0.2
    x0 = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    g = torch.tensor([1.0, -3.0, 0.25], dtype=DT)
    x = x0.clone().requires_grad_()
    opt = go.AdEMAMix([x], lr=lr, betas=(0.9, 0.999, 0.99), alpha=alpha, eps=eps, weight_decay=wd)
    x.grad = g.clone()
    opt.step()
    torch.testing.assert_close(opt.state[x]["exp_avg_slow"], 0.01 * g, rtol=1e-15, atol=0)
    expected = x0 - lr * (g + alpha * 0.01 * g) / (g.abs() + eps) - lr * wd * x0
    torch.testing.assert_close(x.detach(), expected, rtol=1e-14, atol=1e-15)


def test_ademamix_against_pytorch_optimizer():
    po = pytest.importorskip("pytorch_optimizer")
    x0, grads = x_init(), grad_stream((40,), 100, seed=5)
    kw = dict(lr=1e-2, betas=(0.9, 0.99, 0.999), alpha=5.0, eps=1e-8, weight_decay=0.05)
    peer = run(po.AdEMAMix, x0, grads, **kw, weight_decouple=True, foreach=False)
    close(run(go.AdEMAMix, x0, grads, **kw), peer)


def test_ademamix_scheduler_difference_with_pytorch_optimizer(monkeypatch):
    """Justified difference: the reference code's beta3 scheduler evaluates log(beta + 1e-8); we keep
    that, pytorch-optimizer drops the 1e-8.  For beta3 = 0.999 this moves the half-life by ~1e-5
    (relative), enough to move the trajectory by ~1e-4.  With the 1e-8 removed from ours (and only
    that), the two agree to 1e-6 over 100 steps."""
    po = pytest.importorskip("pytorch_optimizer")
    import gradkit.optim.ademamix as mod

    x0, grads = x_init(), grad_stream((40,), 100, seed=5)
    kw = dict(lr=1e-2, betas=(0.9, 0.99, 0.999), alpha=5.0, eps=1e-8, weight_decay=0.05, t_alpha_beta3=60)
    peer = run(po.AdEMAMix, x0, grads, **kw, weight_decouple=True, foreach=False)
    ours = run(go.AdEMAMix, x0, grads, **kw)
    assert not torch.allclose(ours, peer, rtol=1e-6, atol=0)  # the difference is real ...
    torch.testing.assert_close(ours, peer, rtol=1e-2, atol=1e-5)  # ... and small

    def without_eps(step, beta3, beta_start, warmup):
        if warmup is None or step >= warmup:
            return beta3
        a = step / warmup
        return math.exp(math.log(beta_start) * math.log(beta3) / ((1 - a) * math.log(beta3) + a * math.log(beta_start)))

    monkeypatch.setattr(mod, "beta3_schedule", without_eps)
    close(run(go.AdEMAMix, x0, grads, **kw), peer)  # ... and entirely explained


# ----------------------------------------------------------------------------------------------
# DiffGrad
# ----------------------------------------------------------------------------------------------
def test_diffgrad_constant_gradient_gives_half_the_adam_step():
    x0 = x_init((10,))
    g = torch.randn(10, generator=torch.Generator().manual_seed(6), dtype=DT)
    grads = [g] * 12
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=0.0)  # eps 0: Adam's and diffGrad's denominators coincide
    ours = torch.diff(torch.cat([x0[None], run(go.DiffGrad, x0, grads, **kw)]), dim=0)
    adam = torch.diff(torch.cat([x0[None], run(torch.optim.Adam, x0, grads, **kw)]), dim=0)
    torch.testing.assert_close(ours[0], torch.sigmoid(g.abs()) * adam[0], rtol=1e-13, atol=0)
    torch.testing.assert_close(ours[1:], 0.5 * adam[1:], rtol=1e-13, atol=0)


def test_diffgrad_previous_gradient_is_a_copy():
    x = torch.zeros(4, dtype=DT, requires_grad=True)
    opt = go.DiffGrad([x], foreach=False)
    x.grad = torch.ones(4, dtype=DT)
    opt.step()
    prev = opt.state[x]["previous_grad"]
    assert prev.data_ptr() != x.grad.data_ptr()
    x.grad.mul_(7.0)  # the caller reuses its gradient buffer
    torch.testing.assert_close(prev, torch.ones(4, dtype=DT))


def paper_diffgrad(x0, grads, lr, betas, eps, weight_decay):
    b1, b2 = betas
    x, m, v, prev, out = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0), torch.zeros_like(x0), []
    for t, g in enumerate(grads, start=1):
        g = g + weight_decay * x
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        xi = 1 / (1 + torch.exp(-(prev - g).abs()))
        x = x - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * xi * m / (v.sqrt() + eps)
        prev = g
        out.append(x)
    return torch.stack(out)


def test_diffgrad_matches_paper():
    x0, grads = x_init(), grad_stream((40,), 30, seed=7)
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    close(run(go.DiffGrad, x0, grads, **kw), paper_diffgrad(x0, grads, **kw), rtol=1e-13)


def test_diffgrad_against_pytorch_optimizer():
    po = pytest.importorskip("pytorch_optimizer")
    x0, grads = x_init(), grad_stream((40,), 100, seed=8)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    peer = run(po.DiffGrad, x0, grads, **kw, weight_decouple=False, foreach=False)
    close(run(go.DiffGrad, x0, grads, **kw), peer)


# ----------------------------------------------------------------------------------------------
# AdaBound / AMSBound
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [go.AdaBound, go.AMSBound])
def test_adabound_is_adam_early(cls):
    """At t = 1..5 the bounds [~1e-4, ~200] contain Adam's step sizes: the update is Adam's (eps 0)."""
    x0, grads = x_init(), grad_stream((40,), 5, seed=9)
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=0.0)
    adam_kw = dict(kw, amsgrad=cls is go.AMSBound)
    close(run(cls, x0, grads, **kw), run(torch.optim.Adam, x0, grads, **adam_kw), rtol=1e-12)


@pytest.mark.parametrize("cls", [go.AdaBound, go.AMSBound])
def test_adabound_is_sgd_with_momentum_late(cls):
    """For t -> inf both bounds tend to final_lr: theta_t = theta_{t-1} - final_lr * m_t."""
    x = x_init((30,)).requires_grad_()
    opt = cls([x], lr=1e-3, final_lr=0.1, gamma=1e-3)
    for g in grad_stream((30,), 3, seed=10):
        x.grad = g
        opt.step()
    opt.state[x]["step"] = 10**9  # jump far ahead: bounds are final_lr * (1 +- 1e-6)
    before = x.detach().clone()
    x.grad = grad_stream((30,), 1, seed=11)[0]
    opt.step()
    torch.testing.assert_close(before - x.detach(), 0.1 * opt.state[x]["exp_avg"], rtol=2e-6, atol=0)


def test_adabound_final_lr_follows_the_lr_schedule():
    x = torch.zeros(3, dtype=DT, requires_grad=True)
    opt = go.AdaBound([x], lr=1e-3, final_lr=0.1)
    opt.param_groups[0]["lr"] = 5e-4
    h = opt._hyper(opt.param_groups[0], 10**9)
    assert h[5] == pytest.approx(0.05, rel=1e-5) and h[6] == pytest.approx(0.05, rel=1e-5)


@pytest.mark.parametrize("ams", [False, True])
def test_adabound_against_pytorch_optimizer(ams):
    po = pytest.importorskip("pytorch_optimizer")
    x0, grads = x_init(), grad_stream((40,), 100, seed=12)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), final_lr=0.05, gamma=1e-2, eps=1e-8, weight_decay=0.05)
    peer = run(po.AdaBound, x0, grads, **kw, ams_bound=ams, weight_decouple=False, foreach=False)
    close(run(go.AMSBound if ams else go.AdaBound, x0, grads, **kw), peer)


# ----------------------------------------------------------------------------------------------
# AMSGrad
# ----------------------------------------------------------------------------------------------
def paper_amsgrad(x0, grads, lr, betas, eps):
    b1, b2 = betas
    x, m, v, vmax, out = x0.clone(), *(torch.zeros_like(x0) for _ in range(3)), []
    for g in grads:
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        vmax = torch.maximum(vmax, v)
        x = x - lr * m / (vmax.sqrt() + eps)
        out.append(x)
    return torch.stack(out)


def test_amsgrad_matches_algorithm_2():
    x0, grads = x_init(), grad_stream((40,), 30, seed=13)
    close(run(go.AMSGrad, x0, grads, lr=1e-2, betas=(0.8, 0.95)), paper_amsgrad(x0, grads, 1e-2, (0.8, 0.95), 1e-8),
          rtol=1e-13)


def test_amsgrad_with_bias_correction_is_torch_adam_amsgrad():
    x0, grads = x_init(), grad_stream((40,), 50, seed=14)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    close(run(go.AMSGrad, x0, grads, bias_correction=True, **kw),
          run(torch.optim.AdamW, x0, grads, amsgrad=True, foreach=False, **kw), rtol=1e-13)


def _reddi(opt_factory, steps=6000, C=3.0):
    """Reddi et al. (2018), Sec. 3: f_t(x) = C x if t mod 3 == 1 else -x on [-1, 1]; the optimum is -1."""
    x = torch.zeros(1, dtype=DT, requires_grad=True)
    opt = opt_factory([x])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / math.sqrt(k + 1))  # alpha_t = alpha / sqrt(t)
    for t in range(1, steps + 1):
        x.grad = torch.full((1,), C if t % 3 == 1 else -1.0, dtype=DT)
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(-1.0, 1.0)  # projection onto the feasible set
    return x.item()


def test_reddi_counterexample_adam_fails_amsgrad_succeeds():
    betas = (0.0, 1 / (1 + 3.0**2))  # beta1 = 0, beta2 = 1 / (1 + C^2): Theorem 1's setting
    adam = _reddi(lambda p: torch.optim.Adam(p, lr=0.5, betas=betas, eps=1e-12))
    ams = _reddi(lambda p: go.AMSGrad(p, lr=0.5, betas=betas, eps=1e-12))
    assert adam > 0.9  # Adam drifts to the worst point, +1
    assert ams < -0.9  # AMSGrad reaches the optimum, -1


def test_amsgrad_effective_step_is_non_increasing():
    """AMSGrad's per-coordinate step size lr/(sqrt(v̂)+eps) never grows (the paper's point), on a
    stream with occasional large gradients; Adam's (lr/(sqrt(v)+eps), no bias correction, the same
    v recursion) grows on the same stream after each burst."""
    lr, eps, (b1, b2) = 1e-3, 1e-8, (0.9, 0.999)
    x = x_init((20,)).requires_grad_()
    opt = go.AMSGrad([x], lr=lr, betas=(b1, b2), eps=eps)
    gen = torch.Generator().manual_seed(16)
    prev, v, adam_grew = None, torch.zeros(20, dtype=DT), False
    for g in grad_stream((20,), 60, seed=15):
        x.grad = g * (5.0 if torch.rand((), generator=gen) < 0.2 else 1.0)
        opt.step()
        v_prev, v = v, b2 * v + (1 - b2) * x.grad**2
        torch.testing.assert_close(opt.state[x]["exp_avg_sq"], v, rtol=1e-14, atol=0)
        step = lr / (opt.state[x]["max_exp_avg_sq"].sqrt() + eps)
        if prev is not None:
            assert (step <= prev).all()
            adam_grew |= bool((v < v_prev).any())
        prev = step
    assert adam_grew


# ----------------------------------------------------------------------------------------------
# AdaMomentum
# ----------------------------------------------------------------------------------------------
def paper_adamomentum(x0, grads, lr, betas, eps, weight_decay):
    b1, b2 = betas
    x, m, v, out = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0), []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * m**2 + eps
        x = x * (1 - lr * weight_decay) - lr * (m / (1 - b1**t)) / (v / (1 - b2**t)).sqrt()
        out.append(x)
    return torch.stack(out)


def test_adamomentum_matches_algorithm_1():
    x0, grads = x_init(), grad_stream((40,), 30, seed=16)
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    close(run(go.AdaMomentum, x0, grads, **kw), paper_adamomentum(x0, grads, **kw), rtol=1e-13)


def test_adamomentum_second_moment_is_of_the_momentum():
    """On noisy gradients the EMA of m^2 is far below Adam's EMA of g^2 (the momentum averages noise out)."""
    x = torch.zeros(2000, dtype=DT, requires_grad=True)
    a = torch.zeros(2000, dtype=DT, requires_grad=True)
    opt, adam = go.AdaMomentum([x], eps=1e-30), torch.optim.Adam([a])
    for g in grad_stream((2000,), 200, seed=17):
        x.grad, a.grad = g, g.clone()
        opt.step()
        adam.step()
    ratio = opt.state[x]["exp_avg_sq"].mean() / adam.state[a]["exp_avg_sq"].mean()
    assert ratio < 0.15  # EMA(m^2) ~ (1 - b1) / (1 + b1) * E[g^2] ~ 0.05 for white noise


# ----------------------------------------------------------------------------------------------
# EXAdam
# ----------------------------------------------------------------------------------------------
def paper_exadam(x0, grads, lr, betas, eps, weight_decay, growth=False):
    b1, b2 = betas
    x, m, v, out = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0), []
    for t, g in enumerate(grads, start=1):
        x = x - lr * weight_decay * x
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        d1 = 1 + v / (v + eps) * b2**t
        d2 = 1 + m**2 / (m**2 + eps) * b1**t
        m_t, v_t, g_t = m / (1 - b1**t) * d1, v / (1 - b2**t) * d2, g / (1 - b1**t) * d1
        alpha = lr * math.log(math.sqrt(2) * math.sqrt(t + 1)) if growth else lr
        x = x - alpha * (m_t + g_t) / (v_t.sqrt() + eps)
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("growth", [False, True])
def test_exadam_matches_algorithm_1(growth):
    x0, grads = x_init(), grad_stream((40,), 30, seed=18, scale=1e-3)  # small gradients: d1, d2 matter
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    close(run(go.EXAdam, x0, grads, step_size_growth=growth, **kw), paper_exadam(x0, grads, growth=growth, **kw),
          rtol=1e-12)


def test_exadam_against_pytorch_optimizer():
    po = pytest.importorskip("pytorch_optimizer")
    x0, grads = x_init(), grad_stream((40,), 100, seed=19, scale=1e-2)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    close(run(go.EXAdam, x0, grads, **kw), run(po.EXAdam, x0, grads, **kw, foreach=False))


def test_exadam_step_size_growth_is_logarithmic():
    """First step, same gradient: the v1 step size is ln(sqrt(2) sqrt(2)) = ln 2 times the v2 one."""
    x0, grads = x_init(), grad_stream((40,), 1, seed=20)
    plain = run(go.EXAdam, x0, grads, lr=1e-3)[0] - x0
    grown = run(go.EXAdam, x0, grads, lr=1e-3, step_size_growth=True)[0] - x0
    torch.testing.assert_close(grown, math.log(2.0) * plain, rtol=1e-12, atol=0)
