"""Classification: evaluate a checkpoint on a labelled split, calibrate it on val, and write its report.

Everything the model needs (architecture, classes, preprocessing, threshold, temperature) is read
from the checkpoint, so `tlkit evaluate` takes nothing but the checkpoint and the data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tlkit.data.datasets import ImageDataset, scan_split
from tlkit.data.transforms import Preprocessing, eval_transform, norm_tensors
from tlkit.engine import predict_logits, topk_metrics
from tlkit.paths import resolve_data
from tlkit.progress import Progress
from tlkit.run import StepContext, resolve_device


def checkpoint_loader(ckpt: dict, data: str | Path, split: str, batch_size: int = 64, num_workers: int = -1):
    """A DataLoader over `data` (dataset root or split folder) in the checkpoint's class order."""
    from tlkit.config import DataConfig
    from tlkit.data.loader import make_loader

    recipe_data = ckpt["recipe"]["data"]
    # A run trained on its first `max_classes` classes is validated on those classes only.
    same_data = str(resolve_data(data)) == ckpt.get("data_root") and recipe_data.get("max_classes", 0) > 0
    samples, _ = scan_split(
        resolve_data(data),
        split,
        ckpt["class_ids"],
        roi_crop=recipe_data.get("roi_crop", False),
        ignore_unknown=same_data,
        max_per_class=recipe_data.get("max_per_class", 0) if same_data else 0,
        layout=recipe_data.get("layout", "auto"),
    )
    pre = Preprocessing.from_dict(ckpt["preprocessing"])
    dataset = ImageDataset(samples, eval_transform(pre))
    return make_loader(dataset, DataConfig(num_workers=num_workers), batch_size=batch_size, train=False, seed=0)


def checkpoint_logits(
    ckpt: dict,
    data: str | Path,
    split: str = "val",
    *,
    batch_size: int = 64,
    device: str = "auto",
    quiet: bool = False,
    loader=None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`loader`: batches to use instead of `checkpoint_loader`'s (a run's fast-path eval loader)."""
    from tlkit.models import model_from_checkpoint

    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt).to(dev).to(memory_format=torch.channels_last)
    pre = Preprocessing.from_dict(ckpt["preprocessing"])
    ctx = StepContext(dev, *norm_tensors(pre, dev))
    if loader is None:
        loader = checkpoint_loader(ckpt, data, split, batch_size)
    with Progress(enabled=not quiet) as progress:
        return predict_logits(
            model, loader, ctx, tta_flip=ckpt["recipe"]["train"].get("tta_flip", False), progress=progress
        )


def positive_index(ckpt: dict) -> int | None:
    """Binary tasks: the class that counts as positive. The recipe may name several candidates
    (`PNEUMONIA,Parasitized`), so one recipe serves datasets whose positive class is named differently."""
    if len(ckpt["classes"]) != 2:
        return None
    wanted = [w.strip() for w in ((ckpt["recipe"].get("finetune") or {}).get("positive_class") or "").split(",")]
    for i, (cid, name) in enumerate(zip(ckpt["class_ids"], ckpt["classes"], strict=True)):
        if cid in wanted or name in wanted:
            return i
    return 1


def metrics_for(ckpt: dict, logits: torch.Tensor, targets: torch.Tensor) -> tuple[dict, np.ndarray]:
    """Recipe-aware metrics at the checkpoint's temperature and threshold; returns (metrics, probs)."""
    from tlkit.metrics import classification_metrics, softmax

    probs = softmax(logits.numpy(), temperature=ckpt.get("temperature") or 1.0)
    metrics = classification_metrics(
        probs,
        targets.numpy(),
        ckpt["classes"],
        positive_index=positive_index(ckpt),
        threshold=ckpt.get("threshold"),
        loss=topk_metrics(logits, targets)["val_loss"],
    )
    return metrics, probs


