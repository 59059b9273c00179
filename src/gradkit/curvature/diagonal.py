"""Diagonals of curvature matrices: exact by columns, exact by closed forms, or Hutchinson.

:func:`diagonal` takes any square :class:`~gradkit.linalg.LinearOperator` (in particular the
exact operators of :mod:`gradkit.curvature.operators` and the block-diagonal operators of
:mod:`gradkit.curvature.blocks`) and returns ``diag(M)``:

* ``method="columns"``: ``M e_j`` for blocks of unit vectors, ``n`` products in all;
* ``method="hutchinson"``: the stochastic estimator of Bekas, Kokiopoulou & Saad (2007)
  with seeded Rademacher probes (:func:`gradkit.linalg.hutchinson_diagonal`);
* ``method="exact"``: a closed form where one exists, else the columns.  The GGN, empirical
  Fisher and Monte-Carlo Fisher are all ``c Σ_n J_nᵀ A_n J_n`` with a small per-example
  output-space matrix ``A_n = Σ_k λ_nk s_nk s_nkᵀ``, so

  .. math::  \\operatorname{diag}(M) = c \\sum_n \\sum_k \\lambda_{nk} (J_n^\\top s_{nk})^{\\odot 2},

  ``K`` per-example vector-Jacobian products per example instead of ``n`` products (the
  square-root backpropagation of BackPACK, Dangel, Kunstner & Hennig 2020, arXiv:1912.10985,
  sec. 3).  When every selected parameter belongs to an ``nn.Linear`` or ``nn.Conv2d`` layer
  (and the checks of :mod:`gradkit.curvature._diag_layers` pass: no tying, each layer run once,
  examples as rows), the ``K`` vectors are backpropagated through one forward pass and the
  squares are formed layer by layer from the layer inputs and output gradients (for a Linear,
  ``(Σ_k g_k²)ᵀ a²``: one matrix product); otherwise ``torch.func.vmap`` over the examples of a
  batch gives the per-example products, for any model.  The log (``gradkit``, DEBUG / INFO)
  says which path ran and why the layer-wise one was refused.
  ``A_n`` is the output Hessian ``∇²_f ℓ_n`` for the GGN (Schraudolph 2002, "Fast curvature
  matrix-vector products for second-order gradient descent"), the outer product of the
  output gradient for the empirical Fisher (Kunstner, Balles & Hennig 2019,
  arXiv:1905.12558) and of sampled output gradients for the MC Fisher (Martens 2020,
  arXiv:1412.1193, sec. 9.2).
* ``method="auto"`` (default): ``"exact"`` for these three operators; otherwise ``"columns"``
  when ``n <= EXACT_MAX_PARAMS`` and ``"hutchinson"`` above.

The scaling is the operators': the matrix of the loss over all ``N`` examples, with the loss's
``mean``/``sum`` reduction.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gradkit.core.functional import check_train_mode
from gradkit.core.losses import (
    has_closed_form,
    output_grads,
    output_hessian_vp,
    reduction_factor,
    sample_output_grads,
)
from gradkit.curvature._diag_layers import layerwise_diagonal
from gradkit.curvature.blocks import BlockDiagonalOperator
from gradkit.curvature.kfac_factors import hessian_sqrt_columns
from gradkit.curvature.operators import CurvatureOperator, EFOperator, GGNOperator, MCFisherOperator, mc_generator
from gradkit.linalg.operator import LinearOperator
from gradkit.linalg.trace import hutchinson_diagonal

__all__ = ["EXACT_MAX_PARAMS", "METHODS", "diagonal", "column_diagonal", "to_param_dict"]

logger = logging.getLogger("gradkit")

METHODS = ("auto", "exact", "columns", "hutchinson")

#: ``method="auto"`` takes the ``n`` columns of an operator without a closed-form diagonal up to
#: this many parameters, and Hutchinson above.  At 2048 the columns cost at most ~20x the default
#: 100 Hutchinson probes, whose relative error on curvature matrices of networks (off-diagonal
#: mass comparable to the diagonal) is still tens of percent: exactness is worth it there.
EXACT_MAX_PARAMS = 2048

_DEFAULT_CHUNK = 64


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def diagonal(
    op: LinearOperator,
    *,
    method: str = "auto",
    num_samples: int = 100,
    seed: int = 0,
    chunk_size: int | None = None,
    progress: bool = False,
    as_dict: bool = False,
) -> Tensor | dict[str, Tensor]:
    """The diagonal of a curvature matrix (any square :class:`~gradkit.linalg.LinearOperator`).

    Methods (see the module docstring for the equations):

    * ``"columns"``: ``diag(M)_j = (M e_j)_j``, unit vectors ``chunk_size`` at a time (``n``
      products; exact to rounding).
    * ``"hutchinson"``: Bekas, Kokiopoulou & Saad (2007), "An estimator for the diagonal of a
      matrix", Appl. Numer. Math. 57(11-12): ``diag(M) ≈ (1/S) Σ_s z_s ⊙ M z_s`` with ``S =
      num_samples`` Rademacher probes ``z_s`` drawn from ``seed``; unbiased, with per-probe
      variance ``Σ_{l≠j} M_jl²`` for entry ``j``.  Default ``S = 100`` as PyHessian (Yao et al.
      2020, arXiv:1912.07145).
    * ``"exact"``: for :class:`GGNOperator`, :class:`EFOperator` and :class:`MCFisherOperator`
      the closed form ``diag(M) = c Σ_n Σ_k λ_nk (J_nᵀ s_nk)²`` over examples ``n``, with ``c``
      the loss's reduction factor (folded into ``λ``), ``J_n`` the Jacobian of example ``n``'s
      output and ``A_n = Σ_k λ_nk s_nk s_nkᵀ`` its output-space matrix: the eigenpairs of the
      output Hessian (GGN, ``K`` = outputs per example), ``(∇_f ℓ_n, 1)`` (EF, ``K = 1``) or
      the operator's own sampled gradients with weight ``1/M`` (MC Fisher, ``K = M``, the same
      draws as its products).  Cost, for models of ``nn.Linear``/``nn.Conv2d`` layers: one
      forward and ``K`` backward passes per batch plus per-layer squares (the layer-wise path);
      for any other model: ``K`` sweeps of per-example VJPs per batch, each holding a
      ``(batch size, n)`` tensor.  It needs a model ``torch.func.vmap`` can batch and in which
      each example's output depends on that example alone; with train-mode BatchNorm/Dropout
      (``allow_train_mode=True``) the columns are taken instead.  Any other operator: the
      columns.
    * ``"auto"``: ``"exact"`` where a closed form exists, else ``"columns"`` for
      ``n <= EXACT_MAX_PARAMS`` (2048) and ``"hutchinson"`` above.

    A :class:`~gradkit.curvature.blocks.BlockDiagonalOperator` is handled block by block (each
    block by the rule above, its diagonal being the full matrix's on those entries), except for
    ``"hutchinson"``, which probes the whole operator.  The function keeps no state.

    Args:
        op: square operator, e.g. ``GGNOperator(model, loss_fn, data)``.
        method: one of ``METHODS``.
        num_samples: Hutchinson probes ``S``.
        seed: seed of the Hutchinson probes (the MC Fisher's own draws use the operator's seed).
        chunk_size: columns per product ``op @ E`` (columns and Hutchinson); default 64.
        progress: show a progress bar (over column blocks, probes or batches).
        as_dict: return ``{parameter name: diagonal shaped like the parameter}`` instead of the
            flat vector (needs an operator over a model's parameters).

    Returns:
        ``(n,)`` tensor in the operator's dtype and device, or the dict (see :func:`to_param_dict`).
    """
    if not isinstance(op, LinearOperator):
        raise TypeError(f"op must be a LinearOperator (e.g. a GGNOperator), got {type(op).__name__}")
    if op.shape[0] != op.shape[1] or op.shape[0] == 0:
        raise ValueError(f"op must be a non-empty square operator, got shape {op.shape}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    num_samples = _check_positive_int(num_samples, "num_samples")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be a non-negative int, got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    chunk_size = _DEFAULT_CHUNK if chunk_size is None else _check_positive_int(chunk_size, "chunk_size")
    if as_dict and op.param_names is None:
        raise ValueError(f"as_dict=True needs an operator over a model's parameters; {type(op).__name__} has none")

    kwargs = dict(method=method, num_samples=num_samples, seed=int(seed), chunk_size=chunk_size, progress=progress)
    if isinstance(op, BlockDiagonalOperator) and method != "hutchinson":
        result = torch.empty(op.shape[0], dtype=op.dtype, device=op.device)
        for name, block in op.blocks.items():
            result[op.block_indices(name)] = diagonal(block, **kwargs)  # type: ignore[arg-type]
    else:
        result = _diagonal(op, **kwargs)  # type: ignore[arg-type]
    return to_param_dict(op, result) if as_dict else result


def _diagonal(op: LinearOperator, *, method: str, num_samples: int, seed: int, chunk_size: int,
              progress: bool) -> Tensor:
    closed_form = _has_closed_form(op)
    if method == "auto":
        method = "exact" if closed_form else ("columns" if op.shape[0] <= EXACT_MAX_PARAMS else "hutchinson")
    if method == "exact":
        if closed_form:
            fast = layerwise_diagonal(op, functools.partial(_square_root_factors, op), progress=progress)
            return fast if fast is not None else _outer_product_diagonal(op, progress=progress)  # type: ignore[arg-type]
        method = "columns"
    if method == "columns":
        return column_diagonal(op, chunk_size=chunk_size, progress=progress)
    return _hutchinson(op, num_samples, seed, chunk_size, progress)


def _has_closed_form(op: LinearOperator) -> bool:
    """Exactly the three outer-product operators (a subclass may change the matrix), and only
    when each example's output depends on that example alone (no train-mode BatchNorm)."""
    if type(op) not in (GGNOperator, EFOperator, MCFisherOperator):
        return False
    try:
        check_train_mode(op.model)
    except ValueError:
        logger.info("diagonal: train-mode BatchNorm/Dropout couples the examples; using the columns")
        return False
    return True


def to_param_dict(op: LinearOperator, vector: Tensor) -> dict[str, Tensor]:
    """Split a flat ``(n,)`` vector over ``op``'s parameters: ``{name: tensor shaped like it}``."""
    if op.param_names is None or op.param_shapes is None:
        raise ValueError(f"{type(op).__name__} has no parameter structure to split a vector over")
    if not isinstance(vector, Tensor) or vector.shape != (op.shape[0],):
        got = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
        raise ValueError(f"vector must have shape ({op.shape[0]},), got {got}")
    pieces = torch.split(vector, [s.numel() for s in op.param_shapes])
    return {n: p.reshape(s) for n, p, s in zip(op.param_names, pieces, op.param_shapes)}


# ----------------------------------------------------------------------------- generic methods
def column_diagonal(op: LinearOperator, *, chunk_size: int = _DEFAULT_CHUNK, progress: bool = False) -> Tensor:
    """``diag(M)_j = (M e_j)_j`` with the unit vectors ``chunk_size`` at a time (``n`` products)."""
    n = op.shape[0]
    result = torch.empty(n, dtype=op.dtype, device=op.device)
    starts = range(0, n, chunk_size)
    for start in tqdm(starts, desc="diagonal (columns)", leave=False, disable=not progress):
        rows = torch.arange(start, min(start + chunk_size, n), device=op.device)
        cols = torch.arange(rows.numel(), device=op.device)
        E = torch.zeros(n, rows.numel(), dtype=op.dtype, device=op.device)
        E[rows, cols] = 1.0
        result[rows] = (op @ E)[rows, cols]
    return result


def _hutchinson(op: LinearOperator, num_samples: int, seed: int, chunk_size: int, progress: bool) -> Tensor:
    if not progress:
        return hutchinson_diagonal(op, num_samples, distribution="rademacher", seed=seed, batch_size=chunk_size)
    with tqdm(total=num_samples, desc="diagonal (Hutchinson)", leave=False) as bar:

        def counted(X: Tensor) -> Tensor:
            bar.update(X.shape[1])
            return op._matmat(X)

        wrapped = LinearOperator(op.shape, matmat=counted, dtype=op.dtype, device=op.device,
                                 symmetric=op.is_symmetric)
        return hutchinson_diagonal(wrapped, num_samples, distribution="rademacher", seed=seed, batch_size=chunk_size)


# ----------------------------------------------------------------------------- closed forms
def _output_factors(op: CurvatureOperator, index: int, out: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(S, λ)`` with the batch's output-space matrix ``A_n = Σ_k λ_nk s_nk s_nkᵀ`` per example:
    ``S`` of shape ``(K, *out.shape)``, ``λ`` of shape ``(K, B)``; ``A_n`` carries the reduction
    factor ``c``.

    * GGN: ``A_n = ∇²_{f_n} L`` (the output Hessian of the batch loss restricted to example
      ``n``, block-diagonal over examples), factored by ``eigh``: ``s_nk`` its eigenvectors,
      ``λ_nk`` its eigenvalues (signed: any loss, convex or not).  The ``K = numel(f_n)``
      blocks are read off ``K`` output-space Hessian-vector products with unit vectors
      (closed forms for MSE, cross-entropy and BCE, autograd otherwise).
    * empirical Fisher: ``s_n = ∇_{f_n} ℓ_n`` with the true targets, ``λ = c`` (``K = 1``).
    * MC Fisher: ``s_nm = ∇_{f_n} ℓ(f_n, ŷ_nm)``, ``λ = c / M`` (``K = M = mc_samples``),
      drawn from the generator the operator seeds for batch ``index``, so the draws are its own.
    """
    loss_fn, B = op.loss_fn, out.shape[0]
    c = reduction_factor(loss_fn, out, targets)
    if isinstance(op, EFOperator):
        S = output_grads(loss_fn, out, targets).unsqueeze(0)
        return S, torch.full((1, B), c, dtype=out.dtype, device=out.device)
    if isinstance(op, MCFisherOperator):
        generator = mc_generator(op.seed, index, op.device)  # the operator's own draws
        S = sample_output_grads(loss_fn, out, op.mc_samples, generator, targets)
        lam = c / op.mc_samples
        return S, torch.full((op.mc_samples, B), lam, dtype=out.dtype, device=out.device)
    K = out[0].numel()
    eye = torch.eye(K, dtype=out.dtype, device=out.device)
    U = eye.unsqueeze(1).expand(K, B, K).reshape(K, *out.shape)  # U[k] = e_k in every example
    HU = output_hessian_vp(loss_fn, out, targets, U).reshape(K, B, K)
    H = HU.permute(1, 2, 0)  # H[n, i, k] = (H_n e_k)_i
    lam, V = torch.linalg.eigh((H + H.transpose(1, 2)) / 2)  # (B, K), (B, K, K)
    if has_closed_form(loss_fn):  # MSE, cross-entropy, BCE: PSD, negative eigenvalues are rounding
        lam = lam.clamp_min(0.0)
    return V.permute(2, 0, 1).reshape(K, *out.shape), lam.T


def _square_root_factors(op: CurvatureOperator, index: int, out: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(S, signs)`` with ``A_n = Σ_k signs_nk s_nk s_nkᵀ`` for the layer-wise path: ``S`` of
    shape ``(K, *out.shape)``, ``signs`` ``(K, B)`` or ``None`` when all are positive.

    For the GGN of MSE, cross-entropy and BCE on ``(B, C)`` outputs, the closed-form square root
    of the output Hessian (``K = C``; cross-entropy: ``s_k = √p_k (e_k − p)``, so that
    ``Σ_k s_k s_kᵀ = diag(p) − p pᵀ``; :func:`~gradkit.curvature.kfac_factors.hessian_sqrt_columns`)
    times ``√c``; otherwise the factors of :func:`_output_factors` scaled by ``√|λ_nk|``.  (On
    ``(B, C, d1, ...)`` outputs those closed-form columns span all positions of an example at
    once, so ``Σ_k s_k s_kᵀ`` would couple the positions: the eigenpairs are taken there.)
    """
    loss_fn = op.loss_fn
    ignored = (isinstance(loss_fn, nn.CrossEntropyLoss) and not targets.is_floating_point()
               and bool((targets == loss_fn.ignore_index).any()))  # changes the averaging: eigh path
    if type(op) is GGNOperator and out.ndim == 2 and has_closed_form(loss_fn) and not ignored:
        scale = math.sqrt(reduction_factor(loss_fn, out))
        return scale * torch.stack(list(hessian_sqrt_columns(loss_fn, out))), None
    S, lam = _output_factors(op, index, out, targets)
    S = S * lam.abs().sqrt().reshape(*lam.shape, *([1] * (S.ndim - 2)))
    return S, None if bool((lam >= 0).all()) else lam.sign()


def _outer_product_diagonal(op: CurvatureOperator, *, progress: bool = False) -> Tensor:
    """``diag(c Σ_n J_nᵀ A_n J_n) = c Σ_n Σ_k λ_nk (J_nᵀ s_nk)²`` over all data, by per-example
    VJPs (any model; the fallback of :func:`~gradkit.curvature._diag_layers.layerwise_diagonal`).

    ``J_n`` is the Jacobian of example ``n``'s output alone; ``J_nᵀ s_nk`` is one vector-Jacobian
    product of the per-example function ``θ -> f(x_n, θ)``, batched over the examples of a batch
    by ``torch.func.vmap``: ``K`` sweeps per batch, each giving the ``(B, n)`` per-example
    products for one column ``k`` (scaled by ``sqrt|λ_nk|``), squared and summed over the batch
    with the sign of ``λ_nk``.  Batches are weighted as in the operator (``B/N`` for a mean
    loss, ``1`` for a sum).  PSD ``A_n`` give sums of squares, so a non-negative diagonal.
    """
    fm = op._fm
    total = torch.zeros(op.shape[0], dtype=op.dtype, device=op.device)
    batches = tqdm(op.data, desc=f"diagonal ({type(op).__name__})", leave=False) if progress else op.data

    def vjp_one(values: tuple[Tensor, ...], x: Any, s: Tensor) -> tuple[Tensor, ...]:
        one = tuple(t.unsqueeze(0) for t in x) if isinstance(x, tuple) else x.unsqueeze(0)
        _, pullback = torch.func.vjp(lambda v: fm(v, one), values)
        return pullback(s.unsqueeze(0))[0]

    per_example_vjp = torch.vmap(vjp_one, in_dims=(None, 0, 0))
    for index, (inputs, targets) in enumerate(batches):
        with torch.no_grad():
            out = fm(fm.values, inputs)
        S, lam = _output_factors(op, index, out, targets)
        S = S * lam.abs().sqrt().reshape(*lam.shape, *([1] * (S.ndim - 2)))
        signs = lam.sign()  # (K, B)
        x = tuple(inputs) if isinstance(inputs, (tuple, list)) else inputs
        squares = [torch.zeros(v.numel(), dtype=op.dtype, device=op.device) for v in fm.values]
        for k in range(S.shape[0]):
            positive = bool((signs[k] >= 0).all())
            for acc, g in zip(squares, per_example_vjp(fm.values, x, S[k])):  # (B, *shape) each
                g2 = g.reshape(g.shape[0], -1).square()  # (J_nᵀ s_nk)² per example n
                acc += g2.sum(0) if positive else signs[k] @ g2
        total += op._batch_weight(inputs) * torch.cat(squares)
    return total
