"""Pack store: a split decoded once, pre-resized, as one uint8 N x S x S x 3 memory-mapped array.

`tlkit data pack` (-> `write_pack`) writes, in one folder per split and size:

    images.npy   uint8 (N, S, S, 3), standard .npy (np.load(..., mmap_mode="r") reads it)
    labels.npy   int64 (N,): class index, -1 for a file that could not be decoded (skipped on reading)
    files.txt    the source file of each row, relative to the dataset root
    meta.json    format, version, split, size, fit, interpolation, classes, class_ids, count, failed, source

A pack is written into `<out>.partial` and renamed into place when complete (atomic: an interrupted
`tlkit data pack` leaves no half pack where a run would read it; running it again starts over). Rows keep
`scan_split`'s order (class by class), and the class list is the one the engine would build, so labels
mean the same thing. `source` records what the pack was made from (layout, file count, total bytes, a
digest of the file list with sizes, the newest mtime): `check_source` refuses a pack whose data changed.

Why raw pixels rather than FFCV's JPEG-in-a-file: decoding is what a GPU outruns first. A raw row is one
memcpy from the page cache; batches are cropped and flipped on the device (`tlkit.data.gpu`). The price
is disk: S=160 takes 77 KB an image (ImageNet-1k train: 98 GB), so that S should fit in the page cache
for full speed; the 22,000 tiny_imagenet images at 64 px take 0.27 GB and go on the GPU whole.

`fit="crop"` (default) resizes the short side to S and keeps the central square: training crops come
from that square, and evaluation is exact when a val split is packed at `round(img_size / crop_pct)`
(resize, then center-crop img_size, as the engine's eval transform does). `fit="squash"` keeps the
whole image, aspect ratio not preserved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tlkit.data.gpu import DEFAULT_RATIO, _BatchLoader, augment_batch, nhwc_to_nchw

log = logging.getLogger("tlkit.data.packed")

PACK_FORMAT = "tlkit-pack"
PACK_VERSION = 1
PACK_HINT = "tlkit data pack --data DATA"  # the command that makes packs (tlkit/cli.py)
FITS = ("crop", "squash")


class PackError(ValueError):
    """A pack folder that is missing, unfinished, or does not match the run; one line for the user."""


# ---- writing ---------------------------------------------------------------------------------------------


def _resample(interpolation: str) -> int:
    from PIL import Image

    table = {
        "nearest": Image.NEAREST,
        "bilinear": Image.BILINEAR,
        "bicubic": Image.BICUBIC,
        "area": Image.BOX,
        "lanczos": Image.LANCZOS,
    }
    if interpolation not in table:
        raise ValueError(f"unknown interpolation {interpolation!r}; use one of {', '.join(table)}")
    return table[interpolation]


def resize_for_pack(
    image: np.ndarray, size: int, fit: str = "crop", interpolation: str = "bilinear", eval_for: int = 0
) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 uint8. `crop`: short side to `size` (PIL, anti-aliased when
    shrinking), then the central square; an image already `size` on its short side is not resampled.
    `squash`: the whole image to size x size.

    `eval_for` > 0 (val packs): resize exactly as the eval transform does (`cv2.resize` of the short side to
    `size`, as albumentations' SmallestMaxSize) and place the square so that its central `eval_for` crop is
    the eval transform's CenterCrop, pixel for pixel: evaluation on the pack equals the cpu path's."""
    from PIL import Image

    h, w = image.shape[:2]
    if fit == "squash":
        if (h, w) == (size, size):
            return np.ascontiguousarray(image)
        return np.asarray(Image.fromarray(image).resize((size, size), _resample(interpolation)))
    if fit != "crop":
        raise ValueError(f"unknown fit {fit!r}; use one of {', '.join(FITS)}")
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if eval_for:
        nh, nw = (size, nw) if h <= w else (nh, size)  # SmallestMaxSize's rounding
    if (nh, nw) != (h, w) and eval_for:
        import cv2

        from tlkit.data.transforms import _INTERPOLATIONS  # the eval transform's cv2 flags

        image = cv2.resize(image, (nw, nh), interpolation=_INTERPOLATIONS[interpolation])
    elif (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), _resample(interpolation)))
    top, left = (nh - size) // 2, (nw - size) // 2
    if 0 < eval_for <= size:  # CenterCrop(eval_for) of the resized image starts at (nh - eval_for) // 2
        top = (nh - eval_for) // 2 - (size - eval_for) // 2
        left = (nw - eval_for) // 2 - (size - eval_for) // 2
    return np.ascontiguousarray(image[top : top + size, left : left + size])


