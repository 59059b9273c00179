"""Stochastic trace / diagonal estimators: statistical bounds with fixed seeds."""

from __future__ import annotations

import math

import pytest
import torch

from gradkit.linalg import LinearOperator, hutchinson_diagonal, hutchinson_trace, hutchpp_trace

DT = torch.float64


def _sym(n: int = 80, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=DT)
    return (B + B.T) / 2 + 3 * torch.eye(n, dtype=DT)


def _low_rank_plus_small(n: int = 300, rank: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=DT))
    E = torch.randn(n, n, generator=g, dtype=DT) / n
    return 100 * U @ torch.diag(torch.arange(1.0, rank + 1, dtype=DT)) @ U.T + E @ E.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hutchinson_rademacher_within_4_std(seed):
    A, N = _sym(), 200
    var = 2 * (A.square().sum() - A.diagonal().square().sum())  # per probe, symmetric A
    est = hutchinson_trace(A, N, seed=seed)
    assert abs(float(est - A.trace())) <= 4 * math.sqrt(float(var) / N)


def test_hutchinson_gaussian_within_4_std_and_std_estimate():
    A, N = _sym(), 400
    var = 2 * A.square().sum()
    est, se = hutchinson_trace(A, N, distribution="gaussian", seed=0, return_std=True)
    assert abs(float(est - A.trace())) <= 4 * math.sqrt(float(var) / N)
    # The reported standard error estimates sqrt(var / N) (sampling error of an std ~ 1/sqrt(2N)).
    assert abs(float(se) / math.sqrt(float(var) / N) - 1) < 0.25


def test_hutchinson_exact_for_diagonal_with_rademacher():
    A = torch.diag(torch.linspace(-2, 5, 30, dtype=DT))
    est, se = hutchinson_trace(A, 3, return_std=True)
    torch.testing.assert_close(est, A.trace())
    assert float(se) == 0.0
    _, se1 = hutchinson_trace(A, 1, return_std=True)
    assert math.isnan(float(se1))


def test_seeds_and_batching():
    A = _sym()
    a = hutchinson_trace(A, 50, seed=7)
    assert torch.equal(a, hutchinson_trace(A, 50, seed=7))
    assert not torch.equal(a, hutchinson_trace(A, 50, seed=8))
    for bs in (1, 7, 50):  # probes do not depend on the batching
        torch.testing.assert_close(hutchinson_trace(A, 50, seed=7, batch_size=bs), a, rtol=1e-12, atol=0)
    d = hutchinson_diagonal(A, 20, seed=7, distribution="gaussian")
    torch.testing.assert_close(hutchinson_diagonal(A, 20, seed=7, distribution="gaussian", batch_size=3), d)
    assert not torch.equal(d, hutchinson_diagonal(A, 20, seed=8, distribution="gaussian"))
    h = hutchpp_trace(A, 30, seed=7)
    assert torch.equal(h, hutchpp_trace(A, 30, seed=7)) and not torch.equal(h, hutchpp_trace(A, 30, seed=8))


def test_operator_is_applied_in_column_batches():
    A = _sym(40)
    shapes = []

    def matmat(X: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(X.shape))
        return A @ X

    op = LinearOperator((40, 40), matmat=matmat, dtype=DT)  # not declared symmetric: fine here
    hutchinson_trace(op, 25, batch_size=10)
    assert shapes == [(40, 10), (40, 10), (40, 5)]
    shapes.clear()
    hutchpp_trace(op, 31)  # s = 10 sketch columns, 10 for A Q, 11 Hutchinson probes
    assert shapes == [(40, 10), (40, 10), (40, 11)]


def test_hutchpp_beats_hutchinson_on_low_rank_plus_small():
    A = _low_rank_plus_small()
    tr = float(A.trace())
    for seed in range(3):
        err_pp = abs(float(hutchpp_trace(A, 60, seed=seed)) - tr)
        err_h = abs(float(hutchinson_trace(A, 60, seed=seed)) - tr)
        assert err_pp < 1e-2 * err_h, (seed, err_pp, err_h)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchpp_exact_below_a_third_of_the_budget(distribution):
    g = torch.Generator().manual_seed(3)
    B = torch.randn(100, 5, generator=g, dtype=DT)
    A = B @ B.T  # rank 5 < 18 / 3
    torch.testing.assert_close(hutchpp_trace(A, 18, distribution=distribution), A.trace(), rtol=1e-12, atol=0)
    C = B @ torch.randn(5, 100, generator=g, dtype=DT)  # non-symmetric rank 5
    torch.testing.assert_close(hutchpp_trace(C, 20), C.trace(), rtol=1e-10, atol=1e-10)


def test_diagonal_within_4_std_per_entry():
    A, N = _sym(60), 300
    var = A.square().sum(1) - A.diagonal().square()  # sum_{j != i} a_ij^2 per probe
    est = hutchinson_diagonal(A, N, seed=0)
    assert est.shape == (60,)
    assert bool((est - A.diagonal()).abs().le(4 * (var / N).sqrt()).all())


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_diagonal_exact_for_diagonal_matrix(distribution):
    D = torch.linspace(-1, 4, 25, dtype=DT)
    torch.testing.assert_close(hutchinson_diagonal(torch.diag(D), 2, distribution=distribution), D)


def test_float32_and_device_dtype_out():
    A = _sym(30).float()
    assert hutchinson_trace(A, 10).dtype == torch.float32
    assert hutchpp_trace(A, 9).dtype == torch.float32
    assert hutchinson_diagonal(A, 10).dtype == torch.float32


def test_bad_input():
    A = _sym(10)
    with pytest.raises(ValueError, match=r"num_probes must be an int in \[1, inf\], got 0"):
        hutchinson_trace(A, 0)
    with pytest.raises(ValueError, match=r"distribution must be one of \('rademacher', 'gaussian'\), got 'uniform'"):
        hutchinson_trace(A, distribution="uniform")
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, inf\], got 0"):
        hutchinson_trace(A, batch_size=0)
    with pytest.raises(ValueError, match=r"num_matvecs must be an int in \[3, inf\], got 2"):
        hutchpp_trace(A, 2)
    with pytest.raises(ValueError, match=r"A must be a non-empty square operator, got shape \(10, 4\)"):
        hutchinson_diagonal(A[:, :4])
    with pytest.raises(ValueError, match=r"num_probes must be an int in \[1, inf\], got -3"):
        hutchinson_diagonal(A, -3)
    with pytest.raises(ValueError, match="A contains non-finite values"):
        hutchinson_trace(A * math.inf)
    with pytest.raises(TypeError, match="A must have a floating dtype"):
        hutchinson_trace(torch.eye(3, dtype=torch.int64))
