"""One run setup for everything that trains: `build_run(recipe) -> Run`.

`engine.fit`, `lr_finder.run_lr_find` and the benchmarks all build their device, processes, data, model,
transfer strategy, optimizer, schedule, loss and step context here, so what lr-find sweeps and what the
benchmarks time is the run a user launches. Read top-down: device and seeds, the step context, the pieces
(model, loss, LR, resume file), the data, then `build_run`, which puts them together in one fixed order.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tlkit.checkpoint import load_tlkit_checkpoint, resolve_checkpoint
from tlkit.config import Recipe
from tlkit.data.loader import DataBundle, build_datasets, class_weights, make_loader
from tlkit.data.transforms import Preprocessing, norm_tensors, normalize, preprocessing_for
from tlkit.distributed import DistInfo, init_distributed
from tlkit.models import build_model, create_model, is_scratch
from tlkit.optim import ModelEma, build_optimizer, build_scheduler
from tlkit.transfer import Strategy, reinit_deepest_stages

log = logging.getLogger("tlkit.run")

# ---- device, precision and seeds --------------------------------------------------------------------------


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """`auto` -> CUDA when visible; under DDP each process takes its local GPU. On CUDA, cuDNN autotuning
    and TF32 matmuls are switched on for the whole process."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and info is not None and info.enabled:
        name = f"cuda:{info.local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but no CUDA GPU is visible")
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast_for(device: torch.device, amp: str) -> AbstractContextManager:
    """bf16 autocast on CUDA by default: no loss scaling needed, unlike fp16."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The generators' state, saved in every checkpoint (a resumed run restores torch's: see `_restore`)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "python": random.getstate()[1][:625],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@dataclass
class StepContext:
    """What a train/eval step needs besides the model and the batch."""

    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor
    amp: str = "auto"
    channels_last: bool = True
    info: DistInfo = field(default_factory=DistInfo)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return normalize(images, self.mean, self.std)


# ---- the pieces ----------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def model_for_recipe(recipe: Recipe, num_classes: int, device: torch.device) -> tuple[nn.Module, dict]:
    """The recipe's model with its init weights, on `device`, channels_last if asked."""
    m = recipe.model
    model, info = build_model(
        m.arch,
        num_classes,
        init=m.init,
        drop_rate=m.drop_rate,
        drop_path_rate=m.drop_path_rate,
        img_size=recipe.data.img_size,  # used only by models with a fixed input size (ViT, Swin)
    )
    reinit = recipe.finetune.reinit_stages if recipe.finetune and not is_scratch(m.init) else 0
    if reinit and recipe.finetune.strategy == "linear-probe":  # a frozen body would keep random stages
        log.info("finetune.reinit_stages %d not applied: linear-probe trains only the head", reinit)
    elif reinit:
        with torch.random.fork_rng(devices=[]):  # a fresh init from the run's seed; the global RNG stays as it was
            torch.manual_seed(recipe.train.seed)
            fresh = create_model(m.arch, num_classes, img_size=recipe.data.img_size)
        info["reinit"] = reinit_deepest_stages(model, fresh, reinit)
        log.info("re-initialised the deepest %d body stage(s): %s", reinit, ", ".join(info["reinit"]))
    model.to(device)
    if m.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, info


def make_criterion(recipe: Recipe, targets: np.ndarray, num_classes: int, device: torch.device) -> nn.Module:
    """Cross-entropy with the recipe's label smoothing; inverse-frequency class weights for `weighted-ce`."""
    weight = None
    if recipe.optim.loss == "weighted-ce":
        weight = torch.tensor(class_weights(targets, num_classes), dtype=torch.float32, device=device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=recipe.optim.label_smoothing)


def scaled_lr(recipe: Recipe, world: int) -> float:
    """Recipe LRs are for a global batch of 256 (Goyal et al.); scale linearly with the real batch."""
    batch = recipe.train.batch_size * world * max(1, recipe.optim.accum_steps)
    return recipe.optim.lr * batch / 256


def resolve_resume(resume: str | Path) -> tuple[Path, dict]:
    """The checkpoint `--resume` names (a run folder means its last.pt), loaded."""
    path = resolve_checkpoint(resume, resume=True)
    return path, load_tlkit_checkpoint(path)


