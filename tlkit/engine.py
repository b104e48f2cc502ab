"""The one training path: recipe -> data -> model -> fit -> checkpoint -> evaluate/report.

`tlkit pretrain` and `tlkit finetune` both call `fit`; fine-tuning differs only by `model.init`
(weights to start from) and the recipe's `finetune:` block (which parameters train, and at what LR).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlkit import __version__
from tlkit.checkpoint import CheckpointError, load_tlkit_checkpoint, save_checkpoint
from tlkit.config import Recipe, to_dict, to_yaml
from tlkit.data.loader import build_datasets, class_weights, make_loader
from tlkit.data.transforms import Preprocessing, norm_tensors, normalize, preprocessing_for, train_transform
from tlkit.distributed import (
    DistInfo,
    all_gather_cat,
    all_gather_object,
    all_reduce_sum,
    broadcast_object,
    broadcast_tensors,
    init_distributed,
)
from tlkit.models import build_model
from tlkit.optim import ModelEma, build_optimizer, build_scheduler
from tlkit.paths import git_sha, runs_dir
from tlkit.progress import Progress, console
from tlkit.transfer import Strategy

log = logging.getLogger("tlkit.engine")


# ---- device and precision ----------------------------------------------------------------------------


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
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


def autocast_for(device: torch.device, amp: str):
    """bf16 autocast on CUDA by default: no loss scaling needed, unlike fp16."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "python": random.getstate()[1][:625],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# ---- one epoch ------------------------------------------------------------------------------------------


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


def mix_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    mixup: float,
    cutmix: float,
    smoothing: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix (one of them per batch, chosen at random) -> images and soft targets."""
    soft = F.one_hot(targets, num_classes).float() * (1 - smoothing) + smoothing / num_classes
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(1, generator=generator).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator))).beta(alpha, alpha))
    perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
    if use_cutmix:
        h, w = images.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = (
            int(torch.randint(h, (1,), generator=generator)),
            int(torch.randint(w, (1,), generator=generator)),
        )
        y1, y2, x1, x2 = (
            max(cy - ch // 2, 0),
            min(cy + ch // 2, h),
            max(cx - cw // 2, 0),
            min(cx + cw // 2, w),
        )
        images = images.clone()
        images[:, :, y1:y2, x1:x2] = images[perm][:, :, y1:y2, x1:x2]
        lam = 1 - (y2 - y1) * (x2 - x1) / (h * w)
    else:
        images = images * lam + images[perm] * (1 - lam)
    return images, soft * lam + soft[perm] * (1 - lam)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    criterion: nn.Module,
    ctx: StepContext,
    *,
    epoch: int,
    recipe: Recipe,
    ema: ModelEma | None = None,
    start_step: int = 0,
    on_step=None,
    progress: Progress | None = None,
    strategy: Strategy | None = None,
    partial: dict | None = None,
) -> dict:
    """One pass over `loader`. Loss is accumulated on the device: no host sync per step.

    `partial`: the epoch's sums so far (all ranks) from a mid-epoch checkpoint, so a resumed epoch
    reports the same train_loss as an uninterrupted one; rank 0 carries them."""
    model.train()
    if strategy is not None:
        strategy.freeze_norm_stats()
    optim_cfg, seed = recipe.optim, recipe.train.seed
    accum = max(1, optim_cfg.accum_steps)
    num_classes = recipe_num_classes(model)
    generator = torch.Generator()
    carried = (partial or {}) if ctx.info.is_main else {}
    loss_sum = torch.full((), float(carried.get("loss_sum", 0.0)), device=ctx.device)
    seen0 = int(carried.get("seen", 0))
    seen, skipped, step = seen0, int(carried.get("skipped", 0)), start_step
    t0 = time.perf_counter()
    task = progress.add(f"epoch {epoch}", total=len(loader) + start_step, completed=start_step) if progress else None
    for i, (images, targets, failed) in enumerate(loader, start=start_step):
        generator.manual_seed(seed * 1_000_003 + epoch * 10_007 + i)  # mixup draws replay on resume
        images = ctx.prepare(images)
        targets = targets.to(ctx.device, non_blocking=True)
        if optim_cfg.mixup > 0 or optim_cfg.cutmix > 0:
            images, soft = mix_batch(
                images,
                targets,
                num_classes,
                optim_cfg.mixup,
                optim_cfg.cutmix,
                optim_cfg.label_smoothing,
                generator,
            )
        else:
            soft = targets
        with autocast_for(ctx.device, ctx.amp):
            logits = model(images)
            loss = criterion(logits.float(), soft)
        (loss / accum).backward()
        if (i + 1) % accum == 0 or i + 1 == len(loader) + start_step:
            if optim_cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update(unwrap(model))
        loss_sum += loss.detach() * images.shape[0]
        seen += images.shape[0]
        skipped += int(failed.sum())
        step = i + 1
        if progress is not None and (i % 10 == 0 or step == len(loader) + start_step):
            elapsed = time.perf_counter() - t0
            progress.update(
                task,
                completed=step,
                loss=float(loss.detach()),
                lr=optimizer.param_groups[0]["lr"],
                ips=(seen - seen0) * ctx.info.world / max(elapsed, 1e-9),
            )
        if on_step is not None:
            on_step(step, loss_sum, seen, skipped)
    seconds = time.perf_counter() - t0
    totals = all_reduce_sum(
        torch.stack(
            [
                loss_sum.double(),
                torch.tensor(float(seen), device=ctx.device).double(),
                torch.tensor(float(skipped), device=ctx.device).double(),
            ]
        ),
        ctx.info,
    )
    if progress is not None and task is not None:
        progress.remove(task)
    total_seen = float(totals[1])
    resumed_seen = float((partial or {}).get("seen", 0))  # the same global count on every rank
    return {
        "train_loss": float(totals[0]) / max(total_seen, 1),
        "img_per_s": (total_seen - resumed_seen) / max(seconds, 1e-9),
        "train_seconds": seconds,
        "skipped": int(totals[2]),
    }


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader, ctx: StepContext, *, tta_flip: bool = False, progress: Progress | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(logits, targets, skipped) over the whole loader, gathered from every rank, on the CPU."""
    model.eval()
    all_logits, all_targets, skipped = [], [], 0
    task = progress.add("eval", total=len(loader)) if progress else None
    for images, targets, failed in loader:
        images = ctx.prepare(images)
        with autocast_for(ctx.device, ctx.amp):
            logits = model(images).float()
            if tta_flip:
                logits = (logits + model(torch.flip(images, dims=[3])).float()) / 2
        all_logits.append(logits)
        all_targets.append(targets.to(ctx.device))
        skipped += int(failed.sum())
        if progress is not None:
            progress.advance(task)
    if progress is not None and task is not None:
        progress.remove(task)
    logits = all_gather_cat(torch.cat(all_logits), ctx.info).cpu()
    targets = all_gather_cat(torch.cat(all_targets), ctx.info).cpu()
    skipped = int(all_reduce_sum(torch.tensor(float(skipped), device=ctx.device), ctx.info))
    return logits, targets, skipped


