"""Hessian-vector product cost relative to a gradient, gradkit vs curvlinops vs PyHessian-style.

Run:  python benchmarks/hvp.py [--repeats 20] [--columns 16] [--threads 1]

For an MLP and a CNN (CPU, float32, one batch of generated data) it times

* ``gradient``: one forward + backward (``loss.backward()``), the unit of cost;
* ``gradkit default`` / ``gradkit rev_rev`` / ``gradkit fwd_rev``: ``HessianOperator(...) @ v``
  with the default (the per-layer R-operator on these chains) and both autograd modes;
* ``curvlinops``: ``HessianLinearOperator(...) @ v`` (curvlinops 3.0);
* ``pyhessian-style``: ``autograd.grad(grad(loss, create_graph=True), params, v)``, the double
  backward PyHessian uses,

and prints each as a ratio to the gradient time measured in the same run, then the same for a
block of ``--columns`` vectors (``op @ V``) per column.  Targets (issue 2): the default mode
≤ 2.5× a gradient and no slower than curvlinops.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _timing import print_table, time_interleaved  # noqa: E402

from gradkit.curvature import HessianOperator  # noqa: E402


def models() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    return {
        "MLP 256-512-512-10, batch 512": (mlp, torch.randn(512, 256, generator=g), torch.randint(0, 10, (512,), generator=g)),
        "CNN 2 conv + 2 fc, 3x32x32, batch 128": (
            cnn, torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--columns", type=int, default=16, help="block size for the op @ V rows")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps ratios stable on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        from curvlinops import HessianLinearOperator
    except ImportError:  # pragma: no cover - benchmark-only dependency
        HessianLinearOperator = None
        print("curvlinops not installed: its column is skipped")

    loss_fn = nn.CrossEntropyLoss()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    print("gradkit default: the per-layer R-operator (both models are Sequential chains it covers)\n")
    rows = []
    for name, (model, X, y) in models().items():
        params = list(model.parameters())
        n = sum(p.numel() for p in params)
        v = torch.randn(n)
        V = torch.randn(n, args.columns)
        vs = [t.view_as(p) for t, p in zip(torch.split(v, [p.numel() for p in params]), params)]

        def gradient() -> None:
            model.zero_grad(set_to_none=True)
            loss_fn(model(X), y).backward()

        def pyhessian() -> None:
            grads = torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True)
            torch.autograd.grad(grads, params, grad_outputs=vs)

        ours = {
            m or "default": HessianOperator(model, loss_fn, (X, y), mode=m, check_deterministic=False)
            for m in (None, "rev_rev", "fwd_rev")
        }
        fns = {"gradient": gradient, "pyhessian-style": pyhessian}
        fns.update({f"gradkit {m}": (lambda op=op: op @ v) for m, op in ours.items()})
        if HessianLinearOperator is not None:
            theirs = HessianLinearOperator(model, loss_fn, params, [(X, y)], check_deterministic=False)
            fns["curvlinops"] = lambda: theirs @ v
        times = time_interleaved(fns, args.repeats)
        block = {f"gradkit {m}": (lambda op=op: op @ V) for m, op in ours.items()}
        if HessianLinearOperator is not None:
            block["curvlinops"] = lambda: theirs @ V
        block_times = time_interleaved(block, max(3, args.repeats // 4), warmup=1)
        t_grad = times["gradient"]
        for method, t in times.items():
            per_col = block_times.get(method)
            rows.append([
                name, method, f"{n:,}", t * 1e3, t / t_grad,
                "" if per_col is None else per_col / args.columns / t_grad,
                "" if "curvlinops" not in times else t / times["curvlinops"],
            ])
    print_table(
        ["model", "method", "params", "ms / product", "÷ gradient", f"÷ gradient per column (k={args.columns})", "÷ curvlinops"],
        rows,
    )


if __name__ == "__main__":
    main()
