"""cxrlab compare: one train run and one evaluation -> a table, compare.json and an ROC overlay."""

from __future__ import annotations

import base64
import csv
import io
import json
import re

import pytest
from PIL import Image

import cxrlab
from cxrlab.cli import main
from cxrlab.compare import compare
from cxrlab.errors import DataError
from cxrlab.evaluate import evaluate
from cxrlab.metrics import delong_ci


@pytest.fixture(scope="module")
def two_dirs(tmp_path_factory):
    from conftest import make_dataset
    from conftest import write_tiny_backbone

    base = tmp_path_factory.mktemp("cmp")
    root = make_dataset(base / "lungs", n_per_class=16)
    other = make_dataset(base / "other", n_per_class=6, size=80)
    model = base / "runs" / "a" / "model"
    cxrlab.train(root, output=model, backbone=f"onnx:{write_tiny_backbone(base / 'tiny.onnx')}",
                 validation_percentage=25, testing_percentage=30, ood=False)
    evaluate(model, other, output=base / "eval" / "other", ood=False)
    return model, base / "eval" / "other"


def test_cli_compare_prints_rows_and_writes_roc(two_dirs, tmp_path, capsys):
    model, ev = two_dirs
    out = tmp_path / "cmp"
    assert main(["compare", str(model), str(ev), "--output", str(out), "--names", "internal,external"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("name") and "AUC" in lines[0]
    assert any(line.startswith("internal ") for line in lines) and any(line.startswith("external ") for line in lines)
    data = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["internal", "external"]
    assert data["runs"][0]["kind"].startswith("train") and data["runs"][1]["kind"] == "evaluation"
    assert data["runs"][1]["n"] == 12
    metrics = json.loads((model.with_name("model.run") / "metrics.json").read_text())["test"]
    assert data["runs"][0]["sensitivity"] == pytest.approx(metrics["sensitivity"])
    assert data["runs"][0]["auc"] == pytest.approx(metrics["auc"])  # recomputed from predictions.csv
    text = (out / "compare.html").read_text()
    m = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    with Image.open(io.BytesIO(base64.b64decode(m.group(1)))) as im:
        im.load()
        assert im.width > 200
    assert not re.search(r"(src|href)=['\"](?!data:)", text)


def test_compare_api_default_names_and_errors(two_dirs, tmp_path):
    model, ev = two_dirs
    r = compare([ev, ev])
    assert [x["name"] for x in r["runs"]] == ["other", "other #2"]
    with open(ev / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    auc, lo, hi = delong_ci([r["true_label"] == "abnormal" for r in rows], [float(r["score_abnormal"]) for r in rows])
    assert r["runs"][0]["auc"] == pytest.approx(auc) and r["runs"][0]["auc_ci"] == pytest.approx([lo, hi])
    assert compare([model])["runs"][0]["name"] == "a/model"
    with pytest.raises(DataError, match="predictions.csv is missing"):
        compare([tmp_path])
    with pytest.raises(DataError, match="--names"):
        compare([model, ev], names="only-one")
    assert delong_ci([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.3])[0] == 1.0


def test_compare_html_escapes_and_shows_each_run(two_dirs, tmp_path):
    model, ev = two_dirs
    r = compare([model, ev], tmp_path / "out", names=["<b>mine</b>", "it's"])
    text = (tmp_path / "out" / "compare.html").read_text()
    assert "<b>mine</b>" not in text and "&lt;b&gt;mine&lt;/b&gt;" in text and "it&#39;s" in text
    for run in r["runs"]:
        assert f"{run['auc']:.3f} [{run['auc_ci'][0]:.3f}-{run['auc_ci'][1]:.3f}]" in text
        assert f"{100 * run['sensitivity']:.1f}% [{100 * run['sensitivity_ci'][0]:.1f}%-" in text  # % with % CIs
    assert text.count("<tr>") == 3  # header and one row per run
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["runs"][0]["name"] == "<b>mine</b>"
