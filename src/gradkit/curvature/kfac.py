"""K-FAC and EKFAC: Kronecker-factored approximations of the GGN / Fisher as linear operators.

K-FAC (Martens & Grosse 2015, arXiv:1503.05671; Grosse & Martens 2016, arXiv:1602.01407 for
convolutions) approximates the curvature of the loss over ``N`` examples by a block-diagonal
matrix with one block per layer, ``G ⊗ A``, acting on the layer's parameter matrix ``V``
(``(D_out, D_in)`` weight, bias appended as a last column) as ``V ↦ G V A``.  With the layer
inputs ``a_{n,s}`` and the backpropagated output gradients ``g_{n,s,k}`` at the ``S``
weight-sharing positions ``s`` (see :mod:`gradkit.curvature.kfac_factors`), and ``c`` the
loss' reduction factor over all data (``1`` for ``reduction="sum"``, ``1/(N·terms)`` for a mean;
:mod:`gradkit.core.losses`), the KFAC-expand and KFAC-reduce variants of Eschenhagen et al. 2023
(arXiv:2311.00636) are

* ``kfac_approx="expand"``: ``A = 1/(N S) Σ_{n,s} a_{n,s} a_{n,s}ᵀ``,
  ``G = c w Σ_{n,s,k} g_{n,s,k} g_{n,s,k}ᵀ``;
* ``kfac_approx="reduce"``: ``A = 1/N Σ_n ā_n ā_nᵀ`` with ``ā_n = 1/S Σ_s a_{n,s}``,
  ``G = c w Σ_{n,k} ĝ_{n,k} ĝ_{n,k}ᵀ`` with ``ĝ_{n,k} = Σ_s g_{n,s,k}``

(identical when ``S = 1``; Grosse & Martens 2016 put the ``1/S`` into ``G`` instead of ``A``, the
same product).  The ``K`` vectors ``k`` backpropagated from each loss term ``t`` and their
weight ``w`` give the Fisher type:

* ``"type2"``: the ``K = C`` columns ``s_{t,c}`` of ``∇²_f ℓ_t = Σ_c s_{t,c} s_{t,c}ᵀ``
  (exact output Hessian, "KFLR" of Botev, Ritter & Barber 2017, arXiv:1706.03662), ``w = 1``;
* ``"mc"``: ``∇_f ℓ(f_t, ŷ)`` for ``K = mc_samples`` draws ``ŷ`` from the model's predictive
  distribution (Martens & Grosse 2015), ``w = 1/K``;
* ``"empirical"``: ``∇_f ℓ(f_t, y_t)`` with the true target, ``K = 1``, ``w = 1``.

All scales follow curvlinops' ``KFACLinearOperator`` (with ``separate_weight_and_bias=False``),
so for a deep linear network with MSE each block equals the exact GGN block.

EKFAC (George et al. 2018, arXiv:1806.03884) keeps K-FAC's eigenbasis ``Q_G ⊗ Q_A`` and refits
the eigenvalues to the second moments of the per-example gradients in that basis:
``Λ_{ij} = c w Σ_{n,k} ((Q_Gᵀ ∇_W ℓ_{n,k} Q_A)_{ij})²`` with
``∇_W ℓ_{n,k} = Σ_s g_{n,s,k} a_{n,s}ᵀ``; the block is ``V ↦ Q_G ((Q_Gᵀ V Q_A) ⊙ Λ) Q_Aᵀ``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from gradkit.core.functional import select_params
from gradkit.core.losses import has_closed_form, output_grads, reduction_factor, sample_output_grads
from gradkit.curvature.kfac_factors import (
    KroneckerBlock,
    LayerTap,
    averaged_layer_inputs,
    hessian_sqrt_columns,
    kronecker_blocks,
    layer_inputs,
    layer_output_grads,
    sandwich,
    second_moment,
)
from gradkit.curvature.operators import CurvatureOperator, mc_generator
from gradkit.linalg.operator import LinearOperator

__all__ = ["KFACOperator", "EKFACOperator", "KroneckerBlock"]

logger = logging.getLogger("gradkit")

FISHER_TYPES = {"type2": "type2", "type-2": "type2", "mc": "mc", "empirical": "empirical"}
KFAC_APPROX = ("expand", "reduce")
#: Largest number of entries of a per-example gradient chunk in EKFAC's eigenvalue refit.
_CHUNK_ENTRIES = 2**24


class KFACOperator(CurvatureOperator):
    """K-FAC approximation of the GGN / Fisher of ``loss_fn`` over ``data`` (see the module
    docstring for the factors), plus ``damping · I``.

    The factors are computed at construction (one pass over the data; :meth:`compute_factors`
    recomputes them, e.g. after the parameters changed) and kept in :attr:`blocks`.  Products
    ``op @ v`` take a flat ``(n,)`` vector, an ``(n, k)`` matrix or a list/dict of
    parameter-shaped tensors (:class:`~gradkit.linalg.LinearOperator`), ``n`` the number of
    selected parameters in the model's order, like :class:`~gradkit.curvature.GGNOperator`.

    Args:
        model: the network; every selected parameter must belong to an ``nn.Linear`` (any number
            of leading dimensions: they are the weight-sharing dimension) or an ``nn.Conv2d``
            (``groups=1``) layer applied once per forward pass.
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss`` with
            reduction ``"mean"`` or ``"sum"`` (no ``weight`` / ``pos_weight`` / label smoothing).
        data: one ``(inputs, targets)`` pair or a re-iterable of them.
        params: parameters to approximate (default: all that require grad).
        fisher_type: ``"type2"`` (default; exact output Hessian, so K-FAC of the GGN),
            ``"mc"`` or ``"empirical"``.  ``"type-2"`` is accepted as curvlinops spells it.
        kfac_approx: ``"expand"`` (default, as curvlinops) or ``"reduce"`` for weight-sharing layers.
        damping: ``λ ≥ 0`` added as ``λ I`` to the operator and the default of :meth:`inverse`.
        mc_samples: draws per loss term for ``fisher_type="mc"`` (must be 1 otherwise).
        seed: seed of the Monte-Carlo draws; batch ``i`` uses the seed ``seed · 1000003 + i``, the
            same draws as :class:`~gradkit.curvature.MCFisherOperator`.
        separate_weight_and_bias: default ``False``: weight and bias of a layer form one block
            with the input augmented by a constant 1 (the bias' column); ``True`` gives them
            separate blocks ``G ⊗ A`` and ``G`` (curvlinops' default).
        **kwargs: ``progress``, ``check_deterministic``, ``num_data``, ``allow_train_mode``
            (see :class:`~gradkit.curvature.CurvatureOperator`).

    Attributes:
        blocks: the :class:`KroneckerBlock` of every layer (``input_factor`` ``A`` and
            ``gradient_factor`` ``G``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Any,
        *,
        params: Iterable[Tensor] | None = None,
        fisher_type: str = "type2",
        kfac_approx: str = "expand",
        damping: float = 0.0,
        mc_samples: int = 1,
        seed: int = 0,
        separate_weight_and_bias: bool = False,
        **kwargs: Any,
    ) -> None:
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of 'type2', 'mc', 'empirical', got {fisher_type!r}")
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}")
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        if FISHER_TYPES[fisher_type] != "mc" and mc_samples != 1:
            raise ValueError(f"mc_samples is only used with fisher_type='mc'; got mc_samples={mc_samples} with {fisher_type!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not isinstance(separate_weight_and_bias, bool):
            raise TypeError(f"separate_weight_and_bias must be a bool, got {type(separate_weight_and_bias).__name__}")
        if not isinstance(loss_fn, nn.Module) or not has_closed_form(loss_fn):
            raise ValueError(
                "K-FAC needs the loss' likelihood: loss_fn must be nn.MSELoss, nn.CrossEntropyLoss or "
                f"nn.BCEWithLogitsLoss without weight, pos_weight or label_smoothing; got {loss_fn!r}"
            )
        self.damping = _check_damping(damping, "damping")
        self.fisher_type, self.kfac_approx = FISHER_TYPES[fisher_type], kfac_approx
        self.mc_samples, self.seed = mc_samples, seed
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(params, Tensor):
            params = [params]
        selected = select_params(model, None if params is None else list(params))
        # the layer check comes first: no pass over the data for an unsupported model
        sizes = [p.numel() for p in selected.values()]
        self.blocks: list[KroneckerBlock] = kronecker_blocks(model, list(selected), sizes, separate_weight_and_bias)
        self._layers = {b.module_name: b.module for b in self.blocks}
        super().__init__(model, loss_fn, data, params=list(selected.values()), **kwargs)
        self.compute_factors()

    # ------------------------------------------------------------------ data passes
    def _output_vectors(self, index: int, out: Tensor, targets: Tensor) -> tuple[Iterable[Tensor], float]:
        """The ``K`` vectors (shaped like ``out``) to backpropagate for the batch and the weight
        ``c w`` of each of their outer products in ``G`` (``c`` of the batch's own loss; the
        batch's share of the data is applied by the caller)."""
        loss_fn = self.loss_fn
        if isinstance(loss_fn, nn.CrossEntropyLoss) and not targets.is_floating_point():
            if bool((targets == loss_fn.ignore_index).any()):
                raise ValueError(
                    f"targets contain ignore_index={loss_fn.ignore_index}; K-FAC assumes every loss term counts"
                )
        c = reduction_factor(loss_fn, out, targets)
        if self.fisher_type == "type2":
            return hessian_sqrt_columns(loss_fn, out), c
        if self.fisher_type == "mc":
            generator = mc_generator(self.seed, index, self.device)
            return sample_output_grads(loss_fn, out, self.mc_samples, generator, targets), c / self.mc_samples
        return output_grads(loss_fn, out, targets).unsqueeze(0), c

    def _passes(self) -> Iterator[tuple[LayerTap, Iterator[dict[str, Tensor]], float]]:
        """Per batch: the tapped forward pass, an iterator over the output gradients of every
        layer (one dict per backpropagated vector) and the weight of their outer products."""
        fm = self._fm
        for index, (inputs, targets) in enumerate(self._batches()):
            with torch.enable_grad(), LayerTap(self._layers) as tap:
                out = fm(fm.values, inputs)
            tap.check()
            if not isinstance(out, Tensor):
                raise TypeError(f"K-FAC needs a model that returns one tensor, got {type(out).__name__}")
            self._check_output(out)
            vectors, weight = self._output_vectors(index, out, targets)
            yield tap, tap.output_grads(out, vectors), weight * self._batch_weight(inputs)

    def _check_output(self, out: Tensor) -> None:
        """Hook for subclasses with restrictions on the model output."""

    def compute_factors(self) -> None:
        """(Re)compute ``A`` and ``G`` of every block with one pass over the data.

        ``A`` accumulates ``second_moment`` of the (position-averaged, for reduce) layer inputs
        divided by ``N S`` (expand) or ``N`` (reduce); ``G`` the outer products of the output
        gradients weighted by ``c w`` (module docstring).  State: ``blocks[i].input_factor``,
        ``blocks[i].gradient_factor``; a cached eigendecomposition is dropped.
        """
        expand = self.kfac_approx == "expand"
        weight_blocks = {b.module_name: b for b in self.blocks if b.weight_index is not None}
        A: dict[str, Tensor] = {}
        G: dict[str, Tensor] = {}
        for tap, grads, weight in self._passes():
            for name, block in weight_blocks.items():
                if expand:
                    a = layer_inputs(block.module, tap.inputs[name])
                    moment = second_moment(a.reshape(-1, a.shape[-1]), block.augmented) / (self.num_data * a.shape[1])
                else:
                    a_mean = averaged_layer_inputs(block.module, tap.inputs[name])
                    moment = second_moment(a_mean, block.augmented) / self.num_data
                A[name] = A[name] + moment if name in A else moment
            for layer_grads in grads:
                for name, module in self._layers.items():
                    g = layer_output_grads(module, layer_grads[name])
                    rows = g.reshape(-1, g.shape[-1]) if expand else g.sum(1)
                    moment = weight * (rows.T @ rows)
                    G[name] = G[name] + moment if name in G else moment
        for block in self.blocks:
            block.gradient_factor = G[block.module_name]
            if block.weight_index is None:
                block.input_factor = torch.ones(1, 1, dtype=self.dtype, device=self.device)
            else:
                block.input_factor = A[block.module_name]
        self._eigen: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None
        logger.debug("K-FAC factors of %d blocks computed over %d examples", len(self.blocks), self.num_data)

    # ------------------------------------------------------------------ products
    def _blockwise(self, X: Tensor, apply: Callable[[int, KroneckerBlock, Tensor], Tensor]) -> Tensor:
        """Apply ``apply(i, block, M)`` to the ``(D_out, D_in', k)`` matrices ``M`` of every block
        of the columns of ``X`` (``(n, k)``) and reassemble the ``(n, k)`` result."""
        out = torch.empty_like(X)
        for i, block in enumerate(self.blocks):
            block.scatter(apply(i, block, block.gather(X)), out)
        return out

    def _block_product(self) -> Callable[[int, KroneckerBlock, Tensor], Tensor]:
        """``M ↦ G M A`` per block (Martens & Grosse 2015: ``(G ⊗ A) vec(V) = vec(G V A)`` for
        row-major ``vec`` and symmetric ``A``)."""
        return lambda i, block, M: sandwich(block.gradient_factor, M, block.input_factor)

    def _matmat(self, X: Tensor) -> Tensor:
        result = self._blockwise(X, self._block_product())
        return result + self.damping * X if self.damping else result

    # ------------------------------------------------------------------ inverse
    def _eigenvalues(self, i: int, block: KroneckerBlock, eigen: tuple[Tensor, ...]) -> Tensor:
        """The ``(D_out, D_in')`` eigenvalues of the undamped block in the basis ``Q_G ⊗ Q_A``."""
        return torch.outer(eigen[0], eigen[1])

    def eigendecomposition(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per block: ``(Λ, Q_G, Q_A)`` with ``Λ`` the ``(D_out, D_in')`` eigenvalues of the
        undamped block (K-FAC: ``λ_G λ_Aᵀ``; EKFAC: the refitted ones) and ``Q_G, Q_A`` the
        eigenvectors of the factors (``torch.linalg.eigh``, computed once and cached)."""
        if self._eigen is None:
            self._eigen = []
            for block in self.blocks:
                lam_g, q_g = torch.linalg.eigh(block.gradient_factor)
                lam_a, q_a = torch.linalg.eigh(block.input_factor)
                self._eigen.append((lam_g, lam_a, q_g, q_a))
        return [(self._eigenvalues(i, b, e), e[2], e[3]) for i, (b, e) in enumerate(zip(self.blocks, self._eigen))]

    def inverse(self, damping: float | None = None) -> LinearOperator:
        """``(K + d I)⁻¹`` as a :class:`~gradkit.linalg.LinearOperator` with the parameter
        structure of this operator, ``K`` the undamped approximation and ``d = damping``
        (default: the operator's own ``damping``, so ``op.inverse() @ (op @ v) = v``).

        Exact, block by block, through the eigendecomposition of the factors:
        ``(G ⊗ A + d I)⁻¹ = (Q_G ⊗ Q_A) (Λ + d)⁻¹ (Q_G ⊗ Q_A)ᵀ``, i.e.
        ``V ↦ Q_G ((Q_Gᵀ V Q_A) ⊘ (Λ + d)) Q_Aᵀ``; for EKFAC ``Λ`` are the refitted eigenvalues.
        Raises ``ValueError`` when ``Λ + d`` has an entry ``≤ 0`` (singular: increase ``damping``).
        """
        d = self.damping if damping is None else _check_damping(damping, "damping")
        decomposition = []
        for (lam, q_g, q_a), block in zip(self.eigendecomposition(), self.blocks):
            shifted = lam + d
            smallest = float(shifted.min())
            if smallest <= 0:
                raise ValueError(
                    f"K + damping·I is singular for the block {block.param_names} (smallest eigenvalue "
                    f"{smallest:.3g} with damping={d}); pass a damping > 0 that makes it positive definite"
                )
            decomposition.append((1.0 / shifted, q_g, q_a))
        return _EigenbasisOperator(self, decomposition)


class EKFACOperator(KFACOperator):
    """EKFAC (George et al. 2018, arXiv:1806.03884): K-FAC's eigenbasis ``Q_G ⊗ Q_A`` with
    eigenvalues refitted to the second moments of the per-example gradients in that basis
    (module docstring), plus ``damping · I``.

    The same arguments as :class:`KFACOperator`; the model's output must be ``(batch, C)`` (a
    per-example gradient per batch entry, as in curvlinops' ``EKFACLinearOperator``).  Costs a
    second pass over the data.  State: per block ``input_factor``, ``gradient_factor`` (K-FAC's),
    their cached eigendecomposition and ``eigenvalues`` (the refit ``Λ``).  Monte-Carlo draws are
    the same in both passes (per-batch seeds).
    """

    def _check_output(self, out: Tensor) -> None:
        if out.ndim != 2:
            raise ValueError(
                f"EKFAC needs model outputs of shape (batch, C) (one per-example gradient per row), got {tuple(out.shape)}"
            )

    def compute_factors(self) -> None:
        """K-FAC's factors (first pass), their eigenvectors, then the refit (second pass):
        ``Λ += c w Σ_{n,k} (Σ_s (Q_Gᵀ g_{n,s,k})(Q_Aᵀ a_{n,s})ᵀ)²`` (entrywise square), with the
        per-example gradients formed in chunks of at most ``2²⁴`` entries."""
        for block in self.blocks:
            block.eigenvalues = None
        super().compute_factors()
        eigen = self.eigendecomposition()
        lam = [torch.zeros_like(e[0]) for e in eigen]
        for tap, grads, weight in self._passes():
            rotated_inputs = [self._block_inputs(block, tap, q_a) for block, (_, _, q_a) in zip(self.blocks, eigen)]
            for layer_grads in grads:
                for i, (block, (_, q_g, _)) in enumerate(zip(self.blocks, eigen)):
                    g = layer_output_grads(block.module, layer_grads[block.module_name]) @ q_g
                    a = rotated_inputs[i]
                    if a is None:  # bias block: the per-example gradient is Σ_s g_{n,s}
                        lam[i] += weight * g.sum(1).square().sum(0)[:, None]
                    else:
                        lam[i] += weight * _squared_per_example_products(g, a)
        for block, values in zip(self.blocks, lam):
            block.eigenvalues = values

    def _block_inputs(self, block: KroneckerBlock, tap: LayerTap, q_a: Tensor) -> Tensor | None:
        """``(B, S, D_in')`` inputs of the block in the eigenbasis ``Q_A`` (augmented by 1 for a
        joint block); ``None`` for a bias block."""
        if block.weight_index is None:
            return None
        a = layer_inputs(block.module, tap.inputs[block.module_name])
        if block.augmented:  # [a, 1] Q_A without forming [a, 1]
            return a @ q_a[:-1] + q_a[-1]
        return a @ q_a

    def _eigenvalues(self, i: int, block: KroneckerBlock, eigen: tuple[Tensor, ...]) -> Tensor:
        if block.eigenvalues is None:  # during compute_factors, before the refit
            return super()._eigenvalues(i, block, eigen)
        return block.eigenvalues

    def _block_product(self) -> Callable[[int, KroneckerBlock, Tensor], Tensor]:
        """``M ↦ Q_G ((Q_Gᵀ M Q_A) ⊙ Λ) Q_Aᵀ`` per block."""
        return _eigenbasis_product([(lam, q_g, q_a) for lam, q_g, q_a in self.eigendecomposition()])


def _squared_per_example_products(g: Tensor, a: Tensor) -> Tensor:
    """``Σ_n (Σ_s g_{n,s} a_{n,s}ᵀ)²`` (entrywise square) for ``g`` ``(B, S, D1)``, ``a`` ``(B, S, D2)``."""
    if g.shape[1] == 1:  # no weight sharing: (g aᵀ)² = (g²)(a²)ᵀ
        return g[:, 0].square().T @ a[:, 0].square()
    B, _, D1 = g.shape
    step = max(1, _CHUNK_ENTRIES // (D1 * a.shape[-1]))
    total = g.new_zeros(D1, a.shape[-1])
    for start in range(0, B, step):
        total += torch.bmm(g[start : start + step].transpose(1, 2), a[start : start + step]).square().sum(0)
    return total


class _EigenbasisOperator(LinearOperator):
    """``V ↦ Q_G ((Q_Gᵀ V Q_A) ⊙ W) Q_Aᵀ`` per block, with the parameter structure of ``parent``."""

    def __init__(self, parent: KFACOperator, decomposition: list[tuple[Tensor, Tensor, Tensor]]) -> None:
        super().__init__(parent.shape, dtype=parent.dtype, device=parent.device, symmetric=True)
        self.param_shapes, self.param_names = parent.param_shapes, parent.param_names
        self._parent, self._decomposition = parent, decomposition

    def _matmat(self, X: Tensor) -> Tensor:
        return self._parent._blockwise(X, _eigenbasis_product(self._decomposition))


def _eigenbasis_product(decomposition: list[tuple[Tensor, Tensor, Tensor]]) -> Callable[[int, KroneckerBlock, Tensor], Tensor]:
    """``M ↦ Q_G ((Q_Gᵀ M Q_A) ⊙ W) Q_Aᵀ`` for block ``i`` with ``(W, Q_G, Q_A) = decomposition[i]``."""

    def apply(i: int, block: KroneckerBlock, M: Tensor) -> Tensor:
        w, q_g, q_a = decomposition[i]
        return sandwich(q_g, sandwich(q_g.T, M, q_a) * w.unsqueeze(-1), q_a.T)

    return apply


def _check_damping(damping: Any, name: str) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {damping!r}")
    return float(damping)
