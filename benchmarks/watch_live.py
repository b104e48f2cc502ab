"""`tlkit watch` on a live stream: frames/s scored, lag and dropped frames against a real-time camera.

    python benchmarks/watch_live.py --checkpoint runs/<surveillance run>/best.pt
    python benchmarks/watch_live.py --checkpoint C --seconds 60 --out watch.json

ffmpeg serves `ucsd_ped2/sample.mp4` (10 fps) in a loop as an MJPEG stream on 127.0.0.1 at its own rate (`-re`),
like an IP camera; `tlkit watch` (a subprocess, exactly as a user runs it) reads it for `--seconds` and prints its
summary: frames scored, frames/s, lag (arrival of a frame to its score: mean, p95, max), frames the stream sent
that were skipped because scoring was busy (dropped), events. The machine's load average before and after is
recorded too: on a shared machine other processes compete for the CPU and the figures say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(video: Path, port: int) -> subprocess.Popen:
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(video), "-c:v", "mjpeg"]
    cmd += ["-q:v", "2", "-f", "mpjpeg", "-listen", "1", f"http://127.0.0.1:{port}/live.mjpg"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(checkpoint: Path, video: Path, seconds: float, threads: int) -> dict:
    port = free_port()
    server = serve(video, port)
    time.sleep(1.0)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    load_before = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "tlkit", "watch", f"http://127.0.0.1:{port}/live.mjpg", "--checkpoint"]
            cmd += [str(checkpoint), "--max-seconds", str(seconds), "--quiet", "--device", "cpu"]
            cmd += ["--events", str(Path(tmp) / "events.jsonl")]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 300)
    finally:
        server.kill()
    lines = [line for line in done.stderr.splitlines() if line.startswith("summary: ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"tlkit watch failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(lines[-1].removeprefix("summary: "))
    summary["stream_fps"] = round(summary["received"] / summary["seconds"], 2)
    summary["kept_fraction"] = round(summary["frames"] / max(summary["received"], 1), 3)
    summary["loadavg_before"], summary["loadavg_after"] = load_before[0], os.getloadavg()[0]
    return summary


def main() -> None:
    from tlkit.paths import data_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="A surveillance checkpoint.")
    parser.add_argument("--video", type=Path, default=data_root() / "ucsd_ped2" / "sample.mp4")
    parser.add_argument("--seconds", type=float, default=60.0, help="How long tlkit watch reads the stream.")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for tlkit watch.")
    parser.add_argument("--out", type=Path, help="Also write the result as JSON here.")
    args = parser.parse_args()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "checkpoint": args.checkpoint.name,
        **run(args.checkpoint, args.video, args.seconds, args.threads),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