def report_context(ckpt: dict, data: str | Path, split: str) -> dict:
    recipe = ckpt["recipe"]
    return {
        "recipe": recipe.get("name"),
        "task": ckpt.get("task"),
        "arch": ckpt["arch"],
        "init": ckpt.get("init"),
        "strategy": (recipe.get("finetune") or {}).get("strategy", "-"),
        "data": str(data),
        "split": split,
        "epochs": len(ckpt.get("history", [])),
        "classes": len(ckpt["classes"]),
        "img_size": ckpt["preprocessing"]["img_size"],
        "git_sha": ckpt.get("git_sha"),
    }


def evaluate_checkpoint(
    ckpt: dict,
    checkpoint: str | Path,
    data: str | Path,
    *,
    split: str = "val",
    out: Path,
    batch_size: int = 64,
    device: str = "auto",
    quiet: bool = False,
) -> dict:
    """`tlkit evaluate`: metrics.json + report in `out` for any labelled split in the checkpoint's classes."""
    logits, targets, skipped = checkpoint_logits(ckpt, data, split, batch_size=batch_size, device=device, quiet=quiet)
    metrics = write_checkpoint_report(
        ckpt,
        logits,
        targets,
        Path(out),
        data=data,
        split=split,
        title=f"tlkit evaluation: {Path(checkpoint)}",
        extra={"skipped_images": skipped},
    )
    return metrics


def write_checkpoint_report(
    ckpt: dict,
    logits: torch.Tensor,
    targets: torch.Tensor,
    out: Path,
    *,
    data: str | Path,
    split: str,
    title: str,
    metrics_jsonl: Path | None = None,
    extra: dict | None = None,
) -> dict:
    """Metrics at the checkpoint's temperature/threshold -> `out/` (metrics.json, plots, report.md)."""
    from tlkit.report import write_report

    metrics, probs = metrics_for(ckpt, logits, targets)
    metrics.update(extra or {})
    write_report(
        out,
        metrics,
        probs=probs,
        targets=targets.numpy(),
        class_names=ckpt["classes"],
        positive_index=positive_index(ckpt),
        threshold=ckpt.get("threshold"),
        metrics_jsonl=metrics_jsonl,
        context=report_context(ckpt, data, split),
        title=title,
    )
    return metrics


HELDOUT_FOLDS = 2  # cross-fit: each half of val is scored with the temperature/threshold fitted on the other


def fit_operating_point(logits: np.ndarray, y: np.ndarray, pos: int | None, ft: dict) -> tuple[float, float | None]:
    """(temperature, threshold) fitted on `logits`/`y`: temperature scaling (if enabled), then the recipe's
    threshold rule on the temperature-scaled positive-class probability (None for multi-class tasks).
    `argmax` keeps 0.5, i.e. the plain argmax decision, whatever the data."""
    from tlkit.metrics import choose_threshold, fit_temperature, softmax

    temperature = fit_temperature(logits, y) if ft.get("temperature_scaling", True) else 1.0
    if pos is None:
        return temperature, None
    method = ft.get("threshold_method", "youden")
    if method == "argmax":
        return temperature, 0.5
    probs = softmax(logits, temperature=temperature)[:, pos]
    threshold = choose_threshold(
        probs, (y == pos).astype(int), method=method, target_sensitivity=ft.get("target_sensitivity", 0.95)
    )
    return temperature, threshold


