"""Video as frames: clip folders (numbered frame images + `labels.csv`), video files, live frame streams.

Everything comes out as RGB uint8 arrays (H, W, 3). Used by the data layer (the supervised clips layout,
`datasets._clip_pairs`) and by the anomaly task (fitting, evaluation, the live demo). OpenCV is imported
only when a video file is opened: GPU training images may not ship it, and nothing else here needs it.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tlkit.data.io import IMAGE_EXTENSIONS, is_image_file

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
        return np.asarray(im.convert("RGB"))


def to_rgb(frame: np.ndarray | Image.Image) -> np.ndarray:
    """An (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array or PIL image as RGB uint8 (H, W, 3)."""
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
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
