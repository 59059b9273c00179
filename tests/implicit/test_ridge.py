"""custom_root / custom_fixed_point on ridge regression, whose solution and derivatives are in
closed form: dw*/dλ = -(XᵀX + λI)⁻¹ w*."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from gradkit.implicit import custom_fixed_point, custom_root, grad_optimality
from gradkit.linalg import minres

from .problems import (
    D,
    F64,
    L_MAX,
    L_MIN,
    XV,
    YV,
    X,
    Y,
    ridge_closed_form,
    ridge_jacobian,
    ridge_numpy_solver,
    ridge_objective,
    validation_loss,
)

LAM = 2.0
ETA = 1.0 / (L_MAX + LAM)  # gradient step of the fixed-point form
RTOL = 1e-13


def gradient_step(w, lam):
    return w - ETA * torch.func.grad(ridge_objective)(w, lam)


# The Neumann series for A converges with rate ρ(I - scale A); for A = ∇²f with penalties in
# [1.5, 3] the best scale is 2 / (λ_min + λ_max) (ρ ≈ 0.51, so 45 steps reach 1e-13), and for the
# fixed point A = I - ∂T = η ∇²f the same scale divided by η.
NEUMANN_SCALE = 2.0 / (L_MIN + L_MAX + 4.5)
SOLVER_OPTIONS = {
    "cg": {"rtol": RTOL},
    "normal_cg": {"rtol": RTOL},
    "gmres": {"rtol": RTOL},
    "dense": {},
    "neumann": {"steps": 45},
}


def decorated(form: str, solve: str, **extra):
    options = dict(SOLVER_OPTIONS[solve], **extra)
    if form == "root":
        if solve == "neumann":
            options["scale"] = NEUMANN_SCALE
        return custom_root(grad_optimality(ridge_objective), solve=solve, **options)(ridge_numpy_solver)
    if solve == "neumann":
        options["scale"] = NEUMANN_SCALE / ETA
    return custom_fixed_point(gradient_step, solve=solve, **options)(ridge_numpy_solver)


@pytest.mark.parametrize("form", ["root", "fixed_point"])
@pytest.mark.parametrize("solve", list(SOLVER_OPTIONS))
def test_ridge_derivative_closed_form_every_solver(form, solve):
    solver = decorated(form, solve)
    lam = torch.tensor(LAM, dtype=F64, requires_grad=True)
    w = solver(None, lam)
    torch.testing.assert_close(w.detach(), ridge_closed_form(torch.tensor(LAM, dtype=F64)), rtol=0, atol=1e-12)
    v = torch.linspace(-1.0, 2.0, D, dtype=F64)  # reverse mode: one backward gives vᵀ J
    (vJ,) = torch.autograd.grad(w, lam, v)
    torch.testing.assert_close(vJ, v @ ridge_jacobian(torch.tensor(LAM, dtype=F64)), rtol=0, atol=1e-10)
    # forward mode (jvp staticmethod, forward-mode AD of the optimality function)
    Jf = torch.func.jvp(lambda l: solver(None, l), (lam.detach(),), (torch.ones((), dtype=F64),))[1]
    torch.testing.assert_close(Jf, ridge_jacobian(torch.tensor(LAM, dtype=F64)), rtol=0, atol=1e-10)


@pytest.mark.parametrize(("form", "solve"), [
    ("root", "cg"), ("root", "neumann"), ("fixed_point", "gmres"), ("fixed_point", "normal_cg"), ("fixed_point", "dense"),
])
def test_ridge_jacrev_jacfwd_per_feature_penalties(form, solve):
    """Per-feature penalties: dw*/dλ = -(XᵀX + diag λ)⁻¹ diag(w*); inside the transforms the
    fixed-iteration solvers run."""
    # symmetric=True for the Neumann case: A is applied by VJPs in forward mode too (cheaper)
    solver = decorated(form, solve, **({"symmetric": True} if solve == "neumann" else {}))
    lam = torch.linspace(1.5, 3.0, D, dtype=F64)
    expected = ridge_jacobian(lam)
    Jr = torch.func.jacrev(lambda l: solver(None, l))(lam)
    Jf = torch.func.jacfwd(lambda l: solver(None, l))(lam)
    torch.testing.assert_close(Jr, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(Jf, expected, rtol=0, atol=1e-10)


def test_gradcheck_and_gradgradcheck():
    root = custom_root(grad_optimality(ridge_objective), solve="cg", rtol=RTOL)(ridge_numpy_solver)
    lam = torch.linspace(1.5, 3.0, D, dtype=F64).requires_grad_()
    assert torch.autograd.gradcheck(lambda l: root(None, l), (lam,))
    # second order: the backward's linear solve is itself differentiated (gradkit.linalg.cg unrolled; dense solve)
    for solve in ("cg", "dense"):
        fixed = custom_fixed_point(gradient_step, solve=solve, rtol=RTOL)(ridge_numpy_solver)
        lam = torch.tensor(LAM, dtype=F64, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda l: fixed(None, l), (lam,))


def test_hessian_of_validation_loss_by_transforms():
    """jacfwd(jacrev(.)) (torch.func.hessian) of the validation loss through the implicit layer
    equals the Hessian of the closed form, differentiated by autograd."""
    solver = custom_root(grad_optimality(ridge_objective), solve="cg", rtol=RTOL)(ridge_numpy_solver)
    lam = torch.linspace(1.5, 3.0, D, dtype=F64)
    H = torch.func.hessian(lambda l: validation_loss(solver(None, l)))(lam)
    H_ref = torch.autograd.functional.hessian(lambda l: validation_loss(ridge_closed_form(l)), lam)
    torch.testing.assert_close(H, H_ref, rtol=0, atol=1e-9)


def test_torch_func_grad_and_vmap_over_lambdas_equal_the_loop():
    solver = custom_root(grad_optimality(ridge_objective), solve="cg", rtol=RTOL)(ridge_numpy_solver)
    hypergrad = torch.func.grad(lambda l: validation_loss(solver(None, l)))
    lams = torch.tensor([0.3, 1.0, 2.0, 7.5], dtype=F64)
    batched = torch.vmap(hypergrad)(lams)
    loop = []
    for lam in lams:
        lam = lam.clone().requires_grad_()
        loop.append(torch.autograd.grad(validation_loss(solver(None, lam)), lam)[0])
    torch.testing.assert_close(batched, torch.stack(loop), rtol=0, atol=1e-12)
    # and both equal the closed form (chain rule through dw*/dλ)
    closed = torch.stack([
        (XV.T @ (XV @ ridge_closed_form(lam) - YV)) @ ridge_jacobian(lam) for lam in lams
    ])
    torch.testing.assert_close(batched, closed, rtol=0, atol=1e-10)
    # the solutions themselves, batched by the vmap rule (one NumPy solve per λ)
    W = torch.vmap(lambda l: solver(None, l))(lams)
    torch.testing.assert_close(W, torch.stack([ridge_closed_form(lam) for lam in lams]), rtol=0, atol=1e-12)


def test_ridge_option_and_callable_solver():
    lam = torch.tensor(LAM, dtype=F64, requires_grad=True)
    H = X.T @ X + LAM * torch.eye(D, dtype=F64)
    w_star = ridge_closed_form(lam.detach())
    # ridge r: the system solved is (∇²f + r I) -> dw/dλ = -(H + r I)⁻¹ w*
    for solve in ("cg", "dense"):
        solver = custom_root(grad_optimality(ridge_objective), solve=solve, ridge=0.5, rtol=RTOL)(ridge_numpy_solver)
        J = torch.autograd.functional.jacobian(lambda l: solver(None, l), lam)
        torch.testing.assert_close(J, -torch.linalg.solve(H + 0.5 * torch.eye(D, dtype=F64), w_star), rtol=0, atol=1e-10)
    # a callable solve(matvec, b) returning a SolveResult (here gradkit's MINRES)
    solver = custom_root(grad_optimality(ridge_objective), solve=lambda mv, b: minres(mv, b, rtol=RTOL))(ridge_numpy_solver)
    J = torch.autograd.functional.jacobian(lambda l: solver(None, l), lam)
    torch.testing.assert_close(J, ridge_jacobian(lam.detach()), rtol=0, atol=1e-10)


def test_tuple_and_dict_params_and_solution():
    """x = {"w": weights, "b": intercept}, params = (λ, {"shift": s}): differentiated against
    autograd through the closed form of the augmented least-squares problem."""

    def objective(x, lam, data):
        r = X @ x["w"] + x["b"] - (Y + data["shift"])
        return 0.5 * (r**2).sum() + 0.5 * lam * (x["w"] ** 2).sum()

    def closed(lam, data):
        Xa = torch.cat([X, torch.ones(X.shape[0], 1, dtype=F64)], dim=1)
        P = torch.diag(torch.cat([lam.expand(D), torch.zeros(1, dtype=F64)]))
        z = torch.linalg.solve(Xa.T @ Xa + P, Xa.T @ (Y + data["shift"]))
        return {"w": z[:D], "b": z[D]}

    @custom_root(grad_optimality(objective), solve="cg", rtol=RTOL)
    def solver(init, lam, data):
        return {k: v.detach() for k, v in closed(lam, data).items()}

    lam = torch.tensor(1.3, dtype=F64, requires_grad=True)
    shift = torch.linspace(-1, 1, X.shape[0], dtype=F64).requires_grad_()
    init = {"w": torch.zeros(D, dtype=F64), "b": torch.zeros((), dtype=F64)}

    def loss(x):
        return validation_loss(x["w"]) + 3.0 * x["b"] ** 2

    g = torch.autograd.grad(loss(solver(init, lam, {"shift": shift})), (lam, shift))
    g_ref = torch.autograd.grad(loss(closed(lam, {"shift": shift})), (lam, shift))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # the same through torch.func.grad over the tuple of params
    gf = torch.func.grad(lambda l, s: loss(solver(init, l, {"shift": s})), argnums=(0, 1))(lam.detach(), shift.detach())
    for a, b in zip(gf, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_model_parameters_as_the_solution():
    """The solution is a model's parameter dict (nn.Linear fitted by ridge on its weight)."""
    model = nn.Linear(D, 1).to(F64)

    def objective(params, lam):
        pred = functional_call(model, params, (X,)).squeeze(1)
        return 0.5 * ((pred - Y) ** 2).sum() + 0.5 * lam * (params["weight"] ** 2).sum()

    def closed(lam):
        Xa = torch.cat([X, torch.ones(X.shape[0], 1, dtype=F64)], dim=1)
        P = torch.diag(torch.cat([lam.expand(D), torch.zeros(1, dtype=F64)]))
        z = torch.linalg.solve(Xa.T @ Xa + P, Xa.T @ Y)
        return {"weight": z[:D].reshape(1, D), "bias": z[D:]}

    @custom_root(grad_optimality(objective), solve="cg", rtol=RTOL)
    def fit(init, lam):
        return closed(lam)

    init = {k: v.detach() for k, v in model.named_parameters()}
    lam = torch.tensor(0.8, dtype=F64, requires_grad=True)

    def val(params):
        return 0.5 * ((functional_call(model, params, (XV,)).squeeze(1) - YV) ** 2).sum()

    (g,) = torch.autograd.grad(val(fit(init, lam)), lam)
    (g_ref,) = torch.autograd.grad(val(closed(lam)), lam)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)