def _pack_rows(
    images_path: str, start: int, samples: list, size: int, fit: str, interpolation: str, eval_for: int = 0
) -> list:
    """Decode, resize and write rows start..start+len(samples); returns [(row, reason)] for failures."""
    from tlkit.data.datasets import ImageDataset
    from tlkit.data.io import ImageDecodeError

    out = np.load(images_path, mmap_mode="r+")
    reader = ImageDataset(samples)
    failed = []
    for k in range(len(samples)):
        try:
            out[start + k] = resize_for_pack(reader.load(k), size, fit, interpolation, eval_for)
        except ImageDecodeError as e:
            out[start + k] = 0
            failed.append((start + k, str(e)))
    out.flush()
    del out
    return failed


def default_pack_dir(name: str, split: str, size: int) -> Path:
    """`$TLKIT_PACKS/<dataset>/<split>-<size>` (default `packs/`, beside `runs/`)."""
    return Path(os.environ.get("TLKIT_PACKS", "packs")) / Path(str(name)).name / f"{split}-{size}"


def source_summary(samples: Sequence, root: str | os.PathLike) -> dict:
    """What a pack is made from: the files (relative to `root`) with their sizes, as one digest, plus the
    count, total bytes and newest mtime. Stat only, no reading: cheap next to a scan of the folders."""
    root = Path(root)
    digest = hashlib.sha256()
    total, newest = 0, 0
    for sample in samples:
        st = Path(sample.path).stat()
        total, newest = total + st.st_size, max(newest, st.st_mtime_ns)
        box = "" if getattr(sample, "box", None) is None else ",".join(map(str, sample.box))
        digest.update(f"{_relative(sample.path, root)}\t{st.st_size}\t{sample.target}\t{box}\n".encode())
    return {"files": len(samples), "bytes": total, "digest": digest.hexdigest(), "newest_mtime_ns": newest}


def check_source(meta: dict, samples: Sequence, root: str | os.PathLike, where: str | os.PathLike) -> None:
    """PackError (one line) unless the pack in `where` was made from exactly `samples`, unchanged since."""
    made = meta.get("source") or {}
    now = source_summary(samples, root)
    if not made:
        why = "it records no source (made by an older tlkit)"
    elif made["files"] != now["files"]:
        why = f"it holds {made['files']} images, the run's data lists {now['files']}"
    elif made["digest"] != now["digest"]:
        why = "the run's data lists other files, sizes or labels"
    elif now["newest_mtime_ns"] > made["newest_mtime_ns"]:
        why = "files of the data changed after packing"
    else:
        return
    raise PackError(f"pack {where} is stale: {why}; make it again with `tlkit data pack --data {root} --overwrite`")


