"""Gradient transforms: Grokfast and AGC against pytorch-optimizer and closed forms, XGrad against
torch's Nesterov SGD and a hand-written weight-predicted Adam, global-norm clipping against torch."""

from __future__ import annotations

import io
import math

import pytest
import torch
from pytorch_optimizer.optimizer.agc import agc as peer_agc
from pytorch_optimizer.optimizer.grokfast import gradfilter_ema, gradfilter_ma

from gradkit.optim.transforms import Grokfast, XGrad, agc, clip_grad_norm, unitwise_norm

DT = torch.float64
SHAPES = [(3, 4), (5,), (), (2, 3, 2)]


class Params(torch.nn.Module):
    """A module holding parameters of the given shapes (for the peers' named_parameters API)."""

    def __init__(self, shapes=SHAPES, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=g, dtype=DT)) for s in shapes])


def set_grads(params, gen, skip=()):
    for i, p in enumerate(params):
        p.grad = None if i in skip else torch.randn(p.shape, generator=gen, dtype=DT)


# ----------------------------------------------------------------------------------------------
# Grokfast
# ----------------------------------------------------------------------------------------------
def skip_at(t):
    return {t % 4} if t % 3 == 2 else set()  # every third step one parameter has no gradient


def test_grokfast_ema_matches_pytorch_optimizer():
    a, b = Params(), Params()
    gf = Grokfast(a.parameters(), "ema", alpha=0.9, lamb=3.0)
    grads = None
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in range(30):
        set_grads(list(a.parameters()), gen_a, skip_at(t))
        set_grads(list(b.parameters()), gen_b, skip_at(t))
        gf.apply()
        grads = gradfilter_ema(b, grads, alpha=0.9, lamb=3.0)
        for p, q in zip(a.parameters(), b.parameters()):
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-14, atol=1e-15)


def test_grokfast_with_adamw_is_pytorch_optimizers_grokfast_adamw():
    """Grokfast("ema") in front of torch.optim.AdamW with lr / (1 + λ) is pytorch-optimizer's fused
    GrokFastAdamW (its ``normalize_lr``) over 100 steps: exactly, once both epsilons vanish; with
    eps = 1e-8 they differ at ~1e-6 only because that AdamW clamps sqrt(v̂) at eps where torch's
    adds eps (nothing of Grokfast's)."""
    from pytorch_optimizer import GrokFastAdamW

    lam, alpha, lr, wd = 2.0, 0.9, 1e-2, 0.05
    x0 = torch.randn(40, generator=torch.Generator().manual_seed(3), dtype=DT)
    gen = torch.Generator().manual_seed(4)
    stream = [torch.randn(40, generator=gen, dtype=DT) for _ in range(100)]

    def run(eps, ours):
        x = x0.clone().requires_grad_()
        if ours:
            gf = Grokfast([x], "ema", alpha=alpha, lamb=lam)
            opt = torch.optim.AdamW([x], lr=lr / (1 + lam), betas=(0.9, 0.99), eps=eps, weight_decay=wd)
        else:
            opt = GrokFastAdamW([x], lr=lr, betas=(0.9, 0.99), eps=eps, grokfast_alpha=alpha, grokfast_lamb=lam,
                                weight_decay=wd, foreach=False)
        for g in stream:
            x.grad = g.clone()
            if ours:
                gf.apply()
            opt.step()
        return x.detach()

    torch.testing.assert_close(run(1e-300, True), run(1e-300, False), rtol=1e-13, atol=0)
    ours, peer = run(1e-8, True), run(1e-8, False)
    torch.testing.assert_close(ours, peer, rtol=1e-5, atol=0)
    assert not torch.allclose(ours, peer, rtol=1e-8, atol=0)


@pytest.mark.parametrize("filter_type", ["mean", "sum"])
@pytest.mark.parametrize("warmup", [True, False])
def test_grokfast_ma_matches_pytorch_optimizer(filter_type, warmup):
    a, b = Params(), Params()
    gf = Grokfast(a.parameters(), "ma", window_size=6, lamb=5.0, filter_type=filter_type, warmup=warmup)
    grads = None
    gen_a, gen_b = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for t in range(25):
        set_grads(list(a.parameters()), gen_a, skip_at(t))
        set_grads(list(b.parameters()), gen_b, skip_at(t))
        gf.apply()
        grads = gradfilter_ma(b, grads, window_size=6, lamb=5.0, filter_type=filter_type, warmup=warmup)
        for p, q in zip(a.parameters(), b.parameters()):
            if p.grad is not None:
                # the peer sums the window in time order, we sum a ring buffer: rounding differs
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-13)


