"""MEHA: a single-loop, Hessian-free solver for bilevel problems with a (possibly nonconvex,
possibly nonsmooth) lower level, through the Moreau envelope of the lower-level objective.

Liu, Liu, Yao, Zeng & Zhang (2024), "Moreau Envelope for Nonconvex Bi-Level Optimization: A
Single-loop and Hessian-free Solution Strategy", ICML 2024, arXiv:2405.09927.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gradkit.bilevel._solver_base import (
    BilevelResult,
    History,
    Objective,
    check_finite,
    check_fn,
    check_int,
    check_like,
    check_optional_fn,
    check_pair,
    check_real,
    check_schedule,
    penalty,
    progress_bar,
    scalar,
    value_grads_aux,
)

__all__ = ["meha"]


def _checked(out: object, like: Tensor, name: str) -> Tensor:
    if not isinstance(out, Tensor) or out.shape != like.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{name} must return a tensor of shape {tuple(like.shape)}, got {got}")
    return out.detach()


def meha(
    upper_fn: Objective,
    lower_fn: Objective,
    x0: Tensor,
    y0: Tensor,
    *,
    steps: int,
    lr_x: float | Callable[[int], float] = 0.05,
    lr_y: float | Callable[[int], float] = 0.05,
    lr_theta: float | Callable[[int], float] = 0.05,
    gamma: float = 1.0,
    c0: float = 1.0,
    p: float = 0.3,
    project_x: Callable[[Tensor], Tensor] | None = None,
    lower_nonsmooth: Objective | None = None,
    prox: Callable[[Tensor, Tensor, float], Tensor] | None = None,
    theta0: Tensor | None = None,
    progress: bool = True,
    record_iterates: bool = False,
) -> BilevelResult:
    r"""MEHA (Liu, Liu, Yao, Zeng & Zhang, 2024, arXiv:2405.09927), the Moreau-envelope based
    Hessian-free algorithm.

    Solves ``min_{x ∈ X, y} F(x, y)  s.t.  y ∈ argmin_{y'} φ(x, y')`` with lower objective
    ``φ = f + g``: ``f`` smooth (``lower_fn``), ``g`` optional, nonsmooth in ``y`` with a cheap
    proximal map (``lower_nonsmooth`` and ``prox``), both possibly nonconvex (weakly convex).  The
    lower level is replaced by the constraint ``φ(x, y) − v_γ(x, y) <= 0`` on its Moreau envelope::

        v_γ(x, y) = min_θ  φ(x, θ) + ‖θ − y‖² / (2γ),

    which is penalised with ``c_k = c₀ (k + 1)^p``: each iteration descends
    ``F / c_k + φ − v_γ``, while one proximal gradient step tracks the envelope's minimiser ``θ``.
    Iteration ``k`` (the paper's Algorithm 1; only gradients, never a Hessian)::

        θ_{k+1} = prox_{η_k g(x_k, ·)}( θ_k − η_k [∇_y f(x_k, θ_k) + (θ_k − y_k) / γ] )
        d_x = ∇_x F(x_k, y_k) / c_k + ∇_x φ(x_k, y_k) − ∇_x φ(x_k, θ_{k+1})
        x_{k+1} = Proj_X(x_k − α_k d_x)
        d_y = ∇_y F(x_{k+1}, y_k) / c_k + ∇_y f(x_{k+1}, y_k) − (y_k − θ_{k+1}) / γ
        y_{k+1} = prox_{β_k g(x_{k+1}, ·)}(y_k − β_k d_y)

    (``∇_x v_γ = ∇_x φ(x, θ*)`` and ``∇_y v_γ = (y − θ*)/γ`` by Danskin's theorem, with ``θ*``
    replaced by the tracked ``θ_{k+1}``; ``y`` is updated at the new ``x_{k+1}``.)
    The reformulation is exact for a convex lower level; for a weakly convex one it selects
    lower-level stationary points, and ``γ`` must be below the inverse weak-convexity modulus.

    Args:
        upper_fn: ``F(x, y)``, scalar.
        lower_fn: the smooth part ``f(x, y)`` of the lower objective, scalar.
        x0, y0: initial point (``x0`` should lie in ``X``).
        steps: number of iterations ``K``.
        lr_x, lr_y, lr_theta: step sizes ``α_k``, ``β_k``, ``η_k`` (numbers or callables ``k -> step``).
        gamma: Moreau-envelope parameter ``γ > 0``.
        c0, p: penalty schedule ``c_k = c0 (k + 1)^p`` (the paper's theory takes ``p ∈ [0, 1/2)``).
        project_x: ``x -> Proj_X(x)`` (default: none, ``X`` is the whole space).
        lower_nonsmooth: the nonsmooth part ``g(x, y)`` (scalar, differentiable in ``x``), given
            together with ``prox``.
        prox: ``(x, v, t) -> argmin_u g(x, u) + ‖u − v‖² / (2t)``.
        theta0: initial ``θ`` (default ``y0``).
        progress: show a ``tqdm`` bar.
        record_iterates: also keep every ``x``, ``y`` in the history.

    Defaults (ours): ``α = β = η = 0.05, γ = 1, c₀ = 1, p = 0.3``; the paper sets these per
    experiment (its Table 5 varies them) and its text for the toy problems was not available
    to us, so these are values that solve the two toy problems in ``tests/bilevel`` and are
    safe for lower levels with ``L``-smooth ``f``, ``L <= 10``.  Smaller steps for stiffer problems.

    The authors' scripts (github.com/LiuZhu-CV/MEHA, commit 3078fbc: ``non_convex/
    non_convex_1dim.py``, ``merely_convex/MEHA.py``, ``non_smooth_case1/``) differ in
    conventions: they weight the upper objective by ``c_k`` (descending ``c_k F + φ − v_γ`` with
    ``c_k`` increasing), where the same group's BOAT library and this implementation use
    ``F / c_k``; they start from ``θ_0 = 0``; the nonconvex script updates ``y`` at ``x_{k+1}``
    as here, the merely convex one updates ``y`` first; and each script has its own constants
    (e.g. nonconvex: ``η = 0.001``, ``1/γ = 0.005``, ``c₀ = 50``, ``p = 0.48``, steps ``5e-4``,
    from ``x_0 = −6``; merely convex: ``η = 0.009``, ``1/γ = 0.2``, ``c₀ = 0.6``, ``p = 0.49``).
    Their nonconvex toy is :class:`tests.bilevel.problems.MEHAToyNonconvex` with ``n = 1``,
    ``c = 2`` (``x* = 3π/4``); the tests use ``n = 2`` and random ``c``.

    Returns:
        :class:`~gradkit.bilevel._solver_base.BilevelResult` with ``state = {"theta"}`` and
        history keys ``"upper"``, ``"lower"`` (``F`` and ``φ`` at ``(x_k, y_k)``),
        ``"penalty"`` (``c_k``) and ``"value_gap"`` (``φ(x_k, y_k) − φ(x_k, θ_{k+1})``, an
        estimate of the envelope gap ``φ − v_γ`` that the penalty drives to zero).
    """
    check_fn(upper_fn, "upper_fn")
    check_fn(lower_fn, "lower_fn")
    check_optional_fn(project_x, "project_x", "(x)")
    check_optional_fn(lower_nonsmooth, "lower_nonsmooth", "(x, y)")
    check_optional_fn(prox, "prox", "(x, v, step)")
    if (lower_nonsmooth is None) != (prox is None):
        raise ValueError("lower_nonsmooth and prox must be given together (the nonsmooth part g and its proximal map); "
                         f"got lower_nonsmooth={'set' if lower_nonsmooth else None}, prox={'set' if prox else None}")
    x, y = check_pair(x0, y0)
    steps = check_int("steps", steps, 1)
    alpha, beta, eta = check_schedule("lr_x", lr_x), check_schedule("lr_y", lr_y), check_schedule("lr_theta", lr_theta)
    gamma = check_real("gamma", gamma, low=0.0, low_open=True)
    c0 = check_real("c0", c0, low=0.0, low_open=True)
    p = check_real("p", p, low=0.0)
    theta = y.clone() if theta0 is None else check_like(theta0, y, "theta0")

    def phi(a: Tensor, b: Tensor) -> Tensor:
        value = scalar(lower_fn, "lower_fn", a, b)
        if lower_nonsmooth is not None:
            value = value + scalar(lower_nonsmooth, "lower_nonsmooth", a, b)
        return value

    def prox_step(a: Tensor, v: Tensor, t: float) -> Tensor:
        if prox is None:
            return v
        with torch.no_grad():
            return _checked(prox(a, v, t), v, "prox")

    def penalised(a: Tensor, b: Tensor, ck: float) -> tuple[Tensor, dict[str, Tensor]]:
        upper, lower = scalar(upper_fn, "upper_fn", a, b), phi(a, b)
        return upper / ck + lower, {"F": upper, "phi": lower}

    def penalised_y(a: Tensor, b: Tensor, ck: float) -> tuple[Tensor, None]:
        return scalar(upper_fn, "upper_fn", a, b) / ck + scalar(lower_fn, "lower_fn", a, b), None

    history = History(record_iterates)
    bar = progress_bar(steps, "MEHA", progress)
    for k in range(steps):
        ck = penalty(c0, p, k)
        eta_k = eta(k)
        _, (_, f_theta), _ = value_grads_aux(lambda a, b: (lower_fn(a, b), None), "lower_fn", x, theta)
        theta = prox_step(x, theta - eta_k * (f_theta + (theta - y) / gamma), eta_k)
        _, (d_x, _), at_xy = value_grads_aux(lambda a, b: penalised(a, b, ck), "upper_fn / c_k + lower_fn", x, y)
        phi_theta, (v_x, _), _ = value_grads_aux(lambda a, b: (phi(a, b), None), "lower_fn", x, theta)
        check_finite(float(at_xy["F"]), "upper_fn", k)
        history.record(upper=at_xy["F"], lower=at_xy["phi"], penalty=ck, value_gap=at_xy["phi"] - phi_theta)
        x = x - alpha(k) * (d_x - v_x)
        if project_x is not None:
            with torch.no_grad():
                x = _checked(project_x(x), x, "project_x")
        _, (_, d_y), _ = value_grads_aux(lambda a, b: penalised_y(a, b, ck), "upper_fn / c_k + lower_fn", x, y)
        beta_k = beta(k)
        y = prox_step(x, y - beta_k * (d_y - (y - theta) / gamma), beta_k)
        history.iterates(x, y)
        bar.update(1)
    bar.close()
    return BilevelResult(x, y, history.data, {"theta": theta})
