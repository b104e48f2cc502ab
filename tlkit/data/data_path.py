"""Which loader feeds a run (`data.loader`): the CPU DataLoader, a pack read from disk, a pack resident on the
GPU, or GPU JPEG decoding; finding a recipe's packs, making them (`tlkit data pack`), and building the fast
loaders for `run.recipe_data`. The packs themselves are `tlkit.data.packed`.

Importable without albumentations and gradio (GPU images often lack them): nothing here imports either.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tlkit.config import LOADERS
from tlkit.data.gpu import DeviceLoader
from tlkit.data.packed import (
    PACK_HINT,
    PackedDataset,
    PackedLoader,
    PackError,
    check_source,
    default_pack_dir,
    is_pack,
    write_pack,
)

log = logging.getLogger("tlkit.data.data_path")

FAST_LOADERS = ("packed", "gpu", "jpeg")
GPU_FRACTION = 0.25  # `auto` puts a pack on the GPU when its pixels take at most this share of free memory

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
    "grayscale",
)


# ---- choosing a data path ----------------------------------------------------------------------------------


def cpu_only_augmentations(data) -> list[str]:
    """The recipe's preprocessing (a `DataConfig`) that the fast paths do not implement: photometric and
    geometric augmentations, grey inputs, `crop_mode: squash`, video clips."""
    found = [name for name in CPU_ONLY_AUGMENTATIONS if getattr(data, name, 0)]
    if getattr(data, "crop_mode", "center") == "squash":
        found.append("crop_mode=squash")
    if getattr(data, "layout", "auto") == "clips":
        found.append("layout=clips")
    return found


def choose_loader(
    requested: str,
    *,
    device_type: str,
    cpu_only: list[str] | tuple[str, ...] = (),
    pack_bytes: int | None = None,
    free_bytes: int | None = None,
) -> tuple[str, str]:
    """(loader, reason): the rule behind `data.loader`, as a function of plain facts (unit-tested as such).

    An explicit `requested` loader is used as asked. `auto`: `cpu` on a CPU device (the model, not decoding,
    is the bottleneck there, and the workers run beside it) or when the recipe asks for augmentations only
    the CPU path has (`cpu_only`); on CUDA with a pack (`pack_bytes` of pixels, None: no pack) `gpu` when it
    takes at most a quarter of `free_bytes` GPU memory, else `packed` (memory map); no pack: `cpu`, with a
    hint to make one. `jpeg` is never picked by `auto` (opt-in until measured on a GPU)."""
    if requested not in LOADERS:
        raise ValueError(f"unknown data.loader {requested!r}; use one of {', '.join(LOADERS)}")
    if requested != "auto":
        return requested, "data.loader=" + requested
    if device_type != "cuda":
        return "cpu", "CPU device: DataLoader workers decode beside the model"
    if cpu_only:
        return "cpu", f"the recipe uses CPU-only augmentations ({', '.join(cpu_only)})"
    if pack_bytes is None:
        return "cpu", f"no pack of this data; `{PACK_HINT}` makes one, for the GPU data path"
    gib = pack_bytes / 2**30
    if free_bytes is not None and pack_bytes <= GPU_FRACTION * free_bytes:
        return "gpu", f"the pack ({gib:.2f} GiB) fits in a quarter of free GPU memory: resident on the GPU"
    return "packed", f"the pack ({gib:.2f} GiB) is over a quarter of free GPU memory: read from its memory map"


def fits_on_device(nbytes: int, device: torch.device | str, fraction: float = GPU_FRACTION) -> bool:
    """True when `nbytes` of pixels take at most `fraction` of the device's free memory (CUDA only)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


def choose_data_path(data, device: torch.device | str, pack_dir: str | os.PathLike | None, mode: str = "auto"):
    """(loader, reason) for a `DataConfig` on `device`, with the train pack at `pack_dir` (None: no pack);
    `choose_loader` with the facts read from the machine. Explicit `packed`/`gpu` without a pack: PackError."""
    device = torch.device(device)
    have_pack = pack_dir is not None and is_pack(pack_dir)
    if mode in ("packed", "gpu") and not have_pack:
        raise PackError(f"data.loader={mode} needs a pack (none at {pack_dir}); make one with `{PACK_HINT}`")
    extra = cpu_only_augmentations(data)
    if mode in FAST_LOADERS and extra:
        log.warning("data.loader=%s does crop+flip only; ignoring %s", mode, ", ".join(extra))
    pack_bytes = PackedDataset(pack_dir).nbytes if have_pack else None
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" and have_pack else None
    return choose_loader(mode, device_type=device.type, cpu_only=extra, pack_bytes=pack_bytes, free_bytes=free)


