"""Paper identities and defining properties of OptimisticAMSGrad, INNAprop, DoG and L-DoG.

The papers' updates are written out here as plain float64 loops, independently of the library's
kernels; no peer library implements these optimizers (pytorch-optimizer 4.1 has none of them).
"""

from __future__ import annotations

import copy
import math
import operator

import pytest
import torch

from gradkit.optim import AMSGrad
from gradkit.optim.dog import DoG, LDoG
from gradkit.optim.innaprop import INNAprop
from gradkit.optim.optimistic_amsgrad import OptimisticAMSGrad

DT = torch.float64


def grad_stream(shape, steps, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=g, dtype=DT) for _ in range(steps)]


def x_init(shape=(30,), seed=11):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def run(opt_cls, x0, grads, **kw):
    """Trajectory of ``opt_cls`` on a gradient stream that does not depend on the point."""
    x = x0.clone().requires_grad_()
    opt = opt_cls([x], **kw)
    out = []
    for g in grads:
        x.grad = g.clone()
        opt.step()
        out.append(x.detach().clone())
    return torch.stack(out), opt, x


def close(a, b, rtol=1e-12, atol=0.0):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# OptimisticAMSGrad (Wang, Li and Li 2019, Algorithm 2; extrapolation: Scieur et al. 2016)
# ----------------------------------------------------------------------------------------------
def rmpe(seq, reg):
    """Regularised minimal polynomial extrapolation, written from Scieur et al. (2016), Algorithm 1."""
    x = torch.stack([s.reshape(-1) for s in seq], dim=1)  # d x (k+2)
    u = x[:, 1:] - x[:, :-1]
    gram = (u[:, :, None] * u[:, None, :]).sum(0)  # U^T U (no BLAS call: tiny ones are slow under load)
    lam = reg * torch.linalg.matrix_norm(gram, ord=2)
    z = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=DT), torch.ones(gram.shape[0], dtype=DT))
    c = z / z.sum()
    return (x[:, :-1] * c).sum(1).reshape(seq[0].shape)


def paper_optimistic_amsgrad(x0, grads, lr, betas, eps, span, reg=1e-3, bias_correction=False):
    """Algorithm 2 on a fixed gradient stream; returns the w_{t+1} and the w_{t+1/2} sequences.
    The second moment is that of the prediction errors, v_t = β₂ v_{t−1} + (1 − β₂)(g_t − m_t)²
    (the authors' code, Optadam_torch.py: ``tmp = prev_predict_grad - grad``), m_1 = 0."""
    b1, b2 = betas
    theta, v, v_hat = torch.zeros_like(x0), torch.zeros_like(x0), torch.zeros_like(x0)
    w_half = x0.clone()  # w_{-1/2} = w_1
    m = torch.zeros_like(x0)  # m_t, the guess of g_t
    ws, halves = [], []
    for t in range(len(grads)):
        g = grads[t]
        theta_prev = theta
        theta = b1 * theta + (1 - b1) * g
        v = b2 * v + (1 - b2) * (g - m) ** 2
        v_hat = torch.maximum(v_hat, v)
        # the authors' code: both steps times sqrt(1 - β₂ᵗ)/(1 - β₁ᵗ), eps unscaled
        eta = lr * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1)) if bias_correction else lr
        w_half = w_half - eta * theta / (v_hat.sqrt() + eps)
        window = grads[max(0, t - span + 1): t + 1]
        m_next = window[-1] if len(window) < 2 else rmpe(window, reg)  # guess of g_{t+1}
        h_next = b1 * theta_prev + (1 - b1) * m_next
        m = m_next
        ws.append(w_half - eta * h_next / (v_hat.sqrt() + eps))
        halves.append(w_half.clone())
    return torch.stack(ws), torch.stack(halves)


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("span", [1, 3, 5])
def test_optimistic_amsgrad_matches_algorithm_2(span, bias_correction):
    x0, grads = x_init(), grad_stream((30,), 25, seed=1)
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-8, bias_correction=bias_correction)
    ours, opt, x = run(OptimisticAMSGrad, x0, grads, span=span, **kw)
    ws, halves = paper_optimistic_amsgrad(x0, grads, span=span, **kw)
    close(ours, ws, rtol=1e-10, atol=1e-13)
    close(opt.state[x]["half_param"], halves[-1], rtol=1e-12)


