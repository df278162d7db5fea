"""The ``inflora`` command line: ``run``, ``presets``, ``datasets``, ``backbones``, ``config``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, list_presets, load_config, to_dict
from .confighelp import describe_fields
from .distributed import broadcast_bytes, init_from_env, is_main, on_main, shutdown
from .results import format_seeds, format_table, seeds_summary, write_json, write_yaml
from .runtime import parse_seeds

log = logging.getLogger("inflora")


class _Buffer(logging.Handler):
    """Holds the log records of a run's start-up until its run folder may be written."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _setup_logging(quiet: bool) -> _Buffer:
    """Log to the console, and into a buffer until :func:`_log_to_file` (nothing is written before the run starts)."""
    logger = logging.getLogger("inflora")
    logger.setLevel(logging.INFO)
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    buffer = _Buffer()
    logger.addHandler(buffer)
    return buffer


def _log_to_file(log_file: Path, buffer: _Buffer) -> None:
    """From now on log into ``log_file`` too, starting with what the buffer holds."""
    logger = logging.getLogger("inflora")
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for record in buffer.records:
        handler.handle(record)
    logger.removeHandler(buffer)
    logger.addHandler(handler)


def default_out(config: RunConfig) -> Path:
    return Path("runs") / f"{config.benchmark}-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> list[Path]:
    """Refuse to mix a new run into a folder that holds another one, or to touch checkpoints through a symlink;
    fail early when it is not writable. Returns the folders it created (removed again if the start-up fails)."""
    from .runfolder import check_run_folder, missing_folders

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run or replace it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and not (resume or overwrite):
        raise ConfigError(f"output folder {out} is not empty: pass --resume to continue that run or --overwrite "
                          "to replace it")
    check_run_folder(out)
    created = missing_folders(out)
    probe = out / ".write-test"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write to output folder {out}: {exc.strerror or exc}") from exc
    return created


def _finished_results(out: Path) -> dict[str, Any] | None:
    """The results of a finished run in ``out`` whose checkpoints are gone (None: there are none)."""
    import json

    path = out / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}) and {out} has no checkpoint to resume from: restore it, "
                          "or start the run again with --overwrite") from exc
    if not isinstance(results, dict) or results.get("tasks_done") != results.get("num_tasks"):
        raise ConfigError(f"{path} is not the results of a finished run and {out} has no checkpoint to resume "
                          "from: start the run again with --overwrite")
    return results


