"""Evaluation after a task: class-IL, task-IL and task-id accuracy of every seen task in one no-gradient pass, the
routing counts of learners that route samples to a task, and the probe samples' features for the feature-drift meter
from the same pass."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .classifiers import ClassLayout
from .distributed import all_reduce_sum
from .drift import FeatureProbe
from .learners import Learner
from .taskdata import TaskData


class Evaluation(NamedTuple):
    """One evaluation pass's figures, one entry per seen task."""

    class_il: list[float]
    """accuracy (%) with no task identity: argmax over every seen class"""
    task_il: list[float]
    """accuracy (%) inside the true task's classes"""
    task_id: list[float]
    """share (%) of samples whose predicted class belongs to their true task"""
    routing: list[list[int]] | None
    """``routing[i][j]``: samples of task ``i`` the learner sent to task ``j`` (:meth:`Learner.routing`); None when
    the learner does not route"""


@torch.no_grad()
def evaluate(learner: Learner, data: TaskData, layout: ClassLayout, upto: int, probe: FeatureProbe | None = None
             ) -> Evaluation:
    """Accuracies (%) on each seen task's evaluation data after task ``upto``: class-IL (argmax over every seen
    class, no task identity), task-IL (argmax inside the true task's classes) and task identity (the predicted
    class belongs to the true task; always true in a domain layout, where task-IL equals class-IL), and, for a
    learner whose :meth:`Learner.routing` names each sample's task, the routing counts (true task x routed task),
    which in a domain layout are the only per-sample check of the routing.

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
    routes = (torch.zeros(upto + 1, upto + 1, dtype=torch.long, device=runtime.device)  # true task x routed task
              if type(learner).routing is not Learner.routing else None)
    seen = 0
    for inputs, labels in batches:
        tasks = owner[seen : seen + len(labels)]
        if probe is not None:
            logits, features = learner.predict_with_features(inputs, upto)
            probe.collect(features, seen)
        else:
            logits = learner.predict(inputs, upto)
        seen += len(labels)
        if routes is not None and (routed := learner.routing()) is not None:
            routes.index_put_((tasks, routed.to(tasks.device)), torch.ones_like(tasks), accumulate=True)
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
    routing = None if routes is None else all_reduce_sum(routes.cpu()).tolist()
    return Evaluation(row, til, tid, routing)