# ---- where a recipe's packs are -------------------------------------------------------------------------------


def pack_bases(data) -> list[Path]:
    """Folders that may hold a `DataConfig`'s packs (`<split>-<size>/` each), in the order looked at:
    `data.pack` when set (a pack folder itself means its parent); else `$TLKIT_PACKS/<name>` (default
    `packs/<name>`, where `tlkit data pack` writes), then `<data folder>.packs` beside the data."""
    from tlkit.paths import resolve_data

    if getattr(data, "pack", ""):
        base = Path(data.pack).expanduser()
        return [base.parent if is_pack(base) else base]
    root = resolve_data(data.name)
    return [default_pack_dir(data.name, data.train_split, data.img_size).parent, root.with_name(root.name + ".packs")]


def default_pack_base(data) -> Path:
    """Where `tlkit data pack` writes without `--out`: the first of `pack_bases`."""
    return pack_bases(data)[0]


def find_pack(bases: list[Path], split: str, min_size: int) -> Path | None:
    """The smallest pack `<base>/<split>-<N>` with N >= `min_size` in the first base that has one. A train pack
    larger than img_size serves it (crops are resized anyway); a val pack at exactly round(img_size / crop_pct)
    makes the eval crop pixel-exact, a larger one resamples the same central square."""
    pattern = re.compile(rf"{re.escape(split)}-(\d+)")
    for base in bases:
        if not base.is_dir():
            continue
        sizes = [(int(m.group(1)), p) for p in base.iterdir() if (m := pattern.fullmatch(p.name)) and is_pack(p)]
        sizes = sorted(x for x in sizes if x[0] >= min_size)
        if sizes:
            return sizes[0][1]
    return None


def val_pack_size(data, size: int | None = None) -> int:
    """The val pack size for train size `size` (default img_size): round(size / crop_pct), the eval resize."""
    return int(round((size or data.img_size) / data.crop_pct))


def pack_dirs(data) -> tuple[Path | None, Path | None]:
    """The train pack (at least `img_size`) and the val pack (at least round(img_size / crop_pct)) of a
    `DataConfig`, None where there is none."""
    bases = pack_bases(data)
    train = find_pack(bases, data.train_split, data.img_size)
    val = find_pack(bases, data.val_split, val_pack_size(data)) if data.val_split else None
    return train, val


# ---- making packs (`tlkit data pack`) -------------------------------------------------------------------------


def pack_recipe_data(
    recipe,
    *,
    split: str = "all",
    size: int | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    workers: int = -1,
    progress: bool = True,
) -> list[tuple[Path, dict]]:
    """Pack a recipe's data as a run reads it (`loader.recipe_samples`: every layout the datasets read, the
    recipe's class subset, ROI crops): train at `size` (default img_size), val at round(size / crop_pct), into
    `out` (default `default_pack_base`) as `<split>-<size>/`. Returns [(folder, meta)]."""
    from tlkit.data.loader import recipe_samples

    if split not in ("train", "val", "all"):
        raise ValueError(f"unknown split {split!r}; use train, val or all")
    data = recipe.data
    if data.layout == "clips":
        raise PackError("video clips (layout: clips) are read by the cpu loader only; they cannot be packed")
    size = int(size or data.img_size)
    base = Path(out) if out else default_pack_base(data)
    root, train, val, ids = recipe_samples(recipe)
    jobs = []
    if split in ("train", "all"):
        jobs.append((data.train_split, train, size, 0))
    if split in ("val", "all"):
        if val is None:
            if split == "val":
                raise PackError(f"{root} has no '{data.val_split}' split to pack")
        else:
            jobs.append((data.val_split, val, val_pack_size(data, size), size))
    done = []
    for name, samples, px, eval_for in jobs:
        dest = base / f"{name}-{px}"
        if (dest / "meta.json").exists() and not overwrite:
            raise PackError(f"{dest} already holds a pack; pass --overwrite to replace it")
        common = dict(split=name, interpolation=data.interpolation, roi_crop=data.roi_crop, layout=data.layout)
        common.update(eval_for=eval_for, workers=workers, overwrite=overwrite)
        with _bar(f"pack {name}-{px}", len(samples), progress) as on_rows:
            meta = write_pack(samples, ids, root, dest, px, on_rows=on_rows, **common)
        done.append((dest, meta))
    return done


