"""Soak test of the traffic-signs demo: many clients, many requests, good and bad inputs mixed.

    python benchmarks/demo_soak.py                                   # trains a small stand-in checkpoint
    python benchmarks/demo_soak.py --checkpoint runs/.../best.pt --clients 8 --requests 200 --out soak.json

Starts `apps/traffic-signs/app.py` in a subprocess (its real queue and concurrency limit; the server and
stand-in helpers are `demo_load.py`'s) and runs `--clients` gradio_client clients in parallel threads, each
sending `--requests` requests one after another: GTSRB val images, and every `--bad-every`-th request a bad
input (a text file named .png, a truncated PNG, an empty file, a 20000x20000 PNG), in rotation.

An error is any good request that fails or any bad request that is not refused with its message: must be 0.
Reported: errors, the server's resident memory (VmRSS) after warm-up and at the end, its peak (VmHWM),
p50/p95/max latency of the good requests (upload, queue wait, prediction + Grad-CAM, overlay download) and
of the refusals, requests/s. Everything runs on 127.0.0.1 with no network access.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_load import App, percentile, stand_in_checkpoint  # noqa: E402

from tlkit.paths import data_root  # noqa: E402

BAD_MESSAGES = {  # what the demo must answer for each bad input
    "text.png": "not an image file",
    "truncated.png": "corrupt or truncated",
    "empty.png": "empty.png",
    "huge.png": "image too large",
}


def rss_mb(pid: int) -> dict[str, float]:
    """The process's resident memory now and at its peak, in MiB (Linux /proc)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def bad_inputs(folder: Path, good: Path) -> list[Path]:
    """The bad files, written once into `folder` (the huge PNG is ~0.4 MB on disk, 400 megapixels decoded)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_apps import huge_png

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "empty.png").write_bytes(b"")
    huge_png(folder / "huge.png")
    return [folder / name for name in BAD_MESSAGES]


def soak(app: App, good: list[Path], bad: list[Path], clients: int, requests: int, bad_every: int) -> dict:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    ok_latency: list[float] = []
    bad_latency: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def worker(c: int) -> None:
        client = Client(app.url, verbose=False, download_files=tempfile.mkdtemp(prefix="demo-soak-"))
        start.wait()
        for j in range(requests):
            n = c * requests + j
            is_bad = bad_every > 0 and n % bad_every == bad_every - 1
            sent = bad[(n // bad_every) % len(bad)] if is_bad else good[n % len(good)]
            t0 = time.perf_counter()
            try:
                top5, overlay = client.predict(handle_file(str(sent)), api_name="/predict")
                problem = "a bad input was accepted" if is_bad else ("" if top5.get("label") else "no label")
                if not problem and not Path(overlay).is_file():
                    problem = "no overlay file"
            except AppError as e:
                want = BAD_MESSAGES.get(sent.name) if is_bad else None
                problem = "" if want and want in str(e) else f"AppError: {str(e)[:120]}"
            except Exception as e:  # noqa: BLE001 - counted: this is what the soak measures
                problem = f"{type(e).__name__}: {str(e)[:120]}"
            with lock:
                if problem:
                    errors.append(f"{sent.name}: {problem}")
                else:
                    (bad_latency if is_bad else ok_latency).append(time.perf_counter() - t0)
        client.close()

    # the server's memory as the soak goes: (requests done, MiB) about every 5 s; growth that levels off is the
    # allocator and caches warming up, growth in step with the requests would be a leak
    memory: list[tuple[int, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(5.0):
            with lock:
                n = len(ok_latency) + len(bad_latency) + len(errors)
            memory.append((n, round(rss_mb(app.proc.pid)["VmRSS"], 1)))

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()

    def stats(values: list[float]) -> dict:
        if not values:
            return {"n": 0}
        return {
            "n": len(values),
            "p50_s": round(percentile(values, 0.5), 3),
            "p95_s": round(percentile(values, 0.95), 3),
            "max_s": round(max(values), 3),
        }

    return {
        "clients": clients,
        "requests_per_client": requests,
        "errors": len(errors),
        "error_samples": errors[:10],
        "good": stats(ok_latency),
        "refused_bad": stats(bad_latency),
        "wall_s": round(wall, 1),
        # at about each tenth of the requests: (requests done, server VmRSS MiB)
        "rss_mb_by_requests": [memory[int(i * (len(memory) - 1) / 10)] for i in range(11)] if memory else [],
        "requests_per_s": round(clients * requests / wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="traffic-signs best.pt (default: train a stand-in)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="per client")
    parser.add_argument("--bad-every", type=int, default=5, help="every n-th request is a bad input (0: none)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tlkit-demo-soak-"))
    checkpoint = args.checkpoint or stand_in_checkpoint("traffic-signs", work)
    good = sorted((data_root() / "gtsrb" / "val").rglob("*.png"))[::7]
    bad = bad_inputs(work / "bad", good[0])
    app = App("traffic-signs", checkpoint, work)
    try:
        from gradio_client import Client, handle_file

        Client(app.url, verbose=False).predict(handle_file(str(good[0])), api_name="/predict")  # warm-up
        before = rss_mb(app.proc.pid)
        result = soak(app, good, bad, args.clients, args.requests, args.bad_every)
        after = rss_mb(app.proc.pid)
    finally:
        app.stop()
    result.update(
        checkpoint=str(checkpoint),
        server_rss_mb_before=round(before["VmRSS"], 1),
        server_rss_mb_after=round(after["VmRSS"], 1),
        server_rss_mb_peak=round(after["VmHWM"], 1),
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
    )
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
