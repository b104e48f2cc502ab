"""What the commands do, whatever the task: pick the recipe and the init, then hand the run to the
recipe's task (tlkit/tasks/); evaluate a checkpoint through the task it records."""

from __future__ import annotations

from pathlib import Path

import torch

from tlkit.checkpoint import disk_full_names, load_tlkit_checkpoint, newest_run, resolve_checkpoint
from tlkit.config import Recipe, load_recipe, replace
from tlkit.paths import runs_dir
from tlkit.progress import console
from tlkit.tasks import task_of


class InitError(ValueError):
    """No pretrained weights to start from; the message says how to make or pass some."""


def resolve_init(recipe: Recipe) -> Recipe:
    if recipe.model.init != "auto":
        return recipe
    newest = newest_run(kind="pretrain")
    if newest is None:
        raise InitError(
            f"no pretrained checkpoint in {runs_dir()}/: run `tlkit pretrain` first, or pass "
            "--init scratch, --init timm:<model>.<tag> / hf-hub:<org>/<repo> / torchvision:<Weights> (published "
            "weights), or --init <weights file> (tlkit checkpoint, timm/torchvision .pth/.safetensors)"
        )
    console.print(f"init: {newest} (newest pretrain run)")
    return replace(recipe, model={"init": str(newest)})


def resume_recipe(resume: str | Path, overrides: dict) -> Recipe:
    """A resumed run continues the recipe it was started with; only options the user passes now
    (e.g. a larger --epochs) change it, never recipe defaults."""
    from tlkit.config import deep_merge, recipe_from_dict
    from tlkit.run import resolve_resume

    _, ckpt = resolve_resume(resume)
    return recipe_from_dict(deep_merge(ckpt["recipe"], overrides))


def run_training(
    recipe_name: str | None, overrides: dict, *, kind: str, resume: str | None = None, quiet: bool = False
) -> Path:
    """Load the recipe (or the resumed run's own), pick the init, and let the recipe's task train it
    (fit, calibrate, report). Returns the run folder."""
    if resume:
        recipe = resume_recipe(resume, overrides)
    else:
        recipe = resolve_init(load_recipe(recipe_name, overrides, cuda=torch.cuda.is_available()))
    from tlkit.trackers import check_loggers, finish_trackers

    check_loggers(recipe)  # a listed tracker that is not installed: one line, before any folder is made
    try:
        run_dir = task_of(recipe).train(recipe, kind=kind, resume=resume, quiet=quiet)
    except BaseException:
        finish_trackers(None, recipe, ok=False)
        raise
    finish_trackers(run_dir, recipe)  # the report exists now: MLflow / W&B get it, then their runs end
    return run_dir


def evaluate_checkpoint(
    checkpoint: str | Path, data: str | Path, *, split: str = "val", out: str | Path | None = None, **options
) -> dict:
    """`tlkit evaluate`: the checkpoint's task writes metrics.json + report for a labelled split of `data` into
    `out` (default: `eval-<split>` beside the checkpoint); options: batch_size, device, quiet."""
    path = resolve_checkpoint(checkpoint)
    ckpt = load_tlkit_checkpoint(path)
    out = Path(out) if out else path.parent / f"eval-{split}"
    with disk_full_names(out):  # the report folder: a full disk is one line naming it
        metrics = task_of(ckpt).evaluate(ckpt, path, data, split=split, out=out, **options)
    console.print(f"report: {out / 'report.md'}")
    return metrics