def topk_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    correct = top.eq(targets[:, None])
    return {
        "val_loss": float(F.cross_entropy(logits, targets)),
        # counted in Python: 15 of 50 right is 30.0, not float32's 30.000001907348633
        "val_top1": int(correct[:, 0].sum()) * 100 / max(1, len(targets)),
        "val_top5": int(correct.any(dim=1).sum()) * 100 / max(1, len(targets)),
    }


def evaluate(
    model: nn.Module, loader, ctx: StepContext, *, tta_flip: bool = False, progress: Progress | None = None
) -> dict:
    logits, targets, skipped = predict_logits(model, loader, ctx, tta_flip=tta_flip, progress=progress)
    return {**topk_metrics(logits, targets), "val_skipped": skipped}


# ---- helpers ----------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def recipe_num_classes(model: nn.Module) -> int:
    return unwrap(model).num_classes


def model_for_recipe(recipe: Recipe, num_classes: int, device: torch.device) -> tuple[nn.Module, dict]:
    """The recipe's model with its init weights, on `device`, channels_last if asked (fit and lr-find)."""
    m = recipe.model
    model, info = build_model(m.arch, num_classes, init=m.init, drop_rate=m.drop_rate, drop_path_rate=m.drop_path_rate)
    model.to(device)
    if m.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, info


def run_name(recipe: Recipe, kind: str) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    label = kind if kind == "pretrain" else f"{kind}-{recipe.name}"
    return f"{label}-{recipe.model.arch}-{stamp}"


def scaled_lr(recipe: Recipe, world: int) -> float:
    """Recipe LRs are for a global batch of 256 (Goyal et al.); scale linearly with the real batch."""
    batch = recipe.train.batch_size * world * max(1, recipe.optim.accum_steps)
    return recipe.optim.lr * batch / 256


