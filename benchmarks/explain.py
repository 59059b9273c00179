"""Gradient attributions: gradkit.explain vs Captum, time and peak memory in one run.

Run:  python benchmarks/explain.py [--repeats 3] [--threads 1] [--no-memory] [--wall] [--models resnet mlp tabular]

For a small ResNet (stem + 3 residual blocks, widths 8/16/32, eval-mode BatchNorm, 3×32×32; no
torchvision), an MLP on the same images (3072-256-256-10) and a small tabular MLP (64-128-128-10,
where per-call overhead matters more than arithmetic), on a batch of 32 examples (CPU, float32),
it times

* Integrated Gradients, 50 steps, Gauss–Legendre: ``integrated_gradients`` vs
  ``IntegratedGradients.attribute(internal_batch_size=...)``;
* SmoothGrad, 50 samples, σ = 0.15 × input range: ``smoothgrad`` vs
  ``NoiseTunnel(Saliency).attribute(nt_samples_batch_size=..., abs=False)``;
* Expected Gradients, 50 samples from a background of 64 images: ``expected_gradients`` vs
  ``GradientShap.attribute(stdevs=0)`` (the same estimator; it has no internal batching).

Each library's batch size is chosen per row as the fastest of the same few values (rows per
model call: 160, 320, 800; Captum's SmoothGrad counts samples per example, 5, 10, 25, i.e. the
same rows; GradientShap has no batching) in a first pass (median of three calls each), then both are timed
interleaved (median of ``--repeats``).  ``speed-up`` is Captum's time / gradkit's.  On the ResNet
gradkit hands its batched points to the model in the channels-last layout (oneDNN's native one,
see ``gradkit.explain._common.model_layout``); Captum keeps the layout of the inputs it is given,
so on image inputs (ResNet and MLP) it is also timed on channels-last inputs (``captum CL s``,
at the same batch size) and
``vs CL`` is that time / gradkit's: the speed-up a Captum user who knew to convert the inputs
would see.  With one thread the clock is the
process CPU time (``time.process_time``), which other jobs on a shared machine do not inflate;
``--wall`` (or more threads) uses wall-clock time.  ``rel. diff`` is ``‖ours −
Captum‖ / ‖Captum‖``: ~1e-7 for IG (float32; Captum rounds its weights to float32), ~4e-5 on
the ResNet, whose BatchNorm gradkit folds into the convolutions (float32 rounding of the folded
weights; a ReLU that flips at one path point moves that point's gradient); for the
stochastic methods it is the Monte Carlo spread of two independent 50-sample estimates (the
images have range exactly 1, so Captum's absolute σ = our relative σ).

Peak memory (ResNet and MLP): each configuration runs once in a fresh subprocess, which resets its resident-set
high-water mark just before the call (``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0; after
building the model and a small warm-up call) and reports ``VmHWM − VmRSS`` before the call from
``/proc/self/status``: the extra memory the call took from the OS at its peak.  ``tracemalloc``
does not see torch's allocations, the profiler's memory view slows the run, and
``getrusage().ru_maxrss`` cannot be reset (a forked child even inherits its parent's).  Each
library is measured at its timed configuration, so the peaks follow the rows per model call
(GradientShap sends all 50 × 32 rows at once).
The last rows show gradkit's IG peak at 50 and 200 steps with the same ``batch_size``: it does
not grow with the steps (repeated runs vary by about ±15 MiB).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _timing import print_table, time_interleaved  # noqa: E402

from gradkit.explain import DEFAULT_BATCH_SIZE, expected_gradients, integrated_gradients, smoothgrad  # noqa: E402

BATCH, STEPS, NOISE, TARGET = 32, 50, 0.15, 3
CAPTUM_BATCHES = {"ig": (160, 320, 800), "smoothgrad": (5, 10, 25), "eg": (None,)}
GRADKIT_BATCHES = (160, 320, 800)  # rows per model call: the same as Captum's (samples × 32 for SmoothGrad)


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.skip = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.skip(x))


class ResNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def setup(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if name == "resnet":
        model = ResNet()
        with torch.no_grad():  # non-trivial eval-mode BatchNorm statistics
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    elif name == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(3072, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    else:
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    g = torch.Generator().manual_seed(1)
    images = torch.rand((BATCH + 64,) + ((64,) if name == "tabular" else (3, 32, 32)), generator=g)
    flat = images.view(images.shape[0], -1)
    flat[:, 0], flat[:, 1] = 0.0, 1.0  # every image has range exactly 1: σ = NOISE for both libraries
    return model.eval(), images[:BATCH], images[BATCH:]


def ours(method: str, model: nn.Module, x: torch.Tensor, background: torch.Tensor, batch: int | None,
         steps: int = STEPS):
    if method == "ig":
        return lambda: integrated_gradients(model, x, TARGET, steps=steps, batch_size=batch)
    if method == "smoothgrad":
        return lambda: smoothgrad(model, x, TARGET, n=STEPS, noise=NOISE, seed=0, batch_size=batch)
    return lambda: expected_gradients(model, x, TARGET, background=background, n=STEPS, seed=0, batch_size=batch)


def theirs(method: str, model: nn.Module, x: torch.Tensor, background: torch.Tensor, batch: int | None):
    from captum.attr import GradientShap, IntegratedGradients, NoiseTunnel, Saliency

    if method == "ig":
        ig = IntegratedGradients(model)
        return lambda: ig.attribute(x, target=TARGET, n_steps=STEPS, method="gausslegendre", internal_batch_size=batch)
    if method == "smoothgrad":
        nt = NoiseTunnel(Saliency(model))
        return lambda: nt.attribute(x, nt_type="smoothgrad", nt_samples=STEPS, stdevs=NOISE, target=TARGET,
                                    nt_samples_batch_size=batch, abs=False)
    gs = GradientShap(model)
    return lambda: gs.attribute(x, baselines=background, n_samples=STEPS, stdevs=0.0, target=TARGET)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def peak_memory_child(model_name: str, method: str, impl: str, batch: str, steps: int) -> None:
    """Run one configuration once and print its peak extra resident memory in MiB."""
    torch.set_num_threads(1)
    model, x, background = setup(model_name)
    size = None if batch == "None" else int(batch)
    fn = ours(method, model, x, background, size, steps) if impl == "gradkit" else theirs(method, model, x, background, size)
    if impl == "gradkit":
        integrated_gradients(model, x[:1], TARGET, steps=2)
    else:
        theirs("ig", model, x[:1], background, None)()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    rss_before = _status_bytes("VmRSS")
    fn()
    print(f"{max(_status_bytes('VmHWM') - rss_before, 0) / 2**20:.1f}")


def peak_memory(model_name: str, method: str, impl: str, batch: int | None, steps: int = STEPS) -> float:
    cmd = [sys.executable, __file__, "--child", model_name, method, impl, str(batch), str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps ratios stable on a shared machine)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--wall", action="store_true", help="time with the wall clock instead of the process CPU time")
    parser.add_argument("--models", nargs="+", default=["resnet", "mlp", "tabular"], choices=["resnet", "mlp", "tabular"])
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_memory_child(*args.child[:4], int(args.child[4]))
        return
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall or args.threads > 1 else time.process_time
    import captum

    print(f"torch {torch.__version__}, captum {captum.__version__}, {torch.get_num_threads()} thread(s), float32, CPU, "
          f"batch {BATCH}, {STEPS} steps / samples; both libraries at their fastest batch size; "
          f"clock: {'wall' if clock is time.perf_counter else 'process CPU time'}\n")
    rows = []
    for model_name in args.models:
        model, x, background = setup(model_name)
        for method in ("ig", "smoothgrad", "eg"):
            scan = {b: time_interleaved({"c": theirs(method, model, x, background, b)}, 3, 0, clock)["c"]
                    for b in CAPTUM_BATCHES[method]}
            best = min(scan, key=scan.get)
            scan = {b: time_interleaved({"g": ours(method, model, x, background, b)}, 3, 0, clock)["g"]
                    for b in GRADKIT_BATCHES}
            ours_best = min(scan, key=scan.get)
            fns = {"gradkit": ours(method, model, x, background, ours_best),
                   "captum": theirs(method, model, x, background, best)}
            if x.ndim == 4:
                x_cl = x.contiguous(memory_format=torch.channels_last)
                fns["captum CL"] = theirs(method, model, x_cl, background, best)
            times = time_interleaved(fns, args.repeats, 1, clock)
            cl = (times["captum CL"], times["captum CL"] / times["gradkit"]) if "captum CL" in times else ("-", "-")
            a, b = fns["gradkit"](), fns["captum"]()
            rel = float((a - b).norm() / b.norm())
            mem = ("-", "-")  # the tabular model's peaks are a few MiB, below what RSS resolves usefully
            if not args.no_memory and model_name != "tabular":
                mem = (peak_memory(model_name, method, "gradkit", ours_best),
                       peak_memory(model_name, method, "captum", best))
            rows.append([model_name, method, f"{best}", f"{ours_best}", times["captum"],
                         times["gradkit"], times["captum"] / times["gradkit"], *cl,
                         f"{rel:.1e}", *mem])
    print_table(["model", "method", "captum batch", "gradkit rows", "captum s", "gradkit s", "speed-up", "captum CL s",
                 "vs CL", "rel. diff", "gradkit MiB", "captum MiB"], rows)
    if not args.no_memory:
        print(f"\ngradkit IG peak memory vs steps (ResNet, batch_size={DEFAULT_BATCH_SIZE} rows):")
        print_table(["steps", "MiB"], [[n, peak_memory("resnet", "ig", "gradkit", DEFAULT_BATCH_SIZE, n)]
                                       for n in (STEPS, 4 * STEPS)])


if __name__ == "__main__":
    main()
