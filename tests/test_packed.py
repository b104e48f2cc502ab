"""Pack store (tlkit.data.packed) and the loaders that read it: real tiny_imagenet images, CPU only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tlkit.config import DataConfig
from tlkit.data.data_path import choose_data_path, cpu_only_augmentations, make_fast_loader
from tlkit.data.gpu import DeviceLoader
from tlkit.data.packed import PackedDataset, PackedLoader, PackError, pack_split, resize_for_pack
from tlkit.paths import data_root

TINY = data_root() / "tiny_imagenet_200"
needs_tiny = pytest.mark.skipif(not (TINY / "train").is_dir(), reason="tiny_imagenet_200 sample data not present")


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """tiny_imagenet, first 3 classes x 6 images: at 64 px (the files' own size) and at 40 px."""
    if not (TINY / "train").is_dir():
        pytest.skip("tiny_imagenet_200 sample data not present")
    root = tmp_path_factory.mktemp("packs")
    full = pack_split(TINY, "train", root / "train-64", 64, max_classes=3, max_per_class=6, workers=1)
    small = pack_split(TINY, "train", root / "train-40", 40, max_classes=3, max_per_class=6, workers=2, chunk=4)
    return root, full, small


def _decoded(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@needs_tiny
def test_pack_round_trips_real_images(packs):
    root, meta, _ = packs
    ds = PackedDataset(root / "train-64")
    wnids = sorted(p.name for p in (TINY / "train").iterdir() if p.is_dir())[:3]
    assert meta["class_ids"] == wnids and ds.class_ids == wnids
    names = dict(line.split(" ", 1) for line in (TINY / "LOC_synset_mapping.txt").read_text().splitlines())
    assert ds.classes == [names[w].split(",")[0].strip() for w in wnids]
    assert len(ds) == 18 and ds.images.shape == (18, 64, 64, 3) and ds.images.dtype == np.uint8
    files = (root / "train-64" / "files.txt").read_text().split()
    assert len(files) == 18
    for i, rel in enumerate(files):
        assert rel.split("/")[1] == wnids[ds.labels[i]]  # train/<wnid>/<file>
        np.testing.assert_array_equal(ds.images[i], _decoded(TINY / rel))  # 64 px files: no resampling
        image, target, failed = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
        assert target == ds.labels[i] and failed == 0
    assert json.loads((root / "train-64" / "meta.json").read_text())["size"] == 64


@needs_tiny
def test_pack_resized_equals_pil_resize_of_original(packs):
    root, _, small = packs
    ds = PackedDataset(root / "train-40")
    files = (root / "train-40" / "files.txt").read_text().split()
    assert small["count"] == 18 and len(ds) == 18  # written by 2 processes in chunks of 4
    for i, rel in enumerate(files):
        expected = np.asarray(Image.open(TINY / rel).convert("RGB").resize((40, 40), Image.BILINEAR))
        np.testing.assert_array_equal(ds.images[i], expected)
    np.testing.assert_array_equal(ds.labels, PackedDataset(root / "train-64").labels)


def test_resize_for_pack_crop_and_squash():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)
    out = resize_for_pack(wide, 30)  # short side already 30: the central square, untouched
    np.testing.assert_array_equal(out, wide[:, 15:45])
    assert resize_for_pack(wide, 16, "squash").shape == (16, 16, 3)
    tall = rng.integers(0, 256, (50, 20, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(tall).resize((10, 25), Image.BILINEAR))[7:17]
    np.testing.assert_array_equal(resize_for_pack(tall, 10), expected)
    with pytest.raises(ValueError):
        resize_for_pack(wide, 16, "stretch")


def test_unreadable_file_is_counted_and_left_out(tmp_path):
    root = tmp_path / "data"
    for cls, n in (("a", 2), ("b", 2)):
        (root / "train" / cls).mkdir(parents=True)
        for k in range(n):
            Image.new("RGB", (24, 16), (k * 50, 100, 200)).save(root / "train" / cls / f"{k}.jpg")
    (root / "train" / "b" / "1.jpg").write_bytes(b"not a jpeg")
    meta = pack_split(root, "train", tmp_path / "pack", 16, workers=1)
    assert meta["failed"] == 1 and meta["count"] == 4
    assert np.load(tmp_path / "pack" / "labels.npy").tolist() == [0, 0, 1, -1]
    ds = PackedDataset(tmp_path / "pack")
    assert len(ds) == 3 and ds.targets().tolist() == [0, 0, 1]
    with pytest.raises(PackError):
        pack_split(root, "train", tmp_path / "pack", 16, workers=1)  # no silent overwrite
    with pytest.raises(PackError):
        PackedDataset(tmp_path / "missing")


@needs_tiny
def test_packed_loader_batches_and_determinism(packs):
    root, _, _ = packs
    ds = PackedDataset(root / "train-64")

    def batches(epoch, **kw):
        loader = PackedLoader(ds, batch_size=4, train=True, size=32, scale=(0.25, 1), seed=3, threads=2, **kw)
        loader.set_epoch(epoch)
        return list(loader)

    first = batches(1)
    assert len(first) == 4  # 18 images, batch 4, drop_last in training
    for images, targets, failed in first:
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
        assert float(images.min()) >= 0 and float(images.max()) <= 255
        assert targets.dtype == torch.int64 and set(targets.tolist()) <= {0, 1, 2} and int(failed.sum()) == 0
    again = batches(1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    other = batches(2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))
    # resume mid-epoch: the remaining batches are exactly the tail of the uninterrupted epoch
    loader = PackedLoader(ds, batch_size=4, train=True, size=32, scale=(0.25, 1), seed=3)
    loader.set_epoch(1)
    loader.sampler.start = 2 * 4
    tail = list(loader)
    assert len(tail) == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[2:], tail, strict=True))


