"""Tests of ``gradkit.report``: the page is self-contained and complete, and its numbers agree
with dense float64 computations made here without gradkit."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from torch import nn
from torch.func import functional_call

import gradkit
from gradkit.report import ReportConfig, ReportContext, Section, run_report, training_section
from gradkit.report.geometry import geometry_section


# ------------------------------------------------------------------ one quick run for the module
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "sub" / "report.html"  # "sub" does not exist yet
    return run_report(out=out, quick=True, seed=0, progress=False, strict=True, threads=1)


def _flat_params(model: nn.Module) -> tuple[torch.Tensor, list[str], list[torch.Size]]:
    named = list(model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    return flat, [n for n, _ in named], [p.shape for _, p in named]


def _unflatten(v: torch.Tensor, names: list[str], shapes: list[torch.Size]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in zip(names, shapes):
        out[name] = v[offset : offset + shape.numel()].view(shape)
        offset += shape.numel()
    return out


@pytest.fixture(scope="module")
def dense(quick):
    """Independent dense float64 Hessian and GGN of the analysed model's loss."""
    ctx = quick.context
    model, (x, y) = ctx.analysis_model, ctx.analysis_data
    flat, names, shapes = _flat_params(model)

    def logits(v: torch.Tensor) -> torch.Tensor:
        return functional_call(model, _unflatten(v, names, shapes), (x,))

    def loss(v: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits(v), y)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the report itself in the tests: robust on shared cores
    try:
        H = torch.autograd.functional.hessian(loss, flat, vectorize=True)
        J = torch.autograd.functional.jacobian(logits, flat, vectorize=True)  # (N, C, n)
        p = torch.softmax(logits(flat), dim=1).detach()
        hess_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # ∇²_f CE per example
        G = torch.einsum("nci,ncd,ndj->ij", J, hess_out, J) / x.shape[0]
        grad = torch.autograd.grad(loss(flat.requires_grad_()), flat)[0]
        return {"H": H, "G": G, "H_eig": torch.linalg.eigh(H), "G_eig": torch.linalg.eigvalsh(G), "grad": grad}
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ page
def test_html_is_self_contained_and_complete(quick):
    assert quick.path.exists() and quick.path.name == "report.html"
    page = quick.path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "data:image/png;base64," in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "external resource in the page"
    assert "<script" not in page and "<link" not in page
    for section in quick.sections:
        assert f'<section id="{section.key}">' in page
        assert section.title in page
    keys = ["training", "geometry", "curvature", "optimizers", "hyperparameters", "explanations"]
    assert [s.key for s in quick.sections] == keys
    # header: version, seed, torch version, command
    assert gradkit.__version__ in page and torch.__version__ in page
    assert "run_report(" in page
    # every figure made it into the page, as a PNG
    n_plots = sum(len(s.plots) for s in quick.sections)
    assert n_plots >= 4
    assert page.count("data:image/png;base64,") == n_plots
    for match in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]{8})", page):
        assert match.startswith("iVBORw0K")  # PNG signature


def test_sections_have_summaries_and_nothing_missing(quick):
    assert quick.failed == []
    for section in quick.sections:
        assert section.summary, section.key
        assert section.results is not None
    geometry = quick["geometry"]
    assert geometry.missing == {}, geometry.missing
    summary = "\n".join(quick.summary)
    for needle in ("λ_max", "tr(Hessian)", "tr(GGN)", "2/η", "accuracy"):
        assert needle in summary


