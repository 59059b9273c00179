"""Fast paths added for speed, held equal to their reference paths in float64.

* AdamWSN: the batched Subset-Norm kernel (``foreach=True``: small tensors of one subset layout packed
  into one batch, large ones one by one; ``fused=True``: the same, compiled) against the per-tensor
  loop (``foreach=False``) and against pytorch-optimizer's AdamWSN.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gradkit.optim as go
from gradkit.optim._base import PACK_NUMEL
from gradkit.optim.adamwsn import AdamWSN

DT = torch.float64

# two (6, 10) and two (10, 6): batched by layout (columns / rows); 1-D and 0-D: flat per coordinate;
# a (9, 40) weight gets Subspace-Momentum with rank=3; one tensor above PACK_NUMEL runs alone
SN_SHAPES = [(6, 10), (6, 10), (10, 6), (10, 6), (7,), (), (3, 4, 5), (9, 40), (PACK_NUMEL + 6,), (1,)]


def _params(shapes, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=DT).requires_grad_() for s in shapes]


def _train(opt, params, steps=24, seed=5, stop=(12, 4)):
    """``steps`` steps on a random gradient stream; parameter ``stop[1]`` gets no gradient after ``stop[0]``."""
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g, dtype=DT)
            p.grad = None if (t >= stop[0] and i == stop[1]) else grad
        opt.step()
    return [p.detach().clone() for p in params]


SN_CONFIGS = [
    dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, rank=3, update_proj_gap=5),  # heuristic + subspace
    dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.0, rank=None, subset_size=-1),  # pytorch-optimizer's
    dict(lr=0.1, betas=(0.0, 1.0), bias_correction=False, subset_size="cols", rank=None),  # AdaGrad, no momentum
    dict(lr=1e-2, betas=(0.9, 0.999), subset_size=4, rank=None, maximize=True),
]


@pytest.mark.parametrize("mode", ["foreach", "fused"])
@pytest.mark.parametrize("kw", SN_CONFIGS, ids=["subspace", "sqrt", "adagrad-cols", "chunks-maximize"])
def test_adamwsn_batched_path_equals_per_tensor_loop(kw, mode):
    ref_params, fast_params = _params(SN_SHAPES), _params(SN_SHAPES)
    ref_opt = AdamWSN(ref_params, foreach=False, **kw)
    fast_opt = AdamWSN(fast_params, **({"foreach": True} if mode == "foreach" else {"fused": True}), **kw)
    ref, fast = _train(ref_opt, ref_params), _train(fast_opt, fast_params)
    for x, y in zip(ref, fast):
        torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-13)
    for p, q in zip(ref_params, fast_params):
        assert ref_opt.state[p].keys() == fast_opt.state[q].keys()
        for name, value in ref_opt.state[p].items():
            if torch.is_tensor(value):
                assert value.shape == fast_opt.state[q][name].shape, name
                torch.testing.assert_close(fast_opt.state[q][name], value, rtol=1e-12, atol=1e-13)
            else:
                assert value == fast_opt.state[q][name], name


def test_adamwsn_batched_path_state_dict_round_trip():
    """Packed state (views into shared buffers) saves and resumes like per-tensor state."""
    kw = SN_CONFIGS[1]
    a, b = _params(SN_SHAPES), _params(SN_SHAPES)
    opt_a = AdamWSN(a, foreach=True, **kw)
    _train(opt_a, a, steps=6, stop=(99, 0))
    for p, q in zip(a, b):
        q.data.copy_(p.detach())
    opt_b = AdamWSN(b, foreach=True, **kw)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # load_state_dict does not copy
    x = _train(opt_a, a, steps=6, seed=9, stop=(99, 0))
    y = _train(opt_b, b, steps=6, seed=9, stop=(99, 0))
    for u, v in zip(x, y):
        assert torch.equal(u, v)


@pytest.mark.parametrize("mode", ["foreach", "fused"])
def test_adamwsn_batched_path_against_pytorch_optimizer(mode):
    """pytorch-optimizer's AdamWSN (``sn=True``: sqrt(d)-sized contiguous subsets, full momentum)."""
    po = pytest.importorskip("pytorch_optimizer")
    shapes = [(6, 10), (6, 10), (10, 6), (7,), (3, 4, 5), (PACK_NUMEL + 6,)]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    a, b = _params(shapes), _params(shapes)
    ours = _train(AdamWSN(a, subset_size=-1, rank=None, **{mode: True}, **kw), a, steps=30, stop=(99, 0))
    peer = po.AdamWSN([{"params": b, "sn": True}], subset_size=-1, foreach=False, **kw)
    theirs = _train(peer, b, steps=30, stop=(99, 0))
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# run_flat: elementwise kernels compiled once for 1-D inputs of any length, called without guards
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_run_flat_equals_the_eager_kernel_at_any_length(dtype):
    """Lengths below, at and above the trace length, odd ones (vector tails) and len(h) itself."""
    from gradkit.optim._base import _TRACE_NUMEL, run_flat
    from gradkit.optim.grams import Grams, grams_kernel

    opt = Grams([torch.zeros(2, dtype=dtype, requires_grad=True)], lr=0.1, weight_decay=0.1)
    h = torch.tensor(opt._hyper(opt.param_groups[0], 3), dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    for n in (2, 7, h.numel(), 33, _TRACE_NUMEL, 4099):
        args = [torch.randn(n, generator=gen, dtype=dtype) for _ in range(3)] + [torch.rand(n, generator=gen, dtype=dtype)]
        ref = [a.clone() for a in args]
        for maximize in (False, True):
            run_flat(grams_kernel, args, h, {"maximize": maximize})
            grams_kernel(*ref, h=h, maximize=maximize)
            for x, y in zip(args, ref):
                # compiled code may contract a*b+c into an FMA: equal up to rounding
                tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
                torch.testing.assert_close(x, y, **tol)


def test_run_flat_returns_a_reduction():
    """LionK-l2's first pass (a squared norm) through run_flat equals the eager sum."""
    from gradkit.optim._base import run_flat
    from gradkit.optim.lion import _l2_sq_norm

    gen = torch.Generator().manual_seed(1)
    h = torch.tensor([0.1, 0.9, 0.99, 0.0], dtype=DT)
    for n in (3, 1000, 5001):
        g, m = torch.randn(n, generator=gen, dtype=DT), torch.randn(n, generator=gen, dtype=DT)
        c = 0.9 * m + 0.1 * g
        torch.testing.assert_close(run_flat(_l2_sq_norm, [g, m], h, {"maximize": False}), (c * c).sum(),
                                   rtol=1e-13, atol=0)


def test_run_flat_per_row_test_at_any_batch_shape():
    """AdamP's per-row projection test through run_flat on (B, rows, cols) batches traced once
    (with B = 1 and rows = 1 traced apart) equals the eager test at shapes other than the traced
    one; half the gradients are made orthogonal to their rows so that both answers occur.  (A
    threshold written as delta / math.sqrt(size) was frozen at the traced size: this test failed.)"""
    from gradkit.optim._base import run_flat
    from gradkit.optim.adamp import _projected

    gen = torch.Generator().manual_seed(2)
    h = torch.tensor([1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.1, 1.0, 1.0, 1e-8], dtype=torch.float32)
    answers = set()
    for shape in [(1, 40, 50), (3, 6, 7), (4, 64, 128), (2, 1, 9), (1, 1, 5), (5, 3, 1000)]:
        for trial in range(6):
            p = torch.randn(shape, generator=gen)
            g = torch.randn(shape, generator=gen)
            keep = torch.rand(shape[0], 1, 1, generator=gen) < 0.5
            radial = p * ((g * p).sum(-1, keepdim=True) / (p * p).sum(-1, keepdim=True))
            g = torch.where(keep, g, g - radial * (1 - 1e-4 * trial))
            expected = _projected(p, g, h=h, delta_index=5)
            assert torch.equal(run_flat(_projected, [p, g], h, {"delta_index": 5}), expected), shape
            answers.update(expected.tolist())
    assert answers == {True, False}


def test_compiled_kernel_survives_the_recompile_limit():
    """A kernel needing more compiled variants than torch's recompile limit (here patched down to
    1) is compiled again with a raised limit instead of failing (fullgraph=True makes it an
    error), and computes what the eager kernel computes."""
    from gradkit.optim._base import compiled

    def kernel(p, g, *, h, scale):
        p.add_(g * h[0] * scale)

    with torch._dynamo.config.patch(recompile_limit=1):
        fn = compiled(kernel)
        for dtype, scale in [(torch.float64, 1), (torch.float32, 2), (torch.float64, 3)]:
            p, g, h = torch.ones(5, dtype=dtype), torch.arange(5, dtype=dtype), torch.tensor([0.5], dtype=dtype)
            fn(p, g, h=h, scale=scale)
            torch.testing.assert_close(p, 1 + 0.5 * scale * torch.arange(5, dtype=dtype))


@pytest.mark.parametrize("name", ["AdamP", "SGDP"])
def test_projection_decided_on_the_host_equals_reference(name):
    """fused=True decides the projection in a first pass and runs the plain step when nothing is
    projected: equal to the reference when every, no, or some matrices of one shape are
    scale-invariant (gradients orthogonal to the weights, row by row)."""
    from gradkit.optim.adamp import SGDP, AdamP

    make = {"AdamP": lambda ps, **kw: AdamP(ps, lr=1e-2, weight_decay=0.1, nesterov=True, **kw),
            "SGDP": lambda ps, **kw: SGDP(ps, lr=1e-2, momentum=0.9, weight_decay=0.1, **kw)}[name]
    for invariant in ([True, True], [False, False], [True, False]):
        runs = []
        for kw in ({"foreach": False}, {"fused": True}):
            g = torch.Generator().manual_seed(0)
            params = [torch.randn(6, 40, generator=g, dtype=DT, requires_grad=True) for _ in invariant]
            params.append(torch.randn(300, 64, generator=g, dtype=DT, requires_grad=True))  # large, alone
            params.append(torch.randn(7, generator=g, dtype=DT, requires_grad=True))  # never projected
            opt = make(params, **kw)
            for _ in range(6):
                for p, inv in zip(params, [*invariant, True, False]):
                    grad = torch.randn(p.shape, generator=g, dtype=DT)
                    if inv:  # remove each row's component along the weight: cos(g, p) = 0
                        rows, gr = p.detach().reshape(p.shape[0], -1), grad.reshape(p.shape[0], -1)
                        gr -= rows * (gr * rows).sum(1, keepdim=True) / (rows * rows).sum(1, keepdim=True)
                    p.grad = grad
                opt.step()
            runs.append([p.detach() for p in params])
        for x, y in zip(*runs):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)


