"""One-class anomaly scoring for video frames with transferred CNN features (PatchCore-style).

Data flow, top to bottom:

1. clip IO: `load_clips` (frame folders + `labels.csv`), `read_video_frames` / `iter_frames` (videos,
   folders, path lists) -> RGB uint8 arrays;
2. `PatchCoreScorer`: mid-level patch features of an (ImageNet-pretrained) timm model -> memory bank of
   normal patches (greedy k-center coreset) -> frame score = max over patches of the kNN distance; optionally
   a second, motion stream (frame differences per patch against a bank of normal motion), fused per frame;
3. post-processing: `smooth_scores`, `choose_alert_threshold`, `find_events`, `frame_auroc`;
4. `evaluate_clips`: all of the above over labelled clips, as plain JSON-able results.

Reference: Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (PatchCore), CVPR 2022.
"""

from __future__ import annotations

import csv
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
DEFAULT_FPS = 10.0  # UCSD Ped2's nominal rate; used when a container does not report one

# What the scorer accepts as "frames": a video file / frame folder, or an iterable of arrays / image paths.
FrameSource = str | Path | Iterable[np.ndarray | str | Path | Image.Image]


# ----------------------------------------------------------------------------------------------------------
# 1. Clip IO
# ----------------------------------------------------------------------------------------------------------


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
        return [_frame_number(p) for p in self.frames]


def _frame_number(path: Path) -> int:
    # The last run of digits in the stem, so "Test001/061.jpg" -> 61 and "frame_0061.png" -> 61.
    digits = re.findall(r"\d+", path.stem)
    if not digits:
        raise ValueError(f"frame file name has no number: {path}")
    return int(digits[-1])


def _sort_key(path: Path) -> tuple[int, str]:
    digits = re.findall(r"\d+", path.stem)
    return (int(digits[-1]) if digits else -1, path.name)


def list_frames(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by frame number (numerically, so 9 < 10)."""
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS), key=_sort_key)


def _read_labels(csv_path: Path, frames: list[Path]) -> np.ndarray:
    # labels.csv is keyed by frame number, not by row order, so a clip with gaps still lines up.
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"frame", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path} must have the columns frame,label")
        by_frame = {int(row["frame"]): int(row["label"]) for row in reader}
    missing = [_frame_number(p) for p in frames if _frame_number(p) not in by_frame]
    if missing:
        more = "..." if len(missing) > 5 else ""
        raise ValueError(f"{csv_path} has no label for frame(s) {missing[:5]}{more}")
    return np.array([by_frame[_frame_number(p)] for p in frames], dtype=np.int64)


def _clip_from_folder(folder: Path, fps: float) -> Clip | None:
    frames = list_frames(folder)
    if not frames:
        return None
    labels_csv = folder / "labels.csv"
    labels = _read_labels(labels_csv, frames) if labels_csv.is_file() else None
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
        raise ValueError(f"no clips found in {split_dir}: no subfolder holds {'/'.join(IMAGE_EXTS)} frames")
    return clips


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


def _open_video(path: str | Path) -> tuple[Iterator[np.ndarray], float]:
    """Lazy RGB frame iterator and the container's fps (0.0 if unknown): cv2, else PyAV, else torchvision."""
    path = Path(path)
    _check_video_file(path)
    # cv2 is imported lazily: GPU training images may not ship OpenCV, and nothing else here needs it.
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
    it, fps = _open_video(path)
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


def iter_frames(source: FrameSource) -> Iterator[np.ndarray]:
    """Stream RGB uint8 frames from a video file, a folder of frames, a `Clip`, or an iterable of
    arrays / PIL images / image paths. Nothing is read ahead, so it suits live demos."""
    if isinstance(source, Clip):
        source = source.frames
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            frames = list_frames(path)
            if not frames:
                raise ValueError(f"no frames ({', '.join(IMAGE_EXTS)}) in {path}")
            yield from (load_frame(p) for p in frames)
            return
        if path.suffix.lower() in IMAGE_EXTS:
            yield load_frame(path)
            return
        it, _ = _open_video(path)
        n = 0
        for frame in it:
            n += 1
            yield frame
        if n == 0:
            raise ValueError(f"cannot read video {path}: no frames could be decoded")
        return
    if isinstance(source, np.ndarray) and (source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (1, 3, 4))):
        # One (H, W) / (H, W, C) frame rather than an (N, H, W[, C]) stack of frames.
        yield to_rgb(source)
        return
    for item in source:
        yield load_frame(item) if isinstance(item, (str, Path)) else to_rgb(item)