def test_half_iterates_are_amsgrad_with_a_zero_prediction():
    """Gradients that do not depend on the point and m ≡ 0: the prediction errors are the
    gradients, so w_{t+1/2} is exactly AMSGrad's iterate; with the default prediction the second
    moment is that of the errors g_t − m_t and the half iterates differ from AMSGrad's."""
    x0, grads = x_init(), grad_stream((30,), 30, seed=2)
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    x, y, z = (x0.clone().requires_grad_() for _ in range(3))
    opt = OptimisticAMSGrad([x], predictor=lambda p, base, scale: torch.zeros_like(base), **kw)
    ams, default = AMSGrad([y], **kw), OptimisticAMSGrad([z], **kw)
    for g in grads:
        x.grad, y.grad, z.grad = g.clone(), g.clone(), g.clone()
        opt.step()
        ams.step()
        default.step()
        close(opt.state[x]["half_param"], y.detach(), rtol=1e-13, atol=1e-15)
    assert not torch.allclose(x, y)  # the evaluation point itself is optimistic (β₁ θ_{t−1} term)
    assert not torch.allclose(default.state[z]["half_param"], y)


def test_bias_correction_leaves_the_decay_alone():
    """Zero gradients: only the decoupled decay moves the parameter, (1 − lr λ)ᵗ with or without
    bias_correction (which scales the steps, not the decay)."""
    for bias_correction in (False, True):
        x = torch.ones(4, dtype=DT, requires_grad=True)
        opt = OptimisticAMSGrad([x], lr=0.1, weight_decay=0.5, bias_correction=bias_correction, span=1)
        for _ in range(5):
            x.grad = torch.zeros(4, dtype=DT)
            opt.step()
        close(opt.state[x]["half_param"], torch.full((4,), 0.95**5, dtype=DT), rtol=1e-14)
    with pytest.raises(ValueError, match="bias_correction"):
        OptimisticAMSGrad([x], bias_correction=1)


def test_second_moment_tracks_the_prediction_errors():
    """v_t = β₂ v_{t−1} + (1 − β₂)(g_t − m_t)² with m_t the prediction made at step t − 1 (recorded
    from a predictor) and m_1 = 0; ``state["prediction"]`` holds the latest m_{t+1}."""
    grads = grad_stream((12,), 15, seed=8)
    made = []

    def predictor(param, base, scale):
        made.append(torch.sin(base) + 0.5 * base)  # any deterministic guess
        return made[-1]

    x = x_init((12,)).requires_grad_()
    b2 = 0.9
    opt = OptimisticAMSGrad([x], lr=1e-2, betas=(0.5, b2), predictor=predictor)
    v, m = torch.zeros(12, dtype=DT), torch.zeros(12, dtype=DT)
    for g in grads:
        x.grad = g.clone()
        opt.step()
        v = b2 * v + (1 - b2) * (g - m) ** 2
        m = made[-1]
        close(opt.state[x]["exp_avg_sq"], v, rtol=1e-13)
        close(opt.state[x]["prediction"], m, rtol=0)
    # maximize: the prediction is stored in the minimisation convention, like the gradient
    y = x_init((12,)).requires_grad_()
    made.clear()
    opt = OptimisticAMSGrad([y], lr=1e-2, betas=(0.5, b2), predictor=predictor, maximize=True)
    y.grad = grads[0].clone()
    opt.step()
    close(opt.state[y]["prediction"], -made[-1], rtol=0)


