"""tlkit.predict / tlkit.explain on a real checkpoint fine-tuned by the engine (tiny malaria subset).

The checkpoint helpers below are shared with test_apps.py and test_browser.py: checkpoints are built
once per session under pytest's base temp folder and reused by whichever module asks first.
"""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tlkit.paths import data_root

# ---- shared checkpoint factory ------------------------------------------------------------------------

_BUILD_LOCK = threading.Lock()


def link_subset(src: Path, dst: Path, per_split: dict[str, int], classes: list[str] | None = None) -> Path:
    """`dst/<split>/<class>/` with symlinks to the first n images of each class of `src/<split>/`."""
    for split, n in per_split.items():
        for class_dir in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            if classes is not None and class_dir.name not in classes:
                continue
            out = dst / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(class_dir.iterdir())[:n]:
                (out / f.name).symlink_to(f)
    return dst


def _train(base: Path, recipe: str, overrides: dict) -> Path:
    from tlkit.workflows import run_training

    old = os.environ.get("TLKIT_RUNS")
    os.environ["TLKIT_RUNS"] = str(base / "runs")
    try:
        run_dir = run_training(recipe, overrides, kind="finetune", quiet=True)
    finally:
        if old is None:
            os.environ.pop("TLKIT_RUNS", None)
        else:
            os.environ["TLKIT_RUNS"] = old
    best = Path(run_dir) / "best.pt"
    assert best.is_file(), f"{recipe} fine-tuning wrote no best.pt in {run_dir}"
    return best


TINY_CLASSIFY = {
    "model": {"init": "scratch", "arch": "resnet10t"},
    "train": {"epochs": 1, "batch_size": 16, "seed": 0},
    "optim": {"warmup_epochs": 0.0},
}


def medical_checkpoint(base: Path) -> Path:
    """The medical recipe on 2 x 16 malaria cells (val 2 x 8), 48 px, one epoch: a binary classifier with
    the temperature, threshold and val metrics that calibration stores."""
    with _BUILD_LOCK:
        best = base / "runs" / "finetune-medical-test" / "best.pt"
        if best.is_file():
            return best
        root = link_subset(data_root() / "malaria", base / "malaria", {"train": 16, "val": 8})
        overrides = {
            **TINY_CLASSIFY,
            "data": {"name": str(root), "img_size": 48, "num_workers": 0},
            "train": {**TINY_CLASSIFY["train"], "out": str(best.parent)},
            "finetune": {"strategy": "full"},
        }
        return _train(base, "medical", overrides)


def traffic_checkpoint(base: Path) -> Path:
    """The traffic-signs recipe on 4 GTSRB classes x 12 images (val 4 x 4), 48 px, one epoch."""
    with _BUILD_LOCK:
        best = base / "runs" / "finetune-traffic-signs-test" / "best.pt"
        if best.is_file():
            return best
        classes = ["01", "14", "25", "38"]
        root = link_subset(data_root() / "gtsrb", base / "gtsrb", {"train": 12, "val": 4}, classes)
        (root / "classes.csv").symlink_to(data_root() / "gtsrb" / "classes.csv")
        overrides = {
            **TINY_CLASSIFY,
            "data": {"name": str(root), "img_size": 48, "num_workers": 0},
            "train": {**TINY_CLASSIFY["train"], "out": str(best.parent)},
        }
        return _train(base, "traffic-signs", overrides)


