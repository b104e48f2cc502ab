"""The one training path: `fit` = setup (`run.build_run`), a loop of `train_one_epoch` / `evaluate`, save.

`tlkit pretrain` and `tlkit finetune` both call `fit`; fine-tuning differs only by `model.init`
(weights to start from) and the recipe's `finetune:` block (which parameters train, and at what LR).
Every optimizer step of fit, of lr-find and of the benchmarks is `train_step`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlkit.checkpoint import BEST, LAST, disk_full_names, non_finite_weights, save_checkpoint, state_digest
from tlkit.config import OptimConfig, Recipe
from tlkit.data.transforms import train_transform
from tlkit.distributed import all_gather_cat, all_gather_object, all_reduce_sum, broadcast_tensors
from tlkit.optim import ModelEma, recipe_lr
from tlkit.progress import Progress, console
from tlkit.run import Run, StepContext, autocast_for, build_run, distributed_model, unwrap
from tlkit.run_folder import (
    RunWriters,
    checkpoint_meta,
    discard_unfinished,
    epoch_line,
    open_run_dir,
    training_state,
)
from tlkit.transfer import Strategy

# ---- one step ---------------------------------------------------------------------------------------------------


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


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: StepContext,
    optim: OptimConfig,
    *,
    generator: torch.Generator,
    update: bool = True,
) -> torch.Tensor:
    """One batch: normalise on the device, Mixup/CutMix when the recipe asks (drawing from `generator`),
    forward under autocast, backward of loss / accum_steps. `update`: this batch closes an accumulation
    window, so clip, step the optimizer and clear the gradients (the LR schedule and EMA are the caller's).
    Returns the batch's mean loss, detached and on the device: reading it is the caller's host sync."""
    images = ctx.prepare(images)
    targets = targets.to(ctx.device, non_blocking=True)
    soft = targets
    if optim.mixup > 0 or optim.cutmix > 0:
        num_classes = unwrap(model).num_classes
        # smoothing 0 here: the criterion smooths soft targets too, so smoothing in both would apply ε twice
        images, soft = mix_batch(images, targets, num_classes, optim.mixup, optim.cutmix, 0.0, generator)
    with autocast_for(ctx.device, ctx.amp):
        loss = criterion(model(images).float(), soft)
    (loss / max(1, optim.accum_steps)).backward()
    if update:
        if optim.clip_grad > 0:
            nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ---- one epoch ------------------------------------------------------------------------------------------------


def progressive_size(recipe: Recipe, epoch: int) -> int:
    """FFCV-style progressive resizing: a linear ramp from `progressive_min_size` up to `img_size`."""
    t = recipe.train
    full = recipe.data.img_size
    if t.progressive_min_size <= 0 or t.progressive_min_size >= full:
        return full
    end = t.progressive_end_epoch or max(1, int(0.85 * t.epochs))
    frac = min(1.0, (epoch - 1) / max(1, end - 1))
    size = t.progressive_min_size + frac * (full - t.progressive_min_size)
    return min(full, int(round(size / 8)) * 8 or 8)  # multiples of 8 keep strided stages aligned


def prepare_epoch(run: Run, epoch: int, start_step: int = 0) -> int:
    """Point the train data at `epoch`: its shuffle and augmentation seeds, its image size (progressive
    resizing), its first batch (`start_step` > 0: a resumed epoch skips what it trained). Returns the size."""
    recipe, dataset, loader = run.recipe, run.data.bundle.train, run.data.train_loader
    dataset.set_epoch(epoch)
    loader.sampler.set_epoch(epoch)
    size = progressive_size(recipe, epoch)
    if hasattr(loader, "set_size"):  # device-side loaders crop to any size
        loader.set_size(size)
    elif recipe.train.progressive_min_size > 0:  # also back to full size once the ramp ends
        dataset.transform = train_transform(recipe.data, img_size=size)
    loader.sampler.start = start_step * recipe.train.batch_size
    return size


NAN_CHECK_EVERY = 10  # steps between non-finite-loss checks on accelerators (each is a host sync)
OnStep = Callable[[int, torch.Tensor, int, int], None]  # (step, loss_sum, seen, skipped) after each batch


class DivergedError(ValueError):
    """The loss or the weights became NaN/inf: training stops at once; the message is one line."""

    HINT = "lower the learning rate (--lr) or check the data (labels, corrupt or constant images)"


def _check_finite(bad_step: torch.Tensor, ctx: StepContext, *, epoch: int, end: int, lr: float) -> None:
    """Stop every rank together when any rank saw a non-finite loss: the flag is reduced, so no rank goes on
    to a collective the others never reach. `bad_step`: this rank's first bad step (0 = none), on the device."""
    flag = all_reduce_sum((bad_step > 0).double(), ctx.info)
    if float(flag) == 0:
        return
    steps = [s for s in all_gather_object(int(bad_step), ctx.info) if s > 0]
    raise DivergedError(
        f"training diverged: the loss is NaN or inf at epoch {epoch} step {min(steps)}/{end} (lr {lr:.3g}); "
        f"{DivergedError.HINT}"
    )


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    ctx: StepContext,
    *,
    epoch: int,
    recipe: Recipe,
    ema: ModelEma | None = None,
    start_step: int = 0,
    on_step: OnStep | None = None,
    progress: Progress | None = None,
    strategy: Strategy | None = None,
    partial: dict | None = None,
) -> dict:
    """One pass over `loader`, a `train_step` per batch. Loss is accumulated on the device: no host sync
    per step. `on_step(step, loss_sum, seen, skipped)` after each batch (mid-epoch checkpoints).

    `partial`: the epoch's sums so far (all ranks) from a mid-epoch checkpoint, so a resumed epoch
    reports the same train_loss as an uninterrupted one; rank 0 carries them."""
    model.train()
    if strategy is not None:
        strategy.freeze_norm_stats()
    seed, accum, end = recipe.train.seed, max(1, recipe.optim.accum_steps), len(loader) + start_step
    generator = torch.Generator()
    carried = (partial or {}) if ctx.info.is_main else {}
    loss_sum = torch.full((), float(carried.get("loss_sum", 0.0)), device=ctx.device)
    seen0 = int(carried.get("seen", 0))
    seen, skipped = seen0, int(carried.get("skipped", 0))
    t0 = time.perf_counter()
    task = progress.add(f"epoch {epoch}", total=end, completed=start_step) if progress else None
    # The first step whose loss is not finite, tracked on the device (no host sync per step); checked every
    # step on the CPU, every `NAN_CHECK_EVERY` on accelerators, and before any checkpoint is written.
    bad_step = torch.zeros((), dtype=torch.long, device=ctx.device)
    check_every = 1 if ctx.device.type == "cpu" else NAN_CHECK_EVERY
    waited = _Clock()  # time spent waiting for the next batch: the data path's share of the epoch
    for i, (images, targets, failed) in enumerate(_timed(loader, waited), start=start_step):
        generator.manual_seed(seed * 1_000_003 + epoch * 10_007 + i)  # mixup draws replay on resume
        update = (i + 1) % accum == 0 or i + 1 == end
        loss = train_step(
            model, images, targets, criterion, optimizer, ctx, recipe.optim, generator=generator, update=update
        )
        if update:
            scheduler.step()
            if ema is not None:
                ema.update(unwrap(model))
        loss_sum += loss * images.shape[0]
        seen += images.shape[0]
        skipped += int(failed.sum())
        step = i + 1
        bad_step = torch.where((bad_step == 0) & ~torch.isfinite(loss), step, bad_step)
        if step % check_every == 0 or step == end:
            _check_finite(bad_step, ctx, epoch=epoch, end=end, lr=recipe_lr(optimizer))
        if progress is not None and (i % 10 == 0 or step == end):
            ips = (seen - seen0) * ctx.info.world / max(time.perf_counter() - t0, 1e-9)
            progress.update(task, completed=step, loss=float(loss), lr=recipe_lr(optimizer), ips=ips)
        if on_step is not None:
            on_step(step, loss_sum, seen, skipped)
    seconds = time.perf_counter() - t0
    sums = torch.stack(
        [loss_sum.double(), *(torch.tensor(float(v), device=ctx.device).double() for v in (seen, skipped))]
    )
    totals = all_reduce_sum(sums, ctx.info)
    if progress is not None and task is not None:
        progress.remove(task)
    total_seen = float(totals[1])
    resumed_seen = float((partial or {}).get("seen", 0))  # the same global count on every rank
    return {
        "train_loss": float(totals[0]) / max(total_seen, 1),
        "img_per_s": (total_seen - resumed_seen) / max(seconds, 1e-9),
        "train_seconds": seconds,
        "data_wait_fraction": min(1.0, waited.seconds / max(seconds, 1e-9)),
        "skipped": int(totals[2]),
    }