# ----------------------------------------------------------------------------------------------------------
# 2. PatchCore scorer
# ----------------------------------------------------------------------------------------------------------


def default_feature_layers(model: nn.Module) -> list[int]:
    """Feature indices of the stride-8 and stride-16 stages (ResNet `layer2`, `layer3`), as PatchCore uses.

    Mid-level features are generic enough to transfer across domains, yet still local; the deepest
    stage is too ImageNet-specific and too coarse for small objects such as a cyclist far away.
    """
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ValueError("model has no timm feature_info; pass feature_layers explicitly")
    reductions = [f["reduction"] for f in info]
    if 8 in reductions and 16 in reductions:
        return [reductions.index(8), reductions.index(16)]
    mid = len(reductions) // 2  # e.g. ViTs: all blocks at stride 16, take two from the middle
    return [max(mid - 1, 0), mid]


def _model_fingerprint(model: nn.Module) -> float:
    # A cheap checksum of the weights, so loading a bank with a different backbone gets a warning.
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum().item() for p in model.parameters()))


def _random_projection(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    # Gaussian Johnson-Lindenstrauss projection: pairwise distances are preserved up to small distortion.
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(in_dim, out_dim, generator=gen) / math.sqrt(out_dim)


def greedy_coreset(features: torch.Tensor, n_select: int, proj_dim: int | None = 128, seed: int = 0) -> torch.Tensor:
    """Indices of `n_select` rows chosen by greedy k-center (farthest point) selection.

    The coreset covers the feature space evenly, so rare normal patterns survive subsampling, unlike
    with random sampling. Distances are computed in a random projection (PatchCore's approximate
    sampler) to keep each of the `n_select` passes cheap on CPU.
    """
    n = features.shape[0]
    if n_select >= n:
        return torch.arange(n)
    feats = features.float()
    if proj_dim is not None and proj_dim < feats.shape[1]:
        feats = feats @ _random_projection(feats.shape[1], proj_dim, seed).to(feats.device)
    feats = feats.contiguous()
    sq = (feats**2).sum(dim=1)
    gen = torch.Generator().manual_seed(seed)
    selected = torch.empty(n_select, dtype=torch.long)
    idx = int(torch.randint(n, (1,), generator=gen))
    min_dist = torch.full((n,), float("inf"), device=feats.device)
    # Thousands of tiny ops: on CPU, thread start/stop per op costs more than it saves (and stalls badly
    # on a busy machine), so the loop runs single-threaded.
    threads = torch.get_num_threads()
    if feats.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for i in range(n_select):
            selected[i] = idx
            # ||x - c||^2 as one fused matrix-vector product: the loop is memory-bound, so a small
            # projected matrix that stays in cache is what makes it fast.
            dist = torch.addmv(sq, feats, feats[idx], alpha=-2.0).add_(sq[idx])
            torch.minimum(min_dist, dist, out=min_dist)
            idx = int(torch.argmax(min_dist))
    finally:
        torch.set_num_threads(threads)
    return selected


LUMA = (0.299, 0.587, 0.114)  # grey = weighted RGB, as PIL's "L" and the classification preprocessing
MOTION_BANK = 256  # rows of the motion bank: one value per patch, so a few hundred cover its range


def _motion_grid(
    resized: torch.Tensor, previous: torch.Tensor | None, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean absolute grey-level change since the previous frame, per patch of the feature grid, with the
    same 3x3 neighbourhood averaging as the features: (motion (N, h, w, 1), last grey frame for the next
    batch). The first frame of a stream is compared with the second (the change between them is the same),
    so a stream does not start with an artificial "nothing moves" frame; a lone frame has zero motion.
    Cyclists, skaters and carts move faster than the people walking in the training clips; appearance alone
    misses them when they are small."""
    grey = (resized * torch.tensor(LUMA, device=resized.device).view(1, 3, 1, 1)).sum(1, True)
    if previous is None or previous.shape[-2:] != grey.shape[-2:]:
        previous = grey[1:2] if len(grey) > 1 else grey[:1]
    before = torch.cat([previous, grey[:-1]])
    motion = F.adaptive_avg_pool2d((grey - before).abs(), grid)
    motion = F.avg_pool2d(motion, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return motion.permute(0, 2, 3, 1).contiguous(), grey[-1:]


class _Reservoir:
    """Uniform random sample of at most `capacity` rows from a stream of row batches (Algorithm R)."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.seen = 0
        self.buf: torch.Tensor | None = None
        self.filled = 0
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, rows: torch.Tensor) -> None:
        if self.buf is None:
            self.buf = torch.empty(self.capacity, rows.shape[1], dtype=rows.dtype)
        take = min(self.capacity - self.filled, rows.shape[0])
        if take:
            self.buf[self.filled : self.filled + take] = rows[:take]
            self.filled += take
            self.seen += take
            rows = rows[take:]
        if rows.shape[0] == 0:
            return
        # Row number t (0-based in the stream) replaces a random slot with probability capacity / (t + 1).
        t = torch.arange(self.seen, self.seen + rows.shape[0])
        slot = (torch.rand(rows.shape[0], generator=self.gen) * (t + 1).double()).long()
        keep = slot < self.capacity
        self.buf[slot[keep]] = rows[keep]
        self.seen += rows.shape[0]

    def rows(self) -> torch.Tensor:
        if self.buf is None:
            raise ValueError("no frames were given to fit")
        return self.buf[: self.filled]


class PatchCoreScorer:
    """PatchCore-style one-class scorer: memory bank of normal patch features, kNN distance at test time.

    `model` is a timm model (e.g. `timm.create_model("resnet18", pretrained=False)` with ImageNet
    weights loaded by the caller); only its intermediate stages are used, the head is ignored.
    `preprocess` is `{"img_size": int, "mean": [3 floats], "std": [3 floats]}`, optionally with
    `"grayscale": bool`; other keys are ignored, so a tlkit checkpoint's preprocessing dict can be passed.
    Frames are resized so their short side is `img_size`, keeping the aspect ratio (no centre crop:
    anomalies can be at the edges of the view).

    `score()` returns frame scores standardised by the mean/std of held-out normal frames seen in `fit`
    ("z-scores"), so thresholds are comparable across backbones and sizes; `raw=True` gives distances.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: dict[str, Any],
        *,
        feature_layers: Sequence[int] | None = None,
        proj_dim: int | None = None,
        k: int = 1,
        blur_sigma: float = 4.0,
        motion_weight: float = 0.0,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        if not hasattr(model, "forward_intermediates"):
            raise TypeError("PatchCoreScorer needs a timm model with forward_intermediates (timm >= 1.0)")
        self.model = model.eval()  # BatchNorm must use its running stats, not batch statistics
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.config: dict[str, Any] = {
            "img_size": int(preprocess["img_size"]),
            "mean": [float(v) for v in preprocess["mean"]],
            "std": [float(v) for v in preprocess["std"]],
            "grayscale": bool(preprocess.get("grayscale", False)),
            "feature_layers": [int(i) for i in (feature_layers or default_feature_layers(model))],
            "proj_dim": None if proj_dim is None else int(proj_dim),
            "k": int(k),
            "blur_sigma": float(blur_sigma),
            "motion_weight": float(motion_weight),
            "seed": int(seed),
            "arch": _model_arch(model),
            "model_fingerprint": _model_fingerprint(model),
        }
        self.bank: torch.Tensor | None = None
        self.motion_bank: torch.Tensor | None = None
        self.proj: torch.Tensor | None = None
        # raw frame score = appearance / scales[0] + motion_weight * motion / scales[1]
        self.scales: tuple[float, float] = (1.0, 1.0)
        self.stats: dict[str, float] = {"mean": 0.0, "std": 1.0}
        self.threshold: float | None = None

    @property
    def uses_motion(self) -> bool:
        return self.config["motion_weight"] > 0

    # -- features ------------------------------------------------------------------------------------------

    def _resized(self, frames: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 frames of one size -> NCHW in 0..1, short side `img_size`, long side a multiple of 16
        so the stride-8 and stride-16 grids line up exactly."""
        x = torch.from_numpy(np.stack(frames)).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        h, w = x.shape[-2:]
        size = self.config["img_size"]
        scale = size / min(h, w)
        out_h = max(16, round(h * scale / 16) * 16)
        out_w = max(16, round(w * scale / 16) * 16)
        return F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)

    def _to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Resized 0..1 frames -> the backbone's normalised input."""
        if self.config["grayscale"]:
            # Same as the classification preprocessing of weights trained on grey inputs (R=G=B).
            gray = torch.tensor(LUMA, device=self.device).view(1, 3, 1, 1)
            x = (x * gray).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        mean = torch.tensor(self.config["mean"], device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config["std"], device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.inference_mode()
    def embed(self, frames: list[np.ndarray]) -> torch.Tensor:
        """Patch features (N, h, w, D) for RGB uint8 frames of one size (D after the optional projection)."""
        return self._embed_resized(self._resized(frames))

    @torch.inference_mode()
    def _embed_resized(self, resized: torch.Tensor) -> torch.Tensor:
        # Match the model's dtype so half-precision backbones on GPU work too.
        x = self._to_input(resized).to(next(self.model.parameters()).dtype)
        feats = self.model.forward_intermediates(
            x, indices=self.config["feature_layers"], intermediates_only=True, stop_early=True
        )
        grid = feats[0].shape[-2:]
        parts = []
        for f in feats:
            # PatchCore's local neighbourhood aggregation: each patch sees its 3x3 context, which adds
            # robustness to small misalignments without losing resolution.
            f = F.avg_pool2d(f.float(), kernel_size=3, stride=1, padding=1, count_include_pad=False)
            if f.shape[-2:] != grid:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            parts.append(f)
        emb = torch.cat(parts, dim=1).permute(0, 2, 3, 1)  # N, h, w, D
        if self.config["proj_dim"] is not None:
            if self.proj is None:
                self.proj = _random_projection(emb.shape[-1], self.config["proj_dim"], self.config["seed"])
            emb = emb @ self.proj.to(emb.device)
        return emb.contiguous()

    def _iter_embedded(
        self, frames: FrameSource | Sequence[Clip], batch_size: int
    ) -> Iterator[tuple[list[np.ndarray], torch.Tensor, torch.Tensor | None]]:
        """(frames, patch features (N, h, w, D), motion (N, h, w, 1) or None) per batch; batches are split
        where the frame size changes. A list of `Clip`s is streamed clip by clip, so motion never spans
        two clips."""
        if isinstance(frames, (list, tuple)) and frames and all(isinstance(c, Clip) for c in frames):
            for clip in frames:
                yield from self._iter_embedded(clip, batch_size)
            return
        previous: torch.Tensor | None = None

        def run(batch: list[np.ndarray]):
            nonlocal previous
            resized = self._resized(batch)
            emb = self._embed_resized(resized)
            motion = None
            if self.uses_motion:
                motion, previous = _motion_grid(resized, previous, tuple(emb.shape[1:3]))
            return batch, emb, motion

        batch: list[np.ndarray] = []
        for frame in iter_frames(frames):
            if batch and (len(batch) >= batch_size or frame.shape != batch[0].shape):
                yield run(batch)
                batch = []
            batch.append(frame)
        if batch:
            yield run(batch)

    # -- fitting -------------------------------------------------------------------------------------------

    def fit(
        self,
        frames: FrameSource,
        batch_size: int = 16,
        coreset_ratio: float = 0.1,
        max_bank: int = 16384,
        max_candidates: int = 200_000,
        calib_frames: FrameSource | None = None,
        calib_every: int = 10,
        calib_block: int = 10,
        coreset_dim: int | None = 32,
        seed: int = 0,
    ) -> PatchCoreScorer:
        """Build the memory bank from normal frames.

        Patches are reservoir-sampled down to `max_candidates`, then a greedy coreset of
        `min(max_bank, coreset_ratio * candidates)` rows is kept; both caps bound CPU time and memory.

        Scores are standardised by the mean/std of frame scores of normal frames that are *not* in the
        bank: `calib_frames` if given (best: whole held-out normal clips), else blocks of `calib_block`
        consecutive frames, one block in every `calib_every`, held out of `frames`. Blocks rather than
        single frames, because a lone held-out video frame has near-duplicate neighbours in the bank and
        would make normal scores look too low. With < 2 held-out frames, stats stay mean 0 / std 1 (raw).
        """
        hold_out = calib_frames is None and calib_every > 1
        reservoir = _Reservoir(max_candidates, seed)
        motion_reservoir = _Reservoir(max_candidates, seed + 1) if self.uses_motion else None
        calib: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        n_frames = 0
        for batch, emb, motion in self._iter_embedded(frames, batch_size):
            for j in range(len(batch)):
                rows = emb[j].reshape(-1, emb.shape[-1]).cpu()
                mrows = None if motion is None else motion[j].reshape(-1, 1).cpu()
                if hold_out and ((n_frames + j) // calib_block) % calib_every == calib_every // 2:
                    calib.append((rows.half(), mrows))  # only for score statistics: half precision is plenty
                else:
                    reservoir.add(rows)
                    if motion_reservoir is not None:
                        motion_reservoir.add(mrows)
            n_frames += len(batch)
        candidates = reservoir.rows()
        n_select = max(1, min(max_bank, math.ceil(coreset_ratio * candidates.shape[0])))
        keep = greedy_coreset(candidates.to(self.device), n_select, proj_dim=coreset_dim, seed=seed)
        self.bank = candidates[keep.cpu()].to(self.device)  # kept on the device: scoring reads it every batch
        if motion_reservoir is not None:
            # One number per patch: a small k-center set covers the whole normal range of motion.
            moving = motion_reservoir.rows()
            self.motion_bank = moving[greedy_coreset(moving, min(MOTION_BANK, len(moving)), None, seed)]
        self.scales, self.stats = (1.0, 1.0), {"mean": 0.0, "std": 1.0}
        if calib_frames is not None:
            held_out = ((emb, motion) for _, emb, motion in self._iter_embedded(calib_frames, batch_size))
        else:
            # One held-out frame's rows as a (1, 1, P, D) "grid": only maxima over patches are taken from it.
            held_out = (
                (r.float().to(self.device)[None, None], None if m is None else m.float().to(self.device)[None, None])
                for r, m in calib
            )
        parts = [self._frame_parts(*self._patch_maps(emb, motion)) for emb, motion in held_out]
        appearance = torch.cat([a for a, _ in parts]) if parts else torch.zeros(0)
        moving = torch.cat([m for _, m in parts]) if parts and self.uses_motion else None
        if moving is not None and len(appearance) >= 2:
            # Each stream in units of its own spread on normal frames, so neither dominates by scale.
            self.scales = (float(max(appearance.std(), 1e-6)), float(max(moving.std(), 1e-6)))
        raw = self._combine(appearance, moving).cpu().numpy().astype(np.float64)
        if raw.size >= 2:
            self.stats = {"mean": float(raw.mean()), "std": float(max(raw.std(ddof=1), 1e-6))}
        self.fit_info = {"n_frames": n_frames, "n_calib": int(raw.size), "n_candidates": len(candidates)}
        return self

    # -- scoring -------------------------------------------------------------------------------------------

    def _patch_scores(self, patches: torch.Tensor, chunk: int = 1024, bank: torch.Tensor | None = None) -> torch.Tensor:
        """Distance of each patch (P, D) to its nearest bank rows (mean over the `k` nearest)."""
        bank = self.bank if bank is None else bank
        if bank is None:
            raise RuntimeError("PatchCoreScorer is not fitted: call fit() or from_state_dict() first")
        bank = bank.to(patches.device)
        if patches.shape[1] != bank.shape[1]:
            raise ValueError(
                f"feature size {patches.shape[1]} does not match the memory bank ({bank.shape[1]}): "
                "wrong backbone or feature_layers for this state"
            )
        bank_sq = (bank**2).sum(dim=1)
        k = min(self.config["k"], bank.shape[0])
        out = []
        for q in patches.split(chunk):
            # ||q - b||^2 = ||q||^2 - 2 q.b + ||b||^2, one matmul instead of a (P, M, D) tensor.
            d2 = (q**2).sum(dim=1, keepdim=True) - 2.0 * q @ bank.T + bank_sq
            nearest = d2.topk(k, dim=1, largest=False).values.clamp_min_(0.0).sqrt_()
            out.append(nearest.mean(dim=1))
        return torch.cat(out)

    def _patch_maps(self, emb: torch.Tensor, motion: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-patch kNN distances (N, h, w) of the appearance stream and, if used, the motion stream."""
        n, h, w, d = emb.shape
        appearance = self._patch_scores(emb.reshape(-1, d)).reshape(n, h, w)
        if not self.uses_motion or motion is None:
            return appearance, None
        if self.motion_bank is None:
            raise RuntimeError("this scorer uses motion but has no motion bank: fit it first")
        moving = self._patch_scores(motion.reshape(-1, 1), bank=self.motion_bank).reshape(n, h, w)
        return appearance, moving

    @staticmethod
    def _frame_parts(appearance: torch.Tensor, moving: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-frame maxima over the patch maps of each stream: (appearance (N,), motion (N,) or None)."""
        a = appearance.flatten(1).max(dim=1).values
        return a, (moving.flatten(1).max(dim=1).values if moving is not None else None)

    def _combine(self, appearance: torch.Tensor, moving: torch.Tensor | None) -> torch.Tensor:
        # Fused per frame, not per patch: an unusual look and unusual speed need not be the same patch
        # (a cyclist's wheels move, his torso looks odd), and per-frame fusion measured better on Ped2 val.
        out = appearance / self.scales[0]
        if self.uses_motion and moving is not None:
            out = out + self.config["motion_weight"] * moving / self.scales[1]
        return out

    def _standardise(self, x: np.ndarray | float) -> np.ndarray | float:
        return (x - self.stats["mean"]) / self.stats["std"]

    @torch.inference_mode()
    def iter_scores(
        self, frames: FrameSource, batch_size: int = 16, maps: bool = False, raw: bool = False, grids: bool = False
    ) -> Iterator[tuple[float, np.ndarray | None]]:
        """Per frame, lazily: (frame score, heat map or None). For streaming demos.

        `maps=True` gives heat maps at frame size; `grids=True` the patch-distance grid itself (h, w), which
        costs nothing extra: a live demo keeps the peak frame's grid and upsamples only that one with
        `upsample_map`, instead of upsampling every frame or scoring the peak frame a second time.
        """
        for batch, emb, motion in self._iter_embedded(frames, batch_size):
            appearance, moving = self._patch_maps(emb, motion)
            scores = self._combine(*self._frame_parts(appearance, moving)).cpu().numpy().astype(np.float64)
            heat: list[np.ndarray | None] = [None] * len(batch)
            if maps or grids:
                # Heat map: both streams in the same units as the frame score, added per patch (for display).
                dist = self._combine(appearance, moving)
                heat = self._heatmaps(dist, batch[0].shape[:2]) if maps else list(dist.cpu().numpy().astype(np.float32))
            for s, m in zip(scores, heat, strict=True):
                if not raw:
                    s = self._standardise(s)
                    m = None if m is None else self._standardise(m).astype(np.float32)
                yield float(s), m

    def upsample_map(self, grid: np.ndarray, frame_hw: tuple[int, int]) -> np.ndarray:
        """A patch grid from `iter_scores(grids=True)` as a smooth heat map (H, W) at frame size.

        Upsampling and blurring commute with the affine standardisation, so a standardised grid gives the
        same map as `score_maps`."""
        dist = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None]
        return self._heatmaps(dist, frame_hw)[0]

    def _heatmaps(self, dist: torch.Tensor, frame_hw: tuple[int, int]) -> list[np.ndarray]:
        # Bilinear upsampling to the frame, then a Gaussian blur as in PatchCore for smooth overlays.
        up = F.interpolate(dist[:, None], size=frame_hw, mode="bilinear", align_corners=False)
        sigma = self.config["blur_sigma"]
        if sigma > 0:
            radius = int(4 * sigma + 0.5)
            t = torch.arange(-radius, radius + 1, dtype=up.dtype, device=up.device)
            g = torch.exp(-0.5 * (t / sigma) ** 2)
            g = g / g.sum()
            up = F.pad(up, (radius, radius, radius, radius), mode="replicate")
            up = F.conv2d(up, g.view(1, 1, 1, -1))
            up = F.conv2d(up, g.view(1, 1, -1, 1))
        return list(up[:, 0].cpu().numpy().astype(np.float32))

    def score(self, frames: FrameSource, batch_size: int = 16, raw: bool = False) -> np.ndarray:
        """Frame scores (N,): max over patches of the kNN distance to the bank, standardised unless `raw`."""
        return np.array([s for s, _ in self.iter_scores(frames, batch_size, raw=raw)], dtype=np.float64)

    def score_maps(
        self, frames: FrameSource, batch_size: int = 16, raw: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Frame scores (N,) and per-frame patch-distance heat maps (H, W) float32 at each frame's size."""
        scores, maps = [], []
        for s, m in self.iter_scores(frames, batch_size, maps=True, raw=raw):
            scores.append(s)
            maps.append(m)
        return np.array(scores, dtype=np.float64), maps

    # -- persistence ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Bank, config, stats and threshold as tensors and primitives (safe for `weights_only=True`)."""
        if self.bank is None:
            raise RuntimeError("PatchCoreScorer is not fitted: nothing to save")
        return {
            "version": 1,
            "config": dict(self.config),
            "bank": self.bank.detach().cpu().clone(),
            "motion_bank": None if self.motion_bank is None else self.motion_bank.detach().cpu().clone(),
            "scales": [float(v) for v in self.scales],
            "proj": None if self.proj is None else self.proj.detach().cpu().clone(),
            "stats": dict(self.stats),
            "threshold": None if self.threshold is None else float(self.threshold),
        }

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], model: nn.Module, device: str | torch.device | None = None
    ) -> PatchCoreScorer:
        """Rebuild a fitted scorer around `model`, which must be the backbone (same weights) used in `fit`."""
        cfg = state["config"]
        scorer = cls(
            model,
            {k: cfg[k] for k in ("img_size", "mean", "std", "grayscale") if k in cfg},
            feature_layers=cfg["feature_layers"],
            proj_dim=cfg["proj_dim"],
            k=cfg["k"],
            blur_sigma=cfg["blur_sigma"],
            motion_weight=cfg.get("motion_weight", 0.0),
            seed=cfg["seed"],
            device=device,
        )
        if cfg.get("arch") and scorer.config["arch"] and cfg["arch"] != scorer.config["arch"]:
            raise ValueError(f"state was fitted with {cfg['arch']}, got model {scorer.config['arch']}")
        saved_fp, fp = cfg.get("model_fingerprint"), scorer.config["model_fingerprint"]
        if saved_fp is not None and not math.isclose(saved_fp, fp, rel_tol=1e-6):
            warnings.warn("model weights differ from those used to fit this anomaly state", stacklevel=2)
        scorer.bank = state["bank"].float().to(scorer.device)
        scorer.proj = None if state.get("proj") is None else state["proj"].float()
        motion_bank = state.get("motion_bank")
        scorer.motion_bank = None if motion_bank is None else motion_bank.float().to(scorer.device)
        scorer.scales = tuple(float(v) for v in state.get("scales", (1.0, 1.0)))
        scorer.stats = {k: float(v) for k, v in state["stats"].items()}
        scorer.threshold = None if state.get("threshold") is None else float(state["threshold"])
        return scorer


def _model_arch(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return cfg.get("architecture")


# ----------------------------------------------------------------------------------------------------------
# 3. Post-processing
# ----------------------------------------------------------------------------------------------------------


def smooth_scores(
    scores: Sequence[float] | np.ndarray, window: int = 5, method: str = "median", causal: bool = False
) -> np.ndarray:
    """Temporal smoothing, same length as the input.

    Anomalies last many frames while feature noise flickers frame to frame, so smoothing raises AUROC
    and suppresses one-frame false alarms. `causal=True` uses only past frames (for live alerts);
    otherwise the window is centred. `gaussian` uses sigma = window / 4 over the same support.
    """
    x = np.asarray(scores, dtype=np.float64).ravel()
    if window <= 1 or x.size == 0:
        return x.copy()
    if method not in ("median", "mean", "gaussian"):
        raise ValueError(f"unknown smoothing method {method!r}: use median, mean or gaussian")
    before, after = (window - 1, 0) if causal else ((window - 1) // 2, window // 2)
    padded = np.pad(x, (before, after), mode="edge")  # edge padding keeps the ends unbiased
    views = np.lib.stride_tricks.sliding_window_view(padded, window)
    if method == "median":
        return np.median(views, axis=1)
    if method == "mean":
        return views.mean(axis=1)
    t = np.arange(window) - (window - 1 if causal else (window - 1) / 2)
    g = np.exp(-0.5 * (t / (window / 4.0)) ** 2)
    return views @ (g / g.sum())


def _check_binary(scores: np.ndarray, labels: np.ndarray) -> None:
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.shape[0]} vs {labels.shape[0]}")


def choose_alert_threshold(
    scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, method: str = "youden"
) -> float:
    """Threshold (alert when score >= threshold) chosen on labelled validation frames.

    `youden` maximises TPR - FPR (balanced; good when normal frames are scarce), `f1` maximises the F1
    of the abnormal class.
    """
    from sklearn.metrics import precision_recall_curve, roc_curve

    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(int)
    _check_binary(s, y)
    if len(np.unique(y)) < 2:
        raise ValueError("choose_alert_threshold needs both normal (0) and abnormal (1) frames")
    if method == "youden":
        fpr, tpr, thr = roc_curve(y, s)
        best = int(np.argmax((tpr - fpr)[1:])) + 1  # thr[0] is +inf (no alerts at all)
        return float(thr[best])
    if method == "f1":
        precision, recall, thr = precision_recall_curve(y, s)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        return float(thr[int(np.argmax(f1))])
    raise ValueError(f"unknown threshold method {method!r}: use youden or f1")


def find_events(
    scores: Sequence[float] | np.ndarray,
    threshold: float,
    fps: float = DEFAULT_FPS,
    min_length: int = 3,
    merge_gap: int = 5,
    first_frame: int = 1,
) -> list[dict[str, Any]]:
    """Alert events: runs of frames with score >= threshold.

    Runs separated by at most `merge_gap` frames below threshold are merged first (one cyclist should
    be one alert), then events shorter than `min_length` frames are dropped (single-frame flicker).
    Frame numbers start at `first_frame` (1 = UCSD numbering); `start_s` / `end_s` are the timestamps of
    the first / last frame from the start of the sequence; `end_frame` is inclusive.
    """
    x = np.asarray(scores, dtype=np.float64).ravel()
    above = x >= threshold
    if not above.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], above.astype(np.int8), [0]])))
    # Inclusive 0-based [start, end] index pairs of the runs above threshold.
    runs = [[int(a), int(b) - 1] for a, b in zip(edges[::2], edges[1::2], strict=True)]
    merged = [runs[0]]
    for start, end in runs[1:]:
        if start - merged[-1][1] - 1 <= merge_gap:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    events = []
    for start, end in merged:
        if end - start + 1 < min_length:
            continue
        peak = start + int(np.argmax(x[start : end + 1]))
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


