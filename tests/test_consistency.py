"""What `tlkit predict` (and the demos) say about an image is what `tlkit evaluate` measured on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tlkit.checkpoint import save_checkpoint
from tlkit.metrics import softmax
from tlkit.predict import Predictor
from tlkit.tasks.classification.val import checkpoint_loader, checkpoint_logits


@pytest.mark.parametrize("tta_flip", [False, True], ids=["plain", "tta-flip"])
def test_predict_equals_evaluate_on_the_same_images(trained_run, tmp_path: Path, tta_flip: bool) -> None:
    ckpt = torch.load(trained_run.best, map_location="cpu", weights_only=True)
    ckpt["recipe"]["train"]["tta_flip"] = tta_flip
    ckpt["temperature"] = 1.7  # a calibrated checkpoint: both paths must apply the stored temperature
    path = save_checkpoint(ckpt, tmp_path / "best.pt")

    logits, targets, skipped = checkpoint_logits(ckpt, trained_run.data, "val", device="cpu", quiet=True)
    files = [sample.path for sample in checkpoint_loader(ckpt, trained_run.data, "val").dataset.samples]
    assert skipped == 0 and len(files) == len(targets) == 50
    expected = softmax(logits.numpy(), temperature=1.7)

    predictor = Predictor.from_checkpoint(path, device="cpu")
    assert predictor.tta_flip is tta_flip
    got = np.stack([[p["probability"] for p in sorted(r["topk"], key=lambda p: ckpt["classes"].index(p["label"]))]
                    for r in predictor.predict(files, topk=len(ckpt["classes"]))])  # fmt: skip
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # and the flip really changes the numbers, so the check above tells the two settings apart
    flipped = checkpoint_logits({**ckpt, "recipe": {**ckpt["recipe"], "train": {"tta_flip": not tta_flip}}},
                                trained_run.data, "val", device="cpu", quiet=True)[0]  # fmt: skip
    assert np.abs(softmax(flipped.numpy(), temperature=1.7) - got).max() > 1e-3
