"""Refined learning-rate schedules (Defazio, Cutkosky, Mehta, Mishchenko 2023, arXiv:2310.07831)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import median_filter

from gradkit.optim.schedules import GradNormRecorder, RefinedLR, refined_schedule

DT = torch.float64


def linear_decay(T: int) -> torch.Tensor:
    """η_t = (T − t)/(T − 1) for t = 1..T, i.e. 1 − k/(T − 1) for 0-based k."""
    return torch.tensor([(T - 1 - k) / (T - 1) for k in range(T)], dtype=DT)


@pytest.mark.parametrize("T", [2, 3, 17, 500])
@pytest.mark.parametrize("norm", [1.0, 0.3, 7.5])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_constant_norms_give_exactly_linear_decay(T, norm, smoothing):
    out = refined_schedule(torch.full((T,), norm, dtype=DT), smoothing=smoothing)
    assert out.dtype == DT
    torch.testing.assert_close(out, linear_decay(T), rtol=0, atol=1e-13)
    assert out[0] == 1.0 and out[-1] == 0.0


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_two_valued_sequence_closed_form(power):
    """Norms a for the first k steps, b after: written out by hand from η_t = w_t Σ_{p>t} w_p."""
    T, k, a, b = 9, 4, 2.0, 0.5
    wa, wb = a ** -power, b ** -power
    eta = []
    for t in range(T):  # 0-based
        if t < k:
            eta.append(wa * ((k - 1 - t) * wa + (T - k) * wb))
        else:
            eta.append(wb * (T - 1 - t) * wb)
    expected = torch.tensor(eta, dtype=DT) / max(eta)
    out = refined_schedule([a] * k + [b] * (T - k), smoothing=0.0, power=power)
    torch.testing.assert_close(out, expected, rtol=1e-15, atol=1e-15)
    # small norms late in training (b < a) make the schedule warm up: the peak is not at step 0
    assert int(out.argmax()) > 0


def test_hand_computed_four_steps():
    # w = [1, 1, 1/4, 1/4]; η = [1·1.5, 1·0.5, ¼·¼, 0] = [1.5, 0.5, 1/16, 0]
    out = refined_schedule([1.0, 1.0, 2.0, 2.0], smoothing=0.0)
    torch.testing.assert_close(out, torch.tensor([1.0, 1 / 3, 1 / 24, 0.0], dtype=DT), rtol=0, atol=1e-16)


@pytest.mark.parametrize("n", [2, 5, 40, 101])
@pytest.mark.parametrize("smoothing", [0.05, 0.1, 0.3, 1.0])
def test_median_smoothing_matches_scipy(n, smoothing):
    """The paper's smoothing: scipy's median filter with the end reflected and the start repeated."""
    g = np.random.default_rng(n).uniform(0.2, 3.0, n)
    width = 2 * (int(smoothing * n) // 2) + 1
    pad = 2 * width
    smoothed = median_filter(np.pad(g, (0, pad), mode="reflect"), size=width, mode="nearest")[:-pad]
    w = smoothed ** -2.0
    later = np.concatenate([np.cumsum(w[::-1])[::-1][1:], [0.0]])
    expected = torch.tensor(w * later / (w * later).max(), dtype=DT)
    torch.testing.assert_close(refined_schedule(torch.tensor(g), smoothing=smoothing), expected,
                               rtol=1e-13, atol=1e-15)


def test_smoothing_removes_an_isolated_spike():
    g = torch.ones(50, dtype=DT)
    g[20] = 100.0
    torch.testing.assert_close(refined_schedule(g, smoothing=0.1), linear_decay(50), rtol=0, atol=1e-13)
    assert not torch.allclose(refined_schedule(g, smoothing=0.0), linear_decay(50))


def test_total_steps_resamples_linearly():
    g = np.array([3.0, 1.0, 2.0, 0.5, 4.0])
    N = 23
    resampled = np.interp(np.linspace(0, 1, N), np.linspace(0, 1, len(g)), g)
    expected = refined_schedule(torch.tensor(resampled), smoothing=0.0)
    out = refined_schedule(g.tolist(), smoothing=0.0, total_steps=N)
    assert out.shape == (N,)
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-15)


def test_warmup_scales_the_first_steps():
    base = refined_schedule([1.0] * 10)
    out = refined_schedule([1.0] * 10, warmup_steps=4)
    scale = torch.tensor([min(1.0, (k + 1) / 4) for k in range(10)], dtype=DT)
    torch.testing.assert_close(out, base * scale, rtol=0, atol=0)


@pytest.mark.parametrize("warmup", [0, 3])
def test_scheduler_values_equal_the_function(warmup):
    norms = torch.rand(12, generator=torch.Generator().manual_seed(0), dtype=DT) + 0.1
    mult = refined_schedule(norms, warmup_steps=warmup, smoothing=0.2)
    p = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([{"params": [p], "lr": 0.5}, {"params": [torch.zeros(1, requires_grad=True)], "lr": 2.0}])
    sched = RefinedLR(opt, norms, warmup, smoothing=0.2)
    seen = []
    for _ in range(15):  # three steps past the schedule: stays at the last multiplier
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for k, lrs in enumerate(seen):
        m = float(mult[min(k, 11)])
        assert lrs == [0.5 * m, 2.0 * m]


def test_scheduler_state_dict_resumes():
    norms = [2.0, 1.0, 1.5, 0.7, 0.9, 1.1, 0.4, 0.6]
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0)
    sched = RefinedLR(opt, norms, smoothing=0.0)
    for _ in range(3):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    opt2.load_state_dict(opt.state_dict())
    sched2 = RefinedLR(opt2, [1.0, 1.0], smoothing=0.0)  # different schedule, replaced by the state
    sched2.load_state_dict(state)
    for _ in range(4):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
    torch.testing.assert_close(sched2.multipliers, refined_schedule(norms, smoothing=0.0), rtol=0, atol=0)


def test_recorder_records_the_global_norm_at_each_step():
    torch.manual_seed(0)
    a = torch.randn(3, 4, dtype=DT, requires_grad=True)
    b = torch.randn(5, dtype=DT, requires_grad=True)
    unused = torch.randn(2, dtype=DT, requires_grad=True)  # never gets a gradient
    opt = torch.optim.SGD([a, b, unused], lr=0.05)
    rec = GradNormRecorder(opt)
    expected = []
    for _ in range(4):
        opt.zero_grad()
        (a.sin().sum() ** 2 + b.tanh().square().sum()).backward()
        expected.append(math.sqrt(float(a.grad.square().sum() + b.grad.square().sum())))
        opt.step()
    torch.testing.assert_close(rec.norms, torch.tensor(expected, dtype=DT), rtol=1e-14, atol=0)
    rec.remove()
    opt.step()
    assert len(rec.norms) == 4
    restored = GradNormRecorder(opt, attach=False)
    restored.load_state_dict(rec.state_dict())
    torch.testing.assert_close(restored.norms, rec.norms, rtol=0, atol=0)
    l1 = GradNormRecorder(opt, norm_type=1.0, attach=False).record()
    assert l1 == pytest.approx(float(a.grad.abs().sum() + b.grad.abs().sum()), rel=1e-14)


@pytest.mark.parametrize("bad", [[1.0], [], [1.0, 0.0, 2.0], [1.0, -1.0], [1.0, math.inf], [1.0, math.nan]])
def test_bad_norms_raise(bad):
    with pytest.raises(ValueError, match="grad_norms"):
        refined_schedule(bad)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="grad_norms"):
        refined_schedule(torch.ones(2, 3))
    with pytest.raises(TypeError, match="grad_norms"):
        refined_schedule("1, 2")
    with pytest.raises(TypeError, match="grad_norms"):
        refined_schedule([1.0, "2"])
    with pytest.raises(TypeError, match="grad_norms"):
        refined_schedule(torch.ones(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="smoothing"):
        refined_schedule([1.0, 2.0], smoothing=1.5)
    with pytest.raises(ValueError, match="power"):
        refined_schedule([1.0, 2.0], power=0.0)
    with pytest.raises(ValueError, match=r"power=inf; expected .*\(0\.0, inf\)"):  # was [nan, 0, 0]
        refined_schedule([0.5, 2.0, 1.0], power=math.inf)
    with pytest.raises(ValueError, match="total_steps"):
        refined_schedule([1.0, 2.0], total_steps=1)
    with pytest.raises(ValueError, match="warmup_steps"):
        refined_schedule([1.0, 2.0], warmup_steps=-1)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="grad_norms"):
        RefinedLR(opt, [1.0, -2.0])
    with pytest.raises(TypeError, match="optimizer"):
        GradNormRecorder([torch.zeros(1)])
    with pytest.raises(ValueError, match="norm_type"):
        GradNormRecorder(opt, norm_type=-1)
