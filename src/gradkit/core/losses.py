"""Output-space quantities of a loss ``L(f, y)``: its Hessian-vector products, per-example
gradients and the gradients sampled from the model's predictive distribution.

Notation.  A batch loss with ``reduction="mean"`` or ``"sum"`` is written
``L = c · Σ_t ℓ_t(f_t, y_t)`` over *loss terms* ``t`` (one per example for a ``(B, C)`` output;
one per example and position for cross-entropy on ``(B, C, d1, ...)``), where ``ℓ_t`` is the
summed (``reduction="sum"``) loss of the term and ``c`` the **reduction factor**: ``1`` for sum,
``1 / Σ_t w_{y_t}`` for cross-entropy with mean reduction (over the terms whose target is not
``ignore_index``; ``w = 1`` without a class weight, so ``1 / #terms``) and ``1 / numel(f)`` for
MSE and BCE with mean reduction.

Closed forms (per loss term, Schraudolph 2002; Martens 2020, arXiv:1412.1193, sec. 9):

* ``MSELoss``: ``ℓ = ‖f − y‖²``, ``∇²_f ℓ = 2 I``;
* ``CrossEntropyLoss`` (logits): ``∇²_f ℓ = diag(p) − p pᵀ`` with ``p = softmax(f)``;
* ``BCEWithLogitsLoss``: ``∇²_f ℓ = diag(σ(f) (1 − σ(f)))``.

Any other loss (and these with ``weight``, ``pos_weight`` or ``label_smoothing``) falls back to an
exact autograd Hessian-vector product in output space.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "reduction_factor",
    "has_closed_form",
    "output_hessian_vp",
    "output_grads",
    "sample_output_grads",
]


def _reduction(loss_fn: nn.Module) -> str:
    reduction = getattr(loss_fn, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"loss_fn must have reduction 'mean' or 'sum', got {reduction!r} for {type(loss_fn).__name__}"
        )
    return reduction


def _is_ce(loss_fn: nn.Module) -> bool:
    return isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss))


def reduction_factor(loss_fn: nn.Module, outputs: Tensor, targets: Tensor | None = None) -> float:
    """``c`` such that the batch loss is ``c · Σ_t ℓ_t`` (see the module docstring).

    For cross-entropy / NLL with ``reduction="mean"`` and class-index ``targets``, torch averages
    over the terms whose target is not ``ignore_index``, weighted by the class ``weight``:
    ``c = 1 / Σ_t w_{y_t}`` over those terms (``ℓ_t`` then the term of ``reduction="sum"``, weight
    included, 0 for an ignored target).  Without ``targets``: ``1 / #terms`` (no weight, nothing
    ignored)."""
    if _reduction(loss_fn) == "sum":
        return 1.0
    if not _is_ce(loss_fn):
        return 1.0 / outputs.numel()
    if targets is None or targets.is_floating_point():  # class probabilities: every term counts once
        return 1.0 / (outputs.numel() // outputs.shape[1])
    valid = targets != loss_fn.ignore_index
    if loss_fn.weight is None:
        total = float(valid.sum())
    else:
        total = float(loss_fn.weight.to(outputs.device)[targets[valid]].sum(dtype=torch.float64))  # no fp16 overflow
    if total <= 0:
        raise ValueError(f"every target is ignore_index={loss_fn.ignore_index} (or has class weight 0): the mean "
                         f"loss {type(loss_fn).__name__} takes is 0/0")
    return 1.0 / total


def has_closed_form(loss_fn: nn.Module) -> bool:
    """Whether :func:`output_hessian_vp` uses a closed form for this loss (else autograd)."""
    if type(loss_fn) is nn.MSELoss:
        return True
    if type(loss_fn) is nn.CrossEntropyLoss:
        return loss_fn.weight is None and loss_fn.label_smoothing == 0.0
    if type(loss_fn) is nn.BCEWithLogitsLoss:
        return loss_fn.weight is None and loss_fn.pos_weight is None
    return False


def _class_last(t: Tensor) -> Tensor:
    """Move the class dimension (dim 1 of a batch of logits) last."""
    return t.movedim(1, -1) if t.ndim > 2 else t


def output_hessian_vp(loss_fn: nn.Module, outputs: Tensor, targets: Tensor, U: Tensor) -> Tensor:
    """``∇²_f L · U`` for the batch loss ``L = loss_fn(f, targets)`` at ``f = outputs``.

    ``U`` has the shape of ``outputs``, optionally with a leading dimension of ``k`` directions.
    """
    batched = U.ndim == outputs.ndim + 1
    f = outputs.detach()
    c = reduction_factor(loss_fn, f) if has_closed_form(loss_fn) else None
    if c is not None and isinstance(loss_fn, nn.CrossEntropyLoss):
        ignored = targets == loss_fn.ignore_index if not targets.is_floating_point() else None
        if ignored is not None and bool(ignored.any()):
            c = None  # ignore_index changes the averaging: use the exact autograd path
    if c is None:
        return _autograd_output_hvp(loss_fn, f, targets, U, batched)
    if isinstance(loss_fn, nn.MSELoss):
        return (2.0 * c) * U
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        s = torch.sigmoid(f)
        return (c * s * (1 - s)) * U
    # cross-entropy: (diag(p) - p p^T) u per loss term, class dimension = 1
    p = _class_last(torch.softmax(f, dim=1))
    Uc = U.movedim(2 if batched else 1, -1) if f.ndim > 2 else U
    HU = p * Uc - p * (p * Uc).sum(-1, keepdim=True)
    HU = HU.movedim(-1, 2 if batched else 1) if f.ndim > 2 else HU
    return c * HU


def _autograd_output_hvp(loss_fn: nn.Module, f: Tensor, targets: Tensor, U: Tensor, batched: bool) -> Tensor:
    # reverse-over-reverse: needs only double backward, which every torch loss supports
    pullback = torch.func.vjp(torch.func.grad(lambda z: loss_fn(z, targets)), f)[1]
    hvp = lambda u: pullback(u)[0]  # noqa: E731
    return torch.vmap(hvp)(U) if batched else hvp(U)


def output_grads(loss_fn: nn.Module, outputs: Tensor, targets: Tensor) -> Tensor:
    """``∇_f ℓ_t`` for every loss term: the gradient of the batch loss divided by ``c``
    (:func:`reduction_factor` of these targets: 0 for an ignored term, the class weight included)."""
    _reduction(loss_fn)
    f = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss_fn(f, targets), f)
    return g / reduction_factor(loss_fn, outputs, targets)


def sample_output_grads(
    loss_fn: nn.Module, outputs: Tensor, mc_samples: int, generator: torch.Generator, targets: Tensor | None = None
) -> Tensor:
    """Gradients ``∇_f ℓ(f, ŷ)`` with ``ŷ`` drawn from the model's predictive distribution.

    The distribution is the one whose negative log-likelihood is ``ℓ``, so
    ``E[s sᵀ] = ∇²_f ℓ`` and the Monte-Carlo Fisher is unbiased for the GGN:

    * MSE: ``ŷ ~ N(f, I/2)``, ``s = 2 (f − ŷ)``;
    * cross-entropy: ``ŷ ~ Categorical(softmax f)``, ``s = p − onehot(ŷ)``;
    * BCE with logits: ``ŷ ~ Bernoulli(σ(f))``, ``s = σ(f) − ŷ``.

    Returns a tensor of shape ``(mc_samples, *outputs.shape)``.  Given the true class-index
    ``targets`` of cross-entropy, the terms whose target is ``ignore_index`` are 0 (they are not
    in the loss; with :func:`reduction_factor` of the same targets the estimate stays unbiased).
    """
    f = outputs.detach()
    shape = (mc_samples, *f.shape)
    if type(loss_fn) is nn.MSELoss:
        noise = torch.randn(shape, generator=generator, dtype=f.dtype, device=f.device)
        return -2.0 * math.sqrt(0.5) * noise
    if type(loss_fn) is nn.BCEWithLogitsLoss and has_closed_form(loss_fn):
        p = torch.sigmoid(f).expand(shape)
        return p - torch.bernoulli(p, generator=generator)
    if type(loss_fn) is nn.CrossEntropyLoss and has_closed_form(loss_fn):
        p = _class_last(torch.softmax(f, dim=1))
        C = p.shape[-1]
        flat = p.reshape(-1, C)
        draws = torch.multinomial(flat, mc_samples, replacement=True, generator=generator)  # (T, M)
        onehot = torch.nn.functional.one_hot(draws.T, C).to(p.dtype)  # (M, T, C)
        s = p.reshape(1, -1, C) - onehot
        if targets is not None and not targets.is_floating_point():
            s = s * (targets != loss_fn.ignore_index).reshape(1, -1, 1).to(s.dtype)
        s = s.reshape(mc_samples, *p.shape)
        return s.movedim(-1, 2) if f.ndim > 2 else s
    raise NotImplementedError(
        "Monte-Carlo Fisher needs a likelihood to sample from: supported are nn.MSELoss, "
        "nn.CrossEntropyLoss and nn.BCEWithLogitsLoss without weight/pos_weight/label_smoothing; "
        f"got {loss_fn!r}"
    )