def test_optimistic_amsgrad_history_is_updated_incrementally(monkeypatch):
    """Per step and tensor the Gram entries cost span - 1 dot products (the new difference against
    the stored ones), not a pass over the history; the cached entries equal the dot products of
    the stored differences, which are the successive differences of the last gradients; a
    restored optimizer rebuilds them and continues identically."""
    span = 5
    grads = grad_stream((30,), 12, seed=5)
    x = x_init().requires_grad_()
    opt = OptimisticAMSGrad([x], span=span, lr=1e-2)
    calls = []
    real_dot = torch.dot
    monkeypatch.setattr(torch, "dot", lambda a, b: calls.append(1) or real_dot(a, b))
    counts = []
    for g in grads[:8]:
        x.grad = g.clone()
        calls.clear()
        opt.step()
        counts.append(len(calls))
    assert counts == [0] + [span - 1] * 7  # none at the first step (no difference yet)
    st = opt.state[x]
    slots = [(s - 2) % (span - 1) for s in range(8 - span + 2, 9)]  # steps 5..8, oldest first
    for slot, (a, b) in zip(slots, zip(grads[3:7], grads[4:8])):
        close(st[f"diff_{slot}"], b - a, rtol=1e-15, atol=1e-15)
    close(st["last_grad"], grads[7], rtol=0)
    diffs = torch.stack([st[f"diff_{k}"] for k in range(span - 1)])
    close(opt._dot_cache[id(x)][2], diffs @ diffs.T, rtol=1e-13)
    # 16-bit parameters: the dot products follow the stored (bfloat16) differences, in float32
    b = x_init().to(torch.bfloat16).requires_grad_()
    low = OptimisticAMSGrad([b], span=span, lr=1e-2)
    for g in grads[:8]:
        b.grad = g.to(torch.bfloat16)
        low.step()
    stored = torch.stack([low.state[b][f"diff_{k}"] for k in range(span - 1)]).double()
    close(low._dot_cache[id(b)][2], stored @ stored.T, rtol=1e-5)
    # a restored copy rebuilds the cache (all pairs once) and takes the same steps
    y = x.detach().clone().requires_grad_()
    twin = OptimisticAMSGrad([y], span=span, lr=1e-2)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # a live state_dict shares its tensors
    for g in grads[8:]:
        x.grad, y.grad = g.clone(), g.clone()
        calls.clear()
        opt.step()
        n_opt = len(calls)
        calls.clear()
        twin.step()
        assert n_opt == span - 1 and len(calls) in (span - 1, span * (span - 1) // 2)
        assert torch.equal(x, y)


BATCH_SHAPES = [(4, 3)] * 5 + [(6,)] * 3 + [(7,), ()]  # two batches, two tensors stored alone


def _batched_run(steps, seed=2, stop=(10, 1), opt=None, params=None, start=0, **kw):
    """Steps ``start .. steps-1`` of a fixed gradient stream on BATCH_SHAPES; parameter ``stop[1]``
    gets no gradient from step ``stop[0]`` on."""
    g = torch.Generator().manual_seed(seed)
    stream = [[torch.randn(s, generator=g, dtype=DT) for s in BATCH_SHAPES] for _ in range(steps)]
    if params is None:
        params = [x_init(s, seed=20 + i).requires_grad_() for i, s in enumerate(BATCH_SHAPES)]
        opt = OptimisticAMSGrad(params, lr=1e-2, span=4, **kw)
    for t in range(start, steps):
        for i, (p, grad) in enumerate(zip(params, stream[t])):
            p.grad = None if (i == stop[1] and t >= stop[0]) else grad.clone()
        opt.step()
    return params, opt


@pytest.mark.parametrize("mode", [dict(), dict(fused=True)])
def test_optimistic_amsgrad_batched_history_equals_reference_and_resumes_exactly(mode, monkeypatch):
    """The fast paths store the histories of small same-shape tensors as one batch (stacked dot
    products, one total per batch): equal to the per-tensor reference; the batch total is the
    dense Gram sum; a restored optimizer continues bit for bit, and so does one whose stored
    difference the user replaced (its cached total is rebuilt)."""
    stored_alone = []
    real_store = OptimisticAMSGrad._store
    monkeypatch.setattr(OptimisticAMSGrad, "_store",
                        lambda self, p, st, step: stored_alone.append(p.shape) or real_store(self, p, st, step))
    ref, _ = _batched_run(20, foreach=False)
    assert {(4, 3), (6,)} <= set(stored_alone)  # the reference stores every tensor alone
    stored_alone.clear()
    fast, opt = _batched_run(20, **mode)
    assert set(stored_alone) == {(), (7,)}  # the fast paths only the two without a batch
    for x, y in zip(ref, fast):
        close(x, y, rtol=1e-12, atol=1e-13)
    # the batch's cached total is the Gram matrix of the stored differences of its members (the
    # (4, 3) tensors still getting gradients)
    key = next(k for k in opt._dot_cache if isinstance(k, tuple) and k[1] == torch.Size((4, 3)))
    members = [p for i, p in enumerate(fast) if BATCH_SHAPES[i] == (4, 3) and i != 1]
    assert len(opt._dot_cache[key][0]) == 4 and all(map(operator.is_, opt._dot_cache[key][0], members))
    diffs = [torch.stack([opt.state[p][f"diff_{k}"].reshape(-1) for k in range(3)]) for p in members]
    close(opt._dot_cache[key][3], sum(d @ d.T for d in diffs), rtol=1e-13)
    # resume at step 12: a fresh optimizer loading the state continues bit for bit
    base, base_opt = _batched_run(12, **mode)
    saved = copy.deepcopy(base_opt.state_dict())
    twin = [p.detach().clone().requires_grad_() for p in base]
    twin_opt = OptimisticAMSGrad(twin, lr=1e-2, span=4, **mode)
    twin_opt.load_state_dict(saved)
    _batched_run(20, opt=base_opt, params=base, start=12)
    _batched_run(20, opt=twin_opt, params=twin, start=12)
    for x, y in zip(base, twin):
        assert torch.equal(x, y)
    # a stored difference the user replaces (a new tensor) is seen: the batch's total is rebuilt,
    # and the run continues as a fresh optimizer restored from the modified state does
    member = next(p for p in base if p.shape == (6,))
    base_opt.state[member]["diff_0"] = base_opt.state[member]["diff_0"] * 2
    fresh = [p.detach().clone().requires_grad_() for p in base]
    fresh_opt = OptimisticAMSGrad(fresh, lr=1e-2, span=4, **mode)
    fresh_opt.load_state_dict(copy.deepcopy(base_opt.state_dict()))
    _batched_run(26, seed=4, opt=base_opt, params=base, start=20)
    _batched_run(26, seed=4, opt=fresh_opt, params=fresh, start=20)
    for x, y in zip(base, fresh):
        assert torch.equal(x, y)


def test_optimistic_amsgrad_loads_state_saved_with_raw_gradients():
    """A state_dict from before the history became differences (raw gradients in slots
    ``(step - 1) mod span``) loads and continues exactly like the run that saved it."""
    span, grads = 4, grad_stream((30,), 12, seed=6)
    x = x_init().requires_grad_()
    opt = OptimisticAMSGrad([x], span=span, lr=1e-2)
    for g in grads[:7]:
        x.grad = g.clone()
        opt.step()
    old = copy.deepcopy(opt.state_dict())
    st = old["state"][0]
    for k in ["last_grad"] + [f"diff_{k}" for k in range(span - 1)]:
        del st[k]
    for t in range(4, 8):  # steps 4..7 are the last four
        st[f"grad_{(t - 1) % span}"] = grads[t - 1].clone()
    y = x.detach().clone().requires_grad_()
    twin = OptimisticAMSGrad([y], span=span, lr=1e-2)
    twin.load_state_dict(old)
    assert "grad_0" not in twin.state[y]
    for g in grads[7:]:
        x.grad, y.grad = g.clone(), g.clone()
        opt.step()
        twin.step()
        assert torch.equal(x, y)
    # state saved before the prediction was kept (second moment of the gradients): it starts at zero
    older = copy.deepcopy(opt.state_dict())
    del older["state"][0]["prediction"]
    z = x.detach().clone().requires_grad_()
    third = OptimisticAMSGrad([z], span=span, lr=1e-2)
    third.load_state_dict(older)
    assert torch.equal(third.state[z]["prediction"], torch.zeros_like(z))
    # and steps as a state whose prediction was zeroed by hand
    zeroed = copy.deepcopy(opt.state_dict())
    zeroed["state"][0]["prediction"].zero_()
    w = x.detach().clone().requires_grad_()
    fourth = OptimisticAMSGrad([w], span=span, lr=1e-2)
    fourth.load_state_dict(zeroed)
    z.grad, w.grad = grads[0].clone(), grads[0].clone()
    third.step()
    fourth.step()
    assert torch.equal(z, w) and not torch.equal(z, x)


def test_optimistic_amsgrad_refuses_state_of_another_span():
    """``span`` is a constructor option, not in the state_dict: a history saved with another span
    (or with a predictor, which keeps none) is refused, naming span, before anything changes."""
    x = x_init().requires_grad_()
    opt = OptimisticAMSGrad([x], span=5, lr=1e-2)
    for g in grad_stream((30,), 3, seed=2):
        x.grad = g.clone()
        opt.step()
    saved = opt.state_dict()
    for kwargs in (dict(span=3), dict(span=8), dict(span=1), dict(predictor=lambda p, base, scale: base)):
        y = x.detach().clone().requires_grad_()
        other = OptimisticAMSGrad([y], lr=1e-2, **kwargs)
        with pytest.raises(ValueError, match=r"span=5; this optimizer has span=\d+.*expected the span"):
            other.load_state_dict(saved)
        assert len(other.state) == 0
    no_history = OptimisticAMSGrad([x], span=1, lr=1e-2)
    no_history.step()
    with pytest.raises(ValueError, match=r"span=1 \(or of a predictor\); this optimizer has span=5"):
        OptimisticAMSGrad([x], span=5, lr=1e-2).load_state_dict(no_history.state_dict())
    OptimisticAMSGrad([x], span=5, lr=1e-2).load_state_dict(saved)  # the same span loads


def test_beta1_zero_and_zero_prediction_is_amsgrad_on_a_real_loss():
    """The documented limit: beta1 = 0 and m = 0 make w_{t+1} = w_{t+1/2}, i.e. AMSGrad(beta1 = 0)."""
    d = torch.logspace(0, 2, 10, dtype=DT)
    x = torch.ones(10, dtype=DT, requires_grad=True)
    y = torch.ones(10, dtype=DT, requires_grad=True)
    kw = dict(lr=5e-2, betas=(0.0, 0.99), eps=1e-8)
    opt = OptimisticAMSGrad([x], predictor=lambda p, base, scale: torch.zeros_like(base), **kw)
    ams = AMSGrad([y], **kw)
    for _ in range(40):
        for z, o in ((x, opt), (y, ams)):
            o.zero_grad()
            (0.5 * (d * z**2).sum()).backward()
            o.step()
    close(x.detach(), y.detach(), rtol=1e-13, atol=1e-15)


def test_extrapolation_recovers_the_limit_of_a_geometric_gradient_sequence():
    """RMPE is exact on x_k = x* + rho^k u: the predicted gradient is the limit x*."""
    g_star, u, rho = x_init((8,), seed=3), x_init((8,), seed=4), 0.7
    grads = [g_star + rho**k * u for k in range(3)]
    x = torch.zeros(8, dtype=DT, requires_grad=True)
    lr, eps = 1e-2, 1e-8
    opt = OptimisticAMSGrad([x], lr=lr, betas=(0.0, 0.99), eps=eps, reg=1e-13, span=3)
    for g in grads:
        x.grad = g.clone()
        opt.step()
    st = opt.state[x]
    denom = st["max_exp_avg_sq"].sqrt() + eps
    m_pred = (st["half_param"] - x.detach()) * denom / lr  # beta1 = 0: w = w_half - lr m / denom
    close(m_pred, g_star, rtol=1e-5, atol=1e-8)
    assert (m_pred - grads[-1]).abs().max() > 0.1  # not simply the last gradient


def test_oracle_prediction_of_the_next_gradient_is_faster_than_amsgrad():
    """Issue 3: with m_{t+1} equal to the true next gradient, Optimistic-AMSGrad beats AMSGrad on a quadratic."""
    d = torch.logspace(0, 2, 20, dtype=DT)  # f(x) = 1/2 sum d x^2, condition number 100
    predictions = []

    def oracle(param, base, scale):
        # the next point is base - scale * m; the true next gradient solves m = d (base - scale m)
        m = d * base / (1 + d * scale)
        predictions.append(m.clone())
        return m

    def loss_after(opt_cls, steps=100, **kw):
        x = torch.ones(20, dtype=DT, requires_grad=True)
        opt = opt_cls([x], lr=0.1, betas=(0.9, 0.99), **kw)
        for t in range(steps):
            opt.zero_grad()
            (0.5 * (d * x**2).sum()).backward()
            if kw and t > 0:  # the oracle did predict the gradient now observed
                close(x.grad, predictions[t - 1], rtol=1e-12, atol=1e-300)
            opt.step()
        return 0.5 * (d * x.detach() ** 2).sum().item()

    f_opt, f_ams = loss_after(OptimisticAMSGrad, predictor=oracle), loss_after(AMSGrad)
    assert f_opt < 1e-2 * f_ams, (f_opt, f_ams)


@pytest.mark.parametrize("span", [1, 5])
def test_reddi_counterexample_optimistic_amsgrad_reaches_the_optimum(span):
    """Reddi et al. (2018): f_t(x) = C x if t mod 3 == 1 else -x on [-1, 1], C = 3; optimum -1.

    Both of the paper's sequences are projected (clamped) after each step."""
    C = 3.0
    x = torch.zeros(1, dtype=DT, requires_grad=True)
    opt = OptimisticAMSGrad([x], lr=0.5, betas=(0.0, 1 / (1 + C**2)), eps=1e-12, span=span)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / math.sqrt(k + 1))
    for t in range(1, 601):
        x.grad = torch.full((1,), C if t % 3 == 1 else -1.0, dtype=DT)
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(-1.0, 1.0)
            opt.state[x]["half_param"].clamp_(-1.0, 1.0)
    assert opt.state[x]["half_param"].item() < -0.9
    assert x.item() < -0.9


