"""Training controllers: AdAdaGrad adaptive batch size (arXiv:2402.11215) and GradES freezing (arXiv:2509.01842)."""

from __future__ import annotations

import math

import pytest
import torch
from gk_testing import inputs_for, mlp
from torch import nn

from gradkit.core import per_sample_grads
from gradkit.optim.controllers import AdAdaGrad, GradES, gradient_noise

DT = torch.float64


# ----------------------------------------------------------------------------------------------
# AdAdaGrad
# ----------------------------------------------------------------------------------------------
def dense_per_sample(model, loss_fn, x, y):
    """Per-sample gradients by a loop of autograd calls, one example at a time: (b, D)."""
    rows = []
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i:i + 1]), y[i:i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows)


def dense_statistics(G):
    b = G.shape[0]
    mean = G.mean(0)
    sq = float(mean @ mean)
    variance = float(((G - mean) ** 2).sum()) / (b - 1)
    ip = G @ mean
    ip_var = float(((ip - ip.mean()) ** 2).sum()) / (b - 1)
    orth = G - (ip / sq)[:, None] * mean[None, :]
    return sq, variance, ip_var, float((orth ** 2).sum()) / (b - 1)


@pytest.fixture
def regression_problem():
    model = mlp(seed=3)
    x = inputs_for(model, 12, seed=4)
    y = torch.randn(12, 4, generator=torch.Generator().manual_seed(5), dtype=DT)
    return model, nn.MSELoss(), x, y


def test_statistics_equal_a_dense_float64_computation(regression_problem):
    model, loss_fn, x, y = regression_problem
    G = dense_per_sample(model, loss_fn, x, y)
    sq, variance, ip_var, orth = dense_statistics(G)
    noise = gradient_noise(per_sample_grads(model, loss_fn, x, y))
    assert noise.batch_size == 12
    assert noise.grad_sq_norm == pytest.approx(sq, rel=1e-12)
    assert noise.variance == pytest.approx(variance, rel=1e-12)
    assert noise.inner_product_variance == pytest.approx(ip_var, rel=1e-12)
    assert noise.orthogonal_variance == pytest.approx(orth, rel=1e-10)
    # the flat (b, D) matrix and a list of tensors give the same numbers
    assert gradient_noise(G) == pytest.approx(noise, rel=1e-12)
    assert gradient_noise(list(per_sample_grads(model, loss_fn, x, y).values())) == pytest.approx(noise, rel=1e-12)


@pytest.mark.parametrize("test", ["norm", "inner_product", "augmented"])
def test_update_follows_the_paper_rule(regression_problem, test):
    model, loss_fn, x, y = regression_problem
    sq, variance, ip_var, orth = dense_statistics(dense_per_sample(model, loss_fn, x, y))
    eta, theta, nu = 0.3, 0.2, 1.0
    required = {
        "norm": variance / (eta ** 2 * sq),
        "inner_product": ip_var / (theta ** 2 * sq ** 2),
        "augmented": max(ip_var / (theta ** 2 * sq ** 2), orth / (nu ** 2 * sq)),
    }[test]
    for b0, b_max in [(2, 10_000), (2, 5), (10 ** 6, 10 ** 7)]:
        ctl = AdAdaGrad(b0, b_max, eta=eta, theta=theta, nu=nu, test=test)
        new = ctl.update(model=model, loss_fn=loss_fn, inputs=x, targets=y)
        assert ctl.required_batch_size(ctl.last) == pytest.approx(required, rel=1e-10)
        assert new == min(b_max, max(b0, math.ceil(required))) == ctl.batch_size
    assert 2 < math.ceil(required) < 10 ** 6  # the cases above cover growth, the cap and no growth


