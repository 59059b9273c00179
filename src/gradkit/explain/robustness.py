"""Attribution robustness: similarity measures between the attributions of ``x`` and ``x + δ``,
an attack that searches ``δ`` to move them, the IGR training penalty (Wang & Kong 2022), and two
bounds on how far an attribution can move: uniformly smoothed attributions with a certified
cosine similarity (after Wang & Kong 2024) and the first-order worst-case deviation (after Wang &
Kong 2023).

The attack and the bounds differentiate *through* an attribution (double backprop).  For a ReLU
network the input gradient is piecewise constant — its derivative is zero almost everywhere — so
gradient-based attacks on saliency need smooth activations (Ghorbani, Abid & Zou 2019 replace
ReLU by softplus); the tests use tanh networks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from scipy.special import betainc
from torch import Tensor
from tqdm.auto import tqdm, trange

from gradkit.explain._common import (
    Target,
    accumulate,
    check_batch_size,
    check_float,
    check_inputs,
    check_int,
    check_target,
    eval_mode,
    sweep,
)
from gradkit.explain._hessian_interval import hessian_interval
from gradkit.explain.integrated import integrated_gradients
from gradkit.explain.saliency import saliency
from gradkit.explain.smooth import _noisy_points

__all__ = [
    "cosine_similarity",
    "topk_intersection",
    "kendall_tau",
    "spearman",
    "Attack",
    "attribution_attack",
    "igr_penalty",
    "uniform_ball_noise",
    "uniform_smoothed",
    "ball_overlap",
    "certified_cosine",
    "attribution_jacobian",
    "DeviationBound",
    "deviation_bound",
]

Attribution = Callable[..., Tensor]

#: Samples drawn at once by :func:`uniform_ball_noise` (part of its seeded stream's definition).
NOISE_BLOCK = 64


# -------------------------------------------------------------------------------- similarities
def _pair(a: Any, b: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"attributions must be tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape or a.ndim < 1:
        raise ValueError(f"the attributions must have one shape (B, *features), got {tuple(a.shape)} and {tuple(b.shape)}")
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """``⟨a, b⟩ / (‖a‖ ‖b‖)`` per example (attributions flattened), ``(B,)``; differentiable."""
    a, b = _pair(a, b)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(torch.finfo(a.dtype).tiny)


def topk_intersection(a: Tensor, b: Tensor, k: int) -> Tensor:
    """Top-k intersection (Ghorbani, Abid & Zou 2019, "Interpretation of Neural Networks is
    Fragile", arXiv:1710.10547, Sec. 3): the share of the ``k`` largest entries of ``a`` that are
    also among the ``k`` largest of ``b``, per example, in [0, 1].  Ranks by value: pass
    ``.abs()`` to rank by magnitude (as the paper does for saliency maps)."""
    a, b = _pair(a, b)
    k = check_int(k, "k", low=1)
    if k > a.shape[1]:
        raise ValueError(f"k must be <= the number of features {a.shape[1]}, got {k}")
    top_a = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    top_b = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    return (top_a & top_b).sum(1).to(a.dtype) / k


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..F of each row, tied values sharing their average rank (scipy's ``rankdata``)."""
    out = torch.empty_like(x)
    for row, values in enumerate(x):
        sorted_values, order = values.sort(stable=True)
        _, counts = torch.unique_consecutive(sorted_values, return_counts=True)
        ends = counts.cumsum(0).to(x.dtype)
        average = ends - (counts.to(x.dtype) - 1) / 2
        out[row, order] = torch.repeat_interleave(average, counts)
    return out


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation per example: the Pearson correlation of the average ranks
    (ties share their mean rank, as ``scipy.stats.spearmanr``), ``(B,)``."""
    a, b = _pair(a, b)
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def kendall_tau(a: Tensor, b: Tensor, chunk: int = 256) -> Tensor:
    """Kendall's τ-b per example (ties handled as ``scipy.stats.kendalltau``, whose default it is):

    .. math:: τ_b = \\frac{\\sum_{i<j} \\operatorname{sgn}(a_i − a_j)\\operatorname{sgn}(b_i − b_j)}
              {\\sqrt{(n_0 − n_a)(n_0 − n_b)}}

    with ``n_0 = F(F−1)/2`` and ``n_a``, ``n_b`` the tied pairs of ``a`` and ``b``.  Exact
    ``O(F²)`` pair count, ``chunk`` rows of pairs at a time.  ``(B,)``."""
    a, b = _pair(a, b)
    num = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
    den_a, den_b = num.clone(), num.clone()
    for start in range(0, a.shape[1], chunk):
        sa = torch.sign(a[:, start:start + chunk, None] - a[:, None, :])
        sb = torch.sign(b[:, start:start + chunk, None] - b[:, None, :])
        num += (sa * sb).sum((1, 2))
        den_a += sa.abs().sum((1, 2))
        den_b += sb.abs().sum((1, 2))
    return num / (den_a * den_b).sqrt()


# ---------------------------------------------------------------------------------------- attack
class Attack(NamedTuple):
    """:func:`attribution_attack`'s answer: the perturbation ``delta`` (shaped like the inputs),
    the dissimilarity it reaches per example (``1 − cos``, the ℓ2 distance or ``1 −`` top-k
    intersection), and the attributions at ``inputs + delta``."""

    delta: Tensor
    dissimilarity: Tensor
    attributions: Tensor


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    flat = delta.reshape(delta.shape[0], -1)
    scale = (eps / flat.norm(dim=1).clamp_min(1e-300)).clamp(max=1.0)
    return delta * scale.view((-1,) + (1,) * (delta.ndim - 1))


def _random_start(inputs: Tensor, eps: float, norm: str, generator: torch.Generator) -> Tensor:
    if norm == "linf":
        return (2 * torch.rand(inputs.shape, generator=generator, dtype=inputs.dtype) - 1).to(inputs.device) * eps
    return next(uniform_ball_noise(inputs, 1, eps, generator=generator))


def _labels(model: Any, z: Tensor) -> Tensor | None:
    with torch.no_grad():
        out = model(z.clone())  # a copy: an in-place first operation must not modify z (the user's inputs)
    return out.argmax(1) if isinstance(out, Tensor) and out.ndim == 2 else None


def attribution_attack(
    model: Any,
    inputs: Tensor,
    target: Target = None,
    explainer: Attribution = saliency,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 20,
    step_size: float | None = None,
    objective: str = "cosine",
    k: int | None = None,
    restarts: int = 1,
    seed: int = 0,
    keep_prediction: bool = True,
    bounds: tuple[float, float] | None = None,
    progress: bool = False,
) -> Attack:
    """Search a perturbation ``‖δ‖ ≤ eps`` that moves the attribution of ``x = inputs`` while
    the predicted class stays (the attribution attack of Ghorbani, Abid & Zou 2019,
    arXiv:1710.10547, as projected gradient ascent of Madry et al. 2018):

    .. math:: \\max_{‖δ‖_p ≤ ε} D\\big(φ(x), φ(x + δ)\\big) \\quad \\text{s.t.}
              \\quad \\arg\\max f(x + δ) = \\arg\\max f(x)

    with ``D = 1 − cos`` (``objective="cosine"``), ``D = ‖φ(x+δ) − φ(x)‖₂`` (``"distance"``) or,
    for ``"topk"``, the share of ``|φ(x+δ)|`` outside the ``k`` largest entries of ``|φ(x)|``
    (the paper's top-k attack; the reported dissimilarity is then ``1 − topk_intersection``).  ``explainer(model, z, target,
    create_graph=True)`` must be differentiable in ``z`` (default: saliency; any gradkit
    explainer with ``create_graph``).  Steps: ``δ ← Π(δ + α sign ∇)`` (ℓ∞) or ``Π(δ + α ∇/‖∇‖)``
    (ℓ2), ``α = step_size`` (default ``2.5 eps / steps``), from a uniform random start in the ball,
    ``restarts`` times (generator seeded ``seed + r``).  An update that changes an example's
    predicted class (output ``(B, C)``) is not taken when ``keep_prediction``.  ``bounds``: clamp
    ``x + δ`` to the input domain.  The best valid iterate over all steps and restarts is
    returned.  Stateless.
    """
    inputs = check_inputs(inputs).detach()
    batch = inputs.shape[0]
    check_target(target, batch)
    eps = check_float(eps, "eps", allow_low=False)
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if objective not in ("cosine", "distance", "topk"):
        raise ValueError(f"objective must be 'cosine', 'distance' or 'topk', got {objective!r}")
    steps, restarts = check_int(steps, "steps", low=1), check_int(restarts, "restarts", low=1)
    alpha = 2.5 * eps / steps if step_size is None else check_float(step_size, "step_size", allow_low=False)
    with eval_mode(model):
        reference = explainer(model, inputs, target).detach()
        size = reference[0].numel()
        if objective == "topk":
            k = check_int(k, "k", low=1) if k is not None else max(1, size // 10)
            top0 = torch.zeros(batch, size, dtype=torch.bool, device=inputs.device)
            top0.scatter_(1, reference.reshape(batch, -1).abs().topk(k, dim=1).indices, True)
        labels0 = _labels(model, inputs) if keep_prediction else None

        def measure(phi: Tensor) -> tuple[Tensor, Tensor]:
            """(surrogate to ascend, reported dissimilarity) per example."""
            if objective == "cosine":
                d = 1 - cosine_similarity(reference, phi)
                return d, d.detach()
            if objective == "distance":
                d = (phi - reference).reshape(batch, -1).norm(dim=1)
                return d, d.detach()
            mass = phi.reshape(batch, -1).abs()
            outside = 1 - (mass * top0).sum(1) / mass.sum(1).clamp_min(torch.finfo(mass.dtype).tiny)
            return outside, 1 - topk_intersection(reference.abs(), phi.detach().abs(), k)

        def clamp(delta: Tensor) -> Tensor:
            delta = _project(delta, eps, norm)
            return delta if bounds is None else (inputs + delta).clamp(*bounds) - inputs

        def valid(delta: Tensor) -> Tensor:
            if labels0 is None:
                return torch.ones(batch, dtype=torch.bool, device=inputs.device)
            return _labels(model, inputs + delta) == labels0

        best = torch.zeros_like(inputs)
        best_d = torch.full((batch,), -torch.inf, dtype=inputs.dtype, device=inputs.device)
        best_phi = reference.clone()
        bar = tqdm(total=restarts * (steps + 1), desc="attribution attack", disable=not progress, leave=False)
        for r in range(restarts):
            generator = torch.Generator().manual_seed(check_int(seed, "seed", low=0) + r)
            delta = clamp(_random_start(inputs, eps, norm, generator))
            delta = torch.where(valid(delta).view((-1,) + (1,) * (inputs.ndim - 1)), delta, torch.zeros_like(delta))
            for step in range(steps + 1):
                z = (inputs + delta).requires_grad_(True)
                with torch.enable_grad():
                    phi = explainer(model, z, target, create_graph=True)
                    surrogate, d = measure(phi)
                    grad = torch.autograd.grad(surrogate.sum(), z, allow_unused=True)[0] if step < steps else None
                better = valid(delta) & (d > best_d)
                shape = (-1,) + (1,) * (inputs.ndim - 1)
                best = torch.where(better.view(shape), delta, best)
                best_phi = torch.where(better.view(shape), phi.detach(), best_phi)
                best_d = torch.where(better, d, best_d)
                bar.update(1)
                if grad is None:
                    break
                if norm == "linf":
                    move = alpha * grad.sign()
                else:
                    g = grad.reshape(batch, -1)
                    move = alpha * grad / g.norm(dim=1).clamp_min(1e-300).view(shape)
                proposal = clamp(delta + move)
                delta = torch.where(valid(proposal).view(shape), proposal, delta)
        bar.close()
    return Attack(best, best_d, best_phi)


# ------------------------------------------------------------------------------------------- IGR
def igr_penalty(
    model: Any,
    inputs: Tensor,
    perturbed: Tensor,
    target: Target = None,
    *,
    baselines: Tensor | float | None = None,
    steps: int = 16,
    rule: str = "gausslegendre",
    detach_natural: bool = False,
) -> Tensor:
    """The IGR regulariser (Wang & Kong 2022, "Exploiting the Relationship Between Kendall's Rank
    Correlation and Cosine Similarity for Attribution Protection", arXiv:2205.07279): the paper
    shows that the expected Kendall τ between natural and perturbed attributions grows with their
    cosine similarity and trains with a term that maximises that cosine for Integrated Gradients:

    .. math:: R = \\frac{1}{B} \\sum_b \\big(1 − \\cos(\\mathrm{IG}(x_b), \\mathrm{IG}(x'_b))\\big)

    ``x = inputs``, ``x' = perturbed`` (e.g. :func:`attribution_attack` with an IG explainer, or
    random noise), IG from ``baselines`` with ``steps`` nodes of ``rule`` (see
    :func:`~gradkit.explain.integrated_gradients`).  Both IGs keep their graph
    (``create_graph=True``), so ``loss = cross_entropy + λ R`` can be backpropagated to the
    parameters.  We could read only the abstract's statement of the objective (maximise the
    cosine similarity of natural and perturbed IG attributions), not the paper's exact training
    loss; λ and the choice of ``x'`` are the caller's.  A third-party replication
    (DinasAba/IGR_tool, ``src/train.py`` at commit 5d3b0e4) adds ``λ R`` with ``λ = 1`` to an
    adversarial-training loss, takes ``x'`` as that training's PGD example and detaches ``IG(x)``
    (``detach_natural=True``: no gradient through ``IG(x)``).  Note that the explainers switch the model
    to eval mode while they run (see :mod:`gradkit.explain._common`).
    """
    inputs = check_inputs(inputs)
    perturbed = check_inputs(perturbed, "perturbed")
    if perturbed.shape != inputs.shape:
        raise ValueError(f"perturbed must have the shape of inputs {tuple(inputs.shape)}, got {tuple(perturbed.shape)}")
    if not isinstance(detach_natural, bool):
        raise TypeError(f"detach_natural must be True or False, got {detach_natural!r}")
    natural = integrated_gradients(model, inputs, target, baselines=baselines, steps=steps, rule=rule,
                                   create_graph=not detach_natural)
    moved = integrated_gradients(model, perturbed, target, baselines=baselines, steps=steps, rule=rule, create_graph=True)
    return (1 - cosine_similarity(natural, moved)).mean()


# ------------------------------------------------------------- uniformly smoothed attributions
def uniform_ball_noise(
    inputs: Tensor, n: int, radius: float, seed: int | None = None, *, generator: torch.Generator | None = None
) -> Iterator[Tensor]:
    """``n`` samples ``η_k`` uniform in the ℓ2 ball of radius ``radius`` in the ``F``-dimensional
    space of one example, one ``inputs``-shaped tensor (one draw per example) at a time: ``η = r
    U^{1/F} g/‖g‖`` with ``g ∼ N(0, I)``, ``U ∼ U(0, 1)`` (Muller 1959).  They are drawn in blocks
    of :data:`NOISE_BLOCK` samples (``g`` then ``U`` for the whole block) from a generator seeded
    with ``seed`` (or the given ``generator``; neither: torch's global one), so the samples do
    not depend on how they are consumed."""
    inputs = check_inputs(inputs)
    n = check_int(n, "n", low=1)
    radius = check_float(radius, "radius")
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(check_int(seed, "seed", low=0))
    batch, size = inputs.shape[0], inputs[0].numel()
    for start in range(0, n, NOISE_BLOCK):
        k = min(NOISE_BLOCK, n - start)
        g = torch.randn(k, batch, size, generator=generator, dtype=inputs.dtype)
        u = torch.rand(k, batch, 1, generator=generator, dtype=inputs.dtype)
        eta = (radius * u.pow(1.0 / size) * g / g.norm(dim=2, keepdim=True)).to(inputs.device)
        yield from eta.reshape((k,) + tuple(inputs.shape)).unbind(0)


def _clip(rows: Tensor, max_norm: float | None) -> Tensor:
    if max_norm is None:
        return rows
    norms = rows.reshape(rows.shape[0], -1).norm(dim=1).clamp_min(1e-300)
    return rows * (max_norm / norms).clamp(max=1.0).view((-1,) + (1,) * (rows.ndim - 1))


def uniform_smoothed(
    model: Any,
    inputs: Tensor,
    target: Target = None,
    *,
    radius: float,
    n: int = 100,
    seed: int | None = None,
    attribution: Attribution | None = None,
    max_norm: float | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    create_graph: bool = False,
) -> Tensor:
    """Uniformly smoothed attribution (Wang & Kong 2024, "Certified ℓ2 Attribution Robustness via
    Uniformly Smoothed Attributions", arXiv:2405.06361):

    .. math:: h(x) = E_{η ∼ U(B(0, r))}\\, g(x + η) ≈ \\frac{1}{n} \\sum_{k=1}^n g(x + η_k)

    with ``η_k`` from :func:`uniform_ball_noise` (``r = radius``, ``seed``) and ``g`` the input
    gradient (``attribution=None``, chunked by ``batch_size`` rows) or ``attribution(model, z,
    target, create_graph=...)``.  ``max_norm = M`` clips every ``g(x + η_k)`` to ``‖·‖₂ ≤ M`` so
    that :func:`certified_cosine` applies with that ``M``.  ``create_graph`` keeps the graph
    (to attack the smoothed attribution).  Returns ``h`` shaped like ``inputs``.
    """
    inputs = check_inputs(inputs)
    batch = inputs.shape[0]
    tgt = check_target(target, batch)
    x = inputs if create_graph else inputs.detach()
    if max_norm is not None:
        max_norm = check_float(max_norm, "max_norm", allow_low=False)
    noise = uniform_ball_noise(x.detach(), n, radius, seed)
    total = torch.zeros_like(x)
    with eval_mode(model):
        if attribution is None:
            for chunk in sweep(model, _noisy_points(x, noise), n, batch, tgt, batch_size=check_batch_size(batch_size),
                               create_graph=create_graph, progress=progress, desc="uniform smoothing"):
                total = accumulate(total, chunk.example, _clip(chunk.grads, max_norm), create_graph=create_graph)
        else:
            for _ in trange(n, desc="uniform smoothing", disable=not progress, leave=False):
                g = attribution(model, x + next(noise), target, create_graph=create_graph)
                total = total + _clip(g if create_graph else g.detach(), max_norm)
    return total / n


def ball_overlap(eps: float, radius: float, dim: int) -> float:
    """``V(B(0, r) ∩ B(δ, r)) / V(B(0, r))`` for ``‖δ‖₂ = eps`` in ``dim`` dimensions: two
    hyperspherical caps of height ``r − ε/2`` (Li 2011, "Concise Formulas for the Area and Volume
    of a Hyperspherical Cap"), ``I_{1 − ε²/(4r²)}((d+1)/2, 1/2)`` with ``I`` the regularised
    incomplete beta function; 0 for ``ε ≥ 2r``."""
    eps, radius = check_float(eps, "eps"), check_float(radius, "radius", allow_low=False)
    dim = check_int(dim, "dim", low=1)
    if eps >= 2 * radius:
        return 0.0
    return float(betainc((dim + 1) / 2, 0.5, 1 - eps**2 / (4 * radius**2)))


def certified_cosine(smoothed: Tensor, *, max_norm: float, eps: float, radius: float) -> Tensor:
    """A lower bound on ``cos(h(x), h(x + δ))`` valid for every ``‖δ‖₂ ≤ eps``, per example
    ``(B,)``, for the uniformly smoothed attribution ``h = smoothed`` of an attribution bounded by
    ``‖g‖₂ ≤ M = max_norm`` (see :func:`uniform_smoothed`) with smoothing radius ``r = radius``.

    **Derived here, not the paper's formula.**  ``h(x + δ) − h(x) = (1/V)(∫_{B(x+δ)∖B(x)} g −
    ∫_{B(x)∖B(x+δ)} g)``; each crescent has volume ``V (1 − ball_overlap(ε, r, F))``, so
    ``‖h(x + δ) − h(x)‖ ≤ ρ = 2M(1 − ball_overlap)``, and every vector within ``ρ`` of ``h``
    makes an angle of at most ``arcsin(ρ/‖h‖)`` with it:

    .. math:: \\cos(h(x), h(x + δ)) ≥ \\sqrt{1 − ρ^2/‖h(x)‖^2} \\quad (ρ < ‖h(x)‖;\\ −1 \\text{ otherwise})

    The bound is attained by bounded attributions built for the purpose (see the tests), so no
    larger one holds in general.  A secondary summary of Wang & Kong (2024, arXiv:2405.06361)
    states their Theorem as ``‖h‖ / sqrt(‖h‖² + (M V_U / V_S)²)``; we could not read the
    definition of ``V_U`` nor the proof, and that expression exceeds ours whenever ``M V_U/V_S ≤
    ρ``, so we do not implement it.  ``h`` must be the exact expectation; with the Monte Carlo
    estimate the bound holds up to its sampling error (``O(M/√n)``).
    """
    if not isinstance(smoothed, Tensor) or smoothed.ndim < 1:
        raise TypeError("smoothed must be a tensor (B, *features) of smoothed attributions")
    max_norm = check_float(max_norm, "max_norm", allow_low=False)
    flat = smoothed.detach().reshape(smoothed.shape[0], -1)
    rho = 2 * max_norm * (1 - ball_overlap(eps, radius, flat.shape[1]))
    norm = flat.norm(dim=1)
    ratio = rho / norm.clamp_min(1e-300)
    return torch.where(ratio < 1, (1 - ratio.clamp(max=1).square()).sqrt(), torch.full_like(norm, -1.0))


# ----------------------------------------------------------------- first-order deviation bound
def attribution_jacobian(model: Any, inputs: Tensor, target: Target = None, attribution: Attribution = saliency) -> Tensor:
    """``J_b = ∂φ(x_b)/∂x_b``, shape ``(B, F, F)``, for ``φ = attribution(model, x, target,
    create_graph=True)`` (default saliency: ``J`` is the input Hessian of the target score), by
    ``F`` reverse passes through the attribution's graph (rows of different examples do not
    interact).  Dense: for small inputs."""
    x = check_inputs(inputs).detach().requires_grad_(True)
    check_target(target, x.shape[0])
    batch = x.shape[0]
    with eval_mode(model), torch.enable_grad():
        phi = attribution(model, x, target, create_graph=True).reshape(batch, -1)
        size = phi.shape[1]
        rows = []
        for i in range(size):
            (row,) = torch.autograd.grad(phi[:, i].sum(), x, retain_graph=i < size - 1, allow_unused=True)
            rows.append(torch.zeros_like(x).reshape(batch, -1) if row is None else row.reshape(batch, -1))
    return torch.stack(rows, 1)


class DeviationBound(NamedTuple):
    """:func:`deviation_bound`'s answer per example: the bound on ``‖φ(x+δ) − φ(x)‖₂``, the
    implied lower bound on ``cos(φ(x), φ(x+δ))``, and ``σ_max(J)``."""

    distance: Tensor
    cosine: Tensor
    spectral: Tensor


def deviation_bound(
    model: Any,
    inputs: Tensor,
    target: Target = None,
    *,
    eps: float,
    norm: str = "l2",
    attribution: Attribution = saliency,
    certified: bool = False,
) -> DeviationBound:
    """First-order worst-case attribution deviation (after Wang & Kong 2023, "A Practical Upper
    Bound for the Worst-Case Attribution Deviations", CVPR, arXiv:2303.00340): linearising the
    attribution, ``φ(x + δ) ≈ φ(x) + J δ``, the largest deviation over the perturbation ball is

    .. math:: \\max_{‖δ‖_2 ≤ ε} ‖Jδ‖_2 = ε\\, σ_{\\max}(J), \\qquad
              \\max_{‖δ‖_∞ ≤ ε} ‖Jδ‖_2 ≤ ε \\min\\big(\\sqrt F σ_{\\max}(J),
              \\sqrt{\\textstyle\\sum_i (\\sum_j |J_{ij}|)^2}\\big)

    (``J`` from :func:`attribution_jacobian`, ``ε = eps``), and the cosine bound follows from the
    same geometry as :func:`certified_cosine`: ``cos ≥ sqrt(1 − D²/‖φ(x)‖²)`` (−1 if ``D ≥
    ‖φ(x)‖``).  We could read the paper's abstract (a constrained optimisation bounding Euclidean
    and cosine deviations under ℓ2 and ℓ∞ perturbations, with the prediction unchanged) but not
    its equations; this is the first-order bound that its formulation reduces to, dropping the
    prediction constraint (which only shrinks the feasible set).  The paper's Figure 1 shows this
    Jacobian for Integrated Gradients: pass ``attribution=integrated_gradients`` for it.  It is
    exact when the attribution is affine in ``x`` (a quadratic model's gradient) and a first-order
    approximation otherwise: a nonlinear attribution can exceed it by ``O(ε²)`` (measured in the
    tests: up to 13 % at ε = 0.05 on a trained tanh MLP).

    ``certified=True`` (saliency of a chain of ``Linear`` / ``Tanh`` / ``Sigmoid`` layers, an index
    target; our addition) makes it a certificate: elementwise bounds ``L ≤ ∇²f(z) ≤ U`` valid for
    every ``z`` in the ball come from interval arithmetic on the second-order forward pass (see
    :mod:`gradkit.explain._hessian_interval`), and the mean value theorem gives
    ``‖φ(x+δ) − φ(x)‖₂ ≤ ε (‖C‖₂ + ‖R‖₂)`` with ``C = (U + L)/2``, ``R = (U − L)/2`` (ℓ∞:
    ``ε min(√F (‖C‖₂ + ‖R‖₂), ‖max(|L|, |U|) 1‖₂)``).  It tends to the first-order bound as
    ``ε → 0``; on the test MLP it is 1.1–1.9× the strongest PGD deviation for ε = 0.0125–0.05.
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    eps = check_float(eps, "eps")
    inputs = check_inputs(inputs).detach()
    if not isinstance(certified, bool):
        raise TypeError(f"certified must be True or False, got {certified!r}")
    if certified:
        if attribution is not saliency:
            raise ValueError("certified=True bounds the saliency map (attribution=saliency) only")
        if callable(target) and not isinstance(target, Tensor):
            raise ValueError("certified=True needs a class index or a tensor of indices as target, not a callable")
        with eval_mode(model):  # before the Jacobian: unsupported models fail with the clear error
            low, high = hessian_interval(model, inputs, check_target(target, inputs.shape[0]), eps, norm)
    jac = attribution_jacobian(model, inputs, target, attribution)
    with eval_mode(model):
        phi = attribution(model, inputs, target).detach().reshape(inputs.shape[0], -1)
    spectral = torch.linalg.matrix_norm(jac, ord=2)
    if certified:
        sup_norm = torch.linalg.matrix_norm((high + low) / 2, ord=2) + torch.linalg.matrix_norm((high - low) / 2, ord=2)
        entries = torch.maximum(low.abs(), high.abs())
    else:
        sup_norm, entries = spectral, jac.abs()
    if norm == "l2":
        distance = eps * sup_norm
    else:
        rows = entries.sum(2).norm(dim=1)
        distance = eps * torch.minimum(math.sqrt(jac.shape[1]) * sup_norm, rows)
    ratio = distance / phi.norm(dim=1).clamp_min(1e-300)
    cosine = torch.where(ratio < 1, (1 - ratio.clamp(max=1).square()).sqrt(), torch.full_like(ratio, -1.0))
    return DeviationBound(distance, cosine, spectral)
