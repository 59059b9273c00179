"""Attribution robustness: similarity measures (scipy as the peer for the rank correlations), the
attribution attack, the IGR penalty (hand-computed cases, gradients by finite differences), the
uniform-ball smoothing certificate (exact volumes, a bounded attribution that attains it, PGD on a
trained model) and the deviation bound (first order: exact and attained on quadratic models,
first-order accurate on a trained tanh network; certified: interval Hessian bounds that contain
the Hessian in the whole ball and are exact for one unit, never beaten by PGD)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from scipy import stats
from torch import nn

from gradkit.explain import robustness as rb
from gradkit.explain._hessian_interval import hessian_interval
from gradkit.explain.saliency import saliency
from gk_testing import one_thread, randn  # noqa: F401  (autouse fixture: one torch thread)

DTYPE = torch.float64


@pytest.fixture(scope="module")
def trained():
    """A 2-D, 3-class tanh MLP trained to 100 % on angular sectors (150 Adam steps), with four
    test points and their predicted classes."""
    g = torch.Generator().manual_seed(0)
    X = 1.5 * torch.randn(256, 2, generator=g, dtype=DTYPE)
    y = ((torch.atan2(X[:, 1], X[:, 0]) + math.pi) / (2 * math.pi / 3)).long().clamp(max=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).to(DTYPE)
    opt = torch.optim.Adam(model.parameters(), 0.03)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    model.eval()
    x = X[:4]
    assert bool((model(X).argmax(1) == y).all())
    return model, x, model(x).argmax(1)


class Quadratic(nn.Module):
    """f(x) = ½ xᵀAx + bᵀx (A symmetric): the input gradient Ax + b is affine, J = A."""

    def __init__(self, d: int, seed: int = 0) -> None:
        super().__init__()
        a = randn(d, d, seed=seed)
        self.A, self.b = (a + a.t()) / 2, randn(d, seed=seed + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.einsum("bi,ij,bj->b", x, self.A, x) + x @ self.b


# -------------------------------------------------------------------------------- similarities
def test_rank_correlations_equal_scipy_with_ties():
    a = randn(3, 40).round(decimals=1)
    b = (a + 0.3 * randn(3, 40, seed=2)).round(decimals=1)
    for ours, theirs in ((rb.kendall_tau(a, b, chunk=7), stats.kendalltau), (rb.spearman(a, b), stats.spearmanr)):
        expected = torch.tensor([theirs(a[i].numpy(), b[i].numpy()).statistic for i in range(3)], dtype=DTYPE)
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)


def test_cosine_and_topk_intersection():
    a, b = randn(2, 3, 4), randn(2, 3, 4, seed=2)
    torch.testing.assert_close(rb.cosine_similarity(a, b),
                               nn.functional.cosine_similarity(a.reshape(2, -1), b.reshape(2, -1)), rtol=1e-14, atol=0)
    x = torch.tensor([[5.0, 4, 3, 2, 1]], dtype=DTYPE)
    y = torch.tensor([[1.0, 4, 5, 2, 3]], dtype=DTYPE)
    assert rb.topk_intersection(x, y, 2).tolist() == [0.5]  # {0,1} vs {2,1}
    assert rb.topk_intersection(x, y, 3).tolist() == [2 / 3]  # {0,1,2} vs {2,1,4}
    with pytest.raises(ValueError, match="k must be <="):
        rb.topk_intersection(x, y, 6)
    with pytest.raises(ValueError, match="one shape"):
        rb.cosine_similarity(x, y[:, :4])


# ---------------------------------------------------------------------------------------- attack
def test_attack_moves_saliency_more_than_random_noise_and_keeps_the_prediction():
    """On a 10-input tanh MLP, PGD (ℓ∞, ε = 0.3, 15 steps, 2 restarts) moves the saliency at least
    twice as far (1 − cos) as the best of 20 random prediction-preserving points of the ball
    (measured: 3–6 ×)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).to(DTYPE).eval()
    x = randn(4, 10, seed=3)
    labels, eps = model(x).argmax(1), 0.3
    attack = rb.attribution_attack(model, x, labels, eps=eps, steps=15, restarts=2, seed=0)
    assert float(attack.delta.abs().max()) <= eps + 1e-15
    assert bool((model(x + attack.delta).argmax(1) == labels).all())
    torch.testing.assert_close(attack.attributions, saliency(model, x + attack.delta, labels), rtol=0, atol=1e-13)
    torch.testing.assert_close(attack.dissimilarity,
                               1 - rb.cosine_similarity(saliency(model, x, labels), attack.attributions), rtol=0, atol=1e-13)
    g, random = torch.Generator().manual_seed(5), []
    for _ in range(20):
        z = x + eps * (2 * torch.rand(x.shape, generator=g, dtype=DTYPE) - 1)
        moved = 1 - rb.cosine_similarity(saliency(model, x, labels), saliency(model, z, labels))
        random.append(torch.where(model(z).argmax(1) == labels, moved, torch.zeros_like(moved)))
    assert bool((attack.dissimilarity >= 2 * torch.stack(random).max(0).values).all())
    top = rb.attribution_attack(model, x, labels, eps=eps, norm="l2", objective="topk", k=3, steps=10, seed=1)
    assert float(top.delta.norm(dim=1).max()) <= eps * (1 + 1e-12)
    expected = 1 - rb.topk_intersection(saliency(model, x, labels).abs(), top.attributions.abs(), 3)
    torch.testing.assert_close(top.dissimilarity, expected)


