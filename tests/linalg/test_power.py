"""Power iteration with deflation against dense float64 eigendecompositions."""

from __future__ import annotations

import pytest
import torch

from gk_testing import with_spectrum
from gradkit.linalg import LinearOperator, power_iteration

DT = torch.float64


def _gapped(n: int = 100) -> torch.Tensor:
    # 10, 7, 5 well separated from a bulk in [-1, 1].
    bulk = torch.linspace(-1, 1, n - 3, dtype=DT)
    return with_spectrum(torch.cat([torch.tensor([10.0, 7.0, 5.0], dtype=DT), bulk]))


def test_top_eigenvalue_with_a_gap():
    A = _gapped()
    evals, V = power_iteration(A, k=1, tol=1e-12, maxiter=500)
    torch.testing.assert_close(evals, torch.tensor([10.0], dtype=DT), rtol=1e-10, atol=0)
    assert float((A @ V - V * evals).norm()) < 1e-5


def test_deflation_gives_the_next_ones():
    A = _gapped()
    evals, V = power_iteration(A, k=3, tol=1e-12, maxiter=500)
    torch.testing.assert_close(evals, torch.tensor([10.0, 7.0, 5.0], dtype=DT), rtol=1e-9, atol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(3, dtype=DT), atol=1e-12, rtol=0)
    assert float((A @ V - V * evals).norm(dim=0).max()) < 1e-4


def test_pyhessian_defaults_are_close_but_not_tight():
    A = _gapped()
    evals, _ = power_iteration(A, k=3)  # tol=1e-3, maxiter=100
    torch.testing.assert_close(evals, torch.tensor([10.0, 7.0, 5.0], dtype=DT), rtol=1e-2, atol=0)


def test_largest_magnitude_sorted_by_value():
    A = with_spectrum(torch.cat([torch.tensor([-12.0, 8.0], dtype=DT), torch.linspace(-1, 1, 48, dtype=DT)]))
    evals, V = power_iteration(A, k=2, tol=1e-12, maxiter=500)
    torch.testing.assert_close(evals, torch.tensor([8.0, -12.0], dtype=DT), rtol=1e-9, atol=0)
    assert float((A @ V - V * evals).norm(dim=0).max()) < 1e-4


def test_products_are_counted_by_a_wrapping_operator():
    A = _gapped()
    count = [0]

    def matvec(x: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return A @ x

    op = LinearOperator(A.shape, matvec, dtype=DT, symmetric=True)
    power_iteration(op, k=2, tol=1e-6, maxiter=200)
    assert 4 <= count[0] <= 400


def test_zero_operator_and_maxiter_warning():
    evals, V = power_iteration(torch.zeros(10, 10, dtype=DT), k=2)
    assert torch.equal(evals, torch.zeros(2, dtype=DT)) and torch.isfinite(V).all()
    # tol=1e-14 cannot be met in 3 iterations.
    A = with_spectrum(torch.tensor([3.0, -3.0, 1.0, 0.5], dtype=DT))
    with pytest.warns(RuntimeWarning, match="eigenpair 1 of 1 did not converge in maxiter=3"):
        power_iteration(A, k=1, tol=1e-14, maxiter=3)


def test_seeds_reproduce():
    A = _gapped()
    a1, v1 = power_iteration(A, k=2, seed=3)
    a2, v2 = power_iteration(A, k=2, seed=3)
    a3, _ = power_iteration(A, k=2, seed=4)
    assert torch.equal(a1, a2) and torch.equal(v1, v2) and not torch.equal(a1, a3)


def test_bad_input():
    A = _gapped(20)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 20\], got 21"):
        power_iteration(A, k=21)
    with pytest.raises(ValueError, match=r"maxiter must be an int in \[1, inf\], got 0"):
        power_iteration(A, maxiter=0)
    with pytest.raises(ValueError, match="tol must be a finite number > 0, got 0.0"):
        power_iteration(A, tol=0.0)
    with pytest.raises(TypeError, match="seed must be an int, got str"):
        power_iteration(A, seed="0")
    with pytest.raises(ValueError, match="A must be symmetric"):
        power_iteration(torch.triu(A))
