"""The anomaly task: one-class detection of abnormal frames in video (the surveillance recipe).

A PatchCore memory bank of normal patch features (plus a motion stream) scores each frame; scores are smoothed
over time, an alert threshold chosen on labelled val clips turns them into alert events.

- `scorer`: `PatchCoreScorer` (features, bank, kNN scores, heat maps), `load_scorer` from a checkpoint;
- `bank`: reservoir sampling and the greedy k-center coreset that build the bank;
- `post`: smoothing, the alert threshold, alert events;
- `train`: `tlkit finetune` for an anomaly recipe (fit, threshold on val, checkpoint, report);
- `val`: scoring labelled clips, the summary metrics and the report (`tlkit evaluate`);
- `stream`: live scoring for the demo (`Monitor`, `analyze_stream`, `open_source`, `score_live_frame`) and the
  event rule it shares with `tlkit watch` (`alert_events`);
- `watch`: `tlkit watch`, the headless camera / stream monitor (imported on use).

Frames, clips and videos are read by `tlkit.data.clips`; generic metrics are in `tlkit.metrics`.
"""

from __future__ import annotations

from tlkit.tasks import Task, lazy
from tlkit.tasks.anomaly.bank import greedy_coreset
from tlkit.tasks.anomaly.post import choose_alert_threshold, find_events, smooth_scores
from tlkit.tasks.anomaly.scorer import PatchCoreScorer, default_feature_layers, load_scorer
from tlkit.tasks.anomaly.stream import (
    Monitor,
    alert_events,
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
    "alert_events",
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


def load_predictor(checkpoint, device: str = "auto") -> PatchCoreScorer:
    """The fitted scorer of an anomaly checkpoint (path, run folder or loaded dict): what the demo runs."""
    return load_scorer(checkpoint, device=device)


# train/evaluate import on first call, so using the scorer (the demo) does not import the training code
TASK = Task(
    name="anomaly",
    train=lazy("tlkit.tasks.anomaly.train", "train"),
    evaluate=lazy("tlkit.tasks.anomaly.val", "evaluate_checkpoint"),
    load_predictor=load_predictor,
    supports=frozenset(),
)
