"""`tlkit watch` on real footage: UCSD Ped2's sample.mp4 as a file (events equal the demo's stream analysis),
and as a live MJPEG stream served on 127.0.0.1 by ffmpeg, including a server restart (reconnect) and a webhook
received by a local HTTP server. The checkpoint is the small surveillance one the app tests use."""

from __future__ import annotations

import http.server
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_apps import free_port
from test_predict import IMAGENET_WEIGHTS, shared_base, surveillance_checkpoint
from typer.testing import CliRunner

from tlkit.paths import data_root

SAMPLE = data_root() / "ucsd_ped2" / "sample.mp4"
needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None, reason="ffmpeg not installed (apt-get install ffmpeg)"
)
EVENT_KEYS = ("start_frame", "end_frame", "start_s", "end_s", "peak_frame", "peak_score")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SAMPLE.is_file():
        pytest.skip(f"UCSD Ped2 sample not found at {SAMPLE} (set $TLKIT_DATA)")
    if not IMAGENET_WEIGHTS.is_file():
        pytest.skip(f"ImageNet weights not found at {IMAGENET_WEIGHTS} (the surveillance checkpoint starts there)")
    return surveillance_checkpoint(shared_base(tmp_path_factory))


def test_file_events_equal_the_demo_analysis_with_evidence(checkpoint: Path, tmp_path: Path) -> None:
    import cv2

    from tlkit.data.clips import read_video_frames
    from tlkit.tasks.anomaly import analyze_stream, load_monitor, open_source
    from tlkit.tasks.anomaly.watch import WatchOptions, watch_source

    events_file, out = tmp_path / "events.jsonl", tmp_path / "evidence"
    summary = watch_source(checkpoint, str(SAMPLE), WatchOptions(events=events_file, out=out, device="cpu"))
    events = [json.loads(line) for line in events_file.read_text().splitlines()]

    monitor = load_monitor(checkpoint, device="cpu")
    frames, fps, _ = open_source(str(SAMPLE), None)
    expected = list(analyze_stream(monitor, frames, fps))[-1]["events"]
    assert expected, "the cyclist clip should raise an alert with this checkpoint"
    assert [{k: e[k] for k in EVENT_KEYS} for e in events] == expected
    assert summary["frames"] == 60 and summary["dropped"] == 0 and summary["events"] == len(events)
    assert summary["stopped"] == "end of input"

    # Evidence: the peak PNG is exactly the decoded peak frame; the clip spans the event; nothing half-written.
    video, _ = read_video_frames(SAMPLE)
    for e in events:
        assert e["frames"] == e["end_frame"] - e["start_frame"] + 1 and e["peak_s"] == e["peak_frame"] / 10.0
        peak = cv2.cvtColor(cv2.imread(e["peak_image"]), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(peak, video[e["peak_frame"]])
        assert cv2.imread(e["heatmap_image"]).shape == peak.shape
        cap = cv2.VideoCapture(e["clip"])
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        cap.release()
        assert e["frames"] < n <= 60
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"event_{e['event']:04d}{s}" for e in events for s in ("_peak.png", "_heatmap.png", ".mp4"))


def test_max_seconds_and_realtime_folder_refusal(checkpoint: Path, tmp_path: Path) -> None:
    from tlkit.tasks.anomaly.watch import WatchOptions, watch_source

    summary = watch_source(checkpoint, str(SAMPLE), WatchOptions(max_seconds=0, device="cpu"))
    assert summary["frames"] == 0 and summary["events"] == 0 and summary["stopped"] == "--max-seconds 0"
    with pytest.raises(ValueError, match="frame folder"):
        watch_source(checkpoint, str(tmp_path), WatchOptions(realtime=True, device="cpu"))


def test_bad_checkpoint_and_source_are_one_line(checkpoint: Path, tmp_path: Path) -> None:
    from tlkit.cli import app

    classify = tmp_path / "classify.pt"
    torch.save({**torch.load(checkpoint, weights_only=True), "task": "classify"}, classify)
    port = free_port()  # nothing listens there
    cases = [
        (classify, str(SAMPLE), "anomaly checkpoint"),
        (checkpoint, str(tmp_path / "missing.mp4"), "no such file"),
        (checkpoint, f"http://127.0.0.1:{port}/live.mjpg", "cannot open"),
    ]
    for ckpt, source, message in cases:
        result = CliRunner().invoke(app, ["watch", "--checkpoint", str(ckpt), source, "--device", "cpu"])
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], result.output
        assert "Traceback" not in result.output


