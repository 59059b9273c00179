"""Curvature matrices of a model's loss on data, as :class:`~gradkit.linalg.LinearOperator`.

For a loss over ``N`` examples ``L(θ) = c Σ_t ℓ_t(f(x_t, θ), y_t)`` (``c`` the reduction
factor, see :mod:`gradkit.core.losses`):

* :class:`HessianOperator`: ``∇²_θ L``;
* :class:`GGNOperator`: the generalised Gauss–Newton ``c Σ_t J_tᵀ ∇²_f ℓ_t J_t``
  (Schraudolph 2002);
* :class:`EFOperator`: the empirical Fisher ``c Σ_n ∇_θ ℓ_n ∇_θ ℓ_nᵀ`` over examples ``n`` with
  their true targets (see Kunstner, Balles & Hennig 2019, arXiv:1905.12558, on its limits);
* :class:`MCFisherOperator`: the Monte-Carlo Fisher, the same outer products with targets drawn
  from the model's predictive distribution, averaged over ``mc_samples`` draws — unbiased for the
  GGN (Martens 2020, arXiv:1412.1193, sec. 9.2).

The scale follows the loss: with ``reduction="mean"`` each matrix is that of the mean loss over
all ``N`` examples, whatever the batching.  ``op @ v`` accepts a flat ``(n,)`` vector, an
``(n, k)`` matrix (columns are processed ``chunk_size`` at a time with ``vmap``) or a list/dict of
parameter-shaped tensors.

On ``nn.Sequential`` chains of linear/convolutional layers, eval BatchNorm, poolings and
elementwise activations, the Hessian products of the default mode and the single-vector Jacobian
products of the other three are written out per layer (:mod:`gradkit.curvature._chain`); every
other model, and blocks of the GGN/Fisher operators, use ``torch.func``/autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gradkit.core.data import Batches
from gradkit.core.functional import FunctionalModel
from gradkit.core.losses import output_grads, output_hessian_vp, reduction_factor, sample_output_grads
from gradkit.core.products import _check_mode, hvp_function
from gradkit.curvature._chain import NotBatched, chain_hvp, chain_jacobian, chain_plan
from gradkit.linalg.operator import LinearOperator

__all__ = ["HessianOperator", "GGNOperator", "EFOperator", "MCFisherOperator", "CurvatureOperator"]


class CurvatureOperator(LinearOperator):
    """Base of the curvature operators: data passes, scaling, the determinism check.

    Args:
        model: the network (``nn.Module``).
        loss_fn: a torch loss module with ``reduction`` ``"mean"`` or ``"sum"``.
        data: one ``(inputs, targets)`` pair or a re-iterable of them (list, ``DataLoader``).
        params: optional iterable of the model's parameters to restrict to (in that order);
            default all parameters that require grad, in ``named_parameters`` order.
        chunk_size: how many columns of an ``(n, k)`` input go through ``vmap`` together.
        progress: show a progress bar over the batches of each product.
        check_deterministic: at construction, pass twice over the data and refuse it if the loss
            or gradient differ (augmentation, dropout, a changing last batch make the operator
            a different matrix at every product).
        num_data: number of examples, if known (saves one pass over the data).
        allow_train_mode: permit BatchNorm/Dropout in training mode (refused by default).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Any,
        *,
        params: Iterable[Tensor] | None = None,
        chunk_size: int = 16,
        progress: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        allow_train_mode: bool = False,
    ) -> None:
        if not isinstance(loss_fn, nn.Module) or getattr(loss_fn, "reduction", None) not in ("mean", "sum"):
            raise ValueError(
                "loss_fn must be a torch loss module with reduction 'mean' or 'sum' (e.g. "
                f"nn.CrossEntropyLoss()), got {loss_fn!r}"
            )
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self._fm = FunctionalModel(model, params, allow_train_mode=allow_train_mode)
        super().__init__(
            (self._fm.numel, self._fm.numel), dtype=self._fm.dtype, device=self._fm.device, symmetric=True
        )
        self.param_shapes = list(self._fm.shapes)
        self.param_names = list(self._fm.names)
        self.model, self.loss_fn = model, loss_fn
        self.chunk_size, self.progress = chunk_size, progress
        self.data = Batches(data, self.device, self.dtype)
        if num_data is None:
            num_data = self.data.count()
        if not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
        self.num_data = num_data
        if check_deterministic:
            self._check_deterministic()

    # -------------------------------------------------------------- data passes
    def _batch_weight(self, inputs: Any) -> float:
        """Weight of a batch's (mean-reduced) loss in the loss over all data."""
        if self.loss_fn.reduction == "sum":
            return 1.0
        return self.data.batch_size(inputs) / self.num_data

    def _batches(self) -> Iterable[tuple[Any, Tensor]]:
        return tqdm(self.data, desc=type(self).__name__, leave=False) if self.progress else self.data

    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """The loss over all data and its gradient (flat), at the current parameters."""
        fm, total, grad = self._fm, None, None
        for inputs, targets in self._batches():
            w = self._batch_weight(inputs)

            def loss(values: tuple[Tensor, ...]) -> Tensor:
                return self.loss_fn(fm(values, inputs), targets)

            g, value = torch.func.grad_and_value(loss)(fm.values)
            g = fm.join(g)
            total = w * value.detach() if total is None else total + w * value.detach()
            grad = w * g if grad is None else grad + w * g
        assert total is not None and grad is not None
        return total, grad

    def _check_deterministic(self) -> None:
        loss1, grad1 = self.loss_and_gradient()
        loss2, grad2 = self.loss_and_gradient()
        rtol = 1e-5 if self.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
        atol = rtol * max(float(grad1.abs().max()), 1e-30)
        same_loss = torch.allclose(loss1, loss2, rtol=rtol, atol=rtol * abs(float(loss1)))
        if not (same_loss and torch.allclose(grad1, grad2, rtol=rtol, atol=atol)):
            raise ValueError(
                "data or model is not deterministic: two passes over the data gave losses "
                f"{float(loss1):.10g} and {float(loss2):.10g} (largest gradient difference "
                f"{float((grad1 - grad2).abs().max()):.3g}). Random data augmentation, dropout, or a "
                "loader whose batches change between passes make every product use a different "
                "matrix. Fix the data, or pass check_deterministic=False to skip this check."
            )

    # -------------------------------------------------------------- products
    def _matmat(self, X: Tensor) -> Tensor:
        fm, k = self._fm, X.shape[1]
        # One row per direction, contiguous: strided directions slow every matmul of the products.
        rows = X.T.contiguous()
        result = None  # (k, n): the products accumulate row-wise, returned transposed
        for index, (inputs, targets) in enumerate(self._batches()):
            w = self._batch_weight(inputs)
            batch_product = self._batch_product(index, inputs, targets)
            for start in range(0, k, self.chunk_size):
                chunk = slice(start, start + self.chunk_size)
                out = batch_product(fm.split(rows[chunk]))  # (k, *shape) per parameter, or (k, n)
                out = out if isinstance(out, Tensor) else fm.join(out, batch_dims=1)
                if w != 1.0:
                    out = out.mul_(w)  # ``out`` is a fresh tensor of this product
                if result is None and k <= self.chunk_size:
                    result = out
                else:
                    result = torch.zeros_like(rows) if result is None else result
                    result[chunk] += out
        assert result is not None
        return result.T

    def _batch_product(
        self, index: int, inputs: Any, targets: Tensor
    ) -> Callable[[tuple[Tensor, ...]], tuple[Tensor, ...] | Tensor]:
        """Return ``vs -> M_batch vs`` for parameter-shaped directions with a leading ``k`` dim,
        where ``M_batch`` is the matrix of the batch's own (reduced) loss; the result is
        parameter-shaped like ``vs`` or already flat, ``(k, n)``, and freshly allocated."""
        raise NotImplementedError

    def _output_products(self, inputs: Any) -> tuple[Tensor, Callable, Callable]:
        """``(f, J·, Jᵀ·)`` for the batch, both batched over a leading ``k`` dim: written out per
        layer on a chain (:func:`~gradkit.curvature._chain.chain_jacobian`), else ``torch.func``."""
        plan = chain_plan(self.model, self._fm) if isinstance(inputs, Tensor) else None
        if plan is None:
            return self._func_products(inputs)
        try:
            f, chain_jvp, chain_vjp = chain_jacobian(plan, self._fm, inputs)
        except NotBatched:
            return self._func_products(inputs)
        # blocks keep torch.func's vmap (batched matrix products: 1.16x a gradient per column of
        # a 16-column GGN block against 1.42x one direction at a time; one vector 1.60x against
        # 2.0x on the MLP of benchmarks/hvp.py), built only when a block comes
        blocks: list[Any] = []

        def block() -> tuple[Tensor, Callable, Callable]:
            if not blocks:
                blocks.append(self._func_products(inputs))
            return blocks[0]

        def jvp(vs: tuple[Tensor, ...]) -> Tensor:
            return chain_jvp(vs) if vs[0].shape[0] == 1 else block()[1](vs)

        def vjp(U: Tensor) -> Tensor:
            return chain_vjp(U) if U.shape[0] == 1 else block()[2](U)

        return f, jvp, vjp

    def _func_products(self, inputs: Any) -> tuple[Tensor, Callable, Callable]:
        fm = self._fm

        def f(values: tuple[Tensor, ...]) -> Tensor:
            return fm(values, inputs)

        out, pullback = torch.func.vjp(f, fm.values)

        def jvp(v: tuple[Tensor, ...]) -> Tensor:
            return torch.func.jvp(f, (fm.values,), (v,))[1]

        return out, torch.vmap(jvp), torch.vmap(lambda u: pullback(u)[0])


