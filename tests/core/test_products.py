"""Products of gradkit.core against dense float64 autograd references and closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gk_testing import DTYPE, cnn_bn, dense_ggn, dense_hessian, dense_jacobian, inputs_for, mlp, targets_for, tied
from gradkit.core import FunctionalModel, flatten, ggn_vp, hvp, jvp, per_sample_grads, unflatten, vjp

MODES = ["fwd_rev", "rev_rev"]
MODELS = {"mlp": mlp, "cnn_bn": cnn_bn, "tied": tied}


def _loss_of_params(model, loss_fn, X, y):
    fm = FunctionalModel(model)
    return fm, (lambda values: loss_fn(fm(values, X), y))


def _random_like(values, seed=3):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(v.shape, generator=g, dtype=v.dtype) for v in values)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_hvp_matches_dense_hessian(name, mode):
    model = MODELS[name]()
    X = inputs_for(model, 7)
    loss_fn = nn.CrossEntropyLoss()
    y = targets_for(loss_fn, 7, 3 if name != "mlp" else 4)
    fm, loss = _loss_of_params(model, loss_fn, X, y)
    v = _random_like(fm.values)
    H = dense_hessian(model, loss_fn, X, y)
    got = flatten(hvp(loss, fm.values, v, mode=mode))
    torch.testing.assert_close(got, H @ flatten(v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_hvp_structures_tensor_tuple_dict(mode):
    A = torch.randn(5, 5, dtype=DTYPE)
    A = A + A.T

    def f_tensor(x):
        return 0.5 * x @ A @ x + torch.sin(x).sum()

    x = torch.randn(5, dtype=DTYPE)
    v = torch.randn(5, dtype=DTYPE)
    expected = A @ v - torch.sin(x) * v
    torch.testing.assert_close(hvp(f_tensor, x, v, mode=mode), expected)
    as_tuple = hvp(lambda p: f_tensor(torch.cat(p)), (x[:2], x[2:]), (v[:2], v[2:]), mode=mode)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(torch.cat(as_tuple), expected)
    as_dict = hvp(lambda p: f_tensor(torch.cat([p["a"], p["b"]])), {"a": x[:2], "b": x[2:]}, {"a": v[:2], "b": v[2:]}, mode=mode)
    assert list(as_dict) == ["a", "b"]
    torch.testing.assert_close(torch.cat([as_dict["a"], as_dict["b"]]), expected)


def test_hvp_composes_with_vmap():
    A = torch.randn(4, 4, dtype=DTYPE)
    A = A @ A.T
    f = lambda x: 0.5 * x @ A @ x  # noqa: E731
    V = torch.randn(3, 4, dtype=DTYPE)
    x = torch.randn(4, dtype=DTYPE)
    out = torch.vmap(lambda v: hvp(f, x, v))(V)
    torch.testing.assert_close(out, V @ A)


@pytest.mark.parametrize("name", MODELS)
def test_jvp_vjp_match_dense_jacobian(name):
    model = MODELS[name]()
    X = inputs_for(model, 5)
    fm = FunctionalModel(model)
    f = lambda values: fm(values, X)  # noqa: E731
    J = dense_jacobian(model, X)
    v = _random_like(fm.values)
    torch.testing.assert_close(jvp(f, fm.values, v).reshape(-1), J @ flatten(v), rtol=1e-10, atol=1e-12)
    out = f(fm.values)
    u = torch.randn(out.shape, dtype=DTYPE)
    torch.testing.assert_close(flatten(vjp(f, fm.values, u)), J.T @ u.reshape(-1), rtol=1e-10, atol=1e-12)


GGN_LOSSES = [
    nn.MSELoss(), nn.MSELoss(reduction="sum"),
    nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum"),
    nn.BCEWithLogitsLoss(), nn.BCEWithLogitsLoss(reduction="sum"),
    # no closed form: exact autograd output Hessian
    nn.CrossEntropyLoss(label_smoothing=0.1), nn.HuberLoss(delta=0.3),
]


@pytest.mark.parametrize("loss_fn", GGN_LOSSES, ids=repr)
@pytest.mark.parametrize("name", MODELS)
def test_ggn_vp_matches_dense(name, loss_fn):
    model = MODELS[name]()
    X = inputs_for(model, 6)
    d_out = 4 if name == "mlp" else 3
    y = targets_for(loss_fn, 6, d_out)
    fm = FunctionalModel(model)
    v = _random_like(fm.values)
    G = dense_ggn(model, loss_fn, X, y)
    got = flatten(ggn_vp(lambda values: fm(values, X), fm.values, v, loss_fn=loss_fn, targets=y))
    torch.testing.assert_close(got, G @ flatten(v), rtol=1e-10, atol=1e-12)


def test_ggn_vp_cross_entropy_with_spatial_dims():
    """Cross-entropy on (B, C, L) logits: a loss term per position."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1)).to(DTYPE)
    X = torch.randn(4, 2, 5, dtype=DTYPE)
    y = torch.randint(0, 3, (4, 5))
    loss_fn = nn.CrossEntropyLoss()
    fm = FunctionalModel(model)
    v = _random_like(fm.values)
    G = dense_ggn(model, loss_fn, X, y)
    got = flatten(ggn_vp(lambda values: fm(values, X), fm.values, v, loss_fn=loss_fn, targets=y))
    torch.testing.assert_close(got, G @ flatten(v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_grads_match_loop_and_batch_gradient(reduction):
    model = cnn_bn()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    X = inputs_for(model, 5)
    y = targets_for(loss_fn, 5, 3)
    grads = per_sample_grads(model, loss_fn, X, y)
    names = [n for n, _ in model.named_parameters()]
    assert list(grads) == names
    for n in range(5):
        model.zero_grad()
        loss_fn(model(X[n : n + 1]), y[n : n + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][n], p.grad)
    model.zero_grad()
    loss_fn(model(X), y).backward()
    reduce = torch.mean if reduction == "mean" else torch.sum
    for name, p in model.named_parameters():
        torch.testing.assert_close(reduce(grads[name], dim=0), p.grad)


def test_per_sample_grads_subset_of_params():
    model = mlp()
    last = model[-1]
    grads = per_sample_grads(model, nn.MSELoss(), inputs_for(model, 3), torch.randn(3, 4, dtype=DTYPE), params=[last.weight])
    assert list(grads) == ["4.weight"]
    assert grads["4.weight"].shape == (3, *last.weight.shape)


# ----------------------------------------------------------------------------- closed forms
def _augmented(X):
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)


def _linear(d, c, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, c).to(DTYPE)


def _hessian_of(model, loss_fn, X, y):
    fm, loss = _loss_of_params(model, loss_fn, X, y)
    n = fm.numel
    cols = [flatten(hvp(loss, fm.values, fm.split(e))) for e in torch.eye(n, dtype=DTYPE)]
    return torch.stack(cols, 1)


def _reorder_wb(M, d, c):
    """Map the (W row-major, b) parameter order to the Kronecker order (c, d+1) of [W | b]."""
    idx = []
    for k in range(c):
        idx += [k * d + j for j in range(d)] + [c * d + k]
    idx = torch.tensor(idx)
    return M[idx][:, idx]


def test_linear_regression_hessian_closed_form():
    d, c, N = 4, 3, 9
    model = _linear(d, c)
    X, y = torch.randn(N, d, dtype=DTYPE), torch.randn(N, c, dtype=DTYPE)
    Xa = _augmented(X)
    expected = torch.kron(torch.eye(c, dtype=DTYPE), 2.0 / (N * c) * Xa.T @ Xa)
    torch.testing.assert_close(_reorder_wb(_hessian_of(model, nn.MSELoss(), X, y), d, c), expected)


def test_logistic_regression_hessian_closed_form():
    d, N = 5, 11
    model = _linear(d, 1)
    X = torch.randn(N, d, dtype=DTYPE)
    y = torch.randint(0, 2, (N, 1)).to(DTYPE)
    Xa = _augmented(X)
    s = torch.sigmoid(model(X).detach()).squeeze(1)
    expected = (Xa.T * (s * (1 - s))) @ Xa / N
    torch.testing.assert_close(_reorder_wb(_hessian_of(model, nn.BCEWithLogitsLoss(), X, y), d, 1), expected)


def test_softmax_regression_hessian_closed_form():
    d, c, N = 3, 4, 8
    model = _linear(d, c)
    X = torch.randn(N, d, dtype=DTYPE)
    y = torch.randint(0, c, (N,))
    Xa = _augmented(X)
    P = torch.softmax(model(X).detach(), 1)
    expected = sum(torch.kron(torch.diag(p) - torch.outer(p, p), torch.outer(x, x)) for p, x in zip(P, Xa)) / N
    torch.testing.assert_close(_reorder_wb(_hessian_of(model, nn.CrossEntropyLoss(), X, y), d, c), expected)


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.CrossEntropyLoss(reduction="sum")], ids=repr)
def test_ggn_equals_hessian_for_linear_models(loss_fn):
    model = _linear(4, 3)
    X = torch.randn(6, 4, dtype=DTYPE)
    y = targets_for(loss_fn, 6, 3)
    fm = FunctionalModel(model)
    v = _random_like(fm.values)
    g = ggn_vp(lambda values: fm(values, X), fm.values, v, loss_fn=loss_fn, targets=y)
    h = hvp(lambda values: loss_fn(fm(values, X), y), fm.values, v)
    torch.testing.assert_close(flatten(g), flatten(h))


