"""From per-frame scores to alerts: temporal smoothing, the alert threshold, alert events.

The generic pieces (threshold rules, runs above a threshold, frame AUROC) live in `tlkit.metrics`; this
module adds what an alert needs on top: smoothing, frame numbers, timestamps and peaks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tlkit.config import SMOOTH_METHODS
from tlkit.data.clips import DEFAULT_FPS
from tlkit.metrics import choose_threshold, score_events

DEFAULT_SMOOTH = "mean"  # keeps a short real event (a mean over its frames); a median deletes one under half a window


def smooth_scores(
    scores: Sequence[float] | np.ndarray, window: int = 5, method: str = DEFAULT_SMOOTH, causal: bool = False
) -> np.ndarray:
    """Temporal smoothing, same length as the input: the one rule `evaluate`, the demo and the stream monitor
    apply before the alert threshold (which is chosen on val with the same rule).

    `mean` (default) averages the window: flicker is damped, yet an event of a few frames keeps its energy, so a
    cyclist crossing in 3 frames still alerts. `max` holds each score for a window (no event is ever lost,
    single-frame noise is held too); `median` removes anything shorter than half the window, real or not, and
    is kept for comparison. `causal=True` uses only past frames (live alerts); otherwise the window is centred.
    `gaussian` uses sigma = window / 4 over the same support. Edges are padded with the edge value.
    """
    x = np.asarray(scores, dtype=np.float64).ravel()
    if method not in SMOOTH_METHODS:
        raise ValueError(f"unknown smoothing method {method!r}: use {', '.join(SMOOTH_METHODS)}")
    if window <= 1 or x.size == 0:
        return x.copy()
    before, after = (window - 1, 0) if causal else ((window - 1) // 2, window // 2)
    padded = np.pad(x, (before, after), mode="edge")  # edge padding keeps the ends unbiased
    views = np.lib.stride_tricks.sliding_window_view(padded, window)
    if method == "median":
        return np.median(views, axis=1)
    if method == "mean":
        return views.mean(axis=1)
    if method == "max":
        return views.max(axis=1)
    t = np.arange(window) - (window - 1 if causal else (window - 1) / 2)
    g = np.exp(-0.5 * (t / (window / 4.0)) ** 2)
    return views @ (g / g.sum())


def smoothing_of(anomaly: dict) -> tuple[int, str]:
    """(window, method) of a checkpoint's `recipe.anomaly` block: what its alert threshold was chosen with.
    Checkpoints from before `smooth_method` existed were calibrated on a 9-frame median."""
    return int(anomaly.get("smooth_window", 9)), str(anomaly.get("smooth_method", "median"))


def choose_alert_threshold(
    scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, method: str = "youden"
) -> float:
    """Threshold (alert when score >= threshold) chosen on labelled validation frames.

    `youden` maximises TPR - FPR (balanced; good when normal frames are scarce), `f1` maximises the F1
    of the abnormal class (the rules of `tlkit.metrics.choose_threshold`). Unlike that function, which
    falls back to 0.5, a split without both normal and abnormal frames is an error here.
    """
    if method not in ("youden", "f1"):
        raise ValueError(f"unknown threshold method {method!r}: use youden or f1")
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(int)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if len(np.unique(y)) < 2:
        raise ValueError("choose_alert_threshold needs both normal (0) and abnormal (1) frames")
    return choose_threshold(s, y, method=method)


def find_events(
    scores: Sequence[float] | np.ndarray,
    threshold: float,
    fps: float = DEFAULT_FPS,
    min_length: int = 3,
    merge_gap: int = 5,
    first_frame: int = 1,
) -> list[dict[str, Any]]:
    """Alert events: runs of frames with score >= threshold (`tlkit.metrics.score_events`).

    Runs separated by at most `merge_gap` frames below threshold are merged first (one cyclist should
    be one alert), then events shorter than `min_length` frames are dropped (single-frame flicker).
    Frame numbers start at `first_frame` (1 = UCSD numbering); `start_s` / `end_s` are the timestamps of
    the first / last frame from the start of the sequence; `end_frame` is inclusive.
    """
    x = np.asarray(scores, dtype=np.float64).ravel()
    events = []
    for start, stop in score_events(x, threshold, min_length=min_length, merge_gap=merge_gap):
        end = stop - 1
        peak = start + int(np.argmax(x[start:stop]))
        events.append(
            {
                "start_frame": start + first_frame,
                "end_frame": end + first_frame,
                "start_s": round(start / fps, 6),
                "end_s": round(end / fps, 6),
                "peak_frame": peak + first_frame,
                "peak_score": float(x[peak]),
            }
        )
    return events
