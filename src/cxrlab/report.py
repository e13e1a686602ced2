"""A run's predictions -> metrics.json, predictions.csv, report.html (one self-contained file).

The HTML comes from the Jinja2 templates in ``cxrlab/templates`` (autoescaped); plots and images are
embedded as data URIs.
"""

from __future__ import annotations

import base64
import csv
import io
import math
from pathlib import Path

import jinja2
import numpy as np

from .errors import CxrlabError
from .fsutil import atomic_write_bytes
from .jsonutil import json_bytes

__all__ = ["write_run_report", "write_evaluation", "write_report_html", "render_html"]

MAX_THUMBS = 40
MAX_NOTES = 300
THUMB_PX = 384  # stored this large so that a click can enlarge it (shown at 150 px); JPEG keeps it light
N_BOOT = 200
HEAT_WRONG = 12       # overlays of misclassified test images
HEAT_CONFIDENT = 3    # overlays of the most confident correct test images, per class
HEAT_PX = 384         # overlays are drawn on the image shrunk to this long side
HEAT_SUMMARY_MAX = 300  # test images whose maps enter the border-heat summary
HEAT_BATCH = 16
BORDER_WARNING = ("the model's heat sits mostly on the image border, where hospitals print text markers: "
                  "it may be using a shortcut")

_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("cxrlab", "templates"), autoescape=True,
                                undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_html(template: str, **context) -> bytes:
    """One of cxrlab's HTML templates rendered (every value autoescaped) as UTF-8."""
    return _TEMPLATES.get_template(template).render(**context).encode("utf-8", "backslashreplace")  # a path that is not UTF-8


# ----------------------------------------------------------------- entry points
def write_run_report(result, image_dir, *, entries, probs_by_relpath, info) -> dict:
    """Called at the end of ``training.train()``: writes the three files into ``result.run_dir``.

    Returns the metrics written to metrics.json (``result.metrics`` plus the operating point,
    calibration, positive label and, with a saved model, the ``heatmaps`` summary); ``result`` is not changed."""
    labels = list(result.labels)
    op = info.get("operating_point") or None
    threshold = op.get("threshold") if op else None
    positive = info.get("positive_label") if _is_binary(labels, info.get("positive_label"), threshold) else None
    rows = _run_rows(entries, probs_by_relpath, labels, positive, threshold)
    notes = [f"skipped {s.path}: {s.reason}" for s in (result.skipped or [])] + [str(n) for n in result.notes or []]
    heat = _run_heatmaps(getattr(result, "model_dir", None), image_dir, rows, labels, notes)
    metrics = {**result.metrics, "operating_point": op, "calibration": info.get("calibration"),
               "positive_label": positive}
    if heat is not None:
        metrics["heatmaps"] = heat["summary"]
    write_evaluation(result.run_dir, title=f"cxrlab training run: {Path(result.run_dir).name}", rows=rows,
                     labels=labels, positive_label=positive, threshold=threshold, metrics=metrics,
                     training_curve=result.metrics.get("training_curve"), notes=notes,
                     summary=_run_summary(info, op), image_root=image_dir, heatmaps=heat)
    return metrics


def write_evaluation(output_dir, *, title, rows, labels, positive_label, threshold, metrics,
                     training_curve=None, rejected=None, reference_metrics=None, notes=(),
                     summary=(), image_root=None, heatmaps=None, subsets=None) -> None:
    """Write metrics.json, predictions.csv and report.html into ``output_dir``.

    ``rows``: dicts with path, true_label, scores (aligned with ``labels``; None for an image refused as
    not a chest X-ray, whose reason is under ``refused``), predicted_label, correct, split, and optionally
    site and shift_score. ``metrics`` / ``reference_metrics``: a binary or multi-class report, or a dict
    holding one under ``"test"``. ``subsets``: {title: report} shown as one table row each (all images,
    accepted, no shift warning). Relative row paths are resolved against ``image_root``.
    """
    out = Path(output_dir)
    atomic_write_bytes(out / "metrics.json", json_bytes(metrics))
    atomic_write_bytes(out / "predictions.csv", _predictions_csv(rows, labels))
    rows = [r for r in rows if r.get("scores") is not None]  # the refused are shown apart, without scores
    write_report_html(out / "report.html", title=title, rows=rows, labels=labels,
                      positive_label=positive_label, threshold=threshold, report=_report_of(metrics),
                      reference=_report_of(reference_metrics), training_curve=training_curve,
                      rejected=rejected, notes=notes, summary=summary, image_root=image_root,
                      heatmaps=heatmaps, by_site=(metrics or {}).get("test_by_site"), subsets=subsets)


