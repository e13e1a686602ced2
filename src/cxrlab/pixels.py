"""What decode and dicom_decode share, below both: the DecodedImage type, the declared-size guard,
the black and white levels (rules 2-4 of ``decode``'s docstring), and grey levels -> DecodedImage."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ImageError

MAX_PIXELS: int = 120_000_000
MAX_ASPECT: int = 100  # longer side / shorter side; a 1 x 100,000,000 strip is no radiograph
COLOR_THRESHOLD = 0.01  # JPEG chroma rounding in an RGB copy of a gray image stays below this

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's 'L'
_DEPTHS = (8, 10, 12, 14, 16, 24, 32)
_FLOAT_SLACK = 1e-3  # 0..1 float data a resampler pushed a hair outside the range


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: ``pixels`` is float32 (H, W) in [0, 1], 0 = black, EXIF applied."""

    pixels: np.ndarray
    width: int  # of the original image after EXIF transpose, before any draft reduction
    height: int
    format: str
    color: bool
    colorfulness: float
    bit_depth: int  # significant bits of the samples as decoded (12 for 12-bit data in a 16-bit PNG)


def error_text(e: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


def check_size(label: str, w: int, h: int, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse an invalid, oversized or absurdly elongated declared size before decoding a pixel."""
    if w < 1 or h < 1:
        raise ImageError(label, f"image has an invalid size {w} x {h}")
    if w * h > max_pixels:
        raise ImageError(label, f"image is {w} x {h} = {w * h:,} pixels, more than the limit of "
                                f"{max_pixels:,} (decompression bomb guard); resize it first")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageError(label, f"image is {w} x {h} pixels: an aspect ratio beyond {MAX_ASPECT}:1 is no "
                                "radiograph (a corrupt or hostile header?)")


# ------------------------------------------------------------------ black and white levels
def white_for(peak: float) -> float:
    """2**n - 1 for the smallest common bit depth n that holds ``peak`` (rule 2)."""
    for n in _DEPTHS:
        if peak <= 2**n - 1:
            return float(2**n - 1)
    return float(peak)


def levels(lo: float, hi: float, *, is_float: bool = False, integral: bool = True,
           declared_white: float | None = None,
           declared_range: tuple[float, float] | None = None) -> tuple[float, float]:
    """(black, white) for data whose finite values span lo..hi (``integral``: all whole numbers):
    rules 2-4 of ``decode``'s module docstring."""
    if declared_range is not None and _keeps_to(lo, hi, *declared_range):
        return declared_range
    if lo >= 0 and declared_white is not None and _keeps_to(lo, hi, 0.0, declared_white):
        return 0.0, declared_white
    if is_float and lo >= -_FLOAT_SLACK and hi <= 1 + _FLOAT_SLACK:
        return 0.0, 1.0
    if integral and lo >= 0:
        return 0.0, white_for(hi)
    if is_float and lo >= 0 and hi <= 255:
        return 0.0, 255.0
    return lo, hi


def _keeps_to(lo: float, hi: float, black: float, white: float) -> bool:
    span = white - black
    return math.isfinite(span) and span > 0 and black <= lo and hi <= white and hi - black >= span / 256


def minmax(a: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Scale to [0, 1] by the finite values' minimum and maximum (only where ``mask`` is True)."""
    a = np.asarray(a, dtype=np.float64)
    sel = a[mask] if mask is not None else a
    sel = sel[np.isfinite(sel)]
    lo, hi = (float(sel.min()), float(sel.max())) if sel.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.float32)
    return ((np.nan_to_num(a, nan=lo, posinf=lo, neginf=lo) - lo) / (hi - lo)).astype(np.float32)


# ------------------------------------------------------------------ grey levels -> DecodedImage
def colorfulness(rgb: np.ndarray) -> float:
    """Mean of |R-G| + |G-B| + |R-B| over three, in the units of ``rgb`` (H, W, 3)."""
    # For three values |R-G| + |G-B| + |R-B| == 2 * (max - min); elementwise max/min beat ptp(axis=-1).
    if not rgb.size:
        return 0.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return float(spread.mean(dtype=np.float64)) * 2.0 / 3.0


def _finish(arr: np.ndarray) -> np.ndarray:
    arr = np.require(arr, np.float32, ["C", "W"])  # copies only when it must; then work in place
    np.nan_to_num(arr, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(arr, 0.0, 1.0, out=arr)


def gray_image(pixels: np.ndarray, w: int, h: int, fmt: str, bits: int, *,
               colorfulness: float = 0.0, in_range: bool = False) -> DecodedImage:
    """Grey levels (NaN black, clipped to [0, 1]) as a DecodedImage; ``colorfulness`` (0..1) of the colour
    image they were taken from, if any: above COLOR_THRESHOLD the image counts as a colour one.
    ``in_range``: ``pixels`` are float32 levels of 8-bit samples, finite and in [0, 1] already."""
    pixels = pixels if in_range else _finish(pixels)
    return DecodedImage(pixels, w, h, fmt, colorfulness > COLOR_THRESHOLD, colorfulness, bits)


def colour_image(rgb: np.ndarray, w: int, h: int, fmt: str, bits: int) -> DecodedImage:
    """``rgb`` is float (h, w, 3) already in [0, 1]."""
    return gray_image(rgb @ _LUMA, w, h, fmt, bits, colorfulness=colorfulness(rgb))