# ----------------------------------------------------------------------------- bad input
def test_bad_vector_structure_is_named():
    x = (torch.zeros(2, dtype=DTYPE), torch.zeros(3, dtype=DTYPE))
    f = lambda p: (p[0] ** 2).sum() + (p[1] ** 2).sum()  # noqa: E731
    with pytest.raises(ValueError, match=r"v must be a tuple/list of 2 tensors"):
        hvp(f, x, (torch.zeros(2, dtype=DTYPE),))
    with pytest.raises(ValueError, match=r"v\[1\] has shape \(4,\), expected \(3,\)"):
        hvp(f, x, (torch.zeros(2, dtype=DTYPE), torch.zeros(4, dtype=DTYPE)))
    with pytest.raises(TypeError, match=r"v\[0\] has dtype torch.float32, expected torch.float64"):
        hvp(f, x, (torch.zeros(2), torch.zeros(3, dtype=DTYPE)))
    with pytest.raises(ValueError, match=r"v\[1\] is on meta"):
        hvp(f, x, (torch.zeros(2, dtype=DTYPE), torch.zeros(3, dtype=DTYPE, device="meta")))
    with pytest.raises(ValueError, match=r"v\[0\] contains non-finite"):
        hvp(f, x, (torch.tensor([0.0, float("nan")], dtype=DTYPE), torch.zeros(3, dtype=DTYPE)))
    with pytest.raises(ValueError, match=r"v has keys \['b'\], params has \['a'\]"):
        hvp(lambda p: (p["a"] ** 2).sum(), {"a": x[0]}, {"b": x[0]})
    with pytest.raises(ValueError, match="mode must be one of"):
        hvp(f, x, x, mode="forward")
    with pytest.raises(TypeError, match="fn must be callable"):
        hvp(3, x, x)