def pack_data(recipe_name: str, overrides: dict, *, quiet: bool = False, **options) -> list[tuple[Path, dict]]:
    """`tlkit data pack`: the recipe (with the user's --data/--set) -> `pack_recipe_data`; one line per pack."""
    from tlkit.config import load_recipe
    from tlkit.progress import console

    recipe = load_recipe(recipe_name, overrides, cuda=torch.cuda.is_available())
    done = pack_recipe_data(recipe, progress=not quiet, **options)
    for dest, meta in done:
        gib = meta["count"] * meta["size"] ** 2 * 3 / 2**30
        console.print(
            f"packed {meta['count'] - meta['failed']} images ({meta['failed']} unreadable, skipped) of "
            f"{len(meta['class_ids'])} classes at {meta['size']} px: {dest} ({gib:.2f} GiB)"
        )
    if done and done[0][0].parent not in pack_bases(recipe.data):
        console.print(f"use it with: --set data.pack={done[0][0].parent}")
    return done


class _bar:
    """A rich progress bar over rows packed (nothing when `enabled` is false); the context value is `on_rows`."""

    def __init__(self, description: str, total: int, enabled: bool):
        self.description, self.total, self.enabled, self.bar = description, total, enabled, None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        from tlkit.progress import console

        self.bar = Progress(
            "{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
        )
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---- the run's data on a fast path -----------------------------------------------------------------------------


@dataclass
class LoaderChoice:
    kind: str  # cpu | packed | gpu | jpeg
    reason: str
    train_pack: Path | None = None
    val_pack: Path | None = None


def resolve_loader(data, device: torch.device) -> LoaderChoice:
    """`data.loader` for this run: `choose_data_path` with the recipe's packs (`pack_dirs`). A val split with
    no val pack counts as no pack (the run would have nothing to validate with on the fast path)."""
    from tlkit.paths import resolve_data

    train_pack, val_pack = pack_dirs(data)
    has_val = bool(data.val_split) and _has_val_split(resolve_data(data.name), data.val_split)
    usable = train_pack if (train_pack is not None and (val_pack is not None or not has_val)) else None
    if data.loader in ("packed", "gpu") and usable is None:
        missing = data.train_split if train_pack is None else data.val_split
        where = " or ".join(str(b) for b in pack_bases(data))
        raise PackError(
            f"data.loader={data.loader} needs a {missing} pack of {data.name} in {where}; make it with "
            f"`{PACK_HINT} --size {data.img_size}` (or pass --set data.pack=FOLDER)"
        )
    kind, reason = choose_data_path(data, device, usable, data.loader)
    return LoaderChoice(kind, reason, usable, val_pack if usable is not None else None)


def _has_val_split(root: Path, split: str) -> bool:
    from tlkit.data.datasets import has_split

    return root.exists() and has_split(root, split)  # a folder, or a CSV file (layout: csv)


def fast_run_data(recipe, choice: LoaderChoice, info, device: torch.device, class_ids: list[str] | None = None):
    """(bundle, train loader, val loader) for `choice.kind` in packed / gpu / jpeg: sharded over the ranks
    like the DataLoader, the same `EpochSampler` (exact resume), crop+flip on `device`."""
    bundle, train_src, val_src = _fast_datasets(recipe, choice, class_ids)
    data = recipe.data
    common = dict(
        batch_size=recipe.train.batch_size, seed=recipe.train.seed, device=device, rank=info.rank, world=info.world
    )
    weights = _sample_weights(bundle.train.targets()) if data.sampler == "balanced" else None
    train_loader = make_fast_loader(choice.kind, train_src, data, train=True, weights=weights, **common)
    val_loader = make_fast_loader(choice.kind, val_src, data, train=False, **common) if val_src is not None else None
    return bundle, train_loader, val_loader


