"""Tests of the bilevel solvers LV-HBA, MEHA, BO-REP, MAID and BSVRB (float64).

Every convergence test compares with a closed-form solution (``bilevel/problems.py``); the other
tests check a defining property of the method (first-order only, exact step length, the inexact
sufficient-decrease condition, accuracies tightened only on failure, tracking error) or an
independent implementation written here with explicit gradients.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from unittest import mock

import pytest
import torch

from bilevel.problems import (
    DTYPE,
    LVHBAToy,
    MEHAToyConvex,
    MEHAToyNonconvex,
    MultiBlockQuadratic,
    QuadraticBilevel,
)
from gradkit.bilevel.borep import borep
from gradkit.bilevel.bsvrb import bsvrb, msvr_update
from gradkit.bilevel.lvhba import lvhba
from gradkit.bilevel.maid import maid
from gradkit.bilevel.meha import meha


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    """Elementwise ``|got − want| <= atol + rtol |want|`` (plain torch: ``torch.testing`` costs
    seconds to import on first use)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    excess = float(((got - want).abs() - atol - rtol * want.abs()).max())
    assert excess <= 0, f"max violation {excess:.3e} (atol {atol}, rtol {rtol})"


# ----------------------------------------------------------------------------------------------
# "first-order only": no create_graph, no torch.func transform
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def first_order_only() -> Iterator[dict[str, int]]:
    """Fail on any second-order autograd: ``torch.autograd.grad``/``backward`` with
    ``create_graph=True``, a gradient that carries a graph, or any ``torch.func`` transform
    (they differentiate with ``create_graph=True`` internally).  Counts first-order calls."""
    calls = {"grad": 0}
    real_grad, real_backward = torch.autograd.grad, torch.autograd.backward

    def grad(*args, **kwargs):
        if kwargs.get("create_graph") or (len(args) > 4 and args[4]):
            raise AssertionError("second-order autograd: torch.autograd.grad(create_graph=True)")
        calls["grad"] += 1
        out = real_grad(*args, **kwargs)
        assert all(g is None or g.grad_fn is None for g in out), "a gradient carries an autograd graph"
        return out

    def backward(*args, **kwargs):
        if kwargs.get("create_graph"):
            raise AssertionError("second-order autograd: backward(create_graph=True)")
        return real_backward(*args, **kwargs)

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"torch.func.{name} used (it builds higher-order graphs)")
        return fail

    names = ["grad", "grad_and_value", "vjp", "jvp", "jacrev", "jacfwd", "hessian", "linearize"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.autograd, "grad", grad))
        stack.enter_context(mock.patch.object(torch.autograd, "backward", backward))
        for name in names:
            stack.enter_context(mock.patch.object(torch.func, name, forbidden(name)))
        yield calls


def test_first_order_guard_catches_second_order():
    """The guard itself must fail on a Hessian-vector product (else the tests below prove nothing)."""
    from gradkit.core.products import hvp

    y = torch.randn(3, dtype=DTYPE)
    with first_order_only(), pytest.raises(AssertionError, match="torch.func"):
        hvp(lambda w: (w**4).sum(), y, torch.ones_like(y))
    with first_order_only(), pytest.raises(AssertionError, match="create_graph"):
        w = y.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((w**4).sum(), w, create_graph=True)


# ----------------------------------------------------------------------------------------------
# LV-HBA
# ----------------------------------------------------------------------------------------------
# Constants for the toy (lvhba's defaults, spelled out; see its docstring for why they differ
# from the authors' script: γ = 10, η = 0.01, c_k = 0.025 (k+1)^0.3 do not converge there).
LVHBA_TOY = dict(lr_xy=0.05, lr_z=0.02, lr_theta=0.05, gamma1=1.0, gamma2=1.0, c0=2.5, p=0.49)


def lvhba_reference(P: LVHBAToy, steps: int, lr_xy, lr_z, lr_theta, gamma1, gamma2, c0, p, r=1000.0):
    """LV-HBA's Algorithm 1 on the toy with hand-written gradients (no autograd)."""
    n = P.n
    x, y = P.x0.clone(), P.y0.clone()
    theta = y.clone()
    lam = torch.zeros(2, dtype=DTYPE)
    z = torch.zeros(2, dtype=DTYPE)
    for k in range(steps):
        ck = c0 * (k + 1) ** p
        h = x.sum() + theta.sum()
        net = lam[0] - lam[1]  # multipliers of h <= 0 and -h <= 0
        d_theta = torch.cat([theta[:n] - x, torch.ones(n, dtype=DTYPE)]) + net + (theta - y) / gamma1
        d_lam = torch.stack([-h, h]) + (lam - z) / gamma2
        theta = theta - lr_theta * d_theta
        lam = torch.clamp(lam - lr_theta * d_lam, min=0.0)
        net = lam[0] - lam[1]
        F_x, F_y = x - y[n:], torch.cat([y[:n] - 1.0, -(x - y[n:])])
        f_x, f_y = -y[:n], torch.cat([y[:n] - x, torch.ones(n, dtype=DTYPE)])
        d_x = F_x / ck + f_x - (-theta[:n]) - net
        d_y = F_y / ck + f_y - (y - theta) / gamma1
        x, y = x - lr_xy * d_x, y - lr_xy * d_y
        shift = (x.sum() + y.sum()) / (3 * n)
        x, y = x - shift, y - shift
        z = torch.clamp(z - lr_z * (z - lam) / gamma2, 0.0, r)
    return x, y, theta, lam, z


def run_lvhba(P: LVHBAToy, steps: int, **kw):
    return lvhba(P.upper, P.lower, P.x0, P.y0, constraint_fn=P.constraint, project=P.project,
                 steps=steps, progress=False, **{**LVHBA_TOY, **kw})