def write_pack(
    samples: Sequence,
    class_ids: list[str],
    root: str | os.PathLike,
    out: str | os.PathLike,
    size: int,
    *,
    split: str = "",
    fit: str = "crop",
    interpolation: str = "bilinear",
    roi_crop: bool = False,
    layout: str = "auto",
    eval_for: int = 0,
    workers: int = -1,
    overwrite: bool = False,
    chunk: int = 512,
    on_rows: Callable[[int], None] | None = None,
) -> dict:
    """Decode `samples` (`datasets.Sample`s of `root`) once, resize to `size` (see `resize_for_pack`) and
    write the pack into folder `out`; returns its meta.json content. Unreadable files are counted and get
    label -1. Written into `<out>.partial`, then renamed: `out` is a whole pack or nothing. `eval_for`: a val
    pack for evaluation at that size (see `resize_for_pack`).
    `on_rows(n)` after each finished chunk of n rows (a progress bar). Runs on `workers` processes (-1: all)."""
    from tlkit.data.datasets import read_class_names

    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r}; use one of {', '.join(FITS)}")
    _resample(interpolation)
    size, root, out = int(size), Path(root), Path(out)
    if size < 8:
        raise ValueError(f"pack size {size} is too small")
    if (out / "meta.json").exists() and not overwrite:
        raise PackError(f"{out} already holds a pack; pass --overwrite to replace it")
    tmp = _partial(out)
    shutil.rmtree(tmp, ignore_errors=True)  # an interrupted earlier attempt
    tmp.mkdir(parents=True)
    n = len(samples)
    images = tmp / "images.npy"
    np.lib.format.open_memmap(images, mode="w+", dtype=np.uint8, shape=(n, size, size, 3)).flush()
    failed = _fill(images, list(samples), size, (fit, interpolation, eval_for), workers, chunk, on_rows)
    for _, reason in failed:
        log.warning("skipping unreadable image %s", reason)
    labels = np.array([s.target for s in samples], dtype=np.int64)
    labels[[row for row, _ in failed]] = -1
    np.save(tmp / "labels.npy", labels)
    (tmp / "files.txt").write_text("".join(_relative(s.path, root) + "\n" for s in samples))
    meta = {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "dataset": root.name,
        "split": split,
        "size": size,
        "fit": fit,
        "interpolation": interpolation,
        "roi_crop": roi_crop,
        "layout": layout,
        "eval_for": eval_for,
        "count": n,
        "failed": len(failed),
        "classes": read_class_names(root, class_ids),
        "class_ids": list(class_ids),
        "source": source_summary(samples, root),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    _swap_in(tmp, out)
    return meta


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished pack `tmp` at `out` (replacing an old pack there) with renames only."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _fill(images: Path, samples: list, size: int, how: tuple, workers: int, chunk: int, on_rows) -> list:
    """Write every row of the memmap `images`, in chunks over `workers` processes; returns the failures."""
    n = len(samples)
    if workers < 0:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    chunk = max(1, min(chunk, math.ceil(n / max(1, 4 * workers))))  # several chunks per worker: a live bar
    jobs = [(str(images), s, samples[s : s + chunk], size, *how) for s in range(0, n, chunk)]
    failed: list = []
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            failed += _pack_rows(*job)
            if on_rows:
                on_rows(len(job[2]))
        return failed
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(_pack_rows, *job): len(job[2]) for job in jobs}
        for future in as_completed(futures):
            failed += future.result()
            if on_rows:
                on_rows(futures[future])
    return sorted(failed)


