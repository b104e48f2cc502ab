"""The examples run as users run them: `examples/transfer_vs_scratch.py` on a small slice of real data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_transfer_vs_scratch_writes_a_table(trained_run, tmp_path: Path, child_env) -> None:
    # A tiny tiny-imagenet pretrain (resnet10t) carried to GTSRB and compared with scratch at the same budget.
    runs = tmp_path / "runs"
    sets = ["data.max_per_class=6", "data.img_size=32", "data.num_workers=0", "train.batch_size=32"]
    cmd = [sys.executable, str(REPO / "examples" / "transfer_vs_scratch.py"), "--recipe", "traffic-signs"]
    cmd += ["--init", str(trained_run.best), "--epochs", "1", "--set", "model.arch=resnet10t"]
    cmd += [arg for s in sets for arg in ("--set", s)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=child_env(runs), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    table = (runs / "transfer-vs-scratch-traffic-signs.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| pretrained") or line.startswith("| scratch")]
    assert len(rows) == 2 and "gtsrb, resnet10t @ 32 px, 1 epochs" in table
    # Both runs exist and differ only in where the body came from.
    run_dirs = [Path(r.rsplit("|", 2)[-2].strip()) for r in rows]
    inits = [torch.load(d / "best.pt", weights_only=True)["init"] for d in run_dirs]
    assert str(trained_run.best) in inits[0] and inits[1] == "scratch"
