"""`data.loader: packed` vs `cpu` for the default `tlkit pretrain`, measured beside each other in one run.

Each variant is `tlkit pretrain` itself (the imagenet recipe's CPU defaults: resnet18 @40, batch 64, 2 epochs on
tiny_imagenet_200), differing only in `--set data.loader=...`; the pack is made first by `tlkit data pack` and
timed apart. Variants run in ABBA order (`--rounds 2`: cpu, packed, packed, cpu), so load from other processes
on a shared machine falls on both alike; the table gives each variant's median over its rounds. Per run, from
its own metrics.jsonl and summary.json: img/s per epoch, the data-wait fraction, val top-1 (a fraction), and
the wall time of the whole command (start-up, training, evaluation, report).

    python benchmarks/loader_compare.py --max-classes 20 --rounds 2 --save
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tlkit(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tlkit", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"tlkit {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def one_run(loader: str, round_: int, subset: list[str], pack: Path, base: Path, env: dict) -> dict:
    out = base / f"{loader}-{round_}"
    sets = [*subset, f"data.loader={loader}", f"data.pack={pack}"]
    args = ["pretrain", "--quiet", "--device", "cpu", "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    wall = tlkit(args, env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "loader": loader,
        "round": round_,
        "wall_s": wall,
        "img_per_s": [r["img_per_s"] for r in rows],
        "data_wait_fraction": [r["data_wait_fraction"] for r in rows],
        "train_s": sum(r["seconds"] for r in rows),
        "val_top1": rows[-1].get("val_top1"),
        "train_loss": rows[-1]["train_loss"],
    }


def _median(runs: list[dict], key: str) -> float:
    """Median over runs of each run's median over epochs (or of its single value)."""
    return statistics.median(statistics.median(r[key]) if isinstance(r[key], list) else r[key] for r in runs)


def table(runs: list[dict]) -> str:
    head = (
        "| loader | runs | img/s (median epoch) | data wait (fraction) | epochs (s) | whole command (s) | val top-1 |"
    )
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- |"]
    for loader in ("cpu", "packed"):
        mine = [r for r in runs if r["loader"] == loader]
        lines.append(
            f"| {loader} | {len(mine)} | {_median(mine, 'img_per_s'):.1f} | {_median(mine, 'data_wait_fraction'):.3f}"
            f" | {_median(mine, 'train_s'):.0f} | {_median(mine, 'wall_s'):.0f} | {_median(mine, 'val_top1'):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-classes", type=int, default=0, help="the first N classes of tiny_imagenet (0: all 200)")
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds: each variant runs this many times")
    p.add_argument("--threads", type=int, default=0, help="OMP threads per run (0: torch's default)")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/<date>-cpu-loaders.json/.md")
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="tlkit-loaders-"))
    env = {**os.environ, "TLKIT_RUNS": str(base / "runs")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    subset = [f"data.max_classes={args.max_classes}"] if args.max_classes else []
    pack_s = tlkit(
        ["data", "pack", "--quiet", "--out", str(base / "packs"), *[a for s in subset for a in ("--set", s)]], env
    )
    order = [("cpu", "packed") if r % 2 == 0 else ("packed", "cpu") for r in range(args.rounds)]
    runs = []
    for r, pair in enumerate(order):
        for loader in pair:
            runs.append(one_run(loader, r, subset, base / "packs", base, env))
            print(json.dumps(runs[-1]), flush=True)
    md = table(runs)
    load = os.getloadavg()
    print(f"\npack (tlkit data pack, once): {pack_s:.1f} s; load average at the end {load[0]:.1f}\n\n{md}")
    if args.save:
        stem = REPO / "benchmarks" / "results" / f"{date.today()}-cpu-loaders"
        stem.parent.mkdir(parents=True, exist_ok=True)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        info = {"cpus": cpus, "max_classes": args.max_classes, "rounds": args.rounds, "pack_s": pack_s}
        stem.with_suffix(".json").write_text(json.dumps({**info, "load_average": load, "runs": runs}, indent=1))
        stem.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
