"""torch.optim conformance and path equality, shared by every optimizer in the registry."""

from __future__ import annotations

import copy
import io
import math
import pickle
import re

import numpy as np
import pytest
import torch

import gradkit.optim as go
from gradkit.optim import SparseGradientError
from gradkit.optim._base import PACK_NUMEL

from .registry import REGISTRY, Entry

DT = torch.float64
SHAPES = [(3, 4), (5,), (), (2, 3, 2)]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def make_params(shapes=SHAPES, dtype=DT, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(params, gen, skip=()):
    for i, p in enumerate(params):
        if i in skip:
            p.grad = None
        else:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)


def train(entry: Entry, params, steps, seed=1, opt=None, skip_after=None, **kw):
    """``steps`` steps on a reproducible random gradient stream; ``skip_after=(k, i)`` drops param i's grad from step k."""
    opt = opt or entry.make(params, **kw)
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        skip = {skip_after[1]} if skip_after and t >= skip_after[0] else set()
        set_grads(params, gen, skip)
        opt.step()
    return opt


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for n in a[k]:
            x, y = a[k][n], b[k][n]
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y), n
            else:
                assert x == y, n


params_entries = pytest.mark.parametrize("entry", REGISTRY, ids=repr)


# ----------------------------------------------------------------------------------------------
PAPER_DEFAULTS = {  # issue 3, the papers and their reference code, as the docstrings cite them
    go.Lion: dict(lr=1e-4, betas=(0.9, 0.99)),
    go.AdamP: dict(delta=0.1, wd_ratio=0.1, nesterov=False),
    go.SGDP: dict(delta=0.1, wd_ratio=0.1, nesterov=False),
    go.AdEMAMix: dict(betas=(0.9, 0.999, 0.9999), alpha=2.0),
    go.INNAprop: dict(alpha=0.1, beta=0.9, sigma=0.999),
    go.AdaBound: dict(final_lr=0.1, gamma=1e-3),
    go.AMSBound: dict(final_lr=0.1, gamma=1e-3),
    go.AMSGrad: dict(bias_correction=False),
    go.MicroAdam: dict(window=10, density=0.01, bits=4),
    go.FRUGAL: dict(density=0.25, update_gap=200, projector="blocks", complement="sign", block_order="random"),
    go.DoG: dict(lr=1.0, reps_rel=1e-6),
    go.LDoG: dict(lr=1.0, reps_rel=1e-6),
}


@pytest.mark.parametrize("cls", list(PAPER_DEFAULTS), ids=lambda c: c.__name__)
def test_paper_defaults(cls):
    opt = cls(make_params(), **({"lr": 0.1} if cls is go.SGDP else {}))  # SGDP has no default lr, as SGD
    assert {k: opt.defaults[k] for k in PAPER_DEFAULTS[cls]} == PAPER_DEFAULTS[cls]


@params_entries
def test_defaults_and_per_group_hyperparameters(entry):
    params = make_params()
    opt = entry.make(params)
    for k, v in entry.kwargs.items():
        if k in opt.defaults and not callable(v):
            assert opt.defaults[k] == v
    # a second group with its own lr behaves as a single-group optimizer with that lr
    a, b = make_params(), make_params()
    opt2 = entry.make([{"params": a[:2]}, {"params": a[2:], "lr": entry.kwargs["lr"] * 0.5}])
    assert opt2.param_groups[1]["lr"] == entry.kwargs["lr"] * 0.5
    train(entry, a, 6, opt=opt2)
    ref_b = entry.make(b[2:], lr=entry.kwargs["lr"] * 0.5)
    ref_a = entry.make(b[:2])
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        set_grads(b, gen)
        ref_a.step()
        ref_b.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@params_entries
@pytest.mark.parametrize("mode", ["reference", "foreach"])
def test_state_dict_round_trip_and_resume(entry, mode):
    kw = {"foreach": mode == "foreach"}
    a = make_params()
    opt = train(entry, a, 5, skip_after=(3, 1), **kw)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in a]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    b = [p.clone().requires_grad_() for p in ckpt["params"]]
    opt_b = entry.make(b, **kw)
    opt_b.load_state_dict(ckpt["opt"])
    assert_state_equal(opt.state_dict()["state"], opt_b.state_dict()["state"])
    assert opt.state_dict()["param_groups"] == opt_b.state_dict()["param_groups"]
    # resumed training equals uninterrupted training, bit for bit
    train(entry, a, 7, seed=5, opt=opt)
    train(entry, b, 7, seed=5, opt=opt_b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert_state_equal(opt.state_dict()["state"], opt_b.state_dict()["state"])


@params_entries
def test_closure(entry):
    params = make_params()
    opt = entry.make(params)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in params]
    loss = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss)
    assert any(not torch.equal(x, p) for x, p in zip(before, params))


