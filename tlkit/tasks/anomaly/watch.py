"""`tlkit watch`: a headless monitor for a camera, a stream URL, a video file or a frame folder.

Frames are scored by the checkpoint's scorer, smoothed and thresholded with the same rule the demo and
`tlkit evaluate` report (`stream.alert_events`); each alert event becomes one JSON line (stdout or a file),
optionally POSTed to a webhook from a background thread, with its peak frame, heat map and a short clip
written under an evidence folder.

Live sources (a camera, a URL, or a file with `realtime`) are read by `tlkit.data.clips.LiveStream`, which
keeps only the newest frame: scoring slower than the stream skips frames (counted as dropped) instead of
falling behind. Files are otherwise scored frame by frame, as fast as the CPU allows.

An event is reported once it can no longer change: `settle` frames after its last frame (the smoothing
window plus the merge gap), or at the end of the input; so the events of a file are exactly those of
`alert_events` on all its scores.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np

from tlkit.data.clips import DEFAULT_FPS, LiveStream, is_stream_url, iter_frames, to_grey_rgb, webcam_index
from tlkit.tasks.anomaly.post import find_events
from tlkit.tasks.anomaly.stream import BATCH, Monitor, alert_events, heatmap_overlay, load_monitor, open_source

log = logging.getLogger("tlkit.watch")

HISTORY = 3000  # scores kept for the event rule on a live stream (5 min at 10 fps); longer events are cut
CLIP_SECONDS = 3.0  # evidence clip: this long before the event's first frame and after its last
MAX_CLIP_SECONDS = 60.0
CLIP_FRAMES = 100  # at most this many frames kept for the part of a clip before its event (memory on HD cameras)
STATUS_EVERY = 0.5  # seconds between status line updates
WEBHOOK_RETRIES = 5  # attempts per event; waits 1, 2, 4, 8 s between them
WEBHOOK_TIMEOUT = 5.0


@dataclass
class WatchOptions:
    """What `tlkit watch` does besides scoring; see the CLI for each option."""

    events: Path | None = None
    webhook: str | None = None
    out: Path | None = None
    realtime: bool = False
    max_seconds: float | None = None
    quiet: bool = False
    device: str = "auto"
    clip_seconds: float = CLIP_SECONDS


@dataclass
class Item:
    """One frame from a source: its number in the source, seconds from the start, arrival time, pixels."""

    index: int
    t: float
    wall: float
    rgb: np.ndarray


@dataclass
class Source:
    name: str
    live: bool
    fps: float
    items: Iterator[Item]
    stream: LiveStream | None = None

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def open_watch_source(spec: str, fps_default: float, *, realtime: bool = False, stop=None) -> Source:
    """A camera index, stream URL, video file or frame folder as a `Source`; ValueError with one line if it
    cannot be opened. Video files use the demo's `open_source`, streams `LiveStream` (also `--realtime`)."""
    path = Path(spec)
    is_path = path.exists()
    if is_path and path.is_dir():
        if realtime:
            raise ValueError("--realtime paces video files; a frame folder is always scored frame by frame")
        frames = iter_frames(path)
        return Source(path.name, False, fps_default, _numbered(frames, fps_default))
    if is_path and not realtime:
        frames, fps, _ = open_source(str(path), None)
        fps = fps or fps_default
        return Source(path.name, False, fps, _numbered(frames, fps))
    if not is_path and webcam_index(spec) is None and not is_stream_url(spec):
        raise ValueError(
            f"cannot open {spec}: no such file or folder (a camera is a number such as 0, a stream a URL such as "
            "rtsp://host/path)"
        )
    stream = LiveStream(path if is_path else spec, paced=is_path, reconnect=not is_path).start()
    fps = stream.fps or fps_default
    name = path.name if is_path else (f"camera {spec}" if webcam_index(spec) is not None else spec)
    return Source(name, True, fps, _live_items(stream, fps, paced=is_path, stop=stop), stream)


