"""Inference with a tlkit checkpoint: `Predictor` for code and demos, `predict_files` for `tlkit predict`.

Everything the model needs (architecture, classes, preprocessing, temperature, decision threshold) is
read from the checkpoint, so a prediction here matches what `tlkit evaluate` measured on val.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tlkit.checkpoint import json_safe, load_tlkit_checkpoint, resolve_checkpoint, strip
from tlkit.data.io import ImageDecodeError, describe_error, is_image_file, load_rgb_array
from tlkit.data.transforms import Preprocessing, eval_transform, norm_tensors, normalize

ImageInput = str | Path | bytes | Image.Image | np.ndarray
log = logging.getLogger("tlkit.predict")


def _is_single(images: Any) -> bool:
    return isinstance(images, str | Path | bytes | Image.Image | np.ndarray)


class Predictor:
    """A classifier rebuilt from a tlkit checkpoint, ready for inference.

    Thread-safe for concurrent demo requests: the model is only ever run in eval mode under
    `torch.inference_mode()` (no state changes), and each thread gets its own preprocessing pipeline.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        classes: Sequence[str],
        preprocessing: Preprocessing | dict,
        *,
        class_ids: Sequence[str] | None = None,
        threshold: float | None = None,
        temperature: float | None = None,
        positive_index: int | None = None,
        val_metrics: dict | None = None,
        task: str = "classify",
        arch: str | None = None,
        tta_flip: bool = False,
        device: str | torch.device = "cpu",
        checkpoint: dict | None = None,
        path: Path | None = None,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.classes = list(classes)
        self.class_ids = list(class_ids) if class_ids is not None else list(classes)
        self.preprocessing = (
            preprocessing if isinstance(preprocessing, Preprocessing) else Preprocessing.from_dict(preprocessing)
        )
        self.threshold = None if threshold is None else float(threshold)
        self.temperature = float(temperature) if temperature else 1.0
        self.positive_index = positive_index
        self.val_metrics = dict(val_metrics or {})
        self.task = task
        self.arch = arch
        self.tta_flip = bool(tta_flip)  # average with the mirrored image, as `evaluate` does for this recipe
        self.checkpoint = checkpoint or {}  # metadata only (weights dropped), e.g. data_root, recipe
        # trained on box crops (traffic-signs `data.roi_crop`): an image with no known box is used whole
        self.roi_crop = bool(((self.checkpoint.get("recipe") or {}).get("data") or {}).get("roi_crop", False))
        self.path = path
        self._mean, self._std = norm_tensors(self.preprocessing, self.device)
        self._local = threading.local()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", *, use_ema: bool = True) -> Predictor:
        """Load a tlkit classification checkpoint (`torch.load(weights_only=True)`) and rebuild its model.
        A run folder means its `best.pt` (the one with the calibrated temperature and threshold)."""
        from tlkit.models import model_from_checkpoint
        from tlkit.run import resolve_device
        from tlkit.tasks import require, task_of
        from tlkit.tasks.classification.val import positive_index as default_positive_index

        path = resolve_checkpoint(path)  # a run folder: the calibrated best.pt, not last.pt
        ckpt = load_tlkit_checkpoint(path)
        require(task_of(ckpt), "predict")
        dev = resolve_device(device)
        model = model_from_checkpoint(ckpt, use_ema=use_ema)
        pos = ckpt.get("positive_index")
        if pos is None and len(ckpt["classes"]) == 2:
            pos = default_positive_index(ckpt)
        meta = strip(ckpt)
        return cls(
            model,
            ckpt["classes"],
            ckpt["preprocessing"],
            class_ids=ckpt.get("class_ids"),
            threshold=ckpt.get("threshold"),
            temperature=ckpt.get("temperature"),
            positive_index=pos,
            val_metrics=ckpt.get("val_metrics"),
            task=ckpt.get("task", "classify"),
            arch=ckpt.get("arch"),
            tta_flip=bool(ckpt["recipe"].get("train", {}).get("tta_flip", False)),
            device=dev,
            checkpoint=meta,
            path=path,
        )

    # ---- preprocessing ------------------------------------------------------------------------------

    @property
    def transform(self):
        """The eval transform (resize, centre crop), one instance per thread."""
        t = getattr(self._local, "transform", None)
        if t is None:
            t = self._local.transform = eval_transform(self.preprocessing)
        return t

    def crop(self, image: ImageInput, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """The HxWx3 uint8 array the model sees (the `box` cut out when given, resize and centre crop, before
        normalisation)."""
        from tlkit.data.datasets import crop_to_box

        return self.transform(crop_to_box(load_rgb_array(image), box))

    def to_tensor(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous().to(self.device)
        return normalize(batch, self._mean, self._std)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """Path, bytes, PIL image or HxW[x3] uint8 array -> normalised 1x3xHxW float tensor on the device.
        Undecodable input raises `ImageDecodeError` with a one-line reason."""
        return self.to_tensor([self.crop(image)])

    # ---- inference --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device)
        logits = self.model(batch).float()
        if self.tta_flip:  # the same test-time augmentation `evaluate` applied when it measured this model
            logits = (logits + self.model(torch.flip(batch, dims=[3])).float()) / 2
        return logits

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled softmax (the temperature fitted on val at the end of fine-tuning)."""
        return torch.softmax(self.logits(batch) / self.temperature, dim=1)

    def describe(self, probs: np.ndarray, topk: int = 5) -> dict:
        """One prediction as a JSON-able dict from a row of class probabilities."""
        order = np.argsort(-probs, kind="stable")
        k = max(1, min(int(topk), len(self.classes)))
        best = int(order[0])
        out: dict[str, Any] = {
            "label": self.classes[best],
            "index": best,
            "probability": float(probs[best]),
            "topk": [{"label": self.classes[int(i)], "probability": float(probs[int(i)])} for i in order[:k]],
        }
        decision = self.decision(probs)
        if decision is not None:
            out["decision"] = decision
        return out

    def decision(self, probs: np.ndarray) -> dict | None:
        """Binary classifiers: the call at the threshold chosen on val (not simply the argmax)."""
        if len(self.classes) != 2 or self.positive_index is None:
            return None
        pos = int(self.positive_index)
        threshold = 0.5 if self.threshold is None else self.threshold
        score = float(probs[pos])
        positive = score >= threshold
        return {
            "label": self.classes[pos] if positive else self.classes[1 - pos],
            "positive": bool(positive),
            "positive_class": self.classes[pos],
            "score": score,
            "threshold": float(threshold),
        }

    def predict(self, images: ImageInput | Iterable[ImageInput], topk: int = 5, batch_size: int = 32) -> list[dict]:
        """Classify one image or a list of images; returns one dict per image (see `describe`)."""
        items = [images] if _is_single(images) else list(images)
        results: list[dict] = []
        for start in range(0, len(items), batch_size):
            crops = [self.crop(item) for item in items[start : start + batch_size]]
            probs = self.probabilities(self.to_tensor(crops)).cpu().numpy()
            results.extend(self.describe(p, topk) for p in probs)
        return results


def load_predictor(checkpoint: str | Path, device: str = "auto") -> Predictor:
    """The classification task's predictor (the task table's `load_predictor`)."""
    return Predictor.from_checkpoint(checkpoint, device=device)


# ---- `tlkit predict` ------------------------------------------------------------------------------------


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given (any extension: a bad one gets an error line), folders -> their images, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f)))
        else:
            out.append(p)
    return out


def predict_files(
    checkpoint: str | Path,
    paths: Iterable[str | Path],
    topk: int = 5,
    device: str = "auto",
    batch_size: int = 32,
    boxes: str | Path | None = None,
) -> Iterator[dict]:
    """One JSON-able dict per image, in order: `{"file", "label", "index", "probability", "topk",
    "decision"?, "roi"?}`, or `{"file", "error"}` for a file that is missing or does not decode.

    A checkpoint trained on box crops (`data.roi_crop`) gets each image's box from `boxes` (a
    `<split>_labels.csv`: filename, roi_x1..roi_y2), as evaluate does; an image without one is used whole, and
    its line says so (`"roi": "whole image"`). The checkpoint is loaded before this returns, so a bad
    checkpoint fails here, not mid-stream."""
    from tlkit.data.datasets import read_boxes

    predictor = Predictor.from_checkpoint(checkpoint, device=device)
    if boxes is not None and not predictor.roi_crop:
        raise ValueError("--boxes applies only to a checkpoint trained on box crops (data.roi_crop); this one was not")
    if boxes is not None and not Path(boxes).is_file():
        raise ValueError(f"box file not found: {boxes}")
    box_map = read_boxes(Path(boxes)) if boxes is not None else {}
    if predictor.roi_crop and not box_map:
        log.warning(
            "note: this model was trained on images cropped to their box (data.roi_crop); without --boxes each "
            "image is used whole, so crop images around the object first or pass --boxes <split>_labels.csv"
        )
    return _predict_lines(predictor, expand_paths(paths), topk, batch_size, box_map)


def _predict_lines(
    predictor: Predictor, files: list[Path], topk: int, batch_size: int, boxes: dict | None = None
) -> Iterator[dict]:
    boxes = boxes or {}
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        crops: list[np.ndarray | None] = []
        errors: dict[int, str] = {}
        for i, f in enumerate(chunk):
            try:
                crops.append(predictor.crop(f, boxes.get(Path(f).name)))
            except (ImageDecodeError, OSError, ValueError) as e:
                crops.append(None)
                errors[i] = describe_error(e, f)
        good = [c for c in crops if c is not None]
        probs = iter(predictor.probabilities(predictor.to_tensor(good)).cpu().numpy() if good else [])
        for i, f in enumerate(chunk):
            if i in errors:
                yield {"file": str(f), "error": errors[i]}
            else:  # a non-finite number is null, so every line stays valid JSON
                line = {"file": str(f), **predictor.describe(next(probs), topk)}
                if predictor.roi_crop:
                    line["roi"] = "box" if Path(f).name in boxes else "whole image"
                yield json_safe(line)