@needs_tiny
def test_resident_loader_matches_packed_and_eval_is_exact(packs):
    root, _, _ = packs
    ds = PackedDataset(root / "train-64")
    data = DataConfig(img_size=48, scale_min=0.35, hflip=0.5, crop_pct=1.0)
    common = dict(batch_size=5, train=True, seed=1, device="cpu")
    packed = make_fast_loader("packed", ds, data, **common)
    resident = make_fast_loader("gpu", ds, data, **common)
    assert isinstance(resident, DeviceLoader)
    for (a, ta, _), (b, tb, _) in zip(packed, resident, strict=True):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    # evaluation at the pack's own size: every image once, pixels untouched, order kept
    ev = make_fast_loader(
        "packed", ds, DataConfig(img_size=64, crop_pct=1.0), batch_size=5, train=False, seed=0, device="cpu"
    )
    images = torch.cat([x for x, _, _ in ev])
    assert images.shape == (18, 3, 64, 64)
    assert torch.equal(images.to(torch.uint8), torch.from_numpy(ds.read(np.arange(18))).permute(0, 3, 1, 2))
    # progressive resizing: the next batches come out at the new size
    packed.set_size(32)
    assert next(iter(packed))[0].shape == (5, 3, 32, 32)


@needs_tiny
def test_choose_data_path(packs, tmp_path):
    root, _, _ = packs
    plain = DataConfig()
    assert choose_data_path(plain, "cpu", root / "train-64")[0] == "cpu"
    assert choose_data_path(plain, "cpu", root / "train-64", "packed")[0] == "packed"
    with pytest.raises(PackError):
        choose_data_path(plain, "cpu", tmp_path / "nothing", "gpu")
    jitter = DataConfig(color_jitter=0.4, randaugment=2)
    assert cpu_only_augmentations(jitter) == ["color_jitter", "randaugment"]
    with pytest.raises(ValueError):
        choose_data_path(plain, "cpu", None, "fast")