def test_lvhba_matches_hand_written_reference():
    P = LVHBAToy(n=10)
    res = run_lvhba(P, 40)
    x, y, theta, lam, z = lvhba_reference(P, 40, **LVHBA_TOY)
    for got, want in ((res.x, x), (res.y, y), (res.state["theta"], theta), (res.state["lam"], lam), (res.state["z"], z)):
        assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_lvhba_toy_converges_to_known_optimum():
    """The paper's toy with lower-level coupled constraints: x* = −0.3·1, y₁* = 0.7·1, y₂* = −0.4·1."""
    P = LVHBAToy(n=10)
    res = run_lvhba(P, 500)
    rel = float(torch.linalg.vector_norm(res.x - P.x_star) / torch.linalg.vector_norm(P.x_star))
    assert rel < 2e-2, rel
    n = P.n
    assert float((res.y[:n] - 0.7).abs().max()) < 3e-2
    assert abs(float(res.y[n:].mean()) + 0.4) < 3e-2  # y₂* is not unique, its mean is
    assert abs(float(res.x.sum() + res.y.sum())) < 1e-10  # iterates stay in C
    assert res.history["value_gap"][-1] < 1e-2 and len(res.history["upper"]) == 500


def test_lvhba_is_first_order_only():
    P = LVHBAToy(n=5)
    with first_order_only() as calls:
        res = run_lvhba(P, 10)
    assert calls["grad"] == 3 * 10  # three first-order gradient calls per iteration
    assert torch.isfinite(res.x).all()


# ----------------------------------------------------------------------------------------------
# MEHA
# ----------------------------------------------------------------------------------------------
def test_meha_convex_toy_converges():
    """LL merely convex toy (non-singleton lower-level solutions): x* = 1, y* = (1, 1)."""
    P = MEHAToyConvex(n=10)
    x0, y0 = torch.zeros(10, dtype=DTYPE), torch.zeros(20, dtype=DTYPE)
    res = meha(P.upper, P.lower, x0, y0, steps=300, lr_x=0.2, lr_y=0.2, lr_theta=0.2, gamma=1.0, c0=1.0, p=0.3,
               progress=False)
    assert float((res.x - P.x_star).abs().max()) < 1e-6
    assert float((res.y - P.y_star).abs().max()) < 1e-6


def test_meha_nonconvex_toy_converges_to_its_branch():
    """Nonconvex lower level sin(x + y_i − c_i): x* = ((1 − n)a + nC)/(1 + n), C = 3π/2 nearest 2a."""
    P = MEHAToyNonconvex(n=2, a=2.0)
    x0, y0 = torch.full((1,), 2.0, dtype=DTYPE), torch.full((2,), 2.0, dtype=DTYPE)
    res = meha(P.upper, P.lower, x0, y0, steps=600, lr_x=0.1, lr_y=0.1, lr_theta=0.1, gamma=0.5, c0=10.0, p=0.49,
               progress=False)
    assert abs(P.C - 3 * math.pi / 2) < 1e-12
    assert float((res.x - P.x_star).abs().max()) < 1e-2
    assert float((res.y - P.y_star).abs().max()) < 2e-2


def test_meha_nonsmooth_lower_level_with_prox():
    """Lower level ½‖y₁‖² − xᵀy₁ + κ‖y₂‖₁ (κ > 0): y₁ = x, y₂ = 0, so x* = ½·1 (F = ½‖x − y₂‖² + ½‖y₁ − 1‖²)."""
    n, kappa = 4, 0.5
    P = MEHAToyConvex(n=n)

    def l1(x, y):
        return kappa * y[n:].abs().sum()

    def prox(x, v, t):
        soft = torch.sign(v[n:]) * torch.clamp(v[n:].abs() - t * kappa, min=0.0)
        return torch.cat([v[:n], soft])

    x0, y0 = torch.zeros(n, dtype=DTYPE), torch.ones(2 * n, dtype=DTYPE)
    # ∇_x F / c_k is (1/c_k)-Lipschitz in x, so x takes a larger step than y and θ
    res = meha(P.upper, P.lower, x0, y0, steps=300, lr_x=2.0, lr_y=0.2, lr_theta=0.2, c0=5.0, p=0.49,
               lower_nonsmooth=l1, prox=prox, progress=False)
    assert_close(res.x, torch.full((n,), 0.5, dtype=DTYPE), atol=1e-2)
    assert float(res.y[n:].abs().max()) == 0.0  # the prox sets y₂ exactly to 0
    assert_close(res.y[:n], res.x, atol=3e-2)  # y₁ = x up to the O(1/c_k) penalty bias


def test_meha_is_first_order_only():
    P = MEHAToyConvex(n=3)
    with first_order_only() as calls:
        meha(P.upper, P.lower, torch.zeros(3, dtype=DTYPE), torch.zeros(6, dtype=DTYPE), steps=10, progress=False)
    assert calls["grad"] == 4 * 10


# ----------------------------------------------------------------------------------------------
# BO-REP
# ----------------------------------------------------------------------------------------------
def test_borep_steps_have_length_exactly_eta():
    P = QuadraticBilevel()
    x0, y0 = torch.zeros(P.nx, dtype=DTYPE), torch.zeros(P.ny, dtype=DTYPE)
    schedule = lambda t: 0.1 / (1 + t)  # noqa: E731
    res = borep(P.upper, P.lower, x0, y0, steps=25, lr_x=schedule, period=4, progress=False, record_iterates=True)
    xs = [x0] + res.history["x"]
    for t in range(25):
        step = float(torch.linalg.vector_norm(xs[t + 1] - xs[t]))
        assert abs(step - schedule(t)) <= 1e-13 * schedule(t), (t, step)
        assert res.history["step_norm"][t] == pytest.approx(schedule(t), rel=1e-13)
    # periodic lower-level updates: y changes exactly at t = 4, 8, ... (and at no other iteration)
    ys = res.history["y"]
    for t in range(1, 25):
        changed = not torch.equal(ys[t], ys[t - 1])
        assert changed == (t % 4 == 0), t
        assert res.history["lower_updated"][t] == float(t % 4 == 0)