def stratified_folds(y: np.ndarray, n_folds: int = HELDOUT_FOLDS, seed: int = 0) -> np.ndarray:
    """Fold number per row, each class dealt evenly over the folds in a seeded random order."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = np.arange(len(idx)) % n_folds
    return fold


def heldout_operating_point(
    logits: np.ndarray, y: np.ndarray, pos: int | None, ft: dict, n_folds: int = HELDOUT_FOLDS
) -> dict | None:
    """Cross-fitted val numbers: each fold is scored with the temperature and threshold fitted on the other
    folds, so no row is judged by an operating point fitted on itself. In-sample numbers (threshold fitted and
    scored on the same rows) are optimistic exactly where a threshold is fragile.

    Returns `{"folds", "ece", and for binary tasks "chosen": {...}, "argmax": {...}}` (sensitivity,
    specificity, accuracy of the recipe's rule and of argmax, both held-out), or None when val is too small
    (fewer than 2 rows of some class per fold)."""
    from tlkit.metrics import binary_metrics, expected_calibration_error, softmax

    counts = np.bincount(y)
    if len(y) < 2 * n_folds or counts[counts > 0].min() < n_folds:
        return None
    fold = stratified_folds(y, n_folds)
    probs = np.empty((len(y), logits.shape[1]), dtype=np.float64)
    thresholds = np.full(len(y), 0.5)
    for k in range(n_folds):
        fit, held = fold != k, fold == k
        temperature, threshold = fit_operating_point(logits[fit], y[fit], pos, ft)
        probs[held] = softmax(logits[held], temperature=temperature)
        if threshold is not None:
            thresholds[held] = threshold
    out: dict = {"folds": n_folds, "ece": expected_calibration_error(probs, y)}
    if pos is not None:
        is_pos = y == pos
        keys = ("sensitivity", "specificity", "accuracy")
        # Each row against its own fold's threshold: the margin p - threshold is positive iff called positive.
        chosen, _ = binary_metrics(probs[:, pos] - thresholds, is_pos, 0.0)
        argmax, _ = binary_metrics(probs[:, pos], is_pos, 0.5)
        out["method"] = ft.get("threshold_method", "youden")
        out["chosen"] = {k: chosen[k] for k in keys}
        out["argmax"] = {k: argmax[k] for k in keys}
    return out


def heldout_metrics(heldout: dict | None) -> dict:
    """The held-out numbers as flat `heldout_*` metrics (val_metrics, metrics.json, the demos)."""
    if not heldout:
        return {}
    flat = {"heldout_ece": heldout["ece"]}
    for point in ("chosen", "argmax"):
        for key, value in (heldout.get(point) or {}).items():
            flat[f"heldout_{key}" if point == "chosen" else f"heldout_argmax_{key}"] = value
    return flat


def calibrate(ckpt: dict, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Fit temperature scaling and the binary decision threshold on val logits; store both in `ckpt`.

    The stored temperature/threshold are fitted on all of val (the most data); how well that procedure holds
    on unseen images is measured by cross-fitting (`heldout_operating_point`) and stored as `heldout_*`
    metrics beside the in-sample ones. The threshold is chosen on temperature-scaled probabilities, so what
    is stored is consistent with what predict/evaluate/demos compute. Returns the calibration summary (also
    `ckpt["calibration"]`)."""
    from tlkit.metrics import expected_calibration_error, nll, softmax

    ft = ckpt["recipe"].get("finetune") or {}
    z, y = logits.numpy().astype(np.float64), targets.numpy()
    pos = positive_index(ckpt)
    before = softmax(z)
    result = {"ece_before": expected_calibration_error(before, y), "nll_before": nll(before, y)}
    temperature, threshold = fit_operating_point(z, y, pos, ft)
    # The temperature minimises val NLL (never above T=1's); ECE is binned and may move a little either way.
    after = softmax(z, temperature)
    result.update(temperature=temperature, ece_after=expected_calibration_error(after, y), nll_after=nll(after, y))
    if pos is not None:
        result["threshold"] = threshold
        result["threshold_method"] = ft.get("threshold_method", "youden")
        result["positive_index"] = pos
    result["heldout"] = heldout_operating_point(z, y, pos, ft)
    ckpt.update({k: result[k] for k in ("temperature", "threshold", "positive_index") if k in result})
    ckpt["calibration"] = result
    val_metrics, _ = metrics_for(ckpt, logits, targets)
    val_metrics.update(heldout_metrics(result["heldout"]))
    ckpt["val_metrics"] = {k: v for k, v in val_metrics.items() if isinstance(v, int | float | type(None))}
    return result