# ------------------------------------------------------------------------------------------- IGR
def test_igr_penalty_equals_its_formula_on_hand_computed_cases():
    """Linear f = w·x: IG(x) = w ⊙ x (zero baseline), so R = mean(1 − cos(w⊙x, w⊙x')).  Separable
    quadratic f = Σ a_i x_i²: IG_i = a_i x_i² exactly (Gauss–Legendre, degree 1 integrand)."""
    w = torch.tensor([1.0, -2.0, 0.5], dtype=DTYPE)
    x = torch.tensor([[1.0, 1.0, 2.0], [0.0, 3.0, -1.0]], dtype=DTYPE)
    x2 = torch.tensor([[1.0, 0.0, 2.0], [1.0, 3.0, 1.0]], dtype=DTYPE)
    linear = lambda z: z @ w
    # by hand: w⊙x = (1,−2,1), w⊙x' = (1,0,1): cos = 2/(√6·√2); (0,−6,−0.5) vs (1,−6,0.5): 35.75/(√36.25·√37.25)
    cos = torch.tensor([2 / (math.sqrt(6) * math.sqrt(2)), 35.75 / (math.sqrt(36.25) * math.sqrt(37.25))], dtype=DTYPE)
    torch.testing.assert_close(rb.igr_penalty(linear, x, x2, steps=4), (1 - cos).mean(), rtol=1e-14, atol=1e-15)
    a = torch.tensor([2.0, -1.0, 3.0], dtype=DTYPE)
    quadratic = lambda z: (a * z.square()).sum(1)
    u, v = a * x.square(), a * x2.square()
    expected = (1 - (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))).mean()
    torch.testing.assert_close(rb.igr_penalty(quadratic, x, x2, steps=2), expected, rtol=1e-14, atol=1e-15)


def test_igr_penalty_gradient_flows_to_the_parameters_and_matches_finite_differences():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    x = randn(5, 4)
    x2 = x + 0.3 * randn(5, 4, seed=9)
    labels = torch.tensor([0, 1, 2, 0, 1])
    loss = nn.functional.cross_entropy(model(x), labels) + 0.7 * rb.igr_penalty(model, x, x2, labels, steps=8)
    loss.backward()
    weight = model[0].weight
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    assert float(weight.grad.abs().max()) > 0
    h = 1e-6
    for index in [(0, 0), (3, 2), (5, 1)]:
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                weight[index] += sign * h
                values.append(float(nn.functional.cross_entropy(model(x), labels)
                                    + 0.7 * rb.igr_penalty(model, x, x2, labels, steps=8)))
                weight[index] -= sign * h
        numeric = (values[0] - values[1]) / (2 * h)
        assert abs(numeric - float(weight.grad[index])) < 1e-6 * max(1.0, abs(numeric))


