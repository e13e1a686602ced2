"""Tests for cxrlab.decode; every fixture is generated here, nothing binary is committed."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxrlab.decode import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    DecodedImage,
    decode_image,
    looks_like_image_file,
    resize,
)
from cxrlab.errors import ImageError

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

W, H = 64, 48


def gray8(w=W, h=H):
    """A horizontal ramp 0..255."""
    return np.tile(np.linspace(0, 255, w), (h, 1)).astype(np.uint8)


def colour(w=W, h=H):
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    return a


def save(img, path, fmt=None, **kw):
    img.save(path, fmt, **kw)
    return path


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(w=100_000, h=100_000) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def dicom(path, arr, *, photometric="MONOCHROME2", bits_stored=None, pixels=True, ts=ExplicitVRLittleEndian,
          **extra):
    """Write a DX dataset; ``pixels`` False omits PixelData, bytes sets encapsulated data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr.shape[-3:-1] if arr.ndim == 3 and arr.shape[-1] == 3 else arr.shape[-2:]
    rgb = arr.shape[-1] == 3 and arr.ndim >= 3
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB" if rgb else photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for k, v in extra.items():
        setattr(ds, k, v)
    if pixels is True:
        ds.PixelData = arr.tobytes()
    elif pixels:
        ds.PixelData = pixels
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


RAMP12 = np.tile(np.linspace(0, 4095, W), (H, 1)).astype(np.uint16)


def mk_exif(p):
    a = np.zeros((40, 60), np.uint8)  # stored landscape: 60 wide, 40 high
    a[:8, :8] = 255  # bright top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    return save(Image.fromarray(a), p / "rot.jpg", exif=exif, quality=95)


def mk_gif(p):
    frames = [Image.fromarray(np.full((H, W), v, np.uint8)).convert("P") for v in (10, 250)]
    return save(frames[0], p / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)


def mk_multitiff(p):
    frames = [Image.fromarray(np.full((H, W), v, np.uint8)) for v in (10, 250)]
    return save(frames[0], p / "pages.tif", save_all=True, append_images=frames[1:])


def mk_truncated(p, fmt, suffix):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), np.uint8)).save(buf, fmt)
    path = p / f"cut{suffix}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def mk_dir(p):
    (p / "x.jpg").mkdir()
    return p / "x.jpg"


def mk_bytes(name, data):
    def make(p):
        (p / name).write_bytes(data)
        return p / name
    return make


G = lambda: Image.fromarray(gray8())  # noqa: E731
RGB = lambda: Image.fromarray(colour())  # noqa: E731

