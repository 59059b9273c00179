"""The transform-safe fixed-iteration solvers equal their gradkit.linalg twins and run under vmap."""

from __future__ import annotations

import pytest
import torch

from gradkit.implicit._linear_solve import fixed_cg, fixed_gmres, fixed_neumann, fixed_normal_cg
from gradkit.linalg import cg, gmres, neumann, normal_cg

F64 = torch.float64
N = 12


def _matrix(seed: int, symmetric: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=F64))[0]
    A = (Q * torch.linspace(1.0, 20.0, N, dtype=F64)) @ Q.T
    if not symmetric:
        A = A + 2.0 * torch.randn(N, N, generator=g, dtype=F64)
    return A


def _rhs(seed: int, k: int = 3) -> torch.Tensor:
    return torch.randn(k, N, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_fixed_cg_equals_linalg_cg():
    A = _matrix(0, symmetric=True)
    for b in _rhs(1):
        ours = fixed_cg(lambda v: A @ v, b, maxiter=N, rtol=1e-12)
        ref = cg(A, b, rtol=1e-12, maxiter=N)
        torch.testing.assert_close(ours, ref.x, rtol=0, atol=1e-12)
        # the same iterations when both stop early (a few steps)
        with pytest.warns(RuntimeWarning, match="did not converge"):
            truncated = cg(A, b, rtol=0, maxiter=4).x
        torch.testing.assert_close(fixed_cg(lambda v: A @ v, b, maxiter=4), truncated, rtol=0, atol=1e-12)
    # more iterations than needed: converged iterates are frozen, no nan (also for b = 0)
    torch.testing.assert_close(fixed_cg(lambda v: A @ v, b, maxiter=5 * N, rtol=1e-12), torch.linalg.solve(A, b),
                               rtol=0, atol=1e-12)
    zero = torch.zeros(N, dtype=F64, requires_grad=True)
    x = fixed_cg(lambda v: A @ v, zero, maxiter=N)
    assert torch.equal(x, torch.zeros(N, dtype=F64))
    (g,) = torch.autograd.grad(x.sum(), zero)
    assert torch.isfinite(g).all()


def test_fixed_normal_cg_gmres_neumann_equal_linalg():
    A = _matrix(2, symmetric=False)
    S = _matrix(3, symmetric=True)
    for b in _rhs(4):
        ours = fixed_normal_cg(lambda v: A @ v, lambda v: A.T @ v, b, maxiter=4 * N, rtol=1e-13)
        torch.testing.assert_close(ours, normal_cg(A, b, rtol=1e-13).x, rtol=0, atol=1e-9)
        torch.testing.assert_close(ours, torch.linalg.solve(A, b), rtol=0, atol=1e-9)
        ours = fixed_gmres(lambda v: A @ v, b, maxiter=N)
        torch.testing.assert_close(ours, gmres(A, b, rtol=1e-13, restart=N).x, rtol=0, atol=1e-10)
        torch.testing.assert_close(ours, torch.linalg.solve(A, b), rtol=0, atol=1e-10)
        # fewer Arnoldi steps than n: both minimise the residual over the same Krylov space
        with pytest.warns(RuntimeWarning, match="did not converge"):
            truncated = gmres(A, b, rtol=0, restart=5, maxiter=5).x
        torch.testing.assert_close(fixed_gmres(lambda v: A @ v, b, maxiter=5), truncated, rtol=0, atol=1e-10)
        ours = fixed_neumann(lambda v: S @ v, b, steps=30, scale=0.09)
        torch.testing.assert_close(ours, neumann(S, b, steps=30, scale=0.09).x, rtol=0, atol=1e-13)


def test_fixed_gmres_happy_breakdown():
    """b in a 2-dimensional invariant subspace: Arnoldi breaks down after 2 steps; the extra steps
    must neither produce nan nor change the exact solution."""
    A = torch.diag(torch.arange(1.0, N + 1, dtype=F64))
    b = torch.zeros(N, dtype=F64)
    b[[1, 4]] = torch.tensor([1.0, -2.0], dtype=F64)
    x = fixed_gmres(lambda v: A @ v, b, maxiter=N)
    torch.testing.assert_close(x, b / torch.diag(A), rtol=0, atol=1e-13)
    torch.testing.assert_close(fixed_gmres(lambda v: A @ v, torch.zeros(N, dtype=F64), maxiter=4),
                               torch.zeros(N, dtype=F64))


def test_fixed_solvers_under_vmap_equal_the_loop():
    A = _matrix(5, symmetric=True)
    B = _rhs(6, k=4)
    for solve in (
        lambda b: fixed_cg(lambda v: A @ v, b, maxiter=N, rtol=1e-12),
        lambda b: fixed_gmres(lambda v: A @ v, b, maxiter=N),
        lambda b: fixed_neumann(lambda v: A @ v, b, steps=10, scale=0.05),
    ):
        torch.testing.assert_close(torch.vmap(solve)(B), torch.stack([solve(b) for b in B]), rtol=0, atol=1e-12)


def test_preconditioned_fixed_cg_equals_linalg_cg():
    """With M, fixed_cg runs linalg.cg's preconditioned recurrences: the same iterates when both
    stop early, and an exact inverse converges in one step."""
    g = torch.Generator().manual_seed(5)
    A = _matrix(6, symmetric=True) * torch.logspace(0, 2, N, dtype=F64).sqrt()
    A = (A + A.T) / 2 + 50 * torch.eye(N, dtype=F64)  # badly scaled, diagonally dominant
    diag = torch.diagonal(A)
    b = torch.randn(N, generator=g, dtype=F64)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        ref = cg(A, b, rtol=0, maxiter=3, M=lambda R: R / diag[:, None]).x
    ours = fixed_cg(lambda v: A @ v, b, maxiter=3, M=lambda r: r / diag)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    assert not torch.allclose(ours, fixed_cg(lambda v: A @ v, b, maxiter=3), rtol=0, atol=1e-6)
    exact = fixed_cg(lambda v: A @ v, b, maxiter=1, M=lambda r: torch.linalg.solve(A, r))
    torch.testing.assert_close(exact, torch.linalg.solve(A, b), rtol=0, atol=1e-12)
