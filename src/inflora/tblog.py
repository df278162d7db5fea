"""Optional TensorBoard logging of a run (``logging.tensorboard=true``): per-step losses from the training loop's
logger hook and per-task metrics from the run's results, written into ``OUT/tensorboard`` through
:mod:`torch.utils.tensorboard`. Generic: it logs whatever figures the learner reports, never asks which method runs.

Tags (``t`` counted from 1, three digits):

* ``loss/task_t`` and ``step/NAME/task_t``: the loss and the learner's logged figures of every training step of
  task ``t``, at step ``epoch * steps_per_epoch + step`` (per task, so a resumed run logs at the same steps);
* at step ``t`` (tasks done): ``metrics/A_t`` (accuracy on the tasks so far), ``metrics/A_bar``,
  ``metrics/forgetting``, ``metrics/bwt``, ``metrics/task_il``, ``metrics/task_id`` (as in results.json),
  ``accuracy_on/task_j`` (accuracy on task ``j`` after task ``t``), ``time/PHASE`` (seconds of the task's phases)
  and ``diagnostics/NAME`` for every plain number among the learner's diagnostics of task ``t``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .config import ConfigError
from .training import StepRecord

METRIC_TAGS = {"A_bar": "average_accuracy", "forgetting": "forgetting", "bwt": "backward_transfer",
               "task_il": "task_il_accuracy", "task_id": "task_id_accuracy"}


def require_tensorboard() -> None:
    """Refuse ``logging.tensorboard=true`` early (before anything is written) when TensorBoard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"logging.tensorboard=true needs the tensorboard package ({exc}): pip install tensorboard, "
                          "or set logging.tensorboard=false") from None


def _number(value: Any) -> float | None:
    """``value`` as a finite float when it is a plain number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class TensorBoardLog:
    """A TensorBoard event writer for one run folder: :meth:`step` is a training-loop logger
    (:data:`inflora.training.StepLogger`), :meth:`task_end` takes the run's results after each task."""

    def __init__(self, folder: Path) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        self.writer = SummaryWriter(log_dir=str(self.folder))

    def step(self, record: StepRecord) -> None:
        """Log one training step's loss and figures."""
        x = record.epoch * record.steps + record.step
        suffix = f"task_{record.task + 1:03d}"
        self.writer.add_scalar(f"loss/{suffix}", record.loss, x)
        for name, value in record.logs.items():
            self.writer.add_scalar(f"step/{name}/{suffix}", value, x)

    def task_end(self, results: dict[str, Any]) -> None:
        """Log the metrics of the tasks done so far (a results dictionary, :func:`inflora.results.build_results`)."""
        done = int(results["tasks_done"])
        scalars: dict[str, float | None] = {"metrics/A_t": results["accuracy_after_task"][-1]}
        scalars.update({f"metrics/{tag}": results.get(key) for tag, key in METRIC_TAGS.items()})
        row = results["accuracy_matrix"][-1]
        scalars.update({f"accuracy_on/task_{j + 1:03d}": a for j, a in enumerate(row)})
        scalars.update({f"time/{phase}": s for phase, s in results["timings"][-1].items()})
        scalars.update({f"diagnostics/{name}": _number(v) for name, v in results["diagnostics"][-1].items()})
        for tag, value in scalars.items():
            number = _number(value)
            if number is not None:
                self.writer.add_scalar(tag, number, done)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
