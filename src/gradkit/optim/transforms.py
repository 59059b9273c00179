r"""Gradient transforms usable with any optimizer.

They act on ``p.grad`` in place (or on where the gradient is taken) between ``backward()`` and
``optimizer.step()``::

    gf = Grokfast(model.parameters())             # slow-gradient amplification
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        gf.apply()                                # p.grad <- filtered gradient
        clip_grad_norm(model.parameters(), 1.0)   # or agc(model.parameters())
        opt.step()

* :class:`Grokfast` -- EMA / moving-average filters amplifying the slow gradient components
  (Lee et al. 2024);
* :class:`XGrad` -- the gradient is taken at the weights the optimizer predicts for the next step
  (Guan 2023);
* :func:`clip_grad_norm` -- global-norm clipping (= :func:`torch.nn.utils.clip_grad_norm_`);
* :func:`agc` -- unit-wise adaptive gradient clipping (Brock et al. 2021).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ._base import as_float, check_choice, check_range

__all__ = ["Grokfast", "XGrad", "clip_grad_norm", "agc", "unitwise_norm"]


def _as_list(params: Any, owner: str) -> list[torch.Tensor]:
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    if not all(isinstance(p, torch.Tensor) for p in params):
        kinds = sorted({type(p).__name__ for p in params if not isinstance(p, torch.Tensor)})
        raise TypeError(f"{owner}: params must be a tensor or an iterable of tensors; got elements of type {kinds}")
    return params


def _check_dense(owner: str, grad: torch.Tensor) -> None:
    if grad.is_sparse:
        raise TypeError(f"{owner} does not support sparse gradients; use dense gradients")


# ----------------------------------------------------------------------------------------------
# Grokfast
# ----------------------------------------------------------------------------------------------
class Grokfast:
    r"""Grokfast: amplify the slow (low-frequency) component of the gradient.

    Lee, Kang, Lee and Kim, "Grokfast: Accelerated Grokking by Amplifying Slow Gradients", 2024,
    arXiv:2405.20817.  With :math:`g_t` the gradient of a parameter, ``apply()`` replaces it by

    * ``filter="ema"`` (their Algorithm 2, Grokfast-EMA):
      :math:`\mu_t = \alpha\mu_{t-1} + (1-\alpha) g_t,\ \hat g_t = g_t + \lambda\mu_t`;
      defaults :math:`\alpha` = ``alpha`` = 0.98, :math:`\lambda` = ``lamb`` = 2 (the paper's).
      ``init="grad"`` (default, as the paper's code) starts the average at the first gradient,
      :math:`\mu_1 = g_1`, so a constant gradient gives :math:`\hat g_t = (1+\lambda)g` for every
      :math:`t`; ``init="zeros"`` starts at :math:`\mu_0 = 0`, giving
      :math:`\hat g_t = g\,(1 + \lambda(1-\alpha^t))`.
    * ``filter="ma"`` (their Algorithm 1, Grokfast-MA): the last ``window_size`` :math:`w` gradients
      (current one included) are kept and :math:`\hat g_t = g_t + \lambda\,\mathrm{avg}(g_{t-w+1..t})`,
      the average being the mean (``filter_type="mean"``) or the sum (``"sum"``); defaults
      :math:`w` = 100, :math:`\lambda` = 5 (the paper's).  With ``warmup=True`` (the paper's default)
      the gradient is left unfiltered until the window is full.

    Parameters without a gradient are skipped (their history does not advance).  State per
    parameter, in the gradient's dtype: ``ema`` (one tensor) or ``buffer`` (``w`` tensors, a ring
    buffer) with ``count``/``pos``.  :meth:`state_dict`/:meth:`load_state_dict` round-trip it.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | torch.Tensor,
        filter: str = "ema",
        *,
        alpha: float = 0.98,
        lamb: float | None = None,
        window_size: int = 100,
        filter_type: str = "mean",
        warmup: bool = True,
        init: str = "grad",
    ) -> None:
        owner = "Grokfast"
        self.params = _as_list(params, owner)
        check_choice(owner, "filter", filter, ("ema", "ma"))
        check_range(owner, "alpha", alpha, 0.0, 1.0, high_open=True)
        lamb = (2.0 if filter == "ema" else 5.0) if lamb is None else lamb
        check_range(owner, "lamb", lamb)
        if isinstance(window_size, bool) or not isinstance(window_size, numbers.Integral) or window_size < 1:
            raise ValueError(f"{owner}: invalid window_size={window_size!r}; expected an integer >= 1")
        check_choice(owner, "filter_type", filter_type, ("mean", "sum"))
        check_choice(owner, "warmup", warmup, (True, False))
        check_choice(owner, "init", init, ("grad", "zeros"))
        self.config = dict(filter=filter, alpha=float(alpha), lamb=float(lamb), window_size=window_size,
                           filter_type=filter_type, warmup=warmup, init=init)
        self.state: dict[int, dict[str, Any]] = {}

    @torch.no_grad()
    def apply(self) -> None:
        """Filter the gradients of the parameters in place."""
        live = [(i, p.grad) for i, p in enumerate(self.params) if p.grad is not None]
        for _, g in live:
            _check_dense("Grokfast", g)
        if self.config["filter"] == "ema":
            self._ema(live)
        else:
            self._ma(live)

    def _ema(self, live: list[tuple[int, torch.Tensor]]) -> None:
        alpha, lamb = self.config["alpha"], self.config["lamb"]
        emas, grads = [], []
        for i, g in live:
            st = self.state.setdefault(i, {})
            if "ema" not in st:
                st["ema"] = g.clone() if self.config["init"] == "grad" else torch.zeros_like(g)
                if self.config["init"] == "grad":
                    g.add_(st["ema"], alpha=lamb)
                    continue
            emas.append(st["ema"])
            grads.append(g)
        if grads:
            torch._foreach_lerp_(emas, grads, 1.0 - alpha)
            torch._foreach_add_(grads, emas, alpha=lamb)

    def _ma(self, live: list[tuple[int, torch.Tensor]]) -> None:
        w, lamb = self.config["window_size"], self.config["lamb"]
        for i, g in live:
            st = self.state.setdefault(i, {})
            if "buffer" not in st:
                st.update(buffer=g.new_zeros((w, *g.shape)), count=0, pos=0)
            buf = st["buffer"]
            buf[st["pos"]].copy_(g)
            st["pos"] = (st["pos"] + 1) % w
            st["count"] = min(st["count"] + 1, w)
            n = st["count"]
            if self.config["warmup"] and n < w:
                continue
            total = buf[:n].sum(0)
            g.add_(total / n if self.config["filter_type"] == "mean" else total, alpha=lamb)

    def state_dict(self) -> dict[str, Any]:
        """Configuration and per-parameter state (tensors are not copied; ``torch.save`` them)."""
        return {"config": dict(self.config), "state": {i: dict(st) for i, st in self.state.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; tensors are copied to the parameters' device and dtype."""
        if state_dict.get("config") != self.config:
            raise ValueError(f"Grokfast.load_state_dict: the saved configuration {state_dict.get('config')!r} "
                             f"differs from this one {self.config!r}")
        state: dict[int, dict[str, Any]] = {}
        for i, st in state_dict["state"].items():
            i = int(i)
            if not 0 <= i < len(self.params):
                raise ValueError(f"Grokfast.load_state_dict: state for parameter {i}, but there are "
                                 f"{len(self.params)} parameters")
            p = self.params[i]
            new = {}
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    shape = v.shape[1:] if k == "buffer" else v.shape
                    if shape != p.shape:
                        raise ValueError(f"Grokfast.load_state_dict: state {k!r} of parameter {i} has shape "
                                         f"{tuple(v.shape)}, parameter has shape {tuple(p.shape)}")
                    v = v.to(device=p.device, dtype=p.dtype, copy=True)
                new[k] = v
            state[i] = new
        self.state = state


# ----------------------------------------------------------------------------------------------
# XGrad
# ----------------------------------------------------------------------------------------------
Predictor = Callable[[torch.Tensor, dict[str, Any], dict[str, Any]], "torch.Tensor | None"]


class XGrad:
    r"""XGrad: take the gradient at the weights the optimizer predicts for ``steps`` steps ahead.

    Guan, Li, Shi and Meng, "XGrad: Boosting Gradient-Based Optimizers With Weight Prediction", 2023,
    arXiv:2305.18240.  Before the forward/backward pass the weights :math:`\theta_t` are replaced by

    .. math::
        \hat\theta_{t+s} = \theta_t - s\,\eta\,\Delta_t,

    where :math:`\eta` is the group's ``lr``, :math:`s` = ``steps`` and :math:`\Delta_t` the update
    direction of the optimizer computed from its current state (the newest gradient is not known
    yet); after the backward pass the weights are restored *exactly* (from a copy) and the
    optimizer steps from :math:`\theta_t` with the gradient taken at :math:`\hat\theta_{t+s}`.

    * :class:`torch.optim.SGD` with momentum :math:`\mu > 0`: :math:`\Delta_t = b_t`, the momentum
      buffer (``nesterov=True`` is refused: see below).
    * :class:`torch.optim.Adam` / :class:`~torch.optim.AdamW`:
      :math:`\Delta_t = \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)}+\epsilon}` (with the running
      max of :math:`v` when ``amsgrad``), plus :math:`\lambda\theta_t` for decoupled weight decay.
    * anything else: pass ``predictor(param, state, group) -> Δ or None``.

    A parameter without optimizer state (before its first step) is not moved.

    **Nesterov momentum.**  With SGD, momentum :math:`\mu`, dampening 0, no weight decay and a
    constant ``lr``, XGrad with ``steps = μ`` (not 1) *is* Nesterov's method in Sutskever's form:
    :math:`b_{t+1} = \mu b_t + \nabla f(\theta_t - \eta\mu b_t),\ \theta_{t+1} = \theta_t - \eta b_{t+1}`.
    ``torch.optim.SGD(nesterov=True)`` iterates the look-ahead point instead:
    :math:`p_t = \theta_t - \eta\mu b_t` satisfies
    :math:`p_{t+1} = p_t - \eta(\nabla f(p_t) + \mu b_{t+1})`, torch's Nesterov update, with the same
    buffers :math:`b_t`.  So torch's Nesterov parameters equal XGrad's *predicted* weights
    (``steps = μ``), and the momentum buffers agree.  With ``steps = 1`` the gradient is taken a full
    momentum step :math:`\eta b_t` ahead, which is Nesterov's method only for :math:`\mu = 1`.

    Usage::

        xg = XGrad(opt, steps=1)
        opt.zero_grad()
        with xg.predicted():              # weights at the prediction
            loss_fn(model(x), y).backward()
        opt.step()                        # weights restored before the step
        # or: loss = xg.step(closure)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, steps: float = 1.0,
                 predictor: Predictor | None = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"XGrad: optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        check_range("XGrad", "steps", steps, 0.0)
        if predictor is None:
            if isinstance(optimizer, torch.optim.SGD):
                for g in optimizer.param_groups:
                    if g["nesterov"]:
                        raise ValueError("XGrad: invalid SGD nesterov=True; expected nesterov=False (XGrad with "
                                         "steps=momentum already is Nesterov momentum)")
                    if not g["momentum"] > 0:
                        raise ValueError(f"XGrad: invalid SGD momentum={g['momentum']!r}; expected momentum > 0 "
                                         "(plain SGD keeps no state to predict from)")
                predictor = _sgd_direction
            elif isinstance(optimizer, torch.optim.Adam):
                decoupled = isinstance(optimizer, torch.optim.AdamW)
                predictor = functools.partial(_adam_direction, decoupled_default=decoupled)
            else:
                raise TypeError(f"XGrad: no built-in weight prediction for {type(optimizer).__name__}; expected "
                                "torch.optim.SGD (momentum), Adam or AdamW, or pass predictor=")
        self.optimizer = optimizer
        self.steps = float(steps)
        self.predictor = predictor
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @torch.no_grad()
    def predict_(self) -> None:
        """Move the weights to the prediction (keeping copies of the current weights)."""
        if self._saved is not None:
            raise RuntimeError("XGrad: the weights are already at the prediction; call restore_() first")
        saved = []
        for group in self.optimizer.param_groups:
            scale = self.steps * as_float(group["lr"])
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                if not state:
                    continue
                direction = self.predictor(p, state, group)
                if direction is None:
                    continue
                saved.append((p, p.detach().clone()))
                p.add_(direction.to(p.dtype), alpha=-scale)
        self._saved = saved

    @torch.no_grad()
    def restore_(self) -> None:
        """Put back the weights saved by :meth:`predict_` (bit for bit)."""
        if self._saved is None:
            raise RuntimeError("XGrad.restore_(): nothing to restore; call predict_() first")
        for p, copy in self._saved:
            p.copy_(copy)
        self._saved = None

    @contextmanager
    def predicted(self) -> Iterator[None]:
        """Context in which the weights are at the prediction; restored on exit (also on error)."""
        self.predict_()
        try:
            yield
        finally:
            self.restore_()

    def step(self, closure: Callable[[], Any]) -> Any:
        """Evaluate ``closure`` (zero grads, forward, backward) at the prediction, restore, step; return its loss."""
        with self.predicted(), torch.enable_grad():
            loss = closure()
        self.optimizer.step()
        return loss


def _sgd_direction(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor | None:
    return state.get("momentum_buffer")


def _adam_direction(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], *,
                    decoupled_default: bool = False) -> torch.Tensor | None:
    if "exp_avg" not in state:
        return None
    t = as_float(state["step"])
    b1, b2 = (as_float(b) for b in group["betas"])
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    d = (state["exp_avg"] / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["eps"])
    if group.get("decoupled_weight_decay", decoupled_default) and group["weight_decay"]:
        d = d + group["weight_decay"] * p
    return d


# ----------------------------------------------------------------------------------------------
# clipping
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def clip_grad_norm(
    params: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    r"""Global-norm gradient clipping; returns the norm *before* clipping.

    With :math:`G = \|(\|g_1\|_p, \dots, \|g_n\|_p)\|_p` the norm of all gradients seen as one vector,
    every gradient is scaled in place by :math:`\min(1, c/(G + 10^{-6}))`, :math:`c` = ``max_norm``,
    :math:`p` = ``norm_type`` (``math.inf`` for the max norm) -- the same numbers as
    :func:`torch.nn.utils.clip_grad_norm_` (the :math:`10^{-6}` is torch's).  With
    ``error_if_nonfinite=True`` a non-finite :math:`G` raises ``RuntimeError`` and the gradients are
    left untouched; otherwise (torch's default) they are scaled by the non-finite factor.
    ``foreach`` (default: on) computes the norms and the scaling with one fused call per
    device and dtype; ``False`` loops over tensors.
    """
    owner = "clip_grad_norm"
    check_range(owner, "max_norm", max_norm, 0.0, high_open=False)  # inf: no clipping, as in torch
    check_range(owner, "norm_type", norm_type, 0.0, low_open=True, high_open=False)  # inf: the max norm
    check_choice(owner, "foreach", foreach, (None, True, False))
    grads = [p.grad for p in _as_list(params, owner) if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    for g in grads:
        _check_dense(owner, g)
    norm_type = float(norm_type)
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        buckets.setdefault((g.device, g.dtype), []).append(g)
    norms: list[torch.Tensor] = []
    for bucket in buckets.values():
        if foreach is False:
            norms += [torch.linalg.vector_norm(g, norm_type) for g in bucket]
        else:
            norms += torch._foreach_norm(bucket, norm_type)
    device = grads[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"clip_grad_norm: the total gradient norm (order {norm_type}) is {total.item()}; "
                           "refusing to clip (error_if_nonfinite=True)")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for (dev, _), bucket in buckets.items():
        c = coef.to(dev)
        if foreach is False:
            for g in bucket:
                g.mul_(c)
        else:
            torch._foreach_mul_(bucket, c)
    return total


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Norms of the units of a weight (Brock et al. 2021): per output row/filter, i.e. over all
    dimensions but the first, for ``x.ndim >= 2`` (kept as size-1 dims); the whole tensor's norm
    for scalars and vectors (biases, gains)."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def agc(params: Iterable[torch.Tensor] | torch.Tensor, clipping: float = 0.01, eps: float = 1e-3) -> None:
    r"""Adaptive gradient clipping, unit-wise, in place.

    Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition Without
    Normalization", ICML 2021, arXiv:2102.06171, eq. (3): for every unit :math:`i` (output row of a
    linear weight, output filter of a convolution -- :func:`unitwise_norm`),

    .. math::
        G_i \leftarrow \begin{cases} \lambda\,\frac{\max(\|W_i\|_F, \epsilon)}{\|G_i\|_F}\,G_i
        & \text{if } \frac{\|G_i\|_F}{\max(\|W_i\|_F, \epsilon)} > \lambda \\ G_i & \text{otherwise,}\end{cases}

    :math:`\lambda` = ``clipping`` (default 0.01, the paper's value for large batches),
    :math:`\epsilon` = ``eps`` (default 1e-3, the paper's); the gradient norm in the denominator is
    floored at 1e-6 as in the paper's pseudo-code.  Vectors and scalars (biases, gains) form one
    unit, as in the authors' code.  The paper does not clip the final linear layer: leave it out of
    ``params``.
    """
    owner = "agc"
    check_range(owner, "clipping", clipping, 0.0, low_open=True, high_open=False)  # inf: no clipping
    check_range(owner, "eps", eps, 0.0)
    for p in _as_list(params, owner):
        g = p.grad
        if g is None:
            continue
        _check_dense(owner, g)
        max_norm = unitwise_norm(p).clamp_min(eps) * clipping
        g_norm = unitwise_norm(g)
        scale = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), torch.ones_like(g_norm))
        g.mul_(scale.to(g.dtype))

