"""Samplers and DataLoaders: sharded across DDP ranks, reproducible per epoch, resumable mid-epoch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from tlkit.config import DataConfig, Recipe
from tlkit.data.datasets import ImageDataset, Sample, has_split, read_class_names, scan_split
from tlkit.data.transforms import Preprocessing, eval_transform, train_transform
from tlkit.paths import resolve_data


class EpochSampler(DistributedSampler):
    """DistributedSampler whose order depends only on (seed, epoch), with two additions:
    class-balanced sampling (`weights`) and `start`, the number of this rank's samples to skip,
    which is how a run resumed from a mid-epoch checkpoint continues exactly where it stopped."""

    def __init__(
        self,
        dataset,
        *,
        num_replicas: int,
        rank: int,
        shuffle: bool,
        seed: int,
        drop_last: bool = False,
        weights: np.ndarray | None = None,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.start = 0

    def __iter__(self):
        if not self.shuffle and not self.drop_last:
            # Evaluation: every image exactly once across ranks (DistributedSampler would pad with repeats).
            indices = list(range(self.rank, len(self.dataset), self.num_replicas))
        elif self.weights is None:
            indices = list(super().__iter__())
        else:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            drawn = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g).tolist()
            indices = drawn[self.rank : self.total_size : self.num_replicas]
        return iter(indices[self.start :])

    def __len__(self) -> int:
        if not self.shuffle and not self.drop_last:
            return len(range(self.rank, len(self.dataset), self.num_replicas)) - self.start
        return self.num_samples - self.start


def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Leave a core for the training process itself; small machines still get one decoding worker.
    return max(1, min(8, cpus - 1))


@dataclass
class DataBundle:
    train: ImageDataset
    val: ImageDataset | None
    classes: list[str]
    class_ids: list[str]
    root: str


def recipe_samples(
    recipe: Recipe, class_ids: list[str] | None = None
) -> tuple[Path, list[Sample], list[Sample] | None, list[str]]:
    """(root, train samples, val samples or None, class ids) of a recipe's data: what every loader (and
    `tlkit data pack`) reads, from `scan_split` with the recipe's subset, ROI and layout settings."""
    data = recipe.data
    root = resolve_data(data.name)
    common = dict(
        max_per_class=data.max_per_class,
        roi_crop=data.roi_crop,
        layout=data.layout,
        # resuming a run on the first `max_classes` classes passes those classes back in
        ignore_unknown=data.max_classes > 0,
    )
    train_samples, ids = scan_split(root, data.train_split, class_ids, max_classes=data.max_classes, **common)
    has_val = bool(data.val_split) and has_split(root, data.val_split)
    if has_val and data.layout == "clips" and data.val_clips:
        # Labelled clips are scarce: the val split's other clips train, only `val_clips` validate.
        extra, _ = scan_split(root, data.val_split, ids, skip_clips=data.val_clips, **common)
        train_samples = train_samples + extra
    val_samples = None
    if has_val:
        only = data.val_clips if data.layout == "clips" and data.val_clips else None
        val_samples, _ = scan_split(root, data.val_split, ids, clips=only, **common)
    return root, train_samples, val_samples, ids


def build_datasets(
    recipe: Recipe, pre: Preprocessing, class_ids: list[str] | None = None, *, transforms: bool = True
) -> DataBundle:
    """The recipe's datasets with the CPU (albumentations) train/eval transforms; `transforms=False`: plain
    decoded images (the `jpeg` loader augments on the device, and albumentations is never imported)."""
    root, train_samples, val_samples, ids = recipe_samples(recipe, class_ids)
    seed = recipe.train.seed
    train = ImageDataset(train_samples, train_transform(recipe.data) if transforms else None, seed=seed)
    val = None
    if val_samples is not None:
        val = ImageDataset(val_samples, eval_transform(pre) if transforms else None, seed=seed)
    return DataBundle(train, val, read_class_names(root, ids), ids, str(root))


def class_weights(targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse class frequency, normalised to mean 1 (weighted loss / balanced sampling)."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0)
    return weights


def make_loader(
    dataset: ImageDataset,
    data: DataConfig,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    rank: int = 0,
    world: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    weights = None
    if train and data.sampler == "balanced":
        targets = dataset.targets()
        weights = class_weights(targets, int(targets.max()) + 1)[targets]
    sampler = EpochSampler(
        dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed, drop_last=train, weights=weights
    )
    workers = default_workers() if data.num_workers < 0 else data.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        # Full batches in training keep shapes static (torch.compile, BatchNorm); eval sees every image.
        drop_last=train and len(dataset) >= batch_size * world,
        persistent_workers=False,  # workers must see the dataset's new epoch for per-epoch seeding
        prefetch_factor=4 if workers > 0 else None,
    )
