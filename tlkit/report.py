"""Write a run's `report/` folder: metrics.json, per-class CSV, PNG plots and a short report.md.

Plots are drawn on `matplotlib.figure.Figure` objects with the Agg canvas rather than through
pyplot: no global figure state (safe from the Gradio worker threads), no GUI backend needed, and
importing this module does not switch the backend of a user's notebook (so no `matplotlib.use`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from tlkit.metrics import (
    _to_numpy,
    classification_metrics,
    expected_calibration_error,
    most_confused_pairs,
    reliability_bins,
    score_events,
)

DPI = 120


def _save(fig: Figure, out_png: Path | str) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight")
    return out


def _jsonable(x: Any) -> Any:
    """Plain-JSON copy of x: numpy scalars/arrays to Python, NaN/inf to None (json.dump would emit NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


# --------------------------------------------------------------------------- training curves


def read_metrics_jsonl(path: Path | str) -> list[dict]:
    """Rows of a metrics.jsonl, one per epoch (last row wins for a repeated epoch, e.g. after resume).

    Blank or malformed lines are skipped: a run still being written may have a half-written last line.
    """
    p = Path(path)
    if not p.exists():
        return []
    by_epoch: dict[Any, dict] = {}
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        row.setdefault("epoch", i + 1)
        by_epoch[row["epoch"]] = row
    return [by_epoch[k] for k in sorted(by_epoch, key=lambda e: (isinstance(e, str), e))]


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (list, tuple)) and v:  # e.g. one lr per param group: plot the first
            v = v[0]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(r["epoch"]))
            ys.append(float(v))
    return xs, ys


def plot_training_curves(metrics_jsonl: Path | str, out_png: Path | str) -> Path | None:
    """Loss (train/val), accuracy (top1/top5) and learning rate vs epoch; None if there are no rows."""
    rows = read_metrics_jsonl(metrics_jsonl)
    if not rows:
        return None
    keys = sorted({k for r in rows for k in r})
    loss_keys = [k for k in keys if k.endswith("loss")]
    acc_keys = [k for k in keys if k.endswith(("top1", "top5", "acc", "accuracy"))]

    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    panels = [
        (axes[0], loss_keys, "loss", False),
        (axes[1], acc_keys, "accuracy", False),
        (axes[2], ["lr"], "learning rate", True),
    ]
    for ax, ks, ylabel, log in panels:
        drawn = False
        for k in ks:
            xs, ys = _series(rows, k)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=k)
                drawn = True
        if drawn:
            if log and all(y > 0 for k in ks for y in _series(rows, k)[1]):
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(NullFormatter())  # minor log labels crowd the axis
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle("Training curves")
    return _save(fig, out_png)


# --------------------------------------------------------------------------- confusion matrix


