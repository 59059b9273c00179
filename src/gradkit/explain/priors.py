"""Attribution priors (Erion, Janizek, Sturmfels, Lundberg & Lee 2021, arXiv:1906.10670): penalties
``Ω(Φ)`` on a batch of attributions, added to the training loss as ``loss + λ Ω(Φ)``.

All are differentiable; with ``Φ = expected_gradients(model, x, y, background=..., n=1,
create_graph=True)`` their gradient reaches the model parameters through double backprop::

    phi = expected_gradients(model, x, y, background=train_x, n=1, create_graph=True)
    loss = F.cross_entropy(model(x), y) + lam * total_variation_prior(phi)
    loss.backward()

The explainers compute the attributions with the model in eval mode (BatchNorm running
statistics, no Dropout; see :mod:`gradkit.explain._common`) and restore the training flags, so
the prior sees the deterministic network; the reference code of Erion et al. differentiates the
training-mode network instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["total_variation_prior", "gini", "gini_sparsity_prior", "laplacian", "graph_laplacian_prior"]


def _check_attributions(attributions: Any, min_ndim: int, what: str) -> Tensor:
    if not isinstance(attributions, Tensor) or not attributions.is_floating_point():
        raise TypeError(f"attributions must be a floating tensor, got {type(attributions).__name__}")
    if attributions.ndim < min_ndim or attributions.shape[0] == 0:
        raise ValueError(f"attributions must be {what}, got shape {tuple(attributions.shape)}")
    return attributions


def total_variation_prior(attributions: Tensor) -> Tensor:
    """Pixel attribution prior Ω_pixel (Erion et al. 2021, Sec. "Image data"): the anisotropic
    total variation of each attribution map, averaged over the batch.

    .. math::

        Ω_{pixel}(Φ) = \\frac{1}{B} \\sum_{b} \\sum_{c,i,j} |φ_{b,c,i+1,j} − φ_{b,c,i,j}|
                       + |φ_{b,c,i,j+1} − φ_{b,c,i,j}|

    ``attributions``: ``(B, H, W)`` or ``(B, C, H, W)`` (channels summed, as
    ``tf.image.total_variation`` in the reference code, whose mean over images is the penalty
    used there).  Returns a scalar.
    """
    phi = _check_attributions(attributions, 3, "(B, H, W) or (B, C, H, W) image attributions")
    tv = (phi[..., 1:, :] - phi[..., :-1, :]).abs().sum() + (phi[..., :, 1:] - phi[..., :, :-1]).abs().sum()
    return tv / phi.shape[0]


def gini(values: Tensor) -> Tensor:
    """Gini coefficient of non-negative ``values`` (flattened):
    ``G = Σ_i Σ_j |v_i − v_j| / (2 p Σ_i v_i)``, computed in ``O(p log p)`` from the sorted
    values ``v_(1) ≤ … ≤ v_(p)`` as ``Σ_i (2i − p − 1) v_(i) / (p Σ_i v_i)``.  0 when all values
    are equal (all zero included, with a zero gradient: not ``0/0``), ``1 − 1/p`` when one value
    holds everything."""
    v = _check_attributions(values, 1, "a non-empty tensor").reshape(-1)
    p = v.numel()
    sorted_v, _ = torch.sort(v)
    rank = torch.arange(1, p + 1, dtype=v.dtype, device=v.device)
    total = p * v.sum()
    positive = total > 0
    return torch.where(positive, ((2 * rank - p - 1) * sorted_v).sum() / torch.where(positive, total, 1), 0)


def gini_sparsity_prior(attributions: Tensor) -> Tensor:
    """Sparsity attribution prior Ω_sparse (Erion et al. 2021, Sec. "Sparsity"): minus the Gini
    coefficient of the global feature importance ``φ̄_i = (1/B) Σ_b |φ_{b,i}|``.

    .. math:: Ω_{sparse}(Φ) = −\\mathrm{Gini}(φ̄)

    Minimising it concentrates the attributions on few features.  ``attributions``: ``(B,
    *features)``.  Returns a scalar in ``[−1, 0]``.
    """
    phi = _check_attributions(attributions, 2, "(B, *features)")
    return -gini(phi.abs().mean(0))


def laplacian(adjacency: Tensor) -> Tensor:
    """Graph Laplacian ``L = D − W`` of a symmetric non-negative weighted adjacency ``W`` (``D``
    the diagonal of its row sums)."""
    W = adjacency
    if not isinstance(W, Tensor) or W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"adjacency must be a square (p, p) tensor, got {getattr(W, 'shape', type(W).__name__)}")
    if not torch.equal(W, W.T) or bool((W < 0).any()):
        raise ValueError("adjacency must be symmetric with non-negative weights")
    return torch.diag(W.sum(1)) - W


def graph_laplacian_prior(attributions: Tensor, adjacency: Tensor, absolute: bool = False) -> Tensor:
    """Graph attribution prior Ω_graph (Erion et al. 2021, Sec. "Gene expression data"): features
    linked in a graph should receive similar global attributions.

    .. math:: Ω_{graph}(Φ) = φ̄^⊤ L_G φ̄ = \\tfrac12 \\sum_{i,j} W_{ij} (φ̄_i − φ̄_j)^2

    with ``φ̄ = (1/B) Σ_b φ_b`` the mean attribution per feature (``absolute=True``: of ``|φ_b|``)
    and ``L_G = D − W`` (:func:`laplacian`) from the ``(p, p)`` ``adjacency`` over the ``p``
    flattened features.  The reference code uses the signed mean (default) and sums ``W_ij(φ̄_i −
    φ̄_j)²`` over ordered pairs, twice this value.  Returns a scalar.
    """
    phi = _check_attributions(attributions, 2, "(B, *features)")
    mean = (phi.abs() if absolute else phi).reshape(phi.shape[0], -1).mean(0)
    if not isinstance(adjacency, Tensor) or adjacency.shape != (mean.numel(), mean.numel()):
        got = tuple(adjacency.shape) if isinstance(adjacency, Tensor) else type(adjacency).__name__
        raise ValueError(f"adjacency must be ({mean.numel()}, {mean.numel()}) for {mean.numel()} features, got {got}")
    return mean @ (laplacian(adjacency.to(mean)) @ mean)
