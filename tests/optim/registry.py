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

BY_NAME = {e.name: e for e in REGISTRY}
