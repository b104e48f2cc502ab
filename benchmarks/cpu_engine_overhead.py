"""Engine overhead on a (shared, noisy) CPU: tlkit's train_one_epoch vs a bare loop, NCHW vs channels_last.

    python benchmarks/cpu_engine_overhead.py --rounds 4 --steps 12 --threads 2,1

Same model (tlkit.models.create_model), same uint8 batch, same process; variants interleaved round by
round. Every step is timed on its own (CPU: no asynchrony; the engine's steps through its `on_step`
hook), and the table gives the median step and the best step as img/s. Other processes only ever
add time to a step, so on a shared machine the best step is the closest reading of the uncontended
speed, the median what a run would see at that moment; the load average and CPU pressure are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speed import BenchConfig, _normalized, device_name, engine_setup, synthetic_batch  # noqa: E402


def cpu_pressure() -> float | None:
    try:
        return float(Path("/proc/pressure/cpu").read_text().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def bare_steps(cfg: BenchConfig, channels_last: bool, n: int) -> list[float]:
    from tlkit.models import create_model

    images, targets = synthetic_batch(cfg, torch.device("cpu"))
    x = _normalized(images)
    model = create_model(cfg.arch, cfg.num_classes)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        loss = criterion(model(x), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return times


def engine_steps(cfg: BenchConfig, channels_last: bool, n: int) -> list[float]:
    from speed import RepeatLoader

    from tlkit.engine import train_one_epoch

    device = torch.device("cpu")
    images, targets = synthetic_batch(cfg, device)
    loader = RepeatLoader(images, targets, n)
    run = engine_setup(cfg, device, loader, channels_last=channels_last)
    stamps = [time.perf_counter()]

    def on_step(*_):
        stamps.append(time.perf_counter())

    stamps[0] = time.perf_counter()
    train_one_epoch(
        run.compiled,
        loader,
        run.optimizer,
        run.scheduler,
        run.criterion,
        run.ctx,
        epoch=1,
        recipe=run.recipe,
        on_step=on_step,
    )
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


VARIANTS = {
    "bare NCHW": lambda cfg, n: bare_steps(cfg, False, n),
    "tlkit NCHW": lambda cfg, n: engine_steps(cfg, False, n),
    "bare channels_last": lambda cfg, n: bare_steps(cfg, True, n),
    "tlkit channels_last": lambda cfg, n: engine_steps(cfg, True, n),
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant and round (after 2 warm-up)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", default=str(torch.get_num_threads()), help="comma-separated torch thread counts")
    p.add_argument("--out", help="write the samples and the table as JSON here")
    args = p.parse_args(argv)
    cfg = BenchConfig(arch=args.arch, img_size=args.img_size, batch_size=args.batch_size, num_classes=200)
    threads = [int(t) for t in args.threads.split(",")]
    steps: dict[tuple[int, str], list[float]] = {(t, v): [] for t in threads for v in VARIANTS}
    load = []
    for r in range(args.rounds):
        for t in threads:
            torch.set_num_threads(t)
            for name, run in VARIANTS.items():
                before = (os.getloadavg()[0], cpu_pressure())
                times = run(cfg, args.steps + 2)[2:]
                steps[(t, name)] += times
                load.append({"round": r, "threads": t, "variant": name, "load1": before[0], "psi10": before[1]})
                print(
                    f"round {r} threads {t} {name}: median {args.batch_size / statistics.median(times):.1f} "
                    f"best {args.batch_size / min(times):.1f} img/s (load {before[0]:.2f}, cpu psi {before[1]})",
                    flush=True,
                )
    rows = []
    for (t, name), times in steps.items():
        rows.append(
            {
                "threads": t,
                "variant": name,
                "median_img_s": args.batch_size / statistics.median(times),
                "best_img_s": args.batch_size / min(times),
                "steps": len(times),
            }
        )
    lines = [
        f"{device_name(torch.device('cpu'))}, torch {torch.__version__}, {args.arch} @{args.img_size} px, "
        f"batch {args.batch_size}, fp32; {args.rounds} interleaved rounds x {args.steps} steps",
        "",
        "| threads | variant | img/s, median step | img/s, best step |",
        "| ---: | --- | ---: | ---: |",
    ]
    lines += [f"| {r['threads']} | {r['variant']} | {r['median_img_s']:.1f} | {r['best_img_s']:.1f} |" for r in rows]
    print("\n" + "\n".join(lines))
    result = {"rows": rows, "load": load, "table": "\n".join(lines), "torch": torch.__version__}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
