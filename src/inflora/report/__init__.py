"""Comparing methods and reporting runs (``inflora compare`` / ``inflora report``).

Rooms: :mod:`.variants` (the ``--methods`` syntax and each variant's resolved config), :mod:`.compare` (the jobs:
finished, half-done or new, run as ``inflora run`` subprocesses), :mod:`.aggregate` (mean and std over seeds, pure
functions of results.json), :mod:`.tables` (markdown, CSV, JSON), :mod:`.plots` (matplotlib figures, headless),
:mod:`.html` (the self-contained report.html), :mod:`.sources` (finding the runs of a folder, writing a report),
:mod:`.cli` (the commands). matplotlib is imported only when figures are drawn.
"""

from .aggregate import (
    METRIC_KEYS,
    ReportError,
    aggregate,
    load_results,
    memory_dimensions,
    run_metrics,
    summarize_group,
)
from .cli import add_report_commands, cmd_compare, cmd_report
from .compare import Job, job_state, plan, run_jobs, threads_per_job
from .sources import MANIFEST, collect, read_manifest, write_manifest, write_report
from .variants import Variant, parse_methods, parse_spec, resolve

__all__ = [
    "MANIFEST",
    "METRIC_KEYS",
    "Job",
    "ReportError",
    "Variant",
    "add_report_commands",
    "aggregate",
    "cmd_compare",
    "cmd_report",
    "collect",
    "job_state",
    "load_results",
    "memory_dimensions",
    "parse_methods",
    "parse_spec",
    "plan",
    "read_manifest",
    "resolve",
    "run_jobs",
    "run_metrics",
    "summarize_group",
    "threads_per_job",
    "write_manifest",
    "write_report",
]
