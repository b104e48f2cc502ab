"""Recipes: frozen dataclass configs loaded from YAML.

A recipe file lists only what differs from the defaults below. Loading goes
defaults <- recipe YAML <- `published:` block (when starting from published ImageNet weights) <- `gpu:` block
(when CUDA is present) <- CLI options <- `--set key=value`,
and the resolved recipe is written into every run folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import yaml

from tlkit.paths import RECIPES_DIR
from tlkit.tasks import TASKS

# Allowed values of the fields that name a choice; the modules that act on them read these tables.
CROP_MODES = ("center", "squash")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area", "lanczos")  # tlkit.data.transforms maps them to cv2
LAYOUTS = ("auto", "clips", "csv")
SAMPLERS = ("uniform", "balanced")
LOADERS = ("auto", "cpu", "packed", "gpu", "jpeg")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
LOSSES = ("ce", "weighted-ce")
AMP = ("auto", "bf16", "off")
LOGGERS = ("tensorboard", "mlflow", "wandb")  # tlkit.run_folder writes to each one listed
STRATEGIES = ("linear-probe", "full", "freeze-unfreeze")
THRESHOLD_METHODS = ("youden", "f1", "sensitivity", "argmax")  # argmax: 0.5, the plain argmax call
ALERT_THRESHOLD_METHODS = ("youden", "f1")
SMOOTH_METHODS = ("mean", "max", "median", "gaussian")  # tlkit.tasks.anomaly.post.smooth_scores
DEVICE_PATTERN, DEVICE_HELP = r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N"


def rule(
    default: Any,
    *,
    choices: Iterable[str] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    pattern: tuple[str, str] | None = None,
) -> Any:
    """A recipe field with what it allows, checked whenever a section is built (`_Checked`): `choices` (for a list
    field: of each item), numeric bounds, or `pattern` = (regex, how to say it). The type comes from the annotation."""
    meta = {"choices": tuple(choices) if choices else None, "ge": ge, "gt": gt, "le": le, "lt": lt, "pattern": pattern}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


class _Checked:
    """Every recipe section checks itself when built (recipe file, --set, a checkpoint's recipe, `replace`): each
    field is coerced to its annotated type and held to its `rule`; a bad value is one RecipeError line."""

    _section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            key = f"{self._section}.{f.name}" if self._section else f.name
            value = getattr(self, f.name)
            checked = check_value(key, value, hints[f.name], f.metadata)
            if checked is not value:
                object.__setattr__(self, f.name, checked)  # frozen: coercion (int -> float, list -> tuple)


@dataclass(frozen=True)
class DataConfig(_Checked):
    _section: ClassVar[str] = "data"

    name: str = "tiny_imagenet_200"  # folder under the data root, or a path
    train_split: str = "train"
    val_split: str = "val"
    img_size: int = rule(64, ge=16)
    crop_pct: float = rule(0.875, gt=0, le=1)  # eval: resize to img_size / crop_pct, then center-crop img_size
    crop_mode: str = rule("center", choices=CROP_MODES)  # squash: whole image resized to a square, nothing cut off
    interpolation: str = rule("bilinear", choices=INTERPOLATIONS)
    scale_min: float = rule(0.25, gt=0, le=1)  # RandomResizedCrop scale=(scale_min, 1)
    hflip: float = rule(0.5, ge=0, le=1)  # probability
    color_jitter: float = rule(0.0, ge=0, le=1)
    randaugment: int = rule(0, ge=0, le=10)  # number of RandAugment-style ops per image (0 = off)
    rotate: float = rule(0.0, ge=0, le=180)  # max degrees
    perspective: float = rule(0.0, ge=0, le=1)  # max perspective distortion scale
    blur: float = rule(0.0, ge=0, le=1)  # probability
    brightness_contrast: float = rule(0.0, ge=0, le=1)  # probability
    random_erasing: float = rule(0.0, ge=0, le=1)  # probability
    grayscale: bool = False  # images are grayscale on purpose: replicate to 3 channels
    roi_crop: bool = False  # crop to the ROI columns of `<split>_labels.csv` when present
    max_classes: int = rule(0, ge=0)  # 0 = all; handy for smoke runs
    max_per_class: int = rule(0, ge=0)  # 0 = all
    num_workers: int = rule(-1, ge=-1)  # -1 = auto
    sampler: str = rule("uniform", choices=SAMPLERS)  # uniform | balanced (class-balanced sampling for imbalanced sets)
    # auto: class folders (ImageNet/ImageFolder). clips: video clips as frame folders, each frame labelled
    # normal/abnormal by its clip's labels.csv (frame,label); a clip without labels.csv is all normal.
    # csv: `name` is a CSV file of path,label[,split] (paths relative to it; classes = its sorted labels).
    layout: str = rule("auto", choices=LAYOUTS)
    val_clips: tuple[str, ...] = ()  # clips layout: these clips are val, every other clip trains (by name)
    # Which loader feeds training: auto | cpu | packed | gpu | jpeg (see tlkit.data.data_path.choose_loader).
    loader: str = rule("auto", choices=LOADERS)
    pack: str = ""  # folder of packs made by `tlkit data pack` (<split>-<size>/); "" = look in the default places


@dataclass(frozen=True)
class ModelConfig(_Checked):
    _section: ClassVar[str] = "model"

    arch: str = "resnet18"
    # scratch | auto (newest pretrain checkpoint) | path to tlkit/timm/torchvision weights | published weights:
    # timm:<model>[.<tag>], hf-hub:<org>/<repo>, torchvision:<WeightsEnum> (hub cache first)
    init: str = "scratch"
    drop_rate: float = rule(0.0, ge=0, lt=1)
    drop_path_rate: float = rule(0.0, ge=0, lt=1)
    channels_last: bool = True
    compile: bool = False  # torch.compile (CUDA only)


@dataclass(frozen=True)
class OptimConfig(_Checked):
    _section: ClassVar[str] = "optim"

    name: str = rule("sgd", choices=OPTIMIZERS)  # sgd | adamw
    lr: float = rule(0.2, gt=0)  # for batch_size 256; scaled linearly with the real batch size
    momentum: float = rule(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = rule(5e-5, ge=0)
    label_smoothing: float = rule(0.1, ge=0, lt=1)
    schedule: str = rule("cosine", choices=SCHEDULES)  # cosine | step | constant
    warmup_epochs: float = rule(1.0, ge=0)
    step_size: int = rule(30, ge=1)  # schedule step: epochs between LR drops
    gamma: float = rule(0.1, gt=0, le=1)  # schedule step: LR factor per drop
    min_lr_ratio: float = rule(0.0, ge=0, le=1)
    clip_grad: float = rule(0.0, ge=0)  # max grad norm, 0 = off
    accum_steps: int = rule(1, ge=1)
    ema_decay: float = rule(0.0, ge=0, lt=1)  # 0 = off
    mixup: float = rule(0.0, ge=0)  # mixup alpha, 0 = off
    cutmix: float = rule(0.0, ge=0)  # cutmix alpha, 0 = off
    loss: str = rule("ce", choices=LOSSES)  # ce | weighted-ce (class weights from the train set's inverse frequency)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name == "sgd" and self.nesterov and self.momentum == 0:  # torch's SGD refuses it, after the data scan
            raise RecipeError(
                "optim.nesterov=True is not allowed with optim.momentum=0: use a momentum > 0, or nesterov false"
            )


@dataclass(frozen=True)
class TrainConfig(_Checked):
    _section: ClassVar[str] = "train"

    epochs: int = rule(6, ge=1)
    batch_size: int = rule(64, ge=1)  # per process
    seed: int = rule(0, ge=0)
    device: str = rule("auto", pattern=(DEVICE_PATTERN, DEVICE_HELP))
    amp: str = rule("auto", choices=AMP)  # auto (bf16 on CUDA) | bf16 | off
    out: str = ""  # run folder; default runs/<task>-<arch>-<stamp>
    save_every_steps: int = rule(0, ge=0)  # extra mid-epoch checkpoints (0 = epoch end only)
    eval_every: int = rule(1, ge=1)  # epochs between val passes (the last epoch always has one)
    tta_flip: bool = False  # average logits with the horizontally flipped image at evaluation
    progressive_min_size: int = rule(0, ge=0)  # >0: ramp train img size from this up to data.img_size (FFCV style)
    progressive_end_epoch: int = rule(0, ge=0)  # epoch where the ramp reaches data.img_size
    # Where params, per-epoch metrics and the report go, beside metrics.jsonl: tensorboard, mlflow (pip install
    # 'tlkit[mlflow]'; MLFLOW_TRACKING_URI), wandb (pip install 'tlkit[wandb]'; WANDB_MODE=offline works).
    loggers: tuple[str, ...] = rule(("tensorboard",), choices=LOGGERS)


@dataclass(frozen=True)
class FinetuneConfig(_Checked):
    _section: ClassVar[str] = "finetune"

    strategy: str = rule("full", choices=STRATEGIES)
    freeze_epochs: int = rule(1, ge=0)  # freeze-unfreeze: epochs with only the head training
    head_lr_mult: float = rule(5.0, ge=0)  # head LR = recipe LR x this (0: the head stays fixed)
    layer_decay: float = rule(0.7, gt=0, le=1)  # lr multiplier per body stage, deepest stage first (1 = off)
    # re-initialise the deepest N body stages before training (timm's own init): a weak or far-domain pretrain
    # transfers its early layers; its late ones fit the pretraining task and fine-tune worse than fresh ones
    reinit_stages: int = rule(0, ge=0)
    threshold_method: str = rule("youden", choices=THRESHOLD_METHODS)  # binary tasks
    target_sensitivity: float = rule(0.95, gt=0, le=1)
    temperature_scaling: bool = True
    positive_class: str = ""  # binary tasks: name of the positive class (default: second class)


@dataclass(frozen=True)
class AnomalyConfig(_Checked):
    _section: ClassVar[str] = "anomaly"

    layers: tuple[int, ...] = rule((), ge=0)  # feature stages for patch descriptors; () = stride-8 and stride-16 stages
    coreset_ratio: float = rule(0.1, gt=0, le=1)
    max_bank: int = rule(20000, ge=1)
    k: int = rule(1, ge=1)
    smooth_window: int = rule(5, ge=1)
    smooth_method: str = rule("mean", choices=SMOOTH_METHODS)  # mean keeps short events; median deletes them
    threshold_method: str = rule("youden", choices=ALERT_THRESHOLD_METHODS)
    max_train_frames: int = rule(0, ge=0)  # 0 = all; else that many, in runs of 20 frames spread over the clips
    fps: float = rule(10.0, gt=0)
    # Motion stream (frame differences per patch vs normal motion), added to the appearance score per frame in
    # units of each stream's spread on normal frames; 0 = appearance only (plain PatchCore).
    motion_weight: float = rule(1.0, ge=0)


@dataclass(frozen=True)
class Recipe(_Checked):
    name: str = "imagenet"
    description: str = ""
    task: str = rule("classify", choices=TASKS)  # tlkit/tasks: classify | anomaly
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
    """A recipe name (`tlkit recipes` lists them) or a path to a YAML file."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise RecipeError(f"recipe file not found: {p}")
        return p
    recipes = available_recipes()
    if name_or_path not in recipes:
        raise RecipeError(f"unknown recipe {name_or_path!r}; available: {', '.join(recipes) or 'none'}")
    return recipes[name_or_path]


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {where}.{close[0]}?)" if close else ""
        raise RecipeError(f"unknown key(s) in {where}: {', '.join(unknown)}{hint}; known: {', '.join(known)}")
    return cls(**values)  # each section checks its values (_Checked)


@cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_value(key: str, value: Any, typ: Any, rules: typing.Mapping[str, Any]) -> Any:
    """`value` coerced to `typ` (int -> float; a YAML string like `1e-3` -> float; a list -> tuple) and held
    to `rules` (see `rule`); anything else is a one-line RecipeError naming the key, the value and what is allowed.
    """
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):  # `X | None`
        if value is None and type(None) in args:
            return None
        (typ,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    if is_dataclass(typ):  # a Recipe's section, already built and checked
        if not isinstance(value, typ):
            raise RecipeError(f"{key}={value!r} is not allowed: use a mapping of {key} fields")
        return value
    if origin is tuple:  # tuple[T, ...]: a YAML list, or one item
        items = value if isinstance(value, list | tuple) else [value]
        out = tuple(_check_item(key, v, args[0], rules, whole=value) for v in items)
        return value if out == value and isinstance(value, tuple) else out
    return _check_item(key, value, typ, rules, whole=value)


def _check_item(key: str, value: Any, typ: type, rules: typing.Mapping[str, Any], whole: Any) -> Any:
    def bad() -> RecipeError:
        return RecipeError(f"{key}={whole!r} is not allowed: use {_allowed(typ, rules, whole)}")

    if typ is bool:
        if not isinstance(value, bool):
            raise bad()
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif typ is float:
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string: accept it, in files and --set
            try:
                value = float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad()
        value = float(value)
    elif typ is str and not isinstance(value, str):
        raise bad()
    checks = {
        "ge": lambda b: value >= b,
        "gt": lambda b: value > b,
        "le": lambda b: value <= b,
        "lt": lambda b: value < b,
        "choices": lambda c: value in c,
        "pattern": lambda p: re.fullmatch(p[0], value) is not None,
    }
    if not all(check(rules[name]) for name, check in checks.items() if name in rules):
        raise bad()
    return value


def _allowed(typ: type, rules: typing.Mapping[str, Any], value: Any) -> str:
    """What a field allows, in words: 'one of cosine, step, constant', 'an integer >= 1', 'a number from 0 to 1'."""
    if "choices" in rules:
        choices = rules["choices"]
        close = difflib.get_close_matches(str(value), choices, n=1) if isinstance(value, str) else []
        text = f"one of {', '.join(choices)}" + (f" (did you mean {close[0]}?)" if close else "")
    elif "pattern" in rules:
        text = rules["pattern"][1]
    elif typ is bool:
        text = "true or false"
    elif typ is str:
        text = "a string"
    else:
        kind = "an integer" if typ is int else "a number"
        ge, gt, le, lt = (rules.get(k) for k in ("ge", "gt", "le", "lt"))
        if ge is not None and le is not None:
            text = f"{kind} from {ge:g} to {le:g}"
        else:
            bounds = [f"{op} {b:g}" for op, b in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if b is not None]
            text = " and ".join([f"{kind} {bounds[0]}", *bounds[1:]]) if bounds else kind
    return f"a list, each {text}" if isinstance(value, list | tuple) else text


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


def _check_sections(raw: dict, where: str) -> None:
    """Sections are mappings (or empty) *before* anything is merged into them: `data: 5` in a file is an error
    even when --data would replace it."""
    for key, value in raw.items():
        if key in _SECTIONS and value is not None and not isinstance(value, dict):
            raise RecipeError(
                f"{where}{key}={value!r} is not allowed: use a mapping of {key} fields (indented key: value lines)"
            )


def recipe_from_dict(raw: dict, *, cuda: bool = False) -> Recipe:
    raw = dict(raw)
    gpu = raw.pop("gpu", None) or {}
    _check_sections(raw, "")
    if cuda:
        raw = deep_merge(raw, gpu)
    top: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            if value is not None:
                top[key] = _build(_SECTIONS[key], value, key)
        else:
            top[key] = value
    return _build(Recipe, top, "recipe")


def _read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A recipe file as a dict, named after the file. `base: <recipe>` (a name, or a YAML path relative to this
    file) reads that recipe first and lays this one over it, section by section and its `gpu:` block too, so a
    variant (malaria on the medical defaults) lists only what differs."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path.name} is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path.name} must be a YAML mapping of sections")
    raw.setdefault("name", path.stem)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise RecipeError(f"base={base!r} in recipe {path.name} is not allowed: name a recipe, e.g. base: medical")
    base_path = recipe_path(str(path.parent / base) if base.endswith((".yaml", ".yml")) else base)
    if base_path.resolve() in (*seen, path.resolve()):
        raise RecipeError(f"recipe {path.name}: base: {base} leads back to itself")
    return deep_merge(_read_recipe(base_path, (*seen, path.resolve())), raw)