def write_report_html(path, *, title, rows, labels, positive_label=None, threshold=None, report=None,
                      reference=None, training_curve=None, rejected=None, notes=(), summary=(),
                      image_root=None, heatmaps=None, by_site=None, subsets=None) -> None:
    """Render the self-contained HTML report (plots and thumbnails as base64 data URIs).

    ``heatmaps``: {"summary": explain.summary(...), "groups": [(title, [(path, caption, png)])], and optionally
    "scale": (lo, hi), the colour range all overlays share}, or None.
    ``by_site``: {site: binary report} of a multi-site run, shown as one table row per site.
    """
    labels = list(labels)
    binary = _is_binary(labels, positive_label, threshold)
    positive = positive_label if binary else None
    notes = [str(n) for n in notes]
    test = [r for r in rows if r.get("split") == "test"]
    scope = "test split" if test else "all rows"
    known = [r for r in (test or rows) if r.get("true_label") in labels]
    plots = _plots(known, labels, positive, threshold, training_curve, report)
    html = render_html(
        "report.html.j2", title=str(title), summary=[*map(str, summary), *_data_summary(rows, labels, scope)],
        verdict=_verdict(report, binary), scope=scope, warnings=_warnings(report, by_site),
        tables=_metric_tables(report, reference) + _site_tables(by_site) + _subset_tables(subsets),
        plots=[{"alt": alt, "uri": _uri(png)} for alt, png in plots], heatmaps=_heatmap_view(heatmaps),
        wrong=_misclassified(known, labels, positive, threshold, image_root, notes),
        rejected=_rejected(list(rejected or ()), image_root, notes),
        notes=notes, max_notes=MAX_NOTES, max_thumbs=MAX_THUMBS)
    atomic_write_bytes(path, html)


# ----------------------------------------------------------------- rows and text
def _is_binary(labels, positive, threshold) -> bool:
    return (len(labels) == 2 and positive in labels and threshold is not None
            and math.isfinite(float(threshold)))


def _run_rows(entries, probs_by_relpath, labels, positive, threshold) -> list[dict]:
    """One row per entry with scores: the decision at the threshold (binary) or the argmax."""
    rows = []
    for e in entries:
        p = probs_by_relpath.get(e.relpath)
        if p is None:
            continue
        p = [float(x) for x in np.asarray(p, dtype=float).ravel()]
        if positive is not None:
            pos = labels.index(positive)
            pred = positive if p[pos] >= threshold else labels[1 - pos]
        else:
            pred = labels[int(np.argmax(p))]
        rows.append({"path": e.relpath, "true_label": e.label, "scores": p, "predicted_label": pred,
                     "correct": pred == e.label, "split": e.split, "site": getattr(e, "site", "")})
    return rows


def _run_summary(info, op) -> list[str]:
    lines = [f"Backbone: {(info.get('backbone') or {}).get('id', '?')}"]
    cal = info.get("calibration") or {}
    if cal:
        detail = (f"a {_num(cal.get('platt_a'), 3)}, b {_num(cal.get('platt_b'), 3)}" if cal.get("method") == "platt"
                  else f"temperature {_num(cal.get('temperature'), 3)}")
        lines.append(f"Calibration: {cal.get('method')} ({detail}; "
                     f"fitted on the {cal.get('data', 'validation split')})")
    if op:
        lines.append(f"Operating point: {op.get('rule')} at threshold {_num(op.get('threshold'), 4)} "
                     f"(chosen on the {op.get('data', 'validation split')})")
    return lines


def _report_of(metrics):
    if not isinstance(metrics, dict):
        return None
    if isinstance(metrics.get("test"), dict):
        return metrics["test"]
    return metrics if ("auc" in metrics or "per_class" in metrics) else None


