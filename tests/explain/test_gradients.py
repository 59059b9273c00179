"""Gradient-path attributions: closed forms, axioms, Captum as a peer, attribution priors."""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from captum.attr import GradientShap, InputXGradient, IntegratedGradients, Saliency
from captum.testing.helpers.basic_models import BasicModel2, BasicModel3
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import gradkit.explain as E
from gk_testing import randn

DTYPE = torch.float64


def tanh_mlp(seed: int = 0, d_in: int = 4, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, d_out)).to(DTYPE).eval()


@contextmanager
def float64_default():
    """Captum builds its Riemann nodes with torch.linspace in the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class Linear(nn.Module):
    def __init__(self, w: torch.Tensor, b: float = 0.7) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(w), b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b


class Separable(nn.Module):
    """f(x) = 5 x₀ + x₁² + sin x₂ (one output per example)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 5 * x[:, 0] + x[:, 1] ** 2 + torch.sin(x[:, 2])


class Pairs(nn.Module):
    """Captum's two-input models of the IG paper, on one (B, 2) tensor."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x[:, :1], x[:, 1:]).squeeze(1)


# ------------------------------------------------------------------------------- closed forms
def test_quadrature_rules():
    """Weights sum to 1; exact on polynomials of the rule's degree; GL nodes interlace with its cells."""
    for rule in E.RULES:
        for m in (2, 5, 16):
            a, w = E.quadrature(rule, m)
            assert abs(float(w.sum()) - 1) < 1e-14
            t = E.cells(rule, m)
            torch.testing.assert_close(t[1:] - t[:-1], w, rtol=0, atol=1e-14)
            assert bool((t[:-1] <= a + 1e-15).all() and (a <= t[1:] + 1e-15).all())
    a, w = E.quadrature("gausslegendre", 4)
    for k in range(8):  # exact up to degree 2m − 1 = 7
        assert abs(float((w * a**k).sum()) - 1 / (k + 1)) < 1e-15
    a, w = E.quadrature("riemann_middle", 10)
    assert abs(float((w * a).sum()) - 0.5) < 1e-15 and abs(float((w * a**2).sum()) - (1 / 3 - 1 / 1200)) < 1e-15


def test_linear_model_closed_forms():
    """f = w·x + b: IG = w ⊙ (x − x') for every rule and any steps, saliency = w, Gradient × Input
    = w ⊙ x, IDGI = w² (w·Δ)/‖w‖², EG = (1/n) Σ_k w ⊙ (x − x'_k) with its draws, SmoothGrad = w."""
    w = randn(5, seed=3)
    model, x, base = Linear(w), randn(4, 5), randn(5, seed=4)
    for rule in E.RULES:
        for steps in (2, 3, 50):
            phi, delta = E.integrated_gradients(model, x, None, baselines=base, steps=steps, rule=rule, return_delta=True)
            torch.testing.assert_close(phi, w * (x - base), rtol=1e-13, atol=1e-13)
            assert float(delta.abs().max()) < 1e-13
    torch.testing.assert_close(E.saliency(model, x), w.expand(4, 5))
    torch.testing.assert_close(E.saliency(model, x, abs=True), w.abs().expand(4, 5))
    torch.testing.assert_close(E.input_x_gradient(model, x), w * x)
    torch.testing.assert_close(E.smoothgrad(model, x, n=7, seed=0), w.expand(4, 5), rtol=1e-14, atol=1e-14)
    assert float(E.vargrad(model, x, n=7, seed=0).abs().max()) < 1e-14
    change = (x - base) @ w
    torch.testing.assert_close(E.idgi(model, x, None, baselines=base, steps=3), w**2 * (change / (w @ w))[:, None])
    background = randn(9, 5, seed=5)
    phi, delta = E.expected_gradients(model, x, None, background=background, n=11, seed=2, return_delta=True)
    index, _ = E.expected_gradients_draws(x, background, 11, seed=2)
    torch.testing.assert_close(phi, (w * (x[None] - background[index])).mean(0))
    assert float(delta.abs().max()) < 1e-13


