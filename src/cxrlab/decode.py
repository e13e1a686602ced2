"""Path or bytes -> float32 grayscale array in [0, 1] plus metadata, for every supported format."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".dcm", ".dicom"}
)
MAX_PIXELS: int = 120_000_000
NOT_REGULAR = "not a regular file (a FIFO, socket or device); give an image file"

_PIL_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's 'L'
_COLOR_THRESHOLD = 0.01  # JPEG chroma rounding in an RGB copy of a gray image stays below this
_SUPPORTED = "expected JPEG, PNG, BMP, TIFF, WebP, GIF or DICOM"
_LJPEG_PKGS = "pylibjpeg pylibjpeg-libjpeg"
_DECODER_PACKAGES = {  # compressed transfer syntax UID -> what to pip install for it
    **dict.fromkeys((f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81)), _LJPEG_PKGS),
    **dict.fromkeys((f"1.2.840.10008.1.2.4.{n}" for n in (90, 91, 201, 202, 203)),
                    "pylibjpeg pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: ``pixels`` is float32 (H, W) in [0, 1], 0 = black, EXIF applied."""

    pixels: np.ndarray
    width: int  # of the original image after EXIF transpose, before any draft reduction
    height: int
    format: str
    color: bool
    colorfulness: float
    bit_depth: int


