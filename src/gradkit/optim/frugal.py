"""FRUGAL: Adam on a low-dimensional subspace, state-free signSGD on the rest (Zmushko et al., 2024)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ._base import (PACK_NUMEL, PerTensorOptimizer, as_float, check_adam_group, check_choice, check_int, check_range,
                    opmath_dtype, run_flat)

__all__ = ["FRUGAL", "PROJECTORS", "BLOCK_ORDERS", "block_selection"]

PROJECTORS = ("blocks", "columns", "random", "svd")
BLOCK_ORDERS = ("random", "ascending", "descending", "mirror")
_SEED_MASK = (1 << 63) - 1


def block_selection(order: str, n: int, k: int, refresh: int, seed: int = 0) -> list[int]:
    r"""The active tensors of the ``projector="blocks"`` selection at the ``refresh``-th refresh (1-based).

    Positions ``0 .. n-1`` number the projected tensors of a param group in their order in
    ``params``; ``k`` of them are returned, sorted.  With :math:`c` = ``refresh``:

    * ``"ascending"``: :math:`\{((c-1)k + i) \bmod n : i < k\}`, cycling from the first tensor on;
    * ``"descending"``: :math:`\{(n - 1 - (c-1)k - i) \bmod n : i < k\}`, cycling from the last one back;
    * ``"mirror"`` (``k`` even): with :math:`h = \lfloor n/2 \rfloor` and
      :math:`a_i = ((c-1)k/2 + i) \bmod h`, the pairs :math:`\{a_i, n-1-a_i : i < k/2\}` (both ends,
      moving inwards; for odd ``n`` the middle tensor is never chosen, as in the authors' code);
    * ``"random"``: ``k`` positions drawn uniformly without replacement by a generator seeded with
      ``hash((seed, refresh))``.

    These are the closed forms of the authors' ``next_block_start`` recursions (which they keep in
    the param group), so the selection is a function of the refresh count alone.
    """
    if k == 0 or n == 0:
        return []
    c = refresh - 1
    if order == "ascending":
        out = [(c * k + i) % n for i in range(k)]
    elif order == "descending":
        out = [(n - 1 - c * k - i) % n for i in range(k)]
    elif order == "mirror":
        half = n // 2
        ends = [(c * (k // 2) + i) % half for i in range(k // 2)]
        out = ends + [n - 1 - a for a in ends]
    elif order == "random":
        gen = torch.Generator().manual_seed(hash((seed, refresh)) & _SEED_MASK)
        out = torch.randperm(n, generator=gen)[:k].tolist()
    else:
        raise ValueError(f"block_selection: invalid order={order!r}; expected one of {list(BLOCK_ORDERS)}")
    return sorted(out)


def _projected(p: torch.Tensor) -> bool:
    """A tensor the projectors act on: two or more dimensions, at least one element (an empty one
    is never stepped and takes no block position)."""
    return p.dim() >= 2 and p.numel() > 0


def _adamw_flat(param, grad, exp_avg, exp_avg_sq, *, h, maximize: bool) -> None:
    """:meth:`FRUGAL._adam` and the decay as one compiled pass over a flat tensor (the same
    operations); ``h = [lr / bc1, beta1, beta2, eps, 1 - lr wd, sqrt(bc2)]``."""
    g = -grad if maximize else grad
    m = exp_avg.lerp(g, 1 - h[1])
    v = exp_avg_sq * h[2] + (1 - h[2]) * g * g
    param.copy_(param * h[4] - m / (v.sqrt() / h[5] + h[3]) * h[0])
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def _free_flat(param, grad, *, h, maximize: bool, sign: bool) -> None:
    """The state-free step of an inactive block as one compiled pass; ``h = [1 - lr wd, lr κ]``."""
    g = -grad if maximize else grad
    param.copy_(param * h[0] - h[1] * (torch.sign(g) if sign else g))


class FRUGAL(PerTensorOptimizer):
    r"""FRUGAL: full-rank updates from gradient splitting, AdamW on a subspace and signSGD on the rest.

    Zmushko, Beznosikov, Takáč and Horváth, "FRUGAL: Memory-Efficient Optimization by Reducing
    State Overhead for Scalable Training", ICML 2025, arXiv:2411.07837 (Algorithm 1), instantiated
    as in the paper's experiments: the state-full optimizer is AdamW, the state-free one signSGD
    (or SGD).  Every :math:`T` steps (at steps :math:`1, T+1, 2T+1, \dots`, a *refresh*) a new
    state-full subspace is chosen and the AdamW state of the new subspace starts from zero (the
    paper's default, ``reset_statistics=True`` in the authors' code).  Every parameter is decayed,
    :math:`\theta \leftarrow \theta\,(1-\eta\lambda)`, then takes its step.

    **Block projector** (``projector="blocks"``, the default; the paper's main FRUGAL, the authors'
    ``BlockOptimizer`` run by ``--optimizer frugal``).  The subspace is a set of whole tensors: of
    the :math:`n` projected tensors of a param group, :math:`k = \mathrm{round}(\rho\, n)` (Python's
    ``round``, half to even, as in the authors' code) are *active* during a period, chosen at
    the :math:`c`-th refresh as :math:`S_c` by ``block_order``.  For projected tensor :math:`j`
    with gradient :math:`g`,

    .. math::
        j \in S_c:&\quad m \leftarrow \beta_1 m + (1-\beta_1) g, \quad
            v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
            \theta \leftarrow \theta - \frac{\eta}{1-\beta_1^{s}}\,
            \frac{m}{\sqrt{v/(1-\beta_2^{s})}+\epsilon} \\
        j \notin S_c:&\quad \theta \leftarrow \theta - \eta\,\kappa\,\mathrm{sign}(g)
            \quad(\text{SGD: } \theta \leftarrow \theta - \eta\kappa\, g)

    where :math:`m = v = 0` at the tensor's activation and :math:`s` counts the steps since the
    refresh: an active tensor takes AdamW's steps, restarted at each refresh (also when it stays
    active); an inactive tensor has no state at all.  ``block_order`` (positions :math:`0..n-1` are
    the order of the group's projected tensors in ``params``, i.e. first layer first for
    ``model.parameters()``; exact formulas in :func:`block_selection`):

    * ``"random"`` (default, the authors' default): :math:`k` tensors uniformly without replacement.
      The authors draw them from torch's global generator; here the generator is seeded by the
      group's ``seed`` and :math:`c`, so the selection is part of the saved state and resumed
      training repeats it exactly;
    * ``"ascending"``: :math:`k` consecutive tensors, cycling from the first tensor on;
    * ``"descending"``: :math:`k` consecutive tensors, cycling from the last tensor back (the order
      of the authors' LLaMA pre-training scripts, ``--block_order descending``);
    * ``"mirror"``: :math:`k/2` pairs (tensor :math:`a` and tensor :math:`n-1-a`), from both ends
      moving inwards; :math:`k` must be even (for odd :math:`n` the middle tensor is never active).

    State memory: two moments on the active tensors only, about :math:`\rho` times AdamW's state
    (exactly :math:`k/n` of it for tensors of equal size).  ``state["active"]`` shows a tensor's
    status and ``state["block"]`` its position.

    **Coordinate and SVD projectors** (within each matrix).  Each weight with two or more
    dimensions, viewed as a matrix :math:`G` of shape ``(shape[0], -1)``, gets a projector
    :math:`P` onto :math:`r = \mathrm{round}(\rho\, n)` directions of its smaller side (:math:`n` =
    the smaller dimension), and

    .. math::
        g^{full} &= P(g_t), \qquad g^{free} = g_t - P^{-1}(g^{full}) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g^{full}, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2) (g^{full})^2 \\
        \theta &\leftarrow \theta - P^{-1}\Big(\frac{\eta}{1-\beta_1^{s}}\,
            \frac{m}{\sqrt{v/(1-\beta_2^{s})}+\epsilon}\Big)
            - \eta\,\kappa\,\mathrm{sign}(g^{free}) \quad(\text{SGD: } \eta\kappa\, g^{free})

    (:math:`m, v` are coordinates in the old subspace at a refresh and are reset):

    * ``"columns"``: a contiguous block of :math:`r` columns (rows when the matrix is wide),
      moving cyclically by :math:`r` at each refresh.  Our variant, in neither the paper nor the
      authors' code (it was this class's ``"blocks"`` before the paper's block projector);
    * ``"random"``: :math:`r` columns (rows) drawn uniformly without replacement (RandK over
      columns: the authors' ``CoordOptimizer``, ``coord_choice="columns"``, which their fine-tuning
      scripts run as ``--optimizer frugal``), from a generator seeded by ``seed``, the parameter's
      position in its group and the refresh count;
    * ``"svd"``: the top-:math:`r` right (left) singular vectors of the current gradient, as in
      GaLore (the authors' ``GaloreOptimizer``); the :math:`r \times n` basis is stored.
      With :math:`\rho = 1` this is Adam in the gradient's singular basis, not Adam.

    State per matrix (``R x C``, larger side :math:`N`): ``exp_avg`` and ``exp_avg_sq`` of
    :math:`N \times r` (``"svd"`` adds ``projector``, :math:`r \times n`): :math:`2\rho` times Adam's
    state, 2 bytes per float32 parameter at the defaults.

    With every projector, :math:`\rho = 1` is AdamW restarted at each refresh (plain AdamW when
    :math:`T` exceeds the number of steps; ``"svd"`` excepted) and :math:`\rho = 0` is signSGD
    (SGD) with decoupled weight decay, with no state.  Parameters with fewer than two dimensions
    (biases, norms) are never projected: plain AdamW, never reset.

    **Which tensors are projected.**  The authors project only the weights of the attention and MLP
    ``nn.Linear`` layers (``prepare_proj_params``); embeddings, the LM head, norms and biases stay
    on AdamW.  An optimizer cannot tell these apart: here every tensor with two or more dimensions
    (and at least one element) in a group is projected (and counts in :math:`n`), so choose with
    param groups, e.g. embeddings and LM head in a group with ``density=1.0`` and an
    ``update_gap`` larger than the run (plain AdamW).  Other differences from the authors' code:
    no ``proj_params_lr_scale`` (give the projected tensors their own group and ``lr``); their
    ``inactive_update_rule="no"`` is ``complement_lr_scale=0``; each tensor refreshes on its own
    step count (the authors: on the first parameter's), the same whenever all tensors receive
    gradients every step; an odd :math:`k` with ``"mirror"`` is a ``ValueError`` (an assertion
    there).

    Symbols: :math:`\eta` = ``lr``, :math:`(\beta_1,\beta_2)` = ``betas``, :math:`\epsilon` =
    ``eps``, :math:`\lambda` = ``weight_decay``, :math:`\rho` = ``density``, :math:`T` =
    ``update_gap``, :math:`\kappa` = ``complement_lr_scale`` (the authors' ``inactive_lr_scale``),
    ``complement`` = ``"sign"`` or ``"sgd"`` (their ``inactive_update_rule``).  Defaults from the
    authors' code and paper: density 0.25, update_gap 200, block_order ``"random"``, signSGD with
    scale 1, betas (0.9, 0.999), eps 1e-8; lr 1e-3 and weight_decay 0 as torch.optim.Adam (their
    AdamW's default decay is 0.01, their pre-training scripts use 0).  ``seed=None`` draws a seed
    from torch's global generator when the group is created (it is then stored in the group,
    hence in ``state_dict``).

    Moments have the parameter's dtype; 16-bit parameters are computed in float32.  Complex
    parameters are refused.  The default and fused paths batch the small float32/float64 tensors
    of one shape, step count and status (vectors, ``"blocks"`` and ``"columns"`` matrices) and step
    the state-free parts in place; ``fused=True`` also steps each large AdamW or state-free block
    in one compiled pass; ``foreach=False`` is the one-tensor-at-a-time reference.
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
        block_order: str = "random",
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, density=density,
                                      update_gap=update_gap, projector=projector, complement=complement,
                                      complement_lr_scale=complement_lr_scale, seed=seed, block_order=block_order),
                         maximize=maximize, foreach=foreach, fused=fused)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state_dicts saved before block_order existed
            group.setdefault("block_order", "random")

    def _validate(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        check_adam_group(name, group)
        check_range(name, "density", group["density"], 0.0, 1.0)
        check_int(name, "update_gap", group["update_gap"], 1)
        check_choice(name, "projector", group["projector"], PROJECTORS)
        check_choice(name, "complement", group["complement"], ("sign", "sgd"))
        check_range(name, "complement_lr_scale", group["complement_lr_scale"], 0.0)
        check_choice(name, "block_order", group["block_order"], BLOCK_ORDERS)
        if group["projector"] == "blocks":
            self._num_blocks(group)
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

    def _num_blocks(self, group: dict[str, Any]) -> tuple[int, int]:
        """``(n, k)`` of the block projector: the group's projected tensors and how many are active
        (``ValueError`` for an odd ``k`` with ``block_order="mirror"``)."""
        n = sum(map(_projected, group["params"]))
        k = round(group["density"] * n)
        if group["block_order"] == "mirror" and k % 2:
            raise ValueError(
                f"{type(self).__name__}: invalid block_order='mirror' with density={group['density']!r} on {n} "
                f"projected tensors (round({n} * {group['density']!r}) = {k} active); 'mirror' activates pairs of "
                f"tensors and needs an even number: expected a density giving an even count or a block_order in "
                f"{[o for o in BLOCK_ORDERS if o != 'mirror']}")
        return n, k

    def _selection(self, state: dict[str, Any], group: dict[str, Any], n: int, r: int,
                   device: torch.device) -> torch.Tensor:
        """Indices of the state-full columns (rows) for the current period (coordinate projectors)."""
        c = state["refresh"] - 1
        if group["projector"] == "columns":
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
        if group["projector"] in ("random", "blocks"):
            index = next(i for i, q in enumerate(group["params"]) if q is p)
            if group["projector"] == "random":
                state["seed"] = hash((group["seed"], index)) & _SEED_MASK
            else:  # the position among the group's projected tensors
                state["block"] = sum(map(_projected, group["params"][:index]))
                state["active"] = False

    def _check_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if p.dim() >= 2 and ("block" in state) != (group["projector"] == "blocks"):
            raise ValueError(
                f"{type(self).__name__}: the state of a {tuple(p.shape)} parameter was created with another projector "
                f"than projector={group['projector']!r} (state_dicts of the within-matrix cyclic blocks, "
                f"projector='blocks' before the paper's whole-tensor blocks, load with projector='columns'); "
                f"expected the projector the state was created with")

    def _refresh(self, p: torch.Tensor, G: torch.Tensor | None, state: dict[str, Any], group: dict[str, Any],
                 active: frozenset[int] | None) -> None:
        """A new subspace, and the Adam state reset (the paper's default).  ``active``: the block
        projector's selection for this refresh; ``G``: the gradient as a matrix (``"svd"``)."""
        state["refresh"] += 1
        state["adam_step"] = 0
        if group["projector"] == "blocks":
            state["active"] = state["block"] in active
            if state["active"]:  # fresh moments, also for a tensor that stays active
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            else:
                state.pop("exp_avg", None)
                state.pop("exp_avg_sq", None)
            return
        right, n, r = self._side(p, group["density"])
        big = p.shape[0] if right else p.numel() // max(p.shape[0], 1)
        shape = (big, r) if right else (r, big)
        state["exp_avg"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        if group["projector"] == "svd":
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            state["projector"] = (Vh[:r] if right else U[:, :r].T).to(p.dtype).contiguous()  # (r, n)

    def _advance(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                 selections: dict[int, frozenset[int]]) -> None:
        """Refresh a projected tensor when its period starts, and count its step in the period.
        ``selections`` caches the block projector's selection per refresh count for this step."""
        if p.dim() < 2:
            return
        if (state["step"] - 1) % group["update_gap"] == 0:
            G, active = None, None
            if group["projector"] == "svd":
                G = p.grad.to(opmath_dtype(p.dtype)).reshape(p.shape[0], -1)
                G = -G if group["maximize"] else G
            elif group["projector"] == "blocks":
                c = state["refresh"] + 1
                if c not in selections:
                    n, k = self._num_blocks(group)
                    selections[c] = frozenset(block_selection(group["block_order"], n, k, c, group["seed"]))
                active = selections[c]
            self._refresh(p, G, state, group, active)
        state["adam_step"] += 1

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
        """Refreshes first (every tensor whose period starts), then the updates: ``foreach=False``
        (the reference) one tensor at a time; the default and fused paths update the small
        float32/float64 tensors of one shape, step count and status together, as one stacked
        batch (:meth:`_update_batch`): vectors (AdamW) and the matrices of the ``"blocks"``
        projector (active ones: AdamW; inactive ones: the state-free step) and of ``"columns"``
        (whose selected columns are then the same for the whole batch)."""
        if group["projector"] == "blocks" and group["block_order"] == "mirror":
            self._num_blocks(group)  # a density changed in the group: refuse before anything changes
        params = self._prepare(group)
        selections: dict[int, frozenset[int]] = {}
        for p in params:
            self._advance(p, self.state[p], group, selections)
        in_batches = group["projector"] in ("blocks", "columns")

        def batchable(p: torch.Tensor) -> bool:
            return (p.numel() <= PACK_NUMEL and opmath_dtype(p.dtype) == p.dtype and p.is_contiguous()
                    and (p.dim() < 2 or in_batches))

        def size(p: torch.Tensor) -> Any:  # with the period's step count and status
            st = self.state[p]
            return tuple(p.shape), st.get("adam_step"), st.get("active")

        for members in self._batches(group, batchable, size, params):
            self._update_batch(members, [self.state[p] for p in members], group)

    def _update_batch(self, params: list[torch.Tensor], states: list[dict[str, Any]], group: dict[str, Any]) -> None:
        """One step of ``B`` tensors of one shape, step count and status, already refreshed
        (:meth:`_advance`), computed on ``(B, ...)`` stacks (``B > 1``: copies, written back at the
        end; ``B = 1``: the tensor and its state themselves, without a batch dimension, which some
        index kernels handle more slowly)."""
        lr, wd = as_float(group["lr"]), group["weight_decay"]
        p0, B, state = params[0], len(params), states[0]
        compute = opmath_dtype(p0.dtype)
        fast = self._mode(group) != "reference" and compute == p0.dtype
        blocks = group["projector"] == "blocks"
        whole = p0.dim() < 2 or (blocks and state["active"])  # AdamW on the whole tensor
        if (fast and group["fused"] and B == 1 and p0.numel() > PACK_NUMEL and p0.is_contiguous()
                and p0.grad.is_contiguous() and (whole or blocks)):  # fused: one compiled pass, no temporaries
            flat = [p0.detach().view(-1), p0.grad.view(-1)]
            if whole:
                (beta1, beta2), step = group["betas"], state["step"] if p0.dim() < 2 else state["adam_step"]
                h = [lr / (1 - beta1**step), beta1, beta2, group["eps"], 1 - lr * wd, (1 - beta2**step) ** 0.5]
                flat += [state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)]
                run_flat(_adamw_flat, flat, torch.tensor(h, dtype=compute, device=p0.device), {"maximize": group["maximize"]})
            else:
                h = torch.tensor([1 - lr * wd, lr * group["complement_lr_scale"]], dtype=compute, device=p0.device)
                run_flat(_free_flat, flat, h, {"maximize": group["maximize"], "sign": group["complement"] == "sign"})
            return

        def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
            return tensors[0] if B == 1 else torch.stack(tensors)

        g = stack([p.grad for p in params]).to(compute)
        if group["maximize"]:
            g = -g
        X = stack([p.detach() for p in params])  # (B, *shape), or the parameter itself for B = 1
        lead = (B,) if B > 1 else ()

        def theta() -> torch.Tensor:  # the decayed parameters in the compute dtype (a new tensor)
            return X.to(compute) * (1 - lr * wd)

        def finish(new: torch.Tensor | None, moments: dict[str, Any] | None) -> None:
            """Store the new parameters (``None``: already in ``X``) and, for ``B > 1``, ``X`` and the moments."""
            if new is not None:
                X.copy_(new)
            if B > 1:
                torch._foreach_copy_(params, list(X.unbind(0)))
                if moments is not None:
                    for name in ("exp_avg", "exp_avg_sq"):
                        torch._foreach_copy_([st[name] for st in states], list(moments[name].unbind(0)))

        if whole:
            step = state["step"] if p0.dim() < 2 else state["adam_step"]
            moments = self._moments(states, stack, step)
            finish(theta() - self._adam(g, moments, group, step), moments)
            return
        free_lr = lr * group["complement_lr_scale"]
        sign = group["complement"] == "sign"
        if blocks:  # an inactive tensor: the state-free step on its whole gradient
            if fast:
                self._free_step_(X, g, free_lr, lr * wd, sign)
                finish(None, None)
            else:
                finish(theta() - free_lr * (g.sign() if sign else g), None)
            return

        G = g.reshape(*lead, p0.shape[0], -1)
        right, n, r = self._side(p0, group["density"])
        if state["exp_avg"].shape[1 if right else 0] != r:
            raise ValueError(f"{type(self).__name__}: density changed to {group['density']} within an update "
                             f"period (state rank {state['exp_avg'].shape}); change it at a refresh step")
        moments = self._moments(states, stack, state["adam_step"])
        if group["projector"] == "svd":  # (B = 1)
            P = state["projector"].to(compute)  # (r, n), orthonormal rows
            low = G @ P.T if right else P @ G
            back = self._adam(low, moments, group, moments["adam_step"])
            full = back @ P if right else P.T @ back
            free = G - (low @ P if right else P.T @ low)
        else:  # one selection for the batch: "columns" depends on the refresh count alone (B = 1 for "random")
            dim = (1 if right else 0) + len(lead)
            idx = self._selection(state, group, n, r, p0.device)
            low = G.index_select(dim, idx)
            if fast and p0.is_contiguous():
                self._coordinate_step(X.view(G.shape), G, low, idx, dim, free_lr, lr * wd, moments, group)
                finish(None, moments)
                return
            free = G.index_fill(dim, idx, 0.0)
            full = torch.zeros_like(G).index_copy_(dim, idx, self._adam(low, moments, group, moments["adam_step"]))
        step = full + free_lr * (free.sign() if sign else free)
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
        kept = P.index_select(dim, idx)
        if decay:
            kept.mul_(1 - decay)
        self._free_step_(P, G, free_lr, decay, group["complement"] == "sign")
        P.index_copy_(dim, idx, kept.sub_(self._adam(low, state, group, state["adam_step"])))

    @staticmethod
    def _free_step_(X: torch.Tensor, G: torch.Tensor, free_lr: float, decay: float, sign: bool) -> None:
        """The decay and the state-free step in place, ``X ← X(1 − decay) − free_lr·sign(G)`` (SGD:
        ``− free_lr·G``), with the reference's values: ``free_lr·(±1 or 0)`` is exact, and the SGD
        product is rounded before the subtraction as there (no fused multiply-add)."""
        if decay:
            X.mul_(1 - decay)
        if sign:
            X.sub_(torch.sign(G), alpha=free_lr)
        else:
            X.sub_(G * free_lr)
