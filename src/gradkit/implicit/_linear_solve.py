"""The linear solves of implicit differentiation, and their vmap-safe twins.

Implicit differentiation needs one linear solve per backward (``Kᵀ w = v``) or forward-mode
(``K z = b``) pass, with ``K`` known only through Jacobian-vector products of the optimality
function.  Normally the solves are :mod:`gradkit.linalg`'s (early exit, convergence reported in a
:class:`~gradkit.linalg.SolveResult`).  Those solvers branch in Python on tensor values
(``bool(norm <= tol)``, ``float(...)``), which is fine under ``torch.func.grad`` / ``jvp`` but
forbidden under ``vmap`` (and so under ``jacrev``, ``jacfwd``, ``hessian``, built on it).  Under
``vmap`` the fixed-iteration versions below run instead: the same recurrences for exactly
``maxiter`` iterations, with convergence expressed through ``torch.where`` masks rather than
``break``.  ``tests/implicit/test_linear_solve.py`` holds each equal to its :mod:`gradkit.linalg`
twin.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradkit.linalg import LinearOperator, SolveResult, cg, gmres, neumann, normal_cg

__all__ = [
    "SOLVERS",
    "vmap_active",
    "SolveOptions",
    "LinearSystem",
    "parse_solve_options",
    "fixed_cg",
    "fixed_normal_cg",
    "fixed_gmres",
    "fixed_neumann",
    "default_rtol",
    "linear_solve",
    "check_symmetric",
]

Matvec = Callable[[Tensor], Tensor]

#: Names accepted by ``solve=``; a callable ``solve(matvec, b, **options)`` is accepted too.
SOLVERS = ("cg", "normal_cg", "gmres", "neumann", "dense")
_ON_FAILURE = ("warn", "raise", "ignore")
# option names (each solver reads its own: rtol/atol/maxiter for the Krylov solvers, restart for
# gmres, steps/scale/rtol for neumann, M for cg; the others for every solver).  Options of another solver
# are accepted and ignored, so that switching ``solve=`` needs no other edit; unknown names are refused.
_OPTIONS = {"ridge", "on_failure", "symmetric", "check_optimality", "rtol", "atol", "maxiter", "restart",
            "steps", "scale", "M"}


def vmap_active() -> bool:
    """Whether a ``torch.func.vmap`` level is active (where ``.item()``-style branching fails)."""
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # pragma: no cover - older torch: treat every functorch level as vmap
        return torch._C._functorch.peek_interpreter_stack() is not None
    return any(i.key() == torch._C._functorch.TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def default_rtol(dtype: torch.dtype) -> float:
    """Relative residual tolerance used when ``rtol`` is not given: ``1e-10`` in float64, ``1e-5``
    in float32, ``1e-3`` in lower precision (near what CG attains in each; gradkit's choice)."""
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-3)


@dataclass(frozen=True)
class SolveOptions:
    """Validated ``solve=`` and ``**solve_options`` of :func:`~gradkit.implicit.custom_root`."""

    method: str | Callable[..., Any] = "cg"
    ridge: float = 0.0
    rtol: float | None = None
    atol: float = 0.0
    maxiter: int | None = None
    restart: int = 30
    steps: int = 100
    scale: float = 1.0
    symmetric: bool | None = None
    on_failure: str = "warn"
    check_optimality: bool | float = True
    M: Matvec | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.method if isinstance(self.method, str) else getattr(self.method, "__name__", "solve")


