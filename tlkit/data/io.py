"""Image decoding that survives what real datasets contain.

ImageNet alone holds grayscale and CMYK JPEGs, a PNG named .JPEG, and a few broken files; medical and
industrial sets add 16-bit PNG/TIFF and huge scans. `load_rgb` turns all of these into 8-bit RGB or
raises `ImageDecodeError` with a one-line reason, so datasets can skip and count instead of crashing.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Larger than any sane photo or scan (~16k x 16k); beyond this PIL warns about decompression bombs.
MAX_PIXELS = 268_000_000
# Decode big JPEGs at a reduced scale (PIL draft mode) when they are much larger than this side.
DRAFT_SIDE = 2048

Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Never return half-decoded images silently: a truncated file is an error we count.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# The one list of image file types for the whole project: datasets, prediction folders, video frame folders.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif", ".dcm")


class ImageDecodeError(ValueError):
    """The file is not a decodable image; the message names the file and the reason."""


def is_dicom(source: str | Path | bytes) -> bool:
    """A `.dcm` path, or bytes with the DICOM magic (b"DICM" after the 128-byte preamble)."""
    if isinstance(source, bytes):
        return source[128:132] == b"DICM"
    return Path(source).suffix.lower() == ".dcm"


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float images -> 8-bit 'L' scaled by their own range."""
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return img.convert("L")
    arr = arr.astype(np.float32)
    # Scale by the image's own range: medical 16-bit images often use only 10-12 of the 16 bits.
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    return Image.fromarray(scaled.clip(0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited on white, CMYK/YCbCr/P are converted, 16-bit rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _to_8bit(img).convert("RGB")
    return img.convert("RGB")


EXIF_ORIENTATION = 0x0112


def upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: a phone photo stored sideways with EXIF orientation 6 is rotated
    (and the tag dropped), so training, evaluation, prediction and the demos all see it upright."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError):  # a broken EXIF block: the pixels are still usable as stored
        return img
    return ImageOps.exif_transpose(img) if orientation not in (0, 1) else img


def open_image(source: str | Path | bytes | Image.Image | np.ndarray) -> Image.Image:
    """Decode a path, raw bytes, a PIL image or an HxW[xC] uint8 array into an 8-bit RGB PIL image."""
    if isinstance(source, Image.Image):
        return to_rgb(upright(source))
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.dtype != np.uint8:
            return to_rgb(Image.fromarray(arr.astype(np.float32), mode="F"))
        return to_rgb(Image.fromarray(arr))
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    if is_dicom(source):  # pydicom, with the modality and VOI LUTs a viewer applies (tlkit.data.dicom)
        from tlkit.data.dicom import read_dicom

        try:
            return to_rgb(Image.fromarray(read_dicom(source)))
        except ValueError as e:
            raise ImageDecodeError(f"{name}: {e}") from None
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as e:
        raise ImageDecodeError(f"{name}: cannot open ({e.strerror or e})") from None
    try:
        with fp, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)  # sniffs the real format, so a PNG named .JPEG decodes fine
            if img.format == "JPEG" and max(img.size) > 2 * DRAFT_SIDE:
                # Huge JPEG: let libjpeg decode at 1/2..1/8 scale; far faster and far less memory.
                img.draft("RGB", (DRAFT_SIDE, DRAFT_SIDE))
            img.load()
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            return to_rgb(upright(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError(f"{name}: image too large (over {Image.MAX_IMAGE_PIXELS:,} pixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.UnidentifiedImageError) as e:
        # PIL names the open file object (`<_io.BufferedReader name=...>`); the one formatter says it plainly
        raise ImageDecodeError(f"{name}: {describe_error(e, name)}") from None


def load_rgb_array(source: str | Path | bytes | Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB array (the format albumentations expects)."""
    return np.array(open_image(source))  # a writable copy: torch.from_numpy warns on read-only arrays


def describe_error(error: BaseException, source: str | Path | None = None) -> str:
    """The one-line reason an input could not be used, for `tlkit predict`/`explain` lines and the demos: the
    first line only, the file named by its name (not a temp path, not repeated as a `<file>: ` prefix), PIL's
    and libjpeg's wording turned into what the user can act on, no Python object reprs."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    if source is not None:
        text = text.removeprefix(f"{source}: ").replace(str(source), Path(source).name)
    text = re.sub(r"cannot identify image file .*", "not an image file (unknown or unsupported format)", text)
    if re.search(r"truncated|premature end|broken data stream", text, re.IGNORECASE):
        text = f"corrupt or truncated image file ({text})"
    text = re.sub(r"<_io\.\w+ name=['\"]?([^'\">]*)['\"]?>", lambda m: Path(m.group(1)).name, text)
    return re.sub(r"/\S*/(gradio|tmp)\S*/", "", text)