@pytest.mark.parametrize("rule", E.RULES)
def test_separable_function_exact_per_coordinate(rule):
    """f = 5x₀ + x₁² + sin x₂: φ₀ = 5Δ₀, φ₁ = 2Δ₁(x'₁ + c Δ₁) with c = Σ w_k α_k, φ₂ = Δ₂ Σ w_k
    cos(x'₂ + α_k Δ₂), with the sums in closed form: c = (m−1)/2m, (m+1)/2m, 1/2, 1/2, 1/2 and
    Σ_{k<m} cos(a + kd) = sin(md/2)/sin(d/2) · cos(a + (m−1)d/2); Gauss–Legendre's cosine sum is
    the integral (its error is far below 1e-13 at m = 12)."""
    m = 12
    x = torch.tensor([[1.5, -2.0, 2.5], [-0.3, 0.7, -1.9]], dtype=DTYPE)
    base = torch.tensor([0.2, 0.5, -0.4], dtype=DTYPE)
    d = x - base
    c = {"riemann_left": (m - 1) / (2 * m), "riemann_right": (m + 1) / (2 * m)}.get(rule, 0.5)

    def cos_sum(a, step, n):  # Σ_{k<n} cos(a + k·step)
        return torch.sin(n * step / 2) / torch.sin(step / 2) * torch.cos(a + (n - 1) * step / 2)

    a, D = base[2], d[:, 2]
    if rule == "gausslegendre":
        phi2 = torch.sin(x[:, 2]) - torch.sin(a)
    elif rule == "riemann_trapezoid":
        phi2 = D / (m - 1) * (cos_sum(a, D / (m - 1), m) - (torch.cos(a) + torch.cos(a + D)) / 2)
    else:
        shift = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule]
        phi2 = D / m * cos_sum(a + shift * D / m, D / m, m)
    expected = torch.stack([5 * d[:, 0], 2 * d[:, 1] * (base[1] + c * d[:, 1]), phi2], 1)
    got = E.integrated_gradients(Separable(), x, None, baselines=base, steps=m, rule=rule)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)


def test_ig_paper_examples_from_captum_fixtures():
    """Sundararajan et al. Sec. 2: f = ReLU(ReLU(x₁) − 1 − ReLU(x₂)) and ReLU(ReLU(x₁ − 1) − ReLU(x₂))
    at x = (3, 1), baseline 0: along the path f = ReLU(2α − 1), active for α > 1/2 with gradient
    (1, −1), so IG = (1.5, −0.5) (the midpoint rule with an even number of steps integrates the
    kink exactly)."""
    x = torch.tensor([[3.0, 1.0]], dtype=DTYPE)
    for inner in (BasicModel2(), BasicModel3()):
        model = Pairs(inner)
        phi, delta = E.integrated_gradients(model, x, None, steps=50, rule="riemann_middle", return_delta=True)
        torch.testing.assert_close(phi, torch.tensor([[1.5, -0.5]], dtype=DTYPE))
        assert abs(float(delta)) < 1e-14
        torch.testing.assert_close(E.saliency(model, x), torch.tensor([[1.0, -1.0]], dtype=DTYPE))
        # IDGI shares each rise of f as g²/‖g‖² = (½, ½), so φ = (½, ½).  With the gradient at the
        # right end of each segment all of f(x) − f(0) = 1 is shared; at the left ends (α = 0.4)
        # the gradient is 0 on the segment [0.4, 0.6] where f rises by 0.2, which is then lost
        # (the documented zero-gradient case)
        phi, delta = E.idgi(model, x, None, steps=5, rule="riemann_right", return_delta=True)
        assert abs(float(delta)) < 1e-14
        torch.testing.assert_close(phi, torch.tensor([[0.5, 0.5]], dtype=DTYPE))
        assert abs(float(E.idgi(model, x, None, steps=5, return_delta=True)[1]) + 0.2) < 1e-14


class IgnoresLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = tanh_mlp(d_in=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, :3])


def test_dummy_feature_gets_exactly_zero():
    model, x = IgnoresLast(), randn(5, 4)
    background = randn(7, 4, seed=2)
    results = {
        "saliency": E.saliency(model, x, 1),
        "input_x_gradient": E.input_x_gradient(model, x, 1),
        "integrated_gradients": E.integrated_gradients(model, x, 1, baselines=-1.0, steps=9),
        "smoothgrad": E.smoothgrad(model, x, 1, n=6, seed=0),
        "smoothgrad_sq": E.smoothgrad_sq(model, x, 1, n=6, seed=0),
        "vargrad": E.vargrad(model, x, 1, n=6, seed=0),
        "expected_gradients": E.expected_gradients(model, x, 1, background=background, n=6, seed=0),
        "idgi": E.idgi(model, x, 1, baselines=-1.0, steps=9),
    }
    for name, phi in results.items():
        assert bool((phi[:, 3] == 0).all()), name
        assert bool((phi[:, :3] != 0).any()), name


