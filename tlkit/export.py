"""Export a tlkit checkpoint to ONNX or torch.export (.pt2), with its metadata, and prove the export is faithful.

The exported graph is the bare network: it takes a float32 NCHW RGB batch that is **already normalised**
(`(pixel / 255 - mean) / std` after the checkpoint's eval resize and centre crop), like timm and
torchvision models, and returns raw logits. Everything needed to get there and back (classes, the
preprocessing spec, temperature, decision threshold) travels in a JSON sidecar `<out>.json`; .pt2 files
also embed it (`torch.export.save(..., extra_files={"tlkit.json": ...})`), ONNX files in `metadata_props["tlkit"]`.
A .pt2 file is an ExportedProgram with a dynamic batch dimension: `torch.export.load(path).module()(x)`.

Parity: real validation images are preprocessed exactly as `tlkit evaluate` does and run through torch
and through the exported file (onnxruntime / `torch.export.load`) at batch sizes 1 and 3; the export is moved
into place only when the largest absolute logit difference is within `tolerance`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tlkit import __version__
from tlkit.checkpoint import load_tlkit_checkpoint, resolve_checkpoint
from tlkit.data.transforms import Preprocessing, eval_transform, norm_tensors, normalize
from tlkit.models import model_from_checkpoint
from tlkit.paths import data_root, resolve_data
from tlkit.progress import console
from tlkit.tasks import require, task_of

log = logging.getLogger("tlkit.export")

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}  # the CLI's --format choices (tests hold the two lists equal)
INPUT_NAME, OUTPUT_NAME = "input", "logits"
METADATA_KEY = "tlkit.json"  # .pt2 extra_files name; ONNX metadata_props key is "tlkit"
PARITY_BATCHES = (1, 3)


def export_checkpoint(
    checkpoint: str | Path | dict,
    format: str = "onnx",
    out: str | Path | None = None,
    tolerance: float = 1e-3,
) -> dict:
    """Export `checkpoint` (a path, a run folder, or a loaded tlkit checkpoint dict) and check parity.

    Returns {"path", "sidecar", "metadata", "max_abs_diff", "format"}; raises ValueError (one line) for an
    unknown format, a checkpoint that is not a classifier, or a parity gap above `tolerance`.
    """
    fmt = str(format).lower()
    if fmt not in FORMATS:
        was = " (TorchScript export was replaced by torch.export: pt2)" if fmt == "torchscript" else ""
        raise ValueError(f"unknown export format {format!r}; use {' or '.join(FORMATS)}{was}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be a non-negative number, got {tolerance!r}")
    ckpt, source = _load(checkpoint)
    require(task_of(ckpt), "export")
    out = _default_out(source, fmt) if out is None else Path(out)
    if out.is_dir():
        out = out / (Path(source).stem + FORMATS[fmt] if source else "model" + FORMATS[fmt])
    out.parent.mkdir(parents=True, exist_ok=True)

    model = model_from_checkpoint(ckpt)  # EMA weights when the checkpoint has them, eval mode, CPU, fp32
    pre = Preprocessing.from_dict(ckpt["preprocessing"])
    inputs, input_note = parity_inputs(ckpt, pre)
    metadata = export_metadata(ckpt, pre, fmt, source)

    # Export into a private folder beside `out`, check it there, then move it into place: a failed
    # export or parity check never leaves a file that looks usable behind.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        example = inputs[max(PARITY_BATCHES)]  # batch > 1: torch.export would specialise a batch of 1
        if fmt == "onnx":
            metadata["exporter"] = _export_onnx(model, example, staged)
            _embed_onnx_metadata(staged, metadata)
            runner = _onnx_runner(staged)
        else:
            metadata["exporter"] = f"torch.export (torch {torch.__version__})"
            _export_pt2(model, example, staged, metadata)
            runner = _pt2_runner(staged)
        diffs = {}
        for batch, x in inputs.items():
            with torch.no_grad():
                expected = model(x).float().numpy()
            try:
                got = np.asarray(runner(x.numpy()), dtype=np.float32)
            except Exception as e:  # onnxruntime / torch.export raise many types; the message matters
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise ValueError(f"exported {fmt} model fails on a batch of {batch}: {reason}") from None
            if got.shape != expected.shape:
                raise ValueError(
                    f"exported {fmt} model returns shape {got.shape} for a batch of {batch}, "
                    f"torch returns {expected.shape}"
                )
            diffs[batch] = float(np.abs(got - expected).max())
        max_diff = max(diffs.values())
        if not max_diff <= tolerance:  # also catches NaN
            raise ValueError(
                f"{fmt} export parity check failed: max abs logit difference {max_diff:.3g} > tolerance "
                f"{tolerance:g} (batches {', '.join(f'{b}: {d:.3g}' for b, d in diffs.items())}); nothing written"
            )
        for item in Path(tmp).iterdir():  # the model file, plus ONNX external data for very large models
            shutil.move(str(item), out.parent / item.name)

    metadata["parity"] = {
        "max_abs_diff": max_diff,
        "max_abs_diff_by_batch": {str(b): d for b, d in diffs.items()},
        "tolerance": tolerance,
        "inputs": input_note,
        "runtime": "onnxruntime CPUExecutionProvider" if fmt == "onnx" else "torch.export.load",
    }
    sidecar = out.with_name(out.name + ".json")
    sidecar.write_text(json.dumps(metadata, indent=2))

    shape = "x".join(str(s) for s in metadata["input"]["shape"])
    lines = [
        f"exported {fmt}: {out}  ({out.stat().st_size / 2**20:.1f} MiB, {metadata['exporter']})",
        f"  input '{INPUT_NAME}' float32 {shape}, normalised NCHW RGB -> '{OUTPUT_NAME}' batchx{len(ckpt['classes'])}",
        f"  parity vs torch: max abs logit diff {max_diff:.3g} <= tolerance {tolerance:g} "
        f"(batches {', '.join(str(b) for b in diffs)}; {input_note})",
        f"  metadata: {sidecar}",
    ]
    for line in lines:
        console.print(line, markup=False)
    return {"path": out, "sidecar": sidecar, "metadata": metadata, "max_abs_diff": max_diff, "format": fmt}


# ---- inputs and metadata ---------------------------------------------------------------------------------


def _load(checkpoint: str | Path | dict) -> tuple[dict, Path | None]:
    if isinstance(checkpoint, dict):
        return checkpoint, None
    path = resolve_checkpoint(checkpoint)  # a run folder: export what training judged best (best.pt)
    return load_tlkit_checkpoint(path), path


def _default_out(source: Path | None, fmt: str) -> Path:
    if source is None:
        raise ValueError("out= is needed when the checkpoint is passed as a dict (no file to put it beside)")
    return source.with_name(source.stem + FORMATS[fmt])


def parity_inputs(ckpt: dict, pre: Preprocessing) -> tuple[dict[int, torch.Tensor], str]:
    """{batch size: normalised float32 NCHW batch} for the parity check, and where the images came from:
    the checkpoint's own val split, else the imagenet_sample folder, else a seeded random tensor."""
    from tlkit.data.datasets import DataError, ImageDataset, Sample, scan_split
    from tlkit.data.io import is_image_file

    n = max(PARITY_BATCHES)
    samples, note = [], ""
    recipe_data = (ckpt.get("recipe") or {}).get("data") or {}
    root = ckpt.get("data_root") or recipe_data.get("name")
    if root:
        try:
            found, _ = scan_split(
                resolve_data(root),
                recipe_data.get("val_split", "val"),
                ckpt["class_ids"],
                roi_crop=recipe_data.get("roi_crop", False),
                ignore_unknown=True,
                layout=recipe_data.get("layout", "auto"),
            )
            samples = [found[round(i * (len(found) - 1) / max(1, n - 1))] for i in range(n)]  # spread over classes
            note = f"{len(set(samples))} real val image(s) from {resolve_data(root)}"
        except (DataError, OSError, KeyError):
            samples = []
    if not samples:
        folder = data_root() / "imagenet_sample"
        files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p)) if folder.is_dir() else []
        if files:
            samples = [Sample(files[i % len(files)], 0) for i in range(n)]
            note = f"{min(n, len(files))} real image(s) from {folder} (the checkpoint's val split is not here)"
    if samples:
        try:
            dataset = ImageDataset(samples, eval_transform(pre))
            images = torch.stack([dataset[i][0] for i in range(n)])  # uint8 NCHW, as the loaders yield
            x = normalize(images, *norm_tensors(pre, "cpu")).contiguous()
            return {b: x[:b].clone() for b in PARITY_BATCHES}, note
        except (DataError, ValueError) as e:
            log.warning("parity images unreadable (%s); using a random tensor", e)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, pre.img_size, pre.img_size, generator=generator)
    note = "a seeded random tensor (no real image found: checkpoint val split and imagenet_sample both missing)"
    console.print(f"parity check uses {note}", style="yellow", markup=False)
    return {b: x[:b].clone() for b in PARITY_BATCHES}, note


