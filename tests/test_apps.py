"""The Gradio demos as users and scripts reach them: each app runs in its own process on 127.0.0.1 with a
tiny checkpoint fine-tuned by the engine, and is called through `gradio_client` (offline).

The servers are shared with test_browser.py (module-level registry): started once per session.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_predict import (
    IMAGENET_WEIGHTS,
    MEDICAL_VAL,
    medical_checkpoint,
    shared_base,
    surveillance_checkpoint,
    traffic_checkpoint,
)

from tlkit.paths import REPO_DIR, data_root

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

SAMPLE_VIDEO = data_root() / "ucsd_ped2" / "sample.mp4"
ANOMALY_ONSET_S = 1.5  # sample.mp4: the cyclist enters at frame 61 of Test001 = 1.5 s into the clip


# ---- servers -------------------------------------------------------------------------------------------


@dataclass
class AppServer:
    name: str
    url: str
    proc: subprocess.Popen
    log: Path
    checkpoint: Path
    clients: list = field(default_factory=list)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def client(self):
        from gradio_client import Client

        if not self.clients:
            self.clients.append(Client(self.url, verbose=False, download_files=str(self.log.parent / "downloads")))
        return self.clients[0]


_SERVERS: dict[str, AppServer] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(base: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "GRADIO_TEMP_DIR": str(base / "gradio-tmp"),
            "TLKIT_RUNS": str(base / "runs"),
            "OMP_NUM_THREADS": "1",  # three servers and the tests share a small CPU
            "PYTHONPATH": os.pathsep.join([str(REPO_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


# Started before its checkpoint exists: the child imports the heavy libraries while the test process
# fine-tunes (on one thread, so the second core is free), then runs the app's real entry point
# (`apps/<name>/app.py` as __main__, or the `tlkit demo` CLI) once the checkpoint's path is published.
_LAUNCHER = """
import runpy, sys, time
from pathlib import Path
from tlkit.paths import set_offline_env
set_offline_env()
import albumentations, gradio, timm, torch  # warm-up while the checkpoint trains
ready, entry, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
while not ready.is_file():
    time.sleep(0.2)
args += ["--checkpoint", ready.read_text().strip()]
if entry == "tlkit":
    from tlkit.cli import main
    sys.argv = ["tlkit", *args]
    main()
else:
    sys.argv = [entry, *args]
    runpy.run_path(entry, run_name="__main__")
