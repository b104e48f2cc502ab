"""Live scoring: a fitted scorer with the settings its threshold was chosen with (`Monitor`), streaming a video
or frame uploads through it with periodic snapshots (`analyze_stream`), one webcam frame at a time
(`score_live_frame`), or a whole video at once (`score_video`). What the surveillance demo runs, without Gradio;
`tlkit watch` (`tlkit.tasks.anomaly.watch`) uses the same event rule (`alert_events`) and heat map overlay.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlkit.data.clips import (
    DEFAULT_FPS,
    LiveStream,
    iter_frames,
    load_frame,
    read_video_frames,
    to_grey_rgb,
    video_frame_count,
)
from tlkit.tasks.anomaly.post import DEFAULT_SMOOTH, find_events, smooth_scores, smoothing_of
from tlkit.tasks.anomaly.scorer import PatchCoreScorer, load_scorer

BATCH = 8  # frames scored together while streaming: small, so the first update comes quickly
UPDATE_SECONDS = 1.0  # at most one snapshot per second
LIVE_HISTORY = 300  # scores kept for a webcam stream


@dataclass
class Monitor:
    """A fitted scorer and the settings its threshold was chosen with."""

    scorer: PatchCoreScorer
    threshold: float | None
    smooth_window: int
    fps: float
    grayscale: bool
    meta: dict
    smooth_method: str = DEFAULT_SMOOTH  # with smooth_window: the rule the threshold was chosen with (post.py)


def load_monitor(path: str | Path, device: str = "auto") -> Monitor:
    """The monitor of an anomaly checkpoint; a one-line `CheckpointError` for any other checkpoint."""
    from tlkit.checkpoint import CheckpointError, load_tlkit_checkpoint, strip

    ckpt = load_tlkit_checkpoint(path)
    if ckpt.get("task") != "anomaly":
        raise CheckpointError(
            f"{Path(path).name} is a {ckpt.get('task', 'classify')} checkpoint; the surveillance demo needs an "
            "anomaly checkpoint (`tlkit finetune --recipe surveillance`)"
        )
    scorer = load_scorer(ckpt, device=device)
    cfg = ckpt.get("recipe", {}).get("anomaly") or {}
    threshold = ckpt.get("threshold", scorer.threshold)
    return Monitor(
        scorer=scorer,
        threshold=None if threshold is None else float(threshold),
        smooth_window=smoothing_of(cfg)[0],
        smooth_method=smoothing_of(cfg)[1],
        fps=float(cfg.get("fps", DEFAULT_FPS)),
        grayscale=bool(ckpt.get("preprocessing", {}).get("grayscale", False)),
        meta=strip(ckpt),
    )


def analyze_stream(
    monitor: Monitor,
    frames: Iterable[np.ndarray],
    fps: float,
    *,
    update_seconds: float = UPDATE_SECONDS,
    max_frames: int | None = None,
    batch_size: int = BATCH,
) -> Iterator[dict]:
    """Score frames as they arrive; after the first batch, then at most every `update_seconds` (and at the end)
    yield a snapshot:
    `{"n", "fps", "window", "scores", "smoothed", "events", "peak": {"index", "t", "score", "frame", "grid"},
    "speed", "done", "truncated"}`. Events use the checkpoint's smoothing window and threshold; times are
    seconds from the first frame. Snapshots are built only when due: smoothing and events cover every score
    so far. Frames beyond `max_frames` are not read (`truncated` says so)."""
    pending: deque[np.ndarray] = deque()
    truncated = False

    def tap() -> Iterator[np.ndarray]:
        nonlocal truncated
        for i, frame in enumerate(frames):
            if max_frames is not None and i >= max_frames:
                truncated = True
                return
            frame = to_grey_rgb(frame) if monitor.grayscale and frame.ndim == 3 else frame
            pending.append(frame)
            yield frame

    scores: list[float] = []
    peak: dict | None = None
    t0 = time.perf_counter()
    last_snapshot = -float("inf")

    def snapshot(done: bool) -> dict:
        smoothed, events = alert_events(monitor, scores, fps)
        return {
            "n": len(scores),
            "fps": fps,
            "window": monitor.smooth_window,
            "scores": np.asarray(scores),
            "smoothed": smoothed,
            "events": events,
            "peak": peak,
            "speed": len(scores) / max(time.perf_counter() - t0, 1e-9),
            "done": done,
            "truncated": truncated,
        }

    for score, grid in monitor.scorer.iter_scores(tap(), batch_size=batch_size, grids=True):
        frame = pending.popleft()
        scores.append(float(score))
        if peak is None or score > peak["score"]:
            # The patch grid is kept so the heat map needs no second pass over the frame.
            t = (len(scores) - 1) / fps
            peak = {"index": len(scores) - 1, "t": t, "score": float(score), "frame": frame, "grid": grid}
        if len(scores) % batch_size == 0 and time.perf_counter() - last_snapshot >= update_seconds:
            last_snapshot = time.perf_counter()
            yield snapshot(False)
    if not scores:
        raise ValueError("no frames could be read")
    yield snapshot(True)


def alert_events(monitor: Monitor, scores: Iterable[float], fps: float) -> tuple[np.ndarray, list[dict]]:
    """(smoothed scores, alert events) of a stream's frame scores with the checkpoint's smoothing and threshold:
    the one rule the demo's snapshots and `tlkit watch` both report. Frame numbers start at 0, times at 0 s."""
    scores = np.asarray(list(scores) if not isinstance(scores, np.ndarray) else scores, dtype=np.float64)
    if not scores.size:
        return np.zeros(0), []
    smoothed = smooth_scores(scores, monitor.smooth_window, monitor.smooth_method)
    if monitor.threshold is None:
        return smoothed, []
    return smoothed, find_events(smoothed, monitor.threshold, fps=fps, first_frame=0)


