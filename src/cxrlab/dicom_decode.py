"""DICOM bytes -> DecodedImage, following the standard's display pipeline with pydicom's own functions.

Grayscale: stored values -> Pixel Padding Value (up to Pixel Padding Range Limit) pixels masked ->
Modality LUT or rescale (``apply_modality_lut``) -> VOI LUT, else the first window
(``apply_voi`` / ``apply_windowing``), scaled by that transform's own output range -> MONOCHROME1
inverted -> padding pixels black. Without a usable VOI the modality values' minimum and maximum,
padding left out, are black and white. PALETTE COLOR goes through its colour LUT
(``apply_color_lut``), white being that LUT's largest entry's bit depth; other colour images take
white from BitsStored when the data keep to it (decode's rule 2). Only the first frame of a
multi-frame file is decoded; Rows x Columns are checked before any pixel is.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np

from .errors import ImageError
from .pixels import DecodedImage, check_size, colour_image, error_text, gray_image, levels, minmax, white_for

_LJPEG_PKGS = "pylibjpeg pylibjpeg-libjpeg"
_DECODER_PACKAGES = {  # compressed transfer syntax UID -> what to pip install for it
    **dict.fromkeys((f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81)), _LJPEG_PKGS),
    **dict.fromkeys((f"1.2.840.10008.1.2.4.{n}" for n in (90, 91, 201, 202, 203)),
                    "pylibjpeg pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}
_PIXEL_KEYS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def decode_dicom(data: bytes, label: str, max_pixels: int, *, force: bool) -> DecodedImage:
    try:
        import pydicom
    except ImportError:
        raise ImageError(label, "reading DICOM needs pydicom: pip install pydicom") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=force)
        except Exception as e:
            raise ImageError(label, f"corrupt DICOM: {error_text(e)}") from None
        try:  # pydicom parses elements lazily, so corrupt ones fail on access
            if not any(k in ds for k in _PIXEL_KEYS):
                raise ImageError(label, "DICOM has no pixel data (e.g. a report or structured document)")
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            check_size(label, cols, rows, max_pixels)
            return _to_image(ds, _first_frame(ds, label), cols, rows)
        except (ImageError, MemoryError):
            raise
        except Exception as e:
            raise ImageError(label, f"corrupt DICOM: {error_text(e)}") from None


def _first_frame(ds, label: str) -> np.ndarray:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts_name = f"{ts.name} ({ts})" if ts is not None else "unknown"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        if hasattr(ds, "pixel_array_options") and frames > 1:
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
                                    f"({error_text(e)}); another decoder may help: pip install {pkgs}") from None
        raise ImageError(label, f"corrupt DICOM pixel data (transfer syntax {ts_name}): {error_text(e)}") from None
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1 and arr.ndim == (4 if spp > 1 else 3):
        arr = arr[0]
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ImageError(label, f"DICOM pixel data has unexpected shape {arr.shape}")
    return arr


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


def _lut_functions():
    """pydicom's LUT functions: ``pydicom.pixels`` in 3.x, ``pixel_data_handlers.util`` in 2.x."""
    try:
        from pydicom import pixels as api

        api.apply_windowing  # noqa: B018 - present in 3.x only
    except (ImportError, AttributeError):
        from pydicom.pixel_data_handlers import util as api
    return api


def _photometric(ds) -> str:
    return str(ds.get("PhotometricInterpretation", "") or "").strip().upper()


def _to_image(ds, arr: np.ndarray, w: int, h: int) -> DecodedImage:
    bits = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 0) or 8)
    if _photometric(ds) == "PALETTE COLOR" and arr.ndim == 2:
        return _palette(ds, arr, w, h)
    if arr.ndim == 3:  # colour (pydicom already converted YBR to RGB)
        rgb = arr[..., :3]
        if rgb.dtype.kind == "f":
            return colour_image(minmax(rgb), w, h, "DICOM", bits)
        black, white = levels(float(rgb.min()), float(rgb.max()),
                              declared_white=float(2**bits - 1) if 1 <= bits <= 32 else None)
        return colour_image((rgb - black) / np.float32(max(white - black, 1.0)), w, h, "DICOM", bits)
    return gray_image(_grayscale(ds, arr), w, h, "DICOM", bits)