@needs_tiny
def test_build_packed_datasets_finds_packs_by_recipe(packs, tmp_path, monkeypatch):
    from tlkit.config import Recipe
    from tlkit.data.data_path import build_packed_datasets, pack_dirs

    root, _, _ = packs
    (tmp_path / "tiny_imagenet_200").symlink_to(root, target_is_directory=True)
    monkeypatch.setenv("TLKIT_PACKS", str(tmp_path))
    subset = dict(name=str(TINY), val_split="", max_classes=3, max_per_class=6)
    recipe = Recipe(data=DataConfig(img_size=40, **subset))
    # the smallest train pack at least img_size: 40 px for 40, the 64 px pack for 48, none for 72
    assert pack_dirs(recipe.data) == (tmp_path / "tiny_imagenet_200" / "train-40", None)
    assert pack_dirs(DataConfig(img_size=48, **subset))[0].name == "train-64"
    assert pack_dirs(DataConfig(img_size=72, **subset))[0] is None
    bundle = build_packed_datasets(recipe)
    assert len(bundle.train) == 18 and bundle.val is None and bundle.class_ids == bundle.train.class_ids
    assert bundle.classes[0] == PackedDataset(root / "train-64").classes[0]
    with pytest.raises(PackError, match="other classes"):
        build_packed_datasets(recipe, class_ids=list(reversed(bundle.class_ids)))
    # a recipe that reads more images than were packed: the pack is stale for it, refused in one line
    with pytest.raises(PackError, match="stale") as err:
        build_packed_datasets(Recipe(data=DataConfig(img_size=40, **{**subset, "max_per_class": 7})))
    assert "\n" not in str(err.value) and "tlkit data pack" in str(err.value)


# ---- `data.loader` inside `tlkit pretrain`: choice, training, resume, eval parity, stale packs ----------------


def test_auto_loader_choice_follows_the_documented_rule():
    """`choose_loader` decides from plain facts: device, CPU-only augmentations, pack size, free GPU memory."""
    from tlkit.data.data_path import choose_loader

    gib = 2**30
    pick = lambda requested="auto", **facts: choose_loader(requested, **facts)[0]  # noqa: E731
    assert pick(device_type="cpu", pack_bytes=gib, free_bytes=100 * gib) == "cpu"  # CPU device: always cpu
    assert pick(device_type="cuda", cpu_only=["color_jitter"], pack_bytes=gib, free_bytes=100 * gib) == "cpu"
    assert pick(device_type="cuda", pack_bytes=None, free_bytes=100 * gib) == "cpu"  # no pack
    assert "tlkit data pack" in choose_loader("auto", device_type="cuda")[1]  # ... with a hint to make one
    assert pick(device_type="cuda", pack_bytes=25 * gib, free_bytes=100 * gib) == "gpu"  # a quarter fits
    assert pick(device_type="cuda", pack_bytes=25 * gib + 1, free_bytes=100 * gib) == "packed"  # just over
    assert pick("jpeg", device_type="cpu") == "jpeg" and pick("packed", device_type="cpu") == "packed"
    with pytest.raises(ValueError, match="data.loader"):
        pick("fast", device_type="cuda")
    assert cpu_only_augmentations(DataConfig(grayscale=True, crop_mode="squash")) == ["grayscale", "crop_mode=squash"]


@needs_tiny
def test_fast_loaders_shard_over_ranks_and_count_unreadable_files(packs, tmp_path):
    """DDP: each rank's loader takes its own share of the epoch's shuffled order (as the DataLoader's sampler);
    a pack's unreadable files count once an epoch, in rank 0's first batch."""
    root, _, _ = packs
    ds = PackedDataset(root / "train-64")
    data = DataConfig(img_size=32)
    seen = []
    for rank in (0, 1):
        loader = make_fast_loader("gpu", ds, data, batch_size=3, train=True, seed=5, device="cpu", rank=rank, world=2)
        loader.set_epoch(2)
        seen.append([i for _, idx in loader._batches() for i in idx])
        assert len(loader) == 3 and sum(int(f.sum()) for _, _, f in loader) == 0
    assert len(seen[0]) == len(seen[1]) == 9 and sorted(seen[0] + seen[1]) == list(range(18))
    # one file of four could not be decoded when packing: counted in each epoch, on rank 0 only
    data_root = tmp_path / "data"
    for cls in ("a", "b"):
        (data_root / "train" / cls).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (24, 16), (k * 50, 100, 200)).save(data_root / "train" / cls / f"{k}.jpg")
    (data_root / "train" / "b" / "1.jpg").write_bytes(b"not a jpeg")
    pack_split(data_root, "train", tmp_path / "pack", 16, workers=1)
    bad = PackedDataset(tmp_path / "pack")
    for rank, expected in ((0, 1), (1, 0)):
        for train in (True, False):
            loader = make_fast_loader(
                "packed", bad, data, batch_size=1, train=train, seed=0, device="cpu", rank=rank, world=2
            )
            for epoch in (1, 2):
                loader.set_epoch(epoch)
                assert sum(int(f.sum()) for _, _, f in loader) == expected, (rank, train, epoch)


