"""Tests of gradkit.linalg.solvers against dense float64 solves and SciPy."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

from gradkit.linalg import (
    DenseOperator,
    IdentityOperator,
    LinearOperator,
    SolveResult,
    cg,
    gmres,
    minres,
    neumann,
    normal_cg,
)

F64 = torch.float64
N = 50


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]


def _sym(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    Q = _orthogonal(len(eigenvalues), seed)
    A = (Q * eigenvalues) @ Q.T
    return (A + A.T) / 2


def spd(n: int = N, cond: float = 10.0, seed: int = 0) -> torch.Tensor:
    return _sym(torch.logspace(0, np.log10(cond), n, dtype=F64), seed)


def indefinite(n: int = N, seed: int = 1) -> torch.Tensor:
    ev = torch.linspace(1.0, 20.0, n, dtype=F64)
    ev[::2] *= -1  # half negative, |lambda| >= 1
    return _sym(ev, seed)


def nonsymmetric(n: int = N, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.eye(n, dtype=F64) + torch.randn(n, n, generator=g, dtype=F64) / n**0.5


def rhs(*shape: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def eye(n: int = N) -> torch.Tensor:
    return torch.eye(n, dtype=F64)


def check(res: SolveResult, A: torch.Tensor, b: torch.Tensor, damping: float = 0.0, tol: float = 1e-8) -> None:
    """The solver's answer equals the dense solve and its reported residual is the true one."""
    Ad = A + damping * eye(A.shape[0])
    expected = torch.linalg.solve(Ad, b)
    assert res.x.shape == b.shape and res.x.dtype == F64
    assert res.converged
    assert torch.allclose(res.x, expected, rtol=0, atol=tol * float(expected.abs().max())), (
        float((res.x - expected).abs().max())
    )
    true_res = torch.linalg.vector_norm(b - Ad @ res.x, dim=0)
    assert res.residual_norm.shape == true_res.shape
    assert torch.allclose(res.residual_norm, true_res, rtol=1e-6, atol=1e-14)
    assert bool((res.residual_norm <= 1e-10 * torch.linalg.vector_norm(b, dim=0) + 1e-14).all())


VARIANTS = ["plain", "block", "damping", "x0", "operator", "callable"]


def _run(solver, A: torch.Tensor, variant: str, **kw):
    b = rhs(N, 4) if variant == "block" else rhs(N)
    damping = 0.7 if variant == "damping" else 0.0
    if variant == "x0":
        kw["x0"] = torch.linalg.solve(A, b) + 0.1 * rhs(N, seed=9)
    if variant == "operator":
        A_in = DenseOperator(A, symmetric=solver in (cg, minres))
    elif variant == "callable":
        A_in = lambda v: A @ v  # noqa: E731
    else:
        A_in = A
    res = solver(A_in, b, rtol=1e-10, damping=damping, **kw)
    check(res, A, b, damping)
    return res


# ---------------------------------------------------------------------------- cg
@pytest.mark.parametrize("variant", VARIANTS)
def test_cg_matches_dense_solve(variant):
    res = _run(cg, spd(), variant)
    assert 0 < res.iterations <= N  # CG terminates within n steps (float64, cond 10)


def test_cg_agrees_with_scipy():
    A, b = spd(cond=100.0, seed=8), rhs(N, seed=8)
    ours = cg(A, b, rtol=1e-10)
    count = []
    ref, info = sla.cg(A.numpy(), b.numpy(), rtol=1e-10, maxiter=10 * N, callback=count.append)
    assert info == 0 and ours.converged
    assert abs(ours.iterations - len(count)) <= 2  # same recurrences, same iteration count
    np.testing.assert_allclose(ours.x.numpy(), ref, atol=1e-8 * np.abs(ref).max())


def test_cg_jacobi_preconditioner_matches_and_helps():
    # badly scaled SPD matrix D S D: Jacobi (diagonal) preconditioning undoes the scaling.
    d = torch.logspace(0, 3, N, dtype=F64)
    A = d[:, None] * spd(cond=10.0) * d[None, :]
    b = rhs(N)
    plain = cg(A, b, rtol=1e-10, maxiter=20 * N)
    d_inv = 1 / torch.diag(A)
    for M in (torch.diag(d_inv), DenseOperator(torch.diag(d_inv)), lambda X: X * d_inv[:, None]):
        pre = cg(A, b, M=M, rtol=1e-10)
        check(pre, A, b, tol=1e-6)
        assert pre.iterations < plain.iterations / 3


