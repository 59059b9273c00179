"""AdEMAMix: a mixture of a fast and a slow gradient EMA (Pagliardini, Ablin and Grangier, 2024)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch

from ._base import Optimizer, as_float, check_betas, check_range

__all__ = ["AdEMAMix", "ademamix_kernel", "alpha_schedule", "beta3_schedule"]


def alpha_schedule(step: int, alpha: float, warmup: int | None) -> float:
    """Linear warm-up of alpha from 0 over ``warmup`` steps (reference code's ``linear_warmup_scheduler``)."""
    if warmup is None or step >= warmup:
        return alpha
    return step / warmup * alpha


def beta3_schedule(step: int, beta3: float, beta_start: float, warmup: int | None) -> float:
    """Warm-up of beta3 from ``beta_start`` (= beta1) that is linear in the EMA's half-life.

    With :math:`f(\\beta) = \\ln(0.5)/\\ln(\\beta) - 1` (half-life in steps, minus one) and
    :math:`a = t/T`: :math:`\\beta_3(t) = f^{-1}((1-a) f(\\beta_1) + a f(\\beta_3))`,
    :math:`f^{-1}(s) = 0.5^{1/(s+1)}` (the reference code adds 1e-8 inside the log; so do we).
    """
    if warmup is None or step >= warmup:
        return beta3

    def half_life(b: float) -> float:
        return math.log(0.5) / math.log(b + 1e-8) - 1

    a = step / warmup
    return math.pow(0.5, 1 / ((1 - a) * half_life(beta_start) + a * half_life(beta3) + 1))


def ademamix_kernel(param, grad, exp_avg_fast, exp_avg_slow, exp_avg_sq, *, h, maximize: bool) -> None:
    """Reference AdEMAMix step on one tensor.

    ``h = [1 - beta1, beta2, 1 - beta2, beta3(t), 1 - beta3(t), 1 - lr * weight_decay,
    -lr / bias_correction1, -lr * alpha(t), sqrt(bias_correction2), eps]``.  The arithmetic mirrors
    ``torch.optim.AdamW`` so that ``alpha = 0`` reproduces AdamW bit for bit; both EMAs share one
    division by the denominator.
    """
    one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3, decay, neg_step, neg_slow, bc2_sqrt, eps = (
        h[i] for i in range(10))
    g = grad.to(h.dtype)
    if maximize:
        g = -g
    m1 = torch.lerp(exp_avg_fast.to(h.dtype), g, one_minus_beta1)
    m2 = exp_avg_slow.to(h.dtype) * beta3 + g * one_minus_beta3
    v = torch.addcmul(exp_avg_sq.to(h.dtype) * beta2, one_minus_beta2 * g, g)
    denom = v.sqrt() / bc2_sqrt + eps
    # AdamW's step on the fast, bias-corrected EMA plus the slow EMA's (alpha = 0: exactly AdamW's)
    param.copy_(torch.addcdiv(param.to(h.dtype) * decay, neg_step * m1 + neg_slow * m2, denom))
    exp_avg_fast.copy_(m1)
    exp_avg_slow.copy_(m2)
    exp_avg_sq.copy_(v)


class AdEMAMix(Optimizer):
    r"""AdEMAMix: Adam whose numerator mixes a fast EMA with a very slow one.

    Pagliardini, Ablin and Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", 2024,
    arXiv:2409.03137 (Algorithm 1).

    .. math::
        m^{(1)}_t &= \beta_1 m^{(1)}_{t-1} + (1-\beta_1) g_t, \quad
        m^{(2)}_t = \beta_3(t) m^{(2)}_{t-1} + (1-\beta_3(t)) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1} - \eta\Big(\frac{m^{(1)}_t/(1-\beta_1^t) + \alpha(t)\, m^{(2)}_t}
                    {\sqrt{v_t/(1-\beta_2^t)} + \epsilon} + \lambda\theta_{t-1}\Big)

    The slow EMA :math:`m^{(2)}` is not bias-corrected.  With ``t_alpha_beta3`` = :math:`T`, the
    schedulers of the reference code warm :math:`\alpha(t)` up linearly from 0 and :math:`\beta_3(t)`
    up from :math:`\beta_1` linearly in half-life (:func:`alpha_schedule`, :func:`beta3_schedule`);
    otherwise :math:`\alpha(t)=\alpha`, :math:`\beta_3(t)=\beta_3`.

    Symbols: :math:`\eta` = ``lr``, :math:`(\beta_1,\beta_2,\beta_3)` = ``betas``, :math:`\alpha` =
    ``alpha``, :math:`\epsilon` = ``eps``, :math:`\lambda` = ``weight_decay`` (decoupled);
    :math:`m^{(1)}, m^{(2)}, v` = ``state["exp_avg_fast"]``, ``state["exp_avg_slow"]``,
    ``state["exp_avg_sq"]``.  Defaults follow the authors' reference code (apple/ml-ademamix):
    lr 1e-3, betas (0.9, 0.999, 0.9999), alpha 2.0, eps 1e-8, weight_decay 0, no warm-up
    (the paper recommends warm-up with :math:`T` = the number of training steps for large
    :math:`\beta_3`).  With ``alpha = 0`` the update is exactly ``torch.optim.AdamW``'s (bit for
    bit on the default and ``foreach=False`` paths; ``fused=True`` compiles the arithmetic, which
    may differ in the last bit or two).

    State: three tensors per parameter (12 bytes per float32 parameter).
    """

    state_names = ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")
    kernel = staticmethod(ademamix_kernel)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 2.0,
        t_alpha_beta3: int | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, t_alpha_beta3=t_alpha_beta3, eps=eps,
                                      weight_decay=weight_decay), maximize=maximize, foreach=foreach, fused=fused)

    def _validate(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        check_betas(name, group["betas"], n=3)
        check_range(name, "alpha", group["alpha"], 0.0)
        t = group["t_alpha_beta3"]
        if t is not None and (isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 1):
            raise ValueError(f"{name}: invalid t_alpha_beta3={t!r}; expected None or an integer in [1, inf)")
        check_range(name, "eps", group["eps"], 0.0)
        check_range(name, "weight_decay", group["weight_decay"], 0.0)

    def _hyper(self, group: dict[str, Any], step: int) -> list[float]:
        b1, b2, b3 = group["betas"]
        lr, t = as_float(group["lr"]), group["t_alpha_beta3"]
        b3_t = beta3_schedule(step, b3, b1, t)
        return [1 - b1, b2, 1 - b2, b3_t, 1 - b3_t, 1 - lr * group["weight_decay"], -(lr / (1 - b1**step)),
                -(lr * alpha_schedule(step, group["alpha"], t)), math.sqrt(1 - b2**step), group["eps"]]
