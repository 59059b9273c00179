"""Tests of gradkit.linalg.operator: every operator against its dense float64 matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradkit.linalg import DenseOperator, IdentityOperator, LinearOperator, aslinearoperator

F64 = torch.float64


def mat(m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=F64)


def sym(n: int, seed: int = 0) -> torch.Tensor:
    B = mat(n, n, seed)
    return B + B.T


def from_function(A: torch.Tensor, **kw) -> LinearOperator:
    return LinearOperator(tuple(A.shape), lambda v: A @ v, rmatvec=lambda v: A.T @ v, dtype=A.dtype, **kw)


class ParamOperator(LinearOperator):
    """A square operator over parameters shaped (2, 3) and (4,), named 'w' and 'b'."""

    param_shapes = [torch.Size([2, 3]), torch.Size([4])]
    param_names = ["w", "b"]

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__((10, 10), dtype=A.dtype, symmetric=False)
        self.A = A

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.A @ X

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.A.T @ X


# ---------------------------------------------------------------------------- application
@pytest.mark.parametrize("how", ["matvec", "matmat", "subclass", "dense"])
def test_apply_matches_dense(how):
    A = mat(7, 5)
    if how == "matvec":
        op = LinearOperator((7, 5), lambda v: A @ v, dtype=F64)
    elif how == "matmat":
        calls = []
        op = LinearOperator((7, 5), matmat=lambda X: calls.append(X.shape) or A @ X, dtype=F64)
    elif how == "subclass":
        op = ParamOperator(mat(10, 10))
        A = op.A
    else:
        op = DenseOperator(A)
    n = op.shape[1]
    x, X = mat(n, 1, seed=1)[:, 0], mat(n, 3, seed=2)
    assert (op @ x).shape == (op.shape[0],)
    assert torch.allclose(op @ x, A @ x, atol=1e-14)
    assert torch.allclose(op.matvec(x), A @ x, atol=1e-14)
    assert torch.allclose(op @ X, A @ X, atol=1e-14)
    assert torch.allclose(op.to_dense(), A, atol=1e-14)
    if how == "matmat":
        assert calls[-2:] == [(5, 3), (5, 5)]  # each block (and to_dense) in one call


def test_matvec_with_float32_and_empty_block():
    A = mat(4, 4).float()
    op = DenseOperator(A)
    assert op.dtype == torch.float32 and (op @ torch.ones(4)).dtype == torch.float32
    assert (op @ torch.ones(4, 0)).shape == (4, 0)
    # also from a matvec alone (its column-by-column application had nothing to stack), and transposed
    f = LinearOperator((4, 3), lambda v: A[:, :3] @ v, rmatvec=lambda v: A[:, :3].T @ v, dtype=torch.float32)
    assert (f @ torch.ones(3, 0)).shape == (4, 0) and (f.T @ torch.ones(4, 0)).shape == (3, 0)


def test_rmatvec():
    A = mat(6, 4)
    op = from_function(A)
    y, Y = mat(6, 1, seed=3)[:, 0], mat(6, 2, seed=4)
    assert torch.allclose(op.rmatvec(y), A.T @ y, atol=1e-14)
    assert torch.allclose(op.rmatvec(Y), A.T @ Y, atol=1e-14)
    with pytest.raises(ValueError, match=r"x has 4 rows but the operator of shape \(6, 4\) expects 6"):
        op.rmatvec(torch.ones(4, dtype=F64))


def test_vector_errors():
    op = DenseOperator(mat(3, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(3,\) or \(3, k\); got a 3-D tensor of shape \(3, 1, 1"):
        op @ torch.ones(3, 1, 1, dtype=F64)
    with pytest.raises(ValueError, match="x must have shape"):
        op @ torch.tensor(1.0, dtype=F64)
    with pytest.raises(ValueError, match=r"x has 4 rows but the operator of shape \(3, 3\) expects 3"):
        op @ torch.ones(4, dtype=F64)
    with pytest.raises(TypeError, match="x has dtype torch.float32 but the operator works in torch.float64"):
        op @ torch.ones(3)
    with pytest.raises(ValueError, match="x is on device meta but the operator is on cpu"):
        op @ torch.ones(3, dtype=F64, device="meta")
    with pytest.raises(ValueError, match="non-finite"):
        op @ torch.tensor([1.0, float("inf"), 0.0], dtype=F64)
    with pytest.raises(ValueError, match="non-finite"):
        op @ torch.tensor([[1.0], [float("nan")], [0.0]], dtype=F64)
    with pytest.raises(TypeError, match="x must be a tensor of shape"):
        op @ 3.0
    with pytest.raises(TypeError, match="x must be a tensor of shape"):
        op @ np.ones(3)


def test_wrong_output_shape_is_caught():
    op = LinearOperator((3, 3), lambda v: v[:2], dtype=F64)
    with pytest.raises(RuntimeError, match=r"returned shape \(2, 1\) for input \(3, 1\); expected \(3, 1\)"):
        op @ torch.ones(3, dtype=F64)


# ---------------------------------------------------------------------------- structured input
def test_structured_list_tuple_dict():
    op = ParamOperator(mat(10, 10))
    w, b = mat(2, 3, seed=5), mat(4, 1, seed=6)[:, 0]
    flat = torch.cat([w.reshape(-1), b])
    expected = op.A @ flat
    out = op @ [w, b]
    assert isinstance(out, list) and [o.shape for o in out] == [(2, 3), (4,)]
    assert torch.allclose(torch.cat([o.reshape(-1) for o in out]), expected)
    out_t = op @ (w, b)
    assert isinstance(out_t, tuple) and torch.equal(out_t[0], out[0])
    out_d = op @ {"b": b, "w": w}  # key order does not matter
    assert isinstance(out_d, dict) and list(out_d) == ["w", "b"]
    assert torch.equal(out_d["w"], out[0]) and torch.equal(out_d["b"], out[1])
    # square composites act on the same parameters: sums (either order), scalings, products,
    # the transpose
    I = IdentityOperator(10, dtype=F64)
    dense_T = op.A.T @ flat
    for composite, dense in [
        (op + op, 2 * expected),
        (0.5 * I + op, 0.5 * flat + expected),
        (-op / 2, -expected / 2),
        (op @ op, op.A @ expected),
        (I @ op, expected),
        (op.T, dense_T),
        ((op + I).T, dense_T + flat),
    ]:
        got = composite @ {"w": w, "b": b}
        assert torch.allclose(torch.cat([got["w"].reshape(-1), got["b"]]), dense, atol=1e-12)


def test_structured_errors():
    op = ParamOperator(mat(10, 10))
    w, b = torch.zeros(2, 3, dtype=F64), torch.zeros(4, dtype=F64)
    with pytest.raises(ValueError, match="expected 2 parameter-shaped tensors, got 1"):
        op @ [w]
    with pytest.raises(ValueError, match="expected 2 parameter-shaped tensors, got 3"):
        op @ [w, b, b]
    with pytest.raises(ValueError, match=r"entry 0 of the vector has shape \(3, 2\), expected the parameter shape \(2, 3"):
        op @ [w.T, b]
    with pytest.raises(ValueError, match=r"dict keys \['b', 'v'\] do not match the operator's parameters \['w', 'b'\]"):
        op @ {"v": w, "b": b}
    with pytest.raises(ValueError, match="do not match"):
        op @ {"w": w}
    with pytest.raises(TypeError, match="entry 1 of the vector is a list, expected a tensor"):
        op @ [w, [0.0] * 4]
    with pytest.raises(TypeError, match="x has dtype torch.float32"):
        op @ [w.float(), b.float()]
    with pytest.raises(ValueError, match="non-finite"):
        op @ [w, torch.full((4,), float("nan"), dtype=F64)]
    plain = DenseOperator(mat(3, 3))
    with pytest.raises(TypeError, match=r"DenseOperator has no parameter structure: pass a flat tensor of shape \(3,"):
        plain @ [torch.zeros(3, dtype=F64)]
    with pytest.raises(TypeError, match="no parameter structure"):
        plain @ {"a": torch.zeros(3, dtype=F64)}


# ---------------------------------------------------------------------------- algebra
def test_algebra_matches_dense():
    A, B = mat(5, 5, 1), mat(5, 5, 2)
    a, b = from_function(A), DenseOperator(B)
    cases = {
        "a + b": (a + b, A + B),
        "a - b": (a - b, A - B),
        "2.5 * a": (2.5 * a, 2.5 * A),
        "a * 2.5": (a * 2.5, 2.5 * A),
        "a * tensor": (a * torch.tensor(3.0), 3 * A),
        "a / 4": (a / 4, A / 4),
        "-a": (-a, -A),
        "a @ b": (a @ b, A @ B),
        "(a - 2 b) @ a": ((a - 2 * b) @ a, (A - 2 * B) @ A),
    }
    for name, (op, dense) in cases.items():
        assert isinstance(op, LinearOperator), name
        assert torch.allclose(op.to_dense(), dense, atol=1e-12), name
        assert torch.allclose(op.T.to_dense(), dense.T, atol=1e-12), name


def test_rectangular_composition():
    A, B = mat(3, 4, 1), mat(4, 6, 2)
    op = DenseOperator(A) @ from_function(B)
    assert op.shape == (3, 6)
    assert torch.allclose(op.to_dense(), A @ B, atol=1e-13)
    assert torch.allclose(op.T.to_dense(), (A @ B).T, atol=1e-13)
    with pytest.raises(ValueError, match=r"cannot compose operators of shapes \(4, 6\) and \(3, 4\)"):
        from_function(B) @ DenseOperator(A)


def test_algebra_errors():
    a = DenseOperator(mat(3, 3))
    with pytest.raises(ValueError, match=r"cannot add operators of shapes \(3, 3\) and \(4, 4\)"):
        a + DenseOperator(mat(4, 4))
    with pytest.raises(TypeError, match="cannot add operators of dtypes torch.float64 and torch.float32"):
        a + DenseOperator(mat(3, 3).float())
    with pytest.raises(TypeError, match="cannot compose operators of dtypes"):
        a @ DenseOperator(mat(3, 3).float())
    with pytest.raises(ValueError, match="cannot add operators on devices"):
        a - LinearOperator((3, 3), lambda v: v, dtype=F64, device="meta")
    with pytest.raises(ZeroDivisionError):
        a / 0
    with pytest.raises(TypeError):
        a + mat(3, 3)
    with pytest.raises(TypeError):
        a * a
    with pytest.raises(TypeError):
        a * "2"


def test_symmetry_flags_propagate():
    S = DenseOperator(sym(4))
    N = DenseOperator(mat(4, 4))
    assert S.is_symmetric and not N.is_symmetric
    assert (S + S).is_symmetric and (S - 3 * S).is_symmetric and (-S).is_symmetric and (S / 2).is_symmetric
    assert not (S + N).is_symmetric
    assert S.T is S
    assert (S + IdentityOperator(4, dtype=F64)).is_symmetric


# ---------------------------------------------------------------------------- transpose
def test_transpose_with_rmatvec():
    A = mat(4, 6)
    op = from_function(A)
    assert not op.is_symmetric and op.T.shape == (6, 4)
    assert torch.allclose(op.T.to_dense(), A.T, atol=1e-14)
    assert torch.allclose(op.T @ torch.ones(4, dtype=F64), A.T @ torch.ones(4, dtype=F64))
    assert torch.allclose(op.T.rmatvec(torch.ones(6, dtype=F64)), A @ torch.ones(6, dtype=F64))
    assert op.T.T is op


def test_transpose_without_rmatvec_raises():
    op = LinearOperator((3, 3), lambda v: 2 * v, dtype=F64)
    t = op.T  # building it is fine; applying it is not
    with pytest.raises(NotImplementedError, match="is not symmetric and was built without rmatvec"):
        t @ torch.ones(3, dtype=F64)
    with pytest.raises(NotImplementedError):
        op.rmatvec(torch.ones(3, dtype=F64))
    with pytest.raises(NotImplementedError):
        (op + op).T.to_dense()
    # a symmetric operator needs no rmatvec
    sym_op = LinearOperator((3, 3), lambda v: 2 * v, dtype=F64, symmetric=True)
    assert torch.equal(sym_op.rmatvec(torch.ones(3, dtype=F64)), 2 * torch.ones(3, dtype=F64))


# ---------------------------------------------------------------------------- conversion
def test_to_scipy_matches_numpy():
    A = mat(5, 3)
    sp = from_function(A).to_scipy()
    An = A.numpy()
    x, y, X = np.arange(3.0), np.arange(5.0), np.arange(6.0).reshape(3, 2)
    assert sp.shape == (5, 3) and sp.dtype == np.float64
    np.testing.assert_allclose(sp.matvec(x), An @ x, atol=1e-14)
    np.testing.assert_allclose(sp.rmatvec(y), An.T @ y, atol=1e-14)
    np.testing.assert_allclose(sp.matmat(X), An @ X, atol=1e-14)
    np.testing.assert_allclose(sp @ x.reshape(3, 1), (An @ x).reshape(5, 1), atol=1e-14)
    # float32 operators round-trip through float64 numpy
    sp32 = DenseOperator(A.float()).to_scipy()
    np.testing.assert_allclose(sp32.matvec(x), An @ x, rtol=1e-5)


def test_to_scipy_in_a_scipy_solver():
    from scipy.sparse.linalg import cg as scipy_cg

    S = sym(6) + 20 * torch.eye(6, dtype=F64)
    b = np.ones(6)
    x, info = scipy_cg(DenseOperator(S).to_scipy(), b, rtol=1e-12)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(S.numpy(), b), atol=1e-10)


# ---------------------------------------------------------------------------- DenseOperator / Identity
def test_dense_operator_symmetry_detection():
    assert DenseOperator(sym(5)).is_symmetric
    assert not DenseOperator(mat(5, 5)).is_symmetric
    assert not DenseOperator(mat(5, 3)).is_symmetric
    S = sym(5)
    S[0, 1] += 1e-6
    assert not DenseOperator(S).is_symmetric
    assert DenseOperator(mat(5, 5), symmetric=True).is_symmetric  # explicit declaration wins
    assert not DenseOperator(sym(5), symmetric=False).is_symmetric
    # rounding in a Gram matrix X^T X does not hide its symmetry, in float32 or float64,
    # and a tiny scale does not make a non-symmetric matrix look symmetric
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, F64):
        for rows in (7, 30, 2000):
            X = torch.randn(rows, 10, generator=g, dtype=dtype)
            assert DenseOperator(X.T @ X).is_symmetric, (dtype, rows)
    assert not DenseOperator(1e-20 * mat(4, 4)).is_symmetric
    assert DenseOperator(torch.zeros(0, 0, dtype=F64)).shape == (0, 0)
    assert DenseOperator(torch.eye(3, dtype=torch.int64)).is_symmetric


def test_dense_operator_validation_and_transpose():
    with pytest.raises(ValueError, match="matrix must be a 2-D tensor, got Tensor with 1 dims"):
        DenseOperator(torch.ones(3))
    with pytest.raises(ValueError, match="matrix must be a 2-D tensor, got ndarray"):
        DenseOperator(np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"symmetric=True needs a square shape, got \(2, 3\)"):
        DenseOperator(mat(2, 3), symmetric=True)
    A = mat(2, 3)
    op = DenseOperator(A)
    assert op.to_dense() is A and op.dtype == F64 and op.device == torch.device("cpu")
    assert torch.equal(op.T.to_dense(), A.T)


def test_identity_operator():
    I = IdentityOperator(4, dtype=F64)
    x = mat(4, 2)
    assert I.is_symmetric and I.shape == (4, 4) and I.dtype == F64
    assert torch.equal(I @ x, x) and torch.equal(I.to_dense(), torch.eye(4, dtype=F64))
    A = sym(4)
    assert torch.allclose((DenseOperator(A) + 0.5 * I).to_dense(), A + 0.5 * torch.eye(4, dtype=F64))
    assert IdentityOperator(3).dtype == torch.get_default_dtype()
    with pytest.raises(ValueError, match="shape must be a pair of non-negative integers"):
        IdentityOperator(-1)


# ---------------------------------------------------------------------------- constructor
def test_constructor_validation():
    f = lambda v: v  # noqa: E731
    for bad in [(3,), (3, 3, 3), (-1, 3), (2.0, 3), "33", 3]:
        with pytest.raises(ValueError, match="shape must be a pair of non-negative integers"):
            LinearOperator(bad, f)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype, got 'float64'"):
        LinearOperator((3, 3), f, dtype="float64")
    with pytest.raises(TypeError, match="matvec must be callable, got int"):
        LinearOperator((3, 3), 3)
    with pytest.raises(TypeError, match="rmatvec must be callable"):
        LinearOperator((3, 3), f, rmatvec="A.T")
    with pytest.raises(TypeError, match="matmat must be callable"):
        LinearOperator((3, 3), matmat=1.0)
    with pytest.raises(TypeError, match="needs matvec or matmat"):
        LinearOperator((3, 3))
    with pytest.raises(ValueError, match=r"symmetric=True needs a square shape, got \(3, 2\)"):
        LinearOperator((3, 2), f, symmetric=True)
    op = LinearOperator(torch.Size([3, 2]), f, dtype=F64, device="cpu")
    assert op.shape == (3, 2) and op.device == torch.device("cpu") and not op.is_symmetric
    assert repr(op) == "LinearOperator(shape=(3, 2), dtype=torch.float64, device=cpu)"
    assert "symmetric" in repr(IdentityOperator(2))


def test_aslinearoperator():
    op = IdentityOperator(3)
    assert aslinearoperator(op) is op
    A = mat(3, 3)
    wrapped = aslinearoperator(A)
    assert isinstance(wrapped, DenseOperator) and wrapped.matrix is A
    with pytest.raises(TypeError, match="expected a LinearOperator or a 2-D tensor, got list"):
        aslinearoperator([[1.0]])
