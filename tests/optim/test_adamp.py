"""AdamP / SGDP (arXiv:2006.08217): projection identities and the authors' package (adamp)."""

from __future__ import annotations

import pytest
import torch

from gradkit.optim import SGDP, AdamP
from gradkit.optim.adamp import project_radial

DT = torch.float64


def orthogonal_rows(w, r):
    """r with its component along each row of w removed: the gradient of a scale-invariant layer."""
    w2, r2 = w.reshape(w.size(0), -1), r.reshape(w.size(0), -1)
    unit = w2 / w2.norm(dim=1, keepdim=True)
    return (r2 - (r2 * unit).sum(1, keepdim=True) * unit).reshape(w.shape)


def run(opt_cls, x0, steps, grad_fn, seed=0, **kw):
    """Gradients computed from the current iterate (as a scale-invariant layer would produce)."""
    gen = torch.Generator().manual_seed(seed)
    x = x0.clone().requires_grad_()
    opt = opt_cls([x], **kw)
    out = []
    for t in range(steps):
        r = torch.randn(x.shape, generator=gen, dtype=DT)
        x.grad = grad_fn(t, x.detach(), r)
        opt.step()
        out.append(x.detach().clone())
    return torch.stack(out), opt


def scale_invariant(t, w, r):
    return orthogonal_rows(w, r)


def mixed(t, w, r):
    return orthogonal_rows(w, r) if t % 3 else r  # every third gradient is an ordinary one


W0 = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(1), dtype=DT)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("grads", [scale_invariant, mixed])
def test_adamp_against_clovaai_adamp(nesterov, grads):
    adamp = pytest.importorskip("adamp")
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, nesterov=nesterov)
    ours, _ = run(AdamP, W0, 100, grads, **kw)
    peer, _ = run(adamp.AdamP, W0, 100, grads, **kw)
    torch.testing.assert_close(ours, peer, rtol=1e-6, atol=0)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgdp_against_clovaai_adamp_nesterov(momentum):
    adamp = pytest.importorskip("adamp")
    kw = dict(lr=1e-2, momentum=momentum, weight_decay=0.1, nesterov=momentum > 0)
    ours, _ = run(SGDP, W0, 100, mixed, **kw)
    peer, _ = run(adamp.SGDP, W0, 100, mixed, **kw)
    torch.testing.assert_close(ours, peer, rtol=1e-6, atol=0)


@pytest.mark.parametrize("cls, kw", [
    (AdamP, dict(betas=(0.9, 0.99), nesterov=False)), (AdamP, dict(betas=(0.9, 0.99), nesterov=True)),
    (SGDP, dict(momentum=0.0)), (SGDP, dict(momentum=0.9, nesterov=True)), (SGDP, dict(momentum=0.9)),
], ids=["AdamP", "AdamP-nesterov", "SGDP", "SGDP-nesterov", "SGDP-momentum"])
def test_against_pytorch_optimizer(cls, kw):
    """A second, independent peer: pytorch-optimizer's AdamP and SGDP (decoupled decay, as the
    paper), 100 steps.  For SGDP with momentum and no Nesterov it agrees with us and not with
    clovaai's package (whose buffer is projected in place, see the next test)."""
    po = pytest.importorskip("pytorch_optimizer")
    ours, _ = run(cls, W0, 100, mixed, lr=1e-2, weight_decay=0.1, **kw)
    peer, _ = run(getattr(po, cls.__name__), W0, 100, mixed, lr=1e-2, weight_decay=0.1, **kw)
    torch.testing.assert_close(ours, peer, rtol=1e-6, atol=0)


def test_sgdp_buffer_difference_with_clovaai_adamp():
    """Justified difference: without Nesterov, adamp's SGDP projects its momentum buffer in place (the
    update aliases the buffer); the paper's Algorithm 1, which we follow, keeps b_t unprojected.
    Without projections the two coincide; with them, adamp's buffer equals ours projected."""
    adamp = pytest.importorskip("adamp")
    kw = dict(lr=1e-2, momentum=0.9, weight_decay=0.1)
    aligned = lambda t, w, r: r + 5 * w / w.norm()  # noqa: E731  (|cos(g, w)| large: never projected)
    ours, _ = run(SGDP, W0, 100, aligned, **kw)
    peer, _ = run(adamp.SGDP, W0, 100, aligned, **kw)
    torch.testing.assert_close(ours, peer, rtol=1e-6, atol=0)
    # step 1 with an ordinary gradient (buffer gets a radial part), step 2 scale-invariant (projected)
    g1 = torch.randn(W0.shape, generator=torch.Generator().manual_seed(2), dtype=DT) + W0
    x, y = W0.clone().requires_grad_(), W0.clone().requires_grad_()
    opt, opt_peer = SGDP([x], **kw), adamp.SGDP([y], **kw)
    x.grad, y.grad = g1.clone(), g1.clone()
    opt.step()
    opt_peer.step()
    w1 = x.detach().clone()
    g2 = orthogonal_rows(w1, torch.randn(W0.shape, generator=torch.Generator().manual_seed(3), dtype=DT))
    x.grad, y.grad = g2.clone(), g2.clone()
    opt.step()
    opt_peer.step()
    torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)  # same parameters ...
    b, b_peer = opt.state[x]["momentum_buffer"], opt_peer.state[y]["momentum"]
    batch = lambda t: t.reshape(1, 4, 6)  # noqa: E731  (a batch of one (channels, rest) view)
    projected, applied = project_radial(batch(w1), batch(g2), batch(b), torch.tensor(0.1, dtype=DT), 1e-8)
    assert applied.item() and not torch.allclose(b, b_peer)  # ... different buffers: the peer's is projected
    torch.testing.assert_close(projected.view_as(b_peer), b_peer, rtol=1e-12, atol=1e-15)


