"""Bad input fails loudly: an inexact solver warns with its residual, a linear solve that misses
its tolerance warns/raises with the residual, CG on a non-symmetric system is refused, and
mismatched shapes/dtypes between the solver and the optimality function are named."""

from __future__ import annotations

import warnings

import pytest
import torch

from gradkit.implicit import custom_fixed_point, custom_root, grad_optimality, prox_grad_fixed_point, prox_lasso

from .problems import D, F64, L_MAX, X, Y, ridge_closed_form, ridge_numpy_solver, ridge_objective

OPT = grad_optimality(ridge_objective)


def gd(init, lam, steps):
    w = init.clone()
    for _ in range(steps):
        w = w - (X.T @ (X @ w - Y) + lam * w) / (L_MAX + float(lam))
    return w


def test_inexact_solver_warns_with_the_residual_or_raises():
    lam = torch.tensor(1.0, dtype=F64, requires_grad=True)
    init = torch.zeros(D, dtype=F64)
    with pytest.warns(RuntimeWarning, match=r"does not satisfy the optimality condition: \|\|F\(x\*, θ\)\|\| = [0-9.]+e[+-]\d+"):
        custom_root(OPT)(gd)(init, lam, steps=3)
    with pytest.raises(RuntimeError, match="does not satisfy the optimality condition"):
        custom_root(OPT, on_failure="raise")(gd)(init, lam, steps=3)
    # a converged solver passes silently; check_optimality=False turns the check off
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        custom_root(OPT)(gd)(init, lam, steps=3000)
        custom_root(OPT, check_optimality=False)(gd)(init, lam, steps=3)


def test_unconverged_linear_solve_warns_or_raises_with_residual():
    lam = torch.tensor(1.0, dtype=F64, requires_grad=True)
    w = custom_root(OPT, solve="cg", maxiter=1)(ridge_numpy_solver)(None, lam)
    with pytest.warns(RuntimeWarning, match=r"linear solve .* solve='cg' did not converge: residual norm [0-9.]+e"):
        torch.autograd.grad(w.sum(), lam)
    w = custom_root(OPT, solve="gmres", maxiter=2, on_failure="raise")(ridge_numpy_solver)(None, lam)
    with pytest.raises(RuntimeError, match="did not converge: residual norm"):
        torch.autograd.grad(w.sum(), lam)
    # under torch.func.grad (no vmap) the same checked solver runs
    solver = custom_root(OPT, solve="cg", maxiter=1)(ridge_numpy_solver)
    with pytest.warns(RuntimeWarning, match="did not converge: residual norm"):
        torch.func.grad(lambda l: solver(None, l).sum())(lam.detach())
    # a diverging Neumann series (scale too large) is caught when rtol is given
    w = custom_root(OPT, solve="neumann", steps=20, scale=1.0, rtol=1e-6)(ridge_numpy_solver)(None, lam)
    with pytest.warns(RuntimeWarning, match="neumann"):
        torch.autograd.grad(w.sum(), lam)


def test_cg_on_a_non_symmetric_system_is_refused():
    g = torch.Generator().manual_seed(0)
    Xs = torch.randn(30, 6, generator=g, dtype=F64)
    ys = Xs @ torch.tensor([1.0, 0, 0, -2, 0, 0], dtype=F64)
    eta = 1.0 / float(torch.linalg.eigvalsh(Xs.T @ Xs)[-1])
    fixed_point = prox_grad_fixed_point(lambda w: 0.5 * ((Xs @ w - ys) ** 2).sum(), prox_lasso, eta)

    def ista(init, lam):
        w = torch.zeros(6, dtype=F64)
        for _ in range(500):
            w = prox_lasso(w - eta * Xs.T @ (Xs @ w - ys), lam, eta)
        return w

    lam = torch.tensor(0.5, dtype=F64, requires_grad=True)
    w = custom_fixed_point(fixed_point, solve="cg")(ista)(None, lam)
    with pytest.raises(ValueError, match=r"solve='cg' needs a symmetric system.*not symmetric.*gmres"):
        torch.autograd.grad(w.sum(), lam)
    with pytest.raises(ValueError, match="symmetric=False"):
        custom_fixed_point(fixed_point, solve="cg", symmetric=False)
    # the same problem with gmres works
    w = custom_fixed_point(fixed_point, solve="gmres")(ista)(None, lam)
    torch.autograd.grad(w.sum(), lam)


def test_mismatched_shapes_and_dtypes_are_named():
    lam = torch.tensor(1.0, dtype=F64, requires_grad=True)
    # solver output of the wrong shape: the optimality function fails, and the error names x's shape
    with pytest.raises(ValueError, match=r"failed on the solver's output x = tensor\(4,\) float64"):
        custom_root(OPT)(lambda init, l: ridge_closed_form(l)[:4])(None, lam)
    # solver output in float32 while params are float64: both dtypes named
    with pytest.raises(ValueError, match=r"x = tensor\(5,\) float32 with params = \(tensor\(\) float64,\)"):
        custom_root(OPT)(lambda init, l: ridge_closed_form(l).float())(None, lam)
    with pytest.raises(ValueError, match=r"returned tensor\(5,\) float64 for the solver's output x = tensor\(5,\) float32"):
        custom_root(lambda w, l: OPT(w.double(), l))(lambda init, l: ridge_closed_form(l).float())(None, lam)
    # an optimality function returning fewer equations than unknowns
    with pytest.raises(ValueError, match=r"returned tensor\(\) float64 .* one value per unknown"):
        custom_root(lambda w, l: OPT(w, l).sum())(ridge_numpy_solver)(None, lam)
    # a fixed-point map returning another structure
    pair = r"\(tensor\(5,\) float64, tensor\(5,\) float64\)"
    with pytest.raises(ValueError, match=r"fixed_point_fn\(x, \*params\) returned " + pair):
        custom_fixed_point(lambda w, l: (w, w))(ridge_numpy_solver)(None, lam)
    # solver output unlike init
    with pytest.raises(ValueError, match=r"returned x = tensor\(5,\) float64 but init is tensor\(6,\) float64"):
        custom_root(OPT)(ridge_numpy_solver)(torch.zeros(6, dtype=F64), lam)
    with pytest.raises(TypeError, match="convert NumPy output"):
        custom_root(OPT)(lambda init, l: ridge_numpy_solver(init, l).numpy())(None, lam)


