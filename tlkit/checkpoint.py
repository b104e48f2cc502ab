"""Checkpoints: written atomically, loaded with `weights_only=True`, self-describing.

A tlkit checkpoint is a plain dict of tensors and primitive types:
`format="tlkit"`, `version`, `tlkit_version`, `git_sha`, `task`, `arch`, `classes`, `class_ids`,
`preprocessing`, `recipe`, `model`, `ema`, `optimizer`, `scheduler`, `epoch`, `step_in_epoch`, `best_top1`,
`history`, `rng`, plus task extras (`threshold`, `temperature`, `positive_index`, `val_metrics`, `anomaly`).
Accuracies (`best_top1`, `history`'s `val_top1`) are fractions, as in every file tlkit writes.
Everything loads with `torch.load(weights_only=True)`: no pickled classes, so a checkpoint from an
untrusted source cannot run code, and it loads anywhere tlkit or plain torch+timm is installed.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import torch

FORMAT = "tlkit"
VERSION = 1

# The one rule from a run folder to a file: everything that *uses* a model (evaluate, predict, explain, export,
# demo, --init) reads best.pt, the checkpoint that was calibrated and reported; only --resume reads last.pt.
BEST, LAST = "best.pt", "last.pt"

# What a checkpoint carries only to continue training; dropped from the metadata view (`read_meta`).
TRAINING_STATE = ("optimizer", "scheduler", "rng", "partial", "history")
WEIGHTS = ("model", "ema", "anomaly")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit; the message is one line."""


class DiskFullError(ValueError):
    """A write into a run folder failed for lack of space (ENOSPC) or quota (EDQUOT); one line naming the folder."""

    def __init__(self, folder: str | Path, what: str = ""):
        self.folder = Path(folder)
        written = f" writing {what}" if what else ""
        super().__init__(
            f"disk full{written}: no space left in {self.folder} (files already there are intact); "
            "free some space or write the run elsewhere with --out"
        )


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception's chain: torch's zip writer reports a failed write as a
    RuntimeError ("unexpected pos ...") whose context holds the OSError."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


@contextmanager
def disk_full_names(folder: Path | None) -> Iterator[None]:
    """A disk-full error (ENOSPC/EDQUOT) raised by any write inside -> `DiskFullError` naming `folder`."""
    try:
        yield
    except DiskFullError:
        raise
    except BaseException as e:
        if folder is not None and is_disk_full(e):
            raise DiskFullError(folder) from None
        raise


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) as None: JSON has no NaN, and a bare `NaN` in
    metrics.jsonl or a `tlkit predict` line breaks every strict parser downstream."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the `.<name>.*.tmp` files that `atomic_write` leaves when the process is killed mid-write
    (each can be a whole checkpoint). Called when a run starts again in its folder, before anything writes."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def build_meta(
    *,
    kind: str,
    task: str,
    arch: str,
    classes: list[str],
    class_ids: list[str],
    preprocessing: dict,
    recipe: dict,
    data_root: str,
    init: str,
    world_size: int = 1,
) -> dict:
    """What every tlkit checkpoint says about itself, whatever the task: built here and nowhere else."""
    from tlkit import __version__
    from tlkit.paths import git_sha

    return {
        "format": FORMAT,
        "version": VERSION,
        "tlkit_version": __version__,
        "git_sha": git_sha(),
        "kind": kind,
        "task": task,
        "arch": arch,
        "classes": list(classes),
        "class_ids": list(class_ids),
        "preprocessing": preprocessing,
        "recipe": recipe,
        "data_root": data_root,
        "init": init,
        "world_size": world_size,
        "saved_at": datetime.now().isoformat(timespec="seconds"),
    }


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: each key, then its tensor's bytes in logical (contiguous) order. Every rank of a
    DDP run reports its own at the end (`summary.json: weights_sha256`); in sync, they all equal last.pt's."""
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """`write(file)` into a temp file in the same folder, fsync, then rename over `path`: a kill mid-write
    never leaves a truncated file behind, the previous one stays intact (a kill -9 leaves the temp file,
    which `remove_stale_temp_files` deletes at the next start). Disk full -> `DiskFullError` naming the folder.
    Every checkpoint and every file of a run folder that is rewritten goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if is_disk_full(e):
            raise DiskFullError(path.parent, path.name) from None
        raise
    return path


def save_checkpoint(obj: dict, path: str | Path) -> Path:
    """`obj` written atomically (`atomic_write`); weights that are not finite (a diverged run) are refused,
    so no NaN checkpoint ever replaces a good one or becomes best.pt."""
    bad = non_finite_weights(obj)
    if bad:
        raise CheckpointError(f"not saving {Path(path).name}: {bad}")
    return atomic_write(path, lambda f: torch.save(obj, f))


def non_finite_weights(ckpt: dict) -> str:
    """'' when every floating tensor of the weights (`model`, `ema`) is finite; else which one is not."""
    for part in ("model", "ema"):
        state = ckpt.get(part)
        if not isinstance(state, dict):
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"{part} weight {key} holds NaN or inf"
    return ""


def resolve_checkpoint(path: str | Path, *, resume: bool = False) -> Path:
    """A checkpoint file as given; a run folder means its best.pt (its last.pt when resuming)."""
    path = Path(path)
    if path.is_dir():
        name = LAST if resume else BEST
        if not (path / name).is_file():
            what = "nothing to resume" if resume else "no trained checkpoint"
            raise CheckpointError(f"{what} in {path}: no {name}")
        return path / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    path = resolve_checkpoint(path)
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not (mmap and "mmap can only be used" in str(e)):
                raise
            # a legacy (non-zip) file cannot be memory-mapped: read it whole, still weights-only
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(_load_failure(path, e)) from None


def _load_failure(path: Path, error: Exception) -> str:
    """One line for a file torch.load(weights_only=True) refused or could not read. torch's own text for a
    refused pickle is a paragraph advising weights_only=False; what the user needs is that the file holds code."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)  # the class or function the pickle would have called
    if found:
        return (
            f"refused {path}: it holds pickled Python objects ({found.group(1)}) besides tensors, which could run "
            "code when unpickled; tlkit only loads plain tensors (torch.load weights_only=True), so nothing was loaded"
        )
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # weights-only failures put the reason on a later line ("Unsupported operand 110"), not the first
    detail = [ln for ln in lines if ln.startswith(("Unsupported", "WeightsUnpickler"))]
    reason = (detail or lines or [type(error).__name__])[0]
    return f"cannot load {path}: not a readable checkpoint ({reason})"