def export_metadata(ckpt: dict, pre: Preprocessing, fmt: str, source: Path | None) -> dict:
    from tlkit.tasks.classification.val import positive_index

    pos = ckpt.get("positive_index")
    if pos is None and ckpt.get("recipe") is not None:
        pos = positive_index(ckpt)
    num_classes = len(ckpt["classes"])
    return {
        "format": fmt,
        "tlkit_version": __version__,
        "torch_version": torch.__version__,
        "source_checkpoint": f"{source.parent.name}/{source.name}" if source else None,  # run folder/file
        "git_sha": ckpt.get("git_sha"),
        "arch": ckpt["arch"],
        "task": ckpt.get("task", "classify"),
        "weights": "ema" if ckpt.get("ema") else "model",
        "classes": list(ckpt["classes"]),
        "class_ids": list(ckpt["class_ids"]),
        "preprocessing": pre.to_dict(),
        "threshold": ckpt.get("threshold"),
        "temperature": float(ckpt.get("temperature") or 1.0),
        "positive_index": pos,
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "layout": "NCHW",
            "color": "RGB",
            "shape": ["batch", 3, pre.img_size, pre.img_size],
            "normalized": True,
            "recipe": (
                ("decode to RGB, make it grey (R=G=B), " if pre.grayscale else "decode to RGB, ")
                + (
                    f"resize the whole image to {pre.img_size}x{pre.img_size} ({pre.interpolation}), "
                    if pre.crop_mode == "squash"
                    else f"resize the shorter side to {pre.resize_size} ({pre.interpolation}), "
                    f"centre-crop {pre.img_size}x{pre.img_size}, "
                )
                + "then (pixel / 255 - mean) / std per channel"
            ),
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", num_classes],
            "meaning": "raw logits; probabilities = softmax(logits / temperature); with a threshold (binary), "
            "predict positive_index when its probability >= threshold",
        },
    }


