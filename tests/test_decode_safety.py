"""Decoding gives the right pixels for every real-world encoding; one hostile file never ends a run.

Each class of defect has its own test: n-bit data in 16-bit PNG (with and without sBIT), TIFF and
JPEG 2000; 32-bit and float TIFF; DICOM pixel padding, palette colour, VOI LUT and MONOCHROME1;
extreme declared sizes and decoder failures skipped with a reason during training; file names that
are not UTF-8. Every fixture is generated here; nothing binary is committed.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin, features

import cxrlab.decode as decode_mod
from cxrlab.cli import main
from cxrlab.decode import decode_image
from cxrlab.discover import discover
from cxrlab.embed import prepare, read_file
from cxrlab.errors import DataError, ImageError
from cxrlab.split import Manifest, split_samples

pydicom = pytest.importorskip("pydicom")
from conftest import make_dataset, synthetic_xray, write_tiny_backbone  # noqa: E402
from test_decode import bomb_png, chunk, dicom  # noqa: E402
from test_robustness import no_traceback  # noqa: E402

CHEST = synthetic_xray(5, True, 96)  # the 8-bit original every re-encoding is compared with
REF = CHEST / 255.0
HALF_LEVEL = 0.5 / 255 + 1e-6  # re-quantising to n bits moves a value by at most half an 8-bit level


def as_bits(u8: np.ndarray, n: int) -> np.ndarray:
    """The 8-bit image re-quantised to n bits, values 0 .. 2**n - 1 (stored low-aligned)."""
    return np.round(u8.astype(np.float64) * (2**n - 1) / 255).astype(np.uint16)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png16(values: np.ndarray, *, sbit: int | None = None, color_type: int = 0) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes no sBIT and no 16-bit colour)."""
    h, w = values.shape[:2]
    rows = values.astype(">u2").reshape(h, -1).tobytes()
    stride = len(rows) // h
    raw = b"".join(b"\0" + rows[i * stride:(i + 1) * stride] for i in range(h))
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
    if sbit is not None:
        channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
        out += chunk(b"sBIT", bytes([sbit] * channels))
    return out + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def tiff(arr: np.ndarray, **tags) -> bytes:
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    for tag, (value, kind) in tags.items():
        ifd[int(tag)] = value
        ifd.tagtype[int(tag)] = kind
    return encode(Image.fromarray(arr), "TIFF", tiffinfo=ifd)


# ------------------------------------------------------------------ 1. n-bit data in wide containers
@pytest.mark.parametrize("bits", [8, 10, 12, 14, 16])
@pytest.mark.parametrize("sbit", [False, True])
def test_nbit_png_decodes_as_the_8bit_original(bits, sbit):
    d = decode_image(png16(as_bits(CHEST, bits), sbit=bits if sbit else None), name="x.png")
    np.testing.assert_allclose(d.pixels, REF, atol=HALF_LEVEL)
    assert d.bit_depth == bits and d.format == "PNG"


def test_png_sbit_left_aligned_and_declared_range():
    # The PNG spec's own way: 12 significant bits shifted to the top of 16.
    left = decode_image(png16(as_bits(CHEST, 12) << 4, sbit=12), name="l.png").pixels
    np.testing.assert_allclose(left, REF, atol=HALF_LEVEL)
    # A dim 14-bit image (values only up to ~4095): sBIT says 14 bits, so it stays dim.
    dim = as_bits(CHEST, 12)
    d = decode_image(png16(dim, sbit=14), name="d.png")
    np.testing.assert_allclose(d.pixels, dim / 16383.0, atol=1e-6)
    assert d.bit_depth == 14


@pytest.mark.parametrize("bits", [10, 12])
def test_nbit_tiff_decodes_as_the_8bit_original(bits):
    d = decode_image(encode(Image.fromarray(as_bits(CHEST, bits)), "TIFF"), name="x.tif")
    np.testing.assert_allclose(d.pixels, REF, atol=HALF_LEVEL)
    assert d.bit_depth == bits