def mc_generator(seed: int, batch_index: int, device: torch.device) -> torch.Generator:
    """The random generator of the Monte-Carlo label samples of batch ``batch_index``: fixed by
    ``seed`` and the batch's position, so every product (and every MC-based approximation:
    K-FAC, diagonals) uses the same sampled matrix."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_index)


class HessianOperator(CurvatureOperator):
    """The Hessian ``∇²_θ L`` of the loss over all data.

    Args:
        mode: ``None`` (default), ``"rev_rev"`` or ``"fwd_rev"``.  ``"rev_rev"``: the gradient
            graph of each batch is built once and every column of a block is a double backward
            through it; ``"fwd_rev"``: forward-over-reverse, blocks under ``vmap``; see
            :func:`gradkit.core.hvp`.  ``None``: on an ``nn.Sequential`` chain of linear and
            convolutional layers, eval-mode BatchNorm, poolings and elementwise activations (the list is in
            :mod:`gradkit.curvature._chain`) Pearlmutter's R-operator written out per layer,
            which skips the weight gradients that both autograd modes form and discard (about
            2.3x and 1.9x a gradient on the MLP and CNN of ``benchmarks/hvp.py``, against
            2.3-2.9x by autograd); on any other model ``"rev_rev"``.
        **kwargs: see :class:`CurvatureOperator`.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, data: Any, *, params: Iterable[Tensor] | None = None,
                 mode: str | None = None, **kwargs: Any) -> None:
        self.mode = _check_mode(mode)
        self._chain = mode is None
        super().__init__(model, loss_fn, data, params=params, **kwargs)

    def _batch_product(self, index: int, inputs: Any, targets: Tensor) -> Callable:
        fm, loss_fn = self._fm, self.loss_fn
        # The model is inspected at every product: hooks or layers changed since construction count.
        plan = chain_plan(self.model, fm) if self._chain and isinstance(inputs, Tensor) else None
        if plan is not None:
            try:
                return chain_hvp(plan, fm, loss_fn, inputs, targets,
                                 lambda f, U: output_hessian_vp(loss_fn, f, targets, U))
            except NotBatched:
                pass

        def loss(values: tuple[Tensor, ...]) -> Tensor:
            return loss_fn(fm(values, inputs), targets)

        if self.mode == "fwd_rev":
            return torch.vmap(hvp_function(loss, fm.values, "fwd_rev"))
        # Reverse-over-reverse with plain autograd (a fast path of gradkit.core.hvp's rev_rev, held
        # equal to it by the tests): the gradient graph of the batch is built once, and each column
        # is one double backward through it (no torch.func wrapping on this hot path).
        values = tuple(v.detach().requires_grad_(True) for v in fm.values)
        with torch.enable_grad():
            grads = torch.autograd.grad(loss(values), values, create_graph=True)
        live = [i for i, g in enumerate(grads) if g.requires_grad]  # others: zero Hessian rows

        def columns(vs: tuple[Tensor, ...]) -> Tensor:
            flat = vs[0].new_zeros(vs[0].shape[0], fm.numel)  # written in place: no join copy
            out = fm.split(flat)
            for j in range(vs[0].shape[0] if live else 0):
                hv = torch.autograd.grad(
                    [grads[i] for i in live], values, grad_outputs=[vs[i][j] for i in live],
                    retain_graph=True, allow_unused=True,
                )
                for i, h in enumerate(hv):
                    if h is not None:
                        out[i][j] = h
            return flat

        return columns