def test_igr_penalty_with_a_detached_natural_attribution():
    """detach_natural=True (the replication's choice): the same value, and the parameter gradient
    is that of 1 − cos(c, IG(x')) with c = IG(x) a constant."""
    from gradkit.explain import integrated_gradients

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    x, labels = randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    x2 = x + 0.3 * randn(5, 4, seed=9)
    full = rb.igr_penalty(model, x, x2, labels, steps=8)
    half = rb.igr_penalty(model, x, x2, labels, steps=8, detach_natural=True)
    torch.testing.assert_close(half, full, rtol=1e-13, atol=0)
    def grad(value):  # the last bias does not enter an input gradient
        weights = [model[0].weight, model[0].bias, model[2].weight]
        return torch.autograd.grad(value, weights)

    grads = grad(half)
    const = integrated_gradients(model, x, labels, steps=8).detach()
    moved = integrated_gradients(model, x2, labels, steps=8, create_graph=True)
    expected = grad((1 - rb.cosine_similarity(const, moved)).mean())
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    full_grads = grad(rb.igr_penalty(model, x, x2, labels, steps=8))
    assert max(float((a - b).abs().max()) for a, b in zip(grads, full_grads)) > 1e-6


# ------------------------------------------------------------------- uniformly smoothed attributions
def test_uniform_ball_noise_is_uniform_in_the_ball():
    """‖η‖ ≤ r, E η = 0, E ηηᵀ = r²/(F+2) I (uniform in the F-ball), within 5 standard errors."""
    x = torch.zeros(1, 3, dtype=DTYPE)
    eta = torch.cat(list(rb.uniform_ball_noise(x, 6000, 0.7, seed=0)))
    assert float(eta.norm(dim=1).max()) <= 0.7
    second = torch.einsum("ni,nj->nij", eta, eta)
    target = 0.7**2 / 5 * torch.eye(3, dtype=DTYPE)
    assert bool(((eta.mean(0)).abs() <= 5 * eta.std(0) / math.sqrt(6000)).all())
    assert bool(((second.mean(0) - target).abs() <= 5 * second.std(0) / math.sqrt(6000) + 1e-12).all())
    # the radius' distribution: P(‖η‖ ≤ r/2) = 2^{−F}
    share = float((eta.norm(dim=1) <= 0.35).double().mean())
    assert abs(share - 1 / 8) <= 5 * math.sqrt(1 / 8 * 7 / 8 / 6000)


def test_ball_overlap_matches_exact_volumes():
    r, e = 1.3, 0.4
    lens2 = (2 * r * r * math.acos(e / (2 * r)) - e / 2 * math.sqrt(4 * r * r - e * e)) / (math.pi * r * r)
    lens3 = (math.pi * (4 * r + e) * (2 * r - e) ** 2 / 12) / (4 / 3 * math.pi * r**3)
    assert abs(rb.ball_overlap(e, r, 1) - (1 - e / (2 * r))) < 1e-14
    assert abs(rb.ball_overlap(e, r, 2) - lens2) < 1e-14
    assert abs(rb.ball_overlap(e, r, 3) - lens3) < 1e-14
    assert rb.ball_overlap(2 * r, r, 5) == 0.0 and rb.ball_overlap(0.0, r, 5) == 1.0
    # 6-D by Monte Carlo
    eta = torch.cat(list(rb.uniform_ball_noise(torch.zeros(1, 6, dtype=DTYPE), 20000, r, seed=1)))
    inside = ((eta - torch.tensor([e, 0, 0, 0, 0, 0], dtype=DTYPE)).norm(dim=1) <= r).double()
    p = rb.ball_overlap(e, r, 6)
    assert abs(float(inside.mean()) - p) <= 5 * math.sqrt(p * (1 - p) / 20000)


