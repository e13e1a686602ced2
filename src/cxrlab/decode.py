"""Path, bytes, Pillow image or numpy array -> float32 grayscale array in [0, 1] plus metadata, for every
supported format; an image in memory follows the rules a file of the same samples follows.

Which stored value is black and which is white
----------------------------------------------
A container's type says little about its data: 10-, 12- or 14-bit detector values are routinely
stored in 16-bit PNG, TIFF or JPEG 2000, 8-bit values in 32-bit integer or float TIFF. Dividing by
the type's maximum turns such images nearly black. The rule, decided per image from that image
alone (deterministic, and the same whether or not the image is downscaled while decoding):

1. 8-bit samples (JPEG, 8-bit PNG/TIFF/BMP/WebP/GIF, palettes): value / 255.
2. Unsigned integers in a wider container: black is 0; white is the maximum the file declares, if
   it declares one and the data keep to it (a PNG ``sBIT`` chunk of n bits: 2**n - 1, or 65535 when
   the values exceed that, i.e. they are left-aligned as the PNG spec intends; a TIFF
   BitsPerSample below the container's; a TIFF (S)MaxSampleValue below the type's maximum);
   otherwise 2**n - 1 for the smallest common depth n in 8, 10, 12, 14, 16, 24, 32 that holds the
   image's largest value. So 8-bit values in a 16-bit PNG decode exactly as the 8-bit original.
3. Signed integers holding negative values: the image's own minimum and maximum.
4. Floating point (NaN and infinities become black): TIFF SMinSampleValue..SMaxSampleValue when
   they bracket the data; else data within 0..1 as they are; whole numbers >= 0 by rule 2; data
   within 0..255 / 255; anything else by its own minimum and maximum.
   A declared range is ignored when the image's brightest value stays below 1/256 of it (the
   image would be a single grey level: evidently not its range).
5. DICOM follows the standard with pydicom's own functions (see ``dicom_decode``).
Rules 2-4 (``levels``) and the size guard (``check_size``) live in ``pixels``, which ``dicom_decode`` shares.

Guards (each failure is one ImageError naming the file; nothing else escapes ``decode_image``):
the file size (MAX_FILE_BYTES) before reading, the declared pixel count (MAX_PIXELS) and aspect
ratio (MAX_ASPECT) before any pixel is decoded; MemoryError and any decoder exception on hostile
bytes become an ImageError with the reason.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError
from .pixels import MAX_ASPECT, MAX_PIXELS, DecodedImage  # noqa: F401  (the decode API; defined below both decoders)
from .pixels import check_size, colorfulness, colour_image, error_text, gray_image, levels

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".jp2", ".j2k", ".dcm", ".dicom"}
)
MAX_FILE_BYTES: int = 1 << 30
NOT_REGULAR = "not a regular file (a FIFO, socket or device); give an image file"

_PIL_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF", "JPEG2000")
_PIL_MAGIC = (b"\x89PNG", b"GIF8", b"RIFF", b"II*\x00", b"MM\x00*", b"\xff\xd8", b"BM", b"\xff\x4f\xff\x51",
              b"\x00\x00\x00\x0cjP  ")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_SUPPORTED = "expected JPEG, PNG, BMP, TIFF, WebP, GIF, JPEG 2000 or DICOM"
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


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
        data = read_image_bytes(label)
    try:
        if not data:
            raise ImageError(label, "empty file (0 bytes)")
        suffix = Path(str(label)).suffix.lower()
        if data[128:132] == b"DICM":
            return _decode_dicom(data, label, max_pixels, force=False)
        if suffix in _DICOM_SUFFIXES and not data.startswith(_PIL_MAGIC):
            return _decode_dicom(data, label, max_pixels, force=True)
        return _decode_pillow(data, label, max_pixels, min_size)
    except ImageError:
        raise
    except Exception as e:  # any decoder failure on hostile bytes must surface as ImageError
        raise _as_image_error(label, e) from e


def _as_image_error(label: str, e: Exception) -> ImageError:
    if isinstance(e, MemoryError):
        return ImageError(label, "out of memory while decoding; the image is too large")
    return ImageError(label, f"could not decode ({type(e).__name__}: {error_text(e)})")


def decode_pil(img: Image.Image, *, name: str = "<image>", max_pixels: int = MAX_PIXELS,
               min_size: int | None = None) -> DecodedImage:
    """A Pillow image in memory, by the rules its file would follow (EXIF orientation applied, ``img``
    itself left as it is); every failure raises ImageError."""
    check_size(name, *img.size, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _pillow_pixels(img, b"", name, min_size, draft=False)
    except ImageError:
        raise
    except Exception as e:
        raise _as_image_error(name, e) from e


def decode_array(array: np.ndarray, *, name: str = "<array>", max_pixels: int = MAX_PIXELS,
                 min_size: int | None = None) -> DecodedImage:
    """A numpy image by the rules a file of the same samples follows: (H, W) grey of any integer,
    boolean or floating type (uint8 as an 8-bit file, uint16 as a 16-bit PNG, float as a float TIFF),
    (H, W, 3) RGB or (H, W, 4) RGBA (alpha dropped). Every failure raises ImageError."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        hint = "; channels first? use np.moveaxis(a, 0, -1)" if a.ndim == 3 and a.shape[0] in (1, 3, 4) else ""
        raise ImageError(name, f"array of shape {a.shape}: expected (H, W) grey, (H, W, 3) RGB or (H, W, 4) "
                               f"RGBA{hint}")
    if a.dtype.kind not in "biuf":
        raise ImageError(name, f"array of dtype {a.dtype}: expected integer, boolean or floating-point samples")
    if a.size == 0:
        raise ImageError(name, f"empty array (shape {a.shape})")
    check_size(name, a.shape[1], a.shape[0], max_pixels)
    if a.dtype.kind == "f" and not np.isfinite(a).any():
        raise ImageError(name, "array holds no finite value (all NaN or infinite)")
    if a.dtype == bool:
        a = a.astype(np.uint8) * np.uint8(255)  # as a 1-bit file: False black, True white
    if a.ndim == 3 and a.dtype != np.uint8:
        return _wide_colour(a, name)
    return decode_pil(Image.fromarray(_pillow_samples(a)), name=name, max_pixels=max_pixels, min_size=min_size)


