"""DDP on CPU: `torchrun --nproc_per_node 2 -m tlkit finetune` (gloo), checked from outside the program.

Two launches, shared by every test here (module fixture). One fine-tune setup: the traffic-signs recipe on
the first 3 gtsrb classes, at most 16 images a class (42 train, 37 val: an odd count, which 2 ranks cannot
split evenly), 32 px, batch 8 per rank, `freeze-unfreeze` from scratch with a constant LR:
- A: 2 epochs, uninterrupted (body frozen in epoch 1, unfrozen in epoch 2: the DDP wrapper is rebuilt). Its
  epoch-1 last.pt is kept (hard-linked as soon as the epoch-1 row is written; saves are renames, so the link
  keeps that file when epoch 2 replaces last.pt);
- B: a run folder holding only that epoch-1 last.pt, resumed under torchrun (`--resume`) while A finishes:
  a run preempted after epoch 1 and resubmitted.

`finetune.head_lr_mult=0`: the head trains at LR 0 and the body is frozen (BatchNorm in eval) in epoch 1, so
nothing changes during epoch 1 and its train loss can be recomputed outside the program from the epoch-1
checkpoint. The body trains in epoch 2 at the scaled LR (x layer decay), which the other checks need.
An EMA of the weights is kept (`optim.ema_decay`): validation runs on it, and it is what a checkpoint deploys.
Fine-tuning goes through the same `engine.fit` as pretraining, plus the strategy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

pytestmark = pytest.mark.slow

TORCHRUN = Path(sys.executable).parent / "torchrun"
WORLD, BATCH, LR = 2, 8, 0.2  # LR: the recipe's, for a global batch of 256
# gtsrb classes 00, 01, 02 hold 10, 130, 135 train and 5, 35, 35 val images
N_TRAIN, N_VAL = 10 + 16 + 16, 5 + 16 + 16
SETS = [
    "data.max_classes=3",
    "data.max_per_class=16",
    "data.num_workers=0",
    "data.img_size=32",
    "optim.warmup_epochs=0",
    # the logged LR is then the scaled LR (x the group's multiplier) itself, and a 1-epoch run's epoch 1 is A's
    "optim.schedule=constant",
    "finetune.head_lr_mult=0",
    "finetune.layer_decay=0.8",  # discriminative LRs (the recipe trains every layer at one LR): stages differ
    "optim.ema_decay=0.5",
]
TIMEOUT = 600


def _cmd(out: Path, epochs: int, *, resume: bool = False) -> list[str]:
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(WORLD), "-m", "tlkit", "finetune"]
    cmd += ["--recipe", "traffic-signs", "--quiet", "--device", "cpu", "--epochs", str(epochs)]
    if resume:
        return [*cmd, "--resume", str(out)]
    cmd += ["--init", "scratch", "--strategy", "freeze-unfreeze", "--arch", "resnet10t"]
    cmd += ["--batch-size", str(BATCH), "--lr", str(LR), "--out", str(out)]
    return cmd + [arg for s in SETS for arg in ("--set", s)]


def _finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, output[-4000:]
    return output


def _launch(cmd: list[str], base: Path, name: str, env: dict) -> tuple[subprocess.Popen, Path]:
    log = base / f"{name}.log"
    with log.open("w") as f:
        return subprocess.Popen(cmd, cwd=base, env=env, stdout=f, stderr=subprocess.STDOUT), log


def _epoch1_checkpoint(run_dir: Path, keep: Path, proc: subprocess.Popen) -> bool:
    """Hard-link run_dir/last.pt to `keep` once metrics.jsonl has its epoch-1 row (written just after the
    epoch-1 save); False if the run ended first or the link caught a later checkpoint."""
    deadline = time.monotonic() + TIMEOUT
    while not _rows(run_dir):
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    os.link(run_dir / "last.pt", keep)
    return _ckpt(keep)["epoch"] == 1


@pytest.fixture(scope="module")
def ddp(data_dir: Path, child_env, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not TORCHRUN.exists():
        pytest.skip(f"torchrun not found beside {sys.executable}")
    if not (data_dir / "gtsrb" / "val").is_dir():
        pytest.skip("gtsrb sample not found")
    base = tmp_path_factory.mktemp("ddp")
    env = child_env(base / "runs")
    epoch1, resumed = base / "epoch1", base / "B"
    epoch1.mkdir()
    resumed.mkdir()
    a, a_log = _launch(_cmd(base / "A", 2), base, "A", env)
    procs = [a]
    try:
        if not _epoch1_checkpoint(base / "A", epoch1 / "last.pt", a):
            if a.poll() is not None and a.returncode != 0:
                _finish(a, a_log)  # fails with A's output
            # A's epoch 2 was quicker than this poll (a very loaded machine): the same epoch 1 from a 1-epoch run
            (epoch1 / "last.pt").unlink(missing_ok=True)
            one, one_log = _launch(_cmd(base / "A1", 1), base, "A1", env)
            procs.append(one)
            _finish(one, one_log)
            os.link(base / "A1" / "last.pt", epoch1 / "last.pt")
        shutil.copyfile(epoch1 / "last.pt", resumed / "last.pt")
        b, b_log = _launch(_cmd(resumed, 2, resume=True), base, "B", env)
        procs.append(b)
        out = {"A": _finish(a, a_log), "B": _finish(b, b_log)}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return {"A": base / "A", "B": resumed, "epoch1": epoch1, "out": out}


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _sha256(state: dict[str, torch.Tensor]) -> str:
    """The digest `summary.json: weights_sha256` documents: each key, then the tensor's bytes in logical order."""
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(key.encode())
        h.update(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _body(state: dict) -> list[str]:
    return [k for k in state if not k.startswith("fc.")]


def test_rank_0_writes_one_row_per_epoch_and_wrapper_rebuilt_at_unfreeze(ddp: dict) -> None:
    out = ddp["out"]["A"]
    assert "body frozen (head only)" in out and "body unfrozen (all layers)" in out
    assert "find_unused_parameters" not in out  # DDP rebuilt when the body unfroze: no unused-parameter error
    assert out.count("Epoch 1,") == 1 and out.count("Epoch 2,") == 1, "only rank 0 prints epoch lines"
    assert [r["epoch"] for r in _rows(ddp["A"])] == [1, 2], "exactly one metrics row per epoch (rank 0 writes)"
    ckpt = _ckpt(ddp["A"] / "last.pt")
    assert ckpt["world_size"] == WORLD and ckpt["epoch"] == 2
    assert not any(k.startswith("module.") for k in ckpt["model"]), "DDP wrapper names leaked into the checkpoint"


def test_lr_is_scaled_by_the_global_batch_of_both_ranks(ddp: dict) -> None:
    scaled = LR * BATCH * WORLD / 256  # 0.0125; one rank's batch alone would give half
    groups = _ckpt(ddp["A"] / "last.pt")["optimizer"]["param_groups"]
    assert {g["lr_mult"] for g in groups} >= {1.0, 0.0}  # the deepest body stage trains at the scaled LR itself
    for g in groups:
        assert g["initial_lr"] == pytest.approx(scaled * g["lr_mult"], rel=1e-12), g["lr_mult"]
        assert g["lr"] == pytest.approx(g["initial_lr"], rel=1e-12)  # constant schedule
    # the logged LR is the run's scaled LR (multiplier 1), not the stem's after layer decay
    assert groups[0]["lr_mult"] < 1.0
    for row in _rows(ddp["A"]):
        assert row["lr"] == pytest.approx(scaled, rel=1e-12)


def _val_metrics(ckpt: dict) -> tuple[int, float, float]:
    """(n, loss, top-1 %) of the checkpoint on the run's val images, in this one process, no sampler."""
    from tlkit.data.datasets import ImageDataset, scan_split
    from tlkit.data.transforms import Preprocessing, eval_transform, norm_tensors
    from tlkit.models import model_from_checkpoint

    pre = Preprocessing.from_dict(ckpt["preprocessing"])
    data = ckpt["recipe"]["data"]  # the run's subset: its classes, 16 a class, sign crops
    samples, _ = scan_split(
        ckpt["data_root"],
        "val",
        ckpt["class_ids"],
        max_per_class=data["max_per_class"],
        roi_crop=data["roi_crop"],
        ignore_unknown=True,
    )
    model = model_from_checkpoint(ckpt)  # eval mode, the EMA weights: what the run validated
    mean, std = norm_tensors(pre, "cpu")
    logits, targets = [], []
    with torch.no_grad():
        for images, y, _ in DataLoader(ImageDataset(samples, eval_transform(pre)), batch_size=64):
            logits.append(model((images.float() - mean) / std))
            targets.append(y)
    logits, targets = torch.cat(logits), torch.cat(targets)
    top1 = int((logits.argmax(1) == targets).sum()) / len(targets)
    return len(targets), float(F.cross_entropy(logits, targets)), top1


def test_val_metrics_are_the_whole_val_set_seen_by_the_saved_weights(ddp: dict) -> None:
    # Each rank evaluates half of val; rank 0 writes the gathered metrics. Evaluating the saved checkpoint
    # here, on all 37 images in one process, must give the same numbers: no image left out or counted twice
    # (no sampler padding), and every rank validated with the EMA and BatchNorm statistics that were saved.
    epoch1 = _ckpt(ddp["epoch1"] / "last.pt")
    for ckpt, row in ((epoch1, epoch1["history"][0]), (_ckpt(ddp["A"] / "last.pt"), _rows(ddp["A"])[1])):
        n, loss, top1 = _val_metrics(ckpt)
        assert n == N_VAL
        assert row["val_top1"] == top1, (row["epoch"], row["val_top1"], top1)
        # measured |diff| 0 at epoch 1 and 1.2e-7 at epoch 2 (batching, summation order). With rank 1 validating
        # on its own EMA (started from its own init) it was 9.6e-3 at epoch 1; on its own BatchNorm statistics
        # (EMA off) 2.9e-4 at epoch 2, top-1 21.6 against 18.9
        assert row["val_loss"] == pytest.approx(loss, abs=1e-6), (row["epoch"], row["val_loss"], loss)


def test_train_loss_is_the_mean_over_both_ranks_images(ddp: dict) -> None:
    """Recomputed outside the program: epoch 1 changes no weight (frozen body, head LR 0), so its train loss
    is the epoch-1 checkpoint's loss on each rank's shard of the epoch-1 training batches."""
    from tlkit.config import recipe_from_dict
    from tlkit.data.loader import build_datasets
    from tlkit.data.transforms import Preprocessing, norm_tensors
    from tlkit.models import model_from_checkpoint

    ckpt = _ckpt(ddp["epoch1"] / "last.pt")
    assert ckpt["epoch"] == 1
    recipe = recipe_from_dict(ckpt["recipe"])
    pre = Preprocessing.from_dict(ckpt["preprocessing"])
    train = build_datasets(recipe, pre, class_ids=ckpt["class_ids"]).train
    train.set_epoch(1)  # augmentation is seeded by (seed, epoch, index)
    assert len(train) == N_TRAIN and recipe.optim.loss == "ce"
    # the weights themselves (not the EMA), in eval: what a frozen body with BatchNorm in eval computes
    model = model_from_checkpoint(ckpt, use_ema=False)
    mean, std = norm_tensors(pre, "cpu")
    sums = []
    for rank in range(WORLD):
        shard = DistributedSampler(train, WORLD, rank, shuffle=True, seed=recipe.train.seed, drop_last=True)
        shard.set_epoch(1)
        loss_sum, seen = 0.0, 0
        with torch.no_grad():
            for images, y, _ in DataLoader(train, batch_size=BATCH, sampler=shard, drop_last=True):
                logits = model((images.float() - mean) / std)
                loss = F.cross_entropy(logits, y, label_smoothing=recipe.optim.label_smoothing)
                loss_sum, seen = loss_sum + float(loss) * len(y), seen + len(y)
        sums.append((loss_sum, seen))
    assert [n for _, n in sums] == [16] * WORLD  # 21 images a rank, in full batches of 8
    both = sum(s for s, _ in sums) / sum(n for _, n in sums)
    reported = ckpt["history"][0]["train_loss"]  # the epoch-1 row, as saved with these weights
    # measured: |reported - both| 0.0; each rank's own mean is 7.5e-3 away from `both`, so the 1e-6 tolerance
    # tells "both ranks" from "rank 0 only" (which reported 1.1212 against 1.1137)
    assert all(abs(s / n - both) > 5e-3 for s, n in sums), "the ranks' means are too close to tell apart"
    assert reported == pytest.approx(both, abs=1e-6), (reported, both, [s / n for s, n in sums])


def test_every_rank_ends_with_the_saved_weights(ddp: dict) -> None:
    # Each rank reports the SHA-256 of its own final state (weights and BatchNorm buffers); the digest is
    # computed here from last.pt, so "in sync" does not rest on the program's own comparison.
    for run in ("A", "B"):  # B: the resumed run
        summary = json.loads((ddp[run] / "summary.json").read_text())
        assert summary["world_size"] == WORLD
        expected = _sha256(_ckpt(ddp[run] / "last.pt")["model"])
        assert summary["weights_sha256"] == [expected] * WORLD, run
        assert summary["ranks_in_sync"] is True


def test_body_moves_only_after_unfreeze_and_head_lr_mult_holds(ddp: dict) -> None:
    e1, e2 = _ckpt(ddp["epoch1"] / "last.pt")["model"], _ckpt(ddp["A"] / "last.pt")["model"]
    weights = [k for k in _body(e2) if k.endswith(".weight") and e2[k].ndim == 4]  # the convolutions
    assert weights and all(not torch.equal(e1[k], e2[k]) for k in weights), "body did not train after unfreezing"
    assert torch.equal(e1["fc.weight"], e2["fc.weight"])  # head LR = 0 x recipe LR
    stats = [k for k in _body(e2) if k.endswith("running_mean")]
    assert stats and all(not torch.equal(e1[k], e2[k]) for k in stats), "BatchNorm statistics frozen after unfreeze"


def test_resume_under_torchrun_continues_exactly(ddp: dict) -> None:
    out = ddp["out"]["B"]
    assert "Epoch 1," not in out and out.count("Epoch 2,") == 1, "resumed at epoch 2"
    rows, ref = _rows(ddp["B"]), _rows(ddp["A"])
    assert _ckpt(ddp["epoch1"] / "last.pt")["history"] == rows[:1], "epoch 1's row kept as written"
    assert [r["epoch"] for r in rows] == [1, 2], "one metrics row per epoch"
    for r_ref, r in zip(ref, rows, strict=True):
        for key in ("train_loss", "val_loss", "val_top1", "lr", "skipped"):
            assert r[key] == r_ref[key], (r["epoch"], key, r_ref[key], r[key])  # bit for bit, one thread each
    last, last_ref = _ckpt(ddp["B"] / "last.pt"), _ckpt(ddp["A"] / "last.pt")
    assert last["epoch"] == 2 and last["world_size"] == WORLD
    assert last["model"].keys() == last_ref["model"].keys()
    for key, value in last_ref["model"].items():
        assert torch.equal(last["model"][key], value), key
    for pid, state in last_ref["optimizer"]["state"].items():
        assert torch.equal(last["optimizer"]["state"][pid]["momentum_buffer"], state["momentum_buffer"]), pid
    for key, value in last_ref["ema"].items():
        assert torch.equal(last["ema"][key], value), key