# --------------------------------------------------------------------------------- completeness
def test_ig_quadrature_error_ordering():
    """On a smooth model the completeness error of Gauss–Legendre is far below the midpoint and
    trapezoid rules (O(1/m²)), themselves below left/right (O(1/m)); left/right errors halve when m
    doubles."""
    model, x = tanh_mlp(), 2 * randn(6, 4)

    def err(rule, m):
        return float(E.integrated_gradients(model, x, 0, steps=m, rule=rule, return_delta=True)[1].abs().max())

    gl, mid, trap, left, right = (err(r, 8) for r in ("gausslegendre", "riemann_middle", "riemann_trapezoid",
                                                      "riemann_left", "riemann_right"))
    assert gl < 1e-3 * min(mid, trap)
    assert max(mid, trap) < min(left, right)
    assert 1.6 < left / err("riemann_left", 16) < 2.4
    assert 3.0 < mid / err("riemann_middle", 16) < 5.0
    assert err("gausslegendre", 20) < 1e-12


@pytest.mark.parametrize("rule", E.RULES)
def test_idgi_completeness_exact_for_any_steps(rule):
    """Σᵢ φᵢ = f(x) − f(x') to rounding, with 2, 3 and 7 steps, while IG's error is visible."""
    model, x, base = tanh_mlp(), 2 * randn(5, 4), randn(4, seed=7)
    for steps in (2, 3, 7):
        phi = E.idgi(model, x, 2, baselines=base, steps=steps, rule=rule)
        with torch.no_grad():
            change = model(x)[:, 2] - model(base[None])[:, 2]
        torch.testing.assert_close(phi.sum(1), change, rtol=0, atol=1e-13)
        ig_err = (E.integrated_gradients(model, x, 2, baselines=base, steps=steps, rule=rule).sum(1) - change).abs().max()
        assert float(ig_err) > 1e-6


def test_idgi_matches_the_paper_algorithm_by_hand():
    """Algorithm 1 of Yang et al. with the left Riemann path x_j = x' + (j/m)(x − x'), j = 0..m."""
    model, x = tanh_mlp(), randn(3, 4)
    m = 5
    expected = torch.zeros_like(x)
    for b in range(3):
        pts = [(j / m) * x[b] for j in range(m + 1)]
        with torch.no_grad():
            preds = [float(model(p[None])[0, 1]) for p in pts]
        for j in range(m):
            p = pts[j].clone().requires_grad_()
            (g,) = torch.autograd.grad(model(p[None])[0, 1], p)
            expected[b] += g**2 / (g**2).sum() * (preds[j + 1] - preds[j])
    torch.testing.assert_close(E.idgi(model, x, 1, steps=m), expected, rtol=1e-12, atol=1e-14)


def test_expected_gradients_converges_to_its_expectation_and_delta_by_hand():
    """E[φ] = mean over the background of IG(x, x'_m) (the α-expectation is the path integral,
    computed by Gauss–Legendre to 1e-12).  With n = 2000 samples the estimate is within 5 standard
    errors of it, and the delta is Σφ − (f(x) − mean_k f(x'_k)) over the drawn baselines."""
    model, x, background = tanh_mlp(), randn(3, 4), randn(5, 4, seed=2)
    exact = torch.stack([E.integrated_gradients(model, x, 0, baselines=background[m], steps=24) for m in range(5)]).mean(0)
    n = 2000
    phi, delta = E.expected_gradients(model, x, 0, background=background, n=n, seed=0, batch_size=3000, return_delta=True)
    # per-sample terms for the standard error
    index, alpha = E.expected_gradients_draws(x, background, n, seed=0)
    ref = background[index]
    pts = (ref + alpha[..., None] * (x[None] - ref)).reshape(-1, 4).requires_grad_()
    (g,) = torch.autograd.grad(model(pts)[:, 0].sum(), pts)
    terms = (x[None] - ref) * g.reshape(n, 3, 4)
    torch.testing.assert_close(phi, terms.mean(0), rtol=1e-12, atol=1e-14)
    assert bool(((phi - exact).abs() < 5 * terms.std(0) / math.sqrt(n) + 1e-12).all())
    with torch.no_grad():
        f_ref = model(ref.reshape(-1, 4))[:, 0].reshape(n, 3).mean(0)
        torch.testing.assert_close(delta, phi.sum(1) - (model(x)[:, 0] - f_ref))


