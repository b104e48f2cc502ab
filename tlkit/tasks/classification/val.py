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
) -> tuple[torch.Tensor, torch.Tensor, int]:
    from tlkit.models import model_from_checkpoint

    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt).to(dev).to(memory_format=torch.channels_last)
    pre = Preprocessing.from_dict(ckpt["preprocessing"])
    ctx = StepContext(dev, *norm_tensors(pre, dev))
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


def calibrate(ckpt: dict, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Fit temperature scaling and the binary decision threshold on val logits; store both in `ckpt`.

    The threshold is chosen on temperature-scaled probabilities, so what is stored is consistent
    with what predict/evaluate/demos compute. Returns the calibration summary (also `ckpt["calibration"]`)."""
    from tlkit.metrics import choose_threshold, expected_calibration_error, fit_temperature, softmax

    ft = ckpt["recipe"].get("finetune") or {}
    y = targets.numpy()
    result = {"ece_before": expected_calibration_error(softmax(logits.numpy()), y)}
    temperature = fit_temperature(logits.numpy(), y) if ft.get("temperature_scaling", True) else 1.0
    probs = softmax(logits.numpy(), temperature=temperature)
    result.update(temperature=temperature, ece_after=expected_calibration_error(probs, y))
    pos = positive_index(ckpt)
    if pos is not None:
        result["threshold"] = choose_threshold(
            probs[:, pos],
            (y == pos).astype(int),
            method=ft.get("threshold_method", "youden"),
            target_sensitivity=ft.get("target_sensitivity", 0.95),
        )
        result["positive_index"] = pos
    ckpt.update({k: result[k] for k in ("temperature", "threshold", "positive_index") if k in result})
    ckpt["calibration"] = result
    val_metrics, _ = metrics_for(ckpt, logits, targets)
    ckpt["val_metrics"] = {k: v for k, v in val_metrics.items() if isinstance(v, int | float | type(None))}
    return result