def surveillance_checkpoint(base: Path) -> Path:
    """The surveillance recipe (PatchCore bank) on scratch-initialised features, 128 px: 30 frames of
    Train001; alert threshold chosen on Test001 frames 41-100 (cyclist from frame 61). sample.mp4 is cut
    from Test001 too, so tests with it check the demo's plumbing, not how well the detector generalises."""
    with _BUILD_LOCK:
        best = base / "runs" / "finetune-surveillance-test" / "best.pt"
        if best.is_file():
            return best
        src, root = data_root() / "ucsd_ped2", base / "ped2"
        train = root / "train" / "Train001"
        train.mkdir(parents=True)
        for f in sorted((src / "train" / "Train001").glob("*.jpg"))[:120:4]:
            (train / f.name).symlink_to(f)
        val = root / "val" / "Test001"
        val.mkdir(parents=True)
        lines = (src / "val" / "Test001" / "labels.csv").read_text().splitlines()
        keep = [row for row in lines[1:] if 41 <= int(row.split(",")[0]) <= 100]
        (val / "labels.csv").write_text("\n".join([lines[0], *keep]) + "\n")
        for row in keep:
            name = f"{int(row.split(',')[0]):03d}.jpg"
            (val / name).symlink_to(src / "val" / "Test001" / name)
        overrides = {
            "data": {"name": str(root), "img_size": 128},
            "model": {"init": "scratch"},
            "anomaly": {"max_train_frames": 30},
            "train": {"out": str(best.parent), "batch_size": 16},
        }
        return _train(base, "surveillance", overrides)


def shared_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp() / "tlkit-checkpoints"
    base.mkdir(exist_ok=True)
    return base


@pytest.fixture(scope="session")
def medical_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (data_root() / "malaria").is_dir():
        pytest.skip(f"malaria sample not found under {data_root()}")
    return medical_checkpoint(shared_base(tmp_path_factory))


@pytest.fixture(scope="session")
def predictor(medical_ckpt: Path):
    from tlkit.predict import Predictor

    return Predictor.from_checkpoint(medical_ckpt, device="cpu")


@pytest.fixture(scope="session")
def cell_images() -> dict[str, list[Path]]:
    val = data_root() / "malaria" / "val"
    return {c: sorted((val / c).iterdir())[:3] for c in ("Parasitized", "Uninfected")}


# ---- Predictor -----------------------------------------------------------------------------------------


def test_predictor_reads_everything_from_the_checkpoint(predictor, medical_ckpt: Path) -> None:
    ckpt = torch.load(medical_ckpt, weights_only=True)
    assert predictor.classes == ckpt["classes"] == ["Parasitized", "Uninfected"]
    assert predictor.preprocessing.img_size == 48
    assert predictor.temperature == pytest.approx(ckpt["temperature"])
    assert predictor.threshold == pytest.approx(ckpt["threshold"])
    assert predictor.positive_index == ckpt["positive_index"] == 0  # recipe: positive_class PNEUMONIA,Parasitized
    assert {"sensitivity", "specificity", "auroc"} <= set(predictor.val_metrics)
    assert not predictor.model.training


def test_predict_output_format(predictor, cell_images) -> None:
    image = cell_images["Parasitized"][0]
    (result,) = predictor.predict(image, topk=5)
    assert set(result) == {"label", "index", "probability", "topk", "decision"}
    assert result["label"] == predictor.classes[result["index"]]
    assert len(result["topk"]) == 2  # k is clipped to the number of classes
    assert result["topk"][0] == {"label": result["label"], "probability": result["probability"]}
    assert sum(t["probability"] for t in result["topk"]) == pytest.approx(1.0, abs=1e-5)
    assert result["topk"][0]["probability"] >= result["topk"][1]["probability"]
    decision = result["decision"]
    assert decision["positive_class"] == "Parasitized"
    assert decision["threshold"] == pytest.approx(predictor.threshold)
    assert decision["score"] == pytest.approx(
        next(t["probability"] for t in result["topk"] if t["label"] == "Parasitized")
    )
    assert decision["positive"] == (decision["score"] >= decision["threshold"])
    assert decision["label"] == ("Parasitized" if decision["positive"] else "Uninfected")
    json.dumps(result)  # JSON-able as is


def test_probabilities_are_the_temperature_scaled_softmax(predictor, cell_images) -> None:
    image = cell_images["Uninfected"][0]
    logits = predictor.logits(predictor.preprocess(image))
    expected = torch.softmax(logits / predictor.temperature, dim=1)[0].numpy()
    (result,) = predictor.predict(image, topk=1)
    assert len(result["topk"]) == 1
    assert result["probability"] == pytest.approx(float(expected.max()), abs=1e-6)


