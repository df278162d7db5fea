"""Export a trained run: the learner's plain backbone and linear classifier (``Learner.export_parts``) through
the writers; rebuild a run folder's experiment from its config and last checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .format import ExportError
from .writers import _prepare_target, export_model

if TYPE_CHECKING:
    from ..engine import Experiment


def export_experiment(
    experiment: Experiment,
    to_dir: str | os.PathLike[str],
    *,
    source_run: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Export a trained, in-memory experiment: all finished tasks' heads over the merged backbone.

    The exported logits are those of ``experiment.learner.predict`` after the last finished task (checked on a probe
    batch with ``verify``). The experiment is left as it was. Returns the manifest.
    """
    learner, config = experiment.learner, experiment.config
    done = int(experiment.state.tasks_done)
    if done < 1:
        raise ExportError("the run has no finished task: nothing to export")
    upto = done - 1
    try:
        merged, weight, bias = learner.export_parts(upto)
    except (NotImplementedError, RuntimeError) as exc:
        raise ExportError(f"method {config.method!r} with classifier {config.classifier!r} cannot be exported as one "
                          f"plain model: {exc}") from exc
    order = [experiment.dataset.class_names[c] for c in experiment.scenario.class_order]
    if len(order) < weight.shape[0]:
        raise ExportError(f"the classifier covers {weight.shape[0]} classes but the scenario has {len(order)}")

    def reference(inputs: Any) -> torch.Tensor:
        return learner.predict(inputs, upto)

    info = {"backbone": config.model.backbone, "source_run": str(Path(source_run).resolve()) if source_run else None,
            "method": config.method, "classifier": config.classifier, "benchmark": config.benchmark,
            "dataset": config.data.name, "seed": config.seed, "tasks_done": done, "num_tasks": experiment.num_tasks,
            "classes_per_task": experiment.layout.groups(upto), "scenario": experiment.scenario.kind}
    return export_model(learner.backbone, weight, bias, order[: weight.shape[0]], to_dir, merged=merged,
                        recipe=config.data.transforms, model_kwargs=config.model.options, info=info,
                        overwrite=overwrite, reference=reference, verify=verify)


def load_trained_experiment(run_dir: str | os.PathLike[str], device: str = "cpu", *,
                            trust_remote_code: bool = False) -> Experiment:
    """Rebuild the experiment of ``run_dir`` (``config.yaml``) on ``device`` and restore its last checkpoint
    (the learner's state and the run state). A ``config.yaml`` with ``model.options.trust_remote_code`` (which runs
    the model folder's Python code) is refused unless ``trust_remote_code``."""
    import yaml

    from ..checkpoint import load_latest
    from ..config import ConfigError, from_dict
    from ..engine import Experiment

    run = Path(run_dir)
    if not run.is_dir():
        raise ExportError(f"run folder not found: {run}")
    config_file = run / "config.yaml"
    if not config_file.is_file():
        seeds = sorted(p.name for p in run.glob("seed_*") if (p / "config.yaml").is_file())
        if seeds:
            raise ExportError(f"{run} holds several seeds: export one of them, e.g. {run / seeds[0]}")
        raise ExportError(f"{run} is not a run folder (no config.yaml)")
    try:
        config = from_dict(yaml.safe_load(config_file.read_text()) or {})
    except (ConfigError, yaml.YAMLError) as exc:
        raise ExportError(f"{config_file}: {exc}") from exc
    if config.model.options.get("trust_remote_code") and not trust_remote_code:
        raise ExportError(f"{config_file} sets model.options.trust_remote_code, which would run the model folder's "
                          "Python code while exporting: refused; pass --trust-remote-code if you trust that run "
                          "folder and model")
    config.train.device = device
    config.train.progress = False
    found = load_latest(run)
    if found is None:
        raise ExportError(f"{run} has no checkpoint: it finished no task, or was run without checkpoints")
    experiment = Experiment(config, progress=False)
    experiment.restore(found)
    return experiment


def export_run(run_dir: str | os.PathLike[str], to_dir: str | os.PathLike[str], *, device: str = "cpu",
               overwrite: bool = False, verify: bool = True, trust_remote_code: bool = False) -> dict[str, Any]:
    """:func:`load_trained_experiment` then :func:`export_experiment`. Returns the manifest."""
    _prepare_target(Path(to_dir), overwrite)  # fail before the (slow) rebuild
    experiment = load_trained_experiment(run_dir, device, trust_remote_code=trust_remote_code)
    return export_experiment(experiment, to_dir, source_run=run_dir, overwrite=overwrite, verify=verify)
