"""Lion (arXiv:2302.06675) and Lion-K (arXiv:2310.05898): paper equations, peers, box property."""

from __future__ import annotations

import math

import pytest
import torch

from gradkit.optim import Lion, LionK

DT = torch.float64


def grad_stream(shape, steps, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=g, dtype=DT) for _ in range(steps)]


def run(opt_cls, x0, grads, **kw):
    x = x0.clone().requires_grad_()
    opt = opt_cls([x], **kw)
    traj = []
    for g in grads:
        x.grad = g.clone()
        opt.step()
        traj.append(x.detach().clone())
    return torch.stack(traj)


def paper_lion(x0, grads, lr, betas, wd):
    """Algorithm 2 of Chen et al. (2023), written out directly."""
    b1, b2 = betas
    x, m, out = x0.clone(), torch.zeros_like(x0), []
    for g in grads:
        c = b1 * m + (1 - b1) * g
        x = x - lr * (torch.sign(c) + wd * x)
        m = b2 * m + (1 - b2) * g
        out.append(x.clone())
    return torch.stack(out)


def test_defaults_follow_the_paper():
    opt = Lion([torch.zeros(2, requires_grad=True)])
    assert opt.defaults["lr"] == 1e-4 and opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["weight_decay"] == 0


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_algorithm_2(foreach):
    x0 = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=DT)
    grads = grad_stream((6, 5), 40)
    ours = run(Lion, x0, grads, lr=3e-2, betas=(0.8, 0.95), weight_decay=0.5, foreach=foreach)
    torch.testing.assert_close(ours, paper_lion(x0, grads, 3e-2, (0.8, 0.95), 0.5), rtol=1e-14, atol=1e-15)


def test_against_lion_pytorch():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    x0 = torch.randn(50, generator=torch.Generator().manual_seed(2), dtype=DT)
    grads = grad_stream((50,), 100, seed=3)
    ours = run(Lion, x0, grads, lr=1e-3, weight_decay=0.3)
    peer = run(lion_pytorch.Lion, x0, grads, lr=1e-3, weight_decay=0.3)
    torch.testing.assert_close(ours, peer, rtol=1e-6, atol=0)


def test_against_pytorch_optimizer():
    po = pytest.importorskip("pytorch_optimizer")
    x0 = torch.randn(50, generator=torch.Generator().manual_seed(2), dtype=DT)
    grads = grad_stream((50,), 100, seed=4)
    ours = run(Lion, x0, grads, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.3)
    peer = run(po.Lion, x0, grads, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.3, foreach=False)
    torch.testing.assert_close(ours, peer, rtol=1e-6, atol=0)


def test_lionk_l1_is_lion_and_callables_work():
    x0 = torch.randn(20, generator=torch.Generator().manual_seed(5), dtype=DT)
    grads = grad_stream((20,), 30, seed=6)
    lion = run(Lion, x0, grads, lr=1e-2, weight_decay=0.1)
    assert torch.equal(run(LionK, x0, grads, lr=1e-2, weight_decay=0.1, k="l1"), lion)
    assert torch.equal(run(LionK, x0, grads, lr=1e-2, weight_decay=0.1, k=torch.sign), lion)
    assert torch.equal(run(LionK, x0, grads, lr=1e-2, weight_decay=0.1, k=lambda c: c),
                       run(LionK, x0, grads, lr=1e-2, weight_decay=0.1, k="quadratic"))


def test_lionk_l2_step_has_norm_lr():
    x0 = torch.randn(4, 5, generator=torch.Generator().manual_seed(7), dtype=DT)
    traj = run(LionK, x0, grad_stream((4, 5), 20, seed=8), lr=0.1, k="l2")
    steps = torch.diff(torch.cat([x0[None], traj]), dim=0).flatten(1)
    torch.testing.assert_close(torch.linalg.vector_norm(steps, dim=1), torch.full((20,), 0.1, dtype=DT))