# ------------------------------------------------------------------ training
def test_training_numbers(quick):
    ctx, t = quick.context, quick["training"]
    cfg = ctx.config
    assert cfg == ReportConfig.quick()
    assert t.steps == cfg.steps and t.lr == cfg.lr
    assert t.num_params == sum(p.numel() for p in ctx.model.parameters()) == 64 * 32 + 32 + 32 * 10 + 10
    assert len(ctx.training.train_loss) == cfg.steps + 1
    # the recorded final numbers are those of the returned model
    with torch.no_grad():
        logits = ctx.model(ctx.data.x_test)
        test_loss = float(nn.functional.cross_entropy(logits, ctx.data.y_test))
        test_acc = float((logits.argmax(1) == ctx.data.y_test).float().mean())
    assert test_loss == pytest.approx(t.test_loss, rel=1e-5)
    assert test_acc == pytest.approx(t.test_acc)
    assert t.test_acc > 0.9 and t.train_loss < ctx.training.train_loss[0] / 10
    # standardised with training statistics
    assert torch.allclose(ctx.data.x_train.mean(0), torch.zeros(64), atol=1e-5)


def test_analysis_model_is_double_copy_of_trained(quick):
    ctx = quick.context
    for p32, p64 in zip(ctx.model.parameters(), ctx.analysis_model.parameters()):
        assert p64.dtype == torch.float64
        assert torch.equal(p64, p32.detach().double())
    x, y = ctx.analysis_data
    assert x.dtype == torch.float64 and x.shape == (ctx.config.analysis_examples, 64)
    assert torch.equal(x, ctx.data.x_train[: x.shape[0]].double())


# ------------------------------------------------------------------ geometry vs dense float64
def test_top_hessian_eigenvalues_match_dense(quick, dense):
    g = quick["geometry"]
    evals = dense["H_eig"].eigenvalues  # ascending
    lam_max = float(evals[-1])
    k = g.top_k
    assert float(g.hessian_top[0]) == pytest.approx(lam_max, rel=1e-6)
    assert torch.allclose(g.hessian_top, evals.flip(0)[:k], rtol=0, atol=1e-6 * lam_max)
    assert torch.allclose(g.hessian_bottom, evals[:k], rtol=0, atol=1e-6 * lam_max)
    assert float(g.hessian_bottom[0]) < 0  # a tanh network's Hessian is indefinite here
    # the report's own dense check agrees with ours
    assert torch.allclose(g.hessian_eigvals_exact, evals, rtol=0, atol=1e-10 * lam_max)


def test_top_ggn_eigenvalues_match_dense(quick, dense):
    g = quick["geometry"]
    evals = dense["G_eig"]
    assert float(evals[0]) > -1e-10 * float(evals[-1])  # PSD
    assert torch.allclose(g.ggn_top, evals.flip(0)[: g.top_k], rtol=0, atol=1e-6 * float(evals[-1]))
    assert torch.allclose(g.ggn_eigvals_exact, evals, rtol=0, atol=1e-10 * float(evals[-1]))


def test_traces_match_dense_within_stated_error(quick, dense):
    g = quick["geometry"]
    for trace, M in ((g.hessian_trace, dense["H"]), (g.ggn_trace, dense["G"])):
        exact = float(M.diagonal().sum())
        assert trace.exact == pytest.approx(exact, rel=1e-10)
        assert trace.pm == pytest.approx(2 * trace.hutchinson_se)
        assert abs(trace.hutchpp - exact) <= trace.pm
        assert abs(trace.hutchinson - exact) <= 3 * trace.hutchinson_se
        assert trace.num_matvecs == quick.context.config.trace_matvecs


def test_stability_verdict_consistent(quick, dense):
    g = quick["geometry"]
    s = g.stability
    lr = quick.context.config.lr
    assert s.lr == lr and s.threshold == pytest.approx(2.0 / lr)
    assert s.lambda_max == pytest.approx(float(dense["H_eig"].eigenvalues[-1]), rel=1e-6)
    assert s.stable == (s.lambda_max < 2.0 / lr)
    assert s.ratio == pytest.approx(lr * s.lambda_max / 2)
    verdict = [line for line in quick.section("geometry").summary if line.startswith("GD stability")][0]
    assert ("→ stable" in verdict) == s.stable