def test_tiff_declared_max_sample_value_is_honoured():
    values = as_bits(CHEST, 12)
    d = decode_image(tiff(values, **{"281": (16383, 3)}), name="m.tif")  # MaxSampleValue, SHORT
    np.testing.assert_allclose(d.pixels, values / 16383.0, atol=1e-6)
    # A declaration the data break (values above it) is ignored, not clipped.
    d = decode_image(tiff(values, **{"281": (1023, 3)}), name="b.tif")
    np.testing.assert_allclose(d.pixels, REF, atol=HALF_LEVEL)


def test_32bit_int_tiff_holding_8bit_values():
    d = decode_image(encode(Image.fromarray(CHEST.astype(np.int32)), "TIFF"), name="i.tif")
    np.testing.assert_allclose(d.pixels, REF, atol=1e-6)
    signed = CHEST.astype(np.int32) * 10 - 1000  # negative values: the image's own range
    d = decode_image(encode(Image.fromarray(signed), "TIFF"), name="s.tif")
    np.testing.assert_allclose(d.pixels, (signed - signed.min()) / np.ptp(signed), atol=1e-6)


FLOATS = {  # name -> (float image, expected [0, 1] image)
    "0..1": (REF, REF),
    "whole 0..4095": (as_bits(CHEST, 12), REF),
    "0..255 fractional": (CHEST * (254.5 / 255), CHEST * (254.5 / 255) / 255),
    "arbitrary": (REF * 3000 - 1000, (REF - REF.min()) / np.ptp(REF)),
    "binary mask 0/1": (CHEST > 128, CHEST > 128),
}


@pytest.mark.parametrize("case", list(FLOATS))
def test_float_tiff(case):
    values, expected = FLOATS[case]
    values = values.astype(np.float32)
    values[0, 0], values[0, 1] = np.nan, np.inf
    d = decode_image(encode(Image.fromarray(values), "TIFF"), name="f.tif")
    np.testing.assert_allclose(d.pixels.ravel()[2:], expected.ravel()[2:], atol=HALF_LEVEL)
    assert d.pixels[0, 0] == 0 and d.pixels[0, 1] == 0  # non-finite is black


def test_float_tiff_declared_sample_range():
    values = (REF * 3000 - 1000).astype(np.float32)
    d = decode_image(tiff(values, **{"340": (-2000.0, 12), "341": (4000.0, 12)}), name="r.tif")
    np.testing.assert_allclose(d.pixels, (values + 2000) / 6000, atol=1e-6)


@pytest.mark.skipif(not features.check("jpg_2000"), reason="Pillow built without OpenJPEG")
def test_16bit_jpeg2000_holding_12bit_values():
    d = decode_image(encode(Image.fromarray(as_bits(CHEST, 12)), "JPEG2000"), name="x.jp2")
    np.testing.assert_allclose(d.pixels, REF, atol=HALF_LEVEL)
    assert d.format == "JPEG2000" and d.bit_depth == 12


def test_16bit_colour_png_with_low_bit_values_is_refused_not_blackened():
    rgb = np.repeat(as_bits(CHEST, 12)[..., None], 3, axis=2)
    with pytest.raises(ImageError, match="16-bit colour PNG whose values use only the low"):
        decode_image(png16(rgb, color_type=2), name="c.png")
    full = np.repeat((CHEST.astype(np.uint16) * 257)[..., None], 3, axis=2)
    np.testing.assert_allclose(decode_image(png16(full, color_type=2), name="f.png").pixels, REF, atol=1e-6)


def test_wide_images_embed_as_the_8bit_original():
    """Through ``prepare`` (box-reduced while decoding, then resized) as every command sees them."""
    big = np.kron(CHEST, np.ones((6, 6), np.uint8))  # 576 x 576: reduced by 4 for a 64 px network
    expected = prepare(encode(Image.fromarray(big), "PNG"), 64, "8.png")[0]
    variants = {"12-bit PNG": png16(as_bits(big, 12)),
                "float TIFF": encode(Image.fromarray(big.astype(np.float32) / 255), "TIFF"),
                "32-bit TIFF": encode(Image.fromarray(big.astype(np.int32)), "TIFF")}
    for name, data in variants.items():
        np.testing.assert_allclose(prepare(data, 64, name)[0], expected, atol=2 / 255, err_msg=name)


