"""Krylov solvers for ``A x = b`` on :class:`~gradkit.linalg.operator.LinearOperator`\\ s.

:func:`cg` (symmetric positive definite ``A``), :func:`minres` (symmetric indefinite),
:func:`gmres` (square), :func:`normal_cg` (least squares, rectangular ``A``) and :func:`neumann`
(truncated Neumann series, for implicit hypergradients).

Common conventions:

* ``A``: a :class:`LinearOperator`, a 2-D tensor, or (except ``normal_cg``) a callable matvec
  ``(n,) -> (n,)``, wrapped with ``b``'s dtype and device (symmetric for ``cg``/``minres``).
* ``b``: shape ``(n,)`` or ``(n, k)``; ``k`` systems are solved at once, results are per column.
* ``damping`` solves ``(A + damping I) x = b``.
* A column has converged when ``||b - A x||_2 <= max(rtol ||b||_2, atol)``.  The recursive
  residual triggers the stop; the true residual is then recomputed (one operator application,
  not counted) and the solver restarts from it if rounding left it above the tolerance, so
  ``residual_norm`` and ``converged`` describe the true residual.
* ``maxiter`` counts operator applications of the main loop (``gmres``: Arnoldi steps over all
  cycles, not cycles as in SciPy); default ``10 n``: exact arithmetic needs at most ``n``, but
  rounding delays convergence (SciPy's CG also uses ``10 n``).  For columns solved one after
  another (``minres``, ``gmres``), ``iterations`` is the largest count.
* Not converging, or a breakdown (``p^T A p <= 0`` in CG, an indefinite preconditioner), warns
  (:class:`RuntimeWarning`) and returns ``converged=False``.
* Autograd flows through the iterations (the solve is differentiated as unrolled).
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradkit.linalg.operator import DenseOperator, LinearOperator

__all__ = ["SolveResult", "cg", "minres", "gmres", "normal_cg", "neumann"]

logger = logging.getLogger("gradkit")

Apply = Callable[[Tensor], Tensor]
# inner(R, X, tol, active, budget) -> (X, iterations, breakdown message or None)
Inner = Callable[[Tensor, Tensor, Tensor, Tensor, int], tuple[Tensor, int, "str | None"]]


class SolveResult(NamedTuple):
    """What a solver returns.

    Attributes:
        x: the solution, same shape as ``b`` (``(n,)`` or ``(n, k)``).
        iterations: operator applications of the main loop.
        residual_norm: final ``||b - (A + damping I) x||_2``; a 0-d tensor for ``(n,)`` ``b``,
            one value per column for ``(n, k)`` ``b``.  (:func:`normal_cg` reports the residual
            of the normal equations.)
        converged: every column reached its tolerance.
    """

    x: Tensor
    iterations: int
    residual_norm: Tensor
    converged: bool


class _Problem(NamedTuple):
    op: LinearOperator
    B: Tensor  # (m, k) right-hand sides
    X: Tensor  # (n, k) initial guesses
    has_x0: bool
    vector: bool  # b was (n,)


def _check_scalar(method: str, name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{method}: {name} must be a real number >= 0, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{method}: {name} must be a finite number >= 0, got {value!r}")


def _check_int(method: str, name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{method}: {name} must be an integer >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{method}: {name} must be an integer >= {minimum}, got {value!r}")


def _check_vector(method: str, name: str, t: Any, shape: tuple[int, ...], op: LinearOperator) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{method}: {name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{method}: {name} has shape {tuple(t.shape)}, expected {shape} for A of shape {op.shape}")
    if t.dtype != op.dtype:
        raise TypeError(f"{method}: {name} has dtype {t.dtype} but A works in {op.dtype}")
    if t.device != op.device:
        raise ValueError(f"{method}: {name} is on device {t.device} but A is on {op.device}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{method}: {name} contains non-finite values (nan or inf)")


def _as_operator(method: str, A: Any, b: Tensor, *, symmetric: bool, callable_ok: bool) -> LinearOperator:
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, Tensor):
        if A.ndim != 2:
            raise ValueError(f"{method}: A as a tensor must be a 2-D matrix, got shape {tuple(A.shape)}")
        if not bool(torch.isfinite(A).all()):  # before the symmetry check, which nan would fail
            raise ValueError(f"{method}: A contains non-finite values (nan or inf)")
        return DenseOperator(A)
    if callable(A) and callable_ok:
        n = b.shape[0]
        return LinearOperator((n, n), A, dtype=b.dtype, device=b.device, symmetric=symmetric)
    accepted = "a LinearOperator, a 2-D tensor" + (" or a callable matvec" if callable_ok else "")
    raise TypeError(f"{method}: A must be {accepted}, got {type(A).__name__}")


def _prepare(
    method: str, A: Any, b: Any, x0: Any, *, rtol: Any, atol: Any, damping: Any, maxiter: Any,
    symmetric: bool = False, square: bool = True,
) -> _Problem:
    """Validate the arguments every solver shares; return the operator and ``(., k)`` blocks."""
    _check_scalar(method, "rtol", rtol, allow_none=method == "neumann")
    _check_scalar(method, "atol", atol)
    _check_scalar(method, "damping", damping)
    if maxiter is not None:
        _check_int(method, "maxiter", maxiter, minimum=0)
    if not isinstance(b, Tensor):
        raise TypeError(f"{method}: b must be a torch.Tensor of shape (n,) or (n, k), got {type(b).__name__}")
    if b.ndim not in (1, 2):
        raise ValueError(f"{method}: b must have shape (n,) or (n, k), got shape {tuple(b.shape)}")
    if not b.is_floating_point():
        raise TypeError(f"{method}: b must have a floating-point dtype, got {b.dtype}")
    op = _as_operator(method, A, b, symmetric=symmetric, callable_ok=square)
    m, n = op.shape
    if square and m != n:
        raise ValueError(f"{method}: A must be square, got shape {op.shape}; use normal_cg for rectangular A")
    if symmetric and not op.is_symmetric:
        raise ValueError(f"{method}: A must be symmetric, but its is_symmetric is False. For a non-symmetric A use "
                         "gmres (square) or normal_cg (least squares); if A is symmetric, declare it with "
                         "symmetric=True (LinearOperator(..., symmetric=True) or DenseOperator(A, symmetric=True))")
    _check_vector(method, "b", b, (m,) + tuple(b.shape[1:]), op)
    k = b.shape[1] if b.ndim == 2 else 1
    B = b.reshape(m, k)
    if x0 is None:
        X = torch.zeros(n, k, dtype=b.dtype, device=b.device)
    else:
        _check_vector(method, "x0", x0, (n,) + tuple(b.shape[1:]), op)
        X = x0.reshape(n, k)
    return _Problem(op, B, X, x0 is not None, b.ndim == 1)


def _checked(method: str, what: str, fn: Apply) -> Apply:
    """``fn`` on ``(n, k)`` blocks, refusing an output of another shape."""

    def apply(X: Tensor) -> Tensor:
        Y = fn(X)
        if not isinstance(Y, Tensor) or Y.shape != X.shape:
            got = tuple(Y.shape) if isinstance(Y, Tensor) else type(Y).__name__
            raise RuntimeError(f"{method}: {what} returned {got} for input {tuple(X.shape)}")
        return Y

    return apply


def _damped(method: str, op: LinearOperator, damping: float) -> Apply:
    """``X -> (A + damping I) X`` on ``(n, k)`` blocks."""
    return _checked(method, "A", lambda X: op._matmat(X) + damping * X if damping else op._matmat(X))


def _as_preconditioner(method: str, M: Any, op: LinearOperator) -> Apply:
    n = op.shape[1]
    if M is None:
        return lambda X: X
    if isinstance(M, Tensor):
        if M.ndim != 2:
            raise ValueError(f"{method}: M as a tensor must be a 2-D matrix, got shape {tuple(M.shape)}")
        M = DenseOperator(M)
    if isinstance(M, LinearOperator):
        if M.shape != (n, n):
            raise ValueError(f"{method}: M has shape {M.shape}, expected {(n, n)} to match A")
        if M.dtype != op.dtype or M.device != op.device:
            raise TypeError(f"{method}: M works in {M.dtype} on {M.device}, A in {op.dtype} on {op.device}")
        return M._matmat
    if callable(M):
        return _checked(method, "the preconditioner M", M)
    accepted = "a LinearOperator, a 2-D tensor or a callable on (n, k)"
    raise TypeError(f"{method}: M must be {accepted}, got {type(M).__name__}")


def _dot(X: Tensor, Y: Tensor) -> Tensor:
    return (X * Y).sum(dim=0)


def _norm(X: Tensor) -> Tensor:
    return torch.linalg.vector_norm(X, dim=0)


def _krylov(
    method: str, prob: _Problem, inner: Inner, apply: Apply, rtol: float, atol: float, maxiter: int | None,
    columnwise: bool = False,
) -> SolveResult:
    """Run ``inner(R, X, tol, active, budget) -> (X, iterations, breakdown)`` from the true
    residual ``R = B - A X``, and again from the recomputed true residual while rounding leaves it
    above ``tol`` and iterations remain; all columns at once, or one after another."""
    maxiter = 10 * prob.op.shape[1] if maxiter is None else maxiter
    tol = torch.clamp(rtol * _norm(prob.B), min=atol)
    xs, rs, iters, breakdown = [], [], 0, None
    for c in [slice(j, j + 1) for j in range(prob.B.shape[1])] if columnwise else [slice(None)]:
        B, X, it, bd = prob.B[:, c], prob.X[:, c], 0, None
        if prob.has_x0:  # a zero right-hand side is solved exactly by x = 0 (its tolerance rtol ||b|| is 0)
            X = torch.where(_norm(B) == 0, torch.zeros_like(X), X)
        R = B - apply(X) if prob.has_x0 else B
        while bd is None and it < maxiter:
            active = _norm(R) > tol[c]
            if not bool(active.any()):
                break
            X, used, bd = inner(R, X, tol[c], active, maxiter - it)
            it += used
            R = B - apply(X)
            if used == 0:
                break
        xs.append(X)
        rs.append(R)
        iters, breakdown = max(iters, it), breakdown or bd
    res = _norm(torch.cat(rs, dim=1))
    return _finish(method, torch.cat(xs, dim=1), res, tol, iters, maxiter, prob.vector, breakdown, 4)


def _finish(
    method: str, X: Tensor, res: Tensor, tol: Tensor, iters: int, maxiter: int, vector: bool,
    breakdown: str | None, stacklevel: int = 3,
) -> SolveResult:
    converged = breakdown is None and bool((res <= tol).all())
    worst = int(torch.argmax(res - tol)) if res.numel() else 0
    if not converged:
        what = (f"stopped after {iters} iterations: {breakdown}" if breakdown
                else f"did not converge in {iters} iterations (maxiter={maxiter})")
        col = "" if vector else f" in column {worst}"
        residual, tolerance = float(res[worst].detach()), float(tol[worst].detach())  # detach: may be differentiated
        msg = f"{method} {what}; residual norm {residual:.3e}{col}, tolerance {tolerance:.3e}"
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)
    logger.debug("%s: %d iterations, residual %s, converged=%s", method, iters, res.tolist(), converged)
    x = X.squeeze(1) if vector else X
    return SolveResult(x, iters, res.squeeze(0) if vector else res, converged)


def _masked_div(num: Tensor, den: Tensor, active: Tensor) -> Tensor:
    """``num / den`` on active columns, 0 elsewhere (no nan, also in autograd)."""
    return torch.where(active, num / torch.where(active, den, torch.ones_like(den)), torch.zeros_like(den))


def _log_iteration(method: str, it: int, R: Tensor) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s: iteration %d, residual %s", method, it, _norm(R).tolist())


def _cg_inner(method: str, apply: Apply, precond: Apply) -> Inner:
    def inner(R: Tensor, X: Tensor, tol: Tensor, active: Tensor, budget: int) -> tuple[Tensor, int, str | None]:
        P = Z = precond(R)
        rz = _dot(R, Z)
        breakdown, it = None, 0
        while it < budget:
            bad = active & ~(rz > 0)
            if bool(bad.any()):
                breakdown = f"r^T M r = {float(rz[bad][0]):.3e} <= 0: M is not positive definite"
                active = active & ~bad
                if not bool(active.any()):
                    break
            Q = apply(P)
            pq = _dot(P, Q)
            bad = active & ~(pq > 0)  # also catches nan
            if bool(bad.any()):
                breakdown = (f"p^T A p = {float(pq[bad][0]):.3e} <= 0: A (with damping) is not positive "
                             "definite; use minres for symmetric indefinite A")
                active = active & ~bad
                if not bool(active.any()):
                    break
            alpha = _masked_div(rz, pq, active)
            X = X + alpha * P
            R = R - alpha * Q
            it += 1
            _log_iteration(method, it, R)
            active = active & (_norm(R) > tol)
            if not bool(active.any()):
                break
            Z = precond(R)
            rz_new = _dot(R, Z)
            beta = _masked_div(rz_new, rz, active)
            P = Z + beta * P
            rz = rz_new
        return X, it, breakdown

    return inner


def cg(
    A: Any, b: Tensor, *, x0: Tensor | None = None, M: Any = None, rtol: float = 1e-6,
    atol: float = 0.0, maxiter: int | None = None, damping: float = 0.0,
) -> SolveResult:
    """Preconditioned conjugate gradient for symmetric positive-definite systems.

    Hestenes & Stiefel (1952), "Methods of conjugate gradients for solving linear systems",
    J. Res. Nat. Bur. Standards 49(6), 409-436 (pre-arXiv), the CG recurrences with a
    preconditioner ``M ~ (A + damping I)^{-1}``; with ``A_d = A + damping I``::

        r_0 = b - A_d x_0,  z_0 = M r_0,  p_0 = z_0
        alpha_i = r_i^T z_i / p_i^T A_d p_i
        x_{i+1} = x_i + alpha_i p_i,   r_{i+1} = r_i - alpha_i A_d p_i
        z_{i+1} = M r_{i+1},   beta_i = r_{i+1}^T z_{i+1} / r_i^T z_i,   p_{i+1} = z_{i+1} + beta_i p_i

    With ``b`` of shape ``(n, k)`` the ``k`` recurrences run at once (one block application of
    ``A`` per iteration) with per-column ``alpha``/``beta``; a column that has converged stops
    changing.  In exact arithmetic CG terminates in at most ``n`` iterations.

    Args:
        A: the symmetric positive-definite operator ``A`` (``LinearOperator`` with
            ``is_symmetric`` True, symmetric 2-D tensor, or callable matvec taken as symmetric).
        b: right-hand side(s) ``b``, shape ``(n,)`` or ``(n, k)``.
        x0: initial guess ``x_0`` (default zeros), shape of ``b``.
        M: symmetric positive-definite preconditioner ``M`` approximating ``A_d^{-1}``
            (``LinearOperator``, 2-D tensor, or callable on ``(n, k)`` blocks).
        rtol, atol, maxiter: stop when ``||r_i|| <= max(rtol ||b||, atol)`` in every column, or
            after ``maxiter`` iterations (default ``10 n``).
        damping: ``damping >= 0`` in ``A_d``.

    ``p^T A_d p <= 0`` (``A`` not positive definite) stops that column with a warning
    suggesting :func:`minres`, and ``converged=False``.
    """
    prob = _prepare("cg", A, b, x0, rtol=rtol, atol=atol, damping=damping, maxiter=maxiter, symmetric=True)
    apply = _damped("cg", prob.op, damping)
    inner = _cg_inner("cg", apply, _as_preconditioner("cg", M, prob.op))
    return _krylov("cg", prob, inner, apply, rtol, atol, maxiter)


def normal_cg(
    A: Any, b: Tensor, *, x0: Tensor | None = None, rtol: float = 1e-6, atol: float = 0.0,
    maxiter: int | None = None, damping: float = 0.0,
) -> SolveResult:
    """Conjugate gradient on the normal equations (CGNR), for least squares and rectangular ``A``.

    Hestenes & Stiefel (1952) (pre-arXiv; see :func:`cg`), CG applied to the symmetric
    positive-(semi)definite normal equations ::

        (A^T A + damping I) x = A^T b,

    whose solution minimises ``||A x - b||^2 + damping ||x||^2`` (ridge regression when
    ``damping > 0``).  Each iteration applies ``A`` and ``A^T`` once.

    The condition number of ``A^T A`` is the *square* of that of ``A``: convergence is slower and
    accuracy lower than working on ``A`` itself (prefer :func:`cg` for SPD, :func:`gmres` for
    square non-symmetric ``A``).

    Args:
        A: an ``(m, n)`` operator whose transpose is available (``LinearOperator`` that is
            symmetric or has ``rmatvec``/``_rmatmat``, or a 2-D tensor); a bare callable is
            refused because it gives no transpose.
        b: right-hand side(s), shape ``(m,)`` or ``(m, k)``.
        x0: initial guess, shape ``(n,)`` or ``(n, k)``.
        rtol, atol: stop when the normal-equation residual
            ``||A^T b - (A^T A + damping I) x|| <= max(rtol ||A^T b||, atol)``; this is also the
            ``residual_norm`` reported (for an inconsistent system ``b - A x`` never vanishes).
        maxiter: most iterations (default ``10 n``).
        damping: ridge parameter ``damping >= 0``.
    """
    prob = _prepare("normal_cg", A, b, x0, rtol=rtol, atol=atol, damping=damping, maxiter=maxiter, square=False)
    op = prob.op
    try:
        Bn = op._rmatmat(prob.B)
    except NotImplementedError as err:
        raise ValueError(f"normal_cg needs the transpose A^T: {err}; build the operator with rmatvec=") from err

    normal = lambda X: op._rmatmat(op._matmat(X))  # noqa: E731
    apply = _checked("normal_cg", "A^T A", lambda X: normal(X) + damping * X if damping else normal(X))
    inner = _cg_inner("normal_cg", apply, lambda X: X)
    return _krylov("normal_cg", prob._replace(B=Bn), inner, apply, rtol, atol, maxiter)


def _minres_inner(apply: Apply, precond: Apply) -> Inner:
    def inner(R: Tensor, X: Tensor, tol: Tensor, active: Tensor, budget: int) -> tuple[Tensor, int, str | None]:
        # Preconditioned Lanczos (r1, r2, y = M r2, beta = sqrt(r2^T M r2)) and the QR
        # factorisation of its tridiagonal by Givens rotations (cs, sn), one column at a time.
        y = precond(R)
        beta_sq = _dot(R, y)[0]
        if not float(beta_sq) > 0:
            return X, 0, f"r^T M r = {float(beta_sq):.3e} <= 0: M is not positive definite"
        oldb = phibar = beta = torch.sqrt(beta_sq)
        r1 = r2 = res = R
        cs, sn = -torch.ones_like(beta), torch.zeros_like(beta)
        dbar = epsln = torch.zeros_like(beta)
        w = w2 = Aw = Aw2 = torch.zeros_like(R)
        for it in range(1, budget + 1):
            v = y / beta
            Av = apply(v)
            y = Av - (beta / oldb) * r1 if it > 1 else Av
            alpha = _dot(v, y)[0]
            y = y - (alpha / beta) * r2
            r1, r2 = r2, y
            y = precond(r2)
            oldb = beta
            beta_sq = _dot(r2, y)[0]
            if float(beta_sq) < 0:
                return X, it - 1, f"r^T M r = {float(beta_sq):.3e} < 0: M is not positive definite"
            beta = torch.sqrt(beta_sq)
            # previous rotation on the new column (epsln, delta, gbar), then a new rotation.
            oldeps = epsln
            delta = cs * dbar + sn * alpha
            gbar = sn * dbar - cs * alpha
            epsln = sn * beta
            dbar = -cs * beta
            gamma = torch.hypot(gbar, beta)
            if not float(gamma) > 0:
                return X, it, "the tridiagonal became singular (A is singular on the Krylov space)"
            cs, sn = gbar / gamma, beta / gamma
            phi, phibar = cs * phibar, sn * phibar
            # search directions w and their images A w (to track the true-norm residual).
            w1, w2 = w2, w
            w = (v - oldeps * w1 - delta * w2) / gamma
            Aw1, Aw2 = Aw2, Aw
            Aw = (Av - oldeps * Aw1 - delta * Aw2) / gamma
            X = X + phi * w
            res = res - phi * Aw
            _log_iteration("minres", it, res)
            if bool((_norm(res) <= tol).all()) or not float(beta) > 0:
                return X, it, None
        return X, budget, None

    return inner


def minres(
    A: Any, b: Tensor, *, x0: Tensor | None = None, M: Any = None, rtol: float = 1e-6,
    atol: float = 0.0, maxiter: int | None = None, damping: float = 0.0,
) -> SolveResult:
    """MINRES for symmetric, possibly indefinite systems.

    Paige & Saunders (1975), "Solution of sparse indefinite systems of linear equations",
    SIAM J. Numer. Anal. 12(4), 617-629 (pre-arXiv).  Iterate ``k`` minimises the residual over
    the Krylov space: with ``A_d = A + damping I``,

        x_k = argmin { ||b - A_d x||_{M} : x in x_0 + K_k(M A_d, M r_0) },

    computed from the (preconditioned) Lanczos tridiagonal ``T_k``, its QR factorisation by
    Givens rotations (``cs``, ``sn``, ``phibar`` in the code) and the three-term update of the
    directions ``w_k``.  The stopping test uses the 2-norm residual, updated through the images
    ``A_d w_k`` (without preconditioner it equals ``phibar``).

    Args:
        A: symmetric operator ``A`` (indefinite allowed).
        b: right-hand side ``b``, shape ``(n,)``, or ``(n, k)`` (columns solved one by one).
        x0: initial guess (default zeros).
        M: symmetric **positive-definite** preconditioner approximating ``A_d^{-1}`` (for an
            indefinite ``A`` e.g. ``|A|^{-1}``).  Detected indefiniteness stops with a warning.
        rtol, atol, maxiter: stop when ``||b - A_d x|| <= max(rtol ||b||, atol)``, or after
            ``maxiter`` iterations per column (default ``10 n``).
        damping: ``damping >= 0`` in ``A_d``.
    """
    prob = _prepare("minres", A, b, x0, rtol=rtol, atol=atol, damping=damping, maxiter=maxiter, symmetric=True)
    apply = _damped("minres", prob.op, damping)
    inner = _minres_inner(apply, _as_preconditioner("minres", M, prob.op))
    return _krylov("minres", prob, inner, apply, rtol, atol, maxiter, columnwise=True)


def _gmres_inner(apply: Apply, precond: Apply, restart: int) -> Inner:
    def inner(R: Tensor, X: Tensor, tol: Tensor, active: Tensor, budget: int) -> tuple[Tensor, int, str | None]:
        # One restart cycle: Arnoldi on A_d M from v_1 = r / ||r||, least squares
        # min ||beta e_1 - H_j y|| kept triangular by Givens rotations.
        beta = _norm(R)[0]
        V, g = [R / beta], [beta]
        cols: list[list[Tensor]] = []  # rotated columns of H (upper triangular part)
        cs, sn = [], []  # Givens rotations
        breakdown, eps = None, torch.finfo(R.dtype).eps
        for j in range(min(restart, budget)):
            w = apply(precond(V[j]))
            w_norm0 = _norm(w)[0]
            h = []
            for vi in V:  # modified Gram-Schmidt
                hij = _dot(vi, w)[0]
                w = w - hij * vi
                h.append(hij)
            Vm = torch.cat(V, dim=1)  # one classical reorthogonalisation pass
            c = Vm.T @ w
            w = w - Vm @ c
            h = [hi + ci for hi, ci in zip(h, c[:, 0])]
            h_next = _norm(w)[0]
            for i in range(j):  # previous rotations
                h[i], h[i + 1] = cs[i] * h[i] + sn[i] * h[i + 1], -sn[i] * h[i] + cs[i] * h[i + 1]
            denom = torch.hypot(h[j], h_next)
            if not float(denom) > 0:
                breakdown = "the Hessenberg matrix became singular (A is singular on the Krylov space)"
                break
            cs.append(h[j] / denom)
            sn.append(h_next / denom)
            h[j] = denom
            cols.append(h)
            g.append(-sn[j] * g[j])
            g[j] = cs[j] * g[j]
            _log_iteration("gmres", j + 1, g[j + 1].reshape(1, 1))
            if float(g[j + 1].abs()) <= float(tol[0]) or float(h_next) <= eps * float(w_norm0):
                break  # converged, or the Krylov space is invariant ("happy breakdown")
            V.append(w / h_next)
        m = len(cols)
        if m == 0:
            return X, 0, breakdown
        zero = torch.zeros_like(beta)
        Rm = torch.stack([torch.stack([cols[c][r] if r <= c else zero for c in range(m)]) for r in range(m)])
        y = torch.linalg.solve_triangular(Rm, torch.stack(g[:m]).unsqueeze(1), upper=True)
        X = X + precond(torch.cat(V[:m], dim=1) @ y)
        return X, m, breakdown

    return inner


def gmres(
    A: Any, b: Tensor, *, x0: Tensor | None = None, M: Any = None, rtol: float = 1e-6,
    atol: float = 0.0, restart: int = 30, maxiter: int | None = None, damping: float = 0.0,
) -> SolveResult:
    """Restarted GMRES(restart) for general square systems.

    Saad & Schultz (1986), "GMRES: a generalized minimal residual algorithm for solving
    nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 7(3), 856-869 (pre-arXiv).
    With right preconditioning ``x = x_0 + M u`` and ``A_d = A + damping I``, each cycle builds
    an orthonormal basis ``V_{j+1}`` of ``K_j(A_d M, r_0)`` by Arnoldi, ``A_d M V_j = V_{j+1} H_j``
    (modified Gram-Schmidt plus one reorthogonalisation pass), and takes

        y_j = argmin_y || beta e_1 - H_j y ||,   beta = ||r_0||,   x_j = x_0 + M V_j y_j,

    solving the small least-squares problem by Givens rotations so that ``|g_{j+1}|`` is the
    residual norm ``||b - A_d x_j||`` at every step.  With the preconditioner on the right, the
    residual tested is the true, unpreconditioned one.
    After ``restart`` steps the cycle restarts from ``x_j``.

    Args:
        A: square operator ``A`` (need not be symmetric).
        b: right-hand side ``b``, shape ``(n,)``, or ``(n, k)`` (columns solved one by one).
        x0: initial guess ``x_0`` (default zeros).
        M: preconditioner approximating ``A_d^{-1}`` (any nonsingular operator).
        rtol, atol: stop when ``||b - A_d x|| <= max(rtol ||b||, atol)``.
        restart: Krylov dimension ``m`` of a cycle (default 30, as SciPy).
        maxiter: most Arnoldi steps over all cycles, per column (default ``10 n``; SciPy's
            ``maxiter`` counts cycles instead).
        damping: ``damping >= 0`` in ``A_d``.
    """
    _check_int("gmres", "restart", restart, minimum=1)
    prob = _prepare("gmres", A, b, x0, rtol=rtol, atol=atol, damping=damping, maxiter=maxiter)
    apply = _damped("gmres", prob.op, damping)
    inner = _gmres_inner(apply, _as_preconditioner("gmres", M, prob.op), restart)
    return _krylov("gmres", prob, inner, apply, rtol, atol, maxiter, columnwise=True)


def neumann(
    A: Any, b: Tensor, *, steps: int = 50, scale: float = 1.0, damping: float = 0.0,
    rtol: float | None = None,
) -> SolveResult:
    """Truncated Neumann series for ``(A + damping I)^{-1} b``.

    Lorraine, Vicol & Duvenaud (2020), "Optimizing millions of hyperparameters by implicit
    differentiation", AISTATS, arXiv:1911.02590, Algorithm 3 (the Neumann approximation of the
    inverse-Hessian-vector product used for implicit hypergradients), with ``alpha = scale``
    and ``A_d = A + damping I``::

        x = scale * sum_{i=0}^{steps} (I - scale * A_d)^i b

    computed by ``v_0 = p_0 = b``, ``v_{i+1} = v_i - scale A_d v_i``, ``p_{i+1} = p_i + v_{i+1}``,
    ``x = scale * p_steps`` (``steps`` operator applications).  The series converges to
    ``A_d^{-1} b`` iff the spectral radius ``rho(I - scale A_d) < 1`` (for SPD ``A``:
    ``0 < scale < 2 / lambda_max(A_d)``); the error is then
    ``x - A_d^{-1} b = -A_d^{-1} (I - scale A_d)^{steps+1} b``, shrinking like ``rho^steps``;
    otherwise it diverges.  A cheap fixed-cost approximation, not an accurate solver.

    Args:
        A: square operator ``A`` (``LinearOperator``, 2-D tensor, or callable matvec).
        b: vector(s) ``b``, shape ``(n,)`` or ``(n, k)``.
        steps: number of terms beyond the first, ``>= 0`` (default 50).
        scale: step size ``alpha > 0`` (the paper's learning rate).
        damping: ``damping >= 0`` added to the diagonal.
        rtol: ``None`` (default): the result is reported ``converged=True`` (a truncated series
            is used on purpose).  A number: ``converged`` is ``||b - A_d x|| <= rtol ||b||``
            for every column, with a :class:`RuntimeWarning` otherwise.
    """
    _check_int("neumann", "steps", steps, minimum=0)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"neumann: scale must be a finite number > 0, got {scale!r}")
    prob = _prepare("neumann", A, b, None, rtol=rtol, atol=0.0, damping=damping, maxiter=None)
    apply = _damped("neumann", prob.op, damping)
    V = P = prob.B
    for i in range(steps):
        V = V - scale * apply(V)
        P = P + V
        _log_iteration("neumann", i + 1, V)
    X = scale * P
    res = _norm(prob.B - apply(X))
    tol = torch.full_like(res, math.inf) if rtol is None else rtol * _norm(prob.B)
    return _finish("neumann", X, res, tol, steps, steps, prob.vector, None)
