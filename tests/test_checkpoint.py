"""checkpoint.py owns the checkpoint: one metadata builder, metadata without weights, one rule from a run
folder to a file, and runs found by the recipe recorded in them rather than by their folder names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tlkit.checkpoint import (
    CheckpointError,
    build_meta,
    find_runs,
    newest_run,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)


def make_run(runs: Path, folder: str, *, recipe: str, kind: str = "finetune", age: int = 0, last: bool = True) -> Path:
    """A run folder with a real (tiny) best.pt/last.pt whose metadata names `recipe` and `kind`; `age` orders
    the runs by modification time (higher = newer)."""
    meta = build_meta(
        kind=kind,
        task="classify",
        arch="resnet10t",
        classes=["a", "b"],
        class_ids=["a", "b"],
        preprocessing={"img_size": 32},
        recipe={"name": recipe},
        data_root="data",
        init="scratch",
    )
    run = runs / folder
    state = {**meta, "model": {"fc.weight": torch.ones(2, 4)}, "optimizer": {"state": {}}, "rng": {}}
    best = save_checkpoint({**state, "epoch": 2}, run / "best.pt")
    if last:
        save_checkpoint({**state, "epoch": 3}, run / "last.pt")
    os.utime(best, (1_000_000 + age, 1_000_000 + age))
    return best


def test_runs_are_found_by_the_recipe_they_record(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    one_class = make_run(runs, "finetune-surveillance-resnet18-1", recipe="surveillance", age=1)
    # newer, and its folder name starts with "finetune-surveillance-": a name glob would pick it
    supervised = make_run(runs, "finetune-surveillance-supervised-resnet18-2", recipe="surveillance-supervised", age=2)
    assert newest_run(runs, recipe="surveillance") == one_class
    assert newest_run(runs, recipe="surveillance-supervised") == supervised

    # a run made with --out (any folder name) is found by its recipe, and the newest one wins
    custom = make_run(runs, "my-xray-run", recipe="medical", age=5)
    older = make_run(runs, "finetune-medical-resnet10t-0", recipe="medical", age=3)
    assert find_runs(runs, recipe="medical") == [custom, older]

    # kind separates pretraining runs (the default init) from fine-tunes of the same recipe
    pre = make_run(runs, "imagenet-long", recipe="imagenet", kind="pretrain", age=4)
    make_run(runs, "finetune-imagenet-x", recipe="imagenet", kind="finetune", age=9)
    assert newest_run(runs, kind="pretrain") == pre

    # a truncated or foreign best.pt is not a run to pick
    (runs / "broken").mkdir()
    (runs / "broken" / "best.pt").write_bytes(b"not a checkpoint")
    os.utime(runs / "broken" / "best.pt", (2_000_000, 2_000_000))
    assert newest_run(runs, recipe="medical") == custom
    assert newest_run(tmp_path / "no-runs-here", recipe="medical") is None


def test_demo_default_checkpoint_is_the_recipes_newest_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug this replaces: `tlkit demo surveillance` picked a newer surveillance-supervised run and failed."""
    from tlkit.demo import resolve_checkpoint as demo_checkpoint

    runs = tmp_path / "runs"
    one_class = make_run(runs, "finetune-surveillance-resnet18-1", recipe="surveillance", age=1)
    make_run(runs, "finetune-surveillance-supervised-resnet18-2", recipe="surveillance-supervised", age=2)
    monkeypatch.setenv("TLKIT_RUNS", str(runs))
    assert demo_checkpoint("surveillance") == one_class
    assert demo_checkpoint("surveillance", one_class.parent) == one_class  # a run folder means its best.pt
    with pytest.raises(ValueError, match="tlkit finetune --recipe traffic-signs"):
        demo_checkpoint("traffic-signs")


def test_run_folder_means_best_for_use_and_last_for_resume(tmp_path: Path) -> None:
    best = make_run(tmp_path, "run", recipe="medical")
    run = best.parent
    assert resolve_checkpoint(run) == best
    assert resolve_checkpoint(run, resume=True) == run / "last.pt"
    assert resolve_checkpoint(run / "last.pt") == run / "last.pt"  # a file is taken as given
    only_best = make_run(tmp_path, "no-last", recipe="medical", last=False).parent
    with pytest.raises(CheckpointError, match="nothing to resume in .*no last.pt"):
        resolve_checkpoint(only_best, resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no trained checkpoint in .*no best.pt"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        resolve_checkpoint(tmp_path / "nope.pt")


def test_evaluate_and_predict_read_best_from_a_run_folder(tmp_path: Path) -> None:
    """Every command that uses a model reads best.pt from a run folder (it holds the calibration), never last.pt."""
    from tlkit.checkpoint import load_tlkit_checkpoint

    run = make_run(tmp_path, "run", recipe="medical").parent
    assert load_tlkit_checkpoint(run)["epoch"] == 2  # best.pt; last.pt says 3


def test_read_meta_has_no_weights_or_training_state(tmp_path: Path) -> None:
    best = make_run(tmp_path, "run", recipe="medical")
    meta = read_meta(best)
    assert meta["recipe"] == {"name": "medical"} and meta["kind"] == "finetune" and meta["format"] == "tlkit"
    assert meta["classes"] == ["a", "b"] and meta["tlkit_version"] and "saved_at" in meta
    assert not {"model", "ema", "anomaly", "optimizer", "scheduler", "rng", "history"} & meta.keys()