SLICE = ("n01443537", "n04146614", "n09246464")  # goldfish, school bus, cliff: 20 train + 10 val images each
SLICE_SETS = ["data.max_per_class=20", "data.crop_pct=0.875"]


def _sets(sets: list[str]) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from tlkit.cli import app

    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def sliced(tmp_path_factory):
    """Three tiny_imagenet classes linked into a dataset folder, packed by `tlkit data pack` (train at 32 px,
    val at round(32 / 0.875) = 37 px, as a run at 32 px with crop_pct 0.875 evaluates)."""
    if not (TINY / "train").is_dir():
        pytest.skip("tiny_imagenet_200 sample data not present")
    base = tmp_path_factory.mktemp("slice")
    for split in ("train", "val"):
        (base / "data" / split).mkdir(parents=True)
        for wnid in SLICE:
            (base / "data" / split / wnid).symlink_to(TINY / split / wnid, target_is_directory=True)
    out = ["--data", str(base / "data"), "--size", "32", "--out", str(base / "packs"), "--workers", "1", "--quiet"]
    result = _cli(["data", "pack", *out, *_sets(SLICE_SETS)])
    assert result.exit_code == 0, result.output
    return base, result


def _pretrain_args(base, out, epochs: int, extra: list[str] = ()) -> list[str]:
    sets = [*SLICE_SETS, "data.loader=packed", f"data.pack={base / 'packs'}", "data.num_workers=0", *extra]
    args = ["--quiet", "--arch", "resnet10t", "--img-size", "32", "--batch-size", "6", "--device", "cpu"]
    return [
        *args,
        "--epochs",
        str(epochs),
        "--seed",
        "3",
        "--data",
        str(base / "data"),
        "--out",
        str(out),
        *_sets(sets),
    ]


def test_cli_pack_writes_train_and_val_packs(sliced):
    base, result = sliced
    train, val = PackedDataset(base / "packs" / "train-32"), PackedDataset(base / "packs" / "val-37")
    assert len(train) == 60 and len(val) == 30 and train.class_ids == val.class_ids == sorted(SLICE)
    assert val.meta["eval_for"] == 32 and train.meta["source"]["files"] == 60
    assert "packed 60 images (0 unreadable, skipped) of 3 classes at 32 px" in result.output
    again = _cli(["data", "pack", "--data", str(base / "data"), "--out", str(base / "packs"), "--size", "32"])
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert again.exit_code == 2 and len(lines) == 1 and "--overwrite" in lines[0], again.output


@pytest.fixture(scope="module")
def trained(sliced):
    """`tlkit pretrain` on the packed slice (in process): 4 epochs of resnet10t at 32 px."""
    base, _ = sliced
    result = _cli(["pretrain", *_pretrain_args(base, base / "run", 4)])
    assert result.exit_code == 0, result.output
    return base, base / "run"


def test_packed_loader_trains_through_pretrain(trained):
    _, run = trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data_loader"] == "packed" and summary["skipped_images"] == 0
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], [r["train_loss"] for r in rows]
    # chance is 1/3 on three classes; measured 0.63 best of 4 epochs (30 val images)
    assert summary["best_top1"] >= 0.5, [r["val_top1"] for r in rows]
    assert all(0 <= r["data_wait_fraction"] <= 1 and r["img_per_s"] > 0 for r in rows)


