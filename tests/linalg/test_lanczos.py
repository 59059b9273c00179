"""Lanczos eigensolver against dense float64 eigendecompositions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from gk_testing import with_spectrum
from gradkit.linalg import LinearOperator, lanczos, lanczos_tridiagonal

DT = torch.float64


def _spd(n: int = 300) -> torch.Tensor:
    # Geometric decay from 100 to 1e-3, as in curvature spectra.
    return with_spectrum(100.0 * 0.95 ** torch.arange(n, dtype=DT) + 1e-3)


def _indefinite(n: int = 300) -> torch.Tensor:
    i = torch.arange(n // 2, dtype=DT)
    return with_spectrum(torch.cat([50.0 * 0.93**i, -30.0 * 0.91**i]), seed=1)


def _counting(A: torch.Tensor) -> tuple[LinearOperator, list[int]]:
    count = [0]

    def matvec(x: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return A @ x

    return LinearOperator(A.shape, matvec, dtype=A.dtype, symmetric=True), count


def _check_pairs(A: torch.Tensor, evals: torch.Tensor, V: torch.Tensor, expected: torch.Tensor) -> None:
    k = evals.numel()
    assert evals.shape == (k,) and V.shape == (A.shape[0], k)
    assert torch.all(evals[:-1] >= evals[1:]), "eigenvalues must be sorted by decreasing value"
    torch.testing.assert_close(evals, expected, rtol=1e-8, atol=1e-12 * float(expected.abs().max()))
    scale = float(torch.linalg.matrix_norm(A, ord=2))
    assert float((A @ V - V * evals).norm(dim=0).max()) <= 1e-6 * scale
    torch.testing.assert_close(V.T @ V, torch.eye(k, dtype=DT), atol=1e-10, rtol=0)


@pytest.mark.parametrize("make", [_spd, _indefinite], ids=["spd", "indefinite"])
def test_largest_matches_eigvalsh(make):
    A = make()
    exact = torch.linalg.eigvalsh(A)
    evals, V = lanczos(A, k=5)
    _check_pairs(A, evals, V, exact[-5:].flip(0))


def test_smallest_and_both_on_indefinite():
    A = _indefinite()
    exact = torch.linalg.eigvalsh(A)
    evals, V = lanczos(A, k=4, which="smallest")
    _check_pairs(A, evals, V, exact[:4].flip(0))
    evals, V = lanczos(A, k=5, which="both")  # 3 largest, 2 smallest
    _check_pairs(A, evals, V, torch.cat([exact[-3:].flip(0), exact[:2].flip(0)]))


def test_function_operator_counts_products_and_stops_early():
    A = _spd()
    op, count = _counting(A)
    evals, _ = lanczos(op, k=3, tol=1e-10)
    torch.testing.assert_close(evals, torch.linalg.eigvalsh(A)[-3:].flip(0), rtol=1e-9, atol=0)
    assert 3 <= count[0] < 100  # converged long before the Krylov space fills R^300


def test_clustered_eigenvalues_are_resolved():
    n = 300
    rest = 5.0 * 0.97 ** torch.arange(n - 3, dtype=DT)
    A = with_spectrum(torch.cat([torch.tensor([10.0, 9.999, 9.998], dtype=DT), rest]), seed=3)
    exact = torch.linalg.eigvalsh(A)
    evals, V = lanczos(A, k=4, tol=1e-10, maxiter=200)
    _check_pairs(A, evals, V, exact[-4:].flip(0))


def test_repeated_eigenvalues_of_a_low_rank_operator():
    # rank 5 with eigenvalues 5, 5, 5, 1, 1: the Krylov space of one vector is invariant after
    # 3 steps; the restarts orthogonal to the basis must find every copy (and the zeros).
    A = with_spectrum(torch.cat([torch.tensor([5.0, 5, 5, 1, 1], dtype=DT), torch.zeros(95, dtype=DT)]))
    evals, V = lanczos(A, k=7)
    expected = torch.tensor([5.0, 5, 5, 1, 1, 0, 0], dtype=DT)
    torch.testing.assert_close(evals, expected, rtol=0, atol=1e-10)
    assert float((A @ V - V * evals).norm(dim=0).max()) <= 1e-9
    torch.testing.assert_close(V.T @ V, torch.eye(7, dtype=DT), atol=1e-10, rtol=0)


@pytest.mark.parametrize("spectrum, k, which", [
    ([10.0, 10.0] + [1.0] * 98, 2, "largest"),  # invariant at m = k: the restart block holds the second 10
    ([3.0, 3, 2, 2, 2, 1, 1, 1, 1, 1] + [0.0] * 90, 3, "largest"),  # invariant after 4 steps, k = 3
    ([3.0, 3, 2, 2, 2, 1, 1, 1, 1, 1] + [0.0] * 90, 5, "largest"),
    ([-4.0, -4.0, -4.0] + [2.0] * 57, 3, "smallest"),
])
def test_repeated_eigenvalues_when_the_space_turns_invariant_at_or_after_k(spectrum, k, which):
    """The run used to stop at the step that found the space invariant once m >= k (every Ritz
    residual read 0), before the restart block was explored: a repeated wanted eigenvalue was
    replaced by a smaller one, silently."""
    ev = torch.tensor(spectrum, dtype=DT)
    A = with_spectrum(ev, seed=3)
    evals, V = lanczos(A, k=k, which=which)
    exact = ev.sort(descending=True).values[:k] if which == "largest" else ev.sort().values[:k]
    torch.testing.assert_close(evals, exact, rtol=0, atol=1e-10)
    assert float((A @ V - V * evals).norm(dim=0).max()) <= 1e-9


def test_null_space_blocks_a_given_start_and_a_restart_at_maxiter():
    """A block inside the null space is invariant (dependence is judged against the largest
    ||A q|| so far, not this step's ~0); an invariant first block grown from a given v0 proves
    nothing about the rest; a restart due at maxiter ends with a warning that says so."""
    A = with_spectrum(torch.cat([torch.tensor([5.0, 3.0, 3.0], dtype=DT), torch.zeros(57, dtype=DT)]), seed=0)
    torch.testing.assert_close(lanczos(A, k=5, which="smallest")[0], torch.zeros(5, dtype=DT), rtol=0, atol=1e-10)
    torch.testing.assert_close(lanczos(-A, k=5, which="largest")[0], torch.zeros(5, dtype=DT), rtol=0, atol=1e-10)
    D = torch.diag(torch.arange(10, 0, -1, dtype=DT))
    e = torch.zeros(10, dtype=DT)
    e[-1] = 1.0  # an eigenvector: its block is invariant after one step
    torch.testing.assert_close(lanczos(D, k=1, v0=e)[0], torch.tensor([10.0], dtype=DT), rtol=0, atol=1e-10)
    d = torch.tensor([10.0, 10.0] + [1.0] * 8, dtype=DT)
    with pytest.warns(RuntimeWarning, match="turned invariant at step 2, with the rest of the space unexplored"):
        lanczos(torch.diag(d), k=2, maxiter=2)


def test_identity_invariant_subspace_each_step():
    op, count = _counting(torch.eye(60, dtype=DT))
    evals, V = lanczos(op, k=5, which="both")
    torch.testing.assert_close(evals, torch.ones(5, dtype=DT))
    torch.testing.assert_close(V.T @ V, torch.eye(5, dtype=DT), atol=1e-12, rtol=0)
    assert count[0] == 5  # one product per restart


@pytest.mark.parametrize("k", [19, 30, 40])
def test_k_close_to_n(k):
    # k=19 runs Lanczos (2k < n), k=30 and k=n take the dense path.
    n = 40
    A = with_spectrum(torch.linspace(-3, 7, n, dtype=DT) ** 3, seed=4)
    exact = torch.linalg.eigvalsh(A)
    evals, V = lanczos(A, k=k, tol=1e-10)
    _check_pairs(A, evals, V, exact[-k:].flip(0))


def test_model_hessian_top5():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    X = torch.randn(40, 5, dtype=DT)
    y = torch.randint(0, 3, (40,))
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, [s.numel() for s in shapes])
        params = {nm: p.reshape(s) for nm, p, s in zip(names, pieces, shapes)}
        return nn.functional.cross_entropy(functional_call(model, params, (X,)), y)

    H = torch.autograd.functional.hessian(loss, theta)
    H = (H + H.T) / 2
    n = theta.numel()
    op = LinearOperator((n, n), lambda v: jvp(grad(loss), (theta,), (v,))[1], dtype=DT, symmetric=True)
    evals, V = lanczos(op, k=5)
    exact = torch.linalg.eigvalsh(H)
    torch.testing.assert_close(evals, exact[-5:].flip(0), rtol=1e-8, atol=0)
    assert float((H @ V - V * evals).norm(dim=0).max()) <= 1e-6 * float(exact.abs().max())


def test_float32_operator():
    A = _spd(200).float()
    evals, V = lanczos(A, k=3)
    expected = torch.linalg.eigvalsh(A.double())[-3:].flip(0).float()
    torch.testing.assert_close(evals, expected, rtol=1e-5, atol=0)
    assert evals.dtype == torch.float32 and V.dtype == torch.float32


def test_seed_and_v0_reproduce():
    A = _indefinite(100)
    a1, v1 = lanczos(A, 3, seed=5)
    a2, v2 = lanczos(A, 3, seed=5)
    assert torch.equal(a1, a2) and torch.equal(v1, v2)
    v0 = torch.ones(100, dtype=DT)
    b1, _ = lanczos(A, 3, v0=v0)
    b2, _ = lanczos(A, 3, v0=3 * v0, seed=9)  # v0 overrides the seed and is normalised
    torch.testing.assert_close(b1, b2, rtol=1e-12, atol=0)


def test_not_converged_warns():
    with pytest.warns(RuntimeWarning, match="did not converge in maxiter=6"):
        evals, V = lanczos(_spd(), k=5, maxiter=6)
    assert evals.shape == (5,) and V.shape == (300, 5)


def test_tridiagonal_gauss_quadrature_moments():
    # e1^T T^j e1 = q1^T A^j q1 for j <= 2m - 1 (exactness of Gauss quadrature).
    A = _indefinite(80) / 50
    v0 = torch.randn(80, generator=torch.Generator().manual_seed(0), dtype=DT)
    q = v0 / v0.norm()
    for reorth in (True, False):
        alpha, beta = lanczos_tridiagonal(A, 6, v0=v0, reorthogonalize=reorth)
        assert alpha.shape == (6,) and beta.shape == (5,)
        T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
        for j in range(1, 12):
            lhs = torch.linalg.matrix_power(T, j)[0, 0]
            rhs = q @ torch.linalg.matrix_power(A, j) @ q
            torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)


def test_tridiagonal_full_length_and_breakdown():
    A = with_spectrum(torch.arange(1.0, 31.0, dtype=DT))
    v0 = torch.randn(30, generator=torch.Generator().manual_seed(1), dtype=DT)
    alpha, beta = lanczos_tridiagonal(A, 50, v0=v0)  # m > n is reduced to n
    assert alpha.shape == (30,)
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    torch.testing.assert_close(torch.linalg.eigvalsh(T), torch.arange(1.0, 31.0, dtype=DT), rtol=1e-10, atol=0)
    # Three distinct eigenvalues: invariant after three steps.
    B = with_spectrum(torch.tensor([2.0] * 10 + [-1.0] * 10 + [0.5] * 10, dtype=DT))
    alpha, beta = lanczos_tridiagonal(B, 10, v0=v0)
    assert alpha.shape == (3,) and beta.shape == (2,)


def test_bad_input():
    A = _indefinite(20)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 20\], got 0"):
        lanczos(A, k=0)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 20\], got 21"):
        lanczos(A, k=21)
    with pytest.raises(TypeError, match="k must be an int, got float"):
        lanczos(A, k=2.0)
    with pytest.raises(ValueError, match=r"which must be one of .*'largest'.*got 'LM'"):
        lanczos(A, which="LM")
    with pytest.raises(ValueError, match="tol must be a finite number > 0, got -1.0"):
        lanczos(A, tol=-1.0)
    with pytest.raises(ValueError, match=r"maxiter must be an int in \[3, inf\], got 2"):
        lanczos(A, k=3, maxiter=2)
    with pytest.raises(ValueError, match="A must be symmetric"):
        lanczos(torch.triu(A))
    with pytest.raises(ValueError, match="A must be symmetric.*is_symmetric=False"):
        lanczos(LinearOperator((20, 20), lambda x: A @ x, dtype=DT))
    with pytest.raises(ValueError, match=r"A must be a non-empty square operator, got shape \(20, 10\)"):
        lanczos(A[:, :10])
    with pytest.raises(ValueError, match="A must be a LinearOperator or a 2-D tensor, got a 3-D tensor"):
        lanczos(A[None])
    with pytest.raises(TypeError, match="A must be a LinearOperator or a 2-D tensor, got list"):
        lanczos([[1.0]])
    with pytest.raises(ValueError, match=r"v0 must have shape \(20,\)"):
        lanczos(A, v0=torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="v0 must be a non-zero vector"):
        lanczos(A, v0=torch.zeros(20, dtype=DT))
    with pytest.raises(TypeError, match="v0 has dtype torch.float32 but A works in torch.float64"):
        lanczos(A, v0=torch.ones(20))
    with pytest.raises(ValueError, match=r"seed must be an int in \[0,"):
        lanczos(A, seed=-1)
    with pytest.raises(ValueError, match="A returned non-finite values"):
        lanczos(LinearOperator((20, 20), lambda x: x * math.nan, dtype=DT, symmetric=True))
    with pytest.raises(ValueError, match=r"m must be an int in \[1, inf\], got 0"):
        lanczos_tridiagonal(A, 0, v0=torch.ones(20, dtype=DT))