def test_batch_size_is_monotone_on_noisy_linear_regression():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4000, 5, generator=g, dtype=DT)
    y = X @ torch.randn(5, 1, generator=g, dtype=DT) + 0.5 * torch.randn(4000, 1, generator=g, dtype=DT)
    model = nn.Linear(5, 1).to(DT)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.3)
    ctl = AdAdaGrad(4, 1024, eta=0.5)
    sizes = [ctl.batch_size]
    for _ in range(80):
        idx = torch.randint(0, 4000, (ctl.batch_size,), generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(X[idx]), y[idx]).backward()
        opt.step()
        sizes.append(ctl.update(model=model, loss_fn=nn.MSELoss(), inputs=X[idx], targets=y[idx]))
    assert all(b1 <= b2 for b1, b2 in zip(sizes, sizes[1:]))
    assert len(set(sizes)) > 4 and sizes[-1] == 1024  # noise near the optimum forces growth, up to the cap


def test_no_gradient_noise_never_grows_the_batch():
    X = torch.randn(1, 5, generator=torch.Generator().manual_seed(1), dtype=DT).expand(32, 5).clone()
    y = torch.full((32, 1), 2.0, dtype=DT)
    model = nn.Linear(5, 1).to(DT)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.5)
    ctl = AdAdaGrad(8, 32, eta=0.01)  # a strict test: any noise would grow the batch
    for _ in range(30):
        idx = torch.arange(ctl.batch_size)
        opt.zero_grad()
        nn.functional.mse_loss(model(X[idx]), y[idx]).backward()
        opt.step()
        assert ctl.update(model=model, loss_fn=nn.MSELoss(), inputs=X[idx], targets=y[idx]) == 8
    row = torch.randn(1, 7, dtype=DT)
    assert ctl.update(row.expand(16, 7).clone()) == 8
    assert ctl.update(torch.zeros(16, 7, dtype=DT)) == 8  # zero gradient and zero noise


@pytest.mark.parametrize("test", AdAdaGrad.TESTS)
def test_zero_mean_gradient_with_noise_asks_for_the_maximum(test):
    """∇f_B = 0 with noise: every test asks for the cap (the inner-product statistics vanish with
    ∇f_B; before, that test then kept the batch), as it does for a mean gradient just off zero."""
    grads = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=DT)
    assert AdAdaGrad(4, 100, test=test).update(grads) == 100
    nudged = grads.clone()
    nudged[0, 0] += 1e-6
    assert AdAdaGrad(4, 100, test=test).update(nudged) == 100
    assert AdAdaGrad(4, 100, test=test).update(torch.zeros(3, 2, dtype=DT)) == 4  # no noise: kept
    noise = gradient_noise(grads)
    assert noise.orthogonal_variance == noise.variance == 10.0  # every g_i is orthogonal to ḡ = 0


def test_state_dict_round_trip():
    ctl = AdAdaGrad(4, 1000, eta=0.2)
    ctl.update(torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=DT))
    other = AdAdaGrad(4, 1000, eta=0.2)
    other.load_state_dict(ctl.state_dict())
    assert other.batch_size == ctl.batch_size and other.last == ctl.last and other.num_updates == 1
    with pytest.raises(ValueError, match="max_batch_size"):
        AdAdaGrad(1, 2).load_state_dict({"batch_size": 5})


def test_adadagrad_bad_input_raises(regression_problem):
    model, loss_fn, x, y = regression_problem
    for kwargs, name in [
        (dict(batch_size=0, max_batch_size=4), "batch_size"),
        (dict(batch_size=2.0, max_batch_size=4), "batch_size"),
        (dict(batch_size=8, max_batch_size=4), "max_batch_size"),
        (dict(batch_size=2, max_batch_size=4, eta=0.0), "eta"),
        (dict(batch_size=2, max_batch_size=4, theta=-1.0), "theta"),
        (dict(batch_size=2, max_batch_size=4, nu=math.nan), "nu"),
        (dict(batch_size=2, max_batch_size=4, test="variance"), "test"),
    ]:
        with pytest.raises(ValueError, match=name):
            AdAdaGrad(**kwargs)
    ctl = AdAdaGrad(2, 100)
    with pytest.raises(ValueError, match="at least 2"):
        ctl.update(torch.ones(1, 3, dtype=DT))
    with pytest.raises(ValueError, match="non-finite"):
        ctl.update(torch.tensor([[1.0], [math.inf]], dtype=DT))
    with pytest.raises(ValueError, match="batch size"):
        ctl.update({"a": torch.ones(3, 2), "b": torch.ones(4)})
    with pytest.raises(ValueError, match="empty"):
        ctl.update({})
    with pytest.raises(TypeError, match="per_sample_grads"):
        ctl.update("grads")
    with pytest.raises(TypeError, match="floating"):
        ctl.update(torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="missing: targets"):
        ctl.update(model=model, loss_fn=loss_fn, inputs=x)
    with pytest.raises(ValueError, match="not both"):
        ctl.update(torch.ones(3, 2), model=model)
    assert ctl.batch_size == 2 and ctl.num_updates == 0  # failed calls change nothing


