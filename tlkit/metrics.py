"""Evaluation metrics: classification summaries, thresholds, calibration, video anomaly scores.

Everything here is a pure function of arrays. Inputs may be numpy arrays, torch tensors or
plain sequences; outputs are plain Python ints/floats/lists/dicts so they can go straight
into `json.dump`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

__all__ = [
    "classification_metrics",
    "choose_threshold",
    "fit_temperature",
    "expected_calibration_error",
    "reliability_bins",
    "softmax",
    "nll",
    "most_confused_pairs",
    "frame_auroc",
    "normalize_per_clip",
    "score_events",
]


def _to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """Array view of numpy / torch / list input (torch is not imported unless given a tensor)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def _div(num: float, den: float) -> float | None:
    """num/den, or None when the denominator is empty (a rate that is undefined, not zero)."""
    return float(num) / float(den) if den else None


def _check_probs_targets(probs: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _to_numpy(probs, np.float64)
    t = _to_numpy(targets).astype(np.int64).reshape(-1)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {p.shape}")
    if p.shape[0] != t.shape[0]:
        raise ValueError(f"probs has {p.shape[0]} rows but targets has {t.shape[0]}")
    if not np.all(np.isfinite(p)):
        # NaNs would silently corrupt argmax/AUROC; a diverged model should fail loudly here.
        raise ValueError("probs contains NaN or inf")
    if t.size and (t.min() < 0 or t.max() >= p.shape[1]):
        raise ValueError(f"targets must be in [0, {p.shape[1] - 1}], got range [{t.min()}, {t.max()}]")
    return p, t


def softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax over the last axis of `logits / temperature`."""
    z = _to_numpy(logits, np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)  # shift so exp() cannot overflow
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(probs: Any, targets: Any, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class."""
    p, t = _check_probs_targets(probs, targets)
    if t.size == 0:
        return float("nan")
    return float(-np.mean(np.log(np.clip(p[np.arange(t.size), t], eps, 1.0))))


def reliability_bins(probs: Any, targets: Any, n_bins: int = 15) -> dict[str, list]:
    """Top-1 confidence histogram: per equal-width bin (lo, hi] the count, mean confidence, accuracy.

    Empty bins report confidence/accuracy None. Used by the ECE and by the reliability diagram.
    """
    p, t = _check_probs_targets(probs, targets)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == t).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bins are (lo, hi]; conf == 0 (degenerate) falls into the first bin.
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts, confs, accs = [], [], []
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        counts.append(n)
        confs.append(float(conf[m].mean()) if n else None)
        accs.append(float(correct[m].mean()) if n else None)
    return {"edges": edges.tolist(), "count": counts, "confidence": confs, "accuracy": accs}


