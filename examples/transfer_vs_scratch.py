"""Does pretraining help? Fine-tune a recipe from pretrained weights and from scratch at the same budget.

    python examples/transfer_vs_scratch.py --recipe medical --init runs/pretrain-.../best.pt
    python examples/transfer_vs_scratch.py --recipe traffic-signs --epochs 3 --set data.img_size=32
    python examples/transfer_vs_scratch.py --recipe traffic-signs --published tf_efficientnet_lite0=<weights.pth>

Every run uses the same recipe, data, epochs and seed; only `model.init` differs (and, for `--published ARCH=FILE`,
the architecture those weights belong to: a third row with published ImageNet weights, which also takes the
recipe's `published:` block, as `tlkit finetune` would). Pretrained rows keep the recipe's strategy; the scratch row
trains `full` (freezing a random body would be an unfair baseline). Writes `runs/transfer-vs-scratch-<recipe>.md`
with the val metrics and each run's wall time (seconds, this machine).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from tlkit.checkpoint import newest_run
from tlkit.config import deep_merge, parse_set
from tlkit.paths import runs_dir, set_offline_env
from tlkit.workflows import run_training

METRICS = ("top1", "macro_accuracy", "auroc", "sensitivity", "specificity", "ece", "frame_auroc")


def compare(recipe: str, init: str, overrides: dict, published: tuple[str, str] | None = None) -> list[dict]:
    """One run per init: the own pretrain, scratch, and (given `(arch, weights file)`) published weights."""
    inits = [("pretrained", init, None), ("scratch", "scratch", None)]
    if published:
        inits.append((f"published ({published[0]})", published[1], published[0]))
    rows = []
    for label, weights, arch in inits:
        model = {"init": weights, **({"arch": arch} if arch else {})}
        run_over = deep_merge(overrides, {"model": model})
        if weights == "scratch":
            run_over = deep_merge(run_over, {"finetune": {"strategy": "full"}})
        start = time.perf_counter()
        run_dir = run_training(recipe, run_over, kind="finetune", quiet=True)
        seconds = time.perf_counter() - start
        metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        rows.append(
            {
                "init": label,
                "weights": weights,
                "run": str(run_dir),
                "budget": _budget(cfg),
                "seconds": round(seconds),
                **{k: metrics[k] for k in METRICS if metrics.get(k) is not None},
            }
        )
    return rows


def _budget(cfg: dict) -> str:
    """What a run spent, from its config.yaml: data, architecture, size, epochs, strategy, seed."""
    if cfg.get("task") == "anomaly":
        work = "memory bank, no training"
    else:
        work = f"{cfg['train']['epochs']} epochs, {cfg['finetune']['strategy']}"
    data, arch, size, seed = cfg["data"]["name"], cfg["model"]["arch"], cfg["data"]["img_size"], cfg["train"]["seed"]
    return f"{data}, {arch} @ {size} px, {work}, seed {seed}"


def to_markdown(recipe: str, rows: list[dict]) -> str:
    keys = [k for k in METRICS if any(k in r for r in rows)]
    lines = [
        f"# transfer vs scratch: {recipe}",
        "",
        "| init | budget | " + " | ".join(keys) + " | seconds | run |",
        "|---|---|" + "---|" * (len(keys) + 2),
    ]
    for r in rows:
        cells = [f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "-")) for k in keys]
        lines.append(f"| {r['init']} | {r['budget']} | " + " | ".join(cells) + f" | {r['seconds']} | {r['run']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    set_offline_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="medical")
    parser.add_argument("--init", default=None, help="pretrained weights (default: newest pretrain run)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="recipe overrides key=value")
    parser.add_argument(
        "--published", default=None, metavar="ARCH=FILE", help="add a row from published weights, e.g. ImageNet"
    )
    args = parser.parse_args()
    init = args.init or newest_run(kind="pretrain")
    if init is None:
        raise SystemExit("error: no pretrain run in runs/: run `tlkit pretrain` or pass --init <weights>")
    overrides = parse_set(args.sets)
    if args.epochs:
        overrides = deep_merge(overrides, {"train": {"epochs": args.epochs}})
    published = None
    if args.published:
        arch, sep, weights = args.published.partition("=")
        if not sep or not arch or not weights:
            raise SystemExit("error: --published expects ARCH=FILE, e.g. tf_efficientnet_lite0=weights.pth")
        published = (arch, weights)
    rows = compare(args.recipe, str(init), overrides, published)
    data_name = overrides.get("data", {}).get("name")
    name = f"{args.recipe}-{data_name}" if data_name else args.recipe
    table = to_markdown(name, rows)
    out = runs_dir() / f"transfer-vs-scratch-{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)
    print(f"written to {Path(out)}")


if __name__ == "__main__":
    main()