def _predictions_csv(rows, labels) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    # optional columns only where some row carries them
    extra = [k for k in ("site", "refused", "shift_score") if any(r.get(k) not in (None, "") for r in rows)]
    w.writerow(["path", "true_label", *[f"score_{lab}" for lab in labels], "predicted_label", "correct", "split",
                *extra])
    for r in rows:
        c = r.get("correct")
        scores = [f"{float(s):.6f}" for s in r["scores"]] if r.get("scores") is not None else [""] * len(labels)
        w.writerow([r["path"], r.get("true_label") or "", *scores, r["predicted_label"],
                    "" if c is None else int(bool(c)), r.get("split") or "",
                    *["" if r.get(k) is None else r[k] for k in extra]])
    return buf.getvalue().encode("utf-8", "backslashreplace")  # a path that is not UTF-8


def _data_summary(rows, labels, scope) -> list[str]:
    out = []
    for split in dict.fromkeys(r.get("split") or "(none)" for r in rows):
        sub = [r for r in rows if (r.get("split") or "(none)") == split]
        per = ", ".join(f"{lab} {sum(r.get('true_label') == lab for r in sub)}" for lab in labels)
        out.append(f"Split {split}: {len(sub)} images ({per})")
    out.append(f"Metrics, plots and misclassified images use the {scope}.")
    return out


def _verdict(report, binary) -> dict:
    text = (report or {}).get("who_verdict")
    if text:
        status = report.get("who_status") or ("meets" if "-> meets" in text else "fails")
        return {"cls": {"meets": "meets", "inconclusive": "inconclusive"}.get(status, "fails"), "text": text}
    why = "binary test metrics are not available" if binary else "not a binary task"
    return {"cls": "na", "text": f"WHO target product profile verdict: n/a ({why})"}


def _warnings(report, by_site) -> list[str]:
    """The sample-size warnings of the main figures and of each site's."""
    out = [report["sample_warning"]] if (report or {}).get("sample_warning") else []
    return out + [f"site {site}: {m['sample_warning']}" for site, m in (by_site or {}).items()
                  if m.get("sample_warning")]


def _num(v, digits=3) -> str:
    return "n/a" if v is None or not math.isfinite(float(v)) else f"{float(v):.{digits}f}"


def pct(v, ci=None) -> str:
    """A proportion as '91.2%', with its interval as '91.2% [85.0%-95.0%]'; 'n/a' when undefined."""
    from .metrics import percent

    return percent(v, ci)


def auc_text(auc, ci=None) -> str:
    """'0.912 [0.871-0.953]', or 'n/a'."""
    if auc is None:
        return "n/a"
    return f"{auc:.3f}" + (f" [{ci[0]:.3f}-{ci[1]:.3f}]" if ci else "")


# ----------------------------------------------------------------- metric tables
def _binary_cells(m) -> list[tuple[str, str]]:
    cells = [("n (positive / negative)", f"{m.get('n')} ({m.get('n_positive')} / {m.get('n_negative')})"),
             ("Threshold", _num(m.get("threshold"), 4)),
             ("ROC AUC [95% DeLong CI]", auc_text(m.get("auc"), m.get("auc_ci")))]
    for key, name in (("sensitivity", "Sensitivity"), ("specificity", "Specificity"), ("ppv", "PPV"),
                      ("npv", "NPV"), ("accuracy", "Accuracy")):
        cells.append((f"{name} [95% Wilson CI]", pct(m.get(key), m.get(f"{key}_ci"))))
    cells += [("F1", _num(m.get("f1"))), ("TP / FP / TN / FN", f"{m.get('tp')} / {m.get('fp')} / "
              f"{m.get('tn')} / {m.get('fn')}"), ("Brier score", _num(m.get("brier"), 4))]
    if m.get("ece_uncalibrated") is not None:
        cells.append(("ECE before calibration", _num(m.get("ece_uncalibrated"), 4)))
    cells.append(("ECE" + (" after calibration" if "ece_uncalibrated" in m else ""), _num(m.get("ece"), 4)))
    return cells


def _table(header, rows, heading=None) -> dict:
    return {"heading": heading, "header": header, "rows": rows, "numeric": [False] + [True] * (len(header) - 1)}


