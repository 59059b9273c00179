"""hypergradient(): every method against closed forms (strongly convex quadratics, ridge), an
independent finite difference of the bilevel value (logistic regression), and the error of each
approximate method behaving as its theory says."""

from __future__ import annotations

import math

import pytest
import torch

from gk_testing import DTYPE, one_thread, randn, with_spectrum  # noqa: F401  (one_thread: autouse fixture)
from gradkit.bilevel import gd_step, hypergradient, unrolled_hypergradient


# --------------------------------------------------------------------------- quadratic, structured
class Quadratic:
    """G(λ, w) = ½ wᵀAw + ½ Σ exp(p) w² − wᵀ(B s + c),  F(λ, w) = ½||Dw − t||² + 0.1||s||² + 0.05 Σ p,
    with λ = {"p": (n,), "s": (m,)} and w split into a tuple of two pieces."""

    def __init__(self, n: int = 7, m: int = 3, seed: int = 0) -> None:
        self.n, self.m = n, m
        self.A = with_spectrum(torch.linspace(1.0, 6.0, n), seed=seed)
        self.B, self.c = randn(n, m, seed=seed + 1), randn(n, seed=seed + 2)
        self.D, self.t = randn(5, n, seed=seed + 3), randn(5, seed=seed + 4)
        self.hparams = {"p": 0.3 * randn(n, seed=seed + 5), "s": randn(m, seed=seed + 6)}

    def split(self, w):
        return (w[:4], w[4:])

    def inner(self, lam, w):
        w = torch.cat(w)
        return 0.5 * w @ self.A @ w + 0.5 * (torch.exp(lam["p"]) * w**2).sum() - w @ (self.B @ lam["s"] + self.c)

    def outer(self, lam, w):
        w = torch.cat(w)
        return 0.5 * ((self.D @ w - self.t) ** 2).sum() + 0.1 * (lam["s"] ** 2).sum() + 0.05 * lam["p"].sum()

    def H(self):
        return self.A + torch.diag(torch.exp(self.hparams["p"]))

    def solution(self):
        lam = self.hparams
        return torch.linalg.solve(self.H(), self.B @ lam["s"] + self.c)

    def closed_form(self):
        """dw*/dp = −H⁻¹ diag(e^p ⊙ w*), dw*/ds = H⁻¹B, chained with ∇_wF and the direct terms."""
        w, lam = self.solution(), self.hparams
        u = torch.linalg.solve(self.H(), self.D.T @ (self.D @ w - self.t))  # H⁻¹ ∇_wF
        return {"p": 0.05 - torch.exp(lam["p"]) * w * u, "s": 0.2 * lam["s"] + self.B.T @ u}


@pytest.mark.parametrize(
    "method, options, tol",
    [
        ("exact", {}, 1e-11),
        ("cg", {"tol": 1e-13}, 1e-10),
        ("neumann", {"terms": 150}, 1e-10),
        ("finite_difference", {"tol": 1e-13}, 1e-8),  # exact on quadratics up to rounding / ε
    ],
)
def test_methods_match_closed_form_on_structured_quadratic(method, options, tol):
    q = Quadratic()
    w = q.split(q.solution())
    out = hypergradient(q.outer, q.inner, q.hparams, w, method=method, **options)
    ref = q.closed_form()
    assert isinstance(out, dict) and list(out) == ["p", "s"]
    for k in ref:
        assert out[k].shape == ref[k].shape and out[k].dtype == DTYPE
        torch.testing.assert_close(out[k], ref[k], rtol=tol, atol=tol)


