"""Training controllers driven by gradient statistics: adaptive batch size and per-matrix freezing.

* :class:`AdAdaGrad` -- the adaptive batch size schemes of Lau, Liu, Kolar (2024), "AdAdaGrad:
  Adaptive Batch Size Schemes for Adaptive Gradient Methods" (arXiv:2402.11215): grow the batch
  when the sampling noise of the mini-batch gradient, estimated from per-sample gradients, is
  large relative to the gradient (norm test; (augmented) inner-product test).
  :func:`gradient_noise` computes the statistics of those tests.
* :class:`GradES` -- Wen et al. (2025), "GradES: Significantly Faster Training in Transformers with
  Gradient-Based Early Stopping" (arXiv:2509.01842): freeze each weight matrix once its gradient
  (or update) magnitude falls below a threshold after a grace period; stop when all are frozen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from gradkit.core import per_sample_grads as _per_sample_grads
from gradkit.optim._base import check_choice, check_int, check_range, opmath_dtype

logger = logging.getLogger("gradkit")

__all__ = ["GradientNoise", "gradient_noise", "AdAdaGrad", "GradES"]



# ----------------------------------------------------------------------------------------------
# AdAdaGrad: adaptive batch sizes from per-sample gradients
# ----------------------------------------------------------------------------------------------
class GradientNoise(NamedTuple):
    """Sample statistics of ``b`` per-sample gradients ``g_i`` and their mean ``ḡ`` (Python floats).

    ``batch_size`` b; ``grad_sq_norm`` ‖ḡ‖²; ``variance`` (1/(b−1)) Σ_i ‖g_i − ḡ‖² (the trace of the
    sample covariance); ``inner_product_variance`` the sample variance of ⟨g_i, ḡ⟩;
    ``orthogonal_variance`` (1/(b−1)) Σ_i ‖g_i − (⟨g_i, ḡ⟩/‖ḡ‖²) ḡ‖² (``variance`` when ḡ = 0:
    every g_i is then orthogonal to ḡ).
    """

    batch_size: int
    grad_sq_norm: float
    variance: float
    inner_product_variance: float
    orthogonal_variance: float


def _grad_list(owner: str, per_sample_grads: Any) -> list[Tensor]:
    if isinstance(per_sample_grads, Tensor):
        grads = [per_sample_grads]
    elif isinstance(per_sample_grads, Mapping):
        grads = list(per_sample_grads.values())
    elif isinstance(per_sample_grads, Sequence) and not isinstance(per_sample_grads, (str, bytes)):
        grads = list(per_sample_grads)
    else:
        raise TypeError(
            f"{owner}: per_sample_grads must be a tensor (b, ...), a list of such tensors or a dict of them "
            f"(as returned by gradkit.core.per_sample_grads), got {type(per_sample_grads).__name__}"
        )
    if not grads:
        raise ValueError(f"{owner}: per_sample_grads is empty")
    for i, g in enumerate(grads):
        if not isinstance(g, Tensor):
            raise TypeError(f"{owner}: per_sample_grads entry {i} is a {type(g).__name__}, expected a tensor")
        if not g.is_floating_point():
            raise TypeError(f"{owner}: per_sample_grads entry {i} has dtype {g.dtype}; expected a real floating dtype")
        if g.ndim < 1:
            raise ValueError(f"{owner}: per_sample_grads entry {i} is 0-dim; expected a leading batch dimension")
    b = grads[0].shape[0]
    if any(g.shape[0] != b for g in grads):
        raise ValueError(
            f"{owner}: per_sample_grads disagree on the batch size: {[int(g.shape[0]) for g in grads]}"
        )
    if b < 2:
        raise ValueError(f"{owner}: the tests need at least 2 per-sample gradients (a sample variance), got {b}")
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        raise ValueError(f"{owner}: per_sample_grads contain non-finite values (nan or inf)")
    return grads


@torch.no_grad()
def gradient_noise(per_sample_grads: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> GradientNoise:
    """Statistics of the norm and (augmented) inner-product tests from per-sample gradients.

    For per-sample gradients ``g_1..g_b`` (each the concatenation of all parameter tensors) and
    ``ḡ = (1/b) Σ g_i``, returns ``‖ḡ‖²``, the sample variance ``(1/(b−1)) Σ ‖g_i − ḡ‖²`` (norm
    test of Byrd, Chin, Nocedal, Wu 2012, used by Lau, Liu, Kolar 2024, arXiv:2402.11215), the
    sample variance of ``⟨g_i, ḡ⟩`` and the mean squared component of ``g_i`` orthogonal to ``ḡ``
    (inner-product and orthogonality tests of Bollapragada, Byrd, Nocedal 2018).

    Args:
        per_sample_grads: a tensor ``(b, ...)``, a list of them or a dict of them (as returned by
            :func:`gradkit.core.per_sample_grads`), all with the same leading ``b >= 2``.

    Arithmetic is in the gradients' dtype (float32 for 16-bit floats); results are Python floats.
    """
    grads = _grad_list("gradient_noise", per_sample_grads)
    b = grads[0].shape[0]
    flat = [g.reshape(b, -1).to(opmath_dtype(g.dtype)) for g in grads]
    means = [f.mean(0) for f in flat]
    sq_norm = sum(float(m.square().sum()) for m in means)
    variance = sum(float((f - m).square().sum()) for f, m in zip(flat, means)) / (b - 1)
    inner = sum((f @ m).double().cpu() for f, m in zip(flat, means))  # ⟨g_i, ḡ⟩, shape (b,)
    ip_variance = float(inner.var(correction=1))
    if sq_norm > 0:
        coef = [(inner / sq_norm).to(f.device, f.dtype) for f in flat]
        orth = sum(float((f - c[:, None] * m).square().sum()) for f, m, c in zip(flat, means, coef)) / (b - 1)
    else:
        orth = variance
    return GradientNoise(int(b), sq_norm, variance, ip_variance, orth)


def _ratio(num: float, den: float) -> float:
    if num == 0.0:
        return 0.0  # no noise: any batch size passes
    return math.inf if den == 0.0 else num / den


class AdAdaGrad:
    """Adaptive (non-decreasing) batch size from the norm test on per-sample gradients.

    Lau, Liu, Kolar (2024), "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient
    Methods", arXiv:2402.11215: the model is trained with AdaGrad / AdaGrad-Norm (or Adam, any
    optimizer) and the batch size ``b_k`` of step ``k`` is increased when the approximate norm
    test (Byrd, Chin, Nocedal, Wu 2012) on the batch ``B_k`` fails::

        (1/(b_k − 1)) Σ_{i∈B_k} ‖∇f_i − ∇f_B‖² / b_k  >  η² ‖∇f_B‖²
        b_{k+1} = ⌈ (1/(b_k − 1)) Σ_i ‖∇f_i − ∇f_B‖² / (η² ‖∇f_B‖²) ⌉        (else b_{k+1} = b_k)

    capped at ``max_batch_size``; so ``b_{k+1} = min(b_max, max(b_k, ⌈V/(η²‖∇f_B‖²)⌉))``, never
    smaller than ``b_k``.  ``test="inner_product"`` uses the inner-product test
    ``⌈Var_i⟨∇f_i, ∇f_B⟩ / (θ² ‖∇f_B‖⁴)⌉`` and ``test="augmented"`` the augmented inner-product
    test, the max of that and the orthogonality test ``⌈(1/(b−1)) Σ‖∇f_i − proj∇f_i‖² /
    (ν² ‖∇f_B‖²)⌉`` (Bollapragada, Byrd, Nocedal 2018; the paper's other scheme).  The statistics
    are estimated from whatever per-sample gradients are given (the batch, or a sub-sample of it
    as in the reference code's ``max_test_micro_batch_size``); the required batch size they
    estimate does not depend on that sample's size.

    Args:
        batch_size: initial batch size ``b_0`` (>= 1).
        max_batch_size: cap ``b_max`` (e.g. the dataset size), >= ``batch_size``.
        eta: η > 0 of the norm test.  Default 0.1, the value of the reference code's MNIST runs
            (the paper tunes η per task: 0.1 on MNIST, 0.25-0.5 on CIFAR).
        test: ``"norm"`` (default, the AdAdaGrad scheme), ``"inner_product"`` or ``"augmented"``.
        theta, nu: θ > 0 and ν > 0 of the inner-product and orthogonality tests; defaults 0.9 and
            tan(80°) ≈ 5.84 from Bollapragada, Byrd, Nocedal (2018).

    State (in :meth:`state_dict`): the current ``batch_size``, the number of updates and the last
    test statistics (:attr:`last`, a :class:`GradientNoise`).  A gradient ``∇f_B = 0`` with noise
    asks for an infinite batch (capped at ``max_batch_size``); zero noise never grows the batch.
    """

    TESTS = ("norm", "inner_product", "augmented")

    def __init__(
        self,
        batch_size: int,
        max_batch_size: int,
        *,
        eta: float = 0.1,
        test: str = "norm",
        theta: float = 0.9,
        nu: float = math.tan(math.radians(80.0)),
    ) -> None:
        owner = "AdAdaGrad"
        check_int(owner, "batch_size", batch_size, 1)
        check_int(owner, "max_batch_size", max_batch_size, batch_size)
        check_range(owner, "eta", eta, 0.0, math.inf, low_open=True)
        check_range(owner, "theta", theta, 0.0, math.inf, low_open=True)
        check_range(owner, "nu", nu, 0.0, math.inf, low_open=True)
        check_choice(owner, "test", test, self.TESTS)
        self.max_batch_size = max_batch_size
        self.eta, self.theta, self.nu = float(eta), float(theta), float(nu)
        self.test = test
        self.batch_size = batch_size
        self.num_updates = 0
        self.last: GradientNoise | None = None

    def required_batch_size(self, noise: GradientNoise) -> float:
        """The (real, un-rounded) batch size the configured test asks for, from :func:`gradient_noise`
        (infinite for ``∇f_B = 0`` with noise, whichever the test: its inner products then vanish too)."""
        norm_sq = noise.grad_sq_norm
        if norm_sq == 0.0:
            return math.inf if noise.variance > 0.0 else 0.0
        if self.test == "norm":
            return _ratio(noise.variance, self.eta**2 * norm_sq)
        ip = _ratio(noise.inner_product_variance, self.theta**2 * norm_sq**2)
        if self.test == "inner_product":
            return ip
        return max(ip, _ratio(noise.orthogonal_variance, self.nu**2 * norm_sq))

    def update(
        self,
        per_sample_grads: Tensor | Sequence[Tensor] | Mapping[str, Tensor] | None = None,
        *,
        model: nn.Module | None = None,
        loss_fn: nn.Module | None = None,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
        params: Iterable[Tensor] | None = None,
        allow_train_mode: bool = False,
    ) -> int:
        """Run the test on this step's per-sample gradients and return the next batch size.

        Give either ``per_sample_grads`` (tensor ``(b, ...)``, list or dict of them) or
        ``model``, ``loss_fn``, ``inputs`` and ``targets`` (then the per-sample gradients of the
        model's parameters, or of ``params``, are computed by :func:`gradkit.core.per_sample_grads`).
        """
        owner = "AdAdaGrad.update"
        model_args = (model, loss_fn, inputs, targets)
        if per_sample_grads is not None:
            if any(a is not None for a in model_args) or params is not None:
                raise ValueError(f"{owner}: give either per_sample_grads or model/loss_fn/inputs/targets, not both")
        else:
            if any(a is None for a in model_args):
                missing = [n for n, a in zip(("model", "loss_fn", "inputs", "targets"), model_args) if a is None]
                raise ValueError(
                    f"{owner}: without per_sample_grads, model, loss_fn, inputs and targets are all required "
                    f"(missing: {', '.join(missing)})"
                )
            if not isinstance(model, nn.Module):
                raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
            per_sample_grads = _per_sample_grads(
                model, loss_fn, inputs, targets, params=params, allow_train_mode=allow_train_mode
            )
        noise = gradient_noise(per_sample_grads)
        required = self.required_batch_size(noise)
        new = self.max_batch_size if required >= self.max_batch_size else max(self.batch_size, math.ceil(required))
        new = min(new, self.max_batch_size)
        if new > self.batch_size:
            logger.info("AdAdaGrad: %s test failed; batch size %d -> %d", self.test, self.batch_size, new)
        self.batch_size = new
        self.num_updates += 1
        self.last = noise
        return new

    def state_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_updates": self.num_updates,
            "last": None if self.last is None else tuple(self.last),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "batch_size" not in state:
            raise ValueError("AdAdaGrad.load_state_dict: expected a dict from AdAdaGrad.state_dict()")
        check_int("AdAdaGrad.load_state_dict", "batch_size", state["batch_size"], 1)
        if state["batch_size"] > self.max_batch_size:
            raise ValueError(
                f"AdAdaGrad.load_state_dict: batch_size={state['batch_size']} exceeds max_batch_size={self.max_batch_size}"
            )
        self.batch_size = state["batch_size"]
        self.num_updates = int(state.get("num_updates", 0))
        last = state.get("last")
        self.last = None if last is None else GradientNoise(*last)


# ----------------------------------------------------------------------------------------------
# GradES: freeze converged weight matrices
# ----------------------------------------------------------------------------------------------
def _named_monitored(owner: str, params: Any) -> dict[str, Tensor]:
    if isinstance(params, nn.Module):
        named = {n: p for n, p in params.named_parameters() if p.requires_grad and p.ndim >= 2}
        if not named:
            raise ValueError(f"{owner}: the module has no trainable weight matrix (parameter with ndim >= 2) to monitor")
        return named
    if isinstance(params, Tensor):
        items: list[tuple[str, Any]] = [("0", params)]
    elif isinstance(params, Mapping):
        items = [(str(k), v) for k, v in params.items()]
    elif isinstance(params, Iterable) and not isinstance(params, (str, bytes)):
        items = []
        for i, entry in enumerate(params):
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
                items.append(entry)
            else:
                items.append((str(i), entry))
    else:
        raise TypeError(
            f"{owner}: params must be an nn.Module, a dict name -> parameter, or an iterable of parameters "
            f"or (name, parameter) pairs; got {type(params).__name__}"
        )
    if not items:
        raise ValueError(f"{owner}: params is empty; expected at least one parameter to monitor")
    named: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, p in items:
        if not isinstance(p, Tensor):
            raise TypeError(f"{owner}: parameter {name!r} is a {type(p).__name__}, expected a tensor")
        if not (p.is_leaf and p.requires_grad):
            raise ValueError(f"{owner}: parameter {name!r} must be a leaf tensor with requires_grad=True")
        if name in named or id(p) in seen:
            raise ValueError(f"{owner}: parameter {name!r} is given twice")
        named[name] = p
        seen.add(id(p))
    return named


class GradES:
    """Freeze each weight matrix once its gradient magnitude falls below τ after a grace period.

    Wen, Zeng, Zhou, Liu, Hosseinzadeh, Su, Rawassizadeh (2025), "GradES: Significantly Faster
    Training in Transformers with Gradient-Based Early Stopping", arXiv:2509.01842.  At every step
    ``t`` (1-based count of :meth:`step` calls) each monitored, not yet frozen matrix ``W`` gets a
    statistic ``G_t(W)``:

    * ``statistic="grad"`` (default; the paper's v1 criterion): the element-wise ℓ1 norm of its
      gradient, ``‖∇_W L_t‖₁ = Σ_ij |∂L/∂W_ij|``;
    * ``statistic="update"`` (the criterion of the paper's later revision and of its reference code,
      "magnitude of gradient changes"): the ℓ1 norm of the change of ``W`` since the previous
      call, ``‖W_t − W_{t−1}‖₁`` (none at the first call);

    with ``reduction="mean"`` dividing by the number of elements (a per-element τ, comparable
    across matrix sizes; not in the paper).  ``W`` is frozen when ``G_t(W) < τ`` at ``patience``
    consecutive calls after the grace period, i.e. with ``t > ⌊α·T⌋`` (the reference code allows
    freezing once ``⌊α·T⌋`` optimizer steps are complete).  ``patience=1`` is the paper (freeze at
    the first such step).  The reference code (IXZZZ9/GradES ``grades/gradient_early_stopping.py``,
    commit fe06b6d; ``statistic="update"``, sum reduction, τ 1e-4, α 0.3) monitors only the
    attention and MLP projections of a transformer, each module with its bias; here every matrix
    given is monitored on its own (a module: each trainable parameter with two or more
    dimensions), so pass those projection weights to match it.  :attr:`stop` becomes True once every monitored matrix is frozen
    (the paper then ends training).

    Freezing (as in the paper's code) sets ``requires_grad_(False)`` on the matrix — backward no
    longer computes its gradient — and additionally sets its ``.grad`` to None: every
    ``torch.optim`` and gradkit optimizer skips a parameter without gradient, so neither momentum
    nor (decoupled) weight decay moves it again.  (Zeroing the gradient alone would not do: SGD
    momentum and AdamW's weight decay would keep changing the weight.)

    Usage: call :meth:`step` every iteration after ``loss.backward()`` and before
    ``optimizer.step()``::

        controller = GradES(model, total_steps=T, tau=1e-3)
        for batch in loader:
            loss = ...; loss.backward()
            controller.step()
            optimizer.step(); optimizer.zero_grad()
            if controller.stop:
                break

    Args:
        params: an ``nn.Module`` (monitors every trainable parameter with ``ndim >= 2``, the weight
            matrices; biases and norm gains keep training), or a dict name -> parameter, or an
            iterable of parameters or (name, parameter) pairs (names default to the position).
        total_steps: T, the planned number of training steps.
        tau: τ > 0, the convergence threshold (task dependent; no default — the paper's reference
            code uses values from 1e-5 to 0.023 depending on the model).
        alpha: α in [0, 1), the grace period as a fraction of T.  Default 0.3, the default of the
            paper's reference code (``GradEarlyStoppingConfig``).
        statistic: ``"grad"`` or ``"update"`` (see above).
        reduction: ``"sum"`` (the paper's ℓ1 norm) or ``"mean"``.
        patience: number of consecutive below-τ calls needed (>= 1; 1 = the paper).

    State (in :meth:`state_dict`): the step count, the step at which each matrix was frozen, the
    consecutive-below-τ counters, the last statistics and, for ``"update"``, a copy of each active
    matrix from the previous call.
    """

    STATISTICS = ("grad", "update")
    REDUCTIONS = ("sum", "mean")

    def __init__(
        self,
        params: nn.Module | Mapping[str, Tensor] | Iterable[Any],
        total_steps: int,
        *,
        tau: float,
        alpha: float = 0.3,
        statistic: str = "grad",
        reduction: str = "sum",
        patience: int = 1,
    ) -> None:
        owner = "GradES"
        check_int(owner, "total_steps", total_steps, 1)
        check_range(owner, "tau", tau, 0.0, math.inf, low_open=True)
        check_range(owner, "alpha", alpha, 0.0, 1.0, high_open=True)
        check_choice(owner, "statistic", statistic, self.STATISTICS)
        check_choice(owner, "reduction", reduction, self.REDUCTIONS)
        check_int(owner, "patience", patience, 1)
        self.params = _named_monitored(owner, params)
        self.total_steps = total_steps
        self.tau, self.alpha = float(tau), float(alpha)
        self.statistic, self.reduction, self.patience = statistic, reduction, patience
        self.grace_steps = int(self.alpha * total_steps)
        self.num_steps = 0
        self.frozen: dict[str, int] = {}  # name -> step at which it was frozen
        self.below: dict[str, int] = dict.fromkeys(self.params, 0)
        self.last: dict[str, float] = {}
        self._previous: dict[str, Tensor] = {}

    @property
    def stop(self) -> bool:
        """True once every monitored matrix is frozen."""
        return len(self.frozen) == len(self.params)

    def _measure(self, name: str, p: Tensor) -> float | None:
        if self.statistic == "grad":
            if p.grad is None:
                return None
            value = p.grad.detach().abs().sum(dtype=opmath_dtype(p.dtype))
        else:
            previous = self._previous.get(name)
            self._previous[name] = p.detach().clone()
            if previous is None:
                return None
            value = (p.detach() - previous).abs().sum(dtype=opmath_dtype(p.dtype))
        value = float(value)
        return value / p.numel() if self.reduction == "mean" else value

    @torch.no_grad()
    def step(self) -> bool:
        """Measure every active matrix, freeze those that converged; returns :attr:`stop`."""
        self.num_steps += 1
        t = self.num_steps
        for name, p in self.params.items():
            if name in self.frozen:
                continue
            value = self._measure(name, p)
            if value is None:
                continue
            if not math.isfinite(value):
                raise ValueError(f"GradES.step: the {self.statistic} statistic of {name!r} is {value} at step {t}")
            self.last[name] = value
            if t <= self.grace_steps:
                continue
            self.below[name] = self.below[name] + 1 if value < self.tau else 0
            if self.below[name] >= self.patience:
                self._freeze(name, t)
        if self.stop:
            logger.info("GradES: all %d monitored matrices frozen at step %d", len(self.params), t)
        return self.stop

    def _freeze(self, name: str, t: int) -> None:
        p = self.params[name]
        p.requires_grad_(False)
        p.grad = None
        self.frozen[name] = t
        self._previous.pop(name, None)
        logger.info("GradES: froze %s at step %d (%s statistic %.3g < tau %.3g)",
                    name, t, self.statistic, self.last[name], self.tau)

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_steps": self.num_steps,
            "frozen": dict(self.frozen),
            "below": dict(self.below),
            "last": dict(self.last),
            "previous": {k: v.clone() for k, v in self._previous.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters and the frozen set of ``state``: its matrices are frozen, and a
        matrix this controller froze that ``state`` has active (a rollback to an earlier
        checkpoint) trains again."""
        if not isinstance(state, dict) or "frozen" not in state:
            raise ValueError("GradES.load_state_dict: expected a dict from GradES.state_dict()")
        unknown = (set(state["frozen"]) | set(state.get("below", {})) | set(state.get("last", {}))
                   | set(state.get("previous", {}))) - set(self.params)
        if unknown:
            raise ValueError(
                f"GradES.load_state_dict: the state names parameters this controller does not monitor: {sorted(unknown)}"
            )
        self.num_steps = int(state["num_steps"])
        self.below = dict.fromkeys(self.params, 0) | {k: int(v) for k, v in state.get("below", {}).items()}
        self.last = {k: float(v) for k, v in state.get("last", {}).items()}
        self._previous = {k: v.to(self.params[k].device, self.params[k].dtype).clone()
                          for k, v in state.get("previous", {}).items()}
        for name in set(self.frozen) - set(state["frozen"]):
            self.params[name].requires_grad_(True)
        self.frozen = {}
        for name, t in state["frozen"].items():
            p = self.params[name]
            p.requires_grad_(False)
            p.grad = None
            self.frozen[name] = int(t)