class GGNOperator(CurvatureOperator):
    """The generalised Gauss–Newton matrix ``Jᵀ ∇²_f L J`` over all data (positive
    semi-definite for convex losses; equals the Fisher for exponential-family likelihoods)."""

    def _batch_product(self, index: int, inputs: Any, targets: Tensor) -> Callable:
        out, jvp, vjp = self._output_products(inputs)
        return lambda vs: vjp(output_hessian_vp(self.loss_fn, out, targets, jvp(vs)))


def _outer_product_in_output_space(S: Tensor, JV: Tensor, scale: float) -> Tensor:
    """``scale · Σ_m s_m (s_mᵀ u)`` per example: ``S`` is ``(M, B, ...)``, ``JV`` is ``(k, B, ...)``;
    the inner product runs over each example's output entries.  Returns ``(k, B, ...)``."""
    B = S.shape[1]
    dots = torch.einsum("mbi,kbi->kmb", S.reshape(S.shape[0], B, -1), JV.reshape(JV.shape[0], B, -1))
    return scale * torch.einsum("kmb,mbi->kbi", dots, S.reshape(S.shape[0], B, -1)).reshape(JV.shape)


class EFOperator(CurvatureOperator):
    """The empirical Fisher ``c Σ_n ∇ℓ_n ∇ℓ_nᵀ`` with the true targets (one outer product per
    example ``n``; ``ℓ_n`` is the summed loss of example ``n``)."""

    def _batch_product(self, index: int, inputs: Any, targets: Tensor) -> Callable:
        out, jvp, vjp = self._output_products(inputs)
        S = output_grads(self.loss_fn, out, targets).unsqueeze(0)
        c = reduction_factor(self.loss_fn, out, targets)
        return lambda vs: vjp(_outer_product_in_output_space(S, jvp(vs), c))