# case id -> (builder(tmp_path) -> path, expected dict, or error substring)
CASES = {
    "gray-jpeg": (lambda p: save(G(), p / "a.jpg"), dict(format="JPEG", color=False, bit_depth=8)),
    "gray-png": (lambda p: save(G(), p / "a.png"), dict(format="PNG", color=False, bit_depth=8, exact=True)),
    "png16": (lambda p: save(Image.fromarray(np.tile(np.linspace(0, 65535, 256), (8, 1)).astype(np.uint16)),
                             p / "a16.png"), dict(format="PNG", bit_depth=16, ramp=True, shape=(8, 256))),
    "rgb-of-gray-jpeg": (lambda p: save(G().convert("RGB"), p / "g.jpg"), dict(format="JPEG", color=False)),
    "colour-jpeg": (lambda p: save(RGB(), p / "c.jpg"), dict(format="JPEG", color=True, colorful=0.1)),
    "rgba-png": (lambda p: save(RGB().convert("RGBA"), p / "c.png"),
                 dict(format="PNG", color=True, colorful=0.1)),
    "palette-png": (lambda p: save(G().convert("P"), p / "p.png"), dict(format="PNG", color=False)),
    "cmyk-jpeg": (lambda p: save(RGB().convert("CMYK"), p / "k.jpg"), dict(format="JPEG", color=True)),
    "bmp": (lambda p: save(G(), p / "a.bmp"), dict(format="BMP", exact=True)),
    "tiff": (lambda p: save(G(), p / "a.tiff"), dict(format="TIFF", exact=True)),
    "webp": (lambda p: save(G(), p / "a.webp", lossless=True), dict(format="WEBP", exact=True)),
    "animated-gif": (mk_gif, dict(format="GIF", mean_below=0.1)),
    "multipage-tiff": (mk_multitiff, dict(format="TIFF", mean_below=0.1)),
    "exif-rotated": (mk_exif, dict(format="JPEG", shape=(60, 40), size=(40, 60), bright_top_right=True)),
    "png-named-jpg": (lambda p: save(G(), p / "liar.jpg", "PNG"), dict(format="PNG", exact=True)),
    "zero-bytes": (mk_bytes("empty.jpg", b""), "empty file (0 bytes)"),
    "text-as-jpg": (mk_bytes("notes.jpg", b"just some notes\n"), "not an image"),
    "html-as-png": (mk_bytes("page.png", b"<html><body>404</body></html>"), "'<html"),
    "truncated-jpeg": (lambda p: mk_truncated(p, "JPEG", ".jpg"), "truncated or corrupt JPEG"),
    "truncated-png": (lambda p: mk_truncated(p, "PNG", ".png"), "truncated or corrupt PNG"),
    "bomb-png": (mk_bytes("bomb.png", bomb_png()), "more than the limit of 120,000,000"),
    "directory": (mk_dir, "is a directory"),
    "dicom-12bit-rescale": (lambda p: dicom(p / "a.dcm", RAMP12, bits_stored=12, RescaleSlope=2,
                                            RescaleIntercept=-1024),
                            dict(format="DICOM", bit_depth=12, ramp=True, color=False)),
    "dicom-mono1": (lambda p: dicom(p / "m1.dcm", RAMP12, photometric="MONOCHROME1", bits_stored=12),
                    dict(format="DICOM", ramp_down=True)),
    "dicom-window": (lambda p: dicom(p / "w.dcm", RAMP12, bits_stored=12, WindowCenter=2000,
                                     WindowWidth=1000),
                     dict(format="DICOM", saturated=True)),
    "dicom-rgb": (lambda p: dicom(p / "c.dcm", colour()),
                  dict(format="DICOM", color=True, colorful=0.1, bit_depth=8)),
    "dicom-multiframe": (lambda p: dicom(p / "mf.dcm", np.stack([RAMP12, RAMP12[:, ::-1]]), bits_stored=12,
                                         NumberOfFrames=2), dict(format="DICOM", ramp=True, shape=(H, W))),
    "dicom-no-pixels": (lambda p: dicom(p / "sr.dcm", RAMP12, pixels=False), "DICOM has no pixel data"),
    "dicom-jpeg2000": (lambda p: dicom(p / "j2k.dcm", RAMP12, ts="1.2.840.10008.1.2.4.90",
                                       pixels=pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 60])),
                       "JPEG 2000"),
    "dicom-no-extension": (lambda p: dicom(p / "IM0001", RAMP12, bits_stored=12),
                           dict(format="DICOM", ramp=True)),
}