# ------------------------------------------------------------------ 2. DICOM
LUNG = (slice(12, -12), slice(12, -12))


def chest12(lo=500, hi=3500) -> np.ndarray:
    return np.round(lo + REF * (hi - lo)).astype(np.uint16)


def padded(values: np.ndarray, pad) -> np.ndarray:
    out = values.copy()
    ring = np.ones(out.shape, bool)
    ring[LUNG] = False
    out[ring] = pad(ring.sum()) if callable(pad) else pad
    return out


def dcm(tmp_path, arr, name="a.dcm", **kw) -> np.ndarray:
    return decode_image(dicom(tmp_path / name, arr, **kw)).pixels


PADDINGS = {  # name -> (padding values in the ring, DICOM attributes)
    "value": (4095, dict(PixelPaddingValue=4095)),
    "range": (lambda n: np.random.default_rng(0).integers(3900, 4096, n), dict(PixelPaddingValue=4095,
                                                                               PixelPaddingRangeLimit=3900)),
    "zero": (0, dict(PixelPaddingValue=0)),
}


@pytest.mark.parametrize("case", list(PADDINGS))
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_padding_is_masked(tmp_path, case, photometric):
    pad, attrs = PADDINGS[case]
    base = chest12()
    plain = dcm(tmp_path, padded(base, 1000), "plain.dcm", bits_stored=12, photometric=photometric,
                PixelPaddingValue=1000)  # the same lung region, padding of another value
    out = dcm(tmp_path, padded(base, pad), bits_stored=12, photometric=photometric, **attrs)
    np.testing.assert_allclose(out[LUNG], plain[LUNG], atol=1e-6)
    lung = (base[LUNG] - base[LUNG].min()) / np.ptp(base[LUNG])
    np.testing.assert_allclose(out[LUNG], lung if photometric == "MONOCHROME2" else 1 - lung, atol=1e-6)
    ring = np.ones(out.shape, bool)
    ring[LUNG] = False
    assert (out[ring] == 0).all()  # padding is background: black


def test_dicom_padding_signed_and_windowed(tmp_path):
    hu = (chest12().astype(np.int16) - 2048)
    pad = padded(hu, -3000)
    kw = dict(bits_stored=16, PixelRepresentation=1, WindowCenter=0, WindowWidth=3000)
    windowed = dcm(tmp_path, pad, PixelPaddingValue=-3000, **kw)
    plain = dcm(tmp_path, hu, "plain.dcm", **kw)
    np.testing.assert_allclose(windowed[LUNG], plain[LUNG], atol=1e-6)
    assert windowed[0, 0] == 0
    # The padding value written unsigned (65536 - 3000) for signed data still marks the padding.
    unsigned = dcm(tmp_path, pad, "u.dcm", bits_stored=16, PixelRepresentation=1)
    as_us = dcm(tmp_path, pad, "us.dcm", bits_stored=16, PixelRepresentation=1, PixelPaddingValue=-3000)
    assert unsigned[LUNG].min() > 0.3 and as_us[LUNG].min() == 0.0  # unmasked padding squeezes the lung


def palette_dicom(path, index: np.ndarray, lut: np.ndarray, depth=16):
    """PALETTE COLOR with (256, 3) LUT entries of ``depth`` bits."""
    entries = lut.astype(f"<u{depth // 8}")
    attrs = {f"{c}PaletteColorLookupTableDescriptor": [256, 0, depth] for c in ("Red", "Green", "Blue")}
    attrs.update({f"{c}PaletteColorLookupTableData": entries[:, i].tobytes()
                  for i, c in enumerate(("Red", "Green", "Blue"))})
    return dicom(path, index, photometric="PALETTE COLOR", **attrs)