def test_optimistic_amsgrad_argument_errors():
    p = [torch.zeros(2, dtype=DT, requires_grad=True)]
    for span in (0, 2.0, True):
        with pytest.raises(ValueError, match="invalid span="):
            OptimisticAMSGrad(p, span=span)
    with pytest.raises(TypeError, match="predictor"):
        OptimisticAMSGrad(p, predictor=3)


# ----------------------------------------------------------------------------------------------
# INNAprop (Bolte, Boustany, Pauwels and Purica 2024, the INNAprop algorithm)
# ----------------------------------------------------------------------------------------------
def paper_innaprop(theta0, grads, lr, alpha, beta, sigma, eps, weight_decay):
    theta = theta0.clone()
    psi = (1 - alpha * beta) * theta0
    v = torch.zeros_like(theta0)
    out, psis = [], []
    for k, g in enumerate(grads):
        theta = theta - lr * weight_decay * theta
        v = sigma * v + (1 - sigma) * g**2
        v_hat = v / (1 - sigma ** (k + 1))
        psi = (1 - lr / beta) * psi + lr * (1 / beta - alpha) * theta
        theta = ((1 + lr * (1 - alpha * beta) / (beta - lr)) * theta - lr / (beta - lr) * psi
                 - lr * beta * g / (v_hat.sqrt() + eps))
        out.append(theta)
        psis.append(psi)
    return torch.stack(out), torch.stack(psis)


