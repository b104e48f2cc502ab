"""The PatchCore scorer: mid-level patch features of an (ImageNet-pretrained) timm model -> memory bank of
normal patches (greedy k-center coreset) -> frame score = max over patches of the kNN distance; optionally a
second, motion stream (optical-flow speed of the fastest patch), fused per frame.

Reference: Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (PatchCore), CVPR 2022.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlkit.data.clips import LUMA, Clip, FrameSource, iter_frames
from tlkit.tasks.anomaly.bank import Reservoir, greedy_coreset, random_projection


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


MOTION_BANK = 256  # rows of the motion bank: one value per patch, so a few hundred cover its range
# Farneback optical flow (OpenCV) on the resized grey frames: (pyr_scale, levels, winsize, iterations, poly_n,
# poly_sigma, flags). A small window resolves a distant cyclist from the walkers around him; on Ped2 val (192x128
# frames, flow alone, 5-frame mean) winsize 5/7/9/11/15/21 gave frame AUROC 0.90/0.93/0.93/0.93/0.92/0.89, and
# a third pyramid level or iteration changed it by < 0.005. ~5 ms per frame on one CPU core.
FLOW_PARAMS = (0.5, 2, 9, 2, 5, 1.2, 0)


def _grey(resized: torch.Tensor) -> torch.Tensor:
    return (resized * torch.tensor(LUMA, device=resized.device).view(1, 3, 1, 1)).sum(1, True)


def _pool_to_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, 1, H, W) per-pixel motion -> (N, h, w, 1) per patch, with the features' 3x3 neighbourhood averaging."""
    x = F.adaptive_avg_pool2d(x, grid)
    x = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return x.permute(0, 2, 3, 1).contiguous()


def _pairs(grey: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """Each frame's predecessor: the last frame of the previous batch, or for a stream's first frame the second
    one (the change between them is the same), so a stream does not start with an artificial "nothing moves"
    frame; a lone frame is its own predecessor (no motion)."""
    if previous is None or previous.shape[-2:] != grey.shape[-2:]:
        previous = grey[1:2] if len(grey) > 1 else grey[:1]
    return torch.cat([previous, grey[:-1]])


def _as_u8(grey: torch.Tensor) -> np.ndarray:
    return (grey[:, 0] * 255.0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()


def _flow_grid(
    resized: torch.Tensor, previous: torch.Tensor | None, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optical-flow speed since the previous frame (pixels of the resized frame per frame), per patch of the
    feature grid: (motion (N, h, w, 1), last grey frame for the next batch); predecessors as in `_pairs`.

    Speed, not frame difference: a frame difference also grows with an object's size and contrast, so a walker
    close to the camera or a crowd changes as many pixels as a distant cyclist; flow measures how far things
    move. On Ped2 val the fastest patch's flow speed alone gave frame AUROC 0.93, its frame difference 0.78."""
    import cv2

    grey = _grey(resized)
    before = _pairs(grey, previous)
    speed = []
    for a, b in zip(_as_u8(before), _as_u8(grey), strict=True):
        if np.array_equal(a, b):
            # A repeated frame (a lone frame, a stalled camera) has no motion; Farneback would return up to ~1 px
            # of spurious flow in flat regions, where its local equations are ill-conditioned.
            speed.append(np.zeros(a.shape, np.float32))
            continue
        flow = cv2.calcOpticalFlowFarneback(a, b, None, *FLOW_PARAMS)
        speed.append(np.sqrt((flow**2).sum(axis=-1)))
    x = torch.from_numpy(np.stack(speed)).to(resized.device)[:, None]
    return _pool_to_grid(x, grid), grey[-1:]


def _motion_grid(
    resized: torch.Tensor, previous: torch.Tensor | None, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean absolute grey-level change since the previous frame, per patch of the feature grid, with the
    same 3x3 neighbourhood averaging as the features: (motion (N, h, w, 1), last grey frame for the next
    batch). The first frame of a stream is compared with the second (the change between them is the same),
    so a stream does not start with an artificial "nothing moves" frame; a lone frame has zero motion.
    Cyclists, skaters and carts move faster than the people walking in the training clips; appearance alone
    misses them when they are small. The motion measure of checkpoints fitted before `_flow_grid` (speed)."""
    grey = _grey(resized)
    return _pool_to_grid((grey - _pairs(grey, previous)).abs(), grid), grey[-1:]


# `motion_score` -> (the per-patch motion measure, scored by distance to a bank of normal motion?). The one place
# that maps a checkpoint's motion design to code: flow (new fits), speed and bank (older checkpoints, which keep
# the measure they were calibrated with; see `PatchCoreScorer.__init__`).
MOTION_MEASURES = {"flow": (_flow_grid, False), "speed": (_motion_grid, False), "bank": (_motion_grid, True)}


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
            # flow: a patch's motion score is its optical-flow speed (`_flow_grid`). Older checkpoints keep the
            # measure they were calibrated with: speed, the mean absolute grey-level frame difference per patch
            # (`_motion_grid`); bank, the first design, its distance to the nearest value in a bank of normal
            # frame differences (on normal frames that is the bank's coverage gap, ~1e-4 with a spread of ~2e-6
            # over frames, so dividing by that spread blew compression noise up to 10+ units).
            "motion_score": "flow",
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

    @property
    def _motion_banked(self) -> bool:
        """Motion scored against a bank of normal motion (the first design), not taken as it is."""
        return self.uses_motion and MOTION_MEASURES[self.config["motion_score"]][1]

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
                self.proj = random_projection(emb.shape[-1], self.config["proj_dim"], self.config["seed"])
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
                measure, _ = MOTION_MEASURES[self.config["motion_score"]]
                motion, previous = measure(resized, previous, tuple(emb.shape[1:3]))
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
        reservoir = Reservoir(max_candidates, seed)
        motion_reservoir = Reservoir(max_candidates, seed + 1) if self._motion_banked else None
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
        if not self._motion_banked:
            # How fast the patch moves; the frame score (its fastest patch) is scaled by that maximum's spread
            # over held-out normal frames, which walkers give a real width.
            return appearance, motion.reshape(n, h, w)
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
        scorer.config["motion_score"] = cfg.get("motion_score", "bank")  # saved before it existed: bank
        if scorer.config["motion_score"] not in MOTION_MEASURES:
            raise ValueError(f"unknown motion_score {scorer.config['motion_score']!r} in this anomaly state")
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


def load_scorer(checkpoint: str | Path | dict, device: str = "auto") -> PatchCoreScorer:
    """The fitted scorer of an anomaly checkpoint (a path, a run folder, or the loaded dict): backbone weights,
    memory banks, score statistics and alert threshold."""
    from tlkit.checkpoint import CheckpointError, load_tlkit_checkpoint
    from tlkit.models import create_model
    from tlkit.run import resolve_device

    ckpt = checkpoint if isinstance(checkpoint, dict) else load_tlkit_checkpoint(checkpoint)
    if ckpt.get("task") != "anomaly" or "anomaly" not in ckpt:
        raise CheckpointError("not an anomaly checkpoint (make one with `tlkit finetune --recipe surveillance`)")
    dev = resolve_device(device)
    model = create_model(ckpt["arch"], 0)
    model.load_state_dict(ckpt["model"])
    return PatchCoreScorer.from_state_dict(ckpt["anomaly"], model.to(dev).eval(), device=dev)
