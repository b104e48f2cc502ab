"""tlkit.metrics against sklearn and hand-checked examples."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, balanced_accuracy_score, roc_auc_score

from tlkit.metrics import (
    choose_threshold,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    frame_auroc,
    most_confused_pairs,
    nll,
    score_events,
    softmax,
)


def _binary_probs(pos: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - pos, pos], axis=1)


@pytest.fixture
def noisy_binary() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=400)
    pos = 1.0 / (1.0 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(0, 1.5, size=y.size))))
    return pos, y


def test_softmax_rows_sum_to_one_and_temperature_flattens() -> None:
    z = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])  # huge logits must not overflow
    p = softmax(z)
    assert np.allclose(p.sum(axis=1), 1.0)
    assert p[0, 0] == pytest.approx(1.0)
    assert softmax(z[1:], temperature=10.0).max() < p[1].max()
    assert np.allclose(softmax(torch.tensor(z[1:])), p[1:])


def test_topk_on_known_example() -> None:
    probs = np.array(
        [
            [0.50, 0.20, 0.10, 0.08, 0.07, 0.05],  # true 0: top1 hit
            [0.50, 0.20, 0.10, 0.08, 0.07, 0.05],  # true 4: rank 5 -> top5 hit
            [0.50, 0.20, 0.10, 0.08, 0.07, 0.05],  # true 5: rank 6 -> miss
            [0.10, 0.60, 0.10, 0.10, 0.05, 0.05],  # true 1: top1 hit
        ]
    )
    targets = np.array([0, 4, 5, 1])
    m = classification_metrics(probs, targets, list("abcdef"))
    assert m["n"] == 4
    assert m["top1"] == pytest.approx(0.5)
    assert m["top5"] == pytest.approx(0.75)
    assert m["top5_k"] == 5
    assert m["confusion_matrix"][4][0] == 1 and m["confusion_matrix"][5][0] == 1
    assert m["per_class"]["a"] == {"n": 1, "accuracy": 1.0, "precision": 1 / 3, "recall": 1.0, "f1": 0.5}
    assert m["per_class"]["c"]["n"] == 0 and m["per_class"]["c"]["accuracy"] is None
    # macro accuracy averages the 4 classes that occur: a, b hit; e, f miss.
    assert m["macro_accuracy"] == pytest.approx(0.5)
    assert "sensitivity" not in m  # binary-only keys stay out of multi-class results
    json.dumps(m)  # everything is plain JSON


def test_topk_clipped_to_number_of_classes() -> None:
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    m = classification_metrics(probs, [0, 2], ["x", "y", "z"])
    assert m["top5_k"] == 3 and m["top5"] == 1.0 and m["top1"] == 0.0


def test_multiclass_matches_sklearn_balanced_accuracy() -> None:
    rng = np.random.default_rng(1)
    probs = softmax(rng.normal(size=(300, 7)) * 2)
    y = rng.integers(0, 7, size=300)
    m = classification_metrics(probs, y, [f"c{i}" for i in range(7)], loss=1.25)
    assert m["macro_accuracy"] == pytest.approx(balanced_accuracy_score(y, probs.argmax(1)))
    assert np.asarray(m["confusion_matrix"]).sum() == 300
    assert m["loss"] == 1.25
    assert m["nll"] == pytest.approx(nll(probs, y))


def test_binary_against_sklearn(noisy_binary) -> None:
    pos, y = noisy_binary
    m = classification_metrics(_binary_probs(pos), y, ["normal", "abnormal"], threshold=0.4)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, pos))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, pos))
    pred = pos >= 0.4
    tp, fp = np.sum(pred & (y == 1)), np.sum(pred & (y == 0))
    tn, fn = np.sum(~pred & (y == 0)), np.sum(~pred & (y == 1))
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["ppv"] == pytest.approx(tp / (tp + fp))
    assert m["npv"] == pytest.approx(tn / (tn + fn))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["threshold"] == 0.4 and m["positive_class"] == "abnormal"
    # The confusion matrix and macro accuracy follow the threshold rule too.
    assert m["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert m["macro_accuracy"] == pytest.approx((m["sensitivity"] + m["specificity"]) / 2)
    assert all(
        type(v) in (int, float, str) for k, v in m.items() if k not in ("per_class", "class_names", "confusion_matrix")
    )
    json.dumps(m)


def test_binary_positive_index_zero() -> None:
    pos0 = np.array([0.9, 0.8, 0.3, 0.1])  # probability of class 0, the positive class here
    probs = np.stack([pos0, 1 - pos0], axis=1)
    m = classification_metrics(probs, [0, 0, 1, 1], ["sick", "healthy"], positive_index=0)
    assert m["positive_class"] == "sick"
    assert m["auroc"] == 1.0 and m["sensitivity"] == 1.0 and m["specificity"] == 1.0


def test_perfect_and_inverted_classifiers() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    good = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    m = classification_metrics(_binary_probs(good), y, ["neg", "pos"])
    assert m["auroc"] == 1.0 and m["pr_auc"] == 1.0 and m["top1"] == 1.0
    assert m["sensitivity"] == m["specificity"] == m["ppv"] == m["npv"] == m["f1"] == 1.0
    inv = classification_metrics(_binary_probs(1 - good), y, ["neg", "pos"])
    assert inv["auroc"] == 0.0 and inv["top1"] == 0.0 and inv["sensitivity"] == 0.0
    assert inv["ppv"] == 0.0 and inv["f1"] == 0.0
    assert frame_auroc(good, y) == 1.0 and frame_auroc(1 - good, y) == 0.0


def test_degenerate_one_class_does_not_crash() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn "only one class" warnings either
        m = classification_metrics(_binary_probs(np.array([0.2, 0.6, 0.9])), [1, 1, 1], ["neg", "pos"])
    assert m["auroc"] is None
    assert m["pr_auc"] == pytest.approx(1.0)
    assert m["specificity"] is None
    assert m["npv"] == 0.0  # the one predicted negative (0.2) is a positive
    assert m["sensitivity"] == pytest.approx(2 / 3)
    json.dumps(m)

    m0 = classification_metrics(_binary_probs(np.array([0.2, 0.6])), [0, 0], ["neg", "pos"])
    assert m0["auroc"] is None and m0["pr_auc"] is None and m0["sensitivity"] is None and m0["ppv"] == 0.0

    empty = classification_metrics(np.zeros((0, 3)), [], ["a", "b", "c"])
    assert empty["n"] == 0 and empty["top1"] is None and empty["macro_accuracy"] is None

    assert frame_auroc([0.1, 0.5, 0.3], [0, 0, 0]) is None
    with pytest.warns(UserWarning):
        assert choose_threshold([0.1, 0.2], [1, 1]) == 0.5


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError):
        classification_metrics(np.array([[0.5, np.nan]]), [0], ["a", "b"])
    with pytest.raises(ValueError):
        classification_metrics(np.array([[0.5, 0.5]]), [2], ["a", "b"])
    with pytest.raises(ValueError):
        classification_metrics(np.array([[0.5, 0.5]]), [0], ["a", "b", "c"])
    with pytest.raises(ValueError):
        choose_threshold([0.1, 0.9], [0, 1], method="magic")


def test_youden_threshold_separates_separable_set() -> None:
    rng = np.random.default_rng(2)
    neg = rng.uniform(0.0, 0.4, size=50)
    pos = rng.uniform(0.6, 1.0, size=30)
    s = np.concatenate([neg, pos])
    y = np.r_[np.zeros(50), np.ones(30)]
    thr = choose_threshold(s, y, method="youden")
    assert neg.max() < thr <= pos.min()
    m = classification_metrics(_binary_probs(s), y.astype(int), ["n", "p"], threshold=thr)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0


def test_target_sensitivity_reached_with_highest_threshold(noisy_binary) -> None:
    pos, y = noisy_binary
    for target in (0.8, 0.95, 1.0):
        thr = choose_threshold(pos, y, method="sensitivity", target_sensitivity=target)
        sens = np.mean(pos[y == 1] >= thr)
        assert sens >= target
        # Highest such threshold: any higher positive score would miss the target.
        higher = np.unique(pos[pos > thr])
        if higher.size:
            assert np.mean(pos[y == 1] >= higher[0]) < target
    # Exact count arithmetic: 20 positives at 95% -> 19 must be caught, not 20.
    s = np.linspace(0.05, 1.0, 20)
    assert choose_threshold(s, np.ones(20), method="sensitivity", target_sensitivity=0.95) == pytest.approx(0.1)


def test_temperature_scaling_fixes_overconfidence() -> None:
    rng = np.random.default_rng(3)
    n, c = 2000, 10
    y = rng.integers(0, c, size=n)
    logits = rng.normal(0, 1, size=(n, c))
    logits[np.arange(n), y] += 2.0  # a decent but imperfect classifier...
    logits *= 5.0  # ...made badly over-confident
    t = fit_temperature(logits, y)
    assert 1.5 < t < 10.0  # well above 1: it must undo a good part of the x5
    before, after = softmax(logits), softmax(logits, t)
    assert nll(after, y) < nll(before, y) - 0.1
    assert expected_calibration_error(after, y) < 0.5 * expected_calibration_error(before, y)
    assert expected_calibration_error(after, y) < 0.05
    # Same answer from a torch tensor, also when called under no_grad (as in an eval loop).
    with torch.no_grad():
        t_torch = fit_temperature(torch.tensor(logits, dtype=torch.float32), torch.tensor(y))
    assert t_torch == pytest.approx(t, rel=1e-3)


def test_temperature_on_calibrated_logits_stays_near_one() -> None:
    rng = np.random.default_rng(4)
    n, c = 4000, 5
    logits = rng.normal(0, 2, size=(n, c))
    p = softmax(logits)
    y = np.array([rng.choice(c, p=row) for row in p])  # labels drawn from the model itself
    assert fit_temperature(logits, y) == pytest.approx(1.0, abs=0.15)


def test_ece_known_values() -> None:
    # 4 predictions all at confidence 0.9, half correct -> |0.5 - 0.9| = 0.4.
    probs = np.array([[0.9, 0.1]] * 4)
    assert expected_calibration_error(probs, [0, 0, 1, 1]) == pytest.approx(0.4)
    assert expected_calibration_error(np.array([[1.0, 0.0], [0.0, 1.0]]), [0, 1]) == pytest.approx(0.0)


def test_most_confused_pairs() -> None:
    cm = [[5, 3, 0], [1, 7, 4], [3, 0, 9]]
    pairs = most_confused_pairs(cm, ["a", "b", "c"], k=3)
    assert pairs == [
        {"true": "b", "predicted": "c", "count": 4},
        {"true": "a", "predicted": "b", "count": 3},
        {"true": "c", "predicted": "a", "count": 3},
    ]
    assert len(most_confused_pairs(cm, ["a", "b", "c"])) == 4  # zeros are not "confusions"
    assert most_confused_pairs(np.eye(3, dtype=int), ["a", "b", "c"]) == []


def test_frame_auroc_matches_sklearn_and_skips_nan() -> None:
    rng = np.random.default_rng(5)
    labels = (rng.uniform(size=200) < 0.3).astype(int)
    scores = labels + rng.normal(0, 0.8, size=200)
    assert frame_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    with_nan = np.r_[np.nan, np.nan, scores]
    assert frame_auroc(with_nan, np.r_[1, 0, labels]) == pytest.approx(roc_auc_score(labels, scores))


def test_score_events() -> None:
    s = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1]
    assert score_events(s, 0.5) == [(1, 3), (4, 5), (7, 10)]
    assert score_events(s, 0.5, min_length=2) == [(1, 3), (7, 10)]
    assert score_events(s, 0.5, merge_gap=1) == [(1, 5), (7, 10)]
    assert score_events([math.nan, 0.0], 0.5) == []
