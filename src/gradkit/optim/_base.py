"""Shared machinery of the gradkit optimizers.

Every optimizer in :mod:`gradkit.optim` is written as one **kernel**: a function that updates a
parameter tensor and its state tensors in place from a gradient and a small vector ``h`` of
per-step scalars (learning rate, betas, bias corrections, ...).  The kernel is the readable
reference implementation of the paper's update.  Elementwise kernels accept any shape;
kernels that reduce over a tensor (norms, projections) take a batch ``(B, *S)`` of tensors of one
shape and reduce per leading index.  :class:`Optimizer` (a :class:`torch.optim.Optimizer`)
does everything the optimizers would otherwise repeat:

* hyperparameter validation with uniform messages (:func:`check_range`, :func:`check_betas`),
  applied to every parameter group, including groups added later;
* collecting the parameters that have a gradient, refusing sparse gradients, creating state lazily
  (parameters without a gradient never get state), counting steps per parameter;
* complex parameters (kernels see ``torch.view_as_real`` views), ``maximize``, tensor learning
  rates, closures;
* the choice of execution path, per group:

  ``foreach=False``  the reference: the kernel is called once per parameter tensor, eagerly;
  ``foreach=True``   (default) elementwise kernels are called once on *packed* copies of all small
                     tensors of a group (numel <= ``PACK_NUMEL``), large tensors one by one in
                     chunks of ``CHUNK_NUMEL`` elements;
                     batched kernels once per shape; state tensors of packed parameters are views
                     into one buffer per state (so packing copies only parameters and gradients);
  ``fused=True``     the same schedule, but the kernel is compiled into one fused loop (compiled
                     once per kernel, dtype and static option; shapes are dynamic).  Flat inputs
                     (packed buffers, contiguous large tensors) of elementwise kernels go through
                     :func:`run_flat` (traced once, called without ``torch.compile``'s per-call
                     guards: ~20 us instead of ~60-90 us per call on a small CPU); the rest through
                     :func:`compiled`.

All three paths run the same kernel, so they compute the same numbers (tests hold them equal in
float64).  Optimizer state has the parameter's dtype (as in ``torch.optim``); for bfloat16/float16
parameters the kernels do their arithmetic in float32 and round on store.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

logger = logging.getLogger("gradkit")

__all__ = ["Optimizer", "PerTensorOptimizer", "SparseGradientError", "check_range", "check_betas", "check_lr", "check_bool",
           "PACK_NUMEL"]

#: Tensors with at most this many (real) elements are packed into one flat buffer per
#: (dtype, device, step) by the ``foreach``/``fused`` paths.
PACK_NUMEL = 1 << 15
#: The eager ``foreach`` path runs elementwise kernels on large tensors in chunks of this size.
CHUNK_NUMEL = 1 << 16

Kernel = Callable[..., None]
_DTYPE_DEVICE = operator.attrgetter("dtype", "device")
_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")
_NUMEL = torch.Tensor.numel


class SparseGradientError(TypeError, RuntimeError):
    """Raised when a parameter has a sparse gradient (a ``TypeError`` and, like torch, a ``RuntimeError``)."""


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return "inf" if x == math.inf else ("-inf" if x == -math.inf else repr(x))


def check_range(
    owner: str,
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool | None = None,
    high_open: bool | None = None,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number in the interval (uniform message).
    An end is open when ``*_open`` says so; by default (``None``) exactly when it is infinite, so
    ``±inf`` is refused unless a caller admits it with ``high_open=False`` (e.g. ``norm_type``)."""
    low_open = low == -math.inf if low_open is None else low_open
    high_open = high == math.inf if high_open is None else high_open
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    interval = f"{left}{_fmt(low)}, {_fmt(high)}{right}"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{owner}: invalid {name}={value!r}; expected a real number in {interval}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars included
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected a real number in {interval}")
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok or math.isnan(value):
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected a real number in {interval}")


