"""What a training run leaves in its folder: its name, the checkpoint it saves, and rank 0's files
(config.yaml, metrics.jsonl, TensorBoard events, training_curves.png, summary.json).

Units: accuracies (`val_top1`, `val_top5`, `best_top1`) are fractions in every file, as in a report's
metrics.json; only printed text shows percent.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

from tlkit.checkpoint import atomic_write, build_meta, disk_full_names, json_safe, remove_stale_temp_files
from tlkit.config import Recipe, to_dict, to_yaml
from tlkit.distributed import broadcast_object
from tlkit.paths import runs_dir
from tlkit.run import Run, rng_state


def run_name(recipe: Recipe, kind: str) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    label = kind if kind == "pretrain" else f"{kind}-{recipe.name}"
    return f"{label}-{recipe.model.arch}-{stamp}"


def open_run_dir(run: Run) -> tuple[Path, bool]:
    """(folder, made now): a resumed run's own folder; else `train.out` or runs/<run_name>, named by rank 0
    (every rank agrees). Created only once data and model are built: a bad --data or --init leaves no empty
    folder behind. Temp files of writes a kill interrupted there before are deleted (rank 0)."""
    if run.resumed_from is not None:
        run_dir, made = run.resumed_from.parent, False
    else:
        name = run.recipe.train.out or str(runs_dir() / run_name(run.recipe, run.kind))
        run_dir = Path(broadcast_object(name, run.info))
        made = not run_dir.exists()
    if run.info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(run_dir)
    return run_dir, made


def discard_unfinished(run_dir: Path, made: bool) -> None:
    """After a failure: remove the folder this run made if it holds no checkpoint yet (only config.yaml,
    metrics.jsonl, tb/), so a run that never trained an epoch leaves nothing half-made behind."""
    if made and run_dir.is_dir() and not any(run_dir.glob("*.pt")):
        shutil.rmtree(run_dir, ignore_errors=True)


# ---- checkpoints -----------------------------------------------------------------------------------------------


def checkpoint_meta(run: Run) -> dict:
    """What every checkpoint of this run says about itself (`checkpoint.build_meta`)."""
    recipe, data = run.recipe, run.data.bundle
    return build_meta(
        kind=run.kind,
        task=recipe.task,
        arch=recipe.model.arch,
        classes=data.classes,
        class_ids=data.class_ids,
        preprocessing=run.pre.to_dict(),
        recipe=to_dict(recipe),
        data_root=data.root,
        init=run.init_info.get("init", "scratch"),
        world_size=run.info.world,
    )


def training_state(run: Run, meta: dict, *, epoch: int, step_in_epoch: int, extra: dict | None = None) -> dict:
    """A checkpoint: `meta`, the weights, and all a resumed run needs to continue exactly (`run._restore`).
    `step_in_epoch` 0 means `epoch` is complete; else that many of its batches are trained."""
    return {
        **meta,
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict() if run.ema else None,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "best_top1": run.state.best_top1,
        "history": run.state.history,
        "rng": rng_state(),
        "ema_updates": run.ema.updates if run.ema else 0,  # the EMA's warmup continues where it was
        "saved_at": datetime.now().isoformat(timespec="seconds"),
        **(extra or {}),
    }


# ---- rank 0's files ----------------------------------------------------------------------------------------------


def epoch_line(row: dict) -> str:
    """One printed line per epoch; accuracies in percent."""
    parts = [f"Epoch {row['epoch']}", f"train_loss {row['train_loss']:.4f}"]
    if "val_loss" in row:
        parts.append(f"val_loss {row['val_loss']:.4f}")
    parts += [f"{key} {100 * row[key]:.2f}%" for key in ("val_top1", "val_top5") if key in row]
    if "val_auroc" in row:
        parts.append(f"val_auroc {row['val_auroc']:.4f}")
    parts += [f"lr {row['lr']:.4g}", f"img/s {row['img_per_s']:.0f}", f"{row['seconds']:.0f}s"]
    return ", ".join(parts)


class RunWriters:
    """Rank 0's files; on other ranks every method does nothing."""

    def __init__(self, run_dir: Path, recipe: Recipe, meta: dict, *, enabled: bool, history: list[dict]):
        self.enabled, self.run_dir, self.tb, self.trackers = enabled, run_dir, None, None
        if not enabled:
            return
        header = f"# tlkit {meta['tlkit_version']}  git {meta['git_sha'] or 'unknown'}  seed {recipe.train.seed}\n"
        write_text(run_dir / "config.yaml", header + to_yaml(recipe))
        # A resumed run rewrites the rows its checkpoint knows: a kill between saving last.pt and
        # appending the epoch's row (or after appending it) then neither loses nor repeats a row.
        write_text(run_dir / "metrics.jsonl", "".join(json_line(row) for row in history))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb")) if "tensorboard" in recipe.train.loggers else None
        except ImportError:  # tensorboard is optional on lean GPU images
            self.tb = None
        from tlkit.trackers import open_trackers

        # MLflow / W&B (`train.loggers`): params now, a row per epoch, the report when workflows finishes them
        self.trackers = open_trackers(run_dir, recipe)

    def epoch(self, row: dict) -> None:
        if not self.enabled:
            return
        with disk_full_names(self.run_dir), (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json_line(row))
        if self.tb is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, row["epoch"])
            self.tb.flush()
        if self.trackers is not None:
            self.trackers.epoch(row)

    def close(self, summary: dict) -> None:
        """summary.json, and the curves of metrics.jsonl as a PNG."""
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        try:
            from tlkit.report import plot_training_curves

            with disk_full_names(self.run_dir):
                plot_training_curves(self.run_dir / "metrics.jsonl", self.run_dir / "training_curves.png")
        except ImportError:
            pass
        write_text(self.run_dir / "summary.json", json.dumps(json_safe(summary), indent=2))


def json_line(row: dict) -> str:
    """One metrics.jsonl row: a non-finite number is `null`, never a bare `NaN` (not JSON)."""
    return json.dumps(json_safe(row), allow_nan=False) + "\n"


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))
