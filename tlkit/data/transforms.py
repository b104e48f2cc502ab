"""Augmentation presets (albumentations) and the preprocessing spec that travels with the weights.

Presets produce HxWx3 uint8 arrays; normalisation happens on the device (`normalize`), which keeps
host->device copies 4x smaller and lets the same loader feed CPU and GPU. albumentations is imported
only when a CPU preset is built, so GPU code paths work on machines without it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from tlkit.config import DataConfig

_INTERPOLATIONS = {"nearest": 0, "bilinear": 1, "bicubic": 2, "area": 3, "lanczos": 4}


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects at inference: stored in every checkpoint, read by evaluate/predict/demos."""

    img_size: int
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    grayscale: bool = False  # inputs are made grey (R=G=B) first, e.g. radiographs, whatever the file holds
    crop_mode: str = "center"  # center: short side to resize_size, centre crop; squash: whole image to a square

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        keys = ("img_size", "crop_pct", "mean", "std", "interpolation", "grayscale", "crop_mode")
        known = {k: d[k] for k in keys if k in d}
        known["mean"] = tuple(known.get("mean", cls.mean))
        known["std"] = tuple(known.get("std", cls.std))
        return cls(**known)

    @property
    def resize_size(self) -> int:
        return int(round(self.img_size / self.crop_pct))


def preprocessing_for(arch: str, data: DataConfig, init: str = "scratch") -> Preprocessing:
    """Size, crop and interpolation from the recipe; mean/std from the weights: the init checkpoint's own
    preprocessing when it is a tlkit checkpoint, the published weights' config, else the architecture's timm
    defaults."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    mean, std = (cfg.mean, cfg.std) if cfg else (Preprocessing.mean, Preprocessing.std)
    from tlkit.models import is_published, is_scratch, resolve_published

    if is_published(init):
        # Published weights (timm / hf-hub / torchvision): the mean/std they were trained with. Size, crop and
        # resampling filter stay the recipe's (it chose them for its data; train and eval transforms share them).
        carried = resolve_published(init).preprocessing
        mean, std = tuple(carried.get("mean", mean)), tuple(carried.get("std", std))
    elif not is_scratch(init) and str(init).endswith(".pt"):
        from tlkit.checkpoint import CheckpointError, load_checkpoint

        try:
            carried = load_checkpoint(init).get("preprocessing") or {}
        except (CheckpointError, AttributeError):
            carried = {}
        mean, std = tuple(carried.get("mean", mean)), tuple(carried.get("std", std))
    return Preprocessing(
        img_size=data.img_size,
        crop_pct=data.crop_pct,
        mean=tuple(mean),
        std=tuple(std),
        interpolation=data.interpolation,
        grayscale=data.grayscale,
        crop_mode=data.crop_mode,
    )


class _Seeded:
    """Wraps an albumentations pipeline so each call is reproducible from an explicit seed."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __call__(self, image: np.ndarray, seed: int | None = None) -> np.ndarray:
        if seed is not None:
            # One random stream shared by every op. `set_random_seed` would give each op its own
            # generator with the *same* seed, so their draws coincide (e.g. flip <=> small crop).
            self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return self.pipeline(image=image)["image"]


def train_transform(data: DataConfig, img_size: int | None = None) -> Callable:
    import albumentations as A

    size = img_size or data.img_size
    interp = _INTERPOLATIONS[data.interpolation]
    # Grey inputs replicated to 3 channels keep the RGB-pretrained stem usable as is.
    ops: list = [A.ToGray(num_output_channels=3, p=1.0)] if data.grayscale else []
    if data.crop_mode == "squash":
        # Whole frame, aspect ratio given up: an event at the edge of a CCTV view must stay in the input.
        ops += [A.Resize(size, size, interpolation=interp)]
    else:
        ops += [A.RandomResizedCrop(size=(size, size), scale=(data.scale_min, 1.0), interpolation=interp)]
    if data.hflip > 0:
        ops.append(A.HorizontalFlip(p=data.hflip))
    if data.rotate > 0:
        ops.append(A.Affine(rotate=(-data.rotate, data.rotate), scale=(0.9, 1.1), p=0.7, border_mode=1))
    if data.perspective > 0:
        ops.append(A.Perspective(scale=(0.01, data.perspective), p=0.5))
    if data.brightness_contrast > 0:
        ops.append(A.RandomBrightnessContrast(0.3, 0.3, p=data.brightness_contrast))
    if data.blur > 0:
        ops.append(A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 7))], p=data.blur))
    if data.color_jitter > 0:
        j = data.color_jitter
        ops.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.1, j / 4), p=0.8))
    if data.randaugment > 0:
        # RandAugment-style: N ops drawn uniformly from a pool of photometric and geometric ops.
        pool = [
            A.Equalize(p=1),
            A.Posterize(num_bits=(4, 6), p=1),
            A.Solarize(threshold_range=(0.5, 1.0), p=1),
            A.Sharpen(p=1),
            A.RandomBrightnessContrast(0.3, 0.3, p=1),
            A.HueSaturationValue(p=1),
            A.Affine(rotate=(-20, 20), p=1),
            A.Affine(shear=(-15, 15), p=1),
            A.Affine(translate_percent=(-0.1, 0.1), p=1),
            A.ToGray(p=1),
        ]
        ops.append(A.SomeOf(pool, n=data.randaugment, p=1))
    if data.random_erasing > 0:
        ops.append(
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(0.1, 0.4),
                hole_width_range=(0.1, 0.4),
                fill="random",
                p=data.random_erasing,
            )
        )
    return _Seeded(A.Compose(ops, seed=0))


def eval_transform(pre: Preprocessing) -> Callable:
    import albumentations as A

    interp = _INTERPOLATIONS[pre.interpolation]
    ops = [A.ToGray(num_output_channels=3, p=1.0)] if pre.grayscale else []
    if pre.crop_mode == "squash":
        ops += [A.Resize(pre.img_size, pre.img_size, interpolation=interp)]
    else:
        ops += [
            A.SmallestMaxSize(max_size=pre.resize_size, interpolation=interp),
            A.CenterCrop(height=pre.img_size, width=pre.img_size, pad_if_needed=True),
        ]
    return _Seeded(A.Compose(ops, seed=0))


def normalize(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW on the device -> float, normalised; `mean`/`std` are (1,3,1,1) in 0..255 units."""
    return (batch.float() - mean) / std


def norm_tensors(pre: Preprocessing, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255.0
    return mean, std
