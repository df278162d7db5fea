"""``inflora compare``: every (method variant, seed) as its own ``inflora run`` process in ``DIR/LABEL/seed_N``,
``--workers`` at a time, resumable; then the report over their results.json files.

A job is *finished* when its folder holds a complete results.json of the same resolved configuration (cosmetic keys
such as ``train.progress`` aside): it is skipped. A folder with a run of another configuration is an error before
anything runs (never mixed). Any other non-empty folder is a half-done job: it is continued with ``inflora run
--resume`` (the checkpoint machinery restores its last complete task). Each job's output goes to
``DIR/logs/LABEL-seed_N.log`` (appended to); a job that fails does not stop the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..checkpoint import describe_differences
from ..config import ConfigError, RunConfig
from ..runfolder import CONFIG_FILE, saved_config
from .aggregate import is_finished
from .sources import RESULTS, seed_folder
from .variants import Variant, resolve, variant_overrides

LOGS = "logs"
POLL_S = 0.2


@dataclass
class Job:
    """One (variant, seed) run of a comparison and what it needs: its folder, resolved config and command."""

    variant: Variant
    seed: int
    folder: Path
    config: RunConfig
    overrides: list[str]
    state: str = "new"
    """``new`` (empty folder), ``resume`` (a half-done run) or ``finished``."""

    @property
    def name(self) -> str:
        return f"{self.variant.label} seed {self.seed}"

    def command(self, preset: str | None) -> list[str]:
        """The ``inflora run`` command of the job (``--resume`` for a half-done one)."""
        sets = [a for o in [*self.overrides, f"seed={self.seed}"] for a in ("--set", o)]
        cmd = [sys.executable, "-m", "inflora", "run", *([preset] if preset else []), *sets,
               "--out", str(self.folder), "--quiet"]
        return [*cmd, "--resume"] if self.state == "resume" else cmd


def _saved(folder: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The config.yaml and the results.json of a run folder (None for what is not there)."""
    results = None
    path = folder / RESULTS
    if path.is_file():
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path} cannot be read ({exc}): move the folder {folder} away to run it again") from exc
    return saved_config(folder), results if isinstance(results, dict) else None


def job_state(folder: Path, config: RunConfig) -> str:
    """``finished``, ``resume`` or ``new`` for a job's folder; a run of another configuration there is a
    :class:`ConfigError` naming every differing key."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return "new"
    saved, results = _saved(folder)
    for where, data in ((folder / CONFIG_FILE, saved), (folder / RESULTS, (results or {}).get("config"))):
        differ = describe_differences(data, config) if isinstance(data, dict) else []
        if differ:
            raise ConfigError(f"{folder} holds a run of another configuration ({where.name}: {'; '.join(differ)}): "
                              "compare into another --out, restore the settings, or move that folder away to run "
                              "it again")
    return "finished" if results is not None and is_finished(results) else "resume"


def plan(preset: str | None, variants: list[Variant], seeds: list[int], common: list[str], out: Path) -> list[Job]:
    """Every job with its state; refuses (before anything runs) folders that hold another configuration."""
    jobs, errors = [], []
    for variant in variants:
        overrides = variant_overrides(preset, variant, common)
        for seed in seeds:
            folder = seed_folder(out, variant.label, seed)
            job = Job(variant, seed, folder, resolve(preset, variant, common, seed), overrides)
            try:
                job.state = job_state(folder, job.config)
            except ConfigError as exc:
                errors.append(str(exc))
            jobs.append(job)
    if errors:
        raise ConfigError("; ".join(errors))
    return jobs


def threads_per_job(workers: int) -> int:
    """CPU threads of each job: the CPUs this process may use (or ``$OMP_NUM_THREADS`` when set), divided among
    the ``workers`` parallel jobs, at least one."""
    total = os.environ.get("OMP_NUM_THREADS", "")
    if total.isdigit() and int(total) > 0:
        cpus = int(total)
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // workers)


@dataclass
class _Running:
    job: Job
    process: subprocess.Popen[bytes]
    log: IO[str]
    start: float


def _start(job: Job, preset: str | None, logs: Path, threads: int) -> _Running:
    logs.mkdir(parents=True, exist_ok=True)
    log_file = open(logs / f"{job.variant.label}-seed_{job.seed}.log", "a", encoding="utf-8")  # noqa: SIM115
    command = job.command(preset)
    log_file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} inflora compare ({job.state}, {threads} threads): "
                   f"{' '.join(command)}\n")
    log_file.flush()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    return _Running(job, process, log_file, time.perf_counter())


def run_jobs(jobs: list[Job], preset: str | None, out: Path, workers: int, say: Any = print) -> dict[str, int]:
    """Run ``jobs`` (``workers`` at a time, each a subprocess with its share of the CPU threads); returns
    ``job name -> exit status``. Ctrl-C stops the running jobs (their last checkpoints stay) and re-raises."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    threads = threads_per_job(workers)
    pending, running, status = deque(jobs), [], {}
    count = len(jobs)
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.popleft()
                say(f"[{count - len(pending)}/{count}] {job.name}: {'resuming' if job.state == 'resume' else 'start'}")
                running.append(_start(job, preset, Path(out) / LOGS, threads))
            for item in list(running):
                code = item.process.poll()
                if code is None:
                    continue
                item.log.close()
                running.remove(item)
                status[item.job.name] = code
                took = time.perf_counter() - item.start
                say(f"{item.job.name}: {'done' if code == 0 else f'FAILED (exit {code})'} in {took:.1f}s"
                    + ("" if code == 0 else f", see {item.log.name}"))
            time.sleep(POLL_S if running else 0)
    except KeyboardInterrupt:
        for item in running:
            item.process.terminate()
        for item in running:
            try:
                item.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                item.process.kill()
            item.log.close()
        raise
    return status
