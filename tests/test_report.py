"""tlkit.report: the files a run's report/ folder must contain, and that they are valid."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlkit.metrics import classification_metrics, softmax
from tlkit.report import (
    plot_confusion_matrix,
    plot_reliability,
    plot_roc_pr,
    plot_scores_over_time,
    plot_training_curves,
    read_metrics_jsonl,
    write_per_class_csv,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path | None) -> np.ndarray:
    """A complete, decodable, non-blank PNG; returns its RGB pixels for content checks."""
    assert path is not None and path.exists(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))  # decodes every row: a truncated file raises here
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, f"{path} is (nearly) blank"
    return pixels


def colour_mask(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 25) -> np.ndarray:
    return np.abs(pixels.astype(int) - np.asarray(rgb)).max(axis=-1) <= tol


C0 = (31, 119, 180)  # matplotlib's first line colour


@pytest.fixture
def binary_case() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=120)
    logits = np.stack([np.zeros(y.size), 2.0 * (2 * y - 1) + rng.normal(0, 1.5, size=y.size)], axis=1)
    return softmax(logits), y


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    p = tmp_path / "metrics.jsonl"
    rows = [
        {"epoch": 1, "train_loss": 1.2, "val_loss": 1.0, "val_top1": 0.55, "val_top5": 0.9, "lr": 1e-3},
        {"epoch": 2, "train_loss": 0.8, "val_loss": 0.9, "val_top1": 0.65, "lr": 5e-4, "img_per_s": 100.0},
        {"epoch": 3, "train_loss": 0.6, "val_top1": 0.70, "val_top5": 0.97, "lr": 1e-4, "seconds": 12.5},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"epoch": 4, "train_l', encoding="utf-8")
    return p


def test_training_curves(jsonl: Path, tmp_path: Path) -> None:
    rows = read_metrics_jsonl(jsonl)
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # half-written last line skipped
    drawn = colour_mask(assert_png(plot_training_curves(jsonl, tmp_path / "curves.png")), C0).mean()
    # measured: 0.45 % of the pixels carry the first series' colour with 3 rows; a panel with no series has none
    assert drawn > 0.002, drawn
    only_epoch = tmp_path / "no-series.jsonl"
    only_epoch.write_text('{"epoch": 1}\n')
    assert not colour_mask(assert_png(plot_training_curves(only_epoch, tmp_path / "blank.png")), C0).any()


def test_training_curves_empty_returns_none(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    assert plot_training_curves(empty, tmp_path / "x.png") is None
    assert plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "y.png") is None
    assert not (tmp_path / "x.png").exists()


def test_training_curves_repeated_epoch_keeps_last(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text('{"epoch": 1, "train_loss": 2}\n{"epoch": 2, "train_loss": 9}\n{"epoch": 2, "train_loss": 1}\n')
    assert [r["train_loss"] for r in read_metrics_jsonl(p)] == [2, 1]


@pytest.mark.parametrize("c", [2, 43])
def test_confusion_matrix_png(tmp_path: Path, c: int) -> None:
    rng = np.random.default_rng(c)
    cm = rng.integers(0, 20, size=(c, c)) + np.diag(rng.integers(50, 100, size=c))
    cm[0] = 0  # a class absent from the test set must not produce NaNs
    names = [f"class_{i}" for i in range(c)]
    assert_png(plot_confusion_matrix(cm, names, tmp_path / f"cm{c}.png"))
    if c == 2:  # the 43-class figure is slow to render; once is enough
        assert_png(plot_confusion_matrix(cm, names, tmp_path / f"cm{c}_counts.png", normalize=False))


def test_confusion_matrix_png_shows_the_values(tmp_path: Path) -> None:
    """Cells are coloured by their row-normalised value: a perfect 2-class matrix paints two cells in the darkest
    blue (measured: 27.7 % of the image), a uniform one paints none (0.19 %: the top of the colour bar)."""
    from matplotlib import colormaps

    darkest = tuple(int(255 * v) for v in colormaps["Blues"](1.0)[:3])
    perfect = assert_png(plot_confusion_matrix(np.diag([50, 60]), ["a", "b"], tmp_path / "perfect.png"))
    uniform = assert_png(plot_confusion_matrix(np.full((2, 2), 30), ["a", "b"], tmp_path / "uniform.png"))
    assert colour_mask(perfect, darkest).mean() > 0.2
    assert colour_mask(uniform, darkest).mean() < 0.01


def test_roc_pr_and_one_class(binary_case, tmp_path: Path) -> None:
    probs, y = binary_case
    paths = plot_roc_pr(probs[:, 1], y, tmp_path, "abnormal", threshold=0.5)
    assert [p.name for p in paths] == ["roc.png", "pr.png"]
    for p in paths:
        assert_png(p)
    # The ROC curve is drawn from the scores: a good ranking hugs the top-left, a random one the diagonal.
    # Measured median row of the curve's pixels (563 px tall image): 63 for good scores, 276 for random ones.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    rows = {}
    for name, scores in (("good", y * 0.8 + rng.random(200) * 0.3), ("random", rng.random(200))):
        roc, _ = plot_roc_pr(scores, y, tmp_path / name, "abnormal", threshold=0.5)
        rows[name] = float(np.median(np.nonzero(colour_mask(assert_png(roc), C0))[0]))
    assert rows["good"] < 120 < 220 < rows["random"], rows
    assert plot_roc_pr(probs[:, 1], np.ones_like(y), tmp_path / "none", "abnormal") == []


def test_reliability_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, size=300)
    logits = rng.normal(size=(300, 4))
    logits[np.arange(300), y] += 1.5
    assert_png(plot_reliability(softmax(logits * 4), softmax(logits), y, tmp_path / "rel.png"))
    assert_png(plot_reliability(softmax(logits), None, y, tmp_path / "rel_before_only.png"))


def test_scores_over_time_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    labels = np.zeros(300, dtype=int)
    labels[100:150] = 1
    labels[220:240] = 1
    scores = 0.2 + 0.6 * labels + rng.normal(0, 0.1, size=300)
    assert_png(plot_scores_over_time(scores, labels, 0.5, tmp_path / "s.png", "clip 01"))
    assert_png(plot_scores_over_time(scores, None, None, tmp_path / "s2.png", "no labels"))
    events = [{"start": 100, "end": 150}, (220, 240)]
    assert_png(plot_scores_over_time(scores, labels, 0.5, tmp_path / "s3.png", "events", events=events))


def test_per_class_csv(tmp_path: Path) -> None:
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1]])
    m = classification_metrics(probs, [0, 1, 1], ["cat", "dog", "eel"])
    with write_per_class_csv(m, tmp_path / "pc.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["cat", "dog", "eel"]
    assert rows[1]["n"] == "2" and float(rows[1]["accuracy"]) == pytest.approx(0.5)
    assert rows[2]["n"] == "0" and rows[2]["accuracy"] == ""  # undefined, not 0


CONTEXT = {
    "recipe": "pneumonia_resnet50",
    "arch": "resnet50",
    "init": "imagenet_pretrained",
    "data": "chest_xray",
    "strategy": "finetune_all",
    "epochs": 3,
}


def test_write_report_binary(binary_case, jsonl: Path, tmp_path: Path) -> None:
    probs, y = binary_case
    names = ["NORMAL", "PNEUMONIA"]
    m = classification_metrics(probs, y, names, threshold=0.42, loss=0.3456)
    out = tmp_path / "report"
    md = write_report(
        out,
        m,
        probs=probs,
        targets=y,
        class_names=names,
        metrics_jsonl=jsonl,
        context=CONTEXT,
        title="Pneumonia",
    )
    assert md == out / "report.md"
    for name in ["confusion_matrix.png", "roc.png", "pr.png", "training_curves.png"]:
        assert_png(out / name)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["auroc"] == pytest.approx(m["auroc"]) and saved["threshold"] == 0.42
    assert (out / "per_class.csv").read_text().startswith("class,n,accuracy")

    text = md.read_text()
    assert text.startswith("# Pneumonia")
    for value in CONTEXT.values():
        assert str(value) in text
    for key in ["top1", "auroc", "pr_auc", "sensitivity", "specificity", "threshold", "loss"]:
        assert f"| {key} | {m[key]:.4f} |" in text, key
    assert "**PNEUMONIA** as positive" in text
    for png in ["confusion_matrix.png", "roc.png", "pr.png", "training_curves.png"]:
        assert f"]({png})" in text


def test_write_report_multiclass_from_probs_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    c = 20  # more than 15: the unannotated matrix (the 43-class figure is drawn once, in test_confusion_matrix_png)
    y = rng.integers(0, c, size=500)
    logits = rng.normal(size=(500, c))
    logits[np.arange(500), y] += 3.0
    probs = softmax(logits)
    names = [f"sign_{i}" for i in range(c)]
    # Empty metrics: write_report computes them from probs.
    md = write_report(tmp_path / "r", {}, probs=probs, targets=y, class_names=names)
    out = tmp_path / "r"
    assert_png(out / "confusion_matrix.png")
    assert not (out / "roc.png").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert len(saved["confusion_matrix"]) == c
    text = md.read_text()
    assert f"| top1 | {saved['top1']:.4f} |" in text
    assert "## Most confused pairs" in text and "## Weakest classes" in text


def test_write_report_without_probs(tmp_path: Path) -> None:
    m = {"n": 10, "frame_auroc": 0.8765, "top1": None, "note": "video", "nan_metric": float("nan")}
    md = write_report(tmp_path / "r", m, context={"data": "avenue"})
    out = tmp_path / "r"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.md"]
    # Strict JSON (NaN is not JSON): parse_constant fires on NaN/Infinity literals.
    saved = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert saved["nan_metric"] is None and saved["frame_auroc"] == 0.8765
    text = md.read_text()
    assert "| frame_auroc | 0.8765 |" in text and "| top1 | n/a |" in text and "avenue" in text


# ---- operating point: fitted on one part of val, reported on the other -------------------------------------


def _calibrated(logits: np.ndarray, y: np.ndarray, method: str, **finetune) -> dict:
    """`calibrate` on a 2-class checkpoint dict whose positive class is index 1."""
    import torch

    from tlkit.tasks.classification.val import calibrate

    ckpt = {
        "classes": ["normal", "abnormal"],
        "class_ids": ["normal", "abnormal"],
        "recipe": {"finetune": {"threshold_method": method, "positive_class": "abnormal", **finetune}},
    }
    calibrate(ckpt, torch.from_numpy(logits), torch.from_numpy(y))
    return ckpt


def test_heldout_operating_point_is_not_in_sample() -> None:
    """Scores with no signal at all: Youden's threshold fitted and judged on the same rows always looks better
    than chance (it was picked for these rows); judged on the rows it was not fitted on, it is at chance on
    average. The stored heldout_* numbers are the second kind."""
    in_sample, heldout = [], []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, size=100)
        # No temperature: it cannot change which rows a threshold calls positive, and fitting it is slow on noise.
        logits = np.stack([np.zeros(y.size), rng.normal(0, 1, size=y.size)], axis=1)
        val = _calibrated(logits, y, "youden", temperature_scaling=False)["val_metrics"]
        in_sample.append(val["sensitivity"] + val["specificity"] - 1)
        heldout.append(val["heldout_sensitivity"] + val["heldout_specificity"] - 1)
    # Measured: in-sample J 0.09..0.25 (mean 0.14), held-out J -0.08..0.15 (mean 0.01).
    assert min(in_sample) > 0.05 and np.mean(in_sample) > 0.1, in_sample
    assert abs(np.mean(heldout)) < 0.05, heldout


@pytest.mark.parametrize("method", ["youden", "sensitivity"])
def test_heldout_numbers_come_from_the_other_fold(method: str) -> None:
    """Each fold is called with the temperature and threshold fitted on the other fold (recomputed here with
    the metric functions); argmax is reported beside it; the stored threshold is fitted on all of val."""
    from tlkit.metrics import choose_threshold, fit_temperature
    from tlkit.tasks.classification.val import stratified_folds

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=300)
    logits = np.stack([np.zeros(y.size), 1.0 * (2 * y - 1) + rng.normal(0, 1.5, size=y.size)], axis=1)
    ckpt = _calibrated(logits, y, method)
    val = ckpt["val_metrics"]
    fold = stratified_folds(y)
    for c in (0, 1):  # stratified: each class split evenly over the two folds
        assert abs(int(np.diff(np.bincount(fold[y == c], minlength=2))[0])) <= 1
    calls = np.zeros(y.size, bool)
    for k in (0, 1):
        fit, held = fold != k, fold == k
        t = fit_temperature(logits[fit], y[fit])
        thr = choose_threshold(softmax(logits[fit], t)[:, 1], y[fit], method=method, target_sensitivity=0.95)
        calls[held] = softmax(logits[held], t)[:, 1] >= thr
    assert val["heldout_sensitivity"] == pytest.approx(calls[y == 1].mean())
    assert val["heldout_specificity"] == pytest.approx((~calls[y == 0]).mean())
    assert val["heldout_argmax_sensitivity"] == pytest.approx((logits[y == 1, 1] >= 0).mean())
    t_all = fit_temperature(logits, y)
    assert ckpt["threshold"] == pytest.approx(
        choose_threshold(softmax(logits, t_all)[:, 1], y, method=method, target_sensitivity=0.95)
    )
    assert ckpt["calibration"]["heldout"]["folds"] == 2 and ckpt["calibration"]["threshold_method"] == method


def test_heldout_operating_point_tracks_a_real_signal() -> None:
    """With a real signal the held-out numbers are close to the in-sample ones; `argmax` stores 0.5."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=400)
    logits = np.stack([np.zeros(y.size), 3.0 * (2 * y - 1) + rng.normal(0, 1.5, size=y.size)], axis=1)
    val = _calibrated(logits, y, "youden")["val_metrics"]
    assert val["heldout_sensitivity"] > 0.9 and val["heldout_specificity"] > 0.9
    assert abs(val["heldout_sensitivity"] - val["sensitivity"]) < 0.05
    ckpt = _calibrated(logits, y, "argmax")
    assert ckpt["threshold"] == 0.5
    assert ckpt["val_metrics"]["heldout_sensitivity"] == ckpt["val_metrics"]["heldout_argmax_sensitivity"]


def test_heldout_needs_enough_rows_per_class() -> None:
    from tlkit.tasks.classification.val import heldout_metrics, heldout_operating_point

    logits = np.array([[0.0, 1.0], [0.0, -1.0], [0.0, 2.0]])
    assert heldout_operating_point(logits, np.array([1, 0, 1]), 1, {}) is None
    assert heldout_metrics(None) == {}
