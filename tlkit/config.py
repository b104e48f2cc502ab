"""Recipes: frozen dataclass configs loaded from YAML.

A recipe file lists only what differs from the defaults below. Loading goes
defaults <- recipe YAML <- `gpu:` block (when CUDA is present) <- CLI options <- `--set key=value`,
and the resolved recipe is written into every run folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from tlkit.paths import RECIPES_DIR


@dataclass(frozen=True)
class DataConfig:
    name: str = "tiny_imagenet_200"  # folder under the data root, or a path
    train_split: str = "train"
    val_split: str = "val"
    img_size: int = 64
    crop_pct: float = 0.875  # eval: resize to img_size / crop_pct, then center-crop img_size
    crop_mode: str = "center"  # center | squash (whole image resized to a square: nothing is cut off)
    interpolation: str = "bilinear"
    scale_min: float = 0.25  # RandomResizedCrop scale=(scale_min, 1)
    hflip: float = 0.5
    color_jitter: float = 0.0
    randaugment: int = 0  # number of RandAugment-style ops per image (0 = off)
    rotate: float = 0.0  # max degrees
    perspective: float = 0.0  # max perspective distortion scale
    blur: float = 0.0  # probability
    brightness_contrast: float = 0.0  # probability
    random_erasing: float = 0.0  # probability
    grayscale: bool = False  # images are grayscale on purpose: replicate to 3 channels
    roi_crop: bool = False  # crop to the ROI columns of `<split>_labels.csv` when present
    max_classes: int = 0  # 0 = all; handy for smoke runs
    max_per_class: int = 0  # 0 = all
    num_workers: int = -1  # -1 = auto
    sampler: str = "uniform"  # uniform | balanced (class-balanced sampling for imbalanced sets)
    # auto: class folders (ImageNet/ImageFolder). clips: video clips as frame folders, each frame labelled
    # normal/abnormal by its clip's labels.csv (frame,label); a clip without labels.csv is all normal.
    layout: str = "auto"
    val_clips: tuple[str, ...] = ()  # clips layout: these clips are val, every other clip trains (by name)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet18"
    init: str = "scratch"  # scratch | auto (newest pretrain checkpoint) | path to tlkit/timm/torchvision weights
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    channels_last: bool = True
    compile: bool = False  # torch.compile (CUDA only)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.2  # for batch_size 256; scaled linearly with the real batch size
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-5
    label_smoothing: float = 0.1
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 1.0
    step_size: int = 30
    gamma: float = 0.1
    min_lr_ratio: float = 0.0
    clip_grad: float = 0.0  # max grad norm, 0 = off
    accum_steps: int = 1
    ema_decay: float = 0.0  # 0 = off
    mixup: float = 0.0  # mixup alpha, 0 = off
    cutmix: float = 0.0  # cutmix alpha, 0 = off
    loss: str = "ce"  # ce | weighted-ce (class weights from the train set's inverse frequency)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 6
    batch_size: int = 64  # per process
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    out: str = ""  # run folder; default runs/<task>-<arch>-<stamp>
    save_every_steps: int = 0  # extra mid-epoch checkpoints (0 = epoch end only)
    eval_every: int = 1
    tta_flip: bool = False  # average logits with the horizontally flipped image at evaluation
    progressive_min_size: int = 0  # >0: ramp train img size from this up to data.img_size (FFCV style)
    progressive_end_epoch: int = 0  # epoch where the ramp reaches data.img_size


@dataclass(frozen=True)
class FinetuneConfig:
    strategy: str = "full"  # linear-probe | full | freeze-unfreeze
    freeze_epochs: int = 1  # freeze-unfreeze: epochs with only the head training
    head_lr_mult: float = 5.0  # head LR = recipe LR x this (a new head has to move further than the body)
    layer_decay: float = 0.7  # lr multiplier per body stage, deepest stage first (1 = off)
    threshold_method: str = "youden"  # youden | sensitivity (binary tasks)
    target_sensitivity: float = 0.95
    temperature_scaling: bool = True
    positive_class: str = ""  # binary tasks: name of the positive class (default: second class)


@dataclass(frozen=True)
class AnomalyConfig:
    layers: tuple[int, ...] = ()  # feature stages for patch descriptors; () = stride-8 and stride-16 stages
    coreset_ratio: float = 0.1
    max_bank: int = 20000
    k: int = 1
    smooth_window: int = 9
    threshold_method: str = "youden"
    max_train_frames: int = 0  # 0 = all; else that many, in runs of 20 consecutive frames spread over the clips
    fps: float = 10.0
    # Motion stream (frame differences per patch vs normal motion), added to the appearance score per frame in
    # units of each stream's spread on normal frames; 0 = appearance only (plain PatchCore).
    motion_weight: float = 1.0


@dataclass(frozen=True)
class Recipe:
    name: str = "imagenet"
    description: str = ""
    task: str = "classify"  # classify | anomaly
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig | None = None  # present for fine-tuning recipes
    anomaly: AnomalyConfig | None = None  # present for anomaly recipes


class RecipeError(ValueError):
    """A recipe that does not exist or does not parse; the message is one line for the user."""


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "finetune": FinetuneConfig,
    "anomaly": AnomalyConfig,
}


def available_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    recipes = available_recipes()
    if name_or_path not in recipes:
        raise RecipeError(f"unknown recipe {name_or_path!r}; available: {', '.join(recipes) or 'none'}")
    return recipes[name_or_path]


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise RecipeError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    kwargs = {}
    for key, value in values.items():
        default = getattr(cls(), key) if key not in _SECTIONS else None
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise RecipeError(f"{where}.{key} must be true or false, got {value!r}")
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(default, float) and isinstance(value, str):
            # PyYAML reads `1e-3` (no dot) as a string: accept it for float fields, in files and --set.
            try:
                value = float(value)
            except ValueError:
                raise RecipeError(f"{where}.{key} must be float, got {value!r}") from None
        elif default is not None and not isinstance(value, type(default)):
            raise RecipeError(f"{where}.{key} must be {type(default).__name__}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_set(assignments: list[str]) -> dict:
    """`["optim.lr=0.1", "data.hflip=0"]` -> nested dict; values parse as YAML scalars."""
    out: dict = {}
    for item in assignments:
        if "=" not in item:
            raise RecipeError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] not in ("name", "description", "task"):
            raise RecipeError(f"--set key {key!r} needs a section, e.g. optim.lr=0.1")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def recipe_from_dict(raw: dict, *, cuda: bool = False) -> Recipe:
    raw = dict(raw)
    gpu = raw.pop("gpu", None) or {}
    if cuda:
        raw = deep_merge(raw, gpu)
    top: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise RecipeError(f"recipe section {key!r} must be a mapping")
            top[key] = _build(_SECTIONS[key], value, key)
        else:
            top[key] = value
    return _build(Recipe, top, "recipe")


def load_recipe(name_or_path: str, overrides: dict | None = None, *, cuda: bool = False) -> Recipe:
    """Load a recipe by name (`recipes/<name>.yaml`) or path, then apply nested `overrides`."""
    path = recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path.name} is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path.name} must be a YAML mapping of sections")
    raw.setdefault("name", path.stem)
    # The gpu block sits between the recipe and the user's options: `--epochs 2` on a CUDA machine is 2.
    gpu = raw.pop("gpu", None) or {}
    if cuda:
        raw = deep_merge(raw, gpu)
    merged = deep_merge(raw, overrides or {})
    # finetune/anomaly blocks named in overrides only count if the recipe has them or asks for them
    return recipe_from_dict(merged, cuda=cuda)


def to_dict(recipe: Recipe) -> dict:
    def convert(obj: Any) -> Any:
        if is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in fields(obj)}
        if isinstance(obj, tuple):
            return list(obj)
        return obj

    return convert(recipe)


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def replace(recipe: Recipe, **sections: dict) -> Recipe:
    """A copy with some section fields changed: `replace(r, train={"epochs": 3})`."""
    changes = {}
    for name, values in sections.items():
        current = getattr(recipe, name)
        if current is None:
            current = _SECTIONS[name]()
        changes[name] = dataclasses.replace(current, **values)
    return dataclasses.replace(recipe, **changes)