"""


def start_app(name: str, ready: Path, base: Path, *, via_cli: bool = False) -> AppServer:
    """Start `apps/<name>/app.py` (or `tlkit demo <name>`); it serves once `ready` holds a checkpoint path."""
    port = free_port()
    log = base / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    args = ["--host", "127.0.0.1", "--port", str(port)]
    entry = ["tlkit", "demo", name] if via_cli else [str(REPO_DIR / "apps" / name / "app.py")]
    cmd = [sys.executable, "-c", _LAUNCHER, str(ready), *entry, *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_DIR, env=_env(base), stdout=out, stderr=subprocess.STDOUT)
    return AppServer(name, f"http://127.0.0.1:{port}/", proc, log, ready)


def wait_ready(server: AppServer, timeout: float = 240) -> AppServer:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"{server.name} app exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "config", timeout=5) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"{server.name} app not ready after {timeout:.0f} s:\n{server.log_tail()}")


def stop_all() -> None:
    for server in _SERVERS.values():
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(15)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()


def app_servers_for(tmp_path_factory: pytest.TempPathFactory) -> dict[str, AppServer]:
    """All three apps, started once per session: the servers boot while their checkpoints fine-tune."""
    if any(server.proc.poll() is not None for server in _SERVERS.values()):
        stop_all()  # stopped by an earlier module's teardown: start afresh
        _SERVERS.clear()
    if _SERVERS:
        return _SERVERS
    base = shared_base(tmp_path_factory)
    apps = [  # the medical app goes through `tlkit demo` (tlkit.demo.launch_demo)
        ("traffic-signs", traffic_checkpoint, False),
        ("surveillance", surveillance_checkpoint, False),
        ("medical", medical_checkpoint, True),
    ]
    try:
        for name, _, via_cli in apps:
            ready = base / f"{name}.ready"
            ready.unlink(missing_ok=True)
            _SERVERS[name] = start_app(name, ready, base, via_cli=via_cli)
        for name, build, _ in apps:
            checkpoint = build(base)
            _SERVERS[name].checkpoint = checkpoint
            tmp = base / f"{name}.ready.tmp"
            tmp.write_text(str(checkpoint))
            tmp.replace(base / f"{name}.ready")
        for server in _SERVERS.values():
            wait_ready(server)
    except BaseException:
        stop_all()
        _SERVERS.clear()
        raise
    return _SERVERS


@pytest.fixture(scope="session")
def app_servers(tmp_path_factory: pytest.TempPathFactory):
    for name in ("malaria", "gtsrb", "ucsd_ped2"):
        if not (data_root() / name).is_dir():
            pytest.skip(f"{name} sample not found under {data_root()}")
    if not IMAGENET_WEIGHTS.is_file():
        pytest.skip(f"ImageNet weights not found at {IMAGENET_WEIGHTS} (the medical app's checkpoint starts there)")
    yield app_servers_for(tmp_path_factory)
    stop_all()


# ---- bad inputs ------------------------------------------------------------------------------------------


def huge_png(path: Path, side: int = 20000) -> Path:
    """A real side x side greyscale PNG (all black: ~0.4 MB on disk, 400 megapixels decoded)."""
    if path.is_file():
        return path

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(1)
    row = bytes(side + 1)  # filter byte + pixels
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad-inputs")
    jpeg = next((data_root() / "chest_xray" / "val" / "NORMAL").glob("*.jpeg"), None) or next(
        (data_root() / "malaria" / "val" / "Parasitized").glob("*.png")
    )
    files = {
        "text": d / "notes.txt",
        "corrupt": d / "truncated" / jpeg.name,
        "empty": d / "empty.png",
        "huge": d / "huge.png",
        "empty_video": d / "empty.mp4",
        "text_video": d / "clip.mp4",
    }
    files["text"].write_text("this is not an image\n")
    files["corrupt"].parent.mkdir()
    files["corrupt"].write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 3])
    files["empty"].write_bytes(b"")
    huge_png(files["huge"])
    files["empty_video"].write_bytes(b"")
    files["text_video"].write_text("not a video either\n")
    return files


def _error_text(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value)


# ---- medical ---------------------------------------------------------------------------------------------


def test_medical_prediction_matches_the_checkpoint(app_servers) -> None:
    """The app answers what its checkpoint answers, image by image, and those answers are mostly right: cells
    the checkpoint never saw (val images from MEDICAL_VAL on: neither trained nor calibrated on)."""
    from gradio_client import handle_file

    from tlkit.predict import Predictor

    server = app_servers["medical"]
    predictor = Predictor.from_checkpoint(server.checkpoint, device="cpu")
    client = server.client()
    right = 0
    for cls in ("Parasitized", "Uninfected"):
        for image in sorted((data_root() / "malaria" / "val" / cls).glob("*.png"))[MEDICAL_VAL : MEDICAL_VAL + 6]:
            label, decision, overlay = client.predict(handle_file(str(image)), api_name="/predict")
            (expected,) = predictor.predict(image)
            assert label["label"] == expected["label"], image.name
            confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
            assert confidences == pytest.approx({t["label"]: t["probability"] for t in expected["topk"]}, abs=1e-4)
            assert f"Decision: **{expected['decision']['label']}**" in decision, image.name
            assert "sensitivity" in decision and "specificity" in decision
            assert Path(overlay).is_file() and Path(overlay).stat().st_size > 1000
            right += f"Decision: **{cls}**" in decision
    # Measured: 11 of these 12 decisions right (5/6 Parasitized, 6/6 Uninfected; 80.3 % over all 254 held-out
    # cells, see test_predict). A demo stuck on one answer gets 6; one that swaps the labels, 1.
    assert right >= 10, f"{right} of 12 decisions right"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("text", "not an image file"),
        ("corrupt", "corrupt or truncated"),
        ("empty", "empty.png"),
        ("huge", "image too large (20000x20000"),
    ],
)
def test_medical_bad_uploads_get_a_message(app_servers, bad_files, kind: str, message: str) -> None:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client = app_servers["medical"].client()
    with pytest.raises(AppError) as excinfo:
        client.predict(handle_file(str(bad_files[kind])), api_name="/predict")
    assert message in _error_text(excinfo)
    assert "Traceback" not in _error_text(excinfo) and "/tmp" not in _error_text(excinfo)


def test_medical_upload_size_limit_and_still_serving(app_servers, tmp_path: Path) -> None:
    from gradio_client import handle_file

    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(26 * 1024 * 1024))  # over the 25 MB upload limit
    client = app_servers["medical"].client()
    with pytest.raises(Exception) as excinfo:  # noqa: B017 - rejected at upload, before the app's code
        client.predict(handle_file(str(big)), api_name="/predict")
    assert "413" in str(excinfo.value) or "size" in str(excinfo.value).lower()
    image = sorted((data_root() / "malaria" / "val" / "Uninfected").glob("*.png"))[1]
    label, _, _ = client.predict(handle_file(str(image)), api_name="/predict")  # the server keeps serving
    assert label["label"] in ("Parasitized", "Uninfected")


# ---- traffic signs ------------------------------------------------------------------------------------------


def test_traffic_signs_top5_names(app_servers) -> None:
    from gradio_client import handle_file

    from tlkit.predict import Predictor

    server = app_servers["traffic-signs"]
    predictor = Predictor.from_checkpoint(server.checkpoint, device="cpu")
    assert predictor.classes == ["Speed limit (30km/h)", "Stop", "Road work", "Keep right"]
    image = sorted((data_root() / "gtsrb" / "val" / "14").glob("*.png"))[0]
    top5, overlay = server.client().predict(handle_file(str(image)), api_name="/predict")
    (expected,) = predictor.predict(image, topk=5)
    assert top5["label"] == expected["label"]
    got = [(c["label"], c["confidence"]) for c in top5["confidences"]]
    assert [name for name, _ in got] == [t["label"] for t in expected["topk"]]  # 4 classes: top-4
    assert [p for _, p in got] == pytest.approx([t["probability"] for t in expected["topk"]], abs=1e-4)
    assert Path(overlay).is_file()


def test_traffic_signs_bad_upload_then_still_serving(app_servers, bad_files) -> None:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client = app_servers["traffic-signs"].client()
    with pytest.raises(AppError, match="not an image file"):
        client.predict(handle_file(str(bad_files["text"])), api_name="/predict")
    image = sorted((data_root() / "gtsrb" / "val" / "01").glob("*.png"))[0]
    top5, _ = client.predict(handle_file(str(image)), api_name="/predict")
    assert top5["label"]


CLIENTS, PER_CLIENT = 8, 3


def test_traffic_signs_queue_serves_concurrent_clients(app_servers, bad_files, tmp_path: Path) -> None:
    """README: "requests are queued". 8 clients send 3 requests each at once (24 in flight against a
    concurrency of 2): 16 of one sign (identical Grad-CAM overlays), 4 of another and 4 text files. Every
    valid request gets the sequential answer and its whole overlay; every text file gets its message."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    server = app_servers["traffic-signs"]
    signs = [sorted((data_root() / "gtsrb" / "val" / c).glob("*.png"))[0] for c in ("14", "25")]
    reference = {}
    for sign in signs:  # one at a time first
        top5, overlay = server.client().predict(handle_file(str(sign)), api_name="/predict")
        reference[sign] = (top5, Path(overlay).read_bytes())
    assert reference[signs[0]][1] != reference[signs[1]][1]
    plan = [[signs[0], signs[0], bad_files["text"] if c % 2 else signs[1]] for c in range(CLIENTS)]
    assert sum(f == signs[0] for row in plan for f in row) == 16 and sum(len(row) for row in plan) == 24
    clients = [Client(server.url, verbose=False, download_files=str(tmp_path / f"client{c}")) for c in range(CLIENTS)]
    start = threading.Barrier(CLIENTS)
    outcomes: dict[tuple[int, int], object] = {}

    def run(c: int) -> None:
        start.wait()  # all clients submit together
        jobs = [clients[c].submit(handle_file(str(f)), api_name="/predict") for f in plan[c]]
        for i, job in enumerate(jobs):
            try:
                outcomes[c, i] = job.result(timeout=180)
            except Exception as e:  # noqa: BLE001 - recorded and checked below
                outcomes[c, i] = e

    threads = [threading.Thread(target=run, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for client in clients:
        client.close()
    assert sorted(outcomes) == [(c, i) for c in range(CLIENTS) for i in range(PER_CLIENT)]  # none lost
    for (c, i), outcome in sorted(outcomes.items()):
        sent = plan[c][i]
        if sent == bad_files["text"]:
            assert isinstance(outcome, AppError) and "not an image file" in str(outcome), (c, i, outcome)
            continue
        assert not isinstance(outcome, BaseException), (c, i, sent.name, repr(outcome))
        top5, overlay = outcome
        expected_top5, expected_overlay = reference[sent]
        assert top5["label"] == expected_top5["label"]
        assert [x["label"] for x in top5["confidences"]] == [x["label"] for x in expected_top5["confidences"]]
        got, want = ([x["confidence"] for x in t["confidences"]] for t in (top5, expected_top5))
        assert got == pytest.approx(want, abs=1e-6)
        assert Path(overlay).read_bytes() == expected_overlay, (c, i, sent.name)


def test_traffic_signs_overlay_files_are_not_rewritten(app_servers) -> None:
    """The deterministic half of the test above: a file the server has handed out (here still open, as a
    download in progress would hold it) is not written again when another request makes the same image."""
    from gradio_client import Client, handle_file

    server = app_servers["traffic-signs"]
    client = Client(server.url, verbose=False, download_files=False)  # file data with the server's path
    sign = sorted((data_root() / "gtsrb" / "val" / "14").glob("*.png"))[1]
    _, first = client.predict(handle_file(str(sign)), api_name="/predict")
    served = Path(first["path"])  # the tests and the servers share this machine
    with open(served, "rb") as handed_out:
        before = os.fstat(handed_out.fileno())
        _, second = client.predict(handle_file(str(sign)), api_name="/predict")
        after = os.fstat(handed_out.fileno())
        content = handed_out.read()
    client.close()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size), "written in place"
    assert len(content) == before.st_size and content.startswith(b"\x89PNG")
    assert Path(second["path"]).read_bytes() == content  # same image, same bytes


# ---- surveillance ------------------------------------------------------------------------------------------


def test_surveillance_streams_scores_and_alerts_on_the_cyclist(app_servers) -> None:
    from gradio_client import handle_file

    client = app_servers["surveillance"].client()
    job = client.submit(handle_file(str(SAMPLE_VIDEO)), None, api_name="/analyze")
    status, plot, alerts, peak, heatmap = job.result(timeout=300)
    updates = job.outputs()
    assert len(updates) >= 2, "frames should stream: updates before the final one"
    assert "Processing" in updates[0][0] and status.startswith("Done: 60 frames (6.0 s")
    rows = [dict(zip(alerts["headers"], row, strict=True)) for row in alerts["data"]]
    assert rows, f"no alert on the cyclist clip: {status}"
    assert any(r["end (s)"] >= ANOMALY_ONSET_S for r in rows), rows
    assert all(0 <= r["start (s)"] <= r["end (s)"] <= 6.0 for r in rows)
    assert plot is not None
    peak_path = peak["value"] if isinstance(peak, dict) else peak
    assert Path(peak_path).is_file() and Path(heatmap).is_file()


@pytest.mark.parametrize(("kind", "message"), [("empty_video", "empty file"), ("text_video", "cannot read")])
def test_surveillance_unreadable_video_gets_a_message(app_servers, bad_files, kind: str, message: str) -> None:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client = app_servers["surveillance"].client()
    with pytest.raises(AppError) as excinfo:
        client.predict(handle_file(str(bad_files[kind])), None, api_name="/analyze")
    assert message in _error_text(excinfo) and "/tmp" not in _error_text(excinfo)
    with pytest.raises(AppError, match="no input"):  # and it still answers
        client.predict(None, None, api_name="/analyze")


def test_surveillance_frames_upload(app_servers, tmp_path: Path) -> None:
    from gradio_client import handle_file

    frames = sorted((data_root() / "ucsd_ped2" / "val" / "Test001").glob("*.jpg"))[60:68]
    client = app_servers["surveillance"].client()
    status, _, _, _, _ = client.predict(None, [handle_file(str(f)) for f in frames], api_name="/analyze")
    assert status.startswith("Done: 8 frames")


# ---- launching -------------------------------------------------------------------------------------------


def test_demo_without_checkpoint_says_how_to_make_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from tlkit.cli import app
    from tlkit.demo import launch_demo

    monkeypatch.setenv("TLKIT_RUNS", str(tmp_path / "empty-runs"))
    with pytest.raises(ValueError, match="tlkit finetune --recipe traffic-signs"):
        launch_demo("traffic-signs")
    with pytest.raises(ValueError, match="no demo for 'cats'"):
        launch_demo("cats")
    result = CliRunner().invoke(app, ["demo", "medical"])
    assert result.exit_code == 2
    assert "tlkit finetune --recipe medical" in result.output and "Traceback" not in result.output


def test_apps_do_not_load_models_at_import(app_servers, monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing an app builds its UI only; the model loads on the first request (or in build_demo)."""
    import gradio as gr

    import tlkit.predict
    import tlkit.tasks.anomaly.stream
    from tlkit.demo import load_app

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded at import time")

    monkeypatch.setattr(tlkit.predict.Predictor, "from_checkpoint", refuse)
    monkeypatch.setattr(tlkit.tasks.anomaly.stream, "load_scorer", refuse)
    for name in ("medical", "traffic-signs", "surveillance"):
        monkeypatch.setenv("TLKIT_CHECKPOINT", str(app_servers[name].checkpoint))
        module = load_app(name)
        assert isinstance(module.demo, gr.Blocks), name
    with pytest.raises(AssertionError, match="at import time"):  # the patch works: build_demo loads eagerly
        module.build_demo(app_servers["surveillance"].checkpoint)