def test_cosine_certificate_is_attained_by_a_bounded_attribution():
    """A bounded attribution (‖g‖ ≤ M = 1) built to be worst case in 2-D: −M e₁ on the crescent
    B(x)∖B(x+δ), +M e₁ on B(x+δ)∖B(x), a constant c (‖c‖ ≤ M, chosen to make the move tangent)
    on the lens.  Then h(x+δ) − h(x) = 2M(1 − overlap) e₁ = ρ e₁ and cos(h(x), h(x+δ)) equals
    the certificate sqrt(1 − ρ²/‖h‖²): no larger bound can hold.  Checked with the exact
    volumes and with the Monte Carlo smoothing (50 000 draws)."""
    eps, radius = 0.2, 1.0
    overlap = rb.ball_overlap(eps, radius, 2)
    crescent = 1 - overlap
    lens_value = torch.tensor([-crescent, 0.999 * math.sqrt(overlap**2 - crescent**2)], dtype=DTYPE) / overlap
    assert float(lens_value.norm()) <= 1
    e1 = torch.tensor([1.0, 0.0], dtype=DTYPE)

    def g(model, z, target, create_graph=False):
        in_x, in_moved = z.norm(dim=1) <= radius, (z - eps * e1).norm(dim=1) <= radius
        out = torch.zeros_like(z)
        out[in_x & in_moved] = lens_value
        out[in_moved & ~in_x] = e1
        out[in_x & ~in_moved] = -e1
        return out

    exact = (overlap * lens_value - crescent * e1)[None]
    exact_moved = (overlap * lens_value + crescent * e1)[None]
    bound = rb.certified_cosine(exact, max_norm=1.0, eps=eps, radius=radius)
    torch.testing.assert_close(rb.cosine_similarity(exact, exact_moved), bound, rtol=0, atol=1e-12)
    # the formula ‖h‖/sqrt(‖h‖² + (M V_U/V_S)²) quoted in a summary of Wang & Kong (2024), with V_U
    # the symmetric difference of the balls (M V_U/V_S = ρ), would be beaten by this attribution
    rho = 2 * crescent
    summary = exact.norm() / (exact.norm() ** 2 + rho**2).sqrt()
    assert float(rb.cosine_similarity(exact, exact_moved)) < float(summary) - 1e-3
    rows = torch.zeros(1000, 2, dtype=DTYPE)
    h = rb.uniform_smoothed(None, rows, None, radius=radius, n=50, seed=0, attribution=g).mean(0, keepdim=True)
    h_moved = rb.uniform_smoothed(None, rows + eps * e1, None, radius=radius, n=50, seed=1, attribution=g).mean(0, keepdim=True)
    torch.testing.assert_close(h, exact, rtol=0, atol=0.01)
    torch.testing.assert_close(h_moved, exact_moved, rtol=0, atol=0.01)
    assert abs(float(rb.cosine_similarity(h, h_moved) - bound)) < 2e-3


def test_pgd_does_not_beat_the_smoothed_certificate_on_a_trained_model(trained):
    """PGD (ℓ2, 2 restarts × 2 seeds) through the smoothed, clipped gradient (M = 1, r = 0.5, 128
    fixed draws) at ε = 0.05 and 0.1; the attacked cosine, re-estimated with 8192 fresh draws,
    stays above the certificate (up to 0.02 of Monte Carlo error) for every certified example."""
    model, x, labels = trained
    radius, max_norm = 0.5, 1.0
    smoothed = functools.partial(rb.uniform_smoothed, radius=radius, max_norm=max_norm, batch_size=4096)
    h = smoothed(model, x, labels, n=8192, seed=11)
    certified = 0
    for eps in (0.05, 0.1):
        bound = rb.certified_cosine(h, max_norm=max_norm, eps=eps, radius=radius)
        for seed in (0, 7):
            attack = rb.attribution_attack(model, x, labels, functools.partial(smoothed, n=128, seed=seed), eps=eps,
                                           norm="l2", steps=10, restarts=2, seed=seed)
            assert float(attack.delta.norm(dim=1).max()) <= eps * (1 + 1e-12)
            cos = rb.cosine_similarity(h, smoothed(model, x + attack.delta, labels, n=8192, seed=12))
            ok = bound > -1
            certified += int(ok.sum())
            assert bool((cos[ok] >= bound[ok] - 0.02).all()), (eps, cos, bound)
    assert certified >= 4


