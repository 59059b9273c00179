"""The shared conventions of gradkit.explain: targets, batching, model hygiene, baselines."""

from __future__ import annotations

import pytest
import torch
from captum.testing.helpers.basic_models import BasicModel_MultiLayer
from torch import nn

import gradkit.explain as E
from gradkit.explain._common import check_target

DTYPE = torch.float64


def mlp(seed: int = 0, d_in: int = 5, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, d_out)).to(DTYPE).eval()


def data(n: int = 4, d: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


BACKGROUND = torch.randn(6, 5, generator=torch.Generator().manual_seed(9), dtype=DTYPE)

# every gradient-path explainer with options that make it deterministic
METHODS = {
    "saliency": lambda m, x, t, **kw: E.saliency(m, x, t, **kw),
    "input_x_gradient": lambda m, x, t, **kw: E.input_x_gradient(m, x, t, **kw),
    "integrated_gradients": lambda m, x, t, **kw: E.integrated_gradients(m, x, t, steps=7, rule="riemann_middle", **kw),
    "smoothgrad": lambda m, x, t, **kw: E.smoothgrad(m, x, t, n=5, seed=3, **kw),
    "smoothgrad_sq": lambda m, x, t, **kw: E.smoothgrad_sq(m, x, t, n=5, seed=3, **kw),
    "vargrad": lambda m, x, t, **kw: E.vargrad(m, x, t, n=5, seed=3, **kw),
    "expected_gradients": lambda m, x, t, **kw: E.expected_gradients(m, x, t, background=BACKGROUND, n=5, seed=3, **kw),
    "idgi": lambda m, x, t, **kw: E.idgi(m, x, t, steps=6, **kw),
}


# ------------------------------------------------------------------------------------ targets
def test_target_forms_select_the_same_scalar():
    """int, per-example tensor and callable targets pick output[:, c]; target=None a (B, 1) output."""
    model, x = mlp(), data()
    by_int = E.integrated_gradients(model, x, 2, steps=5)
    by_tensor = E.integrated_gradients(model, x, torch.full((4,), 2), steps=5)
    by_callable = E.integrated_gradients(model, x, lambda out: out[:, 2], steps=5)
    by_none = E.integrated_gradients(nn.Sequential(model, nn.Linear(3, 1).to(DTYPE)).eval(), x, None, steps=5)
    torch.testing.assert_close(by_tensor, by_int, rtol=0, atol=0)
    torch.testing.assert_close(by_callable, by_int, rtol=0, atol=0)
    assert by_none.shape == x.shape
    # per-example classes: each row equals the row of the int target of its class
    classes = torch.tensor([0, 2, 1, 2])
    per_example = E.saliency(model, x, classes)
    for b, c in enumerate(classes.tolist()):
        torch.testing.assert_close(per_example[b], E.saliency(model, x, c)[b], rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_list_of_targets_stacks_along_a_leading_dimension(name):
    model, x = mlp(), data()
    targets = [0, torch.tensor([2, 1, 0, 1]), lambda out: out[:, 1] - out[:, 0]]
    many = METHODS[name](model, x, targets)
    assert many.shape == (3, *x.shape)
    for i, t in enumerate(targets):
        torch.testing.assert_close(many[i], METHODS[name](model, x, t), rtol=0, atol=0)


def test_list_of_targets_stacks_the_delta_too():
    model, x = mlp(), data()
    phi, delta = E.integrated_gradients(model, x, [0, 1], steps=5, return_delta=True)
    assert phi.shape == (2, 4, 5) and delta.shape == (2, 4)
    torch.testing.assert_close(delta[1], E.integrated_gradients(model, x, 1, steps=5, return_delta=True)[1])


@pytest.mark.parametrize(
    "target, error, match",
    [
        (3, ValueError, "target=3 is out of range.*3 classes"),
        (-1, ValueError, "target must be a class index >= 0"),
        (True, TypeError, "not a bool"),
        (torch.tensor([0, 1, 2]), ValueError, r"target must hold one class index per example, shape \(4,\)"),
        (torch.tensor([0, 1, 5, 1]), ValueError, "target holds class 5, out of range"),
        (torch.tensor([0.0, 1.0, 1.0, 1.0]), TypeError, "integer tensor"),
        ((0, 1), TypeError, "as a list, not a tuple"),
        ("cat", TypeError, "target must be None, an int"),
        (None, ValueError, "target=None needs one output value per example"),
        (lambda out: out, ValueError, r"target\(output\) must return one scalar per row"),
        ([], ValueError, "empty list"),
    ],
)
def test_bad_targets_fail_naming_target(target, error, match):
    with pytest.raises(error, match=match):
        E.integrated_gradients(mlp(), data(), target, steps=3)


def test_index_target_needs_a_2d_output():
    model = nn.Sequential(nn.Linear(5, 6), nn.Unflatten(1, (2, 3))).to(DTYPE)
    with pytest.raises(ValueError, match="pass a callable"):
        E.saliency(model, data(), 0)
    assert E.saliency(model, data(), lambda out: out[:, 1, 2]).shape == (4, 5)


def test_check_target_normalises():
    assert check_target(torch.tensor(2), 4) == 2
    assert check_target(torch.tensor([1, 0], dtype=torch.int32), 2).dtype == torch.int64


# ----------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("name", sorted(METHODS))
def test_results_do_not_depend_on_batch_size(name):
    """Chunks of 1 row, of a non-multiple of the batch, of a few steps, and everything at once."""
    model, x = mlp(), data()
    reference = METHODS[name](model, x, 1, batch_size=1)
    for rows in (3, 8, 1000):
        torch.testing.assert_close(METHODS[name](model, x, 1, batch_size=rows), reference, rtol=0, atol=1e-12)


def test_memory_is_bounded_by_batch_size_whatever_the_steps():
    """No model call sees more than batch_size rows, for any number of steps."""
    model, x = mlp(), data()
    seen: list[int] = []
    model[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    for steps in (10, 120):
        seen.clear()
        E.integrated_gradients(model, x, 0, steps=steps, batch_size=9, return_delta=True)
        assert max(seen) <= 9 and sum(seen) == steps * 4 + 2 * 4
    seen.clear()
    E.smoothgrad(model, x, 0, n=40, seed=0, batch_size=10)
    assert max(seen) <= 10 and sum(seen) == 160


def test_progress_bar_gives_the_same_result():
    model, x = mlp(), data()
    torch.testing.assert_close(E.integrated_gradients(model, x, 0, steps=5, progress=True),
                               E.integrated_gradients(model, x, 0, steps=5), rtol=0, atol=0)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_batch_size(bad, error):
    with pytest.raises(error, match="batch_size"):
        E.saliency(mlp(), data(), 0, batch_size=bad)


# ------------------------------------------------------------------------------ model hygiene
class Flaky(nn.Module):
    """Raises on its third call."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return self.net(x)


def test_train_mode_is_restored_and_not_used():
    """Attributions are computed in eval mode (no Dropout, BatchNorm running statistics) and every
    submodule's flag is restored, also a submodule the caller had put in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).to(DTYPE)
    model[1].running_mean.uniform_(-1, 1)
    stats = model[1].running_mean.clone()
    x = data()
    model.eval()
    expected = E.integrated_gradients(model, x, 0, steps=9)
    model.train()
    model[3].eval()
    flags = [m.training for m in model.modules()]
    got = E.integrated_gradients(model, x, 0, steps=9, batch_size=5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(model[1].running_mean, stats)  # BatchNorm statistics not updated


def test_mode_restored_and_hooks_removed_when_the_model_raises():
    model = Flaky().train()
    with pytest.raises(RuntimeError, match="boom"):
        E.integrated_gradients(model, data(), 0, steps=20, batch_size=8)
    assert all(m.training for m in model.modules())
    calls = []
    model.calls = 0
    with pytest.raises(RuntimeError, match="boom"):
        with E.HookSet() as hooks:
            hooks.forward(model.net[0], lambda module, args, out: calls.append(1))
            hooks.forward_pre(model.net[2], lambda module, args: None)
            assert len(hooks) == 2
            for _ in range(3):
                model(data())
    assert not model.net[0]._forward_hooks and not model.net[2]._forward_pre_hooks
    model(data())
    assert len(calls) == 2  # the hook fired before the exception, not after its removal


def test_inplace_relu_model_matches_its_out_of_place_twin():
    """Captum's BasicModel_MultiLayer (ReLU(inplace=True)); for inputs with 3 features summing
    to s in (−1, 10) output 0 is 3·relu(s+1) − 1 + relu(s−10): gradient 3, and IG from 0 is 3x."""
    x = torch.tensor([[0.5, 1.0, 2.0], [1.0, -0.5, 3.0]], dtype=DTYPE)
    inplace, plain = BasicModel_MultiLayer(inplace=True).to(DTYPE), BasicModel_MultiLayer().to(DTYPE)
    for name in ("saliency", "integrated_gradients", "smoothgrad", "idgi"):
        torch.testing.assert_close(METHODS[name](inplace, x, 0), METHODS[name](plain, x, 0), rtol=0, atol=0)
    torch.testing.assert_close(E.saliency(inplace, x, 0), torch.full_like(x, 3.0))
    for rule in E.RULES:
        torch.testing.assert_close(E.integrated_gradients(inplace, x, 0, steps=4, rule=rule), 3 * x, rtol=1e-14, atol=1e-14)
    # an in-place op directly on the model input
    first = nn.Sequential(nn.ReLU(inplace=True), mlp(d_in=3))
    torch.testing.assert_close(E.saliency(first, x, 0), E.saliency(nn.Sequential(nn.ReLU(), first[1]), x, 0))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_parameters_untouched(name):
    """No .grad written (None stays None, an existing .grad is unchanged), requires_grad flags kept."""
    model, x = mlp(), data()
    model[0].weight.requires_grad_(False)
    model[2].bias.grad = torch.ones_like(model[2].bias)
    flags = [p.requires_grad for p in model.parameters()]
    METHODS[name](model, x, 1)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for n, p in model.named_parameters() if n != "2.bias")
    assert torch.equal(model[2].bias.grad, torch.ones_like(model[2].bias))


def test_inputs_are_not_modified_and_need_no_grad():
    model, x = mlp(), data()
    before = x.clone()
    E.integrated_gradients(model, x, 0, steps=3)
    assert torch.equal(x, before) and x.grad is None and not x.requires_grad


def test_a_model_whose_first_operation_is_in_place_modifies_no_user_tensor():
    """ReLU(inplace=True) first: the inputs, the background of expected gradients (its delta runs
    the model on the background) and an attacked input stay as given."""
    from gradkit.explain import robustness

    first = nn.Sequential(nn.ReLU(inplace=True), mlp(d_in=3)).eval()
    x = torch.tensor([[0.5, -1.0, 2.0], [-1.0, -0.5, 3.0]], dtype=DTYPE)
    background = torch.tensor([[-1.0, 2.0, -3.0], [0.5, -0.5, 1.0], [-2.0, -2.0, 0.0]], dtype=DTYPE)
    kept = x.clone(), background.clone()
    E.expected_gradients(first, x, 0, background=background, n=4, seed=0, return_delta=True)
    robustness.attribution_attack(first, x, 0, eps=0.1, steps=2, seed=0)
    assert torch.equal(x, kept[0]) and torch.equal(background, kept[1])


# --------------------------------------------------------------------------- inputs, baselines
def test_baseline_forms():
    """None = zeros, a scalar, one baseline per feature, one per example: all broadcast."""
    model, x = mlp(), data()
    zeros = E.integrated_gradients(model, x, 0, steps=6)
    torch.testing.assert_close(E.integrated_gradients(model, x, 0, baselines=0.0, steps=6), zeros, rtol=0, atol=0)
    per_feature = torch.linspace(-1, 1, 5, dtype=DTYPE)
    a = E.integrated_gradients(model, x, 0, baselines=0.5, steps=6)
    torch.testing.assert_close(a, E.integrated_gradients(model, x, 0, baselines=torch.full((5,), 0.5, dtype=DTYPE), steps=6))
    b = E.integrated_gradients(model, x, 0, baselines=per_feature, steps=6)
    torch.testing.assert_close(b, E.integrated_gradients(model, x, 0, baselines=per_feature.expand(4, 5).clone(), steps=6))
    with pytest.raises(ValueError, match="baselines of shape"):
        E.integrated_gradients(model, x, 0, baselines=torch.zeros(3, dtype=DTYPE))
    with pytest.raises(TypeError, match="baselines must have the dtype"):
        E.integrated_gradients(model, x, 0, baselines=torch.zeros(5))


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        (torch.ones(3, 5, dtype=torch.long), TypeError, "floating"),
        (torch.tensor([[float("nan")] * 5]), ValueError, "non-finite"),
        ([[1.0] * 5], TypeError, "must be a tensor"),
        (torch.ones(0, 5), ValueError, "non-empty batch"),
    ],
)
def test_bad_inputs(inputs, error, match):
    with pytest.raises(error, match=match):
        E.saliency(mlp(), inputs, 0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rule": "simpson"}, ValueError, "rule must be one of"),
        ({"steps": 0}, ValueError, "steps must be an int >= 1"),
        ({"steps": 1, "rule": "riemann_trapezoid"}, ValueError, "steps must be an int >= 2"),
    ],
)
def test_bad_rule_or_steps(kwargs, error, match):
    with pytest.raises(error, match=match):
        E.integrated_gradients(mlp(), data(), 0, **kwargs)


