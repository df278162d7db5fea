"""The ``inflora`` command line: ``run``, ``presets``, ``datasets``, ``backbones``, ``config``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from . import distributed
from .config import ConfigError, RunConfig, describe_fields, list_presets, load_config, to_dict
from .results import format_seeds, format_table, seeds_summary, write_json, write_yaml

log = logging.getLogger("inflora")


def _parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise ConfigError(f"--seeds expects comma-separated integers, got {text!r}") from exc
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds expects distinct integers, got {text!r}")
    bad = [s for s in seeds if not 0 <= s < 2**63]
    if bad:
        raise ConfigError(f"--seeds must be integers in [0, 2**63), got {', '.join(map(str, bad))}")
    return seeds


def _setup_logging(log_file: Path | None, quiet: bool) -> None:
    logger = logging.getLogger("inflora")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)


def default_out(config: RunConfig) -> Path:
    return Path("runs") / f"{config.benchmark}-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into a folder that holds another one; fail early when it is not writable."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and not (resume or overwrite):
        raise ConfigError(f"output folder {out} is not empty: pass --resume to continue that run or --overwrite "
                          "to replace it")
    probe = out / ".write-test"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write to output folder {out}: {exc.strerror or exc}") from exc


def run_one(config: RunConfig, out: Path, resume: bool, quiet: bool) -> dict[str, Any]:
    """Run one seed into ``out``; write results.json, config.yaml, run.log and a checkpoint after every task (rank 0
    only under torchrun). ``resume``: continue from the last complete checkpoint, if any. Returns the results."""
    from .checkpoint import check_config, check_free_space, clear_checkpoints, load_latest, save_checkpoint
    from .engine import Experiment

    main = distributed.is_main()
    _setup_logging(out / "run.log" if main else None, quiet or not main)
    checkpoint = load_latest(out) if resume else None
    if checkpoint is not None:
        check_config(checkpoint, config)  # before anything is written or built
    elif resume:
        log.info("--resume: no checkpoint in %s yet, starting from scratch", out)
    if main:
        if checkpoint is None:
            clear_checkpoints(out)  # never resume later from an older run's checkpoints
        write_yaml(out / "config.yaml", to_dict(config))
    log.info("run %s (method %s, seed %d) -> %s", config.benchmark, config.method, config.seed, out)
    experiment = Experiment(config, progress=config.train.progress and not quiet and main)
    distributed.on_main(lambda: check_free_space(out, experiment.learner.estimate_state_bytes()))
    if checkpoint is not None:
        experiment.restore(checkpoint)
    if main:
        experiment.on_task_end.append(lambda e: save_checkpoint(out, e.state, e.learner.state_dict(), e.config,
                                                               e.num_tasks, cuda=e.device.type == "cuda"))
    results = experiment.run()
    if main:
        write_json(out / "results.json", results)
    return results


def cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    config = load_config(args.preset, overrides)
    seeds = _parse_seeds(args.seeds) or [config.seed]
    distributed.init_from_env(config.train.device)  # under torchrun: join the other ranks
    finished = False
    try:
        main = distributed.is_main()
        out = Path(distributed.broadcast_bytes(str(Path(args.out) if args.out else default_out(config)).encode())
                   .decode())
        distributed.on_main(lambda: check_out_dir(out, args.resume, args.overwrite))
        all_results = []
        for seed in seeds:
            config.seed = seed
            target = out if len(seeds) == 1 else out / f"seed_{seed}"
            results = run_one(config, target, args.resume, args.quiet)
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
    finally:
        distributed.shutdown(clean=finished)
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

    add_export_commands(sub)
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
