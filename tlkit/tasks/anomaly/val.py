"""Evaluating an anomaly scorer on labelled clips: per-clip scores, AUROC and alert events, the summary that
goes into metrics.json and the checkpoint, and the report (`tlkit evaluate` on an anomaly checkpoint)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.data.clips import Clip, load_clips
from tlkit.metrics import frame_auroc
from tlkit.tasks.anomaly.post import DEFAULT_SMOOTH, find_events, smooth_scores, smoothing_of
from tlkit.tasks.anomaly.scorer import PatchCoreScorer


def split_clips(root: Path, split: str) -> list[Clip]:
    """The clips of `root/<split>` (any layout `find_split_dir` knows); else `root` itself: a folder of clips,
    or one clip, given directly."""
    from tlkit.data.datasets import find_split_dir, has_split

    if has_split(root, split):
        return load_clips(find_split_dir(root, split))
    return load_clips(root)


def _score_clip(
    scorer: PatchCoreScorer,
    clip: Clip,
    threshold: float | None,
    *,
    smooth_window: int,
    smooth_method: str,
    batch_size: int,
    min_length: int,
    merge_gap: int,
    raw: np.ndarray | None = None,
) -> dict[str, Any]:
    """One clip's entry of `evaluate_clips`: raw and smoothed scores, events, and AUROC if it has labels.
    `raw`: the clip's frame scores if already computed (scored here otherwise)."""
    if raw is None:
        raw = scorer.score(clip.frames, batch_size=batch_size)
    smooth = smooth_scores(raw, smooth_window, smooth_method)
    first = clip.frame_numbers[0] if clip.frames else 1
    events = (
        find_events(smooth, threshold, clip.fps, min_length, merge_gap, first_frame=first)
        if threshold is not None
        else []
    )
    entry: dict[str, Any] = {
        "frames": clip.frame_numbers,
        "scores": raw.tolist(),
        "smoothed": smooth.tolist(),
        "labels": None if clip.labels is None else clip.labels.astype(int).tolist(),
        "auroc": None,
        "events": events,
    }
    if clip.labels is not None:
        entry["auroc"] = frame_auroc(smooth, clip.labels)
        abnormal = np.flatnonzero(clip.labels)
        entry["onset_frame"] = int(clip.frame_numbers[abnormal[0]]) if abnormal.size else None
        entry["first_alert_frame"] = events[0]["start_frame"] if events else None
    return entry