def test_stability_verdict_flips_beyond_edge_of_stability(quick):
    """Same analysed point, a learning rate above 2/λ_max: the verdict must say unstable."""
    ctx = quick.context
    lam = quick["geometry"].stability.lambda_max
    run = dataclasses.replace(ctx.training, lr=2.5 / lam, checkpoints=[])
    tiny = dataclasses.replace(ctx.config, top_k=2, trace_matvecs=6, slq_probes=1, slq_steps=5, dense_max_params=0)
    ctx2 = dataclasses.replace(ctx, training=run, config=tiny, results={})
    section = geometry_section(ctx2)
    s = section.results.stability
    assert s.lambda_max == pytest.approx(lam, rel=1e-6)
    assert s.stable is False and s.ratio == pytest.approx(1.25, rel=1e-6)
    assert any("NOT stable" in line for line in section.summary)


def test_gradient_fraction_matches_dense(quick, dense):
    g = quick["geometry"]
    grad = dense["grad"]
    V = dense["H_eig"].eigenvectors[:, -g.top_k :]
    expected = float((V.T @ grad).square().sum() / grad.square().sum())
    assert g.gradient_fraction == pytest.approx(expected, rel=1e-4, abs=1e-10)
    assert g.grad_norm == pytest.approx(float(grad.norm()), rel=1e-8)


def test_sharpness_along_training_ends_at_lambda_max(quick):
    g = quick["geometry"]
    assert g.sharpness_steps[0] == 0 and g.sharpness_steps[-1] == quick.context.config.steps
    assert len(g.sharpness) == len(g.sharpness_steps) == quick.context.config.sharpness_checkpoints
    assert g.sharpness[-1] == pytest.approx(g.stability.lambda_max, rel=1e-5)


def test_spectral_density_consistent_with_trace(quick):
    """The SLQ density's mean is an estimate of tr/n: loosely consistent with the exact trace."""
    g = quick["geometry"]
    for density, trace in ((g.hessian_density, g.hessian_trace), (g.ggn_density, g.ggn_trace)):
        w, nodes = density.weights, density.nodes.nan_to_num(0.0)
        mean = float((w * nodes).sum(1).mean())
        assert mean == pytest.approx(trace.exact / g.num_params, rel=0.5)


# ------------------------------------------------------------------ structure, extension, failure
TINY = ReportConfig(
    hidden=6, steps=20, analysis_examples=48, top_k=2, trace_matvecs=9, slq_probes=1, slq_steps=8,
    dense_max_params=0, sharpness_checkpoints=2, optimizer_epochs=1, optimizer_count=2,
    hyper_outer_steps=2, hyper_inner_steps=10, hyper_warmup_steps=20, explain_examples=8, diffroar_examples=100,
)


def test_custom_section_sees_context_and_failures_are_isolated(tmp_path):
    seen = {}

    def custom_section(ctx: ReportContext) -> Section:
        seen["training"] = ctx.results["training"]
        seen["seed"] = ctx.seed_for("custom")
        return Section(key="custom", title="My custom section", summary=["custom: 42"], body=["<p>hello &amp; bye</p>"],
                       results=42)

    def broken_section(ctx: ReportContext) -> Section:
        raise RuntimeError("boom")

    result = run_report(
        out=tmp_path / "r.html", seed=3, config=TINY, sections=[training_section, custom_section, broken_section], threads=1
    )
    assert [s.key for s in result.sections] == ["training", "custom", "broken"]
    assert result.failed == ["broken"]
    assert result["custom"] == 42 and seen["training"] is result["training"]
    page = result.path.read_text(encoding="utf-8")
    assert "My custom section" in page and "<p>hello &amp; bye</p>" in page
    assert "this section failed: RuntimeError: boom" in page
    assert "  custom: 42" in result.summary
    with pytest.raises(RuntimeError, match="boom"):
        run_report(out=tmp_path / "s.html", config=TINY, sections=[broken_section], strict=True)


def test_missing_method_degrades_with_a_note(tmp_path, monkeypatch):
    import gradkit.linalg

    def not_written(*args, **kwargs):
        raise NotImplementedError("spectral_density: not written yet")

    monkeypatch.setattr(gradkit.linalg, "spectral_density", not_written)
    result = run_report(out=tmp_path / "r.html", config=TINY, strict=True, threads=1)
    g = result["geometry"]
    assert set(g.missing) == {"Hessian spectral density", "GGN spectral density"}
    assert g.hessian_density is None and g.stability is not None and g.hessian_trace.hutchpp is not None
    page = result.path.read_text(encoding="utf-8")
    assert "spectral_density: not written yet" in page


