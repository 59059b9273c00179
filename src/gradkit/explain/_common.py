"""Conventions shared by every explainer in :mod:`gradkit.explain`.

Every attribution function has the form ``f(model, inputs, target, **options)``:

``model``
    an ``nn.Module`` (or any callable) mapping a batch ``(R, *features)`` to an output whose first
    dimension has the same ``R`` rows, one per input row.  Rows must not interact: the explainers
    send interpolation steps and noise samples of several examples through the model together.
    An ``nn.Module`` is put in **eval mode** for the computation (:func:`eval_mode`): in train mode
    BatchNorm would normalise a batch of perturbed copies with its own statistics (the result would
    depend on ``batch_size``) and overwrite its running statistics, and Dropout would draw random
    masks.  The ``training`` flag of every submodule is restored afterwards, also when the model
    raises.  Parameters are never touched: their ``requires_grad`` flags stay as they are and no
    ``.grad`` is written (gradients are taken with ``torch.autograd.grad`` with respect to the
    inputs only).  Models with in-place operations (``nn.ReLU(inplace=True)``) work: the model
    receives a copy of the points it is differentiated at.

``inputs``
    one floating tensor ``(B, *features)``: a batch of ``B`` examples.  Models with several inputs
    are explained by wrapping them in a module that takes one tensor.  Attributions have the shape
    of ``inputs``.

``target`` (see :func:`check_target`) selects one scalar per example from the model output:

* ``None``: the output has one value per example, shape ``(B,)`` or ``(B, 1)``;
* an ``int`` ``c``: ``output[:, c]`` of a ``(B, C)`` output, ``0 <= c < C``;
* an integer tensor of shape ``(B,)``: ``output[b, target[b]]``, one class per example;
* a callable ``target(output) -> (R,)``: any scalar per row (a softmax probability, a margin, a
  pixel of a segmentation map).  It is called on chunks of perturbed copies, not on the original
  batch, so it must compute each row's scalar from that row alone;
* a **list** of the above: several targets at once.  The result gets a leading targets
  dimension, ``(T, B, *features)`` (and the delta ``(T, B)``); each target is explained
  separately, with the same random draws when a ``seed`` is given.  Note that Captum uses a list
  for one target per example; here that is a tensor.

``batch_size``
    how many rows go through the model at once, whatever the number of interpolation steps or
    noise samples: the rows ``(step, example)`` are enumerated step-major and cut into chunks of
    ``batch_size`` rows (:func:`sweep`), and each chunk's gradients are added into a ``(B,
    *features)`` accumulator in row order.  Peak memory is therefore that of one chunk, and the
    result does not depend on ``batch_size`` beyond the last bits of the model's own arithmetic.
    ``None`` means :data:`DEFAULT_BATCH_SIZE` rows.

``return_delta``
    where completeness ``Σᵢ φᵢ = f(x) − f(x')`` is defined, ``return_delta=True`` returns
    ``(attributions, delta)`` with ``delta = Σᵢ φᵢ − (f(x) − f(x'))`` per example, shape ``(B,)``.

``progress``
    a ``tqdm`` bar over the chunks.

**Fast paths.**  A sweep of at least :data:`FOLD_MIN_ROWS` rows computes through a copy of the
model with each eval-mode BatchNorm folded into the convolution before it
(:func:`fold_batch_norm`; never when the attributions keep a graph to the parameters), and 4-D
points go to a convolutional model on the CPU in the channels-last layout (:func:`model_layout`)
if one row in that layout runs through it without an error (:func:`fast_path`; the probe is one
extra forward call, seen by forward hooks).
Both compute the same function (equal to rounding; tested equal to the plain path in float64);
models that ``torch.fx`` cannot trace, hooked layers and global module hooks are used as given.
Like any ``torch.fx`` trace, the folded copy runs the Python of ``forward`` once, at trace time:
for a ``forward`` whose computation depends on Python state that changes between calls (not on
its input tensors), pass ``lambda z: model(z)``: a callable that is not an ``nn.Module`` is used
as given.

The pieces below (:func:`check_inputs`, :func:`check_target`, :func:`select`, :func:`sweep`,
:func:`row_chunks`, :func:`accumulate`, :func:`forward_values`, :func:`eval_mode`,
:class:`HookSet`, :func:`over_targets`) are what new explainers are built from.
"""