# ------------------------------------------------------------------------------ Captum as peer
@pytest.mark.parametrize("rule", E.RULES)
def test_integrated_gradients_matches_captum(rule):
    """Same nodes; Captum rounds its weights to float32 (rtol 1e-7) and its trapezoid weights are
    1/m instead of 1/(m−1) at the interior nodes (ours × (m−1)/m); deltas agree likewise."""
    model, x, base = tanh_mlp(), randn(5, 4), randn(5, 4, seed=3)
    m = 20
    ours, delta = E.integrated_gradients(model, x, torch.tensor([0, 1, 2, 1, 0]), baselines=base, steps=m, rule=rule,
                                         return_delta=True)
    with float64_default():
        theirs, their_delta = IntegratedGradients(model).attribute(
            x, base, target=[0, 1, 2, 1, 0], n_steps=m, method=rule, return_convergence_delta=True)
    scale = (m - 1) / m if rule == "riemann_trapezoid" else 1.0
    torch.testing.assert_close(ours * scale, theirs, rtol=1e-6, atol=1e-9)
    if rule != "riemann_trapezoid":
        torch.testing.assert_close(delta, their_delta, rtol=1e-5, atol=1e-8)


def test_saliency_and_input_x_gradient_match_captum():
    model, x = tanh_mlp(), randn(5, 4).requires_grad_()
    for abs_ in (False, True):
        theirs = Saliency(model).attribute(x, target=2, abs=abs_)
        torch.testing.assert_close(E.saliency(model, x.detach(), 2, abs=abs_), theirs, rtol=1e-14, atol=0)
    torch.testing.assert_close(E.input_x_gradient(model, x.detach(), 1), InputXGradient(model).attribute(x, target=1),
                               rtol=1e-14, atol=0)


def test_expected_gradients_against_gradient_shap():
    """One background sample: both are w ⊙ (x − x') on a linear model whatever the draws.  On a
    smooth model both converge to the same expectation (GradientShap with stdevs=0 is EG)."""
    w = randn(4, seed=3)
    model, x = Linear(w), randn(5, 4)
    background = randn(1, 4, seed=2)
    ours = E.expected_gradients(model, x, None, background=background, n=3, seed=0)
    theirs = GradientShap(model).attribute(x, baselines=background, n_samples=3, stdevs=0.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ours, w * (x - background))

    model, background = tanh_mlp(), randn(4, 4, seed=2)
    x = x[:2]
    exact = torch.stack([E.integrated_gradients(model, x, 1, baselines=background[m], steps=24) for m in range(4)]).mean(0)
    np.random.seed(0)
    torch.manual_seed(0)
    theirs, their_delta = GradientShap(model).attribute(x, baselines=background, n_samples=1500, stdevs=0.0, target=1,
                                                         return_convergence_delta=True)
    ours, delta = E.expected_gradients(model, x, 1, background=background, n=1500, seed=1, batch_size=3000, return_delta=True)
    scale = exact.abs().max()
    assert float((ours - exact).abs().max()) < 0.05 * scale
    assert float((theirs - exact).abs().max()) < 0.05 * scale
    # completeness in expectation: both Monte Carlo deltas are small against f(x) − E f(x')
    with torch.no_grad():
        gap = float((model(x)[:, 1] - model(background)[:, 1].mean()).abs().max())
    assert float(delta.abs().max()) < 0.05 * gap and float(their_delta.abs().mean()) < 2 * gap


# ---------------------------------------------------------------------------------- SmoothGrad
def test_smoothgrad_family_equals_hand_statistics_over_the_same_noise():
    model, x = tanh_mlp(), randn(3, 4)
    n = 9
    noise = torch.stack(list(E.smoothgrad_noise(x, n, noise=0.2, seed=5)))
    pts = (x[None] + noise).reshape(-1, 4).requires_grad_()
    (g,) = torch.autograd.grad(model(pts)[:, 2].sum(), pts)
    g = g.reshape(n, 3, 4)
    torch.testing.assert_close(E.smoothgrad(model, x, 2, n=n, noise=0.2, seed=5, batch_size=4), g.mean(0))
    torch.testing.assert_close(E.smoothgrad(model, x, 2, n=n, noise=0.2, seed=5, squared=True), (g**2).mean(0))
    torch.testing.assert_close(E.smoothgrad_sq(model, x, 2, n=n, noise=0.2, seed=5), (g**2).mean(0))
    torch.testing.assert_close(E.vargrad(model, x, 2, n=n, noise=0.2, seed=5), g.var(0, unbiased=False))


