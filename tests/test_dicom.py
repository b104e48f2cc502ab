"""DICOM (`tlkit.data.dicom` through the one image loader `tlkit.data.io.open_image`): the files pydicom ships,
and chest X-ray / malaria images wrapped into DICOM here (8-bit, 16-bit with a rescale, MONOCHROME1, RGB), read
back pixel for pixel, predicted and evaluated like the images they came from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_predict import medical_checkpoint, shared_base

from tlkit.data.io import IMAGE_EXTENSIONS, ImageDecodeError, load_rgb_array
from tlkit.paths import data_root

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

CHEST = data_root() / "chest_xray" / "val"
MALARIA = data_root() / "malaria" / "val"


def shipped(name: str) -> str:
    path = get_testdata_file(name, download=False)  # only what the wheel ships: no network
    if path is None:
        pytest.skip(f"{name} is not among pydicom's shipped test files")
    return path


def write_dicom(path: Path, pixels: np.ndarray, photometric: str, **tags) -> Path:
    """A single-frame secondary-capture DICOM of `pixels` (uint8 / uint16, grey or RGB) with extra `tags`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    bits = 8 if pixels.dtype == np.uint8 else int(tags.pop("BitsStored", 16))
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


# ---- pydicom's own files ------------------------------------------------------------------------------


def test_window_and_modality_lut_on_shipped_files() -> None:
    # MR_small: 16-bit, window centre 600 / width 1600 (DICOM's LINEAR function), no rescale.
    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    raw = ds.pixel_array.astype(np.float64)
    expected = np.clip((raw - 599.5) / 1599 + 0.5, 0, 1) * 255
    out = load_rgb_array(shipped("MR_small.dcm"))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and (out[..., 0] == out[..., 2]).all()
    np.testing.assert_array_equal(out[..., 0], expected.round().astype(np.uint8))
    # CT_small: rescale slope 1 / intercept -1024 to Hounsfield units, no window: the HU range fills 0..255.
    ct = pydicom.dcmread(shipped("CT_small.dcm"))
    hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    out = load_rgb_array(shipped("CT_small.dcm"))[..., 0]
    np.testing.assert_array_equal(out, ((hu - hu.min()) / (hu.max() - hu.min()) * 255).round().astype(np.uint8))
    # The same image JPEG 2000-compressed (Pillow decodes it) reads identically.
    np.testing.assert_array_equal(
        load_rgb_array(shipped("MR_small_jp2klossless.dcm")), load_rgb_array(shipped("MR_small.dcm"))
    )
    # Colour: YCbCr JPEG comes out as RGB, close to the RGB-stored original.
    rgb = load_rgb_array(shipped("SC_rgb_dcmtk_+eb+cr.dcm")).astype(int)
    ybr = load_rgb_array(shipped("SC_rgb_jpeg_dcmtk.dcm")).astype(int)
    assert rgb.shape == ybr.shape == (100, 100, 3) and np.abs(rgb - ybr).mean() < 3


def test_refusals_are_one_line() -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    with pytest.raises(ImageDecodeError, match=r"rtdose\.dcm: multi-frame DICOM \(15 frames\)"):
        load_rgb_array(shipped("rtdose.dcm"))
    if get_decoder(JPEGLSLossless).is_available:
        assert load_rgb_array(shipped("MR_small_jpeg_ls_lossless.dcm")).shape == (64, 64, 3)
    else:
        with pytest.raises(ImageDecodeError) as info:
            load_rgb_array(shipped("MR_small_jpeg_ls_lossless.dcm"))
        message = str(info.value)
        assert "JPEG-LS" in message and "pip install pylibjpeg pylibjpeg-libjpeg" in message and "\n" not in message


def test_not_a_dicom_file(tmp_path: Path) -> None:
    fake = tmp_path / "scan.dcm"
    fake.write_text("not a scan")
    with pytest.raises(ImageDecodeError, match=r"scan\.dcm: not a DICOM file"):
        load_rgb_array(fake)
    assert ".dcm" in IMAGE_EXTENSIONS


# ---- real images wrapped into DICOM -------------------------------------------------------------------


@pytest.fixture(scope="module")
def xrays(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path, Path, Path]]:
    """(grey PNG, 8-bit DICOM, 16-bit DICOM with rescale + window, MONOCHROME1 DICOM) per chest X-ray."""
    if not CHEST.is_dir():
        pytest.skip(f"chest_xray sample not found under {data_root()}")
    out = tmp_path_factory.mktemp("xray-dicom")
    result = []
    for src in [sorted((CHEST / c).iterdir())[0] for c in ("NORMAL", "PNEUMONIA")]:
        png = out / f"{src.stem}.png"
        Image.open(src).convert("L").save(png)
        x = grey(png)
        # 8-bit with the identity window (centre 128, width 256), as many exporters write it.
        d8 = write_dicom(out / f"{src.stem}-8.dcm", x, "MONOCHROME2", WindowCenter=128, WindowWidth=256)
        # 12 bits in 16, CT-style rescale (slope 2, intercept -1024) and a window that maps back onto 0..255.
        stored = (x.astype(np.uint16) * 8 + 512).astype(np.uint16)
        d16 = write_dicom(
            out / f"{src.stem}-16.dcm", stored, "MONOCHROME2", BitsStored=12,
            RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=2040.5, WindowWidth=4081,
        )  # fmt: skip
        # MONOCHROME1 stores white as low values: the reader inverts it back.
        m1 = write_dicom(out / f"{src.stem}-m1.dcm", 255 - x, "MONOCHROME1", WindowCenter=128, WindowWidth=256)
        result.append((png, d8, d16, m1))
    return result


