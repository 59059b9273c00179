"""Registry of optimizer factories for the shared conformance suite.

Adding an optimizer to the suite = one ``Entry`` below.  ``kwargs`` are test hyperparameters chosen so
that every term of the update is active (weight decay on, learning rate large enough to see).
``invalid`` lists constructor keyword overrides that must raise ``ValueError`` naming the argument.
``rosenbrock``/``quadratic`` give hyperparameters and step budgets for the convergence tests (run with
a cosine-annealed learning rate; ``None`` = no test).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradkit.optim as go


@dataclass
class Entry:
    name: str
    cls: type
    kwargs: dict[str, Any]
    invalid: list[tuple[dict[str, Any], str]]
    complex_ok: bool = True
    rosenbrock: tuple[dict[str, Any], int, float] | None = None  # (kwargs, steps, tolerance on f)
    quadratic: tuple[dict[str, Any], int, float] | None = None  # (kwargs, steps, reduction factor)
    extra: dict[str, Any] = field(default_factory=dict)

    def make(self, params, **overrides):
        return self.cls(params, **{**self.kwargs, **overrides})

    def __repr__(self) -> str:
        return self.name


BETAS_BAD = [({"betas": (1.0, 0.99)}, "betas[0]"), ({"betas": (0.9, -0.1)}, "betas[1]"), ({"betas": (0.9,)}, "betas")]
COMMON_BAD = [({"lr": -1.0}, "lr"), ({"weight_decay": -0.1}, "weight_decay")]

REGISTRY: list[Entry] = [
    Entry("Lion", go.Lion, dict(lr=1e-2, weight_decay=0.1), COMMON_BAD + BETAS_BAD,
          rosenbrock=(dict(lr=1e-2), 2000, 1e-4),
          quadratic=(dict(lr=3e-2), 500, 1e-8)),
    Entry("LionK-l2", go.LionK, dict(lr=1e-2, weight_decay=0.1, k="l2"), COMMON_BAD + BETAS_BAD + [({"k": "l3"}, "k")],
          rosenbrock=(dict(lr=1e-2, k="l2"), 2000, 1e-6),
          quadratic=(dict(lr=1e-1, k="l2"), 1000, 1e-8)),
    # K = quadratic is heavy-ball SGD: slow along Rosenbrock's valley, hence the loose tolerance
    Entry("LionK-quadratic", go.LionK, dict(lr=1e-2, weight_decay=0.1, k="quadratic"), COMMON_BAD + BETAS_BAD,
          rosenbrock=(dict(lr=3e-3, k="quadratic", betas=(0.9, 0.999)), 5000, 0.05),
          quadratic=(dict(lr=3e-2, k="quadratic"), 500, 1e-3)),
]

EPS_BAD = [({"eps": -1e-8}, "eps")]
ADAM_BAD = COMMON_BAD + BETAS_BAD + EPS_BAD
ADAM_KW = dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)

REGISTRY += [
    Entry("Grams", go.Grams, ADAM_KW, ADAM_BAD,
          rosenbrock=(dict(lr=0.1), 2000, 1e-5), quadratic=(dict(lr=0.03), 500, 1e-8)),
    Entry("AdEMAMix", go.AdEMAMix, dict(ADAM_KW, betas=(0.8, 0.95, 0.99), alpha=3.0, t_alpha_beta3=7),
          COMMON_BAD + EPS_BAD + [({"betas": (0.9, 0.999, 1.0)}, "betas[2]"), ({"betas": (0.9, 0.999)}, "betas"),
                                  ({"alpha": -1.0}, "alpha"), ({"t_alpha_beta3": 0}, "t_alpha_beta3")],
          rosenbrock=(dict(lr=0.1), 2000, 1e-3), quadratic=(dict(lr=0.1), 500, 1e-5)),
    Entry("DiffGrad", go.DiffGrad, ADAM_KW, ADAM_BAD,
          rosenbrock=(dict(lr=0.1), 2000, 1e-3), quadratic=(dict(lr=0.03), 500, 1e-10)),
    Entry("AdaBound", go.AdaBound, dict(ADAM_KW, final_lr=0.05, gamma=0.1), ADAM_BAD + [
              ({"final_lr": -0.1}, "final_lr"), ({"gamma": 0.0}, "gamma"), ({"gamma": 1.5}, "gamma")],
          rosenbrock=(dict(lr=0.1, final_lr=0.01), 2000, 1e-4), quadratic=(dict(lr=0.03, final_lr=0.01), 500, 1e-12)),
    Entry("AMSBound", go.AMSBound, dict(ADAM_KW, final_lr=0.05, gamma=0.1), ADAM_BAD + [({"gamma": 0.0}, "gamma")],
          rosenbrock=(dict(lr=0.1, final_lr=0.01), 2000, 1e-3), quadratic=(dict(lr=0.03, final_lr=0.01), 500, 1e-12)),
    Entry("AMSGrad", go.AMSGrad, ADAM_KW, ADAM_BAD + [({"bias_correction": "yes"}, "bias_correction")],
          rosenbrock=(dict(lr=0.1), 2000, 1e-2), quadratic=(dict(lr=0.03), 500, 1e-15)),
    Entry("AMSGrad-bc", go.AMSGrad, dict(ADAM_KW, bias_correction=True), ADAM_BAD),
    Entry("AdaMomentum", go.AdaMomentum, ADAM_KW, COMMON_BAD + BETAS_BAD + [({"eps": 0.0}, "eps")],
          rosenbrock=(dict(lr=0.1), 2000, 1e-6), quadratic=(dict(lr=0.03), 500, 1e-15)),
]

PROJ_BAD = [({"delta": -0.1}, "delta"), ({"wd_ratio": 1.5}, "wd_ratio"), ({"eps": -1.0}, "eps")]
REGISTRY += [
    Entry("AdamP", go.AdamP, ADAM_KW, ADAM_BAD + PROJ_BAD, complex_ok=False,
          rosenbrock=(dict(lr=0.1), 2000, 1e-5), quadratic=(dict(lr=0.1), 500, 1e-15)),
    Entry("AdamP-nesterov", go.AdamP, dict(ADAM_KW, nesterov=True), ADAM_BAD, complex_ok=False),
    Entry("SGDP", go.SGDP, dict(lr=1e-2, momentum=0.9, weight_decay=0.1),
          COMMON_BAD + PROJ_BAD + [({"momentum": 1.0}, "momentum"), ({"dampening": 2.0}, "dampening")],
          complex_ok=False,
          rosenbrock=(dict(lr=2e-3, momentum=0.9), 3000, 1e-10), quadratic=(dict(lr=0.015, momentum=0.9), 500, 1e-15)),
    Entry("SGDP-nesterov", go.SGDP, dict(lr=1e-2, momentum=0.9, weight_decay=0.1, nesterov=True), COMMON_BAD,
          complex_ok=False),
]

REGISTRY += [
    Entry("EXAdam", go.EXAdam, ADAM_KW, ADAM_BAD + [({"step_size_growth": 1}, "step_size_growth")],
          rosenbrock=(dict(lr=0.1), 2000, 1e-3), quadratic=(dict(lr=0.03), 500, 1e-15)),
    Entry("EXAdam-growth", go.EXAdam, dict(ADAM_KW, step_size_growth=True), ADAM_BAD),
]

# min-max optimizers (gradkit.optim.minmax).  ExtraGradient takes two gradients per iteration
# (extrapolate() then step(), or step(closure) calling the closure twice); the suite calls step()
# once per gradient, so it runs ExtraGradient through an adaptor whose step() alternates the two
# half-steps -- this exercises the half-step state (mid-iteration checkpoints included).  The real
# API and its misuse errors are tested in test_minmax.py.
from gradkit.optim.minmax import ExtraGradient, OptimisticGradient, PastExtraGradient  # noqa: E402


class AlternatingExtraGradient(ExtraGradient):
    """Suite adaptor: odd step() calls extrapolate, even ones update (a closure is run once per call)."""

    def step(self, closure=None):
        if self.extrapolated:
            return super().step(closure)
        loss = closure() if closure is not None else None
        self.extrapolate()
        return loss


GAME_BAD = [({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr")]
# On a minimization problem these are plain gradient methods: no Rosenbrock test (thousands of
# steps, no momentum).  Quadratic (eigenvalues 1..100): stable for lr*100 < 1 (EG) and < 2/3 (PEG/OG).
REGISTRY += [
    Entry("ExtraGradient", AlternatingExtraGradient, dict(lr=0.1), GAME_BAD,
          quadratic=(dict(lr=0.009), 3000, 1e-6)),  # 3000 half-steps = 1500 iterations
    Entry("PastExtraGradient", PastExtraGradient, dict(lr=0.1), GAME_BAD,
          quadratic=(dict(lr=0.006), 2000, 1e-6)),
    Entry("OptimisticGradient", OptimisticGradient, dict(lr=0.1), GAME_BAD,
          quadratic=(dict(lr=0.006), 2000, 1e-6)),
]

from gradkit.optim.dog import DoG, LDoG  # noqa: E402
from gradkit.optim.innaprop import INNAprop  # noqa: E402
from gradkit.optim.optimistic_amsgrad import OptimisticAMSGrad  # noqa: E402

DOG_BAD = COMMON_BAD + [({"reps_rel": 0.0}, "reps_rel"), ({"eps": -1.0}, "eps")]
REGISTRY += [
    # default prediction: extrapolation over 5 gradients; it slows Rosenbrock's valley (looser f).
    # The second moment of the prediction errors keeps v̂ at its early maximum once predictions are
    # good, so the best learning rate on Rosenbrock is larger than AMSGrad's (0.5 here)
    Entry("OptimisticAMSGrad", OptimisticAMSGrad, ADAM_KW, ADAM_BAD + [({"reg": 0.0}, "reg"), ({"span": 0}, "span")],
          rosenbrock=(dict(lr=0.5), 3000, 0.02), quadratic=(dict(lr=0.03), 500, 1e-15)),
    Entry("OptimisticAMSGrad-last", OptimisticAMSGrad, dict(ADAM_KW, span=1), ADAM_BAD,
          rosenbrock=(dict(lr=0.5, span=1), 2000, 1e-2)),
    Entry("INNAprop", INNAprop, dict(lr=1e-2, alpha=0.3, beta=0.8, sigma=0.95, weight_decay=0.1),
          COMMON_BAD + EPS_BAD + [({"lr": 0.8}, "lr"), ({"beta": 0.0}, "beta"), ({"alpha": -0.1}, "alpha"),
                                  ({"sigma": 1.0}, "sigma")],
          rosenbrock=(dict(lr=0.05), 3000, 1e-2), quadratic=(dict(lr=0.05), 500, 1e-15)),
    # lr is DoG's multiplier c (default 1); reps_rel 1e-2 so that the first steps are visible
    Entry("DoG", DoG, dict(lr=1.0, reps_rel=1e-2, weight_decay=0.1), DOG_BAD,
          rosenbrock=(dict(reps_rel=1e-2), 3000, 0.03), quadratic=(dict(), 2000, 1e-4)),
    # on the single-tensor convergence problems L-DoG is DoG: no separate convergence runs
    Entry("LDoG", LDoG, dict(lr=1.0, reps_rel=1e-2, weight_decay=0.1), DOG_BAD),
]

import math  # noqa: E402

import torch  # noqa: E402

from gradkit.optim.adamwsn import AdamWSN  # noqa: E402
from gradkit.optim.frugal import FRUGAL  # noqa: E402
from gradkit.optim.microadam import MicroAdam  # noqa: E402

# The three optimizers below keep state that is not shaped like the parameters (compressed
# windows, subspace moments, per-subset norms).  MicroAdam, AdamWSN and FRUGAL batch small
# tensors on their default and fused paths (FRUGAL's "blocks" and "columns" projectors batch
# matrices too, and step the state-free parts in place there); FRUGAL's SVD projector has a
# single implementation.  ``extra`` says
# what the suite should expect instead of its defaults, in closed form (test_conformance.py has to
# read these keys: until it does, test_state_memory and test_bfloat16_parameters fail for them):
#   "state_bytes":  params -> optimizer-state bytes after a step (instead of 4 * numel * len(state_names));
#   "state_dtypes": state tensor dtypes allowed with bfloat16 parameters (instead of {bfloat16});
#   "single_path":  foreach/fused run the same code, so the path-equality tests hold trivially.


def _microadam_bytes(params, density=0.3, window=4, bucket=4):
    # per tensor: int16 indices + bf16 values (window x k), 4-bit error, float32 (min, max) per bucket
    total = 0
    for p in params:
        d, k = p.numel(), math.ceil(p.numel() * density)
        total += window * k * (2 + 2) + (d + 1) // 2 + math.ceil(d / bucket) * 2 * 4
    return total


def _frugal_block_bytes(params, density=0.6):
    # the paper's block projector: AdamW's two moments on k = round(density * n) of the n matrices
    # (which ones depends on the order: closed form when k is 0 or n, or the matrices have one size),
    # nothing on the inactive ones; vectors: AdamW
    mats = [p.numel() for p in params if p.dim() >= 2]
    k = round(density * len(mats))
    assert k in (0, len(mats)) or len(set(mats)) == 1, "no closed form: active matrices of different sizes"
    return sum(2 * 4 * p.numel() for p in params if p.dim() < 2) + 2 * 4 * sum(sorted(mats)[:k])


def _frugal_bytes(params, density=0.5):
    # matrices: exp_avg and exp_avg_sq of (larger side x round(density * smaller side)); vectors: AdamW
    total = 0
    for p in params:
        if p.dim() < 2:
            total += 2 * 4 * p.numel()
        else:
            rows, cols = p.shape[0], p.numel() // p.shape[0]
            total += 2 * 4 * max(rows, cols) * round(density * min(rows, cols))
    return total


def _sqrt_subsets(n):
    # subset_size=-1: subsets of the largest divisor of n not above int(sqrt(n))
    size = max(d for d in range(1, int(math.sqrt(n)) + 1) if n % d == 0)
    return n // size


def _adamwsn_bytes(params, rank=1, subsets=None):
    # matrices (rank < smaller side): momentum (larger x rank) + basis (rank x smaller) + one norm per
    # line along the smaller side; vectors: full momentum and one accumulator per coordinate
    total = 0
    for p in params:
        if p.dim() < 2:
            total += 4 * (p.numel() + (p.numel() if subsets is None else subsets(p.numel())))
        else:
            rows, cols = p.shape[0], p.numel() // p.shape[0]
            lines = max(rows, cols) if subsets is None else subsets(p.numel())
            total += 4 * (max(rows, cols) * rank + rank * min(rows, cols) + lines)
    return total


MICRO_KW = dict(ADAM_KW, density=0.3, window=4, quant_bucket_size=4)
FRUGAL_KW = dict(ADAM_KW, density=0.5, update_gap=3)
FRUGAL_BLOCKS_KW = dict(ADAM_KW, density=0.6, update_gap=3, seed=0)
SN_KW = dict(ADAM_KW, rank=1, update_proj_gap=3)
SN_BAD = COMMON_BAD + BETAS_BAD + EPS_BAD + [({"betas": (0.9, 1.5)}, "betas[1]"), ({"subset_size": "diag"}, "subset_size"),
                                             ({"subset_size": 0}, "subset_size"), ({"rank": 0}, "rank"),
                                             ({"update_proj_gap": 0}, "update_proj_gap")]
REGISTRY += [
    Entry("MicroAdam", MicroAdam, MICRO_KW,
          ADAM_BAD + [({"window": 0}, "window"), ({"density": 0.0}, "density"), ({"density": 1.5}, "density"),
                      ({"bits": 8}, "bits"), ({"quant_bucket_size": 1}, "quant_bucket_size"),
                      ({"value_dtype": torch.int8}, "value_dtype")],
          complex_ok=False,
          rosenbrock=(dict(lr=1e-3, density=1.0), 3000, 1e-4), quadratic=(dict(lr=0.01, density=0.3), 1000, 1e-8),
          extra={"state_bytes": _microadam_bytes,
                 "state_dtypes": {torch.bfloat16, torch.int16, torch.uint8, torch.float32}}),
    Entry("MicroAdam-unquantised", MicroAdam, dict(MICRO_KW, bits=None, value_dtype=None), ADAM_BAD, complex_ok=False,
          extra={"state_dtypes": {torch.bfloat16, torch.int16, torch.float32},
                 # window x k int16 indices and float32 values, float32 error
                 "state_bytes": lambda ps: sum(4 * math.ceil(0.3 * p.numel()) * (2 + 4) + 4 * p.numel() for p in ps)}),
    # the paper's whole-tensor blocks (default projector), random order seeded by the group's seed.
    # density 0.6: one of the two matrices of the suite's parameter lists is active (k = round(0.6 * 2)),
    # and the only matrix of a one-matrix group (k = round(0.6)); the test_state_memory params
    # ((64, 8) and a vector) are then plain AdamW.  The convergence problems are vectors, which every
    # projector trains with plain AdamW: run once, here
    Entry("FRUGAL", FRUGAL, FRUGAL_BLOCKS_KW,
          ADAM_BAD + [({"density": 1.5}, "density"), ({"update_gap": 0}, "update_gap"), ({"projector": "qr"}, "projector"),
                      ({"complement": "adam"}, "complement"), ({"complement_lr_scale": -1.0}, "complement_lr_scale"),
                      ({"seed": -1}, "seed"), ({"block_order": "zigzag"}, "block_order"),
                      ({"block_order": "mirror"}, "block_order")],  # an odd number of active tensors (1 of 2)
          complex_ok=False,
          rosenbrock=(dict(lr=0.1), 2000, 1e-3), quadratic=(dict(lr=0.03), 500, 1e-8),
          extra={"state_bytes": _frugal_block_bytes}),
    Entry("FRUGAL-descending-sgd", FRUGAL, dict(FRUGAL_BLOCKS_KW, block_order="descending", complement="sgd"), ADAM_BAD,
          complex_ok=False, extra={"state_bytes": _frugal_block_bytes}),
    # our within-matrix variant: a cyclic block of columns (rows) of each matrix
    Entry("FRUGAL-columns", FRUGAL, dict(FRUGAL_KW, projector="columns"), ADAM_BAD, complex_ok=False,
          extra={"state_bytes": _frugal_bytes}),
    Entry("FRUGAL-random", FRUGAL, dict(FRUGAL_KW, projector="random", seed=0, complement="sgd"), ADAM_BAD,
          complex_ok=False, extra={"state_bytes": _frugal_bytes}),
    Entry("FRUGAL-svd", FRUGAL, dict(FRUGAL_KW, projector="svd"), ADAM_BAD, complex_ok=False,
          extra={"single_path": True,  # one path for the SVD projector; + the r x n basis of each matrix
                 "state_bytes": lambda ps: _frugal_bytes(ps) + sum(
                     4 * round(0.5 * min(p.shape[0], p.numel() // p.shape[0])) * min(p.shape[0], p.numel() // p.shape[0])
                     for p in ps if p.dim() >= 2)}),
    Entry("AdamWSN", AdamWSN, SN_KW, SN_BAD, complex_ok=False,
          rosenbrock=(dict(lr=0.3), 2000, 1e-3), quadratic=(dict(lr=0.1, subset_size=1), 500, 1e-8),
          extra={"state_bytes": _adamwsn_bytes}),
    Entry("AdamWSN-adagrad", AdamWSN, dict(SN_KW, betas=(0.9, 1.0), bias_correction=False, subset_size=-1), SN_BAD,
          complex_ok=False,
          extra={"state_bytes": lambda ps: _adamwsn_bytes(ps, subsets=_sqrt_subsets)}),
]

BY_NAME = {e.name: e for e in REGISTRY}
