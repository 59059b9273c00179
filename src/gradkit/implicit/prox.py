"""Proximal operators ``prox_{s h}(x) = argmin_p ½||p - x||² + s h(p)`` in closed form.

The signature ``prox(x, hyperparams, scaling)`` is the one
:func:`~gradkit.implicit.prox_grad_fixed_point` calls (``scaling`` = the step size ``η``).
Both operators are elementwise tensor expressions, differentiable almost everywhere and usable
under ``torch.func`` transforms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["prox_lasso", "prox_elastic_net"]


def _check(name: str, x: Any, scaling: Any) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name}: x must be a floating-point tensor, got {type(x).__name__}")
    if not isinstance(scaling, Tensor) and not scaling > 0:
        raise ValueError(f"{name}: scaling must be > 0, got {scaling!r}")


def _check_penalty(name: str, arg: str, value: Any) -> None:
    """A number penalty must be >= 0 (tensors are not read, so that the operators stay usable under
    ``torch.func`` transforms)."""
    if not isinstance(value, Tensor) and not value >= 0:
        raise ValueError(f"{name}: {arg} must be >= 0, got {value!r}")


def prox_lasso(x: Tensor, l1reg: float | Tensor, scaling: float | Tensor = 1.0) -> Tensor:
    """Soft-thresholding, the proximal operator of ``h(p) = l1reg ||p||₁``.

    Tibshirani (1996), "Regression shrinkage and selection via the lasso"; Donoho (1995)
    (pre-arXiv)::

        prox_{s h}(x) = sign(x) · max(|x| - s · l1reg, 0),   s = scaling.

    ``l1reg >= 0`` may be a tensor (one penalty per coordinate) and is differentiable:
    ``∂p/∂l1reg = -s · sign(x)`` on the support ``|x| > s · l1reg``, 0 elsewhere.
    """
    _check("prox_lasso", x, scaling)
    _check_penalty("prox_lasso", "l1reg", l1reg)
    return torch.sign(x) * torch.relu(x.abs() - scaling * l1reg)


def prox_elastic_net(x: Tensor, hyperparams: tuple[Any, Any], scaling: float | Tensor = 1.0) -> Tensor:
    """Proximal operator of the elastic net ``h(p) = l1reg ||p||₁ + (l2reg / 2) ||p||²``.

    Zou & Hastie (2005), "Regularization and variable selection via the elastic net", JRSS B 67
    (pre-arXiv); the prox is soft-thresholding followed by shrinkage::

        prox_{s h}(x) = sign(x) · max(|x| - s · l1reg, 0) / (1 + s · l2reg),   s = scaling,

    ``hyperparams = (l1reg, l2reg)``, both ``>= 0``, numbers or tensors (differentiable); the
    parametrisation ``μ||p||₁ + (λ/2)||p||²`` of ProximalOperators.jl's ``ElasticNet(μ, λ)``.
    """
    _check("prox_elastic_net", x, scaling)
    if not isinstance(hyperparams, (tuple, list)) or len(hyperparams) != 2:
        raise TypeError(f"prox_elastic_net: hyperparams must be a pair (l1reg, l2reg), got {hyperparams!r}")
    l1reg, l2reg = hyperparams
    _check_penalty("prox_elastic_net", "l1reg", l1reg)
    _check_penalty("prox_elastic_net", "l2reg", l2reg)
    return prox_lasso(x, l1reg, scaling) / (1 + scaling * l2reg)
