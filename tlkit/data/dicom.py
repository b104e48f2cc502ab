"""DICOM files (`.dcm`) as 8-bit images, the way a radiology viewer shows them.

Stored values go through the modality LUT (rescale slope / intercept: CT values in Hounsfield units), then the
VOI LUT or the window (centre / width) the file recommends, and only then down to 8 bits, so a 12- or 16-bit
image keeps the contrast the window was chosen for. MONOCHROME1 (white = low) is inverted. Colour images
(RGB, YCbCr, palette) come out as RGB. Read by `tlkit.data.io.open_image`, the project's one image loader,
so datasets, evaluate, predict, explain and the demos read DICOM like any other image.

pydicom is imported here only, when a DICOM file is read. Multi-frame files (cine, CT volumes in one file)
are refused with one line, as are compressed files whose decoder plugin is not installed (the line names it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

DICOM_EXTENSIONS = (".dcm",)
DICOM_MAGIC_OFFSET = 128  # the 128-byte preamble, then b"DICM"


def is_dicom_bytes(data: bytes) -> bool:
    return data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def read_dicom(source: str | Path | bytes) -> np.ndarray:
    """A single-frame DICOM image as uint8: (H, W) grey or (H, W, 3) RGB. ValueError with a one-line reason
    (no file name) for anything that is not a single-frame image this pydicom can decode."""
    import io

    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except InvalidDicomError:
        raise ValueError("not a DICOM file (no DICM header)") from None
    except (EOFError, OSError) as e:
        raise ValueError(
            f"not a readable DICOM file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if "PixelData" not in ds:
        raise ValueError(f"DICOM file without an image (a {ds.get('Modality', 'non-image')} object)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"multi-frame DICOM ({frames} frames) is not supported: export the frame(s) as single files")
    arr = _pixels(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3 or photometric == "PALETTE COLOR":
        return _colour(ds, arr, photometric)
    return _grey(ds, arr, photometric)


def _pixels(ds: Any) -> np.ndarray:
    """The stored pixel values; compressed data whose decoder is missing is refused naming the plugins."""
    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise ValueError(f"no pydicom decoder for the transfer syntax {syntax.name}") from None
        if not decoder.is_available:
            options = sorted((_plugin_packages(d) for d in decoder.missing_dependencies), key=_preferred)
            more = f" (or {', or '.join(options[1:])})" if len(options) > 1 else ""
            raise ValueError(
                f"compressed with {syntax.name}, which needs a decoder plugin for pydicom that is not installed: "
                f"pip install {options[0]}{more}"
            )
    try:
        return ds.pixel_array
    except Exception as e:  # pydicom raises RuntimeError/ValueError/NotImplementedError with multi-line text
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError("cannot decode the DICOM pixel data: " + " ".join(lines[:2])) from None


PIP_NAMES = {"gdcm": "python-gdcm"}  # pydicom names plugins by module; pip knows some by another name


def _plugin_packages(missing: str) -> str:
    # "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1" -> "pylibjpeg pylibjpeg-libjpeg"
    requirement = missing.split("requires", 1)[-1]
    names = [re.split(r"[<>=!~ ]", part.strip())[0] for part in re.split(r",| and ", requirement)]
    return " ".join(PIP_NAMES.get(n, n) for n in names if n and n != "numpy")


def _preferred(packages: str) -> int:
    # pylibjpeg's wheels install everywhere pip does; GDCM is a large C++ build on some platforms
    return 0 if packages.startswith("pylibjpeg") else 1


def _grey(ds: Any, arr: np.ndarray, photometric: str) -> np.ndarray:
    """Modality LUT, then VOI LUT / window (else the image's own range), then 8 bits; MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if "VOILUTSequence" in ds:
        # A lookup table: its output range is given by its bit depth (LUT Descriptor's third value).
        lut = ds.VOILUTSequence[0]
        bits = int(lut.LUTDescriptor[2]) or 16
        scaled = np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=True), dtype=np.float64) / (2**bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        scaled = _window(values, _first(ds.WindowCenter), _first(ds.WindowWidth), ds.get("VOILUTFunction", "LINEAR"))
    else:
        lo, hi = float(values.min()), float(values.max())
        scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    out = np.clip(scaled * 255.0, 0, 255).round().astype(np.uint8)
    return 255 - out if photometric == "MONOCHROME1" else out


def _first(value: Any) -> float:
    """Window centre / width may be multi-valued (several presets): the first is the default."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The DICOM VOI window (PS3.3 C.11.2.1.2) as values in 0..1."""
    function = str(function).upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / max(width, 1e-6)))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / max(width, 1e-6) + 0.5, 0, 1)
    width = max(width, 1.0)  # LINEAR: width >= 1 by the standard
    return np.clip((x - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5, 0, 1)


def _colour(ds: Any, arr: np.ndarray, photometric: str) -> np.ndarray:
    """RGB uint8: palette colour through its LUT (8- or 16-bit entries); pydicom has already turned YCbCr into
    RGB; more than 8 stored bits are scaled down."""
    from pydicom.pixels import apply_color_lut

    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:
        bits = int(ds.get("BitsStored", 8) or 8)
    if bits <= 8:
        return np.ascontiguousarray(arr.astype(np.uint8))
    return np.clip(arr.astype(np.float64) / (2**bits - 1) * 255.0, 0, 255).round().astype(np.uint8)