@pytest.mark.parametrize("kw", [
    dict(lr=1e-2, alpha=0.1, beta=0.9, sigma=0.999, eps=1e-8, weight_decay=0.01),  # the defaults
    dict(lr=0.3, alpha=0.7, beta=0.5, sigma=0.9, eps=1e-6, weight_decay=0.2),
])
def test_innaprop_matches_the_paper_algorithm(kw):
    x0, grads = x_init(), grad_stream((30,), 30, seed=5)
    x = x0.clone().requires_grad_()
    opt = INNAprop([x], **kw)
    ours, psis = [], []
    for g in grads:
        x.grad = g.clone()
        opt.step()
        ours.append(x.detach().clone())
        psis.append(opt.state[x]["psi"].clone())
    ref, ref_psi = paper_innaprop(x0, grads, **kw)
    close(torch.stack(ours), ref, rtol=1e-12, atol=1e-14)
    close(torch.stack(psis), ref_psi, rtol=1e-12, atol=1e-14)


def test_innaprop_first_step_closed_form():
    """k = 0: v_hat = g^2, so theta_1 = (1 + c)theta_0 - q psi_1 - lr beta g/(|g| + eps) with psi_0 = (1 - alpha beta) theta_0."""
    lr, alpha, beta = 0.05, 0.2, 0.8
    x0, g = x_init((5,)), grad_stream((5,), 1, seed=6)[0]
    x = x0.clone().requires_grad_()
    x.grad = g.clone()
    INNAprop([x], lr=lr, alpha=alpha, beta=beta, eps=0.0, weight_decay=0.0).step()
    psi1 = (1 - lr / beta) * (1 - alpha * beta) * x0 + lr * (1 / beta - alpha) * x0
    expected = (1 + lr * (1 - alpha * beta) / (beta - lr)) * x0 - lr / (beta - lr) * psi1 - lr * beta * g.sign()
    close(x.detach(), expected, rtol=1e-14, atol=1e-15)


