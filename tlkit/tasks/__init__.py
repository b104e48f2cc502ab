"""Task kinds, one package each, listed in one table.

A recipe names its task (`task: classify` or `task: anomaly`) and every checkpoint records it. Commands that
train, evaluate, predict, export or serve a model look the task up here and call its interface; nothing else in
tlkit asks "which task is this?". Adding a task is one package exposing `TASK` (a `Task`) and one row in `TASKS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# task name (as recipes and checkpoints spell it) -> the package that implements it; imported on first use,
# so `tlkit recipes` or a classification run never imports the anomaly code (and its optional OpenCV).
TASKS: dict[str, str] = {
    "classify": "tlkit.tasks.classification",
    "anomaly": "tlkit.tasks.anomaly",
}


@dataclass(frozen=True)
class Task:
    """The small interface every task package exposes as `TASK`."""

    name: str
    # train(recipe, *, kind, resume, quiet) -> run folder: fit, post-training pass (calibration, report), best.pt
    train: Callable[..., Path]
    # evaluate(ckpt, checkpoint_path, data, *, split, out, batch_size, device, quiet) -> metrics dict; writes the
    # report into `out` (chosen by `workflows.evaluate_checkpoint`: default eval-<split> beside the checkpoint)
    evaluate: Callable[..., dict]
    # load_predictor(checkpoint_path, device) -> the object the demos and `tlkit predict` run
    load_predictor: Callable[..., Any]
    # commands beyond train/evaluate/predict that apply: "export", "lr-find", "explain"
    supports: frozenset[str] = field(default_factory=frozenset)


def lazy(module: str, name: str) -> Callable[..., Any]:
    """`module.name`, imported on first call: a task's table row names its functions without importing its
    training or evaluation code (and their dependencies) until a command needs them."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{module}.{name}, imported on first call."
    return call


class TaskError(ValueError):
    """A task that does not exist, or a command that does not apply to a task; one line."""


def get_task(name: str | None) -> Task:
    name = name or "classify"
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name]).TASK


def task_of(ckpt_or_recipe: Any) -> Task:
    """The task of a checkpoint dict or a Recipe."""
    name = ckpt_or_recipe.get("task") if isinstance(ckpt_or_recipe, dict) else getattr(ckpt_or_recipe, "task", None)
    return get_task(name)


def require(task: Task, command: str, what: str = "checkpoint") -> None:
    if command not in task.supports:
        able = [name for name in TASKS if command in get_task(name).supports]
        raise TaskError(f"{command} works on {' / '.join(able)} {what}s; this one is a {task.name!r} {what}")
