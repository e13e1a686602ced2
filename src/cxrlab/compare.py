"""Compare: several training runs / evaluations -> one table and one ROC overlay.

Each directory holds ``predictions.csv`` and ``metrics.json`` (a training run's folder, or an ``evaluate
--output`` folder); a model folder stands for its run folder (``M.run/`` beside it). The AUC and its DeLong CI are recomputed from the predictions
(the test rows of a training run, every row of an evaluation); sensitivity, specificity and
accuracy are the stored ones, measured at each model's own operating point.
"""

from __future__ import annotations

import base64
import csv
import json
import os
from pathlib import Path

import numpy as np

from .errors import DataError
from .outputs import check_output_dir, claim

__all__ = ["compare", "load_run", "format_table"]
COMPARE_FILES = ("compare.html", "compare.json")

def _stored_report(metrics: dict) -> tuple[dict | None, str]:
    """The report at the stored operating point: 'test' of a train run, top level or 'all' of an evaluation."""
    if isinstance(metrics.get("test"), dict):
        return metrics["test"], "test"
    if isinstance(metrics.get("all"), dict):
        return metrics["all"], "all"
    if any(k in metrics for k in ("auc", "sensitivity", "per_class", "accuracy")):
        return metrics, "top level"
    return None, "none"


def _positive_label(d: Path, labels: list[str], metrics: dict, notes: list[str]) -> str | None:
    pos = metrics.get("positive_label")
    if pos is None and (d / "cxrlab.json").is_file():
        try:
            pos = json.loads((d / "cxrlab.json").read_text()).get("positive_label")
        except (OSError, ValueError):
            pos = None
    if pos in labels:
        return pos
    if len(labels) != 2:
        return None
    if "abnormal" in labels:
        return "abnormal"
    notes.append(f"{d}: positive class unknown; '{labels[1]}' taken as positive")
    return labels[1]


def _default_name(d: Path) -> str:
    parts = d.resolve().parts
    return "/".join(parts[-2:]) if parts[-1] == "model" and len(parts) > 1 else parts[-1]


