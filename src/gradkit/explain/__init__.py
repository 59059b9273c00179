"""Attributions: which inputs drove a prediction, and can that answer be trusted.

Every explainer is a function ``f(model, inputs, target, **options)`` returning a tensor shaped
like ``inputs``; the shared conventions (targets, batching, model hygiene, deltas) are documented
in :mod:`gradkit.explain._common`.
"""

from gradkit.explain._common import DEFAULT_BATCH_SIZE, HookSet
from gradkit.explain.expected import expected_gradients, expected_gradients_draws
from gradkit.explain.idgi import idgi
from gradkit.explain.integrated import RULES, cells, integrated_gradients, quadrature
from gradkit.explain.priors import gini, gini_sparsity_prior, graph_laplacian_prior, laplacian, total_variation_prior
from gradkit.explain.saliency import input_x_gradient, saliency
from gradkit.explain.cam import grad_cam, grad_cam_pp, hires_cam, smooth_grad_cam_pp
from gradkit.explain.evaluation import (
    Curve,
    completeness_delta,
    deletion_curve,
    infidelity,
    insertion_curve,
    sensitivity_max,
)
from gradkit.explain.local_approximation import Faithfulness, Neighbourhood, local_fidelity, most_faithful, optimal_attribution
from gradkit.explain.roar import DiffRoar, block_digits, diffroar
from gradkit.explain.fullgrad import FullGradDecomposition, fullgrad, fullgrad_decomposition
from gradkit.explain.lrp import RULE_NAMES, AlphaBeta, Epsilon, Gamma, Rule, Zero, ZBox, ZPlus, lrp, lrp_relevances
from gradkit.explain.patching import activation_patching, attribution_patching, identity_rule, relevance_patching
from gradkit.explain.perturbation import kernel_shap, lime, occlusion
from gradkit.explain.robustness import (
    Attack,
    DeviationBound,
    attribution_attack,
    certified_cosine,
    cosine_similarity,
    deviation_bound,
    igr_penalty,
    kendall_tau,
    spearman,
    topk_intersection,
    uniform_smoothed,
)
from gradkit.explain.smooth import smoothgrad, smoothgrad_noise, smoothgrad_sq, vargrad

__all__ = [
    "saliency",
    "input_x_gradient",
    "smoothgrad",
    "smoothgrad_sq",
    "vargrad",
    "smoothgrad_noise",
    "integrated_gradients",
    "quadrature",
    "cells",
    "RULES",
    "expected_gradients",
    "expected_gradients_draws",
    "idgi",
    "total_variation_prior",
    "gini",
    "gini_sparsity_prior",
    "laplacian",
    "graph_laplacian_prior",
    "HookSet",
    "DEFAULT_BATCH_SIZE",
    # layer- and structure-based
    "grad_cam", "hires_cam", "grad_cam_pp", "smooth_grad_cam_pp",
    "fullgrad", "fullgrad_decomposition", "FullGradDecomposition",
    "lrp", "lrp_relevances", "Rule", "Zero", "Epsilon", "Gamma", "AlphaBeta", "ZPlus", "ZBox", "RULE_NAMES",
    "activation_patching", "attribution_patching", "relevance_patching", "identity_rule",
    # perturbation baselines
    "occlusion", "lime", "kernel_shap",
    # evaluation (neighbourhood constructors: gradkit.explain.local_approximation.gaussian, .path, ...)
    "completeness_delta", "deletion_curve", "insertion_curve", "Curve", "infidelity", "sensitivity_max",
    "Neighbourhood", "local_fidelity", "optimal_attribution", "most_faithful", "Faithfulness",
    "block_digits", "diffroar", "DiffRoar",
    # robustness and certificates
    "cosine_similarity", "topk_intersection", "kendall_tau", "spearman", "attribution_attack", "Attack",
    "igr_penalty", "uniform_smoothed", "certified_cosine", "deviation_bound", "DeviationBound",
]