from __future__ import annotations

import collections
import functools
import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm.auto import tqdm

from gradkit.core.functional import global_module_hooks, module_has_hooks

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "Target",
    "Chunk",
    "HookSet",
    "check_inputs",
    "check_target",
    "check_batch_size",
    "check_int",
    "check_float",
    "check_baselines",
    "select",
    "sweep",
    "row_chunks",
    "forward_values",
    "accumulate",
    "eval_mode",
    "over_targets",
]

#: Rows per model call when ``batch_size=None``.  On CPU, chunks of a few hundred rows run at the
#: speed of much larger ones (see ``benchmarks/explain.py``) while keeping memory small.
DEFAULT_BATCH_SIZE = 256

#: What ``target`` accepts (a list of these for several targets at once).
Target = Union[None, int, Tensor, Callable[[Tensor], Tensor], list]


# ------------------------------------------------------------------------------ argument checks
def check_int(value: Any, name: str, *, low: int) -> int:
    """``value`` as an ``int >= low``, or an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return int(value)


def check_float(value: Any, name: str, *, low: float = 0.0, allow_low: bool = True) -> float:
    """``value`` as a finite float ``>= low`` (``> low`` unless ``allow_low``), or an error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    ok = value >= low if allow_low else value > low
    if not ok or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_low else '>'} {low}, got {value!r}")
    return value


def check_batch_size(batch_size: Any) -> int:
    """Rows per model call: ``None`` → :data:`DEFAULT_BATCH_SIZE`, else an int ``>= 1``."""
    return DEFAULT_BATCH_SIZE if batch_size is None else check_int(batch_size, "batch_size", low=1)