# ----------------------------------------------------------------------------------------------
# GradES
# ----------------------------------------------------------------------------------------------
def two_matrix_problem(seed=0):
    """loss = ‖W_big x − y‖² + ε ‖W_small x‖²: W_small's gradient is tiny, W_big's is not."""
    g = torch.Generator().manual_seed(seed)
    w_small = torch.randn(3, 4, generator=g, dtype=DT).requires_grad_()
    w_big = torch.randn(3, 4, generator=g, dtype=DT).requires_grad_()
    bias = torch.zeros(3, dtype=DT, requires_grad=True)
    x = torch.randn(16, 4, generator=g, dtype=DT)
    y = torch.randn(16, 3, generator=g, dtype=DT)

    def loss():
        return ((x @ w_big.T + bias - y) ** 2).mean() + 1e-6 * ((x @ w_small.T) ** 2).mean()

    return w_small, w_big, bias, loss


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=False),
], ids=["sgd-momentum", "adamw-foreach", "adamw-loop"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_frozen_matrix_never_changes(make_opt, set_to_none):
    w_small, w_big, bias, loss = two_matrix_problem()
    opt = make_opt([w_small, w_big, bias])
    T, alpha = 40, 0.25
    ctl = GradES({"small": w_small, "big": w_big}, T, tau=1e-3, alpha=alpha)
    snapshot, start = None, w_small.detach().clone()
    for _ in range(T):
        opt.zero_grad(set_to_none=set_to_none)
        loss().backward()
        ctl.step()
        if "small" in ctl.frozen and snapshot is None:
            snapshot = w_small.detach().clone()  # the value it keeps from this step on
        opt.step()
        if snapshot is not None:
            assert torch.equal(w_small, snapshot)
    assert ctl.frozen == {"small": int(alpha * T) + 1}  # the first step after the grace period
    assert not w_small.requires_grad and w_small.grad is None
    assert not torch.equal(snapshot, start)  # it did train during the grace period
    assert w_big.requires_grad and not ctl.stop


def test_nothing_is_frozen_during_the_grace_period():
    params = [torch.zeros(2, 2, dtype=DT, requires_grad=True) for _ in range(3)]
    T, alpha = 20, 0.35
    ctl = GradES(params, T, tau=1.0, alpha=alpha)  # every statistic (0) is below tau
    grace = int(alpha * T)
    for t in range(1, grace + 2):
        for p in params:
            p.grad = torch.zeros_like(p)
        stop = ctl.step()
        if t <= grace:
            assert ctl.frozen == {} and not stop and all(p.requires_grad for p in params)
        else:
            assert ctl.frozen == {"0": t, "1": t, "2": t} and stop


def test_grad_statistic_is_the_l1_norm_and_frozen_set_is_monotone():
    g = torch.Generator().manual_seed(2)
    params = {f"w{k}": torch.zeros(3, 5, dtype=DT, requires_grad=True) for k in range(6)}
    ctl = GradES(params, 50, tau=2.0, alpha=0.1, reduction="sum")
    previous: dict[str, int] = {}
    for t in range(1, 51):
        grads = {}
        for k, (name, p) in enumerate(params.items()):
            if p.requires_grad:  # scales decay at different rates: matrices cross tau at different steps
                p.grad = torch.randn(3, 5, generator=g, dtype=DT) * (0.97 ** ((k + 1) * t))
                grads[name] = p.grad.clone()
        ctl.step()
        for name, grad in grads.items():
            assert ctl.last[name] == pytest.approx(float(grad.abs().sum()), rel=1e-14)
        assert set(previous) <= set(ctl.frozen) and all(ctl.frozen[n] == s for n, s in previous.items())
        for name in ctl.frozen:
            assert not params[name].requires_grad and params[name].grad is None
        previous = dict(ctl.frozen)
    assert 0 < len(ctl.frozen) < 6 or ctl.stop
    assert len({s for s in ctl.frozen.values()}) > 1  # frozen at different steps


def test_mean_reduction_is_the_sum_over_numel():
    p, q = (torch.zeros(4, 5, dtype=DT, requires_grad=True) for _ in range(2))
    summed = GradES([p], 10, tau=1.0)
    mean = GradES([q], 10, tau=1.0, reduction="mean")
    grad = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=DT)
    p.grad, q.grad = grad.clone(), grad.clone()
    summed.step()
    mean.step()
    assert summed.last["0"] == pytest.approx(float(grad.abs().sum()), rel=1e-14)
    assert mean.last["0"] == pytest.approx(float(grad.abs().sum()) / 20, rel=1e-14)