def test_deterministic_for_a_seed_and_seed_matters(tmp_path):
    a = run_report(out=tmp_path / "a.html", seed=5, config=TINY, threads=1)
    b = run_report(out=tmp_path / "b.html", seed=5, config=TINY, threads=1)
    c = run_report(out=tmp_path / "c.html", seed=6, config=TINY, threads=1)
    assert a.context.training.train_loss == b.context.training.train_loss
    assert a["geometry"].hessian_trace.hutchpp == b["geometry"].hessian_trace.hutchpp
    assert a["geometry"].stability.lambda_max == b["geometry"].stability.lambda_max
    assert a.context.training.train_loss != c.context.training.train_loss
    # the global RNG is not consumed by the report
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    run_report(out=tmp_path / "d.html", seed=1, config=TINY, threads=1)
    assert torch.equal(torch.rand(3), expected)


def test_out_directory_gets_report_html_and_threads_are_restored(tmp_path):
    before = torch.get_num_threads()
    result = run_report(out=tmp_path, config=TINY, threads=1)
    assert result.path == tmp_path / "report.html" and result.path.exists()
    assert torch.get_num_threads() == before
    assert "cpu (1 thread)" in result.path.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"quick": "yes"}, TypeError, "quick"),
        ({"config": {"steps": 3}}, TypeError, "config"),
        ({"config": dataclasses.replace(TINY, steps=0)}, ValueError, "steps"),
        ({"config": dataclasses.replace(TINY, lr=-1.0)}, ValueError, "lr"),
        ({"sections": [42]}, TypeError, "sections"),
        ({"out": 3}, TypeError, "out"),
        ({"threads": 0}, ValueError, "threads"),
    ],
)
def test_bad_arguments_fail_early(tmp_path, kwargs, error, match):
    kwargs.setdefault("out", tmp_path / "r.html")
    with pytest.raises(error, match=match):
        run_report(**kwargs)


def test_out_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        run_report(out=blocker / "report.html", config=TINY)


def test_quick_preset_is_smaller_than_default():
    q, d = ReportConfig.quick(), ReportConfig.default()
    assert q.steps < d.steps and q.analysis_examples is not None and d.analysis_examples is None
    assert q.trace_matvecs < d.trace_matvecs and q.slq_probes * q.slq_steps < d.slq_probes * d.slq_steps
    assert math.isclose(q.lr, d.lr)


