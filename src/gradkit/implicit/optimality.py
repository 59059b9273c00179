"""Optimality conditions to hand to :func:`~gradkit.implicit.custom_root` /
:func:`~gradkit.implicit.custom_fixed_point`.

Blondel et al. (2022), "Efficient and Modular Implicit Differentiation", arXiv:2105.15183,
Section 2.2 ("Examples") lists the conditions shipped here: stationarity, KKT, proximal-gradient,
projected-gradient and mirror-descent fixed points.  Each factory takes the objective ``f`` (a
scalar function of the variable and its parameters) and returns the function ``F(x, *params)``
(root) or ``T(x, *params)`` (fixed point); the parameter order it expects is in each docstring and
is the order of the decorated solver's ``*params``.  Gradients of ``f`` are ``torch.func.grad``
calls, so every condition composes with ``torch.func`` transforms.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from gradkit.implicit.decorators import _keyword_names
from gradkit.implicit.projections import projection_simplex_kl

__all__ = [
    "grad_optimality",
    "prox_grad_fixed_point",
    "projected_gradient_fixed_point",
    "kkt_optimality",
    "mirror_descent_fixed_point",
]

Objective = Callable[..., Tensor]


def _check_fn(where: str, name: str, fn: Any, signature: str) -> None:
    if not callable(fn):
        raise TypeError(f"{where}: {name} must be callable {signature}, got {type(fn).__name__}")


def _check_step(where: str, step: Any) -> None:
    if isinstance(step, bool) or not (isinstance(step, Tensor) or isinstance(step, (int, float))):
        raise TypeError(f"{where}: step must be a number > 0, got {type(step).__name__} {step!r}")
    if not isinstance(step, Tensor) and not step > 0:
        raise ValueError(f"{where}: step must be > 0, got {step!r}")


def _taking_keywords_of(f: Objective, fn: Callable[..., Any], leading: int) -> Callable[..., Any]:
    """``fn(x, <leading more positional arguments>, *params, **kwargs)`` with a signature that
    names the keywords ``f`` takes after ``x``: :func:`~gradkit.implicit.custom_root` then passes
    it (and differentiates) exactly those of the solver's keyword arguments; the others
    (iterations, tolerances) configure the solver only."""
    names = _keyword_names(f)
    P = inspect.Parameter
    # positional placeholders under names no f can use as a keyword (f(theta, x) and f(x, params) are common)
    parameters = [P(f"_{i}_", P.POSITIONAL_ONLY) for i in range(1 + leading)] + [P("_args_", P.VAR_POSITIONAL)]
    if names is None:
        parameters.append(P("_kwargs_", P.VAR_KEYWORD))
    else:
        parameters += [P(name, P.KEYWORD_ONLY, default=None) for name in sorted(names)]
    fn.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return fn


def _gradient_step(f: Objective, x: Any, f_params: tuple[Any, ...], step: Any, kwargs: dict[str, Any]) -> Any:
    """``x - step · ∇ₓ f(x, *f_params, **kwargs)`` on a tensor or a tuple/dict of tensors."""
    g = torch.func.grad(f)(x, *f_params, **kwargs)
    return pytree.tree_map(lambda a, b: a - step * b, x, g)


def grad_optimality(f: Objective) -> Callable[..., Any]:
    """Stationarity ``F(x, *params) = ∇ₓ f(x, *params) = 0`` of an unconstrained minimiser.

    Blondel et al. (2022), arXiv:2105.15183, Section 2.2, "Stationary point conditions".  Then
    ``A = -∇²ₓf`` is symmetric (negative definite for strongly convex ``f``) and ``solve="cg"``
    applies.  ``x`` may be a tensor or a tuple/dict of tensors (e.g. a model's parameters); ``f``
    returns a scalar tensor.  Keyword arguments of the solver reach ``f`` (and are differentiated,
    as :func:`~gradkit.implicit.custom_root` documents).
    """
    _check_fn("grad_optimality", "f", f, "f(x, *params) -> scalar")

    def optimality_fn(x: Any, *params: Any, **kwargs: Any) -> Any:
        return torch.func.grad(f)(x, *params, **kwargs)

    return _taking_keywords_of(f, optimality_fn, 0)


def prox_grad_fixed_point(
    f: Objective, prox: Callable[[Any, Any, Any], Any], step: float | Tensor = 1.0
) -> Callable[..., Any]:
    """Proximal-gradient fixed point of ``min_x f(x, θ_f) + h(x, θ_prox)``.

    Blondel et al. (2022), arXiv:2105.15183, Section 2.2, "Proximal gradient fixed point"::

        T(x, θ_prox, *θ_f) = prox_{η h}(x - η ∇ₓ f(x, *θ_f), θ_prox),   η = step,

    called as ``prox(y, θ_prox, η)`` (e.g. :func:`~gradkit.implicit.prox_lasso`).  Any ``η > 0``
    gives the same fixed points (the minimisers); ``η = 1/L`` (``L`` the Lipschitz constant of
    ``∇f``) makes ``T`` the usual ISTA step.  Decorate a solver ``solver(init, θ_prox, *θ_f)``
    with ``custom_fixed_point(prox_grad_fixed_point(f, prox, step))``; its keyword arguments
    reach ``f``.
    """
    _check_fn("prox_grad_fixed_point", "f", f, "f(x, *params) -> scalar")
    _check_fn("prox_grad_fixed_point", "prox", prox, "prox(x, hyperparams, scaling)")
    _check_step("prox_grad_fixed_point", step)

    def fixed_point_fn(x: Any, prox_params: Any, *f_params: Any, **f_kwargs: Any) -> Any:
        return prox(_gradient_step(f, x, f_params, step, f_kwargs), prox_params, step)

    return _taking_keywords_of(f, fixed_point_fn, 1)


def projected_gradient_fixed_point(
    f: Objective, projection: Callable[[Any, Any], Any], step: float | Tensor = 1.0
) -> Callable[..., Any]:
    """Projected-gradient fixed point of ``min_{x ∈ C(θ_proj)} f(x, θ_f)``.

    Blondel et al. (2022), arXiv:2105.15183, Section 2.2, "Projected gradient fixed point"::

        T(x, θ_proj, *θ_f) = proj_C(x - η ∇ₓ f(x, *θ_f), θ_proj),   η = step,

    called as ``projection(y, θ_proj)`` (e.g. :func:`~gradkit.implicit.projection_simplex`,
    :func:`~gradkit.implicit.projection_box` with ``θ_proj = (lower, upper)``): the proximal
    gradient fixed point whose ``h`` is the indicator of ``C``.  Solver signature
    ``solver(init, θ_proj, *θ_f)``.
    """
    _check_fn("projected_gradient_fixed_point", "projection", projection, "projection(x, hyperparams)")
    return prox_grad_fixed_point(f, lambda y, hp, _eta: projection(y, hp), step)


def kkt_optimality(
    f: Objective, eq: Callable[[Any, Any], Tensor] | None = None, ineq: Callable[[Any, Any], Tensor] | None = None
) -> Callable[..., Any]:
    """KKT conditions of ``min_x f(x, θ_f)  s.t.  e(x, θ_e) = 0,  g(x, θ_g) <= 0``.

    Karush (1939), Kuhn & Tucker (1951); Blondel et al. (2022), arXiv:2105.15183, Section 2.2,
    "KKT conditions".  The unknowns are ``x = (primal, μ, ν)`` (``μ`` the equality duals, ``ν`` the
    inequality duals; ``None`` for an absent kind) and ``F(x, θ_f, θ_e, θ_g)`` is::

        ( ∇ₓ f(primal, θ_f) + ∂e(primal, θ_e)ᵀ μ + ∂g(primal, θ_g)ᵀ ν,   # stationarity
          e(primal, θ_e),                                               # primal feasibility
          ν ⊙ g(primal, θ_g) )                                          # complementary slackness

    (the last two are ``None`` without ``eq`` / ``ineq``).  The solver ``solver(init, θ_f, θ_e,
    θ_g)`` returns ``(primal, μ, ν)``; pass ``None`` for an unused ``θ``.  The Jacobian is
    nonsingular under strict complementarity and linear independence of the active constraints;
    it is not symmetric (saddle point, complementarity rows): use ``solve="gmres"`` or ``"dense"``.

    Args:
        f: objective ``f(primal, θ_f) -> scalar``.
        eq: equality constraints ``e(primal, θ_e) -> tensor`` (``= 0``), or None.
        ineq: inequality constraints ``g(primal, θ_g) -> tensor`` (``<= 0``), or None.
    """
    _check_fn("kkt_optimality", "f", f, "f(primal, params) -> scalar")
    if eq is not None:
        _check_fn("kkt_optimality", "eq", eq, "eq(primal, params) -> tensor")
    if ineq is not None:
        _check_fn("kkt_optimality", "ineq", ineq, "ineq(primal, params) -> tensor")

    def optimality_fn(x: Any, f_params: Any = None, eq_params: Any = None, ineq_params: Any = None) -> Any:
        if not isinstance(x, (tuple, list)) or len(x) != 3:
            raise TypeError(f"kkt_optimality: x must be a tuple (primal, eq_duals, ineq_duals), got {type(x).__name__}")
        primal, mu, nu = x
        for name, dual, fn in (("eq_duals", mu, eq), ("ineq_duals", nu, ineq)):
            if (dual is None) != (fn is None):
                raise ValueError(
                    f"kkt_optimality: {name} is {'None' if dual is None else 'given'} but the constraint function "
                    f"is {'None' if fn is None else 'given'}: pass duals exactly for the constraints you have"
                )

        def lagrangian(p: Any) -> Tensor:
            value = f(p, f_params)
            if eq is not None:
                value = value + (mu * eq(p, eq_params)).sum()
            if ineq is not None:
                value = value + (nu * ineq(p, ineq_params)).sum()
            return value

        stationarity = torch.func.grad(lagrangian)(primal)
        feasibility = eq(primal, eq_params) if eq is not None else None
        slackness = nu * ineq(primal, ineq_params) if ineq is not None else None
        return stationarity, feasibility, slackness

    return optimality_fn


def mirror_descent_fixed_point(
    f: Objective,
    step: float | Tensor = 1.0,
    mirror_grad: Callable[[Tensor], Tensor] | None = None,
    dual_projection: Callable[[Tensor, Any], Tensor] | None = None,
) -> Callable[..., Any]:
    """Mirror-descent fixed point of ``min_{x ∈ C} f(x, θ_f)``.

    Nemirovski & Yudin (1983); Beck & Teboulle (2003); Blondel et al. (2022), arXiv:2105.15183,
    Section 2.2, "Mirror descent fixed point"::

        T(x, θ_proj, *θ_f) = P(∇φ(x) - η ∇ₓ f(x, *θ_f), θ_proj),   η = step,

    with ``∇φ = mirror_grad`` and ``P = dual_projection`` the Bregman projection back onto ``C``.
    The defaults are the entropy mirror map on the probability simplex (last dimension):
    ``∇φ(x) = log x`` (the ``+1`` of ``∇(Σ x log x)`` cancels in the normalisation) and
    ``P(y) = softmax(y)`` (:func:`~gradkit.implicit.projection_simplex_kl`), i.e. the
    exponentiated-gradient step ``x ∝ x ⊙ exp(-η ∇f(x))``.  Solver signature
    ``solver(init, θ_proj, *θ_f, **kwargs)`` (``θ_proj = None`` for the defaults; keyword
    arguments reach ``f``).
    """
    _check_fn("mirror_descent_fixed_point", "f", f, "f(x, *params) -> scalar")
    _check_step("mirror_descent_fixed_point", step)
    grad_phi = torch.log if mirror_grad is None else mirror_grad
    project = projection_simplex_kl if dual_projection is None else dual_projection
    _check_fn("mirror_descent_fixed_point", "mirror_grad", grad_phi, "mirror_grad(x)")
    _check_fn("mirror_descent_fixed_point", "dual_projection", project, "dual_projection(y, hyperparams)")

    def fixed_point_fn(x: Tensor, proj_params: Any, *f_params: Any, **f_kwargs: Any) -> Tensor:
        return project(grad_phi(x) - step * torch.func.grad(f)(x, *f_params, **f_kwargs), proj_params)

    return _taking_keywords_of(f, fixed_point_fn, 1)
