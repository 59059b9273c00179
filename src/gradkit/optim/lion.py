"""Lion (Chen et al., 2023) and the Lion-K family (Chen, Liu, Liang and Liu, 2023)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ._base import Optimizer, as_float, check_betas, check_range, compiled, run_flat

__all__ = ["Lion", "LionK", "lion_kernel", "lionk_kernel"]


def _step(param, grad, exp_avg, h, maximize: bool, direction: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """The Lion-K update with ``direction(c)`` for :math:`\\nabla\\mathcal K(c)`; ``h = [lr, beta1,
    beta2, weight_decay, ...]``."""
    lr, beta1, beta2, wd = h[0], h[1], h[2], h[3]
    g = grad.to(h.dtype)
    if maximize:
        g = -g
    m = exp_avg.to(h.dtype)
    c = m * beta1 + g * (1 - beta1)
    param.copy_(param.to(h.dtype) * (1 - lr * wd) - lr * direction(c))
    exp_avg.copy_(m * beta2 + g * (1 - beta2))


def lion_kernel(param, grad, exp_avg, *, h, maximize: bool) -> None:
    """Reference Lion step on one tensor; ``h = [lr, beta1, beta2, weight_decay]``."""
    _step(param, grad, exp_avg, h, maximize, torch.sign)


class Lion(Optimizer):
    r"""Lion, EvoLved Sign Momentum.

    Chen, Liang, Huang, Real, Wang, Pham, Dong, Luong, Hsieh, Lu and Le, "Symbolic Discovery of
    Optimization Algorithms", NeurIPS 2023, arXiv:2302.06675 (Algorithm 2).

    .. math::
        c_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        \theta_t &= \theta_{t-1}(1 - \eta\lambda) - \eta\,\mathrm{sign}(c_t) \\
        m_t &= \beta_2 m_{t-1} + (1-\beta_2) g_t

    with :math:`\eta` = ``lr``, :math:`(\beta_1, \beta_2)` = ``betas``, :math:`\lambda` =
    ``weight_decay`` (decoupled) and :math:`m` = ``state["exp_avg"]``.  Defaults are those of the
    paper (lr 1e-4, a 3-10x smaller learning rate than AdamW's, betas (0.9, 0.99)) and of the
    reference code (weight_decay 0).

    State: one tensor per parameter (``exp_avg``), i.e. 4 bytes per float32 parameter.
    Complex parameters are updated as pairs of real numbers.  ``foreach``/``fused``: see
    :mod:`gradkit.optim`.
    """

    state_names = ("exp_avg",)
    kernel = staticmethod(lion_kernel)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay),
                         maximize=maximize, foreach=foreach, fused=fused)

    def _validate(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        check_betas(name, group["betas"])
        check_range(name, "weight_decay", group["weight_decay"], 0.0)

    def _hyper(self, group: dict[str, Any], step: int) -> list[float]:
        b1, b2 = group["betas"]
        return [as_float(group["lr"]), b1, b2, group["weight_decay"]]


# ----------------------------------------------------------------------------------------------
def _grad_k(c: torch.Tensor, k: str | Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    if k == "l1":
        return torch.sign(c)
    if k == "l2":  # c has shape (B, n): one row per parameter tensor
        norm = torch.linalg.vector_norm(c, dim=1, keepdim=True)
        return c / norm.clamp_min(torch.finfo(c.dtype).tiny)  # 0 where c = 0
    if k == "quadratic":
        return c
    return k(c[0]).unsqueeze(0)  # type: ignore[operator]  # a user map sees one tensor (B = 1)


def _l2_sq_norm(grad, exp_avg, *, h, maximize: bool):
    """First pass of the ``"l2"`` step: :math:`\\|c\\|^2` per row of a ``(B, n)`` batch, shape ``(B, 1)``
    (of a 1-D tensor: 0-dim)."""
    beta1 = h[1]
    g = grad.to(h.dtype)
    if maximize:
        g = -g
    c = exp_avg.to(h.dtype) * beta1 + g * (1 - beta1)
    return (c * c).sum(dim=-1, keepdim=grad.dim() > 1)


def _l2_step_flat(param, grad, exp_avg, *, h, maximize: bool) -> None:
    """:func:`_l2_step` on one flat tensor, :math:`\\|c\\|^2` in ``h[4]``."""
    _l2_step(param, grad, exp_avg, h[4], h=h, maximize=maximize)


def _l2_step(param, grad, exp_avg, sq_norm, *, h, maximize: bool) -> None:
    """Second pass of the ``"l2"`` step: the elementwise update with :math:`c / \\|c\\|` (``c`` recomputed)."""
    _step(param, grad, exp_avg, h, maximize, lambda c: c / sq_norm.sqrt().clamp_min(torch.finfo(c.dtype).tiny))


def lionk_kernel(param, grad, exp_avg, *, h, maximize: bool, k, two_pass: bool = False) -> None:
    """Reference Lion-K step on one tensor; ``h = [lr, beta1, beta2, weight_decay]``.

    ``two_pass=True`` (``k="l2"`` with ``fused=True``): the step runs as two compiled kernels, a
    reduction (:math:`\\|c\\|^2` per tensor, reading ``exp_avg`` and ``grad``) and an elementwise
    update that recomputes :math:`c`: 28 bytes per float32 parameter, no temporaries.
    """
    if two_pass and param.numel() > 1:
        if param.shape[0] == 1 and all(t.is_contiguous() for t in (param, grad, exp_avg)):
            # one tensor (B = 1): flat kernels, the norm handed to the update as a 5th scalar of h
            flat = [param.view(-1), grad.view(-1), exp_avg.view(-1)]
            sq_norm = run_flat(_l2_sq_norm, flat[1:], h, {"maximize": maximize})
            run_flat(_l2_step_flat, flat, torch.cat((h, sq_norm.view(1))), {"maximize": maximize})
            return
        sq_norm = compiled(_l2_sq_norm)(grad, exp_avg, h=h, maximize=maximize)
        compiled(_l2_step)(param, grad, exp_avg, sq_norm, h=h, maximize=maximize)
        return
    _step(param, grad, exp_avg, h, maximize, lambda c: _grad_k(c, k))


class LionK(Lion):
    r"""Lion-:math:`\mathcal K`: Lion with :math:`\mathrm{sign}` replaced by :math:`\nabla\mathcal K`.

    Chen, Liu, Liang and Liu, "Lion Secretly Solves Constrained Optimization: As Lyapunov
    Predicts", ICLR 2024, arXiv:2310.05898 (Eq. 2 / Algorithm 1).

    .. math::
        c_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        \theta_t &= \theta_{t-1} - \eta\,(\nabla\mathcal K(c_t) + \lambda\theta_{t-1}) \\
        m_t &= \beta_2 m_{t-1} + (1-\beta_2) g_t

    ``k`` selects :math:`\mathcal K`: ``"l1"`` (:math:`\|x\|_1`, :math:`\nabla\mathcal K = \mathrm{sign}`:
    Lion), ``"l2"`` (:math:`\|x\|_2`, :math:`\nabla\mathcal K(c) = c/\|c\|`, per parameter tensor,
    0 at 0), ``"quadratic"`` (:math:`\tfrac12\|x\|^2`, identity: SGD with a Polyak/Nesterov-mixed
    momentum) or a callable returning :math:`\nabla\mathcal K(c)` for a tensor ``c``.  The paper
    writes the momentum with the opposite sign (:math:`m^{paper} = -m`); for the odd maps above the
    two forms are identical.  With weight decay :math:`\lambda>0` the iteration solves
    :math:`\min_x f(x) + \mathcal K^*(\lambda x)/\lambda`: for ``"l1"`` the box
    :math:`\|x\|_\infty\le 1/\lambda`; for ``"quadratic"`` the penalty :math:`\tfrac\lambda2\|x\|^2`.

    Symbols: :math:`\eta` = ``lr``, :math:`(\beta_1,\beta_2)` = ``betas``, :math:`\lambda` =
    ``weight_decay``.  Defaults as :class:`Lion` (the paper uses Lion's).  A callable ``k`` must be
    traceable by ``torch.compile`` for ``fused=True``.
    """

    kernel = staticmethod(lionk_kernel)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        k: str | Callable[[torch.Tensor], torch.Tensor] = "l1",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if not callable(k) and k not in ("l1", "l2", "quadratic"):
            raise ValueError(f"LionK: invalid k={k!r}; expected 'l1', 'l2', 'quadratic' or a callable")
        self.k = k
        self._configure()
        super().__init__(params, lr, betas, weight_decay, maximize=maximize, foreach=foreach, fused=fused)

    _options = ("k",)

    def _configure(self) -> None:
        # "l1" and "quadratic" act elementwise; "l2" sees a batch (B, n) of whole tensors,
        # a user map one tensor at a time, in the parameter's shape
        self.elementwise = self.k in ("l1", "quadratic")
        self.batchable = self.k == "l2"
        # torch 2.13's inductor fails on the row-norm-then-mutate graph of "l2" (KeyError in
        # loop_body); fused=True then runs the kernel eagerly with two_pass=True: it calls two
        # compiled kernels, a row norm and the elementwise update
        self.compilable = self.k != "l2"

    def _static(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"k": self.k, "two_pass": bool(self.k == "l2" and group["fused"])}

    def _batch_shape(self, p: torch.Tensor) -> tuple[int, ...] | None:
        return (p.numel(),) if self.k == "l2" else tuple(p.shape)
