"""Training throughput: tlkit's engine beside baselines, in one process, as a markdown table + JSON.

    python benchmarks/train_speed.py --preset smoke            # CI: resnet18 @32, 2 steps, seconds on CPU
    python benchmarks/train_speed.py --preset cpu --repeats 3  # engine overhead on CPU (resnet18 @64, batch 32)
    python benchmarks/train_speed.py --preset gpu --save \\
        --pack /tmp/packs/imagenet_sample-256 --tile 10000 --jpeg-root imagenet_sample --jpeg-split val

Synthetic rows (see benchmarks/speed.py): plain_fp32, tv_amp, timm_amp_cl(+compile), bare_* and tlkit*.
End-to-end rows feed the engine's `train_one_epoch` from real data:
  e2e_gpu_resident  the pack copied onto the device (`DeviceLoader`),
  e2e_packed        the pack streamed from its memory map (`PackedLoader`),
  e2e_jpeg          JPEG files decoded by nvJPEG (`JpegLoader`, `--jpeg-root`),
each with the same precision/compile setting as the best synthetic tlkit row of the preset.
`--save` writes benchmarks/results/<yyyy-mm-dd>-<device>.json and a .md table beside it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speed import BenchConfig, format_table, resolve, results_path, run_benchmark, write_result  # noqa: E402

PRESETS = {
    "smoke": BenchConfig(
        arch="resnet18",
        img_size=32,
        batch_size=4,
        steps=2,
        warmup=1,
        num_classes=10,
        variants=("plain_fp32", "tv_amp", "timm_amp_cl", "bare_nchw", "tlkit"),
        matmul_n=128,
    ),
    "cpu": BenchConfig(
        arch="resnet18",
        img_size=64,
        batch_size=32,
        steps=8,
        warmup=2,
        num_classes=200,
        variants=("bare_nchw", "tlkit_nchw", "bare_cl", "tlkit", "plain_fp32"),
        matmul_n=1024,
    ),
    "gpu": BenchConfig(
        arch="resnet50",
        img_size=224,
        batch_size=256,
        steps=30,
        warmup=10,
        num_classes=1000,
        variants=("plain_fp32", "tv_amp", "timm_amp_cl", "tlkit", "timm_amp_cl_compile", "tlkit_compile"),
    ),
}


def tile_pack(src: str | Path, out: str | Path, count: int) -> Path:
    """A pack of `count` rows made by repeating `src`'s rows (a small sample standing in for a big set,
    so the memory-map path reads as many distinct pages as a real epoch would)."""
    import json

    from tlkit.data.packed import PackedDataset

    ds = PackedDataset(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = ds.size
    images = np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=np.uint8, shape=(count, s, s, 3))
    reps = np.arange(count) % len(ds)
    for i in range(0, count, 1024):
        images[i : i + 1024] = ds.read(reps[i : i + 1024])
    images.flush()
    np.save(out / "labels.npy", ds.labels[reps].astype(np.int64))
    meta = {**ds.meta, "count": count, "failed": 0, "tiled_from": str(src)}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def end_to_end_loaders(args, cfg: BenchConfig) -> dict:
    """Row name -> `bench_end_to_end` arguments for the data paths asked for."""
    from tlkit.config import DataConfig
    from tlkit.data.data_path import make_fast_loader
    from tlkit.data.packed import PackedDataset

    device = resolve(cfg.device)
    compile = device.type == "cuda" and not args.no_compile
    data = DataConfig(img_size=cfg.img_size, scale_min=0.08, hflip=0.5)
    common = dict(batch_size=cfg.batch_size, train=True, seed=0, device=device)
    loaders = {}
    if args.pack:
        pack = Path(args.pack)
        if args.tile:
            pack = tile_pack(pack, Path(tempfile.mkdtemp(prefix="tlkit-tiled-")) / pack.name, args.tile)
        ds = PackedDataset(pack)
        desc = f"{len(ds)} x {ds.size}px pack, RRC+flip on device"
        extra = dict(compile=compile, num_classes=len(ds.class_ids))
        loaders["e2e_gpu_resident"] = dict(
            loader=make_fast_loader("gpu", ds, data, **common), description="resident: " + desc, **extra
        )
        loaders["e2e_packed"] = dict(
            loader=make_fast_loader("packed", ds, data, **common), description="memmap: " + desc, **extra
        )
    if args.jpeg_root:
        from tlkit.data.datasets import scan_split
        from tlkit.paths import resolve_data

        samples, ids = scan_split(resolve_data(args.jpeg_root), args.jpeg_split)
        reps = max(1, -(-cfg.batch_size * (cfg.steps + cfg.warmup) // len(samples)))
        loaders["e2e_jpeg"] = dict(
            loader=make_fast_loader("jpeg", samples * reps, data, **common),
            description=f"{len(samples)} JPEGs x{reps}, decode_jpeg on {device.type}",
            compile=compile,
            num_classes=len(ids),
        )
    return loaders


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    p.add_argument("--arch")
    p.add_argument("--img-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--variants", help="comma-separated; empty string: none (end-to-end only)")
    p.add_argument("--repeats", type=int, help="interleaved repeats; rows report the median")
    p.add_argument("--threads", type=int, help="CPU: torch.set_num_threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--pack", help="a pack folder (tlkit data pack) for the end-to-end rows")
    p.add_argument("--tile", type=int, default=0, help="repeat the pack's rows up to this many images first")
    p.add_argument("--jpeg-root", help="dataset folder or name for the JPEG-decode end-to-end row")
    p.add_argument("--jpeg-split", default="val")
    p.add_argument("--no-compile", action="store_true", help="end-to-end rows without torch.compile")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/<date>-<device>.json + .md")
    p.add_argument("--out", help="write the JSON (and .md) here instead")
    args = p.parse_args(argv)

    cfg = replace(PRESETS[args.preset], device=args.device)
    for key in ("arch", "img_size", "batch_size", "steps", "warmup", "repeats", "threads"):
        if getattr(args, key) is not None:
            cfg = replace(cfg, **{key: getattr(args, key)})
    if args.variants is not None:
        cfg = replace(cfg, variants=tuple(v for v in args.variants.split(",") if v))
    result = run_benchmark(cfg, end_to_end_loaders(args, cfg))
    print(format_table(result), flush=True)
    if args.out or args.save:
        path = write_result(result, args.out or results_path(result, Path(__file__).parent / "results"))
        print(f"\nwrote {path} and {path.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
