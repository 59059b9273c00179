"""MicroAdam: Adam on Top-k compressed gradients with quantised error feedback (Modoranu et al., 2024)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ._base import PACK_NUMEL, PerTensorOptimizer, as_float, check_adam_group, check_int, check_range, opmath_dtype

__all__ = ["MicroAdam", "quantize_4bit", "dequantize_4bit", "quantize_4bit_rows", "dequantize_4bit_rows"]

#: Top-k is taken in blocks of this many coordinates, so that indices are stored as int16 offsets.
TOPK_BLOCK = 1 << 15



# ----------------------------------------------------------------------------------------------
# 4-bit bucketed min/max quantisation of the error feedback
# ----------------------------------------------------------------------------------------------
def _buckets(x: torch.Tensor, bucket: int) -> torch.Tensor:
    """Rows ``x`` ``(B, n)`` as ``(B, n_buckets, bucket)``, each row's last bucket padded with that
    row's last value."""
    pad = -x.shape[1] % bucket
    if pad:
        x = torch.cat([x, x[:, -1:].expand(-1, pad)], dim=1)
    return x.view(x.shape[0], -1, bucket)


def quantize_4bit(x: torch.Tensor, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Asymmetric 4-bit quantisation of a flat tensor in buckets of ``bucket`` values.

    Per bucket :math:`b` with range :math:`[\delta_b, \Delta_b]` (its min and max) and step
    :math:`u_b = (\Delta_b - \delta_b)/15`, each value becomes :math:`q = \lfloor (x-\delta_b)/u_b
    + 1/2\rfloor \in \{0,\dots,15\}` (0 when :math:`u_b = 0`); two codes are packed per byte (high
    nibble first).  Returns ``(codes, scales)``: ``codes`` uint8 of length ``ceil(n/2)``, ``scales``
    of shape ``(n_buckets, 2)`` holding :math:`(\delta_b, \Delta_b)` in ``x``'s dtype.  The round
    trip error is at most :math:`u_b/2` per value (:func:`dequantize_4bit`).
    """
    codes, scales = quantize_4bit_rows(x.reshape(1, -1), bucket)
    return codes[0], scales[0]


def quantize_4bit_rows(x: torch.Tensor, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_4bit` of each row of ``x`` ``(B, n)``: codes ``(B, ceil(n/2))`` and scales
    ``(B, n_buckets, 2)``, row ``b`` equal to ``quantize_4bit(x[b], bucket)``."""
    rows, n = x.shape
    xb = _buckets(x, bucket)
    lo, hi = xb.amin(dim=2), xb.amax(dim=2)  # the same values as torch.aminmax, a few times faster on CPU
    u = (hi - lo) / 15
    safe = torch.where(u > 0, u, torch.ones_like(u))
    # floor((x - lo) / u + 1/2) clamped to [0, 15], 0 unless u > 0: in place on one temporary
    q = (xb - lo[..., None]).div_(safe[..., None]).add_(0.5).floor_().clamp_(0, 15)
    # codes 0..15 (exact integers): converted through int8, several times faster than to uint8
    q = q.masked_fill_(~(u > 0)[..., None], 0).view(rows, -1)[:, :n].to(torch.int8).view(torch.uint8)
    if n % 2:
        q = torch.cat([q, q.new_zeros(rows, 1)], dim=1)
    codes = (q[:, 0::2] << 4) | q[:, 1::2]
    return codes, torch.stack([lo, hi], dim=2)


def dequantize_4bit(codes: torch.Tensor, scales: torch.Tensor, n: int, bucket: int) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit`: the ``n`` values :math:`\\delta_b + q\\,u_b` in ``scales``' dtype."""
    return dequantize_4bit_rows(codes[None], scales[None], n, bucket)[0]


def dequantize_4bit_rows(codes: torch.Tensor, scales: torch.Tensor, n: int, bucket: int) -> torch.Tensor:
    """:func:`dequantize_4bit` of each row: ``(B, ceil(n/2))`` codes and ``(B, n_buckets, 2)``
    scales to ``(B, n)`` values."""
    rows = codes.shape[0]
    q = torch.stack([codes >> 4, codes & 15], dim=2).view(rows, -1)[:, :n]
    lo, hi = scales[..., 0], scales[..., 1]
    u = (hi - lo) / 15
    qb = _buckets(q.to(scales.dtype), bucket)
    return qb.mul_(u[..., None]).add_(lo[..., None]).view(rows, -1)[:, :n]  # lo + q u, in place


# ----------------------------------------------------------------------------------------------
class MicroAdam(PerTensorOptimizer):
    r"""MicroAdam: Adam whose moments are rebuilt from a window of Top-k compressed gradients.

    Modoranu, Safaryan, Malinovsky, Kurtic, Robert, Richtárik and Alistarh, "MicroAdam: Accurate
    Adaptive Optimization with Low Space Overhead and Provable Convergence", NeurIPS 2024,
    arXiv:2405.15593 (Algorithms 1 and 2).  Per parameter (flattened, :math:`d` entries), at step
    :math:`t`:

    .. math::
        a_t &= g_t + Q^{-1}(e_t) &&\text{(error feedback)} \\
        (\mathcal I_t, \mathcal V_t) &= \mathrm{TopK}_k(|a_t|) &&\text{(per block of } 2^{15}
            \text{ coordinates, } k = \lceil \rho\cdot\text{block}\rceil) \\
        e_{t+1} &= Q\big(a_t - \mathrm{scatter}(\mathcal I_t, \mathcal V_t)\big)
            &&\text{(4-bit, per bucket of } q \text{ values)} \\
        m_t &= \frac{1-\beta_1}{1-\beta_1^t}\sum_{i=0}^{\min(t,w)-1} \beta_1^{\,i}\,
              \mathrm{scatter}(\mathcal I_{t-i}, \mathcal V_{t-i}), \qquad
        v_t = \frac{1-\beta_2}{1-\beta_2^t}\sum_{i=0}^{\min(t,w)-1} \beta_2^{\,i}\,
              \mathrm{scatter}(\mathcal I_{t-i}, \mathcal V_{t-i}^2) \\
        \theta_{t+1} &= \theta_t(1-\eta\lambda) - \eta\,\frac{m_t}{\sqrt{v_t}+\epsilon}

    The moments are never stored: they are rebuilt at every step from a ring buffer of the last
    :math:`w` sparse gradients (indices and values).  With :math:`k = d` (``density=1``), no
    quantisation (``bits=None``), values stored in the parameter's precision and a window
    :math:`w \ge t`, this is exactly Adam(W) (the sums are the unrolled Adam recursions).

    Symbols: :math:`\eta` = ``lr``, :math:`(\beta_1,\beta_2)` = ``betas``, :math:`\epsilon` =
    ``eps``, :math:`\lambda` = ``weight_decay`` (decoupled, as in the reference code),
    :math:`w` = ``window`` (the paper's :math:`m`), :math:`\rho` = ``density`` (the reference code's
    ``k_init``), :math:`q` = ``quant_bucket_size``, ``bits`` (4, or None for an unquantised error),
    ``value_dtype`` (storage of :math:`\mathcal V`).

    Conventions taken from the authors' code (IST-DASLab/ISTA-DASLab-Optimizers, read-only):
    Top-k in blocks with int16 in-block indices, bfloat16 values, 4-bit error packed two per byte
    with an asymmetric min/max range per bucket, bias corrections and :math:`\epsilon` as above,
    weight decay applied before the step.  Two choices of ours: (1) the rounding residual of the
    stored values (:math:`a_t[\mathcal I_t] - \mathrm{bf16}(a_t[\mathcal I_t])`) stays in the
    error instead of being dropped, so that *sent + error = accumulated gradient* holds up to the
    4-bit quantisation alone (this is the paper's error feedback for the compressor "Top-k, then
    round"; the reference kernels work on bfloat16 gradients and have no such residual);
    (2) bucket ranges are kept in float32 (the parameter's dtype for float64) rather than
    bfloat16, which makes the round-trip bound :math:`u_b/2` exact.  Defaults: window 10 and
    density 0.01 (paper), betas (0.9, 0.999), eps 1e-8, weight_decay 0 (reference code), lr 1e-3
    (as torch.optim.Adam; the paper tunes it per task), quant_bucket_size 128 (the reference code
    takes any; 128 keeps the state below 1 byte per parameter).

    State per parameter (``d`` entries, ``k ≈ ρd`` selected per step): ``indices`` int16
    ``(w, k)``, ``values`` ``value_dtype`` ``(w, k)``, ``error`` uint8 ``(ceil(d/2),)`` and
    ``scales`` float32 ``(ceil(d/q), 2)`` (``bits=None``: ``error`` in the compute dtype, no
    scales).  At the defaults this is :math:`0.2 + 0.2 + 0.5 + 8/128 \approx 0.96` bytes per
    parameter (:meth:`state_bytes`), against 8 for Adam.  16-bit parameters are computed in
    float32.  Complex parameters are refused (Top-k of complex magnitudes is not the paper's
    method).  One implementation serves all paths, written on rows: ``foreach=False`` (the
    reference) updates one tensor at a time; the default and ``fused=True`` update the small
    tensors of one size together (one batch of rows, a fixed number of tensor operations instead
    of about thirty per tensor), which the conformance suite checks equal to the reference.
    """

    supports_complex = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        window: int = 10,
        density: float = 0.01,
        bits: int | None = 4,
        quant_bucket_size: int = 128,
        value_dtype: torch.dtype | None = torch.bfloat16,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, window=window,
                                      density=density, bits=bits, quant_bucket_size=quant_bucket_size,
                                      value_dtype=value_dtype),
                         maximize=maximize, foreach=foreach, fused=fused)

    def _validate(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        check_adam_group(name, group)
        check_int(name, "window", group["window"], 1)
        check_range(name, "density", group["density"], 0.0, 1.0, low_open=True)
        if group["bits"] not in (4, None):
            raise ValueError(f"{name}: invalid bits={group['bits']!r}; expected 4 or None (no quantisation)")
        check_int(name, "quant_bucket_size", group["quant_bucket_size"], 2)
        vd = group["value_dtype"]
        if vd is not None and not (isinstance(vd, torch.dtype) and vd.is_floating_point):
            raise ValueError(f"{name}: invalid value_dtype={vd!r}; expected a floating torch.dtype or None "
                             "(the parameter's dtype)")

    # -- layout ---------------------------------------------------------------------------------
    @staticmethod
    def _block_ks(d: int, density: float) -> tuple[int, int, int, int]:
        """``(n_full_blocks, k_full, last_block_size, k_last)`` of the per-block Top-k."""
        full, last = divmod(d, TOPK_BLOCK)
        k_full = min(TOPK_BLOCK, math.ceil(TOPK_BLOCK * density))
        k_last = min(last, math.ceil(last * density))
        return full, k_full, last, k_last

    def _offsets(self, d: int, density: float, device: torch.device) -> torch.Tensor:
        """Global offset of each of the ``k`` slots of a window row (the start of its block)."""
        full, k_full, last, k_last = self._block_ks(d, density)
        starts = torch.arange(full + (last > 0), device=device) * TOPK_BLOCK
        counts = torch.tensor([k_full] * full + ([k_last] if last else []), device=device)
        return starts.repeat_interleave(counts)

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        d = p.numel()
        full, k_full, last, k_last = self._block_ks(d, group["density"])
        k = full * k_full + k_last
        compute = opmath_dtype(p.dtype)
        state["step"] = 0
        state["indices"] = torch.zeros(group["window"], k, dtype=torch.int16, device=p.device)
        state["values"] = torch.zeros(group["window"], k, dtype=group["value_dtype"] or p.dtype, device=p.device)
        if group["bits"] is None:
            state["error"] = torch.zeros(d, dtype=compute, device=p.device)
        else:
            n_buckets = -(-d // group["quant_bucket_size"])
            state["error"] = torch.zeros((d + 1) // 2, dtype=torch.uint8, device=p.device)
            state["scales"] = torch.zeros(n_buckets, 2, dtype=compute, device=p.device)

    def _check_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        full, k_full, last, k_last = self._block_ks(p.numel(), group["density"])
        quantised = "scales" in state
        buckets = state["scales"].shape[0] if quantised else None
        if (state["indices"].shape != (group["window"], full * k_full + k_last)
                or quantised != (group["bits"] is not None)
                or (quantised and buckets != -(-p.numel() // group["quant_bucket_size"]))):
            raise ValueError(f"{type(self).__name__}: window, density, bits and quant_bucket_size cannot change once "
                             f"a parameter has state (state window x k = {tuple(state['indices'].shape)}, quantised = "
                             f"{quantised}, {buckets} buckets); got window={group['window']}, "
                             f"density={group['density']}, bits={group['bits']}, "
                             f"quant_bucket_size={group['quant_bucket_size']}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`, but the int16/uint8/bfloat16/float32 state
        keeps its dtype (torch casts every floating parameter's state to the parameter's dtype, which
        would corrupt int16 indices under bfloat16 parameters)."""
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for name, value in state_dict["state"].get(i, {}).items():
                if isinstance(value, torch.Tensor) and value.dtype != p.dtype:
                    self.state[p][name] = value.to(device=p.device, copy=True)

    # -- decoding (also used by tests and for introspection) ------------------------------------
    def error_feedback(self, p: torch.Tensor) -> torch.Tensor:
        """The dequantised error :math:`Q^{-1}(e)` of parameter ``p`` (its shape, compute dtype)."""
        return self._error(p, self.state[p], self._group_of(p)).view(p.shape)

    @staticmethod
    def _error(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        if "scales" in state:
            return dequantize_4bit(state["error"], state["scales"], p.numel(), group["quant_bucket_size"])
        return state["error"]

    def window_gradients(self, p: torch.Tensor) -> torch.Tensor:
        """The stored sparse gradients of ``p`` as dense rows, newest first: shape ``(min(t, w), *p.shape)``."""
        state, group = self.state[p], self._group_of(p)
        n = min(state["step"], group["window"])
        newest = (state["step"] - 1) % group["window"]
        rows = [(newest - i) % group["window"] for i in range(n)]
        dense = torch.zeros(n, p.numel(), dtype=opmath_dtype(p.dtype), device=p.device)
        idx = state["indices"][rows].long() + self._offsets(p.numel(), group["density"], p.device)
        dense.scatter_(1, idx, state["values"][rows].to(dense.dtype))
        return dense.view(n, *p.shape)

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("MicroAdam: the tensor is not a parameter of this optimizer")

    # -- the step --------------------------------------------------------------------------------
    def _step_group(self, group: dict[str, Any]) -> None:
        """The reference path (``foreach=False``) updates one tensor at a time; the default and
        ``fused`` paths update the small tensors (at most ``PACK_NUMEL`` entries) of one size,
        dtype, device and step count together, as the rows of one batch (:meth:`_update_rows`):
        the same arithmetic row by row, in a fixed number of tensor operations per batch instead
        of per tensor."""
        for members in self._batches(group, lambda p: p.numel() <= PACK_NUMEL, torch.Tensor.numel):
            self._update_rows(members, [self.state[p] for p in members], group)

    def _update_rows(self, params: list[torch.Tensor], states: list[dict[str, Any]], group: dict[str, Any]) -> None:
        """One step of ``B`` parameters of ``d`` entries each, at one step count, computed on rows of
        ``(B, ...)`` tensors (for ``B = 1`` views of the state, for ``B > 1`` stacked copies that are
        written back)."""
        lr, (beta1, beta2), eps, wd = as_float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        window, step, d, B = group["window"], states[0]["step"], params[0].numel(), len(params)
        compute = opmath_dtype(params[0].dtype)
        device = params[0].device
        names = ("indices", "values", "error") + (("scales",) if "scales" in states[0] else ())

        def rows(tensors: list[torch.Tensor]) -> torch.Tensor:
            return tensors[0].unsqueeze(0) if B == 1 else torch.stack(tensors)

        st = {n: rows([state[n] for state in states]) for n in names}
        g = rows([p.grad.reshape(-1) for p in params]).to(compute)
        a = -g if group["maximize"] else g.clone()

        # 1. error feedback: a = g + Q^{-1}(e)
        if "scales" in st:
            a += dequantize_4bit_rows(st["error"], st["scales"], d, group["quant_bucket_size"])
        else:
            a += st["error"]

        # 2. Top-k of |a| per block of TOPK_BLOCK coordinates (int16 in-block indices)
        full, k_full, last, k_last = self._block_ks(d, group["density"])
        parts = []
        if full:
            parts.append(a[:, : full * TOPK_BLOCK].view(B, full, TOPK_BLOCK).abs().topk(k_full, dim=2, sorted=False)
                         .indices.reshape(B, -1))
        if last:
            parts.append(a[:, full * TOPK_BLOCK:].abs().topk(k_last, dim=1, sorted=False).indices)
        local = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        offsets = self._offsets(d, group["density"], device)
        gidx = local + offsets
        row = (step - 1) % window
        indices, values = st["indices"], st["values"]
        indices[:, row] = local.to(torch.int16)
        sent = a.gather(1, gidx)
        values[:, row] = sent.to(values.dtype)

        # 3. the rest (and the rounding residual of the stored values) becomes the new error
        a.scatter_(1, gidx, sent - values[:, row].to(compute))
        if "scales" in st:
            codes, scales = quantize_4bit_rows(a, group["quant_bucket_size"])
            st["error"].copy_(codes)
            st["scales"].copy_(scales)
        else:
            st["error"].copy_(a)

        # 4. Adam moments rebuilt from the window, newest row has age 0
        n = min(step, window)
        age = ((step - 1 - torch.arange(n, device=device)) % window).to(compute)
        w1 = (1 - beta1) * beta1**age / (1 - beta1**step)
        w2 = (1 - beta2) * beta2**age / (1 - beta2**step)
        idx = (indices[:, :n].long() + offsets).view(B, -1)
        vals = values[:, :n].to(compute)
        m = torch.zeros(B, d, dtype=compute, device=device).scatter_add_(1, idx, (w1[:, None] * vals).view(B, -1))
        v = torch.zeros(B, d, dtype=compute, device=device).scatter_add_(1, idx, (w2[:, None] * vals * vals).view(B, -1))
        # the moments vanish off the window's coordinates, and so does the Adam step: it is formed
        # at the window's entries only (a coordinate in several rows gets the same value each time)
        update = m.gather(1, idx).div_(v.gather(1, idx).sqrt_().add_(eps))

        # 5. decoupled weight decay on every coordinate, then the step on the window's
        flat = [p.detach().view(-1) for p in params] if all(p.is_contiguous() for p in params) else None
        current = rows(flat or [p.detach().reshape(-1) for p in params])
        stepped = (current.gather(1, idx).to(compute) * (1 - lr * wd) - lr * update).to(params[0].dtype)
        if B == 1 and flat is not None:  # in place on the parameter
            if wd:
                flat[0].mul_(1 - lr * wd)
            flat[0].scatter_(0, idx[0], stepped[0])
            return
        new = current.to(compute) * (1 - lr * wd) if wd else current  # stacked or reshaped: a copy
        new = new.to(params[0].dtype).scatter_(1, idx, stepped)
        torch._foreach_copy_(params, [x.view(p.shape) for x, p in zip(new, params)])
        if B == 1:
            return
        for n_ in names:
            torch._foreach_copy_([state[n_] for state in states], list(st[n_].unbind(0)))