def test_projected_update_is_tangent():
    """Without weight decay, the update of a scale-invariant weight is orthogonal to it row by row."""
    traj, _ = run(AdamP, W0, 20, scale_invariant, lr=1e-2)
    prev = torch.cat([W0[None], traj[:-1]])
    for a, b in zip(prev, traj):
        d, w = (b - a).reshape(4, -1), a.reshape(4, -1)
        cos = (d * w).sum(1) / (d.norm(dim=1) * w.norm(dim=1))
        assert cos.abs().max() < 1e-7  # zero up to the eps in theta / (||theta|| + eps)


def test_layer_view_is_used_when_channel_view_does_not_apply():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 50, generator=g, dtype=DT)
    r = torch.randn(3, 50, generator=g, dtype=DT)
    flat_w = w.reshape(-1) / w.norm()
    grad = (r.reshape(-1) - (r.reshape(-1) @ flat_w) * flat_w).reshape(3, 50)  # orthogonal to w as a whole
    grad[0] += 5 * w[0]  # ... but not row by row
    grad -= (grad.reshape(-1) @ flat_w) * flat_w.reshape(3, 50)
    delta = torch.tensor(0.1, dtype=DT)
    u = torch.randn(3, 50, generator=g, dtype=DT)
    out, applied = project_radial(w[None], grad[None], u[None], delta, 1e-8)
    assert applied.item()
    torch.testing.assert_close(out[0], u - (u.reshape(-1) @ flat_w) * flat_w.reshape(3, 50) / (1 + 1e-8 / w.norm()) ** 2,
                               rtol=1e-10, atol=1e-12)


def test_one_dimensional_parameters_are_never_projected():
    x0 = torch.randn(10, generator=torch.Generator().manual_seed(4), dtype=DT)
    ours, _ = run(AdamP, x0, 30, lambda t, w, r: r - (r @ w) / (w @ w) * w, lr=1e-2)
    adam, _ = run(torch.optim.Adam, x0, 30, lambda t, w, r: r - (r @ w) / (w @ w) * w, lr=1e-2)
    torch.testing.assert_close(ours, adam, rtol=1e-12, atol=1e-14)


def test_sgdp_lr_is_required():
    with pytest.raises(TypeError):
        SGDP([torch.zeros(2, requires_grad=True)])  # type: ignore[call-arg]


def test_batched_projection_equals_one_at_a_time():
    """The fast paths project a batch (B, rows, cols) of same-shape weights at once."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(5, 4, 6, generator=g, dtype=DT)
    grad = torch.stack([orthogonal_rows(wi, torch.randn(4, 6, generator=g, dtype=DT)) if i % 2 else
                        torch.randn(4, 6, generator=g, dtype=DT) for i, wi in enumerate(w)])
    u = torch.randn(5, 4, 6, generator=g, dtype=DT)
    delta = torch.tensor(0.1, dtype=DT)
    out, applied = project_radial(w, grad, u, delta, 1e-8)
    assert applied.tolist() == [False, True, False, True, False]
    for i in range(5):
        oi, ai = project_radial(w[i : i + 1], grad[i : i + 1], u[i : i + 1], delta, 1e-8)
        assert ai.item() == applied[i].item()
        torch.testing.assert_close(oi[0], out[i], rtol=0, atol=0)


@pytest.mark.parametrize("cls", [AdamP, SGDP])
@pytest.mark.parametrize("mode", [{"foreach": True}, {"fused": True}])
def test_fast_paths_equal_reference_with_projections(cls, mode):
    """Scale-invariant and ordinary weights of one shape, batched together by the fast paths."""
    g = torch.Generator().manual_seed(6)
    w0 = [torch.randn(4, 3, 2, generator=g, dtype=DT) for _ in range(4)] + [torch.randn(5, generator=g, dtype=DT)]
    w0 += [torch.randn(200, 170, generator=g, dtype=DT)]  # above PACK_NUMEL: updated alone

    def train(kw):
        ps = [w.clone().requires_grad_() for w in w0]
        opt = cls(ps, lr=1e-2, momentum=0.9, weight_decay=0.1, **kw) if cls is SGDP else \
            cls(ps, lr=1e-2, weight_decay=0.1, **kw)
        gen = torch.Generator().manual_seed(7)
        for t in range(20):
            for i, p in enumerate(ps):
                r = torch.randn(p.shape, generator=gen, dtype=DT)
                p.grad = orthogonal_rows(p.detach(), r) if (p.dim() > 1 and (i + t) % 2) else r
            opt.step()
        return ps

    for a, b in zip(train({"foreach": False}), train(mode)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