def pack_split(
    root: str | os.PathLike,
    split: str,
    out: str | os.PathLike,
    size: int,
    *,
    fit: str = "crop",
    interpolation: str = "bilinear",
    class_ids: list[str] | None = None,
    max_classes: int = 0,
    max_per_class: int = 0,
    roi_crop: bool = False,
    layout: str = "auto",
    workers: int = -1,
    overwrite: bool = False,
    chunk: int = 512,
) -> dict:
    """Scan `root/split` (`scan_split`: any layout the datasets read) and `write_pack` it. `root` is a dataset
    folder or a name under the data root; `class_ids` fixes the class order (pack a val split with the train
    split's ids). `tlkit data pack` packs a recipe's data the way a run reads it (`data_path.pack_recipe_data`)."""
    from tlkit.data.datasets import scan_split
    from tlkit.paths import resolve_data

    root = resolve_data(root)
    samples, ids = scan_split(
        root,
        split,
        class_ids,
        max_classes=max_classes,
        max_per_class=max_per_class,
        roi_crop=roi_crop,
        layout=layout,
        ignore_unknown=bool(class_ids) and max_classes > 0,
    )
    return write_pack(
        samples,
        ids,
        root,
        out,
        size,
        split=split,
        fit=fit,
        interpolation=interpolation,
        roi_crop=roi_crop,
        layout=layout,
        workers=workers,
        overwrite=overwrite,
        chunk=chunk,
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def is_pack(path: str | os.PathLike) -> bool:
    return (Path(path) / "meta.json").is_file() and (Path(path) / "images.npy").is_file()


def remove_pack(path: str | os.PathLike) -> None:
    path = Path(path)
    shutil.rmtree(_partial(path), ignore_errors=True)
    if path.is_dir() and (path / "meta.json").exists():
        shutil.rmtree(path)


# ---- reading ---------------------------------------------------------------------------------------------


class PackedDataset(Dataset):
    """A pack, memory-mapped. Items look like `ImageDataset`'s, `(uint8 CHW tensor, target, 0)`, and a
    CPU `transform` (the albumentations presets) applies when set, seeded per (seed, epoch, index): the
    standard DataLoader path can read a pack with every recipe augmentation, minus the JPEG decode.
    Rows whose file could not be decoded at pack time are left out."""

    def __init__(self, path: str | os.PathLike, transform=None, *, seed: int = 0):
        path = Path(path)
        if not is_pack(path):
            hint = " (packing was interrupted: run it again)" if _partial(path).exists() else ""
            raise PackError(f"no pack in {path}{hint}; make one with `{PACK_HINT}`")
        self.path = path
        self.meta = json.loads((path / "meta.json").read_text())
        if self.meta.get("format") != PACK_FORMAT or self.meta.get("version", 0) > PACK_VERSION:
            raise PackError(f"{path} is not a tlkit pack this version can read")
        self.images = np.load(path / "images.npy", mmap_mode="r")
        labels = np.load(path / "labels.npy")
        self.rows = np.flatnonzero(labels >= 0)
        self.labels = labels[self.rows]
        self.size = int(self.meta["size"])
        self.classes: list[str] = list(self.meta["classes"])
        self.class_ids: list[str] = list(self.meta["class_ids"])
        self.transform = transform
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self.size * self.size * 3

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def targets(self) -> np.ndarray:
        return self.labels.copy()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = np.array(self.images[self.rows[index]])
        if self.transform is not None:
            seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
            image = self.transform(image, seed)
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), int(self.labels[index]), 0

    def read(self, indices, out: np.ndarray | None = None) -> np.ndarray:
        """Rows for dataset indices as (B, S, S, 3) uint8 (into `out` when given)."""
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        if out is None:
            return np.take(self.images, rows, axis=0)
        return np.take(self.images, rows, axis=0, out=out, mode="clip")  # "raise" would buffer `out`

    def all_pixels(self) -> np.ndarray:
        """Every readable row, in RAM (for `DeviceLoader`)."""
        return self.images[:] if len(self.rows) == len(self.images) else self.read(np.arange(len(self)))

    def check_classes(self, class_ids: list[str]) -> None:
        if list(class_ids) != self.class_ids:
            raise PackError(
                f"pack {self.path} was made for other classes ({len(self.class_ids)} vs {len(class_ids)} "
                f"expected, or another order); make it again with `{PACK_HINT} --overwrite`"
            )


