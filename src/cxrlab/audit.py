"""Audit log: one row per answer, from every surface (``predict --audit``, ``serve --audit``, ``dicom-listen``).

SQLite in WAL mode, so a listener and a web server can write the same file while ``cxrlab audit`` reads it.
No pixels and no patient data are kept: an input is known by the SHA-256 of its bytes, its sender by an AE
title, a client address or 'cli'. ``summarise`` gives counts, refusal and shift-warning rates, and the score
distribution per week and model, so a site whose films drift shows up before its sensitivity does.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import CxrlabError

APPLICATION_ID = 0x43585241  # 'CXRA' in the SQLite header: a database of another program is never written to
SURFACES = ("cli", "web", "dicom")
REFUSED, IGNORED, ERROR = "refused", "ignored", "error"  # decisions that are not a label
_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,           -- UTC, ISO 8601
    surface TEXT NOT NULL,        -- cli | web | dicom
    source TEXT,                  -- calling AE title@address, client address, or 'cli'
    model TEXT NOT NULL,          -- Model.sha256
    input_sha256 TEXT,            -- of the bytes received (a file, an upload, a DICOM dataset)
    decision TEXT NOT NULL,       -- the label decided, or refused | ignored | error
    positive INTEGER,             -- 1: the positive label was decided, 0: another, NULL: not scored
    score REAL,                   -- the positive label's probability
    threshold REAL,
    ood_score REAL,               -- 1 - the chest check's probability of a frontal chest film
    shift INTEGER,                -- 1: scored with a warning (unlike the training images)
    shift_score REAL,
    reason TEXT,                  -- why refused, ignored or failed
    latency_ms REAL
);
CREATE INDEX IF NOT EXISTS answers_time ON answers(time);
"""
_COLUMNS = ("time", "surface", "source", "model", "input_sha256", "decision", "positive", "score", "threshold",
            "ood_score", "shift", "shift_score", "reason", "latency_ms")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    try:
        if read_only:
            con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10,
                                  check_same_thread=False)
        else:
            con = sqlite3.connect(str(path), timeout=10, check_same_thread=False, isolation_level=None)
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
        tables = con.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.Error as exc:
        raise CxrlabError(f"{path}: not an audit database ({exc})") from None
    if app_id != APPLICATION_ID and (tables or read_only):
        con.close()
        raise CxrlabError(f"{path}: an SQLite database, but not a cxrlab audit log; give a new file name")
    return con


