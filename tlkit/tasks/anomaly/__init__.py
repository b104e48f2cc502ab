"""The anomaly task: one-class detection of abnormal frames in video (the surveillance recipe).

A PatchCore memory bank of normal patch features (plus a motion stream) scores each frame; scores are smoothed
over time, an alert threshold chosen on labelled val clips turns them into alert events.

- `scorer`: `PatchCoreScorer` (features, bank, kNN scores, heat maps), `load_scorer` from a checkpoint;
- `bank`: reservoir sampling and the greedy k-center coreset that build the bank;
- `post`: smoothing, the alert threshold, alert events;
- `train`: `tlkit finetune` for an anomaly recipe (fit, threshold on val, checkpoint, report);
- `val`: scoring labelled clips, the summary metrics and the report (`tlkit evaluate`);
- `stream`: live scoring for the demo (`Monitor`, `analyze_stream`, `open_source`, `score_live_frame`).

Frames, clips and videos are read by `tlkit.data.clips`; generic metrics are in `tlkit.metrics`.
"""

from __future__ import annotations

from pathlib import Path

from tlkit.tasks import Task
from tlkit.tasks.anomaly.bank import greedy_coreset
from tlkit.tasks.anomaly.post import choose_alert_threshold, find_events, smooth_scores
from tlkit.tasks.anomaly.scorer import PatchCoreScorer, default_feature_layers, load_scorer
from tlkit.tasks.anomaly.stream import (
    Monitor,
    analyze_stream,
    load_monitor,
    open_source,
    score_live_frame,
    score_video,
)
from tlkit.tasks.anomaly.val import evaluate_clips

__all__ = [
    "TASK",
    "Monitor",
    "PatchCoreScorer",
    "analyze_stream",
    "choose_alert_threshold",
    "default_feature_layers",
    "evaluate_clips",
    "find_events",
    "greedy_coreset",
    "load_monitor",
    "load_predictor",
    "load_scorer",
    "open_source",
    "score_live_frame",
    "score_video",
    "smooth_scores",
]


# `_train` / `_evaluate`, not `train` / `evaluate`: importing the submodule `train` would replace a package
# attribute of that name. Both import lazily, so using the scorer does not import the training code.
def _train(recipe, *, kind: str = "finetune", resume=None, quiet: bool = False) -> Path:
    from tlkit.tasks.anomaly.train import train

    return train(recipe, kind=kind, resume=resume, quiet=quiet)


def _evaluate(
    ckpt: dict,
    checkpoint: Path,
    data,
    *,
    split: str = "val",
    out: Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    quiet: bool = False,
) -> dict:
    from tlkit.tasks.anomaly.val import evaluate_checkpoint

    return evaluate_checkpoint(
        ckpt, checkpoint, data, split=split, out=out, batch_size=batch_size, device=device, quiet=quiet
    )


def load_predictor(checkpoint, device: str = "auto") -> PatchCoreScorer:
    """The fitted scorer of an anomaly checkpoint (path, run folder or loaded dict): what the demo runs."""
    return load_scorer(checkpoint, device=device)


TASK = Task(name="anomaly", train=_train, evaluate=_evaluate, load_predictor=load_predictor, supports=frozenset())
