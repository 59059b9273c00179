"""Expected Gradients (Erion, Janizek, Sturmfels, Lundberg & Lee 2021, arXiv:1906.10670)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradkit.explain._common import (
    Target,
    accumulate,
    affine_prefix,
    affine_transpose,
    check_batch_size,
    check_inputs,
    check_int,
    check_target,
    eval_mode,
    forward_values,
    map_rows,
    over_targets,
    select,
    sweep,
)

__all__ = ["expected_gradients", "expected_gradients_draws"]


def expected_gradients_draws(inputs: Tensor, background: Tensor, n: int, seed: int | None = None) -> tuple[Tensor, Tensor]:
    """The random draws of :func:`expected_gradients` with the same arguments: background indices
    ``(n, B)`` (uniform with replacement) and interpolation coefficients ``α`` ``(n, B)``
    (uniform on [0, 1)), drawn in that order from a ``torch.Generator`` seeded with ``seed``
    (``None``: torch's global generator)."""
    n = check_int(n, "n", low=1)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=inputs.device).manual_seed(check_int(seed, "seed", low=0))
    shape = (n, inputs.shape[0])
    index = torch.randint(background.shape[0], shape, generator=generator, device=inputs.device)
    alpha = torch.rand(shape, generator=generator, dtype=inputs.dtype, device=inputs.device)
    return index, alpha


@over_targets
def expected_gradients(
    model: Any,
    inputs: Tensor,
    target: Target = None,
    background: Tensor | None = None,
    n: int = 100,
    seed: int | None = None,
    batch_size: int | None = None,
    return_delta: bool = False,
    progress: bool = False,
    *,
    create_graph: bool = False,
    shortcut: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Expected Gradients (Erion, Janizek, Sturmfels, Lundberg & Lee 2021, "Improving performance
    of deep learning models with axiomatic attribution priors and expected gradients", Nature
    Machine Intelligence; arXiv:1906.10670, eqs. 3–4).

    .. math::

        φ_i = E_{x' \\sim D,\\, α \\sim U(0,1)} \\big[(x_i − x'_i)\\, ∂_i f(x' + α(x − x'))\\big]
            ≈ \\frac{1}{n} \\sum_{k=1}^{n} (x_i − x'_{k,i})\\, ∂_i f(x'_k + α_k (x − x'_k))

    Integrated Gradients averaged over baselines ``x'`` drawn from the data distribution ``D``
    (rows of ``background``, uniformly with replacement) with one gradient per sample at a uniform
    random ``α`` (:func:`expected_gradients_draws` gives the draws).  ``x = inputs``, ``f`` the
    scalar chosen by ``target``.  In expectation completeness reads ``Σ_i φ_i = f(x) − E f(x')``;
    ``return_delta=True`` returns the Monte Carlo error ``Σ_i φ_i − (f(x) − (1/n) Σ_k f(x'_k))``
    with the same sampled baselines (one forward pass over ``background``), exactly 0 for a model
    linear in its input.  This is Captum's ``GradientShap`` with ``stdevs=0``.

    Args:
        background: ``(M, *features)`` reference samples (the paper uses the training set).
        n: samples per example; 100 (the reference code suggests 100–200 for explanations, and
            ``n=1`` per training step for attribution priors).
        seed: seed of the draws (``None``: torch's global generator).
        batch_size: rows per model call; memory bounded by it for any ``n`` (unless
            ``create_graph``).
        create_graph: keep the graph (double backprop) so a penalty on the attributions can be
            trained through, see :mod:`gradkit.explain.priors`.
        shortcut: for an ``nn.Sequential`` that starts with affine layers (``Linear``, ``Conv``,
            ``Flatten``, eval ``BatchNorm``; :func:`~gradkit.explain._common.affine_prefix`),
            evaluate that part once on ``inputs`` and once on ``background`` and interpolate its
            outputs (it maps the straight path to the straight path), and apply its transposed
            Jacobian to each sample's gradient, instead of running it forward and backward per
            sample.  Equal to the full computation up to rounding (tested); ``False`` runs every
            sample through the whole model.  Not used with ``create_graph``.

    Stateless.
    """
    inputs = check_inputs(inputs)
    batch = inputs.shape[0]
    tgt = check_target(target, batch)
    n = check_int(n, "n", low=1)
    rows = check_batch_size(batch_size)
    if background is None:
        raise TypeError("expected_gradients needs background=, a tensor (M, *features) of reference samples")
    background = check_inputs(background, "background")
    if background.shape[1:] != inputs.shape[1:] or background.dtype != inputs.dtype or background.device != inputs.device:
        raise ValueError(
            f"background must be (M, *features) like inputs {tuple(inputs.shape[1:])} ({inputs.dtype}, {inputs.device}), "
            f"got shape {tuple(background.shape)} ({background.dtype}, {background.device})"
        )
    if not create_graph:
        inputs, background = inputs.detach(), background.detach()
    index, alpha = expected_gradients_draws(inputs, background, n, seed)

    def path(ends: Tensor, refs: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        def points(step: Tensor, example: Tensor) -> Tensor:
            ref = refs[index[step, example]]
            return torch.addcmul(ref, alpha[step, example].view((-1,) + (1,) * (ref.ndim - 1)), ends[example] - ref)

        return points

    weights = torch.full((n,), 1.0 / n, dtype=inputs.dtype, device=inputs.device)
    total = torch.zeros_like(inputs)
    with eval_mode(model):
        split = affine_prefix(model) if shortcut and not create_graph else None
        if split is None:
            net, points, back = model, path(inputs, background), None
        else:  # the path in the prefix's output space
            prefix, net = split
            points = path(map_rows(prefix, inputs, rows), map_rows(prefix, background, rows))
            back = affine_transpose(prefix, inputs)
        for chunk in sweep(net, points, n, batch, tgt, weights=weights, batch_size=rows,
                           create_graph=create_graph, progress=progress, desc="expected gradients"):
            grads = chunk.grads if back is None else back(chunk.grads)
            diff = inputs[chunk.example] - background[index[chunk.step, chunk.example]]
            total = accumulate(total, chunk.example, diff * grads, create_graph=create_graph)
        if not return_delta:
            return total
        f_x = forward_values(model, lambda step, example: inputs[example], 1, batch, tgt,
                             batch_size=rows, create_graph=create_graph)[0]
        with torch.set_grad_enabled(create_graph):
            # copies: an in-place first operation (ReLU(inplace=True)) must not modify the user's background
            out = torch.cat([model(background[i:i + rows].clone()) for i in range(0, background.shape[0], rows)])
            f_ref = select(out[index.reshape(-1)], tgt, torch.arange(batch).repeat(n)).reshape(n, batch).mean(0)
    delta = total.reshape(batch, -1).sum(1) - (f_x - f_ref)
    return total, delta
