"""The surveillance recipe: one-class anomaly detection in CCTV clips with a pretrained backbone.

Same flow as the other recipes (recipe -> data -> model -> fit -> checkpoint -> evaluate/report), but
"fit" builds a PatchCore memory bank of normal patch features from the training clips (normal only,
the standard UCSD protocol) instead of running gradient descent. The alert threshold is chosen on
the labelled val clips, and the checkpoint carries backbone, bank, threshold and preprocessing.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tlkit import __version__
from tlkit.anomaly import Clip, PatchCoreScorer, choose_alert_threshold, evaluate_clips, load_clips
from tlkit.checkpoint import CheckpointError, save_checkpoint
from tlkit.config import AnomalyConfig, Recipe, to_dict, to_yaml
from tlkit.data.datasets import find_split_dir, has_split
from tlkit.data.transforms import preprocessing_for
from tlkit.engine import resolve_device, run_name, seed_everything
from tlkit.models import build_model, create_model
from tlkit.paths import git_sha, resolve_data, runs_dir
from tlkit.progress import console


def backbone(arch: str, init: str = "scratch") -> tuple[nn.Module, dict]:
    """The feature extractor: a timm model without head (`num_classes=0`), body weights from `init`."""
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


def _clips(root: Path, split: str) -> list[Clip]:
    if has_split(root, split):
        return load_clips(find_split_dir(root, split))
    return load_clips(root)  # a folder of clips, or one clip, given directly


def fit_anomaly(recipe: Recipe, *, quiet: bool = False) -> Path:
    """`tlkit finetune --recipe surveillance`: fit the bank, choose the threshold on val, report."""
    cfg = recipe.anomaly or AnomalyConfig()
    seed_everything(recipe.train.seed)
    device = resolve_device(recipe.train.device)
    root = resolve_data(recipe.data.name)
    train_clips = _clips(root, recipe.data.train_split)
    model, init_info = backbone(recipe.model.arch, recipe.model.init)
    model.to(device).eval()
    pre = preprocessing_for(recipe.model.arch, recipe.data, init=recipe.model.init)
    scorer = PatchCoreScorer(
        model,
        pre.to_dict(),
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

    run_dir = Path(recipe.train.out or runs_dir() / run_name(recipe, "finetune"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        f"# tlkit {__version__}  git {git_sha() or 'unknown'}  seed {recipe.train.seed}\n" + to_yaml(recipe)
    )
    results = None
    if recipe.data.val_split and has_split(root, recipe.data.val_split):
        val_clips = _clips(root, recipe.data.val_split)
        scored = evaluate_clips(scorer, val_clips, smooth_window=cfg.smooth_window, batch_size=recipe.train.batch_size)
        smoothed = np.concatenate([np.asarray(c["smoothed"]) for c in scored["clips"].values() if c["labels"]])
        labels = np.concatenate([np.asarray(c["labels"]) for c in scored["clips"].values() if c["labels"]])
        scorer.threshold = choose_alert_threshold(smoothed, labels, method=cfg.threshold_method)
        results = evaluate_clips(scorer, val_clips, smooth_window=cfg.smooth_window, batch_size=recipe.train.batch_size)
    ckpt = {
        "format": "tlkit",
        "version": 1,
        "tlkit_version": __version__,
        "git_sha": git_sha(),
        "kind": "finetune",
        "task": "anomaly",
        "arch": recipe.model.arch,
        "classes": ["normal", "abnormal"],
        "class_ids": ["normal", "abnormal"],
        "preprocessing": pre.to_dict(),
        "recipe": to_dict(recipe),
        "data_root": str(root),
        "init": init_info.get("init", "scratch"),
        "model": model.state_dict(),
        "anomaly": scorer.state_dict(),
        "threshold": scorer.threshold,
        "history": [],
        "val_metrics": _summary(results) if results else {},
        "saved_at": datetime.now().isoformat(timespec="seconds"),
    }
    best = save_checkpoint(ckpt, run_dir / "best.pt")
    if results is not None:
        write_anomaly_report(run_dir / "report", results, ckpt, data=str(root), split=recipe.data.val_split)
    console.print(f"\n[bold]best checkpoint:[/bold] {best}")
    if results is not None:
        console.print(
            f"val frame AUROC {results['frame_auroc']:.4f}  (alert threshold {scorer.threshold:.3f}, "
            f"z-score of normal frames)"
        )
        console.print(f"report: {run_dir / 'report' / 'report.md'}")
    console.print("next:")
    console.print(f"  tlkit evaluate --checkpoint {best} --data {root}")
    console.print(f"  tlkit demo surveillance --checkpoint {best}")
    return run_dir


def scorer_from_checkpoint(ckpt: dict, device: str = "auto") -> PatchCoreScorer:
    if ckpt.get("task") != "anomaly" or "anomaly" not in ckpt:
        raise CheckpointError("not an anomaly checkpoint (make one with `tlkit finetune --recipe surveillance`)")
    dev = resolve_device(device)
    model = create_model(ckpt["arch"], 0)
    model.load_state_dict(ckpt["model"])
    return PatchCoreScorer.from_state_dict(ckpt["anomaly"], model.to(dev).eval(), device=dev)


def evaluate_anomaly_checkpoint(
    ckpt: dict, checkpoint: str | Path, data: str | Path, *, split: str = "val", out: Path | None = None
) -> dict:
    """`tlkit evaluate` on labelled clips laid out like ucsd_ped2's val/ (`<clip>/NNN.jpg` + labels.csv)."""
    scorer = scorer_from_checkpoint(ckpt)
    cfg = ckpt["recipe"].get("anomaly") or {}
    clips = _clips(resolve_data(data), split)
    results = evaluate_clips(scorer, clips, smooth_window=cfg.get("smooth_window", 9))
    out = Path(out) if out else Path(checkpoint).parent / f"eval-{split}"
    write_anomaly_report(out, results, ckpt, data=str(data), split=split)
    console.print(f"report: {out / 'report.md'}")
    return _summary(results)


