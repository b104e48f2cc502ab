"""Video as frames: clip folders (numbered frame images + `labels.csv`), video files, live frame streams.

Everything comes out as RGB uint8 arrays (H, W, 3). Used by the data layer (the supervised clips layout,
`datasets._clip_pairs`) and by the anomaly task (fitting, evaluation, the live demo). OpenCV is imported
only when a video file is opened: GPU training images may not ship it, and nothing else here needs it.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tlkit.data.io import IMAGE_EXTENSIONS, is_image_file, upright

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
DEFAULT_FPS = 10.0  # UCSD Ped2's nominal rate; used when a container does not report one
LUMA = (0.299, 0.587, 0.114)  # grey = weighted RGB, as PIL's "L" and the classification preprocessing

# What the scorer accepts as "frames": a video file / frame folder, or an iterable of arrays / image paths.
FrameSource = str | Path | Iterable[np.ndarray | str | Path | Image.Image]


@dataclass
class Clip:
    """One video clip stored as numbered frame images; `labels[i]` (1 = abnormal) belongs to `frames[i]`."""

    name: str
    frames: list[Path]
    labels: np.ndarray | None = None
    fps: float = DEFAULT_FPS

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def frame_numbers(self) -> list[int]:
        """Frame numbers parsed from the file names (1-based in UCSD Ped2)."""
        return [frame_number(p) for p in self.frames]


def frame_number(path: Path) -> int:
    """The last run of digits in the file name's stem: "Test001/061.jpg" -> 61, "frame_0061.png" -> 61."""
    digits = re.findall(r"\d+", path.stem)
    if not digits:
        raise ValueError(f"frame file name has no number: {path}")
    return int(digits[-1])


def _sort_key(path: Path) -> tuple[int, str]:
    digits = re.findall(r"\d+", path.stem)
    return (int(digits[-1]) if digits else -1, path.name)


def list_frames(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by frame number (numerically, so 9 < 10)."""
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and is_image_file(p)), key=_sort_key)


def read_labels(csv_path: Path, frames: list[Path]) -> np.ndarray:
    """Per-frame 0/1 labels from a `frame,label` CSV, in the order of `frames`. The file is keyed by frame
    number, not by row order, so a clip with gaps still lines up; a frame without a label is an error."""
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"frame", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path} must have the columns frame,label")
        by_frame = {int(row["frame"]): int(row["label"]) for row in reader}
    missing = [frame_number(p) for p in frames if frame_number(p) not in by_frame]
    if missing:
        more = "..." if len(missing) > 5 else ""
        raise ValueError(f"{csv_path} has no label for frame(s) {missing[:5]}{more}")
    return np.array([by_frame[frame_number(p)] for p in frames], dtype=np.int64)


def _clip_from_folder(folder: Path, fps: float) -> Clip | None:
    frames = list_frames(folder)
    if not frames:
        return None
    labels_csv = folder / "labels.csv"
    labels = read_labels(labels_csv, frames) if labels_csv.is_file() else None
    return Clip(name=folder.name, frames=frames, labels=labels, fps=fps)


def load_clips(split_dir: str | Path, fps: float = DEFAULT_FPS) -> list[Clip]:
    """Clips under `split_dir`, one per subfolder holding frames; `split_dir` itself if it holds frames."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise ValueError(f"clip folder not found: {split_dir}")
    own = _clip_from_folder(split_dir, fps)
    if own is not None:
        return [own]
    subdirs = sorted((d for d in split_dir.iterdir() if d.is_dir()), key=_sort_key)
    clips = [c for d in subdirs if (c := _clip_from_folder(d, fps)) is not None]
    if not clips:
        raise ValueError(f"no clips found in {split_dir}: no subfolder holds {'/'.join(IMAGE_EXTENSIONS)} frames")
    return clips


# ---- frames --------------------------------------------------------------------------------------------------


def load_frame(path: str | Path) -> np.ndarray:
    """One image file as an RGB uint8 array (H, W, 3); grayscale is replicated to 3 channels."""
    with Image.open(path) as im:
        return np.asarray(upright(im).convert("RGB"))


def to_rgb(frame: np.ndarray | Image.Image) -> np.ndarray:
    """An (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array or PIL image as RGB uint8 (H, W, 3)."""
    if isinstance(frame, Image.Image):
        return np.asarray(upright(frame).convert("RGB"))
    arr = np.asarray(frame)
    if arr.dtype != np.uint8:
        # Float frames in [0, 1] are common from other pipelines; anything else is clipped to 0..255.
        scale = 255.0 if arr.dtype.kind == "f" and arr.size and float(arr.max()) <= 1.0 else 1.0
        arr = np.clip(arr.astype(np.float32) * scale, 0, 255).round().astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W[, 1|3|4]) frame, got shape {tuple(np.asarray(frame).shape)}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def to_grey_rgb(frame: np.ndarray) -> np.ndarray:
    """An RGB uint8 frame made grey (LUMA weights, rounded) and replicated to 3 channels (R=G=B)."""
    y = (frame[..., 0] * LUMA[0] + frame[..., 1] * LUMA[1] + frame[..., 2] * LUMA[2]).round().astype(np.uint8)
    return np.repeat(y[:, :, None], 3, axis=2)


