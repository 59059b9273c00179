"""The shipped optimality conditions, each through the decorators against a closed form or
central finite differences: lasso / elastic net (proximal gradient), simplex projection
(projected gradient), KKT of constrained QPs, mirror descent on the simplex."""

from __future__ import annotations

import torch

from gradkit.implicit import (
    custom_fixed_point,
    custom_root,
    grad_optimality,
    kkt_optimality,
    mirror_descent_fixed_point,
    projected_gradient_fixed_point,
    projection_simplex,
    prox_elastic_net,
    prox_grad_fixed_point,
    prox_lasso,
)

F64 = torch.float64
N, D = 50, 8
_g = torch.Generator().manual_seed(0)
XS = torch.randn(N, D, generator=_g, dtype=F64)
W_TRUE = torch.tensor([2.0, -1.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=F64)
YS = XS @ W_TRUE + 0.5 * torch.randn(N, generator=_g, dtype=F64)
ETA = 1.0 / float(torch.linalg.eigvalsh(XS.T @ XS / N)[-1])


def least_squares(w):
    return 0.5 * ((XS @ w - YS) ** 2).sum() / N


def ista(prox, hyperparams, steps=800):
    """Proximal gradient descent (no autograd): the black-box solver."""
    w = torch.zeros(D, dtype=F64)
    for _ in range(steps):
        w = prox(w - ETA * XS.T @ (XS @ w - YS) / N, hyperparams, ETA)
    return w


def central_difference(fn, value: float, h: float = 1e-6) -> torch.Tensor:
    return (fn(value + h) - fn(value - h)) / (2 * h)


def test_lasso_derivative_against_finite_differences_and_closed_form():
    lam0 = 0.3
    fixed_point = prox_grad_fixed_point(least_squares, prox_lasso, ETA)
    solver = custom_fixed_point(fixed_point, solve="gmres", rtol=1e-12)(lambda init, lam: ista(prox_lasso, lam))
    lam = torch.tensor(lam0, dtype=F64, requires_grad=True)
    w = solver(None, lam)
    support = w.detach() != 0
    assert 0 < int(support.sum()) < D
    J = torch.stack([torch.autograd.grad(w[i], lam, retain_graph=True)[0] for i in range(D)])
    fd = central_difference(lambda v: ista(prox_lasso, v), lam0)
    torch.testing.assert_close(J[support], fd[support], rtol=0, atol=1e-7)
    assert torch.equal(J[~support], torch.zeros(int((~support).sum()), dtype=F64))
    # on the support, Xₛᵀ(Xₛ wₛ - y)/n + λ sign(wₛ) = 0 gives dwₛ/dλ = -n (XₛᵀXₛ)⁻¹ sign(wₛ)
    Xs = XS[:, support]
    torch.testing.assert_close(J[support], -N * torch.linalg.solve(Xs.T @ Xs, torch.sign(w.detach()[support])),
                               rtol=0, atol=1e-10)


def test_elastic_net_derivatives_against_finite_differences():
    l1, l2 = 0.3, 0.8
    fixed_point = prox_grad_fixed_point(least_squares, prox_elastic_net, ETA)
    solver = custom_fixed_point(fixed_point, solve="gmres", rtol=1e-12)(
        lambda init, hp: ista(prox_elastic_net, hp))
    hp = (torch.tensor(l1, dtype=F64), torch.tensor(l2, dtype=F64))
    J1, J2 = torch.func.jacrev(lambda a, b: solver(None, (a, b)), argnums=(0, 1))(*hp)
    support = ista(prox_elastic_net, (l1, l2)) != 0
    assert 0 < int(support.sum()) < D
    fd1 = central_difference(lambda v: ista(prox_elastic_net, (v, l2)), l1)
    fd2 = central_difference(lambda v: ista(prox_elastic_net, (l1, v)), l2)
    torch.testing.assert_close(J1[support], fd1[support], rtol=0, atol=1e-7)
    torch.testing.assert_close(J2[support], fd2[support], rtol=0, atol=1e-7)
    assert float(J1[~support].abs().max()) == 0 and float(J2[~support].abs().max()) == 0


def test_projected_gradient_simplex_jacobian_closed_form():
    """p*(θ) = argmin_{p ∈ Δ(value)} ½||p - θ||² = proj(θ): implicit differentiation of the
    projected-gradient fixed point gives ∂p/∂θ = diag(s) - s sᵀ/|s| and ∂p/∂value = s/|s|."""

    def f(p, theta):
        return 0.5 * ((p - theta) ** 2).sum()

    fixed_point = projected_gradient_fixed_point(f, projection_simplex, step=0.5)

    @custom_fixed_point(fixed_point, solve="cg", rtol=1e-13)
    def solver(init, value, theta):
        p = torch.full_like(theta, float(value) / theta.numel())
        for _ in range(200):  # projected gradient descent, the black box
            p = projection_simplex(p - 0.5 * (p - theta), value)
        return p

    theta = torch.tensor([0.4, -0.3, 1.1, 0.2, 0.05, -1.0], dtype=F64)
    value = torch.tensor(1.2, dtype=F64)
    Jv, Jt = torch.func.jacrev(lambda v, t: solver(None, v, t), argnums=(0, 1))(value, theta)
    s = (projection_simplex(theta, value) > 0).to(F64)
    assert 1 < int(s.sum()) < theta.numel()
    torch.testing.assert_close(Jt, torch.diag(s) - torch.outer(s, s) / s.sum(), rtol=0, atol=1e-11)
    torch.testing.assert_close(Jv, s / s.sum(), rtol=0, atol=1e-11)
    # forward mode agrees
    Jt_fwd = torch.func.jacfwd(lambda t: solver(None, value, t))(theta)
    torch.testing.assert_close(Jt_fwd, Jt, rtol=0, atol=1e-11)


def test_kkt_equality_constrained_qp_closed_form():
    """min ½xᵀQx + cᵀx s.t. Ex = d: [Q Eᵀ; E 0][x; μ] = [-c; d]; Jacobians of x* in c and d
    against autograd through that linear system."""
    g = torch.Generator().manual_seed(1)
    M = torch.randn(4, 4, generator=g, dtype=F64)
    Q = M @ M.T + torch.eye(4, dtype=F64)
    E = torch.randn(2, 4, generator=g, dtype=F64)

    def closed(c, d):
        K = torch.cat([torch.cat([Q, E.T], 1), torch.cat([E, torch.zeros(2, 2, dtype=F64)], 1)])
        z = torch.linalg.solve(K, torch.cat([-c, d]))
        return z[:4], z[4:]

    optimality = kkt_optimality(lambda x, c: 0.5 * x @ Q @ x + c @ x, eq=lambda x, d: E @ x - d)
    c = torch.randn(4, generator=g, dtype=F64)
    d = torch.randn(2, generator=g, dtype=F64)
    expected = torch.func.jacrev(lambda c_, d_: closed(c_, d_)[0], argnums=(0, 1))(c, d)
    for solve in ("gmres", "dense"):
        @custom_root(optimality, solve=solve, rtol=1e-13)
        def solver(init, c, d):
            x, mu = closed(c, d)
            return x, mu, None

        got = torch.func.jacrev(lambda c_, d_: solver(None, c_, d_)[0], argnums=(0, 1))(c, d)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_kkt_inequality_constraints_complementary_slackness():
    """min ½||x - θ||² s.t. x <= u: x* = min(θ, u), ν* = max(θ - u, 0); ∂x/∂θ = diag(θ < u),
    ∂x/∂u = diag(θ > u) (strict complementarity)."""
    optimality = kkt_optimality(lambda x, theta: 0.5 * ((x - theta) ** 2).sum(), ineq=lambda x, u: x - u)

    @custom_root(optimality, solve="gmres", rtol=1e-13)
    def solver(init, theta, eq_params, u):
        return torch.minimum(theta, u), None, torch.relu(theta - u)

    theta = torch.tensor([0.5, 2.0, -1.0, 3.0], dtype=F64)
    u = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=F64)
    Jt, Ju = torch.func.jacrev(lambda t, u_: solver(None, t, None, u_)[0], argnums=(0, 1))(theta, u)
    torch.testing.assert_close(Jt, torch.diag((theta < u).to(F64)), rtol=0, atol=1e-12)
    torch.testing.assert_close(Ju, torch.diag((theta > u).to(F64)), rtol=0, atol=1e-12)
    x, _, nu = solver(None, theta, None, u)
    assert float((nu * (x - u)).abs().max()) == 0