def _palette(ds, arr: np.ndarray, w: int, h: int) -> DecodedImage:
    apply_color_lut = _lut_functions().apply_color_lut
    rgb = apply_color_lut(arr, ds)[..., :3]
    entries, first = _lut_span(ds.RedPaletteColorLookupTableDescriptor)
    table = apply_color_lut(np.arange(first, first + entries), ds)[..., :3]
    white = white_for(float(table.max()))  # a 16-bit LUT may hold 8-bit entries
    bits = max(1, math.ceil(math.log2(white + 1)))
    return colour_image(rgb / np.float32(white), w, h, "DICOM", bits)


def _lut_span(descriptor) -> tuple[int, int]:
    """(number of entries, first stored value mapped) of a LUT Descriptor; 0 entries means 2**16."""
    return int(descriptor[0]) or 2**16, int(descriptor[1])


def _grayscale(ds, arr: np.ndarray) -> np.ndarray:
    pad = padding_mask(ds, arr)
    keep = None if pad is None else ~pad
    out = _voi(np.asarray(_lut_functions().apply_modality_lut(arr, ds)), ds, keep)
    if _photometric(ds) == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1 stores air as the maximum; show it black like MONOCHROME2
    if pad is not None:
        out[pad] = 0.0  # padding is no part of the image: the background, black
    return out


def padding_mask(ds, arr: np.ndarray) -> np.ndarray | None:
    """True where the stored value is Pixel Padding (PS3.3 C.7.5.1.1.2), or None when nothing is."""
    if "PixelPaddingValue" not in ds or arr.dtype.kind not in "iu":
        return None
    value = _stored(ds.PixelPaddingValue, arr.dtype)
    limit = ds.get("PixelPaddingRangeLimit")
    lo, hi = sorted((value, _stored(limit, arr.dtype))) if limit is not None else (value, value)
    mask = (arr >= lo) & (arr <= hi)
    return mask if mask.any() else None


def _stored(value, dtype: np.dtype) -> int:
    """A padding value as the pixel data's type reads it (files write -1 as 65535 and the reverse)."""
    value = int(value[0] if isinstance(value, (list, tuple)) else value)
    info, span = np.iinfo(dtype), 2 ** (np.dtype(dtype).itemsize * 8)
    if value > info.max:
        value -= span
    elif value < info.min:
        value += span
    return value


def _voi(values: np.ndarray, ds, keep: np.ndarray | None) -> np.ndarray:
    """VOI LUT or window into [0, 1] by the transform's own output range; else min-max of ``keep``."""
    api = _lut_functions()
    apply_voi, apply_windowing = api.apply_voi, api.apply_windowing
    if ds.get("VOILUTSequence"):
        try:
            entries, first = _lut_span(ds.VOILUTSequence[0].LUTDescriptor)
            table = np.asarray(apply_voi(np.arange(first, first + entries), ds, 0), dtype=np.float64)
            lo, hi = float(table.min()), float(table.max())
            if hi > lo:
                return ((np.asarray(apply_voi(values, ds, 0), dtype=np.float64) - lo) / (hi - lo)).astype(np.float32)
        except Exception:  # a malformed LUT: fall back to the window, then to min-max
            pass
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            out = np.asarray(apply_windowing(values, ds, 0), dtype=np.float64)
            lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds, 0)  # the window's output range
            if math.isfinite(lo) and math.isfinite(hi) and hi > lo and np.isfinite(out).all():
                return ((out - lo) / (hi - lo)).astype(np.float32)
        except Exception:  # an unusable window (width < 1, not a number): min-max below
            pass
    return minmax(values, keep)