def test_expected_gradients_background_checks():
    with pytest.raises(TypeError, match="background="):
        E.expected_gradients(mlp(), data(), 0)
    with pytest.raises(ValueError, match="background must be"):
        E.expected_gradients(mlp(), data(), 0, background=torch.zeros(3, 4, dtype=DTYPE))


def test_delta_shapes():
    model, x = mlp(), data()
    for fn in (E.integrated_gradients, E.idgi):
        phi, delta = fn(model, x, 0, steps=4, return_delta=True)
        assert phi.shape == x.shape and delta.shape == (4,)
    phi, delta = E.expected_gradients(model, x, 0, background=BACKGROUND, n=3, seed=0, return_delta=True)
    assert phi.shape == x.shape and delta.shape == (4,)


def test_noisy_points_are_the_rows_of_the_sweep_and_refuse_gaps():
    """Consecutive step-major rows across a step boundary give x_e + ε_step[e]; rows with a gap
    are refused rather than sliced wrongly."""
    from gradkit.explain.smooth import noisy_points

    x = torch.randn(3, 2, dtype=torch.float64)
    eps = [torch.randn(3, 2, dtype=torch.float64) for _ in range(3)]
    points = noisy_points(x, iter(eps))
    step, example = torch.tensor([0, 1, 1, 1, 2]), torch.tensor([2, 0, 1, 2, 0])
    expected = torch.stack([x[e] + eps[s][e] for s, e in zip(step.tolist(), example.tolist())])
    torch.testing.assert_close(points(step, example), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="consecutive"):
        noisy_points(x, iter(eps))(torch.tensor([0, 1]), torch.tensor([0, 2]))