def test_mirror_descent_entropy_simplex_softmax_closed_form():
    """min_{x ∈ Δ} ⟨c, x⟩ + τ Σ x log x has x* = softmax(-c/τ) and ∂x*/∂c = -(diag x* - x* x*ᵀ)/τ."""
    tau, step = 0.5, 0.6

    def f(x, c):
        return (c * x).sum() + tau * (x * torch.log(x)).sum()

    fixed_point = mirror_descent_fixed_point(f, step)

    @custom_fixed_point(fixed_point, solve="gmres", rtol=1e-13)
    def exponentiated_gradient(init, proj_params, c):
        x = init
        for _ in range(100):  # x <- softmax(log x - step ∇f(x)), a contraction by 1 - step·τ in log space
            x = torch.softmax(torch.log(x) - step * (c + tau * (torch.log(x) + 1)), 0)
        return x

    c = torch.tensor([0.3, -1.0, 0.8, 0.1, 2.0], dtype=F64)
    init = torch.full((5,), 0.2, dtype=F64)
    x = exponentiated_gradient(init, None, c)
    torch.testing.assert_close(x, torch.softmax(-c / tau, 0), rtol=0, atol=1e-12)
    expected = -(torch.diag(x) - torch.outer(x, x)) / tau
    Jr = torch.func.jacrev(lambda c_: exponentiated_gradient(init, None, c_))(c)
    Jf = torch.func.jacfwd(lambda c_: exponentiated_gradient(init, None, c_))(c)
    torch.testing.assert_close(Jr, expected, rtol=0, atol=1e-11)
    torch.testing.assert_close(Jf, expected, rtol=0, atol=1e-11)


