"""report.html of a training run shows class activation map overlays and the border-heat check."""

from __future__ import annotations

import base64
import io
import json
import re

import markupsafe
from PIL import Image

import cxrlab

OVERLAY_RE = re.compile(r"<img class='overlay' src='data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)'")


def test_train_report_shows_heatmaps(tmp_path):
    from conftest import make_dataset
    from conftest import write_tiny_backbone

    root = make_dataset(tmp_path / "lungs", n_per_class=16, size=900)  # larger than the 384 px overlays
    out = tmp_path / "model"
    backbone = f"onnx:{write_tiny_backbone(tmp_path / 'tiny.onnx')}"
    result = cxrlab.train(root, output=out, backbone=backbone, validation_percentage=25, testing_percentage=30,
                          ood=False)
    assert result.report_path == tmp_path / "model.run" / "report.html"  # beside the model, not in it
    text = result.report_path.read_text()
    assert "<h2>Where the model looked</h2>" in text
    assert "Every map below shares one colour scale" in text and "inferno" in text
    pngs = OVERLAY_RE.findall(text)
    assert pngs
    for b64 in pngs:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            im.load()
            assert max(im.size) <= 2 * 384
    m = re.search(r"Border heat share: mean (\d+\.\d)% \(n=(\d+)\)", text)
    assert m, "no border-heat line"
    heat = json.loads((result.run_dir / "metrics.json").read_text())["heatmaps"]
    assert heat["n"] == int(m.group(2)) == result.n_test
    assert abs(100 * heat["mean_border_share"] - float(m.group(1))) < 0.051
    assert ("class='warning'" in text) == heat["flag"]
    assert result.metrics["heatmaps"]["n"] == heat["n"]
    assert not re.search(r"(src|href)=['\"](?!data:)", text)  # still self-contained


def test_report_warns_when_heat_is_on_the_border(tmp_path):
    from cxrlab.report import BORDER_WARNING, write_report_html

    heat = {"summary": {"n": 3, "mean_border_share": 0.8, "median_border_share": 0.8, "flag": True}, "groups": []}
    write_report_html(tmp_path / "r.html", title="t", rows=[], labels=["abnormal", "normal"], heatmaps=heat)
    text = (tmp_path / "r.html").read_text()
    assert "Border heat share: mean 80.0% (n=3)" in text
    assert "class='warning'" in text and str(markupsafe.escape(BORDER_WARNING)) in text