def test_preprocess_accepts_paths_bytes_pil_and_arrays(predictor, cell_images) -> None:
    path = cell_images["Parasitized"][1]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    x = predictor.preprocess(path)
    assert x.shape == (1, 3, 48, 48) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 3  # normalised, not 0..255
    for other in (path.read_bytes(), str(path), Image.open(path), rgb):
        assert torch.allclose(predictor.preprocess(other), x)
    grey = np.asarray(Image.open(path).convert("L"))  # HxW arrays are replicated to 3 channels
    assert predictor.preprocess(grey).shape == (1, 3, 48, 48)


def test_batched_predictions_match_single_ones(predictor, cell_images) -> None:
    images = cell_images["Parasitized"] + cell_images["Uninfected"]
    batched = predictor.predict(images, batch_size=4)
    assert len(batched) == len(images)
    for image, result in zip(images, batched, strict=True):
        (single,) = predictor.predict(image)
        assert single["label"] == result["label"]
        assert single["probability"] == pytest.approx(result["probability"], abs=1e-5)


def test_predict_is_thread_safe(predictor, cell_images) -> None:
    images = cell_images["Parasitized"] + cell_images["Uninfected"]
    expected = [r["probability"] for r in predictor.predict(images)]
    results: dict[int, list[float]] = {}

    def worker(i: int) -> None:
        results[i] = [predictor.predict(img)[0]["probability"] for img in images]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for probs in results.values():
        assert probs == pytest.approx(expected, abs=1e-5)


def test_undecodable_image_raises_a_one_line_error(predictor, tmp_path: Path) -> None:
    from tlkit.data.io import ImageDecodeError

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ImageDecodeError) as err:
        predictor.predict(bad)
    assert "\n" not in str(err.value)


def test_anomaly_checkpoint_is_refused(medical_ckpt: Path, tmp_path: Path) -> None:
    from tlkit.checkpoint import CheckpointError, save_checkpoint
    from tlkit.predict import Predictor

    ckpt = torch.load(medical_ckpt, weights_only=True)
    ckpt["task"] = "anomaly"
    path = save_checkpoint(ckpt, tmp_path / "anomaly.pt")
    with pytest.raises(CheckpointError, match="not an image classifier"):
        Predictor.from_checkpoint(path)


# ---- tlkit predict -------------------------------------------------------------------------------------


