r"""Optimizers for min-max games: extra-gradient and its single-call variants.

All three operate on the game's *vector field* :math:`V(z)`, the concatenation of every player's
gradient with the sign of its objective: a minimizing player contributes :math:`+\nabla`, a maximizing
player :math:`-\nabla`.  A two-player game :math:`\min_x \max_y f(x, y)` is two parameter groups::

    opt = ExtraGradient([{"params": gen.parameters()},
                         {"params": disc.parameters(), "maximize": True}], lr=1e-2)

and both players' gradients must come from the *same* evaluation of ``f`` (one ``backward()``
computes them all), so that the step is simultaneous.

Symbols (Hsieh, Iutzeler, Malick and Mertikopoulos, "On the convergence of single-call stochastic
extra-gradient methods", NeurIPS 2019, arXiv:1908.08465): :math:`X_t` the base iterate,
:math:`X_{t+1/2}` the leading (extrapolated) point where the field is evaluated,
:math:`V_{t+1/2} = V(X_{t+1/2})`, :math:`\gamma` = ``lr``.  Step sizes, for a
:math:`\beta`-Lipschitz field, as we read their Theorems 1-2: extra-gradient :math:`\gamma < 1/\beta`
(monotone, ergodic rate) and :math:`\gamma < 1/(2\beta)` (strongly monotone, linear rate of the last
iterate); the single-call methods half of that (:math:`1/(2\beta)`, resp. :math:`1/(4\beta)`).  On the
bilinear game :math:`x^\top A y` the exact linear rates are given in the class docstrings (tested).

The methods have no default from the papers for ``lr`` (it is set from the Lipschitz constant);
1e-3 is :class:`torch.optim.SGD`'s default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ._base import Optimizer, as_float

__all__ = [
    "ExtraGradient", "PastExtraGradient", "OptimisticGradient",
    "extragradient_kernel", "past_extragradient_kernel", "optimistic_kernel",
]


def _field(grad: torch.Tensor, h: torch.Tensor, maximize: bool) -> torch.Tensor:
    v = grad.to(h.dtype)
    return -v if maximize else v


def extragradient_kernel(param, grad, base, *, h, maximize: bool, extrapolate: bool) -> None:
    """``extrapolate``: base <- X_t, param <- X_t - lr V(X_t); else param <- base - lr V(X_{t+1/2}); ``h = [lr]``."""
    lr = h[0]
    v = _field(grad, h, maximize)
    if extrapolate:
        # read X_t back from base: torch.compile (2.13, CPU) miscompiles `new = param - ...;
        # base.copy_(param); param.copy_(new)` into base == new
        base.copy_(param)
    param.copy_(base.to(h.dtype) - lr * v)


def past_extragradient_kernel(param, grad, base, *, h, maximize: bool) -> None:
    """base <- base - lr V(param); param <- base - lr V(param) (the next leading point); ``h = [lr]``."""
    lr = h[0]
    step = lr * _field(grad, h, maximize)
    x = base.to(h.dtype) - step
    base.copy_(x)
    param.copy_(x - step)


def optimistic_kernel(param, grad, prev_step, *, h, maximize: bool) -> None:
    """param <- param - 2 lr V(param) + prev_step; prev_step <- lr V(param); ``h = [lr]``."""
    lr = h[0]
    step = lr * _field(grad, h, maximize)
    param.copy_(param.to(h.dtype) - 2 * step + prev_step.to(h.dtype))
    prev_step.copy_(step)


class _GameOptimizer(Optimizer):
    """Shared constructor: one hyperparameter, ``lr``; ``maximize`` per group marks maximizing players."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, dict(lr=lr), maximize=maximize, foreach=foreach, fused=fused)

    def _hyper(self, group: dict[str, Any], step: int) -> list[float]:
        return [as_float(group["lr"])]