def _pillow_samples(a: np.ndarray) -> np.ndarray:
    """``a`` in a type Pillow holds without loss: uint8 (L, RGB, RGBA), uint16 (I;16), int32 (I), float32 (F)."""
    if a.dtype in (np.uint8, np.uint16):
        return a
    if a.dtype.kind in "iu" and int(a.min()) >= -(2**31) and int(a.max()) < 2**31:
        return a.astype(np.int32)
    return a.astype(np.float32)


def _wide_colour(a: np.ndarray, name: str) -> DecodedImage:
    """Colour samples wider than 8 bits: the grey-level rules over all three channels together."""
    rgb = a[..., :3].astype(np.float32)
    finite = np.isfinite(rgb)
    values = rgb[finite]
    is_float = a.dtype.kind == "f"
    black, white = levels(float(values.min()), float(values.max()), is_float=is_float,
                          integral=bool(np.all(values == np.round(values))))
    span = white - black
    scaled = (np.where(finite, rgb, np.float32(black)) - black) / span if span > 0 else np.zeros_like(rgb)
    bits = 32 if is_float else max(1, math.ceil(math.log2(span + 1))) if span > 0 else 8
    return colour_image(scaled.astype(np.float32), a.shape[1], a.shape[0], "array", bits)


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes; a folder, FIFO, missing, unreadable or oversized file raises ImageError."""
    if os.path.isdir(path):
        raise ImageError(path, "is a directory, not an image file")
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise ImageError(path, f"file not found ({e.strerror})") from None
    except OSError as e:
        raise ImageError(path, f"could not read file ({e.strerror or e})") from None
    if not Path(path).is_file():  # reading a FIFO would block forever
        raise ImageError(path, NOT_REGULAR)
    if st.st_size > MAX_FILE_BYTES:
        raise ImageError(path, f"file is {_size_text(st.st_size)}, more than the limit of {_size_text(MAX_FILE_BYTES)} "
                               "for one image; export a single frame or resize it")
    try:
        return Path(path).read_bytes()
    except PermissionError:
        raise ImageError(path, "permission denied; check the file's permissions") from None
    except OSError as e:
        raise ImageError(path, f"could not read file ({e.strerror or e})") from None
    except MemoryError:
        raise ImageError(path, f"out of memory reading a {_size_text(st.st_size)} file") from None


def _size_text(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def resize(pixels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear, antialiased resize of a float32 (h, w) array; ``size`` is an int or (height, width)."""
    arr = np.asarray(pixels, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"resize expects a 2-D array, got shape {arr.shape}")
    h, w = (size, size) if isinstance(size, (int, np.integer)) else size
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"resize size must be positive, got {size!r}")
    img = Image.fromarray(np.ascontiguousarray(arr))  # mode 'F'; Pillow's BILINEAR antialiases when shrinking
    # A huge shrink factor makes Pillow's filter tables huge (a 1 x 10^8 strip needs gigabytes):
    # box-reduce first then, as Pillow's reducing_gap does. Ordinary factors keep the exact filter.
    shrink = max(arr.shape[1] / int(w), arr.shape[0] / int(h))
    gap = 8.0 if shrink > 64 else None
    out = np.asarray(img.resize((int(w), int(h)), Image.BILINEAR, reducing_gap=gap), dtype=np.float32)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0))


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
            raise ImageError(label, f"image too large to decode ({error_text(e)}); resize it first") from None
        except Exception as e:
            raise ImageError(label, f"corrupt or unsupported {fmt} header: {error_text(e)}") from None
    raise ImageError(label, f"not an image (file starts with {_head(data)}); {_SUPPORTED}")