@pytest.mark.parametrize("k", ["l2", "quadratic"])
@pytest.mark.parametrize("path", [{}, {"foreach": False}, {"fused": True}])
def test_lionk_equals_the_written_out_update(k, path):
    """Lion-K with ∇K(c) = c/‖c‖ per tensor ("l2") or c ("quadratic"), written out in float64 for
    two tensors of different shapes (a norm over the whole group would fail), weight decay on."""
    b1, b2, lr, wd = 0.9, 0.99, 0.05, 0.3
    gen = torch.Generator().manual_seed(9)
    x0 = [torch.randn(4, 5, generator=gen, dtype=DT), torch.randn(7, generator=gen, dtype=DT)]
    xs = [x.clone().requires_grad_() for x in x0]
    opt = LionK(xs, lr=lr, betas=(b1, b2), weight_decay=wd, k=k, **path)
    ref, m = [x.clone() for x in x0], [torch.zeros_like(x) for x in x0]
    for _ in range(30):
        grads = [torch.randn(x.shape, generator=gen, dtype=DT) for x in x0]
        for x, g in zip(xs, grads):
            x.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            c = b1 * m[i] + (1 - b1) * g
            ref[i] = ref[i] * (1 - lr * wd) - lr * (c / torch.linalg.vector_norm(c) if k == "l2" else c)
            m[i] = b2 * m[i] + (1 - b2) * g
    for x, r in zip(xs, ref):
        torch.testing.assert_close(x.detach(), r, rtol=1e-13, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# Lion-K paper (Chen, Liu, Liang, Liu 2023): Lion with weight decay lambda solves
# min f(x) s.t. ||x||_inf <= 1/lambda
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_box_is_invariant(seed):
    lam, lr = 2.0, 0.3  # lr * lam = 0.6 <= 1
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(30, generator=g, dtype=DT) * 2 - 1) / lam  # inside the box
    traj = run(Lion, x0, grad_stream((30,), 200, seed=seed, scale=10.0), lr=lr, weight_decay=lam)
    assert traj.abs().max() <= 1 / lam * (1 + 1e-12)


def test_excess_outside_box_shrinks_geometrically():
    lam, lr = 2.0, 0.05
    x0 = torch.tensor([3.0, -5.0, 0.1, 2.0], dtype=DT)  # box is [-0.5, 0.5]
    traj = run(Lion, x0, grad_stream((4,), 60, seed=9, scale=5.0), lr=lr, weight_decay=lam)
    excess0 = x0.abs().max() - 1 / lam
    for t, x in enumerate(traj, start=1):
        bound = (1 - lr * lam) ** t * excess0
        assert (x.abs().max() - 1 / lam) <= bound * (1 + 1e-12) + 1e-15


def _quadratic_fixed_point(k, a, lam, steps, lr0):
    x = torch.zeros_like(a, requires_grad=True)
    opt = LionK([x], lr=lr0, weight_decay=lam, k=k)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x.grad = x.detach() - a  # f = 0.5 ||x - a||^2
        opt.step()
        sched.step()
    return x.detach()


def test_l1_converges_to_clipped_target():
    lam = 1.0
    a = torch.tensor([2.0, -3.0, 0.4, -0.7, 0.99], dtype=DT)
    x = _quadratic_fixed_point("l1", a, lam, 3000, 0.02)
    torch.testing.assert_close(x, a.clamp(-1 / lam, 1 / lam), rtol=0, atol=2e-3)


def test_quadratic_k_converges_to_shrunk_target():
    lam = 0.5
    a = torch.tensor([2.0, -3.0, 0.4, -0.7, 0.99], dtype=DT)
    x = _quadratic_fixed_point("quadratic", a, lam, 3000, 0.05)
    torch.testing.assert_close(x, a / (1 + lam), rtol=0, atol=1e-6)


def test_invalid_k():
    with pytest.raises(ValueError, match="invalid k="):
        LionK([torch.zeros(1, requires_grad=True)], k="linf")
    assert math.isfinite(LionK([torch.zeros(1, requires_grad=True)], k="l2").defaults["lr"])