def test_cg_columns_are_independent():
    # column 0 is an eigenvector (one step), column 1 zero (no step), column 2 generic.
    A = spd()
    Q = _orthogonal(N, 0)
    b = torch.stack([Q[:, 5], torch.zeros(N, dtype=F64), rhs(N)], dim=1)
    res = cg(A, b, rtol=1e-10)
    check(res, A, b)
    assert torch.equal(res.x[:, 1], torch.zeros(N, dtype=F64))
    single = cg(A, b[:, 2], rtol=1e-10)
    assert res.iterations == single.iterations
    assert torch.allclose(res.x[:, 2], single.x, atol=1e-12)


def test_cg_exact_x0_needs_no_iteration():
    A, b = spd(), rhs(N)
    x = torch.linalg.solve(A, b)
    res = cg(A, b, x0=x, rtol=1e-8)
    assert res.iterations == 0 and res.converged and torch.equal(res.x, x)


def test_cg_atol_and_rtol():
    A, b = spd(), rhs(N)
    loose = cg(A, b, rtol=1e-3)
    assert loose.converged and float(loose.residual_norm) <= 1e-3 * float(b.norm())
    tight = cg(A, b, rtol=0.0, atol=1e-9)
    assert tight.converged and float(tight.residual_norm) <= 1e-9
    assert tight.iterations > loose.iterations


def test_cg_float32_and_identity_damping_operator():
    A = spd(cond=10.0)
    op = DenseOperator(A.float()) + 0.5 * IdentityOperator(N, dtype=torch.float32)
    res = cg(op, rhs(N).float(), rtol=1e-5)
    assert res.converged and res.x.dtype == torch.float32
    expected = torch.linalg.solve(A + 0.5 * eye(), rhs(N))
    assert torch.allclose(res.x.double(), expected, atol=1e-4)


def test_cg_autograd_through_iterations():
    # the solve is linear in b, so d(sum x)/db = A^{-T} 1 = A^{-1} 1.
    A = spd(cond=10.0)
    b = rhs(N).requires_grad_(True)
    cg(A, b, rtol=1e-12).x.sum().backward()
    expected = torch.linalg.solve(A, torch.ones(N, dtype=F64))
    assert torch.allclose(b.grad, expected, atol=1e-8)