def _decode_pillow(data: bytes, label: str, max_pixels: int, min_size: int | None) -> DecodedImage:
    with warnings.catch_warnings():
        # Corrupt headers warn ("Truncated File Read"); our size check replaces DecompressionBombWarning.
        warnings.simplefilter("ignore")
        img = _open_pillow(data, label)
        check_size(label, *img.size, max_pixels)  # before any pixel is decoded
        return _pillow_pixels(img, data, label, min_size, draft=True)


def _pillow_pixels(img: Image.Image, data: bytes, label: str, min_size: int | None, *, draft: bool) -> DecodedImage:
    """The grey levels of an opened Pillow image. ``data``: its file's bytes, for what Pillow does not keep
    (PNG sBIT), or b"" for an image in memory; ``draft``: let a JPEG decode at reduced size."""
    fmt = img.format or ("?" if data else "in-memory")
    w, h = img.size
    try:
        if draft and min_size and fmt == "JPEG" and w > 2 * min_size and h > 2 * min_size:
            # Keep the mode (not 'L') so colorfulness survives for the OOD colour check.
            img.draft(None, (min_size, min_size))
        img.load()
        grey = _levels_of(img, data) if img.mode in _WIDE_MODES else None  # at full resolution
        _check_wide_colour(img, data, label)
        img = _reduce_for(img, min_size)
        loaded = img.size
        img = ImageOps.exif_transpose(img) or img
    except ImageError:
        raise
    except (Image.DecompressionBombError, MemoryError) as e:
        raise ImageError(label, f"image too large to decode ({error_text(e)}); resize it first") from None
    except Exception as e:
        raise ImageError(label, f"truncated or corrupt {fmt}: {error_text(e)}") from None
    if img.size != loaded:  # EXIF orientation 5-8 swapped the axes
        w, h = h, w
    if grey is not None:
        arr, spread, bits = _scale(img, grey[0], grey[1]), 0.0, grey[2]
    else:
        arr, spread, bits = _pil_to_gray(img)
    return gray_image(arr, w, h, fmt, bits, colorfulness=spread, in_range=grey is None)


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


def _levels_of(img: Image.Image, data: bytes) -> tuple[float, float, int]:
    """(black, white, significant bits) of a wide-mode Pillow image, from its full-resolution values."""
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        finite = a[np.isfinite(a)]
        if not finite.size:
            return 0.0, 1.0, 32
        lo, hi = float(finite.min()), float(finite.max())
        integral = bool(np.all(finite == np.round(finite)))
        black, white = levels(lo, hi, is_float=True, integral=integral, declared_white=_tiff_white(img),
                              declared_range=_tiff_range(img))
        return black, white, 32
    lo, hi = img.getextrema()
    declared = _png_white(data, hi) if img.format == "PNG" else _tiff_white(img)
    black, white = levels(float(lo), float(hi), declared_white=declared)
    bits = max(1, math.ceil(math.log2(white - black + 1))) if white > black else 8
    return black, white, bits