def looks_like_image_file(path: str | os.PathLike) -> bool:
    """True for a known image suffix, or a suffix-less (or numeric-suffix) file with DICOM magic."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return True
    # DICOM files are often named by UID ("1.2.840.5"), so a numeric suffix counts as none.
    if suffix and not suffix[1:].isdigit():
        return False
    if not os.path.isfile(path):  # a FIFO or device: opening it could block forever
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def decode_image(
    source: str | os.PathLike | bytes,
    *,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
    min_size: int | None = None,
) -> DecodedImage:
    """Decode ``source`` (a path or the file's bytes); every failure raises ImageError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label, data = name or "<bytes>", bytes(source)
    else:
        label = os.fspath(source)
        data = _read(label)
    try:
        if not data:
            raise ImageError(label, "empty file (0 bytes)")
        suffix = Path(str(label)).suffix.lower()
        if data[128:132] == b"DICM":
            return _decode_dicom(data, label, max_pixels, force=False)
        pil_magic = data[:4] in (b"\x89PNG", b"GIF8", b"RIFF", b"II*\x00", b"MM\x00*") or data[:2] in (
            b"\xff\xd8", b"BM")
        if suffix in _DICOM_SUFFIXES and not pil_magic:
            return _decode_dicom(data, label, max_pixels, force=True)
        return _decode_pillow(data, label, max_pixels, min_size)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(label, "out of memory while decoding; the image is too large") from None
    except Exception as e:  # any decoder failure on hostile bytes must surface as ImageError
        raise ImageError(label, f"could not decode ({type(e).__name__}: {_msg(e)})") from e


def resize(pixels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear, antialiased resize of a float32 (h, w) array; ``size`` is an int or (height, width)."""
    arr = np.asarray(pixels, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"resize expects a 2-D array, got shape {arr.shape}")
    h, w = (size, size) if isinstance(size, (int, np.integer)) else size
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"resize size must be positive, got {size!r}")
    img = Image.fromarray(np.ascontiguousarray(arr))  # mode 'F'; Pillow's BILINEAR antialiases when shrinking
    out = np.asarray(img.resize((int(w), int(h)), Image.BILINEAR), dtype=np.float32)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0))


def _read(path: str) -> bytes:
    if os.path.isdir(path):
        raise ImageError(path, "is a directory, not an image file")
    if os.path.exists(path) and not os.path.isfile(path):  # reading a FIFO would block forever
        raise ImageError(path, NOT_REGULAR)
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except PermissionError:
        raise ImageError(path, "permission denied; check the file's permissions") from None
    except OSError as e:
        raise ImageError(path, f"could not read file ({e.strerror or e})") from None


def _head(data: bytes) -> str:
    head = data[:12].split(b"\n")[0].strip()
    if head and all(32 <= b < 127 for b in head):
        return repr(head.decode("ascii"))
    return "bytes " + data[:8].hex(" ")


def _open_pillow(data: bytes, label: str):
    """Like Image.open but limited to our formats and without Pillow's own bomb check,
    so that the size can be compared with ``max_pixels`` and reported as W x H."""
    Image.init()
    prefix = data[:16]
    for fmt in _PIL_FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        ok = accept(prefix) if accept else factory is not None
        if not ok or isinstance(ok, str):  # a str is Pillow's "looks like it, but unsupported"
            continue
        try:
            return factory(io.BytesIO(data), label)
        except Image.DecompressionBombError as e:  # e.g. a GIF frame larger than the canvas
            raise ImageError(label, f"image too large to decode ({_msg(e)}); resize it first") from None
        except Exception as e:
            raise ImageError(label, f"corrupt {fmt} header: {_msg(e)}") from None
    raise ImageError(label, f"not an image (file starts with {_head(data)}); {_SUPPORTED}")


def _check_size(label: str, w: int, h: int, max_pixels: int) -> None:
    if w < 1 or h < 1:
        raise ImageError(label, f"image has an invalid size {w} x {h}")
    if w * h > max_pixels:
        raise ImageError(label, f"image is {w} x {h} = {w * h:,} pixels, more than the limit of "
                                f"{max_pixels:,} (decompression bomb guard); resize it first")


def _decode_pillow(data: bytes, label: str, max_pixels: int, min_size: int | None) -> DecodedImage:
    with warnings.catch_warnings():
        # Corrupt headers warn ("Truncated File Read"); our size check replaces DecompressionBombWarning.
        warnings.simplefilter("ignore")
        img = _open_pillow(data, label)
        fmt = img.format or "?"
        w, h = img.size
        _check_size(label, w, h, max_pixels)  # before any pixel is decoded
        try:
            if min_size and fmt == "JPEG" and w > 2 * min_size and h > 2 * min_size:
                # Keep the mode (not 'L') so colorfulness survives for the OOD colour check.
                img.draft(None, (min_size, min_size))
            img.load()
            img = _reduce_for(img, min_size)
            loaded = img.size
            img = ImageOps.exif_transpose(img) or img
        except (Image.DecompressionBombError, MemoryError) as e:
            raise ImageError(label, f"image too large to decode ({_msg(e)}); resize it first") from None
        except Exception as e:
            raise ImageError(label, f"truncated or corrupt {fmt}: {_msg(e)}") from None
        if img.size != loaded:  # EXIF orientation 5-8 swapped the axes
            w, h = h, w
        arr, color, colorfulness, bits = _pil_to_gray(img)
    return DecodedImage(_finish(arr), w, h, fmt, color, colorfulness, bits)


def _reduce_for(img: Image.Image, min_size: int | None) -> Image.Image:
    """Box-reduce a large original (e.g. a 3000 px PNG) by an integer factor, keeping >= 2 x min_size.

    Cheaper than converting the full image to float and antialiasing it all the way down; the
    final resize still sees twice the network's resolution."""
    if not min_size:
        return img
    factor = min(img.size) // (2 * min_size)
    if factor < 2:
        return img
    if img.mode.startswith("I;16"):  # reduce() wants 32-bit 'I'; the values stay 0..65535
        img = img.convert("I")
    try:
        return img.reduce(factor)
    except ValueError:  # a mode reduce() does not support: go on at full size
        return img


def _pil_to_gray(img: Image.Image) -> tuple[np.ndarray, bool, float, int]:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img).astype(np.float32) / 65535.0, False, 0.0, 16
    if mode in ("I", "F"):
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), posinf=0.0, neginf=0.0)
        top = 65535.0 if mode == "I" else 1.0  # mode I is usually 16-bit data Pillow widened to int32
        if a.size and a.min() >= 0 and a.max() <= top:
            return (a / top).astype(np.float32), False, 0.0, 16 if mode == "I" else 32
        return _minmax(a), False, 0.0, 32
    if mode in ("L", "1", "LA", "La"):
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0, False, 0.0, 8
    if mode != "RGB":
        # Palette via RGBA so transparency never warns; alpha is then dropped, not composited.
        img = img.convert("RGBA" if mode in ("P", "PA") else "RGB").convert("RGB")
    colorfulness = _colorfulness(np.asarray(img)) / 255.0  # uint8 all the way: large photos stay cheap
    gray = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return gray, colorfulness > _COLOR_THRESHOLD, colorfulness, 8


def _colorfulness(rgb: np.ndarray) -> float:
    # For three values |R-G| + |G-B| + |R-B| == 2 * (max - min); elementwise max/min beat ptp(axis=-1).
    if not rgb.size:
        return 0.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return float(spread.mean(dtype=np.float64)) * 2.0 / 3.0