@params_entries
def test_maximize_equals_negated_gradient(entry):
    a, b = make_params(), make_params()
    opt_a, opt_b = entry.make(a, maximize=True), entry.make(b)
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        set_grads(a, gen)
        for p, q in zip(a, b):
            q.grad = -p.grad
        grads = [p.grad.clone() for p in a]
        opt_a.step()
        opt_b.step()
        for p, g in zip(a, grads):
            assert torch.equal(p.grad, g)  # the gradient is not modified in place
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-15)


@params_entries
def test_tensor_learning_rate(entry):
    a, b = make_params(), make_params()
    train(entry, a, 6, lr=torch.tensor(entry.kwargs["lr"], dtype=torch.float64))
    train(entry, b, 6)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # numpy scalars are real numbers too (np.float32 is no Python float: it was refused)
    c, d = make_params(), make_params()
    lr = np.float32(entry.kwargs["lr"])
    train(entry, c, 3, lr=lr)
    train(entry, d, 3, lr=float(lr))
    for x, y in zip(c, d):
        assert torch.equal(x, y)


@params_entries
def test_lr_scheduler(entry):
    a, b = make_params(), make_params()
    opt_a = entry.make(a)
    sched = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    opt_b = entry.make(b)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in range(6):
        set_grads(a, gen_a)
        opt_a.step()
        sched.step()
        set_grads(b, gen_b)
        opt_b.step()
        for group in opt_b.param_groups:
            group["lr"] = entry.kwargs["lr"] * 0.5 ** ((t + 1) // 2)
        assert opt_a.param_groups[0]["lr"] == pytest.approx(opt_b.param_groups[0]["lr"])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-15)


@params_entries
def test_parameters_without_gradient_get_no_state(entry):
    params = make_params()
    opt = entry.make(params)
    frozen = params[1].detach().clone()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        set_grads(params, gen, skip={1})
        opt.step()
    assert params[1] not in opt.state or len(opt.state[params[1]]) == 0
    assert torch.equal(params[1], frozen)
    assert len(opt.state_dict()["state"]) == len(params) - 1


@params_entries
@pytest.mark.parametrize("mode", ["reference", "foreach", "fused"])
def test_parameters_without_elements_and_groups_without_gradients(entry, mode):
    """Zero-element parameters (e.g. ``nn.Linear(0, 3).weight``, some of one shape, so that the
    fast paths would batch them) are left out like parameters without gradients, and a group in
    which no parameter has a gradient is skipped; the other parameters train as without them."""
    if mode != "reference" and entry.extra.get("single_path"):
        pytest.skip("one path")
    kw = {"foreach": False} if mode == "reference" else {"fused": True} if mode == "fused" else {}
    params, alone = make_params(), make_params()
    empties = [torch.zeros(s, dtype=DT, requires_grad=True) for s in [(0, 3), (3, 0), (0,), (0, 3), (2, 0, 4)]]
    idle = make_params(seed=3)  # never get a gradient
    opt = entry.make([{"params": params + empties}, {"params": idle}], **kw)
    opt_alone = entry.make(alone, **kw)
    gen, gen_alone = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(3):
        set_grads(params, gen)
        set_grads(alone, gen_alone)
        for e in empties:
            e.grad = torch.zeros_like(e)
        opt.step()
        opt_alone.step()
    for x, y in zip(params, alone):
        assert torch.equal(x, y)
    assert all(len(opt.state.get(p, {})) == 0 for p in empties + idle)
    assert len(opt.state_dict()["state"]) == len(params)


@params_entries
def test_deepcopy_and_pickle_continue_like_the_original(entry):
    """``copy.deepcopy`` and a pickle round trip of (parameters, optimizer) mid-run carry every
    constructor option (torch.optim's ``__getstate__`` keeps only defaults, state and groups)."""
    params = make_params()
    opt = train(entry, params, 3)
    copies = [copy.deepcopy((params, opt)), pickle.loads(pickle.dumps((params, opt)))]
    train(entry, params, 3, seed=2, opt=opt)
    for ps, o in copies:
        train(entry, ps, 3, seed=2, opt=o)
        for x, y in zip(params, ps):
            assert torch.equal(x, y)


