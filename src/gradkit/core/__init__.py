"""Exact products with derivatives: a functional view of a model, JVP / VJP / HVP / GGN products
and per-sample gradients.  Knows nothing about solvers."""

from gradkit.core.functional import FunctionalModel, Params, check_train_mode, flatten, select_params, unflatten
from gradkit.core.products import DEFAULT_HVP_MODE, HVP_MODES, ggn_vp, hvp, jvp, per_sample_grads, vjp

__all__ = [
    "FunctionalModel",
    "Params",
    "select_params",
    "flatten",
    "unflatten",
    "check_train_mode",
    "jvp",
    "vjp",
    "hvp",
    "ggn_vp",
    "per_sample_grads",
    "HVP_MODES",
    "DEFAULT_HVP_MODE",
]