def run_one(config: RunConfig, out: Path, resume: bool, quiet: bool,
            before_write: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run one seed into ``out``; write results.json, config.yaml, run.log and a checkpoint after every task (rank 0
    only under torchrun). ``resume``: continue from the last complete checkpoint, if any, after checking the
    configuration against ``config.yaml`` and the checkpoint. Nothing is written (and ``before_write`` not called)
    until the experiment is built and the checkpoint restored into it. Returns the results."""
    from .checkpoint import check_config, check_free_space, check_saved_config, load_latest, save_checkpoint
    from .engine import Experiment
    from .runfolder import checkpoints_dir, clear_checkpoints, saved_config

    main = is_main()
    buffer = _setup_logging(quiet or not main)
    if config.logging.tensorboard and main:
        from .tblog import require_tensorboard

        require_tensorboard()
    on_main(lambda: checkpoints_dir(out))
    if resume:  # the configuration check always runs, checkpoints or not
        on_main(lambda: (saved := saved_config(out)) is None or check_saved_config(saved, out, config))
    checkpoint = load_latest(out) if resume else None
    if checkpoint is not None:
        check_config(checkpoint, config)  # before anything is written or built
    elif resume:
        finished = on_main(lambda: _finished_results(out))
        if broadcast_bytes(b"1" if finished else None):
            log.info("--resume: the run in %s is finished and has no checkpoint: nothing to do", out)
            return finished or {}
        log.info("--resume: no checkpoint in %s yet, starting from scratch", out)
    log.info("run %s (method %s, seed %d) -> %s", config.benchmark, config.method, config.seed, out)
    experiment = Experiment(config, progress=config.train.progress and not quiet and main)
    if checkpoint is not None:
        experiment.restore(checkpoint)  # refuses other data
    space = next((p for p in (out, *out.absolute().parents) if p.exists()), Path.cwd())
    on_main(lambda: check_free_space(space, experiment.learner.estimate_state_bytes() + experiment.probe.estimate_bytes(
        experiment.num_tasks, experiment.backbone.feature_dim)))
    if main:  # the run starts: from here on it writes
        if before_write is not None:
            before_write()
        out.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            clear_checkpoints(out)  # never resume later from an older run's checkpoints (only inflora's files)
        write_yaml(out / "config.yaml", to_dict(config))
        _log_to_file(out / "run.log", buffer)
        experiment.on_task_end.append(lambda e: save_checkpoint(out, e.state, e.learner.state_dict(), e.config,
                                                               e.num_tasks, cuda=e.device.type == "cuda",
                                                               data=e.fingerprint,
                                                               probe_state=e.probe.state_dict()))
    board = _tensorboard(experiment, out) if main and config.logging.tensorboard else None
    try:
        results = experiment.run()
    finally:
        if board is not None:
            board.close()
    if main:
        write_json(out / "results.json", results)
    return results


def _tensorboard(experiment: Any, out: Path) -> Any:
    """A TensorBoard log in ``out/tensorboard`` hooked to the experiment's steps and task ends."""
    from .runfolder import TENSORBOARD
    from .tblog import TensorBoardLog

    board = TensorBoardLog(out / TENSORBOARD)
    experiment.step_loggers.append(board.step)
    experiment.on_task_end.append(lambda e: board.task_end(e.results()))
    return board


def _interrupted(target: Path | None) -> str:
    """What to tell after Ctrl-C: where the run stopped and how to continue it."""
    from .checkpoint import _read_latest_name
    from .runfolder import CHECKPOINTS

    if target is None:
        return "inflora: interrupted before the run started"
    name = _read_latest_name(target / CHECKPOINTS) if (target / CHECKPOINTS).is_dir() else None
    kept = f"the last complete checkpoint is {target / CHECKPOINTS / name}" if name else "no checkpoint was written yet"
    return f"inflora: interrupted; {kept}: run the same command with --resume (--out {target}) to continue"


def cmd_run(args: argparse.Namespace) -> int:
    from .runfolder import clear_run, remove_empty_folders

    overrides = list(args.set or [])
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    config = load_config(args.preset, overrides)
    seeds = parse_seeds(args.seeds) or [config.seed]
    init_from_env(config.train.device)  # under torchrun: join the other ranks
    finished = False
    created: list[Path] = []
    target: Path | None = None
    main = is_main()
    try:
        out = Path(broadcast_bytes(str(Path(args.out) if args.out else default_out(config)).encode())
                   .decode())
        created = on_main(lambda: check_out_dir(out, args.resume, args.overwrite)) or []
        clear: Callable[[], None] | None = (lambda: clear_run(out)) if args.overwrite else None
        all_results = []
        for seed in seeds:
            config.seed = seed
            target = out if len(seeds) == 1 else out / f"seed_{seed}"
            results = run_one(config, target, args.resume, args.quiet, before_write=clear)
            clear = None  # --overwrite cleared the folder once, when the first run started
            all_results.append(results)
            if main:
                print(format_table(results))
                print()
        if len(seeds) > 1 and main:
            summary = seeds_summary(all_results)
            write_json(out / "summary.json", summary)
            print(format_seeds(summary))
        if main:
            print(f"results in {out}")
        finished = True
    except KeyboardInterrupt:
        if main:
            print(_interrupted(target), file=sys.stderr)
        return 130
    finally:
        if not finished and main:
            remove_empty_folders(created)  # a failed start-up leaves no folder behind
        shutdown(clean=finished)
    return 0


def cmd_presets(_args: argparse.Namespace) -> int:
    presets = list_presets()
    width = max(map(len, presets))
    for name, description in presets.items():
        print(f"{name:<{width}}  {description}")
    return 0


def cmd_datasets(_args: argparse.Namespace) -> int:
    from .data import list_datasets

    for name, description in list_datasets().items():
        print(f"{name:<14}  {description}")
    return 0


def cmd_backbones(_args: argparse.Namespace) -> int:
    from .backbones import list_backbones

    for name, description in list_backbones().items():
        print(f"{name}  {description}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.preset:
        print(yaml_dump(to_dict(load_config(args.preset, args.set or []))), end="")
        return 0
    for key, default, help_text in describe_fields():
        print(f"{key:<34} {default:<22} {help_text}")
    return 0


def yaml_dump(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inflora", description="Continual learning with InfLoRA.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a benchmark (default: the offline CLINC150 benchmark)")
    run.add_argument("preset", nargs="?", help="preset name (see `inflora presets`) or YAML file")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config key, e.g. --set method=seqlora --set train.epochs=3")
    run.add_argument("--out", help="output folder (default: runs/<benchmark>-<method>-<time>)")
    run.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (adds a mean/std summary)")
    run.add_argument("--data-dir", help="data directory (else $INFLORA_DATA, else the user cache)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace whatever --out holds")
    run.add_argument("--quiet", action="store_true", help="no progress bars or per-task logs")
    run.set_defaults(func=cmd_run)

    sub.add_parser("presets", help="list presets").set_defaults(func=cmd_presets)
    sub.add_parser("datasets", help="list datasets").set_defaults(func=cmd_datasets)
    sub.add_parser("backbones", help="list backbone name forms").set_defaults(func=cmd_backbones)
    conf = sub.add_parser("config", help="list config keys, or print a preset's resolved config")
    conf.add_argument("preset", nargs="?")
    conf.add_argument("--set", action="append", metavar="KEY=VALUE")
    conf.set_defaults(func=cmd_config)

    from .export import add_export_commands
    from .report import add_report_commands

    add_export_commands(sub)
    add_report_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"inflora: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("inflora: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors of the data, backbone and training layers
        from .backbones import BackboneError
        from .data import DataError
        from .training import TrainingDiverged

        if isinstance(exc, (DataError, BackboneError, TrainingDiverged, ValueError, OSError)):
            print(f"inflora: error: {exc}", file=sys.stderr)
            return 1
        raise
    finally:
        _reset_logging()


def _reset_logging() -> None:
    """Take the command's log handlers off the ``inflora`` logger again (a library user's or a test's logging
    setup, and later commands in the same process, see the logger as it was)."""
    logger = logging.getLogger("inflora")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


if __name__ == "__main__":
    raise SystemExit(main())
