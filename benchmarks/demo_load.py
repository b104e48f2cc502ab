"""Load test for the Gradio demos: concurrent clients against an image app, and video frames/s.

    python benchmarks/demo_load.py                               # newest runs, or stand-in checkpoints
    python benchmarks/demo_load.py --app traffic-signs --checkpoint runs/.../best.pt --clients 8 --requests 25
    python benchmarks/demo_load.py --surveillance-checkpoint runs/.../best.pt --video-runs 3 --out load.json

Part 1 starts `apps/<app>/app.py` in a subprocess (its real settings: queue, concurrency limit) and runs
`--clients` gradio_client clients in parallel threads, each sending `--requests` images from the
dataset's val split one after another. Latency is what a client sees: upload, queue wait, prediction +
Grad-CAM, download of the overlay. Reported: errors, p50/p95/max latency, requests/s.

Part 2 starts the surveillance app and streams `ucsd_ped2/sample.mp4` (60 frames) through it
`--video-runs` times; frames/s = 60 / wall time of the whole request, and the app's own figure.

Without checkpoints the script makes stand-ins with the recipes' architecture and input size: the image
model is fine-tuned on a few images for one epoch (latency depends on the network and the input size,
not on how well it was trained); the surveillance bank is fitted with the recipe's settings from
scratch-initialised features (same bank size, so the same kNN cost) and without a val threshold.
Everything runs on 127.0.0.1 with no network access.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tlkit.paths import data_root, set_offline_env  # noqa: E402

set_offline_env()

DATASET = {"medical": ("chest_xray", "*.jpeg"), "traffic-signs": ("gtsrb", "*.png")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """`apps/<name>/app.py --checkpoint ...` in a subprocess, until `stop()`."""

    def __init__(self, name: str, checkpoint: Path, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = workdir / f"{name}.log"
        env = dict(os.environ, GRADIO_TEMP_DIR=str(workdir / "gradio"), PYTHONPATH=str(REPO))
        cmd = [sys.executable, str(REPO / "apps" / name / "app.py"), "--checkpoint", str(checkpoint)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} app exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "config", timeout=5):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{name} app not ready after 300 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def stand_in_checkpoint(recipe: str, workdir: Path) -> Path:
    """A quickly fine-tuned checkpoint with the recipe's architecture and input size."""
    from tlkit.workflows import run_training

    out = workdir / f"finetune-{recipe}-standin"
    if recipe == "surveillance":
        # the recipe's own bank size (400 training frames -> up to 16384 rows): kNN cost grows with it
        overrides = {"model": {"init": "scratch"}, "data": {"val_split": ""}}
    else:
        overrides = {
            "model": {"init": "scratch"},
            "data": {"max_per_class": 8, "num_workers": 0},
            "train": {"epochs": 1, "batch_size": 16},
        }
    overrides.setdefault("train", {})["out"] = str(out)
    run_training(recipe, overrides, kind="finetune", quiet=True)
    return out / "best.pt"


def newest(recipe: str) -> Path | None:
    from tlkit.checkpoint import newest_run

    return newest_run(kind="finetune", recipe=recipe)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def image_load(app: App, images: list[Path], clients: int, requests: int) -> dict:
    from gradio_client import Client, handle_file

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def worker(i: int) -> None:
        client = Client(app.url, verbose=False, download_files=tempfile.mkdtemp(prefix="demo-load-"))
        start.wait()
        for j in range(requests):
            image = images[(i * requests + j) % len(images)]
            t0 = time.perf_counter()
            try:
                client.predict(handle_file(str(image)), api_name="/predict")
                with lock:
                    latencies.append(time.perf_counter() - t0)
            except Exception as e:  # counted, not fatal: this is what the benchmark measures
                with lock:
                    errors.append(f"{type(e).__name__}: {str(e)[:120]}")

    # one warm-up request (first Grad-CAM builds its model copy), not counted
    Client(app.url, verbose=False).predict(handle_file(str(images[0])), api_name="/predict")
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests_per_client": requests,
        "requests": clients * requests,
        "ok": len(latencies),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "p50_s": percentile(latencies, 0.50) if latencies else None,
        "p95_s": percentile(latencies, 0.95) if latencies else None,
        "max_s": max(latencies) if latencies else None,
        "mean_s": statistics.fmean(latencies) if latencies else None,
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
    }