def test_keyword_arguments_and_aux():
    """Keyword arguments reach the solver only (an iterative solver's settings); aux is returned
    undifferentiated and stacked by vmap."""

    @custom_root(grad_optimality(ridge_objective), solve="cg", rtol=RTOL, has_aux=True)
    def gd(init, lam, *, steps, eta):
        w = init.clone()
        for _ in range(steps):
            w = w - eta * (X.T @ (X @ w - Y) + lam * w)
        return w, {"steps": steps, "grad_norm": torch.linalg.vector_norm(X.T @ (X @ w - Y) + lam * w)}

    lam = torch.tensor(LAM, dtype=F64, requires_grad=True)
    w, aux = gd(torch.zeros(D, dtype=F64), lam, steps=2000, eta=ETA)
    assert aux["steps"] == 2000 and not aux["grad_norm"].requires_grad
    assert float(aux["grad_norm"]) < 1e-10
    J = torch.stack([torch.autograd.grad(w[i], lam, retain_graph=True)[0] for i in range(D)])
    torch.testing.assert_close(J, ridge_jacobian(lam.detach()), rtol=0, atol=1e-10)
    lams = torch.tensor([1.0, 4.0], dtype=F64)
    W, norms = torch.vmap(lambda l: (lambda w, a: (w, a["grad_norm"]))(
        *gd(torch.zeros(D, dtype=F64), l, steps=2000, eta=1 / (L_MAX + 4))))(lams)
    assert norms.shape == (2,) and float(norms.max()) < 1e-10
    torch.testing.assert_close(W, torch.stack([ridge_closed_form(l) for l in lams]), rtol=0, atol=1e-10)


