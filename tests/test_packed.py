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
    recipe = Recipe(data=DataConfig(name=str(TINY), img_size=64, crop_pct=0.8))
    train_dir, val_dir = pack_dirs(recipe.data)
    assert train_dir == tmp_path / "tiny_imagenet_200" / "train-64" and val_dir.name == "val-80"
    bundle = build_packed_datasets(recipe)
    assert len(bundle.train) == 18 and bundle.val is None and bundle.class_ids == bundle.train.class_ids
    assert bundle.classes[0] == PackedDataset(root / "train-64").classes[0]
    with pytest.raises(PackError):
        build_packed_datasets(recipe, class_ids=list(reversed(bundle.class_ids)))
