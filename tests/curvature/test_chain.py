"""The per-layer R-operator of HessianOperator's default mode (gradkit.curvature._chain) against
dense float64 Hessians and autograd's rev_rev, and the models it must leave to autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gk_testing import DTYPE, dense_ef, dense_ggn, dense_hessian, randn
from gradkit.curvature import EFOperator, GGNOperator, HessianOperator, MCFisherOperator
from gradkit.curvature import operators as operators_module

ACTIVATIONS = [
    nn.Tanh(), nn.ReLU(), nn.LeakyReLU(0.1), nn.Sigmoid(), nn.SiLU(), nn.GELU(),
    nn.Softplus(beta=2.0, threshold=1.0), nn.ELU(alpha=0.7),
]
LOSSES = [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum"), nn.BCEWithLogitsLoss(), nn.HuberLoss(delta=0.5)]


@pytest.fixture
def chain_calls(monkeypatch):
    """Count the products that took the R-operator path."""
    calls = []
    original = operators_module.chain_hvp

    def spy(*args, **kwargs):
        product = original(*args, **kwargs)  # raises for the models it leaves to autograd
        calls.append(1)
        return product

    monkeypatch.setattr(operators_module, "chain_hvp", spy)
    return calls


def _targets(loss_fn, n, d_out, seed=3):
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return torch.randint(0, d_out, (n,), generator=torch.Generator().manual_seed(seed))
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return (randn(n, d_out, seed=seed) > 0).to(DTYPE)
    return randn(n, d_out, seed=seed)


def _net(activation, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 6), activation, nn.Sequential(nn.Linear(6, 4), activation), nn.Dropout(0.3),
        nn.Identity(), nn.Linear(4, 3),
    ).to(DTYPE).eval()


def _check(op, reference, k=3):
    V = randn(op.shape[0], k, seed=7)
    torch.testing.assert_close(op @ V, reference @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op @ V[:, 0], reference @ V[:, 0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_fn", LOSSES, ids=repr)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=repr)
def test_chain_equals_dense_hessian(activation, loss_fn, chain_calls):
    model = _net(activation)
    # pre-activations spread over both sides of the kinks and of Softplus' threshold
    X, y = 2 * randn(9, 5), _targets(loss_fn, 9, 3)
    op = HessianOperator(model, loss_fn, (X, y), check_deterministic=False)
    torch.testing.assert_close(op.to_dense(), dense_hessian(model, loss_fn, X, y), rtol=1e-9, atol=1e-12)
    assert chain_calls


@pytest.mark.parametrize("which", ["middle", "head_and_first_bias", "first_weight"])
def test_parameter_subsets(which, chain_calls):
    model = _net(nn.Tanh())
    pick = {
        "middle": [model[2][0].weight],
        "head_and_first_bias": [model[0].bias, model[5].weight, model[5].bias],
        "first_weight": [model[0].weight],
    }[which]
    X, y = randn(8, 5), _targets(nn.CrossEntropyLoss(), 8, 3)
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), params=pick)
    torch.testing.assert_close(op.to_dense(), dense_hessian(model, nn.CrossEntropyLoss(), X, y, pick), rtol=1e-9, atol=1e-12)
    assert chain_calls


def test_frozen_layers_and_no_bias(chain_calls):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.SiLU(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2, bias=False))
    model = model.to(DTYPE)
    model[0].weight.requires_grad_(False)
    X, y = randn(7, 5), randn(7, 2, seed=4)
    op = HessianOperator(model, nn.MSELoss(), (X, y))
    params = [p for p in model.parameters() if p.requires_grad]
    torch.testing.assert_close(op.to_dense(), dense_hessian(model, nn.MSELoss(), X, y, params), rtol=1e-9, atol=1e-12)
    assert chain_calls


def test_inplace_activations_keep_z_and_the_inputs(chain_calls):
    torch.manual_seed(8)
    model = nn.Sequential(nn.SiLU(inplace=True), nn.Linear(5, 6), nn.SiLU(inplace=True), nn.Linear(6, 4),
                          nn.ReLU(inplace=True), nn.Linear(4, 3)).to(DTYPE)
    X, y = randn(7, 5), _targets(nn.CrossEntropyLoss(), 7, 3)
    before = X.clone()
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), check_deterministic=False)
    dense = op.to_dense()
    assert torch.equal(X, before)
    torch.testing.assert_close(dense, dense_hessian(model, nn.CrossEntropyLoss(), X, y), rtol=1e-9, atol=1e-12)
    assert chain_calls


def test_flatten_and_sequence_inputs(chain_calls):
    """Flatten in the chain, and Linear layers applied to (batch, time, features) activations."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 4), nn.Flatten(), nn.Tanh(), nn.Linear(8, 3)
    ).to(DTYPE)
    X, y = randn(6, 2, 3), _targets(nn.CrossEntropyLoss(), 6, 3)
    op = HessianOperator(model, nn.CrossEntropyLoss(reduction="sum"), (X, y))
    expected = dense_hessian(model, nn.CrossEntropyLoss(reduction="sum"), X, y)
    torch.testing.assert_close(op.to_dense(), expected, rtol=1e-9, atol=1e-12)
    seq = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DTYPE)  # (B, T, 2) outputs
    X, y = randn(4, 3, 3), randn(4, 3, 2, seed=5)
    op = HessianOperator(seq, nn.MSELoss(), (X, y))
    torch.testing.assert_close(op.to_dense(), dense_hessian(seq, nn.MSELoss(), X, y), rtol=1e-9, atol=1e-12)
    assert len(chain_calls) >= 2


