"""Faults a user can cause, injected on real sample data; each must end cleanly and lose nothing.

NaN (a huge LR), disk full (a write that raises ENOSPC inside the one atomic-write function), a kill -9 in the
middle of a checkpoint write, `--resume` with another architecture, hand-edited checkpoints, a run that fails
before training, `explain --out <file>`, an unsafe checkpoint given to an app, a traffic-signs checkpoint
evaluated on a split folder (its ROI boxes), and identical requests sent at once to the traffic-signs demo.
The runs are resnet10t on 5 tiny_imagenet classes x 10 images at 32 px (5 steps an epoch, a few seconds).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tlkit.checkpoint import CheckpointError, load_checkpoint
from tlkit.cli import app
from tlkit.paths import REPO_DIR, data_root

SETS = [
    "data.max_classes=5",
    "data.max_per_class=10",
    "data.num_workers=0",
    "data.img_size=32",
    "optim.warmup_epochs=0",
    "optim.ema_decay=0.9",
]
ARGS = ["--quiet", "--arch", "resnet10t", "--batch-size", "10", "--seed", "1"]


def _sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def pretrain(out: Path, *extra: str, epochs: int = 1) -> list[str]:
    return ["pretrain", *ARGS, "--epochs", str(epochs), "--out", str(out), *_sets(SETS), *extra]


def invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_error_line(result, *needles: str) -> str:
    """Exit 2, one `error:` line holding every needle, no traceback; returns the line."""
    text = result.output
    assert result.exit_code == 2, (result.exit_code, text, result.exception)
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, text
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def strict_json(text: str):
    """json.loads that refuses the non-JSON constants NaN / Infinity."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON: {text[:200]}"))


