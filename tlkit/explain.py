"""Grad-CAM (Selvaraju et al., ICCV 2017) with pytorch-grad-cam: where the classifier looked.

The heat map covers exactly the region the model sees (the eval centre crop) and is returned at a
display resolution (the crop's side clamped to 224..512 px), together with an RGB overlay of the same
size. It is computed on a private copy of the model, so Grad-CAM's hooks and backward passes never
touch the `Predictor`'s model while other threads run predictions on it.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from tlkit.data.io import ImageDecodeError, describe_error, load_rgb_array
from tlkit.predict import ImageInput, Predictor, expand_paths

log = logging.getLogger("tlkit.explain")

DISPLAY_MIN, DISPLAY_MAX = 224, 512
_CREATE_LOCK = threading.Lock()


def find_target_layer(model: nn.Module, img_size: int, device: torch.device | str = "cpu") -> nn.Module:
    """The layer Grad-CAM reads: the last convolutional stage.

    timm ResNets: `layer4[-1]` (or `layer3[-1]` when the input is so small that layer4 is 1x1, where a
    CAM carries no spatial information). Other models: the last module, in execution order, with a 4-D
    output of at least 2x2, found with one dry forward pass."""
    seen: list[tuple[nn.Module, tuple[int, ...]]] = []

    def hook(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4:
            seen.append((module, tuple(output.shape)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size, device=device))
    finally:
        for h in handles:
            h.remove()
    shapes = {id(m): s for m, s in seen}
    if hasattr(model, "layer4") and hasattr(model, "layer3"):
        for stage in (model.layer4, model.layer3):
            last = stage[-1] if isinstance(stage, nn.Sequential) and len(stage) else stage
            if min(shapes.get(id(last), (0, 0, 0, 0))[-2:]) >= 2:
                return last
    spatial = [m for m, s in seen if min(s[-2:]) >= 2]
    if spatial:
        return spatial[-1]
    if seen:
        return seen[-1][0]
    raise ValueError(f"Grad-CAM needs a convolutional model; {type(model).__name__} has no 4-D feature maps")


class _CamState:
    """Per-predictor Grad-CAM machinery: a model copy with hooks, and a lock (hooks are not re-entrant)."""

    def __init__(self, predictor: Predictor):
        from pytorch_grad_cam import GradCAM

        self.model = copy.deepcopy(predictor.model).eval()
        for p in self.model.parameters():
            p.requires_grad_(True)
        layer = find_target_layer(self.model, predictor.preprocessing.img_size, predictor.device)
        self.cam = GradCAM(model=self.model, target_layers=[layer])
        self.lock = threading.Lock()


def _cam_state(predictor: Predictor) -> _CamState:
    state = predictor.__dict__.get("_cam_state")
    if state is None:
        with _CREATE_LOCK:
            state = predictor.__dict__.get("_cam_state")
            if state is None:
                state = predictor.__dict__["_cam_state"] = _CamState(predictor)
    return state


def crop_box(height: int, width: int, predictor: Predictor) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the eval centre crop, in the original image's pixels."""
    pre = predictor.preprocessing
    if pre.crop_mode == "squash":
        return 0, 0, height, width
    scale = pre.resize_size / min(height, width)
    side = pre.img_size / scale
    ch, cw = min(side, height), min(side, width)
    top, left = (height - ch) / 2, (width - cw) / 2
    return round(top), round(left), round(top + ch), round(left + cw)


def display_view(rgb: np.ndarray, predictor: Predictor) -> np.ndarray:
    """The region the model sees, cut from the original image, at display size (side 224..512)."""
    top, left, bottom, right = crop_box(rgb.shape[0], rgb.shape[1], predictor)
    region = rgb[top:bottom, left:right]
    side = max(region.shape[:2])
    target = int(min(max(side, DISPLAY_MIN), DISPLAY_MAX))
    scale = target / side
    size = (max(1, round(region.shape[1] * scale)), max(1, round(region.shape[0] * scale)))
    if size != (region.shape[1], region.shape[0]):
        region = np.asarray(Image.fromarray(region).resize(size, Image.BICUBIC))
    if predictor.preprocessing.grayscale:
        grey = np.asarray(Image.fromarray(region).convert("L"))
        region = np.repeat(grey[:, :, None], 3, axis=2)
    return np.ascontiguousarray(region)


def resolve_target(predictor: Predictor, target: str | int | None) -> int | None:
    """A class given by index, class id or display name -> its index (None = the predicted class)."""
    if target is None or target == "":
        return None
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit() and target not in predictor.class_ids):
        index = int(target)
        if not 0 <= index < len(predictor.classes):
            raise ValueError(f"target class index {index} out of range (0..{len(predictor.classes) - 1})")
        return index
    for i, (cid, name) in enumerate(zip(predictor.class_ids, predictor.classes, strict=True)):
        if target in (cid, name):
            return i
    lowered = [c.lower() for c in predictor.classes]
    if str(target).lower() in lowered:
        return lowered.index(str(target).lower())
    shown = ", ".join(predictor.classes[:10]) + (", ..." if len(predictor.classes) > 10 else "")
    raise ValueError(f"unknown target class {target!r}; classes: {shown}")


def gradcam(predictor: Predictor, image: ImageInput, target_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM for one image -> (heatmap HxW float32 in 0..1, overlay HxWx3 uint8 RGB), both at display
    size over the model's centre crop. `target_index` defaults to the predicted class."""
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    rgb = load_rgb_array(image)
    batch = predictor.to_tensor([predictor.transform(rgb)])
    state = _cam_state(predictor)
    targets = None if target_index is None else [ClassifierOutputTarget(int(target_index))]
    with state.lock, torch.enable_grad():
        cam = state.cam(input_tensor=batch, targets=targets)[0]
        state.model.zero_grad(set_to_none=True)
    view = display_view(rgb, predictor)
    heat = cv2.resize(np.float32(cam), (view.shape[1], view.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = np.clip(np.nan_to_num(heat), 0.0, 1.0).astype(np.float32)
    overlay = show_cam_on_image(view.astype(np.float32) / 255.0, heat, use_rgb=True, image_weight=0.55)
    return heat, overlay


def explain_files(
    checkpoint: str | Path,
    images: Iterable[str | Path],
    out: str | Path = "explain",
    target: str | int | None = None,
    device: str = "auto",
) -> list[Path]:
    """`tlkit explain`: writes `<out>/<stem>_gradcam.png` per image (folders expand to their images) and
    returns the written paths. Unreadable images are logged and skipped."""
    out = Path(out)
    if out.exists() and not out.is_dir():  # checked before the model loads: nothing is done for nothing
        raise ValueError(f"--out {out} is a file; explain writes one overlay per image into a folder: give a folder")
    predictor = Predictor.from_checkpoint(checkpoint, device=device)
    target_index = resolve_target(predictor, target)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used: set[str] = set()
    for path in expand_paths(images):
        try:
            _, overlay = gradcam(predictor, path, target_index)
        except (ImageDecodeError, OSError) as e:
            log.warning("skipped %s: %s", path, describe_error(e, path))
            continue
        name, n = f"{path.stem}_gradcam.png", 1
        while name in used:  # same stem from two folders: keep both
            n += 1
            name = f"{path.stem}_{n}_gradcam.png"
        used.add(name)
        Image.fromarray(overlay).save(out / name)
        written.append(out / name)
    return written