def heatmap_overlay(monitor: Monitor, frame: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """RGB overlay of the heat map on the frame (red = far from every normal patch, or unusual motion), made
    from the frame's patch `grid` (`iter_scores(grids=True)`), so the frame is not scored a second time."""
    import cv2

    m = monitor.scorer.upsample_map(grid, frame.shape[:2])
    lo = min(float(np.percentile(m, 5)), 0.0)
    hi = max(float(m.max()), (monitor.threshold or 0.0) + 1e-6, lo + 1e-6)
    norm = np.clip((m - lo) / (hi - lo), 0, 1)
    heat = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * norm), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return (0.55 * frame.astype(np.float32) + 0.45 * heat.astype(np.float32)).clip(0, 255).astype(np.uint8)


def score_live_frame(
    monitor: Monitor, frame: np.ndarray, history: tuple[list[float], np.ndarray | None] | None
) -> tuple[list[float], np.ndarray, bool, tuple[list[float], np.ndarray]]:
    """One webcam frame: (scores so far, their causal smoothing, alert now?, the history to pass next time).

    The previous frame is scored with it, so the motion stream measures real motion between two frames."""
    scores, previous = history or ([], None)
    frame = to_grey_rgb(frame) if monitor.grayscale else frame
    pair = [previous, frame] if previous is not None and previous.shape == frame.shape else [frame]
    scores = (list(scores) + [float(monitor.scorer.score(pair)[-1])])[-LIVE_HISTORY:]
    smoothed = smooth_scores(scores, monitor.smooth_window, monitor.smooth_method, causal=True)
    alarm = monitor.threshold is not None and bool(smoothed[-1] >= monitor.threshold)
    return scores, smoothed, alarm, (scores, frame)


def open_source(
    video: str | None, files: list | None, url: str | None = None
) -> tuple[Iterator[np.ndarray], float | None, int | None]:
    """(frame iterator, fps or None if unknown, frame count if known) for an uploaded video, frame files (taken
    in natural name order) or a camera / stream URL (read live: the newest frame each time, `LiveStream`);
    ValueError with a message for the user when nothing usable was given."""
    from tlkit.data.io import describe_error

    if url and url.strip():
        stream = LiveStream(url.strip()).start()  # ValueError with one line if it cannot be opened

        def live() -> Iterator[np.ndarray]:
            try:
                yield from (f.rgb for f in stream.frames())
            finally:
                stream.close()  # also when the consumer stops early (the demo's frame limit)

        return live(), stream.fps, None
    if video:
        name = Path(video).name
        try:
            _, fps = read_video_frames(video, max_frames=1)  # checks it decodes, and reads its fps
        except (ValueError, OSError) as e:
            raise ValueError(describe_error(e, video).replace(f"video {name}", f"this video ({name})")) from None
        return iter_frames(video), fps, video_frame_count(video)
    paths = sorted((str(getattr(f, "name", f)) for f in files or []), key=_natural_key)
    if not paths:
        raise ValueError("no input: upload a video (or a set of frame images) first, or pick the example")

    def frames() -> Iterator[np.ndarray]:
        for p in paths:
            try:
                yield load_frame(p)
            except Exception as e:  # PIL raises several types for non-images and broken files
                raise ValueError(f"{Path(p).name}: not a readable image ({describe_error(e, p)})") from None

    return frames(), None, len(paths)


def _natural_key(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", Path(path).name))


@torch.inference_mode()
def score_video(
    scorer: PatchCoreScorer,
    source: Any,
    *,
    smooth_window: int = 5,
    fps: float = DEFAULT_FPS,
    smooth_method: str = DEFAULT_SMOOTH,
) -> dict:
    """Score a video file or frame folder end to end: per-frame scores, smoothed scores and alert events."""
    raw = scorer.score(source)
    smooth = smooth_scores(raw, smooth_window, smooth_method)
    events = find_events(smooth, scorer.threshold, fps=fps) if scorer.threshold is not None else []
    return {"scores": raw.tolist(), "smoothed": smooth.tolist(), "events": events, "threshold": scorer.threshold}
