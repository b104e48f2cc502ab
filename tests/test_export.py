"""tlkit.export: ONNX and torch.export (.pt2) exports of a real (tiny) checkpoint, parity on real val images."""

from __future__ import annotations

from tlkit.paths import set_offline_env

set_offline_env()

import copy  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tlkit import __version__  # noqa: E402
from tlkit.checkpoint import load_tlkit_checkpoint  # noqa: E402
from tlkit.data.transforms import Preprocessing  # noqa: E402
from tlkit.models import model_from_checkpoint  # noqa: E402
from tlkit.paths import data_root  # noqa: E402

TINY_GTSRB = {
    "data": {"name": "gtsrb", "max_classes": 5, "max_per_class": 10, "img_size": 32, "num_workers": 0},
    "train": {"epochs": 1, "batch_size": 16},
    "model": {"arch": "resnet18"},
    "optim": {"ema_decay": 0.5},  # the checkpoint carries EMA weights: the export must use them
}


@pytest.fixture(scope="module")
def best_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a one-epoch resnet18 run on 5 GTSRB classes (real images, 32 px)."""
    if not (data_root() / "gtsrb" / "val").is_dir():
        pytest.skip(f"gtsrb sample not found under {data_root()}")
    from tlkit.config import load_recipe, replace
    from tlkit.engine import fit

    base = tmp_path_factory.mktemp("export")
    recipe = replace(load_recipe("imagenet", TINY_GTSRB), train={"out": str(base / "run")})
    torch.set_num_threads(1)  # a shared 2-core CPU: one thread is much faster than two competing
    result = fit(recipe, kind="pretrain", quiet=True)
    assert result.best_path.is_file()
    return result.best_path


@pytest.fixture(scope="module")
def ckpt(best_pt: Path) -> dict:
    return load_tlkit_checkpoint(best_pt)


def _real_batches(ckpt: dict) -> dict[int, torch.Tensor]:
    from tlkit.export import parity_inputs

    inputs, note = parity_inputs(ckpt, Preprocessing.from_dict(ckpt["preprocessing"]))
    assert "real val image" in note and "gtsrb" in note, note
    return inputs


def test_onnx_export_parity_and_sidecar(best_pt: Path, ckpt: dict) -> None:
    import onnxruntime as ort

    from tlkit.export import export_checkpoint

    result = export_checkpoint(best_pt, format="onnx")
    out = best_pt.with_name("best.onnx")
    assert result["path"] == out and out.is_file() and result["format"] == "onnx"
    assert 0 <= result["max_abs_diff"] <= 1e-3
    assert not [p for p in best_pt.parent.iterdir() if p.name.startswith(".best.onnx")], "temp files left"

    # the sidecar says everything a consumer needs
    meta = json.loads(out.with_name("best.onnx.json").read_text())
    assert meta == result["metadata"]
    assert meta["classes"] == ckpt["classes"] and meta["class_ids"] == ckpt["class_ids"]
    assert len(meta["classes"]) == 5
    assert meta["preprocessing"] == ckpt["preprocessing"] and meta["preprocessing"]["img_size"] == 32
    assert meta["arch"] == "resnet18" and meta["tlkit_version"] == __version__ and meta["format"] == "onnx"
    assert meta["weights"] == "ema"
    assert meta["temperature"] == 1.0 and meta["threshold"] is None and meta["positive_index"] is None
    assert meta["input"]["shape"] == ["batch", 3, 32, 32] and meta["input"]["normalized"] is True
    assert meta["input"]["layout"] == "NCHW" and meta["input"]["dtype"] == "float32"
    assert meta["output"]["shape"] == ["batch", 5]
    assert meta["parity"]["max_abs_diff"] == result["max_abs_diff"] and meta["parity"]["tolerance"] == 1e-3
    assert "real val image" in meta["parity"]["inputs"]

    # the file runs on its own in onnxruntime, any batch size, and agrees with the EMA model in torch
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "input" and inp.shape[1:] == [3, 32, 32] and not isinstance(inp.shape[0], int)
    assert json.loads(session.get_modelmeta().custom_metadata_map["tlkit"])["classes"] == ckpt["classes"]
    ema_model, raw_model = model_from_checkpoint(ckpt), model_from_checkpoint(ckpt, use_ema=False)
    for batch, x in _real_batches(ckpt).items():
        logits = session.run(None, {"input": x.numpy()})[0]
        assert logits.shape == (batch, 5)
        with torch.no_grad():
            expected, raw = ema_model(x).numpy(), raw_model(x).numpy()
        np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=0)
        assert np.abs(raw - expected).max() > 1e-3  # EMA really differs, so the check above means something


def test_pt2_export_carries_metadata(ckpt: dict, tmp_path: Path) -> None:
    """torch.export replaces the TorchScript trace: a .pt2 ExportedProgram that loads without tlkit or timm, runs any
    batch size, and carries the calibration (temperature, threshold) that best.pt stores."""
    from tlkit.export import export_checkpoint, read_pt2_metadata

    calibrated = {**ckpt, "temperature": 1.7, "threshold": 0.3}  # what calibration stores in best.pt
    out = tmp_path / "model.pt2"
    result = export_checkpoint(calibrated, format="pt2", out=out)
    assert result["path"] == out and result["format"] == "pt2" and out.is_file()
    assert result["max_abs_diff"] <= 1e-5  # the same kernels: practically exact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.pt2")], "temp files left"

    embedded = read_pt2_metadata(out)
    sidecar = json.loads((tmp_path / "model.pt2.json").read_text())
    for meta in (embedded, sidecar):
        assert meta["temperature"] == 1.7 and meta["threshold"] == 0.3 and meta["format"] == "pt2"
        assert meta["classes"] == ckpt["classes"] and meta["preprocessing"] == ckpt["preprocessing"]
        assert meta["exporter"].startswith("torch.export") and meta["weights"] == "ema"
    assert sidecar["parity"]["runtime"] == "torch.export.load" and "real val image" in sidecar["parity"]["inputs"]

    program = torch.export.load(str(out))
    assert isinstance(program, torch.export.ExportedProgram)
    module = program.module()
    ema_model, raw_model = model_from_checkpoint(ckpt), model_from_checkpoint(ckpt, use_ema=False)
    batches = _real_batches(ckpt)
    for batch, x in [*batches.items(), (5, torch.cat([batches[3], batches[1], batches[1]]))]:  # 5: never traced
        with torch.no_grad():
            got, expected, raw = module(x), ema_model(x), raw_model(x)
        assert got.shape == (batch, 5)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert (raw - expected).abs().max() > 1e-3  # EMA really differs, so the check above means something


def test_parity_gap_raises_and_writes_nothing(ckpt: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An export that does not compute what torch computes (here: a head bias nudged by 0.01) is refused."""
    import tlkit.export as export

    real_export = export._export_pt2

    def perturbed(model, example, path, metadata):
        bad = copy.deepcopy(model)
        with torch.no_grad():
            bad.get_classifier().bias.add_(0.01)
        real_export(bad, example, path, metadata)

    monkeypatch.setattr(export, "_export_pt2", perturbed)
    out = tmp_path / "bad.pt2"
    with pytest.raises(ValueError, match="parity check failed") as info:
        export.export_checkpoint(ckpt, format="pt2", out=out, tolerance=1e-3)
    assert "\n" not in str(info.value) and "0.01" in str(info.value)
    assert list(tmp_path.iterdir()) == [], "a failed export must leave nothing behind"


def test_unknown_format_is_one_line_error(best_pt: Path) -> None:
    from tlkit.export import export_checkpoint

    with pytest.raises(ValueError, match="unknown export format 'tflite'; use onnx or pt2$") as info:
        export_checkpoint(best_pt, format="tflite")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="replaced by torch.export"):
        export_checkpoint(best_pt, format="torchscript")


def test_cli_format_choices_are_the_exporters() -> None:
    """`tlkit export --format` offers exactly the formats export_checkpoint writes (typer shows them in --help)."""
    import typing

    from tlkit.cli import export as export_command
    from tlkit.export import FORMATS

    hint = typing.get_type_hints(export_command, include_extras=True)["format"]
    assert typing.get_args(typing.get_args(hint)[0]) == tuple(FORMATS) == ("onnx", "pt2")