def expected_calibration_error(probs: Any, targets: Any, n_bins: int = 15) -> float:
    """Top-1 ECE: count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    bins = reliability_bins(probs, targets, n_bins)
    total = sum(bins["count"])
    if total == 0:
        return 0.0
    ece = 0.0
    for n, c, a in zip(bins["count"], bins["confidence"], bins["accuracy"], strict=True):
        if n:
            ece += n / total * abs(a - c)
    return float(ece)


def classification_metrics(
    probs: Any,
    targets: Any,
    class_names: list[str],
    *,
    positive_index: int | None = None,
    threshold: float | None = None,
    loss: float | None = None,
) -> dict:
    """Summary metrics for an (N, C) matrix of class probabilities and integer targets.

    Always: n, top1, top5 (k clipped to C, reported as `top5_k`), per_class {name: {n, accuracy,
    precision, recall, f1}}, macro_accuracy (balanced accuracy over classes present), nll, ece,
    confusion_matrix (rows = true class, columns = predicted), class_names, and `loss` if given.

    Binary tasks (C == 2) also get, for the positive class (`positive_index`, default 1) at
    `threshold` on its probability (default 0.5): sensitivity, specificity, ppv, npv, f1, accuracy,
    tp/fp/tn/fn, plus threshold-free auroc and pr_auc (average precision). For binary tasks the
    confusion matrix, per-class and macro accuracy follow the same threshold rule, so the numbers
    in a report agree with each other; top1 stays the plain argmax accuracy.
    Undefined rates (e.g. specificity with no negatives, AUROC with one class) are None.
    """
    p, t = _check_probs_targets(probs, targets)
    n, c = p.shape
    if len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for {c} probability columns")

    out: dict[str, Any] = {"n": int(n), "num_classes": int(c), "class_names": [str(x) for x in class_names]}
    if loss is not None:
        out["loss"] = float(loss)

    # Ranking metrics: top-k on the probability order, independent of any threshold.
    k = min(5, c)
    argmax = p.argmax(axis=1)
    topk = np.argsort(-p, axis=1, kind="stable")[:, :k]
    out["top1"] = _div(int((argmax == t).sum()), n)
    out["top5"] = _div(int((topk == t[:, None]).any(axis=1).sum()), n)
    out["top5_k"] = int(k)

    pred = argmax
    if c == 2:
        pos = 1 if positive_index is None else int(positive_index)
        if pos not in (0, 1):
            raise ValueError(f"positive_index must be 0 or 1, got {pos}")
        thr = 0.5 if threshold is None else float(threshold)
        binary, pred = binary_metrics(p[:, pos], t == pos, thr)
        pred = np.where(pred, pos, 1 - pos)
        out.update({"positive_index": pos, "positive_class": str(class_names[pos]), "threshold": thr, **binary})

    cm = np.zeros((c, c), dtype=np.int64)
    np.add.at(cm, (t, pred), 1)
    per_class: dict[str, dict[str, Any]] = {}
    accs = []
    for i, name in enumerate(class_names):
        support = int(cm[i].sum())
        predicted = int(cm[:, i].sum())
        hit = int(cm[i, i])
        acc = _div(hit, support)
        if acc is not None:
            accs.append(acc)
        per_class[str(name)] = {
            "n": support,
            "accuracy": acc,
            "precision": _div(hit, predicted),
            "recall": acc,
            "f1": _div(2 * hit, support + predicted),
        }
    out["per_class"] = per_class
    # Balanced accuracy: mean recall over the classes that actually occur (as sklearn does).
    out["macro_accuracy"] = float(np.mean(accs)) if accs else None
    out["confusion_matrix"] = cm.tolist()
    if n:
        out["nll"] = nll(p, t)
        out["ece"] = expected_calibration_error(p, t)
    return out


def binary_metrics(pos_prob: np.ndarray, is_pos: np.ndarray, threshold: float) -> tuple[dict, np.ndarray]:
    """Threshold metrics of one positive class (and its threshold-free AUROC / AP); also the positive calls."""
    n = len(is_pos)
    pred_pos = pos_prob >= threshold
    tp = int((pred_pos & is_pos).sum())
    fp = int((pred_pos & ~is_pos).sum())
    tn = int((~pred_pos & ~is_pos).sum())
    fn = int((~pred_pos & is_pos).sum())
    both_present = 0 < tp + fn < n
    metrics = {
        "accuracy": _div(tp + tn, n),
        "sensitivity": _div(tp, tp + fn),
        "specificity": _div(tn, tn + fp),
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        # AUROC needs both classes, AP at least one positive (else sklearn warns and returns junk).
        "auroc": float(roc_auc_score(is_pos, pos_prob)) if both_present else None,
        "pr_auc": float(average_precision_score(is_pos, pos_prob)) if tp + fn > 0 else None,
    }
    return metrics, pred_pos


def choose_threshold(
    pos_probs: Any,
    targets: Any,
    method: str = "youden",
    target_sensitivity: float = 0.95,
) -> float:
    """Decision threshold on the positive-class score (rule: positive iff score >= threshold).

    method="youden": maximise sensitivity + specificity - 1 over the scores themselves (sklearn's extra
    "nothing positive" point at +inf is not a candidate), ties -> highest threshold.
    method="f1": maximise the F1 of the positive class (ties -> lowest threshold), e.g. for alerts.
    method="sensitivity": the highest threshold whose sensitivity is >= `target_sensitivity`,
    i.e. the most specific operating point that still catches the required share of positives.
    `targets` are binary (1/True = positive). Falls back to 0.5 when the needed class is missing.
    """
    s = _to_numpy(pos_probs, np.float64).reshape(-1)
    y = _to_numpy(targets).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"pos_probs has {s.size} entries but targets has {y.size}")
    n_pos = int(y.sum())

    if method in ("youden", "f1"):
        if n_pos == 0 or n_pos == y.size:
            warnings.warn("choose_threshold: only one class present, returning 0.5", stacklevel=2)
            return 0.5
        if method == "youden":
            fpr, tpr, thr = roc_curve(y, s)
            best = int(np.argmax((tpr - fpr)[1:])) + 1  # thr[0] is +inf; the first maximum is the highest score
            return float(thr[best])
        precision, recall, thr = precision_recall_curve(y, s)
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        return float(thr[int(np.argmax(f1))])

    if method == "sensitivity":
        if not 0.0 < target_sensitivity <= 1.0:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
        if n_pos == 0:
            warnings.warn("choose_threshold: no positives, returning 0.5", stacklevel=2)
            return 0.5
        pos_sorted = np.sort(s[y])[::-1]
        # Need at least ceil(target * P) positives at or above the threshold; the small epsilon stops
        # float error (0.95 * 20 = 19.000000000000004) from demanding one positive too many.
        need = max(1, math.ceil(target_sensitivity * n_pos - 1e-9))
        return float(pos_sorted[need - 1])

    raise ValueError(f"unknown method {method!r}; use 'youden', 'f1' or 'sensitivity'")


def fit_temperature(
    logits: Any,
    targets: Any,
    *,
    max_iter: int = 200,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> float:
    """Temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al., 2017).

    Optimises log T with LBFGS so T stays positive, then clips to `bounds` (a perfectly separable
    set would otherwise drive T towards 0). Returns 1.0 if fitting fails or does not help.
    """
    import torch  # local: keeps `import tlkit.metrics` light for numpy-only users
    import torch.nn.functional as F

    z = torch.as_tensor(_to_numpy(logits, np.float64), dtype=torch.float64)
    y = torch.as_tensor(_to_numpy(targets).reshape(-1).astype(np.int64))
    if z.ndim != 2 or z.shape[0] != y.shape[0]:
        raise ValueError(f"logits must be (N, C) matching targets; got {tuple(z.shape)} and {tuple(y.shape)}")
    if z.shape[0] == 0:
        return 1.0

    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():  # callers often evaluate under torch.no_grad()
        opt.step(closure)

    t = float(log_t.detach().exp().item())
    if not math.isfinite(t):
        return 1.0
    t = float(min(max(t, bounds[0]), bounds[1]))
    with torch.no_grad():
        fitted = float(F.cross_entropy(z / t, y))
        base = float(F.cross_entropy(z, y))
    return t if fitted <= base else 1.0


def most_confused_pairs(confusion: Any, class_names: Sequence[str], k: int = 10) -> list[dict]:
    """The k largest off-diagonal confusion cells as {true, predicted, count}, largest first."""
    cm = _to_numpy(confusion, np.int64)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    rows, cols = np.nonzero(off)
    counts = off[rows, cols]
    # Sort by count desc, then by (true, predicted) index for a deterministic order among ties.
    order = np.lexsort((cols, rows, -counts))[:k]
    return [
        {"true": str(class_names[rows[i]]), "predicted": str(class_names[cols[i]]), "count": int(counts[i])}
        for i in order
    ]


def normalize_per_clip(per_clip_scores: Sequence[Any]) -> list[np.ndarray]:
    """Min-max normalise each clip's scores to [0, 1], the usual video-anomaly protocol (e.g. Liu et al.
    2018). It hides between-clip offsets (crowd density, lighting) but needs the whole clip, so it is an
    offline evaluation convention, not something a live alert can do."""
    out = []
    for s in per_clip_scores:
        s = _to_numpy(s, np.float64).reshape(-1)
        span = s.max() - s.min() if s.size else 0.0
        out.append((s - s.min()) / span if span > 0 else np.zeros_like(s))
    return out


def frame_auroc(scores: Any, labels: Any, normalize_per_clip: bool = False) -> float | None:
    """Frame-level AUROC of anomaly scores against 0/1 labels (1 = abnormal); None if one class only.

    `scores` / `labels` are flat sequences or lists of per-clip arrays (concatenated); with
    `normalize_per_clip=True` each clip's scores are min-max normalised first (needs per-clip lists).
    Frames without a score (NaN, e.g. the warm-up of a temporal model) are skipped.
    """
    per_clip = len(scores) > 0 and np.ndim(scores[0]) == 1
    if normalize_per_clip:
        if not per_clip:
            raise ValueError("normalize_per_clip needs a list of per-clip score arrays")
        scores = _normalize_clips(scores)
    if per_clip:
        s = np.concatenate([_to_numpy(c, np.float64).reshape(-1) for c in scores])
        y = np.concatenate([_to_numpy(c).reshape(-1) for c in labels]).astype(bool)
    else:
        s = _to_numpy(scores, np.float64).reshape(-1)
        y = _to_numpy(labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores has {s.size} frames but labels has {y.size}")
    finite = np.isfinite(s)
    s, y = s[finite], y[finite]
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, s))


_normalize_clips = normalize_per_clip  # the frame_auroc flag shadows the function name inside it


def score_events(scores: Any, threshold: float, min_length: int = 1, merge_gap: int = 0) -> list[tuple[int, int]]:
    """Contiguous runs of frames with score >= threshold as (start, end) with end exclusive.

    Runs separated by at most `merge_gap` frames below threshold are merged first (one cyclist should be
    one alert), then runs shorter than `min_length` are dropped (single-frame flicker). NaN is below.
    """
    s = _to_numpy(scores, np.float64).reshape(-1)
    with np.errstate(invalid="ignore"):
        above = s >= threshold
    if not above.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], above.astype(np.int8), [0]])))
    runs = [[int(a), int(b)] for a, b in zip(edges[::2], edges[1::2], strict=True)]
    merged = [runs[0]]
    for start, end in runs[1:]:
        if start - merged[-1][1] <= merge_gap:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged if b - a >= min_length]