# ---- the data ------------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """What feeds a run: the datasets (class list, data root) and a loader for each split. A loader yields
    `(uint8 images, targets, failed)` batches and has `len()` and an `EpochSampler` as `.sampler`
    (`set_epoch`, `start`): a DataLoader, or one of the device-side loaders of `tlkit.data.packed`."""

    bundle: DataBundle
    train_loader: Iterable
    val_loader: Iterable | None
    loader: str = "cpu"  # which data path feeds it: cpu | packed | gpu | jpeg (`data.loader`)


def recipe_data(
    recipe: Recipe, pre: Preprocessing, info: DistInfo, device: torch.device, class_ids: list[str] | None = None
) -> RunData:
    """The recipe's data on the path `data.loader` picks (`data_path.resolve_loader`): packs or JPEGs cropped
    on the device, or image folders decoded and augmented in DataLoader workers; sharded over the ranks."""
    from tlkit.data.data_path import fast_run_data, resolve_loader

    choice = resolve_loader(recipe.data, device)
    if choice.kind != "cpu":
        data = RunData(*fast_run_data(recipe, choice, info, device, class_ids), loader=choice.kind)
        _say_loader(choice, info)
        return data
    bundle = build_datasets(recipe, pre, class_ids=class_ids)
    _say_loader(choice, info)  # once the data is found: a bad --data gets its error line alone
    common = dict(
        batch_size=recipe.train.batch_size,
        seed=recipe.train.seed,
        rank=info.rank,
        world=info.world,
        pin_memory=device.type == "cuda",
    )
    train_loader = make_loader(bundle.train, recipe.data, train=True, **common)
    val_loader = make_loader(bundle.val, recipe.data, train=False, **common) if bundle.val else None
    return RunData(bundle, train_loader, val_loader)


def _say_loader(choice, info: DistInfo) -> None:
    if info.is_main:
        from tlkit.progress import console

        console.print(f"data loader: {choice.kind} ({choice.reason})")


# ---- the run ---------------------------------------------------------------------------------------------------


@dataclass
class RunState:
    """Where training starts (epoch 1, or where a resumed checkpoint stopped) and what it has done so far.
    `fit` appends to `history` and sets `best_top1`, the val top-1 (a fraction; -1 before any evaluation) of the
    epoch best.pt holds (`engine.best_row` of `history`)."""

    start_epoch: int = 1
    start_step: int = 0  # batches of `start_epoch` already trained (a mid-epoch checkpoint)
    best_top1: float = -1.0
    history: list[dict] = field(default_factory=list)
    partial: dict | None = None  # the interrupted epoch's loss sums so far (see `engine.train_one_epoch`)


@dataclass
class Run:
    """Everything a training run is made of, built by `build_run`."""

    recipe: Recipe
    kind: str
    info: DistInfo
    device: torch.device
    pre: Preprocessing
    data: RunData
    model: nn.Module  # the plain module: what checkpoints save and validation runs
    init_info: dict
    strategy: Strategy | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: ModelEma | None
    criterion: nn.Module
    ctx: StepContext
    compiled: nn.Module  # what trains: `model`, through torch.compile when the recipe asks (CUDA only)
    state: RunState
    resumed_from: Path | None = None


def build_run(
    recipe: Recipe, *, kind: str = "pretrain", resume: str | Path | None = None, data: RunData | None = None
) -> Run:
    """Device and processes, seeds, data, model, strategy, optimizer, schedule, EMA, loss, step context,
    and with `resume` the checkpoint's state loaded into them. The order is part of the behaviour: the model
    is initialised from the seeded generator, so a change in what draws before it changes every weight.

    `data`: loaders made by the caller (the benchmarks' device-side loaders); default `recipe_data`."""
    resumed_from, resumed = resolve_resume(resume) if resume else (None, None)
    if resumed:
        # The caller passes the run's own recipe (see `workflows.resume_recipe`), plus what the user changed.
        check_resumable(recipe, resumed, resumed_from)
        kind = resumed.get("kind", kind)
    info = init_distributed(_device_type(recipe.train.device))
    device = resolve_device(recipe.train.device, info)
    seed_everything(recipe.train.seed + info.rank)

    # data first: the class list sizes the head; preprocessing comes from the weights when they carry it
    if resumed:
        pre = Preprocessing.from_dict(resumed["preprocessing"])
    else:
        pre = preprocessing_for(recipe.model.arch, recipe.data, init=recipe.model.init)
    if data is None:
        data = recipe_data(recipe, pre, info, device, class_ids=resumed["class_ids"] if resumed else None)
    num_classes = len(data.bundle.class_ids)
    model, init_info = model_for_recipe(recipe, num_classes, device)

    # what trains, at which LR
    strategy = Strategy(model, recipe.finetune) if recipe.finetune else None
    optimizer = build_optimizer(
        model,
        recipe.optim,
        scaled_lr(recipe, info.world),
        device_type=device.type,
        lr_mults=strategy.lr_multipliers() if strategy else None,
    )
    steps_per_epoch = math.ceil(len(data.train_loader) / max(1, recipe.optim.accum_steps))
    scheduler = build_scheduler(optimizer, recipe.optim, epochs=recipe.train.epochs, steps_per_epoch=steps_per_epoch)
    ema = ModelEma(model, recipe.optim.ema_decay) if recipe.optim.ema_decay > 0 else None
    criterion = make_criterion(recipe, data.bundle.train.targets(), num_classes, device)
    ctx = StepContext(
        device, *norm_tensors(pre, device), amp=recipe.train.amp, channels_last=recipe.model.channels_last, info=info
    )
    run = Run(
        recipe=recipe,
        kind=kind,
        info=info,
        device=device,
        pre=pre,
        data=data,
        model=model,
        init_info=init_info,
        strategy=strategy,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        criterion=criterion,
        ctx=ctx,
        compiled=model,
        state=RunState(),
        resumed_from=resumed_from,
    )
    if resumed:
        _restore(run, resumed)
    if recipe.model.compile and device.type == "cuda":
        run.compiled = torch.compile(model, dynamic=False)  # progressive sizes: one static graph per size
    return run


def _device_type(name: str) -> str:
    """The kind of device the processes will use, before any is chosen (it picks the DDP backend)."""
    return "cuda" if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()) else "cpu"