def _numbered(frames: Iterator[np.ndarray], fps: float) -> Iterator[Item]:
    for i, rgb in enumerate(frames):
        yield Item(i, i / fps, time.time(), rgb)


def _live_items(stream: LiveStream, fps: float, *, paced: bool, stop) -> Iterator[Item]:
    t0 = None
    for f in stream.frames(stop):
        t0 = f.wall if t0 is None else t0
        # A paced file keeps its own clock (frame k at k / fps); a live source's clock is the wall clock.
        yield Item(f.index, f.index / fps if paced else f.wall - t0, f.wall, f.rgb)


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, tz=timezone.utc).isoformat(timespec="milliseconds")


def _find_events_default(name: str, fallback: int) -> int:
    default = inspect.signature(find_events).parameters.get(name)
    return int(default.default) if default is not None and isinstance(default.default, int) else fallback


# ---- events -----------------------------------------------------------------------------------------------


class EventTracker:
    """Scores in, finished alert events out. The event rule runs on the trailing `history` scores every frame;
    an event is finished once `settle` more frames are in (nothing later can extend or merge it) or at
    `finish()`. The peak frame and its patch grid are kept while the smoothed score climbs, so the evidence
    needs no frame buffer for the whole event."""

    def __init__(self, monitor: Monitor, fps: float, name: str, *, live: bool, history: int = HISTORY) -> None:
        self.monitor, self.fps, self.name, self.live, self.history = monitor, fps, name, live, history
        self.merge_gap = _find_events_default("merge_gap", 5)
        self.lookahead = max(1, monitor.smooth_window)  # future frames a smoothed value may depend on
        self.settle = self.lookahead + self.merge_gap + 1
        self.scores: list[float] = []
        self.items: list[Item] = []  # without pixels: index, t, wall per score
        self.base = 0  # number of the first kept score
        self.n = 0  # scores so far
        self.emitted_end = -1
        self.count = 0
        self.recent: deque[tuple[int, np.ndarray, np.ndarray | None]] = deque(maxlen=self.lookahead + 2)
        self.candidates: dict[int, tuple[float, np.ndarray, np.ndarray | None]] = {}
        self.run_best, self.last_above, self.final_upto = -math.inf, -(10**9), -1
        self.provisional: list[int] = []  # first frame (score number) of each unfinished event
        self.last_smoothed: float | None = None

    def add(self, score: float, item: Item, grid: np.ndarray | None) -> list[tuple[dict, tuple]]:
        self.scores.append(float(score))
        self.items.append(Item(item.index, item.t, item.wall, np.empty(0, np.uint8)))
        self.recent.append((self.n, item.rgb, grid))
        self.n += 1
        done = self._update(final=False)
        self._trim()
        return done

    def finish(self) -> list[tuple[dict, tuple]]:
        """The events still open at the end of the input, with every score known."""
        return self._update(final=True) if self.n else []

    def _update(self, final: bool) -> list[tuple[dict, tuple]]:
        smoothed, events = alert_events(self.monitor, self.scores, self.fps)
        self.last_smoothed = float(smoothed[-1]) if smoothed.size else None
        upto = self.n - 1 if final else self.n - 1 - self.lookahead
        for i in range(self.final_upto + 1, upto + 1):
            self._consider(i, float(smoothed[i - self.base]))
        self.final_upto = max(self.final_upto, upto)
        done, self.provisional = [], []
        for e in events:
            start, end = self.base + e["start_frame"], self.base + e["end_frame"]
            if start <= self.emitted_end:
                continue
            if final or end + self.settle <= self.n - 1:
                done.append(self._event(e, start, end))
                self.emitted_end = end
            else:
                self.provisional.append(start)
        return done

    def _consider(self, i: int, value: float) -> None:
        """Keep frame `i` if its (final) smoothed score is the highest of its run of alert frames so far."""
        threshold = self.monitor.threshold
        if threshold is None or value < threshold:
            return
        if i - self.last_above - 1 > self.merge_gap:
            self.run_best = -math.inf  # a new run: find_events would not merge it with the previous one
        self.last_above = i
        if value > self.run_best:
            self.run_best = value
            kept = next(((rgb, grid) for n, rgb, grid in self.recent if n == i), None)
            if kept is not None:
                self.candidates[i] = (value, *kept)
        while len(self.candidates) > 64:  # a long climb: the lowest (oldest) candidates go first
            self.candidates.pop(min(self.candidates))

    def _event(self, e: dict, start: int, end: int) -> tuple[dict, tuple]:
        peak = self.base + e["peak_frame"]
        a, b, p = (self.items[k - self.base] for k in (start, end, peak))
        self.count += 1
        event = {
            "event": self.count,
            "source": self.name,
            "start_frame": a.index,
            "end_frame": b.index,
            "peak_frame": p.index,
            "start_s": round(a.t, 6),
            "end_s": round(b.t, 6),
            "peak_s": round(p.t, 6),
            "peak_score": e["peak_score"],
            "frames": end - start + 1,  # frames scored in the event (on a live stream, fewer than it spans)
            "threshold": self.monitor.threshold,
        }
        if self.live:
            event.update(start_time=_iso(a.wall), end_time=_iso(b.wall), peak_time=_iso(p.wall))
        found = [k for k in self.candidates if start <= k <= end]
        best = peak if peak in self.candidates else max(found, key=lambda k: self.candidates[k][0], default=None)
        rgb, grid = (None, None) if best is None else self.candidates[best][1:]
        for k in [k for k in self.candidates if k <= end]:
            del self.candidates[k]
        return event, (rgb, grid, end)

    def _trim(self) -> None:
        # Drop the oldest scores in chunks (not every frame): the event rule only needs the recent ones.
        if len(self.scores) > self.history + self.history // 4:
            cut = len(self.scores) - self.history
            del self.scores[:cut], self.items[:cut]
            self.base += cut