def _summary(results: dict) -> dict:
    summary = {k: results.get(k) for k in ("frame_auroc", "frame_auroc_raw", "frame_auroc_per_clip_norm", "threshold")}
    summary.update({f"auroc_{name}": c["auroc"] for name, c in results["clips"].items()})
    for key, value in (results.get("alerts") or {}).items():
        summary[f"alert_{key}"] = value
    return summary


def write_anomaly_report(out: Path, results: dict, ckpt: dict, *, data: str, split: str) -> Path:
    from tlkit.report import plot_scores_over_time, write_report

    out.mkdir(parents=True, exist_ok=True)
    for name, clip in results["clips"].items():
        plot_scores_over_time(
            np.asarray(clip["smoothed"]),
            None if clip["labels"] is None else np.asarray(clip["labels"]),
            results["threshold"],
            out / f"scores_{name}.png",
            title=f"{name}: anomaly score per frame (AUROC {clip['auroc'] or float('nan'):.3f})",
            events=[
                (e["start_frame"] - clip["frames"][0], e["end_frame"] - clip["frames"][0] + 1) for e in clip["events"]
            ],
        )
    (out / "clips.json").write_text(json.dumps(results, indent=1))
    weight = ckpt["anomaly"]["config"].get("motion_weight")
    motion = f" + motion stream, weight {weight:g}" if weight else ""
    context = {
        "recipe": ckpt["recipe"].get("name"),
        "task": f"anomaly (one-class, PatchCore memory bank{motion})",
        "arch": ckpt["arch"],
        "init": ckpt.get("init"),
        "strategy": "frozen backbone features + kNN",
        "data": data,
        "split": split,
        "img_size": ckpt["preprocessing"]["img_size"],
        "bank_size": int(ckpt["anomaly"]["bank"].shape[0]),
        "git_sha": ckpt.get("git_sha"),
    }
    return write_report(out, _summary(results), context=context, title="tlkit surveillance report")


@torch.inference_mode()
def score_video(scorer: PatchCoreScorer, source, *, smooth_window: int = 9, fps: float = 10.0) -> dict:
    """Score a video file or frame folder end to end: per-frame scores, smoothed scores and alert events."""
    from tlkit.anomaly import find_events, smooth_scores

    raw = scorer.score(source)
    smooth = smooth_scores(raw, smooth_window)
    events = find_events(smooth, scorer.threshold, fps=fps) if scorer.threshold is not None else []
    return {"scores": raw.tolist(), "smoothed": smooth.tolist(), "events": events, "threshold": scorer.threshold}