# ---- the run ----------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    run_dir: Path
    best_path: Path
    last_path: Path
    best_top1: float
    history: list[dict]
    classes: list[str]
    skipped: int
    extras: dict = field(default_factory=dict)


def resolve_resume(resume: str | Path) -> tuple[Path, dict]:
    path = Path(resume)
    ckpt_path = path / "last.pt" if path.is_dir() else path
    if not ckpt_path.is_file():
        raise CheckpointError(f"nothing to resume in {resume}: no last.pt")
    return ckpt_path, load_tlkit_checkpoint(ckpt_path)


def make_criterion(recipe: Recipe, targets: np.ndarray, num_classes: int, device: torch.device) -> nn.Module:
    """Cross-entropy with the recipe's label smoothing; inverse-frequency class weights for `weighted-ce`."""
    weight = None
    if recipe.optim.loss == "weighted-ce":
        weight = torch.tensor(class_weights(targets, num_classes), dtype=torch.float32, device=device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=recipe.optim.label_smoothing)


def fit(recipe: Recipe, *, kind: str = "pretrain", resume: str | Path | None = None, quiet: bool = False) -> RunResult:
    """Train `recipe` end to end and return where the checkpoints are."""
    resumed = None
    if resume:
        ckpt_path, resumed = resolve_resume(resume)
        # The caller passes the run's own recipe (see `workflows.resume_recipe`), plus what the user changed.
        kind = resumed.get("kind", kind)

    # device and processes
    device_type = (
        "cuda"
        if recipe.train.device.startswith("cuda") or (recipe.train.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    info = init_distributed(device_type)
    device = resolve_device(recipe.train.device, info)
    seed_everything(recipe.train.seed + info.rank)

    # run folder (rank 0 names it; everyone agrees)
    if resumed:
        run_dir = ckpt_path.parent
    else:
        name = recipe.train.out or str(runs_dir() / run_name(recipe, kind))
        run_dir = Path(broadcast_object(name, info))

    # data first: the class list sizes the head; preprocessing comes from the weights when they carry it
    pre = (
        Preprocessing.from_dict(resumed["preprocessing"])
        if resumed
        else preprocessing_for(recipe.model.arch, recipe.data, init=recipe.model.init)
    )
    data = build_datasets(recipe, pre, class_ids=resumed["class_ids"] if resumed else None)
    model, init_info = model_for_recipe(recipe, len(data.class_ids), device)
    if info.is_main:  # only now: a bad --data or --init leaves no empty run folder behind
        run_dir.mkdir(parents=True, exist_ok=True)

    # what trains, at which LR
    strategy = Strategy(model, recipe.finetune) if recipe.finetune else None
    lr = scaled_lr(recipe, info.world)
    optimizer = build_optimizer(
        model,
        recipe.optim,
        lr,
        device_type=device.type,
        lr_mults=strategy.lr_multipliers() if strategy else None,
    )
    train_loader = make_loader(
        data.train,
        recipe.data,
        batch_size=recipe.train.batch_size,
        train=True,
        seed=recipe.train.seed,
        rank=info.rank,
        world=info.world,
        pin_memory=device.type == "cuda",
    )
    val_loader = (
        make_loader(
            data.val,
            recipe.data,
            batch_size=recipe.train.batch_size,
            train=False,
            seed=recipe.train.seed,
            rank=info.rank,
            world=info.world,
            pin_memory=device.type == "cuda",
        )
        if data.val
        else None
    )
    steps_per_epoch = math.ceil(len(train_loader) / max(1, recipe.optim.accum_steps))
    scheduler = build_scheduler(optimizer, recipe.optim, epochs=recipe.train.epochs, steps_per_epoch=steps_per_epoch)
    ema = ModelEma(model, recipe.optim.ema_decay) if recipe.optim.ema_decay > 0 else None
    criterion = make_criterion(recipe, data.train.targets(), len(data.class_ids), device)
    eval_criterion_ctx = StepContext(
        device,
        *norm_tensors(pre, device),
        amp=recipe.train.amp,
        channels_last=recipe.model.channels_last,
        info=info,
    )

    # resume state
    start_epoch, start_step, best_top1, history = 1, 0, -1.0, []
    if resumed:
        unwrap(model).load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if ema is not None and resumed.get("ema"):
            ema.load_state_dict(resumed["ema"])
        start_epoch, start_step = resumed["epoch"], resumed.get("step_in_epoch", 0)
        if start_step == 0:
            start_epoch += 1
        best_top1 = resumed.get("best_top1", -1.0)
        history = list(resumed.get("history", []))
        if info.world == 1 and resumed.get("world_size", 1) == 1 and resumed.get("rng"):
            torch.set_rng_state(resumed["rng"]["torch"])  # dropout / drop-path draws continue as before

    compiled: nn.Module = torch.compile(model) if recipe.model.compile and device.type == "cuda" else model

    def wrap() -> nn.Module:
        # DDP reduces exactly the parameters that require grad when it is built, so it is (re)built after
        # the strategy sets them: at the run's first epoch, and when freeze-unfreeze unfreezes the body.
        if not info.enabled:
            return compiled
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None)

    train_model = compiled  # wrapped at the first epoch of this run, below

    meta = {
        "format": "tlkit",
        "version": 1,
        "tlkit_version": __version__,
        "git_sha": git_sha(),
        "kind": kind,
        "task": recipe.task,
        "arch": recipe.model.arch,
        "classes": data.classes,
        "class_ids": data.class_ids,
        "preprocessing": pre.to_dict(),
        "recipe": to_dict(recipe),
        "data_root": data.root,
        "init": init_info.get("init", "scratch"),
        "world_size": info.world,
    }
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    writer = _Writers(run_dir, recipe, meta, enabled=info.is_main, history=history)
    progress = Progress(enabled=info.is_main and not quiet)
    total_skipped = 0

    def checkpoint(epoch: int, step_in_epoch: int, path: Path, extra: dict | None = None) -> None:
        if not info.is_main:
            return
        state = {
            **meta,
            "model": unwrap(model).state_dict(),
            "ema": ema.state_dict() if ema else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "best_top1": best_top1,
            "history": history,
            "rng": rng_state(),
            "saved_at": datetime.now().isoformat(timespec="seconds"),
            **(extra or {}),
        }
        save_checkpoint(state, path)

    with progress:
        for epoch in range(start_epoch, recipe.train.epochs + 1):
            t_epoch = time.perf_counter()
            changed = strategy is not None and strategy.on_epoch_start(epoch, console=console if info.is_main else None)
            if changed or epoch == start_epoch:
                train_model = wrap()
            data.train.set_epoch(epoch)
            train_loader.sampler.set_epoch(epoch)
            size = _progressive_size(recipe, epoch)
            if recipe.train.progressive_min_size > 0:  # also back to full size once the ramp ends
                data.train.transform = train_transform(recipe.data, img_size=size)
            step0 = start_step if epoch == start_epoch else 0
            train_loader.sampler.start = step0 * recipe.train.batch_size
            on_step = None
            if recipe.train.save_every_steps > 0:

                def on_step(step, loss_sum, seen, skipped, _epoch=epoch, _end=len(train_loader) + step0):
                    if step % recipe.train.save_every_steps == 0 and step < _end:
                        sums = all_reduce_sum(
                            torch.tensor(
                                [float(loss_sum), float(seen), float(skipped)], dtype=torch.float64, device=device
                            ),
                            info,
                        )
                        partial = {"loss_sum": float(sums[0]), "seen": int(sums[1]), "skipped": int(sums[2])}
                        checkpoint(_epoch, step, last_path, extra={"partial": partial})

            stats = train_one_epoch(
                train_model,
                train_loader,
                optimizer,
                scheduler,
                criterion,
                eval_criterion_ctx,
                epoch=epoch,
                recipe=recipe,
                ema=ema,
                start_step=step0,
                on_step=on_step,
                progress=progress,
                strategy=strategy,
                partial=resumed.get("partial") if resumed and step0 else None,
            )
            train_loader.sampler.start = 0
            # DDP hands rank 0's buffers to every rank at each forward, so a rank's own BatchNorm statistics never
            # reach training, but they are what it evaluates with: all ranks take rank 0's, the ones saved. The
            # same for the EMA, which each rank started from its own init (seeded per rank) and updates with its
            # own BatchNorm statistics: validation on every rank uses what rank 0 saves.
            broadcast_tensors([*unwrap(model).buffers(), *(ema.shadow.values() if ema else ())], info)
            total_skipped += stats["skipped"]
            row = {
                "epoch": epoch,
                "train_loss": stats["train_loss"],
                "lr": optimizer.param_groups[0]["lr"],
                "img_per_s": stats["img_per_s"],
            }
            if val_loader is not None and (epoch % recipe.train.eval_every == 0 or epoch == recipe.train.epochs):
                eval_model = _ema_model(model, ema) if ema else model
                row.update(
                    evaluate(
                        eval_model,
                        val_loader,
                        eval_criterion_ctx,
                        tta_flip=recipe.train.tta_flip,
                        progress=progress,
                    )
                )
            row["skipped"] = stats["skipped"]
            row["seconds"] = time.perf_counter() - t_epoch
            history.append(row)
            is_best = row.get("val_top1", -1.0) > best_top1 or val_loader is None
            if is_best:
                best_top1 = row.get("val_top1", best_top1)
            checkpoint(epoch, 0, last_path)
            if is_best and info.is_main:
                checkpoint(epoch, 0, best_path)
            writer.epoch(row)
            if info.is_main:
                console.print(_epoch_line(row))

    total_skipped = sum(int(row.get("skipped", 0)) for row in history)  # epochs before a resume too
    digests = all_gather_object(state_digest(unwrap(model).state_dict()), info)
    in_sync = len(set(digests)) == 1
    writer.close(history)
    result = RunResult(
        run_dir,
        best_path,
        last_path,
        best_top1,
        history,
        data.classes,
        total_skipped,
        extras={
            "ranks_in_sync": in_sync,
            "weights_sha256": digests,
            "world_size": info.world,
            "init": init_info,
            "bundle": data,
            "pre": pre,
            "ctx": eval_criterion_ctx,
            "val_loader": val_loader,
        },
    )
    if info.is_main:
        summary = {
            "run_dir": str(run_dir),
            "best": str(best_path),
            "best_top1": best_top1,
            "epochs": len(history),
            "skipped_images": total_skipped,
            "world_size": info.world,
            "ranks_in_sync": in_sync,
            # each rank's final weights and buffers (`state_digest`): equal to the digest of last.pt's `model`
            "weights_sha256": digests,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if total_skipped:
            console.print(f"[yellow]{total_skipped} unreadable image(s) were skipped (named in the log above)")
    return result


def _ema_model(model: nn.Module, ema: ModelEma) -> nn.Module:
    import copy

    shadow = copy.deepcopy(unwrap(model))
    shadow.load_state_dict({k: v.to(dtype=shadow.state_dict()[k].dtype) for k, v in ema.state_dict().items()})
    return shadow


def _progressive_size(recipe: Recipe, epoch: int) -> int:
    """FFCV-style progressive resizing: a linear ramp from `progressive_min_size` up to `img_size`."""
    t = recipe.train
    full = recipe.data.img_size
    if t.progressive_min_size <= 0 or t.progressive_min_size >= full:
        return full
    end = t.progressive_end_epoch or max(1, int(0.85 * t.epochs))
    frac = min(1.0, (epoch - 1) / max(1, end - 1))
    size = t.progressive_min_size + frac * (full - t.progressive_min_size)
    return min(full, int(round(size / 8)) * 8 or 8)  # multiples of 8 keep strided stages aligned


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: each key, then its tensor's bytes in logical (contiguous) order. Every rank of a
    DDP run reports its own at the end (`summary.json: weights_sha256`); in sync, they all equal last.pt's."""
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _epoch_line(row: dict) -> str:
    parts = [f"Epoch {row['epoch']}", f"train_loss {row['train_loss']:.4f}"]
    for key in ("val_loss", "val_top1", "val_top5"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}" if key == "val_loss" else f"{key} {row[key]:.2f}")
    parts += [f"lr {row['lr']:.4g}", f"img/s {row['img_per_s']:.0f}", f"{row['seconds']:.0f}s"]
    return ", ".join(parts)


class _Writers:
    """Rank-0 side effects of a run: config.yaml, metrics.jsonl, TensorBoard, curves PNG."""

    def __init__(self, run_dir: Path, recipe: Recipe, meta: dict, *, enabled: bool, history: list[dict]):
        self.enabled, self.run_dir, self.tb = enabled, run_dir, None
        if not enabled:
            return
        header = f"# tlkit {meta['tlkit_version']}  git {meta['git_sha'] or 'unknown'}  seed {recipe.train.seed}\n"
        (run_dir / "config.yaml").write_text(header + to_yaml(recipe))
        # A resumed run rewrites the rows its checkpoint knows: a kill between saving last.pt and
        # appending the epoch's row (or after appending it) then neither loses nor repeats a row.
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:  # tensorboard is optional on lean GPU images
            self.tb = None

    def epoch(self, row: dict) -> None:
        if not self.enabled:
            return
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, row["epoch"])
            self.tb.flush()

    def close(self, history: list[dict]) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        try:
            from tlkit.report import plot_training_curves

            plot_training_curves(self.run_dir / "metrics.jsonl", self.run_dir / "training_curves.png")
        except ImportError:
            pass
