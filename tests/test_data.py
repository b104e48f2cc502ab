"""Data layer on real and deliberately broken files: decoding, skipping, layouts, sampling, augmentation."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tlkit.config import DataConfig, load_recipe
from tlkit.data.datasets import DataError, ImageDataset, Sample, read_class_names, scan_split
from tlkit.data.io import DRAFT_SIDE, ImageDecodeError, load_rgb_array
from tlkit.data.loader import EpochSampler, build_datasets
from tlkit.data.transforms import Preprocessing, train_transform

# ---- decoding --------------------------------------------------------------------------------------------


def _noise(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _assert_rgb(arr: np.ndarray, h: int, w: int) -> None:
    assert arr.dtype == np.uint8
    assert arr.shape == (h, w, 3)
    assert arr.flags.writeable


def test_grayscale_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "gray.JPEG"
    Image.fromarray(np.full((30, 50), 100, np.uint8), mode="L").save(path)
    arr = load_rgb_array(path)
    _assert_rgb(arr, 30, 50)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    assert abs(int(arr.mean()) - 100) <= 2


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.JPEG"
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    arr = load_rgb_array(path)
    _assert_rgb(arr, 30, 40)
    r, g, b = arr.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60, (r, g, b)


def test_png_named_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "n01440764_10043.JPEG"
    src = _noise()
    Image.fromarray(src).save(path, format="PNG")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    arr = load_rgb_array(path)
    assert np.array_equal(arr, src)  # lossless: the real format was sniffed, not guessed from the name


def test_rgba_png_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)  # opaque red left half
    rgba[:, 10:] = (0, 0, 255, 0)  # fully transparent right half
    Image.fromarray(rgba, mode="RGBA").save(path)
    arr = load_rgb_array(path)
    _assert_rgb(arr, 20, 20)
    assert (arr[:, :10] == (255, 0, 0)).all()
    assert (arr[:, 10:] == 255).all()


def test_16bit_png_rescaled(tmp_path: Path) -> None:
    path = tmp_path / "xray16.png"
    ramp = np.tile(np.linspace(1000, 4000, 64).astype(np.uint16), (16, 1))  # uses 12 of the 16 bits
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    arr = load_rgb_array(path)
    _assert_rgb(arr, 16, 64)
    assert arr.min() == 0 and arr.max() == 255  # scaled by the image's own range, not by 65535
    assert np.all(np.diff(arr[0, :, 0].astype(int)) >= 0)


def test_uint16_array_and_pil_inputs() -> None:
    arr = load_rgb_array(np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000)
    _assert_rgb(arr, 3, 4)
    assert arr.min() == 0 and arr.max() == 255
    _assert_rgb(load_rgb_array(Image.new("P", (5, 6))), 6, 5)


def test_truncated_jpeg_raises(tmp_path: Path) -> None:
    data = _jpeg_bytes(Image.fromarray(_noise(64, 64)), quality=95)
    path = tmp_path / "truncated.JPEG"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated.JPEG"):
        load_rgb_array(path)


@pytest.mark.parametrize("content", [b"", b"this is not an image\n" * 10, b"\xff\xd8\xff\xe0garbage"])
def test_garbage_files_raise(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.JPEG"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError) as err:
        load_rgb_array(path)
    assert "broken.JPEG" in str(err.value) and "\n" not in str(err.value)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="cannot open"):
        load_rgb_array(tmp_path / "nope.jpg")


def _claim_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A small baseline JPEG whose SOF0 header claims another size (a decompression bomb, cheaply)."""
    i = jpeg.index(b"\xff\xc0")
    out = bytearray(jpeg)
    out[i + 5 : i + 7] = height.to_bytes(2, "big")
    out[i + 7 : i + 9] = width.to_bytes(2, "big")
    return bytes(out)


@pytest.mark.parametrize("side", [20_000, 30_000])  # 400 M px (PIL warning) and 900 M px (PIL error)
def test_decompression_bomb_rejected(tmp_path: Path, side: int) -> None:
    path = tmp_path / "bomb.JPEG"
    path.write_bytes(_claim_size(_jpeg_bytes(Image.new("RGB", (16, 16))), side, side))
    with pytest.raises(ImageDecodeError, match="too large"):
        load_rgb_array(path)


def test_pixel_limit_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ok.png"
    Image.fromarray(_noise(40, 40)).save(path)
    assert load_rgb_array(path).shape == (40, 40, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError, match="too large") as err:
        load_rgb_array(path)
    assert "1,000" in str(err.value)  # the message names the limit in force