def test_blocks_chunks_and_batches_equal_rev_rev(chain_calls):
    model = _net(nn.Softplus())
    X, y = randn(12, 5), _targets(nn.CrossEntropyLoss(), 12, 3)
    batches = [(X[:5], y[:5]), (X[5:], y[5:])]
    reference = HessianOperator(model, nn.CrossEntropyLoss(), batches, mode="rev_rev")
    for chunk in (1, 2, 16):
        _check(HessianOperator(model, nn.CrossEntropyLoss(), batches, chunk_size=chunk), reference, k=5)
    assert chain_calls


def _conv_models():
    torch.manual_seed(5)
    return {
        "conv2d stride/same/groups, max and avg pool": (nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, stride=2), nn.Tanh(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(4, 4, 3, padding="same", groups=2, bias=False), nn.SiLU(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(4, 3)), (5, 2, 9, 9)),
        "conv1d dilation, padded max pool, adaptive pool": (nn.Sequential(
            nn.Conv1d(2, 3, 3, dilation=2), nn.ReLU(), nn.MaxPool1d(3, stride=2, padding=1), nn.Conv1d(3, 3, 2),
            nn.Sigmoid(), nn.AdaptiveAvgPool1d(2), nn.Flatten(), nn.Linear(6, 3)), (5, 2, 12)),
        "conv3d": (nn.Sequential(
            nn.Conv3d(1, 2, 2), nn.GELU(), nn.MaxPool3d(2), nn.Flatten(), nn.Linear(16, 3)), (4, 1, 5, 5, 5)),
    }


@pytest.mark.parametrize("name", list(_conv_models()))
def test_convolutional_chains_equal_dense_hessian(name, chain_calls):
    model, shape = _conv_models()[name]
    model = model.to(DTYPE)
    X, y = randn(*shape), _targets(nn.CrossEntropyLoss(), shape[0], 3)
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    torch.testing.assert_close(op.to_dense(), dense_hessian(model, nn.CrossEntropyLoss(), X, y), rtol=1e-9, atol=1e-12)
    assert chain_calls


def test_conv_with_frozen_filters_and_a_trained_bias(chain_calls):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(2 * 2 * 2, 2)).to(DTYPE)
    params = [model[0].bias, model[2].weight, model[5].weight]
    X, y = randn(4, 2, 5, 5), randn(4, 2, seed=8)
    op = HessianOperator(model, nn.MSELoss(), (X, y), params=params)
    torch.testing.assert_close(op.to_dense(), dense_hessian(model, nn.MSELoss(), X, y, params), rtol=1e-9, atol=1e-12)
    assert chain_calls


def _with_statistics(model):
    """Non-trivial running statistics and affine parameters for every BatchNorm; eval mode."""
    g = torch.Generator().manual_seed(9)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g, dtype=DTYPE) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=DTYPE) * 1.5 + 0.5)
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=DTYPE) + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=g, dtype=DTYPE) - 0.5)
    return model.eval()


BATCH_NORM_CHAINS = {
    "dense, affine and not": (lambda: nn.Sequential(
        nn.BatchNorm1d(5), nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 4),
        nn.BatchNorm1d(4, affine=False), nn.SiLU(), nn.Linear(4, 3)), (8, 5)),
    "conv2d": (lambda: nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 2),
        nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3)), (6, 2, 4, 4)),
    "conv1d": (lambda: nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Softplus(), nn.Flatten(), nn.Linear(12, 3)), (6, 2, 6)),
}