def test_pack_load_places_each_member_at_its_views_in_aligned_buffers():
    """Packed small tensors are copied in by one ``torch.cat`` per group of equal trailing shape
    (0-dim members one by one): every member lands at its own views, and parameter, gradient and
    state buffers place each member at the same offset (the flat kernels pair them elementwise)."""
    from gradkit.optim._base import _Pack

    g = torch.Generator().manual_seed(0)
    shapes = [(3,), (2, 4), (), (5,), (4, 3), (1, 4), (2, 2, 2), (), (3, 2, 2), (6,)]
    members = [torch.randn(s, generator=g, dtype=DT) for s in shapes]
    members[4] = members[4].t()  # a non-contiguous (3, 4) member, grouped with (2, 4) and (1, 4)
    grads = [torch.randn(m.shape, generator=g, dtype=DT) for m in members]
    pack = _Pack(members, ("a", "b"))
    pack.load(0, members)
    pack.load(1, grads)
    for k, source in ((0, members), (1, grads)):
        for view, tensor in zip(pack.views[k], source, strict=True):
            assert view.shape == tensor.shape and torch.equal(view, tensor)
    for k in range(1, 4):
        assert [v.storage_offset() for v in pack.views[k]] == [v.storage_offset() for v in pack.views[0]]
    # vectors, (·, 4) matrices and (·, 2, 2) tensors: three concatenations, and the two 0-dim members
    assert len(pack._cats) == 3 and len(pack._rest) == 2