@pytest.mark.parametrize("depth, scale", [(16, 257), (16, 1), (8, 1)])
def test_dicom_palette_colour_goes_through_its_lut(tmp_path, depth, scale):
    inverted = np.repeat(((255 - np.arange(256)) * scale)[:, None], 3, axis=1)
    d = decode_image(palette_dicom(tmp_path / "p.dcm", CHEST, inverted, depth))
    np.testing.assert_allclose(d.pixels, 1 - REF, atol=1e-3)  # the LUT inverts: the index image is not it
    assert not d.color
    colourful = np.stack([np.arange(256), np.zeros(256), 255 - np.arange(256)], axis=1) * scale
    c = decode_image(palette_dicom(tmp_path / "c.dcm", CHEST, colourful, depth))
    assert c.color and c.colorfulness > 0.1


def test_dicom_voi_lut_sequence_and_monochrome1(tmp_path):
    from pydicom.dataset import Dataset

    values = chest12(0, 4095)
    gamma = np.round(4095 * (np.arange(4096) / 4095) ** 0.5).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new(0x00283006, "US", gamma.tolist())  # LUT Data
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        out = dcm(tmp_path, values, f"{photometric}.dcm", bits_stored=12, photometric=photometric,
                  VOILUTSequence=[item])
        expected = gamma[values] / 4095.0
        np.testing.assert_allclose(out, expected if photometric == "MONOCHROME2" else 1 - expected, atol=1e-6)


# ------------------------------------------------------------------ 3. sizes and decoder failures
def strip_png(w=100_000_000, h=1) -> bytes:
    """A 97 KB PNG of 1 x 100,000,000 pixels."""
    raw = zlib.compressobj(9)
    body = raw.compress(b"\0" + b"\x80" * w) + raw.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def strip():
    return strip_png()


def test_extreme_aspect_is_refused_before_decoding(strip, monkeypatch):
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded pixels of a refused image"))
    with pytest.raises(ImageError, match=r"100000000 x 1 pixels: an aspect ratio beyond 100:1"):
        decode_image(strip, name="strip.png")


def test_resize_of_an_extreme_shrink_stays_small():
    out = decode_mod.resize(np.linspace(0, 1, 2_000_000, dtype=np.float32)[None, :], 64)
    assert out.shape == (64, 64) and abs(float(out[0, 32]) - 0.5) < 0.02


def test_oversized_file_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(encode(Image.fromarray(CHEST), "PNG"))
    monkeypatch.setattr(decode_mod, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ImageError, match="more than the limit") as exc:
        read_file(path)
    assert exc.value.path == str(path)


def test_memory_error_while_resizing_is_an_image_error(monkeypatch):
    import cxrlab.embed as embed

    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(embed, "resize", no_memory)
    with pytest.raises(ImageError, match="out of memory resizing a 96 x 96 image"):
        prepare(encode(Image.fromarray(CHEST), "PNG"), 64, "a.png")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return f"onnx:{write_tiny_backbone(tmp_path_factory.mktemp('bb') / 'tiny.onnx')}"


def _train(root: Path, out: Path, tiny: str, *extra) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["train", str(root), "--output", str(out), "--backbone", tiny, "--validation-percentage", "25",
                   "--testing-percentage", "25", "-q", *extra])
    return rc, stdout.getvalue(), stderr.getvalue()


def _skipped(err: str) -> dict[str, str]:
    lines = err.split("Skipped ", 1)[1].splitlines()[1:] if "Skipped " in err else []
    return dict(line[2:].split(": ", 1) for line in lines if line.startswith("  "))