def _fast_datasets(recipe, choice: LoaderChoice, class_ids: list[str] | None):
    """(DataBundle, train source, val source): `PackedDataset`s checked against what the recipe's data lists
    now (`check_source`: a stale pack is refused) and against the run's classes; or, for jpeg, the samples."""
    from tlkit.data.datasets import ImageDataset, read_class_names
    from tlkit.data.loader import DataBundle, recipe_samples

    seed = recipe.train.seed
    root, train_samples, val_samples, ids = recipe_samples(recipe, class_ids)
    if choice.kind == "jpeg":
        if recipe.data.roi_crop:
            log.warning("data.loader=jpeg decodes whole files: data.roi_crop is ignored (a pack applies it)")
        train = ImageDataset(train_samples, seed=seed)
        val = ImageDataset(val_samples, seed=seed) if val_samples is not None else None
        sources = (train_samples, val_samples)
    else:
        train = _open_pack(choice.train_pack, train_samples, root, ids, seed)
        val = None
        if val_samples is not None and choice.val_pack is not None:
            val = _open_pack(choice.val_pack, val_samples, root, ids, seed)
        sources = (train, val)
    bundle = DataBundle(train, val, read_class_names(root, ids), ids, str(root))  # type: ignore[arg-type]
    return bundle, *sources


def eval_loader(kind: str, dataset, recipe, device: torch.device | str):
    """The whole of `dataset` (a run's val `PackedDataset`, or `ImageDataset` for jpeg) through `kind`'s eval
    crop, unsharded: the post-training pass on rank 0 sees what validation saw, without albumentations."""
    source = dataset.samples if kind == "jpeg" else dataset
    return make_fast_loader(
        kind, source, recipe.data, batch_size=recipe.train.batch_size, train=False, seed=0, device=device
    )


def _open_pack(path: Path | None, samples, root: Path, class_ids: list[str], seed: int) -> PackedDataset:
    dataset = PackedDataset(path, seed=seed)  # type: ignore[arg-type]
    dataset.check_classes(class_ids)
    check_source(dataset.meta, samples, root, path)  # type: ignore[arg-type]
    return dataset


def _sample_weights(targets: np.ndarray) -> np.ndarray:
    from tlkit.data.loader import class_weights

    return class_weights(targets, int(targets.max()) + 1)[targets]


def build_packed_datasets(recipe, class_ids: list[str] | None = None):
    """A `DataBundle` of the recipe's packs (`PackedDataset`s, no albumentations needed), checked as a run
    checks them: the packs must hold the run's classes, in its order, made from the files its data lists."""
    train_dir, val_dir = pack_dirs(recipe.data)
    if train_dir is None:
        raise PackError(f"no {recipe.data.train_split} pack of {recipe.data.name}; make one with `{PACK_HINT}`")
    return _fast_datasets(recipe, LoaderChoice("packed", "asked for", train_dir, val_dir), class_ids)[0]


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
    evaluation: the eval transform's crop, the central img_size / round(img_size / crop_pct) of the short side,
    resized to img_size (a val pack made by `tlkit data pack` for img_size gives its pixels exactly).
    A pack's unreadable files are counted in the `failed` of each epoch's first batch (rank 0), as the
    DataLoader path counts each bad file once an epoch."""
    from tlkit.data.gpu import JpegLoader

    size = size or data.img_size
    # resize to round(size / crop_pct), centre-crop size: as a share of the short side, size / that
    crop_pct = size / round(size / data.crop_pct)
    common = dict(
        batch_size=batch_size,
        train=train,
        size=size,
        device=device,
        scale=(data.scale_min, 1.0),
        hflip=data.hflip,
        crop_pct=crop_pct,
        seed=seed,
        rank=rank,
        world=world,
        weights=weights,
    )
    if kind == "jpeg":
        return JpegLoader(source, **common)
    dataset = source if isinstance(source, PackedDataset) else PackedDataset(source)
    if kind == "gpu":
        loader = DeviceLoader(dataset.all_pixels(), dataset.labels, **common)
    elif kind == "packed":
        loader = PackedLoader(dataset, **common)
    else:
        raise ValueError(f"unknown fast loader {kind!r}; use packed, gpu or jpeg")
    loader.known_failed = int(dataset.meta.get("failed", 0)) if rank == 0 else 0
    return loader
