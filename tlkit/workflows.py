"""What `tlkit pretrain` / `tlkit finetune` do around `engine.fit`: pick the recipe and the init,
then after training calibrate on val, write the report and say what to run next."""

from __future__ import annotations

from pathlib import Path

import torch

from tlkit.config import Recipe, load_recipe, replace
from tlkit.paths import runs_dir
from tlkit.progress import console


class InitError(ValueError):
    """No pretrained weights to start from; the message says how to make or pass some."""


def newest_checkpoint(kind: str, recipe_name: str | None = None, root: Path | None = None) -> Path | None:
    """Newest `best.pt` of runs named `<kind>-...` (pretrain) or `finetune-<recipe>-...`."""
    root = root or runs_dir()
    prefix = kind if recipe_name is None else f"{kind}-{recipe_name}-"
    found = [p for p in root.glob(f"{prefix}*/best.pt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_init(recipe: Recipe) -> Recipe:
    if recipe.model.init != "auto":
        return recipe
    newest = newest_checkpoint("pretrain")
    if newest is None:
        raise InitError(
            f"no pretrained checkpoint in {runs_dir()}/: run `tlkit pretrain` first, or pass "
            "--init scratch, or --init <weights file> (tlkit checkpoint, timm/torchvision .pth/.safetensors)"
        )
    console.print(f"init: {newest} (newest pretrain run)")
    return replace(recipe, model={"init": str(newest)})


def resume_recipe(resume: str | Path, overrides: dict) -> Recipe:
    """A resumed run continues the recipe it was started with; only options the user passes now
    (e.g. a larger --epochs) change it, never recipe defaults."""
    from tlkit.config import deep_merge, recipe_from_dict
    from tlkit.engine import resolve_resume

    _, ckpt = resolve_resume(resume)
    return recipe_from_dict(deep_merge(ckpt["recipe"], overrides))


def run_training(
    recipe_name: str, overrides: dict, *, kind: str, resume: str | None = None, quiet: bool = False
) -> Path:
    """Load the recipe, train, then calibrate and report. Returns the run folder."""
    if resume:
        recipe = resume_recipe(resume, overrides)
    else:
        recipe = load_recipe(recipe_name, overrides, cuda=torch.cuda.is_available())
    if kind == "finetune" and recipe.finetune is None and recipe.task == "classify":
        recipe = replace(recipe, finetune={})
    if not resume:
        recipe = resolve_init(recipe)
    if recipe.task == "anomaly":
        from tlkit.surveillance import fit_anomaly

        return fit_anomaly(recipe, quiet=quiet)

    from tlkit.engine import fit

    result = fit(recipe, kind=kind, resume=resume, quiet=quiet)
    if result.extras["world_size"] > 1 and not _is_main():
        return result.run_dir
    return finish(result, recipe, kind, quiet=quiet)


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def finish(result, recipe: Recipe, kind: str, *, quiet: bool = False) -> Path:
    """Calibrate (fine-tuning), write report/ from best.pt on val, print where things are."""
    from tlkit.checkpoint import load_tlkit_checkpoint
    from tlkit.evaluation import calibrate, checkpoint_logits, write_checkpoint_report

    run_dir, bundle = result.run_dir, result.extras["bundle"]
    has_val = bundle.val is not None and result.best_path.is_file()
    if has_val:
        logits = targets = None
        if kind == "finetune":
            calib, logits, targets = calibrate(result.best_path, bundle.root, recipe.data.val_split, quiet=quiet)
            console.print(
                "calibration on val: " + ", ".join(f"{k} {v:.4g}" for k, v in calib.items() if isinstance(v, float))
            )
        ckpt = load_tlkit_checkpoint(result.best_path)
        if logits is None:
            logits, targets, _ = checkpoint_logits(ckpt, bundle.root, recipe.data.val_split, quiet=quiet)
        write_checkpoint_report(
            ckpt,
            logits,
            targets,
            run_dir / "report",
            data=bundle.root,
            split=recipe.data.val_split,
            title=f"tlkit {kind}: {recipe.name}",
            metrics_jsonl=run_dir / "metrics.jsonl",
            extra={"calibration": ckpt.get("calibration")},
        )
    console.print(f"\n[bold]best checkpoint:[/bold] {result.best_path}  (val top-1 {result.best_top1:.2f}%)")
    if has_val:
        console.print(f"report: {run_dir / 'report' / 'report.md'}")
    console.print("next:")
    console.print(f"  tlkit evaluate --checkpoint {result.best_path} --data {bundle.root}")
    if kind == "pretrain":
        console.print(f"  tlkit finetune --recipe medical --init {result.best_path}")
    else:
        console.print(f"  tlkit predict --checkpoint {result.best_path} <image> ...")
        console.print(f"  tlkit demo {recipe.name} --checkpoint {result.best_path}")
    return run_dir