def plot_confusion_matrix(
    cm: Any,
    class_names: Sequence[str],
    out_png: Path | str,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Confusion matrix heat map (rows = true class). Row-normalised by default so rare classes show.

    Cells are annotated only up to 15 classes; beyond that the numbers would be unreadable.
    """
    m = _to_numpy(cm, np.float64)
    c = m.shape[0]
    counts = m.copy()
    if normalize:
        row = m.sum(axis=1, keepdims=True)
        m = np.divide(m, row, out=np.zeros_like(m), where=row > 0)  # absent classes stay 0, no 0/0
    side = float(np.clip(0.28 * c + 2.5, 4.0, 16.0))
    fontsize = 9 if c <= 15 else max(4.0, 10.0 - c / 8.0)

    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    im = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(1.0, m.max()))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(c)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels([str(n) for n in class_names], rotation=90 if c > 6 else 0, fontsize=fontsize)
    ax.set_yticklabels([str(n) for n in class_names], fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= 15:
        thresh = 0.5 * (m.max() if m.max() > 0 else 1.0)
        for i in range(c):
            for j in range(c):
                txt = f"{m[i, j]:.2f}\n({int(counts[i, j])})" if normalize else f"{int(counts[i, j])}"
                ax.text(
                    j, i, txt, ha="center", va="center", fontsize=fontsize,
                    color="white" if m[i, j] > thresh else "black",
                )  # fmt: skip
    ax.set_title(title or ("Confusion matrix (row-normalised)" if normalize else "Confusion matrix"))
    return _save(fig, out_png)


# --------------------------------------------------------------------------- ROC / PR


def plot_roc_pr(
    pos_probs: Any,
    targets: Any,
    out_dir: Path | str,
    positive_name: str,
    threshold: float | None = None,
) -> list[Path]:
    """roc.png and pr.png for binary labels (1 = `positive_name`); the threshold's point is marked.

    Returns [] when only one class is present (neither curve is defined).
    """
    s = _to_numpy(pos_probs, np.float64).reshape(-1)
    y = _to_numpy(targets).reshape(-1).astype(bool)
    if y.all() or not y.any():
        return []
    out_dir = Path(out_dir)
    if threshold is not None:
        pred = s >= threshold
        tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
        tpr, fpr = tp / y.sum(), fp / (~y).sum()
        prec = tp / (tp + fp) if tp + fp else 1.0

    fpr_c, tpr_c, _ = roc_curve(y, s)
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot(fpr_c, tpr_c, lw=2, label=f"ROC (AUC = {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="chance")
    if threshold is not None:
        ax.plot([fpr], [tpr], "o", color="crimson", label=f"threshold {threshold:.3g}")
    _unit_square(ax, "false positive rate (1 - specificity)", "true positive rate (sensitivity)", "lower right")
    ax.set_title(f"ROC, positive = {positive_name}")
    roc_png = _save(fig, out_dir / "roc.png")

    prec_c, rec_c, _ = precision_recall_curve(y, s)
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.step(rec_c, prec_c, where="post", lw=2, label=f"PR (AP = {average_precision_score(y, s):.3f})")
    ax.axhline(y.mean(), ls="--", color="gray", lw=1, label=f"prevalence {y.mean():.3f}")
    if threshold is not None:
        ax.plot([tpr], [prec], "o", color="crimson", label=f"threshold {threshold:.3g}")
    _unit_square(ax, "recall (sensitivity)", "precision (PPV)", "lower left")
    ax.set_title(f"Precision-recall, positive = {positive_name}")
    pr_png = _save(fig, out_dir / "pr.png")
    return [roc_png, pr_png]


def _unit_square(ax, xlabel: str, ylabel: str, legend_loc: str) -> None:
    """Axes for a curve of two rates (both 0..1): labels, a small margin, grid, legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend_loc, fontsize=9)


# --------------------------------------------------------------------------- calibration