def load_tlkit_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    ckpt = load_checkpoint(path, map_location, mmap=mmap)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tlkit checkpoint (plain weights go to --init)")
    check_meta(ckpt, path)
    return ckpt


def check_meta(ckpt: dict, path: str | Path) -> None:
    """What a checkpoint says about itself is usable: class lists of strings of one length, preprocessing with
    sane values. A hand-edited file fails here with one line, not deep inside a model or a transform."""
    classes, class_ids = ckpt.get("classes"), ckpt.get("class_ids", ckpt.get("classes"))
    if not isinstance(ckpt.get("arch"), str) or not ckpt["arch"]:
        raise CheckpointError(f"{path}: no architecture recorded ('arch')")
    for name, value in (("classes", classes), ("class_ids", class_ids)):
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise CheckpointError(f"{path}: '{name}' must be a non-empty list of names")
    if len(classes) != len(class_ids):
        raise CheckpointError(f"{path}: {len(classes)} classes but {len(class_ids)} class_ids")
    pre = ckpt.get("preprocessing")
    problem = _preprocessing_problem(pre) if isinstance(pre, dict) else "missing"
    if problem:
        raise CheckpointError(f"{path}: preprocessing {problem}")


def _preprocessing_problem(pre: dict) -> str:
    size, crop = pre.get("img_size"), pre.get("crop_pct", 0.875)
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 4096:
        return f"img_size {size!r} is not a size in pixels (8..4096)"
    if not isinstance(crop, int | float) or not 0 < crop <= 1:
        return f"crop_pct {crop!r} is not in (0, 1]"
    for key in ("mean", "std"):
        value = pre.get(key, (0.5, 0.5, 0.5))
        ok = isinstance(value, list | tuple) and len(value) == 3
        if not ok or not all(isinstance(v, int | float) and math.isfinite(v) for v in value):
            return f"{key} {value!r} is not three numbers"
        if key == "std" and min(value) <= 0:
            return f"std {value!r} must be positive"
    from tlkit.data.transforms import _INTERPOLATIONS

    if pre.get("interpolation", "bilinear") not in _INTERPOLATIONS:
        return f"interpolation {pre.get('interpolation')!r} is not one of {', '.join(_INTERPOLATIONS)}"
    if pre.get("crop_mode", "center") not in ("center", "squash"):
        return f"crop_mode {pre.get('crop_mode')!r} is not center or squash"
    return ""


def strip(ckpt: dict, *, weights: bool = True) -> dict:
    """The checkpoint without its training state (and without its weights unless `weights=False`)."""
    drop = TRAINING_STATE + (WEIGHTS if weights else ())
    return {k: v for k, v in ckpt.items() if k not in drop}


def read_meta(path: str | Path) -> dict:
    """A checkpoint's metadata without reading its weights into memory (the file is memory-mapped)."""
    return strip(load_tlkit_checkpoint(path, mmap=True))


# ---- finding runs -------------------------------------------------------------------------------------------


def find_runs(root: Path | None = None, *, kind: str | None = None, recipe: str | None = None) -> list[Path]:
    """best.pt of every run under `root` (default: the runs folder), newest first, chosen by what the
    checkpoint records (its kind and recipe name), not by the folder's name: a run made with `--out` is
    found too, and `surveillance` never matches a `surveillance-supervised` run."""
    from tlkit.paths import runs_dir

    root = Path(root) if root is not None else runs_dir()
    found = []
    for path in root.glob(f"*/{BEST}"):
        try:
            meta = read_meta(path)
        except CheckpointError:
            continue  # a half-written or foreign file is not a run to pick
        if kind is not None and meta.get("kind") != kind:
            continue
        if recipe is not None and (meta.get("recipe") or {}).get("name") != recipe:
            continue
        found.append(path)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def newest_run(root: Path | None = None, *, kind: str | None = None, recipe: str | None = None) -> Path | None:
    runs = find_runs(root, kind=kind, recipe=recipe)
    return runs[0] if runs else None