def test_huge_jpeg_decodes_in_draft_mode(tmp_path: Path) -> None:
    path = tmp_path / "scan.JPEG"
    Image.new("L", (12_000, 9_000), 200).save(path, quality=50)
    arr = load_rgb_array(path)
    h, w, c = arr.shape
    assert c == 3 and arr.dtype == np.uint8
    assert DRAFT_SIDE <= max(h, w) < 12_000  # decoded at reduced scale by libjpeg
    assert w / h == pytest.approx(12_000 / 9_000, rel=0.01)
    assert abs(int(arr.mean()) - 200) <= 2


def test_real_sample_images_decode(data_dir: Path) -> None:
    root = data_dir / "imagenet_sample" / "val"
    if not root.is_dir():
        pytest.skip("imagenet_sample not present")
    files = sorted(root.rglob("*.JPEG"))[:12]
    for f in files:
        arr = load_rgb_array(f)
        assert arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8


# ---- datasets: skipping corrupt files ----------------------------------------------------------------------


def test_dataset_skips_corrupt_files_and_counts(tmp_path: Path, tiny_root: Path, tiny_wnids: list[str]) -> None:
    good = sorted((tiny_root / "train" / tiny_wnids[0]).iterdir())[:6]
    zero = tmp_path / "zero.JPEG"
    zero.write_bytes(b"")
    trunc = tmp_path / "trunc.JPEG"
    trunc.write_bytes(good[0].read_bytes()[:300])
    # bad files are never adjacent, so each one is skipped exactly once
    paths = [good[0], zero, good[1], good[2], trunc, good[3], good[4], good[5]]
    samples = [Sample(p, i % 3) for i, p in enumerate(paths)]
    dataset = ImageDataset(samples)
    image, target, failed = dataset[1]
    assert failed == 1 and target == samples[2].target
    assert torch.equal(image, dataset[2][0])
    batches = list(DataLoader(dataset, batch_size=4, num_workers=0))
    assert [b[0].shape for b in batches] == [torch.Size([4, 3, 64, 64])] * 2
    assert int(sum(b[2].sum() for b in batches)) == 2


def test_dataset_all_unreadable_raises(tmp_path: Path) -> None:
    paths = []
    for i in range(4):
        p = tmp_path / f"bad{i}.JPEG"
        p.write_bytes(b"nope")
        paths.append(p)
    dataset = ImageDataset([Sample(p, 0) for p in paths], max_retries=4)
    with pytest.raises(DataError, match="unreadable"):
        dataset[0]


def test_training_over_corrupt_files_reports_skips(tmp_path: Path, tiny_root: Path, tiny_wnids: list[str]) -> None:
    from tlkit.engine import fit

    root = tmp_path / "broken_set"
    for k, wnid in enumerate(tiny_wnids[:3]):
        train = sorted((tiny_root / "train" / wnid).iterdir())[:10]
        for src in train[: 10 - (k < 2)]:
            (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, root / "train" / wnid / src.name)
        for src in sorted((tiny_root / "val" / wnid).iterdir())[:3]:
            (root / "val" / wnid).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, root / "val" / wnid / src.name)
    (root / "train" / tiny_wnids[0] / "a_empty.JPEG").write_bytes(b"")  # sorts first in its class
    good = next((root / "train" / tiny_wnids[1]).iterdir())
    (root / "train" / tiny_wnids[1] / "z_truncated.JPEG").write_bytes(good.read_bytes()[:200])  # sorts last
    (root / "val" / tiny_wnids[2] / "garbage.JPEG").write_bytes(b"\x00" * 100)
    recipe = load_recipe(
        "imagenet",
        {
            "data": {"name": str(root), "img_size": 32, "num_workers": 0},
            "model": {"arch": "resnet10t"},
            "train": {"epochs": 1, "batch_size": 10, "out": str(tmp_path / "run")},
        },
    )
    result = fit(recipe, quiet=True)
    assert result.skipped == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_images"] == 2
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["skipped"] == 2 and row["val_skipped"] == 1
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"])


# ---- layouts -----------------------------------------------------------------------------------------------


def test_empty_class_folder_is_an_error(tmp_path: Path, tiny_root: Path, tiny_wnids: list[str]) -> None:
    src = tiny_root / "train" / tiny_wnids[0]
    for name in ("cat", "dog"):
        for f in sorted(src.iterdir())[:2]:
            (tmp_path / "train" / name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, tmp_path / "train" / name / f.name)
    (tmp_path / "train" / "empty_bird").mkdir()
    (tmp_path / "train" / "empty_bird" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="empty_bird"):
        scan_split(tmp_path, "train")