def test_cg_logs_at_debug(caplog):
    with caplog.at_level(logging.DEBUG, logger="gradkit"):
        cg(spd(), rhs(N), rtol=1e-8)
    assert any("cg: iteration 1," in r.getMessage() for r in caplog.records)
    assert any("converged=True" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- minres
@pytest.mark.parametrize("variant", VARIANTS)
def test_minres_matches_dense_solve_indefinite(variant):
    _run(minres, indefinite(), variant)


def test_minres_on_spd_and_with_spd_preconditioner():
    _run(minres, spd(), "plain")
    A, b = indefinite(), rhs(N)
    M = torch.diag(1 / torch.diag(A).abs().clamp_min(0.5))  # SPD preconditioner for indefinite A
    check(minres(A, b, M=M, rtol=1e-10), A, b)
    check(minres(A, b, M=lambda X: 0.1 * X, rtol=1e-10, damping=0.3), A, b, damping=0.3)


def test_minres_agrees_with_scipy():
    A, b = indefinite(seed=4), rhs(N, seed=5)
    ours = minres(A, b, rtol=1e-12)
    count = []
    ref, info = sla.minres(A.numpy(), b.numpy(), rtol=1e-12, maxiter=10 * N, callback=count.append)
    assert info == 0 and ours.converged
    # same Krylov iterates; SciPy's stopping test (relative to ||A|| ||x||) is slightly looser
    assert 0 <= ours.iterations - len(count) <= 3
    np.testing.assert_allclose(ours.x.numpy(), ref, atol=1e-8 * np.abs(ref).max())
    # with a shift: SciPy solves (A - shift I) x = b
    ours = minres(A, b, rtol=1e-12, damping=0.25)
    ref, info = sla.minres(A.numpy(), b.numpy(), shift=-0.25, rtol=1e-12, maxiter=10 * N)
    np.testing.assert_allclose(ours.x.numpy(), ref, atol=1e-8 * np.abs(ref).max())


def test_minres_indefinite_preconditioner_warns():
    A = indefinite()
    with pytest.warns(RuntimeWarning, match="M is not positive definite"):
        res = minres(A, rhs(N), M=-eye())
    assert not res.converged


# ---------------------------------------------------------------------------- gmres
@pytest.mark.parametrize("variant", VARIANTS)
def test_gmres_matches_dense_solve(variant):
    _run(gmres, nonsymmetric(), variant)


@pytest.mark.parametrize("restart", [1, 5, 30, N])
def test_gmres_restarts(restart):
    A, b = nonsymmetric(), rhs(N)
    res = gmres(A, b, rtol=1e-10, restart=restart, maxiter=50 * N)
    check(res, A, b)
    if restart >= N:
        assert res.iterations <= N  # full GMRES terminates within n steps


def test_gmres_preconditioner():
    A = nonsymmetric() + torch.diag(torch.logspace(0, 2, N, dtype=F64))
    b = rhs(N)
    plain = gmres(A, b, rtol=1e-10, restart=N)
    pre = gmres(A, b, M=torch.diag(1 / torch.diag(A)), rtol=1e-10, restart=N)
    check(pre, A, b)
    assert pre.iterations < plain.iterations
    # an exact preconditioner solves in one step
    exact = gmres(A, b, M=torch.linalg.inv(A), rtol=1e-10)
    check(exact, A, b)
    assert exact.iterations == 1


def test_gmres_on_indefinite_symmetric_and_agrees_with_scipy():
    _run(gmres, indefinite(), "plain")
    A, b = nonsymmetric(seed=6), rhs(N, seed=7)
    ours = gmres(A, b, rtol=1e-12, restart=10, maxiter=100 * N)
    count = []
    ref, info = sla.gmres(
        A.numpy(), b.numpy(), rtol=1e-12, restart=10, maxiter=100, callback=count.append, callback_type="pr_norm"
    )
    assert info == 0 and ours.converged
    assert ours.iterations == len(count)  # same Arnoldi steps and the same residual estimate
    np.testing.assert_allclose(ours.x.numpy(), ref, atol=1e-8 * np.abs(ref).max())


# ---------------------------------------------------------------------------- normal_cg
def test_normal_cg_least_squares_overdetermined():
    A, b = rhs(120, N, seed=10), rhs(120, seed=11)
    res = normal_cg(A, b, rtol=1e-12)
    expected = torch.linalg.lstsq(A, b.unsqueeze(1)).solution[:, 0]
    assert res.converged and res.x.shape == (N,)
    assert torch.allclose(res.x, expected, atol=1e-9)
    # the reported residual is the normal-equation one, A^T (b - A x)
    assert torch.allclose(res.residual_norm, (A.T @ (b - A @ res.x)).norm(), rtol=1e-6, atol=1e-14)


@pytest.mark.parametrize("shape", [(120, N), (30, N)])
def test_normal_cg_ridge(shape):
    # closed form of ridge regression, also for an under-determined A
    A, B = rhs(*shape, seed=12), rhs(shape[0], 3, seed=13)
    lam = 0.5
    res = normal_cg(A, B, rtol=1e-12, damping=lam)
    expected = torch.linalg.solve(A.T @ A + lam * eye(shape[1]), A.T @ B)
    assert res.converged and res.x.shape == (shape[1], 3)
    assert torch.allclose(res.x, expected, atol=1e-9)
    x0 = expected + 0.01 * rhs(shape[1], 3)
    assert torch.allclose(normal_cg(A, B, rtol=1e-12, damping=lam, x0=x0).x, expected, atol=1e-9)


def test_normal_cg_operator_with_rmatvec():
    A, b = nonsymmetric(), rhs(N)
    op = LinearOperator((N, N), lambda v: A @ v, rmatvec=lambda v: A.T @ v, dtype=F64)
    res = normal_cg(op, b, rtol=1e-12)
    assert torch.allclose(res.x, torch.linalg.solve(A, b), atol=1e-8)


# ---------------------------------------------------------------------------- neumann
def test_neumann_is_the_series_and_converges_at_the_spectral_rate():
    ev = torch.cat([torch.ones(1, dtype=F64), torch.linspace(2.0, 10.0, N - 1, dtype=F64)])
    A, b = _sym(ev), rhs(N)
    scale = 0.1
    rho = 1 - scale * 1.0  # spectral radius of I - scale A, from the isolated eigenvalue 1
    exact = torch.linalg.solve(A, b)
    # the definition x = scale * sum_{i<=steps} (I - scale A)^i b
    T = eye() - scale * A
    series = scale * sum(torch.linalg.matrix_power(T, i) @ b for i in range(6))
    r5 = neumann(A, b, steps=5, scale=scale)
    assert r5.iterations == 5 and r5.converged
    assert torch.allclose(r5.x, series, atol=1e-12)
    # error x - A^{-1} b = -A^{-1} (I - scale A)^{steps+1} b exactly, shrinking like rho^steps
    Q = _orthogonal(N, 0)
    for steps in (0, 10, 60):
        predicted = -Q @ ((1 - scale * ev) ** (steps + 1) / ev * (Q.T @ b))
        got = neumann(A, b, steps=steps, scale=scale).x - exact
        assert torch.allclose(got, predicted, atol=1e-12)
    errors = [float((neumann(A, b, steps=s, scale=scale).x - exact).norm()) for s in (100, 101, 150)]
    assert errors[1] / errors[0] == pytest.approx(rho, rel=1e-4)
    assert errors[2] / errors[0] == pytest.approx(rho**50, rel=1e-3)
    many = neumann(A, b, steps=400, scale=scale, rtol=1e-12)
    assert many.converged and torch.allclose(many.x, exact, atol=1e-10)


def test_neumann_damping_and_block():
    A, B = spd(cond=10.0), rhs(N, 3)
    res = neumann(A, B, steps=300, scale=0.08, damping=1.0, rtol=1e-10)
    check(res, A, B, damping=1.0)
    assert res.iterations == 300


def test_neumann_diverges_beyond_the_radius():
    A, b = spd(cond=10.0), rhs(N)  # scale > 2 / lambda_max = 0.2: rho(I - scale A) > 1
    with pytest.warns(RuntimeWarning, match="did not converge"):
        res = neumann(A, b, steps=30, scale=0.25, rtol=1e-6)
    assert not res.converged and float(res.residual_norm) > float(b.norm())
    assert neumann(A, b, steps=30, scale=0.25).converged  # rtol=None: no check


# ---------------------------------------------------------------------------- bad input
def test_cg_refuses_non_symmetric():
    with pytest.raises(ValueError, match=r"cg: A must be symmetric.*gmres.*normal_cg.*symmetric=True"):
        cg(nonsymmetric(), rhs(N))
    op = LinearOperator((N, N), lambda v: v, dtype=F64)
    with pytest.raises(ValueError, match="minres: A must be symmetric"):
        minres(op, rhs(N))


def test_cg_warns_on_indefinite():
    with pytest.warns(RuntimeWarning, match=r"p\^T A p = -.*not positive definite.*minres"):
        res = cg(indefinite(), rhs(N))
    assert not res.converged


def test_cg_warns_on_indefinite_preconditioner():
    with pytest.warns(RuntimeWarning, match=r"cg stopped after 0 iterations: r\^T M r = -.* M is not positive"):
        res = cg(spd(), rhs(N, 2), M=-eye())
    assert not res.converged and res.iterations == 0


def test_non_convergence_warns():
    for solver, A in ((cg, spd()), (minres, indefinite()), (gmres, nonsymmetric())):
        with pytest.warns(RuntimeWarning, match=rf"{solver.__name__} did not converge in 3 iterations.*residual norm"):
            res = solver(A, rhs(N), maxiter=3)
        assert not res.converged and res.iterations == 3
    with pytest.warns(RuntimeWarning, match="normal_cg did not converge"):
        assert not normal_cg(nonsymmetric(), rhs(N), maxiter=2).converged


def test_converged_solve_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cg(spd(), rhs(N, 2), rtol=1e-10)
        gmres(nonsymmetric(), rhs(N), rtol=1e-10)


@pytest.mark.parametrize("solver", [cg, minres, gmres, normal_cg, neumann])
def test_bad_b(solver):
    A = spd()
    with pytest.raises(ValueError, match=r"b has shape \(49,\), expected \(50,\)"):
        solver(A, rhs(N - 1))
    with pytest.raises(ValueError, match=r"b must have shape \(n,\) or \(n, k\), got shape \(50, 2, 2\)"):
        solver(A, rhs(N, 2, 2))
    with pytest.raises(TypeError, match="b has dtype torch.float32 but A works in torch.float64"):
        solver(A, rhs(N).float())
    with pytest.raises(ValueError, match=r"b contains non-finite values"):
        solver(A, torch.full((N,), float("nan"), dtype=F64))
    with pytest.raises(TypeError, match="b must be a torch.Tensor"):
        solver(A, [1.0] * N)
    with pytest.raises(TypeError, match="b must have a floating-point dtype"):
        solver(A, torch.ones(N, dtype=torch.int64))


@pytest.mark.parametrize("solver", [cg, minres, gmres, normal_cg])
def test_bad_scalars_and_x0(solver):
    A, b = spd(), rhs(N)
    with pytest.raises(ValueError, match=r"damping must be a finite number >= 0, got -1"):
        solver(A, b, damping=-1.0)
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0, got -1e-06"):
        solver(A, b, rtol=-1e-6)
    with pytest.raises(ValueError, match="atol must be a finite number >= 0, got nan"):
        solver(A, b, atol=float("nan"))
    with pytest.raises(ValueError, match="maxiter must be an integer >= 0, got -1"):
        solver(A, b, maxiter=-1)
    with pytest.raises(TypeError, match="maxiter must be an integer"):
        solver(A, b, maxiter=2.5)
    with pytest.raises(ValueError, match=r"x0 has shape \(50, 1\), expected \(50,\)"):
        solver(A, b, x0=rhs(N, 1))
    with pytest.raises(ValueError, match="x0 contains non-finite"):
        solver(A, b, x0=torch.full((N,), float("inf"), dtype=F64))


def test_bad_operator_and_preconditioner():
    b = rhs(N)
    with pytest.raises(ValueError, match=r"A must be square, got shape \(50, 40\); use normal_cg"):
        gmres(rhs(N, 40), b)
    with pytest.raises(ValueError, match=r"A as a tensor must be a 2-D matrix, got shape \(50,\)"):
        cg(rhs(N), b)
    with pytest.raises(TypeError, match="A must be a LinearOperator, a 2-D tensor or a callable matvec, got str"):
        cg("A", b)
    bad = spd()
    bad[3, 3] = float("nan")
    for solver in (cg, minres, gmres):  # not "A must be symmetric", which the nan made cg say
        with pytest.raises(ValueError, match=f"{solver.__name__}: A contains non-finite values"):
            solver(bad, b)
    with pytest.raises(TypeError, match="normal_cg: A must be a LinearOperator, a 2-D tensor, got function"):
        normal_cg(lambda v: v, b)
    op = LinearOperator((N, N), lambda v: 2 * v, dtype=F64)
    with pytest.raises(ValueError, match="normal_cg needs the transpose A\\^T.*rmatvec"):
        normal_cg(op, b)
    with pytest.raises(ValueError, match=r"M has shape \(40, 40\), expected \(50, 50\)"):
        cg(spd(), b, M=torch.eye(40, dtype=F64))
    with pytest.raises(TypeError, match="M works in torch.float32"):
        cg(spd(), b, M=torch.eye(N))
    with pytest.raises(TypeError, match="M must be a LinearOperator, a 2-D tensor or a callable"):
        cg(spd(), b, M="jacobi")
    with pytest.raises(RuntimeError, match=r"cg: the preconditioner M returned \(50,\) for input \(50, 1\)"):
        cg(spd(), b, M=lambda X: X[:, 0])
    with pytest.raises(RuntimeError, match=r"cg: A returned \(49, 1\) for input \(50, 1\)"):
        cg(lambda v: v[1:], b)
    with pytest.raises(ValueError, match="restart must be an integer >= 1, got 0"):
        gmres(nonsymmetric(), b, restart=0)
    with pytest.raises(ValueError, match="scale must be a finite number > 0, got 0"):
        neumann(spd(), b, scale=0)
    with pytest.raises(ValueError, match="steps must be an integer >= 0, got -2"):
        neumann(spd(), b, steps=-2)
    with pytest.raises(ValueError, match="neumann: damping must be a finite number >= 0"):
        neumann(spd(), b, damping=-0.1)


@pytest.mark.parametrize("solver", [cg, minres, gmres, normal_cg], ids=lambda f: f.__name__)
def test_zero_right_hand_side_with_a_start_is_solved_by_zero(solver):
    """b = 0 has tolerance rtol ||b|| = 0: x = 0 solves it exactly (SciPy returns it too); from a
    non-zero x0 the solvers used to iterate to maxiter and warn. Other columns are solved as usual."""
    A, x0 = spd(seed=11), rhs(N, 2, seed=12)
    B = torch.stack([torch.zeros(N, dtype=F64), rhs(N, seed=13)], dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = solver(A, B, x0=x0, rtol=1e-10)
    assert res.converged and torch.equal(res.x[:, 0], torch.zeros(N, dtype=F64))
    torch.testing.assert_close(res.x[:, 1], torch.linalg.solve(A, B[:, 1]), rtol=1e-7, atol=1e-9)