def _metric_tables(report, reference) -> list[dict]:
    if not report:
        return []
    if "per_class" not in report:
        ref = dict(_binary_cells(reference)) if reference and "per_class" not in reference else None
        header = ["Metric", "Value"] + (["Reference (model's internal test)"] if ref else [])
        return [_table(header, [[name, val] + ([ref.get(name, "n/a")] if ref else [])
                                for name, val in _binary_cells(report)])]
    overall = [("Accuracy", lambda m: pct(m.get("accuracy"), m.get("accuracy_ci")))] + [
        (name, lambda m, k=key: _num(m.get(k))) for key, name in (
            ("macro_auc", "Macro AUC"), ("macro_f1", "Macro F1"), ("macro_sensitivity", "Macro sensitivity"),
            ("macro_specificity", "Macro specificity"))]
    per_class = [[str(lab), str(d.get("support")), auc_text(d.get("auc"), d.get("auc_ci")),
                  pct(d.get("sensitivity"), d.get("sensitivity_ci")),
                  pct(d.get("specificity"), d.get("specificity_ci")),
                  pct(d.get("ppv")), _num(d.get("f1"))] for lab, d in report["per_class"].items()]
    return [_table(["Metric", "Value"] + (["Reference"] if reference else []),
                   [[name, fmt(report)] + ([fmt(reference)] if reference else []) for name, fmt in overall]),
            _table(["Class", "Support", "AUC [95% CI]", "Sensitivity [95% CI]", "Specificity [95% CI]", "PPV", "F1"],
                   per_class, heading="Per class (one-vs-rest)")]


def _subset_tables(subsets) -> list[dict]:
    """The same figures on all images, on those accepted as chest X-rays, and on those like the training images."""
    if not subsets or any("per_class" in m for m in subsets.values()):
        return []
    return [_rows_table("Images", subsets, "By what the checks said (same threshold)")]


def _site_tables(by_site) -> list[dict]:
    """Per-site figures at the one shared operating point: where a model trained on several hospitals is weak."""
    return [_rows_table("Site", by_site, "Per site (test split, same threshold)")] if by_site else []


def _rows_table(first: str, reports: dict, heading: str) -> dict:
    """One row of binary figures (n, AUC, sensitivity, specificity, accuracy) per named report."""
    rows = [[str(name), str(m.get("n")), auc_text(m.get("auc"), m.get("auc_ci")),
             pct(m.get("sensitivity"), m.get("sensitivity_ci")), pct(m.get("specificity"), m.get("specificity_ci")),
             pct(m.get("accuracy"))] for name, m in reports.items()]
    return _table([first, "n", "AUC [95% CI]", "Sensitivity [95% CI]", "Specificity [95% CI]", "Accuracy"], rows,
                  heading=heading)


# ----------------------------------------------------------------- images
def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _jpeg_uri(png: bytes, quality: int = 88) -> str:
    """Overlays are photographic: as JPEG they are about 1/6 of the PNG and look the same."""
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(io.BytesIO(png)) as im:
        im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _short(path) -> str:
    return "/".join(Path(str(path)).parts[-2:])


def _name_parts(path) -> dict:
    """The name to show (folder and file, wrapped anywhere) and the full path for its tooltip."""
    return {"short": _short(path), "title": str(path)}


def _resolve(path, image_root) -> Path:
    p = Path(path)
    return Path(image_root) / p if not p.is_absolute() and image_root is not None else p


