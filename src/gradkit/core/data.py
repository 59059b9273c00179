"""Data handed to curvature products: one ``(inputs, targets)`` batch or a re-iterable of them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["Batches"]


def _batch_size(inputs: Any) -> int:
    first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    if not isinstance(first, Tensor) or first.ndim == 0:
        raise TypeError(
            "inputs must be a tensor with a leading batch dimension (or a tuple of them); "
            f"got {type(first).__name__}"
        )
    return first.shape[0]


class Batches:
    """A re-iterable view of ``data`` that yields ``(inputs, targets)`` moved to ``device``.

    ``data`` is one ``(inputs, targets)`` pair of tensors, or any re-iterable of such pairs (a
    list, a ``DataLoader``).  One-shot iterators (generators) are refused because curvature
    operators pass over the data at every product.
    """

    def __init__(self, data: Any, device: torch.device, dtype: torch.dtype) -> None:
        if _is_single_batch(data):
            self._data: Iterable = [tuple(data)]
        elif isinstance(data, Iterable) and not isinstance(data, Tensor):
            if iter(data) is data:
                raise TypeError(
                    "data is a one-shot iterator (e.g. a generator); pass a list of (inputs, targets) "
                    "batches or a DataLoader, which can be iterated once per product"
                )
            self._data = data
        else:
            raise TypeError(
                f"data must be an (inputs, targets) pair or an iterable of them, got {type(data).__name__}"
            )
        self.device, self.dtype = device, dtype

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        for i, batch in enumerate(self._data):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(
                    f"data batch {i} must be an (inputs, targets) pair, got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                )
            inputs, targets = batch
            yield self._move(inputs, f"inputs of batch {i}"), self._move(targets, f"targets of batch {i}")

    def _move(self, t: Any, what: str) -> Any:
        if isinstance(t, (tuple, list)):
            return type(t)(self._move(x, what) for x in t)
        if not isinstance(t, Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")
        if t.is_floating_point() and t.dtype != self.dtype:
            raise TypeError(
                f"{what} have dtype {t.dtype} but the model's parameters are {self.dtype}; "
                "convert one of them"
            )
        return t.to(self.device)

    def count(self) -> int:
        """Number of examples (sum of the batch sizes over one pass)."""
        return sum(_batch_size(x) for x, _ in self)

    def batch_size(self, inputs: Any) -> int:
        return _batch_size(inputs)


def _is_single_batch(data: Any) -> bool:
    """``(inputs, targets)`` with tensor targets and tensor (or tuple-of-tensor) inputs."""
    if not isinstance(data, (tuple, list)) or len(data) != 2 or not isinstance(data[1], Tensor):
        return False
    inputs = data[0]
    return isinstance(inputs, Tensor) or (
        isinstance(inputs, tuple) and all(isinstance(t, Tensor) for t in inputs)
    )