def plot_reliability(
    probs_before: Any,
    probs_after: Any | None,
    targets: Any,
    out_png: Path | str,
    n_bins: int = 15,
) -> Path:
    """Reliability diagram (accuracy vs top-1 confidence) before/after temperature scaling, with ECE."""
    fig = Figure(figsize=(6, 6.5))
    ax, hax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect calibration")
    for probs, name, color in ((probs_before, "before", "tab:red"), (probs_after, "after", "tab:blue")):
        if probs is None:
            continue
        bins = reliability_bins(probs, targets, n_bins)
        ece = expected_calibration_error(probs, targets, n_bins)
        pts = [(c, a) for c, a in zip(bins["confidence"], bins["accuracy"], strict=True) if c is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", color=color, label=f"{name} (ECE = {ece:.3f})")
        conf = _to_numpy(probs, np.float64).max(axis=1)
        hax.hist(conf, bins=bins["edges"], alpha=0.5, color=color, label=name)
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    ax.set_title("Reliability diagram (top-1 confidence)")
    hax.set_xlabel("confidence")
    hax.set_ylabel("count")
    hax.grid(alpha=0.3)
    return _save(fig, out_png)


# --------------------------------------------------------------------------- video anomaly scores


def _event_span(ev: Any) -> tuple[float, float]:
    if isinstance(ev, dict):
        return float(ev["start"]), float(ev["end"])
    return float(ev[0]), float(ev[1])


def plot_scores_over_time(
    scores: Any,
    labels_or_None: Any | None,
    threshold: float | None,
    out_png: Path | str,
    title: str = "Anomaly score per frame",
    events: Iterable[Any] | None = None,
) -> Path:
    """Per-frame anomaly score, ground-truth abnormal frames shaded, threshold line, detected events.

    `events` are (start, end) frame ranges (end exclusive) or dicts with start/end keys; when None
    they are derived from `scores >= threshold`. Pass [] to draw none.
    """
    s = _to_numpy(scores, np.float64).reshape(-1)
    x = np.arange(s.size)
    fig = Figure(figsize=(12, 3.5))
    ax = fig.subplots()
    if labels_or_None is not None:
        lab = _to_numpy(labels_or_None).reshape(-1).astype(bool)
        for k, (a, b) in enumerate(score_events(lab, 0.5)):  # runs of ground-truth abnormal frames
            ax.axvspan(a - 0.5, b - 0.5, color="orange", alpha=0.25, lw=0, label="abnormal (GT)" if k == 0 else None)
    ax.plot(x, s, lw=1.2, color="tab:blue", label="score")
    if threshold is not None:
        ax.axhline(threshold, ls="--", color="crimson", lw=1, label=f"threshold {threshold:.3g}")
        if events is None:
            events = score_events(s, threshold)
    finite = s[np.isfinite(s)]
    y_top = float(finite.max()) if finite.size else 1.0
    y_bot = float(finite.min()) if finite.size else 0.0
    band = 0.04 * (y_top - y_bot or 1.0)
    for k, ev in enumerate(events or []):
        a, b = _event_span(ev)
        ax.hlines(y_top + 2 * band, a - 0.5, b - 0.5, color="crimson", lw=5, label="detected" if k == 0 else None)
    ax.set_xlim(-0.5, max(s.size - 0.5, 0.5))
    ax.set_xlabel("frame")
    ax.set_ylabel("anomaly score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, out_png)


# --------------------------------------------------------------------------- tables and the report


def write_per_class_csv(metrics: dict, out_csv: Path | str) -> Path:
    """per_class.csv: class, n, accuracy, precision, recall, f1 (empty cell where undefined)."""
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = ["class", "n", "accuracy", "precision", "recall", "f1"]
    with out.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for name, row in (metrics.get("per_class") or {}).items():
            vals = [row.get(k) for k in cols[1:]]
            w.writerow([name] + ["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in vals])
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


# Key numbers, in the order they appear in report.md; any other scalar metrics follow them.
_KEY_ORDER = [
    "n", "loss", "top1", "top5", "macro_accuracy", "accuracy", "threshold", "sensitivity", "specificity",
    "ppv", "npv", "f1", "auroc", "pr_auc", "nll", "ece", "temperature",
]  # fmt: skip
_SKIP = {"num_classes", "top5_k", "positive_index", "tp", "fp", "tn", "fn"}


def _summary_sentence(context: dict) -> str:
    parts = []
    if context.get("arch"):
        parts.append(f"Trained **{context['arch']}**")
    else:
        parts.append("Trained a model")
    if context.get("init"):
        parts.append(f"from **{context['init']}**")
    if context.get("data"):
        parts.append(f"on **{context['data']}**")
    if context.get("strategy"):
        parts.append(f"with strategy **{context['strategy']}**")
    if context.get("epochs") is not None:
        parts.append(f"for {context['epochs']} epochs")
    if context.get("recipe"):
        parts.append(f"(recipe `{context['recipe']}`)")
    return " ".join(parts) + "."


def write_report(
    out_dir: Path | str,
    metrics: dict,
    *,
    probs: Any | None = None,
    targets: Any | None = None,
    class_names: Sequence[str] | None = None,
    positive_index: int | None = None,
    threshold: float | None = None,
    metrics_jsonl: Path | str | None = None,
    context: dict | None = None,
    title: str = "tlkit report",
) -> Path:
    """Create `out_dir` with metrics.json, per_class.csv, PNG plots and report.md; return report.md.

    Plots are drawn from whatever is available: the confusion matrix from `metrics["confusion_matrix"]`
    (or from probs/targets), ROC/PR when probs are given for a 2-class task, training curves when
    `metrics_jsonl` has rows. With `probs=None` only metrics.json, per_class.csv and report.md appear.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = dict(metrics or {})
    context = dict(context or {})
    class_names = list(class_names) if class_names is not None else metrics.get("class_names")

    # Fill in what the caller did not compute, so write_report(out, {}, probs=..., ...) also works.
    if probs is not None and targets is not None and class_names is not None and "confusion_matrix" not in metrics:
        computed = classification_metrics(
            probs, targets, list(class_names), positive_index=positive_index, threshold=threshold
        )
        metrics = {**computed, **metrics}
    if positive_index is None:
        positive_index = metrics.get("positive_index", 1)
    if threshold is None:
        threshold = metrics.get("threshold")

    (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2) + "\n", encoding="utf-8")
    images: list[tuple[str, Path]] = []

    cm = metrics.get("confusion_matrix")
    if cm is not None and class_names is not None and len(cm) == len(class_names) and len(cm) > 0:
        images.append(("Confusion matrix", plot_confusion_matrix(cm, class_names, out / "confusion_matrix.png")))
    csv_path = write_per_class_csv(metrics, out / "per_class.csv") if metrics.get("per_class") else None

    if probs is not None and targets is not None:
        p = _to_numpy(probs, np.float64)
        t = _to_numpy(targets).reshape(-1)
        if p.ndim == 2 and p.shape[1] == 2:
            pos = int(positive_index)
            pos_name = str(class_names[pos]) if class_names is not None else str(pos)
            for png in plot_roc_pr(p[:, pos], t == pos, out, pos_name, threshold=threshold):
                images.append(("ROC curve" if png.stem == "roc" else "Precision-recall curve", png))

    if metrics_jsonl is not None:
        png = plot_training_curves(metrics_jsonl, out / "training_curves.png")
        if png is not None:
            images.insert(0, ("Training curves", png))

    md = out / "report.md"
    md.write_text("\n".join(_markdown(title, context, metrics, cm, class_names, csv_path, images)), encoding="utf-8")
    return md


def _markdown(title, context, metrics, cm, class_names, csv_path, images) -> list[str]:
    """report.md: the run's setting, the metrics table, the weakest classes and most confused pairs, the plots."""
    lines = [f"# {title}", ""]
    if context:
        lines += [_summary_sentence(context), ""]
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in context.items()]
        lines.append("")

    scalars = {k: v for k, v in metrics.items() if k not in _SKIP and (v is None or isinstance(v, (int, float)))}
    ordered = [k for k in _KEY_ORDER if k in scalars] + [k for k in scalars if k not in _KEY_ORDER]
    if ordered:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        for k in ordered:
            if k == "top5" and metrics.get("top5_k", 5) < 3:
                continue  # top-2 of a 2-class task is always 1: noise in the table
            label = f"top{metrics['top5_k']}" if k == "top5" and metrics.get("top5_k", 5) != 5 else k
            lines.append(f"| {label} | {_fmt(scalars[k])} |")
        lines.append("")
        if "positive_class" in metrics:
            lines += [
                f"Binary metrics treat **{metrics['positive_class']}** as positive, at threshold "
                f"{_fmt(metrics.get('threshold'))} on its probability.",
                "",
            ]

    per_class = metrics.get("per_class") or {}
    if len(per_class) > 2:
        worst = sorted(
            ((n, r) for n, r in per_class.items() if r.get("accuracy") is not None),
            key=lambda x: x[1]["accuracy"],
        )[:5]
        if worst:
            lines += ["## Weakest classes", "", "| class | n | accuracy |", "|---|---|---|"]
            lines += [f"| {_fmt(n)} | {r.get('n')} | {_fmt(r['accuracy'])} |" for n, r in worst]
            lines.append("")
        if cm is not None and class_names is not None:
            pairs = most_confused_pairs(cm, class_names, k=5)
            if pairs:
                lines += ["## Most confused pairs", "", "| true | predicted | count |", "|---|---|---|"]
                lines += [f"| {_fmt(q['true'])} | {_fmt(q['predicted'])} | {q['count']} |" for q in pairs]
                lines.append("")

    files = ["[metrics.json](metrics.json)"] + ([f"[{csv_path.name}]({csv_path.name})"] if csv_path else [])
    lines += ["## Files", "", ", ".join(files), ""]
    for caption, png in images:
        lines += [f"### {caption}", "", f"![{caption}]({png.name})", ""]

    return lines