@pytest.fixture(scope="module")
def good_run(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch at the default LR: the last good checkpoint the faults below must not touch."""
    out = tmp_path_factory.mktemp("faults") / "good"
    result = invoke(pretrain(out))
    assert result.exit_code == 0, result.output
    return out


# ---- NaN -----------------------------------------------------------------------------------------------------


def test_nan_loss_stops_at_once_and_keeps_the_last_good_checkpoint(good_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    before = {name: (run / name).read_bytes() for name in ("best.pt", "last.pt")}
    line = assert_one_error_line(
        invoke(pretrain(run, "--lr", "1e6", epochs=2)), "diverged", "epoch 1 step", "lr ", "--lr", "last.pt"
    )
    assert "last good checkpoint is" in line
    for name, data in before.items():  # not replaced by a NaN checkpoint, not called best
        assert (run / name).read_bytes() == data, name
    assert not list(run.glob(".*.tmp"))
    # a run that diverges before any checkpoint leaves no folder at all
    fresh = tmp_path / "fresh"
    assert_one_error_line(invoke(pretrain(fresh, "--lr", "1e6")), "diverged", "no checkpoint was written")
    assert not fresh.exists()


def test_non_finite_weights_are_refused_and_json_has_no_nan(good_run: Path, tmp_path: Path) -> None:
    from tlkit.run_folder import json_line

    ckpt = load_checkpoint(good_run / "best.pt")
    key = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][key] = torch.full_like(ckpt["model"][key], float("nan"))
    ckpt["ema"] = None
    bad = tmp_path / "nan.pt"
    torch.save(ckpt, bad)  # as a diverged run of an older tlkit would have saved it
    image = sorted((data_root() / "tiny_imagenet_200" / "val" / "n01443537").iterdir())[0]
    assert_one_error_line(invoke(["predict", "--checkpoint", bad, image]), "NaN or inf", key)
    tiny = data_root() / "tiny_imagenet_200"
    assert_one_error_line(invoke(["evaluate", "--checkpoint", bad, "--data", tiny]), "NaN or inf")
    row = strict_json(json_line({"epoch": 1, "train_loss": float("nan"), "val_loss": float("inf"), "lr": 0.1}))
    assert row == {"epoch": 1, "train_loss": None, "val_loss": None, "lr": 0.1}


# ---- disk full and kills mid-write --------------------------------------------------------------------------


def test_disk_full_is_one_line_naming_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The epoch-2 last.pt write hits ENOSPC half-way (inside the real atomic write): exit 2, one line naming the
    run folder, epoch 1's last.pt intact and no temp file left."""
    import tlkit.checkpoint as checkpoint

    real, calls = checkpoint.atomic_write, []

    def full_disk(path, write):
        calls.append(Path(path).name)
        if calls.count("last.pt") < 2:
            return real(path, write)

        def half_then_enospc(f):
            f.write(b"x" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, half_then_enospc)

    monkeypatch.setattr(checkpoint, "atomic_write", full_disk)
    run = tmp_path / "run"
    line = assert_one_error_line(invoke(pretrain(run, epochs=2)), "disk full", str(run))
    assert "last.pt" in line
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert not list(run.glob(".*.tmp"))


KILL_IN_WRITE = """
import os, signal, sys
import tlkit.checkpoint as checkpoint
real, seen = checkpoint.atomic_write, []
def killed(path, write):
    seen.append(os.path.basename(path))
    if seen.count("last.pt") == 2:  # epoch 2's last.pt: half written, then SIGKILL
        def half(f):
            f.write(b"x" * 65536); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
        return real(path, half)
    return real(path, write)
checkpoint.atomic_write = killed
from tlkit.cli import main
sys.argv = ["tlkit", *sys.argv[1:]]
main()
"""


def test_kill_during_a_write_then_resume_cleans_up_and_continues_exactly(tmp_path: Path, child_env) -> None:
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    args = [str(a) for a in pretrain(killed, epochs=2)]
    cmd = [sys.executable, "-c", KILL_IN_WRITE, *args]
    proc = subprocess.Popen(cmd, env=child_env(tmp_path / "runs"), cwd=REPO_DIR)
    try:  # the uninterrupted reference runs here meanwhile, on the core the child's start-up leaves free
        assert invoke(pretrain(ref, epochs=2)).exit_code == 0
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -9
    stale = list(killed.glob(".last.pt.*.tmp"))
    assert len(stale) == 1 and load_checkpoint(killed / "last.pt")["epoch"] == 1
    result = invoke(["pretrain", "--quiet", "--resume", killed])
    assert result.exit_code == 0, result.output
    assert not list(killed.glob(".*.tmp"))
    got, want = load_checkpoint(killed / "last.pt"), load_checkpoint(ref / "last.pt")
    assert [r["train_loss"] for r in got["history"]] == [r["train_loss"] for r in want["history"]]
    for part in ("model", "ema"):
        for k, v in want[part].items():
            assert torch.equal(got[part][k], v), (part, k)
    assert got["ema_updates"] == want["ema_updates"] == 10  # 2 epochs x 5 steps: the EMA warmup resumed too


# ---- EMA warmup ------------------------------------------------------------------------------------------------


def test_ema_decay_warms_up_like_timm_model_ema_v3() -> None:
    from tlkit.optim import ModelEma

    model = torch.nn.Linear(2, 1)
    ema = ModelEma(model, 0.95)
    decays = []
    for _ in range(400):
        decays.append(ema.current_decay())
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
    assert decays[0] == 0.0  # the first update copies the weights: no anchoring at the init
    assert decays[1] == pytest.approx(1 - 2 ** (-2 / 3))
    assert all(a <= b for a, b in zip(decays, decays[1:], strict=False)) and decays[-1] == 0.95
    assert ema.updates == 400


# ---- wrong checkpoints ---------------------------------------------------------------------------------------


def test_resume_with_another_arch_is_one_line(good_run: Path) -> None:
    assert_one_error_line(
        invoke(["pretrain", "--quiet", "--resume", good_run, "--arch", "resnet18", "--epochs", "2"]),
        "model.arch=resnet10t, not resnet18",
        "--init",
    )


EDITS = {
    "arch": (lambda c: c.update(arch="resnet18"), "do not fit"),
    "classes": (lambda c: c.update(classes=c["classes"][:3], class_ids=c["class_ids"][:3]), "do not fit"),
    "class_ids": (lambda c: c.update(class_ids=c["class_ids"][:2]), "class_ids"),
    "preprocessing": (lambda c: c["preprocessing"].update(img_size="big"), "img_size"),
    "std": (lambda c: c["preprocessing"].update(std=[0.2, 0.2]), "std"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_hand_edited_checkpoints_are_one_line_everywhere(good_run: Path, tmp_path: Path, edit: str) -> None:
    change, needle = EDITS[edit]
    ckpt = load_checkpoint(good_run / "best.pt")
    change(ckpt)
    path = tmp_path / "edited.pt"
    torch.save(ckpt, path)
    image = sorted((data_root() / "tiny_imagenet_200" / "val" / "n01443537").iterdir())[0]
    commands = {
        "evaluate": ["evaluate", "--checkpoint", path, "--data", data_root() / "tiny_imagenet_200"],
        "predict": ["predict", "--checkpoint", path, image],
        "explain": ["explain", "--checkpoint", path, "--out", tmp_path / "cam", image],
        "export": ["export", "--checkpoint", path, "--out", tmp_path / "m.onnx"],
    }
    for name, args in commands.items():
        line = assert_one_error_line(invoke(args), needle)
        assert name and "Traceback" not in line
    assert not (tmp_path / "cam").exists() and not (tmp_path / "m.onnx").exists()


def test_unsafe_checkpoint_message_says_it_holds_code(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "ran"),))

    path = tmp_path / "unsafe.pt"
    path.write_bytes(pickle.dumps({"format": "tlkit", "model": Payload()}, protocol=2))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and "pickled Python objects" in message and "nothing was loaded" in message
    assert "system" in message and "weights_only=False" not in message
    assert not (tmp_path / "ran").exists()


def test_app_with_unsafe_checkpoint_is_one_line(tmp_path: Path, child_env) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "unsafe.pt"
    path.write_bytes(pickle.dumps({"format": "tlkit", "model": Payload()}, protocol=2))
    app_py = REPO_DIR / "apps" / "medical" / "app.py"
    proc = subprocess.run(
        [sys.executable, str(app_py), "--checkpoint", str(path), "--port", "1"],
        env=child_env(tmp_path / "runs"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: refused") and "pickled" in lines[0], proc.stderr
    assert "pwned" not in proc.stdout


# ---- leftovers --------------------------------------------------------------------------------------------------


def test_failure_before_training_leaves_no_run_folder(tmp_path: Path) -> None:
    runs = Path(os.environ["TLKIT_RUNS"])
    out = tmp_path / "bs0"
    assert_one_error_line(invoke(pretrain(out, "--set", "train.batch_size=0")), "batch_size")
    assert not out.exists()
    assert_one_error_line(invoke(["pretrain", *ARGS, *_sets(SETS), "--set", "train.batch_size=0"]), "batch_size")
    assert not runs.exists() or not any(runs.iterdir())


def test_explain_out_is_an_existing_file(good_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "overlay.png"
    target.write_bytes(b"not a folder")
    image = sorted((data_root() / "tiny_imagenet_200" / "val" / "n01443537").iterdir())[0]
    assert_one_error_line(invoke(["explain", "--checkpoint", good_run, "--out", target, image]), "is a file")
    assert target.read_bytes() == b"not a folder"


def test_unreadable_image_log_names_the_file_not_a_file_object(tmp_path: Path, caplog) -> None:
    from tlkit.data.datasets import ImageDataset, Sample

    text = tmp_path / "notes.jpg"
    text.write_text("not an image\n")
    good = sorted((data_root() / "tiny_imagenet_200" / "val" / "n01443537").iterdir())[0]
    dataset = ImageDataset([Sample(text, 0), Sample(good, 0)])
    with caplog.at_level("WARNING", logger="tlkit.data"):
        _, _, failed = dataset[0]
    assert failed == 1
    assert "notes.jpg" in caplog.text and "not an image file" in caplog.text
    assert "_io." not in caplog.text and "BufferedReader" not in caplog.text


# ---- ROI boxes (traffic signs) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traffic_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_predict import shared_base, traffic_checkpoint

    if not (data_root() / "gtsrb" / "val_labels.csv").is_file():
        pytest.skip(f"gtsrb sample not found under {data_root()}")
    return traffic_checkpoint(shared_base(tmp_path_factory))


def test_roi_checkpoint_on_a_split_folder_finds_its_boxes_or_stops(traffic_ckpt: Path, tmp_path: Path) -> None:
    """evaluate --data <root>/val uses <root>/val_labels.csv exactly as --data <root> --split val does; the same
    split folder without its box file is one line, never a silent whole-frame evaluation."""
    from tlkit.checkpoint import read_meta

    root = Path(read_meta(traffic_ckpt)["data_root"])
    runs = []
    for i, data in enumerate([[root, "--split", "val"], [root / "val"]]):
        result = invoke(["evaluate", "--checkpoint", traffic_ckpt, "--data", *data, "--out", tmp_path / f"e{i}"])
        assert result.exit_code == 0, result.output
        runs.append(json.loads((tmp_path / f"e{i}" / "metrics.json").read_text()))
    assert runs[0]["top1"] == runs[1]["top1"] and runs[0]["loss"] == runs[1]["loss"]
    alone = tmp_path / "val"
    shutil.copytree(root / "val", alone, symlinks=True)
    result = invoke(["evaluate", "--checkpoint", traffic_ckpt, "--data", alone, "--out", tmp_path / "e2"])
    assert_one_error_line(result, "roi_crop", "val_labels.csv")
    # predict: with the box file each image is cut to its box (as evaluate does), else used whole and said so
    image = sorted((root / "val" / "14").iterdir())[0]
    lines = {}
    for name, extra in (("whole", []), ("box", ["--boxes", data_root() / "gtsrb" / "val_labels.csv"])):
        result = invoke(["predict", "--checkpoint", traffic_ckpt, image, *extra])
        assert result.exit_code == 0, result.output
        lines[name] = strict_json(next(ln for ln in result.output.splitlines() if ln.startswith("{")))
    assert lines["whole"]["roi"] == "whole image" and lines["box"]["roi"] == "box"
    assert lines["whole"]["probability"] != lines["box"]["probability"]


# ---- demo: identical requests at once -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traffic_server(traffic_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    """The traffic-signs app (its real entry point) on 127.0.0.1: test_apps' server when it runs, else our own."""
    import test_apps

    live = test_apps._SERVERS.get("traffic-signs")
    if live is not None and live.proc.poll() is None:
        yield live
        return
    base = tmp_path_factory.mktemp("faults-demo")
    ready = base / "ready"
    ready.write_text(str(traffic_ckpt))
    server = test_apps.start_app("traffic-signs", ready, base)
    try:
        yield test_apps.wait_ready(server)
    finally:
        server.proc.terminate()
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            server.proc.kill()


def test_identical_demo_requests_at_once_all_succeed(traffic_server, tmp_path: Path) -> None:
    """8 clients send the same sign at the same moment (identical Grad-CAM overlays, one content-named file):
    every request succeeds with the whole overlay."""
    from gradio_client import Client, handle_file

    sign = sorted((data_root() / "gtsrb" / "val" / "25").glob("*.png"))[0]
    first, overlay = traffic_server.client().predict(handle_file(str(sign)), api_name="/predict")
    expected = Path(overlay).read_bytes()
    n = 8
    clients = [Client(traffic_server.url, verbose=False, download_files=str(tmp_path / f"c{i}")) for i in range(n)]
    start, outcomes = threading.Barrier(n), {}

    def send(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = clients[i].predict(handle_file(str(sign)), api_name="/predict")
        except Exception as e:  # noqa: BLE001 - counted below
            outcomes[i] = e

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for client in clients:
        client.close()
    failures = {i: repr(o) for i, o in outcomes.items() if isinstance(o, BaseException)}
    assert len(outcomes) == n and not failures, failures
    for top5, path in outcomes.values():
        assert top5["label"] == first["label"] and Path(path).read_bytes() == expected


def test_nan_under_ddp_stops_every_rank(tmp_path: Path, child_env) -> None:
    """Two gloo processes (torchrun): both stop with the error line, none hangs in a collective, nothing saved."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip(f"torchrun not found beside {sys.executable}")
    out = tmp_path / "ddp"
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "tlkit",
        *map(str, pretrain(out, "--lr", "1e6")),
    ]
    proc = subprocess.run(
        [*cmd, "--device", "cpu"],
        env=child_env(tmp_path / "runs"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error: training diverged" in ln]
    assert proc.returncode != 0 and len(errors) == 2, (proc.stdout + proc.stderr)[-3000:]
    assert not out.exists()