def _minmax(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(np.asarray(a, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def _finish(arr: np.ndarray) -> np.ndarray:
    arr = np.require(arr, np.float32, ["C", "W"])  # copies only when it must; then work in place
    np.nan_to_num(arr, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(arr, 0.0, 1.0, out=arr)


def _decode_dicom(data: bytes, label: str, max_pixels: int, *, force: bool) -> DecodedImage:
    try:
        import pydicom
    except ImportError:
        raise ImageError(label, "reading DICOM needs pydicom: pip install pydicom") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=force)
        except Exception as e:
            raise ImageError(label, f"corrupt DICOM: {_msg(e)}") from None
        try:  # pydicom parses elements lazily, so corrupt ones fail on access
            if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                raise ImageError(label, "DICOM has no pixel data (e.g. a report or structured document)")
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            _check_size(label, cols, rows, max_pixels)
            arr = _dicom_pixels(ds, label)
            return _dicom_to_gray(ds, arr, cols, rows)
        except (ImageError, MemoryError):
            raise
        except Exception as e:
            raise ImageError(label, f"corrupt DICOM: {_msg(e)}") from None


def _dicom_pixels(ds, label: str) -> np.ndarray:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = f"{ts.name} ({ts})" if ts is not None else "unknown"
    try:
        if hasattr(ds, "pixel_array_options") and int(ds.get("NumberOfFrames", 1) or 1) > 1:
            ds.pixel_array_options(index=0)  # pydicom 3: decode only the first frame
        arr = np.asarray(ds.pixel_array)
    except MemoryError:
        raise
    except Exception as e:
        if _is_compressed(ts):
            pkgs = _DECODER_PACKAGES.get(str(ts), f"{_LJPEG_PKGS} pylibjpeg-openjpeg")
            if not _decoder_available(ts):
                raise ImageError(label, f"DICOM transfer syntax {ts_name} needs a decoder: "
                                        f"pip install {pkgs}") from None
            raise ImageError(label, f"DICOM transfer syntax {ts_name}: could not decode pixel data "
                                    f"({_msg(e)}); another decoder may help: pip install {pkgs}") from None
        raise ImageError(label, f"corrupt DICOM pixel data (transfer syntax {ts_name}): {_msg(e)}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1 and arr.ndim == (4 if spp > 1 else 3):
        arr = arr[0]
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ImageError(label, f"DICOM pixel data has unexpected shape {arr.shape}")
    return arr


def _msg(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _is_compressed(ts) -> bool:
    try:
        return ts is not None and bool(ts.is_compressed)
    except ValueError:  # not a known transfer syntax UID
        return False


def _decoder_available(ts) -> bool:
    try:
        from pydicom.pixels import get_decoder
        return bool(get_decoder(ts).is_available)
    except Exception:  # pydicom 2 or an unknown syntax
        return False


def _dicom_to_gray(ds, arr: np.ndarray, w: int, h: int) -> DecodedImage:
    bits = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 0) or 8)
    if arr.ndim == 3:  # colour (pydicom already converted YBR to RGB)
        rgb = _minmax(arr[..., :3]) if arr.dtype.kind == "f" or bits != 8 else arr[..., :3] / np.float32(255)
        c = _colorfulness(rgb)
        return DecodedImage(_finish(rgb @ _LUMA), w, h, "DICOM", c > _COLOR_THRESHOLD, c, bits)
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if "VOILUTSequence" in ds:
        out = _minmax(apply_voi_lut(values, ds, index=0))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        out = _window(values, ds)
    else:
        out = _minmax(values)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1 stores air as the maximum; show it black like MONOCHROME2
    return DecodedImage(_finish(out), w, h, "DICOM", False, 0.0, bits)


def _window(values: np.ndarray, ds) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing straight into [0, 1]; min-max if the window is unusable."""
    def first(v):  # multi-valued windows: the first is the default
        return float(v[0] if isinstance(v, Sequence) and not isinstance(v, str) else v)
    try:
        c, w = first(ds.WindowCenter), first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return _minmax(values)
    func = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
    if not (np.isfinite(c) and np.isfinite(w)) or w <= 0 or (func == "LINEAR" and w < 1):
        return _minmax(values)
    if func == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - c) / w, -700, 700)))
    elif func == "LINEAR_EXACT":
        out = (values - c) / w + 0.5
    else:
        out = (values - (c - 0.5)) / max(w - 1.0, 1e-9) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)
