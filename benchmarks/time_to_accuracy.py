"""Time to accuracy on tiny_imagenet: tlkit's engine + a fast data path vs a torchvision-reference loop.

    python benchmarks/time_to_accuracy.py --smoke                      # CI/CPU: 10 classes, 32 px, 1 epoch
    python benchmarks/time_to_accuracy.py --epochs 16 --batch-size 256 --save   # GPU session

Runs (`--runs`, in this order, same process):
  reference  torchvision references/classification style: ImageFolder + torchvision transforms in
             DataLoader workers, torchvision model, --amp (fp16 + GradScaler on CUDA), NCHW;
  tlkit      what `engine.fit` runs, minus its files: `run.build_run` (model, optimizer, schedule, EMA,
             loss, step context), and per epoch `engine.prepare_epoch` (progressive resizing),
             `train_one_epoch`, `evaluate`; fed by `--loader` (auto: the pack resident on the GPU when it
             fits, see tlkit.data.data_path.choose_data_path); progressive resizing and test-time flip come
             from the recipe (`--set train.progressive_min_size=32` etc.);
  fit        `tlkit.engine.fit` as the CLI runs it today (albumentations DataLoader; skipped without it).

Both loops use the recipe's hyper-parameters (arch, epochs, batch, LR scaled per 256, SGD momentum 0.9
nesterov, weight decay, label smoothing, per-step warmup + cosine) and the same augmentation (random
resized crop with scale (scale_min, 1) + flip; eval on the center crop_pct square), so the comparison is
of the loops and data paths, not of recipes. Times are wall clock, training + evaluation of every epoch,
compile included; packing is reported apart (`prep_s`), done once per dataset. Top-1 is a fraction in the
JSON (as in every file tlkit writes) and in `--target`; the printed table shows percent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speed import tv_amp_step  # noqa: E402

from tlkit.config import load_recipe, parse_set  # noqa: E402
from tlkit.paths import resolve_data  # noqa: E402


def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


@contextlib.contextmanager
def _precision_flags_kept():
    """`build_run` (like fit) turns on cuDNN autotuning and TF32 for the whole process: put back what the
    next run would have found, so the runs' order does not change their precision."""
    flags = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (flags[0].benchmark, flags[1].allow_tf32, flags[0].allow_tf32)
    try:
        yield
    finally:
        flags[0].benchmark, flags[1].allow_tf32, flags[0].allow_tf32 = saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lr_lambda(recipe, steps_per_epoch: int):
    from tlkit.optim import lr_factor

    total = recipe.train.epochs * steps_per_epoch
    warmup = int(recipe.optim.warmup_epochs * steps_per_epoch)
    return lambda step: lr_factor(step, total, warmup, recipe.optim, steps_per_epoch)


# ---- the torchvision-reference loop ---------------------------------------------------------------------------


def run_reference(recipe, device: torch.device, workers: int, log) -> dict:
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import transforms as T

    from tlkit.run import scaled_lr

    data, train_cfg = recipe.data, recipe.train
    root = resolve_data(data.name)
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = T.Compose(
        [
            T.RandomResizedCrop(data.img_size, scale=(data.scale_min, 1.0), antialias=True),
            T.RandomHorizontalFlip(data.hflip),
            T.PILToTensor(),
            T.ConvertImageDtype(torch.float),
            norm,
        ]
    )
    resize = int(round(data.img_size / data.crop_pct))
    val_tf = T.Compose(
        [
            T.Resize(resize, antialias=True),
            T.CenterCrop(data.img_size),
            T.PILToTensor(),
            T.ConvertImageDtype(torch.float),
            norm,
        ]
    )
    train_set = torchvision.datasets.ImageFolder(str(root / data.train_split), train_tf)
    val_set = torchvision.datasets.ImageFolder(str(root / data.val_split), val_tf)
    train_set, val_set = _limit(train_set, data), _limit(val_set, data)
    num_classes = data.max_classes or 200
    g = torch.Generator().manual_seed(train_cfg.seed)
    kw = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    train_loader = DataLoader(train_set, train_cfg.batch_size, shuffle=True, drop_last=True, generator=g, **kw)
    val_loader = DataLoader(val_set, train_cfg.batch_size, shuffle=False, **kw)
    if hasattr(torchvision.models, recipe.model.arch):
        model = getattr(torchvision.models, recipe.model.arch)(num_classes=num_classes).to(device)
    else:
        from tlkit.models import create_model

        model = create_model(recipe.model.arch, num_classes).to(device)
    o = recipe.optim
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=scaled_lr(recipe, 1),
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, len(train_loader)))
    criterion = nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    history, t0 = [], time.perf_counter()
    for epoch in range(1, train_cfg.epochs + 1):
        model.train()
        for images, targets in train_loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            tv_amp_step(model, criterion, optimizer, scaler, images, targets, dtype=torch.float16, enabled=cuda)
            scheduler.step()
        model.eval()
        correct = total = 0
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            for images, targets in val_loader:
                pred = model(images.to(device, non_blocking=True)).argmax(1).cpu()
                correct += int((pred == targets).sum())
                total += len(targets)
        _sync(device)
        row = {"epoch": epoch, "seconds": time.perf_counter() - t0, "val_top1": correct / max(total, 1)}
        history.append(row)
        log(f"reference epoch {epoch}: top1 {100 * row['val_top1']:.2f}%  {row['seconds']:.1f}s")
    return {"history": history, "prep_s": 0.0, "loader": f"DataLoader x{workers} workers, PIL + torchvision"}


