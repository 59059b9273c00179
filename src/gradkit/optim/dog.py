"""DoG and L-DoG: parameter-free "distance over gradients" step sizes (Ivgi, Hinder and Carmon, 2023)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ._base import PACK_NUMEL, Optimizer, as_float, check_range, opmath_dtype, run_flat

__all__ = ["DoG", "LDoG"]


def _norms(tensors: list[torch.Tensor], fast: bool) -> list[torch.Tensor]:
    """Euclidean norms (complex entries count as their real pair), accumulated in float32 at least."""
    tensors = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
    if fast and len({t.dtype for t in tensors}) == 1:
        return list(torch._foreach_norm(tensors, 2, dtype=opmath_dtype(tensors[0].dtype)))
    return [torch.linalg.vector_norm(t, dtype=opmath_dtype(t.dtype)) for t in tensors]


def _squared_distance(param: torch.Tensor, x0: torch.Tensor, *, h: torch.Tensor) -> torch.Tensor:
    """``Σ (param − x0)²`` (the difference in the parameters' dtype, squares summed in ``h``'s)."""
    return (param - x0).to(h.dtype).square().sum()


def _distances(params: list[torch.Tensor], origins: list[torch.Tensor], mode: str) -> list[torch.Tensor]:
    """``‖x − x0‖`` per tensor.  ``fused``: tensors above ``PACK_NUMEL`` entries through one compiled
    reduction each, which reads ``x`` and ``x0`` once and writes nothing (the other paths form the
    difference first: a temporary as large as the tensor, and on the CPU a fresh one pays its page
    faults on every step)."""
    real = [(torch.view_as_real(x) if x.is_complex() else x, torch.view_as_real(o) if o.is_complex() else o)
            for x, o in zip((p.detach() for p in params), origins)]
    out: list[torch.Tensor | None] = [None] * len(params)
    if mode == "fused":
        for i, (x, o) in enumerate(real):
            if x.numel() > PACK_NUMEL and x.is_contiguous() and o.is_contiguous():
                h = torch.zeros(1, dtype=opmath_dtype(x.dtype), device=x.device)
                out[i] = run_flat(_squared_distance, [x.reshape(-1), o.reshape(-1)], h, {}).sqrt()
    rest = [i for i, d in enumerate(out) if d is None]
    fast = mode != "reference"
    diffs = (torch._foreach_sub([real[i][0] for i in rest], [real[i][1] for i in rest]) if fast and rest
             else [real[i][0] - real[i][1] for i in rest])
    for i, d in zip(rest, _norms(diffs, fast)):
        out[i] = d
    return out


class DoG(Optimizer):
    r"""DoG: SGD with the parameter-free "distance over gradients" step size.

    Ivgi, Hinder and Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size
    Schedule", ICML 2023, arXiv:2302.12022 (the DoG step size).  For gradients :math:`g_t` at :math:`x_t`:

    .. math::
        \bar r_t = \max\Big(r_\epsilon,\ \max_{i\le t}\|x_i - x_0\|\Big), \qquad
        \eta_t = c\,\frac{\bar r_t}{\sqrt{\sum_{i\le t}\|g_i\|^2 + \epsilon}}, \qquad
        x_{t+1} = x_t - \eta_t\, g_t,

    with the initial movement :math:`r_\epsilon = \text{reps\_rel}\cdot(1 + \|x_0\|)` (the
    reference code's relative form), so the first step size is :math:`c\,r_\epsilon/\|g_0\|`.
    ``DoG`` treats all parameters of a param group as one vector (norms over the whole group);
    :class:`LDoG` applies the formula to each parameter tensor separately.  There is no learning
    rate to tune: ``lr`` is the multiplier :math:`c` (default 1, as in the paper; a schedule on it,
    e.g. cosine, is applied as usual).  Scaling the loss by :math:`a > 0` scales every
    :math:`g_t` by :math:`a` and leaves :math:`\eta_t g_t` unchanged: the trajectory is invariant
    (exactly with ``eps = 0`` and ``weight_decay = 0``).

    Symbols: :math:`c` = ``lr``, ``reps_rel`` (default 1e-6 from the reference code
    github.com/formll/dog; it suggests 1e-4 for models with batch normalisation), :math:`\epsilon`
    = ``eps`` (default 0 = the paper's formula; the reference code adds 1e-8 to the first squared
    gradient norm), ``weight_decay`` :math:`\lambda` (default 0; as in the reference code an L2
    term: :math:`g_t \leftarrow g_t + \lambda x_t` before the norms).  The paper recommends
    iterate averaging on top of DoG (not part of the optimizer).

    Not implemented: U-DoG, the accelerated variant of Kreisler, Ivgi, Hinder and Carmon (2024,
    "Accelerated Parameter-Free Stochastic Optimization", arXiv:2404.00666), UniXGrad's two
    sequences with DoG step sizes and the paper's iterate stabilisation: its Algorithm 1 was not
    available to the authors of this library, and an implementation without it would be a guess.

    Parameters that first get a gradient later start their :math:`x_0` then; distances are taken
    over the parameters of the group that have state.  If every gradient so far is zero the step
    size is 0 (the update :math:`\eta g` is zero anyway).

    State: per parameter ``x0`` (a copy of the initial value, the parameter's dtype: 4 bytes per
    float32 parameter); the running :math:`\bar r` and :math:`\sum\|g\|^2` are Python floats
    (float64) kept in the param group (keys ``dog_rbar``, ``dog_gsq``; per parameter state
    ``rbar``, ``gsq`` for :class:`LDoG`), so they travel with ``state_dict``.  Each step reads the
    norms back to the host once per group (one device synchronisation).  Paths: ``foreach=False``
    is a per-tensor loop, the default uses ``torch._foreach_*`` operations; ``fused=True`` is the
    default path with the distance of each large tensor taken by a compiled reduction that forms
    no difference tensor (the rest of a step is norms and one ``axpy``).
    """

    state_names = ("x0",)
    layerwise = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1.0,
        reps_rel: float = 1e-6,
        eps: float = 0.0,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, dict(lr=lr, reps_rel=reps_rel, eps=eps, weight_decay=weight_decay),
                         maximize=maximize, foreach=foreach, fused=fused)

    def _validate(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        check_range(name, "reps_rel", group["reps_rel"], 0.0, low_open=True)
        check_range(name, "eps", group["eps"], 0.0)
        check_range(name, "weight_decay", group["weight_decay"], 0.0)

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] = 0
        state["x0"] = p.detach().clone(memory_format=torch.preserve_format)
        if self.layerwise:
            state["rbar"] = None  # set from ||x0|| below
            state["gsq"] = 0.0

    # -- the step ----------------------------------------------------------------------------
    def _step_group(self, group: dict[str, Any]) -> None:
        params, grads = self._params_and_grads(group)
        if not params:
            return
        fast = self._mode(group) != "reference"
        states = self._states_of(group, params)
        new = []
        for p, st in zip(params, states):
            if not st:
                self._init_state(p, st, group)
                new.append(p)
            st["step"] += 1
        grads = self._directions(group, params, grads)
        # parameters whose distance counts: all with state (global), the stepping ones (layer-wise)
        if self.layerwise or len(params) == len(group["params"]):
            moved, origins = params, [st["x0"] for st in states]
        else:
            moved = [p for p in group["params"] if "x0" in self.state.get(p, {})]
            origins = [self.state[p]["x0"] for p in moved]
        distances = _distances(moved, origins, self._mode(group))
        # one host read for every norm of the step: ||x0|| of new parameters, distances, gradients
        norms = _norms(new, fast) + distances + _norms(grads, fast)
        host = torch.stack(norms).to(torch.float64).tolist()  # stack promotes mixed dtypes exactly
        x0_norm, dist, gnorm = host[:len(new)], host[len(new):len(new) + len(moved)], host[len(new) + len(moved):]
        lr, reps_rel, eps = as_float(group["lr"]), group["reps_rel"], group["eps"]

        if self.layerwise:
            for p, n in zip(new, x0_norm):
                self.state[p]["rbar"] = reps_rel * (1 + n)
            etas = []
            for st, d, gn in zip(states, dist, gnorm):
                first = st["step"] == 1
                st["rbar"] = max(st["rbar"], d)
                st["gsq"] += gn * gn + (eps if first else 0.0)
                etas.append(lr * st["rbar"] / math.sqrt(st["gsq"]) if st["gsq"] > 0 else 0.0)
        else:
            first = group.get("dog_rbar") is None
            if first:
                group["dog_rbar"] = reps_rel * (1 + math.sqrt(sum(n * n for n in x0_norm)))
                group["dog_gsq"] = eps
            group["dog_rbar"] = max(group["dog_rbar"], math.sqrt(sum(d * d for d in dist)))
            group["dog_gsq"] += sum(gn * gn for gn in gnorm)
            gsq = group["dog_gsq"]
            etas = [lr * group["dog_rbar"] / math.sqrt(gsq) if gsq > 0 else 0.0] * len(params)
        self._apply(params, grads, etas, fast)

    def _directions(self, group: dict[str, Any], params: list[torch.Tensor],
                    grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients to step along: ``g`` (``-g`` when maximizing) plus ``weight_decay * x``."""
        if group["maximize"]:
            grads = [-g for g in grads]
        wd = group["weight_decay"]
        if wd:
            grads = [g + wd * p for g, p in zip(grads, params)]
        return grads

    @staticmethod
    def _apply(params: list[torch.Tensor], grads: list[torch.Tensor], etas: list[float], fast: bool) -> None:
        """``x <- x - eta * g`` (16-bit parameters: computed in float32, rounded on store)."""
        if fast and opmath_dtype(params[0].dtype) == params[0].dtype and len({p.dtype for p in params}) == 1:
            if len(set(etas)) == 1:
                torch._foreach_add_(params, grads, alpha=-etas[0])
            elif params[0].device.type == "cpu":  # x + (-eta) g 1: no temporary per tensor
                one = torch.ones((), dtype=params[0].dtype)
                torch._foreach_addcmul_(params, grads, [one] * len(params), [-eta for eta in etas])
            else:  # a broadcast 0-dim tensor would take foreach's per-tensor fallback on a GPU
                torch._foreach_sub_(params, torch._foreach_mul(grads, etas))
            return
        for p, g, eta in zip(params, grads, etas):
            if opmath_dtype(p.dtype) == p.dtype:
                p.add_(g, alpha=-eta)
            else:
                p.copy_(p.to(torch.float32) - eta * g.to(torch.float32))


class LDoG(DoG):
    r"""L-DoG: layer-wise DoG, the :class:`DoG` step size computed for each parameter tensor separately.

    Ivgi, Hinder and Carmon, 2023, arXiv:2302.12022 (the layer-wise variant "L-DoG").  For every tensor
    :math:`x^{(l)}`: :math:`\eta^{(l)}_t = c\,\bar r^{(l)}_t / \sqrt{\sum_{i\le t}\|g^{(l)}_i\|^2 + \epsilon}`
    with :math:`\bar r^{(l)}_t = \max(r^{(l)}_\epsilon, \max_{i\le t}\|x^{(l)}_i - x^{(l)}_0\|)` and
    :math:`r^{(l)}_\epsilon = \text{reps\_rel}\,(1 + \|x^{(l)}_0\|)`.  Same arguments and defaults
    as :class:`DoG`; per-parameter state ``x0`` (tensor) and ``rbar``, ``gsq`` (Python floats).
    """

    layerwise = True
