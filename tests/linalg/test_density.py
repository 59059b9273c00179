"""Stochastic Lanczos quadrature spectral density on planted spectra."""

from __future__ import annotations

import math

import matplotlib
import pytest
import torch

from gk_testing import with_spectrum
from gradkit.linalg import LinearOperator, SpectralDensity, spectral_density

matplotlib.use("Agg")

DT = torch.float64


def _planted(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """90% of the eigenvalues in [-0.5, 0.5], 6% near 10, 4% near 20."""
    g = torch.Generator().manual_seed(5)
    bulk = torch.rand(180, generator=g, dtype=DT) - 0.5
    out10 = 10 + 0.1 * torch.rand(12, generator=g, dtype=DT)
    out20 = 20 + 0.1 * torch.rand(8, generator=g, dtype=DT)
    evals = torch.cat([bulk, out10, out20])
    return with_spectrum(evals), evals


def _sphere_sd(values: torch.Tensor, num_probes: int) -> float:
    """Std of the mean over probes of v^T diag(values) v, v uniform on the unit sphere:
    per probe 2/(n+2) (mean(values^2) - mean(values)^2)."""
    n = values.numel()
    var = 2 / (n + 2) * float(values.square().mean() - values.mean() ** 2)
    return math.sqrt(var / num_probes)


@pytest.fixture(scope="module")
def planted():
    A, evals = _planted()
    return A, evals, spectral_density(A, num_probes=30, lanczos_steps=40)


def test_integrates_to_one_and_shapes(planted):
    _, _, sd = planted
    assert isinstance(sd, SpectralDensity)
    assert sd.grid.shape == sd.density.shape == (1000,)
    assert sd.nodes.shape == sd.weights.shape == (30, 40)
    torch.testing.assert_close(sd.weights.sum(1), torch.ones(30, dtype=DT))
    assert abs(float(torch.trapezoid(sd.density, sd.grid)) - 1) < 1e-3
    assert bool((sd.density >= 0).all())
    # Ghorbani et al.'s width: sigma^2 = 1e-5 on the spectrum normalised to [-1, 1].
    half = (float(sd.nodes.max()) - float(sd.nodes.min())) / 2
    assert sd.sigma == pytest.approx(math.sqrt(1e-5) * half)


def test_mass_near_outliers_matches_histogram(planted):
    _, evals, sd = planted
    for lo, hi in ((-1.0, 1.0), (9.0, 11.0), (19.0, 21.0)):
        inside = ((evals >= lo) & (evals <= hi)).to(DT)
        frac = float(inside.mean())
        bound = 4 * _sphere_sd(inside, 30)  # Beta(c/2, (n-c)/2) fluctuation of the weights
        assert abs(float(sd.mass(lo, hi)) - frac) <= bound, (lo, hi, float(sd.mass(lo, hi)), frac, bound)
        # the grid agrees with the exact mass
        sel = (sd.grid >= lo) & (sd.grid <= hi)
        assert abs(float(torch.trapezoid(sd.density[sel], sd.grid[sel])) - float(sd.mass(lo, hi))) < 2e-3
    assert float(sd.mass(2.0, 8.0)) < 1e-6  # nothing in the gap


def test_first_moment_is_trace_over_n(planted):
    A, evals, sd = planted
    moment = float(torch.trapezoid(sd.grid * sd.density, sd.grid))
    assert abs(moment - float(A.trace()) / 200) <= 4 * _sphere_sd(evals, 30)
    # exactly the mean of the per-probe quadratures sum_k tau_k theta_k = v^T A v
    torch.testing.assert_close(moment, float((sd.weights * sd.nodes).sum(1).mean()), rtol=1e-6, atol=0)


def test_log_scale_integrates_to_one_on_its_axis(planted):
    A, evals, sd = planted
    sdl = spectral_density(A, num_probes=30, lanczos_steps=40, log_scale=True)
    assert sdl.log_scale and sdl.epsilon == 1e-5
    assert abs(float(torch.trapezoid(sdl.density, sdl.grid)) - 1) < 1e-3
    torch.testing.assert_close(sdl.nodes, sd.nodes)  # same probes: same quadrature
    assert float(sdl.grid[-1]) > math.log(20) > float(sdl.grid[0])
    # The outliers near 20 in u = ln(|lambda| + eps).
    torch.testing.assert_close(sdl.mass(math.log(19), math.log(21)), sd.mass(19.0, 21.0), rtol=0, atol=1e-3)
    # Mass of |lambda| < 0.5 where it sits on the log axis.
    frac = float((evals.abs() < 0.5).to(DT).mean())
    assert abs(float(sdl.mass(math.log(1e-5), math.log(0.5))) - frac) < 0.05


def test_exact_when_lanczos_spans_the_space():
    # Few distinct eigenvalues: the quadrature is exact, each probe sees a measure on them.
    evals = torch.tensor([1.0] * 30 + [4.0] * 10, dtype=DT)
    sd = spectral_density(with_spectrum(evals), num_probes=200, lanczos_steps=10, sigma=0.05)
    assert torch.isnan(sd.nodes[:, 2:]).all() and (sd.weights[:, 2:] == 0).all()  # invariant after 2 steps
    assert abs(float(sd.mass(3.5, 4.5)) - 0.25) <= 4 * _sphere_sd((evals == 4).to(DT), 200)
    assert abs(float(torch.trapezoid(sd.density, sd.grid)) - 1) < 1e-3


def test_identity_and_operator_input():
    n = 50
    op = LinearOperator((n, n), lambda x: 2 * x, dtype=DT, symmetric=True)
    sd = spectral_density(op, num_probes=2, lanczos_steps=5)
    assert abs(float(torch.trapezoid(sd.density, sd.grid)) - 1) < 1e-3
    assert abs(float(sd.grid[sd.density.argmax()]) - 2) < 1e-3


def test_grid_sigma_seed_options():
    A, _ = _planted()
    grid = torch.linspace(-5, 25, 3001, dtype=DT)
    sd = spectral_density(A, num_probes=3, lanczos_steps=20, grid=grid, sigma=0.2, seed=1)
    assert torch.equal(sd.grid, grid) and sd.sigma == 0.2
    assert abs(float(torch.trapezoid(sd.density, sd.grid)) - 1) < 1e-3
    same = spectral_density(A, num_probes=3, lanczos_steps=20, grid=grid, sigma=0.2, seed=1)
    other = spectral_density(A, num_probes=3, lanczos_steps=20, grid=grid, sigma=0.2, seed=2)
    assert torch.equal(sd.density, same.density) and not torch.equal(sd.density, other.density)
    with pytest.warns(UserWarning, match="below the grid spacing"):
        spectral_density(A, num_probes=1, lanczos_steps=5, num_points=50, sigma=1e-4)
    # Default width too narrow for 200 points: widened to the spacing, still integrates to 1.
    coarse = spectral_density(A, num_probes=2, lanczos_steps=20, num_points=200)
    assert abs(float(torch.trapezoid(coarse.density, coarse.grid)) - 1) < 1e-3


def test_plot_returns_axes(planted):
    import matplotlib.pyplot as plt

    _, _, sd = planted
    ax = sd.plot(log_y=True, color="k")
    assert ax.get_yscale() == "log" and len(ax.lines) == 1
    fig, ax2 = plt.subplots()
    assert sd.plot(ax2) is ax2
    plt.close("all")


def test_bad_input():
    A, _ = _planted()
    with pytest.raises(ValueError, match=r"num_probes must be an int in \[1, inf\], got 0"):
        spectral_density(A, num_probes=0)
    with pytest.raises(ValueError, match=r"lanczos_steps must be an int in \[1, inf\], got 0"):
        spectral_density(A, lanczos_steps=0)
    with pytest.raises(ValueError, match=r"num_points must be an int in \[2, inf\], got 1"):
        spectral_density(A, num_points=1)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0, got -1.0"):
        spectral_density(A, sigma=-1.0)
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0, got 0.0"):
        spectral_density(A, log_scale=True, epsilon=0.0)
    with pytest.raises(ValueError, match="grid must be a 1-D tensor"):
        spectral_density(A, grid=torch.zeros(3, 3, dtype=DT))
    with pytest.raises(ValueError, match="grid must be finite and strictly increasing"):
        spectral_density(A, grid=torch.tensor([1.0, 0.0], dtype=DT))
    with pytest.raises(ValueError, match="A must be symmetric"):
        spectral_density(torch.triu(A))
    sd = spectral_density(A, num_probes=1, lanczos_steps=5)
    with pytest.raises(ValueError, match="needs a <= b"):
        sd.mass(2.0, 1.0)