def test_innaprop_psi_initialisation():
    """psi_0 = (1 - alpha beta) theta_0, from the group's alpha and beta; lr = 0 keeps it (and theta) as is."""
    x0 = x_init((4, 3))
    x = x0.clone().requires_grad_()
    opt = INNAprop([x], lr=0.0, alpha=0.3, beta=2.0)
    x.grad = torch.ones_like(x0)
    opt.step()
    assert torch.equal(opt.state[x]["psi"], (1 - 0.3 * 2.0) * x0)
    assert torch.equal(x.detach(), x0)


def test_innaprop_refuses_lr_at_or_above_beta():
    p = [torch.zeros(3, dtype=DT, requires_grad=True)]
    for lr in (0.9, 1.5):
        with pytest.raises(ValueError, match=r"invalid lr=.*expected lr < beta=0\.9"):
            INNAprop(p, lr=lr, beta=0.9)
    with pytest.raises(ValueError, match="lr < beta"):
        INNAprop(p, lr=torch.tensor(0.5), beta=0.5)
    opt = INNAprop(p, lr=0.1, beta=0.9)
    with pytest.raises(ValueError, match="lr < beta"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "beta": 0.05})
    # a schedule that raises lr past beta is refused at the step, before anything changes
    opt.param_groups[0]["lr"] = 0.95
    p[0].grad = torch.ones(3, dtype=DT)
    with pytest.raises(ValueError, match="lr < beta"):
        opt.step()
    assert torch.equal(p[0].detach(), torch.zeros(3, dtype=DT)) and not opt.state