def check_lr(owner: str, lr: Any) -> None:
    """Learning rate: a float or a one-element tensor in [0, inf)."""
    check_range(owner, "lr", lr, 0.0, math.inf)


def check_betas(owner: str, betas: Any, n: int = 2, name: str = "betas") -> None:
    """A tuple of ``n`` decay rates, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != n:
        raise ValueError(f"{owner}: invalid {name}={betas!r}; expected a tuple of {n} floats, each in [0, 1)")
    for i, b in enumerate(betas):
        check_range(owner, f"{name}[{i}]", b, 0.0, 1.0, high_open=True)


def check_adam_group(owner: str, group: dict[str, Any]) -> None:
    """The hyperparameters every Adam-like group has: ``betas`` (2 decay rates in [0, 1)),
    ``eps >= 0`` and ``weight_decay >= 0``."""
    check_betas(owner, group["betas"])
    check_range(owner, "eps", group["eps"], 0.0)
    check_range(owner, "weight_decay", group["weight_decay"], 0.0)


def check_int(owner: str, name: str, value: Any, low: int) -> int:
    """An integer ``>= low`` (``bool`` refused; numpy integers accepted), returned as is."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected an integer >= {low}")
    return value


def check_bool(owner: str, name: str, value: Any) -> None:
    """A flag: exactly ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected True or False")


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected one of {list(choices)}")


def as_float(x: Any) -> float:
    """A hyperparameter as a Python float (tensor learning rates are read once per step)."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute in: float32 for 16-bit floats, otherwise the dtype itself."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


# ----------------------------------------------------------------------------------------------
# compiled kernels
# ----------------------------------------------------------------------------------------------
#: Variants (dtypes x static options x tensor ranks) one kernel may be compiled for; torch's own
#: default (8) is reached by e.g. AdamP on a network with 1-, 2- and 4-D weights in two dtypes.
RECOMPILE_LIMIT = 64


@functools.cache
def compiled(kernel: Kernel) -> Kernel:
    """``torch.compile`` of a kernel (dynamic shapes, one graph); compiled lazily, cached per kernel.

    A call that needs a new variant after torch's recompile limit is compiled again with the
    limit raised to :data:`RECOMPILE_LIMIT` for that call only (with ``fullgraph=True`` the limit
    is a hard error, raised before the kernel runs, so nothing was modified).
    """
    logger.info("gradkit.optim: compiling %s (first fused step; takes a few seconds)", kernel.__qualname__)
    fn = torch.compile(kernel, dynamic=True, fullgraph=True)
    config = torch._dynamo.config
    key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"

    @functools.wraps(kernel)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if "Limit" not in type(err).__name__:  # FailOnRecompileLimitHit (FailOnCacheLimitHit before)
                raise
        logger.info("gradkit.optim: %s needs more than %s compiled variants", kernel.__qualname__, getattr(config, key))
        with config.patch(**{key: max(RECOMPILE_LIMIT, getattr(config, key))}):
            return fn(*args, **kwargs)

    return call


#: Sizes of the example tensors the guard-free kernels are traced with, per dimension (any sizes
#: >= 2 that differ from each other and from every ``len(h)``: equal sizes would share a symbol).
_TRACE_NUMEL = 1031
_TRACE_SIZES = (_TRACE_NUMEL, 1033, 1039, 1049)
_TRACE_BATCH = 3  # leading (batch) dimension of tensors of rank >= 3


def _trace_shape(ones: tuple[bool, ...]) -> tuple[int, ...]:
    """Example shape for inputs of rank ``len(ones)`` whose dimensions flagged in ``ones`` are 1
    (traced as 1: a size-1 dimension may broadcast, so it is never left symbolic)."""
    sizes = _TRACE_SIZES[: len(ones)] if len(ones) < 3 else (_TRACE_BATCH, *_TRACE_SIZES[: len(ones) - 1])
    return tuple(1 if one else size for one, size in zip(ones, sizes))