def test_hostile_files_are_skipped_and_training_completes(tmp_path, tiny, strip, monkeypatch):
    root = make_dataset(tmp_path / "lungs", 12, 32)
    (root / "normal" / "strip.png").write_bytes(strip)
    (root / "abnormal" / "bomb.png").write_bytes(bomb_png())
    (root / "normal" / "twelve.png").write_bytes(png16(as_bits(synthetic_xray(99, False, 32), 12)))
    for name, size in (("oom.png", 31), ("crash.png", 29)):  # decoders that fail in ways nobody planned
        Image.fromarray(np.full((size, size), 90, np.uint8)).save(root / "abnormal" / name)
    load = Image.Image.load

    def failing_load(self):
        if self.size == (31, 31):
            raise MemoryError
        if self.size == (29, 29):
            raise RuntimeError("decoder bug")
        return load(self)

    monkeypatch.setattr(Image.Image, "load", failing_load)
    rc, out, err = _train(root, tmp_path / "model", tiny, "--no-report")
    no_traceback(out, err)
    assert rc == 0 and (tmp_path / "model" / "model.onnx").is_file()
    skipped = _skipped(err)
    assert "aspect ratio beyond 100:1" in skipped[str(root / "normal" / "strip.png")]
    assert "decompression bomb" in skipped[str(root / "abnormal" / "bomb.png")]
    assert "too large to decode" in skipped[str(root / "abnormal" / "oom.png")]
    assert "decoder bug" in skipped[str(root / "abnormal" / "crash.png")]
    assert str(root / "normal" / "twelve.png") not in skipped and len(skipped) == 4


def test_non_utf8_file_name_in_training_folder(tmp_path, tiny):
    root = make_dataset(tmp_path / "lungs", 12, 32)
    bad = os.fsencode(root / "normal") + b"/\xff\xfe caf\xe9.png"
    os.rename(os.fsencode(root / "normal" / "img_000.png"), bad)
    os.mkdir(os.fsencode(root) + b"/\xe9t\xe9")  # a class folder named in Latin-1
    Image.fromarray(CHEST).save(os.fsdecode(os.fsencode(root) + b"/\xe9t\xe9/a.png"))
    rc, out, err = _train(root, tmp_path / "model", tiny, "--no-report")  # the report costs ~20 s here
    no_traceback(out, err)
    assert rc == 0 and (tmp_path / "model" / "model.onnx").is_file()
    note = [line for line in err.splitlines() if "not valid UTF-8" in line]
    assert len(note) == 1 and "2 file(s) or folder(s)" in note[0] and "\\xe9t\\xe9/" in note[0], err
    rel = {e.relpath for e in Manifest.read(tmp_path / "model.run" / "split.csv").entries}
    assert len(rel) == 23 and all(r.isprintable() for r in rel)


def test_discover_and_manifest_with_non_utf8_names(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        Image.fromarray(CHEST).save(tmp_path / label / "ok.png")
    Image.fromarray(CHEST).save(os.fsdecode(os.fsencode(tmp_path / "a") + b"/\xff.png"))
    ds = discover(tmp_path, min_per_class=0)
    assert [s.relpath for s in ds.samples] == ["a/ok.png", "b/ok.png"]
    assert any("a/\\xff.png" in w for w in ds.warnings)
    # Through the API a surrogate name can still reach the manifest: it is written escaped, never raises.
    from cxrlab.discover import Sample

    manifest, _ = split_samples([Sample(os.fsdecode(b"a/\xff.png"), "a"), Sample("b/ok.png", "b")])
    manifest.write(tmp_path / "split.csv")
    assert "a/\\xff.png" in (tmp_path / "split.csv").read_text(encoding="utf-8") and manifest.digest()


@pytest.mark.parametrize("content, message", [
    ("relpath,label,group,split\na/\xe9.png,a,g,train\n".encode("latin-1"), "not UTF-8 text"),
    (b"relpath,label,group,split\na/x.png,a\n", "line 2: 2 column"),
    (b"relpath,label\n", "expected columns"),
    (b"relpath,label,group,split\na/x.png,a,g,holdout\n", "line 2: split 'holdout'"),
])
def test_bad_split_file_is_one_clear_error(tmp_path, content, message):
    (tmp_path / "split.csv").write_bytes(content)
    with pytest.raises(DataError, match=message):
        Manifest.read(tmp_path / "split.csv")


def test_split_file_with_a_spreadsheet_bom(tmp_path):
    (tmp_path / "split.csv").write_bytes("\ufeffrelpath,label,group,split\na/x.png,a,g,test\n".encode("utf-8"))
    assert Manifest.read(tmp_path / "split.csv").entries[0].split == "test"