class PackedLoader(_BatchLoader):
    """Batches straight from the memory map: host threads gather rows into (pinned) memory, one copy to
    the device, then random resized crop + flip there (`tlkit.data.gpu.augment_batch`).

    Yields `(float32 0..255 NCHW on device, targets on device, failed)`: the engine's `StepContext.prepare`
    normalises it as it does uint8 batches. `set_size` changes the output size (progressive resizing)."""

    def __init__(
        self,
        dataset: PackedDataset,
        *,
        batch_size: int,
        train: bool,
        size: int,
        device: torch.device | str = "cpu",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = DEFAULT_RATIO,
        hflip: float = 0.5,
        crop_pct: float = 1.0,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        weights=None,
        threads: int = 4,
        prefetch: int = 3,
        method: str = "roi_align",
    ):
        super().__init__(
            len(dataset),
            batch_size=batch_size,
            train=train,
            size=size,
            seed=seed,
            rank=rank,
            world=world,
            weights=weights,
        )
        self.dataset = dataset
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.threads, self.prefetch = max(1, threads), max(1, prefetch)
        self.aug = dict(scale=scale, ratio=ratio, hflip=hflip, crop_pct=crop_pct, method=method)

    def _submit(self, pool: ThreadPoolExecutor, idx: list[int]):
        s = self.dataset.size
        host = torch.empty((len(idx), s, s, 3), dtype=torch.uint8, pin_memory=self.pin)
        view = host.numpy()
        step = math.ceil(len(idx) / self.threads)
        parts = [
            pool.submit(self.dataset.read, idx[i : i + step], view[i : i + step]) for i in range(0, len(idx), step)
        ]
        return host, parts

    def __iter__(self):
        batches = list(self._batches())
        with ThreadPoolExecutor(self.threads) as pool:
            pending = [self._submit(pool, idx) for _, idx in batches[: self.prefetch]]
            for k, (b, idx) in enumerate(batches):
                host, parts = pending[k]
                pending[k] = None  # type: ignore[call-overload]
                for part in parts:
                    part.result()
                if k + self.prefetch < len(batches):
                    pending.append(self._submit(pool, batches[k + self.prefetch][1]))
                images = host.to(self.device, non_blocking=True)
                targets = torch.from_numpy(self.dataset.labels[idx]).to(self.device, non_blocking=True)
                out = augment_batch(
                    nhwc_to_nchw(images), self.size, train=self.train, generator=self._generator(b), **self.aug
                )
                yield out, targets, self.failed_zeros(len(idx), b)


def main(argv: list[str] | None = None) -> None:
    """`python -m tlkit.data.packed ROOT SPLIT OUT SIZE`: one split (`tlkit data pack` packs a recipe's data)."""
    import argparse
    import time

    p = argparse.ArgumentParser(description="Pack a dataset split into a uint8 memory-mapped store.")
    p.add_argument("root", help="dataset folder, or a name under the data root")
    p.add_argument("split")
    p.add_argument("out")
    p.add_argument("size", type=int)
    p.add_argument("--fit", choices=FITS, default="crop")
    p.add_argument("--interpolation", default="bilinear")
    p.add_argument("--class-ids-from", help="a pack whose class list to use (pack val with train's ids)")
    p.add_argument("--max-classes", type=int, default=0)
    p.add_argument("--max-per-class", type=int, default=0)
    p.add_argument("--roi-crop", action="store_true")
    p.add_argument("--workers", type=int, default=-1)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    ids = PackedDataset(args.class_ids_from).class_ids if args.class_ids_from else None
    t0 = time.perf_counter()
    meta = pack_split(
        args.root,
        args.split,
        args.out,
        args.size,
        fit=args.fit,
        interpolation=args.interpolation,
        class_ids=ids,
        max_classes=args.max_classes,
        max_per_class=args.max_per_class,
        roi_crop=args.roi_crop,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    gib = meta["count"] * meta["size"] ** 2 * 3 / 2**30
    print(
        f"packed {meta['count']} images ({meta['failed']} unreadable) of {len(meta['class_ids'])} classes "
        f"at {meta['size']} px into {args.out}: {gib:.2f} GiB in {time.perf_counter() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