@functools.cache
def _graph_compiled(kernel: Kernel, static: tuple, dtypes: tuple, h_dtype: torch.dtype, h_len: int,
                    device: torch.device, ones: tuple[bool, ...] = (False,)) -> Callable[..., Any] | None:
    """A kernel compiled for inputs of one (dynamic) shape, called without ``torch.compile``'s
    per-call machinery (guards, frame evaluation: ~50-90 us per call on a small CPU, comparable to
    the kernel itself on a 262k-element tensor).

    The kernel is traced with symbolic shapes (``make_fx``) and compiled by inductor
    (``standalone_compile``).  Nothing is checked at call time, so the key holds everything the
    graph assumed: the kernel, its static options, every input's dtype, ``len(h)``, the device and
    the inputs' rank with which dimensions are 1 (``ones``); callers pass contiguous tensors of
    one shape.  Python arithmetic on sizes inside the kernel would be frozen at the traced value
    (write size-dependent constants as tensor operations).  Kernels must read each input before
    they write it: inductor (2.13, CPU) has been seen to reorder a read of an input after its own
    ``copy_`` on this path (ExtraGradient, which therefore sets ``flat_compilable = False``; the
    conformance suite's fused-vs-reference tests catch such a kernel).  ``None`` if this torch cannot do it
    (the caller then uses :func:`compiled`).
    """
    try:
        from torch.fx.experimental.proxy_tensor import make_fx

        options = dict(static)

        def flat(*args: torch.Tensor) -> Any:
            out = kernel(*args[:-1], h=args[-1], **options)
            return () if out is None else out

        if len(ones) > 3:  # the example tensors below would be ~1000**rank elements
            raise ValueError(f"rank {len(ones)} > 3")
        shape = _trace_shape(ones)
        if h_len in shape:
            raise ValueError(f"len(h) = {h_len} equals a traced size")
        examples = [torch.zeros(shape, dtype=d, device=device) for d in dtypes]
        examples.append(torch.zeros(h_len, dtype=h_dtype, device=device))
        with torch.no_grad():
            # functionalized first: the graph computes every new value from the inputs' old values
            # and copies into the mutated inputs at the end (in-place ordering is then explicit)
            graph = make_fx(torch.func.functionalize(flat, remove="mutations"),
                            tracing_mode="symbolic")(*examples)
            return torch._inductor.standalone_compile(graph, examples, dynamic_shapes="from_graph")
    except Exception as err:  # pragma: no cover - depends on the torch version
        logger.info("gradkit.optim: no guard-free compiled kernel for %s (%s); using torch.compile",
                    kernel.__qualname__, err)
        return None


def run_flat(kernel: Kernel, args: Sequence[torch.Tensor], h: torch.Tensor, static: dict[str, Any]) -> Any:
    """Run a compiled ``kernel`` on contiguous ``args`` of one shape (1-D of length >= 2 for the
    elementwise kernels; any rank for others, e.g. AdamP's per-row test on ``(B, rows, cols)``
    batches; see :func:`_graph_compiled`), falling back to :func:`compiled`; returns what the
    kernel returns (a kernel returning a tensor, e.g. a reduction, gets it back; ``()`` for ``None``)."""
    fn = None
    if h.device.type == "cpu":  # the only device this path has been tested on
        try:
            fn = _graph_compiled(kernel, tuple(sorted(static.items())), tuple(a.dtype for a in args), h.dtype,
                                 h.numel(), h.device, tuple(s == 1 for s in args[0].shape))
        except TypeError:  # an unhashable static option
            fn = None
    if fn is None:
        return compiled(kernel)(*args, h=h, **static)
    return fn(*args, h)