def test_list_params_and_unused_hparam_give_zeros():
    q = Quadratic()
    w = list(q.split(q.solution()))
    lam = (q.hparams["p"], q.hparams["s"], torch.ones(2, dtype=DTYPE))  # the third one is unused

    def inner(l, w):
        return q.inner({"p": l[0], "s": l[1]}, w)

    def outer(l, w):
        return q.outer({"p": l[0], "s": l[1]}, w)

    out = hypergradient(outer, inner, lam, w, method="cg", tol=1e-13)
    ref = q.closed_form()
    assert isinstance(out, tuple) and len(out) == 3
    torch.testing.assert_close(out[0], ref["p"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[1], ref["s"], rtol=1e-10, atol=1e-10)
    assert torch.equal(out[2], torch.zeros(2, dtype=DTYPE))


def test_namedtuple_hparams_come_back_as_the_same_namedtuple():
    """A namedtuple is a tuple: accepted, and the hypergradient has its type and fields."""
    from collections import namedtuple

    HP = namedtuple("HP", ["p", "s"])
    q = Quadratic()
    w = list(q.split(q.solution()))
    lam = HP(q.hparams["p"], q.hparams["s"])

    def inner(l, w):
        return q.inner({"p": l.p, "s": l.s}, w)

    def outer(l, w):
        return q.outer({"p": l.p, "s": l.s}, w)

    out = hypergradient(outer, inner, lam, w, method="cg", tol=1e-13)
    ref = q.closed_form()
    assert type(out) is HP
    torch.testing.assert_close(out.p, ref["p"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.s, ref["s"], rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- ridge, closed form
def ridge(n=40, d=4, lam=0.7, seed=0):
    X, y = randn(n, d, seed=seed), randn(n, seed=seed + 1)
    A = X.T @ X + lam * torch.eye(d, dtype=DTYPE)
    w = torch.linalg.solve(A, X.T @ y)
    inner = lambda l, w: 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * l * (w**2).sum()
    return inner, torch.tensor(lam, dtype=DTYPE), w, A


@pytest.mark.parametrize(
    "method, options",
    [("exact", {}), ("cg", {"tol": 1e-14}), ("neumann", {"terms": 120}), ("finite_difference", {"tol": 1e-14})],
)
def test_ridge_jacobian_closed_form(method, options):
    """dw*/dλ = −(XᵀX + λI)⁻¹ w*, column k read off with the outer objective F = w_k."""
    inner, lam, w, A = ridge()
    ref = -torch.linalg.solve(A, w)
    got = torch.stack([
        hypergradient(lambda l, p, k=k: p[k], inner, lam, w, method=method, **options) for k in range(w.numel())
    ])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- error vs theory
class PureQuadratic:
    """G = ½ wᵀAw − wᵀBλ with spec(A) = {1, 2, 4, 6, 10}; F = ½||w − t||²."""

    def __init__(self):
        self.A = with_spectrum(torch.tensor([1.0, 2.0, 4.0, 6.0, 10.0]), seed=3)
        self.B, self.t = randn(5, 2, seed=4), randn(5, seed=5)
        self.lam = randn(2, seed=6)
        self.w = torch.linalg.solve(self.A, self.B @ self.lam)
        self.inner = lambda l, w: 0.5 * w @ self.A @ w - w @ (self.B @ l)
        self.outer = lambda l, w: 0.5 * ((w - self.t) ** 2).sum()
        self.g = self.w - self.t  # ∇_wF
        self.exact = self.B.T @ torch.linalg.solve(self.A, self.g)  # −Bᵀ... with B_G = −B


def test_neumann_error_shrinks_geometrically():
    """Error = Bᵀ A⁻¹ (I − αA)^i ∇_wF: bounded by ||B|| ||A⁻¹|| ρ^i ||∇_wF|| with
    ρ = 1 − α μ_min, and the ratio of successive errors tends to ρ."""
    q = PureQuadratic()
    alpha = 0.1  # = 1 / μ_max, so ρ = 1 − 0.1 = 0.9 and the next factor is 0.8
    rho = 0.9
    terms = (1, 2, 5, 10, 20, 40, 59, 60)
    errors = []
    for i in terms:
        out = hypergradient(q.outer, q.inner, q.lam, q.w, method="neumann", terms=i, alpha=alpha)
        errors.append(float((out - q.exact).norm()))
    bound = float(torch.linalg.matrix_norm(q.B, 2)) * 1.0 * float(q.g.norm())  # ||A⁻¹|| = 1
    assert all(e <= bound * rho**i * (1 + 1e-9) for i, e in zip(terms, errors))
    assert all(b < a for a, b in zip(errors, errors[1:]))
    assert abs(errors[-1] / errors[-2] - rho) < 5e-3


def test_neumann_default_alpha_uses_top_eigenvalue():
    q = PureQuadratic()
    _, info = hypergradient(q.outer, q.inner, q.lam, q.w, method="neumann", terms=5, return_info=True)
    assert abs(info.alpha - 0.1) < 1e-3 * 0.1  # 1 / μ_max = 1/10 (power iteration, tol 1e-3)
    assert info.iterations == 5 and info.converged


@pytest.mark.parametrize("tol", [1e-2, 1e-5, 1e-10])
def test_cg_error_within_tolerance_bound(tol):
    """||Av − ∇_wF|| <= tol ||∇_wF|| and then the hypergradient error <= ||B|| ||A⁻¹|| tol ||∇_wF||."""
    q = PureQuadratic()
    out, info = hypergradient(q.outer, q.inner, q.lam, q.w, method="cg", tol=tol, return_info=True)
    g_norm = float(q.g.norm())
    assert info.converged and info.residual <= tol * g_norm
    assert 1 <= info.iterations <= 10
    assert float((out - q.exact).norm()) <= float(torch.linalg.matrix_norm(q.B, 2)) * tol * g_norm
    assert info.inner_grad_norm < 1e-12


def test_damping_solves_shifted_system():
    q = PureQuadratic()
    ref = q.B.T @ torch.linalg.solve(q.A + 0.5 * torch.eye(5, dtype=DTYPE), q.g)
    for method, opts in [("exact", {}), ("cg", {"tol": 1e-13}), ("neumann", {"terms": 300, "alpha": 0.09})]:
        out = hypergradient(q.outer, q.inner, q.lam, q.w, method=method, damping=0.5, **opts)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- logistic (non-quadratic)
class Logistic:
    """ℓ2-logistic regression with per-feature penalties λ = exp(h), params (w, b)."""

    def __init__(self, n=60, d=4, seed=0):
        self.X, self.Xv = randn(n, d, seed=seed), randn(30, d, seed=seed + 1)
        wt = randn(d, seed=seed + 2)
        self.y = (self.X @ wt + 0.5 * randn(n, seed=seed + 3) > 0).to(DTYPE)
        self.yv = (self.Xv @ wt > 0).to(DTYPE)
        self.h = 0.5 * randn(d, seed=seed + 4) - 1.0

    def loss(self, w, X, y):
        return torch.nn.functional.binary_cross_entropy_with_logits(X @ w[0] + w[1], y)

    def inner(self, h, w):
        return self.loss(w, self.X, self.y) + 0.5 * (torch.exp(h) * w[0] ** 2).sum()

    def outer(self, h, w):
        return self.loss(w, self.Xv, self.yv)

    def solve(self, h):
        """Newton's method to machine precision (independent of gradkit)."""
        x = torch.zeros(self.X.shape[1] + 1, dtype=DTYPE)
        f = lambda x: self.inner(h, (x[:-1], x[-1]))
        for _ in range(30):
            g = torch.autograd.functional.jacobian(f, x)
            x = x - torch.linalg.solve(torch.autograd.functional.hessian(f, x), g)
        return (x[:-1], x[-1])

    def value(self, h):
        return self.outer(h, self.solve(h))


def test_exact_matches_finite_difference_of_bilevel_value():
    """Independent reference: central differences of φ(h) = F(h, w*(h)) with Newton solves."""
    p = Logistic()
    w = p.solve(p.h)
    got = hypergradient(p.outer, p.inner, p.h, w, method="exact")
    step = 1e-5
    ref = torch.stack([
        (p.value(p.h + step * e) - p.value(p.h - step * e)) / (2 * step) for e in torch.eye(4, dtype=DTYPE)
    ])
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-9)


def test_finite_difference_error_is_second_order_in_epsilon():
    p = Logistic()
    w = p.solve(p.h)
    exact = hypergradient(p.outer, p.inner, p.h, w, method="exact")
    errors = [
        float((hypergradient(p.outer, p.inner, p.h, w, method="finite_difference", epsilon=eps, tol=1e-7)
               - exact).norm())
        for eps in (0.4, 0.2, 0.1)
    ]
    assert errors[0] > 1e-6  # non-quadratic: a real truncation error to measure
    for a, b in zip(errors, errors[1:]):
        assert 3.5 < a / b < 4.5  # halving ε divides the error by 4


def test_finite_difference_identity_inverse_is_one_neumann_term():
    """DARTS' H⁻¹ ≈ ξI at w* is the 1-term Neumann series with α = ξ (up to O(ε²))."""
    p = Logistic()
    w = p.solve(p.h)
    darts = hypergradient(p.outer, p.inner, p.h, w, method="finite_difference", inverse="identity", xi=0.3,
                          epsilon=1e-4)
    one_term = hypergradient(p.outer, p.inner, p.h, w, method="neumann", terms=1, alpha=0.3)
    torch.testing.assert_close(darts, one_term, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("terms", [1, 4, 15])
def test_neumann_equals_unrolled_gd_from_solution(terms):
    """Lorraine et al. (2020), Theorem 1: i Neumann terms = i unrolled GD steps of step α from w*."""
    p = Logistic()
    w = p.solve(p.h)
    alpha = 0.7
    neu = hypergradient(p.outer, p.inner, p.h, w, method="neumann", terms=terms, alpha=alpha)
    unr = unrolled_hypergradient(p.outer, gd_step(p.inner, alpha), p.h, w, terms)
    torch.testing.assert_close(neu, unr, rtol=1e-12, atol=1e-15)
    exact = hypergradient(p.outer, p.inner, p.h, w, method="exact")
    assert float((neu - exact).norm()) > 1e-8  # truncated: the identity is not a trivial equality


class _SquareOnce(torch.autograd.Function):
    """x ↦ x² with a backward that cannot be differentiated again."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_finite_difference_needs_first_order_autograd_only():
    inner_fn, lam, w, A = ridge()
    X_inner = inner_fn  # ridge with the penalty through a once-differentiable square

    def inner(l, p):
        return X_inner(torch.zeros((), dtype=DTYPE), p) + 0.5 * l * _SquareOnce.apply(p).sum()

    outer = lambda l, p: p.sum()
    ref = -torch.linalg.solve(A, w).sum()
    got = hypergradient(outer, inner, lam, w, method="finite_difference", tol=1e-14)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError):
        hypergradient(outer, inner, lam, w, method="cg")


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_named():
    inner, lam, w, _ = ridge()
    outer = lambda l, p: p.sum()
    with pytest.raises(ValueError, match="method must be one of"):
        hypergradient(outer, inner, lam, w, method="newton")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['terms'\]"):
        hypergradient(outer, inner, lam, w, method="cg", terms=3)
    with pytest.raises(ValueError, match=r"outer_fn\(hparams, params\) must return a scalar.*\(4,\)"):
        hypergradient(lambda l, p: p, inner, lam, w)
    with pytest.raises(ValueError, match=r"inner_fn\(hparams, params\) must return a scalar.*\(4,\)"):
        hypergradient(outer, lambda l, p: p**2, lam, w)
    with pytest.raises(TypeError, match=r"hparams\[1\] is a int"):
        hypergradient(outer, inner, (lam, 3), w)
    with pytest.raises(TypeError, match=r"hparams\['a'\] has dtype torch.int64"):
        hypergradient(outer, inner, {"a": torch.ones(2, dtype=torch.int64)}, w)
    with pytest.raises(TypeError, match=r"hparams \(torch.float32 on cpu\) and params \(torch.float64"):
        hypergradient(outer, inner, lam.float(), w)
    with pytest.raises(TypeError, match="params must be a floating-point tensor"):
        hypergradient(outer, inner, lam, "w")
    with pytest.raises(ValueError, match="terms must be an integer >= 1"):
        hypergradient(outer, inner, lam, w, method="neumann", terms=0)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        hypergradient(outer, inner, lam, w, method="neumann", alpha=-1.0)
    with pytest.raises(ValueError, match="inverse must be 'cg' or 'identity'"):
        hypergradient(outer, inner, lam, w, method="finite_difference", inverse="lu")
    with pytest.raises(TypeError, match="outer_fn must be callable"):
        hypergradient(None, inner, lam, w)


def test_singular_or_indefinite_inner_hessian():
    lam, w = torch.tensor(1.0, dtype=DTYPE), torch.zeros(3, dtype=DTYPE)
    outer = lambda l, p: (p - 1).pow(2).sum()
    flat = lambda l, p: l * p[0] ** 2  # zero curvature along p[1], p[2]
    with pytest.raises(ValueError, match="singular"):
        hypergradient(outer, flat, lam, w, method="exact")
    saddle = lambda l, p: l * (p[0] ** 2 - p[1] ** 2 + p[2] ** 2)
    along_negative = lambda l, p: (p[1] - 1) ** 2  # ∇_wF along the negative curvature
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        _, info = hypergradient(along_negative, saddle, lam, w, method="cg", return_info=True)
    assert not info.converged and math.isfinite(info.residual)
