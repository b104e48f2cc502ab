"""LR range test (Smith 2017, fastai's `lr_find`): train a throwaway copy of the recipe's model for a few
batches while the learning rate grows exponentially, and read a good LR off the loss curve.

Data, model, init, optimizer, loss and (for fine-tuning recipes) the transfer strategy come from
`run.build_run`, as in `engine.fit`, and every step is `engine.train_step`, the step fit takes: the curve
describes the run you are about to launch. A `finetune:`
block is honoured at its unfrozen stage: the parameters that train then, with their LR multipliers
(head x `head_lr_mult`, layer-wise decay in the body); `linear-probe` only ever trains the head.

Units: the sweep sets the optimizer's real LR of the multiplier-1 parameter group, but everything reported
is in the recipe's units, `optim.lr` per 256 images (`run.scaled_lr` scales it by batch_size/256).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from tlkit.config import FinetuneConfig, Recipe, load_recipe
from tlkit.engine import train_step
from tlkit.paths import runs_dir
from tlkit.progress import Progress, console
from tlkit.run import Run, build_run
from tlkit.tasks import require, task_of
from tlkit.workflows import resolve_init


def run_lr_find(
    recipe_name: str,
    overrides: dict | None = None,
    steps: int = 100,
    out: str | Path | None = None,
    *,
    start_lr: float = 1e-6,
    end_lr: float = 1.0,
    diverge: float = 4.0,
    beta: float | None = None,
    quiet: bool = False,
) -> dict:
    """Sweep the real LR from `start_lr` to `end_lr` over `steps` optimizer steps (stopping early once
    the smoothed loss exceeds `diverge` x its best), plot, and suggest an `optim.lr`. The loss is smoothed
    by a bias-corrected EMA; `beta` defaults to fastai's 0.98 for 100 steps, adjusted so that the smoothing
    spans the same share of the sweep for other step counts.

    Returns {"suggested_lr", "lrs", "losses", "plot", ...}: `lrs` and `suggested_lr` in recipe units
    (optim.lr for a batch of 256), `losses` the smoothed training loss at each LR."""
    if steps < 5:
        raise ValueError(f"lr-find needs at least 5 steps, got {steps}")
    if not 0 < start_lr < end_lr:
        raise ValueError(f"lr-find needs 0 < start_lr < end_lr, got {start_lr:g} and {end_lr:g}")
    recipe = load_recipe(recipe_name, overrides, cuda=torch.cuda.is_available())
    require(task_of(recipe), "lr-find", "recipe")
    run = build_run(resolve_init(recipe))  # exactly what `engine.fit` trains, before its first epoch
    recipe = run.recipe
    if run.strategy is not None:
        run.strategy.on_epoch_start(_unfrozen_epoch(recipe.finetune))

    # recipe units: optim.lr is per 256 images; the optimizer sees optim.lr * scale
    accum = max(1, recipe.optim.accum_steps)
    scale = recipe.train.batch_size * accum / 256
    beta = 0.98 ** (100 / steps) if beta is None else beta
    sweep = _sweep(run, steps, start_lr, end_lr, diverge=diverge, beta=beta, scale=scale, quiet=quiet)
    actual_lrs, raw_losses, smoothed, stopped = sweep

    # keep finite points only (a NaN/inf step ends the sweep and is not plotted)
    keep = [j for j, s in enumerate(smoothed) if math.isfinite(s)]
    lrs = [actual_lrs[j] / scale for j in keep]
    losses = [smoothed[j] for j in keep]
    raw = [raw_losses[j] for j in keep]
    if len(lrs) < 3:
        raise ValueError(
            f"the loss diverged after {len(smoothed)} step(s) from LR {start_lr:g}; lower start_lr or check the data"
        )
    suggestion = suggest_lr(lrs, losses)
    plot = Path(out) if out else runs_dir() / f"lr-find-{recipe.name}.png"
    plot_lr_find(
        plot,
        lrs,
        losses,
        raw,
        suggestion,
        scale=scale,
        title=f"LR range test: {recipe.name}, {recipe.model.arch}, batch {recipe.train.batch_size * accum}",
    )
    swept = (len(smoothed), steps, stopped)
    for line in _summary_lines(recipe, suggestion, lrs, losses, plot, scale=scale, swept=swept):
        console.print(line, markup=False)
    return {
        "suggested_lr": suggestion["suggested_lr"],
        "lrs": lrs,
        "losses": losses,
        "raw_losses": raw,
        "plot": plot,
        "method": suggestion["method"],
        "min_lr_div10": suggestion["min_lr_div10"],
        "steepest_lr": suggestion["steepest_lr"],
        "lr_scale": scale,
        "batch_size": recipe.train.batch_size * accum,
        "stopped_early": stopped,
        "units": "optim.lr per batch 256",
    }


def _sweep(
    run: Run, steps: int, start_lr: float, end_lr: float, *, diverge: float, beta: float, scale: float, quiet: bool
) -> tuple[list[float], list[float], list[float], bool]:
    """`steps` optimizer steps (each `accum_steps` x `train_step`) at an exponentially growing LR ->
    (real LRs, raw losses, smoothed losses, stopped early). The mixup generator is seeded per micro-batch."""
    recipe, model, optimizer = run.recipe, run.model, run.optimizer
    accum = max(1, recipe.optim.accum_steps)
    batches = _endless(run.data.train_loader, run.data.bundle.train)
    generator = torch.Generator()
    actual_lrs: list[float] = []
    raw_losses: list[float] = []
    smoothed: list[float] = []
    avg, best, stopped = 0.0, math.inf, False
    model.train()
    if run.strategy is not None:
        run.strategy.freeze_norm_stats()
    t0 = time.perf_counter()
    with Progress(enabled=not quiet) as progress:
        task = progress.add("lr-find", total=steps)
        for i in range(steps):
            lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            loss_value = 0.0
            for micro in range(accum):
                images, targets, _ = next(batches)
                generator.manual_seed(recipe.train.seed * 1_000_003 + i * accum + micro)
                loss = train_step(
                    model,
                    images,
                    targets,
                    run.criterion,
                    optimizer,
                    run.ctx,
                    recipe.optim,
                    generator=generator,
                    update=micro == accum - 1,
                )
                loss_value += float(loss) / accum
            actual_lrs.append(lr)
            raw_losses.append(loss_value)
            if not math.isfinite(loss_value):
                smoothed.append(math.inf)
                stopped = True
                break
            avg = beta * avg + (1 - beta) * loss_value
            smooth = avg / (1 - beta ** (i + 1))  # bias-corrected EMA, as in fastai
            smoothed.append(smooth)
            best = min(best, smooth)
            ips = (i + 1) * recipe.train.batch_size * accum / max(time.perf_counter() - t0, 1e-9)
            progress.update(task, completed=i + 1, loss=smooth, lr=lr / scale, ips=ips)
            if i > 0 and smooth > diverge * best:
                stopped = True
                break
    return actual_lrs, raw_losses, smoothed, stopped


def _summary_lines(
    recipe: Recipe,
    suggestion: dict,
    lrs: list[float],
    losses: list[float],
    plot: Path,
    *,
    scale: float,
    swept: tuple[int, int, bool],
) -> list[str]:
    """What lr-find prints: the suggestion in recipe units and at the real batch, and how the sweep went
    (`swept`: steps taken, steps asked, stopped early)."""
    done, steps, stopped = swept
    suggested, batch = suggestion["suggested_lr"], recipe.train.batch_size * max(1, recipe.optim.accum_steps)
    head = ""
    if recipe.finetune is not None and recipe.finetune.head_lr_mult != 1:
        head = f"; the head trains at {recipe.finetune.head_lr_mult:g}x that ({recipe.finetune.strategy})"
    return [
        f"suggested optim.lr={suggested:.3g} (for batch 256; {suggestion['method']}; "
        f"real LR {suggested * scale:.3g} at this batch of {batch}{head})",
        f"  lowest smoothed loss {min(losses):.4g} at optim.lr={suggestion['min_loss_lr']:.3g}; "
        f"min/10 = {suggestion['min_lr_div10']:.3g}; recipe now has optim.lr={recipe.optim.lr:g}",
        f"  swept optim.lr {lrs[0]:.3g} .. {lrs[-1]:.3g} in {done} of {steps} steps"
        + (" (stopped: loss diverged)" if stopped else ""),
        f"  plot: {plot}",
    ]


def _unfrozen_epoch(cfg: FinetuneConfig) -> int:
    """The first epoch at which the strategy trains everything it ever will (linear-probe: head only)."""
    return cfg.freeze_epochs + 1 if cfg.strategy == "freeze-unfreeze" else 1


def _endless(loader, dataset):
    """Batches forever: a new epoch (new shuffle and augmentations) whenever the loader runs out."""
    epoch = 0
    while True:
        epoch += 1
        dataset.set_epoch(epoch)
        loader.sampler.set_epoch(epoch)
        yield from loader


def suggest_lr(lrs: list[float], losses: list[float], skip_start: float = 0.1) -> dict:
    """The steepest descent of the smoothed loss against log(LR), measured as the slope over a window of
    +-h points (h = 5% of the sweep) that ends before the loss minimum and skips the noisy first
    `skip_start` of the sweep; the LR of the loss minimum / 10 when there is no such descent."""
    x, y = np.log10(np.asarray(lrs, dtype=float)), np.asarray(losses, dtype=float)
    n = len(y)
    i_min = int(np.argmin(y))
    min_lr = float(lrs[i_min])
    h = max(1, n // 20)
    candidates = range(max(h, int(n * skip_start)), i_min - h + 1)
    steepest = None
    if len(candidates) > 0:
        slopes = [(y[i + h] - y[i - h]) / (x[i + h] - x[i - h]) for i in candidates]
        best = int(np.argmin(slopes))
        if slopes[best] < 0:
            steepest = float(lrs[candidates[best]])
    return {
        "suggested_lr": steepest if steepest is not None else min_lr / 10,
        "method": "steepest descent of the smoothed loss" if steepest is not None else "loss minimum / 10",
        "steepest_lr": steepest,
        "min_loss_lr": min_lr,
        "min_lr_div10": min_lr / 10,
    }


def plot_lr_find(
    path: Path,
    lrs: list[float],
    losses: list[float],
    raw: list[float],
    suggestion: dict,
    *,
    scale: float,
    title: str,
) -> Path:
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(lrs, raw, color="0.75", linewidth=0.8, label="loss per step")
    ax.plot(lrs, losses, color="C0", linewidth=2, label="smoothed loss")
    ax.set_xscale("log")
    suggested = suggestion["suggested_lr"]
    y_at = float(np.interp(np.log10(suggested), np.log10(lrs), losses))
    ax.axvline(suggested, color="C3", linestyle="--", linewidth=1)
    ax.plot([suggested], [y_at], "o", color="C3", markersize=8, label=f"suggested optim.lr={suggested:.2g}")
    if suggestion["steepest_lr"] is not None and suggestion["min_lr_div10"] >= lrs[0]:
        ax.axvline(suggestion["min_lr_div10"], color="0.4", linestyle=":", linewidth=1, label="loss minimum / 10")
    low = min(min(losses), float(np.percentile(raw, 5)))
    high = max(losses[0], float(np.percentile(losses, 95)))
    pad = 0.08 * max(high - low, 1e-3)
    ax.set_ylim(low - pad, high + 3 * pad)
    ax.set_xlabel("optim.lr (recipe units: LR for a batch of 256)")
    ax.set_ylabel("training loss")
    top = ax.secondary_xaxis("top", functions=(lambda v: v * scale, lambda v: v / scale))
    top.set_xlabel(f"real optimizer LR at this batch size (x{scale:g})")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="best")
    fig.savefig(path, dpi=110)
    return path