def test_bad_options_and_arguments():
    with pytest.raises(ValueError, match="solve must be one of"):
        custom_root(OPT, solve="lu")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['tol'\]"):
        custom_root(OPT, tol=1e-6)
    with pytest.raises(ValueError, match="maxiter must be an integer >= 1"):
        custom_root(OPT, maxiter=0)
    with pytest.raises(ValueError, match="on_failure must be one of"):
        custom_root(OPT, on_failure="panic")
    with pytest.raises(TypeError, match="optimality_fn must be callable"):
        custom_root(None)
    with pytest.raises(TypeError, match=r"M \(preconditioner\) must be a callable"):
        custom_root(OPT, M=torch.ones(3))
    # grad_optimality(f) takes f's keywords (lam here); a condition that does not take lam refuses it
    positional = lambda w, lam, /: OPT(w, lam)  # noqa: E731
    with pytest.raises(ValueError, match=r"keyword argument 'lam' is a tensor that requires grad"):
        custom_root(positional)(lambda init, *, lam: ridge_closed_form(lam))(
            None, lam=torch.tensor(1.0, dtype=F64, requires_grad=True))
    # a singular system with solve="dense" names the fix
    w = custom_root(lambda w, l: torch.zeros_like(w) * l, solve="dense", check_optimality=False)(ridge_numpy_solver)(
        None, torch.tensor(1.0, dtype=F64, requires_grad=True))
    with pytest.raises(ValueError, match="singular.*ridge="):
        w.sum().backward()


def test_prox_and_box_preconditions_on_numbers():
    """Negative penalties and an empty box are refused, naming the argument (they gave a growing
    |x|, inf/nan and zeros); tensors are not read (the operators stay usable under torch.func)."""
    from gradkit.implicit import projection_box, prox_elastic_net

    x = torch.tensor([1.0, -0.2, 3.0], dtype=F64)
    with pytest.raises(ValueError, match="prox_lasso: l1reg must be >= 0, got -0.5"):
        prox_lasso(x, -0.5, 2.0)
    with pytest.raises(ValueError, match="prox_elastic_net: l2reg must be >= 0, got -0.5"):
        prox_elastic_net(x, (0.5, -0.5), 2.0)
    with pytest.raises(ValueError, match="prox_elastic_net: l1reg must be >= 0"):
        prox_elastic_net(x, (-1.0, 0.5))
    with pytest.raises(ValueError, match=r"projection_box: the box is empty, lower=1.0 > upper=0.0"):
        projection_box(x, (1.0, 0.0))
    assert torch.equal(prox_lasso(x, 0.0), x) and torch.equal(projection_box(x, (0.0, 0.0)), torch.zeros(3, dtype=F64))


def test_structure_check_without_optimality_check_runs_once_per_signature():
    """check_optimality=False: F(x*, θ) is evaluated in the forward only on the first call with a
    given signature (structures, shapes, dtypes, constants); a new signature is checked again, so a
    wrong structure is still caught on its first call, and gradients are unchanged."""
    calls = []

    def counted(w, lam, scale=1.0):
        calls.append(w.shape)
        return OPT(w, lam) * scale

    solver = custom_root(counted, check_optimality=False)(lambda init, l, scale=1.0: ridge_closed_form(l))
    lam = torch.tensor(1.0, dtype=F64, requires_grad=True)
    for _ in range(3):
        w = solver(None, lam)
    assert len(calls) == 1  # forward only, no backward yet
    (g,) = torch.autograd.grad(w.sum(), lam)
    (g_checked,) = torch.autograd.grad(custom_root(OPT)(ridge_numpy_solver)(None, lam).sum(), lam)
    torch.testing.assert_close(g, g_checked, rtol=1e-10, atol=0)
    calls.clear()
    solver(None, lam, scale=2.0)  # another constant keyword: checked again
    solver(None, lam.float())  # another dtype: checked again
    solver(None, lam, scale=2)  # an equal constant of another type (int): checked again
    solver(None, lam, scale=2.0)  # seen before: not checked
    assert len(calls) == 3
    # with the optimality check on, F is evaluated on every call
    checked = custom_root(counted)(lambda init, l: ridge_closed_form(l))
    calls.clear()
    for _ in range(3):
        checked(None, lam.detach())
    assert len(calls) == 3
    # a wrong structure is refused on the first call of its signature although the check is off
    wrong = custom_root(lambda w, l: OPT(w, l).sum(), check_optimality=False)(ridge_numpy_solver)
    with pytest.raises(ValueError, match="one value per unknown"):
        wrong(None, lam)