def _limit(dataset, data):
    """ImageFolder restricted like tlkit's scan_split (first max_classes classes, max_per_class each)."""
    from torch.utils.data import Subset

    if not data.max_classes and not data.max_per_class:
        return dataset
    keep, seen = [], {}
    for i, (_, target) in enumerate(dataset.samples):
        if data.max_classes and target >= data.max_classes:
            continue
        seen[target] = seen.get(target, 0) + 1
        if not data.max_per_class or seen[target] <= data.max_per_class:
            keep.append(i)
    return Subset(dataset, keep)


# ---- tlkit: engine functions + a fast loader ------------------------------------------------------------------


def run_tlkit(recipe, device: torch.device, loader_kind: str, pack_root: Path, log) -> dict:
    """`engine.fit`'s own setup (`build_run`) and epoch (`prepare_epoch`, `train_one_epoch`, `evaluate` of
    `eval_model`), fed by `loader_kind`'s data path; only checkpoints and run-folder files are left out."""
    from tlkit.data.data_path import choose_data_path
    from tlkit.engine import eval_model, evaluate, prepare_epoch, train_one_epoch
    from tlkit.run import build_run

    want_pack = loader_kind in ("packed", "gpu", "jpeg") or (loader_kind == "auto" and device.type == "cuda")
    t_prep = time.perf_counter()
    packs = _packs(recipe.data, pack_root) if want_pack else None
    prep_s = time.perf_counter() - t_prep
    kind, reason = choose_data_path(recipe.data, device, packs[0] if packs else None, loader_kind)
    log(f"tlkit data path: {kind} ({reason}); packing took {prep_s:.1f}s")
    # cpu: build_run's own DataLoader over the image folders, exactly what fit trains on
    run = build_run(recipe, data=None if kind == "cpu" else _fast_data(recipe, device, kind, *packs))
    history, t0 = [], time.perf_counter()
    for epoch in range(1, recipe.train.epochs + 1):
        size = prepare_epoch(run, epoch)
        stats = train_one_epoch(
            run.compiled,
            run.data.train_loader,
            run.optimizer,
            run.scheduler,
            run.criterion,
            run.ctx,
            epoch=epoch,
            recipe=run.recipe,
            ema=run.ema,
            strategy=run.strategy,
        )
        metrics = evaluate(eval_model(run), run.data.val_loader, run.ctx, tta_flip=recipe.train.tta_flip)
        _sync(device)
        row = {
            "epoch": epoch,
            "seconds": time.perf_counter() - t0,
            "val_top1": metrics["val_top1"],
            "train_size": size,
            "train_img_s": stats["img_per_s"],
        }
        history.append(row)
        log(f"tlkit epoch {epoch} @{size}px: top1 {100 * row['val_top1']:.2f}%  {row['seconds']:.1f}s")
    return {"history": history, "prep_s": prep_s, "loader": f"{kind} ({reason})"}