def test_borep_converges_on_quadratic():
    P = QuadraticBilevel()
    x0, y0 = torch.zeros(P.nx, dtype=DTYPE), torch.zeros(P.ny, dtype=DTYPE)
    res = borep(P.upper, P.lower, x0, y0, steps=200, lr_x=lambda t: 0.3 * 0.97**t, lr_y=0.4, lr_z=0.4, progress=False)
    err = float(torch.linalg.vector_norm(res.x - P.x_star))
    assert err < 0.03 * 1.0, err  # ‖x*‖ = 0.66, ‖x0 − x*‖ = 0.66
    assert float(torch.linalg.vector_norm(P.grad_phi(res.x))) < 0.2 * float(torch.linalg.vector_norm(P.grad_phi(x0)))


def test_borep_cg_hypergradient_is_exact_at_the_lower_solution():
    """With the lower level solved (initialization refinement) and z by CG, g_0 = ∇Φ(x_0)."""
    P = QuadraticBilevel()
    x0, y0 = torch.randn(P.nx, dtype=DTYPE), torch.zeros(P.ny, dtype=DTYPE)
    res = borep(P.upper, P.lower, x0, y0, steps=1, warm_start_steps=300, lr_y=0.3, linear_solver="cg",
                progress=False)
    assert_close(res.state["hypergrad"], P.grad_phi(x0), atol=1e-10, rtol=1e-9)


# ----------------------------------------------------------------------------------------------
# MAID
# ----------------------------------------------------------------------------------------------
class PerturbedLowerSolver:
    """An inexact lower-level solver: ``y*(x)`` plus a random error of norm ``tol / (2L)``, so
    that ``‖∇_y f‖ <= tol / 2`` exactly as MAID asks, at no iteration cost."""

    def __init__(self, P: QuadraticBilevel, seed: int = 1) -> None:
        self.P, self.g = P, torch.Generator().manual_seed(seed)

    def __call__(self, x, y, tol):
        u = torch.randn(self.P.ny, generator=self.g, dtype=DTYPE)
        return self.P.y_star(x) + (0.5 * tol / self.P.L) * u / torch.linalg.vector_norm(u)


MAID_OPTIONS = dict(eps=1.0, delta=1.0, lr=0.3, eta=1e-4, rho=0.9, tau=0.5, nu=1.05)


@pytest.fixture(scope="module")
def maid_run():
    P = QuadraticBilevel(rho=1.0)
    x0, y0 = torch.zeros(P.nx, dtype=DTYPE), torch.zeros(P.ny, dtype=DTYPE)
    res = maid(P.upper, P.lower, x0, y0, steps=25, strong_convexity=P.mu, upper_smoothness=1.0,
               lower_solver=PerturbedLowerSolver(P), progress=False, record_iterates=True, **MAID_OPTIONS)
    return P, x0, res


def test_maid_converges_on_quadratic(maid_run):
    P, x0, res = maid_run
    err0 = float(torch.linalg.vector_norm(x0 - P.x_star))
    err = float(torch.linalg.vector_norm(res.x - P.x_star))
    assert err < 1e-3 * err0, (err, err0)


def test_maid_accepted_steps_satisfy_exact_sufficient_decrease(maid_run):
    """The inexact test bounds Φ from both sides, so every accepted step must decrease the exact
    Φ(x) = F(x, y*(x)) by at least η α ‖z‖²; and the recorded inexact test must hold."""
    P, x0, res = maid_run
    h = res.history
    xs = [x0] + h["x"]
    eta = MAID_OPTIONS["eta"]
    assert sum(h["accepted"]) >= 20
    for k, accepted in enumerate(h["accepted"]):
        decrease = -eta * h["step_size"][k] * h["hypergrad_norm"][k] ** 2
        if accepted:
            assert h["decrease_lhs"][k] <= decrease
            assert float(P.phi(xs[k + 1]) - P.phi(xs[k])) <= decrease + 1e-14, k
        else:
            assert torch.equal(xs[k + 1], xs[k])


def test_maid_accuracies_tighten_only_on_failure(maid_run):
    """ε, δ are multiplied by ν >= 1 after an accepted step and by τ < 1 after each failed line
    search, nothing else: the recorded accuracies follow that recursion exactly."""
    _, _, res = maid_run
    h = res.history
    nu, tau = MAID_OPTIONS["nu"], MAID_OPTIONS["tau"]
    assert h["eps"][0] == pytest.approx(MAID_OPTIONS["eps"] * tau ** h["failures"][0])
    for k in range(1, len(h["eps"])):
        start = h["eps"][k - 1] * (nu if h["accepted"][k - 1] else tau)
        tightenings = h["failures"][k] - (0 if h["accepted"][k] else 1)
        assert h["eps"][k] == pytest.approx(start * tau**tightenings, rel=1e-12)
        assert h["delta"][k] == pytest.approx(h["eps"][k], rel=1e-12)  # same start, same factors
        if h["eps"][k] < h["eps"][k - 1]:
            assert h["failures"][k] > 0 or not h["accepted"][k - 1]
    assert any(f > 0 for f in h["failures"]), "no line search failed: the tightening branch was not exercised"
    assert any(h["eps"][k] > h["eps"][k - 1] for k in range(1, len(h["eps"]))), "accuracies were never loosened"


