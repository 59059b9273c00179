"""AdamWSN: subset-norm adaptive step sizes and subspace momentum (Nguyen and Nguyen, 2024)."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable
from typing import Any

import torch

from ._base import (PACK_NUMEL, PerTensorOptimizer, as_float, check_range, compiled,
                    opmath_dtype)

__all__ = ["AdamWSN", "subset_layout", "SUBSETS", "adamwsn_kernel", "adamwsn_cols_kernel"]

SUBSETS = ("heuristic", "rows", "cols", "all")


def _largest_divisor(n: int, k: int) -> int:
    """The largest divisor of ``n`` that is ``<= k`` (at least 1): the reference code's subset-size rule."""
    k = max(1, min(k, n))
    while n % k:
        k -= 1
    return k


def subset_layout(shape: torch.Size | tuple[int, ...], subset_size: int | str) -> tuple[tuple[int, int], int]:
    """How a tensor of ``shape`` is split into subsets: ``(view, dim)``.

    The gradient is viewed as the matrix ``view`` and squared-summed over ``dim``: every line
    along ``dim`` is one subset (``v`` has ``view`` with ``dim`` set to 1).

    * ``"heuristic"`` (the paper's default): tensors with >= 2 dimensions, viewed as
      ``(shape[0], rest)``, get one subset per row when rows >= columns and one per column
      otherwise (subsets run along the smaller dimension, so there are ``max(R, C)`` of them);
      0-D and 1-D tensors are not reduced (one subset per coordinate), as in the authors' code;
    * ``"rows"`` / ``"cols"``: one subset per row / column of ``(shape[0], rest)``;
    * ``"all"``: a single subset (AdaGrad-Norm);
    * an int ``s > 0``: contiguous chunks of the flattened tensor of size the largest divisor of
      ``numel`` not above ``s`` (``1`` = one subset per coordinate, AdaGrad/Adam);
    * an int ``-c < 0``: the same with ``s = int(sqrt(numel) / c)`` (pytorch-optimizer's
      ``subset_size=-1`` default and the authors' README; their code, timmytonga/sn-sm
      ``adamw_sng.py``, defaults to ``-2``).
    """
    n = math.prod(shape)
    mat = len(shape) >= 2
    rows, cols = (shape[0], n // max(shape[0], 1)) if mat else (n, 1)
    if subset_size == "heuristic":
        if not mat:
            return (n, 1), 1
        subset_size = "rows" if rows >= cols else "cols"
    if subset_size == "rows":
        return (rows, cols), 1
    if subset_size == "cols":
        return (rows, cols), 0
    if subset_size == "all":
        return (1, n), 1
    s = subset_size if subset_size > 0 else int(math.sqrt(n) / -subset_size)
    s = _largest_divisor(n, s)
    return (n // s, s), 1


def _sq_shape(view: tuple[int, int], dim: int) -> tuple[int, int]:
    return (1, view[1]) if dim == 0 else (view[0], 1)


def _sn_step(param, grad, exp_avg_sq, exp_avg, h, maximize: bool, dim: int) -> None:
    beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, eps, decay = (h[i] for i in range(7))
    g = grad.to(h.dtype)
    if maximize:
        g = -g
    v = exp_avg_sq.to(h.dtype) * beta2 + one_minus_beta2 * (g * g).sum(dim=dim, keepdim=True)
    u = g
    if exp_avg is not None:
        u = exp_avg.to(h.dtype) * beta1 + one_minus_beta1 * g
        exp_avg.copy_(u)
    param.copy_((param.to(h.dtype) - step_size * (u / (v.sqrt() + eps))) * decay)
    exp_avg_sq.copy_(v)


def adamwsn_kernel(param, grad, exp_avg_sq, exp_avg=None, *, h, maximize: bool) -> None:
    """Subset-Norm step with full momentum (or none: ``exp_avg=None``) on the rows of a matrix.

    ``param``, ``grad``, ``exp_avg``: ``(N, C)``, one subset per row (the rows of one or more
    tensors); ``exp_avg_sq``: ``(N, 1)``.  ``h = [beta1, 1 - beta1, beta2, 1 - beta2 (1 when
    beta2 = 1), step size, eps, 1 - lr * weight_decay]``: the arithmetic of :meth:`AdamWSN._update`.
    """
    _sn_step(param, grad, exp_avg_sq, exp_avg, h, maximize, 1)


def adamwsn_cols_kernel(param, grad, exp_avg_sq, exp_avg=None, *, h, maximize: bool) -> None:
    """:func:`adamwsn_kernel` with one subset per *column*: ``(B, R, C)`` tensors, ``exp_avg_sq``
    ``(B, 1, C)`` (a separate function: ``torch.compile`` caches graphs per function)."""
    _sn_step(param, grad, exp_avg_sq, exp_avg, h, maximize, 1)


class AdamWSN(PerTensorOptimizer):
    r"""AdamW with Subset-Norm step sizes and Subspace-Momentum (AdamSNSM).

    Nguyen and Nguyen, "Lean and Mean Adaptive Optimization via Subset-Norm and Subspace-Momentum
    with Convergence Guarantees", ICML 2025, arXiv:2411.07120 (v1: "Efficient Adaptive Optimization
    via Subset-Norm and Subspace-Momentum", 2024), and the authors' code (timmytonga/sn-sm,
    ``GenericOptim`` with ``second_moment_type="sn"``, ``momentum_type="sm"``).

    **Subset-Norm.** The coordinates are partitioned into subsets :math:`\Psi_1, \dots, \Psi_c`
    (:func:`subset_layout`); each subset shares one adaptive step size:

    .. math::
        v_{t,i} = \beta_2 v_{t-1,i} + (1-\beta_2)\,\|g_{t,\Psi_i}\|^2
        \quad(\beta_2 = 1:\ v_{t,i} = v_{t-1,i} + \|g_{t,\Psi_i}\|^2,\ \text{AdaGrad})

    One subset is AdaGrad-Norm (Ward et al.), singleton subsets are AdaGrad/Adam.

    **Subspace-Momentum.** For weights with >= 2 dimensions (viewed as ``(shape[0], rest)``) and
    ``rank`` :math:`k` below the smaller dimension, momentum lives in the span of the top-:math:`k`
    singular vectors of the gradient (:math:`P`, :math:`k \times n`, orthonormal rows, on the
    smaller side as in GaLore), recomputed every :math:`T` steps, and plain SGD acts on the
    complement:

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\,P g_t, \qquad
        u_t = P^\top m_t + (g_t - P^\top P g_t) \\
        \theta_{t+1} &= \Big(\theta_t - \eta_t\,\frac{u_t}{\sqrt{v_{t,\psi(\cdot)}} + \epsilon}\Big)
              (1 - \eta\lambda), \qquad
        \eta_t = \eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}

    (:math:`P g` is :math:`G P^\top` or :math:`P G` depending on the side).  When :math:`P` is
    recomputed (steps :math:`1, T+1, 2T+1, \dots`) the momentum is reset to zero, as in the
    authors' code (timmytonga/sn-sm ``subspace_momentum.py``, commit afec62a, which refreshes at
    steps :math:`1, T, 2T, \dots` and starts using the zeroed buffer one step late; we refresh
    every :math:`T` steps from the first); tensors with fewer than 2 dimensions, ``rank=None`` or ``rank`` >= the smaller
    dimension use ordinary full momentum :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t`,
    :math:`u_t = m_t` (the subspace would be everything), and :math:`\beta_1 = 0` keeps no
    momentum (:math:`u_t = g_t`).

    Symbols: :math:`\eta` = ``lr``, :math:`(\beta_1, \beta_2)` = ``betas`` (:math:`\beta_2 \in [0, 1]`,
    1 = AdaGrad accumulation), :math:`\epsilon` = ``eps``, :math:`\lambda` = ``weight_decay``
    (decoupled, applied after the step as in the authors' code and pytorch-optimizer), ``subset_size``,
    :math:`k` = ``rank``, :math:`T` = ``update_proj_gap``, ``bias_correction`` (the authors'
    ``correct_bias``; the :math:`\beta_2` correction is skipped when :math:`\beta_2 = 1`, where
    :math:`v` is a sum, not an average).  Note that :math:`\epsilon` is added to
    :math:`\sqrt{v}` before the bias correction, as in the authors' code.  Defaults: betas
    (0.9, 0.999), eps 1e-6, subset_size ``"heuristic"``, rank 128 and update_proj_gap 200 (the
    authors' code and example scripts); lr 1e-3 (the authors advise about 10x Adam's learning rate
    with these subsets) and weight_decay 0.  The authors apply Subset-Norm and Subspace-Momentum to
    ``nn.Linear`` weights only (embeddings and the rest get Adam); an optimizer sees tensors, not
    modules, so here every tensor with two or more dimensions gets them: put embeddings in a group
    with ``subset_size=1, rank=None`` (Adam) to match.  Their AdaGrad configuration
    (:math:`\beta_2 = 1`) runs with ``bias_correction=False``.

    State per parameter: ``exp_avg`` (full shape, or :math:`N \times k` in the subspace),
    ``exp_avg_sq`` (one value per subset) and, with Subspace-Momentum, ``projector``
    (:math:`k \times n`), all in the parameter's dtype (16-bit parameters are computed in
    float32).  At the defaults a 2048 x 2048 float32 weight keeps about 0.5 bytes per parameter
    (Adam: 8).  Complex parameters are refused.  One implementation serves all paths:
    ``foreach``/``fused`` are accepted for drop-in compatibility and run it.
    """

    supports_complex = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        subset_size: int | str = "heuristic",
        rank: int | None = 128,
        update_proj_gap: int = 200,
        bias_correction: bool = True,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      subset_size=subset_size, rank=rank, update_proj_gap=update_proj_gap,
                                      bias_correction=bias_correction),
                         maximize=maximize, foreach=foreach, fused=fused)

    def _validate(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{name}: invalid betas={betas!r}; expected a tuple (beta1 in [0, 1), beta2 in [0, 1])")
        check_range(name, "betas[0]", betas[0], 0.0, 1.0, high_open=True)
        check_range(name, "betas[1]", betas[1], 0.0, 1.0)
        check_range(name, "eps", group["eps"], 0.0)
        check_range(name, "weight_decay", group["weight_decay"], 0.0)
        s = group["subset_size"]
        if not (s in SUBSETS or (isinstance(s, numbers.Integral) and not isinstance(s, bool) and s != 0)):
            raise ValueError(f"{name}: invalid subset_size={s!r}; expected one of {list(SUBSETS)} or a non-zero int")
        k = group["rank"]
        if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
            raise ValueError(f"{name}: invalid rank={k!r}; expected None or an int >= 1")
        gap = group["update_proj_gap"]
        if isinstance(gap, bool) or not isinstance(gap, numbers.Integral) or gap < 1:
            raise ValueError(f"{name}: invalid update_proj_gap={gap!r}; expected an int >= 1")
        if not isinstance(group["bias_correction"], bool):
            raise ValueError(f"{name}: invalid bias_correction={group['bias_correction']!r}; expected True or False")

    @staticmethod
    def _subspace(p: torch.Tensor, rank: int | None) -> tuple[bool, int] | None:
        """``(right, n)`` when ``p`` gets Subspace-Momentum (project columns if ``right``), else None."""
        if rank is None or p.dim() < 2:
            return None
        rows, cols = p.shape[0], p.numel() // max(p.shape[0], 1)
        n = min(rows, cols)
        return (rows >= cols, n) if rank < n else None

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] = 0
        if group["betas"][0] > 0 and self._subspace(p, group["rank"]) is None:
            state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros(_sq_shape(*subset_layout(p.shape, group["subset_size"])),
                                          dtype=p.dtype, device=p.device)

    # -- the step --------------------------------------------------------------------------------
    def _step_group(self, group: dict[str, Any]) -> None:
        """``foreach=False``: :meth:`_update` per tensor (the reference).  Otherwise tensors without
        Subspace-Momentum run :func:`adamwsn_kernel`: small tensors of one subset layout packed into
        one batch (states are views into per-layout buffers), large ones one by one; ``fused=True``
        compiles the kernel.  Tensors with Subspace-Momentum (SVD, projections) always take
        :meth:`_update`."""
        if group["foreach"] is False and not group["fused"]:
            return super()._step_group(group)
        params = self._with_grads(group)
        if not params:
            return
        states = self._states_of(group, params)
        subspace, layouts, sq_shapes = self._plan(group, params)
        for p, st, sq_shape in zip(params, states, sq_shapes):
            if not st:
                self._init_state(p, st, group)
            elif st["exp_avg_sq"].shape != sq_shape:
                self._check_state(p, st, group)  # raises
        for st in states:
            st["step"] += 1
        beta1 = group["betas"][0]
        for i in subspace:
            self._update(params[i], states[i], group)
        steps = [st["step"] for st in states]
        if steps.count(steps[0]) == len(steps):
            buckets = {(steps[0], *key): idx for key, idx in layouts.items()}
        else:  # tensors that skipped steps have their own bias corrections
            buckets = {}
            for key, idx in layouts.items():
                for i in idx:
                    buckets.setdefault((steps[i], *key), []).append(i)
        for (step, dtype, device, layout, dim, small), idx in buckets.items():
            h = torch.tensor(self._sn_hyper(group, step), dtype=opmath_dtype(dtype), device=device)
            eager = adamwsn_kernel if dim == 1 else adamwsn_cols_kernel
            kernel = compiled(eager) if group["fused"] else eager
            # (N, C) / (B, R, C) views of the parameter-shaped tensors, (N, 1) / (B, 1, C) of exp_avg_sq
            shape, sq_shape = ((-1, layout[1]), (-1, 1)) if dim == 1 else ((-1, *layout), (-1, 1, layout[1]))
            if small and (len(idx) > 1 or group["fused"]):
                members = [params[i] for i in idx]
                run = kernel if sum(p.numel() for p in members) > 1 else eager  # no size-1 recompilation
                self._step_sn_packed(group, run, members, [states[i] for i in idx], h, shape, sq_shape)
                continue
            for i in idx:
                p, st = params[i], states[i]
                if not all(t.is_contiguous() for t in (p, p.grad, st["exp_avg_sq"], st.get("exp_avg", p))):
                    self._update(p, st, group)
                    continue
                mom = st["exp_avg"].view(shape) if beta1 > 0 else None
                run = kernel if p.numel() > 1 else eager  # a size-1 input would force a recompilation
                run(p.view(shape), p.grad.view(shape), st["exp_avg_sq"].view(sq_shape), mom, h=h,
                    maximize=group["maximize"])

    def _plan(self, group: dict[str, Any], params: list[torch.Tensor]) -> tuple:
        """``(subspace, layouts, sq_shapes)`` for ``params``: the indices that take Subspace-Momentum,
        the others by ``(dtype, device, layout, dim, small)``, and each tensor's ``exp_avg_sq`` shape;
        cached per group while its tensors and layout options stay the same."""
        options = (group["subset_size"], group["rank"], group["betas"][0] > 0)
        plans = self.__dict__.setdefault("_sn_plans", {})
        cached = plans.get(id(group))
        if (cached is not None and cached[0] == options and len(cached[1]) == len(params)
                and all(map(operator.is_, cached[1], params))):
            return cached[2]
        subspace, layouts, sq_shapes = [], {}, []
        for i, p in enumerate(params):
            view, dim = subset_layout(p.shape, group["subset_size"])
            sq_shapes.append(torch.Size(_sq_shape(view, dim)))
            if options[2] and self._subspace(p, group["rank"]) is not None:
                subspace.append(i)
                continue
            # one subset per row: batched as the rows of one matrix (one subset per coordinate: any
            # shapes, flat); one per column: as a batch of matrices of one shape
            layout = ((-1, 1) if view[1] == 1 else (-1, view[1])) if dim == 1 else view
            layouts.setdefault((p.dtype, p.device, layout, dim, p.numel() <= PACK_NUMEL), []).append(i)
        plan = (subspace, layouts, sq_shapes)
        plans[id(group)] = (options, params, plan)
        return plan

    def _sn_hyper(self, group: dict[str, Any], step: int) -> list[float]:
        """The ``h`` of :func:`adamwsn_kernel` (the scalars of :meth:`_update`)."""
        lr, (beta1, beta2), wd = as_float(group["lr"]), group["betas"], group["weight_decay"]
        step_size = lr
        if group["bias_correction"]:
            step_size /= 1 - beta1**step
            if beta2 < 1:
                step_size *= math.sqrt(1 - beta2**step)
        return [beta1, 1 - beta1, beta2, 1.0 if beta2 == 1 else 1 - beta2, step_size, group["eps"],
                1 - lr * wd if wd else 1.0]

    def _step_sn_packed(self, group, kernel, params, states, h, shape, sq_shape) -> None:
        """One kernel call on the packed batch (buffers viewed as ``shape`` and ``sq_shape``)."""
        names = ("exp_avg_sq", "exp_avg") if group["betas"][0] > 0 else ("exp_avg_sq",)
        key = (id(group), len(params), id(params[0]), id(params[-1]), "sn")
        pack = self._packs.get(key)
        if pack is None or not all(map(operator.is_, pack.members, params)) or pack.names != names:
            shapes = [[tuple(st[n].shape) for st in states] for n in names]
            pack = self._new_pack(key, params, names, shapes)
        if not pack.installed_in(states):
            pack.adopt(states)
        pack.load(0, params)
        pack.load(1, [p.grad for p in params])
        buffers = [pack.buffers[0].view(shape), pack.buffers[1].view(shape), pack.buffers[2].view(sq_shape)]
        if len(names) == 2:
            buffers.append(pack.buffers[3].view(shape))
        kernel(*buffers, h=h, maximize=group["maximize"])
        torch._foreach_copy_(params, pack.views[0])

    def _numerator(self, g: torch.Tensor, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        """The momentum direction :math:`u_t` (full, subspace + complement, or the gradient itself)."""
        beta1 = group["betas"][0]
        if beta1 == 0:
            return g
        sub = self._subspace(p, group["rank"])
        if sub is None:
            m = state["exp_avg"].to(g.dtype).mul_(beta1).add_(g, alpha=1 - beta1)
            state["exp_avg"].copy_(m)
            return m
        right, _ = sub
        G = g.reshape(p.shape[0], -1)
        if (state["step"] - 1) % group["update_proj_gap"] == 0:  # new subspace, momentum reset
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            k = group["rank"]
            state["projector"] = (Vh[:k] if right else U[:, :k].T).to(p.dtype).contiguous()  # (k, n)
            state["exp_avg"] = torch.zeros((G.shape[0], k) if right else (k, G.shape[1]), dtype=p.dtype,
                                           device=p.device)
        P = state["projector"].to(g.dtype)
        low = G @ P.T if right else P @ G
        m = state["exp_avg"].to(g.dtype).mul_(beta1).add_(low, alpha=1 - beta1)
        state["exp_avg"].copy_(m)
        u = G + ((m - low) @ P if right else P.T @ (m - low))  # P^T m + (g - P^T P g)
        return u.view(p.shape)

    def _check_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if state["exp_avg_sq"].shape != _sq_shape(*subset_layout(p.shape, group["subset_size"])):
            raise ValueError(f"{type(self).__name__}: subset_size={group['subset_size']!r} does not match the "
                             f"existing state {tuple(state['exp_avg_sq'].shape)}; it cannot change during training")

    def _update(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, wd = as_float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        step = state["step"]
        compute = opmath_dtype(p.dtype)
        g = p.grad.to(compute)
        if group["maximize"]:
            g = -g
        view, dim = subset_layout(p.shape, group["subset_size"])
        sq = g.reshape(view).square().sum(dim=dim, keepdim=True)
        v = state["exp_avg_sq"].to(compute)
        v = v.add_(sq) if beta2 == 1 else v.mul_(beta2).add_(sq, alpha=1 - beta2)
        state["exp_avg_sq"].copy_(v)

        step_size = lr
        if group["bias_correction"]:
            step_size /= 1 - beta1**step
            if beta2 < 1:
                step_size *= math.sqrt(1 - beta2**step)
        u = self._numerator(g, p, state, group)
        direction = (u.reshape(view) / (v.sqrt() + eps)).view(p.shape)
        theta = p.detach().to(compute) - step_size * direction
        p.copy_(theta * (1 - lr * wd) if wd else theta)