def test_keywords_the_optimality_function_takes_are_differentiated():
    """A keyword the optimality function also takes (jaxopt's convention) is passed to it and
    differentiated; the solver's own settings are not.  Checked against the closed-form
    Jacobian in reverse and forward mode, for a root and a fixed-point condition."""
    lam0 = torch.full((D,), LAM, dtype=F64)

    def F(w, *, lam, scale=1.0):  # keyword-only penalty; ``scale`` a non-tensor constant
        return scale * torch.func.grad(ridge_objective)(w, lam)

    @custom_root(F, solve="cg", rtol=RTOL)
    def solver(init, *, lam, scale, iterations):
        assert iterations == 3  # a solver-only keyword arrives untouched
        return ridge_numpy_solver(init, lam)

    def T(w, lam):  # a positional-or-keyword name is shared too
        return w - ETA * torch.func.grad(ridge_objective)(w, lam)

    fixed = custom_fixed_point(T, solve="gmres", rtol=RTOL)(lambda init, lam, iterations: ridge_numpy_solver(init, lam))
    expected = ridge_jacobian(lam0)
    for fn in (lambda l: solver(None, lam=l, scale=2.0, iterations=3), lambda l: fixed(None, lam=l, iterations=3)):
        torch.testing.assert_close(torch.func.jacrev(fn)(lam0), expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(torch.func.jacfwd(fn)(lam0), expected, rtol=0, atol=1e-10)
    lam = lam0.clone().requires_grad_()
    (g,) = torch.autograd.grad(validation_loss(solver(None, lam=lam, scale=2.0, iterations=3)), lam)
    (g_ref,) = torch.autograd.grad(validation_loss(ridge_closed_form(lam)), lam)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)

    def G(w, lam, **kwargs):  # **kwargs: every keyword is shared; tensors among them differentiated
        return torch.func.grad(ridge_objective)(w, lam * kwargs["factor"])

    scaled = custom_root(G, solve="cg", rtol=RTOL)(lambda init, lam, factor: ridge_numpy_solver(init, lam * factor))
    factor = torch.tensor(2.0, dtype=F64, requires_grad=True)
    w = scaled(None, torch.tensor(1.0, dtype=F64), factor=factor)
    (g,) = torch.autograd.grad(w.sum(), factor)
    torch.testing.assert_close(g, 1.0 * ridge_jacobian(torch.tensor(2.0, dtype=F64)).sum(), rtol=0, atol=1e-10)
    # a keyword the optimality function does not take is refused when it requires grad
    with pytest.raises(ValueError, match=r"keyword argument 'scale' is a tensor that requires grad.*does not take"):
        custom_root(lambda w, lam: F(w, lam=lam))(lambda init, lam, scale: ridge_numpy_solver(init, lam))(
            None, lam0, scale=torch.tensor(1.0, dtype=F64, requires_grad=True))


