"""The report's "Optimizers" section: the default digits model trained from the same
initialisation by ``torch.optim.AdamW`` and by several :mod:`gradkit.optim` optimizers, each at
its best learning rate from a small sweep, with the loss curves drawn side by side.

Protocol (the same for every optimizer):

* the MLP of the report (same architecture, same initialisation seed as the "Training" section);
* mini-batch training: batches of :data:`BATCH_SIZE` examples drawn by one shuffled order per
  epoch, the same order for every run (seeded from the report's seed);
* each optimizer keeps its paper's defaults except the learning rate, and weight decay is off
  for all of them (the section compares how fast they *optimise*, not how they regularise);
* the learning rate is chosen from a grid of five values per optimizer family by the mean
  training loss over the last 10% of the steps (the training loss, not the test set: nothing is
  tuned on test data); the test accuracy at the end is reported beside it.  While the best value
  sits at an end of the grid, the sweep goes on past that end by the grid's ratio there (at most
  :data:`MAX_EXTRA_LRS` more runs), so that no optimizer is compared at the edge of its sweep.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gradkit.report.base import Plot, ReportContext, Section, fmt, html_table

__all__ = ["OptimizerSpec", "OptimizerRun", "OptimizersResult", "SPECS", "MAX_EXTRA_LRS", "train_minibatch",
           "sweep_lrs", "optimizers_section"]

BATCH_SIZE = 64

ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
LION_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # Lion's steps are sign vectors: ~10x smaller lr (Chen et al.)
#: Runs added past an end of a grid while the best learning rate sits there (the same rule for every optimizer).
MAX_EXTRA_LRS = 3


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of the comparison: ``make(params, lr)`` and its learning-rate grid."""

    name: str
    make: Callable[[list[Tensor], float], torch.optim.Optimizer]
    lrs: tuple[float, ...]


def _gk(cls_name: str, **kwargs) -> Callable[[list[Tensor], float], torch.optim.Optimizer]:
    def make(params: list[Tensor], lr: float) -> torch.optim.Optimizer:
        import gradkit.optim as go

        return getattr(go, cls_name)(params, lr=lr, **kwargs)

    return make


#: The optimizers of the section (AdamW first: the baseline every curve is compared with).
SPECS: list[OptimizerSpec] = [
    OptimizerSpec("AdamW (torch)", lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), ADAM_LRS),
    OptimizerSpec("Lion", _gk("Lion", weight_decay=0.0), LION_LRS),
    OptimizerSpec("AdEMAMix", _gk("AdEMAMix", weight_decay=0.0), ADAM_LRS),
    OptimizerSpec("Grams", _gk("Grams", weight_decay=0.0), ADAM_LRS),
    OptimizerSpec("AdamP", _gk("AdamP", weight_decay=0.0), ADAM_LRS),
    OptimizerSpec("AMSGrad", _gk("AMSGrad", weight_decay=0.0), ADAM_LRS),
    OptimizerSpec("DiffGrad", _gk("DiffGrad", weight_decay=0.0), ADAM_LRS),
    OptimizerSpec("AdaBound", _gk("AdaBound", weight_decay=0.0), ADAM_LRS),
]


@dataclass
class OptimizerRun:
    """One training run: the training loss on the whole training set after every step
    (``train_loss[0]`` at the initialisation) and the final test accuracy."""

    name: str
    lr: float
    train_loss: list[float]
    test_acc: float
    state_bytes_per_param: float
    seconds: float
    scratch_bytes_per_param: float = 0.0  # gradkit's working buffers besides the state (Optimizer.scratch_bytes)

    @property
    def score(self) -> float:
        """Mean training loss over the last 10% of the steps (``inf`` if the run diverged)."""
        tail = self.train_loss[-max(1, len(self.train_loss) // 10):]
        value = sum(tail) / len(tail)
        return value if math.isfinite(value) else math.inf


@dataclass
class OptimizersResult:
    """Numbers of the optimizers section: every run of the sweep, and the best run per optimizer."""

    steps: int
    batch_size: int
    best: dict[str, OptimizerRun] = field(default_factory=dict)
    sweep: dict[str, list[OptimizerRun]] = field(default_factory=dict)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    seen: set[int] = set()
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, Tensor) and v.dim() > 0 and id(v) not in seen:
                seen.add(id(v))
                total += v.numel() * v.element_size()
    return total


def train_minibatch(
    model: nn.Module,
    make_optimizer: Callable[[list[Tensor], float], torch.optim.Optimizer],
    lr: float,
    x: Tensor,
    y: Tensor,
    order: Tensor,
    *,
    x_test: Tensor,
    y_test: Tensor,
    name: str = "",
) -> OptimizerRun:
    """Train ``model`` in place on the batches ``x[order[i : i + BATCH_SIZE]]`` (``order``: the
    concatenated shuffled epochs) with mean cross-entropy; record the full training loss after
    every step.  A non-finite loss ends the run early (its score is then ``inf``)."""
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr)
    steps = order.numel() // BATCH_SIZE
    start = time.perf_counter()
    with torch.no_grad():
        losses = [float(loss_fn(model(x), y))]
    for t in range(steps):
        idx = order[t * BATCH_SIZE : (t + 1) * BATCH_SIZE]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        with torch.no_grad():
            losses.append(float(loss_fn(model(x), y)))
        if not math.isfinite(losses[-1]):
            break
    seconds = time.perf_counter() - start
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == y_test).float().mean())
    n = sum(p.numel() for p in params)
    scratch = opt.scratch_bytes() if hasattr(opt, "scratch_bytes") else 0
    return OptimizerRun(name, float(lr), losses, acc, _state_bytes(opt) / n, seconds, scratch / n)