def _real(where: str, name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{where}: {name} must be a finite real number, got {type(value).__name__} {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{where}: {name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _int(where: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def parse_solve_options(solve: Any, options: Mapping[str, Any], where: str) -> SolveOptions:
    """Check ``solve`` and its options once, at decoration time; unknown options are refused for
    the named solvers (and passed on as keyword arguments to a callable ``solve``)."""
    if isinstance(solve, str):
        if solve not in SOLVERS:
            raise ValueError(f"{where}: solve must be one of {SOLVERS} or a callable solve(matvec, b), got {solve!r}")
        unknown = set(options) - _OPTIONS
        if unknown:
            raise TypeError(f"{where}: unknown option(s) {sorted(unknown)}; accepted: {sorted(_OPTIONS)}")
    elif not callable(solve):
        raise TypeError(f"{where}: solve must be a string in {SOLVERS} or a callable, got {type(solve).__name__}")
    kw: dict[str, Any] = {"method": solve}
    if "ridge" in options:
        kw["ridge"] = _real(where, "ridge", options["ridge"])
    if options.get("rtol") is not None:
        kw["rtol"] = _real(where, "rtol", options["rtol"])
    if "atol" in options:
        kw["atol"] = _real(where, "atol", options["atol"])
    if options.get("maxiter") is not None:
        kw["maxiter"] = _int(where, "maxiter", options["maxiter"], 1)
    if "restart" in options:
        kw["restart"] = _int(where, "restart", options["restart"], 1)
    if "steps" in options:
        kw["steps"] = _int(where, "steps", options["steps"], 0)
    if "scale" in options:
        kw["scale"] = _real(where, "scale", options["scale"], positive=True)
    symmetric = options.get("symmetric")
    if symmetric is not None and not isinstance(symmetric, bool):
        raise TypeError(f"{where}: symmetric must be None (check), True or False, got {symmetric!r}")
    if solve == "cg" and symmetric is False:
        raise ValueError(f"{where}: solve='cg' needs a symmetric system but symmetric=False was given; "
                         "use solve='gmres', 'normal_cg' or 'dense'")
    kw["symmetric"] = symmetric
    on_failure = options.get("on_failure", "warn")
    if on_failure not in _ON_FAILURE:
        raise ValueError(f"{where}: on_failure must be one of {_ON_FAILURE}, got {on_failure!r}")
    kw["on_failure"] = on_failure
    check = options.get("check_optimality", True)
    if not isinstance(check, bool):
        check = _real(where, "check_optimality", check, positive=True)
    kw["check_optimality"] = check
    M = options.get("M")
    if M is not None and not callable(M):
        raise TypeError(f"{where}: M (preconditioner) must be a callable on flat (n,) vectors, got {type(M).__name__}")
    kw["M"] = M
    if not isinstance(solve, str):
        kw["extra"] = {k: v for k, v in options.items() if k not in _OPTIONS}
    return SolveOptions(**kw)


# ---------------------------------------------------------------------------------------------
# fixed-iteration solvers (vmap / grad / jacrev / jacfwd safe)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum()


def _safe_div(num: Tensor, den: Tensor, ok: Tensor) -> Tensor:
    """``num / den`` where ``ok``, 0 elsewhere, without nan in either branch's gradient."""
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def fixed_cg(matvec: Matvec, b: Tensor, *, maxiter: int, rtol: float = 0.0, atol: float = 0.0,
             M: Matvec | None = None) -> Tensor:
    """Conjugate gradient run for exactly ``maxiter`` iterations, from ``x_0 = 0``.

    Hestenes & Stiefel (1952), "Methods of conjugate gradients for solving linear systems",
    J. Res. Nat. Bur. Standards 49(6) (pre-arXiv); the unpreconditioned recurrences of
    :func:`gradkit.linalg.cg`::

        alpha_i = r_iᵀr_i / p_iᵀA p_i,  x_{i+1} = x_i + alpha_i p_i,  r_{i+1} = r_i - alpha_i A p_i,
        beta_i = r_{i+1}ᵀr_{i+1} / r_iᵀr_i,  p_{i+1} = r_{i+1} + beta_i p_i

    with ``matvec = A`` (symmetric) and ``b`` of shape ``(n,)``; with a preconditioner ``M``
    (symmetric positive definite, ``≈ A⁻¹``) those of :func:`gradkit.linalg.cg`: ``z_i = M r_i``,
    ``rᵀr`` replaced by ``rᵀz`` and ``p_{i+1} = z_{i+1} + beta_i p_i``.  Once
    ``||r_i|| <= max(rtol ||b||, atol)`` the iterate is frozen (``alpha = beta = 0`` through
    ``torch.where``) instead of leaving the loop, so there is no Python control flow on values.
    ``p_iᵀ A p_i = 0`` (e.g. ``b = 0``) also freezes it.  Keeps no state between calls.
    """
    precondition = M if M is not None else (lambda v: v)
    x = torch.zeros_like(b)
    r = b
    p = z = precondition(r)
    rz = _dot(r, z)
    tol_sq = torch.clamp(rtol * torch.linalg.vector_norm(b), min=atol) ** 2
    for _ in range(maxiter):
        active = _dot(r, r) > tol_sq
        q = matvec(p)
        pq = _dot(p, q)
        alpha = _safe_div(rz, pq, active & (pq != 0))
        x = x + alpha * p
        r = r - alpha * q
        z = precondition(r)
        rz_new = _dot(r, z)
        beta = _safe_div(rz_new, rz, active & (rz != 0))
        p = z + beta * p
        rz = rz_new
    return x


def fixed_normal_cg(
    matvec: Matvec, rmatvec: Matvec, b: Tensor, *, maxiter: int, rtol: float = 0.0, atol: float = 0.0
) -> Tensor:
    """CG on the normal equations ``AᵀA x = Aᵀb`` (CGNR, as :func:`gradkit.linalg.normal_cg`) for
    exactly ``maxiter`` iterations; ``rtol``/``atol`` apply to the normal-equation residual."""
    return fixed_cg(lambda v: rmatvec(matvec(v)), rmatvec(b), maxiter=maxiter, rtol=rtol, atol=atol)


def fixed_gmres(matvec: Matvec, b: Tensor, *, maxiter: int) -> Tensor:
    """GMRES with ``m = maxiter`` Arnoldi steps and no restart, from ``x_0 = 0``.

    Saad & Schultz (1986), "GMRES: a generalized minimal residual algorithm for solving
    nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 7(3) (pre-arXiv): an orthonormal basis
    ``V_{m+1}`` of the Krylov space with ``A V_m = V_{m+1} H_m`` (classical Gram-Schmidt applied
    twice, as stable as the modified Gram-Schmidt plus reorthogonalisation of
    :func:`gradkit.linalg.gmres`), then ``x = V_m y`` with ``y = argmin ||beta e_1 - H_m y||``,
    ``beta = ||b||``, solved by a QR factorisation of ``H_m``.

    All ``m`` steps always run.  After an exact ("happy") breakdown ``h_{j+1,j} = 0`` the later
    basis vectors are zero; their columns of ``H_m`` are replaced by unit vectors so the least
    squares problem stays full rank and gives them zero weight.  In exact arithmetic ``m = n``
    solves a nonsingular system exactly.  Keeps no state between calls.
    """
    n_steps = maxiter
    eps = torch.finfo(b.dtype).eps
    beta = torch.linalg.vector_norm(b)
    alive = beta > 0
    V = [_safe_div(b, beta, alive)]
    units = torch.eye(n_steps + 1, n_steps, dtype=b.dtype, device=b.device)
    cols = []
    for j in range(n_steps):
        w = matvec(V[j])
        w_norm = torch.linalg.vector_norm(w)
        Vm = torch.stack(V, dim=1)
        h = Vm.T @ w
        w = w - Vm @ h
        h2 = Vm.T @ w  # second Gram-Schmidt pass
        w = w - Vm @ h2
        h = h + h2
        h_next = torch.linalg.vector_norm(w)
        col = torch.cat([h, h_next.reshape(1), h.new_zeros(n_steps - j - 1)])
        cols.append(torch.where(alive, col, units[:, j]))
        alive = alive & (h_next > eps * w_norm)
        V.append(_safe_div(w, h_next, alive))
    H = torch.stack(cols, dim=1)  # (m + 1, m)
    g = torch.cat([beta.reshape(1), beta.new_zeros(n_steps)])
    Q, R = torch.linalg.qr(H)
    y = torch.linalg.solve_triangular(R, (Q.T @ g).unsqueeze(1), upper=True).squeeze(1)
    return torch.stack(V[:n_steps], dim=1) @ y


def fixed_neumann(matvec: Matvec, b: Tensor, *, steps: int, scale: float) -> Tensor:
    """Truncated Neumann series ``scale Σ_{i=0}^{steps} (I - scale A)^i b``, the recurrence of
    :func:`gradkit.linalg.neumann` (Lorraine, Vicol & Duvenaud 2020, arXiv:1911.02590,
    Algorithm 3); it has no data-dependent branch, so it is the same computation."""
    v = p = b
    for _ in range(steps):
        v = v - scale * matvec(v)
        p = p + v
    return scale * p


# ---------------------------------------------------------------------------------------------
# dispatch


@dataclass
class LinearSystem:
    """The square system ``M x = b`` of one implicit-differentiation pass.

    ``matvec`` applies ``M`` and ``rmatvec`` applies ``Mᵀ`` to flat ``(n,)`` vectors; ``dense``
    returns the ``(n, n)`` matrix ``M``; ``what`` names the system in messages.
    """

    matvec: Matvec
    rmatvec: Matvec
    dense: Callable[[], Tensor]
    n: int
    what: str


def check_symmetric(matvec: Matvec, n: int, like: Tensor, what: str) -> None:
    """Refuse a system that is detectably non-symmetric before running CG on it.

    With two fixed random probes ``u, v`` (seeded generator, the global RNG is untouched), a
    symmetric ``M`` has ``uᵀ M v = vᵀ M u``; the check fails when they differ by more than
    ``sqrt(eps) (||u|| ||M v|| + ||v|| ||M u||)``.  Two matrix-vector products.
    """
    g = torch.Generator().manual_seed(0)
    u = torch.randn(n, generator=g, dtype=torch.float64).to(like)
    v = torch.randn(n, generator=g, dtype=torch.float64).to(like)
    Mu, Mv = matvec(u).detach(), matvec(v).detach()
    a, c = float(_dot(u, Mv)), float(_dot(v, Mu))
    scale = float(u.norm() * Mv.norm() + v.norm() * Mu.norm())
    if abs(a - c) > math.sqrt(torch.finfo(like.dtype).eps) * scale:
        raise ValueError(
            f"solve='cg' needs a symmetric system, but {what} is not symmetric: for random u, v, "
            f"uᵀAv = {a:.6e} and vᵀAu = {c:.6e}. Use solve='gmres', 'normal_cg' or 'dense' (CG would "
            "return a wrong gradient), or pass symmetric=True to skip this check if A is symmetric."
        )


def _fail(opts: SolveOptions, message: str) -> None:
    if opts.on_failure == "raise":
        raise RuntimeError(message)
    if opts.on_failure == "warn":
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def linear_solve(system: LinearSystem, b: Tensor, opts: SolveOptions, *, fixed: bool) -> Tensor:
    """Solve ``(M + ridge I) x = b`` with the method of ``opts``.

    ``fixed=False``: :mod:`gradkit.linalg` solvers (``maxiter`` default ``10 n``), ``cg``'s
    symmetry probe when ``symmetric`` is None, and a convergence check (warn / raise / ignore per
    ``on_failure``) that names the residual.  ``fixed=True`` (under ``vmap``): the fixed-iteration
    solvers above (``maxiter`` default ``n``), no value-dependent checks.
    """
    ridge, n, method = opts.ridge, system.n, opts.method
    rtol = default_rtol(b.dtype) if opts.rtol is None else opts.rtol
    matvec = system.matvec if not ridge else (lambda v: system.matvec(v) + ridge * v)
    rmatvec = system.rmatvec if not ridge else (lambda v: system.rmatvec(v) + ridge * v)
    if method == "dense":
        M = system.dense()
        if ridge:
            M = M + ridge * torch.eye(n, dtype=M.dtype, device=M.device)
        try:
            return torch.linalg.solve(M, b)
        except torch.linalg.LinAlgError as err:
            raise ValueError(f"solve='dense': {system.what} is singular ({err}); add ridge= to regularise it") from err
    if fixed:
        if method == "cg":
            return fixed_cg(matvec, b, maxiter=opts.maxiter or n, rtol=rtol, atol=opts.atol, M=opts.M)
        if method == "normal_cg":
            return fixed_normal_cg(matvec, rmatvec, b, maxiter=opts.maxiter or n, rtol=rtol, atol=opts.atol)
        if method == "gmres":
            return fixed_gmres(matvec, b, maxiter=opts.maxiter or n)
        if method == "neumann":
            return fixed_neumann(matvec, b, steps=opts.steps, scale=opts.scale)
        out = method(matvec, b, **opts.extra)
        return out.x if isinstance(out, SolveResult) else out

    if method == "cg" and opts.symmetric is None:
        check_symmetric(system.matvec, n, b, system.what)
    op = LinearOperator((n, n), matvec, rmatvec=rmatvec, dtype=b.dtype, device=b.device,
                        symmetric=method == "cg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if method == "cg":
            M = None if opts.M is None else (lambda R: torch.stack([opts.M(r) for r in R.unbind(1)], 1))
            result = cg(op, b, M=M, rtol=rtol, atol=opts.atol, maxiter=opts.maxiter)
        elif method == "normal_cg":
            result = normal_cg(op, b, rtol=rtol, atol=opts.atol, maxiter=opts.maxiter)
        elif method == "gmres":
            result = gmres(op, b, rtol=rtol, atol=opts.atol, maxiter=opts.maxiter, restart=opts.restart)
        elif method == "neumann":
            result = neumann(op, b, steps=opts.steps, scale=opts.scale, rtol=opts.rtol)
        else:
            out = method(matvec, b, **opts.extra)
            if isinstance(out, SolveResult):
                result = out
            else:
                if not isinstance(out, Tensor) or out.shape != b.shape:
                    got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise TypeError(f"solve={opts.name}: returned {got}, expected a tensor of shape {tuple(b.shape)}")
                res = torch.linalg.vector_norm(b - matvec(out)).detach()
                ok = bool(res <= max(rtol * float(b.detach().norm()), opts.atol))
                result = SolveResult(out, 0, res, ok)
    name = opts.name if isinstance(method, str) else None
    ours = [w for w in caught if name and issubclass(w.category, RuntimeWarning) and str(w.message).startswith(name + " ")]
    for w in caught:  # anything else raised meanwhile (by the optimality function, say) is passed on
        # (except torch's note on float() of a tensor that requires grad, which the solvers' own
        # messages trigger when the backward is differentiated again: harmless here)
        if (w in ours and not result.converged) or "to a scalar may lead to unexpected" in str(w.message):
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not result.converged:
        notes = "; ".join(str(w.message) for w in ours)
        _fail(opts, (
            f"implicit differentiation: the linear solve of {system.what} with solve={opts.name!r} did not "
            f"converge: residual norm {float(result.residual_norm.detach()):.3e} (rtol {rtol:.1e}, ||b|| "
            f"{float(b.detach().norm()):.3e}){': ' + notes if notes else ''}. The gradient may be inaccurate; raise "
            "maxiter/steps, add ridge=, or use solve='dense' for small problems."
        ))
    return result.x