# ----------------------------------------------------------------------------------------------
# DoG and L-DoG (Ivgi, Hinder and Carmon 2023)
# ----------------------------------------------------------------------------------------------
def paper_dog(x0s, grads, reps_rel, layerwise, lr=1.0, weight_decay=0.0):
    """Eq. (1) on a fixed gradient stream (one list of tensors per step); returns the x_t and eta_t."""
    xs = [x.clone() for x in x0s]
    blocks = [[i] for i in range(len(xs))] if layerwise else [list(range(len(xs)))]

    def norm(ts):
        return math.sqrt(sum(float((t**2).sum()) for t in ts))

    rbar = [reps_rel * (1 + norm([x0s[i] for i in b])) for b in blocks]
    gsq = [0.0] * len(blocks)
    traj, etas = [], []
    for gs in grads:
        gs = [g + weight_decay * x for g, x in zip(gs, xs)]
        eta_t = []
        for j, b in enumerate(blocks):
            rbar[j] = max(rbar[j], norm([xs[i] - x0s[i] for i in b]))
            gsq[j] += norm([gs[i] for i in b]) ** 2
            eta = lr * rbar[j] / math.sqrt(gsq[j])
            for i in b:
                xs[i] = xs[i] - eta * gs[i]
            eta_t.append(eta)
        traj.append([x.clone() for x in xs])
        etas.append(eta_t)
    return traj, etas


SHAPES = [(3, 4), (5,), ()]


def run_dog(cls, x0s, grads, **kw):
    ps = [x.clone().requires_grad_() for x in x0s]
    opt = cls(ps, **kw)
    traj = []
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
        traj.append([p.detach().clone() for p in ps])
    return traj, opt, ps


def dog_problem(seed=7, steps=30):
    g = torch.Generator().manual_seed(seed)
    x0s = [torch.randn(s, generator=g, dtype=DT) for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=DT) * (1 + 0.1 * t) for s in SHAPES] for t in range(steps)]
    return x0s, grads


