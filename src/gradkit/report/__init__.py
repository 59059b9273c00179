"""``gradkit report``: train a small MLP on scikit-learn's digits and report, in one
self-contained HTML page, what gradkit computes about it.

The report is a list of **sections** (:data:`SECTIONS`): functions that take the shared
:class:`ReportContext` (trained model, data splits, seed, ``quick`` flag, progress switch,
earlier sections' results) and return a :class:`Section` (title, terminal summary lines, HTML
body with figures, a dataclass of numbers).  Add a section by writing one such function and
appending it to :data:`SECTIONS` (see :mod:`gradkit.report.runner`).

Example::

    from gradkit.report import run_report
    result = run_report("out/report.html", quick=True)
    result["geometry"].stability.stable
"""

from gradkit.report.base import Block, Plot, ReportConfig, ReportContext, Section, fmt, html_table
from gradkit.report.digits import (
    DigitsData,
    TrainingResult,
    TrainingRun,
    load_digits_data,
    make_mlp,
    train_gd,
    training_section,
)
from gradkit.report.geometry import GeometryResult, Stability, TraceEstimate, geometry_section
from gradkit.report.runner import DEFAULT_OUT, SECTIONS, ReportResult, SectionFn, run_report

__all__ = [
    "run_report",
    "ReportResult",
    "ReportConfig",
    "ReportContext",
    "Section",
    "SectionFn",
    "Plot",
    "Block",
    "SECTIONS",
    "DEFAULT_OUT",
    "fmt",
    "html_table",
    "DigitsData",
    "TrainingRun",
    "TrainingResult",
    "load_digits_data",
    "make_mlp",
    "train_gd",
    "training_section",
    "GeometryResult",
    "TraceEstimate",
    "Stability",
    "geometry_section",
]