def test_update_statistic_is_the_l1_weight_change():
    w_small, w_big, bias, loss = two_matrix_problem(1)
    opt = torch.optim.SGD([w_small, w_big, bias], lr=0.05)
    ctl = GradES({"small": w_small, "big": w_big}, 30, tau=1e-4, alpha=0.2, statistic="update")
    before = {"small": w_small.detach().clone(), "big": w_big.detach().clone()}
    for t in range(1, 31):
        opt.zero_grad()
        loss().backward()
        ctl.step()
        if t == 1:
            assert ctl.last == {}  # no previous weights yet
        for name, w in (("small", w_small), ("big", w_big)):
            if name not in ctl.frozen or ctl.frozen[name] == t:
                if t > 1:
                    assert ctl.last[name] == pytest.approx(float((w.detach() - before[name]).abs().sum()), rel=1e-12)
                before[name] = w.detach().clone()
        opt.step()
    assert ctl.frozen == {"small": int(0.2 * 30) + 1}


def test_patience_needs_consecutive_steps_below_tau():
    p = torch.zeros(2, 2, dtype=DT, requires_grad=True)
    ctl = GradES([p], 10, tau=1.0, alpha=0.0, patience=3)
    pattern = [0.1, 0.1, 5.0, 0.1, 0.1, 0.1]  # |g| summed over 4 elements
    for t, level in enumerate(pattern, start=1):
        p.grad = torch.full((2, 2), level / 4, dtype=DT)
        ctl.step()
        assert ("0" in ctl.frozen) == (t == 6)


def test_module_input_monitors_weight_matrices_only():
    model = mlp(seed=1)
    ctl = GradES(model, 10, tau=1e-3)
    assert set(ctl.params) == {"0.weight", "2.weight", "4.weight"}


