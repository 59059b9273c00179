"""The linear operator abstraction every solver, eigensolver and estimator in gradkit works on.

A :class:`LinearOperator` is a linear map ``R^n -> R^m`` known only through its action on
vectors, as in :class:`scipy.sparse.linalg.LinearOperator`, but on torch tensors on the
caller's device and dtype.  ``op @ x`` accepts

* a flat vector of shape ``(n,)``, giving ``(m,)``;
* a matrix of column vectors of shape ``(n, k)``, giving ``(m, k)``;
* for operators over a model's parameters (Hessian, GGN, ...), a list of tensors or a dict of
  named tensors shaped like the parameters, giving the same structure back.

Operators add, subtract, scale by scalars and compose with ``@``; ``.T`` is the transpose;
``to_dense()`` and ``to_scipy()`` convert for small problems and for SciPy's solvers.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "LinearOperator",
    "IdentityOperator",
    "DenseOperator",
    "aslinearoperator",
]

Structured = Union[Tensor, Sequence[Tensor], Mapping[str, Tensor]]


class LinearOperator:
    """A linear map given by its action on vectors.

    Build one from a function, as with SciPy::

        op = LinearOperator((n, n), lambda x: A @ x, dtype=torch.float64, symmetric=True)

    or subclass it and override :meth:`_matmat` (and :meth:`_rmatmat` for a non-symmetric
    operator whose transpose is needed).

    Args:
        shape: ``(m, n)``: the operator maps ``R^n`` to ``R^m``.
        matvec: function taking an ``(n,)`` tensor to an ``(m,)`` tensor.
        rmatvec: function applying the transpose, ``(m,)`` to ``(n,)``; needed for ``.T`` of a
            non-symmetric operator.
        matmat: optional function taking ``(n, k)`` to ``(m, k)`` in one call (faster than
            ``k`` calls of ``matvec``).
        dtype: dtype of the vectors the operator acts on (default: torch's default dtype).
        device: device of those vectors (default: CPU).
        symmetric: declare ``A = A^T``; symmetric solvers and eigensolvers require it.
    """

    #: Shapes of the parameter tensors when the operator acts on a model's parameters; lets
    #: ``op @ [t1, t2, ...]`` and ``op @ {name: t}`` work.  ``None`` for a plain operator.
    param_shapes: list[torch.Size] | None = None
    #: Names matching :attr:`param_shapes` (for dict input), or ``None``.
    param_names: list[str] | None = None

    def __init__(
        self,
        shape: tuple[int, int],
        matvec: Callable[[Tensor], Tensor] | None = None,
        *,
        rmatvec: Callable[[Tensor], Tensor] | None = None,
        matmat: Callable[[Tensor], Tensor] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        symmetric: bool = False,
    ) -> None:
        if (
            not isinstance(shape, (tuple, list, torch.Size))
            or len(shape) != 2
            or not all(isinstance(s, numbers.Integral) and s >= 0 for s in shape)
        ):
            raise ValueError(f"shape must be a pair of non-negative integers (m, n), got {shape!r}")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.is_symmetric = bool(symmetric)
        if self.is_symmetric and self.shape[0] != self.shape[1]:
            raise ValueError(f"symmetric=True needs a square shape, got {self.shape}")
        for name, fn in (("matvec", matvec), ("rmatvec", rmatvec), ("matmat", matmat)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        self._matvec_fn = matvec
        self._rmatvec_fn = rmatvec
        self._matmat_fn = matmat
        if (
            type(self)._matmat is LinearOperator._matmat
            and matvec is None
            and matmat is None
        ):
            raise TypeError("LinearOperator needs matvec or matmat (or a subclass overriding _matmat)")

    # ------------------------------------------------------------------ to override
    def _matmat(self, X: Tensor) -> Tensor:
        """Apply the operator to the columns of ``X`` (shape ``(n, k)``) -> ``(m, k)``."""
        if self._matmat_fn is not None:
            return self._matmat_fn(X)
        assert self._matvec_fn is not None
        return torch.stack([self._matvec_fn(X[:, j]) for j in range(X.shape[1])], dim=1)

    def _rmatmat(self, X: Tensor) -> Tensor:
        """Apply the transpose to the columns of ``X`` (shape ``(m, k)``) -> ``(n, k)``."""
        if self.is_symmetric:
            return self._matmat(X)
        if self._rmatvec_fn is None:
            raise NotImplementedError(
                f"{type(self).__name__} is not symmetric and was built without rmatvec: "
                "its transpose is unknown"
            )
        return torch.stack([self._rmatvec_fn(X[:, j]) for j in range(X.shape[1])], dim=1)

    # ------------------------------------------------------------------ application
    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return _ProductOperator(self, other)
        if isinstance(other, Tensor):
            return self._apply(other, transpose=False)
        if isinstance(other, Mapping):
            return self._apply_structured(other, transpose=False)
        if isinstance(other, (list, tuple)):
            return self._apply_structured(other, transpose=False)
        raise TypeError(
            f"{type(self).__name__} @ x: x must be a tensor of shape (n,) or (n, k), a list/tuple "
            f"of parameter-shaped tensors, a dict of them, or a LinearOperator; got {type(other).__name__}"
        )

    def matvec(self, x: Tensor) -> Tensor:
        """``A @ x`` for a flat vector or a matrix of column vectors."""
        return self._apply(x, transpose=False)

    def rmatvec(self, x: Tensor) -> Tensor:
        """``A^T @ x`` for a flat vector or a matrix of column vectors."""
        return self._apply(x, transpose=True)

    def _apply(self, x: Tensor, transpose: bool) -> Tensor:
        m, n = self.shape
        rows = m if transpose else n
        self._check_vector(x, rows, name="x")
        X = x.unsqueeze(1) if x.ndim == 1 else x
        out_rows = n if transpose else m
        if X.shape[1] == 0:  # no columns: nothing to apply (a column-by-column matvec has nothing to stack)
            return X.new_zeros(out_rows, 0)
        Y = self._rmatmat(X) if transpose else self._matmat(X)
        if Y.shape != (out_rows, X.shape[1]):
            raise RuntimeError(
                f"{type(self).__name__} returned shape {tuple(Y.shape)} for input {tuple(X.shape)}; "
                f"expected {(out_rows, X.shape[1])}"
            )
        return Y.squeeze(1) if x.ndim == 1 else Y

    def _check_vector(self, x: Tensor, rows: int, name: str) -> None:
        if x.ndim not in (1, 2):
            raise ValueError(
                f"{name} must have shape ({rows},) or ({rows}, k); got a {x.ndim}-D tensor of shape "
                f"{tuple(x.shape)}"
            )
        if x.shape[0] != rows:
            raise ValueError(
                f"{name} has {x.shape[0]} rows but the operator of shape {self.shape} expects {rows}"
            )
        if x.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the operator works in {self.dtype}")
        if x.device != self.device:
            raise ValueError(f"{name} is on device {x.device} but the operator is on {self.device}")
        # one reduction pass; the element-wise check only runs when the sum is not finite (or overflows)
        if x.numel() and not bool(torch.isfinite(x.detach().sum())) and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains non-finite values (nan or inf)")

    def _apply_structured(self, xs: Sequence[Tensor] | Mapping[str, Tensor], transpose: bool) -> Any:
        if self.param_shapes is None:
            raise TypeError(
                f"{type(self).__name__} has no parameter structure: pass a flat tensor of shape "
                f"({self.shape[1]},) or ({self.shape[1]}, k)"
            )
        if isinstance(xs, Mapping):
            if self.param_names is None or set(xs.keys()) != set(self.param_names):
                raise ValueError(
                    f"dict keys {sorted(xs.keys())} do not match the operator's parameters "
                    f"{self.param_names}"
                )
            tensors = [xs[k] for k in self.param_names]
        else:
            tensors = list(xs)
        if len(tensors) != len(self.param_shapes):
            raise ValueError(
                f"expected {len(self.param_shapes)} parameter-shaped tensors, got {len(tensors)}"
            )
        for i, (t, s) in enumerate(zip(tensors, self.param_shapes)):
            if not isinstance(t, Tensor):
                raise TypeError(f"entry {i} of the vector is a {type(t).__name__}, expected a tensor")
            if t.shape != s:
                raise ValueError(
                    f"entry {i} of the vector has shape {tuple(t.shape)}, expected the parameter shape {tuple(s)}"
                )
        flat = torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)
        out = self._apply(flat, transpose)
        pieces = list(torch.split(out, [s.numel() for s in self.param_shapes]))
        pieces = [p.reshape(s) for p, s in zip(pieces, self.param_shapes)]
        if isinstance(xs, Mapping):
            assert self.param_names is not None
            return dict(zip(self.param_names, pieces))
        return type(xs)(pieces) if isinstance(xs, tuple) else pieces

    # ------------------------------------------------------------------ algebra
    def __add__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _SumOperator(self, other, 1.0)

    def __sub__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return _SumOperator(self, other, -1.0)

    def __mul__(self, scalar: Any) -> LinearOperator:
        if isinstance(scalar, Tensor) and scalar.numel() == 1:
            scalar = scalar.item()
        if not isinstance(scalar, numbers.Real):
            return NotImplemented
        return _ScaledOperator(self, float(scalar))

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperator:
        return _ScaledOperator(self, -1.0)

    def __truediv__(self, scalar: Any) -> LinearOperator:
        if not isinstance(scalar, numbers.Real):
            return NotImplemented
        if scalar == 0:
            raise ZeroDivisionError("division of a LinearOperator by zero")
        return _ScaledOperator(self, 1.0 / float(scalar))

    @property
    def T(self) -> LinearOperator:  # noqa: N802 - mirrors torch / numpy
        """The transpose ``A^T`` (the operator itself when symmetric)."""
        if self.is_symmetric:
            return self
        return _TransposedOperator(self)

    # ------------------------------------------------------------------ conversion
    def to_dense(self) -> Tensor:
        """The ``(m, n)`` matrix, by applying the operator to the identity (small problems only)."""
        eye = torch.eye(self.shape[1], dtype=self.dtype, device=self.device)
        return self._apply(eye, transpose=False)

    def to_scipy(self) -> Any:
        """A :class:`scipy.sparse.linalg.LinearOperator` that calls this operator (float64 numpy)."""
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        def to_torch(x: np.ndarray) -> Tensor:
            return torch.as_tensor(np.asarray(x), device=self.device).to(self.dtype)

        def to_numpy(y: Tensor) -> np.ndarray:
            return y.detach().cpu().to(torch.float64).numpy()

        return ScipyLinearOperator(
            shape=self.shape,
            matvec=lambda x: to_numpy(self._apply(to_torch(x).reshape(-1), False)),
            rmatvec=lambda x: to_numpy(self._apply(to_torch(x).reshape(-1), True)),
            matmat=lambda X: to_numpy(self._apply(to_torch(X), False)),
            dtype=np.float64,
        )

    def __repr__(self) -> str:
        sym = ", symmetric" if self.is_symmetric else ""
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device}{sym})"

    # Operators are not tensors: stop numpy/torch from trying to broadcast over them.
    __array_priority__ = 1000


def _inherit_structure(op: LinearOperator, *parts: LinearOperator) -> None:
    """Give a square composite operator the parameter structure of the first part that has one
    (``I + H`` and ``H.T`` act on the same parameters as ``H``)."""
    if op.shape[0] != op.shape[1]:
        return
    for part in parts:
        if part.param_shapes is not None and part.shape == op.shape:
            op.param_shapes, op.param_names = part.param_shapes, part.param_names
            return


def _check_compatible(a: LinearOperator, b: LinearOperator, what: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"cannot {what} operators of dtypes {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"cannot {what} operators on devices {a.device} and {b.device}")


class _SumOperator(LinearOperator):
    def __init__(self, a: LinearOperator, b: LinearOperator, sign: float) -> None:
        if a.shape != b.shape:
            raise ValueError(f"cannot add operators of shapes {a.shape} and {b.shape}")
        _check_compatible(a, b, "add")
        super().__init__(
            a.shape, dtype=a.dtype, device=a.device, symmetric=a.is_symmetric and b.is_symmetric
        )
        self.a, self.b, self.sign = a, b, sign
        _inherit_structure(self, a, b)

    def _matmat(self, X: Tensor) -> Tensor:
        return self.a._matmat(X) + self.sign * self.b._matmat(X)

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self.a._rmatmat(X) + self.sign * self.b._rmatmat(X)


class _ScaledOperator(LinearOperator):
    def __init__(self, a: LinearOperator, scale: float) -> None:
        super().__init__(a.shape, dtype=a.dtype, device=a.device, symmetric=a.is_symmetric)
        self.a, self.scale = a, scale
        self.param_shapes, self.param_names = a.param_shapes, a.param_names

    def _matmat(self, X: Tensor) -> Tensor:
        return self.scale * self.a._matmat(X)

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self.scale * self.a._rmatmat(X)


class _ProductOperator(LinearOperator):
    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"cannot compose operators of shapes {a.shape} and {b.shape}")
        _check_compatible(a, b, "compose")
        super().__init__((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
        self.a, self.b = a, b
        _inherit_structure(self, b, a)

    def _matmat(self, X: Tensor) -> Tensor:
        return self.a._matmat(self.b._matmat(X))

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self.b._rmatmat(self.a._rmatmat(X))


class _TransposedOperator(LinearOperator):
    def __init__(self, a: LinearOperator) -> None:
        super().__init__((a.shape[1], a.shape[0]), dtype=a.dtype, device=a.device)
        self.a = a
        _inherit_structure(self, a)

    def _matmat(self, X: Tensor) -> Tensor:
        return self.a._rmatmat(X)

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self.a._matmat(X)

    @property
    def T(self) -> LinearOperator:  # noqa: N802
        return self.a


class IdentityOperator(LinearOperator):
    """The ``n x n`` identity (add ``damping * IdentityOperator(n)`` to damp an operator)."""

    def __init__(self, n: int, *, dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__((n, n), dtype=dtype, device=device, symmetric=True)

    def _matmat(self, X: Tensor) -> Tensor:
        return X


class DenseOperator(LinearOperator):
    """A :class:`LinearOperator` backed by an explicit matrix (tests, small problems)."""

    def __init__(self, matrix: Tensor, *, symmetric: bool | None = None) -> None:
        if not isinstance(matrix, Tensor) or matrix.ndim != 2:
            raise ValueError(
                f"matrix must be a 2-D tensor, got {type(matrix).__name__}"
                + (f" with {matrix.ndim} dims" if isinstance(matrix, Tensor) else "")
            )
        if symmetric is None:
            symmetric = matrix.shape[0] == matrix.shape[1]
            if symmetric and matrix.numel():
                # Rounding leaves a Gram matrix X^T X asymmetric by about one ulp of its largest
                # entry, in any dtype: compare to that scale (not to fixed float64 constants).
                eps = torch.finfo(matrix.dtype).eps if matrix.is_floating_point() else 0.0
                tol = 64 * eps * float(matrix.abs().max())
                symmetric = bool(((matrix - matrix.T).abs() <= tol).all())
        super().__init__(
            tuple(matrix.shape), dtype=matrix.dtype, device=matrix.device, symmetric=symmetric
        )
        self.matrix = matrix

    def _matmat(self, X: Tensor) -> Tensor:
        return self.matrix @ X

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self.matrix.T @ X

    def to_dense(self) -> Tensor:
        return self.matrix


def aslinearoperator(A: Any) -> LinearOperator:
    """Wrap ``A`` as a :class:`LinearOperator`: an operator is returned as is, a 2-D tensor
    becomes a :class:`DenseOperator`."""
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, Tensor):
        return DenseOperator(A)
    raise TypeError(f"expected a LinearOperator or a 2-D tensor, got {type(A).__name__}")
