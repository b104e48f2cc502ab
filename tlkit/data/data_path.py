"""Which loader feeds a run: the CPU DataLoader, a pack read from disk, a pack resident on the GPU, or GPU JPEG
decoding (`data.loader`), and building the fast ones. The packs themselves are `tlkit.data.packed`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from tlkit.data.gpu import DeviceLoader
from tlkit.data.packed import PackedDataset, PackedLoader, PackError, default_pack_dir, is_pack

log = logging.getLogger("tlkit.data.data_path")

# Recipe augmentations that only the CPU (albumentations) path implements; the fast paths do
# RandomResizedCrop + horizontal flip (the ResNet/FFCV recipe), and say so rather than silently drop these.
CPU_ONLY_AUGMENTATIONS = (
    "color_jitter",
    "randaugment",
    "rotate",
    "perspective",
    "blur",
    "brightness_contrast",
    "random_erasing",
)


# ---- choosing a data path ----------------------------------------------------------------------------------


def cpu_only_augmentations(data) -> list[str]:
    """The recipe's augmentations (a `DataConfig`) that the fast paths do not implement."""
    return [name for name in CPU_ONLY_AUGMENTATIONS if getattr(data, name, 0)]


def fits_on_device(nbytes: int, device: torch.device | str, fraction: float = 0.25) -> bool:
    """True when `nbytes` of pixels take at most `fraction` of the device's free memory (CUDA only)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


def choose_data_path(data, device: torch.device | str, pack_dir: str | os.PathLike | None, mode: str = "auto"):
    """(path, reason) for a run: `cpu` (DataLoader + albumentations), `packed` (memmap + device aug),
    `gpu` (the whole pack resident on the device) or `jpeg` (nvJPEG decode + device aug).

    `auto`: on a CPU device, `cpu` (the model, not decoding, is the bottleneck there and the workers run
    beside it); with augmentations only the CPU path has, `cpu`; on CUDA with a pack, `gpu` when its pixels
    fit in a quarter of free GPU memory, else `packed`; on CUDA without a pack, `cpu`, with a hint."""
    device = torch.device(device)
    have_pack = pack_dir is not None and is_pack(pack_dir)
    if mode not in ("auto", "cpu", "packed", "gpu", "jpeg"):
        raise ValueError(f"unknown data loader {mode!r}; use auto, cpu, packed, gpu or jpeg")
    if mode in ("packed", "gpu") and not have_pack:
        raise PackError(f"data.loader={mode} needs a pack at {pack_dir}; make one with `tlkit data pack`")
    extra = cpu_only_augmentations(data)
    if mode != "auto":
        if extra and mode != "cpu":
            log.warning("data.loader=%s does crop+flip only; ignoring %s", mode, ", ".join(extra))
        return mode, "asked for"
    if device.type != "cuda":
        return "cpu", "CPU device: DataLoader workers decode beside the model"
    if extra:
        return "cpu", f"recipe uses CPU-only augmentations ({', '.join(extra)})"
    if not have_pack:
        return "cpu", f"no pack at {pack_dir}; `tlkit data pack` makes the GPU data path possible"
    nbytes = PackedDataset(pack_dir).nbytes
    if fits_on_device(nbytes, device):
        return "gpu", f"pack ({nbytes / 2**30:.2f} GiB) fits on the GPU"
    return "packed", f"pack ({nbytes / 2**30:.2f} GiB) streams from the page cache"


def pack_dirs(data) -> tuple[Path, Path]:
    """Where `fit` looks for the packs of a `DataConfig`: `data.pack_dir` when the config has one set
    (a folder holding `<split>-<size>` packs), else `default_pack_dir`'s parent. Train at `img_size`;
    val at `round(img_size / crop_pct)`, so the device-side eval crop equals the engine's eval transform."""
    base = getattr(data, "pack_dir", "") or default_pack_dir(data.name, data.train_split, data.img_size).parent
    val_size = int(round(data.img_size / data.crop_pct))
    return Path(base) / f"{data.train_split}-{data.img_size}", Path(base) / f"{data.val_split}-{val_size}"


def build_packed_datasets(recipe, class_ids: list[str] | None = None):
    """`loader.build_datasets` for packs: a `DataBundle` of `PackedDataset`s (no albumentations needed).
    The packs must hold the run's classes in the run's order (`class_ids` on resume)."""
    from tlkit.data.datasets import read_class_names
    from tlkit.data.loader import DataBundle
    from tlkit.paths import resolve_data

    train_dir, val_dir = pack_dirs(recipe.data)
    train = PackedDataset(train_dir, seed=recipe.train.seed)
    if class_ids is not None:
        train.check_classes(class_ids)
    val = None
    if recipe.data.val_split and is_pack(val_dir):
        val = PackedDataset(val_dir, seed=recipe.train.seed)
        val.check_classes(train.class_ids)
    root = resolve_data(recipe.data.name)
    classes = read_class_names(root, train.class_ids) if root.is_dir() else train.classes
    return DataBundle(train, val, classes, train.class_ids, str(root))  # type: ignore[arg-type]


def make_fast_loader(
    kind: str,
    source,
    data,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    device: torch.device | str,
    rank: int = 0,
    world: int = 1,
    size: int | None = None,
    weights=None,
):
    """The loader for `kind` in (`packed`, `gpu`, `jpeg`), configured from a `DataConfig` `data`.

    `source`: a pack folder or `PackedDataset` (packed, gpu), or `(path, target)` samples (jpeg).
    Training: RandomResizedCrop(scale=(data.scale_min, 1)) + flip(data.hflip) to `size or data.img_size`;
    evaluation: the central `crop_pct` square, resized to img_size (exact eval crop for a val pack made at
    round(img_size / crop_pct))."""
    from tlkit.data.gpu import JpegLoader

    size = size or data.img_size
    common = dict(
        batch_size=batch_size,
        train=train,
        size=size,
        device=device,
        scale=(data.scale_min, 1.0),
        hflip=data.hflip,
        crop_pct=data.crop_pct,
        seed=seed,
        rank=rank,
        world=world,
        weights=weights,
    )
    if kind == "jpeg":
        return JpegLoader(source, **common)
    dataset = source if isinstance(source, PackedDataset) else PackedDataset(source)
    if kind == "gpu":
        return DeviceLoader(dataset.all_pixels(), dataset.labels, **common)
    if kind == "packed":
        return PackedLoader(dataset, **common)
    raise ValueError(f"unknown fast loader {kind!r}; use packed, gpu or jpeg")