@params_entries
def test_group_with_zero_lr_is_frozen(entry):
    params = make_params()
    opt = entry.make([{"params": params[:2], "lr": 0.0}, {"params": params[2:]}])
    before = [p.detach().clone() for p in params]
    train(entry, params, 5, opt=opt)
    for x, y in zip(before[:2], params[:2]):
        assert torch.equal(x, y)
    assert any(not torch.equal(x, y) for x, y in zip(before[2:], params[2:]))


@params_entries
def test_sparse_gradient_raises(entry):
    emb = torch.nn.Embedding(5, 3, sparse=True).double()
    opt = entry.make(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(SparseGradientError, match="sparse"):
        opt.step()
    with pytest.raises(RuntimeError):  # torch.optim raises RuntimeError: stay catchable as such
        opt.step()


@params_entries
def test_complex_parameters(entry):
    """A complex parameter is updated as the pair of reals (view_as_real), or refused clearly."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, generator=g, dtype=torch.complex128).requires_grad_()
    if not entry.complex_ok:
        with pytest.raises(TypeError, match="complex"):
            entry.make([z])
        return
    r = torch.view_as_real(z.detach()).clone().requires_grad_()
    opt_z, opt_r = entry.make([z]), entry.make([r])
    for _ in range(6):
        gz = torch.randn(4, 3, generator=g, dtype=torch.complex128)
        z.grad, r.grad = gz, torch.view_as_real(gz).clone()
        opt_z.step()
        opt_r.step()
    assert opt_z.state[z]["step"] == 6
    tensors = [v for v in opt_z.state[z].values() if torch.is_tensor(v)]
    assert all(t.dtype == torch.complex128 for t in tensors)
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-12, atol=1e-14)


@params_entries
def test_bfloat16_parameters(entry):
    """bf16 parameters: state in bf16 (documented; compressed state declares its dtypes in
    ``extra["state_dtypes"]``), arithmetic in float32, close to a float32 run."""
    a = make_params(dtype=torch.bfloat16)
    b = [p.detach().float().requires_grad_() for p in a]
    opt = train(entry, a, 8)
    train(entry, b, 8)
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                assert v.dtype in entry.extra.get("state_dtypes", {torch.bfloat16})
    for x, y in zip(a, b):
        assert x.dtype == torch.bfloat16 and torch.isfinite(x).all()
        torch.testing.assert_close(x.float(), y, rtol=0.05, atol=0.05)


@params_entries
def test_invalid_hyperparameters(entry):
    params = make_params()
    for bad, name in entry.invalid:
        with pytest.raises(ValueError, match="invalid " + re.escape(name) + "=.*expected"):
            entry.make(params, **bad)
        # also in a parameter group added later (for per-group hyperparameters)
        opt = entry.make(params[:1])
        if set(bad) <= set(opt.defaults):
            with pytest.raises(ValueError, match="invalid"):
                opt.add_param_group({"params": params[1:], **bad})
    with pytest.raises(ValueError, match="exclusive"):
        entry.make(params, foreach=True, fused=True)
    # an infinite lr, eps or weight decay is refused ("[0, inf)" means what it says)
    for name in ("lr", "eps", "weight_decay"):
        if name in entry.make(params[:1]).defaults:
            with pytest.raises(ValueError, match=f"invalid {name}=inf; expected .*inf\\)"):
                entry.make(params, **{name: math.inf})


@params_entries
def test_state_memory(entry):
    params = make_params(shapes=[(64, 8), (33,)], dtype=torch.float32)
    opt = train(entry, params, 2, foreach=True)
    n = sum(p.numel() for p in params)
    # parameter-shaped state, unless the entry gives its closed-form size (compressed state)
    expected = entry.extra["state_bytes"](params) if "state_bytes" in entry.extra else 4 * n * len(opt.state_names)
    assert opt.state_bytes() == expected


# ----------------------------------------------------------------------------------------------
# fast paths equal the reference path (float64, >= 20 steps, 0-dim parameter, large tensor,
# a parameter that stops receiving gradients halfway)
# ----------------------------------------------------------------------------------------------
PATH_SHAPES = [(3, 4), (), (3, 4), (PACK_NUMEL + 5,), (7,), (2, 3, 2), (1,)]  # two (3, 4): batched kernels


def _paths(entry, mode, steps=24, dtype=DT):
    params = make_params(shapes=PATH_SHAPES, dtype=dtype)
    kw = {"foreach": False} if mode == "reference" else ({"foreach": True} if mode == "foreach" else {"fused": True})
    # a second group so that packing across groups is exercised too
    opt = entry.make([{"params": params[:5]}, {"params": params[5:], "lr": entry.kwargs["lr"] * 0.3}], **kw)
    train(entry, params, steps, opt=opt, skip_after=(steps // 2, 2))
    return params, opt


multi_path_entries = pytest.mark.parametrize("entry", [e for e in REGISTRY if not e.extra.get("single_path")], ids=repr)


@multi_path_entries
def test_foreach_path_equals_reference(entry):
    ref, opt_ref = _paths(entry, "reference")
    fast, opt_fast = _paths(entry, "foreach")
    for x, y in zip(ref, fast):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-14)
    for p, q in zip(ref, fast):
        for n in opt_ref.state_names:
            torch.testing.assert_close(opt_ref.state[p][n], opt_fast.state[q][n], rtol=1e-13, atol=1e-14)


@multi_path_entries
def test_fused_path_equals_reference(entry):
    ref, _ = _paths(entry, "reference")
    fast, _ = _paths(entry, "fused")
    for x, y in zip(ref, fast):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)


@pytest.mark.slow
@multi_path_entries
def test_fused_path_equals_reference_in_float32(entry):
    """The float32 kernels are compiled separately from the float64 ones above: the same check at
    float32 accuracy.  A sign-based update may flip where its argument rounds across 0, so up to
    0.1 % of the entries may differ by more than the tolerance."""
    ref, _ = _paths(entry, "reference", steps=8, dtype=torch.float32)
    fast, _ = _paths(entry, "fused", steps=8, dtype=torch.float32)
    for x, y in zip(ref, fast):
        off = ((x - y).abs() > 1e-5 * (1 + x.abs())).float().mean()
        assert float(off) <= 1e-3, (float(off), float((x - y).abs().max()))


# ----------------------------------------------------------------------------------------------
# convergence with real step budgets
# ----------------------------------------------------------------------------------------------
def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.rosenbrock], ids=repr)
def test_rosenbrock(entry):
    kw, steps, tol = entry.rosenbrock
    x = torch.tensor([-1.5, 2.0], dtype=DT, requires_grad=True)
    opt = entry.cls([x], **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        rosenbrock(x).backward()
        opt.step()
        sched.step()
    assert rosenbrock(x).item() < tol, x


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.quadratic], ids=repr)
def test_ill_conditioned_quadratic(entry):
    kw, steps, factor = entry.quadratic
    d = torch.logspace(0, 2, 20, dtype=DT)  # condition number 100
    x = torch.ones(20, dtype=DT, requires_grad=True)
    f0 = 0.5 * (d * x.detach() ** 2).sum().item()
    opt = entry.cls([x], **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (d * x**2).sum()).backward()
        opt.step()
        sched.step()
    assert 0.5 * (d * x.detach() ** 2).sum().item() < factor * f0


@params_entries
def test_invalid_group_leaves_optimizer_unchanged(entry):
    params = make_params()
    opt = entry.make(params[:1])
    bad, _ = entry.invalid[0]
    with pytest.raises(ValueError):
        opt.add_param_group({"params": params[1:], **bad})
    assert len(opt.param_groups) == 1


@params_entries
def test_packed_state_survives_membership_changes(entry):
    """foreach path: state lives in shared buffers; params joining/leaving keep correct, independent state."""
    a, b = make_params(), make_params()
    opt_a, opt_b = entry.make(a, foreach=True), entry.make(b, foreach=False)
    gen_a, gen_b = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for t in range(12):
        skip = {t % 3} if t % 4 else set()
        set_grads(a, gen_a, skip)
        set_grads(b, gen_b, skip)
        opt_a.step()
        opt_b.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-14)
    assert_state_close = [torch.testing.assert_close(opt_a.state[x][n], opt_b.state[y][n], rtol=1e-13, atol=1e-14)
                          for x, y in zip(a, b) for n in opt_a.state_names]
    assert len(assert_state_close) == len(a) * len(opt_a.state_names)
