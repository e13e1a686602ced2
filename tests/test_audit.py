"""The audit log: written by predict --audit and serve --audit (dicom-listen's rows: test_dicom_net), read by
`cxrlab audit`. A real SQLite file each time."""

from __future__ import annotations

import io
import json
import sqlite3
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from PIL import Image

from test_serve import model, model_dir  # noqa: F401  (the tiny model fixtures)

from cxrlab.audit import format_summary, open_audit, sha256, summarise
from cxrlab.cli import main
from cxrlab.errors import CxrlabError
from cxrlab.predict import Model, Prediction


def _png(value: int, size=(64, 48), noise: bool = True) -> bytes:
    rng = np.random.default_rng(value)
    a = np.full(size[::-1], value, np.float64) + (rng.normal(0, 30, size[::-1]) if noise else 0)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _rows(db) -> list[dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM answers ORDER BY id")]
    finally:
        con.close()


def test_model_identity_is_the_recorded_info_sha256(model_dir, tmp_path):  # noqa: F811
    m = Model(model_dir, threads=1)
    assert m.sha256 == m.info["info_sha256"]
    # a modified model loaded with trust_modified is not taken for the trained one
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    info = json.loads((copy / "cxrlab.json").read_text())
    info["created_by"] = "someone else"
    (copy / "cxrlab.json").write_text(json.dumps(info))
    assert Model(copy, threads=1, trust_modified=True).sha256 != m.sha256


def test_predict_audit_records_each_file_without_its_name(model_dir, tmp_path, capsys):  # noqa: F811
    bright, dark = tmp_path / "Doe_John_bright.png", tmp_path / "Doe_John_dark.png"
    bright.write_bytes(_png(200))
    dark.write_bytes(_png(40))
    blank, broken = tmp_path / "Doe_John_blank.png", tmp_path / "Doe_John_broken.png"
    blank.write_bytes(_png(128, noise=False))
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    db = tmp_path / "audit.db"
    assert main(["predict", "--model", str(model_dir), "--audit", str(db), str(bright), str(dark), str(broken)]) == 1
    capsys.readouterr()
    rows = _rows(db)
    assert [r["input_sha256"] for r in rows] == [sha256(p.read_bytes()) for p in (bright, dark, broken)]
    assert [r["decision"] for r in rows] == ["abnormal", "normal", "error"]
    assert all(r["surface"] == "cli" and r["source"] == "cli" and r["model"] == Model(model_dir).sha256 for r in rows)
    assert rows[0]["positive"] == 1 and rows[1]["positive"] == 0 and rows[2]["positive"] is None
    assert rows[0]["score"] > 0.5 > rows[1]["score"] and rows[0]["threshold"] == 0.5
    assert rows[2]["reason"] and rows[2]["score"] is None
    assert all(r["latency_ms"] > 0 for r in rows)
    assert all(b"Doe_John" not in f.read_bytes() for f in tmp_path.glob("audit.db*"))  # the WAL too
    # a second run appends
    assert main(["predict", "--model", str(model_dir), "--audit", str(db), str(bright)]) == 0
    assert len(_rows(db)) == 4


def test_serve_audit_records_the_client_and_the_refusals(model, tmp_path):  # noqa: F811
    from fastapi.testclient import TestClient

    from cxrlab.serve import create_app

    db = tmp_path / "audit.db"
    audit = open_audit(db)
    blank = Model(model.directory, threads=1)
    blank.chest_check = {"threshold": 0.5, "network": False}  # the blank rule alone refuses a uniform picture
    client = TestClient(create_app(blank, audit=audit))
    files = [("files", ("a.png", _png(200), "image/png")), ("files", ("b.png", _png(128, noise=False), "image/png")),
             ("files", ("c.png", b"\x89PNG\r\n\x1a\n broken", "image/png"))]
    r = client.post("/api/predict?heatmap=0", files=files)
    assert r.status_code == 200
    rows = _rows(db)
    assert [r["decision"] for r in rows] == ["abnormal", "refused", "error"]
    assert all(r["surface"] == "web" and r["source"] == "testclient" for r in rows)
    assert rows[1]["reason"].startswith("a blank") and rows[1]["score"] is None
    assert rows[0]["input_sha256"] == sha256(files[0][1][1])
    audit.close()


def _fill(db, model, weeks: int = 3) -> None:
    """A log over ``weeks`` weeks: per week 10 scored films whose scores rise week by week, one refused, one ignored."""
    audit = open_audit(db)
    for w in range(weeks):
        for i in range(10):
            score = 0.1 + 0.2 * w + 0.01 * i
            pred = Prediction("f", {"abnormal": score, "normal": 1 - score}, "abnormal" if score >= 0.5 else "normal",
                              score, 0.5, ood=False, ood_score=0.01, shift=i == 0 and w == 2, shift_score=1.0)
            audit.record(pred, model=model, surface="dicom", source="MODALITY@10.0.0.1", input_sha256="x",
                         latency_s=0.1)
        refused = Prediction("g", threshold=0.5, ood=True, ood_score=0.9, ood_reason="not a chest film")
        audit.record(refused, model=model, surface="web", source="10.0.0.2", input_sha256="y", latency_s=0.05)
        audit.record(None, model=model, surface="dicom", source="CT@10.0.0.3", input_sha256="z", latency_s=0.01,
                     decision="ignored", reason="modality CT")
        start = datetime(2026, 1, 5, tzinfo=timezone.utc) + timedelta(weeks=w)  # a Monday: ISO week 2
        with audit.lock:
            audit.con.execute("UPDATE answers SET time = ? WHERE time > '2026-06'", (start.isoformat(),))
    audit.close()


def test_summary_counts_rates_and_weekly_scores(model, tmp_path):  # noqa: F811
    db = tmp_path / "audit.db"
    _fill(db, model)
    s = summarise(db)
    assert (s["n"], s["scored"], s["refused"], s["ignored"], s["errors"]) == (36, 30, 3, 3, 0)
    assert s["refusal_rate"] == pytest.approx(3 / 33) and s["shift_rate"] == pytest.approx(1 / 30)
    assert s["by_surface"] == {"dicom": 33, "web": 3}
    assert [w["week"] for w in s["weekly"]] == ["2026-W02", "2026-W03", "2026-W04"]
    medians = [w["score_quantiles"][2] for w in s["weekly"]]
    assert medians == pytest.approx([0.145, 0.345, 0.545])  # the drift is visible week by week
    assert [w["positive_rate"] for w in s["weekly"]] == [0.0, 0.0, 1.0]
    assert s["weekly"][2]["shift_rate"] == pytest.approx(0.1)
    text = "\n".join(format_summary(s))
    assert "refusal rate 9.1%, shift-warning rate 3.3%" in text and "2026-W04" in text


def test_cli_audit_prints_the_summary(model, tmp_path, capsys):  # noqa: F811
    db = tmp_path / "audit.db"
    _fill(db, model, weeks=1)
    assert main(["audit", str(db)]) == 0
    out = capsys.readouterr().out
    assert "12 answer(s)" in out and "2026-W02" in out
    assert main(["audit", str(db), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["scored"] == 10


def test_other_files_are_refused_and_left_alone(model_dir, tmp_path, capsys):  # noqa: F811
    text = tmp_path / "notes.txt"
    text.write_text("my notes\n" * 100)
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE answers (x)")
    con.commit()
    con.close()
    before = other.read_bytes()
    for path in (text, other):
        with pytest.raises(CxrlabError, match="not"):
            open_audit(path)
        assert main(["predict", "--model", str(model_dir), "--audit", str(path), str(text)]) == 1
        assert capsys.readouterr().err.startswith(f"error: {path}")
        assert main(["audit", str(path)]) == 1
        assert capsys.readouterr().err.startswith(f"error: {path}")
    assert text.read_text() == "my notes\n" * 100 and other.read_bytes() == before
    assert main(["audit", str(tmp_path / "missing.db")]) == 1
    assert "no such audit database" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()