def _thumb(path, caption, image_root, notes) -> dict:
    """A thumbnail figure; an unreadable image gets uri None and a note."""
    from PIL import Image

    from .decode import decode_image
    from .explain import shrink

    fig = {"uri": None, "alt": f"{path}: {caption}", **_name_parts(path), "caption": caption}
    try:
        px = shrink(decode_image(_resolve(path, image_root), min_size=THUMB_PX).pixels, THUMB_PX)
    except (CxrlabError, OSError, ValueError) as exc:
        notes.append(f"no thumbnail for {path}: {exc}")
        return fig
    buf = io.BytesIO()
    Image.fromarray(np.round(px * 255).astype(np.uint8), "L").save(buf, format="JPEG", quality=85)
    return {**fig, "uri": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")}


def _misclassified(rows, labels, positive, threshold, image_root, notes) -> dict:
    """The wrong rows, most confidently wrong first, as thumbnails (up to MAX_THUMBS)."""
    pos = labels.index(positive) if positive is not None else None

    def score(r):
        return r["scores"][pos] if pos is not None else max(r["scores"])

    wrong = [r for r in rows if r.get("correct") is False]
    wrong.sort(key=lambda r: -abs(score(r) - threshold) if pos is not None else -score(r))

    def caption(r):
        if pos is None:
            return f"true {r['true_label']}, predicted {r['predicted_label']} (score {pct(score(r))})"
        return (f"true {r['true_label']}, predicted {r['predicted_label']}: P({positive}) {pct(score(r))}, "
                f"threshold {pct(threshold)}")

    return {"n": len(wrong), "figures": [_thumb(r["path"], caption(r), image_root, notes) for r in wrong[:MAX_THUMBS]]}


def _rejected(rejected, image_root, notes) -> dict:
    """The (path, reason) pairs of the images rejected as not chest X-rays, as thumbnails (up to MAX_THUMBS); a
    number instead of a reason is shown as a score."""
    def caption(why):
        return f"not a chest X-ray: {why}" if isinstance(why, str) else f"rejected, score {_num(why, 3)}"
    return {"n": len(rejected), "figures": [_thumb(p, caption(why), image_root, notes) for p, why in rejected[:MAX_THUMBS]]}


# ----------------------------------------------------------------- heatmaps
def _heatmap_view(heat) -> dict | None:
    if not heat:
        return None
    groups = [{"title": title, "figures": [
        {"uri": _jpeg_uri(png), "alt": f"heatmap of {path}: {cap}", **_name_parts(path), "caption": cap}
        for path, cap, png in figs]} for title, figs in heat["groups"]]
    return {"summary": heat["summary"], "groups": groups, "warning": BORDER_WARNING, "scale": heat.get("scale")}


def _heatmap_groups(test, labels) -> tuple[list, list]:
    """(overlay groups as (title, rows), rows whose maps enter the summary): the misclassified and the
    most confident correct rows of each class, plus an even sample of the rest up to HEAT_SUMMARY_MAX."""
    def score(r):
        return r["scores"][labels.index(r["predicted_label"])]

    wrong = sorted((r for r in test if not r["correct"]), key=lambda r: -score(r))
    groups = [(f"Misclassified test images ({len(wrong)}; showing up to {HEAT_WRONG})", wrong[:HEAT_WRONG])]
    for lab in labels:
        right = sorted((r for r in test if r["correct"] and r["true_label"] == lab), key=lambda r: -score(r))
        groups.append((f"Most confident correct: {lab}", right[:HEAT_CONFIDENT]))
    shown = {id(r) for _, g in groups for r in g}
    rest = [r for r in test if id(r) not in shown]
    room = max(0, HEAT_SUMMARY_MAX - len(shown))
    step = max(1, len(rest) // max(1, room))
    return groups, [r for r in test if id(r) in shown] + rest[::step][:room]


def _heatmaps_of(model, rows, labels, image_root, notes) -> dict:
    """id(row) -> (Heatmap of its predicted class, the shrunk image it is drawn on, the raw map in logit units),
    in batches. The Heatmap's own map is normalised per image (what the border-heat summary reads)."""
    from .embed import prepare, read_file
    from .explain import Heatmap, class_activation_maps, normalise, shrink, upsample

    out = {}
    for i in range(0, len(rows), HEAT_BATCH):
        ready = []
        for r in rows[i : i + HEAT_BATCH]:
            p = _resolve(r["path"], image_root)
            try:
                array, img = prepare(read_file(p), model.input_size, str(p))
            except (CxrlabError, OSError, ValueError) as exc:
                notes.append(f"no heatmap for {r['path']}: {exc}")
                continue
            ready.append((r, array, shrink(img.pixels, HEAT_PX)))  # small overlays: light HTML, fast drawing
        if not ready:
            continue
        raws = class_activation_maps(model, [a for _, a, _ in ready],
                                     [labels.index(r["predicted_label"]) for r, _, _ in ready], raw=True)
        for (r, _, small), raw in zip(ready, raws):
            lab, cam = r["predicted_label"], normalise(raw)
            out[id(r)] = (Heatmap(r["path"], lab, r["scores"][labels.index(lab)], cam, upsample(cam, small.shape)),
                          small, raw)
    return out


def _run_heatmaps(model_dir, image_root, rows, labels, notes) -> dict | None:
    """Class activation maps of the test rows (each of its predicted class): a border-heat summary and
    overlay groups. None when there is no saved model or no test row."""
    from .explain import overlay_png, summary as heat_summary, upsample
    from .predict import load_model

    test = [r for r in rows if r.get("split") == "test" and r.get("true_label") in labels
            and r.get("predicted_label") in labels]
    if model_dir is None or not test or not (Path(model_dir) / "model.onnx").is_file():
        return None
    groups, todo = _heatmap_groups(test, labels)
    try:
        heat = _heatmaps_of(load_model(model_dir), todo, labels, image_root, notes)
    except CxrlabError as exc:
        notes.append(f"no heatmaps: {exc}")
        return None
    summary = {**heat_summary([heat[id(r)][0] for r in todo if id(r) in heat]), "n_test": len(test)}
    shown = [heat[id(r)] for _, group in groups for r in group if id(r) in heat]
    scale = shared_scale([raw for _, _, raw in shown])

    def overlay(hm, small, raw):
        return overlay_png(hm, small, map_values=upsample(raw, small.shape), scale=scale)

    figures = [(title, [(r["path"], _overlay_caption(r, heat[id(r)][0]), overlay(*heat[id(r)]))
                        for r in group if id(r) in heat]) for title, group in groups]
    return {"summary": summary, "groups": figures, "scale": scale}


def shared_scale(maps) -> tuple[float, float]:
    """One colour range for every overlay of a report: the 1st to 99th percentile of all their raw map values,
    so one hot outlier does not wash out the rest and equal colours mean equal evidence."""
    values = np.concatenate([np.ravel(m) for m in maps]) if maps else np.zeros(1)
    lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _overlay_caption(row, heatmap) -> str:
    from .explain import border_heat_share

    return (f"true {row['true_label']}, predicted {row['predicted_label']}; map of '{heatmap.label}', "
            f"score {pct(heatmap.score)}; border heat {100 * border_heat_share(heatmap.full):.0f}%")


# ----------------------------------------------------------------- plots
def _plots(rows, labels, positive, threshold, curve, report=None) -> list[tuple[str, bytes]]:
    """(alt text, PNG bytes) for every plot that the data allow."""
    from .plots import binary_plots, confusion_png, training_curve_png

    out = []
    if positive is not None and rows:
        pos = labels.index(positive)
        out += binary_plots([r["true_label"] == positive for r in rows], [r["scores"][pos] for r in rows],
                            positive, labels[1 - pos], threshold, n_boot=N_BOOT,
                            ece_before=(report or {}).get("ece_uncalibrated"))
    cm = confusion(rows, labels, positive, report)
    if cm is not None:
        out.append(("Confusion matrix at the operating point, the images of the metrics table "
                    "(rows true, columns predicted)", confusion_png(cm, labels)))
    if curve:
        out.append(("Training curves: accuracy and cross-entropy per step", training_curve_png(curve)))
    return out


def confusion(rows, labels, positive=None, report=None) -> np.ndarray | None:
    """The confusion matrix (rows true, columns predicted, in label order) of the metrics table's own counts, so
    that the two never disagree (a refused image counted as not flagged, a test subsample); from the rows'
    decisions when there is no report. None when there is nothing to count."""
    k = len(labels)
    if report and positive in labels and all(isinstance(report.get(c), int) for c in ("tp", "fp", "tn", "fn")):
        pos, neg = labels.index(positive), 1 - labels.index(positive)
        cm = np.zeros((k, k), dtype=int)
        cm[pos, pos], cm[pos, neg], cm[neg, pos], cm[neg, neg] = (report[c] for c in ("tp", "fn", "fp", "tn"))
        return cm
    if report and isinstance(report.get("confusion_matrix"), list) and list(report.get("labels") or []) == labels:
        return np.asarray(report["confusion_matrix"], dtype=int)
    if not rows:
        return None
    cm = np.zeros((k, k), dtype=int)
    for r in rows:
        if r["predicted_label"] in labels:
            cm[labels.index(r["true_label"]), labels.index(r["predicted_label"])] += 1
    return cm
