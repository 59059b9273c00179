"""Certified elementwise bounds on the input Hessian of a smooth MLP's class score over a ball,
by interval arithmetic on the second-order forward pass (interval bound propagation of values,
first and second input derivatives).  :func:`~gradkit.explain.robustness.deviation_bound` uses
them to turn its first-order estimate for saliency into a certificate through the mean value
theorem, ``‖∇f(x + δ) − ∇f(x)‖₂ ≤ ‖δ‖ sup_{z ∈ x + B} ‖∇²f(z)‖₂``.

For ``p = W h + b`` and ``h' = σ(p)``, with ``J = ∂h/∂x`` and ``H = ∂²h/∂x²`` per unit ``k``::

    J'_k = σ'(p_k) (W J)_k,      H'_k = σ''(p_k) (W J)_k (W J)_kᵀ + σ'(p_k) (W H)_k

Every quantity is an interval: ``p_k`` over the ball (exact for the first ``Linear``, then interval
bound propagation), ``σ'(p_k)`` and ``σ''(p_k)`` over that range, and products of intervals are
taken as the hull of the four end products.  The derivatives of ``tanh`` and the logistic sigmoid
are polynomials in ``t = σ(p)`` (monotone in ``p``), so their range over an interval is attained
at an end or at a critical point of the polynomial inside it.  Dense in the input size ``n``:
``O(units · n²)`` memory per example, for small inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradkit.core.functional import global_module_hooks, module_has_hooks
from gradkit.explain._common import check_class_index
from gradkit.explain.lrp import _IDENTITY, _leaves

#: σ' and σ'' as polynomials in t = σ(p), coefficients in ascending powers
_SMOOTH: dict[type, tuple[Any, tuple[list[float], list[float]]]] = {
    nn.Tanh: (torch.tanh, ([1, 0, -1], [0, -2, 0, 2])),
    nn.Sigmoid: (torch.sigmoid, ([0, 1, -1], [0, 1, -3, 2])),
}
_PASS = (*_IDENTITY, nn.Flatten)  # identity maps (dropout in eval mode)


def _critical_points(coeffs: list[float]) -> list[float]:
    """Real roots of the polynomial's derivative."""
    deriv = np.polynomial.polynomial.polyder(np.array(coeffs, dtype=float))
    roots = np.polynomial.polynomial.polyroots(deriv) if len(deriv) > 1 else np.array([])
    return [float(r.real) for r in roots if abs(r.imag) < 1e-12]


_CRITICAL = {cls: [_critical_points(c) for c in polys] for cls, (_, polys) in _SMOOTH.items()}


def _poly(coeffs: list[float], t: Any) -> Any:
    out = 0.0 * t
    for c in reversed(coeffs):
        out = out * t + c
    return out