class MCFisherOperator(CurvatureOperator):
    """The Monte-Carlo Fisher ``c Σ_n (1/M) Σ_m ∇ℓ(f_n, ŷ_nm) ∇ℓ(f_n, ŷ_nm)ᵀ`` with
    ``ŷ_nm`` drawn from the model's predictive distribution (MSE: Gaussian, cross-entropy:
    categorical, BCE: Bernoulli).

    The draws are fixed at construction by ``seed`` (a draw per batch index), so every product is
    with the same matrix; this needs a data order that is the same on every pass.

    Args:
        mc_samples: number of draws ``M`` per example.
        seed: seed of the draws.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, data: Any, *, params: Iterable[Tensor] | None = None,
                 mc_samples: int = 1, seed: int = 0, **kwargs: Any) -> None:
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.mc_samples, self.seed = mc_samples, seed
        super().__init__(model, loss_fn, data, params=params, **kwargs)

    def _batch_product(self, index: int, inputs: Any, targets: Tensor) -> Callable:
        out, jvp, vjp = self._output_products(inputs)
        generator = mc_generator(self.seed, index, self.device)
        S = sample_output_grads(self.loss_fn, out, self.mc_samples, generator, targets)
        c = reduction_factor(self.loss_fn, out, targets) / self.mc_samples
        return lambda vs: vjp(_outer_product_in_output_space(S, jvp(vs), c))
