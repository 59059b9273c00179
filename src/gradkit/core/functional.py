"""A functional view of an ``nn.Module``: its parameters as named tensors, flat vectors and back.

Every product in :mod:`gradkit.core` differentiates a function of parameters.  This module turns
a model into such a function (``torch.func.functional_call`` underneath), selects a subset of its
parameters (one layer, a block), and converts between the parameter structure and flat vectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

__all__ = [
    "Params",
    "FunctionalModel",
    "select_params",
    "flatten",
    "unflatten",
    "check_like",
    "check_train_mode",
]

#: What gradkit accepts as "parameters": one tensor, a tuple/list of tensors or a dict of them.
Params = Union[Tensor, Sequence[Tensor], Mapping[str, Tensor]]


def _leaves(tree: Params, name: str) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, Mapping):
        leaves = list(tree.values())
    elif isinstance(tree, (tuple, list)):
        leaves = list(tree)
    else:
        raise TypeError(
            f"{name} must be a tensor, a tuple/list of tensors or a dict of tensors; got {type(tree).__name__}"
        )
    for i, t in enumerate(leaves):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: entry {i} is a {type(t).__name__}, expected a tensor")
    return leaves


def flatten(tree: Params) -> Tensor:
    """Concatenate the entries of a tensor / tuple / list / dict into one flat vector."""
    leaves = _leaves(tree, "tree")
    if not leaves:
        raise ValueError("cannot flatten an empty structure")
    return torch.cat([t.reshape(-1) for t in leaves])


def unflatten(vector: Tensor, like: Params) -> Params:
    """Split a flat vector into tensors shaped like ``like`` (same container type and keys)."""
    leaves = _leaves(like, "like")
    sizes = [t.numel() for t in leaves]
    if vector.ndim != 1 or vector.numel() != sum(sizes):
        raise ValueError(
            f"vector must be flat with {sum(sizes)} entries to match the structure, got shape {tuple(vector.shape)}"
        )
    pieces = [p.view_as(t) for p, t in zip(torch.split(vector, sizes), leaves)]
    if isinstance(like, Tensor):
        return pieces[0]
    if isinstance(like, Mapping):
        return dict(zip(like.keys(), pieces))
    return type(like)(pieces)


def check_like(v: Any, params: Params, name: str = "v") -> None:
    """Raise a clear error unless ``v`` has the structure, shapes, dtypes and devices of ``params``
    and is finite."""
    p_leaves = _leaves(params, "params")
    if isinstance(params, Tensor):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a tensor like params, got {type(v).__name__}")
    elif isinstance(params, Mapping):
        if not isinstance(v, Mapping):
            raise TypeError(f"{name} must be a dict like params, got {type(v).__name__}")
        if list(v.keys()) != list(params.keys()):
            raise ValueError(f"{name} has keys {list(v.keys())}, params has {list(params.keys())}")
    elif not isinstance(v, (tuple, list)) or len(v) != len(p_leaves):
        got = f"{type(v).__name__} of length {len(v)}" if isinstance(v, (tuple, list)) else type(v).__name__
        raise ValueError(f"{name} must be a tuple/list of {len(p_leaves)} tensors like params, got {got}")
    v_leaves = _leaves(v, name)
    keys = list(params.keys()) if isinstance(params, Mapping) else range(len(p_leaves))
    for key, a, b in zip(keys, v_leaves, p_leaves):
        where = name if isinstance(params, Tensor) else f"{name}[{key!r}]"
        if a.shape != b.shape:
            raise ValueError(f"{where} has shape {tuple(a.shape)}, expected {tuple(b.shape)} like params")
        if a.dtype != b.dtype:
            raise TypeError(f"{where} has dtype {a.dtype}, expected {b.dtype} like params")
        if a.device != b.device:
            raise ValueError(f"{where} is on {a.device}, params are on {b.device}")
        if not _under_transform(a) and not bool(torch.isfinite(a).all()):
            raise ValueError(f"{where} contains non-finite values (nan or inf)")


def _under_transform(t: Tensor) -> bool:
    """Whether ``t`` is wrapped by a ``torch.func`` transform (vmap, grad, jvp), where a check of
    its values would be data-dependent control flow."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def module_has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` itself has forward, forward-pre or backward hooks."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def global_module_hooks() -> bool:
    """Whether module hooks registered for every module (``register_module_forward_hook`` …) exist."""
    hooks = torch.nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks)


_STOCHASTIC_IN_TRAIN = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.AlphaDropout)