def normalize_per_clip(per_clip_scores: Sequence[Sequence[float] | np.ndarray]) -> list[np.ndarray]:
    """Min-max normalise each clip's scores to [0, 1], the usual video-anomaly protocol (e.g. Liu et al.
    2018). It hides between-clip offsets (crowd density, lighting) but needs the whole clip, so it is an
    offline evaluation convention, not something a live alert can do."""
    out = []
    for s in per_clip_scores:
        s = np.asarray(s, dtype=np.float64).ravel()
        span = s.max() - s.min() if s.size else 0.0
        out.append((s - s.min()) / span if span > 0 else np.zeros_like(s))
    return out


def frame_auroc(
    scores: Sequence[float] | np.ndarray | Sequence[np.ndarray],
    labels: Sequence[int] | np.ndarray | Sequence[np.ndarray],
    normalize_per_clip: bool = False,
) -> float | None:
    """Frame-level ROC AUC; None when the labels hold one class only.

    `scores` / `labels` are flat sequences or lists of per-clip arrays (concatenated); with
    `normalize_per_clip=True` each clip's scores are min-max normalised first (needs per-clip lists).
    """
    from sklearn.metrics import roc_auc_score

    per_clip = len(scores) > 0 and np.ndim(scores[0]) == 1
    if normalize_per_clip:
        if not per_clip:
            raise ValueError("normalize_per_clip needs a list of per-clip score arrays")
        scores = _normalize_clips(scores)
    s = np.concatenate([np.ravel(c) for c in scores]) if per_clip else np.asarray(scores, dtype=np.float64)
    y = np.concatenate([np.ravel(c) for c in labels]) if per_clip else np.asarray(labels)
    s, y = s.astype(np.float64).ravel(), y.astype(int).ravel()
    _check_binary(s, y)
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, s))


