"""Step time and state memory of gradkit.optim beside pytorch-optimizer and torch.optim.AdamW.

    python benchmarks/optim.py [--sets small,medium,large] [--optimizers Lion,Grams] [--repeats 5]

Parameter sets (CPU, float32, every parameter has a gradient):
  small  = 1000 tensors x 64 elements (8 x 8), medium = 100 x 262144 (512 x 512),
  large = 10 x 4194304 (2048 x 2048).
For each optimizer: ours with ``fused=True`` (torch.compile; compiled once, before timing) and with the
default ``foreach`` path, the same optimizer from pytorch-optimizer (``foreach=True`` where it has
one), and torch.optim.AdamW (foreach and fused).  Times are medians over ``--repeats`` steps taken
in interleaved rounds (ours, peer, ours, ...) so that drift on a shared machine hits all columns
alike; the key columns are the ratios measured in this run.  State bytes per parameter count the
tensors in the optimizer state (step counters excluded); "scratch" is what ours keeps besides
(``Optimizer.scratch_bytes``: flat copies of packed small tensors' parameters and gradients).
Every optimizer takes two untimed steps first, MicroAdam ``window + 1`` (its window full).
AdamWSN-SM refreshes its subspace (an SVD per matrix) every 200 steps, never in the timed
steps; AdamWSN-SM-refresh times that refresh step (``update_proj_gap=1``): the amortised cost is
(refresh + 199 x AdamWSN-SM) / 200.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings

import torch

import gradkit.optim as go

# 2-D tensors (weights), so that AdamP/SGDP's projection is exercised: 64, 262144 and 4194304 elements
SETS = {"small": (1000, (8, 8)), "medium": (100, (512, 512)), "large": (10, (2048, 2048))}


def _po():
    try:
        import pytorch_optimizer as po
    except ImportError:  # pragma: no cover
        return None
    return po


def optimizers():
    """name -> (our factory, peer factory or None)."""
    po = _po()

    def peer(name, group=None, **kw):
        """``group``: options of the (one) param group, for a peer that reads them there."""
        if po is None:
            return None
        cls = getattr(po, name)

        def make(params):
            params = [dict(group, params=params)] if group else params
            try:
                return cls(params, foreach=True, **kw)
            except TypeError:
                return cls(params, **kw)

        return make

    return {
        "Lion": (lambda p, **k: go.Lion(p, **k), peer("Lion")),
        "LionK-l2": (lambda p, **k: go.LionK(p, k="l2", **k), None),
        "Grams": (lambda p, **k: go.Grams(p, **k), peer("Grams")),
        "AdEMAMix": (lambda p, **k: go.AdEMAMix(p, **k), peer("AdEMAMix", alpha=2.0)),
        "DiffGrad": (lambda p, **k: go.DiffGrad(p, **k), peer("DiffGrad")),
        "AdaBound": (lambda p, **k: go.AdaBound(p, **k), peer("AdaBound")),
        "AMSBound": (lambda p, **k: go.AMSBound(p, **k), peer("AdaBound", ams_bound=True)),
        "AMSGrad": (lambda p, **k: go.AMSGrad(p, **k), None),
        "AdaMomentum": (lambda p, **k: go.AdaMomentum(p, **k), None),
        "AdamP": (lambda p, **k: go.AdamP(p, **k), peer("AdamP")),
        "SGDP": (lambda p, **k: go.SGDP(p, lr=1e-3, momentum=0.9, **k), peer("SGDP", lr=1e-3, momentum=0.9)),
        "EXAdam": (lambda p, **k: go.EXAdam(p, **k), peer("EXAdam")),
        "OptimisticAMSGrad": (lambda p, **k: go.OptimisticAMSGrad(p, **k), None),
        "INNAprop": (lambda p, **k: go.INNAprop(p, **k), None),
        "DoG": (lambda p, **k: go.DoG(p, **k), None),
        "PastExtraGradient": (lambda p, **k: go.PastExtraGradient(p, **k), None),
        "OptimisticGradient": (lambda p, **k: go.OptimisticGradient(p, **k), None),
        "MicroAdam": (lambda p, **k: go.MicroAdam(p, **k), None),
        "FRUGAL": (lambda p, **k: go.FRUGAL(p, **k), None),
        # pytorch-optimizer's AdamWSN is Subset-Norm (for groups with sn=True; without it, AdamW)
        # with full momentum and sqrt(d)-sized subsets: compared with ours in that configuration;
        # our default adds rank-128 Subspace-Momentum (SVD + two projections per matrix, no peer),
        # timed alone as AdamWSN-SM, and its refresh step as AdamWSN-SM-refresh
        "AdamWSN": (lambda p, **k: go.AdamWSN(p, rank=None, subset_size=-1, **k), peer("AdamWSN", {"sn": True})),
        "AdamWSN-SM": (lambda p, **k: go.AdamWSN(p, **k), None),
        "AdamWSN-SM-refresh": (lambda p, **k: go.AdamWSN(p, update_proj_gap=1, **k), None),
    }


def make_params(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(size, generator=g).requires_grad_() for _ in range(n)]
    for p in params:
        p.grad = torch.randn(size, generator=g) * 1e-2
    return params


def state_bytes(opt, n_params):
    seen, total = set(), 0
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step" and v.numel() > 1 and id(v) not in seen:
                seen.add(id(v))
                total += v.numel() * v.element_size()
    return total / n_params


def timed_rounds(opts, repeats, warmup=2):
    """Median step time (ms) of each optimizer, measured in interleaved rounds after ``warmup``
    untimed steps (more for an optimizer with a ``window`` of past gradients: until it is full)."""
    for opt in opts:
        for _ in range(max(warmup, opt.defaults.get("window", 0) + 1)):
            opt.step()
    times = [[] for _ in opts]
    for _ in range(repeats):
        for i, opt in enumerate(opts):
            t0 = time.perf_counter()
            opt.step()
            times[i].append(time.perf_counter() - t0)
    return [1e3 * statistics.median(t) for t in times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="small,medium,large")
    ap.add_argument("--optimizers", default=",".join(optimizers()))
    ap.add_argument("--repeats", type=int, default=0, help="timed steps per optimizer (default: 21/5/3 by set)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    table = optimizers()
    names = [n for n in args.optimizers.split(",") if n]
    for n in names:
        if n not in table:
            ap.error(f"unknown optimizer {n!r}; known: {', '.join(table)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    header = (f"{'set':7} {'optimizer':18} {'fused ms':>9} {'foreach ms':>10} {'peer ms':>9} {'AdamW fe':>9} "
              f"{'AdamW fu':>9} {'fused/peer':>10} {'fused/AdamWfu':>13} {'B/param':>8} {'scratch':>8} "
              f"{'peer B/p':>8}")
    print(header)
    print("-" * len(header))
    for set_name in args.sets.split(","):
        n, size = SETS[set_name]
        repeats = args.repeats or {"small": 21, "medium": 5, "large": 3}[set_name]
        params = make_params(n, size)
        numel = n * params[0].numel()
        adamw_fe = torch.optim.AdamW(params, foreach=True)
        adamw_fu = torch.optim.AdamW(params, fused=True)
        for name in names:
            ours_factory, peer_factory = table[name]
            fused = ours_factory(params, fused=True)
            fused.step()  # compile outside the timing
            foreach = ours_factory(params, foreach=True)
            peer = peer_factory(params) if peer_factory else None
            opts = [fused, foreach, adamw_fe, adamw_fu] + ([peer] if peer else [])
            t = timed_rounds(opts, repeats)
            t_peer = t[4] if peer else float("nan")
            print(f"{set_name:7} {name:18} {t[0]:9.2f} {t[1]:10.2f} {t_peer:9.2f} {t[2]:9.2f} {t[3]:9.2f} "
                  f"{t[0] / t_peer:10.2f} {t[0] / t[3]:13.2f} {state_bytes(fused, numel):8.2f} "
                  f"{fused.scratch_bytes() / numel:8.1f} {state_bytes(peer, numel) if peer else float('nan'):8.2f}",
                  flush=True)
            del fused, foreach, peer, opts
            gc.collect()
        del params, adamw_fe, adamw_fu
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
