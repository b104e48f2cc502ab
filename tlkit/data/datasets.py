"""Finding images and labels on disk: ILSVRC-2012 (both releases) and any ImageFolder tree.

Accepted layouts for a dataset root `R` and a split `S` (train / val):
- `R/S/<class>/*` (ILSVRC "val prepared", Tiny ImageNet here, GTSRB, chest_xray, any ImageFolder tree);
- `R/S/*.JPEG` + `R/LOC_val_solution.csv` (the flat val folder of the ILSVRC/Kaggle release);
- `R/ILSVRC/Data/CLS-LOC/S/...` (the Kaggle archive unpacked as is);
- `R` itself a split folder (`R/<class>/*`), e.g. `tlkit evaluate --data path/to/val`;
- with `layout="clips"`: `R/S/<clip>/NNN.jpg` (+ `labels.csv` frame,label) video frames, classes normal /
  abnormal (UCSD Ped2 layout; a clip without labels.csv is all normal);
- with `layout="csv"` (or `R` a `.csv` file): `R` lists `path,label[,split]`, paths relative to the CSV; classes
  are the sorted labels of the train split; without a `split` column the rows are the split asked for (a
  labelled list to evaluate), and training has no val split.
Display names come from `LOC_synset_mapping.txt`, `classes.txt` or `classes.csv` when present.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tlkit.config import LAYOUTS  # the one list of layouts; the recipe check and the scan read it
from tlkit.data.clips import load_clips
from tlkit.data.io import ImageDecodeError, is_image_file, load_rgb_array

log = logging.getLogger("tlkit.data")


class DataError(ValueError):
    """The data folder does not have a layout tlkit can read; the message says what was expected."""


@dataclass(frozen=True)
class Sample:
    path: Path
    target: int
    box: tuple[int, int, int, int] | None = None  # x1, y1, x2, y2 (ROI crop)


SPLIT_NAMES = ("train", "val", "test")
CLIP_CLASSES = ["normal", "abnormal"]  # labels.csv 0 / 1


def has_split(root: Path, split: str) -> bool:
    if is_csv(root):
        return split in _csv_splits(Path(root))
    return (_dataset_base(Path(root)) / split).is_dir()


# ---- csv layout: path,label[,split] ------------------------------------------------------------------------


def is_csv(root: Path | str) -> bool:
    return Path(root).suffix.lower() == ".csv" and Path(root).is_file()


def _csv_rows(path: Path) -> tuple[list[dict[str, str]], bool]:
    """(rows, has a split column); the header must name `path` and `label`."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            if not {"path", "label"} <= set(columns):
                raise DataError(f"{path} needs a header row path,label[,split]; found: {','.join(columns) or 'none'}")
            reader.fieldnames = columns
            return list(reader), "split" in columns
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _csv_splits(path: Path) -> set[str]:
    rows, with_split = _csv_rows(path)
    return {(r.get("split") or "").strip() for r in rows} if with_split else set()


def _csv_pairs(path: Path, split: str) -> tuple[list[tuple[Path, str]], list[str]]:
    """(image, label) pairs of `split` (every row when there is no split column), and their sorted labels.
    A row without a path or label is skipped and counted; a missing file is counted when it fails to load."""
    rows, with_split = _csv_rows(path)
    pairs, skipped = [], 0
    for row in rows:
        file, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not file or not label:
            skipped += 1
        elif not with_split or (row.get("split") or "").strip() == split:
            pairs.append((path.parent / file, label))  # an absolute path stays absolute
    if skipped:
        log.warning("skipped %d unreadable row(s) of %s (no path or no label)", skipped, path)
    if not pairs:
        splits = ", ".join(sorted(_csv_splits(path))) or "none"
        raise DataError(f"no rows for split {split!r} in {path} (splits in its split column: {splits})")
    return pairs, sorted({label for _, label in pairs})


def _dataset_base(root: Path) -> Path:
    kaggle = root / "ILSVRC" / "Data" / "CLS-LOC"
    return kaggle if kaggle.is_dir() else root


