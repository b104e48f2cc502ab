"""`data.layout: csv` (path,label[,split], paths relative to the CSV) on real traffic-sign images, and EXIF
orientation applied by the one image loader, so a phone photo stored sideways is seen upright everywhere."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tlkit.cli import app
from tlkit.data.datasets import DataError, has_split, scan_split

runner = CliRunner()

# Three GTSRB classes with their display names as CSV labels (sorted: "no entry" < "stop" < "yield").
SIGNS = {"17": "no entry", "14": "stop", "13": "yield"}


# ---- EXIF orientation ----------------------------------------------------------------------------------------


@pytest.fixture
def sideways_photo(tmp_path, data_dir) -> tuple[Path, np.ndarray]:
    """A real ImageNet photo stored as a phone does: pixels rotated 90 degrees counter-clockwise plus EXIF
    orientation 6 ("rotate 90 clockwise to view"); returned with the upright original's pixels."""
    src = sorted((data_dir / "imagenet_sample" / "val").rglob("*.JPEG"))[0]
    upright = Image.open(src).convert("RGB")
    assert upright.width != upright.height  # a rotation must change the shape, not only the pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.png"  # lossless, so the comparison is exact
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    return path, np.asarray(upright)


def test_exif_orientation_6_loads_upright_in_every_reader(sideways_photo):
    from tlkit.data.clips import load_frame
    from tlkit.data.io import load_rgb_array
    from tlkit.demo import read_upload

    path, upright = sideways_photo
    assert np.asarray(Image.open(path)).shape != upright.shape  # stored sideways
    # datasets, predict, explain (paths), the GPU decoder's host fallback (bytes), a PIL image, clip frames, demos
    for loaded in (
        load_rgb_array(path),
        load_rgb_array(path.read_bytes()),
        load_rgb_array(Image.open(io.BytesIO(path.read_bytes()))),
        load_frame(path),
        read_upload(path),
    ):
        assert loaded.shape == upright.shape and np.array_equal(loaded, upright)


# ---- CSV layout -------------------------------------------------------------------------------------------------


def write_sign_csv(data_dir: Path, folder: Path, per_class: int, *, split_column: bool = True) -> Path:
    """Real GTSRB images copied under `folder/images`, listed in `folder/signs.csv` with relative paths; train rows
    from GTSRB train, val rows from GTSRB val. Plus one row without a label and one naming a missing file."""
    rows = []
    for split in ("train", "val"):
        for cid, label in SIGNS.items():
            for src in sorted((data_dir / "gtsrb" / split / cid).iterdir())[:per_class]:
                dst = folder / "images" / split / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                rows.append({"path": f"images/{split}/{src.name}", "label": label, "split": split})
    rows.append({"path": "images/train/unlabelled.png", "label": "", "split": "train"})
    rows.append({"path": "images/train/gone.png", "label": "stop", "split": "train"})
    path = folder / "signs.csv"
    columns = ["path", "label", "split"] if split_column else ["path", "label"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_scan_splits_classes_and_skipped_rows(tmp_path, data_dir, caplog):
    table = write_sign_csv(data_dir, tmp_path, 3)
    samples, classes = scan_split(table, "train", layout="csv")
    assert classes == ["no entry", "stop", "yield"]
    assert len(samples) == 3 * 3 + 1  # the row with a missing file stays: it is counted when it fails to load
    assert all(s.path.parent.parent.parent == tmp_path for s in samples)  # relative to the CSV
    assert "skipped 1 unreadable row(s)" in caplog.text
    val, _ = scan_split(table, "val", classes, layout="auto")  # a .csv file is read as a CSV whatever the layout
    assert len(val) == 9 and has_split(table, "val") and not has_split(table, "test")
    # without a split column the rows are the split asked for (a labelled list to evaluate); no val split
    flat = write_sign_csv(data_dir, tmp_path / "flat", 2, split_column=False)
    assert len(scan_split(flat, "val", layout="csv")[0]) == 2 * 3 * 2 + 1 and not has_split(flat, "val")
    with pytest.raises(DataError, match="reads a .csv file"):
        scan_split(data_dir / "gtsrb", "train", layout="csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.png,stop\n")
    with pytest.raises(DataError, match="needs a header row path,label"):
        scan_split(bad, "train", layout="csv")


def test_csv_dataset_finetunes_and_evaluates_through_the_cli(tmp_path, data_dir, imagenet_weights, cli_sets):
    """A linear probe of the ImageNet EfficientNet-Lite0 on a CSV of real signs: classes come from the CSV's
    labels, the missing file is skipped and counted, evaluate reads the same CSV, the body stays the weights'."""
    table = write_sign_csv(data_dir, tmp_path / "data", 10)
    out = tmp_path / "run"
    sets = ["data.layout=csv", "data.roi_crop=false", "data.num_workers=0", "data.img_size=48", "data.blur=0"]
    args = ["finetune", "--recipe", "traffic-signs", "--data", str(table), "--init", str(imagenet_weights)]
    args += ["--arch", "tf_efficientnet_lite0", "--strategy", "linear-probe", "--lr", "1.0", "--epochs", "2"]
    args += ["--batch-size", "8", "--out", str(out), "--quiet"]
    result = runner.invoke(app, args + cli_sets(sets))
    assert result.exit_code == 0, result.output
    import torch

    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["classes"] == ["no entry", "stop", "yield"] and ckpt["data_root"] == str(table)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped"] for r in rows) >= 1  # gone.png, counted like any unreadable image
    weights = torch.load(imagenet_weights, weights_only=True)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in weights.items() if not k.startswith("classifier."))

    result = runner.invoke(app, ["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(table)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "eval-val" / "metrics.json").read_text())
    # 30 val signs of 3 classes (chance 1/3): measured 0.90 (seed 0, one thread); 0.7 fails a head that did
    # not learn or features fed the wrong preprocessing
    assert metrics["top1"] > 0.7, metrics["top1"]
