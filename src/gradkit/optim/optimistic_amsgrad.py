"""Optimistic-AMSGrad: AMSGrad plus a step along a predicted next gradient (Wang, Li and Li, 2019)."""

from __future__ import annotations

import itertools
import math
import numbers
import operator
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ._base import PACK_NUMEL, Optimizer, as_float, check_adam_group, check_bool, check_range

__all__ = ["OptimisticAMSGrad", "optimistic_amsgrad_kernel", "extrapolation_weights"]

#: ``predictor(param, base, scale) -> m``: the next point is ``base - scale * m`` (see the class docstring).
Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def optimistic_amsgrad_kernel(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, half_param, prediction, *history,
                              h, maximize: bool, predictor: Predictor | None = None) -> None:
    """Reference Optimistic-AMSGrad step.

    ``h = [lr, beta1, beta2, eps, weight_decay, w_0, ..., w_{span-1}]``; ``prediction`` holds
    :math:`m_t`, the previous step's prediction of this step's gradient (zeros before the first
    step), and receives :math:`m_{t+1}`; ``history`` is ``last_grad, diff_0, ..`` and the new
    prediction is ``sum_k w_k history[k]`` (no history: the current gradient; ``predictor``: the
    callable's answer).
    """
    lr, beta1, beta2, eps, wd = (h[i] for i in range(5))
    g = grad.to(h.dtype)
    if maximize:
        g = -g
    m_prev = exp_avg.to(h.dtype)  # theta_{t-1}
    m = beta1 * m_prev + (1 - beta1) * g
    err = g - prediction.to(h.dtype)  # g_t - m_t
    v = exp_avg_sq.to(h.dtype) * beta2 + (1 - beta2) * err * err
    v_max = torch.maximum(max_exp_avg_sq.to(h.dtype), v)
    denom = v_max.sqrt() + eps
    half = half_param.to(h.dtype) * (1 - lr * wd) - lr * m / denom  # w_{t+1/2}
    base = half - (lr * beta1) * m_prev / denom
    scale = lr * (1 - beta1) / denom  # w_{t+1} = base - scale * prediction
    if predictor is not None:
        pred = predictor(param, base, scale).to(h.dtype)
        pred = -pred if maximize else pred
    elif history:
        pred = h[5] * history[0].to(h.dtype)
        for k in range(1, len(history)):
            pred = pred + h[5 + k] * history[k].to(h.dtype)
        pred = -pred if maximize else pred
    else:
        pred = g
    param.copy_(base - scale * pred)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    max_exp_avg_sq.copy_(v_max)
    half_param.copy_(half)
    prediction.copy_(pred)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the 1-D float32/float64 vector its dot products are taken on (real view of a complex
    tensor; 16-bit tensors are converted to float32)."""
    x = (torch.view_as_real(x) if x.is_complex() else x).reshape(-1)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def extrapolation_weights(gram: torch.Tensor, reg: float) -> torch.Tensor:
    r"""Weights of the regularised minimal polynomial extrapolation (RMPE) of Scieur, d'Aspremont
    and Bach (2016, arXiv:1606.04133), from the Gram matrix :math:`U^\top U` of the differences
    :math:`U = [x_1 - x_0, \ldots, x_{k+1} - x_k]` of a sequence :math:`x_0, \ldots, x_{k+1}`:

    .. math::
        (U^\top U + \lambda\,\|U^\top U\|_2\, I)\, z = \mathbf 1, \qquad c = z / \mathbf 1^\top z,

    so that :math:`\sum_{i=0}^{k} c_i x_i` estimates the limit of the sequence.  The regulariser
    is relative to :math:`\|U^\top U\|_2` (Scieur et al.'s normalisation), which makes :math:`c`
    invariant to the scale of the sequence; a zero Gram matrix (constant sequence) gives equal
    weights.  Computed in float64.
    """
    gram = gram.to(torch.float64)
    k = gram.shape[0]
    size = torch.linalg.eigvalsh(gram)[-1].item() if k else 0.0  # ||U^T U||_2 (symmetric PSD)
    lam = reg * size if size > 0 else 1.0
    z = torch.linalg.solve(gram + lam * torch.eye(k, dtype=torch.float64, device=gram.device),
                           torch.ones(k, dtype=torch.float64, device=gram.device))
    return z / z.sum()


class OptimisticAMSGrad(Optimizer):
    r"""Optimistic-AMSGrad: AMSGrad with an extra step along a predicted next gradient.

    Wang, Li and Li, "Optimistic Adaptive Acceleration for Optimization", 2019, arXiv:1903.01435
    (Algorithm 2; later versions with Karimi, "An Optimistic Acceleration of AMSGrad for Nonconvex
    Optimization").  With :math:`g_t` the gradient at :math:`w_t` (the parameter):

    .. math::
        \theta_t &= \beta_1\theta_{t-1} + (1-\beta_1) g_t, \qquad
            v_t = \beta_2 v_{t-1} + (1-\beta_2) (g_t - m_t)^2, \qquad \hat v_t = \max(\hat v_{t-1}, v_t) \\
        w_{t+\frac12} &= w_{t-\frac12}(1-\eta\lambda) - \eta\,\frac{\theta_t}{\sqrt{\hat v_t}+\epsilon} \\
        w_{t+1} &= w_{t+\frac12} - \eta\,\frac{h_{t+1}}{\sqrt{\hat v_t}+\epsilon}, \qquad
            h_{t+1} = \beta_1\theta_{t-1} + (1-\beta_1)\, m_{t+1}

    where :math:`m_{t+1}` is the prediction of :math:`g_{t+1}`, :math:`m_1 = 0` and
    :math:`w_{-\frac12} = w_1` (the initial parameter).  :math:`h_{t+1}` uses :math:`\theta_{t-1}`,
    as written in the paper.  The second moment is that of the *prediction errors*
    :math:`g_t - m_t` (the quantity the paper's regret bound depends on; the authors' code,
    ``Optadam_torch.py`` of github.com/Hintonthu/optimistic-amsgrad, forms it as
    ``prev_predict_grad - grad``): the better the predictions, the smaller :math:`v_t`, while the
    running maximum :math:`\hat v_t` keeps the denominators from shrinking.  With
    :math:`m \equiv 0` (a ``predictor`` returning zeros) the half iterate :math:`w_{t+\frac12}` is
    plain AMSGrad driven by gradients taken at the optimistic points :math:`w_t` (exactly
    :class:`~gradkit.optim.AMSGrad`'s iterates when the gradients do not depend on the point), and
    with :math:`\beta_1 = 0` as well the parameter itself follows AMSGrad.  The paper's
    projections :math:`\Pi_{\mathcal K}` are left to the caller (project the parameter and
    ``state["half_param"]``).

    **Prediction** (the paper's gradient extrapolation): :math:`m_{t+1}` is extrapolated from the
    last ``span`` gradients :math:`g_{t-r}, \ldots, g_t` (:math:`r` = ``span - 1``) with the
    regularised minimal polynomial extrapolation of Scieur et al. (2016):
    :math:`m_{t+1} = \sum_{i=0}^{r-1} c_i\, g_{t-r+i}` with :math:`c` from
    :func:`extrapolation_weights` (regulariser ``reg``, relative to :math:`\|U^\top U\|`; our choice,
    default 1e-3).  The extrapolation treats all parameters of a group (that share a step count)
    as one vector, as the paper treats the model.  Until two gradients are stored, and with
    ``span=1``, the prediction is the last gradient :math:`m_{t+1} = g_t`.  ``span`` defaults to 5,
    the authors' experiments (README of their repository optimistic_amsgrad: "span=5").
    ``predictor`` replaces the extrapolation by a callable ``predictor(param, base, scale)``
    returning :math:`m_{t+1}` (same shape), where the next point is ``base - scale * m``; an
    oracle that knows the loss can solve :math:`m = \nabla f(\text{base} - \text{scale}\, m)` and
    predict the true next gradient.  It returns the gradient of the loss as computed by the caller
    (negated internally when ``maximize=True``), runs on the per-tensor path, sees real views of
    complex parameters, and is not saved in ``state_dict``.

    **The authors' code** (``Optadam_torch.py``, commit 9f20073) differs where we follow the
    paper's description: it extrapolates the last ``span`` *iterates* and takes the predicted
    gradient from a second copy of the network placed at the extrapolated point (one more forward
    and backward pass per step, which a drop-in optimizer cannot take; a ``predictor`` can),
    applies Adam's bias corrections to both steps (``bias_correction=True`` here), adds the weight
    decay to the gradient and regularises RMPE by an absolute 1e-3.

    Symbols: :math:`\eta` = ``lr`` (the paper's :math:`\eta_{t+1}` in the second step is the
    current ``lr``), :math:`(\beta_1, \beta_2)` = ``betas``, :math:`\epsilon` = ``eps`` (the
    paper starts from :math:`\hat v_0 = \epsilon`; we add it to the denominator as
    :class:`~gradkit.optim.AMSGrad` does), :math:`\lambda` = ``weight_decay`` (decoupled, on the
    half iterate; not in the paper, default 0).  No bias correction by default (the paper's form);
    ``bias_correction=True`` scales both steps by :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)` as the
    authors' code does (``eps`` unscaled, the decay unchanged).  Defaults are the authors'
    experiments: lr 1e-3, betas (0.9, 0.99).

    State: ``exp_avg`` (:math:`\theta`), ``exp_avg_sq`` (:math:`v`), ``max_exp_avg_sq``
    (:math:`\hat v`), ``half_param`` (:math:`w_{t+1/2}`), ``prediction`` (:math:`m_{t+1}`, in the
    minimisation convention) and, for ``span >= 2``, the gradient
    history as the last gradient ``last_grad`` and a ring buffer ``diff_0 .. diff_{span-2}`` of
    successive differences (the columns of :math:`U`; 16-bit parameters store them rounded to
    their dtype): ``5 + span`` tensors of the parameter's dtype (40 bytes per float32 parameter
    with the default span 5; ``span=1`` needs 20).  Per step the history costs one subtraction
    and ``span - 1`` dot products per tensor (on the default and fused paths, small float32/64
    tensors of one shape take them together, on stacked copies); the extrapolation reads the
    Gram matrix back to the host once per step, group and device.
    """

    kernel = staticmethod(optimistic_amsgrad_kernel)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        reg: float = 1e-3,
        *,
        span: int = 5,
        predictor: Predictor | None = None,
        bias_correction: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if isinstance(span, bool) or not isinstance(span, numbers.Integral) or span < 1:
            raise ValueError(f"OptimisticAMSGrad: invalid span={span!r}; expected an integer >= 1")
        if predictor is not None and not callable(predictor):
            raise TypeError(f"OptimisticAMSGrad: invalid predictor={predictor!r}; expected None or a callable "
                            "predictor(param, base, scale) -> predicted gradient")
        self.span = span
        self.predictor = predictor
        self._configure()
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, reg=reg,
                                      bias_correction=bias_correction),
                         maximize=maximize, foreach=foreach, fused=fused)

    def _validate(self, group: dict[str, Any]) -> None:
        check_adam_group(type(self).__name__, group)
        check_range(type(self).__name__, "reg", group["reg"], 0.0, low_open=True)
        check_bool(type(self).__name__, "bias_correction", group["bias_correction"])

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        super()._init_state(p, state, group)
        state["half_param"] = p.detach().clone(memory_format=torch.preserve_format)  # w_{-1/2} = w_1

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`; state saved by earlier versions is
        converted: without ``prediction`` (the second moment was then that of the gradients) the
        last prediction starts at zero; a ring ``grad_0 .. grad_{span-1}`` of raw gradients becomes
        the last gradient and the successive differences of the stored ones, in their ring slots.
        A state saved with another ``span`` (or with/without a ``predictor``) is refused before
        anything changes: its history would be read in the wrong slots."""
        ring = self.span - 1
        for st in state_dict["state"].values():
            if "grad_0" in st:  # earlier versions: a ring of span raw gradients
                saved = sum(1 for k in st if k.startswith("grad_"))
            else:  # the last gradient and span - 1 differences, or no history (span 1 or a predictor)
                saved = 1 + sum(1 for k in st if k.startswith("diff_"))
            if "exp_avg" in st and saved != (self.span if self._extrapolates else 1):
                raise ValueError(
                    f"OptimisticAMSGrad: the state holds the gradient history of span={saved}"
                    f"{' (or of a predictor)' if saved == 1 else ''}; this optimizer has span={self.span}"
                    f"{' and a predictor' if self.predictor is not None else ''}: expected the span the state "
                    "was saved with")
        super().load_state_dict(state_dict)
        for st in self.state.values():
            if "exp_avg" in st and "prediction" not in st:
                st["prediction"] = torch.zeros_like(st["exp_avg"])
            if "grad_0" not in st:
                continue
            raw = [st.pop(f"grad_{k}") for k in range(self.span)]
            step = st["step"]
            st["last_grad"] = raw[(step - 1) % self.span].clone()
            for k in range(ring):
                st[f"diff_{k}"] = torch.zeros_like(raw[0])
            for s in range(max(2, step - self.span + 2), step + 1):  # the differences still in the window
                st[f"diff_{(s - 2) % ring}"] = raw[(s - 1) % self.span] - raw[(s - 2) % self.span]

    def _mode(self, group: dict[str, Any]) -> str:
        return "reference" if self.predictor is not None else super()._mode(group)

    def _static(self, group: dict[str, Any]) -> dict[str, Any]:
        return {"predictor": self.predictor} if self.predictor is not None else {}

    def _hyper(self, group: dict[str, Any], step: int) -> list[float]:
        b1, b2 = group["betas"]
        # the kernel's steps are lr-proportional and its decay is lr * wd: scale lr, and wd inversely
        scale = math.sqrt(1 - b2**step) / (1 - b1**step) if group["bias_correction"] else 1.0
        h = [as_float(group["lr"]) * scale, b1, b2, group["eps"], group["weight_decay"] / scale]
        if self._extrapolates:
            h += self._weights[id(group)][step]
        return h

    _options = ("span", "predictor")

    def _configure(self) -> None:
        self._extrapolates = self.span > 1 and self.predictor is None
        self.state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "half_param", "prediction") + (
            ("last_grad",) + tuple(f"diff_{k}" for k in range(self.span - 1)) if self._extrapolates else ())
        self._weights: dict[int, dict[int, list[float]]] = {}
        # id(param) -> (key, flat views, dots, step, weakref) for _store; (id(group), shape, dtype,
        # device) -> (members, stored differences, step, dots) for _store_batch
        self._dot_cache: dict[Any, tuple] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state_dicts saved before bias_correction existed
            group.setdefault("bias_correction", False)

    def _step_group(self, group: dict[str, Any]) -> None:
        if self._extrapolates:
            self._extrapolate(group)
        super()._step_group(group)

    @torch.no_grad()
    def _extrapolate(self, group: dict[str, Any]) -> None:
        """Store this step's gradients and compute the extrapolation weights.

        Runs before the shared step (which counts the step).  The history is kept as the last
        gradient ``last_grad`` and a ring buffer ``diff_0 .. diff_{span-2}`` of successive
        differences ``g_{i+1} - g_i`` (the columns of ``U``): one subtraction per step stores the
        new difference, and the Gram matrix ``UᵀU`` needs only the new difference's dot products
        with the stored ones (:meth:`_store`), not a pass over the whole history.  Parameters are
        grouped by the step count they are about to reach; each such set gets one Gram matrix.
        The kernel's prediction ``Σ_i c_i g_i`` over the older gradients is then
        ``last_grad − Σ_j C_j diff_j`` with ``C_j = Σ_{i≤j} c_i`` (the weights sum to one).
        """
        params, grads = self._params_and_grads(group)
        states = self._states_of(group, params)
        ring = self.span - 1
        members: dict[int, list[int]] = {}
        for i, (p, st) in enumerate(zip(params, states)):
            if not st:
                self._init_state(p, st, group)
            members.setdefault(st["step"] + 1, []).append(i)
        by_step: dict[int, list[torch.Tensor]] = {}
        fast = self._mode(group) != "reference"
        for step, idx in members.items():
            # small real tensors of one shape, dtype and device: one batched store (fast paths)
            batches: dict[tuple, list[int]] = {}
            for i in idx:
                p = params[i]
                if fast and p.numel() <= PACK_NUMEL and p.dtype in (torch.float32, torch.float64):
                    batches.setdefault((p.shape, p.dtype, p.device), []).append(i)
            dots = []
            for key, batch in batches.items():
                if len(batch) > 1:
                    dots.append(self._store_batch((id(group), *key), [params[i] for i in batch],
                                                  [grads[i] for i in batch], [states[i] for i in batch], step))
            alone = {i for batch in batches.values() if len(batch) > 1 for i in batch}
            dots += [self._store(params[i], states[i], step) for i in idx if i not in alone]
            by_step[step] = dots
        weights = {}
        for step, dots in by_step.items():
            n = min(step, self.span)  # gradients used: steps step-n+1 .. step, differences n-1
            w = [1.0] + [0.0] * ring  # last_grad, then one weight per difference slot
            if n >= 2:
                slots = [(s - 2) % ring for s in range(step - n + 2, step + 1)]  # oldest difference first
                totals: dict[torch.device, torch.Tensor] = {}
                for d in dots:
                    totals[d.device] = totals[d.device] + d if d.device in totals else d.clone()
                gram = sum(t.cpu() for t in totals.values())[slots][:, slots]
                total = 0.0
                for slot, ci in zip(slots, extrapolation_weights(gram, group["reg"]).tolist()):
                    total += ci
                    w[1 + slot] = -total
            weights[step] = w
        self._weights[id(group)] = weights

    def _store(self, p: torch.Tensor, st: dict[str, Any], step: int) -> torch.Tensor:
        """Write ``p.grad`` (the gradient of ``step``) into ``p``'s history and return the float64
        ``(span-1, span-1)`` matrix of dot products between its stored differences, by slot.

        The matrix is cached per parameter: only the new slot's row and column are computed, unless
        the stored differences are not the tensors the cache was built from at the previous step
        (after ``load_state_dict`` or a device move), when every entry is recomputed.  (Values
        changed in place by the caller between steps are not detected.)  Each entry is one
        ``torch.dot`` in the parameter's precision (float32 for 16-bit parameters, on real views of
        complex ones), so cached and recomputed entries are equal and a resumed run matches an
        uninterrupted one.
        """
        ring = self.span - 1
        diffs = [st[f"diff_{k}"] for k in range(ring)]
        key = tuple((id(t), t.data_ptr()) for t in diffs)
        cached = self._dot_cache.get(id(p))
        valid = cached is not None and cached[4]() is p and cached[3] == step - 1 and cached[0] == key
        new = (step - 2) % ring
        if step >= 2:  # the difference g_step - g_{step-1}
            torch.sub(p.grad, st["last_grad"], out=diffs[new])
        st["last_grad"].copy_(p.grad)
        if valid:  # the new slot against every slot
            flat, dots = cached[1], cached[2]
            if step >= 2:
                flat[new] = _flat(diffs[new])  # a view (a fresh copy for 16-bit parameters)
                row = torch.stack([torch.dot(flat[new], f) for f in flat]).to(torch.float64)
                dots[new] = row
                dots[:, new] = row
        else:  # every pair
            flat = [_flat(x) for x in diffs]
            dots = torch.zeros(ring, ring, dtype=torch.float64, device=p.device)
            for i, j in itertools.combinations_with_replacement(range(ring), 2) if step >= 2 else ():
                dots[i, j] = dots[j, i] = torch.dot(flat[i], flat[j])
        self._dot_cache[id(p)] = (key, flat, dots, step, weakref.ref(p))
        return dots

    def _store_batch(self, key: tuple, params: list[torch.Tensor], grads: list[torch.Tensor],
                     states: list[dict[str, Any]], step: int) -> torch.Tensor:
        """:meth:`_store` for small real tensors of one shape, at once: their histories are
        updated by foreach copies and the dot products taken on stacked ``(B, n)`` copies, each
        parameter's product a row sum in its precision, summed over the batch in float64; returns
        the batch's total ``(span-1, span-1)`` matrix.  Cached per batch like :meth:`_store`
        (valid while the members and their stored differences are the same tensors); a cached and
        a recomputed entry are the same sums of the same products, so a resumed run still matches
        an uninterrupted one.  (On a thousand 8×8 tensors this replaces a thousand Python-level
        stores per step, which cost ten times the step itself.)"""
        ring = self.span - 1
        n = len(params)
        slots = [[st[f"diff_{k}"] for st in states] for k in range(ring)]
        last = [st["last_grad"] for st in states]
        new = (step - 2) % ring
        if step >= 2:  # the differences g_step - g_{step-1}
            torch._foreach_copy_(slots[new], grads)
            torch._foreach_sub_(slots[new], last)
        torch._foreach_copy_(last, grads)
        tensors = [t for slot in slots for t in slot]
        cached = self._dot_cache.get(key)
        valid = (cached is not None and cached[2] == step - 1 and len(cached[0]) == n
                 and all(map(operator.is_, cached[0], params)) and all(map(operator.is_, cached[1], tensors)))

        def products(i: int, j: int) -> torch.Tensor:
            return (flats[i] * flats[j]).sum(1).to(torch.float64).sum()

        if valid:
            dots = cached[3]
            if step >= 2:
                flats = {k: torch.stack(slots[k]).view(n, -1) for k in range(ring)}
                row = torch.stack([products(new, k) for k in range(ring)])
                dots[new] = row
                dots[:, new] = row
        else:
            dots = torch.zeros(ring, ring, dtype=torch.float64, device=params[0].device)
            if step >= 2:
                flats = {k: torch.stack(slots[k]).view(n, -1) for k in range(ring)}
                for i, j in itertools.combinations_with_replacement(range(ring), 2):
                    dots[i, j] = dots[j, i] = products(i, j)
        self._dot_cache[key] = (list(params), tensors, step, dots)
        return dots