def test_maid_builtin_lower_solver_reaches_its_accuracy():
    P = QuadraticBilevel(rho=1.0)
    x0, y0 = torch.zeros(P.nx, dtype=DTYPE), torch.zeros(P.ny, dtype=DTYPE)
    res = maid(P.upper, P.lower, x0, y0, steps=3, strong_convexity=P.mu, upper_smoothness=1.0, lower_lr=1 / P.L,
               progress=False, **MAID_OPTIONS)
    eps_next = float(res.state["eps"])
    # the returned y was solved to the accuracy of the last accepted step: ‖y − y*(x)‖ <= ε
    assert res.history["accepted"][-1] == 1.0
    assert float(torch.linalg.vector_norm(res.y - P.y_star(res.x))) <= eps_next / MAID_OPTIONS["nu"]
    assert sum(res.history["lower_iterations"]) > 0
    assert float(P.phi(res.x)) < float(P.phi(x0))


def test_maid_error_bound_keeps_a_descent_direction():
    """With an error bound ω(ε, δ), the accuracies are tightened until ω <= (1 − η)‖z‖."""
    P = QuadraticBilevel(rho=1.0)
    x0, y0 = torch.zeros(P.nx, dtype=DTYPE), torch.zeros(P.ny, dtype=DTYPE)

    def bound(eps, delta, x, y):
        return 50.0 * (eps + delta)

    res = maid(P.upper, P.lower, x0, y0, steps=4, strong_convexity=P.mu, upper_smoothness=1.0,
               lower_solver=PerturbedLowerSolver(P), error_bound=bound, progress=False, **MAID_OPTIONS)
    h = res.history
    for k in range(4):
        assert bound(h["eps"][k], h["delta"][k], None, None) <= (1 - MAID_OPTIONS["eta"]) * h["hypergrad_norm"][k]


# ----------------------------------------------------------------------------------------------
# BSVRB
# ----------------------------------------------------------------------------------------------
from torch.autograd import functional as AF  # noqa: E402

