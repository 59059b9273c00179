"""Paper identities, defining properties and peer comparisons of the memory-efficient optimizers.

MicroAdam (Modoranu et al. 2024), FRUGAL (Zmushko et al. 2024) and AdamWSN (Nguyen and Nguyen 2024).
Each test either writes the paper's update out in plain float64 tensor arithmetic, runs an independent
implementation (torch.optim, pytorch-optimizer) on the same gradient stream, or checks a property the
method must have (error-feedback bookkeeping, state reset, resumability, memory).
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from gradkit.optim.adamwsn import AdamWSN, subset_layout
from gradkit.optim.frugal import FRUGAL, block_selection
from gradkit.optim.microadam import TOPK_BLOCK, MicroAdam, dequantize_4bit, quantize_4bit

DT = torch.float64


def grads(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=DT) for s in shapes] for _ in range(steps)]


def params(shapes, seed=11):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=DT).requires_grad_() for s in shapes]


def run(opt, ps, stream):
    for gs in stream:
        for p, g in zip(ps, gs):
            p.grad = g.clone()  # peers may modify gradients in place
        opt.step()
    return [p.detach().clone() for p in ps]


def close(a, b, rtol):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * max(1.0, y.abs().max().item()))


# ==============================================================================================
# MicroAdam
# ==============================================================================================
MICRO_SHAPES = [(40, 30), (7,), ()]
LONG = [(TOPK_BLOCK + 100,)]  # spans two Top-k blocks


@pytest.mark.parametrize("bits, wd, shapes", [(None, 0.0, MICRO_SHAPES), (4, 0.1, MICRO_SHAPES), (None, 0.1, LONG)])
def test_microadam_full_density_is_adamw(bits, wd, shapes):
    """k = d, window >= t, values in float64: the rebuilt moments are Adam's (to float64 rounding).

    With every coordinate sent the error is exactly zero, so 4-bit quantisation of it changes nothing.
    Not bit-exact: MicroAdam sums the unrolled recursion instead of running it.
    """
    stream = grads(shapes, 20)
    a, b = params(shapes), params(shapes)
    ours = run(MicroAdam(a, lr=1e-2, betas=(0.8, 0.95), weight_decay=wd, density=1.0, bits=bits, window=20,
                         value_dtype=None), a, stream)
    ref_cls = torch.optim.AdamW if wd else torch.optim.Adam
    ref = run(ref_cls(b, lr=1e-2, betas=(0.8, 0.95), weight_decay=wd), b, stream)
    close(ours, ref, rtol=1e-12)


def test_microadam_moments_are_window_sums():
    """Window w < t: m_t = (1-b1)/(1-b1^t) sum_{i<w} b1^i g_{t-i} (and v with g^2), Algorithm 2."""
    b1, b2, eps, lr, w, T = 0.7, 0.9, 1e-8, 0.05, 4, 12
    stream = grads([(6, 5)], T)
    (p,) = params([(6, 5)])
    x = p.detach().clone()
    opt = MicroAdam([p], lr=lr, betas=(b1, b2), eps=eps, density=1.0, bits=None, window=w, value_dtype=None)
    for t in range(1, T + 1):
        p.grad = stream[t - 1][0].clone()
        opt.step()
        recent = [stream[t - 1 - i][0] for i in range(min(t, w))]
        m = (1 - b1) / (1 - b1**t) * sum(b1**i * g for i, g in enumerate(recent))
        v = (1 - b2) / (1 - b2**t) * sum(b2**i * g * g for i, g in enumerate(recent))
        x = x - lr * m / (v.sqrt() + eps)
        torch.testing.assert_close(p.detach(), x, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("eps", [1e-8, 0.0])
@pytest.mark.parametrize("mode", [dict(foreach=False), dict(fused=True)])
def test_microadam_sparse_window_step(eps, mode):
    """Density < 1: the moments are the window sums of the sent (sparse) gradients, so a step moves
    only the coordinates in the window; every coordinate takes the decoupled decay.  With eps = 0
    the others stay finite (their m and v are both 0)."""
    b1, b2, lr, wd, w, T = 0.8, 0.9, 0.05, 0.1, 3, 8
    shapes = [(20, 30), (20, 30), (7,)]
    stream = grads(shapes, T, seed=4)
    ps = params(shapes, seed=5)
    opt = MicroAdam(ps, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, density=0.05, bits=None, window=w,
                    value_dtype=None, **mode)
    for t in range(1, T + 1):
        before = [p.detach().clone() for p in ps]
        for p, g in zip(ps, stream[t - 1]):
            p.grad = g.clone()
        opt.step()
        for p, x in zip(ps, before):
            st, d = opt.state[p], p.numel()
            n = min(t, w)
            offsets = opt._offsets(d, 0.05, p.device)
            m, v = torch.zeros(d, dtype=x.dtype), torch.zeros(d, dtype=x.dtype)
            for r in range(n):  # window row r holds step s = t - age
                age = (t - 1 - r) % w
                idx, val = st["indices"][r].long() + offsets, st["values"][r]
                m.index_add_(0, idx, (1 - b1) * b1**age / (1 - b1**t) * val)
                v.index_add_(0, idx, (1 - b2) * b2**age / (1 - b2**t) * val * val)
            moved = v > 0
            expected = x.reshape(-1) * (1 - lr * wd)
            expected[moved] -= lr * m[moved] / (v[moved].sqrt() + eps)
            torch.testing.assert_close(p.detach().reshape(-1), expected, rtol=1e-13, atol=1e-15)
            assert 0 < int(moved.sum()) <= n * offsets.numel() < d


@pytest.mark.parametrize("value_dtype", [None, torch.bfloat16])
def test_microadam_error_feedback_invariant(value_dtype):
    """sent + new error = gradient + old error, up to the 4-bit quantisation bound u_b/2 per bucket;
    the sent entries are the Top-k of |g + error| in every block."""
    shape, bucket, density = (TOPK_BLOCK + 700,), 64, 0.02
    (p,) = params([shape])
    opt = MicroAdam([p], lr=1e-3, density=density, quant_bucket_size=bucket, value_dtype=value_dtype, window=3)
    total_g, total_sent, total_bound = torch.zeros(shape, dtype=DT), torch.zeros(shape, dtype=DT), torch.zeros(shape, dtype=DT)
    for (g,) in grads([shape], 6, seed=3):
        old = opt.error_feedback(p).clone() if opt.state[p] else torch.zeros(shape, dtype=DT)
        a = g + old
        p.grad = g.clone()
        opt.step()
        sent, new = opt.window_gradients(p)[0], opt.error_feedback(p)
        scales = opt.state[p]["scales"]
        half_u = ((scales[:, 1] - scales[:, 0]) / 30).repeat_interleave(bucket)[: shape[0]]
        assert ((sent + new - a).abs() <= half_u + 1e-12).all()
        # Top-k per block: k = ceil(density * block) entries, none smaller than an unsent one
        for lo in range(0, shape[0], TOPK_BLOCK):
            blk = slice(lo, min(lo + TOPK_BLOCK, shape[0]))
            on = sent[blk] != 0
            assert on.sum() == math.ceil(density * (blk.stop - blk.start))
            assert a[blk][on].abs().min() >= a[blk][~on].abs().max()
        total_g += g
        total_sent += sent
        total_bound += half_u
    # accumulated: everything sent plus what is still owed equals the accumulated gradient
    assert ((total_sent + opt.error_feedback(p) - total_g).abs() <= total_bound + 1e-10).all()


def test_microadam_quantiser_round_trip_bound():
    x = torch.randn(1001, generator=torch.Generator().manual_seed(0), dtype=DT) * torch.linspace(0.01, 10, 1001, dtype=DT)
    codes, scales = quantize_4bit(x, 100)
    assert codes.dtype == torch.uint8 and codes.numel() == 501 and scales.shape == (11, 2)
    half_u = ((scales[:, 1] - scales[:, 0]) / 30).repeat_interleave(100)[:1001]
    err = (dequantize_4bit(codes, scales, 1001, 100) - x).abs()
    assert (err <= half_u + 1e-15).all() and err.max() > 0.5 * half_u.max()  # the bound is nearly attained
    const = torch.full((10,), 3.5, dtype=DT)  # a constant bucket is exact
    assert torch.equal(dequantize_4bit(*quantize_4bit(const, 4), 10, 4), const)


def test_microadam_state_below_one_byte_per_parameter():
    """Default settings, a 1M-parameter tensor: int16 indices, bf16 values, 4-bit error, float32 ranges."""
    w = torch.zeros(1000, 1000, requires_grad=True)
    opt = MicroAdam([w])
    w.grad = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(0))
    opt.step()
    st = opt.state[w]
    assert (st["indices"].dtype, st["values"].dtype, st["error"].dtype, st["scales"].dtype) == (
        torch.int16, torch.bfloat16, torch.uint8, torch.float32)
    d = w.numel()
    full, last = divmod(d, TOPK_BLOCK)
    k = full * math.ceil(0.01 * TOPK_BLOCK) + math.ceil(0.01 * last)
    expected = 10 * k * (2 + 2) + d // 2 + math.ceil(d / 128) * 2 * 4
    assert opt.state_bytes() == expected
    assert opt.state_bytes() / d < 1.0


def test_microadam_bf16_state_survives_checkpoint():
    """torch casts loaded state to the parameter's dtype; int16 indices > 256 must not go through bf16."""
    w = torch.randn(3000, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_()
    opt = MicroAdam([w], density=0.1)
    for (g,) in grads([(3000,)], 3):
        w.grad = g.bfloat16()
        opt.step()
    assert opt.state[w]["indices"].max() > 256
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = MicroAdam([w.detach().clone().requires_grad_()], density=0.1)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    (a,), (b,) = opt.state.values(), opt2.state.values()
    for name in ("indices", "values", "error", "scales"):
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("change", [dict(window=3), dict(density=0.5), dict(bits=None), dict(quant_bucket_size=16)])
def test_microadam_layout_cannot_change(change):
    (p,) = params([(50,)])
    opt = MicroAdam([p], density=0.1)
    p.grad = torch.ones(50, dtype=DT)
    opt.step()
    before = p.detach().clone()
    opt.param_groups[0].update(change)
    (name, value), = change.items()
    with pytest.raises(ValueError, match=f"cannot change.*got .*{name}={value}"):
        opt.step()
    assert torch.equal(p, before)


# ==============================================================================================
# FRUGAL
# ==============================================================================================
FRUGAL_SHAPES = [(9, 5), (4, 7), (3, 2, 4), (6,), (5, 2)]  # tall, wide, 3-D (as 3 x 8), a vector (AdamW), wide
ADAM_KW = dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
ORDERS = ["random", "ascending", "descending", "mirror"]


@pytest.mark.parametrize("projector, order", [("blocks", o) for o in ORDERS] + [("columns", "random"), ("random", "random")])
def test_frugal_density_one_is_adamw_restarted_at_each_refresh(projector, order):
    """rho = 1 with a coordinate or block projector: every matrix takes AdamW's steps, with AdamW's
    state cleared at steps 1, 8, 15, 22 (the paper's reset); the vector is plain AdamW throughout."""
    T, stream = 7, grads(FRUGAL_SHAPES, 25)
    a, b = params(FRUGAL_SHAPES), params(FRUGAL_SHAPES)
    opt = FRUGAL(a, density=1.0, update_gap=T, projector=projector, block_order=order, seed=0, **ADAM_KW)
    vector = torch.optim.AdamW([b[3]], **ADAM_KW)
    for t, gs in enumerate(stream):
        if t % T == 0:
            mats = [torch.optim.AdamW([q], **ADAM_KW) for q in b if q.dim() >= 2]  # fresh state
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        vector.step()
        for ref in mats:
            ref.step()
        for p in a:
            if p.dim() >= 2:
                st = opt.state[p]
                assert st["adam_step"] == t % T + 1 and st["refresh"] == t // T + 1
                assert st.get("active", True)
    close(a, b, rtol=1e-13)


@pytest.mark.parametrize("projector", ["blocks", "columns", "random", "svd"])
@pytest.mark.parametrize("complement", ["sign", "sgd"])
def test_frugal_density_zero_is_signsgd(projector, complement):
    """rho = 0: theta <- theta (1 - lr wd) - lr kappa sign(g) (or g for SGD); nothing is stored."""
    shapes = [(9, 5), (4, 7)]
    stream = grads(shapes, 10)
    ps = params(shapes)
    x = [p.detach().clone() for p in ps]
    lr, wd, kappa = 0.03, 0.1, 0.5
    opt = FRUGAL(ps, lr=lr, weight_decay=wd, density=0.0, update_gap=3, projector=projector,
                 complement=complement, complement_lr_scale=kappa)
    for gs in stream:
        x = [xi * (1 - lr * wd) - lr * kappa * (g.sign() if complement == "sign" else g) for xi, g in zip(x, gs)]
    close(run(opt, ps, stream), x, rtol=1e-14)
    assert opt.state_bytes() == 0


# -- the paper's block projector (whole tensors) ---------------------------------------------------
def authors_block_orders(order, n, k, refreshes):
    """The active positions at each refresh, written as the authors' ``BlockOptimizer._update_states``
    runs them (frugal/proj_optimizer_templates.py): a ``next_block_start`` carried from refresh to refresh."""
    out, start = [], {"ascending": 0, "descending": n - 1, "mirror": 0}[order]
    for _ in range(refreshes):
        if order == "ascending":
            on = {i % n for i in range(start, start + k)}
            start += k
            start -= n if start >= n else 0
        elif order == "descending":
            on = {i % n for i in range(start, start - k, -1)}
            start -= k
            start += n if start < 0 else 0
        else:
            half = n // 2
            on = {j for i in range(start, start + k // 2) for j in (i % half, n - 1 - i % half)}
            start += k // 2
            start -= half if start >= half else 0
        out.append(sorted(on))
    return out


# six matrices, and vectors in between that are not counted among the blocks (AdamW)
BLOCK_SHAPES = [(6, 4), (3, 5), (5,), (4, 4), (2, 3, 2), (7, 3), (), (4, 6)]


def _matrices(ps):
    return [p for p in ps if p.dim() >= 2]


@pytest.mark.parametrize("order, complement, mode", [(o, "sign", {}) for o in ORDERS] + [
    ("descending", "sgd", {}), ("ascending", "sign", {"foreach": False}), ("ascending", "sgd", {"fused": True})])
def test_frugal_blocks_match_the_paper(order, complement, mode):
    """Algorithm 1 with whole tensors as blocks, against torch.optim.AdamW: k = round(rho n) of the n
    matrices are active in each period and take AdamW's steps from a fresh AdamW (moments and bias
    correction restarted at each refresh, also for a tensor that stays active), the others take
    -lr kappa sign(g) (or g) with the decay and hold no moments; vectors are plain AdamW; the
    selection follows block_order."""
    lr, betas, eps, wd, kappa, rho, T = 0.02, (0.8, 0.9), 1e-8, 0.1, 0.5, 0.34, 3
    n, k = 6, 2  # round(0.34 * 6)
    stream = grads(BLOCK_SHAPES, 20, seed=4)
    a, b = params(BLOCK_SHAPES), params(BLOCK_SHAPES)
    opt = FRUGAL(a, lr=lr, betas=betas, eps=eps, weight_decay=wd, density=rho, update_gap=T, block_order=order,
                 complement=complement, complement_lr_scale=kappa, seed=3, **mode)
    adam = dict(lr=lr, betas=betas, eps=eps, weight_decay=wd)
    vectors = torch.optim.AdamW([q for q in b if q.dim() < 2], **adam)
    expected = authors_block_orders(order, n, k, 7) if order != "random" else None
    seen = set()
    for t, gs in enumerate(stream):
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        states = [opt.state[p] for p in _matrices(a)]
        on = [j for j, st in enumerate(states) if st["active"]]
        if t % T == 0:  # a refresh: the new selection, fresh AdamW states for it
            assert len(on) == k
            if expected is not None:
                assert on == expected[t // T]
            seen.add(tuple(on))
            refs = {j: torch.optim.AdamW([_matrices(b)[j]], **adam) for j in on}
        assert on == sorted(refs)  # fixed within a period
        vectors.step()
        for j, (q, st) in enumerate(zip(_matrices(b), states)):
            if j in refs:
                refs[j].step()
                torch.testing.assert_close(st["exp_avg"], refs[j].state[q]["exp_avg"], rtol=1e-13, atol=1e-15)
                assert st["adam_step"] == t % T + 1
            else:
                assert "exp_avg" not in st and "exp_avg_sq" not in st
                q.data.mul_(1 - lr * wd).sub_(lr * kappa * (q.grad.sign() if complement == "sign" else q.grad))
        close(a, b, rtol=1e-13)
    assert len(seen) > 1  # the selection moved


@pytest.mark.parametrize("order, n, k, sequence", [
    ("ascending", 5, 2, [[0, 1], [2, 3], [0, 4], [1, 2], [3, 4], [0, 1]]),  # from the first tensor on
    ("descending", 5, 2, [[3, 4], [1, 2], [0, 4], [2, 3], [0, 1], [3, 4]]),  # from the last tensor back
    ("mirror", 6, 2, [[0, 5], [1, 4], [2, 3], [0, 5], [1, 4], [2, 3]]),  # pairs from both ends, inwards
    ("mirror", 7, 4, [[0, 1, 5, 6], [0, 2, 4, 6], [1, 2, 4, 5], [0, 1, 5, 6], [0, 2, 4, 6], [1, 2, 4, 5]]),
])
def test_frugal_block_orders_cycle_as_the_authors(order, n, k, sequence):
    """The cyclic orders, written out by hand from the authors' recursion (also run by
    authors_block_orders): positions count the group's matrices only, in the order of ``params``
    (vectors between them do not count).  With odd n, "mirror" never activates the middle tensor."""
    assert authors_block_orders(order, n, k, len(sequence)) == sequence
    shapes = [(2, 3)] * 2 + [(4,)] + [(2, 3)] * (n - 2)
    ps = params(shapes)
    opt = FRUGAL(ps, density=k / n, update_gap=2, block_order=order)
    got = []
    for t, gs in enumerate(grads(shapes, 2 * len(sequence))):
        for p, g in zip(ps, gs):
            p.grad = g
        opt.step()
        if t % 2 == 0:
            got.append([j for j, p in enumerate(_matrices(ps)) if opt.state[p]["active"]])
    assert got == sequence
    assert [opt.state[p]["block"] for p in _matrices(ps)] == list(range(n))


def test_frugal_blocks_random_order_is_seeded_by_the_refresh_count():
    """"random": k distinct tensors per refresh, a function of (seed, refresh count) only: the same for
    two optimizers with the same seed whatever torch's global generator and whatever the update gap,
    different for another seed; every tensor is chosen over enough refreshes."""
    shapes, n, k = [(3, 2)] * 8 + [(5,)], 8, 2

    def sequence(seed, gap, refreshes=40, global_seed=0):
        torch.manual_seed(global_seed)
        ps = params(shapes)
        opt = FRUGAL(ps, density=0.25, update_gap=gap, seed=seed)
        out = []
        for t, gs in enumerate(grads(shapes, gap * refreshes)):
            for p, g in zip(ps, gs):
                p.grad = g
            opt.step()
            if t % gap == 0:
                out.append(tuple(j for j, p in enumerate(_matrices(ps)) if opt.state[p]["active"]))
        return out

    s0 = sequence(0, 1)
    assert all(len(s) == k for s in s0)
    assert s0 == sequence(0, 3, global_seed=1234) and s0 != sequence(1, 1)
    assert set().union(*s0) == set(range(n)) and len(set(s0)) > 5
    assert [list(s) for s in s0] == [block_selection("random", n, k, c, 0) for c in range(1, 41)]


@pytest.mark.parametrize("order", ["random", "descending"])
@pytest.mark.parametrize("cut", [6, 8])  # in the middle of the 2nd period (steps 5-8); at its end (9 refreshes)
def test_frugal_blocks_resume_bit_identical(order, cut):
    """A state_dict round trip (torch.save/torch.load) then training equals the uninterrupted run bit
    for bit, in the middle of a period and across a refresh (the selection, "random" included, is
    recomputed from the saved seed and refresh count, not from a global generator)."""
    shapes, steps = BLOCK_SHAPES, 14
    stream = grads(shapes, steps, seed=7)
    a = params(shapes)
    opt = FRUGAL(a, density=0.5, update_gap=4, block_order=order, **ADAM_KW)  # seed drawn and stored
    run(opt, a, stream[:cut])
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "p": [p.detach() for p in a]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    b = [p.clone().requires_grad_() for p in ckpt["p"]]
    torch.manual_seed(4321)  # another global generator: another drawn seed, replaced by the loaded one
    opt_b = FRUGAL(b, density=0.5, update_gap=4, block_order=order, **ADAM_KW)
    opt_b.load_state_dict(ckpt["opt"])
    for x, y in zip(run(opt, a, stream[cut:]), run(opt_b, b, stream[cut:])):
        assert torch.equal(x, y)
    sa, sb = opt.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for name, v in sa[i].items():
            assert torch.equal(v, sb[i][name]) if torch.is_tensor(v) else v == sb[i][name]


def test_frugal_blocks_state_memory():
    """Defaults (blocks, rho = 0.25): AdamW's moments on a quarter of the matrices, none on the others:
    a quarter of AdamW's state for the matrices (equal sizes), AdamW's for the vector."""
    shapes = [(32, 16)] * 8 + [(16,)]
    g = torch.Generator().manual_seed(0)
    ps = [torch.zeros(s, requires_grad=True) for s in shapes]
    ref = [torch.zeros(s, requires_grad=True) for s in shapes]
    opt, adamw = FRUGAL(ps), torch.optim.AdamW(ref)
    for p, q in zip(ps, ref):
        p.grad = q.grad = torch.randn(p.shape, generator=g)
    opt.step()
    adamw.step()
    adamw_bytes = [sum(v.numel() * v.element_size() for k, v in adamw.state[q].items() if k != "step") for q in ref]
    active = [p for p in _matrices(ps) if opt.state[p]["active"]]
    assert len(active) == 2 and all(opt.state[p]["exp_avg"].shape == p.shape for p in active)
    assert opt.state_bytes() == sum(adamw_bytes[:8]) // 4 + adamw_bytes[8] == 2 * 4 * (2 * 512 + 16)


@pytest.mark.parametrize("mode", ["foreach", "fused"])
@pytest.mark.parametrize("complement", ["sign", "sgd"])
def test_frugal_blocks_fast_paths_equal_reference(mode, complement):
    """The default and fused paths batch matrices of one shape and status (several active and several
    inactive (3, 4) matrices here) and step inactive ones in place; a large matrix runs alone; one
    matrix stops receiving gradients halfway (its own clock).  Same parameters and state as the
    one-tensor-at-a-time reference."""
    shapes = [(3, 4)] * 6 + [(200, 200), (2, 3, 2), (2, 3, 2), (5,), ()]  # 200 x 200 > PACK_NUMEL

    def train(kw):
        ps = params(shapes)
        opt = FRUGAL(ps, density=0.5, update_gap=3, block_order="ascending", complement=complement,
                     complement_lr_scale=0.5, **ADAM_KW, **kw)
        for t, gs in enumerate(grads(shapes, 15, seed=9)):
            for i, (p, g) in enumerate(zip(ps, gs)):
                p.grad = None if (i == 1 and t >= 8) else g
            opt.step()
        return ps, opt

    ref, opt_ref = train({"foreach": False})
    fast, opt_fast = train({"fused": True} if mode == "fused" else {"foreach": True})
    close(fast, ref, rtol=1e-13)
    for p, q in zip(ref, fast):
        s, f = opt_ref.state[p], opt_fast.state[q]
        assert s.keys() == f.keys()
        for name in s:
            if torch.is_tensor(s[name]):
                torch.testing.assert_close(f[name], s[name], rtol=1e-13, atol=1e-15)
            else:
                assert f[name] == s[name], name


def test_frugal_blocks_bad_input():
    """An unknown block_order, or "mirror" with an odd number of active tensors, is refused with the
    argument and the accepted values named, also in a group added later or after a density change."""
    ps = params([(3, 4), (4, 3), (2, 2), (5,)])
    with pytest.raises(ValueError, match=r"invalid block_order='zigzag'; expected one of "
                                         r"\['random', 'ascending', 'descending', 'mirror'\]"):
        FRUGAL(ps, block_order="zigzag")
    with pytest.raises(ValueError, match=r"invalid block_order='mirror' with density=0\.34 on 3 projected "
                                         r"tensors \(round\(3 \* 0\.34\) = 1 active\).*even"):
        FRUGAL(ps, density=0.34, block_order="mirror")
    opt = FRUGAL(ps[:2], density=1.0, block_order="mirror")  # 2 of 2: fine
    with pytest.raises(ValueError, match="invalid block_order='zigzag'"):
        opt.add_param_group({"params": ps[2:], "block_order": "zigzag"})
    opt.param_groups[0]["density"] = 0.5  # 1 of 2 active: refused before anything changes
    for p, g in zip(ps[:2], grads([(3, 4), (4, 3)], 1)[0]):
        p.grad = g
    before = [p.detach().clone() for p in ps[:2]]
    with pytest.raises(ValueError, match="invalid block_order='mirror'"):
        opt.step()
    assert all(torch.equal(x, p) for x, p in zip(before, ps[:2])) and len(opt.state) == 0


def test_frugal_blocks_refuse_state_of_another_projector():
    """A state_dict saved with the within-matrix projector (projector="blocks" before the paper's
    whole-tensor blocks, now "columns") is not silently misread by the block projector."""
    shapes = [(4, 3), (5,)]
    a = params(shapes)
    opt = FRUGAL(a, density=0.5, update_gap=2, projector="columns")
    run(opt, a, grads(shapes, 3))
    opt_b = FRUGAL(a, density=0.5, update_gap=2)
    opt_b.load_state_dict(opt.state_dict())
    opt_b.param_groups[0]["projector"] = "blocks"  # a checkpoint of the old default: the group says "blocks"
    with pytest.raises(ValueError, match="projector='columns'"):
        run(opt_b, a, grads(shapes, 1))


# -- the coordinate and SVD projectors (within each matrix) ---------------------------------------
def paper_frugal_columns(x0, stream, lr, betas, eps, wd, rho, T):
    """Algorithm 1 with a cyclic block of columns (tall matrix), Adam on it and signSGD elsewhere."""
    b1, b2 = betas
    x, (rows, cols) = x0.clone(), x0.shape
    r = round(rho * cols)
    for t, g in enumerate(stream):
        if t % T == 0:  # refresh: next block, fresh Adam state
            cols_on = [(t // T * r + j) % cols for j in range(r)]
            m, v, s = torch.zeros(rows, r, dtype=DT), torch.zeros(rows, r, dtype=DT), 0
        s += 1
        gs = g[:, cols_on]
        m = b1 * m + (1 - b1) * gs
        v = b2 * v + (1 - b2) * gs * gs
        u = g.sign()
        u[:, cols_on] = (m / (1 - b1**s)) / ((v / (1 - b2**s)).sqrt() + eps)
        x = x * (1 - lr * wd) - lr * u
    return x


def test_frugal_columns_matches_algorithm_1():
    (g_stream,) = zip(*grads([(10, 8)], 20))
    (p,) = params([(10, 8)])
    x0 = p.detach().clone()
    opt = FRUGAL([p], lr=0.02, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.1, density=0.25, update_gap=3,
                 projector="columns")
    (ours,) = run(opt, [p], [[g] for g in g_stream])
    ref = paper_frugal_columns(x0, g_stream, 0.02, (0.8, 0.9), 1e-8, 0.1, 0.25, 3)
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("shape", [(10, 6), (5, 9)])
def test_frugal_svd_matches_algorithm_1(shape):
    """GaLore-style projector: top right singular vectors (tall) or left ones (wide) of the gradient."""
    b1, b2, eps, lr, rho, T = 0.8, 0.9, 1e-8, 0.02, 0.5, 4
    (g_stream,) = zip(*grads([shape], 13, seed=5))
    (p,) = params([shape])
    x = p.detach().clone()
    opt = FRUGAL([p], lr=lr, betas=(b1, b2), eps=eps, density=rho, update_gap=T, projector="svd")
    tall = shape[0] >= shape[1]
    r = round(rho * min(shape))
    for t, g in enumerate(g_stream):
        if t % T == 0:
            U, _, Vh = torch.linalg.svd(g, full_matrices=False)
            B = Vh[:r] if tall else U[:, :r].T  # (r, n)
            m = v = 0.0
            s = 0
        s += 1
        low = g @ B.T if tall else B @ g
        m = b1 * m + (1 - b1) * low
        v = b2 * v + (1 - b2) * low * low
        adam = (m / (1 - b1**s)) / ((v / (1 - b2**s)).sqrt() + eps)
        up = (lambda y: y @ B) if tall else (lambda y: B.T @ y)
        x = x - lr * (up(adam) + (g - up(low)).sign())
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-13)


def test_frugal_random_selection_is_seeded_and_resumable():
    """The random columns depend on (seed, position, refresh) only; a checkpoint resumes them exactly."""
    shape = (12, 10)
    stream = grads([shape], 14, seed=2)
    a = params([shape])
    opt = FRUGAL(a, density=0.3, update_gap=4, projector="random")  # seed drawn, stored in the group
    run(opt, a, stream[:6])
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "p": a[0].detach()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    b = [ckpt["p"].clone().requires_grad_()]
    torch.manual_seed(1234)  # a different global RNG: the resumed selection must not depend on it
    opt_b = FRUGAL(b, density=0.3, update_gap=4, projector="random")
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.param_groups[0]["seed"] == opt.param_groups[0]["seed"]
    assert torch.equal(run(opt, a, stream[6:])[0], run(opt_b, b, stream[6:])[0])

    def selections(seed):
        (p,) = params([shape])
        o = FRUGAL([p], density=0.3, update_gap=1, projector="random", seed=seed)
        out = []
        for (g,) in stream[:4]:
            p.grad = g
            o.step()
            st = o.state[p]
            out.append(o._selection(st, o.param_groups[0], 10, 3, p.device).tolist())
        return out

    s0 = selections(0)
    assert s0 == selections(0) and s0 != selections(1)
    assert all(len(set(s)) == 3 for s in s0) and len({tuple(s) for s in s0}) > 1  # new columns each period


def test_frugal_columns_state_memory():
    """"columns", rho = 0.25: two moments on a quarter of the columns, 2 bytes per float32 parameter."""
    w = torch.zeros(1024, 512, requires_grad=True)
    opt = FRUGAL([w], projector="columns")
    w.grad = torch.randn(1024, 512, generator=torch.Generator().manual_seed(0))
    opt.step()
    assert opt.state[w]["exp_avg"].shape == (1024, 128)
    assert opt.state_bytes() == 2 * w.numel()


# ==============================================================================================
# AdamWSN
# ==============================================================================================
SN_SHAPES = [(12, 20), (9, 4), (7,), (), (3, 4, 5)]


def test_adamwsn_one_subset_is_adagrad_norm():
    """subset_size="all", beta1 = 0, beta2 = 1: b_t^2 = b_{t-1}^2 + ||g_t||^2, theta -= lr g / (b_t + eps)."""
    lr, eps = 0.5, 1e-8
    stream = grads(SN_SHAPES, 30)
    ps = params(SN_SHAPES)
    x = [p.detach().clone() for p in ps]
    b2 = [0.0] * len(ps)
    for gs in stream:
        for i, g in enumerate(gs):
            b2[i] += (g * g).sum().item()
            x[i] = x[i] - lr * g / (math.sqrt(b2[i]) + eps)
    ours = run(AdamWSN(ps, lr=lr, betas=(0.0, 1.0), eps=eps, subset_size="all"), ps, stream)
    close(ours, x, rtol=1e-13)


def test_adamwsn_singleton_subsets_are_adagrad():
    """subset_size=1 in the limit beta1 = 0 (no momentum), beta2 = 1 (sum, no bias correction) is
    torch.optim.Adagrad (lr_decay 0, initial_accumulator_value 0) with the same eps."""
    stream = grads(SN_SHAPES, 30, seed=1)
    a, b = params(SN_SHAPES), params(SN_SHAPES)
    ours = run(AdamWSN(a, lr=0.1, betas=(0.0, 1.0), eps=1e-10, subset_size=1), a, stream)
    ref = run(torch.optim.Adagrad(b, lr=0.1, eps=1e-10), b, stream)
    close(ours, ref, rtol=1e-14)


@pytest.mark.parametrize("subset_size", [-1, 1, 4])
def test_adamwsn_against_pytorch_optimizer(subset_size):
    """100 steps beside pytorch-optimizer's AdamWSN (subset norm, full momentum: ``rank=None``).

    subset_size=-1 is its ``sn=True`` group (sqrt(d)-sized contiguous subsets), 4 the same with
    subsets of 4; subset_size=1 is its plain group (per-coordinate, i.e. AdamW with eps added
    before the bias correction)."""
    po = pytest.importorskip("pytorch_optimizer")
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    shapes = [s for s in SN_SHAPES if s != ()] if subset_size == 4 else SN_SHAPES  # its divisor search fails on 1
    stream = grads(shapes, 100, seed=2)
    a, b = params(shapes), params(shapes)
    ours = run(AdamWSN(a, subset_size=subset_size, rank=None, **kw), a, stream)
    peer = po.AdamWSN([{"params": b, "sn": subset_size != 1}], subset_size=4 if subset_size == 4 else -1,
                      foreach=False, **kw)
    close(ours, run(peer, b, stream), rtol=1e-6)


def test_adamwsn_heuristic_subsets():
    """Rows for tall matrices, columns for wide ones, coordinates for vectors; v is the EMA of subset sums."""
    assert subset_layout((12, 20), "heuristic") == ((12, 20), 0)
    assert subset_layout((20, 12), "heuristic") == ((20, 12), 1)
    assert subset_layout((3, 4, 5), "heuristic") == ((3, 20), 0)
    assert subset_layout((7,), "heuristic") == ((7, 1), 1)
    assert subset_layout((240,), -1) == ((16, 15), 1)  # sqrt(240) -> 15 divides 240
    assert subset_layout((7,), -1) == ((7, 1), 1)  # int(sqrt(7)) = 2 does not divide 7 -> 1
    ps = params([(12, 20), (20, 12), (7,)])
    gs = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=DT) for i, p in enumerate(ps)]
    opt = AdamWSN(ps, betas=(0.9, 0.99), rank=None)
    for p, g in zip(ps, gs):
        p.grad = g
    opt.step()
    expect = [0.01 * (gs[0] ** 2).sum(0, keepdim=True), 0.01 * (gs[1] ** 2).sum(1, keepdim=True),
              0.01 * (gs[2] ** 2)[:, None]]
    for p, e in zip(ps, expect):
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], e, rtol=1e-14, atol=0)


@pytest.mark.parametrize("shape", [(10, 6), (5, 9)])
def test_adamwsn_subspace_momentum_matches_the_paper(shape):
    """AdamSNSM written out: momentum on P g (top-k singular subspace of g, refreshed and reset every T
    steps), SGD on g - P^T P g, subset-norm denominator, bias-corrected step, decoupled decay after."""
    b1, b2, eps, lr, wd, k, T = 0.8, 0.95, 1e-6, 0.05, 0.1, 2, 4
    (g_stream,) = zip(*grads([shape], 13, seed=7))
    (p,) = params([shape])
    x = p.detach().clone()
    opt = AdamWSN([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, rank=k, update_proj_gap=T)
    tall = shape[0] >= shape[1]
    v = 0.0
    for t, g in enumerate(g_stream, start=1):
        if (t - 1) % T == 0:
            U, _, Vh = torch.linalg.svd(g, full_matrices=False)
            B = Vh[:k] if tall else U[:, :k].T
            m = 0.0
        low = g @ B.T if tall else B @ g
        m = b1 * m + (1 - b1) * low
        u = (m @ B if tall else B.T @ m) + g - (low @ B if tall else B.T @ low)
        v = b2 * v + (1 - b2) * (g * g).sum(dim=1 if tall else 0, keepdim=True)  # one norm per row (col)
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        x = (x - step * u / (v.sqrt() + eps)) * (1 - lr * wd)
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-13)
    assert opt.state[p]["exp_avg"].shape == ((shape[0], k) if tall else (k, shape[1]))


def test_adamwsn_full_rank_subspace_is_plain_momentum():
    """rank >= the smaller dimension: no projector, ordinary momentum (same trajectory as rank=None)."""
    stream = grads([(6, 4)], 15)
    a, b = params([(6, 4)]), params([(6, 4)])
    ours = run(AdamWSN(a, rank=4, update_proj_gap=3), a, stream)
    assert "projector" not in AdamWSN(a, rank=4).state  # fresh optimizer: nothing yet
    ref = run(AdamWSN(b, rank=None), b, stream)
    close(ours, ref, rtol=0)


def test_adamwsn_state_memory():
    """Defaults on a 600 x 200 float32 weight: k = 128 momentum columns, the k x 200 basis, 600 row norms."""
    w = torch.zeros(600, 200, requires_grad=True)
    opt = AdamWSN([w])
    w.grad = torch.randn(600, 200, generator=torch.Generator().manual_seed(0))
    opt.step()
    assert opt.state_bytes() == 4 * (600 * 128 + 128 * 200 + 600)
