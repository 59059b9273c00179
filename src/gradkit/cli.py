"""The ``gradkit`` command line.

``gradkit report`` trains a small MLP on scikit-learn's digits and writes a self-contained HTML
report on what gradkit computes about it (see :mod:`gradkit.report`).  ``python -m gradkit``
is the same program.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence

import gradkit

__all__ = ["main", "build_parser"]

PROG = "gradkit"


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gradkit`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="gradkit: tools computed from gradients (curvature, optimizers, attribution, "
        "certification) for PyTorch.",
        epilog="Run 'gradkit report --help' for the report's options.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {gradkit.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    report = sub.add_parser(
        "report",
        help="train a small MLP on the digits data and write an HTML report on it",
        description="Train a small MLP (64-32-10, tanh) on scikit-learn's digits by full-batch "
        "gradient descent, then report the loss-surface geometry at the trained point (top "
        "Hessian and GGN eigenvalues, traces, spectral densities, the gradient-descent stability "
        "margin). Prints a short summary and writes a self-contained HTML page.",
    )
    report.add_argument(
        "--out",
        metavar="PATH",
        default="gradkit-report/report.html",
        help="where to write the HTML report; missing directories are created, an existing "
        "directory gets report.html inside (default: %(default)s)",
    )
    report.add_argument(
        "--seed", type=_non_negative_int, default=0, metavar="N",
        help="seed of the model initialisation and of the stochastic estimators (default: %(default)s)",
    )
    report.add_argument(
        "--quick", action="store_true",
        help="a much smaller, faster run (fewer steps, 256 analysis examples, fewer products)",
    )
    report.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    report.add_argument(
        "--threads", type=_non_negative_int, default=1, metavar="N",
        help="CPU threads for torch (default: %(default)s; 0: torch's default). The report's "
        "tensors are small: one thread costs little and keeps the run fast when other processes "
        "share the cores",
    )
    report.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="log what is being computed (-vv: debug messages and tracebacks)",
    )
    report.add_argument(
        "--strict", action="store_true",
        help="stop at the first failing section instead of reporting the failure in the page",
    )
    return parser


def _configure_logging(verbosity: int) -> None:
    logger = logging.getLogger("gradkit")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("gradkit: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING)


def _report(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from gradkit.report import run_report

    command = " ".join([PROG, *(shlex.quote(a) for a in argv)])
    result = run_report(
        out=args.out,
        seed=args.seed,
        quick=args.quick,
        progress=not args.no_progress,
        command=command,
        strict=args.strict,
        threads=args.threads or None,
    )
    for line in result.summary:
        print(line)
    print(f"report written to {result.path} ({result.seconds:.1f} s)")
    if result.failed:
        print(f"{PROG} report: error: sections failed: {', '.join(result.failed)} (see the report)", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradkit`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: a command is required (try '{PROG} report' or '{PROG} --help')", file=sys.stderr)
        return 2
    _configure_logging(args.verbose)
    try:
        if args.command == "report":
            return _report(args, argv)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as exc:
        if args.verbose >= 2:
            raise
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse refuses it first
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