# ------------------------------------------------------------------ optimizers section
def test_optimizers_section_best_is_argmin_of_its_sweep(quick):
    res = quick["optimizers"]
    from gradkit.report.optimizers import MAX_EXTRA_LRS, SPECS

    assert list(res.best) == [s.name for s in SPECS[: len(res.best)]] and len(res.best) >= 3
    for name, runs in res.sweep.items():
        spec = next(s for s in SPECS if s.name == name)
        lrs = [r.lr for r in runs]
        assert lrs == sorted(lrs) and set(spec.lrs) <= set(lrs) and len(lrs) <= len(spec.lrs) + MAX_EXTRA_LRS
        assert all(lr < min(spec.lrs) or lr > max(spec.lrs) for lr in set(lrs) - set(spec.lrs))
        assert res.best[name].score == min(r.score for r in runs)
        for r in runs:
            tail = r.train_loss[-max(1, len(r.train_loss) // 10):]
            assert r.score == pytest.approx(sum(tail) / len(tail)) or not math.isfinite(r.score)
    assert res.best["Lion"].state_bytes_per_param == 4.0
    assert res.best["Lion"].scratch_bytes_per_param == 8.0  # the model's tensors are all packed
    assert res.best["AdamW (torch)"].state_bytes_per_param == 8.0
    assert res.best["AdamW (torch)"].scratch_bytes_per_param == 0.0


def test_sweep_goes_past_the_end_of_the_grid_while_the_best_is_there():
    from gradkit.report.optimizers import OptimizerRun, sweep_lrs

    def runner(target, diverge_above=math.inf):
        calls = []

        def run(lr):
            calls.append(lr)
            loss = math.inf if lr > diverge_above else (math.log10(lr) - math.log10(target)) ** 2
            return OptimizerRun("x", lr, [loss], 1.0, 0.0, 0.0)

        return run, calls

    grid = (1e-3, 1e-2, 1e-1)
    run, calls = runner(target=2.0)  # best inside after two more: 1, 10 (then 10 is worse than 1)
    assert [r.lr for r in sweep_lrs(grid, run)] == pytest.approx([1e-3, 1e-2, 1e-1, 1.0, 10.0])
    assert calls[:3] == list(grid)
    run, _ = runner(target=1e-9)  # always better further down: stops after `extra` runs
    assert [r.lr for r in sweep_lrs(grid, run, extra=2)] == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    run, _ = runner(target=2e-2)  # best inside the grid: nothing added
    assert [r.lr for r in sweep_lrs(grid, run)] == list(grid)
    run, _ = runner(target=10.0, diverge_above=0.5)  # the run past the end diverges: the sweep stops there
    runs = sweep_lrs(grid, run)
    assert [r.lr for r in runs] == pytest.approx([1e-3, 1e-2, 1e-1, 1.0]) and runs[-1].score == math.inf


def test_optimizers_section_adamw_curve_equals_a_plain_training_loop(quick):
    """The AdamW curve is reproduced by an independent loop: same initialisation, same batches."""
    res, ctx = quick["optimizers"], quick.context
    best = res.best["AdamW (torch)"]
    # the same batch order, rebuilt from the documented protocol
    n, b = ctx.data.x_train.shape[0], res.batch_size
    gen = torch.Generator().manual_seed(ctx.seed_for("optimizers"))
    epochs = res.steps // (n // b)
    order = torch.cat([torch.randperm(n, generator=gen)[: (n // b) * b] for _ in range(epochs)])
    model = ctx.initial_model()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), gradkit.report.make_mlp(
        64, ctx.config.hidden, 10, seed=ctx.seed).parameters()))
    opt = torch.optim.AdamW(model.parameters(), lr=best.lr, weight_decay=0.0)
    x, y = ctx.data.x_train, ctx.data.y_train
    losses = []
    for t in range(res.steps):
        idx = order[t * b : (t + 1) * b]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        with torch.no_grad():
            losses.append(float(nn.functional.cross_entropy(model(x), y)))
    assert best.train_loss[1:] == pytest.approx(losses, rel=1e-5)
    assert best.train_loss[-1] < 0.5 * best.train_loss[0]


# ------------------------------------------------------------------ curvature structure section
def test_curvature_section_layers_match_dense_blocks(quick, dense):
    r = quick["curvature"]
    model = quick.context.analysis_model
    sizes = [p.numel() for p in model.parameters()]
    # the MLP's layers own (weight, bias) pairs in order: the diagonal blocks of the dense Hessian
    start = 0
    for layer, (w, b) in zip(r.layers, zip(sizes[::2], sizes[1::2])):
        block = dense["H"][start : start + w + b, start : start + w + b]
        start += w + b
        assert layer.num_params == w + b
        assert layer.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-5)
        assert layer.trace == pytest.approx(float(block.trace()), rel=0.1)


def test_curvature_section_outliers_and_kfac(quick, dense):
    r = quick["curvature"]
    G = dense["G_eig"].flip(0)  # descending
    k = r.ggn_top.numel()
    assert k == 2 * r.num_classes + 2
    torch.testing.assert_close(r.ggn_top, G[:k], rtol=1e-5, atol=1e-8)
    ratios = G[: k - 1] / G[1:k]
    assert r.largest_ratio == pytest.approx(float(ratios.max()), rel=1e-4)
    assert (r.num_outliers > 0) == (float(ratios.max()) >= r.min_gap)
    # K-FAC's eigenvalues are those of the Kronecker operator (dense, built here by columns)
    from gradkit.curvature import KFACOperator

    ctx = quick.context
    K = KFACOperator(ctx.analysis_model, ctx.loss_fn, ctx.analysis_data, check_deterministic=False)
    dense_k = (K @ torch.eye(K.shape[0], dtype=torch.float64)).double()
    ev = torch.linalg.eigvalsh((dense_k + dense_k.T) / 2).flip(0)
    torch.testing.assert_close(r.kfac_top, ev[: r.kfac_top.numel()], rtol=1e-5, atol=1e-8)


def test_overlap_along_training_ends_at_dense_value(quick, dense):
    r, g = quick["curvature"], quick["geometry"]
    assert r.overlap_steps == g.sharpness_steps and len(r.overlap) == len(r.overlap_steps)
    vecs = dense["H_eig"].eigenvectors[:, -r.overlap_k:]
    grad = dense["grad"]
    expected = float((vecs.T @ grad).square().sum() / grad.square().sum())
    assert r.overlap[-1] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in r.overlap)


# ------------------------------------------------------------------ explanations section
def test_explanations_section_scores(quick):
    r, ctx = quick["explanations"], quick.context
    from gradkit import explain

    assert set(r.deletion_auc) == set(r.insertion_auc) and len(r.deletion_auc) >= 5
    assert r.ig_completeness < 1e-3  # 32 Gauss-Legendre steps on a smooth (tanh) model
    # every attribution method beats random attributions on deletion (computed here, independently)
    x = ctx.data.x_test[: r.num_examples]
    with torch.no_grad():
        t = ctx.model(x).argmax(1)
    rand = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    random_auc = float(explain.deletion_curve(ctx.model, x, t, rand).auc.mean())
    for name in ("Integrated Gradients", "occlusion (1 px)", "Gradient × Input"):
        assert r.deletion_auc[name] < random_auc
    # the shown maps are the first examples' attributions
    ig = explain.integrated_gradients(ctx.model, x[:4], t[:4], steps=32)
    torch.testing.assert_close(r.shown["Integrated Gradients"], ig)


def test_explanations_section_diffroar(quick):
    r = quick["explanations"]
    assert r.ks == [4, 8, 16, 32]
    assert all(abs(v) < 0.2 for v in r.diffroar["random"])
    assert r.diffroar["Integrated Gradients"][1] > 0.3 and r.diffroar["saliency"][1] > 0.2


# ------------------------------------------------------------------ hyperparameters section
def test_hyperparameters_grid_equals_torch_sgd_with_weight_decay(quick):
    """Each grid point is CE + ½λΣ‖W‖² by full-batch GD: torch's SGD with weight_decay=λ on the
    weights (0 on the biases) is the same iteration, written independently."""
    from gradkit.report.hyperparameters import INNER_LR

    r, ctx = quick["hyperparameters"], quick.context
    x, y = ctx.data.x_train, ctx.data.y_train
    n = int(0.7 * x.shape[0])
    i = 2
    model = ctx.initial_model()
    weights = [p for p in model.parameters() if p.ndim >= 2]
    biases = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.SGD([{"params": weights, "weight_decay": r.grid[i]}, {"params": biases}], lr=INNER_LR)
    for _ in range(r.steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:n]), y[:n]).backward()
        opt.step()
    with torch.no_grad():
        val = float(nn.functional.cross_entropy(model(x[n:]), y[n:]))
    assert r.grid_val[i] == pytest.approx(val, rel=1e-4)


def test_hyperparameters_hypergradient_run(quick):
    r = quick["hyperparameters"]
    assert len(r.decays) == 2 and all(0 < d < 10 and math.isfinite(d) for d in r.decays.values())
    assert r.history[-1] < r.history[0]
    # per-layer decays found by hypergradient do at least about as well as the best shared decay
    assert r.history[-1] <= 1.1 * min(r.grid_val)
