"""End to end: `tlkit data pack` + `tlkit pretrain` themselves, as a user runs them, timed from the run's files.

Two runs (the `e2e` stage of run_gpu.sh):
- `tiny64`: the imagenet recipe on tiny_imagenet_200 (its `gpu:` block on CUDA: resnet18 @64, batch 256, compiled),
  packed at 64 px, `data.loader` auto (the pack is resident on the GPU there), 16 epochs.
- `r50_224`: ResNet-50 @224, batch 256, compiled, bf16, from the imagenet_sample images tiled (linked N times
  into a train split) and packed at 224 px; val is the untiled sample. Its steady img/s is `pretrain_e2e_img_s`.
  With `--also-packed`, the same again with `data.loader=packed` (memory map instead of GPU-resident).

Per epoch, from the run's own metrics.jsonl: img/s, data-wait fraction (time the engine waited for batches),
top-1 (a fraction). The results are merged into the day's results JSON (`<date>-<device>.json`, the one
train_speed.py writes) under `pretrain_e2e` and `pretrain_e2e_img_s` (median img/s of the epochs after the first,
which holds compilation). `--smoke`: CPU, toy sizes (3 classes, resnet10t @32, packed loader), seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tlkit(*args: str, log) -> float:
    """`python -m tlkit ARGS` in a child process (what a user runs); returns its wall time; raises on failure."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "tlkit", *args]
    log("$ tlkit " + " ".join(args))
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = "\n".join(done.stdout.splitlines()[-25:])
    log(tail)
    if done.returncode != 0:
        raise RuntimeError(f"tlkit {args[0]} failed (exit {done.returncode})")
    return time.perf_counter() - t0


def sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def tile_dataset(src: Path, dest: Path, images: int, max_classes: int = 0) -> Path:
    """`dest/train/<class>/<k>-<file>`: links to `src/val`'s images, repeated up to `images` files in all
    (so an epoch reads as many rows as a real dataset would); `dest/val` links the original classes."""
    classes = sorted(p for p in (src / "val").iterdir() if p.is_dir())[: max_classes or None]
    files = [f for c in classes for f in sorted(c.iterdir()) if f.is_file()]
    reps = max(1, -(-images // len(files)))
    if (dest / "train").is_dir():
        return dest
    for k in range(reps):
        for f in files:
            (dest / "train" / f.parent.name).mkdir(parents=True, exist_ok=True)
            (dest / "train" / f.parent.name / f"{k}-{f.name}").symlink_to(f)
    (dest / "val").mkdir(parents=True, exist_ok=True)
    for c in classes:
        (dest / "val" / c.name).symlink_to(c, target_is_directory=True)
    return dest


def epochs_of(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keep = ("epoch", "img_per_s", "data_wait_fraction", "val_top1", "train_loss", "seconds")
    return [{k: r.get(k) for k in keep} for r in rows]


def summarise(name: str, run: Path, wall: dict, note: str) -> dict:
    rows = epochs_of(run)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    steady = [r["img_per_s"] for r in rows[1:]] or [r["img_per_s"] for r in rows]
    return {
        "name": name,
        "what": note,
        "loader": summary.get("data_loader"),
        "epochs": rows,
        "steady_img_s": statistics.median(steady) if steady else None,
        "data_wait_fraction": statistics.median(r["data_wait_fraction"] for r in rows[1:] or rows) if rows else None,
        "best_top1": summary.get("best_top1"),
        **wall,
    }


def run_all(args, log) -> list[dict]:
    smoke = args.smoke
    packs = Path(args.packs)
    out = []
    common = ["--quiet"] + (["--device", "cpu"] if smoke else [])
    # 1) tiny_imagenet, the imagenet recipe (its gpu block on CUDA), packed at 64 px
    tiny_sets = ["data.max_classes=3", "data.max_per_class=10"] if smoke else []
    size = "32" if smoke else "64"
    pack_s = tlkit(
        "data", "pack", "--size", size, "--out", str(packs / "tiny"), "--overwrite", *sets(*tiny_sets), log=log
    )
    run = Path(args.runs) / "tiny64"
    train = (
        ["--epochs", "1", "--arch", "resnet10t", "--batch-size", "10", "--img-size", "32"]
        if smoke
        else ["--epochs", str(args.tiny_epochs)]
    )
    loader = ["data.loader=packed"] if smoke else []  # auto on CUDA: resident on the GPU
    wall = tlkit(
        "pretrain",
        *common,
        *train,
        "--out",
        str(run),
        *sets(f"data.pack={packs / 'tiny'}", *tiny_sets, *loader),
        log=log,
    )
    out.append(
        summarise("tiny64", run, {"pack_s": pack_s, "wall_s": wall}, "imagenet recipe, tiny_imagenet_200 packed")
    )
    # 2) ResNet-50 @224 from the imagenet_sample pack, tiled
    from tlkit.paths import data_root

    tile = 20 if smoke else args.tile
    tiled = tile_dataset(data_root() / "imagenet_sample", packs / f"imagenet_tiled-{tile}", tile, 4 if smoke else 0)
    r50 = (
        ["--arch", "resnet10t", "--img-size", "32", "--batch-size", "10", "--epochs", "1"]
        if smoke
        else ["--arch", "resnet50", "--img-size", "224", "--batch-size", "256", "--epochs", str(args.r50_epochs)]
    )
    r50_sets = [f"data.pack={packs / 'tiled'}", "data.crop_pct=0.875", "optim.warmup_epochs=0"]
    size = "32" if smoke else "224"
    pack_s = tlkit(
        "data",
        "pack",
        "--data",
        str(tiled),
        "--size",
        size,
        "--out",
        str(packs / "tiled"),
        "--overwrite",
        *sets("data.crop_pct=0.875"),
        log=log,
    )
    variants = [("r50_224", ["data.loader=packed"] if smoke else [])]
    if args.also_packed and not smoke:
        variants.append(("r50_224_memmap", ["data.loader=packed"]))
    for name, extra in variants:
        run = Path(args.runs) / name
        wall = tlkit(
            "pretrain", *common, *r50, "--data", str(tiled), "--out", str(run), *sets(*r50_sets, *extra), log=log
        )
        note = f"ResNet-50 @224 (smoke: resnet10t @32), imagenet_sample tiled to {tile} images, packed; val = the "
        note += "untiled images, which train too: its top-1 shows the run works, not accuracy"
        out.append(summarise(name, run, {"pack_s": pack_s, "wall_s": wall}, note))
    return out


def merge(results_path: Path, runs: list[dict], seed: Path | None) -> dict:
    """Fold the runs into the day's results JSON (train_speed's), starting from `seed` when given (the file an
    earlier call of run_gpu.sh produced, copied back into benchmarks/results/)."""
    data: dict = {}
    if results_path.exists():
        data = json.loads(results_path.read_text())
    elif seed is not None and seed.exists():
        data = json.loads(seed.read_text())
    if "torch" not in data:
        import torch

        data["torch"] = torch.__version__
        data["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    r50 = [r for r in runs if r["name"].startswith("r50_224") and r["steady_img_s"]]
    data["pretrain_e2e_img_s"] = max((r["steady_img_s"] for r in r50), default=None)
    synthetic = data.get("resnet50_224_train_img_s")
    if synthetic and data["pretrain_e2e_img_s"]:
        data["pretrain_e2e_ratio"] = data["pretrain_e2e_img_s"] / synthetic  # a fraction of the synthetic step
    data["pretrain_e2e"] = runs
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(data, indent=1))
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results JSON to merge into (<date>-<device>.json)")
    p.add_argument("--seed-from", help="an earlier results JSON to start from when --out does not exist yet")
    p.add_argument("--packs", default="/tmp/tlkit-packs", help="folder for the packs and the tiled dataset")
    p.add_argument("--runs", default="/tmp/tlkit-e2e-runs", help="folder for the run folders")
    p.add_argument("--tiny-epochs", type=int, default=16)
    p.add_argument("--r50-epochs", type=int, default=3)
    p.add_argument("--tile", type=int, default=20000, help="images in the tiled ResNet-50 train split")
    p.add_argument("--also-packed", action="store_true", help="ResNet-50 a second time from the memory map")
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes")
    args = p.parse_args()
    os.environ.setdefault("TLKIT_RUNS", args.runs)

    def log(msg: str) -> None:
        print(msg, flush=True)

    runs = run_all(args, log)
    data = merge(Path(args.out), runs, Path(args.seed_from) if args.seed_from else None)
    for r in runs:
        per_epoch = ", ".join(
            f"{e['epoch']}: {e['img_per_s']:.0f} img/s, wait {e['data_wait_fraction']:.2f}, "
            f"top1 {e.get('val_top1') or 0:.3f}"
            for e in r["epochs"]
        )
        log(f"{r['name']} ({r['loader']}): steady {r['steady_img_s']:.0f} img/s; {per_epoch}")
    log(f"pretrain_e2e_img_s {data['pretrain_e2e_img_s']} -> {args.out}")


if __name__ == "__main__":
    main()