# ---- evidence: peak frame, heat map, clip -----------------------------------------------------------------


def _atomic_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    tmp = path.with_name(f".{path.stem}.partial.png")
    if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")
    os.replace(tmp, path)


@dataclass
class _Clip:
    tmp: Path
    writer: Any
    size: tuple[int, int]
    frames: int = 0
    idle: int = 0
    final: Path | None = None
    stop_at: int | None = None


class ClipRecorder:
    """Writes each event's clip while it happens: recording starts (with the last `before` frames) when an
    unfinished event appears, continues until `after` frames past the event's end (or `max_frames`), and the
    file is renamed into place only then, so a clip on disk is always complete. A recording whose event
    vanished (too short in the end) is deleted."""

    def __init__(
        self, out: Path, fps: Callable[[], float], before: int, after: int, max_frames: int, abandon: int
    ) -> None:
        self.out, self.fps, self.after, self.max_frames, self.abandon = out, fps, after, max_frames, abandon
        self.ring: deque[tuple[int, np.ndarray]] = deque(maxlen=before + abandon + 1)
        self.before = before
        self.pending: _Clip | None = None
        self.assigned: list[_Clip] = []

    def frame(self, n: int, rgb: np.ndarray, provisional: list[int]) -> None:
        self.ring.append((n, rgb))
        if self.pending is None and provisional:
            self.pending = self._open(min(provisional) - self.before)
        elif self.pending is not None:
            self._write(self.pending, rgb)
            self.pending.idle = 0 if provisional else self.pending.idle + 1
            if self.pending.idle > self.abandon:
                self._abort(self.pending)
                self.pending = None
        for clip in list(self.assigned):
            self._write(clip, rgb)
            if n >= clip.stop_at or clip.frames >= self.max_frames:
                self._finish(clip)

    def assign(self, number: int, end: int, n: int) -> Path:
        """The clip of finished event `number` (last frame `end`; `n` frames scored so far): its final path."""
        clip = self.pending or self._open(n - self.before)
        self.pending = None
        clip.final = self.out / f"event_{number:04d}.mp4"
        clip.stop_at = end + self.after
        self.assigned.append(clip)
        return clip.final

    def close(self) -> None:
        for clip in list(self.assigned):
            self._finish(clip)  # the input ended: the clip keeps what there is after the event
        if self.pending is not None:
            self._abort(self.pending)
            self.pending = None

    def _open(self, first: int) -> _Clip:
        import cv2

        frames = [rgb for k, rgb in self.ring if k >= first]
        h, w = frames[0].shape[:2]
        tmp = self.out / f".clip_{time.monotonic_ns()}.partial.mp4"
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), max(self.fps(), 1.0), (w, h))
        clip = _Clip(tmp, writer, (w, h))
        for rgb in frames:
            self._write(clip, rgb)
        return clip

    @staticmethod
    def _write(clip: _Clip, rgb: np.ndarray) -> None:
        import cv2

        if (rgb.shape[1], rgb.shape[0]) != clip.size:  # a reconnected camera may change resolution
            rgb = cv2.resize(rgb, clip.size)
        clip.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        clip.frames += 1

    def _finish(self, clip: _Clip) -> None:
        clip.writer.release()
        os.replace(clip.tmp, clip.final)
        self.assigned.remove(clip)

    @staticmethod
    def _abort(clip: _Clip) -> None:
        clip.writer.release()
        clip.tmp.unlink(missing_ok=True)


