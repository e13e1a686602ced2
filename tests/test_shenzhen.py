"""End-to-end on the shared Shenzhen set (skipped with a reason when it is absent)."""

import csv

import numpy as np
import pytest

import cxrlab
from cxrlab.cli import main

pytestmark = pytest.mark.slow


def test_accuracy_and_auc(shenzhen_run):
    result, _ = shenzhen_run
    assert result.n_test > 50
    assert result.final_test_accuracy_argmax >= 0.80  # the tutorial's figure
    assert result.metrics["test"]["auc"] >= 0.88


def test_second_run_hits_cache_for_every_image(shenzhen_run, shenzhen_dir, tmp_path):
    _, bn = shenzhen_run
    again = cxrlab.train(shenzhen_dir, output=tmp_path / "m", bottleneck_dir=bn, report=False, ood=False,
                         fine_tune=False)  # the frozen embeddings are what the cache holds
    assert again.cache_misses == 0 and again.cache_hits == 662


def test_predict_prints_tutorial_lines(shenzhen_run, shenzhen_dir, capsys):
    result, _ = shenzhen_run
    test_rows = [r for r in csv.DictReader(open(result.run_dir / "split.csv")) if r["split"] == "test"]
    assert main(["predict", "--model", str(result.model_dir), str(shenzhen_dir / test_rows[0]["relpath"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("decision: ")  # the shipped decision first, then the tutorial's lines
    assert {lines[1].split(" ")[0], lines[2].split(" ")[0]} == {"abnormal", "normal"}
    assert all(" (score = " in line for line in lines[1:3])


def test_ood_gate_refuses_photos_and_accepts_xrays(shenzhen_run, shenzhen_dir):
    import io

    from PIL import Image, ImageEnhance
    import skimage.data

    result, _ = shenzhen_run
    model = cxrlab.load_model(result.model_dir)

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        return buf.getvalue()

    photos = {}
    for name in ["astronaut", "coffee", "chelsea", "rocket", "camera", "moon", "page", "text", "coins", "horse",
                 "clock", "brick", "grass", "gravel", "cell", "checkerboard", "hubble_deep_field", "cat", "retina",
                 "shepp_logan_phantom", "microaneurysms", "binary_blobs", "immunohistochemistry", "logo", "colorwheel"]:
        a = getattr(skimage.data, name)()
        if a.dtype != np.uint8:  # bool masks and float images in [0, 1] or other ranges
            a = a.astype(np.float64)
            a = (255 * (a - a.min()) / (np.ptp(a) or 1)).astype(np.uint8)
        photos[name] = a
    rng = np.random.default_rng(0)
    photos["noise"] = rng.integers(0, 256, (256, 256), dtype=np.uint8)
    photos["blank"] = np.zeros((256, 256), np.uint8)
    ramp = np.linspace(0, 255, 256)
    photos["colour gradient"] = np.stack([np.tile(ramp, (256, 1)), np.tile(ramp[:, None], (1, 256)),
                                          np.full((256, 256), 128)], -1).astype(np.uint8)
    accepted = [n for n, a in photos.items() if not model.predict_bytes(png(a), n).ood]
    assert accepted == []
    test = [r["relpath"] for r in csv.DictReader(open(result.run_dir / "split.csv")) if r["split"] == "test"]
    preds = model.predict([str(shenzhen_dir / t) for t in test])
    assert np.mean([not p.ood for p in preds]) >= 0.99
    # Real shifts between hospitals that must not break anything: contrast, exposure, gamma, resolution.
    changes = (lambda im: ImageEnhance.Contrast(im).enhance(0.7), lambda im: ImageEnhance.Contrast(im).enhance(1.3),
               lambda im: ImageEnhance.Brightness(im).enhance(0.8), lambda im: im.point(lambda v: int(255 * (v / 255) ** 0.7)),
               lambda im: im.resize((100, 100)).resize(im.size), lambda im: im.resize((240, 299)))
    for change in changes:
        shifted = []
        for t in test:
            buf = io.BytesIO()
            change(Image.open(shenzhen_dir / t).convert("L")).save(buf, "PNG")
            shifted.append(not model.predict_bytes(buf.getvalue(), t).ood)
        assert np.mean(shifted) >= 0.95