def test_smoothgrad_noise_is_a_fraction_of_each_examples_range():
    """σ_b = noise · (max x_b − min x_b): the normalised noise is the seeded standard normal stream."""
    x = torch.stack([torch.linspace(0, 1, 6), torch.linspace(-3, 5, 6)]).to(DTYPE)
    samples = list(E.smoothgrad_noise(x, 3, noise=0.1, seed=4))
    g = torch.Generator().manual_seed(4)
    for eps in samples:
        torch.testing.assert_close(eps, torch.randn(2, 6, generator=g, dtype=DTYPE) * torch.tensor([[0.1], [0.8]], dtype=DTYPE))
    big = torch.stack(list(E.smoothgrad_noise(x, 2000, noise=0.1, seed=0)))
    std = big.std(dim=(0, 2))
    assert abs(float(std[0]) - 0.1) < 0.005 and abs(float(std[1]) - 0.8) < 0.04
    # seed=None draws from torch's global generator
    torch.manual_seed(11)
    a = E.smoothgrad(tanh_mlp(), x[:, :4], 0, n=3)
    torch.manual_seed(11)
    torch.testing.assert_close(E.smoothgrad(tanh_mlp(), x[:, :4], 0, n=3), a, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- priors
def test_prior_closed_forms():
    phi = torch.tensor([[[0.0, 1.0], [3.0, 1.0]]], dtype=DTYPE)  # (1, 2, 2): |1| + |0| + |3| + |−2| = 6
    assert float(E.total_variation_prior(phi)) == 6.0
    assert float(E.total_variation_prior(torch.stack([phi[0], 2 * phi[0]])[:, None])) == (6 + 12) / 2
    v = torch.rand(7, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    pairs = (v[:, None] - v[None]).abs().sum() / (2 * 7 * v.sum())
    torch.testing.assert_close(E.gini(v), pairs)
    assert abs(float(E.gini(torch.ones(5, dtype=DTYPE)))) < 1e-15
    assert abs(float(E.gini(torch.tensor([0, 0, 0, 2.0], dtype=DTYPE))) - 0.75) < 1e-15
    zeros = torch.zeros(2, 5, dtype=DTYPE, requires_grad=True)  # all equal (e.g. x' = x): 0, not 0/0
    prior = E.gini_sparsity_prior(zeros)
    (grad,) = torch.autograd.grad(prior, zeros)
    assert float(prior) == 0.0 and float(E.gini(torch.zeros(4, dtype=DTYPE))) == 0.0 and torch.isfinite(grad).all()
    batch = randn(3, 7)
    torch.testing.assert_close(E.gini_sparsity_prior(batch), -E.gini(batch.abs().mean(0)))
    W = torch.rand(7, 7, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    W = W + W.T
    mean = batch.mean(0)
    torch.testing.assert_close(E.graph_laplacian_prior(batch, W), 0.5 * (W * (mean[:, None] - mean[None]) ** 2).sum())
    with pytest.raises(ValueError, match="symmetric"):
        E.graph_laplacian_prior(batch, W + torch.eye(7, dtype=DTYPE).roll(1, 0))
    with pytest.raises(ValueError, match=r"adjacency must be \(7, 7\)"):
        E.graph_laplacian_prior(batch, W[:3, :3])


def test_prior_gradient_through_expected_gradients_equals_finite_differences():
    """θ ↦ Ω_graph(EG(f_θ, x)) with fixed draws is smooth; its double-backprop gradient passes
    torch.autograd.gradcheck (central finite differences) in float64."""
    model, x, background = tanh_mlp(d_in=4, d_out=2), randn(3, 4), randn(5, 4, seed=2)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_()
    W = (torch.rand(4, 4, generator=torch.Generator().manual_seed(3), dtype=DTYPE) > 0.5).to(DTYPE)
    W = W + W.T

    def prior(flat):
        params = dict(zip(names, [t.view(s) for t, s in zip(torch.split(flat, [s.numel() for s in shapes]), shapes)]))
        phi = E.expected_gradients(lambda z: functional_call(model, params, (z,)), x, 1, background=background, n=4,
                                   seed=0, batch_size=5, create_graph=True)
        return E.graph_laplacian_prior(phi, W) + E.gini_sparsity_prior(phi)

    assert torch.autograd.gradcheck(prior, (theta,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_training_with_a_prior_changes_the_parameter_gradient():
    """loss + λ Ω_pixel(EG) has a different parameter gradient than the loss alone, by exactly λ ∇Ω."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 5 * 5, 3)).to(DTYPE)
    x, y = randn(4, 1, 5, 5), torch.tensor([0, 1, 2, 1])
    background = randn(6, 1, 5, 5, seed=3)
    lam = 0.3

    def grads(with_prior: bool):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if with_prior:
            phi = E.expected_gradients(model, x, y, background=background, n=1, seed=0, create_graph=True)
            loss = loss + lam * E.total_variation_prior(phi)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain, regularised = grads(False), grads(True)
    phi = E.expected_gradients(model, x, y, background=background, n=1, seed=0, create_graph=True)
    params = list(model.parameters())
    prior_grads = torch.autograd.grad(E.total_variation_prior(phi), params, allow_unused=True)
    prior_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, prior_grads)]
    assert float(prior_grads[0].abs().max()) > 1e-6  # the conv weights feel the prior
    for a, b, g in zip(plain, regularised, prior_grads):
        torch.testing.assert_close(b - a, lam * g, rtol=1e-10, atol=1e-12)
    assert model.training  # the model is left in the mode the training loop had


# ------------------------------------------------------------------ affine-prefix shortcut
def conv_net() -> nn.Module:
    torch.manual_seed(4)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), bn, nn.ReLU(inplace=True), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 4)).to(DTYPE)


def flat_net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Dropout(0.5), nn.Linear(7, 6), nn.Tanh(),
                         nn.Linear(6, 3)).to(DTYPE)


@pytest.mark.parametrize("make, shape", [(tanh_mlp, (5, 4)), (conv_net, (5, 2, 5, 5)), (flat_net, (5, 3, 4))])
def test_affine_prefix_shortcut_equals_the_full_computation(make, shape, monkeypatch):
    """IG, SmoothGrad and Expected Gradients through ``rest(prefix(x))`` equal the step-by-step
    computation through the whole model (train-mode BatchNorm/Dropout are in eval for both), and
    the shortcut is really taken on these models."""
    import gradkit.explain.expected as expected
    import gradkit.explain.integrated as integrated
    import gradkit.explain.smooth as smooth

    taken = []

    def spy(model):
        split = E._common.affine_prefix(model)
        taken.append(split is not None)
        return split

    monkeypatch.setattr(integrated, "affine_prefix", spy)
    monkeypatch.setattr(smooth, "affine_prefix", spy)
    monkeypatch.setattr(expected, "affine_prefix", spy)
    model, x, base = make().train(), randn(*shape), randn(*shape, seed=3)
    target = torch.tensor([0, 1, 2, 1, 0])
    for rule in ("gausslegendre", "riemann_trapezoid"):
        fast, delta = E.integrated_gradients(model, x, target, baselines=base, steps=7, rule=rule, batch_size=4,
                                             return_delta=True)
        full, full_delta = E.integrated_gradients(model, x, target, baselines=base, steps=7, rule=rule,
                                                  return_delta=True, shortcut=False)
        torch.testing.assert_close(fast, full, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(delta, full_delta, rtol=1e-9, atol=1e-12)
    fast = E.smoothgrad(model, x, target, n=6, seed=2, batch_size=4)
    torch.testing.assert_close(fast, E.smoothgrad(model, x, target, n=6, seed=2, shortcut=False), rtol=1e-10, atol=1e-12)
    background = randn(7, *shape[1:], seed=4)
    fast, delta = E.expected_gradients(model, x, target, background=background, n=6, seed=1, batch_size=4,
                                       return_delta=True)
    full, full_delta = E.expected_gradients(model, x, target, background=background, n=6, seed=1,
                                            return_delta=True, shortcut=False)
    torch.testing.assert_close(fast, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(delta, full_delta, rtol=1e-9, atol=1e-12)
    assert not fast.requires_grad and taken == [True] * 4 and model.training  # mode restored


def test_affine_prefix_refuses_what_is_not_affine():
    split = E._common.affine_prefix
    linear = nn.Linear(3, 3)
    assert split(nn.Sequential(nn.ReLU(), linear)) is None
    assert split(nn.Sequential(nn.Identity(), nn.Flatten())) is None  # no layer to save
    assert split(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False).eval(), linear)) is None  # batch stats
    assert split(nn.Sequential(nn.BatchNorm1d(3), linear)) is None  # train mode

    class Lora(nn.Linear):
        pass

    assert split(nn.Sequential(Lora(3, 3), nn.ReLU())) is None
    model = nn.Sequential(linear, nn.ReLU(), nn.Linear(3, 2))
    prefix, rest = split(model)
    assert list(prefix) == [linear] and len(rest) == 2
    handle = linear.register_forward_hook(lambda *a: None)
    assert split(model) is None  # a hook may change what the layer computes
    handle.remove()
    handle = model.register_forward_pre_hook(lambda *a: None)
    assert split(model) is None
    handle.remove()
    # a hooked model gets its hooked answer: the hook doubles the first layer's output
    model = tanh_mlp()
    doubled = tanh_mlp()
    with torch.no_grad():
        doubled[0].weight.mul_(2)
        doubled[0].bias.mul_(2)
    x = randn(3, 4)
    handle = model[0].register_forward_hook(lambda module, args, out: out * 2)
    torch.testing.assert_close(E.integrated_gradients(model, x, 1, steps=5),
                               E.integrated_gradients(doubled, x, 1, steps=5, shortcut=False), rtol=1e-12, atol=1e-14)
    handle.remove()


# ------------------------------------------------ BatchNorm folding and channels-last layout
class ResidualBN(nn.Module):
    """conv → BN → ReLU, a residual block whose shortcut is conv → BN, and a conv read twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.short = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.shared, self.bn_shared = nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3)  # conv output also read directly
        self.head = nn.Linear(3 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(self.bn(self.conv(h)) + self.short(h))
        s = self.shared(h)
        return self.head((self.bn_shared(s) + s).flatten(1))


def residual_bn() -> nn.Module:
    torch.manual_seed(6)
    model = ResidualBN().to(DTYPE)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def test_fold_batch_norm_is_the_same_function_and_leaves_the_model_alone():
    fold = E._common.fold_batch_norm
    model = residual_bn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold(model)
    assert folded is not model
    kinds = [type(m) for m in folded.modules()]
    assert kinds.count(nn.BatchNorm2d) == 1  # stem, block and shortcut folded; the shared conv's BN kept
    x = randn(4, 2, 5, 5)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-13)
    assert [type(m) for m in model.modules()].count(nn.BatchNorm2d) == 4
    assert model.stem[1] is not None and model.conv.bias is None  # the user's modules are untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fold_batch_norm_refuses_what_it_cannot_fold():
    fold = E._common.fold_batch_norm
    model = residual_bn().train()
    assert fold(model) is model  # batch statistics
    model.eval()
    no_stats = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    assert fold(no_stats) is no_stats

    class Branchy(nn.Module):  # control flow on values: not traceable
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    branchy = Branchy().eval()
    assert fold(branchy) is branchy
    assert fold(lambda z: z) is not None
    # a hooked pair is kept, with its hook; the rest is still folded
    calls = []
    handle = model.conv.register_forward_hook(lambda *a: calls.append(1))
    folded = fold(model)
    assert [type(m) for m in folded.modules()].count(nn.BatchNorm2d) == 2
    folded(randn(1, 2, 5, 5))
    assert calls == [1]
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert fold(model) is model  # global hooks see every module: keep them all
    finally:
        handle.remove()
    for inlined in (model, model.stem):  # the trace would inline these and drop their hooks
        handle = inlined.register_forward_hook(lambda module, args, out: out * 2)
        assert fold(model) is model
        handle.remove()


def test_fold_batch_norm_keeps_a_convolution_used_elsewhere():
    """A convolution called twice, or whose weight the model also reads directly, is not folded
    (its other uses would see the folded weights: another function); a pair beside it still is."""
    fold = E._common.fold_batch_norm

    class Reused(nn.Module):
        def __init__(self, direct: bool) -> None:
            super().__init__()
            self.direct = direct
            self.conv, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
            self.other, self.bn2 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            h = self.bn(self.conv(x))
            h = F.conv2d(h, self.conv.weight, padding=1) if self.direct else self.conv(h)
            return self.bn2(self.other(h)).flatten(1)

    for direct in (False, True):
        model = Reused(direct)
        with torch.no_grad():
            for bn in (model.bn, model.bn2):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 2)
        model = model.double().eval()
        folded = fold(model)
        assert [type(m) for m in folded.modules()].count(nn.BatchNorm2d) == 1  # bn kept, bn2 folded
        x = randn(3, 2, 4, 4)
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-13)


def test_folded_channels_last_sweeps_equal_the_reference_path(monkeypatch):
    """Every method that goes through ``sweep``/``forward_values`` gives the same attributions
    with BatchNorm folding and the channels-last layout (forced on for these few rows) as through
    the model as given in NCHW; and the fast path is really taken."""
    common = E._common
    model, x, base = residual_bn(), randn(5, 2, 5, 5), randn(5, 2, 5, 5, seed=3)
    background = randn(7, 2, 5, 5, seed=4)
    target = torch.tensor([0, 1, 2, 1, 0])

    def run():
        return [
            E.integrated_gradients(model, x, target, baselines=base, steps=7, batch_size=8, return_delta=True),
            E.smoothgrad(model, x, target, n=6, seed=2, batch_size=8),
            E.expected_gradients(model, x, target, background=background, n=6, seed=1, batch_size=8),
            E.idgi(model, x, target, baselines=base, steps=5),
            E.saliency(model, x, target),
        ]

    fold, layout, seen = common.fold_batch_norm, common.model_layout, []
    monkeypatch.setattr(common, "FOLD_MIN_ROWS", 0)
    monkeypatch.setattr(common, "fold_batch_norm", lambda m: seen.append(fold(m)) or seen[-1])
    monkeypatch.setattr(common, "model_layout", lambda m, z: seen.append(layout(m, z)) or seen[-1])
    fast = run()
    assert any(isinstance(s, torch.fx.GraphModule) for s in seen) and torch.channels_last in seen
    monkeypatch.setattr(common, "fold_batch_norm", lambda m: m)
    monkeypatch.setattr(common, "model_layout", lambda m, z: torch.contiguous_format)
    reference = run()
    for a, b in zip(fast, reference):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
            assert u.is_contiguous()


class ViewNet(nn.Module):
    """A classic CNN head: ``.view`` on the conv activations, which needs them contiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Linear(3 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(h.view(h.size(0), -1))


def test_a_model_that_needs_contiguous_activations_keeps_them(monkeypatch):
    """The channels-last probe fails on ``.view`` and the sweep stays contiguous (BatchNorm is
    still folded); the attributions equal the plain path's, above and below the row threshold."""
    common = E._common
    torch.manual_seed(7)
    model, x = ViewNet().to(DTYPE).eval(), randn(6, 2, 5, 5)
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2)
    chosen = []
    fast_path = common.fast_path
    monkeypatch.setattr(common, "fast_path", lambda *a: chosen.append(fast_path(*a)) or chosen[-1])
    big = E.integrated_gradients(model, x, 1, steps=50)  # 300 rows: the fast paths are tried
    assert chosen and all(layout == torch.contiguous_format for _, layout in chosen)
    assert any(isinstance(m, torch.fx.GraphModule) for m, _ in chosen)
    monkeypatch.setattr(common, "FOLD_MIN_ROWS", 10**9)
    torch.testing.assert_close(big, E.integrated_gradients(model, x, 1, steps=50), rtol=1e-10, atol=1e-12)


def test_double_backprop_keeps_the_parameters_of_a_batch_norm_model(monkeypatch):
    """With ``create_graph`` nothing is folded, so the prior's gradient reaches the model's own
    parameters, including the BatchNorm affine ones."""
    monkeypatch.setattr(E._common, "FOLD_MIN_ROWS", 0)
    model, x = residual_bn(), randn(3, 2, 5, 5)
    phi = E.expected_gradients(model, x, 1, background=randn(4, 2, 5, 5, seed=2), n=3, seed=0, create_graph=True)
    grads = torch.autograd.grad(E.total_variation_prior(phi), [model.stem[1].weight, model.conv.weight])
    assert all(float(g.abs().max()) > 0 for g in grads)
