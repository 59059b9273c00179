"""FRUGAL: Adam on a low-dimensional subspace, state-free signSGD on the rest (Zmushko et al., 2024)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ._base import (PACK_NUMEL, PerTensorOptimizer, as_float, check_adam_group, check_choice, check_int, check_range,
                    opmath_dtype)

__all__ = ["FRUGAL", "PROJECTORS"]

PROJECTORS = ("blocks", "random", "svd")
_SEED_MASK = (1 << 63) - 1



class FRUGAL(PerTensorOptimizer):
    r"""FRUGAL: full-rank updates from gradient splitting, Adam on a subspace and signSGD on the rest.

    Zmushko, Beznosikov, Takáč and Horváth, "FRUGAL: Memory-Efficient Optimization by Reducing
    State Overhead for Scalable Training", ICML 2025, arXiv:2411.07837 (Algorithm 1), instantiated
    as in the paper's experiments: the state-full optimizer is AdamW, the state-free one signSGD
    (or SGD).  For each weight with two or more dimensions, viewed as a matrix :math:`G` of shape
    ``(shape[0], -1)``, a projector :math:`P` onto :math:`r = \mathrm{round}(\rho\, n)` directions
    of its smaller side (:math:`n` = the smaller dimension) is chosen every :math:`T` steps, and

    .. math::
        \theta &\leftarrow \theta\,(1-\eta\lambda) \\
        g^{full} &= P(g_t), \qquad g^{free} = g_t - P^{-1}(g^{full}) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g^{full}, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2) (g^{full})^2 \\
        \theta &\leftarrow \theta - P^{-1}\Big(\frac{\eta}{1-\beta_1^{s}}\,
            \frac{m}{\sqrt{v/(1-\beta_2^{s})}+\epsilon}\Big)
            - \eta\,\kappa\,\mathrm{sign}(g^{free}) \quad(\text{SGD: } \eta\kappa\, g^{free})

    where :math:`s` counts the steps since the last refresh.  At each refresh (steps
    :math:`1, T+1, 2T+1, \dots`) the Adam state :math:`(m, v, s)` is **reset** to zero, as in the
    paper's default (``reset_statistics=True`` in the authors' code): :math:`m, v` are coordinates
    in the old subspace and mean nothing in the new one.  Parameters with fewer than two
    dimensions (biases, norms) are trained with plain AdamW, as the paper does for its
    non-projected parameters.

    Projectors (``projector``):

    * ``"blocks"`` (default): a contiguous block of :math:`r` columns (rows when the matrix is
      wide), moving cyclically by :math:`r` at each refresh, so that every coordinate gets its turn
      in the state-full subspace (the blockwise, BAdam-like selection of the paper, applied within
      a matrix);
    * ``"random"``: :math:`r` columns (rows) drawn uniformly without replacement (RandK over
      columns, the authors' ``CoordOptimizer``), from a generator seeded by ``seed``, the
      parameter's position in its group and the refresh count -- so the selection is part of the
      saved state and resumed training repeats it exactly;
    * ``"svd"``: the top-:math:`r` right (left) singular vectors of the current gradient, as in
      GaLore (the authors' ``GaloreOptimizer``); the :math:`r \times n` basis is stored.

    With the coordinate projectors and :math:`\rho = 1` the free part is empty and the update is
    exactly AdamW (restarted at each refresh); with :math:`\rho = 0` it is signSGD with decoupled
    weight decay.  With ``"svd"`` and :math:`\rho = 1` it is Adam in the gradient's singular basis,
    not Adam (Adam is not rotation invariant).

    Symbols: :math:`\eta` = ``lr``, :math:`(\beta_1,\beta_2)` = ``betas``, :math:`\epsilon` =
    ``eps``, :math:`\lambda` = ``weight_decay``, :math:`\rho` = ``density``, :math:`T` =
    ``update_gap``, :math:`\kappa` = ``complement_lr_scale`` (the authors' ``inactive_lr_scale``),
    ``complement`` = ``"sign"`` or ``"sgd"``.  Defaults from the authors' code and paper: density
    0.25, update_gap 200, signSGD with scale 1 (pre-training), betas (0.9, 0.999), eps 1e-8;
    lr 1e-3 and weight_decay 0 as torch.optim.Adam.  ``seed=None`` draws a seed from torch's global
    generator when the group is created (it is then stored in the group, hence in ``state_dict``).

    State per projected weight (shape ``R x C``, smaller side :math:`n`, larger :math:`N`):
    ``exp_avg`` and ``exp_avg_sq`` of shape :math:`N \times r` (``"svd"`` adds ``projector``,
    :math:`r \times n`) in the parameter's dtype, plus step counters: :math:`2\rho` times Adam's
    state, 2 bytes per float32 parameter at the defaults.  16-bit parameters are computed in
    float32.  Complex parameters are refused.  One implementation serves all paths:
    ``foreach``/``fused`` are accepted for drop-in compatibility and run it.
    """

    supports_complex = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        density: float = 0.25,
        update_gap: int = 200,
        projector: str = "blocks",
        complement: str = "sign",
        complement_lr_scale: float = 1.0,
        seed: int | None = None,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, density=density,
                                      update_gap=update_gap, projector=projector, complement=complement,
                                      complement_lr_scale=complement_lr_scale, seed=seed),
                         maximize=maximize, foreach=foreach, fused=fused)

    def _validate(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        check_adam_group(name, group)
        check_range(name, "density", group["density"], 0.0, 1.0)
        check_int(name, "update_gap", group["update_gap"], 1)
        check_choice(name, "projector", group["projector"], PROJECTORS)
        check_choice(name, "complement", group["complement"], ("sign", "sgd"))
        check_range(name, "complement_lr_scale", group["complement_lr_scale"], 0.0)
        if group["seed"] is None:
            group["seed"] = int(torch.randint(0, 2**62, ()).item())
        check_int(name, "seed", group["seed"], 0)

    # -- geometry ------------------------------------------------------------------------------
    @staticmethod
    def _side(p: torch.Tensor, density: float) -> tuple[bool, int, int]:
        """``(right, n, r)``: project columns (``right``) or rows, the side's size ``n`` and the rank ``r``."""
        rows, cols = p.shape[0], p.numel() // max(p.shape[0], 1)
        right = rows >= cols
        n = cols if right else rows
        return right, n, round(density * n)

    def _selection(self, state: dict[str, Any], group: dict[str, Any], n: int, r: int,
                   device: torch.device) -> torch.Tensor:
        """Indices of the state-full columns (rows) for the current period (coordinate projectors)."""
        c = state["refresh"] - 1
        if group["projector"] == "blocks":
            return (c * r + torch.arange(r, device=device)) % n
        gen = torch.Generator().manual_seed(hash((state["seed"], c)) & _SEED_MASK)
        return torch.randperm(n, generator=gen)[:r].sort().values.to(device)

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] = 0
        if p.dim() < 2:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            return
        state["adam_step"] = 0
        state["refresh"] = 0
        if group["projector"] == "random":
            index = next(i for i, q in enumerate(group["params"]) if q is p)
            state["seed"] = hash((group["seed"], index)) & _SEED_MASK

    def _refresh(self, p: torch.Tensor, G: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """A new subspace, and the Adam state reset (the paper's default)."""
        right, n, r = self._side(p, group["density"])
        big = G.shape[0] if right else G.shape[1]
        shape = (big, r) if right else (r, big)
        state["refresh"] += 1
        state["adam_step"] = 0
        state["exp_avg"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        if group["projector"] == "svd":
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            state["projector"] = (Vh[:r] if right else U[:, :r].T).to(p.dtype).contiguous()  # (r, n)

    # -- the step --------------------------------------------------------------------------------
    @staticmethod
    def _adam(g: torch.Tensor, state: dict[str, Any], group: dict[str, Any], step: int) -> torch.Tensor:
        """AdamW's step direction (times lr) on ``g``; updates ``exp_avg``/``exp_avg_sq`` in place."""
        lr, (beta1, beta2), eps = as_float(group["lr"]), group["betas"], group["eps"]
        m = state["exp_avg"].to(g.dtype).lerp_(g, 1 - beta1)  # in place on the state when dtypes agree
        v = state["exp_avg_sq"].to(g.dtype).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if m is not state["exp_avg"]:  # 16-bit state: stored rounded
            state["exp_avg"].copy_(m)
            state["exp_avg_sq"].copy_(v)
        denom = v.sqrt().div_((1 - beta2**step) ** 0.5).add_(eps)
        return m.div(denom).mul_(lr / (1 - beta1**step))

    def _step_group(self, group: dict[str, Any]) -> None:
        """``foreach=False`` (the reference) updates one tensor at a time.  The default and fused
        paths update the small float32/float64 tensors of one shape and step count together, as
        one stacked batch (:meth:`_update_batch`): vectors (AdamW) and, with the ``"blocks"``
        projector, matrices (whose selected columns are then the same for the whole batch)."""
        def batchable(p: torch.Tensor) -> bool:
            return (p.numel() <= PACK_NUMEL and opmath_dtype(p.dtype) == p.dtype and p.is_contiguous()
                    and (p.dim() < 2 or group["projector"] == "blocks"))

        for members in self._batches(group, batchable):
            self._update_batch(members, [self.state[p] for p in members], group)

    def _update(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        self._update_batch([p], [state], group)

    def _update_batch(self, params: list[torch.Tensor], states: list[dict[str, Any]], group: dict[str, Any]) -> None:
        """One step of ``B`` tensors of one shape and step count, computed on ``(B, ...)`` stacks
        (``B > 1``: copies, written back at the end; ``B = 1``: the tensor and its state themselves,
        without a batch dimension, which some index kernels handle more slowly)."""
        lr, wd = as_float(group["lr"]), group["weight_decay"]
        p0, B, state = params[0], len(params), states[0]
        compute = opmath_dtype(p0.dtype)

        def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
            return tensors[0] if B == 1 else torch.stack(tensors)

        g = stack([p.grad for p in params]).to(compute)
        if group["maximize"]:
            g = -g
        X = stack([p.detach() for p in params])  # (B, *shape), or the parameter itself for B = 1
        lead = (B,) if B > 1 else ()

        def theta() -> torch.Tensor:  # the decayed parameters in the compute dtype (a new tensor)
            return X.to(compute) * (1 - lr * wd)

        def finish(new: torch.Tensor | None, moments: dict[str, Any]) -> None:
            """Store the new parameters (``None``: already in ``X``) and, for ``B > 1``, ``X`` and the moments."""
            if new is not None:
                X.copy_(new)
            if B > 1:
                torch._foreach_copy_(params, list(X.unbind(0)))
                for name in ("exp_avg", "exp_avg_sq"):
                    torch._foreach_copy_([st[name] for st in states], list(moments[name].unbind(0)))

        if p0.dim() < 2:  # not projected: AdamW
            moments = self._moments(states, stack, state["step"])
            finish(theta() - self._adam(g, moments, group, state["step"]), moments)
            return

        G = g.reshape(*lead, p0.shape[0], -1)
        if (state["step"] - 1) % group["update_gap"] == 0:
            for p, st, Gb in zip(params, states, G if B > 1 else [G]):
                self._refresh(p, Gb, st, group)
        for st in states:
            st["adam_step"] += 1
        right, n, r = self._side(p0, group["density"])
        if state["exp_avg"].shape[1 if right else 0] != r:
            raise ValueError(f"{type(self).__name__}: density changed to {group['density']} within an update "
                             f"period (state rank {state['exp_avg'].shape}); change it at a refresh step")
        free_lr = lr * group["complement_lr_scale"]
        moments = self._moments(states, stack, state["adam_step"])
        if group["projector"] == "svd":  # (B = 1)
            P = state["projector"].to(compute)  # (r, n), orthonormal rows
            low = G @ P.T if right else P @ G
            back = self._adam(low, moments, group, moments["adam_step"])
            full = back @ P if right else P.T @ back
            free = G - (low @ P if right else P.T @ low)
        else:  # one selection for the batch: "blocks" depends on the refresh count alone (B = 1 for "random")
            dim = (1 if right else 0) + len(lead)
            idx = self._selection(state, group, n, r, p0.device)
            low = G.index_select(dim, idx)
            if self._mode(group) != "reference" and compute == p0.dtype and p0.is_contiguous():
                self._coordinate_step(X.view(G.shape), G, low, idx, dim, free_lr, lr * wd, moments, group)
                finish(None, moments)
                return
            free = G.index_fill(dim, idx, 0.0)
            full = torch.zeros_like(G).index_copy_(dim, idx, self._adam(low, moments, group, moments["adam_step"]))
        step = full + free_lr * (free.sign() if group["complement"] == "sign" else free)
        finish(theta() - step.view(X.shape), moments)

    @staticmethod
    def _moments(states: list[dict[str, Any]], stack: Any, step: int) -> dict[str, Any]:
        """The stacked Adam moments of a batch (the state tensors themselves for ``B = 1``) and the Adam step count."""
        return {"exp_avg": stack([st["exp_avg"] for st in states]),
                "exp_avg_sq": stack([st["exp_avg_sq"] for st in states]), "adam_step": step}

    def _coordinate_step(self, P: torch.Tensor, G: torch.Tensor, low: torch.Tensor, idx: torch.Tensor, dim: int,
                         free_lr: float, decay: float, state: dict[str, Any], group: dict[str, Any]) -> None:
        """The coordinate-projector step in place on the parameter's 2-D view ``P`` (float32/float64
        parameters, default and fused paths): every entry takes the complement step, then the
        selected columns (rows) are overwritten with their Adam step from the decayed values kept
        aside.  The same values as the reference (``θ − (Adam + 0)`` and ``θ − (0 + lr_c·s)``),
        with three full-size passes instead of about ten and one temporary instead of five."""
        if decay:
            P.mul_(1 - decay)
        kept = P.index_select(dim, idx)
        if group["complement"] == "sign":
            P.sub_(torch.sign(G), alpha=free_lr)  # free_lr * (±1 or 0) is exact
        else:
            P.sub_(G * free_lr)  # rounded as the reference rounds it (no fused multiply-add)
        P.index_copy_(dim, idx, kept.sub_(self._adam(low, state, group, state["adam_step"])))
