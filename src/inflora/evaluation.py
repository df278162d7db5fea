"""Evaluation after a task: class-IL, task-IL and task-id accuracy of every seen task in one no-gradient pass, and
the probe samples' features for the feature-drift meter from the same pass."""

from __future__ import annotations

import torch

from .classifiers import ClassLayout
from .distributed import all_reduce_sum
from .drift import FeatureProbe
from .learners import Learner
from .taskdata import TaskData


@torch.no_grad()
def evaluate(learner: Learner, data: TaskData, layout: ClassLayout, upto: int, probe: FeatureProbe | None = None
             ) -> tuple[list[float], list[float], list[float]]:
    """Accuracies (%) on each seen task's evaluation data after task ``upto``: class-IL (argmax over every seen
    class, no task identity), task-IL (argmax inside the true task's classes) and task identity (the predicted
    class belongs to the true task; always true in a domain layout, where task-IL equals class-IL).

    One pass covers every seen task's samples (text in order of length, so batches carry little padding); counts
    are kept per task and summed over ranks. With an active ``probe`` the pass takes the logits and the features
    from ``learner.predict_with_features`` and hands the probe samples' features to ``probe`` (its ``row`` is then
    the feature-drift row after task ``upto``); without one it calls ``learner.predict``.
    """
    runtime = data.runtime
    learner.train_mode(False)
    batches, owner = data.eval_pass(upto)
    probe = probe if probe is not None and probe.active else None
    if probe is not None:
        probe.begin(data, upto, learner.classifier.feature_dim)
    counts = torch.zeros(4, upto + 1, dtype=torch.long, device=runtime.device)  # correct, task-IL, task-id, total
    seen = 0
    for inputs, labels in batches:
        tasks = owner[seen : seen + len(labels)]
        if probe is not None:
            logits, features = learner.predict_with_features(inputs, upto)
            probe.collect(features, seen)
        else:
            logits = learner.predict(inputs, upto)
        seen += len(labels)
        logits = logits.float()
        pred = logits.argmax(-1)
        hit = pred == labels
        inside = layout.within_task(tasks, logits.shape[1])
        hit_til = logits.masked_fill(~inside, float("-inf")).argmax(-1) == labels
        hit_tid = layout.same_task(pred, tasks)
        for row, flags in enumerate((hit, hit_til, hit_tid, torch.ones_like(hit))):
            counts[row].index_add_(0, tasks, flags.long())
    counts = all_reduce_sum(counts.cpu())
    if probe is not None:
        probe.end(upto)
    total = counts[3].clamp(min=1).double()
    row, til, tid = ((100.0 * counts[k].double() / total).tolist() for k in range(3))
    return row, til, tid