def evaluate_clips(
    scorer: PatchCoreScorer,
    clips: Sequence[Clip],
    smooth_window: int = 5,
    threshold: float | None = None,
    smooth_method: str = DEFAULT_SMOOTH,
    batch_size: int = 16,
    min_length: int = 3,
    merge_gap: int = 5,
    scores: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Score labelled clips: per-clip scores/AUROC/events and overall frame AUROC, as JSON-able data.

    `threshold` defaults to `scorer.threshold`; with neither, no events are reported. AUROC is reported
    on smoothed scores (`frame_auroc`), on raw scores, and with per-clip min-max normalisation. `scores`: the
    clips' raw frame scores by clip name from an earlier call (its `["clips"][name]["scores"]`), so a new
    threshold is applied without running the backbone over the clips again.
    """
    threshold = scorer.threshold if threshold is None else float(threshold)
    per_clip: dict[str, Any] = {}
    all_raw, all_smooth, all_labels = [], [], []
    for clip in clips:
        entry = _score_clip(
            scorer,
            clip,
            threshold,
            smooth_window=smooth_window,
            smooth_method=smooth_method,
            batch_size=batch_size,
            min_length=min_length,
            merge_gap=merge_gap,
            raw=None if scores is None else np.asarray(scores[clip.name], dtype=np.float64),
        )
        if clip.labels is not None:
            all_raw.append(np.asarray(entry["scores"], dtype=np.float64))
            all_smooth.append(np.asarray(entry["smoothed"], dtype=np.float64))
            all_labels.append(clip.labels)
        per_clip[clip.name] = entry
    labelled = bool(all_labels)
    result: dict[str, Any] = {
        "clips": per_clip,
        "threshold": threshold,
        "smooth_window": smooth_window,
        "smooth_method": smooth_method,
        "frame_auroc": frame_auroc(all_smooth, all_labels) if labelled else None,
        "frame_auroc_raw": frame_auroc(all_raw, all_labels) if labelled else None,
        "frame_auroc_per_clip_norm": frame_auroc(all_smooth, all_labels, normalize_per_clip=True) if labelled else None,
    }
    if threshold is not None and labelled:
        result["alerts"] = _alert_rates(np.concatenate(all_smooth) >= threshold, np.concatenate(all_labels))
    return result


def _alert_rates(pred: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    y = labels.astype(bool)
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    return {
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "false_positive_rate": fp / int((~y).sum()) if (~y).any() else None,
    }


def summary(results: dict) -> dict:
    """The flat metrics of `evaluate_clips` results (metrics.json, the checkpoint's val_metrics)."""
    out = {k: results.get(k) for k in ("frame_auroc", "frame_auroc_raw", "frame_auroc_per_clip_norm", "threshold")}
    out.update({f"auroc_{name}": c["auroc"] for name, c in results["clips"].items()})
    for key, value in (results.get("alerts") or {}).items():
        out[f"alert_{key}"] = value
    return out


def write_anomaly_report(out: Path, results: dict, ckpt: dict, *, data: str, split: str) -> Path:
    """report.md + metrics.json, clips.json (every score) and one score-over-time plot per clip."""
    from tlkit.report import plot_scores_over_time, write_report

    out.mkdir(parents=True, exist_ok=True)
    for name, clip in results["clips"].items():
        plot_scores_over_time(
            np.asarray(clip["smoothed"]),
            None if clip["labels"] is None else np.asarray(clip["labels"]),
            results["threshold"],
            out / f"scores_{name}.png",
            title=f"{name}: anomaly score per frame (AUROC {clip['auroc'] or float('nan'):.3f})",
            events=[
                (e["start_frame"] - clip["frames"][0], e["end_frame"] - clip["frames"][0] + 1) for e in clip["events"]
            ],
        )
    (out / "clips.json").write_text(json.dumps(results, indent=1))
    weight = ckpt["anomaly"]["config"].get("motion_weight")
    motion = f" + motion stream, weight {weight:g}" if weight else ""
    context = {
        "recipe": ckpt["recipe"].get("name"),
        "task": f"anomaly (one-class, PatchCore memory bank{motion})",
        "arch": ckpt["arch"],
        "init": ckpt.get("init"),
        "strategy": "frozen backbone features + kNN",
        "data": data,
        "split": split,
        "img_size": ckpt["preprocessing"]["img_size"],
        "bank_size": int(ckpt["anomaly"]["bank"].shape[0]),
        "git_sha": ckpt.get("git_sha"),
    }
    return write_report(out, summary(results), context=context, title="tlkit surveillance report")


def evaluate_checkpoint(
    ckpt: dict,
    checkpoint: str | Path,
    data: str | Path,
    *,
    split: str = "val",
    out: Path,
    batch_size: int = 64,
    device: str = "auto",
    quiet: bool = False,
) -> dict:
    """`tlkit evaluate` on labelled clips laid out like ucsd_ped2's val/ (`<clip>/NNN.jpg` + labels.csv):
    metrics.json + report in `out`; returns the summary."""
    from tlkit.paths import resolve_data
    from tlkit.tasks.anomaly.scorer import load_scorer

    scorer = load_scorer(ckpt, device=device)
    cfg = ckpt["recipe"].get("anomaly") or {}
    clips = split_clips(resolve_data(data), split)
    window, method = smoothing_of(cfg)
    results = evaluate_clips(scorer, clips, smooth_window=window, smooth_method=method, batch_size=batch_size)
    write_anomaly_report(Path(out), results, ckpt, data=str(data), split=split)
    return summary(results)
