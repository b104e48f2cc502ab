"""Checkpoints: written atomically, loaded with `weights_only=True`, self-describing.

A tlkit checkpoint is a plain dict of tensors and primitive types:
`format="tlkit"`, `version`, `tlkit_version`, `git_sha`, `task`, `arch`, `classes`, `class_ids`,
`preprocessing`, `recipe`, `model`, `ema`, `optimizer`, `scheduler`, `epoch`, `step`, `best_top1`, `rng`,
plus task extras (`threshold`, `temperature`, `positive_index`, `val_metrics`, `anomaly`).
Everything loads with `torch.load(weights_only=True)`: no pickled classes, so a checkpoint from an
untrusted source cannot run code, and it loads anywhere tlkit or plain torch+timm is installed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FORMAT = "tlkit"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit; the message is one line."""


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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        for name in ("last.pt", "best.pt"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {path}: {reason[:200]}") from None


def load_tlkit_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    ckpt = load_checkpoint(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tlkit checkpoint (plain weights go to --init)")
    return ckpt