def _dot(a, b, *, h):
    return (a * b).sum()


def test_run_flat_on_rank_four_inputs_falls_back_to_torch_compile():
    """The guard-free path traces with example tensors of ~1000 entries per dimension; rank > 3
    would make them tens of gigabytes, so such inputs take torch.compile instead (same result)."""
    from gradkit.optim._base import _graph_compiled, run_flat

    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(2, 3, 4, 5, generator=g, dtype=DT) for _ in range(2))
    # refused before any example tensor is made (rank 4 would need ~3e9 entries per input)
    assert _graph_compiled(_dot, (), (DT, DT), DT, 1, a.device, (False,) * 4) is None
    torch.testing.assert_close(run_flat(_dot, [a, b], torch.zeros(1, dtype=DT), {}), (a * b).sum(),
                               rtol=1e-13, atol=0)


@pytest.mark.parametrize("make", [lambda ps, **k: go.Lion(ps, **k), lambda ps, **k: AdamWSN(ps, rank=None, **k)],
                         ids=["Lion", "AdamWSN"])
def test_scratch_bytes_are_the_packed_parameter_and_gradient_copies(make):
    """``scratch_bytes``: the flat parameter and gradient buffers of the packed small tensors (8
    bytes per packed float32 parameter), nothing for large tensors or on the reference path."""
    ps = [torch.zeros(s, requires_grad=True) for s in [(8, 8)] * 5 + [(PACK_NUMEL + 1,)]]
    packed = 5 * 64
    for kw, expected in (({}, 8 * packed), ({"fused": True}, 8 * packed), ({"foreach": False}, 0)):
        opt = make(ps, **kw)
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        assert opt.scratch_bytes() == expected