def load_run(directory: str | os.PathLike, name: str | None = None) -> dict:
    """One directory -> {name, dir, kind, labels, positive_label, y, scores, stored report, ...}."""
    d = Path(directory)
    files = d
    if not (d / "predictions.csv").is_file() and (d / "cxrlab.json").is_file():  # a model folder: its run folder
        from .outputs import find_run_dir

        files = find_run_dir(d) or d
    pred, met = files / "predictions.csv", files / "metrics.json"
    for f in (pred, met):
        if not f.is_file():
            raise DataError(f"{d}: {f.name} is missing (give a 'train --output' model directory or an "
                            "'evaluate --output' folder)")
    try:
        metrics = json.loads(met.read_text())
    except ValueError as exc:
        raise DataError(f"{met}: not valid JSON ({exc})") from None
    with open(pred, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        rows = list(reader)
    labels = [c[len("score_"):] for c in header if c.startswith("score_")]
    if not labels or "true_label" not in header:
        raise DataError(f"{pred}: no score_<label> / true_label columns")
    notes: list[str] = []
    kind = "train run (test split)" if any(r.get("split") == "test" for r in rows) else "evaluation"
    if kind.startswith("train"):
        rows = [r for r in rows if r.get("split") == "test"]
    rows = [r for r in rows if r.get("true_label") in labels]
    report, source = _stored_report(metrics if isinstance(metrics, dict) else {})
    positive = _positive_label(d, labels, metrics if isinstance(metrics, dict) else {}, notes)
    run = {"name": name or _default_name(d), "dir": str(d), "kind": kind, "labels": labels,
           "positive_label": positive, "n": len(rows), "metrics_source": source, "paths": [r["path"] for r in rows],
           "notes": notes}
    if positive is not None:
        y = np.array([r["true_label"] == positive for r in rows], dtype=int)
        s = np.array([float(r[f"score_{positive}"]) for r in rows], dtype=float)
        run.update(y=y, scores=s, n_positive=int(y.sum()), n_negative=int(y.size - y.sum()))
    if report is None:
        notes.append(f"{met}: no stored metrics at an operating point")
        report = {}
    if "per_class" in report:  # multi-class: macro values, argmax decisions
        run.update(accuracy=report.get("accuracy"), accuracy_ci=report.get("accuracy_ci"),
                   sensitivity=report.get("macro_sensitivity"), specificity=report.get("macro_specificity"),
                   auc=report.get("macro_auc"), auc_ci=None, threshold=None, multiclass=True)
        notes.append(f"{run['name']}: {len(labels)} classes: macro averages, no ROC overlay")
        return run
    for key in ("sensitivity", "specificity", "accuracy"):
        run[key], run[f"{key}_ci"] = report.get(key), report.get(f"{key}_ci")
    run["threshold"] = report.get("threshold")
    run["who_verdict"] = report.get("who_verdict")
    return run


def _recompute_auc(run: dict) -> None:
    from .metrics import delong_ci

    if "y" not in run or run.get("multiclass"):
        return
    try:
        auc, lo, hi = delong_ci(run["y"], run["scores"])
    except DataError as exc:
        run.update(auc=None, auc_ci=None)
        run["notes"].append(f"{run['name']}: no AUC ({exc})")
        return
    run.update(auc=auc, auc_ci=[lo, hi])


def compare(dirs, output: str | os.PathLike | None = None, *, names=None) -> dict:
    """Read each run/evaluation directory, recompute AUC with DeLong CIs; with ``output`` write
    compare.html (table + ROC overlay) and compare.json. Returns {'runs': [...], 'notes': [...]}."""
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise DataError("give at least one run or evaluation directory")
    if output is not None:
        check_output_dir(output, "compare", inputs=dirs, files=COMPARE_FILES)
    if names is not None:
        names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
        if len(names) != len(dirs):
            raise DataError(f"--names has {len(names)} name(s) for {len(dirs)} director(ies)")
    runs = [load_run(d, names[i] if names else None) for i, d in enumerate(dirs)]
    seen: dict[str, int] = {}
    for r in runs:  # unique names for the table and the legend
        seen[r["name"]] = seen.get(r["name"], 0) + 1
        if seen[r["name"]] > 1:
            r["name"] = f"{r['name']} #{seen[r['name']]}"
    notes: list[str] = []
    for r in runs:
        _recompute_auc(r)
        notes += r.pop("notes")
    if len({tuple(sorted(r["paths"])) for r in runs}) > 1:
        notes.append("the runs were scored on different images: their AUCs are not a paired comparison")
    if len({r.get("positive_label") for r in runs}) > 1:
        notes.append("the runs do not share one positive class")
    result = {"runs": [{k: v for k, v in r.items() if k not in ("y", "scores", "paths", "labels")} for r in runs],
              "notes": notes}
    if output is not None:
        _write(claim(output, "compare", inputs=dirs, files=COMPARE_FILES), runs, result)
        result["output_dir"] = str(output)
    return result


COLUMNS = ("name", "n", "AUC [95% DeLong CI]", "sensitivity", "specificity", "accuracy", "threshold")


def _cells(r, with_ci: bool) -> list[str]:
    from .report import auc_text, pct

    ci = (lambda k: r.get(f"{k}_ci")) if with_ci else (lambda k: None)
    thr = r.get("threshold")
    return [r["name"], str(r["n"]), auc_text(r.get("auc"), r.get("auc_ci")),
            pct(r.get("sensitivity"), ci("sensitivity")),
            pct(r.get("specificity"), ci("specificity")), pct(r.get("accuracy"), ci("accuracy")),
            "n/a" if thr is None else f"{thr:.4f}"]


def format_table(result: dict) -> list[str]:
    """Plain-text table, one row per run (sensitivity/specificity/accuracy at each stored operating point)."""
    rows = [list(COLUMNS)] + [_cells(r, False) for r in result["runs"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def roc_png(runs) -> bytes | None:
    """One ROC plot with every binary run (its operating point marked); None if none can be drawn."""
    from .plots import roc_overlay_png

    drawable = [r for r in runs if r.get("auc") is not None and "y" in r and not r.get("multiclass")]
    if not drawable:
        return None
    return roc_overlay_png([(r["name"], r["auc"], r["n"], r["y"], r["scores"], r.get("threshold")) for r in drawable])


def _write(out: Path, runs, result) -> None:
    from .fsutil import atomic_write_bytes
    from .jsonutil import json_bytes
    from .report import render_html

    png = roc_png(runs)
    roc_uri = None if png is None else "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    html = render_html("compare.html.j2", title="cxrlab comparison", header=[*COLUMNS, "source"],
                       rows=[[*_cells(r, True), f"{r['kind']}: {r['dir']}"] for r in result["runs"]],
                       numeric=[False] + [True] * (len(COLUMNS) - 1) + [False],
                       roc_uri=roc_uri, notes=result["notes"])
    atomic_write_bytes(out / "compare.html", html)
    atomic_write_bytes(out / "compare.json", json_bytes(result))
