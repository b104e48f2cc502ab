"""Kill -9 and resume: a resumed run must end exactly where an uninterrupted one ends.

Three `tlkit` child processes run on the same tiny subset and seed, each to be SIGKILLed: B (`pretrain`) as soon as
metrics.jsonl has its epoch-1 row (so in epoch 2, resuming from the epoch-1 checkpoint); C (`pretrain`, saving
every 3 steps: `train.save_every_steps`) right after its first mid-epoch save in epoch 2 (resuming mid-epoch); E
(`finetune` with `freeze-unfreeze`, body frozen in epoch 1 only, and an EMA of the weights that validation uses)
like B, so its resumed part starts at the unfreeze. B, C and E are then resumed with `--resume <run dir>`. The
uninterrupted references are A (`pretrain`, 3 epochs) and D (the same fine-tune as E). B's, C's and E's metrics
rows and final weights must equal A's (D's for E).

A, D and the three resumes need no kill: they run in this process through the CLI (CliRunner), on one thread as
the children do, so results are bit-for-bit comparable across processes (test_faults relies on this too). A and
D train while the children import (conftest.WARM_TLKIT: `tlkit.cli.main` once a go file exists), so on two cores
the children's interpreter start-ups overlap the references' training.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import warm_tlkit_cmd
from typer.testing import CliRunner

from tlkit.cli import app
from tlkit.paths import REPO_DIR

pytestmark = pytest.mark.slow

EPOCHS = 3
FT_EPOCHS = 2  # D and E: epoch 1 frozen, epoch 2 (the resumed part of E) unfrozen
SAVE_EVERY = 3
# 5 classes x 20 images, batch 10: 10 steps an epoch, long enough to kill inside epoch 2.
SETS = [
    "data.max_classes=5",
    "data.max_per_class=20",
    "data.num_workers=0",
    "data.img_size=32",
    "optim.warmup_epochs=0.5",
]
ARGS = ["--quiet", "--arch", "resnet10t", "--batch-size", "10", "--seed", "3"]
PRETRAIN = ["pretrain", "--epochs", str(EPOCHS)]
# a fine-tune of a scratch init: what trains when matters here, not where it starts; the EMA (decay 0.8 a step)
# is what validation runs on
FINETUNE = ["finetune", "--recipe", "imagenet", "--init", "scratch", "--strategy", "freeze-unfreeze"]
FINETUNE += ["--epochs", str(FT_EPOCHS)]
FT_SETS = ["finetune.freeze_epochs=1", "optim.ema_decay=0.8"]
TIMEOUT = 900


@dataclass
class Proc:
    name: str
    run_dir: Path
    popen: subprocess.Popen
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def _set_args(sets: list[str]) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


def _env(runs: Path) -> dict[str, str]:
    # one thread per process: bit-reproducible, and three runs share two cores without thrashing;
    # PYTHONPATH: the children import this checkout's tlkit, whatever the venv has installed
    path = os.pathsep.join(p for p in (str(REPO_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TLKIT_RUNS": str(runs), "PYTHONPATH": path}


def _launch(base: Path, name: str, extra_sets: list[str] = (), command=PRETRAIN) -> Proc:
    """A warm `tlkit` child, to be killed: it imports now and starts its run once `base/go` exists; `command`:
    the subcommand and its own options (pretrain: `--epochs EPOCHS`)."""
    run_dir = base / name
    cmd = warm_tlkit_cmd(base / "go", [*command, *ARGS, "--out", str(run_dir), *_set_args([*SETS, *extra_sets])])
    log = base / f"{name}.log"
    with log.open("w") as f:
        popen = subprocess.Popen(cmd, cwd=base, env=_env(base / "runs"), stdout=f, stderr=subprocess.STDOUT)
    return Proc(name, run_dir, popen, log)


def _run_here(base: Path, name: str, extra_sets: list[str] = (), resume: bool = False, command=PRETRAIN) -> Path:
    """The same command line as `_launch`, run to the end in this process (CliRunner); returns its log."""
    run_dir = base / name
    args = [*command, *ARGS, "--out", str(run_dir), *_set_args([*SETS, *extra_sets])]
    if resume:
        args += ["--resume", str(run_dir)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLKIT_RUNS", str(base / "runs"))
        result = CliRunner().invoke(app, args)
    log = base / f"{name}{'-resume' if resume else ''}.log"
    log.write_text(result.output)
    assert result.exit_code == 0, f"run {name} failed (exit {result.exit_code})\n{result.output[-3000:]}"
    return log


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino  # a checkpoint save is a rename: a new inode
    except FileNotFoundError:
        return None


@pytest.fixture(scope="module")
def runs(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("resume")
    b = _launch(base, "B")
    c = _launch(base, "C", [f"train.save_every_steps={SAVE_EVERY}"])
    e = _launch(base, "E", FT_SETS, command=FINETUNE)
    procs = [b, c, e]
    killed: dict[str, dict] = {}
    c_epoch1_inode = None
    deadline = time.monotonic() + TIMEOUT
    try:
        # the uninterrupted references, here, while the children import
        _run_here(base, "A", [f"train.save_every_steps={SAVE_EVERY}"])  # saving changes nothing in training
        _run_here(base, "D", FT_SETS, command=FINETUNE)
        (base / "go").touch()  # B, C and E start their runs
        while len(killed) < 3:
            if time.monotonic() > deadline:
                pytest.fail(f"B/C/E never reached epoch 2\n{b.tail()}\n{c.tail()}\n{e.tail()}")
            for proc in (b, c, e):
                if proc.name not in killed and proc.popen.poll() is not None:
                    pytest.fail(f"run {proc.name} ended (rc {proc.popen.returncode}) before the kill\n{proc.tail()}")
            for proc in (b, e):
                if proc.name not in killed and len(_rows(proc.run_dir)) >= 1:
                    proc.popen.kill()  # SIGKILL: no cleanup, no atexit
                    killed[proc.name] = {"rows": len(_rows(proc.run_dir))}
            if "C" not in killed and len(_rows(c.run_dir)) >= 1:
                inode = _inode(c.run_dir / "last.pt")
                if c_epoch1_inode is None:
                    c_epoch1_inode = inode  # the epoch-1 checkpoint, saved before the row
                elif inode != c_epoch1_inode:
                    c.popen.kill()  # just after the first mid-epoch save of epoch 2
                    killed["C"] = {"rows": len(_rows(c.run_dir))}
            time.sleep(0.02)
        for proc in (b, c, e):
            proc.popen.wait(timeout=60)
            assert proc.popen.returncode == -9, proc.popen.returncode
            ckpt = torch.load(proc.run_dir / "last.pt", map_location="cpu", weights_only=True)
            killed[proc.name].update(epoch=ckpt["epoch"], step=ckpt["step_in_epoch"], partial=ckpt.get("partial"))
            killed[proc.name]["model"] = ckpt["model"]  # the state the resumed run starts from
    finally:
        for proc in procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
    _run_here(base, "B", resume=True)
    _run_here(base, "C", resume=True)
    e_resumed_log = _run_here(base, "E", resume=True, command=[FINETUNE[0], *FINETUNE[-2:]])  # the run has a recipe
    return {
        "A": base / "A",
        "B": b.run_dir,
        "C": c.run_dir,
        "D": base / "D",
        "E": e.run_dir,
        "killed": killed,
        "E_resumed_log": e_resumed_log,
    }


def _assert_same_run(ref: Path, other: Path, epochs: int = EPOCHS) -> None:
    rows_ref, rows = _rows(ref), _rows(other)
    assert [r["epoch"] for r in rows_ref] == list(range(1, epochs + 1))
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1)), "one row per epoch, none lost or repeated"
    for r_ref, r in zip(rows_ref, rows, strict=True):
        for key in ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "skipped"):
            assert r[key] == r_ref[key], (r["epoch"], key, r_ref[key], r[key])  # bit for bit, one thread each
    last_ref = torch.load(ref / "last.pt", map_location="cpu", weights_only=True)
    last = torch.load(other / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == epochs and last["step_in_epoch"] == 0
    assert last["model"].keys() == last_ref["model"].keys()
    for key, value in last_ref["model"].items():
        assert torch.equal(last["model"][key], value), key  # weights, BatchNorm statistics and counters
    # the optimizer continued too: momentum buffers match
    for pid, state in last_ref["optimizer"]["state"].items():
        assert torch.equal(last["optimizer"]["state"][pid]["momentum_buffer"], state["momentum_buffer"]), pid
    assert last["best_top1"] == last_ref["best_top1"]
    summary = json.loads((other / "summary.json").read_text())
    assert summary["epochs"] == epochs and summary["skipped_images"] == 0


def test_killed_in_epoch_2_resumes_exactly(runs: dict) -> None:
    state = runs["killed"]["B"]
    assert state["rows"] == 1 and state["epoch"] == 1 and state["step"] == 0  # resumed from the epoch-1 checkpoint
    _assert_same_run(runs["A"], runs["B"])


def test_mid_epoch_checkpoint_resumes_exactly(runs: dict) -> None:
    state = runs["killed"]["C"]
    assert state["epoch"] == 2 and state["step"] > 0 and state["step"] % SAVE_EVERY == 0, state
    assert state["partial"] is not None and state["partial"]["seen"] == state["step"] * 10
    _assert_same_run(runs["A"], runs["C"])


def test_freeze_unfreeze_with_ema_resumes_exactly_across_the_unfreeze(runs: dict) -> None:
    state = runs["killed"]["E"]
    assert state["rows"] == 1 and state["epoch"] == 1 and state["step"] == 0  # resumed at the unfreeze (epoch 2)
    # validation runs on the EMA weights: equal rows need the EMA restored, not restarted from the weights
    _assert_same_run(runs["D"], runs["E"], FT_EPOCHS)
    last_ref = torch.load(runs["D"] / "last.pt", map_location="cpu", weights_only=True)
    last = torch.load(runs["E"] / "last.pt", map_location="cpu", weights_only=True)
    assert last_ref["ema"] is not None and last["ema"].keys() == last_ref["ema"].keys()
    for key, value in last_ref["ema"].items():
        assert torch.equal(last["ema"][key], value), key
    model = last_ref["model"]
    assert any(not torch.equal(value, model[key].float()) for key, value in last_ref["ema"].items()), "EMA = weights"
    # the body the resumed run started from was still the frozen one: it trained after the unfreeze
    body = [k for k, v in model.items() if not k.startswith("fc.") and k.endswith(".weight") and v.ndim == 4]
    assert body and all(not torch.equal(state["model"][k], last["model"][k]) for k in body)
    # and the resumed run says so, as an uninterrupted one does at that epoch
    assert "epoch 2: body unfrozen" in runs["E_resumed_log"].read_text()