class _Clock:
    seconds = 0.0


def _timed(loader: Iterable, clock: _Clock) -> Iterator:
    """`loader`'s batches, adding the time each `next()` takes to `clock.seconds`: how long training waited
    for data. On CUDA the steps run asynchronously, so a loader that keeps ahead of the GPU shows about 0."""
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        finally:
            clock.seconds += time.perf_counter() - start
        yield batch


# ---- evaluation -------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: Iterable, ctx: StepContext, *, tta_flip: bool = False, progress: Progress | None = None
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
    """val_loss, and val_top1 / val_top5 as fractions (the unit of every file tlkit writes); two-class tasks add
    val_auroc (when val holds both classes), which does not depend on which class counts as positive."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    correct = top.eq(targets[:, None])
    n = max(1, len(targets))
    out = {
        "val_loss": float(F.cross_entropy(logits, targets)),
        # counted in Python, as a report's `top1` is: 15 of 50 right is exactly 15 / 50
        "val_top1": int(correct[:, 0].sum()) / n,
        "val_top5": int(correct.any(dim=1).sum()) / n,
    }
    if logits.shape[1] == 2 and 0 < int(targets.sum()) < len(targets):
        from sklearn.metrics import roc_auc_score

        # the logit margin ranks as softmax does, without float32 probabilities saturating into ties at 0 and 1
        margin = (logits[:, 1].double() - logits[:, 0].double()).numpy()
        out["val_auroc"] = float(roc_auc_score(targets.numpy() == 1, margin))
    return out


def selection_score(row: dict) -> float | None:
    """What best.pt is chosen by: val AUROC where a row has it (two classes: the binary recipes then choose their
    own operating point, so top-1 at argmax is not the number they use), else val top-1; None without val."""
    return row.get("val_auroc", row.get("val_top1"))


def best_row(history: list[dict]) -> dict | None:
    """The epoch best.pt holds: the highest `selection_score`, the earliest on a tie; None before any val pass."""
    return max((row for row in history if selection_score(row) is not None), key=selection_score, default=None)


def evaluate(
    model: nn.Module, loader: Iterable, ctx: StepContext, *, tta_flip: bool = False, progress: Progress | None = None
) -> dict:
    logits, targets, skipped = predict_logits(model, loader, ctx, tta_flip=tta_flip, progress=progress)
    return {**topk_metrics(logits, targets), "val_skipped": skipped}


def eval_model(run: Run) -> nn.Module:
    """What validation measures: the EMA weights when the recipe keeps an EMA, else the model."""
    if run.ema is None:
        return run.model
    shadow = copy.deepcopy(unwrap(run.model))
    shadow.load_state_dict({k: v.to(dtype=shadow.state_dict()[k].dtype) for k, v in run.ema.state_dict().items()})
    return shadow


# ---- the run ------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    run_dir: Path
    best_path: Path
    last_path: Path
    best_top1: float  # a fraction; -1 when the run had no validation
    history: list[dict]
    classes: list[str]
    skipped: int
    extras: dict = field(default_factory=dict)


def fit(recipe: Recipe, *, kind: str = "pretrain", resume: str | Path | None = None, quiet: bool = False) -> RunResult:
    """Train `recipe` end to end and return where the checkpoints are."""
    run = build_run(recipe, kind=kind, resume=resume)
    run_dir, made = open_run_dir(run)
    try:
        with disk_full_names(run_dir):
            return _fit_run(run, run_dir, quiet=quiet)
    except DivergedError as e:
        last = run_dir / LAST
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written"
        discard_unfinished(run_dir, made and run.info.is_main)
        raise DivergedError(f"{e}; {kept}") from None
    except BaseException:
        discard_unfinished(run_dir, made and run.info.is_main)  # nothing trained: no half-made run folder
        raise


def _fit_run(run: Run, run_dir: Path, *, quiet: bool) -> RunResult:
    """`fit` once the run is built and its folder open: the epochs, each evaluated and saved, then the summary."""
    recipe, info, state, data = run.recipe, run.info, run.state, run.data
    meta = checkpoint_meta(run)
    writers = RunWriters(run_dir, recipe, meta, enabled=info.is_main, history=state.history)

    def save(epoch: int, step_in_epoch: int = 0, *, name: str = LAST, **extra) -> None:
        ckpt = training_state(run, meta, epoch=epoch, step_in_epoch=step_in_epoch, extra=extra)
        # every rank checks its weights and they agree on the answer: a NaN checkpoint is never written
        bad = non_finite_weights(ckpt)
        if float(all_reduce_sum(torch.tensor(float(bool(bad)), device=run.device), info)) > 0:
            at = f"epoch {epoch}" + (f" step {step_in_epoch}" if step_in_epoch else "")
            raise DivergedError(
                f"training diverged: {bad or 'weights on another rank hold NaN or inf'} at {at} "
                f"(lr {recipe_lr(run.optimizer):.3g}), not saved; {DivergedError.HINT}"
            )
        if info.is_main:
            save_checkpoint(ckpt, run_dir / name)

    train_model = run.compiled  # wrapped for DDP at the first epoch of this run, below
    with Progress(enabled=info.is_main and not quiet) as progress:
        for epoch in range(state.start_epoch, recipe.train.epochs + 1):
            t_epoch = time.perf_counter()
            first = epoch == state.start_epoch
            changed = run.strategy is not None and run.strategy.on_epoch_start(
                epoch, console=console if info.is_main else None
            )
            if changed or first:
                train_model = distributed_model(run)
            step0 = state.start_step if first else 0
            prepare_epoch(run, epoch, step0)
            stats = train_one_epoch(
                train_model,
                data.train_loader,
                run.optimizer,
                run.scheduler,
                run.criterion,
                run.ctx,
                epoch=epoch,
                recipe=recipe,
                ema=run.ema,
                start_step=step0,
                on_step=_mid_epoch_saver(run, epoch, step0, save),
                progress=progress,
                strategy=run.strategy,
                partial=state.partial if step0 else None,
            )
            _share_rank0_state(run)
            row = {
                "epoch": epoch,
                "train_loss": stats["train_loss"],
                "lr": recipe_lr(run.optimizer),
                "img_per_s": stats["img_per_s"],
                "data_wait_fraction": stats["data_wait_fraction"],
            }
            if data.val_loader is not None and (epoch % recipe.train.eval_every == 0 or epoch == recipe.train.epochs):
                tta = recipe.train.tta_flip
                row.update(evaluate(eval_model(run), data.val_loader, run.ctx, tta_flip=tta, progress=progress))
                if not math.isfinite(row["val_loss"]):  # finite but exploded weights: logits overflow to inf
                    raise DivergedError(  # the gathered val logits are the same on every rank: all stop together
                        f"training diverged: the validation loss is NaN or inf after epoch {epoch} "
                        f"(train loss {row['train_loss']:.3g}, lr {row['lr']:.3g}), not saved; {DivergedError.HINT}"
                    )
            row["skipped"] = stats["skipped"]
            row["seconds"] = time.perf_counter() - t_epoch
            state.history.append(row)  # a resumed run's history holds the epochs before it too
            is_best = data.val_loader is None or best_row(state.history) is row
            if is_best:
                state.best_top1 = row.get("val_top1", state.best_top1)
            save(epoch)
            if is_best:
                save(epoch, name=BEST)
            writers.epoch(row)
            if info.is_main:
                console.print(epoch_line(row))
    return _finish(run, run_dir, writers)


def _mid_epoch_saver(run: Run, epoch: int, start_step: int, save: Callable[..., None]) -> OnStep | None:
    """`on_step` for `train_one_epoch` when the recipe saves every `save_every_steps` batches: last.pt with
    the position in the epoch and the epoch's sums so far, reduced over the ranks (`partial`)."""
    every, end = run.recipe.train.save_every_steps, len(run.data.train_loader) + start_step
    if every <= 0:
        return None

    def on_step(step: int, loss_sum: torch.Tensor, seen: int, skipped: int) -> None:
        if step % every == 0 and step < end:
            sums = torch.tensor([float(loss_sum), float(seen), float(skipped)], dtype=torch.float64, device=run.device)
            sums = all_reduce_sum(sums, run.info)
            if not bool(torch.isfinite(sums).all()):  # the same reduced sums on every rank: all stop together
                raise DivergedError(
                    f"training diverged: the loss is NaN or inf in epoch {epoch} before step {step} "
                    f"(lr {recipe_lr(run.optimizer):.3g}); {DivergedError.HINT}"
                )
            save(epoch, step, partial={"loss_sum": float(sums[0]), "seen": int(sums[1]), "skipped": int(sums[2])})

    return on_step