class AuditLog:
    """An open audit database; ``record`` may be called from any thread."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise CxrlabError(f"{self.path}: is a folder; --audit takes a database file (created if missing)")
        if not self.path.parent.is_dir():
            raise CxrlabError(f"{self.path.parent}: no such folder for the audit database")
        self.con = _connect(self.path, read_only=False)
        self.lock = threading.Lock()
        try:
            self.con.execute("PRAGMA journal_mode=WAL")
            self.con.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut may lose the last rows, never corrupt
            self.con.execute(f"PRAGMA application_id={APPLICATION_ID}")
            self.con.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self.con.close()
            raise CxrlabError(f"{self.path}: cannot write the audit database ({exc})") from None

    def record(self, pred, *, model, surface: str, source: str | None, input_sha256: str | None,
               latency_s: float | None, decision: str | None = None, reason: str | None = None) -> None:
        """One answer. ``pred`` is a Prediction (or None for an input ignored or refused before the model saw it,
        then ``decision`` and ``reason`` say what happened)."""
        if surface not in SURFACES:
            raise ValueError(f"unknown surface {surface!r}")
        row = dict(time=datetime.now(timezone.utc).isoformat(timespec="milliseconds"), surface=surface,
                   source=source, model=model.sha256, input_sha256=input_sha256,
                   latency_ms=None if latency_s is None else round(latency_s * 1000, 2), **_answer(pred, model))
        if decision is not None:
            row["decision"] = decision
        if reason is not None:
            row["reason"] = reason
        with self.lock:
            self.con.execute(f"INSERT INTO answers ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                             [row.get(c) for c in _COLUMNS])

    def close(self) -> None:
        with self.lock:
            self.con.close()


def open_audit(path: str | os.PathLike) -> AuditLog:
    """Open (or create) the audit database at ``path``; refuses a file that is not one."""
    return AuditLog(path)


def _answer(pred, model) -> dict:
    if pred is None:
        return {"decision": ERROR}
    if pred.error:
        return {"decision": ERROR, "reason": pred.error}
    if pred.ood:
        return {"decision": REFUSED, "ood_score": pred.ood_score, "reason": pred.ood_reason,
                "threshold": pred.threshold}
    positive = None if model.positive_label is None else int(pred.label == model.positive_label)
    return {"decision": pred.label, "positive": positive, "score": pred.positive_score, "threshold": pred.threshold,
            "ood_score": pred.ood_score, "shift": None if pred.shift is None else int(pred.shift),
            "shift_score": pred.shift_score}


def _week(time_text: str) -> str:
    year, week, _ = datetime.fromisoformat(time_text).isocalendar()
    return f"{year}-W{week:02d}"


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def summarise(path: str | os.PathLike) -> dict:
    """Counts (by surface, decision and source), refusal and shift-warning rates, and per model and ISO week the
    scored films, their positive rate and score quantiles (10, 25, 50, 75, 90 %). Opens the file read-only."""
    path = Path(path)
    if not path.is_file():
        raise CxrlabError(f"{path}: no such audit database")
    con = _connect(path, read_only=True)
    try:
        rows = con.execute("SELECT time, surface, source, model, decision, positive, score, shift, latency_ms "
                           "FROM answers ORDER BY time").fetchall()
    except sqlite3.Error as exc:
        raise CxrlabError(f"{path}: cannot read the audit log ({exc})") from None
    finally:
        con.close()
    decisions = Counter(r[4] for r in rows)
    refused, ignored, errors = decisions[REFUSED], decisions[IGNORED], decisions[ERROR]
    scored = [r for r in rows if r[4] not in (REFUSED, IGNORED, ERROR)]
    weeks: dict[tuple[str, str], list] = defaultdict(list)
    for r in rows:
        if r[4] not in (IGNORED, ERROR):
            weeks[(r[3], _week(r[0]))].append(r)
    latencies = [r[8] for r in rows if r[8] is not None]
    return {
        "n": len(rows), "scored": len(scored), "refused": refused, "ignored": ignored, "errors": errors,
        "refusal_rate": _rate(refused, refused + len(scored)),
        "shift_rate": _rate(sum(1 for r in scored if r[7]), len(scored)),
        "positive_rate": _rate(sum(1 for r in scored if r[5]), sum(1 for r in scored if r[5] is not None)),
        "by_surface": dict(Counter(r[1] for r in rows)), "by_decision": dict(decisions),
        "by_source": dict(Counter(r[2] or "" for r in rows).most_common(20)),
        "latency_ms_median": float(np.median(latencies)) if latencies else None,
        "first": rows[0][0] if rows else None, "last": rows[-1][0] if rows else None,
        "weekly": [_week_row(model, week, group)
                   for (model, week), group in sorted(weeks.items(), key=lambda kv: (kv[0][1], kv[0][0]))],
    }


def _week_row(model: str, week: str, group: list) -> dict:
    scored = [r for r in group if r[4] != REFUSED]
    scores = np.array([r[6] for r in scored if r[6] is not None], dtype=np.float64)
    quantiles = np.quantile(scores, [0.1, 0.25, 0.5, 0.75, 0.9]).tolist() if scores.size else None
    return {"model": model, "week": week, "n": len(group), "scored": len(scored),
            "refusal_rate": _rate(len(group) - len(scored), len(group)),
            "shift_rate": _rate(sum(1 for r in scored if r[7]), len(scored)),
            "positive_rate": _rate(sum(1 for r in scored if r[5]), sum(1 for r in scored if r[5] is not None)),
            "score_quantiles": quantiles}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def format_summary(s: dict) -> list[str]:
    """The summary as lines of text (``cxrlab audit``)."""
    if not s["n"]:
        return ["no answers recorded"]
    lines = [f"{s['n']} answer(s) from {s['first']} to {s['last']}",
             "by surface: " + ", ".join(f"{k} {v}" for k, v in sorted(s["by_surface"].items())),
             f"scored {s['scored']}, refused (not a frontal chest film) {s['refused']}, "
             f"ignored (not CR/DX or lateral) {s['ignored']}, errors {s['errors']}",
             f"refusal rate {_pct(s['refusal_rate'])}, shift-warning rate {_pct(s['shift_rate'])}, "
             f"positive rate {_pct(s['positive_rate'])}"
             + ("" if s["latency_ms_median"] is None else f", median latency {s['latency_ms_median']:.0f} ms"),
             "by decision: " + ", ".join(f"{k} {v}" for k, v in sorted(s["by_decision"].items())),
             "by source: " + ", ".join(f"{k or '-'} {v}" for k, v in s["by_source"].items()),
             "", "weekly score distribution (positive-label probability of scored films):",
             f"{'week':9} {'model':12} {'films':>6} {'refused':>8} {'shift':>7} {'positive':>9}   "
             f"{'p10':>5} {'p25':>5} {'p50':>5} {'p75':>5} {'p90':>5}"]
    for w in s["weekly"]:
        q = " ".join(f"{v:5.3f}" for v in w["score_quantiles"]) if w["score_quantiles"] else "    -"
        lines.append(f"{w['week']:9} {w['model'][:12]:12} {w['n']:6d} {_pct(w['refusal_rate']):>8} "
                     f"{_pct(w['shift_rate']):>7} {_pct(w['positive_rate']):>9}   {q}")
    return lines