class _Hook(http.server.BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _serve_mjpeg(port: int) -> subprocess.Popen:
    # -q:v 2: a good camera's MJPEG; ffmpeg's default quality blurs the cyclist below this small model's threshold.
    # Half speed (5 frames/s): on a CPU shared with other jobs scoring can drop to ~1 frame/s, and a 10 fps cyclist
    # (2.7 s) would then get too few scored frames to make an event; at 5 fps it lasts 5.4 s.
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-readrate", "0.5", "-stream_loop", "-1", "-i", str(SAMPLE)]
    cmd += ["-c:v", "mjpeg", "-q:v", "2", "-f", "mpjpeg", "-listen", "1", f"http://127.0.0.1:{port}/live.mjpg"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait(condition, what: str, log: list[str], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}; watch said:\n" + "".join(log[-30:])
        time.sleep(0.2)


@needs_ffmpeg
def test_live_stream_reconnects_and_posts_webhooks(checkpoint: Path, tmp_path: Path, child_env) -> None:
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    port, events_file = free_port(), tmp_path / "events.jsonl"
    server = _serve_mjpeg(port)
    cmd = [sys.executable, "-m", "tlkit", "watch", f"http://127.0.0.1:{port}/live.mjpg", "--checkpoint"]
    cmd += [str(checkpoint), "--events", str(events_file), "--device", "cpu", "--max-seconds", "120"]
    cmd += ["--webhook", f"http://127.0.0.1:{hook.server_address[1]}/hook"]
    watch = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=child_env(tmp_path / "runs"))
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(iter(watch.stderr.readline, "")), daemon=True).start()

    def lines() -> list[str]:
        return events_file.read_text().splitlines() if events_file.is_file() else []

    try:
        _wait(lambda: len(lines()) >= 1, "a first alert on the looping cyclist clip", log, 180)
        server.kill()  # the camera goes away...
        server.wait()
        _wait(lambda: any("stream lost" in line for line in log), "the drop to be noticed", log, 30)
        server = _serve_mjpeg(port)  # ...and comes back on the same address
        _wait(lambda: any("reconnected to" in line for line in log), "the reconnection", log, 30)
        seen = len(lines())
        _wait(lambda: len(lines()) > seen, "an alert after reconnecting", log, 120)
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(timeout=30) == 0, "".join(log)
    finally:
        watch.kill()
        server.kill()
        hook.shutdown()
    summary = json.loads(next(line for line in log if line.startswith("summary: ")).removeprefix("summary: "))
    events = lines()
    assert summary["stopped"] == "stopped" and summary["reconnects"] >= 1 and summary["events"] == len(events)
    # every frame read was scored or dropped, but the one waiting when it stopped
    assert summary["frames"] > 0 and 0 <= summary["received"] - summary["frames"] - summary["dropped"] <= 2
    assert summary["webhook_delivered"] == len(events) and summary["webhook_failed"] == 0
    assert [b.decode() for b in _Hook.bodies] == events  # the same JSON, byte for byte, in order
    for event in map(json.loads, events):
        assert event["start_frame"] <= event["peak_frame"] <= event["end_frame"]
        assert event["peak_score"] >= event["threshold"] and event["start_time"] <= event["end_time"]


@needs_ffmpeg
def test_demo_source_opens_a_stream_url() -> None:
    # The surveillance demo's `open_source` reads a URL with the same LiveStream as `tlkit watch`.
    from tlkit.tasks.anomaly import open_source

    port = free_port()
    server = _serve_mjpeg(port)
    try:
        deadline = time.monotonic() + 30
        while True:  # ffmpeg needs a moment before it listens
            try:
                frames, fps, total = open_source(None, None, f"http://127.0.0.1:{port}/live.mjpg")
                break
            except ValueError:
                assert time.monotonic() < deadline, "ffmpeg never started listening"
                time.sleep(0.3)
        got = [next(frames) for _ in range(5)]
        frames.close()  # stops the reader thread
        assert total is None and all(f.shape == (240, 360, 3) and f.dtype == np.uint8 for f in got)
        assert not any(t.name == "tlkit-stream-reader" for t in threading.enumerate())
    finally:
        server.kill()
    with pytest.raises(ValueError, match="cannot open"):
        open_source(None, None, f"http://127.0.0.1:{free_port()}/live.mjpg")


def test_webhook_retries_until_delivered() -> None:
    from tlkit.tasks.anomaly.watch import Webhook

    class Flaky(_Hook):
        bodies: list[bytes] = []

        def do_POST(self) -> None:  # noqa: N802
            self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(503 if len(self.bodies) == 1 else 204)  # the receiver is down the first time
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hook = Webhook(f"http://127.0.0.1:{server.server_address[1]}/hook")
        hook.post('{"event": 1}')
        deadline = time.monotonic() + 20
        while hook.delivered == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        hook.close()
    finally:
        server.shutdown()
    assert hook.delivered == 1 and hook.failed == 0 and Flaky.bodies == [b'{"event": 1}'] * 2
