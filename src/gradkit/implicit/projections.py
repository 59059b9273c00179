"""Euclidean (and one Bregman) projections onto convex sets, differentiable by autograd.

Each projection acts on the last dimension of ``x`` (leading dimensions are a batch) and is
written with tensor operations only (sorting, cumulative sums, ``torch.where``), with no Python
branch on values, so it works under ``torch.func`` transforms and its autograd Jacobian is the
projection's Jacobian wherever that exists.  The signature ``projection(x, hyperparams)`` is the
one :func:`~gradkit.implicit.projected_gradient_fixed_point` calls.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "projection_nonnegative",
    "projection_box",
    "projection_simplex",
    "projection_l1_ball",
    "projection_l2_ball",
    "projection_simplex_kl",
]


def _check_tensor(name: str, x: Any) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name}: x must be a floating-point tensor, got {got}")
    if x.ndim == 0:
        raise ValueError(f"{name}: x must have at least one dimension (the projection acts on the last), got a scalar")


def projection_nonnegative(x: Tensor, hyperparams: Any = None) -> Tensor:
    """Projection onto the nonnegative orthant, ``argmin_{p >= 0} ||p - x||² = max(x, 0)``.

    ``hyperparams`` is unused (present for the ``projection(x, hyperparams)`` signature).
    Jacobian: ``diag(1[x > 0])``.
    """
    _check_tensor("projection_nonnegative", x)
    return torch.relu(x)


def projection_box(x: Tensor, hyperparams: tuple[Any, Any]) -> Tensor:
    """Projection onto the box ``{p : lower <= p <= upper}``: ``min(max(x, lower), upper)``.

    ``hyperparams = (lower, upper)``: numbers or tensors broadcastable to ``x`` (differentiable:
    ``∂p/∂lower`` is 1 where the lower bound is active, likewise ``upper``); ``lower <= upper``.
    """
    _check_tensor("projection_box", x)
    if not isinstance(hyperparams, (tuple, list)) or len(hyperparams) != 2:
        raise TypeError(f"projection_box: hyperparams must be a pair (lower, upper), got {hyperparams!r}")
    if all(isinstance(b, numbers.Real) for b in hyperparams) and not hyperparams[0] <= hyperparams[1]:
        raise ValueError(f"projection_box: the box is empty, lower={hyperparams[0]!r} > upper={hyperparams[1]!r}; "
                         "expected lower <= upper")
    lower, upper = (torch.as_tensor(b, dtype=x.dtype, device=x.device) for b in hyperparams)
    return torch.minimum(torch.maximum(x, lower), upper)


def projection_simplex(x: Tensor, value: float | Tensor = 1.0) -> Tensor:
    """Projection onto the simplex ``{p : p >= 0, Σ p = value}``, by sorting.

    Held, Wolfe & Crowder (1974), "Validation of subgradient optimization", Math. Programming 6;
    Duchi, Shalev-Shwartz, Singer & Chandra (2008), "Efficient projections onto the l1-ball for
    learning in high dimensions", ICML (pre-arXiv): with ``u`` the entries of ``x`` sorted
    in decreasing order,

        ρ = max{ j : u_j - (Σ_{i<=j} u_i - value) / j > 0 },   τ = (Σ_{i<=ρ} u_i - value) / ρ,
        p = max(x - τ, 0).

    ``ρ`` is counted with a tensor sum (no Python branch), so ``vmap`` works.  Autograd through
    ``τ`` gives the projection's Jacobian ``diag(s) - s sᵀ / |s|`` with ``s = 1[p > 0]`` (the
    support; the sparsemax Jacobian of Martins & Astudillo 2016, "From softmax to sparsemax",
    arXiv:1602.02068) and ``∂p/∂value = s / |s|``.

    Args:
        x: points, the last dimension is projected.
        value: the simplex' sum ``value > 0`` (a number or a tensor broadcastable to ``x[..., :1]``).
    """
    _check_tensor("projection_simplex", x)
    if not isinstance(value, Tensor) and not value > 0:
        raise ValueError(f"projection_simplex: value must be > 0, got {value!r}")
    n = x.shape[-1]
    u = torch.sort(x, dim=-1, descending=True).values
    css = torch.cumsum(u, dim=-1) - value
    j = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    rho = (u - css / j > 0).sum(dim=-1, keepdim=True)  # >= 1: the largest entry always qualifies
    tau = css.gather(-1, rho - 1) / rho.to(x.dtype)
    return torch.relu(x - tau)


def projection_l1_ball(x: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Projection onto the ℓ₁ ball ``{p : ||p||₁ <= radius}``.

    Duchi et al. (2008), ICML: ``x`` itself when inside the ball, otherwise
    ``sign(x) · proj_simplex(|x|, radius)`` (soft-thresholding at the level that puts ``p`` on the
    sphere).  Both branches are computed and chosen by ``torch.where`` (no value branch).
    """
    _check_tensor("projection_l1_ball", x)
    if not isinstance(radius, Tensor) and not radius > 0:
        raise ValueError(f"projection_l1_ball: radius must be > 0, got {radius!r}")
    inside = x.abs().sum(dim=-1, keepdim=True) <= radius
    return torch.where(inside, x, torch.sign(x) * projection_simplex(x.abs(), radius))


def projection_l2_ball(x: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Projection onto the ℓ₂ ball ``{p : ||p||₂ <= radius}``: ``x · radius / max(||x||₂, radius)``."""
    _check_tensor("projection_l2_ball", x)
    if not isinstance(radius, Tensor) and not radius > 0:
        raise ValueError(f"projection_l2_ball: radius must be > 0, got {radius!r}")
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * (radius / torch.maximum(norm, torch.as_tensor(radius, dtype=x.dtype, device=x.device)))


def projection_simplex_kl(y: Tensor, hyperparams: Any = None) -> Tensor:
    """KL (Bregman) projection of the dual point ``y`` onto the probability simplex: ``softmax(y)``.

    With the entropy mirror map ``φ(p) = Σ p log p`` (``∇φ(p) = log p + 1``), the mirror step
    returns ``argmin_{p ∈ Δ} KL(p, exp(y)) = exp(y) / Σ exp(y)`` (Beck & Teboulle 2003, "Mirror
    descent and nonlinear projected subgradient methods for convex optimization", Oper. Res.
    Lett. 31; the mirror-descent example of Blondel et al. 2022, arXiv:2105.15183, Section 2.2).
    ``hyperparams`` is unused.
    """
    _check_tensor("projection_simplex_kl", y)
    return torch.softmax(y, dim=-1)