class ExtraGradient(_GameOptimizer):
    r"""Extra-gradient: two evaluations of the field per iteration.

    Korpelevich, "The extragradient method for finding saddle points and other problems", Ekonomika
    i Matematicheskie Metody 12 (1976); in the notation of Hsieh et al. 2019 (arXiv:1908.08465, eq. EG):

    .. math::
        X_{t+1/2} = X_t - \gamma V(X_t), \qquad X_{t+1} = X_t - \gamma V(X_{t+1/2}).

    **Usage.**  One iteration needs the gradients at two points, so it is a pair of calls (as in the
    code of Gidel et al. 2019, arXiv:1802.10551)::

        loss_fn().backward()          # gradients at X_t
        opt.extrapolate()             # parameters move to X_{t+1/2}; X_t is kept in state["base"]
        opt.zero_grad()
        loss_fn().backward()          # gradients at X_{t+1/2}
        opt.step()                    # parameters <- X_{t+1} = X_t - lr * V(X_{t+1/2})

    or one call with a closure that zeroes the gradients, evaluates the game and calls
    ``backward()``: ``opt.step(closure)`` runs the closure at :math:`X_t`, extrapolates, runs it
    again at :math:`X_{t+1/2}` and updates; it returns the first loss (at :math:`X_t`).  After an
    explicit :meth:`extrapolate`, ``step(closure)`` evaluates the closure once (at
    :math:`X_{t+1/2}`).  ``step()`` without a closure and without a preceding :meth:`extrapolate`,
    and two :meth:`extrapolate` calls in a row, raise ``RuntimeError``.

    A parameter that had a gradient at the extrapolation but has none at the update returns to
    :math:`X_t` (zero field); one that only has a gradient at the update takes a plain step
    :math:`X_t - \gamma V(X_t)`.  The learning rate of each half-step is the group's ``lr`` at the
    time of the call.

    Rate on the bilinear game :math:`\min_x\max_y x^\top A y` with singular values :math:`\sigma_i`
    of :math:`A`: each singular pair :math:`(x_i, y_i)` shrinks in norm by exactly
    :math:`\sqrt{(1-\gamma^2\sigma_i^2)^2 + \gamma^2\sigma_i^2}` per iteration (below 1 iff
    :math:`\gamma\sigma_i < 1`), whereas simultaneous gradient descent-ascent grows by
    :math:`\sqrt{1+\gamma^2\sigma_i^2}`.

    Hyperparameters: :math:`\gamma` = ``lr`` (default 1e-3, see the module docstring); ``maximize``
    per group marks the maximizing players.

    State: ``base`` (:math:`X_t` during an iteration; one tensor, parameter dtype), ``extrapolated``
    (bool) and ``step`` (number of half-steps this parameter took: 2 per iteration).
    """

    state_names = ("base",)
    kernel = staticmethod(extragradient_kernel)
    # traced without dynamo (gradkit.optim._base.run_flat), inductor 2.13 reorders `base <- param`
    # after `param <- ...`; torch.compile's own path gets it right
    flat_compilable = False
    _extrapolating = False  # the kernel's phase during a call of _step_group

    def _static(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"extrapolate": self._extrapolating}

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        super()._init_state(p, state, group)
        state["extrapolated"] = False

    @property
    def extrapolated(self) -> bool:
        """True between :meth:`extrapolate` and :meth:`step` (parameters sit at :math:`X_{t+1/2}`)."""
        return any(st.get("extrapolated", False) for st in self.state.values())

    @torch.no_grad()
    def extrapolate(self) -> None:
        """First half-step: keep :math:`X_t` in ``state["base"]`` and move to :math:`X_t - \\gamma V(X_t)`."""
        name = type(self).__name__
        if self.extrapolated:
            raise RuntimeError(f"{name}.extrapolate() called twice; call step() (with the gradients at the "
                               "extrapolated point) before extrapolating again")
        moved = [p for g in self.param_groups for p in g["params"] if p.grad is not None and p.numel()]
        if not moved:
            raise RuntimeError(f"{name}.extrapolate(): no parameter has a gradient; call backward() first")
        self._extrapolating = True
        try:
            for group in self.param_groups:
                self._step_group(group)
        finally:
            self._extrapolating = False
        for p in moved:
            self.state[p]["extrapolated"] = True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Second half-step (after :meth:`extrapolate`), or a whole iteration given a closure."""
        loss = None
        if not self.extrapolated:
            if closure is None:
                raise RuntimeError(
                    f"{type(self).__name__}.step() needs the gradients at the extrapolated point: call "
                    "extrapolate(), recompute the gradients, then step(); or pass a closure that zeroes "
                    "the gradients and recomputes them (step(closure) runs it twice)")
            with torch.enable_grad():
                loss = closure()
            self.extrapolate()
        if closure is not None:
            with torch.enable_grad():
                second = closure()
            loss = second if loss is None else loss
        self._update()
        return loss

    def _update(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if not p.numel():  # nothing to update (left out by _params_and_grads too)
                    continue
                st = self.state[p] if p in self.state else None
                flagged = bool(st) and st.get("extrapolated", False)
                if p.grad is None:
                    if flagged:  # no field at X_{t+1/2}: back to X_t
                        p.copy_(st["base"])
                        st["extrapolated"] = False
                    continue
                if not flagged and not p.grad.is_sparse:  # not extrapolated: a plain step from here
                    st = self.state[p]
                    if not st:
                        self._init_state(p, st, group)
                    st["base"].copy_(p)
            self._step_group(group)
            for p in group["params"]:
                if p in self.state and self.state[p]:
                    self.state[p]["extrapolated"] = False


class PastExtraGradient(_GameOptimizer):
    r"""Past extra-gradient (Popov's method): extra-gradient with the extrapolation reusing the last field.

    Popov, "A modification of the Arrow-Hurwicz method for search of saddle points", Mathematical
    Notes 28 (1980); Hsieh et al. 2019 (arXiv:1908.08465, eq. PEG):

    .. math::
        X_{t+1/2} = X_t - \gamma V_{t-1/2}, \qquad X_{t+1} = X_t - \gamma V_{t+1/2},
        \qquad V_{t+1/2} = V(X_{t+1/2}).

    One field evaluation per iteration, at the leading point.  The parameters therefore hold
    :math:`X_{t+1/2}` (where the gradient must be computed) and ``state["base"]`` holds the base
    iterate :math:`X_t`; ``step()`` (an ordinary torch step, closure optional) computes
    :math:`X_{t+1} = X_t - \gamma V_{t+1/2}` and at once the next leading point
    :math:`X_{t+3/2} = X_{t+1} - \gamma V_{t+1/2}` (with the current ``lr``: the next learning
    rate is not known yet).  Initialisation :math:`V_{-1/2} = 0`, i.e. :math:`X_{1/2} = X_0`.

    In the unconstrained case the leading points coincide with :class:`OptimisticGradient`'s
    iterates (Hsieh et al. 2019, Section 3); both converge on bilinear games for
    :math:`\gamma\sigma_{\max} < 1/2`, at the rate given in :class:`OptimisticGradient`.

    Hyperparameters: :math:`\gamma` = ``lr`` (default 1e-3, see the module docstring); ``maximize``
    per group marks the maximizing players.  The parameters hold the leading point, so a group
    whose ``lr`` is set to 0 mid-run moves once more, by :math:`+\gamma_{t-1} V_{t-1/2}` (back
    to :math:`X_t`: the pending extrapolation is undone), and stays there (a group with lr 0 from
    the start never moves); the same holds for :class:`OptimisticGradient`.

    State: ``base`` (:math:`X_t`, one tensor in the parameter dtype) and ``step``.
    """

    state_names = ("base",)
    kernel = staticmethod(past_extragradient_kernel)

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] = 0
        state["base"] = p.detach().clone(memory_format=torch.preserve_format)


class OptimisticGradient(_GameOptimizer):
    r"""Optimistic gradient descent (-ascent): a step along the field plus a correction by the last one.

    Daskalakis, Ilyas, Syrgkanis and Zeng, "Training GANs with Optimism", ICLR 2018
    (arXiv:1711.00141); single-sequence form of Hsieh et al. 2019 (arXiv:1908.08465, eq. OG):

    .. math::
        X_{t+1} = X_t - 2\gamma_t V(X_t) + \gamma_{t-1} V(X_{t-1}),

    with :math:`V(X_{-1}) = 0` (the first step is :math:`X_1 = X_0 - 2\gamma V(X_0)`), which makes
    the iterates identical to :class:`PastExtraGradient`'s leading points, under any learning-rate
    schedule.  One field evaluation per iteration; an ordinary ``step()``.

    Rate on the bilinear game :math:`\min_x\max_y x^\top A y`: the iteration on each singular pair is
    linear with companion roots :math:`\lambda^2 - (1 - 2i\gamma\sigma)\lambda - i\gamma\sigma = 0`;
    for :math:`\gamma\sigma \le 1/2` the spectral radius is
    :math:`\sqrt{\bigl(1 + \sqrt{1 - 4\gamma^2\sigma^2}\bigr)/2} < 1`.

    Hyperparameters: :math:`\gamma` = ``lr`` (default 1e-3, see the module docstring); ``maximize``
    per group marks the maximizing players.

    State: ``prev_step`` (:math:`\gamma_{t-1} V(X_{t-1})`, one tensor in the parameter dtype) and
    ``step``.
    """

    state_names = ("prev_step",)
    kernel = staticmethod(optimistic_kernel)
