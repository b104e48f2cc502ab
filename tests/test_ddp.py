"""DDP on CPU: `torchrun --nproc_per_node 2 -m tlkit pretrain` (gloo) on a tiny subset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TORCHRUN = Path(sys.executable).parent / "torchrun"


def test_torchrun_two_processes(tiny_root: Path, tmp_path: Path, tiny_sets: list[str], cli_sets, child_env) -> None:
    if not TORCHRUN.exists():
        pytest.skip(f"torchrun not found beside {sys.executable}")
    run_dir = tmp_path / "ddp"
    cmd = [
        str(TORCHRUN),
        "--standalone",  # a free rendezvous port: other runs on the machine do not collide
        "--nproc_per_node",
        "2",
        "-m",
        "tlkit",
        "pretrain",
        "--quiet",
        "--device",
        "cpu",
        "--arch",
        "resnet10t",
        "--batch-size",
        "8",
        "--out",
        str(run_dir),
        *cli_sets(tiny_sets),  # 5 classes x 20 train / 10 val images, 1 epoch
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=child_env(tmp_path / "runs"), capture_output=True, text=True, timeout=600
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["ranks_in_sync"] is True
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["epoch"] for r in rows] == [1], "exactly one metrics row per epoch (rank 0 writes)"
    assert 0 <= rows[0]["val_top1"] <= 100 and rows[0]["train_loss"] > 0
    ckpt = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["world_size"] == 2
    assert not any(k.startswith("module.") for k in ckpt["model"]), "DDP wrapper names leaked into the checkpoint"
    assert output.count("Epoch 1,") == 1, "only rank 0 prints epoch lines"


def test_torchrun_freeze_unfreeze(tmp_path: Path, cli_sets, child_env) -> None:
    # The body is frozen in epoch 1 and unfrozen in epoch 2: the DDP wrapper is rebuilt at the switch, so
    # the newly trainable body is reduced across ranks (they end in sync) and actually moves.
    if not TORCHRUN.exists():
        pytest.skip(f"torchrun not found beside {sys.executable}")
    run_dir = tmp_path / "ft"
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "tlkit", "finetune", "--recipe", "medical"]
    cmd += ["--init", "scratch", "--strategy", "freeze-unfreeze", "--quiet", "--device", "cpu", "--arch", "resnet10t"]
    cmd += ["--batch-size", "8", "--epochs", "2", "--out", str(run_dir)]
    cmd += cli_sets(["data.max_per_class=16", "data.num_workers=0", "data.img_size=32"])
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=child_env(tmp_path / "runs"), capture_output=True, text=True, timeout=600
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "body frozen (head only)" in output and "body unfrozen (all layers)" in output
    assert json.loads((run_dir / "summary.json").read_text())["ranks_in_sync"] is True
    assert "find_unused_parameters" not in output
