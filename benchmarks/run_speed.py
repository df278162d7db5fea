"""Wall time of ``inflora run`` for an older commit against the working tree, same machine, same command, one run.

    python benchmarks/run_speed.py --base 4f0fd22 [--preset clinc150] [--data-dir ../shared/data] [--set k=v ...]

The base commit is checked out into a temporary git worktree and run from its ``src`` (PYTHONPATH), so both sides use
the installed dependencies. Each side runs ``inflora run PRESET --quiet`` in a fresh output folder, one after the
other, in alternating order when ``--repeats`` > 1. Printed per side: wall seconds, training seconds, the
method-specific share of training (InfLoRA: statistics + design + memory), final accuracy, the wall time by phase
(sums over tasks of begin, train, end, eval where the commit records them; outside_tasks: the rest of the wall time);
then the ratios.

``--concurrent`` runs the two sides of each repeat at the same time with one thread each (``OMP_NUM_THREADS=1``):
on a machine whose speed drifts between runs (shared hosts: 30 % here) both sides then see the same conditions, and
the per-repeat ratio is the figure to trust. CPU seconds (user + system of the ``inflora run`` process) are printed
beside the wall time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def method_seconds(results: dict[str, Any]) -> float:
    """Method-specific seconds of a run: ``diagnostics[*].method_s`` (new format) or the old timings' statistics,
    design and memory seconds."""
    if "diagnostics" in results:
        return sum(d.get("method_s", 0.0) for d in results["diagnostics"])
    return sum(t.get("stats_s", 0.0) + t.get("design_s", 0.0) + t.get("memory_s", 0.0) for t in results["timings"])


def run_side(src: Path, preset: str, data_dir: str | None, sets: list[str], out: Path,
             threads: int | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "inflora", "run", preset, "--quiet", "--out", str(out)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(src)}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    log = out.with_suffix(".log")
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        # wait4 reaps the child and returns its own CPU time (RUSAGE_CHILDREN would mix the two concurrent sides)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    cpu = usage.ru_utime + usage.ru_stime
    code = proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen the child is gone
    if code != 0:
        raise SystemExit(f"{src}: inflora run failed ({code}):\n{log.read_text()[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    train = sum(t["train_s"] for t in results["timings"])
    keys = [k for k in ("begin_s", "train_s", "end_s", "eval_s") if any(k in t for t in results["timings"])]
    phases = {k: sum(t.get(k, 0.0) for t in results["timings"]) for k in keys}  # older commits lack some phases
    phases["outside_tasks_s"] = wall - sum(phases.values())
    return {"wall_s": wall, "cpu_s": cpu, "train_s": train, "phases": phases, "method_s": method_seconds(results),
            "method_share": method_seconds(results) / train if train else 0.0,
            "final_accuracy": results["final_accuracy"], "accuracy_matrix": results["accuracy_matrix"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare against (e.g. a commit hash)")
    parser.add_argument("--preset", default="clinc150")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--set", action="append", default=[], help="override for both sides")
    parser.add_argument("--base-set", action="append", default=[], help="override for the base side only "
                        "(e.g. its old key names)")
    parser.add_argument("--new-set", action="append", default=[], help="override for the working tree only "
                        "(e.g. switch off a diagnostic the base does not have: evaluation.probe_samples=0)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--concurrent", action="store_true", help="run both sides of a repeat at once, one thread "
                        "each (both see the same machine conditions)")
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="inflora-speed-") as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.base], check=True,
                       capture_output=True)
        try:
            rows: dict[str, list[dict[str, Any]]] = {"base": [], "new": []}
            for r in range(args.repeats):
                order = ["base", "new"] if r % 2 == 0 else ["new", "base"]

                def side_run(side: str, r: int = r) -> dict[str, Any]:
                    src = tree / "src" if side == "base" else ROOT / "src"
                    sets = [*args.set, *(args.base_set if side == "base" else args.new_set)]
                    return run_side(src, args.preset, args.data_dir, sets, Path(tmp) / f"{side}{r}",
                                    threads=1 if args.concurrent else None)

                if args.concurrent:
                    with concurrent.futures.ThreadPoolExecutor(2) as pool:
                        done = dict(zip(order, pool.map(side_run, order), strict=True))
                else:
                    done = {side: side_run(side) for side in order}
                for side in order:
                    rows[side].append(done[side])
                    m = done[side]
                    print(f"{side:>4} #{r}: wall {m['wall_s']:7.1f}s  cpu {m['cpu_s']:7.1f}s  "
                          f"train {m['train_s']:6.1f}s  method-specific {m['method_s']:5.1f}s "
                          f"({100 * m['method_share']:4.1f}% of training)  "
                          f"A_T {m['final_accuracy']:.2f}", flush=True)
                    print("         " + "  ".join(f"{k[:-2]} {v:.1f}s" for k, v in m["phases"].items()), flush=True)
                print(f"      #{r}: wall new / base {done['new']['wall_s'] / done['base']['wall_s']:.3f}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    base_wall = min(m["wall_s"] for m in rows["base"])
    new_wall = min(m["wall_s"] for m in rows["new"])
    ratios = [n["wall_s"] / b["wall_s"] for b, n in zip(rows["base"], rows["new"], strict=True)]
    cpu = sum(m["cpu_s"] for m in rows["new"]) / sum(m["cpu_s"] for m in rows["base"])
    share = {side: 100 * sum(m["method_share"] for m in ms) / len(ms) for side, ms in rows.items()}
    print(f"\nfastest wall time new / base: {new_wall / base_wall:.3f} ({100 * (1 - new_wall / base_wall):.1f}% less); "
          f"method-specific share of training (mean over repeats): base {share['base']:.1f}%, new {share['new']:.1f}%")
    listed = ", ".join(f"{x:.3f}" for x in ratios)
    print(f"per-repeat wall new / base: {listed} (mean {sum(ratios) / len(ratios):.3f}); "
          f"total CPU seconds new / base: {cpu:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"base": args.base, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