def check_invariants(d: DecodedImage):
    assert isinstance(d, DecodedImage)
    px = d.pixels
    assert px.dtype == np.float32 and px.ndim == 2 and px.flags.c_contiguous
    assert np.isfinite(px).all() and px.min() >= 0.0 and px.max() <= 1.0
    assert d.width >= 1 and d.height >= 1 and 0.0 <= d.colorfulness <= 1.0
    assert d.format in {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF", "DICOM"}


@pytest.mark.parametrize("case", list(CASES))
def test_decode_cases(tmp_path, case):
    build, expected = CASES[case]
    path = build(tmp_path)
    if isinstance(expected, str):
        with pytest.raises(ImageError) as exc:
            decode_image(path)
        assert expected in exc.value.reason
        assert exc.value.path == str(path)
        return
    for source in (path, path.read_bytes()):
        d = decode_image(source, name=path.name)
        check_invariants(d)
        px = d.pixels
        assert (d.height, d.width) == px.shape == expected.get("shape", px.shape)
        if "size" in expected:
            assert (d.width, d.height) == expected["size"]
        for key in ("format", "color", "bit_depth"):
            if key in expected:
                assert getattr(d, key) == expected[key], key
        if "colorful" in expected:
            assert d.colorfulness > expected["colorful"]
        if expected.get("exact"):
            np.testing.assert_allclose(px, gray8() / 255.0, atol=1e-6)
        if expected.get("ramp") or expected.get("ramp_down"):
            row = px[0] if expected.get("ramp") else px[0][::-1]
            assert np.all(np.diff(row) >= 0)
            assert row[0] == pytest.approx(0, abs=1e-6) and row[-1] == pytest.approx(1)
        if "mean_below" in expected:
            assert px.mean() < expected["mean_below"]
        if expected.get("bright_top_right"):
            assert px[:6, -6:].mean() > 0.8 and px[:6, :6].mean() < 0.2 and px[-6:, -6:].mean() < 0.2
        if expected.get("saturated"):  # ramp 0..4095 through window 1500..2500
            assert px[0, 0] == 0 and px[0, -1] == 1 and ((px[0] > 0) & (px[0] < 1)).sum() >= 10
    assert looks_like_image_file(path)


def test_monochrome1_is_inverted_monochrome2(tmp_path):
    m2 = decode_image(dicom(tmp_path / "m2.dcm", RAMP12, bits_stored=12)).pixels
    m1 = decode_image(dicom(tmp_path / "m1.dcm", RAMP12, photometric="MONOCHROME1", bits_stored=12)).pixels
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m1[0, 0] == 1.0 and m2[0, 0] == 0.0


def test_rescale_is_applied_before_windowing(tmp_path):
    # Stored 0..4095 with slope 2, intercept -1024 spans -1024..7166; the window sits in rescaled units.
    d = decode_image(dicom(tmp_path / "r.dcm", RAMP12, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024,
                           WindowCenter=3071, WindowWidth=2))
    row = d.pixels[0]
    assert row[row > 0.5].size == (RAMP12[0] >= 2048).sum()


def test_compressed_dicom_without_decoder_names_syntax_and_package(tmp_path):
    get_decoder = pytest.importorskip("pydicom.pixels").get_decoder
    ts = "1.2.840.10008.1.2.4.70"  # JPEG Lossless SV1: Pillow cannot decode it
    if get_decoder(ts).is_available:
        pytest.skip("a JPEG Lossless decoder is installed")
    frame = pydicom.encaps.encapsulate([b"\xff\xd8" + b"\0" * 30])
    path = dicom(tmp_path / "ll.dcm", RAMP12, ts=ts, pixels=frame)
    with pytest.raises(ImageError, match=r"JPEG Lossless.*needs a decoder: pip install pylibjpeg"):
        decode_image(path)


def test_bomb_is_rejected_before_allocating():
    t = time.perf_counter()
    with pytest.raises(ImageError, match="100000 x 100000 = 10,000,000,000 pixels.*decompression bomb"):
        decode_image(bomb_png(), name="bomb.png")
    assert time.perf_counter() - t < 1.0


def test_max_pixels_argument(tmp_path):
    with pytest.raises(ImageError, match="limit of 100"):
        decode_image(png_bytes(G()), name="a.png", max_pixels=100)


def test_missing_file_and_bytes_name(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        decode_image(tmp_path / "nope.png")
    with pytest.raises(ImageError) as exc:
        decode_image(b"garbage!", name="up.jpg")
    assert exc.value.path == "up.jpg"


def test_dicom_without_preamble_by_suffix(tmp_path):
    path = dicom(tmp_path / "a.dcm", RAMP12, bits_stored=12)
    raw = path.read_bytes()[132:]  # drop preamble + 'DICM'; pydicom reads it with force=True
    ds = pydicom.dcmread(io.BytesIO(raw), force=True)
    assert "PixelData" in ds
    d = decode_image(raw, name="bare.dcm")
    assert d.format == "DICOM" and d.pixels.shape == (H, W)


def test_looks_like_image_file(tmp_path):
    assert IMAGE_EXTENSIONS >= {".jpg", ".png", ".dcm", ".dicom", ".webp", ".gif", ".tif"}
    assert looks_like_image_file(tmp_path / "X.JPG") and looks_like_image_file("a/b.DiCoM")
    assert not looks_like_image_file(tmp_path / "notes.txt")
    (tmp_path / "README").write_text("hello")
    assert not looks_like_image_file(tmp_path / "README")
    assert looks_like_image_file(dicom(tmp_path / "1.2.840.99", RAMP12))  # UID-style name
    assert not looks_like_image_file(tmp_path / "missing")
    assert MAX_PIXELS == 120_000_000


def test_draft_reduces_large_jpeg(tmp_path):
    a = np.tile(np.linspace(0, 255, 2000), (2000, 1)).astype(np.uint8)
    path = save(Image.fromarray(a), tmp_path / "big.jpg")
    d = decode_image(path, min_size=224)
    check_invariants(d)
    assert (d.width, d.height) == (2000, 2000)
    assert 224 <= min(d.pixels.shape) and max(d.pixels.shape) < 2000
    full = decode_image(path)
    assert full.pixels.shape == (2000, 2000)
    rgb = decode_image(save(Image.fromarray(colour(2000, 1000)), tmp_path / "c.jpg"), min_size=224)
    assert rgb.color and max(rgb.pixels.shape) < 2000 and (rgb.width, rgb.height) == (2000, 1000)
    small = decode_image(save(Image.fromarray(a[:300, :300]), tmp_path / "s.jpg"), min_size=224)
    assert small.pixels.shape == (300, 300)  # not more than 2 * min_size: decoded at full size


@pytest.mark.parametrize("size, shape", [(224, (224, 224)), ((100, 50), (100, 50)), (1000, (1000, 1000))])
def test_resize(size, shape):
    rng = np.random.default_rng(1)
    px = rng.random((300, 200), dtype=np.float32)
    px[0, 0], px[-1, -1] = 0.0, 1.0
    out = resize(px, size)
    assert out.shape == shape and out.dtype == np.float32 and out.flags.c_contiguous
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert abs(out.mean() - px.mean()) < 0.02
    flat = resize(np.full((300, 200), 0.25, np.float32), size)
    np.testing.assert_allclose(flat, 0.25, atol=1e-6)


def test_resize_antialiases():
    checker = (np.indices((512, 512)).sum(0) % 2).astype(np.float32)
    out = resize(checker, 64)
    assert np.allclose(out, 0.5, atol=0.05)  # no aliasing: every output pixel averages many inputs


def _seed(fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (24, 32, 3), np.uint8)).save(buf, fmt, **kw)
    return buf.getvalue()


def _seed_dicom():
    buf = io.BytesIO()
    dicom(buf, RAMP12[:8, :8].copy(), bits_stored=12, WindowCenter=100, WindowWidth=50)
    return buf.getvalue()


def _seed_wide():
    """16-bit PNG with an sBIT chunk, 16-bit and float TIFF: the files the grey-level rule reads."""
    png = bytearray(png_bytes(Image.fromarray(RAMP12[:8, :8].copy())))
    png[33:33] = chunk(b"sBIT", b"\x0c")  # right after IHDR
    tifs = []
    for arr in (RAMP12[:8, :8], RAMP12[:8, :8].astype(np.float32) - 100):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "TIFF")
        tifs.append(buf.getvalue())
    return [bytes(png), *tifs]


def _seed_dicom_lut():
    """Pixel padding plus a VOI window, and a PALETTE COLOR image with its LUTs."""
    pad, pal = io.BytesIO(), io.BytesIO()
    dicom(pad, RAMP12[:8, :8].copy(), bits_stored=12, PixelPaddingValue=0, PixelPaddingRangeLimit=100,
          WindowCenter=2000, WindowWidth=1000)
    lut = {f"{c}PaletteColorLookupTableDescriptor": [256, 0, 16] for c in ("Red", "Green", "Blue")}
    lut.update({f"{c}PaletteColorLookupTableData": (np.arange(256, dtype="<u2") * 257).tobytes()
                for c in ("Red", "Green", "Blue")})
    dicom(pal, gray8(8, 8), photometric="PALETTE COLOR", **lut)
    return [pad.getvalue(), pal.getvalue()]


SEEDS = [_seed("PNG"), _seed("JPEG", quality=80), _seed_dicom(), *_seed_wide(), *_seed_dicom_lut()]


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=2048), mutated()))
def test_fuzz_never_raises_foreign_exceptions(data):
    try:
        d = decode_image(data, name="fuzz.bin")
    except ImageError as e:
        assert e.path == "fuzz.bin" and e.reason
    else:
        check_invariants(d)
