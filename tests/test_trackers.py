"""MLflow and W&B beside TensorBoard (`train.loggers`), offline: a real short run on tiny_imagenet logs the resolved
recipe as params, one metrics row per epoch (equal to metrics.jsonl) and the report files; a listed tracker that
is not installed is one error line before any run folder is made."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tlkit.cli import app

runner = CliRunner()

SETS = [
    "data.max_classes=3",
    "data.max_per_class=10",
    "data.num_workers=0",
    "data.img_size=32",
    "train.batch_size=10",
    "train.epochs=2",
    "optim.warmup_epochs=0",
]


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (`run-<id>.wandb`): a LevelDB-style log of 32 KiB blocks, each
    record a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_mlflow_and_wandb_get_params_epochs_and_report(tmp_path, monkeypatch, tiny_root, cli_sets):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    args = ["pretrain", "--quiet", "--arch", "resnet10t", "--data", str(tiny_root), "--out", str(run_dir)]
    result = runner.invoke(app, args + cli_sets(SETS + ["train.loggers=[mlflow,wandb]"]))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert not (run_dir / "tb").exists()  # TensorBoard only when listed

    # MLflow: the recipe as params, val_top1 per epoch as in metrics.jsonl, the report as artefacts
    client = MlflowClient()
    experiment = client.get_experiment_by_name("tlkit-imagenet")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["data.img_size"] == "32" and run.data.params["model.arch"] == "resnet10t"
    history = client.get_metric_history(run.info.run_id, "val_top1")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], pytest.approx(r["val_top1"])) for r in rows]
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    report = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "report")}
    assert {"report.md", "metrics.json"} <= report
    report_top1 = json.loads((run_dir / "report" / "metrics.json").read_text())["top1"]
    assert run.data.metrics["report/top1"] == pytest.approx(report_top1)

    # W&B offline: the run file holds the config and one history row per epoch; the report is in its files
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    records = wandb_records(next(offline.glob("run-*.wandb")))
    logged = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "val_top1" in items:
                logged[items["_step"]] = items["val_top1"]
    assert logged == {r["epoch"]: pytest.approx(r["val_top1"]) for r in rows}
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert config["data"]["img_size"] == 32 and config["model"]["arch"] == "resnet10t"
    assert (offline / "files" / "report" / "report.md").read_text() == (run_dir / "report" / "report.md").read_text()


def test_missing_tracker_is_one_line_and_no_run_folder(tmp_path, monkeypatch, tiny_root, cli_sets):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without the package looks like
    run_dir = tmp_path / "run"
    args = ["pretrain", "--quiet", "--data", str(tiny_root), "--out", str(run_dir)]
    result = runner.invoke(app, args + cli_sets(SETS + ["train.loggers=[tensorboard,wandb]"]))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: train.loggers lists wandb, which is not installed: pip install 'tlkit[wandb]'"
    ]
    assert not run_dir.exists()