@pytest.mark.parametrize("name", list(BATCH_NORM_CHAINS))
def test_eval_batch_norm_in_the_chain(name, chain_calls):
    make, shape = BATCH_NORM_CHAINS[name]
    torch.manual_seed(10)
    model = _with_statistics(make().to(DTYPE))
    X, y = randn(*shape), _targets(nn.CrossEntropyLoss(), shape[0], 3)
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    torch.testing.assert_close(op.to_dense(), dense_hessian(model, nn.CrossEntropyLoss(), X, y), rtol=1e-9, atol=1e-12)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    subset = [norms[0].weight, norms[-1].bias, model[-1].weight]  # scales, shifts, a frozen middle
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), params=subset)
    torch.testing.assert_close(op.to_dense(), dense_hessian(model, nn.CrossEntropyLoss(), X, y, subset),
                               rtol=1e-9, atol=1e-12)
    assert len(chain_calls) >= 2


def test_channels_last_and_strided_inputs(chain_calls):
    """Memory layouts the chain must not assume away: channels-last points and weights, and a
    transposed (non-contiguous) input matrix."""
    torch.manual_seed(12)
    model = _with_statistics(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3),
        nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)).to(DTYPE))
    X, y = randn(5, 2, 8, 8).to(memory_format=torch.channels_last), _targets(nn.CrossEntropyLoss(), 5, 3)
    for net in (model, model.to(memory_format=torch.channels_last)):
        op = HessianOperator(net, nn.CrossEntropyLoss(), (X, y))
        torch.testing.assert_close(op.to_dense(), dense_hessian(net, nn.CrossEntropyLoss(), X, y), rtol=1e-9, atol=1e-12)
    mlp = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)
    X, y = randn(5, 7).T, _targets(nn.CrossEntropyLoss(), 7, 3)
    op = HessianOperator(mlp, nn.CrossEntropyLoss(), (X, y))
    torch.testing.assert_close(op.to_dense(), dense_hessian(mlp, nn.CrossEntropyLoss(), X, y), rtol=1e-9, atol=1e-12)
    assert len(chain_calls) >= 3


def test_unbatched_batch_norm_2d_is_left_to_torch(chain_calls):
    """BatchNorm2d refuses a 3-D input; the chain must not normalise it along the wrong dimension."""
    model = _with_statistics(nn.Sequential(nn.BatchNorm2d(2), nn.Flatten(0), nn.Linear(18, 3)).to(DTYPE))
    X, y = randn(2, 3, 3), randn(3, seed=4)
    op = HessianOperator(model, nn.MSELoss(), (X, y), check_deterministic=False, num_data=1)
    with pytest.raises(ValueError, match="expected 4D input"):
        op @ randn(op.shape[0])
    assert not chain_calls


def test_batch_norm_on_batch_statistics_uses_autograd(chain_calls):
    torch.manual_seed(11)
    no_stats = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3))
    trained = _with_statistics(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).to(DTYPE)).train()
    X, y = randn(6, 5), _targets(nn.CrossEntropyLoss(), 6, 3)
    for model in (no_stats.to(DTYPE).eval(), trained):
        op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), allow_train_mode=True, check_deterministic=False)
        torch.testing.assert_close(op.to_dense(), dense_hessian(model, nn.CrossEntropyLoss(), X, y), rtol=1e-9, atol=1e-12)
    assert not chain_calls


class _Subclass(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 2


def _tied_chain():
    torch.manual_seed(3)
    shared = nn.Linear(4, 4)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(4, 3)).to(DTYPE)


FALLBACKS = {
    "forward hook": lambda: _hooked(_net(nn.Tanh())),
    "tied weights": _tied_chain,
    "tanh-approximate GELU": lambda: _net(nn.GELU(approximate="tanh")),
    "PReLU": lambda: nn.Sequential(nn.Linear(5, 4), nn.PReLU(), nn.Linear(4, 3)).to(DTYPE),
    "Sequential subclass": lambda: _Subclass(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE),
    "LayerNorm": lambda: nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(DTYPE),
}


def _hooked(model):
    model[2][0].register_forward_hook(lambda m, a, out: out * 1.5)
    return model


@pytest.mark.parametrize("name", FALLBACKS)
def test_models_outside_the_chain_use_autograd(name, chain_calls):
    model = FALLBACKS[name]()
    X, y = randn(6, 5), _targets(nn.CrossEntropyLoss(), 6, 3)
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    torch.testing.assert_close(op.to_dense(), dense_hessian(model, nn.CrossEntropyLoss(), X, y), rtol=1e-9, atol=1e-12)
    assert not chain_calls