def constant_stream(gf, p, g, steps):
    out = []
    for _ in range(steps):
        p.grad = g.clone()
        gf.apply()
        out.append(p.grad.clone())
    return torch.stack(out)


def test_grokfast_ema_closed_forms():
    """Constant g: init "grad" (the paper's code) gives (1 + lamb) g; init "zeros" g (1 + lamb (1 - alpha^t))."""
    p = torch.zeros(3, dtype=DT, requires_grad=True)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    out = constant_stream(Grokfast([p]), p, g, 20)
    torch.testing.assert_close(out, (1 + 2.0) * g.expand(20, 3), rtol=1e-14, atol=0)
    alpha, lamb = 0.9, 3.0
    out = constant_stream(Grokfast([p], alpha=alpha, lamb=lamb, init="zeros"), p, g, 20)
    t = torch.arange(1, 21, dtype=DT)[:, None]
    torch.testing.assert_close(out, g * (1 + lamb * (1 - alpha**t)), rtol=1e-13, atol=0)


def test_grokfast_ma_closed_forms():
    """Constant g, window w, warm-up: g for the first w - 1 steps, then (1 + lamb) g (mean) or (1 + lamb w) g (sum)."""
    p = torch.zeros(2, dtype=DT, requires_grad=True)
    g = torch.tensor([0.25, -1.0], dtype=DT)
    w = 5
    out = constant_stream(Grokfast([p], "ma", window_size=w), p, g, 12)
    expected = torch.stack([g] * (w - 1) + [(1 + 5.0) * g] * (12 - w + 1))
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=0)
    out = constant_stream(Grokfast([p], "ma", window_size=w, lamb=2.0, filter_type="sum", warmup=False), p, g, 8)
    expected = torch.stack([(1 + 2.0 * min(t, w)) * g for t in range(1, 9)])
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=0)


def test_grokfast_defaults_are_the_papers():
    p = torch.zeros(1, requires_grad=True)
    assert Grokfast([p]).config | {} == dict(filter="ema", alpha=0.98, lamb=2.0, window_size=100,
                                              filter_type="mean", warmup=True, init="grad")
    assert Grokfast([p], "ma").config["lamb"] == 5.0 and Grokfast([p], "ma").config["window_size"] == 100


@pytest.mark.parametrize("kw", [dict(filter="ema", alpha=0.8), dict(filter="ma", window_size=4)])
def test_grokfast_state_dict_resume(kw):
    a, b = Params(), Params()
    gf_a = Grokfast(a.parameters(), **kw)
    gen = torch.Generator().manual_seed(3)
    for t in range(6):
        set_grads(list(a.parameters()), gen, skip_at(t))
        gf_a.apply()
    buf = io.BytesIO()
    torch.save(gf_a.state_dict(), buf)
    buf.seek(0)
    gf_b = Grokfast(b.parameters(), **kw)
    gf_b.load_state_dict(torch.load(buf, weights_only=True))
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for t in range(7):
        set_grads(list(a.parameters()), gen_a, skip_at(t))
        set_grads(list(b.parameters()), gen_b, skip_at(t))
        gf_a.apply()
        gf_b.apply()
        for p, q in zip(a.parameters(), b.parameters()):
            if p.grad is not None:
                assert torch.equal(p.grad, q.grad)
    with pytest.raises(ValueError, match="configuration"):
        Grokfast(b.parameters(), "ema", alpha=0.5).load_state_dict(gf_a.state_dict())


@pytest.mark.parametrize("bad,name", [
    (dict(filter="median"), "filter"), (dict(alpha=1.0), "alpha"), (dict(lamb=float("nan")), "lamb"),
    (dict(window_size=0), "window_size"), (dict(filter_type="max"), "filter_type"), (dict(init="ones"), "init"),
])
def test_grokfast_invalid_arguments(bad, name):
    with pytest.raises(ValueError, match=f"invalid {name}=.*expected"):
        Grokfast([torch.zeros(2, requires_grad=True)], **bad)


