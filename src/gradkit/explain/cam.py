"""Class activation maps on a chosen layer: Grad-CAM (Selvaraju et al. 2017), HiResCAM (Draelos &
Carin 2020), Grad-CAM++ (Chattopadhay et al. 2018) and Smooth Grad-CAM++ (Omeiza et al. 2019).

Also home of :func:`layer_sweep`, the layer-activation counterpart of :func:`~gradkit.explain._common.sweep`
(gradients of the selected scalar with respect to the outputs of chosen modules, chunk by chunk),
which :mod:`~gradkit.explain.fullgrad` and :mod:`~gradkit.explain.patching` reuse.

Every map is computed from the activation ``A`` of ``layer``, shape ``(B, K, *spatial)``
(channels first), and the gradient ``G = ∂y/∂A`` of the scalar ``y`` chosen by ``target``.  The
result has the layer's spatial shape ``(B, *spatial)``; ``upsample=True`` resizes it to the
spatial shape of ``inputs`` ``(B, C, *spatial_in)`` by (bi/tri)linear interpolation.  With a list
of targets a leading targets dimension is added (see :mod:`gradkit.explain._common`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from gradkit.explain._common import (
    DEFAULT_BATCH_SIZE,
    HookSet,
    Target,
    _rows,
    accumulate,
    check_batch_size,
    check_float,
    check_inputs,
    check_int,
    check_target,
    eval_mode,
    over_targets,
    select,
)
from gradkit.explain.smooth import _noisy_points, smoothgrad_noise

__all__ = ["grad_cam", "hires_cam", "grad_cam_pp", "smooth_grad_cam_pp", "layer_sweep", "LayerChunk"]


# ------------------------------------------------------------------------ layer gradients
@dataclass
class LayerChunk:
    """One model call of :func:`layer_sweep`: rows ``(step[r], example[r])``."""

    step: Tensor  #: (R,) step / sample index of each row
    example: Tensor  #: (R,) example index of each row
    values: Tensor  #: (R,) the selected scalar y at each row
    #: per layer, one (R, *shape) tensor per call of the layer in the forward pass
    activations: list[list[Tensor]]
    grads: list[list[Tensor]]  #: ∂y/∂(each activation), same structure
    input_grads: Tensor | None  #: (R, *features) ∂y/∂point when ``input_grad=True``


def check_layer(model: Any, layer: Any, name: str = "layer") -> nn.Module:
    """``layer`` must be a submodule of ``model``."""
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{name} must be an nn.Module inside the model, got {type(layer).__name__}")
    if isinstance(model, nn.Module) and not any(m is layer for m in model.modules()):
        raise ValueError(f"{name} ({type(layer).__name__}) is not a submodule of the model")
    return layer


def layer_output(module: nn.Module, out: Any) -> tuple[Tensor, Callable[[Tensor], Any]]:
    """The tensor a hooked layer's output stands for, and a function putting a replacement in its
    place: the output itself, or the first element of a tuple or list output (e.g.
    ``nn.MultiheadAttention``'s ``(output, weights)``)."""
    if isinstance(out, Tensor):
        return out, lambda t: t
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        if hasattr(out, "_fields"):  # a named tuple
            return out[0], lambda t: type(out)(t, *out[1:])
        return out[0], lambda t: type(out)([t, *out[1:]])
    raise TypeError(f"{type(module).__name__} returned {type(out).__name__}; a hooked layer must return a tensor "
                    "or a tuple whose first element is a tensor")


def _capture(store: list[Tensor]) -> Callable[..., Any]:
    """Forward hook keeping the module's output (its first tensor, :func:`layer_output`) and
    passing a copy on, so that in-place operations after the layer (``ReLU(inplace=True)``) do not
    overwrite what we differentiate against."""

    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        first, rebuild = layer_output(module, out)
        if not first.requires_grad:  # nothing upstream needs grad (frozen parameters): start the graph here
            first = first.detach().requires_grad_(True)
        store.append(first)
        return rebuild(first.clone())

    return hook


def layer_sweep(
    model: Callable[[Tensor], Any],
    layers: Sequence[nn.Module],
    points: Callable[[Tensor, Tensor], Tensor],
    n_steps: int,
    batch: int,
    target: Any,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    input_grad: bool = False,
    progress: bool = False,
    desc: str = "",
) -> Iterator[LayerChunk]:
    """Activations of ``layers`` and the gradients of the selected scalar with respect to them at
    ``n_steps × batch`` points, ``batch_size`` rows per model call.

    Rows are enumerated as in :func:`~gradkit.explain._common.sweep` (step-major, row ``r`` is
    ``points(step, example)``); ``target`` must come from :func:`check_target`.  The outputs of each
    layer are captured by forward hooks (removed on exit, also when the model raises); the model
    receives a copy of the points and the layers' successors a copy of their outputs, so in-place
    operations are harmless.  No parameter ``.grad`` is written.  The caller is responsible for
    :func:`~gradkit.explain._common.eval_mode`.
    """
    n_chunks = -(-n_steps * batch // batch_size)
    bar = tqdm(total=n_chunks, desc=desc, disable=not progress, leave=False)
    try:
        for step, example in _rows(n_steps, batch, batch_size):
            with torch.no_grad():
                z = points(step, example)
            z = z.detach().requires_grad_(input_grad)
            stores: list[list[Tensor]] = [[] for _ in layers]
            with HookSet() as hooks, torch.enable_grad():
                for layer, store in zip(layers, stores):
                    hooks.forward(layer, _capture(store))
                value = select(model(z.clone()), target, example)
            for layer, store in zip(layers, stores):
                if not store:
                    raise ValueError(f"the layer {type(layer).__name__} was not called by the model's forward pass")
            flat = [t for store in stores for t in store]
            wrt = ([z] if input_grad else []) + flat
            grads = torch.autograd.grad(value, wrt, grad_outputs=torch.ones_like(value), allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads)]
            in_grad = grads.pop(0) if input_grad else None
            acts, grs, i = [], [], 0
            for store in stores:
                acts.append([t.detach() for t in store])
                grs.append(grads[i:i + len(store)])
                i += len(store)
            yield LayerChunk(step, example, value.detach(), acts, grs, in_grad)
            bar.update(1)
    finally:
        bar.close()


# ------------------------------------------------------------------------------ CAM family
def _over_targets_with_layer(fn: Callable[..., Any]) -> Callable[..., Any]:
    """:func:`~gradkit.explain._common.over_targets` for ``fn(model, layer, inputs, target, ...)``."""

    @functools.wraps(fn)
    def wrapper(model: Any, layer: Any, inputs: Any, target: Any = None, *args: Any, **kwargs: Any) -> Any:
        one = over_targets(lambda m, x, t: fn(m, layer, x, t, *args, **kwargs))
        return one(model, inputs, target)

    return wrapper


def _spatial_sum(t: Tensor) -> Tensor:
    """Σ over the spatial dims of ``(R, K, *spatial)``, kept for broadcasting."""
    return t.sum(dim=tuple(range(2, t.ndim)), keepdim=True)


def _check_activation(a: Tensor, layer: nn.Module) -> None:
    if a.ndim < 3:
        raise ValueError(
            f"CAM methods need a layer output (B, K, *spatial) with channels first and at least one spatial "
            f"dimension; {type(layer).__name__} returned shape {tuple(a.shape)}"
        )


def _one_pass(model: Any, layer: nn.Module, inputs: Tensor, tgt: Any, rows: int, progress: bool, desc: str):
    """Activation ``A``, gradient ``G`` and scalar ``y`` of every example (one forward per chunk)."""
    acts, grads, values = None, None, torch.zeros(inputs.shape[0], dtype=inputs.dtype, device=inputs.device)
    for chunk in layer_sweep(model, [layer], lambda step, example: inputs[example], 1, inputs.shape[0], tgt,
                             batch_size=rows, progress=progress, desc=desc):
        a, g = _single_call(chunk, layer)
        if acts is None:
            _check_activation(a, layer)
            acts = a.new_zeros((inputs.shape[0],) + a.shape[1:])
            grads = torch.zeros_like(acts)
        accumulate(acts, chunk.example, a)
        accumulate(grads, chunk.example, g)
        accumulate(values, chunk.example, chunk.values)
    return acts, grads, values


def _single_call(chunk: LayerChunk, layer: nn.Module) -> tuple[Tensor, Tensor]:
    if len(chunk.activations[0]) != 1:
        raise ValueError(
            f"the layer {type(layer).__name__} is called {len(chunk.activations[0])} times in one forward pass; "
            "CAM methods need a layer used once"
        )
    return chunk.activations[0][0], chunk.grads[0][0]


def _finish(cam: Tensor, inputs: Tensor, relu: bool, upsample: bool) -> Tensor:
    """ReLU and optional resizing of ``(B, *spatial)`` maps to the input's spatial size."""
    if relu:
        cam = cam.clamp_min(0)
    if not upsample:
        return cam
    size = inputs.shape[2:]
    if len(size) != cam.ndim - 1 or len(size) > 3:
        raise ValueError(
            f"upsample=True needs inputs (B, C, *spatial) with as many (1 to 3) spatial dims as the map; "
            f"got inputs {tuple(inputs.shape)} and a map {tuple(cam.shape)}"
        )
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(cam.unsqueeze(1), size=tuple(size), mode=mode, align_corners=False).squeeze(1)


def _prepare(model: Any, layer: Any, inputs: Any, target: Any, batch_size: Any):
    inputs = check_inputs(inputs).detach()
    layer = check_layer(model, layer)
    return inputs, layer, check_target(target, inputs.shape[0]), check_batch_size(batch_size)


@_over_targets_with_layer
def grad_cam(
    model: Any,
    layer: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    upsample: bool = False,
    relu: bool = True,
    batch_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Grad-CAM (Selvaraju, Cogswell, Das, Vedantam, Parikh & Batra 2017, "Grad-CAM: Visual
    Explanations from Deep Networks via Gradient-based Localization", arXiv:1610.02391, eqs. 1–2).

    .. math::

        α_k = \\frac{1}{Z} \\sum_{ij} \\frac{∂y}{∂A^k_{ij}}, \\qquad
        L = \\mathrm{ReLU}\\Big(\\sum_k α_k A^k\\Big)

    ``A`` is the output of ``layer`` (``(B, K, *spatial)``, channels first), ``y`` the scalar chosen
    by ``target``, ``Z`` the number of spatial positions.  ``relu=False`` returns the map before the
    ReLU (Captum's ``LayerGradCam`` default, ``relu_attributions=False``).  Returns ``(B,
    *spatial)``, or the input's spatial size with ``upsample=True``.  Stateless.
    """
    inputs, layer, tgt, rows = _prepare(model, layer, inputs, target, batch_size)
    with eval_mode(model):
        a, g, _ = _one_pass(model, layer, inputs, tgt, rows, progress, "grad-cam")
    alpha = _spatial_sum(g) / g[0, 0].numel()
    return _finish((alpha * a).sum(1), inputs, relu, upsample)


@_over_targets_with_layer
def hires_cam(
    model: Any,
    layer: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    upsample: bool = False,
    relu: bool = True,
    batch_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """HiResCAM (Draelos & Carin 2020, "Use HiResCAM instead of Grad-CAM for faithful explanations
    of convolutional neural networks", arXiv:2011.08891).

    .. math:: L = \\mathrm{ReLU}\\Big(\\sum_k \\frac{∂y}{∂A^k} ⊙ A^k\\Big)

    Element-wise gradient × activation summed over channels, without Grad-CAM's spatial averaging
    of the gradient.  For a network ending in ``layer → flatten → linear`` the map before the ReLU
    (``relu=False``) sums to the class score minus the bias of that linear layer (the paper's
    proof); the ReLU, applied as in Grad-CAM, is on by default.  Shapes as :func:`grad_cam`.
    Stateless.
    """
    inputs, layer, tgt, rows = _prepare(model, layer, inputs, target, batch_size)
    with eval_mode(model):
        a, g, _ = _one_pass(model, layer, inputs, tgt, rows, progress, "hirescam")
    return _finish((g * a).sum(1), inputs, relu, upsample)


def _pp_map(a: Tensor, d1: Tensor, d2: Tensor, d3: Tensor) -> Tensor:
    """Grad-CAM++ map from the first three derivatives (eq. 19): α, w_k and Σ_k w_k A^k."""
    denom = 2 * d2 + _spatial_sum(a) * d3
    alpha = torch.where(denom != 0, d2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    w = _spatial_sum(alpha * d1.clamp_min(0))
    return (w * a).sum(1)


@_over_targets_with_layer
def grad_cam_pp(
    model: Any,
    layer: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    upsample: bool = False,
    relu: bool = True,
    batch_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Grad-CAM++ (Chattopadhay, Sarkar, Howlader & Balasubramanian 2018, "Grad-CAM++: Generalized
    Gradient-based Visual Explanations for Deep Convolutional Networks", WACV; arXiv:1710.11063,
    eq. 19 with the exponential output of Sec. 3.2).

    With the class output taken as ``Y = exp(S)`` of the score ``S`` (``y`` chosen by ``target``) and
    a piecewise-linear network after ``layer`` (``∂²S/∂A² = 0``), the higher derivatives are
    ``∂ⁿY/∂Aⁿ = exp(S) (∂S/∂A)ⁿ``, and eq. 19 becomes, with ``g = ∂S/∂A^k_{ij}``:

    .. math::

        α^k_{ij} = \\frac{g^2}{2 g^2 + \\sum_{ab} A^k_{ab}\\, g^3}, \\qquad
        w_k = \\sum_{ij} α^k_{ij}\\, \\mathrm{ReLU}(g), \\qquad
        L = \\mathrm{ReLU}\\Big(\\sum_k w_k A^k\\Big)

    ``α = 0`` where the denominator vanishes (``g = 0``), as the authors' code.  The factor
    ``exp(S)`` cancels in ``α``; in ``w_k`` it is a positive constant per example that the paper's
    weights ``ReLU(∂Y/∂A)`` carry and we drop (it only rescales each map and overflows for large
    scores): the result is the paper's map divided by ``exp(S)``.  The authors' code also
    normalises ``α`` to sum to one per channel, which eq. 19 does not; we follow the equation.
    Shapes as :func:`grad_cam`.  Stateless.
    """
    inputs, layer, tgt, rows = _prepare(model, layer, inputs, target, batch_size)
    with eval_mode(model):
        a, g, _ = _one_pass(model, layer, inputs, tgt, rows, progress, "grad-cam++")
    return _finish(_pp_map(a, g, g.square(), g.pow(3)), inputs, relu, upsample)


@_over_targets_with_layer
def smooth_grad_cam_pp(
    model: Any,
    layer: nn.Module,
    inputs: Tensor,
    target: Target = None,
    *,
    n: int = 50,
    noise: float = 0.15,
    seed: int | None = None,
    upsample: bool = False,
    relu: bool = True,
    batch_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Smooth Grad-CAM++ (Omeiza, Speakman, Cintas & Weldemariam 2019, "Smooth Grad-CAM++: An
    Enhanced Inference Level Visualization Technique for Deep Convolutional Neural Network
    Models", arXiv:1908.01224).

    The first three derivatives of Grad-CAM++ are averaged over ``n`` noisy copies
    ``x + ε_l`` of the input before they enter eq. 19:

    .. math::

        D^p = \\frac{1}{n} \\sum_{l=1}^{n} \\frac{∂^p Y}{∂A^p}(x + ε_l)
            = \\frac{1}{n} \\sum_l e^{S_l} g_l^p, \\qquad
        α = \\frac{D^2}{2 D^2 + \\sum_{ab} A_{ab} D^3}, \\qquad
        w_k = \\sum_{ij} α\\, \\mathrm{ReLU}(D^1), \\qquad L = \\mathrm{ReLU}\\Big(\\sum_k w_k A^k\\Big)

    with ``g_l = ∂S/∂A`` and ``S_l`` the score at the noisy copy ``l`` and ``A`` the activation of
    the clean input (as in the paper).  As in :func:`grad_cam_pp` everything is divided by
    ``exp(S(x))`` of the clean input, i.e. each sample is weighted by ``exp(S_l − S(x))``; with
    ``noise=0`` the result equals :func:`grad_cam_pp`.  (Averaging the per-sample Grad-CAM++
    weights ``w_k`` instead is a different, also-seen variant.)

    The noise is SmoothGrad's (:func:`~gradkit.explain.smoothgrad_noise`: ``ε_l ~ N(0, σ²)`` with
    ``σ = noise · (max x − min x)`` per example, drawn from a generator seeded with ``seed``).  The
    paper fixes neither ``n`` nor ``σ``; the defaults are SmoothGrad's (``n = 50``, ``noise =
    0.15``).  ``batch_size`` rows ``(sample, example)`` go through the model at once; the result
    does not depend on it.  Shapes as :func:`grad_cam`.  Stateless.
    """
    inputs, layer, tgt, rows = _prepare(model, layer, inputs, target, batch_size)
    n = check_int(n, "n", low=1)
    check_float(noise, "noise")
    batch = inputs.shape[0]
    points = _noisy_points(inputs, smoothgrad_noise(inputs, n, noise, seed))
    with eval_mode(model):
        a, _, s0 = _one_pass(model, layer, inputs, tgt, rows, False, "")
        d = [torch.zeros_like(a) for _ in range(3)]
        for chunk in layer_sweep(model, [layer], points, n, batch, tgt, batch_size=rows,
                                 progress=progress, desc="smooth grad-cam++"):
            _, g = _single_call(chunk, layer)
            e = torch.exp(chunk.values - s0[chunk.example]).view((-1,) + (1,) * (g.ndim - 1))
            for p in range(3):
                accumulate(d[p], chunk.example, e * g.pow(p + 1))
    return _finish(_pp_map(a, d[0] / n, d[1] / n, d[2] / n), inputs, relu, upsample)
