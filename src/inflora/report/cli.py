"""The ``inflora compare`` and ``inflora report`` commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..runtime import parse_seeds
from .compare import plan, run_jobs
from .plots import require_matplotlib
from .sources import collect, write_manifest, write_report
from .tables import MD_FILE
from .variants import check_sections_used, parse_methods, resolve


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_compare(args: argparse.Namespace) -> int:
    require_matplotlib()  # before hours of runs, not after
    common = list(args.set or [])
    if args.data_dir:
        common.append(f"data.data_dir={args.data_dir}")
    variants = parse_methods(args.methods)
    seeds = parse_seeds(args.seeds) or [resolve(args.preset, variants[0], common).seed]
    check_sections_used(args.preset, variants, common)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    jobs = plan(args.preset, variants, seeds, common, out)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, args.preset, seeds, common,
                   [{"label": v.label, "method": v.method, "overrides": list(v.overrides)} for v in variants])
    todo = [j for j in jobs if j.state != "finished"]
    if len(todo) < len(jobs):
        _say(f"{len(jobs) - len(todo)} of {len(jobs)} runs already finished: skipped")
    try:
        status = run_jobs(todo, args.preset, out, args.workers, say=_say)
    except KeyboardInterrupt:
        _say(f"inflora: interrupted; run the same command again to continue (finished runs are kept, the others "
             f"resume from their last checkpoints in {out})")
        return 130
    failed = [name for name, code in status.items() if code != 0]
    title, groups, missing = collect(out)
    if any(groups.values()):
        paths = write_report(groups, missing, out, title)
        print((out / MD_FILE).read_text(encoding="utf-8"))
        print(f"report in {paths[-1]}")
    if failed:
        _say(f"inflora: {len(failed)} run(s) failed: {', '.join(failed)}; their logs are in {out / 'logs'}; fix the "
             "cause and run the same command again (finished runs are skipped)")
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    require_matplotlib()
    folder = Path(args.folder)
    title, groups, missing = collect(folder)
    paths = write_report(groups, missing, Path(args.out) if args.out else folder, title)
    for path in paths:
        print(path)
    return 0


def add_report_commands(sub: Any) -> None:
    """Register ``compare`` and ``report`` on the ``inflora`` command's subparsers."""
    compare = sub.add_parser("compare", help="run several methods over seeds and report them side by side",
                             description="Run every (method, seed) as its own `inflora run` in OUT/LABEL/seed_N "
                                         "(finished runs are skipped, half-done ones resumed), then write "
                                         "OUT/comparison.{md,csv,json}, OUT/figures/*.png and OUT/report.html.")
    compare.add_argument("preset", nargs="?", help="preset name (see `inflora presets`) or YAML file")
    compare.add_argument("--methods", required=True,
                         help="comma-separated [LABEL=]METHOD[KEY=VALUE,...], e.g. "
                              "'inflora,seqlora,ca=inflora[classifier=aligned]', or a YAML file of variants")
    compare.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: the preset's seed)")
    compare.add_argument("--out", required=True, help="comparison folder")
    compare.add_argument("--workers", type=int, default=1,
                         help="runs at a time (each gets an equal share of the CPU threads; default 1)")
    compare.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="override for every method (an option section's only where the method owns it)")
    compare.add_argument("--data-dir", help="data directory (else $INFLORA_DATA, else the user cache)")
    compare.set_defaults(func=cmd_compare)

    report = sub.add_parser("report", help="redraw the tables, figures and report.html of a run or a comparison",
                            description="Read the results.json files of a run folder, a multi-seed run folder or a "
                                        "comparison folder and write comparison.{md,csv,json}, figures/*.png and "
                                        "report.html (into the folder, or --out).")
    report.add_argument("folder", help="run folder or comparison folder")
    report.add_argument("--out", help="where to write the report (default: the folder itself)")
    report.set_defaults(func=cmd_report)