# ----------------------------------------------------------------------------------------------
# XGrad
# ----------------------------------------------------------------------------------------------
def quadratic(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(n, n, generator=g, dtype=DT)
    H = R @ R.T / n + 0.1 * torch.eye(n, dtype=DT)
    b = torch.randn(n, generator=g, dtype=DT)
    x0 = torch.randn(n, generator=g, dtype=DT)
    return (lambda x: 0.5 * x @ H @ x - b @ x), x0


def test_xgrad_with_steps_momentum_is_torch_nesterov():
    """XGrad(SGD(momentum=mu), steps=mu): predicted weights = torch's Nesterov iterates, same buffers."""
    f, x0 = quadratic()
    mu, lr = 0.9, 0.05
    x = x0.clone().requires_grad_()
    opt = torch.optim.SGD([x], lr=lr, momentum=mu)
    xg = XGrad(opt, steps=mu)
    z = x0.clone().requires_grad_()
    nag = torch.optim.SGD([z], lr=lr, momentum=mu, nesterov=True)
    for _ in range(40):
        opt.zero_grad()
        with xg.predicted():
            torch.testing.assert_close(x.detach(), z.detach(), rtol=1e-12, atol=1e-13)
            f(x).backward()
        opt.step()
        nag.zero_grad()
        f(z).backward()
        nag.step()
        torch.testing.assert_close(opt.state[x]["momentum_buffer"], nag.state[z]["momentum_buffer"],
                                   rtol=1e-12, atol=1e-13)


def test_xgrad_with_one_step_is_not_nesterov():
    """steps = 1 looks a full momentum step ahead: it differs from Nesterov for mu < 1."""
    f, x0 = quadratic()
    x, z = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    opt, nag = torch.optim.SGD([x], lr=0.05, momentum=0.9), torch.optim.SGD([z], lr=0.05, momentum=0.9, nesterov=True)
    xg = XGrad(opt, steps=1.0)
    for _ in range(10):
        xg.step(lambda: (opt.zero_grad(), f(x).backward()))
        nag.zero_grad()
        f(z).backward()
        nag.step()
    assert (opt.state[x]["momentum_buffer"] - nag.state[z]["momentum_buffer"]).abs().max() > 1e-3


def adam_with_prediction(f, x0, lr, betas, eps, wd, steps, s, decoupled, amsgrad=False):
    """Independent float64 loop: grad at x - s*lr*(mhat/(sqrt(vhat)+eps) [+ wd x]), then the Adam(W) step."""
    b1, b2 = betas
    x, m, v, vmax = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0), torch.zeros_like(x0)
    out = []
    for t in range(1, steps + 1):
        if t > 1:
            vv = vmax if amsgrad else v
            d = (m / (1 - b1 ** (t - 1))) / ((vv / (1 - b2 ** (t - 1))).sqrt() + eps)
            if decoupled:
                d = d + wd * x
            xp = (x - s * lr * d).requires_grad_()
        else:
            xp = x.clone().requires_grad_()
        g = torch.autograd.grad(f(xp), xp)[0]
        if not decoupled:
            g = g + wd * x
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = torch.maximum(vmax, v)
        vv = vmax if amsgrad else v
        if decoupled:
            x = x * (1 - lr * wd)
        x = x - (lr / (1 - b1**t)) * m / ((vv / (1 - b2**t)).sqrt() + eps)
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("cls,amsgrad", [(torch.optim.Adam, False), (torch.optim.AdamW, False),
                                         (torch.optim.AdamW, True)])
def test_xgrad_adam_matches_hand_written_weight_prediction(cls, amsgrad):
    f, x0 = quadratic(seed=1)
    lr, betas, eps, wd, s = 0.05, (0.8, 0.95), 1e-8, 0.1, 2.0
    x = x0.clone().requires_grad_()
    opt = cls([x], lr=lr, betas=betas, eps=eps, weight_decay=wd, amsgrad=amsgrad)
    xg = XGrad(opt, steps=s)
    out = []
    for _ in range(30):
        xg.step(lambda: (opt.zero_grad(), f(x).backward()))
        out.append(x.detach().clone())
    ref = adam_with_prediction(f, x0, lr, betas, eps, wd, 30, s, decoupled=cls is torch.optim.AdamW, amsgrad=amsgrad)
    torch.testing.assert_close(torch.stack(out), ref, rtol=1e-11, atol=1e-13)