# What a resumed run must keep from its checkpoint: the model, the data it sees, and the optimizer state's shape.
# Anything else (more --epochs, another --device, num_workers) may change; these need a new run with --init.
RESUME_FIXED = (
    ("task",),
    ("model", "arch"),
    ("data", "img_size"),
    ("data", "grayscale"),
    ("data", "crop_mode"),
    ("data", "roi_crop"),
    ("data", "layout"),
    ("data", "max_classes"),
    ("train", "batch_size"),
    ("optim", "name"),
    ("optim", "accum_steps"),
    ("finetune", "strategy"),
)


def check_resumable(recipe: Recipe, ckpt: dict, path: Path) -> None:
    """One line when the recipe to continue differs from the checkpoint's in what the weights, the optimizer
    state or the position in the data depend on (e.g. `--resume run --arch resnet50`)."""
    from tlkit.checkpoint import CheckpointError
    from tlkit.config import to_dict

    now, then = to_dict(recipe), ckpt.get("recipe") or {}
    model = {**(then.get("model") or {}), "arch": ckpt["arch"]}
    then = {**then, "task": ckpt.get("task", then.get("task")), "model": model}
    for keys in RESUME_FIXED:
        old, new = then, now
        for key in keys:
            old = old.get(key) if isinstance(old, dict) else None
            new = new.get(key) if isinstance(new, dict) else None
        if old is not None and new is not None and old != new:
            name = ".".join(keys)
            raise CheckpointError(
                f"cannot resume {path}: it was trained with {name}={old}, not {new}; resume without changing "
                f"{name}, or start a new run from it with --init {path.parent / 'best.pt'}"
            )


def _restore(run: Run, ckpt: dict) -> None:
    """Continue from a checkpoint: weights, optimizer, schedule, EMA, position, history, torch's generator."""
    from tlkit.checkpoint import CheckpointError

    try:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        if run.ema is not None and ckpt.get("ema"):
            run.ema.load_state_dict(ckpt["ema"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # a checkpoint edited or made by another recipe
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__)[:200]
        raise CheckpointError(f"cannot resume {run.resumed_from}: its state does not fit this run ({detail})") from None
    if run.ema is not None:
        # old checkpoints have no count: the optimizer steps taken (one EMA update each) stand in for it
        run.ema.updates = int(ckpt.get("ema_updates", run.scheduler.last_epoch))
    start_epoch, start_step = ckpt["epoch"], ckpt.get("step_in_epoch", 0)
    run.state = RunState(
        start_epoch=start_epoch if start_step else start_epoch + 1,  # an epoch-end checkpoint: the next epoch
        start_step=start_step,
        best_top1=ckpt.get("best_top1", -1.0),
        history=list(ckpt.get("history", [])),
        partial=ckpt.get("partial") if start_step else None,
    )
    if run.info.world == 1 and ckpt.get("world_size", 1) == 1 and ckpt.get("rng"):
        torch.set_rng_state(ckpt["rng"]["torch"])  # dropout / drop-path draws continue as before


def distributed_model(run: Run) -> nn.Module:
    """What a training epoch calls: the compiled model, in DDP when there are several processes. DDP reduces
    exactly the parameters that require grad when it is built, so `fit` builds it again whenever the
    strategy changes them (freeze-unfreeze unfreezing the body), and at the first epoch of a run."""
    if not run.info.enabled:
        return run.compiled
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(run.compiled, device_ids=[run.device.index] if run.device.type == "cuda" else None)