def test_smoothed_gradient_of_a_linear_model_is_its_weight():
    w = randn(5, seed=2)
    h = rb.uniform_smoothed(lambda z: z @ w, randn(3, 5), None, radius=2.0, n=10, seed=0)
    torch.testing.assert_close(h, w.expand(3, 5), rtol=0, atol=1e-14)
    clipped = rb.uniform_smoothed(lambda z: z @ w, randn(3, 5), None, radius=2.0, n=10, seed=0, max_norm=0.5)
    torch.testing.assert_close(clipped, 0.5 * w.expand(3, 5) / w.norm(), rtol=0, atol=1e-14)


# ----------------------------------------------------------------- first-order deviation bound
def test_attribution_jacobian_of_saliency_is_the_hessian(trained):
    model, x, labels = trained
    jac = rb.attribution_jacobian(model, x, labels)
    for b in range(4):
        hess = torch.autograd.functional.hessian(lambda z: model(z[None])[0, labels[b]], x[b])
        torch.testing.assert_close(jac[b], hess, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_first_order_bound_is_exact_and_unbeaten_for_an_affine_attribution(norm):
    """Quadratic model: φ(x + δ) − φ(x) = Aδ exactly, so max ‖Aδ‖ over the ℓ2 ball is ε σ_max(A)
    — PGD reaches it and never exceeds it; over the ℓ∞ ball the bound is an upper bound that PGD
    does not beat either.  The cosine bound holds against the cosine attack."""
    model, x, eps = Quadratic(4), randn(3, 4, seed=5), 0.3
    bound = rb.deviation_bound(model, x, None, eps=eps, norm=norm)
    torch.testing.assert_close(bound.spectral, torch.linalg.matrix_norm(model.A, ord=2).expand(3), rtol=1e-12, atol=0)
    far = rb.attribution_attack(model, x, None, eps=eps, norm=norm, objective="distance", steps=60, step_size=eps / 2,
                                restarts=3, seed=0)
    assert bool((far.dissimilarity <= bound.distance * (1 + 1e-12)).all())
    if norm == "l2":
        assert bool((far.dissimilarity >= 0.999 * bound.distance).all())
    turned = rb.attribution_attack(model, x, None, eps=eps, norm=norm, objective="cosine", steps=60, step_size=eps / 2,
                                   restarts=3, seed=0)
    assert bool((1 - turned.dissimilarity >= bound.cosine - 1e-12).all())


def test_first_order_bound_on_a_trained_tanh_network_is_first_order_accurate(trained):
    """For a nonlinear attribution the bound ε σ_max(J) is a linearisation, not a certificate:
    PGD on the trained tanh MLP exceeds it by a relative margin that shrinks linearly with ε
    (measured: up to 13 % at ε = 0.05, 6 % at ε = 0.025, 2.7 % at ε = 0.0125 — an O(ε²) excess in
    distance).  The
    test checks that first-order accuracy: the relative excess at ε/2 is at most 0.6 × the one
    at ε (0.5 for an exact O(ε²) excess), and under 0.3 at ε = 0.05."""
    model, x, labels = trained
    excess = []
    for eps in (0.05, 0.025):
        bound = rb.deviation_bound(model, x, labels, eps=eps)
        attack = rb.attribution_attack(model, x, labels, eps=eps, norm="l2", objective="distance", steps=30, restarts=3,
                                       seed=0, keep_prediction=False)
        excess.append(float((attack.dissimilarity / bound.distance - 1).max()))
    assert excess[0] < 0.3 and excess[1] <= 0.6 * excess[0] + 1e-3, excess


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid])
def test_hessian_interval_contains_the_hessian_everywhere_in_the_ball(act, trained):
    """The elementwise bounds hold at random points of the ℓ2 and ℓ∞ balls and on their
    boundary, are exact at eps = 0, and shrink with eps."""
    if act is nn.Tanh:
        model, x, labels = trained
    else:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3, 8), act(), nn.Linear(8, 8), act(), nn.Linear(8, 2)).to(DTYPE)
        x, labels = randn(3, 3, seed=2), torch.tensor([0, 1, 1])
    jac = rb.attribution_jacobian(model, x, labels)
    low, high = hessian_interval(model, x, labels, 0.0, "l2")
    torch.testing.assert_close(low, jac, rtol=0, atol=1e-13)
    torch.testing.assert_close(high, jac, rtol=0, atol=1e-13)
    g = torch.Generator().manual_seed(0)
    widths = []
    for eps in (0.2, 0.05):
        for norm in ("l2", "linf"):
            low, high = hessian_interval(model, x, labels, eps, norm)
            widths.append(float((high - low).max()))
            for k in range(40):
                d = torch.randn(x.shape, generator=g, dtype=DTYPE)
                if norm == "l2":
                    scale = 1.0 if k % 4 == 0 else torch.rand(len(x), 1, generator=g, dtype=DTYPE)
                    d = eps * d / d.norm(dim=1, keepdim=True) * scale
                else:
                    d = eps * (d.sign() if k % 4 == 0 else 2 * torch.rand(x.shape, generator=g, dtype=DTYPE) - 1)
                inner = rb.attribution_jacobian(model, x + d, labels)
                assert bool(((inner >= low - 1e-12) & (inner <= high + 1e-12)).all()), (eps, norm, k)
    assert widths[2] < 0.5 * widths[0] and widths[3] < 0.5 * widths[1]


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_hessian_interval_is_exact_for_one_unit(act, norm):
    """f(x) = a σ(wᵀx + b): ∇²f = a σ''(p) w wᵀ, and over the ball p = wᵀz + b fills
    [p₀ − ε‖w‖_*, p₀ + ε‖w‖_*] (‖·‖_* the dual norm), so the bounds are the exact extremes of
    a σ''(p) w_i w_j over that range, which holds an extremum of σ''."""
    w, a, eps = torch.tensor([[1.0, -2.0]], dtype=DTYPE), 1.5, 0.3
    model = nn.Sequential(nn.Linear(2, 1), act(), nn.Linear(1, 1)).to(DTYPE)
    with torch.no_grad():
        model[0].weight.copy_(w)
        model[0].bias.fill_(0.2 if act is nn.Tanh else -1.0)
        model[2].weight.fill_(a)
    x = torch.tensor([[0.4, 0.1]], dtype=DTYPE)
    low, high = hessian_interval(model, x, None, eps, norm)
    p0 = float(model[0](x).detach())
    reach = eps * float(w.norm() if norm == "l2" else w.abs().sum())
    p = torch.linspace(p0 - reach, p0 + reach, 200001, dtype=DTYPE)
    t = torch.tanh(p) if act is nn.Tanh else torch.sigmoid(p)
    second = -2 * t * (1 - t**2) if act is nn.Tanh else t * (1 - t) * (1 - 2 * t)
    values = a * second[:, None, None] * (w.T @ w)
    torch.testing.assert_close(low[0], values.amin(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(high[0], values.amax(0), rtol=0, atol=1e-9)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_certified_bound_is_never_beaten_and_tends_to_the_first_order_bound(norm, trained):
    """certified=True: PGD (three restarts, 30 steps, prediction free to change) never exceeds the
    distance certificate nor goes below the cosine certificate, where the first-order estimate is
    beaten (test above); the certificate approaches the first-order bound as eps → 0."""
    model, x, labels = trained
    for eps in ((0.1, 0.05, 0.025) if norm == "l2" else (0.05, 0.025)):
        bound = rb.deviation_bound(model, x, labels, eps=eps, norm=norm, certified=True)
        first = rb.deviation_bound(model, x, labels, eps=eps, norm=norm)
        assert bool((bound.distance >= first.distance).all())
        far = rb.attribution_attack(model, x, labels, eps=eps, norm=norm, objective="distance", steps=30, restarts=3,
                                    seed=0, keep_prediction=False)
        assert bool((far.dissimilarity <= bound.distance).all()), (eps, far.dissimilarity, bound.distance)
        turned = rb.attribution_attack(model, x, labels, eps=eps, norm=norm, objective="cosine", steps=30, restarts=3,
                                       seed=0, keep_prediction=False)
        assert bool((1 - turned.dissimilarity >= bound.cosine).all())
    tiny = 1e-4
    ratio = (rb.deviation_bound(model, x, labels, eps=tiny, norm=norm, certified=True).distance
             / rb.deviation_bound(model, x, labels, eps=tiny, norm=norm).distance)
    assert bool((ratio < 1.01).all()), ratio


def test_certified_bound_of_an_affine_model_is_zero():
    """No activation: the saliency map is constant, so the certificate is 0 (and the cosine 1)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(DTYPE)
    bound = rb.deviation_bound(model, randn(2, 3), torch.tensor([0, 1]), eps=0.5, certified=True)
    assert bool((bound.distance == 0).all()) and bool((bound.cosine == 1).all())


def test_certified_bound_passes_through_eval_dropout_and_flatten(trained):
    """Dropout of any kind, Identity and Flatten are identity maps (the bound evaluates the model in
    eval mode, as every explanation does): the certificate is that of the chain without them."""
    model, x, labels = trained
    padded = nn.Sequential(nn.Flatten(), model[0], nn.AlphaDropout(0.2), model[1], nn.Dropout1d(0.3),
                           nn.Identity(), *model[2:]).eval()
    plain = rb.deviation_bound(model, x, labels, eps=0.05, certified=True)
    got = rb.deviation_bound(padded, x, labels, eps=0.05, certified=True)
    torch.testing.assert_close(got.distance, plain.distance, rtol=1e-12, atol=0)
    padded.train()
    torch.testing.assert_close(rb.deviation_bound(padded, x, labels, eps=0.05, certified=True).distance,
                               plain.distance, rtol=1e-12, atol=0)
    assert padded.training  # the caller's mode is restored


def test_certified_bound_refuses_what_it_cannot_bound(trained):
    model, x, labels = trained
    with pytest.raises(ValueError, match="saliency"):
        rb.deviation_bound(model, x, labels, eps=0.1, certified=True, attribution=functools.partial(saliency, abs=True))
    with pytest.raises(ValueError, match="not a callable"):
        rb.deviation_bound(model, x, lambda out: out[:, 0], eps=0.1, certified=True)
    with pytest.raises(TypeError, match="certified must be True or False"):
        rb.deviation_bound(model, x, labels, eps=0.1, certified="yes")
    n_classes = model(x).shape[1]
    for target in (n_classes, torch.full_like(labels, n_classes)):  # as the non-certified path says
        for certified in (False, True):
            with pytest.raises(ValueError, match=f"out of range for a model output with {n_classes} classes"):
                rb.deviation_bound(model, x, target, eps=0.1, certified=certified)
    with pytest.raises(TypeError, match="detach_natural must be True or False"):
        rb.igr_penalty(model, x, x, labels, detach_natural=1)
    relu = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3)).to(DTYPE)
    with pytest.raises(TypeError, match=r"1 \(ReLU\)"):
        rb.deviation_bound(relu, x, labels, eps=0.1, certified=True)
    with pytest.raises(TypeError, match="nn.Sequential"):
        rb.deviation_bound(Quadratic(2), x, None, eps=0.1, certified=True)
    handle = model[1].register_forward_hook(lambda m, a, out: out)
    try:
        with pytest.raises(ValueError, match="hooks"):
            rb.deviation_bound(model, x, labels, eps=0.1, certified=True)
    finally:
        handle.remove()


def test_bound_errors():
    with pytest.raises(ValueError, match="norm must be"):
        rb.deviation_bound(Quadratic(3), randn(1, 3), None, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="objective must be"):
        rb.attribution_attack(Quadratic(3), randn(1, 3), None, eps=0.1, objective="rank")
    with pytest.raises(ValueError, match="max_norm must be"):
        rb.certified_cosine(randn(1, 3), max_norm=0.0, eps=0.1, radius=1.0)