def test_xgrad_restores_weights_exactly():
    f, x0 = quadratic()
    x = x0.clone().requires_grad_()
    y = torch.randn(3, dtype=DT, requires_grad=True)  # never gets a gradient: no state, never moved
    opt = torch.optim.AdamW([x, y], lr=0.1)
    xg = XGrad(opt, steps=1.5)
    for _ in range(3):
        xg.step(lambda: (opt.zero_grad(), f(x).backward()))
    before = x.detach().clone(), y.detach().clone()
    with xg.predicted():
        assert not torch.equal(x.detach(), before[0])
        assert torch.equal(y.detach(), before[1])
    assert torch.equal(x.detach(), before[0]) and torch.equal(y.detach(), before[1])
    with pytest.raises(KeyError):  # restored on errors too
        with xg.predicted():
            raise KeyError("inside the context")
    assert torch.equal(x.detach(), before[0])
    xg.predict_()
    with pytest.raises(RuntimeError, match="already"):
        xg.predict_()
    xg.restore_()
    assert torch.equal(x.detach(), before[0])


def test_xgrad_custom_predictor_and_errors():
    x = torch.ones(3, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="momentum"):
        XGrad(torch.optim.SGD([x], lr=0.1))
    with pytest.raises(ValueError, match="nesterov"):
        XGrad(torch.optim.SGD([x], lr=0.1, momentum=0.9, nesterov=True))
    with pytest.raises(TypeError, match="predictor"):
        XGrad(torch.optim.RMSprop([x], lr=0.1))
    with pytest.raises(ValueError, match="invalid steps"):
        XGrad(torch.optim.Adam([x]), steps=-1.0)
    # RMSprop: the next step is lr * g / (sqrt(v) + eps); predict with the last gradient stored by hand
    opt = torch.optim.RMSprop([x], lr=0.1)
    last = {}
    xg = XGrad(opt, predictor=lambda p, st, g: last[p] / (st["square_avg"].sqrt() + g["eps"]) if p in last else None)
    x.grad = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    last[x] = x.grad.clone()
    opt.step()
    before = x.detach().clone()
    with xg.predicted():
        expected = before - 0.1 * last[x] / (opt.state[x]["square_avg"].sqrt() + 1e-8)
        torch.testing.assert_close(x.detach(), expected, rtol=1e-14, atol=0)
    assert torch.equal(x.detach(), before)


# ----------------------------------------------------------------------------------------------
# global-norm clipping
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.5])
@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("max_norm", [0.5, 1e3, math.inf])  # inf: no clipping, as in torch
def test_clip_grad_norm_equals_torch(norm_type, foreach, max_norm):
    a, b = Params(), Params()
    gen = torch.Generator().manual_seed(5)
    set_grads(list(a.parameters()), gen, skip={1})
    for p, q in zip(a.parameters(), b.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    dense = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in a.parameters() if p.grad is not None]),
                                     norm_type)
    ours = clip_grad_norm(a.parameters(), max_norm, norm_type, foreach=foreach)
    theirs = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm, norm_type, foreach=foreach)
    torch.testing.assert_close(ours, theirs, rtol=1e-15, atol=0)
    torch.testing.assert_close(ours, dense, rtol=1e-13, atol=0)  # the norm before clipping
    for p, q in zip(a.parameters(), b.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-15, atol=0)
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in a.parameters() if p.grad is not None]),
                                     norm_type)
    assert after.item() <= min(max_norm, dense.item()) * (1 + 1e-12)


def test_clip_grad_norm_nonfinite():
    x = torch.ones(3, dtype=DT, requires_grad=True)
    x.grad = torch.tensor([1.0, float("nan"), 2.0], dtype=DT)
    with pytest.raises(RuntimeError, match="nan"):
        clip_grad_norm([x], 1.0, error_if_nonfinite=True)
    assert x.grad[0] == 1.0 and x.grad[2] == 2.0  # untouched
    y = torch.ones(3, dtype=DT, requires_grad=True)
    y.grad = x.grad.clone()
    torch.testing.assert_close(clip_grad_norm([x], 1.0), torch.nn.utils.clip_grad_norm_([y], 1.0), equal_nan=True)
    assert clip_grad_norm([torch.zeros(2, requires_grad=True)], 1.0).item() == 0.0  # no gradients


@pytest.mark.parametrize("bad,name", [(dict(max_norm=-1.0), "max_norm"), (dict(norm_type=0.0), "norm_type"),
                                      (dict(foreach="yes"), "foreach")])
def test_clip_grad_norm_invalid_arguments(bad, name):
    x = torch.ones(2, requires_grad=True)
    x.grad = torch.ones(2)
    kw = dict(max_norm=1.0) | bad
    with pytest.raises(ValueError, match=f"invalid {name}=.*expected"):
        clip_grad_norm([x], **kw)


