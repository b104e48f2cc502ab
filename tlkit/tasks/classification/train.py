"""Classification training: the engine's `fit`, then one post-training pass on val (calibration for
fine-tunes, the report), then what to run next."""

from __future__ import annotations

from pathlib import Path

from tlkit.checkpoint import disk_full_names, load_tlkit_checkpoint, save_checkpoint
from tlkit.config import Recipe, replace
from tlkit.progress import console
from tlkit.tasks.classification.val import calibrate, checkpoint_logits, heldout_metrics, write_checkpoint_report


def train(recipe: Recipe, *, kind: str = "pretrain", resume: str | Path | None = None, quiet: bool = False) -> Path:
    """Train `recipe` (pretraining or fine-tuning), calibrate and report; returns the run folder."""
    from tlkit.engine import fit

    if kind == "finetune" and recipe.finetune is None:
        recipe = replace(recipe, finetune={})  # fine-tuning always has a strategy (the defaults: full)
    result = fit(recipe, kind=kind, resume=resume, quiet=quiet)
    if not result.extras["ctx"].info.is_main:  # other DDP ranks: rank 0 calibrates and reports
        return result.run_dir
    with disk_full_names(result.run_dir):  # calibrated best.pt and report/: disk full names the run folder
        has_val = post_train(result, recipe, kind, quiet=quiet)
    _print_next(result, recipe, kind, has_val)
    return result.run_dir


def post_train(result, recipe: Recipe, kind: str, *, quiet: bool = False) -> bool:
    """One load of best.pt and one val pass: calibrate it (fine-tuning) and write report/ from the same logits,
    so the report, the stored threshold and what `evaluate` later measures agree. False when there is no val."""
    bundle = result.extras["bundle"]
    if bundle.val is None or not result.best_path.is_file():
        return False
    ckpt = load_tlkit_checkpoint(result.best_path)
    loader = None
    if result.extras.get("data_loader", "cpu") != "cpu":  # the run's own eval crop; needs no albumentations
        from tlkit.data.data_path import eval_loader

        loader = eval_loader(result.extras["data_loader"], bundle.val, recipe, result.extras["ctx"].device)
    logits, targets, _ = checkpoint_logits(ckpt, bundle.root, recipe.data.val_split, quiet=quiet, loader=loader)
    if kind == "finetune":
        calib = calibrate(ckpt, logits, targets)
        save_checkpoint(ckpt, result.best_path)
        console.print(
            "calibration on val: " + ", ".join(f"{k} {v:.4g}" for k, v in calib.items() if isinstance(v, float))
        )
        _print_heldout(calib.get("heldout"))
    write_checkpoint_report(
        ckpt,
        logits,
        targets,
        result.run_dir / "report",
        data=bundle.root,
        split=recipe.data.val_split,
        title=f"tlkit {kind}: {recipe.name}",
        metrics_jsonl=result.run_dir / "metrics.jsonl",
        # In-sample sensitivity/specificity (threshold fitted on these rows) sit beside the cross-fitted heldout_*.
        extra={
            "calibration": ckpt.get("calibration"),
            **heldout_metrics((ckpt.get("calibration") or {}).get("heldout")),
        },
    )
    return True


def _print_heldout(heldout: dict | None) -> None:
    """The cross-fitted operating point, the numbers to quote (the in-sample ones are optimistic)."""
    if not heldout or "chosen" not in heldout:
        return
    parts = []
    for name, point in ((heldout["method"], heldout["chosen"]), ("argmax", heldout["argmax"])):
        sens, spec = point["sensitivity"], point["specificity"]
        if sens is not None and spec is not None:
            parts.append(f"{name}: sensitivity {sens:.3f}, specificity {spec:.3f}")
    if parts:
        console.print(f"held-out val ({heldout['folds']}-fold cross-fit) " + "; ".join(parts))


def _print_next(result, recipe: Recipe, kind: str, has_val: bool) -> None:
    run_dir, root = result.run_dir, result.extras["bundle"].root
    from tlkit.engine import best_row

    best = best_row(result.history) or {}
    chosen = f"val AUROC {best['val_auroc']:.4f}, " if "val_auroc" in best else ""  # two classes: chosen by AUROC
    top1 = f"  ({chosen}val top-1 {100 * result.best_top1:.2f}%)" if result.best_top1 >= 0 else ""  # -1: no val
    console.print(f"\n[bold]best checkpoint:[/bold] {result.best_path}{top1}")
    if has_val:
        console.print(f"report: {run_dir / 'report' / 'report.md'}")
    console.print("next:")
    console.print(f"  tlkit evaluate --checkpoint {result.best_path} --data {root}")
    if kind == "pretrain":
        console.print(f"  tlkit finetune --recipe medical --init {result.best_path}")
    else:
        console.print(f"  tlkit predict --checkpoint {result.best_path} <image> ...")
        console.print(f"  tlkit demo {recipe.name} --checkpoint {result.best_path}")
