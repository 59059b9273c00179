"""AdamP and SGDP: remove the radial component of updates of scale-invariant weights (Heo et al., 2021)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ._base import Optimizer, as_float, check_betas, check_bool, check_range, compiled, run_flat

__all__ = ["AdamP", "SGDP", "adamp_kernel", "sgdp_kernel", "project_radial"]


def project_radial(param, grad, update, delta, eps):
    r"""Remove the radial component of ``update`` where ``param`` looks scale-invariant.

    Batched: the inputs have shape ``(B, rows, cols)``, one 2-D view (``rows`` = output channels)
    of ``B`` parameters of one shape; returns ``(update', projected)`` with ``projected`` of shape
    ``(B,)``.  Following the paper (Algorithm 1, "Projection"), two views are tried in order: the
    *channel* view (one row per output channel) then the *layer* view (a single row).  A view
    applies when :math:`\max_{rows} |\cos(g, \theta)| < \delta/\sqrt{\dim}` (``dim`` = row
    length): the gradient is nearly orthogonal to the weight, the signature of scale invariance.
    The update then loses its component along :math:`\theta/(\|\theta\|+\epsilon)`, row by row:
    :math:`u - \theta\,\langle\theta, u\rangle/(\|\theta\|+\epsilon)^2`.  Both views are computed from
    the same four row sums and the choice is a ``torch.where`` (no data-dependent branch), so the
    projection compiles into one graph with a single pass over the update.
    """
    coef, projected = _radial_coef(param, grad, update, delta, eps)
    return update - param * coef, projected


def _projected(param, grad, *, h, delta_index: int):
    """Whether each ``(rows, cols)`` matrix of a ``(B, rows, cols)`` batch is projected, ``(B,)``:
    the test of :func:`_radial_coef` alone, which reads only ``param`` and ``grad`` (``eps`` and
    ``delta`` at ``h[3]`` and ``h[delta_index]``; the sign of ``grad`` does not matter)."""
    p, g = param.to(h.dtype), grad.to(h.dtype)
    pp, gg, gp = ((x * y).sum(-1) for x, y in ((p, p), (g, g), (g, p)))
    channel, layer = _tests(pp, gg, gp, h[delta_index], h[3], p.shape[2])
    return (channel.all(dim=1, keepdim=True) | layer).squeeze(1)


def _decided(kernel, args, h, static, delta_index: int) -> bool:
    """The fast path of ``two_phase=True`` (``fused=True``): a compiled pass over ``param`` and
    ``grad`` decides the projection on the host; when no matrix of the batch is projected the step
    is the plain elementwise one, run flat (one pass, as AdamW).  Returns False when the caller
    must run its full (projecting) step."""
    param, grad = args[0], args[1]
    contiguous = all(a.is_contiguous() for a in args)
    if param.numel() <= 1:
        kernel(*args, h=h, **static)  # eagerly: a size-1 input would force a recompilation
        return True
    if param.dim() == 3:
        if not contiguous or bool(run_flat(_projected, [param, grad], h, {"delta_index": delta_index}).any()):
            return False
    if contiguous:
        run_flat(kernel, [a.view(-1) for a in args], h, static)
    else:  # vectors only (a strided batch of matrices took the full step above)
        compiled(kernel)(*args, h=h, **static)
    return True


def _radial_coef(param, grad, update, delta, eps):
    """The coefficients of :func:`project_radial`: ``(coef, projected)``, ``coef`` of shape
    ``(B, rows, 1)`` (the update loses ``param * coef``)."""
    # per-row sums, shared by both views (the layer view sums them over rows)
    pp, gg, gp, pu = ((x * y).sum(-1) for x, y in ((param, param), (grad, grad), (grad, param), (param, update)))
    channel, layer = _tests(pp, gg, gp, delta, eps, param.shape[2])
    channel = channel.all(dim=1, keepdim=True)  # max over rows of |cos| below the threshold

    def coef(pp, pu):  # <p_unit, u> / (||p|| + eps), p_unit = p / (||p|| + eps)
        return pu / (pp.sqrt() + eps) ** 2

    coef = torch.where(channel, coef(pp, pu), torch.where(layer, coef(pp.sum(-1, keepdim=True), pu.sum(-1, keepdim=True)), 0.0))
    return coef.unsqueeze(-1), (channel | layer).squeeze(1)


def _tests(pp, gg, gp, delta, eps, cols):
    """The cosine tests of the channel view (per row, ``(B, rows)``) and the layer view (``(B, 1)``)
    from the per-row sums ``pp = Σθ²``, ``gg = Σg²``, ``gp = Σgθ``: ``|cos| < δ/√dim``."""

    def test(pp, gg, gp, dim):
        # cos² dim < δ², squared: no square root of a size (it would be frozen in a traced graph)
        return gp * gp * dim < delta * delta * torch.clamp_min(gg * pp, eps * eps)

    layer = test(*(x.sum(-1, keepdim=True) for x in (pp, gg, gp)), pp.shape[-1] * cols)
    return test(pp, gg, gp, cols), layer


def adamp_kernel(param, grad, exp_avg, exp_avg_sq, *, h, maximize: bool, nesterov: bool, two_phase: bool = False):
    r"""Reference AdamP step on a batch ``(B, rows, cols)`` of weights of one shape, or ``(1, n)`` of vectors.

    ``h = [lr, beta1, beta2, eps, weight_decay, delta, wd_ratio, bias_correction1, sqrt(bias_correction2),
    eps * sqrt(bias_correction2)]``.  The perturbation :math:`m / (\sqrt{v / bc_2} + \epsilon)` is computed as
    :math:`\sqrt{bc_2}\, m / (\sqrt v + \epsilon\sqrt{bc_2})` (one division per element).
    ``two_phase=True`` (``fused=True``): compiled, with the projection decided first (:func:`_decided`).
    """
    if two_phase:
        static = {"maximize": maximize, "nesterov": nesterov}
        args = (param, grad, exp_avg, exp_avg_sq)
        if not _decided(adamp_kernel, args, h, static, 5):
            compiled(adamp_kernel)(*args, h=h, **static)
        return None
    lr, beta1, beta2, eps, wd, delta, wd_ratio, bc1, bc2_sqrt, eps_scaled = (h[i] for i in range(10))
    g = grad.to(h.dtype)
    if maximize:
        g = -g
    p = param.to(h.dtype)
    m = exp_avg.to(h.dtype) * beta1 + (1 - beta1) * g
    v = torch.addcmul(exp_avg_sq.to(h.dtype) * beta2, (1 - beta2) * g, g)
    numerator = beta1 * m + (1 - beta1) * g if nesterov else m
    perturb = (bc2_sqrt * numerator) / (v.sqrt() + eps_scaled)
    if param.dim() == 3:  # (B, rows, cols): weights with >1 dimension; vectors are never projected
        coef, projected = _radial_coef(p, g, perturb, delta, eps)
        decay = 1 - lr * (wd * torch.where(projected, wd_ratio, 1.0).view(-1, 1, 1))
        param.copy_(p * decay - (lr / bc1) * (perturb - p * coef))
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        # returned (and ignored by the callers) so that torch.compile stores these per-row values
        # instead of recomputing them for every element of the final loop
        return coef, decay
    param.copy_(p * (1 - lr * wd) - (lr / bc1) * perturb)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    return None


def sgdp_kernel(param, grad, momentum_buffer, *, h, maximize: bool, nesterov: bool, two_phase: bool = False):
    """Reference SGDP step on a batch (see :func:`adamp_kernel`);
    ``h = [lr, momentum, dampening, eps, weight_decay, delta, wd_ratio]``."""
    if two_phase:
        static = {"maximize": maximize, "nesterov": nesterov}
        args = (param, grad, momentum_buffer)
        if not _decided(sgdp_kernel, args, h, static, 5):
            compiled(sgdp_kernel)(*args, h=h, **static)
        return None
    lr, mu, dampening, eps, wd, delta, wd_ratio = (h[i] for i in range(7))
    g = grad.to(h.dtype)
    if maximize:
        g = -g
    p = param.to(h.dtype)
    buf = momentum_buffer.to(h.dtype) * mu + (1 - dampening) * g
    d_p = g + mu * buf if nesterov else buf
    if param.dim() == 3:  # (B, rows, cols): weights with >1 dimension; vectors are never projected
        coef, projected = _radial_coef(p, g, d_p, delta, eps)
        decay = 1 - lr * (wd * torch.where(projected, wd_ratio, 1.0).view(-1, 1, 1)) / (1 - mu)
        param.copy_(p * decay - lr * (d_p - p * coef))
        momentum_buffer.copy_(buf)
        return coef, decay  # stored, not recomputed per element (see adamp_kernel)
    param.copy_(p * (1 - lr * wd / (1 - mu)) - lr * d_p)
    momentum_buffer.copy_(buf)
    return None


class _ProjectedMixin:
    supports_complex = False
    elementwise = False
    # fused=True runs the kernel with two_phase=True, which calls its compiled pieces itself
    compilable = False

    def _batch_shape(self, p: torch.Tensor) -> tuple[int, ...] | None:
        # weights: the (channels, rest) view; vectors and scalars: elementwise (never projected)
        return (p.shape[0], p.numel() // p.shape[0]) if p.dim() > 1 else None

    def _static(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"nesterov": group["nesterov"], "two_phase": bool(group["fused"])}

    def _validate_projection(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        check_range(name, "eps", group["eps"], 0.0)
        check_range(name, "weight_decay", group["weight_decay"], 0.0)
        check_range(name, "delta", group["delta"], 0.0)
        check_range(name, "wd_ratio", group["wd_ratio"], 0.0, 1.0)
        check_bool(name, "nesterov", group["nesterov"])


class AdamP(_ProjectedMixin, Optimizer):
    r"""AdamP: Adam without the radial (norm-growing) component on scale-invariant weights.

    Heo, Chun, Oh, Han, Yun, Kim, Uh and Ha, "AdamP: Slowing Down the Slowdown for Momentum
    Optimizers on Scale-invariant Weights", ICLR 2021, arXiv:2006.08217 (Algorithm 2).

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        p_t &= \frac{m_t}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}
              \quad\text{(Nesterov: } \frac{\beta_1 m_t + (1-\beta_1) g_t}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}) \\
        q_t &= \begin{cases} \Pi_{\theta}(p_t) = p_t - (\hat\theta\cdot p_t)\,\hat\theta & \text{if }
              \max|\cos(\theta, g_t)| < \delta/\sqrt{\dim(\theta)} \\ p_t & \text{otherwise} \end{cases} \\
        \theta_t &= \theta_{t-1}(1 - \eta\lambda\,r_t) - \frac{\eta}{1-\beta_1^t}\, q_t,
              \qquad r_t = \text{wd\_ratio if projected else } 1

    :math:`\hat\theta = \theta/(\|\theta\|+\epsilon)` row-wise, in the channel view first and the
    layer view second (:func:`project_radial`); 1-D parameters (biases, norms' gains) are never
    projected.  Symbols: :math:`\eta` = ``lr``, :math:`(\beta_1,\beta_2)` = ``betas``,
    :math:`\epsilon` = ``eps``, :math:`\lambda` = ``weight_decay`` (decoupled), :math:`\delta` =
    ``delta``, ``wd_ratio``, ``nesterov``.  Defaults are those of the paper and of the authors'
    code (clovaai/AdamP): lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0, delta 0.1,
    wd_ratio 0.1, nesterov False.  Complex parameters are refused (the paper's cosine test is
    defined for real weights).

    State: ``exp_avg``, ``exp_avg_sq`` (8 bytes per float32 parameter).
    """

    state_names = ("exp_avg", "exp_avg_sq")
    kernel = staticmethod(adamp_kernel)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta,
                                      wd_ratio=wd_ratio, nesterov=nesterov),
                         maximize=maximize, foreach=foreach, fused=fused)

    def _validate(self, group: dict[str, Any]) -> None:
        check_betas(type(self).__name__, group["betas"])
        self._validate_projection(group)

    def _hyper(self, group: dict[str, Any], step: int) -> list[float]:
        b1, b2 = group["betas"]
        bc2_sqrt = math.sqrt(1 - b2**step)
        return [as_float(group["lr"]), b1, b2, group["eps"], group["weight_decay"], group["delta"],
                group["wd_ratio"], 1 - b1**step, bc2_sqrt, group["eps"] * bc2_sqrt]


class SGDP(_ProjectedMixin, Optimizer):
    r"""SGDP: SGD with momentum without the radial component on scale-invariant weights.

    Heo et al., ICLR 2021, arXiv:2006.08217 (Algorithm 1).

    .. math::
        b_t &= \mu\, b_{t-1} + (1-\tau) g_t, \qquad p_t = b_t \ \text{(Nesterov: } g_t + \mu b_t) \\
        \theta_t &= \theta_{t-1}\Big(1 - \frac{\eta\lambda\, r_t}{1-\mu}\Big) - \eta\, q_t

    with :math:`q_t, r_t` the projection and decay ratio of :class:`AdamP`.  Symbols: :math:`\eta`
    = ``lr`` (required, as in the authors' code), :math:`\mu` = ``momentum``, :math:`\tau` =
    ``dampening``, :math:`\lambda` = ``weight_decay`` (decoupled and divided by :math:`1-\mu` as in
    the authors' code), ``eps``, ``delta``, ``wd_ratio``, ``nesterov``; state ``momentum_buffer``
    (:math:`b`, zeros at start).  The buffer stores the unprojected :math:`b_t` (the paper's
    algorithm); the authors' code, without Nesterov, projects its buffer in place.  Defaults
    (authors' code): momentum 0, dampening 0, eps 1e-8, weight_decay 0, delta 0.1, wd_ratio 0.1.

    State: one tensor per parameter (4 bytes per float32 parameter).
    """

    state_names = ("momentum_buffer",)
    kernel = staticmethod(sgdp_kernel)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor,
        momentum: float = 0.0,
        dampening: float = 0.0,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, eps=eps,
                                      weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio, nesterov=nesterov),
                         maximize=maximize, foreach=foreach, fused=fused)

    def _validate(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        check_range(name, "momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range(name, "dampening", group["dampening"], 0.0, 1.0)
        self._validate_projection(group)

    def _hyper(self, group: dict[str, Any], step: int) -> list[float]:
        return [as_float(group["lr"]), group["momentum"], group["dampening"], group["eps"], group["weight_decay"],
                group["delta"], group["wd_ratio"]]
