"""Classification: supervised training through the engine, calibrated evaluation, `Predictor` inference."""

from __future__ import annotations

from pathlib import Path

from tlkit.tasks import Task


def _train(recipe, *, kind: str = "pretrain", resume=None, quiet: bool = False) -> Path:
    from tlkit.tasks.classification.train import train

    return train(recipe, kind=kind, resume=resume, quiet=quiet)


def _evaluate(ckpt: dict, checkpoint: Path, data, **kwargs) -> dict:
    from tlkit.tasks.classification.val import evaluate_checkpoint

    return evaluate_checkpoint(ckpt, checkpoint, data, **kwargs)


def _load_predictor(checkpoint, device: str = "auto"):
    from tlkit.predict import Predictor

    return Predictor.from_checkpoint(checkpoint, device=device)


TASK = Task(
    name="classify",
    train=_train,
    evaluate=_evaluate,
    load_predictor=_load_predictor,
    supports=frozenset({"predict", "export", "lr-find", "explain"}),
)
