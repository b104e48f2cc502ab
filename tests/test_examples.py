"""The examples run as users run them: `examples/transfer_vs_scratch.py` on a small slice of real data.

The script runs as `__main__` with a user's command line (`runpy`, as `python examples/...` does), in this
process: nothing here needs a process of its own, and a fresh interpreter would add its start-up (seconds)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_transfer_vs_scratch_writes_a_table(
    trained_run, tmp_path: Path, _runs_in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # A tiny tiny-imagenet pretrain (resnet10t) carried to GTSRB and compared with scratch at the same budget:
    # 8 of the 43 classes (each run's report then draws an 8-class confusion matrix, not a slow 43-class one).
    runs = _runs_in_tmp  # $TLKIT_RUNS, where the script writes its table
    sets = ["data.max_classes=8", "data.max_per_class=6", "data.img_size=32", "data.num_workers=0"]
    sets += ["train.batch_size=16"]
    script = REPO / "examples" / "transfer_vs_scratch.py"
    argv = [str(script), "--recipe", "traffic-signs", "--init", str(trained_run.best), "--epochs", "1"]
    argv += ["--set", "model.arch=resnet10t", *[arg for s in sets for arg in ("--set", s)]]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")  # a failure raises (SystemExit or the error itself)
    printed = capsys.readouterr().out
    table = (runs / "transfer-vs-scratch-traffic-signs.md").read_text()
    assert table in printed  # the script prints the table it writes
    rows = [line for line in table.splitlines() if line.startswith("| pretrained") or line.startswith("| scratch")]
    assert len(rows) == 2 and "gtsrb, resnet10t @ 32 px, 1 epochs" in table
    # Both runs exist and differ only in where the body came from.
    run_dirs = [Path(r.rsplit("|", 2)[-2].strip()) for r in rows]
    inits = [torch.load(d / "best.pt", weights_only=True)["init"] for d in run_dirs]
    assert str(trained_run.best) in inits[0] and inits[1] == "scratch"