def test_keyword_arguments_reach_f_and_are_differentiated():
    """grad_optimality and prox_grad_fixed_point pass the solver's keyword arguments on to f:
    ridge with a linear term, w* = (XᵀX + λI)⁻¹ (Xᵀy − μ), μ given by keyword; the implicit
    gradients in λ and μ equal those of the closed form (with a prox of l1reg 0: the same w*)."""
    A0, b0 = XS.T @ XS, XS.T @ YS

    def f(w, lam, mu=None):
        return 0.5 * ((XS @ w - YS) ** 2).sum() + 0.5 * lam * (w**2).sum() + (mu * w).sum()

    def closed(lam, mu):
        return torch.linalg.solve(A0 + lam * torch.eye(D, dtype=F64), b0 - mu)

    lam = torch.tensor(0.7, dtype=F64, requires_grad=True)
    mu = torch.linspace(-1, 1, D, dtype=F64, requires_grad=True)
    expected = torch.autograd.grad(closed(lam, mu).square().sum(), (lam, mu))
    root = custom_root(grad_optimality(f))(lambda init, lam, mu=None: closed(lam, mu).detach())
    got = torch.autograd.grad(root(None, lam, mu=mu).square().sum(), (lam, mu))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    step = 1.0 / float(torch.linalg.eigvalsh(A0)[-1] + 1.0)
    fixed = custom_fixed_point(prox_grad_fixed_point(f, prox_lasso, step))(
        lambda init, l1, lam, mu=None: closed(lam, mu).detach())
    got = torch.autograd.grad(fixed(None, 0.0, lam, mu=mu).square().sum(), (lam, mu))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_conditions_accept_objectives_whose_parameters_are_named_x_or_params():
    """The conditions' signatures name only f's keywords: f(theta, x) and f(x, params) are fine."""
    def f(theta, x):
        return 0.5 * ((theta - 2 * x) ** 2).sum()

    x = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    for condition in (grad_optimality(f), prox_grad_fixed_point(f, prox_lasso, 0.5)):
        solver = (custom_root if condition.__name__ == "optimality_fn" else custom_fixed_point)(condition)
        args = (x,) if condition.__name__ == "optimality_fn" else (0.0, x)
        theta = solver(lambda init, *a: 2 * a[-1].detach())(None, *args)
        (grad,) = torch.autograd.grad(theta.sum(), x)
        torch.testing.assert_close(grad, torch.full((2,), 2.0, dtype=F64), rtol=1e-12, atol=1e-12)
    grad_optimality(lambda x, params: (x**2).sum() * params)  # constructs