# ---- output: event lines, webhook, status line ------------------------------------------------------------


class Webhook:
    """POSTs event lines from a background thread, retrying with backoff; scoring never waits for it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.queue: queue.Queue[bytes | None] = queue.Queue()
        self.closing = threading.Event()
        self.delivered = self.failed = 0
        self.thread = threading.Thread(target=self._run, name="tlkit-webhook", daemon=True)
        self.thread.start()

    def post(self, line: str) -> None:
        self.queue.put(line.encode())

    def _run(self) -> None:
        while (body := self.queue.get()) is not None:
            for attempt in range(1, WEBHOOK_RETRIES + 1):
                error = self._send(body)
                if error is None:
                    self.delivered += 1
                    break
                if attempt == WEBHOOK_RETRIES:
                    self.failed += 1
                    log.warning(f"webhook: gave up on an event after {attempt} attempts ({error})")
                    break
                wait = 2.0 ** (attempt - 1)
                log.warning(f"webhook: POST to {self.url} failed ({error}); retry {attempt + 1} in {wait:g} s")
                self.closing.wait(wait)

    def _send(self, body: bytes) -> str | None:
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT) as response:
                return None if 200 <= response.status < 300 else f"HTTP {response.status}"
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            return str(getattr(e, "reason", e))

    def close(self, timeout: float = 15.0) -> None:
        """Deliver what is queued (retries shortened), waiting at most `timeout` seconds."""
        self.queue.put(None)
        self.closing.set()
        self.thread.join(timeout)


class Status:
    """The live status line on a terminal (stderr); nothing when stderr is not a terminal or `quiet`."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.last = 0.0
        self.shown = False

    def update(self, text: str) -> None:
        now = time.perf_counter()
        if self.enabled and now - self.last >= STATUS_EVERY:
            self.last = now
            sys.stderr.write("\r\x1b[K" + text)
            sys.stderr.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.last = 0.0  # redraw on the next frame

    close = clear


