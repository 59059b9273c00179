"""Exact products with derivatives of a function of parameters.

``params`` (the point of differentiation) and the vector ``v`` are a tensor, a tuple/list of
tensors or a dict of tensors; every product returns a result with the structure of the vector
it is given (``jvp``: of the function's output).  All of them are ``torch.func`` compositions, so
they compose further with ``vmap``, ``grad`` and ``jacrev``.

* ``jvp(fn, params, v) = J v`` (forward mode), ``vjp(fn, params, u) = Jᵀ u`` (reverse mode);
* ``hvp(fn, params, v) = ∇²fn · v`` for a scalar ``fn`` (Pearlmutter 1994, "Fast exact
  multiplication by the Hessian"), either forward-over-reverse (``mode="fwd_rev"``: a JVP of the
  gradient) or reverse-over-reverse (``mode="rev_rev"``: a VJP of the gradient, valid because
  the Hessian is symmetric);
* ``ggn_vp(fn, params, v, loss_fn=, targets=) = Jᵀ (∇²_f L) J v``, the generalised Gauss–Newton
  product (Schraudolph 2002, "Fast curvature matrix-vector products for second-order gradient
  descent"), with ``f = fn(params)``, ``J = ∂f/∂params`` and the loss Hessian taken in output space.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from gradkit.core.functional import FunctionalModel, Params, check_like
from gradkit.core.losses import _is_ce, output_hessian_vp

logger = logging.getLogger("gradkit")

__all__ = ["HVP_MODES", "DEFAULT_HVP_MODE", "jvp", "vjp", "hvp", "ggn_vp", "per_sample_grads"]

HVP_MODES = ("fwd_rev", "rev_rev")
#: Chosen by ``benchmarks/hvp.py`` (CPU): reverse-over-reverse is the cheaper of the two for one
#: vector (tanh MLP: 2.8x a gradient vs 3.3x; both do the same matmul count, torch's forward-mode
#: AD has more per-op overhead), and for blocks it builds the gradient graph once and reuses it
#: for every column (1.5-1.8x a gradient per column, where vmap over forward-over-reverse costs
#: 2.1-3.7x).
DEFAULT_HVP_MODE = "rev_rev"


def _check_mode(mode: str | None) -> str:
    if mode is None:
        return DEFAULT_HVP_MODE
    if mode not in HVP_MODES:
        raise ValueError(f"mode must be one of {HVP_MODES} (or None for the default), got {mode!r}")
    return mode


def _check_fn(fn: Any) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable (a function of params), got {type(fn).__name__}")


def jvp(fn: Callable[[Params], Any], params: Params, v: Params) -> Any:
    """Jacobian-vector product ``J v`` of ``fn`` at ``params``; result shaped like ``fn(params)``."""
    _check_fn(fn)
    check_like(v, params, "v")
    return torch.func.jvp(fn, (params,), (v,))[1]


def vjp(fn: Callable[[Params], Any], params: Params, u: Any) -> Params:
    """Vector-Jacobian product ``Jᵀ u`` of ``fn`` at ``params``; result shaped like ``params``."""
    _check_fn(fn)
    out, pullback = torch.func.vjp(fn, params)
    check_like(u, out, "u")
    return pullback(u)[0]


def hvp(fn: Callable[[Params], Tensor], params: Params, v: Params, *, mode: str | None = None) -> Params:
    """Hessian-vector product ``∇²fn(params) · v`` of a scalar function.

    Args:
        fn: scalar function of ``params``.
        params: point of differentiation: tensor, tuple/list or dict of tensors.
        v: direction with the structure, shapes, dtypes and devices of ``params``.
        mode: ``"rev_rev"`` (VJP of the gradient, the double backward of PyHessian; the
            default, :data:`DEFAULT_HVP_MODE`) or ``"fwd_rev"`` (JVP of the gradient).

    Returns:
        ``H v`` with the structure of ``v``.
    """
    _check_fn(fn)
    mode = _check_mode(mode)
    check_like(v, params, "v")
    return _hvp(fn, params, v, mode)


def _hvp(fn: Callable[[Any], Tensor], params: Any, v: Any, mode: str) -> Any:
    return hvp_function(fn, params, mode)(v)


def _forward_ad_unsupported(error: Exception) -> bool:
    """Errors torch raises where forward-mode AD is missing or broken for an operation (e.g. no
    forward derivative of ``huber_loss_backward``; ``mse_loss``'s backward writing into a zero
    tangent)."""
    text = str(error)
    return "forward AD" in text or "ZeroTensors are immutable" in text


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("forward-over-reverse HVP unsupported here (%s); using reverse-over-reverse", reason)


def hvp_function(fn: Callable[[Any], Tensor], params: Any, mode: str) -> Callable[[Any], Any]:
    """``v -> ∇²fn(params) v`` for a scalar ``fn`` (no input checks; ``vmap``-able).

    ``"rev_rev"`` builds the gradient graph once and reuses it for every ``v``.  ``"fwd_rev"``
    falls back to ``"rev_rev"`` (the same exact product) where torch lacks forward-mode AD for an
    operation of ``fn``, with a warning in the ``gradkit`` log.
    """
    grad_fn = torch.func.grad(fn)
    pullback = None

    def reverse(v: Any) -> Any:
        nonlocal pullback
        if pullback is None:
            pullback = torch.func.vjp(grad_fn, params)[1]
        return pullback(v)[0]

    if mode == "rev_rev":
        return reverse
    forward_ok = True

    def forward(v: Any) -> Any:
        nonlocal forward_ok
        if forward_ok:
            try:
                return torch.func.jvp(grad_fn, (params,), (v,))[1]
            except (NotImplementedError, RuntimeError) as error:
                if not _forward_ad_unsupported(error):
                    raise
                forward_ok = False
                _warn_once(str(error).splitlines()[0][:160])
        return reverse(v)

    return forward


def ggn_vp(
    fn: Callable[[Params], Tensor],
    params: Params,
    v: Params,
    *,
    loss_fn: nn.Module,
    targets: Tensor,
) -> Params:
    """Generalised Gauss–Newton vector product ``Jᵀ (∇²_f L) J v``.

    Args:
        fn: function of ``params`` returning the model output ``f`` (e.g. logits).
        params: point of differentiation.
        v: direction shaped like ``params``.
        loss_fn: a torch loss module ``L(f, targets)``; MSE, cross-entropy and BCE-with-logits
            use closed-form output Hessians, any other loss an exact autograd one.
        targets: the targets passed to ``loss_fn``.
    """
    _check_fn(fn)
    check_like(v, params, "v")
    out, pullback = torch.func.vjp(fn, params)
    Jv = torch.func.jvp(fn, (params,), (v,))[1]
    return pullback(output_hessian_vp(loss_fn, out, targets, Jv))[0]


def per_sample_grads(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Iterable[Tensor] | None = None,
    allow_train_mode: bool = False,
) -> dict[str, Tensor]:
    """Gradient of the loss of every example alone, by ``vmap`` over the batch.

    Example ``n``'s gradient is that of ``loss_fn(model(x_n), y_n)`` on a batch of one (same
    reduction), so with ``reduction="mean"`` the batch gradient is their mean and with
    ``"sum"`` their sum.  Cross-entropy / NLL with ``reduction="mean"`` and a class ``weight`` or
    an ignored target (``ignore_index``) is refused: the batch loss is then a weighted average
    that no batch of one reproduces (a weight cancels, an ignored example is 0/0); with
    ``reduction="sum"`` the per-example gradients sum to the batch gradient.

    Returns:
        dict from parameter name to a tensor of shape ``(B, *param.shape)``.
    """
    fm = FunctionalModel(model, params, allow_train_mode=allow_train_mode)
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError("inputs and targets must be tensors")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets disagree on the batch size: {inputs.shape[0]} vs {targets.shape[0]}"
        )

    if (_is_ce(loss_fn) and loss_fn.reduction == "mean"
            and not targets.is_floating_point()
            and (loss_fn.weight is not None or bool((targets == loss_fn.ignore_index).any()))):
        raise ValueError(
            f"per_sample_grads: {type(loss_fn).__name__}(reduction='mean') with "
            f"{'a class weight' if loss_fn.weight is not None else f'targets equal to ignore_index={loss_fn.ignore_index}'}"
            " averages with weights no batch of one reproduces; use reduction='sum' (the per-example gradients "
            "then sum to the batch gradient)")

    def loss_one(values: tuple[Tensor, ...], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(fm(values, x.unsqueeze(0)), y.unsqueeze(0))

    grads = torch.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(fm.values, inputs, targets)
    return dict(zip(fm.names, grads))
