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

import hashlib
import os
import tempfile
from datetime import datetime
from pathlib import Path

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


def save_checkpoint(obj: dict, path: str | Path) -> Path:
    """Write to a temp file in the same folder, fsync, then rename: a kill mid-write never leaves a
    truncated `last.pt` behind, the previous one stays intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {path}: {reason[:200]}") from None


def load_tlkit_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    ckpt = load_checkpoint(path, map_location, mmap=mmap)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tlkit checkpoint (plain weights go to --init)")
    return ckpt


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