def test_agrees_with_unrolling_1000_gd_steps():
    """ℓ2-regularised logistic regression: the implicit hypergradient equals differentiating
    through 1000 unrolled GD steps, within the unrolling's own error (estimated by its change
    from 500 to 1000 steps), and unrolling's error shrinks towards it."""
    g = torch.Generator().manual_seed(3)
    n, d = 40, 4
    Xl = torch.randn(n, d, generator=g, dtype=F64) * torch.tensor([1.0, 0.5, 0.2, 0.1], dtype=F64)  # ill-conditioned
    yl = (torch.rand(n, generator=g, dtype=F64) < 0.5).to(F64) * 2 - 1
    Xv, yv = Xl[:15] + 0.1, yl[:15]

    def inner(w, lam):
        return torch.nn.functional.softplus(-yl * (Xl @ w)).mean() + 0.5 * lam * (w**2).sum()

    def inner_grad(w, lam):  # written out: the unrolled loop stays cheap
        return -(Xl.T @ (yl * torch.sigmoid(-yl * (Xl @ w)))) / n + lam * w

    def outer(w):
        return torch.nn.functional.softplus(-yv * (Xv @ w)).mean()

    lam0 = 0.003  # GD's hypergradient error: ~0.3 after 100 steps, ~1e-5 after 500, ~1e-10 after 1000
    eta = 1.0 / (float(torch.linalg.eigvalsh(Xl.T @ Xl)[-1]) / (4 * n) + lam0)

    @custom_root(grad_optimality(inner), solve="cg", rtol=RTOL)
    def newton(init, lam):
        w = init.clone()
        for _ in range(30):
            s = torch.sigmoid(Xl @ w) * torch.sigmoid(-(Xl @ w))
            H = Xl.T @ (s[:, None] * Xl) / n + lam * torch.eye(d, dtype=F64)
            w = w - torch.linalg.solve(H, inner_grad(w, lam))
        return w

    lam = torch.tensor(lam0, dtype=F64, requires_grad=True)
    (g_impl,) = torch.autograd.grad(outer(newton(torch.zeros(d, dtype=F64), lam)), lam)
    w, g_unroll = torch.zeros(d, dtype=F64), {}
    for t in range(1, 1001):
        w = w - eta * inner_grad(w, lam)
        if t in (100, 500, 1000):
            g_unroll[t] = torch.autograd.grad(outer(w), lam, retain_graph=True)[0]
    err = {t: abs(float(g_impl - g)) for t, g in g_unroll.items()}
    own_error = abs(float(g_unroll[1000] - g_unroll[500]))
    assert err[1000] <= own_error and err[1000] < 1e-8 * abs(float(g_impl))
    assert err[1000] < err[500] < err[100]