def test_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data folder not found"):
        scan_split(tmp_path / "does_not_exist", "train")
    (tmp_path / "only_files").mkdir()
    (tmp_path / "only_files" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="no 'train' folder"):
        scan_split(tmp_path / "only_files", "train")


def test_tiny_imagenet_layout_and_names(tiny_root: Path, tiny_wnids: list[str]) -> None:
    samples, ids = scan_split(tiny_root, "val", max_classes=3, max_per_class=4)
    assert ids == tiny_wnids[:3]
    assert len(samples) == 12 and [s.target for s in samples] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(s.path.parent.name == ids[s.target] for s in samples)
    names = read_class_names(tiny_root, ids)
    assert names[0] == "goldfish"  # n01443537 "goldfish, Carassius auratus": first synonym
    assert all(n and n not in ids for n in names)
    assert read_class_names(tiny_root, ["n99999999"]) == ["n99999999"]


def test_unknown_classes_are_an_error(tiny_root: Path, tiny_wnids: list[str]) -> None:
    with pytest.raises(DataError, match="197 class") as err:
        scan_split(tiny_root, "val", tiny_wnids[:3])
    assert "\n" not in str(err.value)
    samples, _ = scan_split(tiny_root, "val", tiny_wnids[:3], ignore_unknown=True)
    assert len(samples) == 30


