"""The ``inflora export`` and ``inflora predict`` commands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .format import ExportError
from .loaded import ExportedModel
from .runs import export_run


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_predictions(inputs: Sequence[str], predictions: Sequence[Sequence[tuple[int, str, float]]]) -> str:
    """A readable table: one block of rows per input (rank, class, probability)."""
    shown = [_shorten(s, 48) for s in inputs]
    width_in = max([5, *map(len, shown)])
    width_cls = max([5, *(len(name) for preds in predictions for _, name, _ in preds)])
    lines = [f"{'input':<{width_in}}  rank  {'class':<{width_cls}}  score", f"{'-' * width_in}  ----  "
             f"{'-' * width_cls}  ------"]
    for text, preds in zip(shown, predictions, strict=True):
        for rank, (_, name, score) in enumerate(preds, 1):
            lines.append(f"{text if rank == 1 else '':<{width_in}}  {rank:>4}  {name:<{width_cls}}  {score:.4f}")
    return "\n".join(lines)


def _quiet_loading() -> None:
    """No per-file progress bars from transformers while loading / saving (command line output stays readable)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def cmd_export(args: argparse.Namespace) -> int:
    _quiet_loading()
    manifest = export_run(args.run_dir, args.to, device=args.device, overwrite=args.overwrite,
                          verify=not args.no_verify, trust_remote_code=args.trust_remote_code)
    print(f"exported {manifest['kind']} model {manifest['model_name']} with {manifest['num_classes']} classes "
          f"({manifest['tasks_done']} tasks) to {args.to}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ExportError(f"--batch-size must be at least 1, got {args.batch_size}")
    _quiet_loading()
    model = ExportedModel.load(args.model_dir, device=args.device)
    inputs: list[str] = []
    for item in args.inputs:
        if item == "-":
            inputs.extend(line.rstrip("\n") for line in sys.stdin if line.strip())
        else:
            inputs.append(item)
    if not inputs:
        raise ExportError("no inputs to predict (stdin gave no non-empty line)")
    predictions = model.predict(inputs, top_k=args.top_k, batch_size=args.batch_size)
    if args.json:
        rows = [{"input": text, "predictions": [{"class": name, "index": i, "score": score}
                                                for i, name, score in preds]}
                for text, preds in zip(inputs, predictions, strict=True)]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print(format_predictions(inputs, predictions))
    return 0


def add_export_commands(sub: argparse._SubParsersAction) -> None:
    """Register the ``export`` and ``predict`` subcommands."""
    exp = sub.add_parser("export", help="export a finished run as a merged timm / transformers model",
                         description="Merge all task branches into the backbone, stack all task heads into one "
                                     "classifier and save them for plain timm / transformers (see docs/export.md).")
    exp.add_argument("run_dir", metavar="RUN_DIR", help="the run's output folder (holds config.yaml, checkpoints)")
    exp.add_argument("--to", required=True, metavar="MODEL_DIR", help="folder to write the model to")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace the files of an earlier export in MODEL_DIR (other files are kept)")
    exp.add_argument("--device", default="cpu", help="device to rebuild the run on (default: cpu)")
    exp.add_argument("--no-verify", action="store_true", help="skip reloading the export to compare its logits")
    exp.add_argument("--trust-remote-code", action="store_true",
                     help="allow the run's model.options.trust_remote_code (runs the model folder's Python code)")
    exp.set_defaults(func=cmd_export)

    pred = sub.add_parser("predict", help="top-k classes of images or texts with an exported model",
                          description="Image models read file paths; text models read the arguments as texts "
                                      "(`-` reads one input per line from stdin).")
    pred.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by `inflora export`")
    pred.add_argument("inputs", nargs="+", metavar="INPUTS", help="image files or texts; `-` reads lines from stdin")
    pred.add_argument("--top-k", type=int, default=5, help="classes shown per input (default 5)")
    pred.add_argument("--json", action="store_true", help="machine-readable output")
    pred.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass")
    pred.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    pred.set_defaults(func=cmd_predict)