def find_split_dir(root: Path, split: str) -> Path:
    """`root/split` in any accepted layout; `root` itself when it is already a split folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    candidate = _dataset_base(root) / split
    if candidate.is_dir():
        return candidate
    if _class_dirs(root) and not any((root / s).is_dir() for s in SPLIT_NAMES):
        return root
    raise DataError(
        f"no '{split}' folder in {root} and it has no class subfolders; "
        f"expected {root}/{split}/<class>/*.jpg (ImageNet/ImageFolder layout)"
    )


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_class_names(root: Path, class_ids: list[str]) -> list[str]:
    """Human-readable names for folder ids (wnids, GTSRB ids); the id itself when nothing maps it."""
    names: dict[str, str] = {}
    for base in (root, root.parent):
        mapping = base / "LOC_synset_mapping.txt"
        classes_txt = base / "classes.txt"
        classes_csv = base / "classes.csv"
        if mapping.is_file() or classes_txt.is_file():
            for line in (mapping if mapping.is_file() else classes_txt).read_text().splitlines():
                wnid, _, name = line.strip().partition(" ")
                if wnid:
                    # ILSVRC names list synonyms ("goldfish, Carassius auratus"); the first reads best.
                    names[wnid] = name.split(",")[0].strip() or wnid
            break
        if classes_csv.is_file():
            with classes_csv.open(newline="") as f:
                for row in csv.DictReader(f):
                    cid = (row.get("class_id") or row.get("id") or "").strip()
                    if cid.isdigit():
                        names[cid] = row.get("name", cid)
                        names[f"{int(cid):02d}"] = row.get("name", cid)
                        names[f"{int(cid):05d}"] = row.get("name", cid)
            break
    return [names.get(cid, cid) for cid in class_ids]


def boxes_file(root: Path, split: str, split_dir: Path) -> Path:
    """`<split>_labels.csv` beside the split folder (in the dataset root), also when the split folder itself was
    given (`--data gtsrb/val` finds gtsrb/val_labels.csv). None found -> DataError: a model trained on box crops
    must not silently see whole frames (`data.roi_crop`)."""
    for path in (split_dir.parent / f"{split_dir.name}_labels.csv", Path(root) / f"{split}_labels.csv"):
        if path.is_file():
            return path
    raise DataError(
        f"roi_crop is on (the model sees each image cropped to its box) but there is no {split_dir.name}_labels.csv "
        f"beside {split_dir}; add the box file (filename, roi_x1, roi_y1, roi_x2, roi_y2) or, for a new run, "
        "--set data.roi_crop=false"
    )


def read_boxes(path: Path) -> dict[str, tuple[int, int, int, int]]:
    """ROI boxes from a GTSRB-style CSV (filename, roi_x1..roi_y2), by file name."""
    boxes = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if {"roi_x1", "roi_y1", "roi_x2", "roi_y2"} <= row.keys():
                box = tuple(int(row[k]) for k in ("roi_x1", "roi_y1", "roi_x2", "roi_y2"))
                boxes[Path(row["filename"]).name] = box  # type: ignore[assignment]
    return boxes


def _flat_val_samples(split_dir: Path, root: Path, class_ids: list[str]) -> list[tuple[Path, str]]:
    solution = next(
        (p for p in (root / "LOC_val_solution.csv", split_dir.parent / "LOC_val_solution.csv") if p.is_file()),
        None,
    )
    if solution is None:
        return []
    index = {p.stem: p for p in split_dir.iterdir() if is_image_file(p)}
    pairs = []
    with solution.open(newline="") as f:
        for row in csv.DictReader(f):
            path = index.get(row["ImageId"])
            if path is not None:
                pairs.append((path, row["PredictionString"].split()[0]))
    return pairs


def _clip_pairs(
    split_dir: Path, only: Collection[str] | None, skip: Collection[str]
) -> tuple[list[tuple[Path, str]], list[str]]:
    """(frame, normal|abnormal) pairs of the clips in `split_dir`: those in `only` (all if None), minus `skip`."""
    try:
        clips = load_clips(split_dir)
    except ValueError as e:
        raise DataError(str(e)) from None
    missing = sorted(set(only or ()) - {c.name for c in clips})
    if missing:
        raise DataError(f"no clip(s) {', '.join(missing)} in {split_dir}; clips: {', '.join(c.name for c in clips)}")
    pairs = []
    for clip in clips:
        if (only is not None and clip.name not in only) or clip.name in skip:
            continue
        labels = clip.labels if clip.labels is not None else np.zeros(len(clip), dtype=np.int64)
        pairs.extend((frame, CLIP_CLASSES[int(label > 0)]) for frame, label in zip(clip.frames, labels, strict=True))
    return pairs, [c for c in CLIP_CLASSES if any(cid == c for _, cid in pairs)]


def scan_split(
    root: Path,
    split: str,
    classes: list[str] | None = None,
    *,
    max_classes: int = 0,
    max_per_class: int = 0,
    roi_crop: bool = False,
    ignore_unknown: bool = False,
    layout: str = "auto",
    clips: Collection[str] | None = None,
    skip_clips: Collection[str] = (),
) -> tuple[list[Sample], list[str]]:
    """List (path, target) for a split. `classes` fixes the class order (e.g. the train split's or a
    checkpoint's); classes in the data that it does not know are an error, not silently dropped,
    unless `ignore_unknown` (a run on the first `max_classes` classes). With `layout="clips"`, frames
    of the clips named in `clips` (default all) except `skip_clips`, as normal / abnormal."""
    if layout not in LAYOUTS:
        raise DataError(f"unknown data layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    root = Path(root)
    if layout == "csv" or (layout == "auto" and is_csv(root)):
        if not is_csv(root):
            raise DataError(f"data.layout csv reads a .csv file (path,label[,split]); {root} is not one")
        layout, split_dir = "csv", root  # the CSV stands where a split folder would
    else:
        split_dir = find_split_dir(root, split) if layout == "auto" else _dataset_base(root) / split
    if layout == "clips" and not split_dir.is_dir():
        split_dir = root  # a folder of clips (or one clip) given directly, as `tlkit evaluate --data` allows
    class_dirs = _class_dirs(split_dir) if layout == "auto" else []
    pairs: list[tuple[Path, str]] = []
    if layout == "clips":
        pairs, found = _clip_pairs(split_dir, clips, skip_clips)
        classes = list(CLIP_CLASSES) if classes is None else classes
    elif layout == "csv":
        pairs, found = _csv_pairs(root, split)
    elif class_dirs:
        found = [d.name for d in class_dirs]
        # List files only in the folders that can be used: a smoke run on 5 classes of ImageNet
        # must not walk all 1000 folders first.
        wanted = set(classes) if classes is not None else set(found[:max_classes]) if max_classes else None
        for d in class_dirs:
            if wanted is not None and d.name not in wanted:
                continue
            files = sorted(p for p in d.rglob("*") if p.is_file() and is_image_file(p))
            pairs.extend((p, d.name) for p in files)
    else:
        pairs = _flat_val_samples(split_dir, root, classes or [])
        found = sorted({c for _, c in pairs})
        if not pairs:
            raise DataError(f"{split_dir} has no class subfolders and no LOC_val_solution.csv next to it")
    if classes is None:
        classes = found[:max_classes] if max_classes else found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown and not ignore_unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise DataError(
                f"{split_dir} has {len(unknown)} class(es) the model does not know: {shown} "
                f"(model classes: {', '.join(classes[:5])}{' ...' if len(classes) > 5 else ''})"
            )
    index = {c: i for i, c in enumerate(classes)}
    box_csv = boxes_file(root, split, split_dir) if roi_crop else None
    boxes = read_boxes(box_csv) if box_csv else {}
    per_class: dict[int, list[Sample]] = {i: [] for i in range(len(classes))}
    for path, cid in pairs:
        if cid in index:
            per_class[index[cid]].append(Sample(path, index[cid], boxes.get(path.name)))
    if box_csv is not None:
        unboxed = [s.path.name for ss in per_class.values() for s in ss if s.box is None]
        if unboxed:
            raise DataError(f"{len(unboxed)} image(s) in {split_dir} have no box in {box_csv} (e.g. {unboxed[0]})")
    # A class folder that exists but holds no images is a broken dataset, not a class to drop quietly.
    empty = [c for c in found if c in index and not per_class[index[c]]]
    if empty:
        raise DataError(f"class folder(s) with no images in {split_dir}: {', '.join(empty[:5])}")
    samples = []
    for i in range(len(classes)):
        samples.extend(per_class[i][:max_per_class] if max_per_class else per_class[i])
    if not samples:
        raise DataError(f"no images found in {split_dir}")
    return samples, list(classes)


def crop_to_box(image: np.ndarray, box: tuple[int, int, int, int] | None) -> np.ndarray:
    """The ROI (x1, y1, x2, y2) cut from an HxWx3 image, clipped to it; the whole image when there is no box
    or the box is degenerate (under 4 px)."""
    if box is None:
        return image
    x1, y1, x2, y2 = box
    h, w = image.shape[:2]
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    return image[y1:y2, x1:x2] if x2 - x1 >= 4 and y2 - y1 >= 4 else image


class ImageDataset(Dataset):
    """Decodes and augments one sample; an unreadable file is replaced by the next readable one and
    counted (the third item of each sample), so a bad file never stops an epoch or changes batch shapes.

    Augmentation randomness is seeded per (seed, epoch, index): results do not depend on the number of
    workers, and a resumed run replays exactly the same augmentations.
    """

    def __init__(self, samples: list[Sample], transform=None, *, seed: int = 0, max_retries: int = 16):
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.max_retries = max_retries

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int) -> np.ndarray:
        sample = self.samples[index]
        return crop_to_box(load_rgb_array(sample.path), sample.box)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        failed = 0
        for attempt in range(self.max_retries):
            i = (index + attempt) % len(self.samples)
            try:
                image = self.load(i)
            except ImageDecodeError as e:
                failed += 1
                log.warning("skipping unreadable image %s", e)
                continue
            if self.transform is not None:
                seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
                image = self.transform(image, seed)
            tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # uint8 CHW
            return tensor, self.samples[i].target, failed
        raise DataError(f"{self.max_retries} unreadable images in a row near {self.samples[index].path}")

    def targets(self) -> np.ndarray:
        return np.array([s.target for s in self.samples], dtype=np.int64)
