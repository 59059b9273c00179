"""BSVRB: blockwise stochastic variance-reduced methods for multi-block bilevel optimisation.

Hu, Qiu, Guo, Zhang & Yang (2023), "Blockwise Stochastic Variance-Reduced Methods with Parallel
Speedup for Multi-Block Bilevel Optimization", ICML 2023, arXiv:2305.18730, as the authors'
reference code implements it (repository ``quanqihu/BSVRB_ICML2023``, file
``Hyperparameter_Optimization/HO/main.py``, commit ``7ad005f7d098c9abb695e0bbf050b77d598e6f53``,
function ``BSVRB``).  The blockwise estimator is MSVR: Jiang, Li, Wang, Zhang & Yang (2022),
"Multi-block-Single-probe Variance Reduced Estimator for Coupled Compositional Optimization",
NeurIPS 2022, arXiv:2207.08540; the upper-level estimator is STORM (Cutkosky & Orabona 2019,
arXiv:1905.10018).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from gradkit.bilevel._solver_base import (
    BilevelResult,
    History,
    check_finite,
    check_fn,
    check_int,
    check_like,
    check_pair,
    check_real,
    check_schedule,
    progress_bar,
)
from gradkit.implicit.projections import projection_l2_ball

__all__ = ["bsvrb", "msvr_update"]

#: ``fn(x, y_blocks, idx) -> (len(idx),)``: per-block upper (``f_i``) or lower (``g_i``) values
#: of the blocks ``idx`` with lower variables ``y_blocks = y[idx]``.
BlockObjective = Callable[[Tensor, Tensor, Tensor], Tensor]

VARIANTS = ("hvp", "hessian")
SAMPLINGS = ("uniform", "reshuffle")


def msvr_update(h: Tensor, idx: Tensor, new: Tensor, old: Tensor, *, alpha: float, gamma: float) -> Tensor:
    r"""One MSVR step (Jiang et al. 2022, arXiv:2207.08540) for ``m`` tracked block quantities
    ``h_i ≈ q_i(w_t)``, in the form of the BSVRB code (``main.py`` lines 277, 285, 292)::

        h_i ← (1 − α) h_i + (α + γ) q_i(w_t) − γ q_i(w_{t−1})     for the sampled i ∈ idx
        h_i ← h_i                                                 otherwise

    (equivalently ``(1 − α) h_i + α q_i(w_t) + γ (q_i(w_t) − q_i(w_{t−1}))``).  MSVR's analysis
    takes ``γ = (m − I) / (I (1 − α)) + (1 − α)`` for ``I = |idx|`` sampled blocks; with
    ``I = m`` that is ``γ = 1 − α`` and the step is STORM's: the error ``h_i − q_i(w_t)`` is
    ``(1 − α)`` times the previous one (exactly, when ``q_i`` is evaluated exactly).

    Args:
        h: ``(m, ...)`` current estimates (not modified).
        idx: ``(I,)`` sampled block indices (distinct).
        new: ``(I, ...)`` ``q_i`` at the current point ``w_t`` (same sample for both points).
        old: ``(I, ...)`` ``q_i`` at the previous point ``w_{t−1}``.
        alpha: ``α ∈ (0, 1]``.
        gamma: ``γ >= 0``.

    Returns:
        the updated ``(m, ...)`` estimates.
    """
    out = h.clone()
    out[idx] = (1.0 - alpha) * h[idx] + (alpha + gamma) * new - gamma * old
    return out


def _block_values(fn: BlockObjective, name: str, x: Tensor, yb: Tensor, idx: Tensor) -> Tensor:
    out = fn(x, yb, idx)
    if not isinstance(out, Tensor) or out.shape != idx.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{name}(x, y_blocks, idx) must return one value per block, shape {tuple(idx.shape)}; got {got}")
    return out


def _project_ball(v: Tensor, radius: float | None) -> Tensor:
    """Each row ``v_i`` onto ``{‖v_i‖ <= R}`` (``main.py`` lines 322-324); ``None``: unchanged."""
    if radius is None:
        return v
    return projection_l2_ball(v.reshape(len(v), -1), radius).reshape(v.shape)


def _rescale_up(H: Tensor, bound: float) -> Tensor:
    """``proj_mat`` of ``main.py`` (lines 137-142), per block: ``H ← (b / ‖H‖_F) H`` where
    ``‖H‖_F < b``, else unchanged (a zero matrix becomes ``(b / √d) I``)."""
    if bound == 0.0:
        return H
    d = H.shape[-1]
    norm = torch.linalg.matrix_norm(H)
    eye = torch.eye(d, dtype=H.dtype, device=H.device).expand_as(H)
    H = torch.where((norm == 0).reshape(-1, 1, 1), eye, H)
    norm = torch.where(norm == 0, torch.full_like(norm, math.sqrt(d)), norm)
    scale = torch.where(norm < bound, bound / norm, torch.ones_like(norm))
    return H * scale.reshape(-1, 1, 1)


def bsvrb(
    upper_fn: BlockObjective,
    lower_fn: BlockObjective,
    x0: Tensor,
    y0: Tensor,
    *,
    steps: int,
    blocks_per_step: int = 1,
    variant: str = "hvp",
    lr_x: float | Callable[[int], float] = 1e-3,
    lr_y: float = 0.5,
    lr_v: float | None = None,
    alpha: float = 0.9,
    gamma: float | None = 1.0,
    beta: float = 0.9,
    v_radius: float | None = 10.0,
    hessian_bound: float = 0.0,
    sampling: str = "uniform",
    v0: Tensor | None = None,
    hessian0: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    record_iterates: bool = False,
) -> BilevelResult:
    r"""BSVRB (Hu, Qiu, Guo, Zhang & Yang, ICML 2023, arXiv:2305.18730), as its authors' code does it.

    Solves the multi-block problem ``min_x Φ(x) = (1/m) Σ_i f_i(x, y_i*(x))`` with
    ``y_i*(x) = argmin_{y_i} g_i(x, y_i)`` (``g_i`` strongly convex), ``i = 1..m``, touching
    ``I = blocks_per_step`` blocks per iteration.  ``∇Φ = (1/m) Σ_i G_i`` with
    ``G_i = ∇_x f_i − ∇²_xy g_i [∇²_yy g_i]⁻¹ ∇_y f_i`` at ``y_i*(x)``.

    **Recursions, as implemented.**  State at the start of iteration ``t``: ``x_t``, ``y_t``,
    ``v_t`` (or ``H_t``), the estimators ``s``, ``u``, ``z`` and the previous iterate
    ``(x_{t−1}, y_{t−1}, v_{t−1}, H_{t−1})``.  Sample ``I`` distinct blocks ``S_t``; every
    "new" quantity below is evaluated at ``(x_t, y_{i,t}, v_{i,t})`` and every "old" one at
    ``(x_{t−1}, y_{i,t−1}, v_{i,t−1})`` (the previous *iteration*, not the last visit of
    block ``i``), both before this iteration's updates.  For ``i ∈ S_t``::

        s_i ← (1−α) s_i + (α+γ) ∇_y g_i(new) − γ ∇_y g_i(old)                      MSVR, lines 274-277

    ``variant="hvp"`` (BSVRB^v2, the default: variance-reduced tracking of Hessian-vector
    products; ``r_i(x, y, v) = ∇²_yy g_i(x, y) v − ∇_y f_i(x, y)``)::

        u_i ← (1−α) u_i + (α+γ) r_i(new) − γ r_i(old)                              lines 279-285
        G_i(x, y, v) = ∇_x f_i(x, y) − ∇²_xy g_i(x, y) v                           lines 305-307
        dc_i = t − t_i   (t_i: the last iteration that sampled i, −1 if none; delay_count + 1)
        y_i ← y_i − τ dc_i s_i,   v_i ← Π_{‖v‖≤R}(v_i − τ_v dc_i u_i)   (i ∈ S_t only)   lines 315-329

    ``variant="hessian"`` (BSVRB^v1: tracking of the Hessians themselves, dense, ``d × d`` per
    block, ``d`` = entries of one ``y_i``; for small blocks)::

        H_i ← P_b[(1−α) H_i + (α+γ) ∇²_yy g_i(new) − γ ∇²_yy g_i(old)]             lines 287-293
        P_b(H) = (b/‖H‖_F) H if ‖H‖_F < b else H                                   lines 137-142
        G_i(new) = ∇_x f_i − ∇²_xy g_i H_{i,t}⁻¹ ∇_y f_i at (x_t, y_{i,t}),
        G_i(old) the same at (x_{t−1}, y_{i,t−1}) with H_{i,t−1}                   lines 298-304
        y_j ← y_j − τ s_j for every block j = 1..m (unsampled ones with their last s_j)  312-314

    then, in both variants, with ``Ḡ = (1/I) Σ_{i ∈ S_t} G_i``::

        z ← (1−β)(z − Ḡ(old)) + Ḡ(new),   x_{t+1} = x_t − η_t z                     STORM, lines 331-334

    The ``dc_i`` and ``Π`` use the ``s_i``, ``u_i`` just updated; ``Ḡ(new)``/``Ḡ(old)`` use
    ``v_t``/``v_{t−1}`` (``H_t``/``H_{t−1}``), not the values this iteration produces; the
    previous iterate then becomes ``(x_t, y_t, v_t, H_t)`` (lines 336-340).  Line numbers are
    those of ``main.py`` at the commit cited in the module docstring; the code's symbols are
    ``p = x``, ``w = y``, ``eta = η``, ``tau = τ``, ``tau_v = τ_v``, ``v_bound = R``,
    ``H_bound = b``, ``z_1 = z``.  Per iteration: two gradient-of-gradient passes over the
    ``I`` sampled blocks (new and old point; for ``"hessian"`` also ``2d`` Hessian columns and
    two ``∇_y f`` passes) and one evaluation of each objective for the history; memory ``O(m)``
    rows (``O(m d²)`` for ``"hessian"``).

    **Step sizes.**  This is a single-loop method: ``y`` and ``v`` take one step per visit, so
    ``η`` must be small against ``τ μ`` (``μ`` the lower levels' strong convexity), and the
    catch-up ``τ dc_i`` (``m/I`` times ``τ`` on average) and the extrapolation
    ``γ (q(new) − q(old))`` both narrow the stable range of ``τ`` (with ``γ = 1``, ``α = 0.9``
    and ``I = m``, a quadratic lower level needs ``τ L < 22/29 ≈ 0.76`` rather than ``2``).  With
    constant ``β`` the STORM estimator keeps a ``β``-weighted share of the spread of the
    sampled ``G_i``: unless every block's own hypergradient vanishes at the solution, ``x``
    settles in a neighbourhood of ``x*`` of size growing with ``η`` and ``β`` (STORM-type
    analyses take both small; a decaying ``lr_x`` shrinks it).

    **Where we differ from the code, on purpose.**

    * Initialisation: the code draws ``s, u, z, v, H`` and a separate "previous" point
      ``(p_0, w_0, v_0, H_0)`` uniformly at random (lines 207-219).  Here ``s = u = 0``,
      ``z = 0``, ``v = v0`` (default 0), ``H = hessian0`` (default the identity) and the previous
      point is the initial one, ``(x_{−1}, y_{−1}, v_{−1}, H_{−1}) = (x_0, y_0, v_0, H_0)``, so
      the first iteration's corrections vanish (``s_i = α ∇_y g_i(x_0, y_i^0)`` for the blocks
      it samples).  Random estimators would only add a transient; a random previous point
      would make the first correction ``γ (q(new) − q(old))`` arbitrary.
    * Oracles are exact per block: ``upper_fn``/``lower_fn`` return the block objectives, with no
      within-block data sampling (the code draws one minibatch per sampled block and uses it at
      both points).  The block functions are called several times per iteration and must be
      deterministic.
    * ``f_i`` may depend on ``x``: ``G_i`` keeps the ``∇_x f_i`` term, which the code's problem
      (validation loss of the lower model only) does not have.
    * Block sampling: ``sampling="uniform"`` (default; ``I`` distinct blocks drawn uniformly,
      independently per iteration, the sampling MSVR's analysis assumes) or ``"reshuffle"`` (the code's, lines
      258-261: a fresh random permutation every ``⌊m/I⌋`` iterations, cut into consecutive
      batches; when ``I`` does not divide ``m`` the last ``m mod I`` blocks of each permutation
      are skipped, as there).
    * ``gamma=None`` selects MSVR's theoretical ``γ = (m − I)/(I(1 − α)) + (1 − α)`` (Jiang et
      al. 2022; ``1 − α`` when ``I = m``, where the estimators become STORM's).  The default
      ``γ = 1`` is the code's (argument default and ``--gamma 1`` in its scripts); the paper's
      text was not available to us to confirm which value it states.
    * ``hessian_bound`` defaults to 0 (no rescaling), the code's ``H_bound`` to 10: ``P_b``
      rescales the tracked Hessian whenever ``‖∇²_yy g_i‖_F < b``, which moves the tracking's
      fixed point and biases the hypergradient, so it is off unless asked for.  A zero ``H``
      is rescaled to ``(b/√d) I`` (the code would divide by zero).
    * Defaults otherwise follow the code's argument parser (lines 27-34; ``τ_v = τ`` from
      lines 180-183): ``η = 1e-3``, ``τ = 0.5``, ``τ_v = τ``, ``α = 0.9``, ``β = 0.9``,
      ``R = 10`` (its ``run_BSVRBv2.sh`` uses ``τ = τ_v = 1``); ``I = 1`` is ours (the code's
      10 needs ``m >= 10``).  They were tuned for its logistic-regression lower levels of small
      curvature; see **Step sizes**.  Its stage-wise decay (``--stag_decay``, lines 237-243) is
      available for ``η`` as a callable ``lr_x``; ``τ`` and ``τ_v`` are constant here.

    Args:
        upper_fn: ``(x, y_blocks, idx) -> (I,)`` values ``f_i(x, y_i)`` of the blocks ``idx``
            (``y_blocks = y[idx]``); ``upper_fn``/``lower_fn`` must be ``torch.func``-transformable
            and treat blocks independently.
        lower_fn: ``(x, y_blocks, idx) -> (I,)`` values ``g_i(x, y_i)``.
        x0: initial upper variable (any shape).
        y0: ``(m, ...)`` initial lower variables, one row per block.
        steps: number of iterations.
        blocks_per_step: ``I``, blocks sampled per iteration (``1 <= I <= m``).
        variant: ``"hvp"`` (BSVRB^v2) or ``"hessian"`` (BSVRB^v1).
        lr_x: ``η_t > 0`` (number or callable ``t -> η_t``).
        lr_y: ``τ > 0``.
        lr_v: ``τ_v > 0`` (``"hvp"`` only); ``None``: ``τ_v = τ`` (the code's default).
        alpha: MSVR ``α ∈ (0, 1]``.
        gamma: MSVR ``γ >= 0``; ``None``: the theoretical value above.
        beta: STORM ``β ∈ (0, 1]``.
        v_radius: ``R > 0``, radius of the ball each ``v_i`` is projected on (``"hvp"``);
            ``None``: no projection.
        hessian_bound: ``b >= 0`` of ``P_b`` (``"hessian"``); 0: no rescaling.
        sampling: ``"uniform"`` or ``"reshuffle"`` (see above).
        v0: ``(m, ...)`` initial ``v`` like ``y0`` (``"hvp"``; default zeros).
        hessian0: ``(m, d, d)`` initial ``H`` (``"hessian"``; default identities).
        generator: ``torch.Generator`` for the block sampling (default: torch's global one).
        progress: show a ``tqdm`` bar.
        record_iterates: also keep every ``x``, ``y`` and the estimate ``z_t`` in the history.

    Returns:
        :class:`~gradkit.bilevel._solver_base.BilevelResult`.  ``state``: ``"s"``, ``"z"`` and,
        for ``"hvp"``, ``"u"``, ``"v"`` and ``"delay"`` (``(m,)`` iterations since each block
        was last sampled, so its next ``dc`` is ``delay + 1``), for ``"hessian"``,
        ``"hessian"`` (the ``(m, d, d)`` tracked ``H``).  ``history``: ``"upper"``/``"lower"``
        (means of ``f_i``/``g_i`` over the sampled blocks at ``(x_t, y_t)``), ``"blocks"``
        (the sampled indices, a list per iteration), ``"estimate_norm"`` (``‖z‖`` of the step),
        for ``"hvp"`` ``"catch_up"`` (the ``dc_i`` of the sampled blocks, in the order of
        ``"blocks"``), and with ``record_iterates`` also ``"x"``, ``"y"`` (after each
        iteration) and ``"estimate"`` (the ``z`` that moved ``x_t``).
    """
    check_fn(upper_fn, "upper_fn", "(x, y_blocks, idx)")
    check_fn(lower_fn, "lower_fn", "(x, y_blocks, idx)")
    x, y = check_pair(x0, y0)
    if y.ndim < 1:
        raise ValueError(f"y0 must have one row per block, shape (m, ...); got shape {tuple(y.shape)}")
    m = y.shape[0]
    steps = check_int("steps", steps, 1)
    n_blocks = check_int("blocks_per_step", blocks_per_step, 1)
    if n_blocks > m:
        raise ValueError(f"blocks_per_step must be <= the number of blocks m = {m} (rows of y0), got {n_blocks}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    eta = check_schedule("lr_x", lr_x)
    tau = check_real("lr_y", lr_y, low=0.0, low_open=True)
    tau_v = tau if lr_v is None else check_real("lr_v", lr_v, low=0.0, low_open=True)
    alpha = check_real("alpha", alpha, low=0.0, high=1.0, low_open=True)
    beta = check_real("beta", beta, low=0.0, high=1.0, low_open=True)
    if gamma is None:
        if n_blocks < m and alpha == 1.0:
            raise ValueError("gamma=None (MSVR's theoretical value) needs alpha < 1 when blocks_per_step < m; got alpha=1")
        gamma = (m - n_blocks) / (n_blocks * (1.0 - alpha)) if n_blocks < m else 0.0
        gamma += 1.0 - alpha
    gamma = check_real("gamma", gamma, low=0.0)
    radius = None if v_radius is None else check_real("v_radius", v_radius, low=0.0, low_open=True)
    bound = check_real("hessian_bound", hessian_bound, low=0.0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    hvp_variant = variant == "hvp"
    if hvp_variant and hessian0 is not None:
        raise ValueError("hessian0 is used by variant='hessian' only; got variant='hvp'")
    if not hvp_variant and v0 is not None:
        raise ValueError("v0 is used by variant='hvp' only; got variant='hessian'")
    row = tuple(y.shape[1:])
    d = math.prod(row)
    if hvp_variant:
        v = torch.zeros_like(y) if v0 is None else check_like(v0, y, "v0")
    else:
        eye = torch.eye(d, dtype=y.dtype, device=y.device)
        H = eye.expand(m, d, d).clone() if hessian0 is None else check_like(hessian0, eye.expand(m, d, d), "hessian0")

    def lower_sum(a: Tensor, yb: Tensor, idx: Tensor) -> Tensor:
        return _block_values(lower_fn, "lower_fn", a, yb, idx).sum()

    def upper_sum(a: Tensor, yb: Tensor, idx: Tensor) -> Tensor:
        return _block_values(upper_fn, "upper_fn", a, yb, idx).sum()

    def probe(a: Tensor, yb: Tensor, wb: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """At ``(a, y_i, w_i)``, ``i ∈ idx``: ``∇_y g_i``, ``∇²_yy g_i w_i − ∇_y f_i`` (both
        ``(I, ...)``) and ``(1/I) Σ_i (∇_x f_i − ∇²_xy g_i w_i)``: the gradients in ``(a, y)`` of
        ``Σ_i ⟨∇_y g_i, w_i⟩ − f_i`` with ``w`` held fixed."""
        def phi(a_: Tensor, y_: Tensor) -> tuple[Tensor, Tensor]:
            g_y = torch.func.grad(lower_sum, argnums=1)(a_, y_, idx)
            return (g_y * wb).sum() - upper_sum(a_, y_, idx), g_y

        (d_x, d_y), g_y = torch.func.grad(phi, argnums=(0, 1), has_aux=True)(a, yb)
        return g_y.detach(), d_y.detach(), (-d_x / len(idx)).detach()

    def hessians(a: Tensor, yb: Tensor, idx: Tensor) -> Tensor:
        """``(I, d, d)`` dense ``∇²_yy g_i`` (one reverse-over-reverse product per column)."""
        _, pullback = torch.func.vjp(lambda y_: torch.func.grad(lower_sum, argnums=1)(a, y_, idx), yb)
        basis = torch.eye(d, dtype=yb.dtype, device=yb.device).reshape(d, 1, *row).expand(d, len(idx), *row)
        cols = torch.func.vmap(pullback)(basis)[0]  # (d, I, *row): [k, i] = row k of ∇²g_i
        return cols.reshape(d, len(idx), d).transpose(0, 1).detach()

    def solve(Hb: Tensor, rhs: Tensor) -> Tensor:
        return torch.linalg.solve(Hb, rhs.reshape(len(rhs), d, 1)).reshape(rhs.shape)

    def upper_grad_y(a: Tensor, yb: Tensor, idx: Tensor) -> Tensor:
        return torch.func.grad(upper_sum, argnums=1)(a, yb, idx).detach()

    perm = torch.arange(0)  # the current pass's order (reshuffled at its first block)
    per_pass = m // n_blocks

    def sample(t: int) -> Tensor:
        nonlocal perm
        if sampling == "uniform":
            return torch.randperm(m, generator=generator)[:n_blocks].to(y.device)
        k = t % per_pass
        if k == 0:
            perm = torch.randperm(m, generator=generator)
        return perm[k * n_blocks:(k + 1) * n_blocks].to(y.device)

    s = torch.zeros_like(y)
    z = torch.zeros_like(x)
    x_prev, y_prev = x, y
    if hvp_variant:
        u = torch.zeros_like(y)
        v_prev = v
        delay = torch.zeros(m, dtype=torch.long, device=y.device)
    else:
        H_prev = H
    history = History(record_iterates)
    bar = progress_bar(steps, "BSVRB", progress)
    for t in range(steps):
        idx = sample(t)
        yb, yb_old = y[idx], y_prev[idx]
        with torch.no_grad():
            upper = _block_values(upper_fn, "upper_fn", x, yb, idx).mean()
            lower = _block_values(lower_fn, "lower_fn", x, yb, idx).mean()
        check_finite(float(upper), "upper_fn", t)
        if hvp_variant:
            vb = v[idx]
            q_new, r_new, G_new = probe(x, yb, vb, idx)
            q_old, r_old, G_old = probe(x_prev, yb_old, v_prev[idx], idx)
            s = msvr_update(s, idx, q_new, q_old, alpha=alpha, gamma=gamma)
            u = msvr_update(u, idx, r_new, r_old, alpha=alpha, gamma=gamma)
            dc = delay[idx] + 1
            scale = dc.to(y.dtype).reshape(-1, *([1] * len(row)))
            y_next = y.index_copy(0, idx, yb - tau * scale * s[idx])
            v_next = v.index_copy(0, idx, _project_ball(vb - tau_v * scale * u[idx], radius))
            delay = delay + 1
            delay[idx] = 0
        else:
            w_new = solve(H[idx], upper_grad_y(x, yb, idx))
            w_old = solve(H_prev[idx], upper_grad_y(x_prev, yb_old, idx))
            q_new, _, G_new = probe(x, yb, w_new, idx)
            q_old, _, G_old = probe(x_prev, yb_old, w_old, idx)
            s = msvr_update(s, idx, q_new, q_old, alpha=alpha, gamma=gamma)
            tracked = msvr_update(H, idx, hessians(x, yb, idx), hessians(x_prev, yb_old, idx), alpha=alpha, gamma=gamma)
            H_next = tracked.index_copy(0, idx, _rescale_up(tracked[idx], bound))
            y_next = y - tau * s
        z = (1.0 - beta) * (z - G_old) + G_new
        x_prev, x = x, x - eta(t) * z
        y_prev, y = y, y_next
        if hvp_variant:
            v_prev, v = v, v_next
        else:
            H_prev, H = H, H_next
        history.record(upper=upper, lower=lower, blocks=idx.tolist(), estimate_norm=torch.linalg.vector_norm(z))
        if hvp_variant:
            history.data.setdefault("catch_up", []).append(dc.tolist())
        if record_iterates:
            history.data.setdefault("estimate", []).append(z.clone())
        history.iterates(x, y)
        bar.update(1)
    bar.close()
    state = {"s": s, "z": z}
    if hvp_variant:
        state.update(u=u, v=v, delay=delay)
    else:
        state["hessian"] = H
    return BilevelResult(x, y, history.data, state)