def test_packed_eval_matches_the_cpu_path_on_the_same_checkpoint(trained):
    """The val pack holds the eval transform's pixels (same cv2 resize, same centre crop), so the packed
    path's eval equals the cpu (albumentations) path's: measured max |prob diff| 9e-8; tolerance 1e-5."""
    from tlkit.checkpoint import load_tlkit_checkpoint
    from tlkit.config import load_recipe
    from tlkit.data.data_path import build_packed_datasets, eval_loader
    from tlkit.engine import topk_metrics
    from tlkit.tasks.classification.val import checkpoint_logits

    base, run = trained
    ckpt = load_tlkit_checkpoint(run / "best.pt")
    recipe = load_recipe(str(run / "config.yaml"))
    cpu_logits, cpu_targets, _ = checkpoint_logits(ckpt, base / "data", "val", device="cpu", quiet=True)
    val = build_packed_datasets(recipe, ckpt["class_ids"]).val
    loader = eval_loader("packed", val, recipe, "cpu")
    logits, targets, _ = checkpoint_logits(ckpt, base / "data", "val", device="cpu", quiet=True, loader=loader)
    assert torch.equal(targets, cpu_targets)
    assert (logits.softmax(1) - cpu_logits.softmax(1)).abs().max() < 1e-5
    assert topk_metrics(logits, targets)["val_top1"] == topk_metrics(cpu_logits, cpu_targets)["val_top1"]
    assert topk_metrics(logits, targets)["val_top1"] == ckpt["best_top1"]  # what training reported


def test_stale_or_missing_pack_is_refused_in_one_line(tmp_path):
    if not (TINY / "train").is_dir():
        pytest.skip("tiny_imagenet_200 sample data not present")
    import shutil

    for wnid in SLICE[:2]:
        (tmp_path / "data" / "train" / wnid).mkdir(parents=True)
        for src in sorted((TINY / "train" / wnid).iterdir())[:3]:
            shutil.copy(src, tmp_path / "data" / "train" / wnid / src.name)
    args = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "packs"), "--size", "32", "--quiet"]
    assert _cli(["data", "pack", *args, "--workers", "1"]).exit_code == 0
    victim = next((tmp_path / "data" / "train" / SLICE[0]).iterdir())
    victim.write_bytes(victim.read_bytes() + b"\0")  # one file changed after packing
    for pack, expected in ((tmp_path / "packs", "stale"), (tmp_path / "nowhere", "tlkit data pack")):
        result = _cli(["pretrain", *_pretrain_args(tmp_path, tmp_path / "run", 1, [f"data.pack={pack}"])])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], result.output
        assert not (tmp_path / "run").exists()  # refused before a run folder is made