def _build_ilsvrc(base: Path, tiny_root: Path, wnids: list[str], split_parent: Path) -> dict[str, str]:
    """ILSVRC-2012 release layout: train/<wnid>/*, flat val/*.JPEG, LOC_val_solution.csv at `base`."""
    truth = {}
    rows = []
    n = 0
    for wnid in wnids:
        for src in sorted((tiny_root / "train" / wnid).iterdir())[:3]:
            (split_parent / "train" / wnid).mkdir(parents=True, exist_ok=True)
            (split_parent / "train" / wnid / src.name).symlink_to(src)
        for src in sorted((tiny_root / "val" / wnid).iterdir())[:2]:
            n += 1
            image_id = f"ILSVRC2012_val_{n:08d}"
            (split_parent / "val").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, split_parent / "val" / f"{image_id}.JPEG")
            truth[image_id] = wnid
            # the real file lists every box: "<wnid> x1 y1 x2 y2 <wnid> x1 y1 x2 y2 ..."
            rows.append(f"{image_id},{wnid} 1 2 30 40 {wnid} 5 5 60 60 ")
    rows.append("ILSVRC2012_val_99999999,n01443537 0 0 1 1 ")  # listed but not on disk: ignored
    rows.reverse()  # the csv is not in file order
    (base / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    shutil.copyfile(tiny_root / "LOC_synset_mapping.txt", base / "LOC_synset_mapping.txt")
    return truth


@pytest.mark.parametrize("layout", ["ilsvrc", "kaggle"])
def test_ilsvrc_flat_val_layouts(tmp_path: Path, tiny_root: Path, tiny_wnids: list[str], layout: str) -> None:
    wnids = [tiny_wnids[0], tiny_wnids[7], tiny_wnids[42]]
    split_parent = tmp_path if layout == "ilsvrc" else tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    truth = _build_ilsvrc(tmp_path, tiny_root, wnids, split_parent)
    recipe = load_recipe("imagenet", {"data": {"name": str(tmp_path), "img_size": 32, "num_workers": 0}})
    bundle = build_datasets(recipe, Preprocessing(img_size=32))
    assert bundle.class_ids == wnids
    assert bundle.classes[0] == "goldfish" and len(set(bundle.classes)) == 3
    assert len(bundle.train) == 9
    assert bundle.val is not None and len(bundle.val) == 6
    for s in bundle.val.samples:
        assert s.path.parent.name == "val"
        assert wnids[s.target] == truth[s.path.stem]
    image, target, failed = bundle.val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and failed == 0


def test_flat_val_without_solution_is_an_error(tmp_path: Path, tiny_root: Path, tiny_wnids: list[str]) -> None:
    truth = _build_ilsvrc(tmp_path, tiny_root, tiny_wnids[:2], tmp_path)
    assert truth
    (tmp_path / "LOC_val_solution.csv").unlink()
    with pytest.raises(DataError, match="LOC_val_solution.csv"):
        scan_split(tmp_path, "val", tiny_wnids[:2])


# ---- sampling and augmentation -----------------------------------------------------------------------------


def test_epoch_sampler_order_and_mid_epoch_start() -> None:
    data = list(range(50))

    def order(epoch: int, seed: int = 0, rank: int = 0, world: int = 1, start: int = 0) -> list[int]:
        s = EpochSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        s.set_epoch(epoch)
        s.start = start
        return list(s)

    assert order(1) == order(1) and order(1) != order(2) and order(1) != order(1, seed=1)
    assert sorted(order(3)) == data
    assert order(2, start=20) == order(2)[20:]
    ranks = [order(1, rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 25 and not set(ranks[0]) & set(ranks[1])
    evals = EpochSampler(data, num_replicas=3, rank=2, shuffle=False, seed=0, drop_last=False)
    assert list(evals) == list(range(2, 50, 3)) and len(evals) == 16


def test_augmentation_seeded_per_seed_epoch_index(tiny_root: Path, tiny_wnids: list[str]) -> None:
    samples, _ = scan_split(tiny_root, "train", max_classes=1, max_per_class=4)
    transform = train_transform(DataConfig(img_size=32))
    a = ImageDataset(samples, transform, seed=0)
    b = ImageDataset(samples, train_transform(DataConfig(img_size=32)), seed=0)
    a.set_epoch(1)
    b.set_epoch(1)
    first = a[2][0]
    _ = [a[i] for i in range(4)]  # other draws in between change nothing
    assert torch.equal(first, a[2][0]) and torch.equal(first, b[2][0])
    a.set_epoch(2)
    assert not torch.equal(first, a[2][0])
    c = ImageDataset(samples, transform, seed=1)
    c.set_epoch(1)
    assert not torch.equal(first, c[2][0])


def test_augmentation_ops_draw_independently() -> None:
    """Each op must get its own random draws: a flip must not imply a small crop (regression)."""
    transform = train_transform(DataConfig(img_size=32, scale_min=0.1, hflip=0.5))
    ramp = np.tile((np.arange(64, dtype=np.uint8) * 4)[None, :, None], (64, 1, 3))  # brighter to the right
    flipped, spread = [], []
    for seed in range(400):
        row = transform(ramp, seed)[16, :, 0].astype(int)
        flipped.append(row[0] > row[-1])
        spread.append(row.max() - row.min())  # grows with the crop's width
    flipped, spread = np.array(flipped), np.array(spread)
    assert 0.4 < flipped.mean() < 0.6
    assert abs(spread[flipped].mean() - spread[~flipped].mean()) < 25, (
        spread[flipped].mean(),
        spread[~flipped].mean(),
    )


def test_clip_layout_labels_frames_from_labels_csv(data_dir: Path) -> None:
    root = data_dir / "ucsd_ped2"
    val, classes = scan_split(root, "val", layout="clips", clips=["Test001"])
    assert classes == ["normal", "abnormal"] and len(val) == 180
    # UCSD Ped2 Test001: frames 61-180 are abnormal (labels.csv is keyed by frame number)
    assert [s.target for s in val if s.path.name in ("060.jpg", "061.jpg")] == [0, 1]
    assert sum(s.target for s in val) == 120
    train, _ = scan_split(root, "train", layout="clips")  # clips without labels.csv: all normal
    assert len(train) == 990 and not any(s.target for s in train)
    rest, _ = scan_split(root, "val", layout="clips", skip_clips=["Test001"])
    assert len(rest) == 360 and not {s.path for s in rest} & {s.path for s in val}
    with pytest.raises(DataError, match="no clip.*Test999"):
        scan_split(root, "val", layout="clips", clips=["Test999"])
    with pytest.raises(DataError, match="unknown data layout"):
        scan_split(root, "val", layout="frames")


def test_squash_keeps_the_whole_frame() -> None:
    # A 360x240 frame, bright only in its left-most 40 columns: a centre crop cuts that off, squash keeps it.
    from tlkit.data.transforms import eval_transform

    frame = np.zeros((240, 360, 3), dtype=np.uint8)
    frame[:, :40] = 255
    center = eval_transform(Preprocessing(img_size=64, crop_pct=1.0))(frame, 0)
    squash = eval_transform(Preprocessing(img_size=64, crop_mode="squash"))(frame, 0)
    assert center.shape == squash.shape == (64, 64, 3)
    assert center.max() == 0 and squash[:, :5].min() == 255
    train = train_transform(DataConfig(img_size=64, crop_mode="squash", hflip=0.0))(frame, 0)
    assert train.shape == (64, 64, 3) and train[:, :5].min() == 255
