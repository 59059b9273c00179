"""Layer-wise Relevance Propagation (Bach et al. 2015; Montavon et al. 2019) with per-layer rules.

LRP is implemented with explicit backward rules on the layers of an ``nn.Sequential`` model
(nested ``Sequential`` allowed): the model is read as a chain of steps, BatchNorm is folded into
the preceding ``Linear`` / convolution, and relevance is sent back step by step with the rule of
each layer.  Every rule for an affine layer ``z_k = Σ_j a_j w_jk + b_k`` has the form of the
"four steps" implementation of Montavon et al. (2019):

.. math::

    z = ρ\\text{-forward}(a), \\quad s = R_{out} / \\mathrm{stab}(z), \\quad
    c = ρ(W)^T s, \\quad R_{in} = a ⊙ c

and ``c`` is the *LRP coefficient* that :func:`~gradkit.explain.patching.relevance_patching` uses in
place of the gradient.  (For models that are not such a chain, e.g. transformers, relevance
patching computes ``c`` for LRP-0 by a backward pass through the model with the rules' quantities
held constant instead; see its docstring.)

Supported layers: ``Linear``, ``Conv1d/2d/3d`` (rules below); BatchNorm (folded, eval mode);
``MaxPool`` (winner-take-all: relevance routed to the maximum), ``AvgPool`` /
``AdaptiveAvgPool`` (LRP-0: they are linear with positive weights); ``Flatten``; ``ReLU`` and the
element-wise activations ``LeakyReLU``, ``GELU``, ``SiLU``, ``Tanh``, ``ELU`` (identity rule:
relevance passes unchanged, as Captum and Jafari et al.); ``Dropout`` and ``Identity``
(identity).  Anything else raises a ``TypeError`` naming the module.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from gradkit.explain._common import (
    Target,
    _rows,
    check_batch_size,
    check_float,
    check_inputs,
    check_target,
    eval_mode,
    over_targets,
    select,
)

__all__ = [
    "Rule",
    "Zero",
    "Epsilon",
    "Gamma",
    "AlphaBeta",
    "ZPlus",
    "ZBox",
    "RULE_NAMES",
    "lrp",
    "lrp_relevances",
    "lrp_propagate",
    "LRPChunk",
    "secant_slope",
]

_TINY = 1e-9  # stabiliser of the γ rule, z + _TINY·sign(z), as the "+1e-9" of Montavon et al.'s tutorial code


# ------------------------------------------------------------------------------------ rules
@dataclass(frozen=True, eq=False)
class Rule:
    """A propagation rule for ``Linear`` / convolution layers (base class)."""


@dataclass(frozen=True, eq=False)
class Zero(Rule):
    """LRP-0 (Bach et al. 2015; Montavon et al. 2019, Sec. 10.2.1):
    ``R_j = Σ_k a_j w_jk / z_k · R_k`` with ``z_k = Σ_j a_j w_jk + b_k`` (0 where ``z_k = 0``).
    On ReLU networks it equals Gradient × Input."""


@dataclass(frozen=True, eq=False)
class Epsilon(Rule):
    """LRP-ε (Bach et al. 2015; Montavon et al. 2019, Sec. 10.2.1):
    ``R_j = Σ_k a_j w_jk / (z_k + ε·sign(z_k)) · R_k`` (``sign(0) = +1``, as Captum and Zennit).
    Default ``ε = 1e-6`` (Zennit's); Montavon et al. suggest ``ε`` of the order of 0.25 times the
    standard deviation of ``z``, a scale that depends on the model."""

    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        check_float(self.epsilon, "Epsilon(epsilon)")


@dataclass(frozen=True, eq=False)
class Gamma(Rule):
    """LRP-γ (Montavon et al. 2019, Sec. 10.2.1): ``ρ(w) = w + γ w⁺`` applied to the weights and
    the bias (as the authors' tutorial code),
    ``R_j = Σ_k a_j ρ(w_jk) / (Σ_{0,j} a_j ρ(w_jk) + 10⁻⁹ sign) · R_k`` (the ``+1e-9`` of the
    tutorial code, sign-aware).  Default ``γ = 0.25`` (Captum's and Zennit's)."""

    gamma: float = 0.25

    def __post_init__(self) -> None:
        check_float(self.gamma, "Gamma(gamma)")


@dataclass(frozen=True, eq=False)
class AlphaBeta(Rule):
    """LRP-αβ (Bach et al. 2015; Montavon et al. 2019, Sec. 10.2):

    ``R_j = Σ_k (α (a_j w_jk)⁺ / Σ_{0,j} (a_j w_jk)⁺ − β (a_j w_jk)⁻ / Σ_{0,j} (a_j w_jk)⁻) R_k``

    with the bias as the ``j = 0`` term (``b⁺`` in the positive, ``b⁻`` in the negative sum) and
    ``α − β = 1``; ``(a_j w_jk)⁺ = a⁺_j w⁺_jk + a⁻_j w⁻_jk``, so inputs of either sign are handled.
    The denominators have one sign: no stabiliser, a vanishing one shares nothing.  The default
    ``α = 1, β = 0`` ("α1β0") gives non-negative relevance from non-negative relevance."""

    alpha: float = 1.0
    beta: float = 0.0

    def __post_init__(self) -> None:
        check_float(self.beta, "AlphaBeta(beta)")
        if abs(self.alpha - self.beta - 1) > 1e-12:
            raise ValueError(f"AlphaBeta needs alpha − beta = 1, got alpha={self.alpha}, beta={self.beta}")


@dataclass(frozen=True, eq=False)
class ZPlus(Rule):
    """z⁺ rule (Montavon et al. 2017, "Explaining nonlinear classification decisions with deep Taylor
    decomposition", Pattern Recognition 65; arXiv:1512.02479): ``R_j = Σ_k a_j w⁺_jk / Σ_j a_j w⁺_jk · R_k``, the
    bias left out (0 where the denominator vanishes); for non-negative ``a`` (ReLU layers) it is
    α1β0 without bias and non-negative."""


@dataclass(frozen=True, eq=False)
class ZBox(Rule):
    """z^B rule for a bounded input layer (Montavon et al. 2017, arXiv:1512.02479; Montavon et al.
    2019, Sec. 10.3.2):

    ``R_i = Σ_j (x_i w_ij − l_i w⁺_ij − h_i w⁻_ij) / Σ_i (x_i w_ij − l_i w⁺_ij − h_i w⁻_ij) · R_j``

    with ``l_i ≤ x_i ≤ h_i`` (``low``, ``high``: numbers, tensors broadcastable to one example's
    features, or ``(B, *features)`` per example).  ``None`` (default) takes the minimum / maximum of
    each example's input to the layer, the smallest box containing it.  Bias left out; inside the
    box every term is ``w⁺(x − l) + w⁻(x − h) ≥ 0``, so relevance stays non-negative and, without
    bias, is conserved."""

    low: Tensor | float | None = None
    high: Tensor | float | None = None


#: the names accepted for ``rule`` (and their rules with default parameters)
RULE_NAMES: dict[str, Callable[[], Rule]] = {
    "zero": Zero,
    "lrp0": Zero,
    "epsilon": Epsilon,
    "gamma": Gamma,
    "alpha1beta0": AlphaBeta,
    "zplus": ZPlus,
    "zb": ZBox,
}

RuleSpec = Union[str, Rule, dict]


def _as_rule(rule: Any, name: str = "rule") -> Rule:
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str) and rule in RULE_NAMES:
        return RULE_NAMES[rule]()
    raise ValueError(
        f"{name} must be a Rule (Zero(), Epsilon(eps), Gamma(g), AlphaBeta(a, b), ZPlus(), ZBox(low, high)), one of "
        f"{sorted(RULE_NAMES)}, 'composite', or a dict of these; got {rule!r}"
    )


# ------------------------------------------------------------------------ model as a chain
_PASS = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.ELU)
_IDENTITY = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


@dataclass
class _Step:
    kind: str  # "affine", "pass", "identity", "maxpool", "avgpool", "flatten"
    name: str  # name of the module whose output this step produces
    modules: list[nn.Module]  # the module(s) this step stands for (an affine layer and its BatchNorm)
    weight: Tensor | None = None
    bias: Tensor | None = None
    rule: Rule | None = field(default=None)

    @property
    def source(self) -> nn.Module:
        return self.modules[0]

    def affine(self, a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        m = self.source
        return F.linear(a, w, b) if isinstance(m, nn.Linear) else m._conv_forward(a, w, b)

    def forward(self, a: Tensor) -> Tensor:
        if self.kind == "affine":
            return self.affine(a, self.weight, self.bias)
        if self.kind == "identity":
            return a
        return self.source(a.clone())


def _leaves(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _leaves(child, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix or type(module).__name__, module


def _chain(model: Any) -> list[_Step]:
    """The model as a list of steps, BatchNorm folded into the preceding affine layer."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"LRP needs an nn.Sequential model, got {type(model).__name__}")
    train_bn = [f"{n or 'model'} ({type(m).__name__})" for n, m in model.named_modules()
                if isinstance(m, _BatchNorm) and m.training]
    if train_bn:
        raise ValueError(
            "LRP folds BatchNorm into the preceding layer with its running statistics and needs it in eval mode, but "
            f"these are in training mode: {', '.join(train_bn[:5])}. Call model.eval() first."
        )
    steps: list[_Step] = []
    for name, m in _leaves(model, ""):
        if isinstance(m, (nn.Linear,) + _CONV):
            steps.append(_Step("affine", name, [m], m.weight.detach(), None if m.bias is None else m.bias.detach()))
        elif isinstance(m, _BatchNorm):
            prev = steps[-1] if steps else None
            if prev is None or prev.kind != "affine" or len(prev.modules) > 1:
                after = "nothing" if prev is None else f"{prev.name} ({type(prev.modules[-1]).__name__})"
                raise ValueError(
                    f"LRP folds BatchNorm into the Linear/convolution right before it, but {name} "
                    f"({type(m).__name__}) follows {after}"
                )
            if m.running_mean is None or m.running_var is None:
                raise ValueError(
                    f"{name} ({type(m).__name__}) has no running statistics (track_running_stats=False); LRP cannot fold it"
                )
            scale = torch.rsqrt(m.running_var + m.eps)
            if m.weight is not None:
                scale = scale * m.weight
            scale = scale.detach()
            b = prev.bias if prev.bias is not None else torch.zeros_like(scale)
            prev.bias = (b - m.running_mean) * scale + (m.bias.detach() if m.bias is not None else 0)
            prev.weight = prev.weight * scale.view((-1,) + (1,) * (prev.weight.ndim - 1))
            prev.modules.append(m)
            prev.name = name
        elif isinstance(m, _PASS):
            steps.append(_Step("pass", name, [m]))
        elif isinstance(m, _IDENTITY):
            steps.append(_Step("identity", name, [m]))
        elif isinstance(m, _MAXPOOL):
            if m.return_indices:
                raise ValueError(f"{name} ({type(m).__name__}) returns indices; LRP needs return_indices=False")
            steps.append(_Step("maxpool", name, [m]))
        elif isinstance(m, _AVGPOOL):
            steps.append(_Step("avgpool", name, [m]))
        elif isinstance(m, nn.Flatten):
            steps.append(_Step("flatten", name, [m]))
        else:
            raise TypeError(
                f"LRP does not support the module {name} ({type(m).__name__}). Supported: nn.Sequential (nested) of "
                "Linear, Conv1d/2d/3d, BatchNorm (after Linear/Conv), ReLU, LeakyReLU, GELU, SiLU, Tanh, ELU, MaxPool, "
                "AvgPool, AdaptiveAvgPool, Flatten, Dropout, Identity"
            )
    if not steps:
        raise ValueError("the model has no layers")
    return steps


def _composite(step: _Step, first: bool) -> Rule:
    """The default composite: z^B for the first affine layer, γ for convolutions, ε for dense layers."""
    if first:
        return ZBox()
    return Gamma() if isinstance(step.source, _CONV) else Epsilon()


def _rule_table(model: nn.Module, rule: dict) -> dict[Any, Rule]:
    """Validate a rule dict; module keys are stored by ``id``."""
    names = dict(model.named_modules())
    table: dict[Any, Rule] = {}
    for key, value in rule.items():
        r = _as_rule(value, f"rule[{key!r}]")
        if isinstance(key, str):
            if key not in names:
                raise ValueError(f"rule: no module named {key!r} in the model (names: {sorted(n for n in names if n)[:10]} ...)")
        elif isinstance(key, nn.Module):
            if not any(m is key for m in names.values()):
                raise ValueError(f"rule: the module {type(key).__name__} used as a key is not in the model")
            key = id(key)
        elif not (isinstance(key, type) and issubclass(key, nn.Module)):
            raise TypeError(f"rule keys must be modules, module types or module names, got {type(key).__name__} {key!r}")
        table[key] = r
    return table


def _assign_rules(model: nn.Module, steps: list[_Step], rule: Any) -> None:
    """Set ``step.rule`` of every affine step from ``rule`` (see :func:`lrp`)."""
    if isinstance(rule, dict):
        table = _rule_table(model, rule)
        names = {}
        for n, m in model.named_modules():
            names.setdefault(id(m), n)

        def pick(step: _Step, first: bool) -> Rule:
            m = step.source
            for key in [id(m), names[id(m)]] + list(type(m).__mro__):
                if key in table:
                    return table[key]
            return _composite(step, first)
    elif isinstance(rule, str) and rule == "composite":
        pick = _composite
    else:
        single = _as_rule(rule)

        def pick(step: _Step, first: bool) -> Rule:
            return single

    affine = [s for s in steps if s.kind == "affine"]
    for i, step in enumerate(affine):
        step.rule = pick(step, i == 0)


# -------------------------------------------------------------------------- propagation
def _sign0(z: Tensor) -> Tensor:
    return torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def _div(r: Tensor, z: Tensor, eps: float | None) -> Tensor:
    """``r / (z + eps·sign(z))``; with ``eps=None`` ``r / z`` and 0 where ``z = 0``."""
    if eps is None:
        return torch.where(z != 0, r / torch.where(z != 0, z, torch.ones_like(z)), torch.zeros_like(z))
    return r / (z + eps * _sign0(z))


def secant_slope(a_in: Tensor, a_out: Tensor) -> Tensor:
    """``σ(a)/a`` of an element-wise activation ``a_out = σ(a_in)``, 0 where ``a_in = 0``: the factor
    of the identity rule (relevance passes unchanged, ``R_in = R_out``), which with ``R = a ⊙ c``
    sends the LRP coefficient back as ``c_in = c_out · σ(a)/a`` instead of ``c_out · σ'(a)``."""
    return _div(a_out, a_in, None)


def _vjp(fn: Callable[[Tensor], Tensor], a: Tensor, s: Tensor) -> Tensor:
    """``(∂fn/∂a)ᵀ s`` of a linear map ``fn``."""
    with torch.enable_grad():
        x = torch.zeros_like(a, requires_grad=True)
        (g,) = torch.autograd.grad(fn(x), x, s)
    return g


def _bound(value: Any, a: Tensor, example: Tensor, reduce: str, name: str) -> Tensor:
    """A z^B bound as a tensor shaped like the layer input ``a`` of the rows ``example``."""
    if value is None:
        flat = a.reshape(a.shape[0], -1)
        v = flat.amin(1) if reduce == "min" else flat.amax(1)
        return v.view((-1,) + (1,) * (a.ndim - 1)).expand_as(a)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.full_like(a, float(value))
    if not isinstance(value, Tensor):
        raise TypeError(f"ZBox({name}) must be None, a number or a tensor, got {type(value).__name__}")
    value = value.to(a)
    if value.ndim == a.ndim and value.shape[0] > 1:  # one bound per example
        value = value[example]
    try:
        return torch.broadcast_to(value, a.shape)
    except (RuntimeError, IndexError):
        raise ValueError(
            f"ZBox({name}) of shape {tuple(value.shape)} must broadcast to one example's features {tuple(a.shape[1:])} "
            "or hold one bound per example (B, *features)"
        ) from None


def _affine_back(step: _Step, a: Tensor, r: Tensor, example: Tensor) -> tuple[Tensor, Tensor]:
    """Relevance and coefficient at the input of an affine step."""
    rule, w, b = step.rule, step.weight, step.bias
    lin = step.affine
    if isinstance(rule, (Zero, Epsilon, Gamma, ZPlus)):
        if isinstance(rule, Gamma):
            w = w + rule.gamma * w.clamp_min(0)
            b = None if b is None else b + rule.gamma * b.clamp_min(0)
        elif isinstance(rule, ZPlus):
            w, b = w.clamp_min(0), None
        eps = rule.epsilon if isinstance(rule, Epsilon) else _TINY if isinstance(rule, Gamma) else None
        s = _div(r, lin(a, w, b), eps)
        c = _vjp(lambda x: lin(x, w, None), a, s)
        return a * c, c
    wp, wn = w.clamp_min(0), w.clamp_max(0)
    if isinstance(rule, ZBox):
        low = _bound(rule.low, a, example, "min", "low")
        high = _bound(rule.high, a, example, "max", "high")
        z = lin(a, w, None) - lin(low, wp, None) - lin(high, wn, None)
        s = _div(r, z, None)  # z = Σ w⁺(x − l) + w⁻(x − h) ≥ 0 inside the box: no stabiliser needed
        rel = a * _vjp(lambda x: lin(x, w, None), a, s) - low * _vjp(lambda x: lin(x, wp, None), a, s) \
            - high * _vjp(lambda x: lin(x, wn, None), a, s)
        return rel, _div(rel, a, None)
    if isinstance(rule, AlphaBeta):
        ap, an = a.clamp_min(0), a.clamp_max(0)
        bp = None if b is None else b.clamp_min(0)
        bn = None if b is None else b.clamp_max(0)
        s_pos = _div(r, lin(ap, wp, bp) + lin(an, wn, None), None)  # sign-definite denominators
        c_p, c_n = _vjp(lambda x: lin(x, wp, None), a, s_pos), _vjp(lambda x: lin(x, wn, None), a, s_pos)
        c_pos, c_neg = rule.alpha * c_p, rule.alpha * c_n  # coefficients for a > 0 and a < 0
        if rule.beta:
            s_neg = _div(r, lin(ap, wn, bn) + lin(an, wp, None), None)
            c_pos = c_pos - rule.beta * _vjp(lambda x: lin(x, wn, None), a, s_neg)
            c_neg = c_neg - rule.beta * _vjp(lambda x: lin(x, wp, None), a, s_neg)
        c = torch.where(a >= 0, c_pos, c_neg)
        return a * c, c
    raise TypeError(f"unknown rule {rule!r}")


def _step_back(step: _Step, a_in: Tensor, a_out: Tensor, r: Tensor, c: Tensor, example: Tensor) -> tuple[Tensor, Tensor]:
    """Relevance and LRP coefficient at the input of ``step`` from those at its output."""
    if step.kind == "affine":
        return _affine_back(step, a_in, r, example)
    if step.kind == "identity":
        return r, c
    if step.kind == "pass":  # identity rule: R passes; R = a ⊙ c gives c_in = c_out · σ(a)/a
        return r, c * secant_slope(a_in, a_out)
    if step.kind == "flatten":
        return r.reshape(a_in.shape), c.reshape(a_in.shape)
    with torch.enable_grad():
        x = a_in.detach().requires_grad_(True)
        z = step.source(x)
        if step.kind == "maxpool":  # winner-take-all: route R (and c) to the maximum of each window
            r_in, c_in = torch.autograd.grad(z, x, r, retain_graph=True)[0], torch.autograd.grad(z, x, c)[0]
            return r_in, c_in
        (c_in,) = torch.autograd.grad(z, x, _div(r, z.detach(), None))  # average pooling: LRP-0
    return a_in * c_in, c_in


@dataclass
class LRPChunk:
    """Everything :func:`lrp_propagate` computes for one chunk of examples.

    The lists are indexed by layer boundary: index 0 is the model input, index ``i`` the output of
    the ``i``-th step of the model read as a chain (a folded ``Linear/Conv → BatchNorm`` pair is
    one step)."""

    example: Tensor  #: (R,) the examples of this chunk
    names: list[str]  #: "input", then the name of the module producing each boundary
    modules: list[list[nn.Module]]  #: the module(s) each step stands for ([] for the input)
    activations: list[Tensor]  #: a at every boundary
    relevances: list[Tensor]  #: R at every boundary
    coefficients: list[Tensor]  #: c with R = a ⊙ c (the LRP coefficient; ∂f/∂y at the output)
    values: Tensor  #: (R,) the selected scalar f


def _propagate(steps: list[_Step], x: Tensor, tgt: Any, example: Tensor) -> LRPChunk:
    """Forward through the chain, then relevance and coefficients back, for one chunk of rows."""
    with torch.no_grad():
        acts = [x]
        for step in steps:
            acts.append(step.forward(acts[-1]))
    with torch.enable_grad():
        y = acts[-1].detach().requires_grad_(True)
        value = select(y, tgt, example)
        (dy,) = torch.autograd.grad(value, y, torch.ones_like(value))
    rel, coef = [None] * len(acts), [None] * len(acts)
    rel[-1], coef[-1] = acts[-1] * dy, dy  # start: output ⊙ ∂f/∂output (the target logit at its unit)
    for i in range(len(steps) - 1, -1, -1):
        rel[i], coef[i] = _step_back(steps[i], acts[i], acts[i + 1], rel[i + 1], coef[i + 1], example)
    return LRPChunk(example, ["input"] + [s.name for s in steps], [[]] + [s.modules for s in steps],
                    acts, rel, coef, value.detach())


def lrp_propagate(
    model: nn.Module,
    inputs: Tensor,
    target: Any = None,
    rule: RuleSpec = "composite",
    *,
    batch_size: int | None = None,
    progress: bool = False,
    desc: str = "lrp",
) -> Iterator[LRPChunk]:
    """The LRP pass of :func:`lrp` (one target), ``batch_size`` examples at a time, with the
    activations, relevances and coefficients at every layer boundary (:class:`LRPChunk`)."""
    steps = _chain(model)
    _assign_rules(model, steps, rule)
    inputs = check_inputs(inputs).detach()
    batch = inputs.shape[0]
    tgt = check_target(target, batch)
    rows = check_batch_size(batch_size)
    with eval_mode(model):
        for _, example in tqdm(list(_rows(1, batch, rows)), desc=desc, disable=not progress, leave=False):
            yield _propagate(steps, inputs[example], tgt, example)


@over_targets
def lrp(
    model: nn.Module,
    inputs: Tensor,
    target: Target = None,
    rule: RuleSpec = "composite",
    *,
    batch_size: int | None = None,
    return_delta: bool = False,
    progress: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Layer-wise Relevance Propagation (Bach, Binder, Montavon, Klauschen, Müller & Samek 2015,
    "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by Layer-Wise Relevance
    Propagation", PLoS ONE 10(7); Montavon, Binder, Lapuschkin, Samek & Müller 2019, "Layer-Wise
    Relevance Propagation: An Overview", in Explainable AI, LNCS 11700).

    The relevance of the output layer is ``R_out = y ⊙ ∂f/∂y`` (``y`` the model output, ``f`` the
    scalar chosen by ``target``): for a class index this is the class score at its unit and zero
    elsewhere, Captum's convention.  It is then propagated layer by layer (see the module
    docstring) with, for each ``Linear`` / convolution, the rule given by ``rule``:

    * a :class:`Rule` (``Zero()``, ``Epsilon(ε)``, ``Gamma(γ)``, ``AlphaBeta(α, β)``, ``ZPlus()``,
      ``ZBox(low, high)``) or its name (:data:`RULE_NAMES`) for every layer;
    * ``"composite"`` (default; Montavon et al. 2019, Sec. 10.3): ``ZBox()`` for the first layer,
      ``Gamma(0.25)`` for the other convolutions, ``Epsilon(1e-6)`` for the dense layers (as Zennit's
      ``EpsilonGammaBox``; the box defaults to each example's min/max, pass ``ZBox(low, high)`` for
      the data range);
    * a dict from module, module name or module type (matched in this order, then by the
      type's base classes) to a rule; layers not in the dict take the composite's rule.

    BatchNorm is folded into the preceding layer (``w' = w γ/√(σ²+ε)``, ``b' = (b − μ)γ/√(σ²+ε) + β``)
    and the rule applies to the folded layer; train-mode BatchNorm is refused.  Returns the
    relevance of ``inputs``; ``return_delta=True`` adds ``Σ R_in − f(x)`` per example, zero for a
    conservative propagation (LRP-0 / ε → 0 / z^B without biases), nonzero where biases or
    stabilisers absorb relevance.  Stateless.
    """
    inputs = check_inputs(inputs)
    out = torch.zeros_like(inputs.detach())
    delta = inputs.new_zeros(inputs.shape[0])
    for chunk in lrp_propagate(model, inputs, target, rule, batch_size=batch_size, progress=progress):
        r = chunk.relevances[0]
        out.index_add_(0, chunk.example, r)
        delta.index_add_(0, chunk.example, r.reshape(len(chunk.example), -1).sum(1) - chunk.values)
    return (out, delta) if return_delta else out


def lrp_relevances(
    model: nn.Module,
    inputs: Tensor,
    target: Any = None,
    rule: RuleSpec = "composite",
    *,
    batch_size: int | None = None,
) -> dict[str, Tensor]:
    """The relevance at every layer boundary of :func:`lrp` (one target): ``{"input": R(x),
    name: R at the output of that module, ...}`` in forward order, the last entry being the start
    relevance.  A folded ``Linear/Conv → BatchNorm`` pair is one entry, named by the BatchNorm.
    Conservation says every entry sums to the same value per example."""
    out: dict[str, Tensor] = {}
    for chunk in lrp_propagate(model, inputs, target, rule, batch_size=batch_size):
        for name, r in zip(chunk.names, chunk.relevances):
            if name not in out:
                out[name] = r.new_zeros((inputs.shape[0],) + r.shape[1:])
            out[name].index_add_(0, chunk.example, r)
    return out