def video_load(app: App, video: Path, runs: int) -> dict:
    from gradio_client import Client, handle_file

    client = Client(app.url, verbose=False, download_files=tempfile.mkdtemp(prefix="demo-load-"))
    results = []
    for _ in range(runs):
        t0 = time.perf_counter()
        job = client.submit(handle_file(str(video)), None, api_name="/analyze")
        status, *_ = job.result(timeout=1800)
        wall = time.perf_counter() - t0
        frames = int(status.split(":")[1].split("frames")[0].strip().split("/")[-1])
        app_fps = float(status.split("frames/s")[0].rsplit(",", 1)[-1])
        results.append({"frames": frames, "wall_s": wall, "frames_per_s": frames / wall, "app_frames_per_s": app_fps,
                        "updates": len(job.outputs()), "status": status})  # fmt: skip
    return {
        "runs": results,
        "frames_per_s_best": max(r["frames_per_s"] for r in results),
        "frames_per_s_mean": statistics.fmean(r["frames_per_s"] for r in results),
    }


def describe(checkpoint: Path) -> dict:
    from tlkit.demo import checkpoint_meta

    meta = checkpoint_meta(checkpoint)
    info = {"checkpoint": str(checkpoint), "arch": meta.get("arch"), "img_size": meta["preprocessing"]["img_size"]}
    if meta.get("task") == "anomaly":
        import torch

        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["anomaly"]
        info["bank_rows"] = int(state["bank"].shape[0])
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", choices=sorted(DATASET), default="medical")
    parser.add_argument("--checkpoint", type=Path, help="default: newest run of --app, else a stand-in")
    parser.add_argument("--surveillance-checkpoint", type=Path, help="default: newest run, else a stand-in")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--video-runs", type=int, default=3)
    parser.add_argument("--skip-video", action="store_true")
    parser.add_argument("--skip-images", action="store_true", help="only the surveillance video part")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="tlkit-demo-load-"))
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average_start": os.getloadavg(),
    }
    import torch

    result["machine"]["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None

    if not args.skip_images:
        checkpoint = args.checkpoint or newest(args.app)
        result["image_checkpoint_stand_in"] = checkpoint is None
        if checkpoint is None:
            print(f"no {args.app} run found: fine-tuning a stand-in checkpoint (recipe arch and input size)")
            checkpoint = stand_in_checkpoint(args.app, workdir)
        dataset, pattern = DATASET[args.app]
        images = sorted((data_root() / dataset / "val").rglob(pattern))[::7][:64]
        app = App(args.app, checkpoint, workdir)
        try:
            result["image_app"] = {"app": args.app, **describe(checkpoint),
                                   **image_load(app, images, args.clients, args.requests)}  # fmt: skip
        finally:
            app.stop()
        r = result["image_app"]
        print(
            f"{args.app}: {r['clients']} clients x {r['requests_per_client']} requests: {r['errors']} errors, "
            f"p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s, max {r['max_s']:.2f} s, {r['requests_per_s']:.2f} req/s "
            f"({r['arch']} @ {r['img_size']} px)"
        )

    if not args.skip_video:
        surv = args.surveillance_checkpoint or newest("surveillance")
        result["video_checkpoint_stand_in"] = surv is None
        if surv is None:
            print("no surveillance run found: fitting a stand-in memory bank (recipe settings, a few minutes)")
            surv = stand_in_checkpoint("surveillance", workdir)
        app = App("surveillance", surv, workdir)
        try:
            video = data_root() / "ucsd_ped2" / "sample.mp4"
            result["video_app"] = {**describe(surv), **video_load(app, video, args.video_runs)}
        finally:
            app.stop()
        v = result["video_app"]
        print(
            f"surveillance: sample.mp4 (60 frames) {v['frames_per_s_mean']:.1f} frames/s mean, "
            f"{v['frames_per_s_best']:.1f} best over {len(v['runs'])} runs "
            f"({v['arch']} @ {v['img_size']} px, bank {v['bank_rows']} rows)"
        )
    result["load_average_end"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"results: {args.out}")


if __name__ == "__main__":
    main()
