"""Activation patching and its one-backward-pass estimates: attribution patching (Nanda 2023;
Syed, Rager & Conmy 2023) and relevance patching, RelP (Jafari, Eberle, Khakzar & Nanda 2025).

All three answer the same question for every element ``i`` of the output ``a`` of ``layer``: how
much does ``metric`` change when, in the corrupted run, ``a_i`` is replaced by its value in the
clean run?  ``metric`` selects one scalar per example from the model output, like ``target`` (a
class index, a tensor of indices, or a callable ``output -> (B,)`` such as a logit difference).
Results are shaped like the layer output ``(B, *shape)``, which must hold the examples along its
first dimension.  A layer returning a tuple is patched at its first element (the output of
``nn.MultiheadAttention``, whose attention weights are left as they are).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from gradkit.explain._common import (
    HookSet,
    Target,
    _rows,
    check_batch_size,
    check_inputs,
    check_target,
    eval_mode,
    select,
)
from gradkit.explain.cam import check_layer, layer_output, layer_sweep
from gradkit.explain.lrp import _PASS, RULE_NAMES, RuleSpec, Zero, _chain, lrp_propagate, secant_slope

__all__ = ["activation_patching", "attribution_patching", "relevance_patching", "identity_rule"]

_log = logging.getLogger("gradkit")


def _check_pair(clean: Any, corrupt: Any) -> tuple[Tensor, Tensor]:
    clean = check_inputs(clean, "clean").detach()
    corrupt = check_inputs(corrupt, "corrupt").detach()
    if clean.shape != corrupt.shape or clean.dtype != corrupt.dtype or clean.device != corrupt.device:
        raise ValueError(
            f"clean and corrupt must have the same shape, dtype and device, got {tuple(clean.shape)} {clean.dtype} "
            f"{clean.device} and {tuple(corrupt.shape)} {corrupt.dtype} {corrupt.device}"
        )
    return clean, corrupt


def _layer_output(model: Any, layer: nn.Module, x: Tensor, rows: int) -> Tensor:
    """The output of ``layer`` for every example of ``x`` (forward passes only)."""
    parts = []
    with torch.no_grad():
        for _, example in _rows(1, x.shape[0], rows):
            got: list[Tensor] = []
            with HookSet() as hooks:
                hooks.forward(layer, lambda m, args, out: got.append(layer_output(m, out)[0].detach().clone()))
                model(x[example].clone())
            if len(got) != 1:
                raise ValueError(
                    f"the layer {type(layer).__name__} is called {len(got)} times in one forward pass; patching needs one call"
                )
            if got[0].ndim == 0 or got[0].shape[0] != len(example):
                raise ValueError(
                    f"the layer {type(layer).__name__} returned shape {tuple(got[0].shape)} for {len(example)} examples; "
                    "patching needs the examples along its first dimension (e.g. nn.MultiheadAttention(batch_first=True))"
                )
            parts.append(got[0])
    return torch.cat(parts)


def activation_patching(
    model: Any,
    layer: nn.Module,
    clean: Tensor,
    corrupt: Tensor,
    metric: Target = None,
    *,
    batch_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Activation patching, element by element (Vig et al. 2020; Meng et al. 2022): the exact effect
    on ``metric`` of replacing one element of the output of ``layer`` in the corrupted run by its
    value in the clean run,

    .. math:: Δ_i = m\\big(\\text{corrupt run with } a_i := a_i^{clean}\\big) − m(\\text{corrupt run})

    one forward pass per element and example, ``batch_size`` of them per model call.  ``metric``
    selects one scalar per example from the model output, like ``target`` (a class index, a tensor
    of indices, or a callable ``output -> (B,)``, e.g. a logit difference).  Returns ``Δ`` shaped
    like the layer output ``(B, *shape)``.  The reference that :func:`attribution_patching` and
    :func:`relevance_patching` approximate.  Stateless.
    """
    clean, corrupt = _check_pair(clean, corrupt)
    layer = check_layer(model, layer)
    batch = clean.shape[0]
    tgt = check_target(metric, batch)
    rows = check_batch_size(batch_size)
    with eval_mode(model):
        a_clean = _layer_output(model, layer, clean, rows)
        flat_clean = a_clean.reshape(batch, -1)
        n_el = flat_clean.shape[1]
        with torch.no_grad():
            base = torch.cat([select(model(corrupt[e].clone()), tgt, e) for _, e in _rows(1, batch, rows)])
        effect = flat_clean.new_zeros(n_el, batch)
        bar = tqdm(total=-(-n_el * batch // rows), desc="activation patching", disable=not progress, leave=False)
        try:
            for element, example in _rows(n_el, batch, rows):
                def patch(m: nn.Module, args: Any, out: Any) -> Any:
                    first, rebuild = layer_output(m, out)
                    first = first.clone(memory_format=torch.contiguous_format)
                    first.view(len(example), -1)[torch.arange(len(example)), element] = flat_clean[example, element]
                    return rebuild(first)

                with HookSet() as hooks, torch.no_grad():
                    hooks.forward(layer, patch)
                    value = select(model(corrupt[example].clone()), tgt, example)
                effect[element, example] = value - base[example]
                bar.update(1)
        finally:
            bar.close()
    return effect.T.reshape(a_clean.shape)


def attribution_patching(
    model: Any,
    layer: nn.Module,
    clean: Tensor,
    corrupt: Tensor,
    metric: Target = None,
    *,
    batch_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Attribution patching (Nanda 2023, "Attribution Patching: Activation Patching At Industrial
    Scale"; Syed, Rager & Conmy 2023, arXiv:2310.10348): the first-order estimate of
    :func:`activation_patching`,

    .. math:: Δ_i ≈ (a_i^{clean} − a_i^{corrupt})\\; \\frac{∂m}{∂a_i}\\Big|_{corrupt}

    one forward pass on the clean inputs and one forward/backward pass on the corrupted ones (the
    convention of the RelP code: the gradient is taken in the run that is patched).  Shapes and
    ``metric`` as :func:`activation_patching`.  Exact when ``m`` is linear in the activation.
    Stateless.
    """
    clean, corrupt = _check_pair(clean, corrupt)
    layer = check_layer(model, layer)
    batch = clean.shape[0]
    tgt = check_target(metric, batch)
    rows = check_batch_size(batch_size)
    with eval_mode(model):
        a_clean = _layer_output(model, layer, clean, rows)
        return _gradient_patching(model, layer, a_clean, corrupt, tgt, rows, progress, "attribution patching")


def _gradient_patching(model: Any, layer: nn.Module, a_clean: Tensor, corrupt: Tensor, tgt: Any, rows: int,
                       progress: bool, desc: str) -> Tensor:
    """``(a_clean − a) ⊙ ∂m/∂a`` at the output of ``layer`` in the corrupted run (``model`` in eval mode)."""
    out = torch.zeros_like(a_clean)
    for chunk in layer_sweep(model, [layer], lambda step, example: corrupt[example], 1, corrupt.shape[0], tgt,
                             batch_size=rows, progress=progress, desc=desc):
        if len(chunk.activations[0]) != 1:
            raise ValueError(f"the layer {type(layer).__name__} is called more than once; patching needs one call")
        a, g = chunk.activations[0][0], chunk.grads[0][0]
        out.index_add_(0, chunk.example, (a_clean[chunk.example] - a) * g)
    return out


# ------------------------------------------------------------------- relevance patching (RelP)
RuleFn = Callable[[nn.Module, tuple, dict, Any], Tensor]

_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
#: element-wise activations whose gradient already is the identity rule's σ(a)/a (piecewise linear through 0)
_GRADIENT_IS_RULE = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
#: leaf modules that are linear (or max pooling) in eval mode: their gradient is the LRP-0 coefficient
_LINEAR = (
    nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag, _BatchNorm, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d,
    nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
    nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Fold, nn.Unfold, nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd, nn.modules.padding._CircularPadNd,
)
_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _input(args: tuple, kwargs: dict) -> Tensor:
    """The first input of a module call."""
    x = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(x, Tensor):
        raise TypeError(f"the module's first input must be a tensor, got {type(x).__name__}")
    return x


def _preserve(out: Tensor, lin: Tensor) -> Tensor:
    """The value of ``out`` with the gradient of ``lin``: forward values are unchanged (``lin − lin`` is
    exactly 0), the backward pass goes through ``lin`` only."""
    return out.detach() + (lin - lin.detach())


def identity_rule(module: nn.Module | None, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
    """The identity rule for an element-wise activation ``y = σ(x)`` (Achtibat et al. 2024, AttnLRP,
    arXiv:2402.05602; Jafari et al. 2025, arXiv:2508.21258): relevance passes unchanged, as the
    linearisation ``x · (σ(x)/x)`` with the ratio constant (0 where ``x = 0``).  In the signature of
    ``relevance_patching(rules={ModuleType: fn})``: use it for your own element-wise activation modules."""
    x = _input(args, kwargs)
    return x * secant_slope(x.detach(), output.detach())


def _half_rule(module: nn.GLU, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
    """``y = a ⊙ σ(b)`` (``a, b`` the halves of ``x`` along ``dim``): half of ``R_y`` to each factor,
    the gate's half on through σ with the identity rule, ``R_a = R_b = R_y/2``:
    ``lin = a · σ(b)/2 + b · (a σ(b)/2)/b``, the ratios constant."""
    a, b = _input(args, kwargs).chunk(2, dim=module.dim)
    half = output.detach() / 2
    return a * (torch.sigmoid(b.detach()) / 2) + b * secant_slope(b.detach(), half)


def _layer_norm_rule(module: nn.LayerNorm, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
    """LN-rule: ``(x − mean x) / σ · w + b`` with ``σ = √(Var x + ε)`` constant."""
    x = _input(args, kwargs)
    dims = tuple(range(-len(module.normalized_shape), 0))
    sigma = torch.sqrt(x.detach().var(dims, correction=0, keepdim=True) + module.eps)
    y = (x - x.mean(dims, keepdim=True)) / sigma
    y = y if module.weight is None else y * module.weight
    return y if module.bias is None else y + module.bias


def _rms_norm_rule(module: nn.RMSNorm, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
    """LN-rule for RMSNorm: ``x / rms · w`` with ``rms = √(mean x² + ε)`` constant."""
    x = _input(args, kwargs)
    dims = tuple(range(-len(module.normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if module.eps is None else module.eps
    y = x / torch.sqrt(x.detach().pow(2).mean(dims, keepdim=True) + eps)
    return y if module.weight is None else y * module.weight


def _attention_rule(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any) -> Tensor:
    """AH-rule: ``out = W_o concat_h(P_h · V_h) + b_o`` with the probabilities
    ``P_h = softmax(Q_h K_hᵀ/√d_h + mask)`` constant: linear in ``value``, nothing through query and key."""
    m = module
    p = _MHA_SIGNATURE.bind(m, *args, **kwargs)
    p.apply_defaults()
    a = p.arguments
    query, value = a["query"], a["value"]
    with torch.no_grad():  # the module's own forward, without hooks, for the per-head probabilities (B, H, L, S)
        _, probs = nn.MultiheadAttention.forward(
            m, query, a["key"], value, key_padding_mask=a["key_padding_mask"], need_weights=True,
            attn_mask=a["attn_mask"], average_attn_weights=False, is_causal=a["is_causal"])
    batched = query.dim() == 3
    if not batched:
        value, probs = value.unsqueeze(1), probs.unsqueeze(0)
    elif m.batch_first:
        value = value.transpose(0, 1)
    e, h = m.embed_dim, m.num_heads  # value is (S, B, E_v) from here, as in F.multi_head_attention_forward
    w_v = m.in_proj_weight[2 * e:] if m._qkv_same_embed_dim else m.v_proj_weight
    v = F.linear(value, w_v, None if m.in_proj_bias is None else m.in_proj_bias[2 * e:])
    if m.bias_v is not None:
        v = torch.cat([v, m.bias_v.expand(1, v.shape[1], e)])
    v = v.reshape(v.shape[0], v.shape[1], h, e // h).permute(1, 2, 0, 3)  # (B, H, S, d_h)
    if m.add_zero_attn:
        v = torch.cat([v, v.new_zeros(v.shape[:2] + (1, v.shape[3]))], 2)
    heads = probs @ v  # (B, H, L, d_h)
    out = F.linear(heads.permute(2, 0, 1, 3).reshape(heads.shape[2], heads.shape[0], e), m.out_proj.weight, m.out_proj.bias)
    if not batched:
        return out.squeeze(1)
    return out.transpose(0, 1) if m.batch_first else out


#: module type → (linearisation, name, whether its value is checked against the module's output)
_BUILTIN_RULES: dict[type, tuple[RuleFn, str, bool]] = {
    **{t: (identity_rule, "identity rule", False) for t in _PASS + (
        nn.Sigmoid, nn.Softplus, nn.Mish, nn.SELU, nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softsign)
       if t not in _GRADIENT_IS_RULE},
    nn.LayerNorm: (_layer_norm_rule, "LN-rule", True),
    nn.RMSNorm: (_rms_norm_rule, "LN-rule", True),
    nn.MultiheadAttention: (_attention_rule, "AH-rule", True),
    nn.GLU: (_half_rule, "half-rule", False),
}


def _check_rules(rules: Any) -> dict[type, tuple[RuleFn, str, bool]]:
    if rules is None:
        return {}
    if not isinstance(rules, dict):
        raise TypeError(f"rules must be a dict {{module type: fn(module, args, kwargs, output)}}, got {type(rules).__name__}")
    table = {}
    for key, fn in rules.items():
        if not (isinstance(key, type) and issubclass(key, nn.Module)):
            raise TypeError(f"rules keys must be nn.Module subclasses (types, not instances or names), got {key!r}")
        if not callable(fn):
            raise TypeError(f"rules[{key.__name__}] must be callable fn(module, args, kwargs, output), got {type(fn).__name__}")
        table[key] = (fn, f"rules[{key.__name__}] ({getattr(fn, '__name__', type(fn).__name__)})", True)
    return table


def _rule_hook(fn: RuleFn, label: str, name: str, check: bool) -> Callable[..., Any]:
    """Forward hook (``with_kwargs=True``) replacing the module's (first) output by
    :func:`_preserve` of it and the rule's linearisation; other outputs are passed on detached."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        try:
            first, _ = layer_output(module, out)
        except TypeError as err:
            raise TypeError(f"{label} on {name}: {err}") from None
        lin = fn(module, args, kwargs, out)
        if not isinstance(lin, Tensor) or lin.shape != first.shape:
            got = tuple(lin.shape) if isinstance(lin, Tensor) else type(lin).__name__
            raise ValueError(f"{label} on {name} ({type(module).__name__}) must return a tensor shaped like the module's "
                             f"output {tuple(first.shape)}, got {got}")
        if check:
            with torch.no_grad():
                tol = torch.finfo(first.dtype).eps ** 0.5
                scale = max(1.0, float(first.abs().nan_to_num(0.0, 0.0, 0.0).max())) if first.numel() else 1.0
                if not torch.isclose(lin, first, rtol=tol, atol=tol * scale, equal_nan=True).all():
                    err = float((lin - first).abs().nan_to_num(float("inf")).max())
                    raise ValueError(f"{label} on {name} ({type(module).__name__}) returned values that differ from the "
                                     f"module's output by up to {err:.3g}; a rule must return the output's value")
        new = _preserve(first, lin)
        if first is out:
            return new
        rest = [t.detach() if isinstance(t, Tensor) else t for t in out[1:]]
        return (new, *rest) if isinstance(out, tuple) else [new, *rest]

    return hook


def _linearised_activation(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The identity rule for a function-valued activation (``TransformerEncoderLayer(activation="gelu")``)."""

    def activation(x: Tensor) -> Tensor:
        y = fn(x)
        return _preserve(y, identity_rule(None, (x,), {}, y))

    return activation


def _install_rules(model: nn.Module, hooks: HookSet, restore: ExitStack, user: dict) -> None:
    """Hook every module of a type with a rule (``user`` before the built-in ones, matched along the
    type's base classes) and give function-valued transformer activations the identity rule; log them."""
    table = {**_BUILTIN_RULES, **user}
    done, other = [], []
    for name, m in model.named_modules():
        name = name or "model"
        entry = next((table[t] for t in type(m).__mro__ if t in table), None)
        if entry is not None:
            fn, label, check = entry
            if getattr(m, "inplace", False) is True and fn is identity_rule:
                raise ValueError(f"{name} ({type(m).__name__}) works in place; the identity rule needs its input. "
                                 "Build it with inplace=False")
            hooks.forward(m, _rule_hook(fn, label, name, check), with_kwargs=True)
            done.append(f"{name} ({type(m).__name__}): {label}")
        elif isinstance(m, _TRANSFORMER_LAYERS) and not isinstance(m.activation, nn.Module):
            original = m.activation
            m.activation = _linearised_activation(original)
            restore.callback(setattr, m, "activation", original)
            done.append(f"{name}.activation ({getattr(original, '__name__', type(original).__name__)}): identity rule")
        elif isinstance(m, _GRADIENT_IS_RULE):
            done.append(f"{name} ({type(m).__name__}): identity rule (= its gradient)")
        elif (next(m.children(), None) is None and not isinstance(m, _LINEAR)
              or isinstance(m, _BatchNorm) and m.running_mean is None):
            other.append(f"{name} ({type(m).__name__})")
    _log.info("relevance_patching: LRP-0 (the gradient) on linear modules and %s", "; ".join(done) or "no other rule")
    if other:
        _log.warning(
            "relevance_patching: no LRP rule for %s; their plain gradient is used, which is the LRP-0 coefficient only "
            "if they are linear. Pass rules={ModuleType: fn} for those that are not", ", ".join(other))


def _is_lrp0(rule: Any) -> bool:
    return isinstance(rule, Zero) or isinstance(rule, str) and RULE_NAMES.get(rule) is Zero


def relevance_patching(
    model: nn.Module,
    layer: nn.Module,
    clean: Tensor,
    corrupt: Tensor,
    metric: Target = None,
    rule: RuleSpec = "zero",
    *,
    rules: dict[type, RuleFn] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Relevance patching, RelP (Jafari, Eberle, Khakzar & Nanda 2025, "RelP: Faithful and Efficient
    Circuit Discovery via Relevance Patching", arXiv:2508.21258): attribution patching with the
    local gradient replaced by the LRP propagation coefficient,

    .. math:: Δ_i ≈ (a_i^{clean} − a_i^{corrupt})\\; c_i\\big|_{corrupt}, \\qquad R_i = a_i\\, c_i

    where ``c`` is the LRP coefficient of the scalar ``m`` chosen by ``metric`` at the output ``a`` of
    ``layer`` in the corrupted run.  Shapes and ``metric`` as :func:`activation_patching`.  Stateless.

    **Chains.**  For an ``nn.Sequential`` that :func:`~gradkit.explain.lrp.lrp` reads as a chain
    (and ``rules`` not given), ``c`` is the coefficient of :func:`~gradkit.explain.lrp.lrp` with
    ``rule`` (any of its rules): for an affine layer above it ``c = ρ(W)ᵀ s``, through an
    element-wise activation ``σ`` (identity rule) ``c_in = c_out σ(a)/a`` instead of
    ``c_out σ'(a)``.  ``layer`` must then be one of the chain's steps (not a ``Linear``/convolution
    folded with the BatchNorm after it: patch the BatchNorm instead).

    **Any other model** (transformers, residual networks; also a chain when ``rules`` is given):
    the paper's rules, LRP-0 for linear layers (``rule`` must be ``"zero"``, other rules raise a
    ``ValueError``) and, after Ali et al. 2022 ("XAI for Transformers: Better Explanations through
    Conservative Propagation", arXiv:2202.07304) and Achtibat et al. 2024 (AttnLRP,
    arXiv:2402.05602), with the quantities below held constant:

    * identity rule (:func:`identity_rule`) for the element-wise activation modules ``GELU``,
      ``SiLU``, ``Tanh``, ``ELU``, ``Sigmoid``, ``Softplus``, ``Mish``, ``SELU``, ``CELU``,
      ``Hardswish``, ``Hardsigmoid``, ``Hardtanh``/``ReLU6``, ``Softsign`` and the function-valued
      ``activation`` of ``nn.TransformerEncoderLayer``/``nn.TransformerDecoderLayer``
      (``activation="gelu"``): ``c_in = c_out σ(a)/a`` (``ReLU``, ``LeakyReLU``, ``PReLU``: equal to
      the gradient); in-place activations are refused;
    * LN-rule for ``nn.LayerNorm``: ``y = (x − \\bar x)/σ ⊙ w + b`` with ``σ = √(Var x + ε)``
      constant; ``nn.RMSNorm``: ``y = x / rms ⊙ w`` with ``rms = √(mean x² + ε)`` constant;
    * AH-rule for ``nn.MultiheadAttention``: the probabilities ``P_h = softmax(Q_h K_hᵀ/√d_h + mask)``
      constant, so ``out = W_o concat_h(P_h V_h) + b_o`` is linear in the value input and nothing
      flows through queries and keys (every mask, ``batch_first``, ``kdim``/``vdim``, ``bias``,
      ``add_bias_kv``, ``add_zero_attn``); the attention weights it returns are passed on detached;
    * half-rule for ``nn.GLU``, ``y = a ⊙ σ(b)``: ``R_a = R_b = R_y/2`` (``b``'s half through σ by the
      identity rule), i.e. ``c_a = c_y σ(b)/2``, ``c_b = c_y a σ(b)/(2b)``.

    With LRP-0 on linear layers ``c`` is then the gradient of the modified network, computed by one
    backward pass while forward hooks replace each such module's output by
    ``out.detach() + (lin(x) − lin(x).detach())`` (``lin`` the rule's linearisation): forward values
    are unchanged, only the backward differs.  Linear layers, convolutions, embeddings, eval
    BatchNorm, dropout, pooling (max: winner-take-all; average: LRP-0), reshapes and residual
    additions need no rule: their gradient is the LRP-0 coefficient.

    **Only modules of the listed types are linearised.**  Nonlinearities called as functions inside
    a custom ``forward`` (``F.gelu``, ``torch.softmax`` in hand-written attention,
    ``F.scaled_dot_product_attention``, a hand-written normalisation) are invisible to hooks and
    contribute their plain gradient.  Put them in modules and pass ``rules={ModuleType: fn}``:
    ``fn(module, args, kwargs, output)`` returns a tensor equal in value to the module's (first)
    output (checked, to ``√eps`` of the dtype) and linear in what should carry relevance, the rest
    detached (e.g. :func:`identity_rule` for an element-wise activation, or ``P.detach() @ v`` for
    an attention module); an entry replaces the built-in rule of its type, and types are matched
    along the module's base classes, most specific first.  The rules used are logged at INFO level
    on the ``"gradkit"`` logger; leaf modules of other types not known to be linear are listed in a
    warning.  In a linear network RelP equals attribution and activation patching exactly.
    """
    clean, corrupt = _check_pair(clean, corrupt)
    layer = check_layer(model, layer)
    rows = check_batch_size(batch_size)
    table = _check_rules(rules)
    with eval_mode(model):
        reason = "rules is given" if table else None
        if reason is None:
            try:
                _chain(model)
            except (TypeError, ValueError) as err:
                reason = str(err)
        if reason is None:
            return _relp_chain(model, layer, clean, corrupt, metric, rule, rows, progress)
        if not _is_lrp0(rule):
            raise ValueError(
                f"rule={rule!r} needs a model that lrp reads as a chain, but {reason}; for other models relevance_patching "
                "implements the paper's rules with LRP-0 on linear layers only (rule='zero')")
        return _relp_hooks(model, layer, clean, corrupt, metric, table, rows, progress)


def _relp_chain(model: nn.Module, layer: nn.Module, clean: Tensor, corrupt: Tensor, metric: Any, rule: Any, rows: int,
                progress: bool) -> Tensor:
    """RelP with the coefficients of :func:`~gradkit.explain.lrp.lrp_propagate`."""
    a_clean = _layer_output(model, layer, clean, rows)
    out = torch.zeros_like(a_clean)
    index = None
    for chunk in lrp_propagate(model, corrupt, metric, rule, batch_size=rows, progress=progress,
                               desc="relevance patching"):
        if index is None:
            index = next((i for i, mods in enumerate(chunk.modules) if mods and mods[-1] is layer), None)
            if index is None:
                folded = next((name for name, mods in zip(chunk.names, chunk.modules) if any(m is layer for m in mods)), None)
                hint = f"; it is folded with the BatchNorm {folded}: patch that instead" if folded is not None else ""
                raise ValueError(f"layer {type(layer).__name__} is not a step of the model{hint}")
        a, c = chunk.activations[index], chunk.coefficients[index]
        out.index_add_(0, chunk.example, (a_clean[chunk.example] - a) * c)
    return out


def _relp_hooks(model: nn.Module, layer: nn.Module, clean: Tensor, corrupt: Tensor, metric: Any, rules: dict, rows: int,
                progress: bool) -> Tensor:
    """RelP with LRP-0 as attribution patching through the model linearised by the rules' hooks."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"relevance_patching needs an nn.Module model (its modules get the rules), got {type(model).__name__}")
    tgt = check_target(metric, clean.shape[0])
    with eval_mode(model):
        a_clean = _layer_output(model, layer, clean, rows)
        with HookSet() as hooks, ExitStack() as restore:
            _install_rules(model, hooks, restore, rules)
            return _gradient_patching(model, layer, a_clean, corrupt, tgt, rows, progress, "relevance patching")