class SmoothBlocks:
    """``m`` non-quadratic blocks (float64) for the hand-run reference: ``x ∈ R²``, ``y_i ∈ R³``,

    ``g_i(x, y) = ½ yᵀA_i y + 0.05 Σ_k y_k⁴ − yᵀ tanh(C_i x)`` (strongly convex in ``y``),
    ``f_i(x, y) = ½‖y − b_i‖² + 0.1 sin(yᵀD_i x) + 0.05‖x‖²`` (with an ``x`` term and a cross term).
    ``upper``/``lower`` are the batched block functions; ``f``/``g`` one block, unbatched.
    """

    def __init__(self, m: int = 4, seed: int = 5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.m, self.nx, self.ny = m, 2, 3
        q, _ = torch.linalg.qr(torch.randn(m, 3, 3, generator=g, dtype=DTYPE))
        self.A = q @ torch.diag_embed(torch.rand(m, 3, generator=g, dtype=DTYPE) + 1.0) @ q.transpose(1, 2)
        self.C = torch.randn(m, 3, 2, generator=g, dtype=DTYPE)
        self.D = torch.randn(m, 3, 2, generator=g, dtype=DTYPE)
        self.b = torch.randn(m, 3, generator=g, dtype=DTYPE)

    def upper(self, x, yb, idx):
        return (0.5 * ((yb - self.b[idx]) ** 2).sum(-1) + 0.1 * torch.sin(torch.einsum("iy,iyx,x->i", yb, self.D[idx], x))
                + 0.05 * (x**2).sum())

    def lower(self, x, yb, idx):
        return (0.5 * torch.einsum("iy,iyz,iz->i", yb, self.A[idx], yb) + 0.05 * (yb**4).sum(-1)
                - (yb * torch.tanh(torch.einsum("iyx,x->iy", self.C[idx], x))).sum(-1))

    def f(self, i, x, y):
        return 0.5 * ((y - self.b[i]) ** 2).sum() + 0.1 * torch.sin(y @ self.D[i] @ x) + 0.05 * (x**2).sum()

    def g(self, i, x, y):
        return 0.5 * y @ self.A[i] @ y + 0.05 * (y**4).sum() - y @ torch.tanh(self.C[i] @ x)

    # derivatives by torch.autograd.functional, one block at a time
    def g_y(self, i, x, y):
        return AF.jacobian(lambda w: self.g(i, x, w), y)

    def g_yy(self, i, x, y):
        return AF.hessian(lambda w: self.g(i, x, w), y)

    def g_xy(self, i, x, y):
        """``∂(∇_y g_i)/∂x``, ``(ny, nx)``: ``∇²_xy g_i v = g_xyᵀ v``."""
        return AF.jacobian(lambda a: AF.jacobian(lambda w: self.g(i, a, w), y, create_graph=True), x)

    def f_x(self, i, x, y):
        return AF.jacobian(lambda a: self.f(i, a, y), x)

    def f_y(self, i, x, y):
        return AF.jacobian(lambda w: self.f(i, x, w), y)


def bsvrb_reference_hvp(P, blocks, x0, y0, *, lr_x, lr_y, lr_v, alpha, gamma, beta, radius):
    """BSVRB^v2 written out block by block with dense derivatives (the recursions of ``main.py``
    at 7ad005f, lines 274-340, with our initialisation: zero estimators, previous point = start)."""
    m = P.m
    x, y, v = x0.clone(), y0.clone(), torch.zeros_like(y0)
    xp, yp, vp = x.clone(), y.clone(), v.clone()
    s, u, z = torch.zeros_like(y), torch.zeros_like(y), torch.zeros_like(x)
    missed = [0] * m
    dcs, bound = [], False
    for S in blocks:
        Gn, Go = torch.zeros_like(x), torch.zeros_like(x)
        y_next, v_next = y.clone(), v.clone()
        for i in S:
            s[i] = (1 - alpha) * s[i] + (alpha + gamma) * P.g_y(i, x, y[i]) - gamma * P.g_y(i, xp, yp[i])
            r_new = P.g_yy(i, x, y[i]) @ v[i] - P.f_y(i, x, y[i])
            r_old = P.g_yy(i, xp, yp[i]) @ vp[i] - P.f_y(i, xp, yp[i])
            u[i] = (1 - alpha) * u[i] + (alpha + gamma) * r_new - gamma * r_old
            Gn += P.f_x(i, x, y[i]) - P.g_xy(i, x, y[i]).T @ v[i]
            Go += P.f_x(i, xp, yp[i]) - P.g_xy(i, xp, yp[i]).T @ vp[i]
            dc = missed[i] + 1
            dcs.append(dc)
            y_next[i] = y[i] - lr_y * dc * s[i]
            w = v[i] - lr_v * dc * u[i]
            if float(w.norm()) > radius:
                w, bound = w * (radius / w.norm()), True
            v_next[i] = w
        missed = [0 if i in S else k + 1 for i, k in enumerate(missed)]
        z = (1 - beta) * (z - Go / len(S)) + Gn / len(S)
        xp, x = x, x - lr_x * z
        yp, y, vp, v = y, y_next, v, v_next
    return dict(x=x, y=y, s=s, u=u, v=v, z=z), dcs, bound


def bsvrb_reference_hessian(P, blocks, x0, y0, *, lr_x, lr_y, alpha, gamma, beta, bound):
    """BSVRB^v1 written out block by block (``main.py`` lines 274-277, 287-304, 311-314, 331-338;
    ``proj_mat`` lines 137-142), ``H`` starting from identities."""
    x, y = x0.clone(), y0.clone()
    H = torch.eye(P.ny, dtype=DTYPE).repeat(P.m, 1, 1)
    xp, yp, Hp = x.clone(), y.clone(), H.clone()
    s, z = torch.zeros_like(y), torch.zeros_like(x)
    rescaled = False
    for S in blocks:
        Gn, Go = torch.zeros_like(x), torch.zeros_like(x)
        H_next = H.clone()
        for i in S:
            s[i] = (1 - alpha) * s[i] + (alpha + gamma) * P.g_y(i, x, y[i]) - gamma * P.g_y(i, xp, yp[i])
            T = (1 - alpha) * H[i] + (alpha + gamma) * P.g_yy(i, x, y[i]) - gamma * P.g_yy(i, xp, yp[i])
            if float(torch.linalg.matrix_norm(T)) < bound:
                T, rescaled = T * (bound / torch.linalg.matrix_norm(T)), True
            H_next[i] = T
            Gn += P.f_x(i, x, y[i]) - P.g_xy(i, x, y[i]).T @ torch.linalg.solve(H[i], P.f_y(i, x, y[i]))
            Go += P.f_x(i, xp, yp[i]) - P.g_xy(i, xp, yp[i]).T @ torch.linalg.solve(Hp[i], P.f_y(i, xp, yp[i]))
        z = (1 - beta) * (z - Go / len(S)) + Gn / len(S)
        xp, x = x, x - lr_x * z
        yp, y = y, y - lr_y * s
        Hp, H = H, H_next
    return dict(x=x, y=y, s=s, z=z, hessian=H), rescaled


HAND = dict(lr_x=0.3, lr_y=0.2, alpha=0.7, gamma=0.6, beta=0.4)


def test_bsvrb_hvp_matches_hand_run_recursion():
    """Six iterations of BSVRB^v2 (m = 4, I = 2) against the recursion written out with dense
    autograd.functional derivatives: x, y, s, u, v, z to 1e-12, the catch-up factors dc (a block
    missed for two iterations or more is caught up) and the v projection (R binds)."""
    P = SmoothBlocks()
    x0 = torch.tensor([0.4, -0.3], dtype=DTYPE)
    y0 = torch.randn(P.m, P.ny, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    res = bsvrb(P.upper, P.lower, x0, y0, steps=6, blocks_per_step=2, lr_v=0.25, v_radius=0.3,
                generator=torch.Generator().manual_seed(2), progress=False, **HAND)
    want, dcs, bound = bsvrb_reference_hvp(P, res.history["blocks"], x0, y0, lr_v=0.25, radius=0.3, **HAND)
    assert [dc for step in res.history["catch_up"] for dc in step] == dcs
    assert max(dcs) >= 3 and bound  # the catch-up and the projection are exercised
    got = dict(x=res.x, y=res.y, **{k: res.state[k] for k in ("s", "u", "v", "z")})
    for key in want:
        assert_close(got[key], want[key], atol=1e-12, rtol=1e-12)
    missed = res.state["delay"].tolist()
    for i in range(P.m):  # iterations since the last visit
        last = max(t for t, S in enumerate(res.history["blocks"]) if i in S)
        assert missed[i] == 5 - last


def test_bsvrb_default_gamma_is_msvr_theoretical_value():
    """gamma=None with I < m blocks per iteration: MSVR's γ = (m − I)/(I(1 − α)) + (1 − α), here
    (4 − 2)/(2 · 0.3) + 0.3, in the same written-out recursion."""
    P = SmoothBlocks()
    x0 = torch.tensor([0.4, -0.3], dtype=DTYPE)
    y0 = torch.randn(P.m, P.ny, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    kw = dict(HAND, gamma=None, lr_x=0.05, lr_y=0.05)
    res = bsvrb(P.upper, P.lower, x0, y0, steps=4, blocks_per_step=2, lr_v=0.05, v_radius=10.0,
                generator=torch.Generator().manual_seed(3), progress=False, **kw)
    gamma = (4 - 2) / (2 * (1 - 0.7)) + (1 - 0.7)
    want, _, _ = bsvrb_reference_hvp(P, res.history["blocks"], x0, y0, lr_v=0.05, radius=10.0,
                                     **dict(kw, gamma=gamma))
    got = dict(x=res.x, y=res.y, **{k: res.state[k] for k in ("s", "u", "v", "z")})
    for key in want:
        assert_close(got[key], want[key], atol=1e-12, rtol=1e-12)


def test_bsvrb_hessian_matches_hand_run_recursion():
    """Five iterations of BSVRB^v1 (tracked dense Hessians, every y_j moved each iteration) against
    the written-out recursion, with a bound b that rescales the tracked H."""
    P = SmoothBlocks()
    x0 = torch.tensor([0.4, -0.3], dtype=DTYPE)
    y0 = torch.randn(P.m, P.ny, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    res = bsvrb(P.upper, P.lower, x0, y0, steps=5, blocks_per_step=2, variant="hessian", hessian_bound=3.0,
                generator=torch.Generator().manual_seed(2), progress=False, **HAND)
    want, rescaled = bsvrb_reference_hessian(P, res.history["blocks"], x0, y0, bound=3.0, **HAND)
    assert rescaled
    got = dict(x=res.x, y=res.y, s=res.state["s"], z=res.state["z"], hessian=res.state["hessian"])
    for key in want:
        assert_close(got[key], want[key], atol=1e-12, rtol=1e-12)


def test_bsvrb_all_blocks_estimators_follow_storm_error_recursion():
    """With I = m, exact oracles and γ = 1 − α (MSVR's γ at I = m, also what gamma=None gives),
    each tracked quantity's error contracts by exactly (1 − α) (s, u) or (1 − β) (z) per
    iteration; from zero estimators and the previous point equal to the start,
    ``s_t = q_t − (1−α)^{t+1} q_0`` with ``q_t = ∇_y g(x_t, y_t)``, the same for
    ``u`` (target ``∇²_yy g v − ∇_y f``) and ``z_t = Ḡ_t − (1−β)^{t+1} Ḡ_0``.  Closed forms of
    the quadratic: q_i = A_i y_i − C_i x − c_i, r_i = A_i v_i − (y_i − b_i), G_i = ρx + C_iᵀv_i."""
    P = MultiBlockQuadratic(m=5)
    x0 = torch.randn(P.nx, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    y0 = torch.zeros(P.m, P.ny, dtype=DTYPE)
    v0 = 0.1 * torch.ones(P.m, P.ny, dtype=DTYPE)
    alpha, beta = 0.6, 0.3
    kw = dict(blocks_per_step=P.m, lr_x=0.1, lr_y=0.2, alpha=alpha, beta=beta, v0=v0, progress=False)

    def targets(x, y, v):
        q = torch.einsum("iyz,iz->iy", P.A, y) - torch.einsum("iyx,x->iy", P.C, x) - P.c
        r = torch.einsum("iyz,iz->iy", P.A, v) - (y - P.b)
        G = P.rho * x + torch.einsum("iyx,iy->x", P.C, v) / P.m
        return q, r, G

    q0, r0, G0 = targets(x0, y0, v0)
    for T in (1, 2, 4):
        start = bsvrb(P.upper, P.lower, x0, y0, steps=T - 1, gamma=1 - alpha, **kw) if T > 1 else None
        x, y, v = (start.x, start.y, start.state["v"]) if start else (x0, y0, v0)
        res = bsvrb(P.upper, P.lower, x0, y0, steps=T, gamma=None, **kw)
        q, r, G = targets(x, y, v)
        assert_close(res.state["s"], q - (1 - alpha) ** T * q0, atol=1e-12)
        assert_close(res.state["u"], r - (1 - alpha) ** T * r0, atol=1e-12)
        assert_close(res.state["z"], G - (1 - beta) ** T * G0, atol=1e-12)
        assert res.history["catch_up"][-1] == [1] * P.m


def test_bsvrb_v_stays_in_the_ball():
    """‖v_i‖ <= R after every iteration (the projection binds with R = 0.2 on the quadratic)."""
    P = MultiBlockQuadratic(m=6)
    x0, y0 = torch.zeros(P.nx, dtype=DTYPE), torch.zeros(P.m, P.ny, dtype=DTYPE)
    norms = []
    for steps in range(1, 9):
        res = bsvrb(P.upper, P.lower, x0, y0, steps=steps, blocks_per_step=3, lr_x=0.05, lr_y=0.1, v_radius=0.2,
                    generator=torch.Generator().manual_seed(0), progress=False)
        norms.append(torch.linalg.vector_norm(res.state["v"], dim=1))
    norms = torch.stack(norms)
    assert float(norms.max()) <= 0.2 * (1 + 1e-12)
    assert float(norms.max()) >= 0.2 * (1 - 1e-12)  # it binds


def shared_optimum_quadratic() -> MultiBlockQuadratic:
    """The multi-block quadratic (m = 8) with ``b_i`` chosen so that every block's own ``Φ_i`` is
    minimal at the same ``x*`` (``M_iᵀ(M_i x* + m0_i − b_i) + ρx* = 0``).  The block-sampling
    noise of ``Ḡ`` then vanishes at the solution, so the constant-parameter method converges to
    ``x*`` itself; with the original ``b_i`` it settles in a neighbourhood of ``x*`` whose size
    scales with ``η`` and ``β`` (the STORM estimator ``z`` averages sampled blocks and keeps a
    ``β``-weighted share of their spread), as for any constant-step method sampling blocks."""
    P = MultiBlockQuadratic(m=8)
    MtM = torch.einsum("iyx,iyz->ixz", P.M, P.M)
    w = torch.einsum("iyx,ix->iy", P.M, torch.linalg.solve(MtM, (P.rho * P.x_star).expand(P.m, -1)))
    P.b = torch.einsum("iyx,x->iy", P.M, P.x_star) + P.m0 + w
    assert float(torch.linalg.vector_norm(P.grad_phi(P.x_star))) < 1e-12
    return P


@pytest.fixture(scope="module")
def bsvrb_run():
    """BSVRB^v2 with I = 4 of m = 8 blocks, the code's α = 0.9, γ = 1, β = 0.9 (the defaults)."""
    P = shared_optimum_quadratic()
    x0, y0 = torch.zeros(P.nx, dtype=DTYPE), torch.zeros(P.m, P.ny, dtype=DTYPE)
    res = bsvrb(P.upper, P.lower, x0, y0, steps=500, blocks_per_step=4, lr_x=0.04, lr_y=0.2,
                generator=torch.Generator().manual_seed(0), progress=False, record_iterates=True)
    return P, x0, res


def test_bsvrb_multiblock_quadratic_converges(bsvrb_run):
    P, x0, res = bsvrb_run
    err = float(torch.linalg.vector_norm(res.x - P.x_star))
    assert err < 1e-6 * float(torch.linalg.vector_norm(x0 - P.x_star)), err
    assert_close(res.y, P.y_star(res.x), atol=1e-6)


def test_bsvrb_hessian_variant_converges():
    """BSVRB^v1 (tracked Hessians, every y_j moved each iteration) on the same problem: the
    tracked H_i reach the A_i = ∇²_yy g_i and x reaches x*."""
    P = shared_optimum_quadratic()
    x0, y0 = torch.zeros(P.nx, dtype=DTYPE), torch.zeros(P.m, P.ny, dtype=DTYPE)
    res = bsvrb(P.upper, P.lower, x0, y0, steps=400, blocks_per_step=4, variant="hessian", lr_x=0.04, lr_y=0.1,
                generator=torch.Generator().manual_seed(0), progress=False)
    err = float(torch.linalg.vector_norm(res.x - P.x_star))
    assert err < 1e-5 * float(torch.linalg.vector_norm(x0 - P.x_star)), err
    assert_close(res.state["hessian"], P.A, atol=1e-10)


def test_bsvrb_hypergradient_tracking_error_shrinks(bsvrb_run):
    """‖z_t − ∇Φ(x_t)‖ (∇Φ in closed form) falls by orders of magnitude along the run."""
    P, x0, res = bsvrb_run
    xs = [x0] + res.history["x"][:-1]
    err = [float(torch.linalg.vector_norm(z - P.grad_phi(x))) for z, x in zip(res.history["estimate"], xs)]
    early, late = max(err[:10]), max(err[-10:])
    assert late < 1e-5 * early, (early, late)


def test_bsvrb_samples_blocks_uniformly(bsvrb_run):
    """Draws of I = 4 distinct blocks of 8 per iteration: counts within 4 standard errors of n/8."""
    P, _, res = bsvrb_run
    draws = [i for blocks in res.history["blocks"] for i in blocks]
    assert all(len(set(b)) == len(b) == 4 for b in res.history["blocks"])
    counts = torch.bincount(torch.tensor(draws), minlength=P.m).to(DTYPE)
    n, p = len(draws), 1 / P.m
    se = math.sqrt(n * p * (1 - p))
    assert float((counts - n * p).abs().max()) < 4 * se, counts


def test_bsvrb_reshuffle_visits_every_block_once_per_pass():
    """``sampling="reshuffle"`` (the authors' code): each pass of ⌊m/I⌋ = 3 iterations draws 9
    distinct blocks of the m = 10 (a fresh permutation per pass)."""
    P = MultiBlockQuadratic(m=10)
    x0, y0 = torch.zeros(P.nx, dtype=DTYPE), torch.zeros(P.m, P.ny, dtype=DTYPE)
    res = bsvrb(P.upper, P.lower, x0, y0, steps=12, blocks_per_step=3, lr_x=0.01, lr_y=0.05, sampling="reshuffle",
                generator=torch.Generator().manual_seed(0), progress=False)
    blocks = res.history["blocks"]
    for k in range(4):
        drawn = [i for b in blocks[3 * k:3 * k + 3] for i in b]
        assert len(drawn) == len(set(drawn)) == 9


def test_msvr_update_matches_its_formula():
    g = torch.Generator().manual_seed(3)
    m, alpha, gamma = 6, 0.3, 1.7
    h = torch.randn(m, 2, generator=g, dtype=DTYPE)
    idx = torch.tensor([4, 1])
    new, old = torch.randn(2, 2, generator=g, dtype=DTYPE), torch.randn(2, 2, generator=g, dtype=DTYPE)
    out = msvr_update(h, idx, new, old, alpha=alpha, gamma=gamma)
    want = h.clone()
    for j, i in enumerate(idx.tolist()):
        want[i] = (1 - alpha) * h[i] + alpha * new[j] + gamma * (new[j] - old[j])
    assert_close(out, want, atol=1e-15, rtol=1e-15)
    assert not torch.equal(out, h) and torch.equal(h[0], out[0])
    with pytest.raises(TypeError):  # alpha and gamma are keyword-only (the old signature was (…, gamma, m))
        msvr_update(h, idx, new, old, 0.3, 6)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _quad_call(solver, upper_fn=None, **kw):
    P = QuadraticBilevel()
    x0, y0 = torch.zeros(P.nx, dtype=DTYPE), torch.zeros(P.ny, dtype=DTYPE)
    args = dict(x0=x0, y0=y0, steps=1, progress=False)
    if solver is maid:
        args.update(strong_convexity=1.0, upper_smoothness=1.0)
    if solver is lvhba:
        args.update(constraint_fn=lambda x, y: y.sum().reshape(1))
    args.update(kw)
    return solver(P.upper if upper_fn is None else upper_fn, P.lower, **args)


SOLVERS = [lvhba, meha, borep, maid]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.__name__)
def test_bad_common_arguments(solver):
    with pytest.raises(ValueError, match="steps"):
        _quad_call(solver, steps=0)
    with pytest.raises(TypeError, match="steps"):
        _quad_call(solver, steps=2.5)
    with pytest.raises(TypeError, match="x0"):
        _quad_call(solver, x0=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="x0 .* and y0"):
        _quad_call(solver, x0=torch.zeros(3, dtype=torch.float32))
    with pytest.raises(ValueError, match="y0"):
        _quad_call(solver, y0=torch.full((5,), math.nan, dtype=DTYPE))
    with pytest.raises(TypeError, match="upper_fn"):
        _quad_call(solver, upper_fn="not callable")


def test_bad_solver_specific_arguments():
    with pytest.raises(TypeError, match="constraint_fn"):
        _quad_call(lvhba, constraint_fn=None)
    with pytest.raises(ValueError, match="z0"):
        _quad_call(lvhba, z0=torch.full((1,), -1.0, dtype=DTYPE))
    with pytest.raises(ValueError, match="lower_nonsmooth and prox"):
        _quad_call(meha, lower_nonsmooth=lambda x, y: y.abs().sum())
    with pytest.raises(ValueError, match="linear_solver"):
        _quad_call(borep, linear_solver="lu")
    with pytest.raises(ValueError, match="momentum"):
        _quad_call(borep, momentum=1.0)
    with pytest.raises(ValueError, match="strong_convexity"):
        _quad_call(maid, strong_convexity=0.0)
    with pytest.raises(ValueError, match="nu"):
        _quad_call(maid, nu=0.5)
    with pytest.raises(ValueError, match="scalar"):  # an upper objective returning a vector
        meha(lambda x, y: x * y, lambda x, y: (y**2).sum(), torch.zeros(2, dtype=DTYPE), torch.zeros(2, dtype=DTYPE),
             steps=1, progress=False)
    P = MultiBlockQuadratic(m=3)
    x0, y0 = torch.zeros(P.nx, dtype=DTYPE), torch.zeros(3, P.ny, dtype=DTYPE)

    def call(upper=P.upper, **kw):
        return bsvrb(upper, P.lower, x0, y0, **{"steps": 1, "progress": False, **kw})

    with pytest.raises(ValueError, match="blocks_per_step must be <= the number of blocks m = 3"):
        call(blocks_per_step=4)
    with pytest.raises(ValueError, match="upper_fn.*one value per block"):
        call(upper=lambda x, yb, idx: yb.sum())
    with pytest.raises(ValueError, match="upper_fn.*one value per block"):  # (I, 1) instead of (I,)
        call(upper=lambda x, yb, idx: P.upper(x, yb, idx)[:, None])
    for name in ("lr_x", "lr_y", "lr_v"):
        for bad in (0.0, -0.1):
            with pytest.raises(ValueError, match=rf"{name} must be .*\(0.0, inf\]"):
                call(**{name: bad})
    with pytest.raises(ValueError, match="lr_x"):
        call(lr_x=lambda t: 0.0)
    for name in ("alpha", "beta"):
        for bad in (0.0, 1.5, -0.2):
            with pytest.raises(ValueError, match=rf"{name} must be .*\(0.0, 1.0\]"):
                call(**{name: bad})
    with pytest.raises(ValueError, match="gamma must be"):
        call(gamma=-1.0)
    with pytest.raises(ValueError, match="alpha < 1"):
        call(gamma=None, alpha=1.0, blocks_per_step=2)
    with pytest.raises(ValueError, match="v_radius"):
        call(v_radius=0.0)
    with pytest.raises(ValueError, match="hessian_bound"):
        call(variant="hessian", hessian_bound=-1.0)
    with pytest.raises(ValueError, match="variant must be one of"):
        call(variant="newton")
    with pytest.raises(ValueError, match="sampling must be one of"):
        call(sampling="cyclic")
    with pytest.raises(ValueError, match="v0 must have shape"):
        call(v0=torch.zeros(2, P.ny, dtype=DTYPE))
    with pytest.raises(ValueError, match="hessian0 must have shape"):
        call(variant="hessian", hessian0=torch.zeros(3, 2, 2, dtype=DTYPE))
    with pytest.raises(ValueError, match="v0 is used by variant='hvp' only"):
        call(variant="hessian", v0=torch.zeros_like(y0))
    with pytest.raises(TypeError, match="generator"):
        call(generator=0)


def test_divergence_is_reported_not_returned_as_nan():
    P = MEHAToyConvex(n=3)
    with pytest.raises(FloatingPointError, match="reduce the step sizes"):
        meha(P.upper, P.lower, torch.zeros(3, dtype=DTYPE), torch.zeros(6, dtype=DTYPE), steps=2000,
             lr_x=50.0, lr_y=50.0, lr_theta=50.0, progress=False)