def _png_white(data: bytes, peak: float) -> float | None:
    """White of a 16-bit grayscale PNG from its sBIT chunk: 2**n - 1, or 65535 when left-aligned."""
    bits = _png_sbit(data)
    if bits is None or not 1 <= bits < 16:
        return None
    return float(2**bits - 1) if peak <= 2**bits - 1 else 65535.0


def _png_sbit(data: bytes) -> int | None:
    """The first byte (gray) of the sBIT chunk, which PNG puts before the first IDAT; Pillow drops it."""
    pos = 8
    while pos + 9 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"sBIT":
            return data[pos + 8] if length else None
        if kind in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def _tiff_tag(img: Image.Image, tag: int) -> float | None:
    value = getattr(img, "tag_v2", {}).get(tag)
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    try:
        value = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return value if value is not None and math.isfinite(value) else None


def _tiff_white(img: Image.Image) -> float | None:
    """A TIFF's declared white: (S)MaxSampleValue below the type maximum, else BitsPerSample below 16."""
    if img.format != "TIFF":
        return None
    bits = int(_tiff_tag(img, 258) or 0)  # BitsPerSample
    type_max = 2.0**bits - 1 if bits else math.inf
    for tag in (341, 281):  # SMaxSampleValue, MaxSampleValue
        value = _tiff_tag(img, tag)
        if value is not None and 0 < value < type_max:
            return value
    return float(2**bits - 1) if 8 < bits < 16 else None


def _tiff_range(img: Image.Image) -> tuple[float, float] | None:
    if img.format != "TIFF":
        return None
    lo, hi = _tiff_tag(img, 340), _tiff_tag(img, 341)  # SMinSampleValue, SMaxSampleValue
    return (lo, hi) if lo is not None and hi is not None and hi > lo else None


def _scale(img: Image.Image, black: float, white: float) -> np.ndarray:
    a = np.array(img, dtype=np.float32)  # a writable copy: scaled in place
    if img.mode == "F":
        a = np.where(np.isfinite(a), a, np.float32(black))
    span = white - black
    if not span > 0:
        return np.zeros(a.shape, dtype=np.float32)
    a -= np.float32(black)
    a *= np.float32(1.0 / span)
    return a


def _check_wide_colour(img: Image.Image, data: bytes, label: str) -> None:
    """Pillow keeps only the high byte of 16-bit colour samples: refuse data that live in the low bits."""
    if img.format == "PNG":
        wide = data[12:16] == b"IHDR" and data[24] == 16 and data[25] in (2, 4, 6)
    elif img.format == "TIFF":
        bps = getattr(img, "tag_v2", {}).get(258)
        wide = isinstance(bps, tuple) and len(bps) > 1 and all(b == 16 for b in bps)
    else:
        wide = False
    if not wide or img.mode in _WIDE_MODES:
        return
    bands = img.getextrema()
    bands = bands[:-1] if img.mode in ("LA", "RGBA") else bands
    peak = max(hi for _, hi in bands)
    if peak < 16:
        raise ImageError(label, f"16-bit colour {img.format} whose values use only the low 12 bits (or fewer); "
                                "it cannot be decoded faithfully (only the high byte is read): save it as 16-bit "
                                "grayscale or as 8-bit")


_BYTE_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255)  # exactly float32(v) / 255, looked up


def _pil_to_gray(img: Image.Image) -> tuple[np.ndarray, float, int]:
    """(grey levels, colorfulness in 0..1, bits) of an 8-bit Pillow image."""
    mode = img.mode
    if mode in ("L", "1", "LA", "La"):
        return _BYTE_LEVELS[np.asarray(img.convert("L"))], 0.0, 8
    if mode != "RGB":
        # Palette via RGBA so transparency never warns; alpha is then dropped, not composited.
        img = img.convert("RGBA" if mode in ("P", "PA") else "RGB").convert("RGB")
    spread = colorfulness(np.asarray(img)) / 255.0  # uint8 all the way: large photos stay cheap
    return _BYTE_LEVELS[np.asarray(img.convert("L"))], spread, 8


def _decode_dicom(data: bytes, label: str, max_pixels: int, *, force: bool) -> DecodedImage:
    from .dicom_decode import decode_dicom

    return decode_dicom(data, label, max_pixels, force=force)