def recipe_base(name_or_path: str) -> str | None:
    """The `base:` a recipe file names (None without one): `tlkit demo` serves a variant with its base's app."""
    try:
        raw = yaml.safe_load(recipe_path(name_or_path).read_text()) or {}
    except yaml.YAMLError:
        return None
    base = raw.get("base") if isinstance(raw, dict) else None
    return Path(base).stem if isinstance(base, str) and base else None


def load_recipe(name_or_path: str, overrides: dict | None = None, *, cuda: bool = False) -> Recipe:
    """Load a recipe by name (`recipes/<name>.yaml`) or path, then apply nested `overrides`.

    Two optional blocks adapt a recipe to where it starts and runs: `published:` is merged when `model.init`
    names published ImageNet weights (timm:/hf-hub:/torchvision:, or a weights file that is not a tlkit
    checkpoint) — such features were learnt at ~224 px and a recipe's CPU defaults are sized for tlkit's own
    low-resolution pretrain — and `gpu:` when CUDA is present. Layering: recipe <- published <- gpu <- the user's
    options. Every block's values are checked here, even when it does not apply: a bad value fails before work."""
    path = recipe_path(name_or_path)
    raw = _read_recipe(path)
    blocks = {name: raw.pop(name, None) or {} for name in ("published", "gpu")}
    _check_sections(raw, "")
    for name, block in blocks.items():
        if not isinstance(block, dict):
            raise RecipeError(f"{name}={block!r} in recipe {path.name} is not allowed: use a mapping of sections")
        _check_sections(block, f"{name}.")
    overrides = overrides or {}
    init = (overrides.get("model") or {}).get("init") or (raw.get("model") or {}).get("init") or "scratch"
    applied = {"published": _starts_from_published_weights(str(init)) if blocks["published"] else False, "gpu": cuda}
    # Each block is checked on the recipe alone; then the blocks that apply, in order, under the user's options
    # (`--epochs 2` on a CUDA machine is 2).
    for name, block in blocks.items():
        try:
            recipe_from_dict(deep_merge(deep_merge(raw, block), overrides))
        except RecipeError as e:
            raise RecipeError(f"in the {name}: block of {path.name}: {e}") from None
    merged = raw
    for name, block in blocks.items():
        if applied[name]:
            merged = deep_merge(merged, block)
    return recipe_from_dict(deep_merge(merged, overrides))


