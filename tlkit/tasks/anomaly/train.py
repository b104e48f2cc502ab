"""Fitting an anomaly recipe (`tlkit finetune --recipe surveillance`): one-class, from normal clips only.

Same flow as the other recipes (recipe -> data -> model -> fit -> checkpoint -> evaluate/report), but "fit"
builds a PatchCore memory bank of normal patch features from the training clips (normal only, the standard
UCSD protocol) instead of running gradient descent. The alert threshold is chosen on the labelled val clips,
and the checkpoint carries backbone, bank, threshold and preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from tlkit.checkpoint import build_meta, save_checkpoint
from tlkit.config import AnomalyConfig, Recipe, to_dict, to_yaml
from tlkit.data.clips import Clip
from tlkit.progress import console
from tlkit.tasks.anomaly.post import choose_alert_threshold
from tlkit.tasks.anomaly.scorer import PatchCoreScorer
from tlkit.tasks.anomaly.val import evaluate_clips, split_clips, summary, write_anomaly_report

CLASSES = ["normal", "abnormal"]


def backbone(arch: str, init: str = "scratch") -> tuple[nn.Module, dict]:
    """The feature extractor: a timm model without head (`num_classes=0`), body weights from `init`."""
    from tlkit.models import build_model

    return build_model(arch, 0, init=init)


def training_clips(clips: list[Clip], max_frames: int, run: int = 20) -> list[Clip]:
    """Every clip, or about `max_frames` frames as runs of `run` consecutive frames spread evenly over all
    clips: spread for a diverse bank, consecutive so each frame's motion is measured against its predecessor."""
    total = sum(len(c) for c in clips)
    if not max_frames or total <= max_frames:
        return list(clips)
    n_runs = max(1, max_frames // run)
    starts = np.linspace(0, total - run, n_runs).round().astype(int)
    offsets = np.cumsum([0] + [len(c) for c in clips])
    out = []
    for start in starts:
        i = int(np.searchsorted(offsets, start, side="right")) - 1  # the clip this run starts in
        begin = int(start - offsets[i])
        frames = clips[i].frames[begin : begin + run]  # a run cut short by the clip's end stays short
        out.append(Clip(name=f"{clips[i].name}@{begin}", frames=frames, fps=clips[i].fps))
    return out


def train(recipe: Recipe, *, kind: str = "finetune", resume: str | Path | None = None, quiet: bool = False) -> Path:
    """Fit the bank, choose the alert threshold on val, write best.pt and the report; returns the run folder."""
    from tlkit import __version__
    from tlkit.paths import git_sha, resolve_data, runs_dir
    from tlkit.run import resolve_device, seed_everything
    from tlkit.run_folder import run_name

    if resume:
        raise ValueError("an anomaly run cannot be resumed: its memory bank is fitted in one pass; start a new run")
    if kind != "finetune":
        raise ValueError(f"the anomaly task has no {kind}: `tlkit finetune --recipe {recipe.name}` fits its bank")
    cfg = recipe.anomaly or AnomalyConfig()
    seed_everything(recipe.train.seed)
    device = resolve_device(recipe.train.device)
    root = resolve_data(recipe.data.name)
    scorer, pre, init_info = _fit_scorer(recipe, cfg, split_clips(root, recipe.data.train_split), device)

    run_dir = Path(recipe.train.out or runs_dir() / run_name(recipe, "finetune"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        f"# tlkit {__version__}  git {git_sha() or 'unknown'}  seed {recipe.train.seed}\n" + to_yaml(recipe)
    )
    results = _calibrate_on_val(scorer, recipe, cfg, root)
    ckpt = build_meta(
        kind="finetune",
        task="anomaly",
        arch=recipe.model.arch,
        classes=CLASSES,
        class_ids=CLASSES,
        preprocessing=pre,
        recipe=to_dict(recipe),
        data_root=str(root),
        init=init_info.get("init", "scratch"),
    )
    ckpt.update(
        model=scorer.model.state_dict(),
        anomaly=scorer.state_dict(),
        threshold=scorer.threshold,
        history=[],
        val_metrics=summary(results) if results else {},
    )
    best = save_checkpoint(ckpt, run_dir / "best.pt")
    if results is not None:
        write_anomaly_report(run_dir / "report", results, ckpt, data=str(root), split=recipe.data.val_split)
    _print_next(best, root, run_dir, results, scorer.threshold)
    return run_dir


def _fit_scorer(
    recipe: Recipe, cfg: AnomalyConfig, train_clips: list[Clip], device
) -> tuple[PatchCoreScorer, dict, dict]:
    """The scorer on the backbone from the recipe's init, fitted on (a sample of) the normal training clips;
    with the preprocessing dict and the init info for the checkpoint."""
    from tlkit.data.transforms import preprocessing_for

    model, init_info = backbone(recipe.model.arch, recipe.model.init)
    model.to(device).eval()
    pre = preprocessing_for(recipe.model.arch, recipe.data, init=recipe.model.init).to_dict()
    scorer = PatchCoreScorer(
        model,
        pre,
        feature_layers=list(cfg.layers) or None,
        k=cfg.k,
        motion_weight=cfg.motion_weight,
        seed=recipe.train.seed,
        device=device,
    )
    runs = training_clips(train_clips, cfg.max_train_frames)
    n_frames = sum(len(r) for r in runs)
    console.print(f"fitting the normal-patch memory bank on {n_frames} frames from {len(train_clips)} clips")
    scorer.fit(
        runs,
        batch_size=recipe.train.batch_size,
        coreset_ratio=cfg.coreset_ratio,
        max_bank=cfg.max_bank,
        seed=recipe.train.seed,
    )
    return scorer, pre, init_info


def _calibrate_on_val(scorer: PatchCoreScorer, recipe: Recipe, cfg: AnomalyConfig, root: Path) -> dict | None:
    """Choose `scorer.threshold` on the smoothed scores of the labelled val clips; the val results at that
    threshold (None without a val split)."""
    from tlkit.data.datasets import has_split

    if not (recipe.data.val_split and has_split(root, recipe.data.val_split)):
        return None
    val_clips = split_clips(root, recipe.data.val_split)
    batch = recipe.train.batch_size
    smoothing = {"smooth_window": cfg.smooth_window, "smooth_method": cfg.smooth_method}
    scored = evaluate_clips(scorer, val_clips, batch_size=batch, **smoothing)
    labelled = [c for c in scored["clips"].values() if c["labels"]]
    smoothed = np.concatenate([np.asarray(c["smoothed"]) for c in labelled])
    labels = np.concatenate([np.asarray(c["labels"]) for c in labelled])
    scorer.threshold = choose_alert_threshold(smoothed, labels, method=cfg.threshold_method)
    raw = {name: clip["scores"] for name, clip in scored["clips"].items()}  # the threshold does not change them
    return evaluate_clips(scorer, val_clips, batch_size=batch, scores=raw, **smoothing)


def _print_next(best: Path, root: Path, run_dir: Path, results: dict | None, threshold: float | None) -> None:
    console.print(f"\n[bold]best checkpoint:[/bold] {best}")
    if results is not None:
        console.print(
            f"val frame AUROC {results['frame_auroc']:.4f}  (alert threshold {threshold:.3f}, z-score of normal frames)"
        )
        console.print(f"report: {run_dir / 'report' / 'report.md'}")
    console.print("next:")
    console.print(f"  tlkit evaluate --checkpoint {best} --data {root}")
    console.print(f"  tlkit demo surveillance --checkpoint {best}")
