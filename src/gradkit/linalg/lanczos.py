"""Lanczos eigensolver with full reorthogonalisation, and the bare tridiagonalisation used by
stochastic Lanczos quadrature (:mod:`gradkit.linalg.density`)."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from gradkit._checks import check_int, check_positive_float
from gradkit.linalg._random import (
    apply,
    as_square_operator,
    check_seed,
    make_generator,
)
from gradkit.linalg.operator import LinearOperator

__all__ = ["lanczos", "lanczos_tridiagonal"]

logger = logging.getLogger("gradkit")

_WHICH = ("largest", "smallest", "both")


def _check_v0(v0: Any, op: LinearOperator, name: str = "v0") -> Tensor:
    n = op.shape[0]
    if not isinstance(v0, Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({n},), got {type(v0).__name__}")
    if v0.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match A of shape {op.shape}, got {tuple(v0.shape)}")
    if v0.dtype != op.dtype:
        raise TypeError(f"{name} has dtype {v0.dtype} but A works in {op.dtype}")
    if v0.device != op.device:
        raise ValueError(f"{name} is on device {v0.device} but A is on {op.device}")
    if not bool(torch.isfinite(v0).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    norm = v0.norm()
    if float(norm) == 0.0:
        raise ValueError(f"{name} must be a non-zero vector, got the zero vector")
    return v0 / norm


def _orthogonalise(w: Tensor, Q: Tensor, scale: float) -> tuple[Tensor, Tensor, bool]:
    """Classical Gram-Schmidt of ``w`` against the orthonormal columns of ``Q``, applied twice
    ("twice is enough": Giraud, Langou & Rozloznik 2005).  Returns ``(w - Q h, h, dependent)``;
    ``dependent`` says ``w`` was numerically in the span of ``Q`` (the Krylov space is invariant):
    the second pass removed more than ``1 - 1/sqrt(2)`` of what the first left (Kahan's
    criterion), or what is left is at the rounding level ``10 sqrt(n) eps scale`` of a product
    with an ``n x n`` operator (``scale = ||A q||``)."""
    h = Q.T @ w
    w = w - Q @ h
    norm1 = float(w.norm())
    h2 = Q.T @ w
    w = w - Q @ h2
    norm2 = float(w.norm())
    eps = torch.finfo(w.dtype).eps
    dependent = norm2 < norm1 / math.sqrt(2) or norm2 <= 10 * math.sqrt(w.shape[0]) * eps * scale
    return w, h + h2, dependent


def lanczos(
    A: LinearOperator | Tensor,
    k: int = 6,
    which: str = "largest",
    *,
    tol: float = 1e-8,
    maxiter: int | None = None,
    seed: int = 0,
    v0: Tensor | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""``k`` extreme eigenpairs of a symmetric operator by the Lanczos method with full
    reorthogonalisation.

    Lanczos (1950), "An iteration method for the solution of the eigenvalue problem of linear
    differential and integral operators", J. Res. Nat. Bur. Standards 45; the convergence test
    and the reorthogonalisation follow Parlett, *The Symmetric Eigenvalue Problem* (1998), ch. 13.

    From a unit start vector :math:`q_1` (``v0``, or a seeded Gaussian vector), ``m`` steps
    build an orthonormal basis :math:`Q_m = [q_1, \dots, q_m]` of the Krylov space
    :math:`\mathcal K_m(A, q_1)` and the tridiagonal :math:`T_m = Q_m^\top A Q_m` with

    .. math::  A Q_m = Q_m T_m + \beta_m q_{m+1} e_m^\top .

    Each new vector is orthogonalised against *all* previous ones (classical Gram-Schmidt,
    twice), so :math:`Q_m` stays orthonormal to working precision and no spurious copies of
    converged eigenvalues appear.  With :math:`T_m = S \Theta S^\top`, the Ritz pairs
    :math:`(\theta_i, Q_m s_i)` have residual :math:`\|A y_i - \theta_i y_i\| = |\beta_m s_{m,i}|`;
    the run stops when every wanted pair satisfies

    .. math::  |\beta_m s_{m,i}| \le \max(\mathrm{tol}\,|\theta_i|,\; 100\,\epsilon\,\|T_m\|)

    (:math:`\epsilon` the machine epsilon of ``A.dtype``; the second term is the accuracy the
    dtype can reach and only matters for eigenvalues near zero or float32 operators).  Then
    :math:`|\lambda - \theta_i| \le |\beta_m s_{m,i}|`.  The test runs every step while
    ``m < 20`` and every ``min(5, m // 10)`` steps after.

    If :math:`\beta_j \approx 0` (the Krylov space is invariant: low-rank operators, the
    identity, ...) the run continues from a new seeded random vector orthogonal to the basis,
    with :math:`T` block-diagonal; that is how repeated eigenvalues of such operators are found.
    A block grown from a random vector reaches every distinct eigenvalue left in its space, so
    its extreme Ritz values bound the rest: the run stops at an invariant block only if its
    extreme eigenvalues do not go past the k-th wanted ones, and after a restart it also waits
    for the current block's extreme Ritz pairs to meet the test below.
    Note that, as for every single-vector Krylov method (ARPACK included), an eigenvalue of
    multiplicity ``r > 1`` whose eigenspace the Krylov space does not exhaust is found **once**;
    close but distinct eigenvalues (clusters) are resolved.

    Args:
        A: symmetric :class:`~gradkit.linalg.LinearOperator` (``is_symmetric=True``) or a
            symmetric 2-D tensor, of size ``n x n``.
        k: number of eigenpairs, ``1 <= k <= n``.
        which: ``"largest"`` / ``"smallest"`` algebraic eigenvalues, or ``"both"``: the
            ``ceil(k/2)`` largest and the ``floor(k/2)`` smallest.
        tol: relative residual tolerance (above).
        maxiter: largest Krylov dimension, i.e. most operator products (one per step, plus
            none for the check); default ``min(n, max(200, 30 k))``.  The basis is kept in memory
            and grows with the steps taken, up to ``n x maxiter`` (no restarts); the check
            usually stops the run long before.  Must be ``>= k``.
        seed: seed of the :class:`torch.Generator` (on ``A.device``) drawing the start vector
            and any restart vectors.
        v0: start vector of shape ``(n,)`` (normalised here); overrides the seeded one.
        progress: show a ``tqdm`` bar over the Lanczos steps.

    Returns:
        ``(eigenvalues, eigenvectors)``: shape ``(k,)`` sorted by **decreasing** value, and
        ``(n, k)`` with orthonormal columns in the same order, in ``A``'s dtype and device.

    Warns:
        RuntimeWarning: when ``maxiter`` steps did not meet ``tol``; the best Ritz pairs are
        returned and the warning gives the worst relative residual.

    When ``2 k >= n`` the Krylov space would be (almost) the whole space anyway; the operator
    is then formed densely (``n`` products) and diagonalised with :func:`torch.linalg.eigh`.
    """
    op = as_square_operator(A, symmetric=True)
    n = op.shape[0]
    k = check_int(k, "k", low=1, high=n)
    if not isinstance(which, str) or which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    tol = check_positive_float(tol, "tol")
    seed = check_seed(seed)
    if maxiter is None:
        m_max = min(n, max(200, 30 * k))
    else:
        m_max = min(n, check_int(maxiter, "maxiter", low=k))
    q0 = _check_v0(v0, op) if v0 is not None else None
    progress = bool(progress)
    n_top = {"largest": k, "smallest": 0, "both": (k + 1) // 2}[which]
    n_bottom = k - n_top

    if 2 * k >= n:
        logger.debug("lanczos: k=%d >= n/2 with n=%d, using a dense eigendecomposition", k, n)
        M = op.to_dense()
        evals, evecs = torch.linalg.eigh((M + M.T) / 2)
        idx = list(range(n - n_top, n))[::-1] + list(range(n_bottom))[::-1]
        return evals[idx], evecs[:, idx]

    dtype, device = op.dtype, op.device
    eps = torch.finfo(dtype).eps
    gen = make_generator(seed, device)
    if q0 is None:
        q0 = torch.randn(n, generator=gen, dtype=dtype, device=device)
        q0 = q0 / q0.norm()

    cap = min(m_max + 1, max(2 * k + 2, 32))
    Q = torch.empty(n, cap, dtype=dtype, device=device)
    Q[:, 0] = q0
    # Upper Hessenberg H[:m+1, :m] = Q_{m+1}^T A Q_m (tridiagonal up to rounding), on the CPU in
    # float64: it is small, and its eigendecomposition should not add float32 error.
    H = torch.zeros(m_max + 1, m_max + 1, dtype=torch.float64)
    m, exhausted, converged = 0, False, False
    block = 0  # first column of the current Lanczos block (a restart opens a new one)
    scale = 0.0  # the largest ||A q|| so far: the rounding level of the products (a null-space q has ~0)
    user_start = v0 is not None  # a given start need not reach every distinct eigenvalue
    theta = S = res = thresh = idx = torch.empty(0)
    bar = tqdm(total=m_max, desc="lanczos", disable=not progress, leave=False)

    def ritz(invariant: bool) -> bool:
        """Ritz pairs of T_m (wanted ones in ``idx``) and whether the run has converged: every
        wanted pair meets the test, and so do the extreme pairs of the current block, which bound
        what the rest of the space holds (a block grown from a random vector reaches every
        distinct eigenvalue left).  An invariant block (exact pairs) whose extreme value goes past
        the k-th wanted one leaves the rest of the space open (a repeated eigenvalue): go on."""
        nonlocal theta, S, idx, res, thresh
        T = H[:m, :m]
        theta, S = torch.linalg.eigh((T + T.T) / 2)
        idx = torch.tensor(list(range(m - n_top, m))[::-1] + list(range(n_bottom))[::-1])
        beta_m = 0.0 if invariant else float(H[m, m - 1])
        res = (beta_m * S[m - 1, idx]).abs()
        floor = 100.0 * eps * float(theta.abs().max())
        thresh = torch.clamp(tol * theta[idx].abs(), min=floor)
        logger.debug("lanczos: step %d, worst residual/threshold %.3g", m, float((res / thresh.clamp_min(1e-300)).max()))
        if not bool((res <= thresh).all()):
            return False
        if block == 0 and not invariant:
            return True  # the block's extreme pairs are wanted ones
        Tb = H[block:m, block:m]
        theta_b, S_b = torch.linalg.eigh((Tb + Tb.T) / 2)
        ends = ([(theta_b.numel() - 1, theta[idx[n_top - 1]], 1.0)] if n_top else []) + (
            [(0, theta[idx[n_top]], -1.0)] if n_bottom else [])  # the k-th value from each end
        if invariant and block == 0 and user_start:
            return False
        for i, kth, side in ends:
            if invariant:  # exact, and it bounds the rest of the space: done unless it goes past the k-th value
                if side * float(theta_b[i]) > side * float(kth) + floor:
                    return False
            elif abs(beta_m * float(S_b[-1, i])) > max(tol * abs(float(theta_b[i])), floor):
                return False
        return True

    try:
        for j in range(m_max):
            av = apply(op, Q[:, j : j + 1])[:, 0]
            norm_av = float(av.norm())
            scale = max(scale, norm_av)
            w, h, dependent = _orthogonalise(av, Q[:, : j + 1], scale)
            beta = float(w.norm())
            if not (math.isfinite(beta) and math.isfinite(norm_av)):
                raise ValueError(f"A returned non-finite values (nan or inf) at Lanczos step {j + 1}")
            H[: j + 1, j] = h.to(device="cpu", dtype=torch.float64)
            m = j + 1
            bar.update(1)
            if m == n:
                exhausted = True
            elif dependent:
                # Invariant subspace: done if it shows the rest of the space holds nothing wanted,
                # else continue from a random vector orthogonal to the basis (a new block).
                if m >= k and ritz(invariant=True):
                    converged = True
                    break
                r = torch.randn(n, generator=gen, dtype=dtype, device=device)
                r, _, r_dependent = _orthogonalise(r, Q[:, :m], float(r.norm()))
                logger.debug("lanczos: invariant subspace after %d steps, restarting", m)
                if r_dependent:
                    exhausted = True
                else:
                    Q = _store(Q, m, r / r.norm())
                    block = m
                    continue
            else:
                H[m, j] = beta
                Q = _store(Q, m, w / beta)
            interval = min(5, max(1, m // 10))
            if m >= k and (m % interval == 0 or m == m_max or exhausted):
                converged = ritz(invariant=exhausted)
            if converged or exhausted:
                break
    finally:
        bar.close()

    if not (converged or exhausted):
        rel = float((res / theta[idx].abs().clamp_min(1e-300)).max())
        detail = (f"the Krylov space turned invariant at step {m}, with the rest of the space unexplored"
                  if block == m else f"worst residual |beta_m s_mi| = {float(res.max()):.3g} (relative {rel:.3g}, "
                  f"tol={tol:g})")
        warnings.warn(f"lanczos did not converge in maxiter={m_max} steps: {detail}; increase maxiter or tol",
                      RuntimeWarning, stacklevel=2)
    vecs = Q[:, :m] @ S[:, idx].to(dtype=dtype, device=device)
    return theta[idx].to(dtype=dtype, device=device), vecs


def _store(Q: Tensor, col: int, q: Tensor) -> Tensor:
    """Write ``q`` into column ``col`` of ``Q``, doubling its capacity when full; returns the
    (possibly reallocated) basis."""
    if col >= Q.shape[1]:
        Q = torch.cat([Q, torch.empty_like(Q)], dim=1)  # amortised O(1) growth
    Q[:, col] = q
    return Q


def lanczos_tridiagonal(
    A: LinearOperator | Tensor,
    m: int,
    *,
    v0: Tensor,
    reorthogonalize: bool = True,
) -> tuple[Tensor, Tensor]:
    r"""The ``m``-step Lanczos tridiagonal :math:`T_m` of ``A`` from the start vector ``v0``.

    Lanczos (1950); as used by stochastic Lanczos quadrature (Lin, Saad & Yang 2016,
    arXiv:1308.5467): with :math:`q_1 = v_0/\|v_0\|`, :math:`\beta_0 = 0`,

    .. math::
        \alpha_j = q_j^\top A q_j,\quad
        \beta_j q_{j+1} = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1},

    and :math:`T_m = \mathrm{tridiag}(\beta, \alpha, \beta)`.  Its eigenvalues :math:`\theta_i`
    and squared first eigenvector components :math:`\tau_i = s_{1,i}^2` are the nodes and
    weights of the Gauss quadrature of the spectral measure of ``A`` seen from :math:`q_1`:
    :math:`q_1^\top f(A) q_1 \approx \sum_i \tau_i f(\theta_i)`.

    Args:
        A: symmetric operator or tensor ``n x n``.
        m: number of steps (operator products); values above ``n`` are reduced to ``n``.
        v0: non-zero start vector of shape ``(n,)``.
        reorthogonalize: orthogonalise each new vector against all previous ones (twice),
            keeping the ``n x m`` basis; ``False`` keeps only two vectors (plain three-term
            recurrence, memory ``O(n)``, with the usual loss of orthogonality).

    Returns:
        ``(alpha, beta)``: the diagonal, shape ``(m',)``, and off-diagonal, shape ``(m'-1,)``,
        with ``m' = m`` unless the Krylov space became invariant after ``m' < m`` steps
        (``beta`` ~ 0), in which case the quadrature is already exact and the run stops.
    """
    op = as_square_operator(A, symmetric=True)
    n = op.shape[0]
    m = min(check_int(m, "m", low=1), n)
    q = _check_v0(v0, op)
    reorthogonalize = bool(reorthogonalize)
    eps = torch.finfo(op.dtype).eps
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    Q = torch.empty(n, m, dtype=op.dtype, device=op.device) if reorthogonalize else None
    q_prev: Tensor | None = None
    for j in range(m):
        if Q is not None:
            Q[:, j] = q
        av = apply(op, q[:, None])[:, 0]
        norm_av = float(av.norm())
        if not math.isfinite(norm_av):
            raise ValueError(f"A returned non-finite values (nan or inf) at Lanczos step {j + 1}")
        alpha = q @ av
        w = av - alpha * q
        if q_prev is not None:
            w = w - betas[-1] * q_prev
        dependent = False
        if Q is not None:
            w, h, dependent = _orthogonalise(w, Q[:, : j + 1], norm_av)
            alpha = alpha + h[j]
        alphas.append(alpha)
        if j == m - 1:
            break
        beta = w.norm()
        if dependent or float(beta) <= 10 * math.sqrt(n) * eps * norm_av:
            logger.debug("lanczos_tridiagonal: invariant Krylov space after %d steps", j + 1)
            break
        betas.append(beta)
        q_prev, q = q, w / beta
    alpha_t = torch.stack(alphas)
    beta_t = torch.stack(betas) if betas else alpha_t.new_zeros(0)
    return alpha_t, beta_t