@dataclass
class Stats:
    """Frames, rate and lag of one watch run, for the status line and the summary."""

    started: float = field(default_factory=time.perf_counter)
    frames: int = 0
    events: int = 0
    lags: deque = field(default_factory=lambda: deque(maxlen=2000))
    recent: deque = field(default_factory=lambda: deque(maxlen=20))

    def scored(self, lag: float | None) -> None:
        self.frames += 1
        self.recent.append(time.perf_counter())
        if lag is not None:
            self.lags.append(lag)

    def rate(self) -> float:
        if len(self.recent) < 2:
            return 0.0
        return (len(self.recent) - 1) / max(self.recent[-1] - self.recent[0], 1e-9)


# ---- the run ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stop_on_sigterm(stop: threading.Event) -> Iterator[None]:
    """SIGTERM (systemd, docker stop) ends the run like Ctrl-C: the loop sees `stop` and finishes cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Watch:
    """One `tlkit watch` run: a monitor, a source, and where events go."""

    def __init__(self, monitor: Monitor, source: Source, options: WatchOptions, stop: threading.Event) -> None:
        self.monitor, self.source, self.options, self.stop = monitor, source, options, stop
        self.tracker = EventTracker(monitor, source.fps, source.name, live=source.live)
        self.stats = Stats()
        self.reason = "end of input"
        self.out: IO[str] = sys.stdout
        if options.events is not None:
            options.events.parent.mkdir(parents=True, exist_ok=True)
            self.out = open(options.events, "a", encoding="utf-8")  # noqa: SIM115 (closed in run)
        self.webhook = Webhook(options.webhook) if options.webhook else None
        self.clips = None
        if options.out is not None:
            options.out.mkdir(parents=True, exist_ok=True)
            # clips hold the scored frames: on a live source that skips frames, at the rate they were scored
            fps = source.fps
            rate = (lambda: self.stats.rate() or fps) if source.live else (lambda: fps)
            seconds = min(round(options.clip_seconds * fps), CLIP_FRAMES)
            self.clips = ClipRecorder(
                options.out, rate, seconds, seconds, round(MAX_CLIP_SECONDS * fps), self.tracker.settle
            )
        self.status = Status(not options.quiet and sys.stderr.isatty())

    def frames(self) -> Iterator[Item]:
        deadline = None if self.options.max_seconds is None else time.perf_counter() + self.options.max_seconds
        for item in self.source.items:
            if self.stop.is_set():
                self.reason = "stopped"
                return
            if deadline is not None and time.perf_counter() >= deadline:
                self.reason = f"--max-seconds {self.options.max_seconds:g}"
                return
            yield item
        if self.stop.is_set():  # a live source stops handing out frames as soon as it is set
            self.reason = "stopped"

    def run(self) -> dict:
        pending: deque[Item] = deque()

        def tap() -> Iterator[np.ndarray]:
            for item in self.frames():
                pending.append(item)
                # the scorer sees grey frames when the weights were trained on grey (as in analyze_stream)
                yield to_grey_rgb(item.rgb) if self.monitor.grayscale else item.rgb

        # A file is scored in the demo's batches (same scores as analyze_stream); a live frame alone, at once.
        batch = 1 if self.source.live else BATCH
        try:
            for score, grid in self.monitor.scorer.iter_scores(tap(), batch_size=batch, grids=True):
                self._scored(pending.popleft(), score, grid)
        except KeyboardInterrupt:
            self.reason = "interrupted"
        finally:
            self.source.close()
        for event, evidence in self.tracker.finish():
            self._emit(event, evidence)
        return self._close()

    def _scored(self, item: Item, score: float, grid: np.ndarray) -> None:
        lag = time.time() - item.wall if self.source.live else None
        self.stats.scored(lag)
        n = self.tracker.n
        done = self.tracker.add(score, item, grid)
        if self.clips is not None:
            self.clips.frame(n, item.rgb, self.tracker.provisional)
        for event, evidence in done:
            self._emit(event, evidence)
        smoothed = self.tracker.last_smoothed
        dropped = self.source.stream.dropped if self.source.stream is not None else 0
        self.status.update(
            f"{self.source.name}: {self.stats.frames} frames, {self.stats.rate():.1f} frames/s"
            + (f", lag {lag:.2f} s, dropped {dropped}" if lag is not None else "")
            + f", score {score:.2f} (smoothed {smoothed:.2f}), events {self.stats.events}"
        )

    def _emit(self, event: dict, evidence: tuple) -> None:
        self.stats.events += 1
        if self.clips is not None:
            number = event["event"]
            rgb, grid, end = evidence
            if rgb is not None:
                peak, heat = self.options.out / f"event_{number:04d}_peak.png", None
                _atomic_png(peak, rgb)
                event["peak_image"] = str(peak)
                if grid is not None:
                    heat = self.options.out / f"event_{number:04d}_heatmap.png"
                    shown = to_grey_rgb(rgb) if self.monitor.grayscale else rgb
                    _atomic_png(heat, heatmap_overlay(self.monitor, shown, grid))
                    event["heatmap_image"] = str(heat)
            event["clip"] = str(self.clips.assign(number, end, self.tracker.n))
        line = json.dumps(event)
        if self.out is sys.stdout:
            self.status.clear()  # the event line starts on a line of its own, not after the status text
        self.out.write(line + "\n")
        self.out.flush()
        if self.webhook is not None:
            self.webhook.post(line)

    def _close(self) -> dict:
        self.status.close()
        if self.clips is not None:
            self.clips.close()
        if self.out is not sys.stdout:
            self.out.close()
        if self.webhook is not None:
            self.webhook.close()
        return self.summary()

    def summary(self) -> dict:
        elapsed = time.perf_counter() - self.stats.started
        stream = self.source.stream
        lags = np.asarray(self.stats.lags, dtype=np.float64)
        out = {
            "source": self.source.name,
            "frames": self.stats.frames,
            "seconds": round(elapsed, 3),
            "fps": round(self.stats.frames / max(elapsed, 1e-9), 3),
            "received": stream.received if stream is not None else self.stats.frames,
            "dropped": stream.dropped if stream is not None else 0,
            "reconnects": stream.reconnects if stream is not None else 0,
            "events": self.stats.events,
            "stopped": self.reason,
        }
        if lags.size:
            out.update(
                lag_mean_s=round(float(lags.mean()), 4),
                lag_p95_s=round(float(np.percentile(lags, 95)), 4),
                lag_max_s=round(float(lags.max()), 4),
            )
        if self.webhook is not None:
            out.update(webhook_delivered=self.webhook.delivered, webhook_failed=self.webhook.failed)
        return out


def watch_source(checkpoint: str | Path, source: str, options: WatchOptions | None = None) -> dict:
    """Watch `source` with an anomaly checkpoint until it ends, `max_seconds` pass, Ctrl-C or SIGTERM; events
    go out as they finish. Returns the summary (also logged as one line). A checkpoint of another task is a
    `CheckpointError`, a source that cannot be opened a one-line ValueError."""
    options = options or WatchOptions()
    monitor = load_monitor(checkpoint, device=options.device)
    stop = threading.Event()
    src = open_watch_source(str(source), monitor.fps or DEFAULT_FPS, realtime=options.realtime, stop=stop)
    how = "live, newest frame each time" if src.live else "every frame"
    log.info(f"watch: {src.name} at {src.fps:g} fps ({how}); threshold {monitor.threshold}")
    with _stop_on_sigterm(stop):
        summary = Watch(monitor, src, options, stop).run()
    lag = f", lag {summary['lag_mean_s']:.2f} s mean" if "lag_mean_s" in summary else ""
    log.info(
        f"watch: {summary['frames']} frames in {summary['seconds']:.1f} s ({summary['fps']:.1f} frames/s{lag}), "
        f"{summary['dropped']} dropped, {summary['reconnects']} reconnects, {summary['events']} events "
        f"({summary['stopped']})"
    )
    log.info("summary: " + json.dumps(summary))
    return summary
