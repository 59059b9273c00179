"""Small helpers on the parameter structures of :mod:`gradkit.bilevel` (a tensor, a tuple/list
of tensors or a dict of tensors): checks with named errors, map, detach, zeros."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from gradkit.core.functional import Params


def leaves(tree: Params) -> list[Tensor]:
    """The tensors of ``tree`` in order (values of a dict in key order)."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, Mapping):
        return list(tree.values())
    return list(tree)


def rebuild(like: Params, tensors: list[Tensor]) -> Params:
    """A structure like ``like`` holding ``tensors``."""
    if isinstance(like, Tensor):
        return tensors[0]
    if isinstance(like, Mapping):
        return dict(zip(like.keys(), tensors))
    if hasattr(like, "_fields"):  # a namedtuple: built from its fields
        return type(like)(*tensors)
    return type(like)(tensors)


def tree_map(fn: Callable[..., Tensor], tree: Params, *others: Params) -> Params:
    """``fn`` applied leaf by leaf to ``tree`` and the structures ``others`` shaped like it."""
    columns = [leaves(o) for o in others]
    return rebuild(tree, [fn(t, *(c[i] for c in columns)) for i, t in enumerate(leaves(tree))])


def detach(tree: Params) -> Params:
    return tree_map(lambda t: t.detach(), tree)


def check_tree(tree: Any, name: str) -> list[Tensor]:
    """Refuse anything but a non-empty tensor / tuple / list / dict of floating-point tensors that
    share one dtype and device; return its leaves."""
    accepted = "a floating-point tensor, a tuple/list of them or a dict of them"
    if isinstance(tree, Tensor):
        items = [(name, tree)]
    elif isinstance(tree, Mapping):
        items = [(f"{name}[{k!r}]", t) for k, t in tree.items()]
    elif isinstance(tree, (tuple, list)):
        items = [(f"{name}[{i}]", t) for i, t in enumerate(tree)]
    else:
        raise TypeError(f"{name} must be {accepted}; got {type(tree).__name__}")
    if not items:
        raise ValueError(f"{name} is empty; it must hold at least one tensor")
    for where, t in items:
        if not isinstance(t, Tensor):
            raise TypeError(f"{where} is a {type(t).__name__}; {name} must be {accepted}")
        if not t.is_floating_point():
            raise TypeError(f"{where} has dtype {t.dtype}; {name} must hold floating-point tensors")
    first_where, first = items[0]
    for where, t in items[1:]:
        if t.dtype != first.dtype or t.device != first.device:
            raise TypeError(
                f"{name} mixes dtypes/devices: {first_where} is {first.dtype} on {first.device}, "
                f"{where} is {t.dtype} on {t.device}"
            )
    return [t for _, t in items]


def check_same_kind(a: list[Tensor], a_name: str, b: list[Tensor], b_name: str) -> None:
    """Refuse two structures of different dtypes or devices."""
    if a[0].dtype != b[0].dtype or a[0].device != b[0].device:
        raise TypeError(
            f"{a_name} ({a[0].dtype} on {a[0].device}) and {b_name} ({b[0].dtype} on {b[0].device}) "
            "must share one dtype and device"
        )


def scalar_fn(fn: Any, name: str) -> Callable[[Params, Params], Tensor]:
    """``fn(hparams, params)`` checked to return a one-element tensor, reshaped to 0-d (what
    ``torch.func.grad`` differentiates)."""
    if not callable(fn):
        raise TypeError(f"{name} must be callable as {name}(hparams, params), got {type(fn).__name__}")

    def wrapped(hparams: Params, params: Params) -> Tensor:
        out = fn(hparams, params)
        if not isinstance(out, Tensor):
            raise TypeError(f"{name}(hparams, params) must return a scalar tensor, got {type(out).__name__}")
        if out.numel() != 1:
            raise ValueError(
                f"{name}(hparams, params) must return a scalar (one-element) tensor, got shape {tuple(out.shape)}"
            )
        return out.reshape(())

    return wrapped


def check_finite(value: Tensor, what: str) -> None:
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} is not finite ({float(value)})")


def first_order_grad(fn: Callable[[Params, Params], Tensor], hparams: Params, params: Params, argnum: int) -> Params:
    """``∇ fn`` with respect to argument ``argnum`` (0: hparams, 1: params) by one ordinary
    backward pass (no ``torch.func``, no double backward), zeros where ``fn`` does not depend on
    an entry."""
    args = [detach(hparams), detach(params)]
    args[argnum] = rebuild(args[argnum], [t.requires_grad_() for t in leaves(args[argnum])])
    targets = leaves(args[argnum])
    with torch.enable_grad():
        out = fn(args[0], args[1])
        grads = torch.autograd.grad(out, targets, allow_unused=True) if out.requires_grad else [None] * len(targets)
    return rebuild(args[argnum], [torch.zeros_like(t) if g is None else g for g, t in zip(grads, targets)])