def sweep_lrs(lrs: tuple[float, ...], run: Callable[[float], OptimizerRun],
              extra: int = MAX_EXTRA_LRS) -> list[OptimizerRun]:
    """``run`` at every learning rate of ``lrs``, then, while the best run (the lowest score) is at
    the lowest or highest learning rate and that run did not diverge, one more run past that end
    (the end times the ratio of the two outermost values there), at most ``extra`` times.  Returns
    the runs sorted by learning rate."""
    runs = {lr: run(lr) for lr in lrs}
    for _ in range(extra):
        grid = sorted(runs)
        best = min(runs.values(), key=lambda r: r.score)
        if not math.isfinite(best.score) or len(grid) < 2:
            break
        if best.lr == grid[-1]:
            new = grid[-1] * grid[-1] / grid[-2]
        elif best.lr == grid[0]:
            new = grid[0] * grid[0] / grid[1]
        else:
            break
        runs[new] = run(new)
    return [runs[lr] for lr in sorted(runs)]


def optimizers_section(ctx: ReportContext) -> Section:
    """Loss curves of several optimizers on the report's model, each at its best swept learning rate."""
    from gradkit.report import plots

    data, config = ctx.data, ctx.config
    epochs = config.optimizer_epochs
    specs = SPECS[: config.optimizer_count]
    n = data.x_train.shape[0]
    gen = torch.Generator().manual_seed(ctx.seed_for("optimizers"))
    # whole batches only: each epoch contributes n // BATCH_SIZE batches
    per_epoch = (n // BATCH_SIZE) * BATCH_SIZE
    order = torch.cat([torch.randperm(n, generator=gen)[:per_epoch] for _ in range(epochs)])
    init = ctx.initial_model()

    result = OptimizersResult(steps=order.numel() // BATCH_SIZE, batch_size=BATCH_SIZE)
    total = sum(len(s.lrs) for s in specs)
    bar = tqdm(total=total, desc="optimizers (lr sweep)", disable=not ctx.progress, leave=False)
    try:
        for spec in specs:
            def run(lr: float, spec: OptimizerSpec = spec) -> OptimizerRun:
                if lr not in spec.lrs:  # a run past the grid
                    bar.total += 1
                    bar.refresh()
                out = train_minibatch(copy.deepcopy(init), spec.make, lr, data.x_train, data.y_train, order,
                                      x_test=data.x_test, y_test=data.y_test, name=spec.name)
                bar.update(1)
                return out

            runs = sweep_lrs(spec.lrs, run)
            result.sweep[spec.name] = runs
            result.best[spec.name] = min(runs, key=lambda r: r.score)
    finally:
        bar.close()

    base = result.best[specs[0].name]
    rows = []
    for spec in specs:
        r = result.best[spec.name]
        rows.append([spec.name, r.lr, r.train_loss[-1], r.score, r.score / base.score,
                     f"{100 * r.test_acc:.1f}%", r.state_bytes_per_param, r.scratch_bytes_per_param,
                     f"{r.seconds:.2f}"])
    counts = sorted({len(runs) for runs in result.sweep.values()})
    n_lrs = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    summary = [
        f"{len(specs)} optimizers × {n_lrs} learning rates, {result.steps} steps of batch {BATCH_SIZE} "
        "from the same initialisation",
    ]
    ranked = sorted(result.best.values(), key=lambda r: r.score)
    summary.append("best score (mean train loss over the last 10% of steps): "
                   + ", ".join(f"{r.name} {r.score:.3g} (η={fmt(r.lr, 2)})" for r in ranked[:4]))
    intro = (
        f"<p>The model of the “Training” section ({config.hidden} hidden units, same initialisation) "
        f"trained again with mini-batches of {BATCH_SIZE} ({epochs} epochs, {result.steps} steps, the same "
        "batch order for every run) by <code>torch.optim.AdamW</code> and by gradkit optimizers. Each "
        "keeps its paper's defaults except the learning rate, which is picked from the grid shown below "
        "by the mean <em>training</em> loss over the last 10% of the steps; weight decay is off for all. "
        "The training loss is measured on the whole training set after every step.</p>"
    )
    table = html_table(
        ["optimizer", "best η", "final train loss", "score (last 10%)", "score ÷ AdamW's", "test accuracy",
         "state bytes / param", "scratch bytes / param", "seconds"],
        rows,
        caption="Each optimizer at its best learning rate.",
    )
    width = max(len(runs) for runs in result.sweep.values())
    sweep_table = html_table(
        ["optimizer"] + [f"η #{i + 1}" for i in range(width)],
        [[name] + [f"{fmt(r.lr, 2)}: {fmt(r.score, 3)}" for r in runs] + [""] * (width - len(runs))
         for name, runs in result.sweep.items()],
        caption="The sweep: learning rate and score of every run (inf = diverged).",
        numeric=False,
    )
    edge = [name for name, runs in result.sweep.items() if result.best[name].lr in (runs[0].lr, runs[-1].lr)]
    notes = [f"best learning rate at the edge of its sweep for {', '.join(edge)} (the sweep goes past the grid at most "
             f"{MAX_EXTRA_LRS} times, and not past a diverged run): a wider sweep could do better"] if edge else []
    fig = plots.optimizer_curves(result.best, result.sweep)
    body = [
        intro,
        table,
        Plot(fig, "Left: training loss against the step, each optimizer at its best learning rate. "
             "Right: the score of every run of the sweep against its learning rate.", "optimizers"),
        sweep_table,
    ]
    return Section(key="optimizers", title="Optimizers", summary=summary, body=body, results=result, notes=notes)