def derivative_ranges(cls: type, lo: Tensor, hi: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``(min, max)`` of ``σ'`` and of ``σ''`` over ``[lo, hi]``, elementwise."""
    transform, polys = _SMOOTH[cls]
    t_lo, t_hi = transform(lo), transform(hi)
    out = []
    for coeffs, critical in zip(polys, _CRITICAL[cls]):
        a, b = _poly(coeffs, t_lo), _poly(coeffs, t_hi)
        low, high = torch.minimum(a, b), torch.maximum(a, b)
        for c in critical:
            inside = (t_lo <= c) & (c <= t_hi)
            value = _poly(coeffs, c)
            low = torch.where(inside, low.clamp_max(value), low)
            high = torch.where(inside, high.clamp_min(value), high)
        out.append((low, high))
    return out


def _times(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The hull of the product of two intervals (broadcasting)."""
    ends = torch.stack(torch.broadcast_tensors(a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]))
    return ends.amin(0), ends.amax(0)


def _linear(w: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """``w`` applied along dimension 1 of an interval ``(B, in, ...)``: exact, by centre and radius."""
    mid = torch.einsum("oi,bi...->bo...", w, (lo + hi) / 2)
    rad = torch.einsum("oi,bi...->bo...", w.abs(), (hi - lo) / 2)
    return mid - rad, mid + rad


def check_chain(model: Any) -> list[nn.Module]:
    """The ``Linear`` / ``Tanh`` / ``Sigmoid`` layers of a supported chain, in order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"the certified bound needs an nn.Sequential model, got {type(model).__name__}")
    if any(module_has_hooks(m) for m in model.modules()) or global_module_hooks():
        raise ValueError("the certified bound reads the layers' weights and cannot see hooks; remove the hooks")
    layers = []
    for name, m in _leaves(model, ""):
        if not (type(m) in _SMOOTH or type(m) in (nn.Linear, *_PASS)):
            raise TypeError(
                "the certified bound supports nn.Sequential chains of Linear, Tanh, Sigmoid, Flatten, Identity and "
                f"Dropout (evaluated in eval mode; smooth layers with known derivative ranges); got {name} ({type(m).__name__})"
            )
        if type(m) is nn.Linear or type(m) in _SMOOTH:
            layers.append(m)
    return layers


def hessian_interval(model: Any, inputs: Tensor, target: None | int | Tensor, eps: float,
                     norm: str) -> tuple[Tensor, Tensor]:
    """Elementwise ``(lower, upper)`` bounds, each ``(B, n, n)``, on ``∇²f_b(z)`` for every ``z``
    in the ``eps``-ball (``norm`` ``"l2"`` or ``"linf"``) around each example ``x_b`` (flattened,
    ``n`` entries), where ``f_b`` is output ``target`` (``None``: the single output; an ``int`` or
    a ``(B,)`` tensor of indices) of a chain of ``Linear`` / ``Tanh`` / ``Sigmoid`` layers."""
    layers = check_chain(model)
    x = inputs.detach().reshape(inputs.shape[0], -1)
    batch, n = x.shape
    p_lo, p_hi = x - eps, x + eps  # the values: a box holding the ball (exact at the first Linear)
    exact = True
    eye = torch.eye(n, dtype=x.dtype, device=x.device).expand(batch, n, n)
    j_lo = j_hi = eye  # (B, units, n)
    h_lo = h_hi = None  # (B, units, n, n); None while zero (before the first activation)
    for m in layers:
        if isinstance(m, nn.Linear):
            w = m.weight.detach().to(x.dtype)
            if exact:  # the range of w·z over the ball
                rad = eps * (w.norm(dim=1) if norm == "l2" else w.abs().sum(1))
                mid = x @ w.T
                p_lo, p_hi = mid - rad, mid + rad
                exact = False
            else:
                p_lo, p_hi = _linear(w, p_lo, p_hi)
            if m.bias is not None:
                b = m.bias.detach().to(x.dtype)
                p_lo, p_hi = p_lo + b, p_hi + b
            j_lo, j_hi = _linear(w, j_lo, j_hi)
            if h_lo is not None:
                h_lo, h_hi = _linear(w, h_lo, h_hi)
            continue
        (d1_lo, d1_hi), (d2_lo, d2_hi) = derivative_ranges(type(m), p_lo, p_hi)
        outer = _times((j_lo.unsqueeze(3), j_hi.unsqueeze(3)), (j_lo.unsqueeze(2), j_hi.unsqueeze(2)))
        first = _times((d2_lo[..., None, None], d2_hi[..., None, None]), outer)
        if h_lo is None:
            h_lo, h_hi = first
        else:
            second = _times((d1_lo[..., None, None], d1_hi[..., None, None]), (h_lo, h_hi))
            h_lo, h_hi = first[0] + second[0], first[1] + second[1]
        j_lo, j_hi = _times((d1_lo[..., None], d1_hi[..., None]), (j_lo, j_hi))
        transform = _SMOOTH[type(m)][0]
        p_lo, p_hi = transform(p_lo), transform(p_hi)
        exact = False
    units = j_lo.shape[1]
    if h_lo is None:  # no activation: an affine model, whose Hessian is zero
        h_lo = h_hi = torch.zeros(batch, units, n, n, dtype=x.dtype, device=x.device)
    if target is None:
        if units != 1:
            raise ValueError(f"target=None needs one model output, got {units}; pass a class index or a tensor of indices")
        index = torch.zeros(batch, dtype=torch.long, device=x.device)
    else:
        check_class_index(target, units)
        index = torch.as_tensor(target, device=x.device).expand(batch)
    rows = torch.arange(batch, device=x.device)
    return h_lo[rows, index], h_hi[rows, index]
