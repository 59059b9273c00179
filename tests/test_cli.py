"""Tests of the ``gradkit`` command line, run as a separate process like a user would."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

import gradkit


def run(*args: str, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore::DeprecationWarning")
    return subprocess.run(
        [sys.executable, "-m", "gradkit", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env
    )


def test_help():
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: gradkit" in proc.stdout and "report" in proc.stdout


def test_version_matches_package():
    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"gradkit {gradkit.__version__}"


def test_report_help_lists_options():
    proc = run("report", "--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--out", "--seed", "--quick", "--no-progress", "--threads"):
        assert option in proc.stdout


def test_console_script_is_installed():
    exe = shutil.which("gradkit")
    assert exe is not None, "the `gradkit` console script is not on PATH (pip install -e .)"
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"gradkit {gradkit.__version__}"


@pytest.mark.parametrize(
    "args, needle",
    [
        (("report", "--seed", "-1"), "--seed"),
        (("report", "--seed", "abc"), "--seed"),
        (("report", "--threads", "x"), "--threads"),
        (("report", "--bogus"), "--bogus"),
        (("frobnicate",), "frobnicate"),
        ((), "a command is required"),
    ],
)
def test_bad_arguments_exit_nonzero_with_message(args, needle):
    proc = run(*args)
    assert proc.returncode == 2
    assert "error" in proc.stderr and needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_unwritable_out_is_a_clean_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    proc = run("report", "--quick", "--no-progress", "--out", str(blocker / "report.html"))
    assert proc.returncode == 1
    assert "gradkit report: error:" in proc.stderr and "not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_report_quick_end_to_end(tmp_path):
    out = tmp_path / "new-dir" / "r.html"
    proc = run("report", "--quick", "--no-progress", "--seed", "1", "--out", str(out), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists()
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith(f"report written to {out}")
    text = proc.stdout
    for needle in ("[Training]", "[Loss-surface geometry]", "λ_max", "tr(Hessian)", "GD stability"):
        assert needle in text
    page = out.read_text(encoding="utf-8")
    # the header records the command line and the seed
    assert "gradkit report --quick --no-progress --seed 1 --out" in page
    assert re.search(r"<th>seed</th><td>1</td>", page)
    assert "Traceback" not in proc.stderr and "%|" not in proc.stderr  # --no-progress: no bars