_normalize_clips = normalize_per_clip  # the frame_auroc flag shadows the function name inside it


# ----------------------------------------------------------------------------------------------------------
# 4. Evaluation over clips
# ----------------------------------------------------------------------------------------------------------


def evaluate_clips(
    scorer: PatchCoreScorer,
    clips: Sequence[Clip],
    smooth_window: int = 5,
    threshold: float | None = None,
    smooth_method: str = "median",
    batch_size: int = 16,
    min_length: int = 3,
    merge_gap: int = 5,
) -> dict[str, Any]:
    """Score labelled clips: per-clip scores/AUROC/events and overall frame AUROC, as JSON-able data.

    `threshold` defaults to `scorer.threshold`; with neither, no events are reported. AUROC is reported
    on smoothed scores (`frame_auroc`), on raw scores, and with per-clip min-max normalisation.
    """
    threshold = scorer.threshold if threshold is None else float(threshold)
    per_clip: dict[str, Any] = {}
    all_raw, all_smooth, all_labels = [], [], []
    for clip in clips:
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
            all_raw.append(raw)
            all_smooth.append(smooth)
            all_labels.append(clip.labels)
        per_clip[clip.name] = entry
    result: dict[str, Any] = {
        "clips": per_clip,
        "threshold": threshold,
        "smooth_window": smooth_window,
        "smooth_method": smooth_method,
        "frame_auroc": frame_auroc(all_smooth, all_labels) if all_labels else None,
        "frame_auroc_raw": frame_auroc(all_raw, all_labels) if all_labels else None,
        "frame_auroc_per_clip_norm": frame_auroc(all_smooth, all_labels, normalize_per_clip=True)
        if all_labels
        else None,
    }
    if threshold is not None and all_labels:
        y = np.concatenate(all_labels).astype(bool)
        pred = np.concatenate(all_smooth) >= threshold
        tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
        result["alerts"] = {
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "false_positive_rate": fp / int((~y).sum()) if (~y).any() else None,
        }
    return result
