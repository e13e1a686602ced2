"""Limits of `cxrlab serve`: ``ServeLimits`` (every option, checked up front), and decode memory: an
estimate from the image header alone, and a budget shared by all requests that admits a decode only
while the estimates of those in flight fit.

A 50 KB PNG can declare 50 million pixels; decoding it to float costs gigabytes. The estimate follows
what ``decode.decode_image`` allocates (the Pillow image at its decoded mode, the integer box-reduction,
the float64 temporaries of the gray conversion) and errs on the large side: `python benchmarks/serve.py
--decode-memory` measures the peak of each kind of image against its estimate (ratios 1.1 to 3.7).
"""

from __future__ import annotations

import asyncio
import io
import math
import threading
import warnings
from collections import deque
from dataclasses import dataclass, field, fields
from typing import BinaryIO, NamedTuple

from PIL import Image

from .errors import CxrlabError

_PIL_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}  # Pillow's storage
_NOT_REDUCIBLE = ("1", "P")  # Image.reduce() refuses these modes, so decode converts them at full size
_WIDE_PIXEL = 4  # every other mode Pillow stores in 4 bytes per pixel (RGB too)
_PREMULTIPLIED = ("LA", "RGBA")  # Image.reduce() goes through a premultiplied copy at full size
_WORK_PER_PIXEL = 28  # float64 copies of the gray conversion, float32 result, resize (measured <= 21)
_DICOM_WORK_PER_PIXEL = 36  # modality LUT and min-max in float64 at full size (measured <= 32, 16-bit)
_FIXED = 16 * 2**20  # decoder state, the heatmap (<= 512 px) and one inference's buffers


class ServeConfigError(CxrlabError, ValueError):
    """A `cxrlab serve` option out of range."""


def _limit(default, option: str | None = None, unit: int = 1):
    return field(default=default, metadata={"option": option, "unit": unit})


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts; every value is checked on construction (ServeConfigError).

    Parameters
    ----------
    max_upload_bytes : int
        The largest file accepted (413 beyond it); ``--max-upload-mb``.
    max_request_bytes : int, optional
        The largest request body, counted while it streams; ``--max-request-mb``.
        None: min(128 MiB, max_files x max_upload_bytes + 1 MiB).
    max_files : int
        The most files in one request.
    max_pixels : int
        The most pixels an image may declare (decompression bomb guard).
    max_decode_bytes : int
        The most memory decoding one image may take, estimated from its header; ``--max-decode-mb``.
    decode_budget_bytes : int
        The same, for all images being decoded at once; ``--decode-budget-mb``.
    decode_wait_s : float
        How long an image waits for room in the decode budget before the request is answered 503.
    body_timeout_s : float
        The whole request body must arrive within this; ``--request-timeout``.
    header_timeout_s : float
        The request headers must arrive within this (the uvicorn protocol; used by ``serve``).
    inference_slots : int, optional
        Images inferring at once; None: one per CPU.
    """

    max_upload_bytes: int = _limit(32 * 2**20, "--max-upload-mb", 2**20)
    max_request_bytes: int | None = _limit(None, "--max-request-mb", 2**20)
    max_files: int = _limit(32)
    max_pixels: int = _limit(50_000_000)
    max_decode_bytes: int = _limit(2**30, "--max-decode-mb", 2**20)
    decode_budget_bytes: int = _limit(2 * 2**30, "--decode-budget-mb", 2**20)
    decode_wait_s: float = _limit(15.0)
    body_timeout_s: float = _limit(60.0, "--request-timeout")
    header_timeout_s: float = _limit(10.0)
    inference_slots: int | None = _limit(None)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or not math.isfinite(value):
                name = f"{f.metadata['option']} ({f.name})" if f.metadata["option"] else f.name
                shown = value / f.metadata["unit"] if isinstance(value, (int, float)) else value
                raise ServeConfigError(f"serve: {name} must be a positive number, got {shown!r}")
        if self.max_request_bytes is None:
            object.__setattr__(self, "max_request_bytes",
                               min(128 * 2**20, self.max_files * self.max_upload_bytes + 2**20))
        if self.max_upload_bytes > self.max_request_bytes:
            raise ServeConfigError(f"serve: the per-file upload limit ({size_text(self.max_upload_bytes)}) is "
                                   f"larger than the request limit ({size_text(self.max_request_bytes)}); "
                                   f"raise --max-request-mb")
        if self.max_decode_bytes > self.decode_budget_bytes:
            raise ServeConfigError(f"serve: the per-image decode limit ({size_text(self.max_decode_bytes)}) is "
                                   f"larger than the decode budget ({size_text(self.decode_budget_bytes)}); an image "
                                   f"that large could never be admitted: raise --decode-budget-mb")


def limits_from_options(*, max_upload_mb: float | None = None, max_request_mb: float | None = None,
                        max_decode_mb: float | None = None, decode_budget_mb: float | None = None,
                        request_timeout: float | None = None) -> ServeLimits:
    """The `cxrlab serve` options (MiB, seconds; None: the default) -> ServeLimits, checked there."""
    limits = {} if request_timeout is None else {"body_timeout_s": request_timeout}
    mib_options = {"max_upload_mb": max_upload_mb, "max_request_mb": max_request_mb,
                   "max_decode_mb": max_decode_mb, "decode_budget_mb": decode_budget_mb}
    for option, value in mib_options.items():
        if value is not None:
            key = option.removesuffix("_mb") + "_bytes"
            limits[key] = int(value * 2**20) if math.isfinite(value) and value > 0 else value
    return ServeLimits(**limits)


def size_text(n: int) -> str:
    return f"{n / 2**20:.4g} MiB" if n >= 2**20 else f"{n:,} bytes"


class Estimate(NamedTuple):
    nbytes: int
    width: int
    height: int
    frames: int = 1

    def describe(self) -> str:
        frames = f" x {self.frames} frames" if self.frames > 1 else ""
        return f"{self.width} x {self.height}{frames} image"


def estimate_decode_bytes(file: BinaryIO, *, min_size: int | None, max_pixels: int) -> Estimate | None:
    """Peak memory decoding the image in ``file`` (seekable, at offset 0) will take, from its header only;
    None when the header is unreadable (the decoder then fails on the same header, before any pixel)."""
    size = file.seek(0, io.SEEK_END)
    file.seek(0)
    is_dicom = file.read(132)[128:132] == b"DICM"
    file.seek(0)
    estimate = _dicom_estimate(file, max_pixels) if is_dicom else _pillow_estimate(file, min_size, max_pixels)
    if estimate is None:
        return None
    return estimate._replace(nbytes=estimate.nbytes + 2 * size + _FIXED)


def _open_pillow(file: BinaryIO):
    """Image.open for our formats, without Pillow's own bomb check (decode.py does the same), lazily."""
    Image.init()
    prefix = file.read(16)
    for fmt in _PIL_FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        ok = accept(prefix) if accept else factory is not None
        if ok and not isinstance(ok, str):
            file.seek(0)
            return factory(file, "")
    return None