@pytest.mark.parametrize("cls", [DoG, LDoG])
@pytest.mark.parametrize("kw", [dict(reps_rel=1e-2), dict(reps_rel=1e-6, lr=0.7, weight_decay=0.05)])
def test_dog_matches_the_paper_formula(cls, kw):
    x0s, grads = dog_problem()
    ours, _, _ = run_dog(cls, x0s, grads, **kw)
    ref, _ = paper_dog(x0s, grads, layerwise=cls is LDoG, **kw)
    for a, b in zip(ours, ref):
        for x, y in zip(a, b):
            close(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_dog_first_step_size_is_r_eps_over_gradient_norm(cls):
    x0s, grads = dog_problem(steps=1)
    reps_rel = 1e-3
    (x1,), _, _ = run_dog(cls, x0s, grads, reps_rel=reps_rel)
    if cls is DoG:  # one step size for the whole group
        r_eps = reps_rel * (1 + math.sqrt(sum(float((x**2).sum()) for x in x0s)))
        eta = r_eps / math.sqrt(sum(float((g**2).sum()) for g in grads[0]))
        etas = [eta] * len(x0s)
    else:  # one per tensor
        etas = [reps_rel * (1 + float(x.norm())) / float(g.norm()) for x, g in zip(x0s, grads[0])]
    for x, x0, g, eta in zip(x1, x0s, grads[0], etas):
        close(x, x0 - eta * g, rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_dog_is_invariant_to_scaling_the_loss(cls):
    """Least squares with two tensors: scaling the loss by c > 0 leaves the trajectory unchanged."""
    g = torch.Generator().manual_seed(8)
    a, y = torch.randn(40, 6, generator=g, dtype=DT), torch.randn(40, 3, generator=g, dtype=DT)
    w0, b0 = torch.randn(6, 3, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT)

    def trajectory(c):
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        opt = cls([w, b], reps_rel=1e-4)
        out = []
        for _ in range(60):
            opt.zero_grad()
            (c * (((a[:, :, None] * w).sum(1) + b - y) ** 2).mean()).backward()
            opt.step()
            out.append(torch.cat([w.detach().reshape(-1), b.detach()]))
        return torch.stack(out)

    ref = trajectory(1.0)
    assert (ref[-1] - ref[0]).norm() > 0.1  # it moved
    for c in (1e-3, 7.3, 2e4):
        close(trajectory(c), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_dog_step_size_numerator_is_the_running_max_distance(cls):
    """eta_t sqrt(sum ||g_i||^2) = rbar_t = max(r_eps, max_{i<=t} ||x_i - x_0||): nondecreasing, >= every distance."""
    x0s, grads = dog_problem(seed=9, steps=40)
    reps_rel = 1e-4
    ps = [x.clone().requires_grad_() for x in x0s]
    opt = cls(ps, reps_rel=reps_rel)
    traj, stored = [], []
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
        traj.append([p.detach().clone() for p in ps])
        stored.append([opt.state[p]["rbar"] for p in ps] if cls is LDoG else [opt.param_groups[0]["dog_rbar"]])
    assert all(a <= b for r0, r1 in zip(stored, stored[1:]) for a, b in zip(r0, r1))  # exactly nondecreasing
    blocks = [[i] for i in range(len(x0s))] if cls is LDoG else [list(range(len(x0s)))]
    xs = [x0s] + traj
    for b in blocks:
        gsq, prev, max_dist = 0.0, 0.0, 0.0
        r_eps = reps_rel * (1 + math.sqrt(sum(float((x0s[i] ** 2).sum()) for i in b)))
        for t in range(len(grads)):
            gsq += sum(float((grads[t][i] ** 2).sum()) for i in b)
            step = math.sqrt(sum(float(((xs[t + 1][i] - xs[t][i]) ** 2).sum()) for i in b))
            eta = step / math.sqrt(sum(float((grads[t][i] ** 2).sum()) for i in b))
            rbar = eta * math.sqrt(gsq)
            max_dist = max(max_dist, math.sqrt(sum(float(((xs[t][i] - x0s[i]) ** 2).sum()) for i in b)))
            # (rbar recovered from the trajectory: ~1e-10 relative rounding)
            assert rbar >= prev * (1 - 1e-8)
            assert rbar == pytest.approx(max(r_eps, max_dist), rel=1e-8)
            prev = rbar
        assert prev > 2 * r_eps  # the distance term took over from r_eps


def test_dog_converges_on_an_ill_conditioned_quadratic_without_tuning():
    d = torch.logspace(0, 2, 20, dtype=DT)
    x = torch.ones(20, dtype=DT, requires_grad=True)
    f0 = 0.5 * (d * x.detach() ** 2).sum().item()
    opt = DoG([x])  # defaults: lr (multiplier) 1, reps_rel 1e-6, no schedule
    for _ in range(1000):
        opt.zero_grad()
        (0.5 * (d * x**2).sum()).backward()
        opt.step()
    assert 0.5 * (d * x.detach() ** 2).sum().item() < 1e-4 * f0


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_dog_zero_first_gradient_takes_no_step(cls):
    x0 = x_init((4,))
    x = x0.clone().requires_grad_()
    opt = cls([x])
    x.grad = torch.zeros(4, dtype=DT)
    opt.step()
    assert torch.equal(x.detach(), x0)
    x.grad = torch.ones(4, dtype=DT)
    opt.step()  # now the first nonzero gradient: step r_eps / ||g||
    close(x.detach(), x0 - 1e-6 * (1 + x0.norm()) / 2.0, rtol=1e-14, atol=0)


@pytest.mark.parametrize("mode", [dict(foreach=False), dict(), dict(fused=True)])
@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_dog_parameter_without_gradient_keeps_its_distance(cls, mode):
    """A parameter that stops getting gradients is not stepped and adds nothing to the gradient sum,
    but its displacement still counts in DoG's group distance: the trajectory equals the paper's
    formula with zero gradients for it (weight decay 0, where a zero gradient is no step)."""
    x0s, grads = dog_problem(steps=16)
    stop = 6
    ps = [x.clone().requires_grad_() for x in x0s]
    opt = cls(ps, reps_rel=1e-2, **mode)
    for t, gs in enumerate(grads):
        for i, (p, g) in enumerate(zip(ps, gs)):
            p.grad = None if (i == 0 and t >= stop) else g.clone()
        opt.step()
    zeroed = [[torch.zeros_like(g) if (i == 0 and t >= stop) else g for i, g in enumerate(gs)]
              for t, gs in enumerate(grads)]
    ref, _ = paper_dog(x0s, zeroed, layerwise=cls is LDoG, reps_rel=1e-2)
    for x, y in zip(ps, ref[-1]):
        close(x.detach(), y, rtol=1e-12, atol=1e-14)