def _starts_from_published_weights(init: str) -> bool:
    """True for published ImageNet weights (what the `published:` block is for); False for scratch, `auto` (the
    newest `tlkit pretrain` run) and tlkit checkpoints. A file is opened (memory-mapped) only to tell a tlkit
    checkpoint from a plain weights file."""
    from tlkit.models import is_published, is_scratch, is_tlkit_checkpoint  # torch: only when a recipe has the block

    if init == "auto" or is_scratch(init):
        return False
    if is_published(init):
        return True
    path = Path(init).expanduser()
    return path.is_file() and not is_tlkit_checkpoint(path)


def resolved_yaml(name_or_path: str, *, cuda: bool) -> str:
    """`tlkit recipes --show`: the recipe with every field filled in, as a run would use it, under a comment
    naming the file it came from."""
    recipe = load_recipe(name_or_path, cuda=cuda)
    block = "with" if cuda else "without"
    raw = _read_recipe(recipe_path(name_or_path))
    published = raw.get("published") if isinstance(raw.get("published"), dict) else {}
    note = f"; with published weights its published: block adds {_flat(published)}" if published else ""
    return f"# {recipe_path(name_or_path)}, {block} its gpu: block{note}\n{to_yaml(recipe)}"


def _flat(block: dict, prefix: str = "") -> str:
    """`{"data": {"img_size": 64}}` -> `data.img_size=64` (the --set spelling)."""
    items = []
    for key, value in block.items():
        if isinstance(value, dict):
            items.append(_flat(value, f"{prefix}{key}."))
        else:
            items.append(f"{prefix}{key}={value}")
    return ", ".join(items)


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