# ---- video files ---------------------------------------------------------------------------------------------


def _check_video_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"cannot read video {path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"cannot read video {path}: empty file")


def _iter_video_cv2(path: Path, cv2: Any) -> tuple[Iterator[np.ndarray], float]:
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise ValueError(f"cannot read video {path}: OpenCV could not open it")
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)

    def gen() -> Iterator[np.ndarray]:
        try:
            while True:
                ok, bgr = cap.read()
                if not ok:
                    return
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            cap.release()

    return gen(), fps


def _iter_video_av(path: Path, av: Any) -> tuple[Iterator[np.ndarray], float]:
    try:
        container = av.open(str(path))
        stream = container.streams.video[0]
    except Exception as exc:  # PyAV raises many error types for broken files
        raise ValueError(f"cannot read video {path}: {exc}") from exc
    fps = float(stream.average_rate or 0.0)

    def gen() -> Iterator[np.ndarray]:
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
        finally:
            container.close()

    return gen(), fps


def open_video(path: str | Path) -> tuple[Iterator[np.ndarray], float]:
    """Lazy RGB frame iterator and the container's fps (0.0 if unknown): cv2, else PyAV, else torchvision."""
    path = Path(path)
    _check_video_file(path)
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        return _iter_video_cv2(path, cv2)
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        return _iter_video_av(path, av)
    try:
        from torchvision.io import read_video  # removed in recent torchvision releases
    except ImportError as exc:
        raise ImportError("reading video files needs opencv-python(-headless) or av (PyAV)") from exc
    try:
        video, _, info = read_video(str(path), pts_unit="sec", output_format="THWC")
    except Exception as exc:
        raise ValueError(f"cannot read video {path}: {exc}") from exc
    return iter(list(video.numpy())), float(info.get("video_fps") or 0.0)


def read_video_frames(path: str | Path, max_frames: int | None = None) -> tuple[list[np.ndarray], float]:
    """All (or the first `max_frames`) frames of a video as RGB uint8 (H, W, 3), and its fps.

    Raises `ValueError("cannot read video ...")` for missing, empty or undecodable files.
    """
    it, fps = open_video(path)
    frames: list[np.ndarray] = []
    for frame in it:
        if max_frames is not None and len(frames) >= max_frames:
            break
        frames.append(frame)
    if hasattr(it, "close"):
        it.close()  # release the decoder now, not at garbage collection
    if not frames:
        raise ValueError(f"cannot read video {path}: no frames could be decoded")
    return frames, fps if fps > 0 else DEFAULT_FPS


def video_frame_count(path: str | Path) -> int | None:
    """The frame count a video's container reports (OpenCV), or None if unknown; for progress lines only."""
    try:
        import cv2

        cap = cv2.VideoCapture(str(path))
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        cap.release()
        return count
    except Exception:  # no OpenCV, or a container without a count
        return None


def iter_frames(source: FrameSource | Clip) -> Iterator[np.ndarray]:
    """Stream RGB uint8 frames from a video file, a folder of frames, a `Clip`, or an iterable of
    arrays / PIL images / image paths. Nothing is read ahead, so it suits live demos."""
    if isinstance(source, Clip):
        source = source.frames
    if isinstance(source, (str, Path)):
        yield from _iter_path(Path(source))
        return
    if isinstance(source, np.ndarray) and (source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (1, 3, 4))):
        # One (H, W) / (H, W, C) frame rather than an (N, H, W[, C]) stack of frames.
        yield to_rgb(source)
        return
    for item in source:
        yield load_frame(item) if isinstance(item, (str, Path)) else to_rgb(item)


def _iter_path(path: Path) -> Iterator[np.ndarray]:
    if path.is_dir():
        frames = list_frames(path)
        if not frames:
            raise ValueError(f"no frames ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
        yield from (load_frame(p) for p in frames)
        return
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        yield load_frame(path)
        return
    it, _ = open_video(path)
    n = 0
    for frame in it:
        n += 1
        yield frame
    if n == 0:
        raise ValueError(f"cannot read video {path}: no frames could be decoded")


# ---- live streams --------------------------------------------------------------------------------------------

STREAM_TIMEOUT_MS = 10_000  # OpenCV/FFmpeg open and read timeouts: a dead camera is noticed within seconds
RECONNECT_BACKOFF = (0.5, 10.0)  # seconds: first wait after a drop, doubling up to the cap
log = logging.getLogger("tlkit.stream")


def webcam_index(source: str | int) -> int | None:
    """`0`, `"1"` -> a camera index; anything else -> None."""
    if isinstance(source, int):
        return source
    return int(source) if str(source).strip().isdigit() else None


def is_stream_url(source: str | Path) -> bool:
    """rtsp://, http(s)://, udp://, ... (what OpenCV's FFmpeg backend opens); not file:// or a plain path."""
    text = str(source)
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text)) and not text.lower().startswith("file://")