@pytest.mark.parametrize("options, shape", [
    ({"padding": 1, "padding_mode": "reflect"}, (4, 2, 6)),
    ({"padding": "same"}, (4, 2, 6)),  # an even kernel: torch pads one side more
    ({}, (2, 6)),  # one unbatched (channels, length) input
], ids=["reflect padding", "asymmetric same padding", "unbatched input"])
def test_convolutions_outside_the_chain_use_autograd(options, shape, chain_calls):
    torch.manual_seed(7)
    conv = nn.Conv1d(2, 3, 2, **options).to(DTYPE)
    X = randn(*shape)
    model = nn.Sequential(conv, nn.Tanh(), nn.Linear(conv(X).shape[-1], 2).to(DTYPE))
    y = randn(*model(X).shape, seed=8)
    op = HessianOperator(model, nn.MSELoss(), (X, y))
    torch.testing.assert_close(op.to_dense(), dense_hessian(model, nn.MSELoss(), X, y), rtol=1e-9, atol=1e-12)
    assert not chain_calls


def test_model_changes_after_construction_are_seen(chain_calls):
    """Hooks and train mode are checked at every product, not only at construction."""
    model = _net(nn.Tanh())
    X, y = randn(6, 5), _targets(nn.CrossEntropyLoss(), 6, 3)
    op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), allow_train_mode=True)
    v = randn(op.shape[0], seed=9)
    op @ v
    assert len(chain_calls) == 1
    handle = model[5].register_forward_hook(lambda m, a, out: 2 * out)
    hooked = op @ v
    assert len(chain_calls) == 1
    torch.testing.assert_close(hooked, dense_hessian(model, nn.CrossEntropyLoss(), X, y) @ v)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: None)
    try:
        op @ v
    finally:
        handle.remove()
    assert len(chain_calls) == 1
    model.train()  # Dropout now draws masks: not a chain any more
    op @ v
    assert len(chain_calls) == 1
    model.eval()
    op @ v
    assert len(chain_calls) == 2


def test_explicit_modes_keep_autograd(chain_calls):
    model = _net(nn.Tanh())
    X, y = randn(6, 5), _targets(nn.CrossEntropyLoss(), 6, 3)
    for mode in ("rev_rev", "fwd_rev"):
        op = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), mode=mode)
        op @ randn(op.shape[0])
    assert not chain_calls


def test_float32_agrees_with_rev_rev():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    X = torch.randn(64, 20)
    y = torch.randint(0, 5, (64,))
    ours = HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    reference = HessianOperator(model, nn.CrossEntropyLoss(), (X, y), mode="rev_rev")
    V = torch.randn(ours.shape[0], 2)
    torch.testing.assert_close(ours @ V, reference @ V, rtol=1e-4, atol=1e-6)


JACOBIAN_CHAINS = {
    "dense": (lambda: nn.Sequential(nn.Linear(5, 6), nn.SiLU(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)), (9, 5)),
    "conv": (lambda: _with_statistics(nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(12, 3)).to(DTYPE)), (6, 2, 4, 4)),
}
DENSE_REFERENCE = {GGNOperator: dense_ggn, EFOperator: dense_ef}


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")], ids=repr)
@pytest.mark.parametrize("name", list(JACOBIAN_CHAINS))
@pytest.mark.parametrize("operator", [GGNOperator, EFOperator, MCFisherOperator], ids=lambda c: c.__name__)
def test_single_vector_jacobian_products_of_the_chain(operator, name, loss_fn, monkeypatch):
    """GGN, empirical and MC Fisher products with one vector go through the chain's ``J v`` and
    ``Jᵀ u`` (blocks keep torch.func): column by column they equal the dense matrix and the
    operator without the chain; a spy counts the chain's uses."""
    make, shape = JACOBIAN_CHAINS[name]
    torch.manual_seed(13)
    model = make().to(DTYPE)
    X = randn(*shape)
    y = _targets(loss_fn, shape[0], 3)
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]
    uses = []
    original = operators_module.chain_jacobian

    def spy(*args, **kwargs):
        uses.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(operators_module, "chain_jacobian", spy)
    op = operator(model, loss_fn, batches)
    columns = torch.stack([op @ e for e in torch.eye(op.shape[0], dtype=DTYPE)], 1)
    assert uses
    monkeypatch.setattr(operators_module, "chain_plan", lambda *args: None)
    reference = operator(model, loss_fn, batches).to_dense()
    torch.testing.assert_close(columns, reference, rtol=1e-9, atol=1e-12)
    if operator in DENSE_REFERENCE:
        torch.testing.assert_close(columns, DENSE_REFERENCE[operator](model, loss_fn, X, y), rtol=1e-9, atol=1e-12)
