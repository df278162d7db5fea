"""The fault-injection hook of the tests: end, raise or poison a run at named points. It reads ``$INFLORA_FAULT``
and nothing else, so it is inert in normal use."""

from __future__ import annotations

import os

from .distributed import rank

FAULT_ENV = "INFLORA_FAULT"
FAULT_EXIT_CODE = 87


class InjectedFault(RuntimeError):
    """Raised by :func:`fault` for the ``raise`` action."""


def fault(point: str, **context: object) -> str | None:
    """Fault-injection hook for tests, read from ``$INFLORA_FAULT`` and nowhere else.

    The variable holds comma-separated specs ``<point>[:<key>=<value>...][:<action>]``, e.g. ``train:task=1:step=3``.
    A spec fires when ``point`` matches and every given key equals ``context[key]`` (compared as text; ``rank`` is
    always in the context). Actions: ``exit`` (default) ends the process at once with status 87, as a kill would (no
    clean-up, no flushing); ``raise`` raises :class:`InjectedFault`; ``nan`` is returned, and the caller makes its
    loss NaN. Points: ``train`` (seed, task, epoch, step: before the step's update), ``stats`` (task, phase:
    ``design`` or ``memory``, batch), ``checkpoint`` (task: the task just finished; stage: ``tensors``
    after the tensor file is written, ``folder`` after the folder is renamed into place, before ``latest`` moves).
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    context = {"rank": rank(), **context}
    for item in spec.split(","):
        name, *parts = item.strip().split(":")
        if name != point:
            continue
        wanted = dict(p.split("=", 1) for p in parts if "=" in p)
        actions = [p for p in parts if "=" not in p]
        if all(str(context.get(k)) == v for k, v in wanted.items()):
            action = actions[0] if actions else "exit"
            if action == "exit":
                os._exit(FAULT_EXIT_CODE)
            if action == "raise":
                raise InjectedFault(f"injected fault at {point} {context}")
            return action
    return None