def test_cli_predict_json_lines_with_error_lines(medical_ckpt: Path, cell_images, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tlkit.cli import app

    folder = tmp_path / "cells"
    folder.mkdir()
    for f in cell_images["Uninfected"]:
        (folder / f.name).symlink_to(f)
    (folder / "README.txt").write_text("not an image, and not listed: folders expand to images only")
    broken = tmp_path / "broken.png"
    broken.write_bytes(cell_images["Parasitized"][0].read_bytes()[:200])
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    inputs = [str(cell_images["Parasitized"][0]), str(folder), str(broken), str(text), str(tmp_path / "missing.png")]

    result = CliRunner().invoke(app, ["predict", "--checkpoint", str(medical_ckpt), "--topk", "2", *inputs])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [line["file"] for line in lines] == [
        inputs[0],
        *(str(folder / f.name) for f in sorted(cell_images["Uninfected"])),
        str(broken),
        str(text),
        str(tmp_path / "missing.png"),
    ]
    good, errors = lines[:4], lines[4:]
    for line in good:
        assert line["label"] in ("Parasitized", "Uninfected")
        assert sum(t["probability"] for t in line["topk"]) == pytest.approx(1.0, abs=1e-5)
        assert "decision" in line
    for line in errors:
        assert set(line) == {"file", "error"}
        assert line["error"] and "\n" not in line["error"]
    assert "No such file" in errors[2]["error"]


def test_predict_files_matches_predictor(medical_ckpt: Path, predictor, cell_images) -> None:
    from tlkit.predict import predict_files

    files = cell_images["Parasitized"]
    lines = list(predict_files(medical_ckpt, files, topk=2, device="cpu", batch_size=2))
    for line, result in zip(lines, predictor.predict(files), strict=True):
        assert line["label"] == result["label"]
        assert line["probability"] == pytest.approx(result["probability"], abs=1e-5)


def test_cli_predict_bad_checkpoint_is_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tlkit.cli import app

    result = CliRunner().invoke(app, ["predict", "--checkpoint", str(tmp_path / "nope.pt"), "x.png"])
    assert result.exit_code == 2
    assert "checkpoint not found" in result.output and "Traceback" not in result.output


# ---- Grad-CAM -------------------------------------------------------------------------------------------


def test_gradcam_heatmap_and_overlay(predictor, cell_images) -> None:
    from tlkit.explain import DISPLAY_MAX, DISPLAY_MIN, gradcam

    heat, overlay = gradcam(predictor, cell_images["Parasitized"][0])
    assert heat.ndim == 2 and heat.dtype == np.float32
    assert DISPLAY_MIN <= max(heat.shape) <= DISPLAY_MAX
    assert float(heat.min()) >= 0.0 and float(heat.max()) <= 1.0
    assert overlay.shape == (*heat.shape, 3) and overlay.dtype == np.uint8
    other, _ = gradcam(predictor, cell_images["Parasitized"][0], target_index=1)
    assert other.shape == heat.shape


def test_gradcam_covers_the_centre_crop(predictor) -> None:
    from tlkit.explain import crop_box, gradcam

    wide = np.zeros((300, 600, 3), np.uint8)
    wide[:, 250:350] = 255
    heat, overlay = gradcam(predictor, wide)
    assert heat.shape[0] == heat.shape[1]  # square crop (crop_pct 1.0 -> the central 300x300)
    assert crop_box(300, 600, predictor) == (0, 150, 300, 450)


def test_gradcam_does_not_disturb_concurrent_predictions(predictor, cell_images) -> None:
    from tlkit.explain import gradcam

    image = cell_images["Uninfected"][1]
    expected = predictor.predict(image)[0]["probability"]
    seen: list[float] = []
    cams = threading.Thread(target=lambda: [gradcam(predictor, image) for _ in range(3)])
    cams.start()
    while cams.is_alive():
        seen.append(predictor.predict(image)[0]["probability"])
    cams.join()
    assert seen and all(p == pytest.approx(expected, abs=1e-5) for p in seen)
    assert all(p.grad is None for p in predictor.model.parameters())


def test_target_layer_resnet_and_generic_fallback() -> None:
    import timm
    from torch import nn

    from tlkit.explain import find_target_layer

    resnet = timm.create_model("resnet10t", num_classes=3).eval()
    assert find_target_layer(resnet, 224) is resnet.layer4[-1]
    assert find_target_layer(resnet, 32) is resnet.layer3[-1]  # layer4 is 1x1 at 32 px: no spatial CAM

    convs = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip
    assert find_target_layer(convs, 16) is convs[3]  # last 4-D output with a spatial extent

    with pytest.raises(ValueError, match="convolutional"):
        find_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), 8)


def test_explain_files_writes_overlays(medical_ckpt: Path, cell_images, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tlkit.cli import app

    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    images = [str(p) for p in cell_images["Parasitized"][:2]] + [str(bad)]
    out = tmp_path / "cams"
    result = CliRunner().invoke(
        app, ["explain", "--checkpoint", str(medical_ckpt), "--out", str(out), "--target", "Uninfected", *images]
    )
    assert result.exit_code == 0, result.output
    written = [Path(line) for line in result.stdout.strip().splitlines()]
    assert written == [out / f"{Path(p).stem}_gradcam.png" for p in images[:2]]
    for path in written:
        with Image.open(path) as im:
            assert im.mode == "RGB" and min(im.size) >= 224

    result = CliRunner().invoke(app, ["explain", "--checkpoint", str(medical_ckpt), "--target", "Cat", images[0]])
    assert result.exit_code == 2 and "unknown target class" in result.output


def test_explain_accepts_bytes(predictor, cell_images) -> None:
    from tlkit.explain import gradcam

    data = io.BytesIO()
    Image.open(cell_images["Uninfected"][0]).save(data, format="PNG")
    heat, overlay = gradcam(predictor, data.getvalue())
    assert overlay.shape[:2] == heat.shape