# ---- ONNX ------------------------------------------------------------------------------------------------


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """torch.export-based exporter (torch >= 2.5 default); the TorchScript-based one if that fails.
    Dynamic batch dimension, fixed image size (the checkpoint's)."""
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30  # protobuf limit is 2 GiB
    try:
        from torch.export import Dim

        with _quiet():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: Dim("batch", min=1, max=65536)},),
                external_data=big,
                verbose=False,
            )
        return f"torch.onnx.export (dynamo, opset {_onnx_opset(path)})"
    except Exception as e:  # noqa: BLE001 - any failure: try the older exporter before giving up
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        log.warning("dynamo ONNX export failed (%s); retrying with the TorchScript-based exporter", reason)
        for leftover in path.parent.iterdir():
            leftover.unlink()
    with _quiet():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=17,
        )
    return f"torch.onnx.export (TorchScript-based, opset {_onnx_opset(path)})"


def _onnx_opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _embed_onnx_metadata(path: Path, metadata: dict) -> None:
    import onnx

    if any(p.name != path.name for p in path.parent.iterdir()):
        return  # external-data model: rewriting it would need the 2 GiB dance; the sidecar carries it
    model = onnx.load(str(path))
    entry = next((p for p in model.metadata_props if p.key == "tlkit"), None) or model.metadata_props.add()
    entry.key, entry.value = "tlkit", json.dumps(metadata)
    onnx.save(model, str(path))


def _onnx_runner(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


# ---- torch.export (.pt2) ----------------------------------------------------------------------------------


def _export_pt2(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> None:
    """An ExportedProgram with a dynamic batch dimension and a fixed image size (the checkpoint's), the metadata
    embedded beside the graph."""
    from torch.export import Dim

    with _quiet(), torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch", min=1, max=65536)},))
        torch.export.save(program, str(path), extra_files={METADATA_KEY: json.dumps(metadata)})


def _pt2_runner(path: Path):
    with _quiet():
        module = torch.export.load(str(path)).module()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).float().numpy()

    return run


def read_pt2_metadata(path: str | Path) -> dict:
    """The metadata embedded in a .pt2 export."""
    extra = {METADATA_KEY: ""}
    with _quiet():
        torch.export.load(str(path), extra_files=extra)
    return json.loads(extra[METADATA_KEY])


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and deprecation notices (the TorchScript-based ONNX fallback, torch.export's
    graph breaks); real problems still surface through the parity check."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)  # the ONNX optimizer logs each pass at INFO
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