# ----------------------------------------------------------------------------------------------
# adaptive gradient clipping
# ----------------------------------------------------------------------------------------------
AGC_SHAPES = [(6, 5), (4, 3, 3, 3), (7,), (), (4, 2, 5)]


def agc_params(seed=6):
    """Weights and gradients with unit norms spread over decades, so some units clip and some do not."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in AGC_SHAPES:
        w = torch.randn(s, generator=g, dtype=DT)
        gr = torch.randn(s, generator=g, dtype=DT)
        if len(s) >= 2:
            w = w * torch.logspace(-4, 0, s[0], dtype=DT).view(-1, *[1] * (len(s) - 1))
            gr = gr * torch.logspace(-3, -1, s[0], dtype=DT).flip(0).view(-1, *[1] * (len(s) - 1))
        else:
            gr = gr * 1e-2
        p = w.requires_grad_()
        p.grad = gr
        params.append(p)
    return params


def agc_loop(w, g, clipping, eps):
    """Independent float64 loop over units: rows / filters for ndim >= 2, the whole tensor otherwise."""
    if w.ndim <= 1:
        wn, gn = math.sqrt((w**2).sum().item()), math.sqrt((g**2).sum().item())
        bound = clipping * max(wn, eps)
        return g * (bound / max(gn, 1e-6)) if gn > bound else g.clone()
    rows = []
    for wi, gi in zip(w, g):
        wn, gn = math.sqrt((wi**2).sum().item()), math.sqrt((gi**2).sum().item())
        bound = clipping * max(wn, eps)
        rows.append(gi * (bound / max(gn, 1e-6)) if gn > bound else gi.clone())
    return torch.stack(rows)


@pytest.mark.parametrize("clipping,eps", [(0.01, 1e-3), (0.1, 1e-2)])
def test_agc_matches_loop_and_bound(clipping, eps):
    params = agc_params()
    grads = [p.grad.clone() for p in params]
    expected = [agc_loop(p.detach(), g, clipping, eps) for p, g in zip(params, grads)]
    agc(params, clipping=clipping, eps=eps)
    clipped = untouched = 0
    for p, g, e in zip(params, grads, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-13, atol=0)
        bound = clipping * unitwise_norm(p.detach()).clamp_min(eps)
        assert (unitwise_norm(p.grad) <= bound * (1 + 1e-12)).all()
        same = (p.grad == g).flatten(1).all(1) if p.ndim >= 2 else (p.grad == g).all().view(1)
        clipped += int((~same).sum())
        untouched += int(same.sum())
    assert clipped > 0 and untouched > 0  # both branches exercised


def test_agc_matches_pytorch_optimizer_and_documents_3d_convention():
    params = agc_params()
    grads = [p.grad.clone() for p in params]
    agc(params)
    for p, g in zip(params, grads):
        w = p.detach()
        if w.ndim == 3:
            # pytorch-optimizer reduces 3-d tensors over dim 1 only (units = (out, k) pairs);
            # we use one unit per output channel (dims 1..), as for conv2d: equal to the peer on (out, -1)
            flat = peer_agc(w.reshape(len(w), -1), g.reshape(len(g), -1), agc_eps=1e-3, agc_clip_val=1e-2)
            torch.testing.assert_close(p.grad, flat.view_as(g), rtol=1e-14, atol=0)
            raw = peer_agc(w, g, agc_eps=1e-3, agc_clip_val=1e-2)
            assert not torch.allclose(raw, p.grad)
        else:
            torch.testing.assert_close(p.grad, peer_agc(w, g, agc_eps=1e-3, agc_clip_val=1e-2), rtol=1e-14, atol=0)


def test_agc_with_infinite_clipping_leaves_every_gradient_alone():
    """clipping = inf is no clipping (as clip_grad_norm's max_norm = inf), also for eps = 0 and a
    zero weight (0 · inf is nan, and no norm exceeds it)."""
    params = agc_params()
    with torch.no_grad():
        params[0][0].zero_()
    grads = [p.grad.clone() for p in params]
    agc(params, clipping=math.inf, eps=0.0)
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("bad,name", [(dict(clipping=0.0), "clipping"), (dict(eps=-1.0), "eps"),
                                      (dict(eps=math.inf), "eps")])
def test_agc_invalid_arguments(bad, name):
    with pytest.raises(ValueError, match=f"invalid {name}=.*expected"):
        agc(agc_params(), **bad)
    with pytest.raises(TypeError, match="params"):
        agc([1.0, 2.0])