def _share_rank0_state(run: Run) -> None:
    """DDP hands rank 0's buffers to every rank at each forward, so a rank's own BatchNorm statistics never
    reach training, but they are what it evaluates with: all ranks take rank 0's, the ones saved. The same
    for the EMA, which each rank started from its own init (seeded per rank) and updates with its own
    BatchNorm statistics: validation on every rank uses what rank 0 saves."""
    broadcast_tensors([*unwrap(run.model).buffers(), *(run.ema.shadow.values() if run.ema else ())], run.info)


def _finish(run: Run, run_dir: Path, writers: RunWriters) -> RunResult:
    """Every rank's final weights digest, summary.json, the RunResult."""
    state, info = run.state, run.info
    skipped = sum(int(row.get("skipped", 0)) for row in state.history)  # epochs before a resume too
    digests = all_gather_object(state_digest(unwrap(run.model).state_dict()), info)
    in_sync = len(set(digests)) == 1
    writers.close(
        {
            "run_dir": str(run_dir),
            "best": str(run_dir / BEST),
            "best_top1": state.best_top1,
            "best_by": "val_auroc" if "val_auroc" in (best_row(state.history) or {}) else "val_top1",
            "epochs": len(state.history),
            "skipped_images": skipped,
            "data_loader": run.data.loader,
            "world_size": info.world,
            "ranks_in_sync": in_sync,
            # each rank's final weights and buffers (`state_digest`): equal to the digest of last.pt's `model`
            "weights_sha256": digests,
        }
    )
    if info.is_main and skipped:
        console.print(f"[yellow]{skipped} unreadable image(s) were skipped (named in the log above)")
    return RunResult(
        run_dir,
        run_dir / BEST,
        run_dir / LAST,
        state.best_top1,
        state.history,
        run.data.bundle.classes,
        skipped,
        extras={
            "ranks_in_sync": in_sync,
            "weights_sha256": digests,
            "world_size": info.world,
            "init": run.init_info,
            "bundle": run.data.bundle,
            "pre": run.pre,
            "ctx": run.ctx,
            "val_loader": run.data.val_loader,
            "data_loader": run.data.loader,
        },
    )