class _Pack:
    """Flat buffers for the packed small tensors of one bucket (same group, dtype, device, step).

    ``buffers[0]``/``buffers[1]`` are scratch copies of the parameters and gradients; the state
    tensors of the members *live* in ``states[k]``: each member's ``state[name]`` is a view into
    it, so packing costs no state copies.  When a state entry is replaced (``load_state_dict``,
    user code), :meth:`adopt` copies the values back in and re-installs the views.
    """

    def __init__(self, members: list[torch.Tensor], names: tuple[str, ...],
                 state_shapes: Sequence[Sequence[tuple[int, ...]]] | None = None) -> None:
        """``state_shapes[k][i]``: the shape of state ``names[k]`` of member ``i`` (default: the
        member's own shape; real shapes, i.e. after ``view_as_real`` for complex members)."""
        self.members = members
        self.names = names
        shapes = [_real(p).shape for p in members]
        ref = _real(members[0])
        # members are laid out grouped by their shape less its first dimension, so that each
        # group's parameters (and gradients) are copied in by one torch.cat, a few times faster
        # than a foreach copy of many small tensors; 0-dim members are copied one by one
        key = [(len(s) == 0, len(s), tuple(s[1:])) for s in shapes]
        order = sorted(range(len(members)), key=key.__getitem__)

        def buffer_and_views(shapes: Sequence[tuple[int, ...]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
            sizes = [math.prod(shapes[i]) for i in order]
            buf = torch.empty(sum(sizes), dtype=ref.dtype, device=ref.device)
            views: list[torch.Tensor] = [buf] * len(shapes)
            for i, v in zip(order, buf.split(sizes)):
                views[i] = v.view(shapes[i])
            return buf, views

        layouts = [shapes, shapes] + [list(state_shapes[k]) if state_shapes else shapes for k in range(len(names))]
        self.buffers, self.views = (list(x) for x in zip(*map(buffer_and_views, layouts)))
        cplx = members[0].is_complex()
        # the objects stored in the optimizer state (complex views for complex parameters)
        self.installed = [[torch.view_as_complex(v) if cplx else v for v in vs] for vs in self.views[2:]]
        # (member indices or None = all in order, output view of buffers[0], of buffers[1])
        self._cats: list[tuple[list[int] | None, torch.Tensor, torch.Tensor]] = []
        self._rest = [i for i in order if not shapes[i]]  # 0-dim members
        start = 0
        for (scalar, _, rest), run in itertools.groupby(order, key=key.__getitem__):
            if scalar:
                break
            idx = list(run)
            numel = sum(math.prod(shapes[i]) for i in idx)
            out_shape = (sum(shapes[i][0] for i in idx), *rest)
            self._cats.append((None if idx == list(range(len(members))) else idx,
                               *(b[start:start + numel].view(out_shape) for b in self.buffers[:2])))
            start += numel

    def load(self, k: int, tensors: list[torch.Tensor]) -> None:
        """Copy the members' parameters (``k = 0``) or gradients (``k = 1``) into ``buffers[k]``."""
        for idx, *outs in self._cats:
            torch.cat(tensors if idx is None else [tensors[i] for i in idx], out=outs[k])
        if self._rest:
            torch._foreach_copy_([self.views[k][i] for i in self._rest], [tensors[i] for i in self._rest])

    def installed_in(self, states: list[dict[str, Any]]) -> bool:
        return all(all(map(operator.is_, [st[n] for st in states], objs))
                   for n, objs in zip(self.names, self.installed))

    def adopt(self, states: list[dict[str, Any]]) -> None:
        for k, n in enumerate(self.names):
            torch._foreach_copy_(self.views[2 + k], [_real(st[n]) for st in states])
            for st, obj in zip(states, self.installed[k]):
                st[n] = obj

    def release(self, states: dict[Any, dict[str, Any]], keep: set[int]) -> None:
        """Give members not in ``keep`` their own state tensors (so this buffer can be freed)."""
        for i, p in enumerate(self.members):
            if id(p) in keep:
                continue
            st = states.get(p)
            if st is None:
                continue
            for n, objs in zip(self.names, self.installed):
                if st.get(n) is objs[i]:
                    st[n] = objs[i].clone()


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


# ----------------------------------------------------------------------------------------------
# base optimizer
# ----------------------------------------------------------------------------------------------
class Optimizer(torch.optim.Optimizer):
    """Base class of the gradkit optimizers (see the module docstring).

    Subclasses define

    * ``state_names``: names of the per-parameter state tensors (created as zeros of the
      parameter's shape and dtype, unless :meth:`_init_state` is overridden);
    * ``kernel``: a ``staticmethod`` ``kernel(param, grad, *states, h, **static)`` updating ``param``
      and the states in place;
    * :meth:`_validate` (checks one param group), :meth:`_hyper` (the vector ``h`` for a group at a
      given step, as Python floats) and optionally :meth:`_static` (Python constants passed to the
      kernel, e.g. ``nesterov``; ``maximize`` is always passed);
    * ``elementwise = False`` when the kernel mixes elements of a tensor (norms, projections): the
      kernel then receives a batch ``(B, *S)`` of tensors of one shape ``S`` (:meth:`_batch_shape`)
      and reduces per leading index; the reference path passes one tensor (``B = 1``), the fast
      paths pack all tensors of a group that share ``S``.  ``batchable = False`` keeps ``B = 1``.
    """

    state_names: tuple[str, ...] = ()
    elementwise: bool = True
    batchable: bool = True
    compilable: bool = True  # False: ``fused=True`` runs the eager kernel on the same packed schedule
    # False: ``fused=True`` calls the kernel through torch.compile even on flat inputs, instead of
    # :func:`run_flat` (for kernels that inductor miscompiles when traced without dynamo)
    flat_compilable: bool = True
    supports_complex: bool = True
    kernel: Kernel

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(defaults, maximize=maximize, foreach=foreach, fused=fused)
        self._packs: dict[tuple, _Pack] = {}
        self._state_lists: dict[int, tuple] = {}
        super().__init__(params, defaults)

    # -- per-optimizer hooks -------------------------------------------------------------------
    def _validate(self, group: dict[str, Any]) -> None:  # pragma: no cover - overridden
        pass

    def _hyper(self, group: dict[str, Any], step: int) -> list[float]:  # pragma: no cover
        raise NotImplementedError

    def _static(self, group: dict[str, Any]) -> dict[str, Any]:
        return {}

    def _batch_shape(self, p: torch.Tensor) -> tuple[int, ...] | None:
        """Non-elementwise kernels: the shape ``S`` of one tensor in a batch ``(B, *S)``; None = elementwise."""
        return tuple(p.shape)

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] = 0
        for name in self.state_names:
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # -- torch.optim plumbing ------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except (ValueError, TypeError):
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        check_bool(name, "maximize", group["maximize"])
        for flag in ("foreach", "fused"):
            if group[flag] not in (None, True, False):
                raise ValueError(f"{name}: invalid {flag}={group[flag]!r}; expected None, True or False")
        if group["foreach"] and group["fused"]:
            raise ValueError(f"{name}: foreach=True and fused=True are exclusive; pick one")
        check_lr(name, group["lr"])
        self._validate(group)
        if not self.supports_complex and any(p.is_complex() for p in group["params"]):
            raise TypeError(f"{name} does not support complex parameters (its update is not defined for them)")

    #: Constructor options held as attributes (not per-group hyperparameters), e.g. LionK's ``k``:
    #: kept by ``copy.deepcopy`` and pickling, for which torch.optim keeps ``defaults``, ``state``
    #: and ``param_groups`` only; :meth:`_configure` derives the rest from them.
    _options: tuple[str, ...] = ()

    def _configure(self) -> None:
        """Set the attributes derived from :attr:`_options` (at construction and unpickling)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._packs = {}
        self._state_lists = {}
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
        self._configure()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in self._options})
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    # -- the shared step -----------------------------------------------------------------------
    def _mode(self, group: dict[str, Any]) -> str:
        if group["fused"]:
            return "fused"
        if group["foreach"] is False:
            return "reference"
        return "foreach"

    def _with_grads(self, group: dict[str, Any]) -> list[torch.Tensor]:
        """The parameters of ``group`` that have a gradient; :class:`SparseGradientError` if one is sparse."""
        return self._params_and_grads(group)[0]

    def _params_and_grads(self, group: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`_with_grads` and their gradients, each ``.grad`` read once (on a thousand small
        tensors, every pass over them costs as much as the step's arithmetic).  Parameters without
        elements (e.g. the weight of ``nn.Linear(0, n)``) are left out like those without a
        gradient: there is nothing to update, and they get no state."""
        params = list(group["params"])
        grads = list(map(_GRAD, params))
        if any(map(operator.is_, grads, itertools.repeat(None))):  # some parameters have no gradient
            params = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        if not all(map(_NUMEL, grads)):  # some have no elements
            params = [p for p, g in zip(params, grads) if g.numel()]
            grads = [g for g in grads if g.numel()]
        if any(map(_IS_SPARSE, grads)):
            raise SparseGradientError(
                f"{type(self).__name__} does not support sparse gradients; use a dense gradient "
                "(e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam"
            )
        return params, grads

    def _step_group(self, group: dict[str, Any]) -> None:
        params, grads = self._params_and_grads(group)
        if not params:
            return
        states = self._states_of(group, params)
        for p, st in zip(params, states):
            if not st:
                self._init_state(p, st, group)
            st["step"] += 1

        mode = self._mode(group)
        kernel = compiled(type(self).kernel) if mode == "fused" and self.compilable else type(self).kernel
        static = dict(self._static(group), maximize=group["maximize"])

        # buckets: same step count (bias corrections), dtype and device
        steps = [st["step"] for st in states]
        if steps.count(steps[0]) == len(steps) and len(set(map(_DTYPE_DEVICE, params))) == 1:
            buckets = {(steps[0], params[0].dtype, params[0].device): list(range(len(params)))}
        else:
            buckets = {}
            for i, (p, step) in enumerate(zip(params, steps)):
                buckets.setdefault((step, p.dtype, p.device), []).append(i)

        for (step, dtype, device), idx in buckets.items():
            cplx = dtype.is_complex
            real_dtype = dtype.to_real() if cplx else dtype
            h = torch.tensor(self._hyper(group, step), dtype=opmath_dtype(real_dtype), device=device)
            if self.elementwise:
                self._run_elementwise(group, mode, kernel, static, h, cplx, idx, params, grads, states)
            else:
                self._run_batched(group, mode, kernel, static, h, cplx, idx, params, grads, states)

    def _states_of(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[dict[str, Any]]:
        """``[self.state[p] for p in params]``, cached per group (hashing 1000s of tensors is slow)."""
        cached = self._state_lists.get(id(group))
        if (cached is not None and cached[0] is self.state and len(cached[1]) == len(params)
                and all(map(operator.is_, cached[1], params))):
            return cached[2]
        states = [self.state[p] for p in params]
        self._state_lists[id(group)] = (self.state, params, states, {})
        return states

    def _small(self, group: dict[str, Any], idx: list[int], params: list[torch.Tensor]) -> list[int]:
        """The indices in ``idx`` of tensors small enough to pack (``numel <= PACK_NUMEL``); for a
        whole group, kept with :meth:`_states_of`'s cache, which (like the packs) knows parameters
        by identity."""
        if len(idx) != len(params):
            return [i for i in idx if params[i].numel() <= PACK_NUMEL]
        memo = self._state_lists[id(group)][3]
        small = memo.get("small")
        if small is None:
            small = memo["small"] = [i for i in idx if params[i].numel() <= PACK_NUMEL]
        return small

    def _run_elementwise(self, group, mode, kernel, static, h, cplx, idx, params, grads, states) -> None:
        small = self._small(group, idx, params) if mode != "reference" else []
        if len(small) < 2 and not (small and mode == "fused"):
            small = []  # packing one tensor gains nothing (except a fixed shape when compiled)
        if small:
            packed = set(small)
            large = [i for i in idx if i not in packed]
        else:
            large = idx
        flat = mode == "fused" and self.compilable and self.flat_compilable
        for i in large:
            args = [params[i], grads[i]] + [states[i][n] for n in self.state_names]
            if cplx:
                args = [_real(a) for a in args]
            contiguous = all(a.is_contiguous() for a in args)
            if mode == "fused":
                n = args[0].numel()
                if n <= 1:  # a size-1 input would force a recompilation
                    type(self).kernel(*args, h=h, **static)
                    continue
                if flat and contiguous and all(a.numel() == n for a in args):
                    run_flat(type(self).kernel, [a.view(-1) for a in args], h, static)
                    continue
            elif mode == "foreach" and contiguous and args[0].numel() > CHUNK_NUMEL:
                # eager kernel on cache-sized chunks: its temporaries stay small and are reused
                # (whole-tensor temporaries cost a fresh, page-faulting allocation per operation)
                flat = [a.view(-1) for a in args]
                for chunk in zip(*(f.split(CHUNK_NUMEL) for f in flat)):
                    kernel(*chunk, h=h, **static)
                continue
            kernel(*args, h=h, **static)
        if small and len(small) == len(params):  # the common case: no index lists to build
            self._step_packed(group, kernel, params, grads, states, h, static, cplx, None)
        elif small:
            self._step_packed(group, kernel, [params[i] for i in small], [grads[i] for i in small],
                              [states[i] for i in small], h, static, cplx, None)

    def _run_batched(self, group, mode, kernel, static, h, cplx, idx, params, grads, states) -> None:
        """Non-elementwise kernels see tensors of shape ``(B, *S)``, ``S = self._batch_shape(param)``.

        The reference path calls the kernel once per tensor (``B = 1``); the fast paths pack the
        tensors that share ``S`` into one buffer.  ``S = None`` marks tensors the kernel treats
        elementwise: they are packed flat, as ``(1, total)``.
        """
        groups: dict[Any, list[int]] = {}
        for i in idx:
            shape = self._batch_shape(_real(params[i]) if cplx else params[i])
            # small tensors of one shape are batched; large ones run alone (B = 1), which compiles
            # to better code than a dynamic batch dimension
            batch = mode != "reference" and self.batchable and (shape is None or params[i].numel() <= PACK_NUMEL)
            groups.setdefault((shape, None if batch else i), []).append(i)
        for (shape, solo), members in groups.items():
            if solo is None and (len(members) > 1 or mode == "fused"):
                self._step_packed(group, kernel, [params[i] for i in members], [grads[i] for i in members],
                                  [states[i] for i in members], h, static, cplx, shape or ())
                continue
            i = members[0]
            args = [params[i], grads[i]] + [states[i][n] for n in self.state_names]
            if cplx:
                args = [_real(a) for a in args]
            view = (1, *shape) if shape is not None else (1, -1)
            run = kernel if args[0].numel() > 1 else type(self).kernel  # no size-1 recompilation
            if all(a.is_contiguous() for a in args):
                run(*[a.view(view) for a in args], h=h, **static)
            else:  # work on contiguous copies, then write back
                work = [a.reshape(view).clone() for a in args]
                run(*work, h=h, **static)
                for a, w in zip([args[0]] + args[2:], [work[0]] + work[2:]):
                    a.copy_(w.view_as(a))

    def _step_packed(self, group, kernel, params, grads, states, h, static, cplx, shape) -> None:
        """``shape``: None = elementwise (flat buffers); () = flat as (1, total); else buffers as (B, *shape)."""
        key = (id(group), len(params), id(params[0]), id(params[-1]))  # cheap; members checked below
        pack = self._packs.get(key)
        if pack is None or not all(map(operator.is_, pack.members, params)):
            pack = self._new_pack(key, params)
        if not pack.installed_in(states):
            pack.adopt(states)
        if cplx:
            params = [_real(p) for p in params]
            grads = [_real(g) for g in grads]
        pack.load(0, params)
        pack.load(1, grads)
        buffers = pack.buffers
        if shape is None and group["fused"] and self.compilable and self.flat_compilable and buffers[0].numel() > 1:
            run_flat(type(self).kernel, buffers, h, static)
        else:
            if buffers[0].numel() <= 1:
                kernel = type(self).kernel  # a size-1 buffer would force a recompilation
            if shape is not None:
                buffers = [b.view(1, -1) if shape == () else b.view(-1, *shape) for b in buffers]
            kernel(*buffers, h=h, **static)
        torch._foreach_copy_(params, pack.views[0])

    def _new_pack(self, key: tuple, params: list[torch.Tensor], names: tuple[str, ...] | None = None,
                  state_shapes: Sequence[Sequence[tuple[int, ...]]] | None = None) -> _Pack:
        keep = set(map(id, params))
        for old_key in list(self._packs):
            old = self._packs[old_key]
            # packs of the same group sharing members are superseded; cap the cache size
            if len(self._packs) > 16 or (old_key[0] == key[0] and not keep.isdisjoint(map(id, old.members))):
                self._packs.pop(old_key).release(self.state, keep)
        pack = _Pack(params, self.state_names if names is None else names, state_shapes)
        self._packs[key] = pack
        return pack

    # -- introspection -------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes held by tensor state (what ``state_dict`` stores besides step counters)."""
        seen: set[int] = set()
        total = 0
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor) and id(v) not in seen:
                    seen.add(id(v))
                    total += v.numel() * v.element_size()
        return total

    def scratch_bytes(self) -> int:
        """Bytes of working memory kept between steps besides the state: on the default and fused
        paths, the flat copies of the parameters and gradients of the packed small tensors (the
        packs' state buffers *are* the state, counted by :meth:`state_bytes`).  For float32, 8
        bytes per packed parameter: in a real model only its biases and norms (tensors of at most
        ``PACK_NUMEL`` entries); 0 on the ``foreach=False`` path."""
        return sum(b.numel() * b.element_size() for pack in self._packs.values() for b in pack.buffers[:2])


class PerTensorOptimizer(Optimizer):
    """Base of optimizers whose update is not one elementwise or batched kernel (compressed,
    projected or low-rank state: MicroAdam, FRUGAL, AdamWSN).  Each parameter tensor with a
    gradient is updated by :meth:`_update`, one at a time, with the same validation, lazy state
    and step counting as :class:`Optimizer`; ``foreach``/``fused`` are accepted and run this same
    code (a single path).  :meth:`_check_state` may refuse existing state before anything changes."""

    def _update(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _check_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        pass

    def _prepare(self, group: dict[str, Any]) -> list[torch.Tensor]:
        """The parameters of ``group`` with a gradient, each with its step counted, after every one
        of them has been checked (and its state created): an error (a sparse gradient, state that
        :meth:`_check_state` refuses) is raised before any parameter or step count changes."""
        params = self._with_grads(group)
        for p in params:
            state = self.state[p]
            if not state:
                self._init_state(p, state, group)
            self._check_state(p, state, group)
        for p in params:
            self.state[p]["step"] += 1
        return params

    def _step_group(self, group: dict[str, Any]) -> None:
        for p in self._prepare(group):
            self._update(p, self.state[p], group)

    def _batches(self, group: dict[str, Any], batchable: Callable[[torch.Tensor], bool],
                 size: Callable[[torch.Tensor], Any] = lambda p: tuple(p.shape),
                 params: list[torch.Tensor] | None = None) -> list[list[torch.Tensor]]:
        """The parameters of :meth:`_prepare` (or ``params``, already prepared), grouped for one
        batched update each: off the reference path, those for which ``batchable(p)`` holds by
        ``size(p)``, dtype, device and step count; every other parameter alone."""
        batched = self._mode(group) != "reference"
        buckets: dict[Any, list[torch.Tensor]] = {}
        for p in self._prepare(group) if params is None else params:
            key = (size(p), p.dtype, p.device, self.state[p]["step"]) if batched and batchable(p) else id(p)
            buckets.setdefault(key, []).append(p)
        return list(buckets.values())