def check_train_mode(model: nn.Module, what: str = "curvature products") -> None:
    """Refuse a model with BatchNorm or Dropout layers in training mode, or BatchNorm without running statistics.

    Train-mode BatchNorm normalises with the statistics of the current batch, so the loss of one
    example depends on the others and the "Hessian" changes with the batching; Dropout draws a
    new mask at every call, so repeated products are not with the same matrix.  A BatchNorm
    without running statistics (``track_running_stats=False``) uses batch statistics in eval mode
    too, and is refused in either mode.
    """
    def names(modules: list[tuple[str, nn.Module]]) -> str:
        shown = [f"{name or type(model).__name__} ({type(m).__name__})" for name, m in modules[:5]]
        return ", ".join(shown) + (" ..." if len(modules) > 5 else "")

    stochastic = [(name, m) for name, m in model.named_modules() if isinstance(m, _STOCHASTIC_IN_TRAIN)]
    training = [(name, m) for name, m in stochastic if m.training]
    no_stats = [(name, m) for name, m in stochastic if not m.training
                and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None]
    if training or no_stats:
        problems = ([f"these layers are in training mode: {names(training)}"] if training else []) + (
            [f"these BatchNorm layers have no running statistics (batch statistics in eval mode too): "
             f"{names(no_stats)}"] if no_stats else [])
        raise ValueError(
            f"{what} need the model in eval mode, but {'; '.join(problems)}. Call model.eval() first (a "
            "BatchNorm with track_running_stats=True), or pass allow_train_mode=True if you really want batch "
            "statistics / random masks."
        )


def select_params(model: nn.Module, params: Iterable[Tensor] | None = None) -> dict[str, Tensor]:
    """The model's parameters by name, restricted to ``params`` (in the order given) if not None.

    Tied parameters appear once (the first name ``named_parameters`` gives them).
    """
    named = dict(model.named_parameters())
    if params is None:
        selected = {n: p for n, p in named.items() if p.requires_grad}
        if not selected:
            raise ValueError("the model has no parameters that require grad")
        return selected
    if isinstance(params, Tensor):
        params = [params]
    by_id = {id(p): n for n, p in named.items()}
    selected = {}
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a parameter of the model")
        if id(p) not in by_id:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the model; pass tensors "
                "from model.parameters()"
            )
        name = by_id[id(p)]
        if name in selected:
            raise ValueError(f"params lists parameter {name!r} twice")
        selected[name] = p
    if not selected:
        raise ValueError("params is empty: select at least one parameter")
    return selected


class FunctionalModel:
    """A model as a function of (a subset of) its parameters.

    ``fm(values, inputs)`` evaluates the model with the selected parameters replaced by
    ``values`` (a tuple of tensors in the order of :attr:`names`) and every other parameter and
    buffer held at its current value.  Nothing in the user's model is modified.

    Args:
        model: the network.
        params: optional iterable of the model's parameters to treat as variables; the others
            are constants.  Default: all parameters that require grad.
        allow_train_mode: permit train-mode BatchNorm / Dropout (see :func:`check_train_mode`);
            buffers are then copied so the caller's running statistics are not updated.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | None = None,
        *,
        allow_train_mode: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not allow_train_mode:
            check_train_mode(model)
        self.model = model
        selected = select_params(model, params)
        self.names: list[str] = list(selected)
        self.shapes: list[torch.Size] = [p.shape for p in selected.values()]
        self.values: tuple[Tensor, ...] = tuple(p.detach() for p in selected.values())
        first = self.values[0]
        for n, v in zip(self.names, self.values):
            if v.dtype != first.dtype or v.device != first.device:
                raise ValueError(
                    f"selected parameters mix dtypes/devices ({self.names[0]}: {first.dtype} on "
                    f"{first.device}, {n}: {v.dtype} on {v.device}); select parameters of one kind"
                )
            if v.is_complex():
                raise TypeError(f"parameter {n!r} is complex; curvature products need real parameters")
        self.dtype = first.dtype
        self.device = first.device
        self.numel = sum(v.numel() for v in self.values)
        # Everything that is not a variable is passed as a detached constant, so autograd does not
        # track the model's own (requires_grad) parameters.
        # Tied parameters: an alias of a variable is left out so that the tie is kept.
        # A tied weight that is not a variable gets one detached tensor for all its names
        # (functional_call refuses two different tensors for one tied parameter).
        chosen = {id(p) for p in selected.values()}
        detached: dict[int, Tensor] = {}
        self._constants = {
            n: detached.setdefault(id(p), p.detach())
            for n, p in model.named_parameters(remove_duplicate=False)
            if id(p) not in chosen
        }
        self._copy_buffers = allow_train_mode

    def __call__(self, values: Sequence[Tensor], inputs: Any) -> Any:
        state = dict(self._constants)
        if self._copy_buffers:
            state.update({n: b.clone() for n, b in self.model.named_buffers()})
        state.update(zip(self.names, values))
        if isinstance(inputs, (tuple, list)):
            return torch.func.functional_call(self.model, state, tuple(inputs))
        return torch.func.functional_call(self.model, state, (inputs,))

    def split(self, vectors: Tensor) -> tuple[Tensor, ...]:
        """Parameter-shaped tensors from flat vectors: ``(..., numel) -> (..., *shape)`` each."""
        lead = vectors.shape[:-1]
        pieces = torch.split(vectors, [s.numel() for s in self.shapes], dim=-1)
        return tuple(p.reshape(*lead, *s) for p, s in zip(pieces, self.shapes))

    def join(self, tensors: Sequence[Tensor], batch_dims: int = 0) -> Tensor:
        """Inverse of :meth:`split`: ``(..., *shape)`` each ``-> (..., numel)`` with ``batch_dims``
        leading dimensions."""
        return torch.cat([t.reshape(*t.shape[:batch_dims], -1) for t in tensors], dim=-1)