def test_train_mode_batchnorm_refused_in_per_sample_grads():
    model = cnn_bn().train()
    with pytest.raises(ValueError, match=r"training mode: 1 \(BatchNorm2d\)"):
        per_sample_grads(model, nn.CrossEntropyLoss(), inputs_for(model, 3), torch.tensor([0, 1, 2]))


def test_batchnorm_without_running_statistics_refused_in_eval_mode_too():
    """track_running_stats=False normalises with batch statistics in eval mode as well: the
    Hessian of one batch of 8 would differ from two batches of 4, so it is refused like train mode."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)).to(DTYPE).eval()
    x, y = torch.randn(8, 3, dtype=DTYPE), torch.tensor([0, 1] * 4)
    with pytest.raises(ValueError, match=r"no running statistics \(batch statistics in eval mode too\): 1 \(BatchNorm1d\)"):
        per_sample_grads(model, nn.CrossEntropyLoss(), x, y)
    model[1].track_running_stats = True  # with running statistics (and in eval mode) it is accepted
    model[1].register_buffer("running_mean", torch.zeros(4, dtype=DTYPE))
    model[1].register_buffer("running_var", torch.ones(4, dtype=DTYPE))
    per_sample_grads(model, nn.CrossEntropyLoss(), x, y)


def test_per_sample_grads_of_weighted_or_ignoring_mean_cross_entropy_refused():
    """A class weight or an ignored target makes the mean a weighted average no batch of one
    reproduces: refused, pointing to reduction='sum', whose per-example gradients sum to the batch
    gradient (an ignored example's is 0)."""
    model = mlp().to(DTYPE)
    x, y = inputs_for(model, 5), torch.tensor([0, 1, 2, 1, 0])
    for loss_fn in (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DTYPE)),
                    nn.CrossEntropyLoss(ignore_index=2), nn.NLLLoss(ignore_index=2)):
        with pytest.raises(ValueError, match=r"reduction='mean'.*use reduction='sum'"):
            per_sample_grads(model, loss_fn, x, y)
    for kwargs in (dict(weight=torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DTYPE)), dict(ignore_index=2)):
        loss_fn = nn.CrossEntropyLoss(reduction="sum", **kwargs)
        grads = per_sample_grads(model, loss_fn, x, y)
        batch = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
        for g, b in zip(grads.values(), batch):
            torch.testing.assert_close(g.sum(0), b, rtol=1e-12, atol=1e-14)
        if "ignore_index" in kwargs:
            assert all(float(g[2].abs().max()) == 0.0 for g in grads.values())


def test_flatten_unflatten_round_trip():
    like = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    vec = torch.arange(10.0)
    out = unflatten(vec, like)
    assert out["a"].shape == (2, 3) and out["b"].shape == (4,)
    torch.testing.assert_close(flatten(out), vec)
    with pytest.raises(ValueError, match="must be flat with 10 entries"):
        unflatten(torch.zeros(9), like)