def test_pack_a_csv_listed_dataset(tmp_path):
    """`tlkit data pack` reads every layout the datasets read: here a CSV of path,label,split (layout csv)."""
    if not (TINY / "train").is_dir():
        pytest.skip("tiny_imagenet_200 sample data not present")
    import shutil

    from tlkit.config import Recipe
    from tlkit.data.data_path import build_packed_datasets

    rows = ["path,label,split"]
    for wnid in SLICE[:2]:
        for split in ("train", "val"):
            for src in sorted((TINY / split / wnid).iterdir())[:3]:
                (tmp_path / "img" / split).mkdir(parents=True, exist_ok=True)
                shutil.copy(src, tmp_path / "img" / split / src.name)
                rows.append(f"img/{split}/{src.name},{wnid},{split}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    args = ["--data", str(tmp_path / "list.csv"), "--size", "32", "--out", str(tmp_path / "packs"), "--quiet"]
    result = _cli(["data", "pack", *args, "--workers", "1"])
    assert result.exit_code == 0, result.output
    data = DataConfig(name=str(tmp_path / "list.csv"), img_size=32, crop_pct=1.0, pack=str(tmp_path / "packs"))
    bundle = build_packed_datasets(Recipe(data=data))
    assert len(bundle.train) == len(bundle.val) == 6 and bundle.class_ids == sorted(SLICE[:2])
    assert bundle.train.meta["layout"] == "auto" and bundle.train.meta["source"]["files"] == 6


@pytest.mark.slow
def test_packed_run_resumes_exactly_after_kill_9_mid_epoch(sliced, tmp_path):
    """B (`tlkit pretrain` in a child process) is SIGKILLed as soon as its first mid-epoch checkpoint exists, then
    resumed; A runs through. Both on the packed path with progressive resizing (24 px in epoch 1, 32 in epoch 2):
    rows and weights equal A's. A and the resume need no kill: they run in this process (CliRunner, one thread as
    in the child, so bit-for-bit comparable), A while B's interpreter starts (conftest.WARM_TLKIT)."""
    import os
    import signal
    import subprocess
    import time

    from conftest import subprocess_env, warm_tlkit_cmd

    base, _ = sliced
    extra = ["train.save_every_steps=2", "train.progressive_min_size=24"]

    def args(name: str, *more: str) -> list[str]:
        return ["pretrain", *_pretrain_args(base, tmp_path / name, 2, extra), *more]

    go, log = tmp_path / "go", tmp_path / "B.log"
    with log.open("w") as out:
        cmd = warm_tlkit_cmd(go, args("B"))
        b = subprocess.Popen(cmd, env=subprocess_env(tmp_path / "runs"), stdout=out, stderr=subprocess.STDOUT)
    try:
        result = _cli(args("A"))  # while B imports
        assert result.exit_code == 0, result.output[-2000:]
        go.touch()
        deadline = time.monotonic() + 120
        while not (tmp_path / "B" / "last.pt").exists():  # the first save: step 2 of 10 in epoch 1
            assert b.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.005)
        os.kill(b.pid, signal.SIGKILL)
        b.wait(timeout=30)
    finally:
        if b.poll() is None:
            b.kill()
    assert b.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    killed = torch.load(tmp_path / "B" / "last.pt", map_location="cpu", weights_only=True)
    assert killed["step_in_epoch"] > 0, (killed["epoch"], killed["step_in_epoch"])  # killed mid-epoch
    result = _cli(args("B", "--resume", str(tmp_path / "B")))
    assert result.exit_code == 0, result.output[-2000:]
    rows = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in "AB"}
    assert [r["epoch"] for r in rows["B"]] == [1, 2]
    for ra, rb in zip(rows["A"], rows["B"], strict=True):
        for key in ("train_loss", "val_loss", "val_top1", "lr", "skipped"):
            assert ra[key] == rb[key], (ra["epoch"], key)  # bit for bit: one thread each
    last_a, last_b = (torch.load(tmp_path / n / "last.pt", map_location="cpu", weights_only=True) for n in "AB")
    assert all(torch.equal(v, last_b["model"][k]) for k, v in last_a["model"].items())


@pytest.mark.slow
def test_run_gpu_script_smoke_e2e_stage(tmp_path):
    """`SMOKE=1 bash benchmarks/run_gpu.sh e2e`: the script's `tlkit data pack` + `tlkit pretrain` stage at toy
    sizes on the CPU, into the day's results JSON. (All stages' smoke forms together take minutes on a shared
    2-core machine: `SMOKE=1 bash benchmarks/run_gpu.sh`, see benchmarks/README.md.)"""
    import os
    import subprocess
    import sys

    from tlkit.paths import REPO_DIR

    if not (TINY / "train").is_dir():
        pytest.skip("tiny_imagenet_200 sample data not present")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "SMOKE": "1",
        "OUT": str(out),
        "TLKIT_PACKS": str(tmp_path / "packs"),
        "PYTHON": sys.executable,
        # one torch thread per child, as every other test's children: on a small CPU shared with other jobs the
        # default thread pool spins against them (measured 5 img/s instead of ~110 for resnet10t @32 on 2 cores)
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    script = REPO_DIR / "benchmarks" / "run_gpu.sh"
    subprocess.run(["bash", str(script), "e2e"], env=env, capture_output=True, timeout=600)
    log = (out / "run_gpu.log").read_text()
    assert "FAILED" not in log and "pretrain end to end" in log, log[-4000:]
    results = json.loads(next(out.glob("*-cpu.json")).read_text())
    runs = {r["name"]: r for r in results["pretrain_e2e"]}
    assert set(runs) == {"tiny64", "r50_224"} and all(r["loader"] == "packed" for r in runs.values())
    for run in runs.values():
        for row in run["epochs"]:
            assert row["img_per_s"] > 0 and 0 <= row["data_wait_fraction"] <= 1 and 0 <= row["val_top1"] <= 1
    assert results["pretrain_e2e_img_s"] == runs["r50_224"]["steady_img_s"]