def test_gradES_state_dict_resumes_like_uninterrupted():
    def run(split):
        w_small, w_big, bias, loss = two_matrix_problem(3)
        opt = torch.optim.SGD([w_small, w_big, bias], lr=0.05, momentum=0.9)
        ctl = GradES({"small": w_small, "big": w_big}, 24, tau=1e-3, alpha=0.25, statistic="update")
        for t in range(1, 25):
            if t == split:  # rebuild the parameters, optimizer and controller from checkpoints
                state = (w_small.detach().clone(), w_big.detach().clone(), bias.detach().clone(),
                         opt.state_dict(), ctl.state_dict())
                w_small, w_big, bias, loss = two_matrix_problem(3)
                with torch.no_grad():
                    for p, v in zip((w_small, w_big, bias), state[:3]):
                        p.copy_(v)
                opt = torch.optim.SGD([w_small, w_big, bias], lr=0.05, momentum=0.9)
                opt.load_state_dict(state[3])
                ctl = GradES({"small": w_small, "big": w_big}, 24, tau=1e-3, alpha=0.25, statistic="update")
                ctl.load_state_dict(state[4])
            opt.zero_grad()
            loss().backward()
            ctl.step()
            opt.step()
        return w_small.detach(), w_big.detach(), dict(ctl.frozen), w_small.requires_grad

    reference = run(split=None)
    resumed = run(split=15)
    assert reference[2] == resumed[2] == {"small": 7}
    assert torch.equal(reference[0], resumed[0]) and torch.equal(reference[1], resumed[1])
    assert reference[3] is resumed[3] is False


def test_gradES_rollback_to_an_earlier_checkpoint_unfreezes():
    """Loading a checkpoint taken before a matrix froze (in the same process, e.g. after a loss
    spike) makes it trainable and monitored again; the checkpoint's frozen matrices stay frozen."""
    p, q = (torch.zeros(2, 2, dtype=DT, requires_grad=True) for _ in range(2))
    ctl = GradES({"p": p, "q": q}, 10, tau=1.0, alpha=0.0)
    p.grad, q.grad = torch.full((2, 2), 0.1, dtype=DT), torch.full((2, 2), 5.0, dtype=DT)
    ctl.step()  # p freezes at step 1
    early = ctl.state_dict()
    q.grad = torch.full((2, 2), 0.1, dtype=DT)
    ctl.step()  # q freezes at step 2
    assert ctl.frozen == {"p": 1, "q": 2} and not q.requires_grad
    ctl.load_state_dict(early)
    assert ctl.frozen == {"p": 1} and not p.requires_grad and q.requires_grad and not ctl.stop
    q.grad = torch.full((2, 2), 5.0, dtype=DT)
    ctl.step()
    assert ctl.last["q"] == 20.0 and ctl.frozen == {"p": 1}  # q is measured again
    with pytest.raises(ValueError, match="does not monitor"):
        ctl.load_state_dict(dict(early, previous={"other": torch.zeros(2, 2)}))


def test_gradES_bad_input_raises():
    p = torch.zeros(2, 2, requires_grad=True)
    for kwargs, name in [
        (dict(total_steps=0, tau=1.0), "total_steps"),
        (dict(total_steps=10, tau=0.0), "tau"),
        (dict(total_steps=10, tau=1.0, alpha=1.0), "alpha"),
        (dict(total_steps=10, tau=1.0, alpha=-0.1), "alpha"),
        (dict(total_steps=10, tau=1.0, statistic="loss"), "statistic"),
        (dict(total_steps=10, tau=1.0, reduction="max"), "reduction"),
        (dict(total_steps=10, tau=1.0, patience=0), "patience"),
    ]:
        with pytest.raises(ValueError, match=name):
            GradES([p], **kwargs)
    with pytest.raises(ValueError, match="empty"):
        GradES([], 10, tau=1.0)
    with pytest.raises(ValueError, match="requires_grad"):
        GradES([torch.zeros(2, 2)], 10, tau=1.0)
    with pytest.raises(ValueError, match="twice"):
        GradES([p, p], 10, tau=1.0)
    with pytest.raises(TypeError, match="tensor"):
        GradES([p, 3.0], 10, tau=1.0)
    with pytest.raises(TypeError, match="params"):
        GradES(5, 10, tau=1.0)
    with pytest.raises(ValueError, match="weight matrix"):
        GradES(nn.Sequential(nn.ReLU()), 10, tau=1.0)
    ctl = GradES([p], 10, tau=1.0)
    with pytest.raises(ValueError, match="does not monitor"):
        ctl.load_state_dict({"num_steps": 1, "frozen": {"other": 1}})
    p.grad = torch.full((2, 2), math.nan)
    with pytest.raises(ValueError, match="nan"):
        ctl.step()