def test_wrapped_xrays_read_back_exactly(xrays) -> None:
    for png, *dicoms in xrays:
        x = grey(png)
        for dcm in dicoms:
            out = load_rgb_array(dcm)
            assert out.shape == (*x.shape, 3), dcm.name
            np.testing.assert_array_equal(out[..., 1], x, err_msg=dcm.name)
    # Without a window, a 16-bit image is scaled by its own range; MONOCHROME1 still comes out inverted.
    png, d8, _, _ = xrays[0]
    bare = write_dicom(d8.with_name("bare.dcm"), (grey(png).astype(np.uint16) * 100), "MONOCHROME1")
    x = grey(png).astype(np.float64)
    expected = 255 - ((x - x.min()) / (x.max() - x.min()) * 255).round()
    np.testing.assert_array_equal(load_rgb_array(bare)[..., 0], expected.astype(np.uint8))


@pytest.fixture(scope="module")
def medical_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_predict import IMAGENET_WEIGHTS

    if not MALARIA.is_dir() or not IMAGENET_WEIGHTS.is_file():
        pytest.skip("malaria sample or ImageNet weights not found")
    return medical_checkpoint(shared_base(tmp_path_factory))


def test_predictions_on_dicom_equal_the_source_images(xrays, medical_ckpt: Path) -> None:
    from tlkit.predict import predict_files

    for png, *dicoms in xrays:
        lines = list(predict_files(medical_ckpt, [png, *dicoms], topk=2, device="cpu"))
        assert len(lines) == 4 and all("error" not in line for line in lines), lines
        reference = lines[0]
        for line in lines[1:]:
            assert line["label"] == reference["label"] and line.get("decision") == reference.get("decision")
            got, want = ([t["probability"] for t in x["topk"]] for x in (line, reference))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_folder_of_dicoms_evaluates_like_the_images(medical_ckpt: Path, tmp_path: Path) -> None:
    from tlkit.workflows import evaluate_checkpoint

    images, dicoms = tmp_path / "png", tmp_path / "dcm"
    for cls in ("Parasitized", "Uninfected"):
        for src in sorted((MALARIA / cls).iterdir())[-4:]:  # never seen in training (test_predict: MEDICAL_VAL)
            (images / "val" / cls).mkdir(parents=True, exist_ok=True)
            (dicoms / "val" / cls).mkdir(parents=True, exist_ok=True)
            os.symlink(src, images / "val" / cls / src.name)
            write_dicom(dicoms / "val" / cls / f"{src.stem}.dcm", np.asarray(Image.open(src).convert("RGB")), "RGB")
    from_png = evaluate_checkpoint(medical_ckpt, images, out=tmp_path / "eval-png", device="cpu")
    from_dcm = evaluate_checkpoint(medical_ckpt, dicoms, out=tmp_path / "eval-dcm", device="cpu")
    written = json.loads((tmp_path / "eval-dcm" / "metrics.json").read_text())
    assert written["n"] == 8 and written["confusion_matrix"] == from_png["confusion_matrix"]
    for key in ("loss", "top1", "accuracy", "auroc", "sensitivity", "specificity"):
        assert from_dcm[key] == pytest.approx(from_png[key], abs=1e-6), key


def test_medical_demo_takes_a_dicom_upload(xrays, medical_ckpt: Path, tmp_path: Path) -> None:
    import importlib.util

    import gradio as gr

    from tlkit.paths import REPO_DIR

    spec = importlib.util.spec_from_file_location("medical_app", REPO_DIR / "apps" / "medical" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    demo = module.build_demo(medical_ckpt)
    on_submit = next(f.fn for f in demo.fns.values() if f.api_name == "predict")
    png, _, d16, _ = xrays[0]
    from_png, from_dicom = on_submit(str(png)), on_submit(None, str(d16))
    assert from_dicom[0].keys() == from_png[0].keys()
    for label, p in from_png[0].items():
        assert from_dicom[0][label] == pytest.approx(p, abs=1e-6)
    assert from_dicom[1] == from_png[1]  # the same decision text
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 200)
    with pytest.raises(gr.Error, match="broken.dcm: not a DICOM file"):
        on_submit(None, str(broken))