def test_solver_graph_is_detached():
    """A solver that uses autograd itself (GD with torch.autograd.grad under enable_grad) returns a
    tensor attached to its own graph; the decorated output is detached from it and carries only
    the implicit derivative."""

    @custom_root(grad_optimality(ridge_objective), solve="cg", rtol=RTOL)
    def autograd_gd(init, lam):
        w = init.clone().requires_grad_()
        with torch.enable_grad():
            for _ in range(150):
                (g,) = torch.autograd.grad(ridge_objective(w, lam), w)
                w = w - ETA * g
        assert w.grad_fn is not None
        return w

    lam = torch.tensor(LAM, dtype=F64, requires_grad=True)
    w = autograd_gd(torch.zeros(D, dtype=F64), lam)
    assert type(w.grad_fn).__name__.startswith("_ImplicitSolve")
    v = torch.ones(D, dtype=F64)
    (vJ,) = torch.autograd.grad(w, lam, v)
    torch.testing.assert_close(vJ, v @ ridge_jacobian(lam.detach()), rtol=0, atol=1e-10)



def test_jacobi_preconditioner_cuts_cg_iterations_and_keeps_the_derivative():
    """``M=`` with features of orthogonal, badly scaled columns: the Hessian is diagonal, so
    Jacobi-preconditioned CG is exact after one step (plain CG needs one per distinct eigenvalue);
    the derivative is the closed form, plain and under vmap (where fixed_cg runs)."""
    Q = torch.linalg.qr(X)[0]
    Xs = Q * torch.logspace(0, -2, D, dtype=F64)

    def objective(w, lam):
        return 0.5 * ((Xs @ w - Y) ** 2).sum() + 0.5 * (lam * w**2).sum()

    def solver(init, lam):
        return torch.linalg.solve(Xs.T @ Xs + torch.diag(lam.detach()), Xs.T @ Y)

    lam = torch.full((D,), 1e-3, dtype=F64)
    H = Xs.T @ Xs + torch.diag(lam)
    expected = -torch.linalg.solve(H, torch.diag(solver(None, lam)))
    diag = torch.diagonal(H)
    options = {"solve": "cg", "rtol": 1e-12, "maxiter": 1, "symmetric": True, "on_failure": "raise"}
    root = custom_root(grad_optimality(objective), M=lambda r: r / diag, **options)(solver)
    U = torch.randn(3, D, generator=torch.Generator().manual_seed(3), dtype=F64)  # not eigenvectors of H
    lam_ = lam.clone().requires_grad_()
    w = root(None, lam_)
    rows = [torch.autograd.grad(u @ w, lam_, retain_graph=True)[0] for u in U]
    torch.testing.assert_close(torch.stack(rows), U @ expected, rtol=1e-10, atol=1e-12)
    pullback = torch.func.vjp(lambda l: root(None, l), lam)[1]
    torch.testing.assert_close(torch.func.vmap(pullback)(U)[0], U @ expected, rtol=1e-10, atol=1e-12)
    plain = custom_root(grad_optimality(objective), **options)(solver)
    with pytest.raises(RuntimeError, match="did not converge"):
        (U[0] @ plain(None, lam.clone().requires_grad_())).backward()
