"""Exact Hessian-vector products through a chain of linear and convolutional layers, pooling and
elementwise activations, by Pearlmutter's R-operator (Neural Computation 6(1), 1994) written out
per layer.

Notation (for a linear layer; a convolution has the same bilinear structure, with its
input-gradient and weight-gradient maps in place of ``δ W`` and ``δᵀ x``): a layer
``z = x Wᵀ + b``, an activation ``x' = σ(z)``, ``f`` the chain's output,
``L(f)`` the batch loss, ``δ_u = ∂L/∂u`` and ``R{u}`` the derivative of ``u`` along the direction
``V = (V_W, V_b)`` of the parameters.  With ``R{x_0} = 0`` for the input:

* forward: ``R{z} = R{x} Wᵀ + x V_Wᵀ + V_b`` and ``R{x'} = σ'(z) ⊙ R{z}``;
* at the output: ``R{δ_f} = ∇²_f L · R{f}`` (closed form for the usual losses,
  :func:`gradkit.core.losses.output_hessian_vp`);
* backward: ``δ_z = σ'(z) ⊙ δ_x'`` and ``R{δ_z} = σ'(z) ⊙ R{δ_x'} + σ''(z) ⊙ R{z} ⊙ δ_x'``;
  ``δ_x = δ_z W`` and ``R{δ_x} = R{δ_z} W + δ_z V_W``;
* the product: ``(H V)_W = R{δ_z}ᵀ x + δ_zᵀ R{x}`` and ``(H V)_b = Σ_rows R{δ_z}``;
* a max-pooling (piecewise linear, ``σ'' = 0``) moves ``R{x}`` forward and ``δ``, ``R{δ}``
  backward through the positions of the maxima of ``x``; an average pooling or ``Flatten`` is
  linear and moves all three through itself and its transpose.

Autograd's double backward and its forward-over-reverse both also form the weight gradients
``δ_zᵀ x`` of the primal pass, which the product never reads.  Leaving them out, ``L`` layers cost
``8L − 5`` matrix products against ``3L − 1`` for a gradient (``9L − 5`` by autograd); for a block
of ``k`` directions the primal pass (``2L − 1``) is shared and each direction adds ``6L − 4``.

The same forward pass gives the Jacobian products of the generalised Gauss–Newton and Fisher
operators (:func:`chain_jacobian`): ``J v`` is the R forward pass, ``Jᵀ u`` a backward pass that
forms the weight gradients of ``⟨u, f⟩``.

:func:`chain_plan` recognises the models this applies to and returns ``None`` for every other one
(the operator then uses autograd): an exact ``nn.Sequential`` (nested ones allowed) of exact
``nn.Linear``, ``nn.Conv1d/2d/3d`` (zero padding), eval-mode ``BatchNorm1d/2d/3d`` with running
statistics (a per-channel linear layer of the centred input), max and average pooling, eval-mode
``Dropout``, ``Identity``, ``Flatten`` and the activations of :data:`ACTIVATIONS`, with no module
hooks, no parameter shared between layers, and a single tensor as input (batched, for the layers
with spatial dimensions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gradkit.core.functional import FunctionalModel, global_module_hooks, module_has_hooks

__all__ = ["ACTIVATIONS", "chain_plan", "chain_hvp", "chain_jacobian"]

# Each activation maps ``(module, z, y = σ(z))`` to ``σ'(z)``, and, for the second-order term,
# ``(module, z, y, σ'(z), δ_y, δ_z = σ'(z) δ_y)`` to ``(e, c)`` with ``σ''(z) ⊙ δ_y = c · e`` (``None``
# where ``σ'' = 0``).  Writing the term through ``δ_z`` saves passes over the activations.
First = Callable[[nn.Module, Tensor, Tensor], Tensor]
Second = Callable[[nn.Module, Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, float]]


def _tanh(m: nn.Module, z: Tensor, y: Tensor) -> Tensor:
    return torch.addcmul(y.new_ones(()), y, y, value=-1)  # 1 − y²


def _tanh2(m: nn.Module, z: Tensor, y: Tensor, d1: Tensor, dy: Tensor, dz: Tensor) -> tuple[Tensor, float]:
    return y * dz, -2.0  # σ'' = −2 y σ'


def _sigmoid(m: nn.Module, z: Tensor, y: Tensor) -> Tensor:
    return torch.addcmul(y, y, y, value=-1)  # y (1 − y)


def _sigmoid2(m: nn.Module, z: Tensor, y: Tensor, d1: Tensor, dy: Tensor, dz: Tensor) -> tuple[Tensor, float]:
    return torch.addcmul(dz, y, dz, value=-2), 1.0  # σ'' = σ' (1 − 2y)


def _relu(m: nn.Module, z: Tensor, y: Tensor) -> Tensor:
    return (z > 0).to(z.dtype)


def _leaky_relu(m: nn.Module, z: Tensor, y: Tensor) -> Tensor:
    return torch.where(z > 0, 1.0, z.new_tensor(m.negative_slope))


def _gaussian(z: Tensor) -> Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _gelu(m: nn.Module, z: Tensor, y: Tensor) -> Tensor:
    # y = z Φ(z): σ' = Φ + z φ
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * _gaussian(z)


def _gelu2(m: nn.Module, z: Tensor, y: Tensor, d1: Tensor, dy: Tensor, dz: Tensor) -> tuple[Tensor, float]:
    return _gaussian(z) * (2 - z * z) * dy, 1.0  # σ'' = φ (2 − z²)


def _silu(m: nn.Module, z: Tensor, y: Tensor) -> Tensor:
    s = torch.sigmoid(z)  # y = z s: σ' = s (1 + z (1 − s))
    return s * (1 + z * (1 - s))


def _silu2(m: nn.Module, z: Tensor, y: Tensor, d1: Tensor, dy: Tensor, dz: Tensor) -> tuple[Tensor, float]:
    s = torch.sigmoid(z)  # σ'' = s (1 − s) (2 + z (1 − 2s))
    return s * (1 - s) * (2 + z * (1 - 2 * s)) * dy, 1.0


def _softplus(m: nn.Module, z: Tensor, y: Tensor) -> Tensor:
    # torch's softplus is the identity where β z > threshold; elsewhere σ' = sigmoid(β z)
    return torch.where(m.beta * z > m.threshold, 1.0, torch.sigmoid(m.beta * z))


def _softplus2(m: nn.Module, z: Tensor, y: Tensor, d1: Tensor, dy: Tensor, dz: Tensor) -> tuple[Tensor, float]:
    return d1 * (1 - d1) * dy, float(m.beta)  # σ'' = β σ' (1 − σ'), 0 on the identity part


def _elu(m: nn.Module, z: Tensor, y: Tensor) -> Tensor:
    return torch.where(z > 0, 1.0, y + m.alpha)  # α (eᶻ − 1) for z ≤ 0: σ' = y + α


def _elu2(m: nn.Module, z: Tensor, y: Tensor, d1: Tensor, dy: Tensor, dz: Tensor) -> tuple[Tensor, float]:
    return torch.where(z > 0, 0.0, dz), 1.0  # σ'' = σ' for z ≤ 0, 0 above


#: exact module types, mapped to their ``(σ', σ'' term)`` functions (above)
ACTIVATIONS: dict[type, tuple[First, Second | None]] = {
    nn.ReLU: (_relu, None),
    nn.LeakyReLU: (_leaky_relu, None),
    nn.Tanh: (_tanh, _tanh2),
    nn.Sigmoid: (_sigmoid, _sigmoid2),
    nn.SiLU: (_silu, _silu2),
    nn.Softplus: (_softplus, _softplus2),
    nn.ELU: (_elu, _elu2),
    nn.GELU: (_gelu, _gelu2),
}
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_MAX_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_AVG_POOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
              nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}
_LINEAR_MAPS = (nn.Flatten, *_AVG_POOLS)


class _Dense:
    """The bilinear maps of ``nn.Linear`` (``z = x Wᵀ + b`` on ``(..., in)`` inputs)."""

    channel = -1  # dimension of the output features (and the bias)

    def __init__(self, module: nn.Linear) -> None:
        self.module = module

    def prepare(self, x: Tensor) -> Tensor:
        return x

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)

    def linear(self, t: Tensor, w: Tensor) -> Tensor:
        return F.linear(t, w)

    def forward_into(self, acc: Tensor, x: Tensor, w: Tensor) -> Tensor:
        """``acc + x Wᵀ``, in place."""
        acc.view(-1, w.shape[0]).addmm_(x.reshape(-1, w.shape[1]), w.T)
        return acc

    def input(self, delta: Tensor, w: Tensor, in_shape: torch.Size) -> Tensor:
        """``δ W``: the gradient with respect to the input."""
        return delta @ w

    def input_into(self, acc: Tensor, delta: Tensor, w: Tensor) -> Tensor:
        acc.view(-1, w.shape[1]).addmm_(delta.reshape(-1, w.shape[0]), w)
        return acc

    def weight(self, x: Tensor, delta: Tensor, acc: Tensor | None = None) -> Tensor:
        """``δᵀ x`` summed over all rows (added into ``acc`` when given)."""
        rows_d, rows_x = delta.reshape(-1, delta.shape[-1]), x.reshape(-1, x.shape[-1])
        return rows_d.T @ rows_x if acc is None else acc.addmm_(rows_d.T, rows_x)


def _resolved_padding(m: nn.Module, d: int) -> tuple[int, ...] | None:
    if m.padding == "valid":
        return (0,) * d
    if m.padding == "same":
        span = [dil * (size - 1) for dil, size in zip(m.dilation, m.kernel_size)]
        return None if any(s % 2 for s in span) else tuple(s // 2 for s in span)
    return tuple(m.padding)


class _Conv:
    """The bilinear maps of ``nn.Conv1d/2d/3d`` (zero padding) on batched ``(N, C, ...)`` inputs;
    the transposes are :mod:`torch.nn.grad`'s input and weight gradients."""

    channel = 1

    def __init__(self, module: nn.Module, padding: tuple[int, ...]) -> None:
        d = _CONVS[type(module)]
        self.module = module
        self.conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
        grad = torch.nn.grad
        self.conv_input = (grad.conv1d_input, grad.conv2d_input, grad.conv3d_input)[d - 1]
        self.conv_weight = (grad.conv1d_weight, grad.conv2d_weight, grad.conv3d_weight)[d - 1]
        self.args = (module.stride, padding, module.dilation, module.groups)

    def prepare(self, x: Tensor) -> Tensor:
        return x

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return self.conv(x, w, b, *self.args)

    def linear(self, t: Tensor, w: Tensor) -> Tensor:
        return self.conv(t, w, None, *self.args)

    def forward_into(self, acc: Tensor, x: Tensor, w: Tensor) -> Tensor:
        return acc.add_(self.conv(x, w, None, *self.args))

    def input(self, delta: Tensor, w: Tensor, in_shape: torch.Size) -> Tensor:
        return self.conv_input(in_shape, w, delta, *self.args)

    def input_into(self, acc: Tensor, delta: Tensor, w: Tensor) -> Tensor:
        return acc.add_(self.conv_input(acc.shape, w, delta, *self.args))

    def weight(self, x: Tensor, delta: Tensor, acc: Tensor | None = None) -> Tensor:
        out = self.conv_weight(x, self.module.weight.shape, delta, *self.args)
        return out if acc is None else acc.add_(out)


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: layers that need a batched (N, C, *spatial) input, by their number of spatial dimensions
#: (BatchNorm1d takes (N, C) and (N, C, L) alike)
_SPATIAL_DIMS = {**_CONVS, **_MAX_POOLS, **_AVG_POOLS, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


class _Norm:
    """Eval-mode BatchNorm as a bilinear map of the centred input ``x̃ = x − μ`` and the scale
    ``γ``: ``z = x̃ · γ / sqrt(σ² + ε) + β`` per channel (running ``μ``, ``σ²``), i.e. a diagonal
    linear layer; its "input gradient" and "weight gradient" are products and channel sums."""

    channel = 1

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.mean = module.running_mean.detach()
        self.inv_std = torch.rsqrt(module.running_var.detach() + module.eps)

    def _per_channel(self, c: Tensor, ndim: int) -> Tensor:
        return c.view(-1, *[1] * (ndim - 2))

    def unit_weight(self) -> Tensor:
        return torch.ones_like(self.inv_std)

    def prepare(self, x: Tensor) -> Tensor:
        return x - self._per_channel(self.mean, x.ndim)

    def forward(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        z = x * self._per_channel(w * self.inv_std, x.ndim)
        return z if b is None else z.add_(self._per_channel(b, x.ndim))

    def linear(self, t: Tensor, w: Tensor) -> Tensor:
        return self.forward(t, w, None)

    def forward_into(self, acc: Tensor, t: Tensor, w: Tensor) -> Tensor:
        return acc.addcmul_(t, self._per_channel(w * self.inv_std, t.ndim))

    def input(self, delta: Tensor, w: Tensor, in_shape: torch.Size) -> Tensor:
        return self.forward(delta, w, None)

    def input_into(self, acc: Tensor, delta: Tensor, w: Tensor) -> Tensor:
        return self.forward_into(acc, delta, w)

    def weight(self, x: Tensor, delta: Tensor, acc: Tensor | None = None) -> Tensor:
        """``Σ δ x̃ / sqrt(σ² + ε)`` over all but the channel dimension."""
        out = (delta * x).sum([d for d in range(x.ndim) if d != 1]).mul_(self.inv_std)
        return out if acc is None else acc.add_(out)


@dataclass
class Step:
    """One layer of a chain: ``kind`` is ``"affine"`` (with its bilinear maps ``ops``),
    ``"activation"``, ``"max_pool"`` or ``"linear_map"``; ``weight``/``bias`` index the operator's
    variables (``None``: a constant or no bias)."""

    kind: str
    module: nn.Module
    ops: Any = None
    weight: int | None = None
    bias: int | None = None


def _flat_children(model: nn.Module) -> list[nn.Module] | None:
    if type(model) is not nn.Sequential or module_has_hooks(model):
        return None
    layers = []
    for child in model:
        inner = _flat_children(child) if type(child) is nn.Sequential else [child]
        if inner is None:
            return None
        layers.extend(inner)
    return layers


def _supported(m: nn.Module) -> bool:
    if module_has_hooks(m):
        return False
    kind = type(m)
    if kind in _PASS_THROUGH:
        return not m.training or kind is nn.Identity
    if kind is nn.GELU:
        return m.approximate == "none"
    if kind in _CONVS:
        return m.padding_mode == "zeros" and _resolved_padding(m, _CONVS[kind]) is not None
    if kind in _MAX_POOLS:
        return not m.return_indices
    if kind in _BATCH_NORMS:  # without running statistics eval mode normalises by the batch
        return not m.training and m.running_mean is not None and m.running_var is not None
    return kind in ACTIVATIONS or kind is nn.Linear or kind in _LINEAR_MAPS


def chain_plan(model: nn.Module, fm: FunctionalModel) -> list[Step] | None:
    """The layers of ``model`` as :class:`Step` s if the R-operator applies, else ``None``."""
    layers = _flat_children(model)
    if layers is None or global_module_hooks() or not all(_supported(m) for m in layers):
        return None
    ids = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    if len(ids) != len(set(ids)):  # tied weights: the chain would miss their cross terms
        return None
    index = {name: i for i, name in enumerate(fm.names)}
    names = {id(m): prefix for prefix, m in model.named_modules()}
    plan = []
    for m in layers:
        kind = type(m)
        if kind is nn.Linear or kind in _CONVS or kind in _BATCH_NORMS:
            prefix = names[id(m)]
            ops = (_Dense(m) if kind is nn.Linear else _Norm(m) if kind in _BATCH_NORMS
                   else _Conv(m, _resolved_padding(m, _CONVS[kind])))
            plan.append(Step("affine", m, ops, index.get(f"{prefix}.weight"), index.get(f"{prefix}.bias")))
        elif kind in _MAX_POOLS:
            plan.append(Step("max_pool", m))
        elif kind in _LINEAR_MAPS:
            plan.append(Step("linear_map", m))
        elif kind not in _PASS_THROUGH:
            plan.append(Step("activation", m))
    return plan


class NotBatched(ValueError):
    """A convolution, pooling or BatchNorm2d/3d met an input without a batch dimension (the
    operator then uses autograd, where torch's own layers accept or refuse it)."""


class _Pass:
    """The primal forward pass of a chain over one batch, and the products built on it.

    Saves the input of every step (affine layers: the input of their bilinear map), ``σ'`` of
    every activation from the first layer with a variable on, and the output ``f``.  Raises
    :class:`NotBatched` for unbatched inputs to convolutions or poolings."""

    def __init__(self, plan: list[Step], fm: FunctionalModel, inputs: Tensor) -> None:
        self.plan, self.fm = plan, fm
        # the first layer with a variable: nothing before it needs a derivative
        self.first = next(i for i, s in enumerate(plan) if s.kind == "affine" and (s.weight, s.bias) != (None, None))
        x, self.saved, self.d1 = inputs, [], [None] * len(plan)
        with torch.no_grad():
            for i, step in enumerate(plan):
                dims = _SPATIAL_DIMS.get(type(step.module))
                if dims is not None and x.ndim != dims + 2:
                    raise NotBatched(f"{type(step.module).__name__} got an input of shape {tuple(x.shape)}")
                if step.kind == "affine":
                    x = step.ops.prepare(x)  # the input of the bilinear map (BatchNorm: centred)
                    self.saved.append(x)
                    x = step.ops.forward(x, self.weight(step), self.bias(step))
                elif step.kind == "activation":
                    # an in-place activation (ReLU(inplace=True)) would overwrite z, or the user's input
                    y = step.module(x.clone() if getattr(step.module, "inplace", False) else x)
                    self.saved.append((x, y))
                    if i > self.first:
                        self.d1[i] = ACTIVATIONS[type(step.module)][0](step.module, x, y)
                    x = y
                elif step.kind == "max_pool":
                    m = step.module
                    pool = getattr(F, f"max_pool{dims}d_with_indices")
                    y, where = pool(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)
                    self.saved.append((x.shape, where.flatten(2), y.shape))
                    x = y
                else:
                    shape = x.shape
                    x = step.module(x)
                    self.saved.append((shape, x.shape))
        self.f = x

    def weight(self, step: Step) -> Tensor:
        if step.weight is not None:
            return self.fm.values[step.weight]
        w = step.module.weight
        return step.ops.unit_weight() if w is None else w.detach()  # BatchNorm(affine=False): γ = 1

    def bias(self, step: Step) -> Tensor | None:
        b = step.module.bias
        return (None if b is None else b.detach()) if step.bias is None else self.fm.values[step.bias]

    def backward(self, i: int, t: Tensor) -> Tensor:
        """``t`` (a gradient at the output of pooling or linear map ``i``) taken to its input."""
        step, entry = self.plan[i], self.saved[i]
        if step.kind == "max_pool":
            in_shape, where, _ = entry
            out = t.new_zeros(*in_shape[:2], math.prod(in_shape[2:]))
            return out.scatter_add_(2, where, t.flatten(2)).view(in_shape)
        if type(step.module) is nn.Flatten:
            return t.reshape(entry[0])
        _, pullback = torch.func.vjp(step.module, t.new_zeros(entry[0]))  # linear: any point
        return pullback(t)[0]

    def tangent(self, vs: tuple[Tensor, ...], keep: Callable[[int], bool]) -> tuple[Tensor | None, list[Tensor | None]]:
        """The R forward pass for one direction ``vs``: ``(R{f}, R{input} of every step)``
        (``None``: zero).  An activation's ``R{z}`` is kept intact where ``keep(i)``."""
        rx: Tensor | None = None
        r_in: list[Tensor | None] = [None] * len(self.plan)
        for i in range(self.first, len(self.plan)):
            step, r_in[i] = self.plan[i], rx
            if step.kind == "affine":
                v_w, v_b = _get(vs, step.weight), _get(vs, step.bias)
                w = self.weight(step)
                if v_w is not None or v_b is not None:  # x V_Wᵀ + V_b (+ R{x} Wᵀ)
                    rz = step.ops.forward(self.saved[i], torch.zeros_like(w) if v_w is None else v_w, v_b)
                    rx = rz if rx is None else step.ops.forward_into(rz, rx, w)
                elif rx is not None:
                    rx = step.ops.linear(rx, w)
            elif rx is None:
                continue
            elif step.kind == "activation":
                rx = rx * self.d1[i] if keep(i) else rx.mul_(self.d1[i])
            elif step.kind == "max_pool":
                _, where, out_shape = self.saved[i]
                rx = rx.flatten(2).gather(2, where).view(out_shape)
            else:
                rx = step.module(rx)
        return rx, r_in

    def pullback(self, u: Tensor, out: tuple[Tensor, ...]) -> None:
        """Write ``Jᵀ u`` (the gradient of ``⟨u, f⟩``) for one ``u`` shaped like ``f`` into ``out``."""
        delta = u
        for i in range(len(self.plan) - 1, self.first - 1, -1):
            step = self.plan[i]
            if step.kind == "affine":
                if step.weight is not None:
                    out[step.weight].copy_(step.ops.weight(self.saved[i], delta))
                if step.bias is not None:
                    out[step.bias].copy_(_bias_sum(step, delta))
                if i > self.first:
                    delta = step.ops.input(delta, self.weight(step), self.saved[i].shape)
            elif step.kind == "activation":
                delta = delta * self.d1[i]
            else:
                delta = self.backward(i, delta)


def _bias_sum(step: Step, t: Tensor) -> Tensor:
    """``Σ t`` over all but the bias (channel) dimension of ``step``'s output."""
    channel = step.ops.channel % t.ndim
    return t.sum([d for d in range(t.ndim) if d != channel])


def _one_at_a_time(fm: FunctionalModel, one: Callable[[tuple[Tensor, ...], tuple[Tensor, ...]], None]):
    """``vs -> (k, n)``: ``one(v, out)`` for each of the ``k`` slices ``v`` of the tensors ``vs``
    (parameter-shaped directions, or a batch of output-shaped vectors), ``out`` its row of the result."""

    def product(vs: tuple[Tensor, ...]) -> Tensor:
        flat = vs[0].new_zeros(vs[0].shape[0], fm.numel)
        out = fm.split(flat)
        with torch.no_grad():
            for j in range(flat.shape[0]):
                one(tuple(v[j] for v in vs), tuple(o[j] for o in out))
        return flat

    return product


def chain_hvp(
    plan: list[Step], fm: FunctionalModel, loss_fn: nn.Module, inputs: Tensor, targets: Tensor,
    output_hvp: Callable[[Tensor, Tensor], Tensor],
) -> Callable[[tuple[Tensor, ...]], Tensor]:
    """Run the primal pass of one batch and return ``vs -> (k, n)`` flat products ``H vs`` for
    parameter-shaped directions with a leading ``k`` dimension.

    ``output_hvp(f, U)`` is ``∇²_f L · U`` for the batch loss at the output ``f``.  Raises
    :class:`NotBatched` for unbatched inputs to convolutions or poolings.
    """
    run = _Pass(plan, fm, inputs)
    f = run.f.detach().requires_grad_(True)
    with torch.enable_grad():
        (delta,) = torch.autograd.grad(loss_fn(f, targets), f)
    f = f.detach()

    # ---- primal backward: δ at the output of each affine layer (no weight gradients) and the
    # σ'' term of each activation
    deltas: list[Any] = [None] * len(plan)
    second: list[Any] = [None] * len(plan)
    with torch.no_grad():
        for i in range(len(plan) - 1, run.first - 1, -1):
            step = plan[i]
            if step.kind == "affine":
                deltas[i] = delta
                if i > run.first:
                    delta = step.ops.input(delta, run.weight(step), run.saved[i].shape)
            elif step.kind == "activation":
                z, y = run.saved[i]
                second_fn = ACTIVATIONS[type(step.module)][1]
                dz = delta * run.d1[i]
                second[i] = None if second_fn is None else second_fn(step.module, z, y, run.d1[i], delta, dz)
                delta = dz
            else:
                delta = run.backward(i, delta)

    def one(vs: tuple[Tensor, ...], out: tuple[Tensor, ...]) -> None:
        """Write ``H v`` for one direction ``v`` (parameter-shaped ``vs``) into ``out``."""
        rx, r_in = run.tangent(vs, keep=lambda i: second[i] is not None)  # R{z} is kept for σ''
        r_delta = None if rx is None else output_hvp(f, rx)
        for i in range(len(plan) - 1, run.first - 1, -1):
            step = plan[i]
            if step.kind == "affine":
                delta, r = deltas[i], r_in[i]
                if step.weight is not None:  # R{δ}ᵀ x + δᵀ R{x}
                    hw = None if r_delta is None else step.ops.weight(run.saved[i], r_delta)
                    if r is not None:
                        hw = step.ops.weight(r, delta, hw)
                    if hw is not None:
                        out[step.weight].copy_(hw)
                if step.bias is not None and r_delta is not None:
                    out[step.bias].copy_(_bias_sum(step, r_delta))
                if i == run.first:
                    break
                v_w, w = _get(vs, step.weight), run.weight(step)  # R{δ} W + δ V_W
                new = None if v_w is None else step.ops.input(delta, v_w, run.saved[i].shape)
                if r_delta is not None and new is None:
                    new = step.ops.input(r_delta, w, run.saved[i].shape)
                elif r_delta is not None:
                    new = step.ops.input_into(new, r_delta, w)
                r_delta = new
            elif step.kind == "activation":
                if r_delta is not None:
                    r_delta = r_delta.mul_(run.d1[i])
                if second[i] is not None and r_in[i] is not None:
                    e, c = second[i]
                    r_delta = (e * r_in[i]).mul_(c) if r_delta is None else r_delta.addcmul_(e, r_in[i], value=c)
            elif r_delta is not None:
                r_delta = run.backward(i, r_delta)

    # One direction at a time: measured on the MLP and the CNN of benchmarks/hvp.py, a block of
    # directions through each layer at once was no faster per column on the MLP and much slower
    # on the CNN (1.7x a gradient per column against 0.9x: its tangents are k times as large).
    return _one_at_a_time(fm, one)


def chain_jacobian(plan: list[Step], fm: FunctionalModel, inputs: Tensor) -> tuple[Tensor, Callable, Callable]:
    """``(f, J·, Jᵀ·)`` of the chain's output for one batch, each product one direction at a time
    over a leading ``k`` dimension: ``J vs`` is ``(k, *f.shape)`` for parameter-shaped ``vs``,
    ``Jᵀ U`` is ``(k, n)`` flat for ``U`` of shape ``(k, *f.shape)``.  The R forward pass of
    :func:`chain_hvp` and a backward pass that forms only the weight gradients."""
    run = _Pass(plan, fm, inputs)

    def jvp(vs: tuple[Tensor, ...]) -> Tensor:
        with torch.no_grad():
            outs = [run.tangent(tuple(v[j] for v in vs), keep=lambda i: False)[0] for j in range(vs[0].shape[0])]
        return torch.stack([torch.zeros_like(run.f) if o is None else o for o in outs])

    pullbacks = _one_at_a_time(fm, lambda u, out: run.pullback(u[0], out))
    return run.f, jvp, lambda U: pullbacks((U,))


def _get(vs: tuple[Tensor, ...], index: int | None) -> Tensor | None:
    return None if index is None else vs[index]
