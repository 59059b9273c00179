"""The README's Python example runs as written, and its Gauss-Newton step solves its system."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_is_right():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102
    G, H, step = namespace["G"], namespace["H"], namespace["step"]
    grad = H.loss_and_gradient()[1]
    residual = G @ step + 1e-3 * step + grad
    assert float(residual.norm() / grad.norm()) < 1e-5
    top = namespace["top"]
    dense = torch.linalg.eigvalsh(H.to_dense())
    torch.testing.assert_close(top, dense.flip(0)[:5], rtol=1e-6, atol=1e-10)


def test_readme_has_exactly_the_two_commands():
    shell = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert [s.strip() for s in shell] == [
        "bash scripts/setup.sh && gradkit report",
        "bash scripts/setup.sh --test && python3 -m pytest",
    ]