def _pillow_estimate(file: BinaryIO, min_size: int | None, max_pixels: int) -> Estimate | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = _open_pillow(file)
            if img is None:
                return None
            w, h = img.size
            if w * h > max_pixels:
                return Estimate(0, w, h)  # the decoder refuses it from the header, before any pixel
            if min_size and img.format == "JPEG" and w > 2 * min_size and h > 2 * min_size:
                img.draft(None, (min_size, min_size))  # as decode does: libjpeg scales while decoding
            mode, fmt, (dw, dh) = img.mode, img.format, img.size
        except Exception:
            return None
    full = dw * dh
    raw = full * _BYTES_PER_PIXEL.get(mode, _WIDE_PIXEL)
    if fmt == "WEBP":
        raw += 2 * full * _WIDE_PIXEL  # libwebp's canvas and frame buffers before Pillow's copy
    factor = min(dw, dh) // (2 * min_size) if min_size else 1
    if factor >= 2 and mode not in _NOT_REDUCIBLE:
        if mode.startswith("I;16") or mode in _PREMULTIPLIED:
            raw += full * 4  # reduce() works on a 32-bit 'I' or premultiplied copy at full size
        full = math.ceil(dw / factor) * math.ceil(dh / factor)
    return Estimate(raw + full * (_WIDE_PIXEL + _WORK_PER_PIXEL), w, h)


def _dicom_estimate(file: BinaryIO, max_pixels: int) -> Estimate | None:
    try:
        import pydicom
        from pydicom.dataset import Dataset

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(file, stop_before_pixels=True)
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
            samples = max(1, int(ds.get("SamplesPerPixel", 1) or 1))
            bits = max(1, int(ds.get("BitsAllocated", 16) or 16))
    except Exception:
        return None
    if rows * cols > max_pixels or rows < 1 or cols < 1:
        return Estimate(0, cols, rows, frames)  # refused by the decoder before pixel data is touched
    decoded_frames = 1 if hasattr(Dataset, "pixel_array_options") else frames  # pydicom 3: the first only
    raw = rows * cols * decoded_frames * samples * math.ceil(bits / 8)
    return Estimate(raw + rows * cols * _DICOM_WORK_PER_PIXEL, cols, rows, frames)


class Overloaded(Exception):
    """The decode budget stayed full for longer than the wait allowed."""


class DecodeBudget:
    """A byte-weighted semaphore shared by every thread and event loop of one app. Waiters are admitted
    in arrival order among those that fit, so a large image waiting for room does not hold up small ones
    (it gets room once enough is released, or Overloaded at its timeout).

    ``in_use`` is what admitted requests have reserved now and ``peak`` the most ever reserved at once."""

    def __init__(self, total: int):
        self.total = total
        self.in_use = self.peak = 0
        self._lock = threading.Lock()
        self._waiters: deque[tuple[int, asyncio.AbstractEventLoop, asyncio.Future]] = deque()

    async def acquire(self, n: int, timeout: float) -> None:
        """Reserve ``n`` bytes, waiting at most ``timeout`` seconds (then Overloaded)."""
        if n > self.total:
            raise ValueError(f"{n:,} bytes can never fit a budget of {self.total:,}")
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.in_use + n <= self.total:
                self._take(n)
                return
            entry = (n, loop, loop.create_future())
            self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(entry[2]), timeout)
        except BaseException as exc:  # timed out, cancelled or torn down: leave no reservation behind
            self._abandon(entry)
            if isinstance(exc, asyncio.TimeoutError):
                raise Overloaded(f"waited {timeout:g} s") from None
            raise

    def _abandon(self, entry) -> None:
        with self._lock:
            granted = not any(e is entry for e in self._waiters)
            if not granted:
                self._waiters.remove(entry)
        if granted:
            self.release(entry[0])

    def release(self, n: int) -> None:
        with self._lock:
            self.in_use -= n
        self._wake()

    def _take(self, n: int) -> None:
        self.in_use += n
        self.peak = max(self.peak, self.in_use)

    def _wake(self) -> None:
        """Grant, in arrival order, every waiter that fits."""
        with self._lock:
            for entry in list(self._waiters):
                n, loop, future = entry
                if self.in_use + n > self.total:
                    continue
                self._waiters.remove(entry)
                try:
                    loop.call_soon_threadsafe(_grant, future)
                except RuntimeError:  # its event loop is closed: nobody is waiting any more
                    continue
                self._take(n)


def _grant(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
