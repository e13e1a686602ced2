"""Tests for cxrlab.report: the three files of a run report, a self-contained HTML."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cxrlab.metrics import binary_report, multiclass_report, who_verdict
from cxrlab.report import write_evaluation, write_run_report
from cxrlab.split import Entry

IMG_RE = re.compile(r"<img\b[^>]*>")
# plots are PNG; thumbnails are JPEG (stored large enough to enlarge on click)
SRC_RE = re.compile(r"src=['\"]data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)['\"]")
ALT_RE = re.compile(r"alt=['\"]([^'\"]*)['\"]")


def _entries(tmp_path, labels, n_per_class=12, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for lab in labels:
        (tmp_path / lab).mkdir()
        for i in range(n_per_class):
            rel = f"{lab}/p{i}.png"
            arr = rng.integers(0, 256, (40 + i, 60), dtype=np.uint8)
            Image.fromarray(arr, "L").save(tmp_path / rel)
            split = ("train", "validation", "test", "test")[i % 4]
            out.append(Entry(rel, lab, f"{lab}/p{i}", split))
    return out


def _curve():
    return [{"step": s, "train_accuracy": 0.5 + s / 40, "cross_entropy": 1.0 - s / 20, "validation_n": 8,
             "validation_accuracy": None if s == 5 else 0.5 + s / 50,
             "validation_cross_entropy": None if s == 5 else 1.0 - s / 25} for s in range(0, 20, 5)]


def _check_html(text):
    imgs = IMG_RE.findall(text)
    assert imgs
    for tag in imgs:
        m = SRC_RE.search(tag)
        assert m, tag[:80]
        Image.open(io.BytesIO(base64.b64decode(m.group(1)))).verify()
        assert ALT_RE.search(tag).group(1).strip()
        assert "class='plot'" in tag or "class='thumb'" in tag
    assert not re.search(r"(src|href)=['\"](?!data:)", text)  # nothing external
    return [ALT_RE.search(t).group(1).lower() for t in imgs]


def test_binary_run_report(tmp_path):
    labels = ["abnormal", "normal"]
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    entries = _entries(img_dir, labels)
    rng = np.random.default_rng(1)
    probs = {}
    for e in entries:
        p = float(np.clip(rng.normal(0.7 if e.label == "abnormal" else 0.3, 0.2), 0.01, 0.99))
        probs[e.relpath] = np.array([p, 1 - p])
    thr = 0.5
    test = [e for e in entries if e.split == "test"]
    y = np.array([e.label == "abnormal" for e in test], dtype=int)
    s = np.array([probs[e.relpath][0] for e in test])
    rep = binary_report(y, s, thr)
    rep["who_verdict"] = who_verdict(rep)
    rep["ece_uncalibrated"] = 0.12
    run_dir = tmp_path / "run"
    result = SimpleNamespace(
        run_dir=run_dir, labels=labels,
        metrics={"n": {"train": 6, "validation": 6, "test": 12}, "test": rep, "training_curve": _curve(),
                 "final_test_accuracy_argmax": 0.75},
        skipped=[SimpleNamespace(path="abnormal/broken.png", reason="truncated <PNG> & co")],
        notes=["a warning"])
    info = {"positive_label": "abnormal", "labels": labels,
            "operating_point": {"rule": "youden", "threshold": thr, "sensitivity": float("nan"),
                                "specificity": 0.8, "reachable": True, "note": ""},
            "calibration": {"method": "temperature", "temperature": 1.3}, "backbone": {"id": "fake"}}
    write_run_report(result, img_dir, entries=entries, probs_by_relpath=probs, info=info)

    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("n", "test", "training_curve", "operating_point", "calibration"):
        assert key in m
    assert m["operating_point"]["sensitivity"] is None  # NaN made JSON-safe
    assert m["test"]["who_verdict"] == rep["who_verdict"]

    with open(run_dir / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "true_label", "score_abnormal", "score_normal", "predicted_label", "correct", "split"]
    assert len(rows) == 1 + len(entries)
    for r in rows[1:]:
        assert r[4] == ("abnormal" if float(r[2]) >= thr else "normal")
        assert r[5] == str(int(r[4] == r[1]))

    text = (run_dir / "report.html").read_text()
    assert rep["who_verdict"].replace(">", "&gt;") in text
    assert "truncated &lt;PNG&gt; &amp; co" in text
    alts = _check_html(text)
    for word in ("roc", "precision-recall", "reliability", "confusion", "histogram", "training"):
        assert any(word in a for a in alts), word
    reliability = next(a for a in alts if a.startswith("reliability"))
    assert f"ece {rep['ece']:.3f} after calibration, 0.120 before" in reliability and "images per bin" in reliability
    n_wrong = sum(1 for r in rows[1:] if r[6] == "test" and r[5] == "0")
    assert sum("class='thumb'" in t for t in IMG_RE.findall(text)) == min(n_wrong, 40)


def test_multiclass_report_has_no_roc(tmp_path):
    labels = ["normal", "tb", "other"]
    entries = _entries(tmp_path, labels, n_per_class=8)
    rng = np.random.default_rng(2)
    probs = {e.relpath: rng.dirichlet(np.ones(3) + 3 * np.eye(3)[labels.index(e.label)]) for e in entries}
    test = [e for e in entries if e.split == "test"]
    rep = multiclass_report([labels.index(e.label) for e in test], np.stack([probs[e.relpath] for e in test]), labels)
    run_dir = tmp_path / "run"
    result = SimpleNamespace(run_dir=run_dir, labels=labels, metrics={"test": rep}, skipped=[], notes=[])
    write_run_report(result, tmp_path, entries=entries, probs_by_relpath=probs,
                     info={"positive_label": None, "operating_point": None, "labels": labels})
    text = (run_dir / "report.html").read_text()
    alts = _check_html(text)
    assert any("confusion" in a for a in alts)
    assert not any("roc" in a or "histogram" in a or "reliability" in a for a in alts)
    assert "Per class" in text and "n/a" in text
    with open(run_dir / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(entries)
    for r in rows:
        assert r["predicted_label"] == max(labels, key=lambda lab: float(r[f"score_{lab}"]))


def test_write_evaluation_reference_and_rejected(tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.full((300, 200), 128, np.uint8), "L").save(img)
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 30)
    y[:2] = [0, 1]
    s = np.clip(y * 0.4 + rng.random(30) * 0.6, 0, 1)
    rows = [{"path": str(img), "true_label": "tb" if t else "normal", "scores": [1 - p, p],
             "predicted_label": "tb" if p >= 0.5 else "normal", "correct": (p >= 0.5) == bool(t),
             "split": "external"} for t, p in zip(y, s)]
    rep = binary_report(y, s, 0.5)
    ref = dict(rep, auc=0.99)
    write_evaluation(tmp_path / "out", title="External <eval>", rows=rows, labels=["normal", "tb"],
                     positive_label="tb", threshold=0.5, metrics=rep, reference_metrics=ref,
                     rejected=[(str(img), 3.5), (str(tmp_path / "missing.png"), 9.0)], notes=["n1"])
    text = (tmp_path / "out" / "report.html").read_text()
    assert "External &lt;eval&gt;" in text and "Reference" in text and "0.990" in text
    assert "no thumbnail for" in text and "Rejected images" in text
    _check_html(text)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["auc"] == pytest.approx(rep["auc"])


def test_run_report_leaves_the_result_alone_and_returns_what_it_wrote(tmp_path):
    import copy

    labels = ["abnormal", "normal"]
    entries = _entries(tmp_path, labels, n_per_class=8)
    probs = {e.relpath: np.array([0.8, 0.2]) if e.label == "abnormal" else np.array([0.3, 0.7]) for e in entries}
    result = SimpleNamespace(run_dir=tmp_path / "run", labels=labels, metrics={"test": {"auc": 1.0}}, skipped=[],
                             notes=["<b>note</b>"])
    info = {"positive_label": "abnormal", "operating_point": {"rule": "who", "threshold": 0.5},
            "calibration": {"method": "temperature", "temperature": float("nan")}}
    before = copy.deepcopy(vars(result))
    written = write_run_report(result, tmp_path, entries=entries, probs_by_relpath=probs, info=info)
    assert vars(result) == before
    assert written["operating_point"] == info["operating_point"] and written["positive_label"] == "abnormal"
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["calibration"] == {"method": "temperature", "temperature": None}
    assert on_disk["test"] == written["test"] == {"auc": 1.0}
    text = (tmp_path / "run" / "report.html").read_text()
    assert "&lt;b&gt;note&lt;/b&gt;" in text and "<b>note</b>" not in text  # autoescaped
    assert "temperature n/a" in text


def test_report_escapes_quotes_in_attributes(tmp_path):
    from cxrlab.report import write_report_html

    img = tmp_path / "it's'><script>.png"
    Image.fromarray(np.full((60, 60), 90, np.uint8), "L").save(img)
    rows = [{"path": str(img), "true_label": "a", "scores": [0.2, 0.8], "predicted_label": "b", "correct": False,
             "split": "test"}, {"path": str(img), "true_label": "b", "scores": [0.1, 0.9], "predicted_label": "b",
                                "correct": True, "split": "test"}]
    write_report_html(tmp_path / "r.html", title="t", rows=rows, labels=["a", "b"])
    text = (tmp_path / "r.html").read_text()
    assert "<script>" not in text and "it&#39;s&#39;&gt;&lt;script&gt;.png" in text
    assert len(IMG_RE.findall(text)) == 2  # the confusion matrix and one thumbnail, the alt text did not break out


def test_json_safe():
    from dataclasses import dataclass
    from pathlib import Path

    from cxrlab.jsonutil import json_bytes, json_safe

    @dataclass
    class Point:
        x: float
        where: Path

    got = json_safe({1: np.float32(0.5), "nan": float("nan"), "arr": np.array([1, 2]), "flag": np.bool_(True),
                     "p": Point(float("inf"), Path("/a/b")), "t": (np.int64(3), None)})
    assert got == {"1": 0.5, "nan": None, "arr": [1, 2], "flag": True, "p": {"x": None, "where": "/a/b"},
                   "t": [3, None]}
    assert type(got["arr"][0]) is int and type(got["flag"]) is bool
    assert json.loads(json_bytes({"a": [float("-inf"), np.float64(2.5)]})) == {"a": [None, 2.5]}


def test_confusion_matrix_counts_the_tables_images(tmp_path):
    """An evaluation counts a refused film as not flagged: the confusion matrix shows the table's counts (it used
    to count only the scored rows, so the two disagreed), and a tiny split carries a visible warning."""
    from cxrlab.metrics import with_sample_warning
    from cxrlab.report import confusion

    img = tmp_path / "x.png"
    Image.fromarray(np.full((300, 200), 128, np.uint8), "L").save(img)
    truth = ["tb", "tb", "tb", "normal", "normal", "tb"]  # the last film was refused as not a chest X-ray
    scores = [0.9, 0.8, 0.3, 0.7, 0.1, None]
    rows = [{"path": str(img), "true_label": t, "scores": None if s is None else [1 - s, s],
             "predicted_label": "refused" if s is None else ("tb" if s >= 0.5 else "normal"),
             "correct": s is not None and (s >= 0.5) == (t == "tb"), "split": "external",
             "refused": "a photo" if s is None else None} for t, s in zip(truth, scores)]
    rep = with_sample_warning(binary_report(np.array([t == "tb" for t in truth], int),
                                            np.array([s or 0.0 for s in scores]), 0.5))
    cm = confusion([r for r in rows if r["scores"] is not None], ["normal", "tb"], "tb", rep)
    assert cm.tolist() == [[rep["tn"], rep["fp"]], [rep["fn"], rep["tp"]]] == [[1, 1], [2, 2]]
    write_evaluation(tmp_path / "out", title="t", rows=rows, labels=["normal", "tb"], positive_label="tb",
                     threshold=0.5, metrics=rep, rejected=[(str(img), "a photo")])
    text = (tmp_path / "out" / "report.html").read_text()
    assert "confusion matrix at the operating point, the images of the metrics table (rows true, columns predicted)" \
        in _check_html(text)
    assert "Warning: these figures rest on only 4 positive, 2 negative image(s)" in text
    assert "2 / 1 / 1 / 2" in text  # TP / FP / TN / FN in the table


def test_who_verdict_box_tells_inconclusive_from_fails(tmp_path):
    from cxrlab.metrics import who_assessment

    rng = np.random.default_rng(5)
    y = np.r_[np.ones(40, int), np.zeros(40, int)]
    s = np.clip(np.r_[rng.normal(0.7, 0.2, 40), rng.normal(0.4, 0.2, 40)], 0, 1)
    rep = binary_report(y, s, 0.5)
    rep["who_verdict"], rep["who_status"] = who_verdict(rep), who_assessment(rep)["verdict"]
    rows = [{"path": f"p{i}.png", "true_label": "tb" if t else "normal", "scores": [1 - p, p],
             "predicted_label": "tb" if p >= 0.5 else "normal", "correct": (p >= 0.5) == bool(t), "split": "test"}
            for i, (t, p) in enumerate(zip(y, s))]
    write_evaluation(tmp_path / "out", title="t", rows=rows, labels=["normal", "tb"], positive_label="tb",
                     threshold=0.5, metrics=rep)
    text = (tmp_path / "out" / "report.html").read_text()
    assert f"class='verdict {'inconclusive' if rep['who_status'] == 'inconclusive' else 'fails'}'" in text
    assert "WHO target product profile for TB triage" in text and "small-sample" not in text
