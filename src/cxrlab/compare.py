"""Compare: several training runs / evaluations -> one table and one ROC overlay.

Each directory holds ``predictions.csv`` and ``metrics.json`` (a ``train --output`` model directory
or an ``evaluate --output`` folder). The AUC and its DeLong CI are recomputed from the predictions
(the test rows of a training run, every row of an evaluation); sensitivity, specificity and
accuracy are the stored ones, measured at each model's own operating point.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from .errors import DataError
from .outputs import check_output_dir, claim

__all__ = ["compare", "load_run", "format_table"]
COMPARE_FILES = ("compare.html", "compare.json")

_CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",Arial,sans-serif;margin:1.5em auto;
max-width:1100px;padding:0 1em;color:#222;line-height:1.4}table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.3em .7em;text-align:left}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}img.plot{border:1px solid #ddd;max-width:100%}
.muted{color:#666}"""


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
    pred, met = d / "predictions.csv", d / "metrics.json"
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


def _pct(v, ci=None) -> str:
    if v is None or not math.isfinite(float(v)):
        return "n/a"
    s = f"{100 * v:.1f}%"
    if ci and None not in ci[:2]:
        s += f" [{100 * ci[0]:.1f}-{100 * ci[1]:.1f}]"
    return s


def _auc(r) -> str:
    if r.get("auc") is None:
        return "n/a"
    ci = r.get("auc_ci")
    return f"{r['auc']:.3f}" + (f" [{ci[0]:.3f}-{ci[1]:.3f}]" if ci else "")


COLUMNS = ("name", "n", "AUC [95% DeLong CI]", "sensitivity", "specificity", "accuracy", "threshold")


def _cells(r, with_ci: bool) -> list[str]:
    ci = (lambda k: r.get(f"{k}_ci")) if with_ci else (lambda k: None)
    thr = r.get("threshold")
    return [r["name"], str(r["n"]), _auc(r), _pct(r.get("sensitivity"), ci("sensitivity")),
            _pct(r.get("specificity"), ci("specificity")), _pct(r.get("accuracy"), ci("accuracy")),
            "n/a" if thr is None else f"{thr:.4f}"]


def format_table(result: dict) -> list[str]:
    """Plain-text table, one row per run (sensitivity/specificity/accuracy at each stored operating point)."""
    rows = [list(COLUMNS)] + [_cells(r, False) for r in result["runs"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def roc_png(runs) -> bytes | None:
    """One ROC plot with every binary run (its operating point marked); None if none can be drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .metrics import roc_curve

    drawable = [r for r in runs if r.get("auc") is not None and "y" in r and not r.get("multiclass")]
    if not drawable:
        return None
    fig = Figure(figsize=(5.5, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, r in enumerate(drawable):
        color = f"C{k % 10}"
        fpr, tpr, _ = roc_curve(r["y"], r["scores"])
        ax.plot(fpr, tpr, color=color, label=f"{r['name']} (AUC {r['auc']:.3f}, n={r['n']})")
        thr = r.get("threshold")
        if thr is not None and math.isfinite(thr):
            y, s = r["y"], r["scores"]
            ax.plot([float(np.mean(s[y == 0] >= thr))], [float(np.mean(s[y == 1] >= thr))], "o", color=color)
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (dots: operating points)",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _write(out: Path, runs, result) -> None:
    from .fsutil import atomic_write_bytes
    from .report import _json_safe

    e = html.escape
    png = roc_png(runs)
    parts = ["<h1>cxrlab comparison</h1>", "<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in COLUMNS)
             + "<th>source</th></tr>"]
    for r in result["runs"]:
        cells = _cells(r, True)
        parts.append("<tr>" + f"<td>{e(cells[0])}</td>" + "".join(f"<td class='num'>{e(c)}</td>" for c in cells[1:])
                     + f"<td>{e(r['kind'])}: {e(r['dir'])}</td></tr>")
    parts.append("</table><p class='muted'>AUC recomputed from predictions.csv with DeLong's 95% CI; "
                 "sensitivity, specificity and accuracy [95% Wilson CI] at each model's stored operating point.</p>")
    if png is not None:
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        parts.append(f"<img class='plot' src='{uri}' alt='ROC curves of the compared runs'>")
    if result["notes"]:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in result["notes"]) + "</ul>")
    doc = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>cxrlab comparison</title>"
           f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    atomic_write_bytes(out / "compare.html", doc.encode("utf-8"))
    atomic_write_bytes(out / "compare.json", json.dumps(_json_safe(result), indent=2).encode("utf-8"))