@dataclass
class LiveFrame:
    """A frame from a `LiveStream`: its number in the stream (dropped frames count too), when it arrived
    (time.time()), and the RGB uint8 pixels."""

    index: int
    wall: float
    rgb: np.ndarray


def _open_capture(source: str | int, timeout_ms: int) -> Any:
    # FFmpeg's and OpenCV's own messages about a refused connection would repeat on every reconnect attempt;
    # LiveStream logs one line per attempt instead (OPENCV_FFMPEG_LOGLEVEL set by the user still wins).
    import os

    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import cv2

    with contextlib.suppress(AttributeError):
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    index = webcam_index(source)
    if index is not None:
        cap = cv2.VideoCapture(index)
    else:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        cap = cv2.VideoCapture(str(source), cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        cap.release()
        what = f"camera {index}" if index is not None else str(source)
        raise ValueError(f"cannot open {what}: OpenCV (FFmpeg) could not open it")
    return cap


class LiveStream:
    """A camera, network stream or (with `paced=True`) a video file played like a camera, read by a background
    thread that keeps only the newest frame: a consumer slower than the stream gets the latest frame each
    time and never falls behind; frames it never took are counted in `dropped`. A stream that stops
    delivering is reopened with backoff (`reconnect`); each drop and reconnection is logged."""

    def __init__(
        self,
        source: str | int | Path,
        *,
        paced: bool = False,
        reconnect: bool = True,
        backoff: tuple[float, float] = RECONNECT_BACKOFF,
        timeout_ms: int = STREAM_TIMEOUT_MS,
        on_log: Callable[[str], None] | None = None,
    ) -> None:
        self.source = str(source) if isinstance(source, Path) else source
        self.paced = paced
        self.reconnect = reconnect
        self.backoff = backoff
        self.timeout_ms = timeout_ms
        self.log = on_log or log.info
        self.fps: float | None = None
        self.received = self.dropped = self.reconnects = 0
        self._slot: LiveFrame | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._ended = False
        self._cap: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> LiveStream:
        """Open the source now (ValueError with one line if it cannot be) and start reading."""
        import cv2

        self._cap = _open_capture(self.source, self.timeout_ms)
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if 0 < fps < 1000 else None  # some streams report 90000 (the RTP clock) or nothing
        self._thread = threading.Thread(target=self._run, name="tlkit-stream-reader", daemon=True)
        self._thread.start()
        return self

    def _publish(self, rgb: np.ndarray) -> None:
        with self._cond:
            if self._slot is not None:
                self.dropped += 1  # the consumer never took the previous frame: the newest one replaces it
            self._slot = LiveFrame(self.received, time.time(), rgb)
            self.received += 1
            self._cond.notify_all()

    def _run(self) -> None:
        import cv2

        t0 = time.perf_counter()
        try:
            while not self._stop.is_set():
                ok, bgr = self._cap.read()
                if not ok:
                    if not self.reconnect or not self._reopen():
                        return
                    continue
                if self.paced:  # a file played like a camera: frame k becomes available at k / fps
                    self._stop.wait(max(0.0, t0 + self.received / (self.fps or DEFAULT_FPS) - time.perf_counter()))
                self._publish(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        finally:
            if self._cap is not None:
                self._cap.release()
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _reopen(self) -> bool:
        """Reopen a dropped stream, waiting `backoff[0]` seconds, doubling up to `backoff[1]`; False if stopped."""
        self._cap.release()
        self._cap = None
        lost = time.perf_counter()
        delay = self.backoff[0]
        self.log(f"stream lost: {self.source} stopped sending frames; reconnecting (retry in {delay:g} s)")
        while not self._stop.wait(delay):
            try:
                self._cap = _open_capture(self.source, self.timeout_ms)
            except ValueError:
                delay = min(delay * 2, self.backoff[1])
                self.log(f"reconnect to {self.source} failed; retry in {delay:g} s")
                continue
            self.reconnects += 1
            self.log(f"reconnected to {self.source} after {time.perf_counter() - lost:.1f} s")
            return True
        return False

    def frames(self, stop: threading.Event | None = None) -> Iterator[LiveFrame]:
        """The newest frame each time one is asked for (waiting for the next if none is new), until the stream
        ends (a paced file, or `reconnect=False`), `close()` or `stop` is set."""
        while True:
            with self._cond:
                while self._slot is None and not self._ended and not self._stop.is_set():
                    if stop is not None and stop.is_set():
                        return
                    self._cond.wait(0.2)
                frame, self._slot = self._slot, None
            if frame is None or (stop is not None and stop.is_set()):
                return
            yield frame

    def close(self) -> None:
        """Stop the reader thread and release the source."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.timeout_ms / 1000 + 1)
