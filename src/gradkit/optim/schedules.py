"""Learning-rate schedules refined from the gradient norms of a previous run.

Defazio, Cutkosky, Mehta, Mishchenko (2023), "When, Why and How Much? Adaptive Learning Rate
Scheduling by Refinement" (arXiv:2310.07831), bound the last iterate of SGD for any schedule.
Minimising that bound for an observed sequence of gradient norms ``‖g_1‖, ..., ‖g_T‖`` gives
(their closed-form refined schedule, Algorithm 1 "Schedule Refinement for SGD")::

    ĝ   = median_filter(‖g‖, width τ·T)          # smoothing used in practice
    w_t = ĝ_t^(-2)
    η_t = w_t · Σ_{p=t+1..T} w_p                  # t = 1..T, so η_T = 0
    η   = η / max(η)                              # multipliers of the base learning rate

With constant norms ``η_t ∝ T − t``: exactly the linear-decay schedule the worst-case analysis
recommends.  For Adam-like methods the paper's reference code uses the ℓ1 norm of the gradient and
``w_t = ĝ_t^(-1)`` (``power=1`` here).

* :func:`refined_schedule` -- the multipliers, as a float64 tensor;
* :class:`RefinedLR` -- a :class:`torch.optim.lr_scheduler.LRScheduler` that applies them;
* :class:`GradNormRecorder` -- records ``‖g_t‖`` at every ``optimizer.step()`` of a run, to refine
  the schedule of the next one.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from gradkit.optim._base import check_int, check_range

logger = logging.getLogger("gradkit")

__all__ = ["refined_schedule", "RefinedLR", "GradNormRecorder"]

#: Median-filter window, as a fraction of the run: ``sigma2 = 0.1`` in the paper's reference code
#: (facebookresearch/adaptive_scheduling, ``visual.py``).
DEFAULT_SMOOTHING = 0.1



def _as_norms(owner: str, grad_norms: Any) -> torch.Tensor:
    """``grad_norms`` as a 1-D float64 tensor of finite positive numbers (at least two)."""
    if isinstance(grad_norms, torch.Tensor):
        if grad_norms.is_complex() or not (grad_norms.is_floating_point() or grad_norms.dtype in
                                           (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
            raise TypeError(f"{owner}: grad_norms must hold real numbers, got a tensor of dtype {grad_norms.dtype}")
        if grad_norms.ndim != 1:
            raise ValueError(f"{owner}: grad_norms must be 1-D (one norm per step), got shape {tuple(grad_norms.shape)}")
        g = grad_norms.detach().to(torch.float64)
    elif isinstance(grad_norms, Sequence) and not isinstance(grad_norms, (str, bytes)):
        for i, v in enumerate(grad_norms):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{owner}: grad_norms[{i}]={v!r} is not a real number")
        g = torch.tensor(list(grad_norms), dtype=torch.float64)
    else:
        raise TypeError(
            f"{owner}: grad_norms must be a 1-D tensor or a sequence of floats, got {type(grad_norms).__name__}"
        )
    if g.numel() < 2:
        raise ValueError(f"{owner}: grad_norms needs at least 2 steps, got {g.numel()}")
    bad = ~(torch.isfinite(g) & (g > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{owner}: grad_norms[{i}]={g[i].item()!r}; expected finite positive numbers (a norm of 0 or inf "
            "has no refined step size)"
        )
    return g


def _resample(g: torch.Tensor, n: int) -> torch.Tensor:
    """Linear interpolation of ``g`` (on an evenly spaced grid over [0, 1]) onto ``n`` points."""
    if n == g.numel():
        return g
    x = torch.linspace(0.0, g.numel() - 1.0, n, dtype=torch.float64, device=g.device)
    lo = x.floor().long().clamp(max=g.numel() - 2)
    frac = x - lo
    return g[lo] * (1.0 - frac) + g[lo + 1] * frac


def _median_smooth(g: torch.Tensor, width: int) -> torch.Tensor:
    """Running median over an odd ``width``; at the start the edge value is repeated, at the end
    the sequence is mirrored (excluding the edge), as in the paper's reference code (which pads
    the end with ``mode='reflect'`` and filters with ``mode='nearest'``)."""
    h = width // 2
    if h == 0:
        return g
    padded = torch.cat([g[:1].expand(h), g, g.flip(0)[1:h + 1]])
    return padded.unfold(0, width, 1).median(dim=1).values


def refined_schedule(
    grad_norms: torch.Tensor | Sequence[float],
    *,
    smoothing: float = DEFAULT_SMOOTHING,
    power: float = 2.0,
    total_steps: int | None = None,
    warmup_steps: int = 0,
) -> torch.Tensor:
    """Refined learning-rate multipliers from the gradient norms of a previous run.

    Defazio, Cutkosky, Mehta, Mishchenko (2023), "When, Why and How Much? Adaptive Learning Rate
    Scheduling by Refinement", arXiv:2310.07831, Algorithm 1 (closed-form refined schedule of
    their last-iterate bound)::

        ĝ_t = median of ‖g‖ over a window of width τ·T centred on t        (smoothing = τ)
        w_t = ĝ_t^(-p)                                                       (power = p)
        η_t = w_t · Σ_{p>t} w_p ,   η ← η / max(η)

    ``p = 2`` is the paper's schedule for SGD-like methods with ℓ2 gradient norms; ``p = 1`` is
    the variant the paper's reference code uses for Adam-like methods with ℓ1 norms of the
    gradient.  Constant norms give exactly linear decay, ``η_t = (T − t)/(T − 1)`` (t = 1..T).

    Note: the refined weight multiplies the *inverse* squared norms of the later steps,
    ``‖g_t‖⁻² Σ_{p>t} ‖g_p‖⁻²`` (the paper's Algorithm 1 and its reference code's
    ``find_closed_form_schedule``), not their squared norms.

    Args:
        grad_norms: ``‖g_t‖`` for each step of the previous run (1-D tensor or sequence of floats;
            finite, positive, at least two steps), e.g. :attr:`GradNormRecorder.norms`.
        smoothing: τ in [0, 1], the median-filter width as a fraction of the number of steps; the
            window is the odd number ``2·⌊⌊τ·T⌋/2⌋ + 1`` (0 = no smoothing).  Default 0.1, the
            value of the paper's reference code (``sigma2``).
        power: p > 0 in ``w_t = ĝ_t^(-p)``; 2 for SGD (ℓ2 norms), 1 for Adam-like (ℓ1 norms).
        total_steps: length of the schedule to produce; the norm sequence is linearly
            interpolated onto this many steps first (as the reference code does), so a schedule
            can be refined for a run of a different length.  Default: ``len(grad_norms)``.
        warmup_steps: optional linear warm-up on top of the refinement (not part of the paper's
            Algorithm 1, which produces its own warm-up where early norms are large): the
            multiplier of step ``t`` (0-based) is scaled by ``min(1, (t + 1)/warmup_steps)``.

    Returns:
        float64 tensor of ``T`` multipliers in [0, 1] (0-based step ``t`` gets ``out[t]``); the
        largest is 1 (before warm-up) and the last is 0.
    """
    owner = "refined_schedule"
    g = _as_norms(owner, grad_norms)
    check_range(owner, "smoothing", smoothing, 0.0, 1.0)
    check_range(owner, "power", power, 0.0, math.inf, low_open=True)
    n = g.numel() if total_steps is None else check_int(owner, "total_steps", total_steps, 2)
    check_int(owner, "warmup_steps", warmup_steps, 0)

    g = _resample(g, n)
    g = _median_smooth(g, 2 * (int(smoothing * n) // 2) + 1)
    w = g.pow(-float(power))
    later = torch.cat([w.flip(0).cumsum(0).flip(0)[1:], w.new_zeros(1)])  # Σ_{p>t} w_p
    eta = w * later
    eta = eta / eta.max()
    if warmup_steps > 0:
        t = torch.arange(1, n + 1, dtype=torch.float64, device=eta.device)
        eta = eta * (t / warmup_steps).clamp(max=1.0)
    return eta


class RefinedLR(LRScheduler):
    """Learning-rate scheduler following the refined schedule of :func:`refined_schedule`.

    Defazio, Cutkosky, Mehta, Mishchenko (2023), arXiv:2310.07831, Algorithm 1: the learning rate
    of (0-based) step ``t`` is ``base_lr · m_t`` with ``m = refined_schedule(grad_norms, ...)``.
    Call :meth:`step` after each ``optimizer.step()``, as for any torch scheduler; the first step
    uses ``m_0``.  After ``T`` steps the last multiplier (0) is kept.

    Args:
        optimizer: the wrapped optimizer (every param group is scaled by the same multiplier).
        grad_norms: gradient norms of a previous run (see :func:`refined_schedule`).
        warmup_steps: linear warm-up steps applied on top (default 0: the paper's schedule).
        smoothing, power, total_steps: as in :func:`refined_schedule`.
        last_epoch: index of the last step when resuming (torch convention; -1 = start).

    State: ``multipliers`` (float64 tensor) plus the usual scheduler counters, all in
    :meth:`state_dict`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        grad_norms: torch.Tensor | Sequence[float],
        warmup_steps: int = 0,
        *,
        smoothing: float = DEFAULT_SMOOTHING,
        power: float = 2.0,
        total_steps: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        self.multipliers = refined_schedule(
            grad_norms, smoothing=smoothing, power=power, total_steps=total_steps, warmup_steps=warmup_steps
        ).cpu()
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: int) -> float:
        """The multiplier of 0-based step ``step`` (the last one beyond the schedule)."""
        return float(self.multipliers[min(max(step, 0), self.multipliers.numel() - 1)])

    def get_lr(self) -> list[float | torch.Tensor]:
        m = self.multiplier(self.last_epoch)
        return [base_lr * m for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float | torch.Tensor]:
        return self.get_lr()


