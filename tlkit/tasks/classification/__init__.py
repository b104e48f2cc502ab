"""Classification: supervised training through the engine, calibrated evaluation, `Predictor` inference.

- `train`: the engine's fit, then one post-training pass on val (calibration for fine-tunes, the report);
- `val`: evaluate a checkpoint on a labelled split, calibration, metrics at the stored threshold;
- inference is `tlkit.predict.Predictor` (Grad-CAM in `tlkit.explain`, export in `tlkit.export`).
"""

from __future__ import annotations

from tlkit.tasks import Task, lazy

TASK = Task(
    name="classify",
    train=lazy("tlkit.tasks.classification.train", "train"),
    evaluate=lazy("tlkit.tasks.classification.val", "evaluate_checkpoint"),
    load_predictor=lazy("tlkit.predict", "load_predictor"),
    supports=frozenset({"predict", "export", "lr-find", "explain"}),
)