def _packs(data, pack_root: Path) -> tuple[Path, Path]:
    """The train pack at img_size and the val pack at img_size / crop_pct (made once per dataset subset)."""
    from tlkit.data.packed import PackedDataset, pack_split

    tag = f"{data.name}-c{data.max_classes}-n{data.max_per_class}"
    train_pack = pack_root / tag / f"{data.train_split}-{data.img_size}"
    val_size = int(round(data.img_size / data.crop_pct))
    val_pack = pack_root / tag / f"{data.val_split}-{val_size}"
    limits = dict(max_classes=data.max_classes, max_per_class=data.max_per_class)
    if not (train_pack / "meta.json").exists():
        pack_split(data.name, data.train_split, train_pack, data.img_size, **limits)
    if not (val_pack / "meta.json").exists():
        ids = PackedDataset(train_pack).class_ids
        pack_split(data.name, data.val_split, val_pack, val_size, class_ids=ids, **limits)
    return train_pack, val_pack


def _fast_data(recipe, device: torch.device, kind: str, train_pack: Path, val_pack: Path):
    """`RunData` for build_run from the packs: device-side loaders (`gpu`, `packed`) or nvJPEG (`jpeg`)."""
    from tlkit.data.data_path import make_fast_loader
    from tlkit.data.datasets import scan_split
    from tlkit.data.loader import DataBundle
    from tlkit.data.packed import PackedDataset
    from tlkit.run import RunData

    data, train_cfg = recipe.data, recipe.train
    train_set, val_set = (PackedDataset(p, seed=train_cfg.seed) for p in (train_pack, val_pack))
    common = dict(batch_size=train_cfg.batch_size, seed=train_cfg.seed, device=device)
    source = train_set
    root = resolve_data(data.name)
    if kind == "jpeg":  # the files themselves, decoded by nvJPEG (the pack only fixes the class list)
        source, _ = scan_split(
            root,
            data.train_split,
            train_set.class_ids,
            max_per_class=data.max_per_class,
            ignore_unknown=bool(data.max_classes),
        )
    train_loader = make_fast_loader(kind, source, data, train=True, **common)
    val_loader = make_fast_loader(kind if kind != "jpeg" else "packed", val_set, data, train=False, **common)
    bundle = DataBundle(train_set, val_set, train_set.classes, train_set.class_ids, str(root))  # type: ignore[arg-type]
    return RunData(bundle, train_loader, val_loader)


def run_fit(recipe, device: torch.device, log) -> dict:
    try:
        import albumentations  # noqa: F401
    except ImportError:
        return {"history": [], "prep_s": 0.0, "loader": "skipped: albumentations is not installed"}
    from tlkit.engine import fit

    out = tempfile.mkdtemp(prefix="tlkit-tta-fit-")
    recipe = replace(recipe, train=replace(recipe.train, out=out, device=device.type))
    t0 = time.perf_counter()
    result = fit(recipe, quiet=True)
    total = time.perf_counter() - t0
    history, elapsed = [], 0.0
    for row in result.history:
        elapsed += row["seconds"]
        history.append({"epoch": row["epoch"], "seconds": elapsed, "val_top1": row.get("val_top1")})
    log(f"fit: top1 {100 * history[-1]['val_top1']:.2f}% in {total:.1f}s (incl. setup)")
    return {"history": history, "prep_s": 0.0, "loader": "engine.fit: DataLoader + albumentations", "total_s": total}


# ---- summary ------------------------------------------------------------------------------------------------


def time_to(history: list[dict], target: float) -> float | None:
    return next((r["seconds"] for r in history if (r.get("val_top1") or 0) >= target), None)


def summarize(runs: dict, target: float | None) -> tuple[float, list[dict]]:
    best = {name: max((r["val_top1"] or 0) for r in run["history"]) for name, run in runs.items() if run["history"]}
    target = target if target is not None else (min(best.values()) if best else 0.0)
    rows = []
    for name, run in runs.items():
        h = run["history"]
        t = time_to(h, target)
        rows.append(
            {
                "run": name,
                "loader": run["loader"],
                "epochs": len(h),
                "final_top1": h[-1]["val_top1"] if h else None,
                "best_top1": best.get(name),
                "total_s": h[-1]["seconds"] if h else None,
                "time_to_target_s": t,
                "time_to_target_with_prep_s": None if t is None else t + run["prep_s"],
                "prep_s": run["prep_s"],
            }
        )
    return target, rows