def check_inputs(inputs: Any, name: str = "inputs") -> Tensor:
    """Refuse anything but a finite floating tensor with a batch dimension."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"{name} must be a tensor (B, *features), got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {inputs.dtype}")
    if inputs.ndim < 1 or inputs.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch dimension (B, *features), got shape {tuple(inputs.shape)}")
    if not bool(torch.isfinite(inputs).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return inputs


def check_baselines(baselines: Any, inputs: Tensor, name: str = "baselines") -> Tensor:
    """Baselines broadcast to ``inputs.shape``: ``None`` → zeros, a number → that constant, a
    tensor broadcastable to ``inputs`` (one baseline ``(*features)``, one per example
    ``(B, *features)``, or anything broadcastable)."""
    if baselines is None:
        return torch.zeros_like(inputs)
    if isinstance(baselines, numbers.Real) and not isinstance(baselines, bool):
        return torch.full_like(inputs, float(baselines))
    if not isinstance(baselines, Tensor):
        raise TypeError(f"{name} must be None, a number or a tensor broadcastable to inputs, got {type(baselines).__name__}")
    if baselines.dtype != inputs.dtype or baselines.device != inputs.device:
        raise TypeError(
            f"{name} must have the dtype and device of inputs ({inputs.dtype}, {inputs.device}), "
            f"got {baselines.dtype} on {baselines.device}"
        )
    try:
        out = torch.broadcast_to(baselines, inputs.shape)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(baselines.shape)} cannot be broadcast to inputs of shape {tuple(inputs.shape)}"
        ) from None
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return out


# ------------------------------------------------------------------------------------- targets
def check_target(target: Any, batch: int) -> None | int | Tensor | Callable[[Tensor], Tensor]:
    """Validate one target (not a list) for a batch of ``batch`` examples and normalise it.

    Returns ``None``, an ``int``, a ``(batch,)`` ``int64`` tensor or the callable.  The range of an
    index is checked against the model output in :func:`select`, where the number of classes is
    known.
    """
    if target is None or callable(target) and not isinstance(target, Tensor):
        return target
    if isinstance(target, bool):
        raise TypeError("target must be an int class index, not a bool")
    if isinstance(target, numbers.Integral):
        if target < 0:
            raise ValueError(f"target must be a class index >= 0, got {target}")
        return int(target)
    if isinstance(target, Tensor):
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"target must be an integer tensor of class indices, got dtype {target.dtype}")
        if target.ndim == 0:
            return check_target(int(target), batch)
        if target.shape != (batch,):
            raise ValueError(
                f"target must hold one class index per example, shape ({batch},), got shape {tuple(target.shape)}"
            )
        if bool((target < 0).any()):
            raise ValueError(f"target must hold class indices >= 0, got min {int(target.min())}")
        return target.long()
    if isinstance(target, tuple):
        raise TypeError("target: pass several targets as a list, not a tuple")
    raise TypeError(
        "target must be None, an int, an integer tensor (B,), a callable output -> (B,), or a list of "
        f"these; got {type(target).__name__}"
    )


def select(output: Any, target: None | int | Tensor | Callable[[Tensor], Tensor], example: Tensor) -> Tensor:
    """The scalar ``f_target`` of each row of ``output``, shape ``(R,)``.

    ``example`` ``(R,)`` says which example each row belongs to (it picks the class of a
    per-example ``target`` tensor).  ``target`` must come from :func:`check_target`.
    """
    rows = example.numel()
    if not isinstance(output, Tensor):
        raise TypeError(f"the model must return a tensor, got {type(output).__name__}")
    if output.ndim == 0 or output.shape[0] != rows:
        raise ValueError(
            f"the model returned shape {tuple(output.shape)} for {rows} input rows; it must return one "
            "output row per input row"
        )
    if callable(target) and not isinstance(target, Tensor):
        value = target(output)
        if not isinstance(value, Tensor) or value.shape != (rows,):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"target(output) must return one scalar per row, shape ({rows},), got {got}")
        return value
    if target is None:
        if output[0].numel() != 1:
            raise ValueError(
                f"target=None needs one output value per example, but the model output has shape "
                f"{tuple(output.shape)}; pass a class index, a tensor of indices or a callable"
            )
        return output.reshape(rows)
    if output.ndim != 2:
        raise ValueError(
            f"an index target needs a (B, C) model output, got shape {tuple(output.shape)}; "
            "pass a callable target(output) -> (B,) instead"
        )
    check_class_index(target, output.shape[1])
    if isinstance(target, int):
        return output[:, target]
    return output.gather(1, target.to(output.device)[example].unsqueeze(1)).squeeze(1)


def check_class_index(target: int | Tensor, n_classes: int) -> None:
    """``ValueError`` unless the class index ``target`` (an int or a tensor of them) is below ``n_classes``."""
    if isinstance(target, int):
        if target >= n_classes:
            raise ValueError(
                f"target={target} is out of range for a model output with {n_classes} classes (0 <= target < {n_classes})"
            )
    elif int(target.max()) >= n_classes:
        raise ValueError(
            f"target holds class {int(target.max())}, out of range for a model output with {n_classes} classes "
            f"(0 <= target < {n_classes})"
        )


def over_targets(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``fn(model, inputs, target, ...)`` so that a **list** ``target`` runs ``fn`` once
    per target and stacks the results along a new leading dimension (also the delta of a
    ``(attributions, delta)`` pair)."""

    @functools.wraps(fn)
    def wrapper(model: Any, inputs: Any, target: Any = None, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(target, list):
            return fn(model, inputs, target, *args, **kwargs)
        if not target:
            raise ValueError("target: an empty list of targets")
        results = [fn(model, inputs, t, *args, **kwargs) for t in target]
        if isinstance(results[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*results))
        return torch.stack(results)

    return wrapper


# ------------------------------------------------------------------------------ model hygiene
@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Put an ``nn.Module`` in eval mode and restore every submodule's ``training`` flag on exit,
    also when the body raises.  Other callables pass through unchanged."""
    if not isinstance(model, nn.Module):
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class HookSet:
    """Hooks registered for the duration of a ``with`` block and removed on exit, also when the
    model raises::

        with HookSet() as hooks:
            hooks.forward(layer, lambda module, args, out: saved.append(out))
            model(x)
        # the hook is gone here

    With in-place activations after a hooked layer prefer a tensor hook registered on the
    layer's output inside a forward hook (``hooks.tensor(out, fn)``) to a module
    ``register_full_backward_hook``, which PyTorch refuses when the output is modified in place.
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def forward(self, module: nn.Module, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """``module.register_forward_hook(fn, **kwargs)``, removed on exit."""
        return self._keep(module.register_forward_hook(fn, **kwargs))

    def forward_pre(self, module: nn.Module, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """``module.register_forward_pre_hook(fn, **kwargs)``, removed on exit."""
        return self._keep(module.register_forward_pre_hook(fn, **kwargs))

    def backward(self, module: nn.Module, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """``module.register_full_backward_hook(fn, **kwargs)``, removed on exit."""
        return self._keep(module.register_full_backward_hook(fn, **kwargs))

    def tensor(self, tensor: Tensor, fn: Callable[[Tensor], Any]) -> Any:
        """``tensor.register_hook(fn)`` (called with the tensor's gradient), removed on exit."""
        return self._keep(tensor.register_hook(fn))

    def _keep(self, handle: Any) -> Any:
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


# ----------------------------------------------------------------------------------- batching
@dataclass
class Chunk:
    """One model call of :func:`sweep`: rows ``(step[r], example[r])``."""

    step: Tensor  #: (R,) step / sample index of each row
    example: Tensor  #: (R,) example index of each row
    grads: Tensor  #: (R, *features) weight[step, example] · ∂f_target/∂point at each row's point
    values: Tensor  #: (R,) f_target at each row's point


def row_chunks(n_steps: int, batch: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The ``(step, example)`` index tensors (CPU, int64) of the rows ``r = step · batch +
    example`` of an ``n_steps × batch`` sweep, ``batch_size`` consecutive rows at a time."""
    total = n_steps * batch
    for start in range(0, total, batch_size):
        r = torch.arange(start, min(start + batch_size, total))
        yield torch.div(r, batch, rounding_mode="floor"), r % batch


_rows = row_chunks  # the first name, used by sibling modules


#: fewest rows (points) a :func:`sweep` or :func:`forward_values` must send through the model
#: before its fast paths are tried (:func:`fast_path`): tracing the model costs about as much as a
#: few forward rows of a small ResNet, folding saves about a third of each row's forward and backward
FOLD_MIN_ROWS = 256
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fold_batch_norm(model: Any) -> Any:
    """``model`` with each eval-mode BatchNorm that directly follows a convolution folded into it,
    as a traced copy (``torch.fx``), or ``model`` itself when nothing can be folded.

    An eval-mode BatchNorm is the affine map ``y ↦ γ (y − μ)/√(σ² + ε) + β`` per channel, so a
    convolution followed by it is one convolution with rescaled weights and a bias
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``): the same function, one elementwise pass fewer
    in the forward and in the backward.  A pair is folded only when the convolution (``Conv1d/2d/3d``,
    exact types) is in eval mode, called at this one place of the model (no second call, no direct
    read of its weights: those would see the folded ones), its output feeds nothing but the
    BatchNorm, the BatchNorm is in
    eval mode with running statistics, and neither has hooks; with global module hooks, hooks on
    the model or on any module the trace inlines (containers, custom modules), a model that is not
    an ``nn.Module`` or one ``torch.fx`` cannot trace (data-dependent control flow) nothing is
    folded.  The copy shares every other submodule and parameter with ``model``, and
    ``model`` is not modified.  Its folded weights are new tensors: use it only where no gradient
    with respect to the parameters is wanted.
    """
    if not isinstance(model, nn.Module) or global_module_hooks():
        return model
    modules = list(model.modules())
    if not (any(type(m) in _CONVS for m in modules) and any(type(m) in _BATCH_NORM and _is_affine(m) for m in modules)):
        return model
    # the trace inlines every module that is not a leaf (the model itself, containers, custom
    # modules) and would drop its hooks; hooks on leaf layers survive (the copy calls those layers)
    tracer = torch.fx.Tracer()
    if any(module_has_hooks(m) and not tracer.is_leaf_module(m, name) for name, m in model.named_modules()):
        return model
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception:  # not traceable (control flow on values, unsupported Python): keep the model as it is
        return model
    named = dict(traced.named_modules())
    calls = collections.Counter(n.target for n in traced.graph.nodes if n.op == "call_module")
    attrs = [n.target for n in traced.graph.nodes if n.op == "get_attr"]

    def only_here(target: str) -> bool:  # one call, and its parameters are read nowhere else
        return calls[target] == 1 and not any(a == target or a.startswith(target + ".") for a in attrs)

    folded = False
    for node in list(traced.graph.nodes):
        norm = named.get(node.target) if node.op == "call_module" else None
        if type(norm) not in _BATCH_NORM or not _is_affine(norm) or len(node.args) != 1 or node.kwargs:
            continue
        prev = node.args[0]
        conv = named.get(prev.target) if isinstance(prev, torch.fx.Node) and prev.op == "call_module" else None
        if (type(conv) not in _CONVS or conv.training or module_has_hooks(conv) or len(prev.users) != 1
                or not only_here(prev.target)):
            continue
        parent, _, name = prev.target.rpartition(".")
        setattr(traced.get_submodule(parent), name, fuse_conv_bn_eval(conv, norm))
        node.replace_all_uses_with(prev)
        traced.graph.erase_node(node)
        folded = True
    if not folded:
        return model
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


def fast_path(model: Any, points: Tensor, rows: int, create_graph: bool) -> tuple[Any, torch.memory_format]:
    """The model and the memory format :func:`sweep` and :func:`forward_values` use for ``rows``
    points like ``points``: with at least :data:`FOLD_MIN_ROWS` rows and no graph to the
    parameters wanted (``create_graph=False``), :func:`fold_batch_norm` of ``model`` and
    :func:`model_layout`; otherwise ``model`` itself and the contiguous layout.

    Channels-last is only used when one row in that layout goes through the model without an
    error (a probe without gradients): a ``forward`` that calls ``.view`` on conv activations
    needs them contiguous, and then gets them so.
    """
    if create_graph or rows < FOLD_MIN_ROWS:
        return model, torch.contiguous_format
    model = fold_batch_norm(model)
    layout = model_layout(model, points)
    if layout == torch.channels_last:
        try:
            with torch.no_grad():
                model(points[:1].clone(memory_format=layout))
        except Exception:  # the model needs contiguous activations (e.g. ``x.view(n, -1)``)
            layout = torch.contiguous_format
    return model, layout


def model_layout(model: Any, points: Tensor) -> torch.memory_format:
    """The memory format in which :func:`sweep` and :func:`forward_values` hand batched points to
    ``model``: ``torch.channels_last`` for 4-D points on the CPU when ``model`` is an ``nn.Module``
    containing a ``Conv2d``, ``torch.contiguous_format`` otherwise.

    Channels-last is oneDNN's native layout for 2-D convolutions: NCHW activations are reordered
    on every call.  On the ResNet of ``benchmarks/explain.py`` (float32, one thread) a forward and
    input-gradient backward of 320 rows takes about two thirds of its NCHW time; in float64 the two
    are equal.  The values agree to rounding, and gradients are returned contiguous, so nothing
    downstream sees the layout.
    """
    if (points.ndim == 4 and points.device.type == "cpu" and isinstance(model, nn.Module)
            and any(isinstance(m, nn.Conv2d) for m in model.modules())):
        return torch.channels_last
    return torch.contiguous_format


def sweep(
    model: Callable[[Tensor], Any],
    points: Callable[[Tensor, Tensor], Tensor],
    n_steps: int,
    batch: int,
    target: None | int | Tensor | Callable[[Tensor], Tensor],
    *,
    weights: Tensor | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    create_graph: bool = False,
    progress: bool = False,
    desc: str = "",
) -> Iterator[Chunk]:
    """Gradients of the selected scalar at ``n_steps × batch`` points, ``batch_size`` rows at a time.

    Row ``r`` is the point ``points(step, example)`` with ``step = r // batch`` and ``example = r %
    batch`` (step-major order).  ``points`` receives the ``(R,)`` index tensors of one chunk and
    returns the ``(R, *features)`` points; it is called chunk by chunk in increasing row order, so
    nothing of size ``n_steps × batch`` is ever built.  ``weights`` (``(n_steps,)`` or ``(n_steps,
    batch)``) multiplies each row's gradient inside the backward pass (``grad_outputs``), e.g. the
    quadrature weights of Integrated Gradients.

    Consumers accumulate ``chunk.grads`` into a ``(batch, *features)`` tensor with
    :func:`accumulate` (``acc.index_add_(0, chunk.example, contribution)``): on CPU ``index_add_``
    adds the rows one after the other, so each example's sum is taken in step order whatever the
    chunking (on CUDA it uses atomic adds, equal to rounding).

    With ``create_graph=False`` the points are detached and the results carry no graph.  With
    ``create_graph=True`` the graph of the gradients is kept (double backprop: a function of the
    attributions can be differentiated with respect to the model parameters, and to the inputs
    when the points depend on inputs that require grad); memory then grows with the number of
    steps.  The caller is responsible for :func:`eval_mode`.
    """
    if weights is not None and weights.ndim == 1:
        weights = weights.unsqueeze(1).expand(n_steps, batch)
    n_chunks = -(-n_steps * batch // batch_size)
    bar = tqdm(total=n_chunks, desc=desc, disable=not progress, leave=False)
    layout = None
    try:
        for step, example in row_chunks(n_steps, batch, batch_size):
            if create_graph:
                z = points(step, example)
                if not z.requires_grad:
                    z = z.detach().requires_grad_(True)
            else:
                with torch.no_grad():
                    z = points(step, example)
                z = z.detach().requires_grad_(True)
            step, example = step.to(z.device), example.to(z.device)
            if layout is None:
                model, layout = fast_path(model, z.detach(), n_steps * batch, create_graph)
            with torch.enable_grad():
                # the model gets a copy: an in-place first op (ReLU(inplace=True)) must not modify z
                value = select(model(z.clone(memory_format=layout)), target, example)
                w = torch.ones_like(value) if weights is None else weights[step, example].to(value)
                (grads,) = torch.autograd.grad(value, z, grad_outputs=w, create_graph=create_graph)
                grads = grads.contiguous()
            if not create_graph:
                value = value.detach()
            yield Chunk(step, example, grads, value)
            bar.update(1)
    finally:
        bar.close()


# ------------------------------------------------------------------------ affine prefix
#: layer types that are affine maps of their input (BatchNorm and Dropout only in eval mode)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_AFFINE = (*_LAYERS, nn.Flatten, nn.Unflatten, nn.Identity)
_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d)


def _is_affine(module: nn.Module) -> bool:
    kind = type(module)  # exact types: a subclass (LoRA, parametrised weights) may not be affine
    if module_has_hooks(module):
        return False
    if kind in _DROPOUT:
        return not module.training
    if kind in _BATCH_NORM:  # without running statistics eval mode normalises by the batch's own
        return not module.training and module.running_mean is not None
    return kind in _AFFINE


def affine_prefix(model: Any) -> tuple[nn.Module, nn.Module] | None:
    """``(prefix, rest)`` with ``model(x) = rest(prefix(x))`` and ``prefix`` an affine map, for an
    ``nn.Sequential`` (in its current mode) whose leading layers are ``Linear``, ``Conv1d/2d/3d``,
    ``Flatten``, ``Identity``, eval-mode ``BatchNorm`` or ``Dropout`` and include at least one
    ``Linear``/``Conv``; None otherwise (any other model, or hooks on the model or those layers).

    Because ``prefix(x) = J x + c`` with a constant ``J``, a weighted sum of input gradients
    ``Σ_k w_k ∇_x f(x_k) = Jᵀ Σ_k w_k ∇_z rest(z_k)`` needs one product with ``Jᵀ``
    (:func:`affine_transpose`) instead of one per point, and on a straight path ``z_k = prefix(x'_k)``
    interpolates ``prefix(x')`` and ``prefix(x)``: Integrated Gradients then sends the prefix two
    batches instead of ``steps``.  On a model whose first layer dominates the cost (a wide input
    layer) this is most of the work.
    """
    if not isinstance(model, nn.Sequential) or module_has_hooks(model) or global_module_hooks():
        return None
    layers = list(model)
    k = 0
    while k < len(layers) and _is_affine(layers[k]):
        k += 1
    if not any(type(m) in _LAYERS for m in layers[:k]):
        return None
    return nn.Sequential(*layers[:k]), nn.Sequential(*layers[k:])


def map_rows(fn: Callable[[Tensor], Tensor], inputs: Tensor, batch_size: int) -> Tensor:
    """``fn`` applied to ``inputs`` ``batch_size`` rows at a time, without a graph."""
    with torch.no_grad():
        return torch.cat([fn(inputs[i:i + batch_size]) for i in range(0, inputs.shape[0], batch_size)])


def affine_transpose(prefix: nn.Module, like: Tensor) -> Callable[[Tensor], Tensor]:
    """``g -> Jᵀ g`` row by row for the affine ``prefix`` (``J`` its constant Jacobian): ``(R,
    *out)`` to ``(R, *features)`` with ``features`` those of ``like``.  The pullback is taken once
    at a zero row and mapped over the rows with ``vmap`` (one batched product, no forward)."""
    with torch.enable_grad():
        _, pullback = torch.func.vjp(prefix, torch.zeros_like(like[:1]))
    mapped = torch.vmap(lambda row: pullback(row.unsqueeze(0))[0].squeeze(0))

    def transpose(rows: Tensor) -> Tensor:
        with torch.no_grad():  # no graph back to the parameters
            return mapped(rows)

    return transpose


def accumulate(total: Tensor, example: Tensor, rows: Tensor, *, create_graph: bool = False) -> Tensor:
    """``total[example[r]] += rows[r]`` for every row ``r``, in row order (in place unless
    ``create_graph``, where the out-of-place ``index_add`` keeps the graph).  Returns ``total``."""
    if create_graph:
        return total.index_add(0, example, rows)
    return total.index_add_(0, example, rows)


def forward_values(
    model: Callable[[Tensor], Any],
    points: Callable[[Tensor, Tensor], Tensor],
    n_steps: int,
    batch: int,
    target: None | int | Tensor | Callable[[Tensor], Tensor],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    create_graph: bool = False,
) -> Tensor:
    """``f_target`` at the points of :func:`sweep` (forward passes only), shape ``(n_steps,
    batch)``; without a graph unless ``create_graph``."""
    out, layout = [], None
    with torch.set_grad_enabled(create_graph):
        for step, example in row_chunks(n_steps, batch, batch_size):
            z = points(step, example)
            if layout is None:
                model, layout = fast_path(model, z.detach(), n_steps * batch, create_graph)
            z = z.contiguous(memory_format=layout)
            out.append(select(model(z), target, example.to(z.device)))
    return torch.cat(out).reshape(n_steps, batch)
