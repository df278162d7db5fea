"""Run a grid of configuration variants of one preset side by side and tabulate their results.

Each variant is a set of ``--set`` overrides; each runs as its own ``python -m inflora run`` process (several at once
with ``--workers``), and the table lists final / average accuracy, forgetting and wall time per variant and seed.

    python benchmarks/sweep.py clinc150 --grid grid.yaml --out sweeps/clinc150 --workers 4 \\
        --set scenario.eval_split=val

``grid.yaml`` is a mapping ``name: {key: value, ...}`` (or a list of such mappings, named by their overrides).
Tune on a validation split (``scenario.eval_split=val``), never on the test split.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml


def load_grid(path: Path) -> dict[str, dict[str, object]]:
    """Variants by name from a YAML mapping (or list) of override dicts."""
    raw = yaml.safe_load(path.read_text())
    if isinstance(raw, list):
        raw = {" ".join(f"{k}={v}" for k, v in item.items()) or "base": item for item in raw}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise SystemExit(f"{path}: expected a mapping of variant name -> {{key: value}} overrides")
    return raw


def run_variant(preset: str, name: str, overrides: dict[str, object], common: list[str], seed: int, out: Path,
                data_dir: str | None) -> dict[str, object]:
    """One run; returns its row (or the error)."""
    folder = out / f"{name.replace(' ', '_').replace('/', '-')}-seed{seed}"
    cmd = [sys.executable, "-m", "inflora", "run", preset, "--out", str(folder), "--overwrite", "--quiet",
           "--seeds", str(seed)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    for item in common:
        cmd += ["--set", item]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={'null' if value is None else value}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    row: dict[str, object] = {"variant": name, "seed": seed, "wall_s": round(wall, 1)}
    results = folder / "results.json"
    if proc.returncode != 0 or not results.exists():
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return row
    data = json.loads(results.read_text())
    row.update(final=data["final_accuracy"], average=data["average_accuracy"], forgetting=data["forgetting"],
               task_il=data["task_il_accuracy"])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--grid", type=Path, required=True, help="YAML mapping of variant name -> overrides")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and sweep.jsonl")
    parser.add_argument("--set", dest="common", action="append", default=[], help="override applied to every variant")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--workers", type=int, default=1, help="runs at once")
    parser.add_argument("--data-dir", default=os.environ.get("INFLORA_DATA"))
    args = parser.parse_args(argv)
    grid = load_grid(args.grid)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "sweep.jsonl"
    jobs = [(name, overrides, seed) for name, overrides in grid.items() for seed in seeds]
    rows = []
    with ThreadPoolExecutor(max_workers=args.workers) as pool, log.open("a") as sink:
        futures = [pool.submit(run_variant, args.preset, n, o, args.common, s, args.out, args.data_dir)
                   for n, o, s in jobs]
        for future in as_completed(futures):  # written as they finish: a cut-short sweep keeps its rows
            row = future.result()
            rows.append(row)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(json.dumps(row), flush=True)
    print(f"\n{'variant':<48} {'seed':>4} {'final':>7} {'avg':>7} {'forget':>7} {'wall s':>7}")
    for row in sorted(rows, key=lambda r: -float(r.get("final", -1))):  # type: ignore[arg-type]
        if "error" in row:
            print(f"{row['variant']:<48} {row['seed']:>4} error: {row['error']}")
        else:
            print(f"{row['variant']:<48} {row['seed']:>4} {row['final']:>7.2f} {row['average']:>7.2f} "
                  f"{row['forgetting']:>7.2f} {row['wall_s']:>7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