def table(target: float, rows: list[dict]) -> str:
    def f(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    def pct(v):
        return None if v is None else 100 * v

    lines = [
        f"| run | data path | epochs | final top-1 % | train+eval s | s to {100 * target:.1f}% top-1 | + packing s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['loader']} | {r['epochs']} | {f(pct(r['final_top1']), '.2f')} | {f(r['total_s'])} | "
            f"{f(r['time_to_target_s'])} | {f(r['time_to_target_with_prep_s'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="imagenet")
    p.add_argument("--runs", default="reference,tlkit", help="comma-separated: reference, tlkit, fit")
    p.add_argument("--loader", default="auto", help="tlkit run: auto | gpu | packed | cpu")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--img-size", type=int)
    p.add_argument("--max-classes", type=int)
    p.add_argument("--max-per-class", type=int)
    p.add_argument("--workers", type=int, help="DataLoader workers (reference; cpu loader)")
    p.add_argument(
        "--target",
        type=float,
        help="top-1 to time, a fraction (0.4 = 40 %%); default: the lowest best top-1 of the runs",
    )
    p.add_argument("--set", action="append", default=[], help="recipe override key=value (both loops)")
    p.add_argument("--packs", help="where packs go (default: a temp folder)")
    p.add_argument("--smoke", action="store_true", help="10 classes x 20 images, 32 px, 1 epoch, batch 16")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/<date>-<device>-tta.json + .md")
    p.add_argument("--out")
    args = p.parse_args(argv)

    from tlkit.data.loader import default_workers

    device = _device(args.device)
    overrides = parse_set(args.set)
    recipe = load_recipe(args.recipe, overrides, cuda=device.type == "cuda")
    changes = {
        "data": {"max_classes": 10, "max_per_class": 20, "img_size": 32} if args.smoke else {},
        "train": {"epochs": 1, "batch_size": 16} if args.smoke else {},
    }
    for key, section, field in (
        ("epochs", "train", "epochs"),
        ("batch_size", "train", "batch_size"),
        ("img_size", "data", "img_size"),
        ("max_classes", "data", "max_classes"),
        ("max_per_class", "data", "max_per_class"),
    ):
        if getattr(args, key) is not None:
            changes[section][field] = getattr(args, key)
    workers = args.workers if args.workers is not None else (0 if args.smoke else default_workers())
    changes["data"]["num_workers"] = workers
    recipe = replace(
        recipe,
        data=replace(recipe.data, **changes["data"]),
        train=replace(recipe.train, device=device.type, **changes["train"]),
    )
    torch.manual_seed(recipe.train.seed)
    pack_root = Path(args.packs or tempfile.mkdtemp(prefix="tlkit-packs-"))

    def log(msg: str) -> None:
        print(msg, flush=True)

    runs = {}
    for name in [r for r in args.runs.split(",") if r]:
        torch.manual_seed(recipe.train.seed)
        with _precision_flags_kept():
            if name == "reference":
                runs[name] = run_reference(recipe, device, workers, log)
            elif name == "tlkit":
                runs[name] = run_tlkit(recipe, device, args.loader, pack_root, log)
            elif name == "fit":
                runs[name] = run_fit(recipe, device, log)
            else:
                raise SystemExit(f"unknown run {name!r}; use reference, tlkit, fit")
    target, rows = summarize(runs, args.target)
    from speed import device_name, device_slug

    result = {
        "schema": 1,
        "date": date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__,
        "recipe": {
            "name": recipe.name,
            "arch": recipe.model.arch,
            "img_size": recipe.data.img_size,
            "epochs": recipe.train.epochs,
            "batch_size": recipe.train.batch_size,
            "max_classes": recipe.data.max_classes,
            "max_per_class": recipe.data.max_per_class,
            "progressive_min_size": recipe.train.progressive_min_size,
            "tta_flip": recipe.train.tta_flip,
            "compile": recipe.model.compile,
        },
        "target_top1": target,
        "summary": rows,
        "runs": runs,
    }
    print()
    print(table(target, rows), flush=True)
    if args.save or args.out:
        default = Path(__file__).parent / "results" / f"{result['date']}-{device_slug(device)}-tta.json"
        path = Path(args.out or default)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        path.with_suffix(".md").write_text(table(target, rows) + "\n")
        print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