class GradNormRecorder:
    """Records the global gradient norm ``‖g_t‖`` of an optimizer's parameters at every step.

    The record is the input of :func:`refined_schedule` / :class:`RefinedLR` for the next run
    (Defazio et al. 2023, arXiv:2310.07831: the schedule is refined from the norms observed in a
    previous run).  ``‖g_t‖ = (Σ_tensors ‖g‖_q^q)^(1/q)`` over every parameter of the optimizer
    that has a gradient, with ``q = norm_type`` (2 for SGD-like methods; the paper's reference
    code uses ℓ1 norms, ``norm_type=1``, for Adam-like methods).

    With ``attach=True`` (default) a pre-step hook on the optimizer records the norm just before
    every ``optimizer.step()``; closures are not re-evaluated, so optimizers that compute their
    gradients inside ``step`` (L-BFGS) need ``attach=False`` and manual :meth:`record` calls.

    State: the list of recorded norms (:attr:`norms`, float64), in :meth:`state_dict`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, norm_type: float = 2.0, attach: bool = True) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"GradNormRecorder: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_range("GradNormRecorder", "norm_type", norm_type, 0.0, low_open=True, high_open=False)
        if not isinstance(attach, bool):
            raise ValueError(f"GradNormRecorder: invalid attach={attach!r}; expected True or False")
        self.optimizer = optimizer
        self.norm_type = float(norm_type)
        self._norms: list[float] = []
        self._handle = optimizer.register_step_pre_hook(self._hook) if attach else None

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.record()

    @torch.no_grad()
    def record(self) -> float | None:
        """Append the current gradient norm (None, and nothing recorded, if no parameter has a gradient)."""
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            logger.debug("GradNormRecorder: no parameter has a gradient; nothing recorded")
            return None
        q = self.norm_type
        per_tensor = torch.stack([torch.linalg.vector_norm(g.detach(), q).to(torch.float64).cpu() for g in grads])
        value = float(torch.linalg.vector_norm(per_tensor, q))
        self._norms.append(value)
        return value

    @property
    def norms(self) -> torch.Tensor:
        """The recorded norms, one per step, as a float64 tensor."""
        return torch.tensor(self._norms, dtype=torch.float64)

    def remove(self) -> None:
        """Detach the hook from the optimizer (the record is kept)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def state_dict(self) -> dict[str, Any]:
        return {"norms": list(self._norms), "norm_type": self.norm_type}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "norms" not in state:
            raise ValueError("GradNormRecorder.load_state_dict: expected a dict from GradNormRecorder.state_dict()")
        self._norms = [float(v) for v in state["norms"]]
        self.norm_type = float(state.get("norm_type", self.norm_type))
