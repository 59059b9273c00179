"""AMSGrad in the form of Reddi, Kale and Kumar (2018)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ._base import Optimizer, as_float, check_adam_group, check_bool

__all__ = ["AMSGrad", "amsgrad_kernel"]


def amsgrad_kernel(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, h, maximize: bool) -> None:
    """Reference AMSGrad step.

    ``h = [beta1, 1 - beta1, beta2, 1 - beta2, 1 - lr * weight_decay, lr * sqrt(bc2) / bc1, eps * sqrt(bc2)]``
    (``bc1``, ``bc2``: the bias corrections, 1 without ``bias_correction``): folded into one step
    size and a scaled epsilon, so each element costs one division and one square root.
    """
    beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size, eps = (h[i] for i in range(7))
    g = grad.to(h.dtype)
    if maximize:
        g = -g
    m = exp_avg.to(h.dtype) * beta1 + one_minus_beta1 * g
    v = exp_avg_sq.to(h.dtype) * beta2 + one_minus_beta2 * g * g
    v_max = torch.maximum(max_exp_avg_sq.to(h.dtype), v)
    # (lr / bc1) m / (sqrt(v_max) / sqrt(bc2) + eps) = (lr sqrt(bc2) / bc1) m / (sqrt(v_max) + eps sqrt(bc2))
    param.copy_(param.to(h.dtype) * decay - (step_size * m) / (v_max.sqrt() + eps))
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    max_exp_avg_sq.copy_(v_max)


class AMSGrad(Optimizer):
    r"""AMSGrad: Adam with a non-increasing effective step size.

    Reddi, Kale and Kumar, "On the Convergence of Adam and Beyond", ICLR 2018, arXiv:1904.09237
    (Algorithm 2).

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,
        \qquad \hat v_t = \max(\hat v_{t-1}, v_t) \\
        \theta_t &= \theta_{t-1}(1-\eta\lambda) - \eta\,\frac{m_t}{\sqrt{\hat v_t} + \epsilon}

    as in the paper: no bias correction (``bias_correction=False``, default).  With
    ``bias_correction=True`` the step is :math:`\eta\,\frac{m_t/(1-\beta_1^t)}{\sqrt{\hat v_t/(1-\beta_2^t)}+\epsilon}`,
    which is ``torch.optim.AdamW(amsgrad=True)`` (``torch.optim.Adam(amsgrad=True)`` when
    ``weight_decay = 0``: the decay here is decoupled).  The paper's decaying :math:`\alpha_t=\alpha/\sqrt t`
    and :math:`\beta_{1t}` are schedules: use an LR scheduler.  The projection onto a feasible set
    (the paper's :math:`\Pi_{\mathcal F}`) is left to the caller.

    Symbols: :math:`\eta` = ``lr``, :math:`(\beta_1,\beta_2)` = ``betas``, :math:`\epsilon` = ``eps``
    (not in the paper; 1e-8 keeps the first steps finite), :math:`\lambda` = ``weight_decay``
    (decoupled; not in the paper, default 0); state ``exp_avg`` (m), ``exp_avg_sq`` (v),
    ``max_exp_avg_sq`` (:math:`\hat v`).  Defaults: lr 1e-3, betas (0.9, 0.999) (the paper's
    experiments).

    State: three tensors per parameter (12 bytes per float32 parameter).
    """

    state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    kernel = staticmethod(amsgrad_kernel)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bias_correction: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction),
                         maximize=maximize, foreach=foreach, fused=fused)

    def _validate(self, group: dict[str, Any]) -> None:
        check_adam_group(type(self).__name__, group)
        check_bool(type(self).__name__, "bias_correction", group["bias_correction"])

    def _hyper(self, group: dict[str, Any], step: int) -> list[float]:
        b1, b2 = group["betas"]
        bc1, bc2_sqrt = (1 - b1**step, math.sqrt(1 - b2**step)) if group["bias_correction"] else (1.0, 1.0)
        lr = as_float(group["lr"])
        return [b1, 1 - b1, b2, 1 - b2, 1 - lr * group["weight_decay"], lr * bc2_sqrt / bc1, group["eps"] * bc2_sqrt]
