"""A run's predictions -> metrics.json, predictions.csv, report.html (one self-contained file)."""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from .errors import CxrlabError
from .fsutil import atomic_write_bytes

__all__ = ["write_run_report", "write_evaluation", "write_report_html"]

MAX_THUMBS = 40
THUMB_PX = 128
N_BOOT = 200
HEAT_WRONG = 12       # overlays of misclassified test images
HEAT_CONFIDENT = 3    # overlays of the most confident correct test images, per class
HEAT_PX = 384         # overlays are drawn on the image shrunk to this long side
HEAT_SUMMARY_MAX = 300  # test images whose maps enter the border-heat summary
BORDER_WARNING = ("the model's heat sits mostly on the image border, where hospitals print text markers: "
                  "it may be using a shortcut")

_CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",Arial,sans-serif;margin:1.5em auto;
max-width:1100px;padding:0 1em;color:#222;line-height:1.4}h1{margin-bottom:.2em}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.3em .7em;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{padding:.7em 1em;border-radius:6px;margin:1em 0;font-weight:600}
.meets{background:#e3f4e1;border:1px solid #3c8d3a}.fails{background:#fbe4e1;border:1px solid #c0392b}
.na{background:#eef1f5;border:1px solid #8899aa}.plots,.thumbs{display:flex;flex-wrap:wrap;gap:12px}
img.plot{border:1px solid #ddd;max-width:100%}figure{margin:0;text-align:center;font-size:.8em;width:150px}
img.thumb{border:1px solid #999;display:block;margin:0 auto}.muted{color:#666}
.overlays{display:flex;flex-wrap:wrap;gap:12px}.overlays figure{width:auto;max-width:360px}
img.overlay{border:1px solid #999;display:block;margin:0 auto;max-width:100%}
.warning{background:#fff3cd;border:1px solid #d39e00;padding:.7em 1em;border-radius:6px;margin:1em 0;font-weight:600}"""


# ----------------------------------------------------------------- entry points
def write_run_report(result, image_dir, *, entries, probs_by_relpath, info) -> None:
    """Called at the end of ``training.train()``: writes the three files into ``result.run_dir``."""
    labels = list(result.labels)
    positive = info.get("positive_label")
    op = info.get("operating_point") or None
    threshold = op.get("threshold") if op else None
    binary = _is_binary(labels, positive, threshold)
    pos = labels.index(positive) if binary else None
    rows = []
    for e in entries:
        p = probs_by_relpath.get(e.relpath)
        if p is None:
            continue
        p = [float(x) for x in np.asarray(p, dtype=float).ravel()]
        if binary:
            pred = positive if p[pos] >= threshold else labels[1 - pos]
        else:
            pred = labels[int(np.argmax(p))]
        rows.append({"path": e.relpath, "true_label": e.label, "scores": p, "predicted_label": pred,
                     "correct": pred == e.label, "split": e.split})
    metrics = dict(result.metrics)
    curve = metrics.get("training_curve")
    metrics["operating_point"] = op
    metrics["calibration"] = info.get("calibration")
    metrics["positive_label"] = positive if binary else None
    notes = [f"skipped {s.path}: {s.reason}" for s in (result.skipped or [])]
    notes += [str(n) for n in (result.notes or [])]
    summary = [f"Backbone: {(info.get('backbone') or {}).get('id', '?')}"]
    cal = info.get("calibration") or {}
    if cal:
        detail = (f"a {_num(cal.get('platt_a'), 3)}, b {_num(cal.get('platt_b'), 3)}" if cal.get("method") == "platt"
                  else f"temperature {_num(cal.get('temperature'), 3)}")
        summary.append(f"Calibration: {cal.get('method')} ({detail}; fitted on the {cal.get('data', 'validation split')})")
    if op:
        summary.append(f"Operating point: {op.get('rule')} at threshold {_num(threshold, 4)} "
                       f"(chosen on the {op.get('data', 'validation split')})")
    heat = _run_heatmaps(getattr(result, "model_dir", None), image_dir, rows, labels, notes)
    if heat is not None:
        metrics["heatmaps"] = heat["summary"]
        if isinstance(getattr(result, "metrics", None), dict):
            result.metrics["heatmaps"] = heat["summary"]
    write_evaluation(result.run_dir, title=f"cxrlab training run: {Path(result.run_dir).name}", rows=rows,
                     labels=labels, positive_label=positive if binary else None, threshold=threshold,
                     metrics=metrics, training_curve=curve, notes=notes, summary=summary, image_root=image_dir,
                     heatmaps=heat)


def write_evaluation(output_dir, *, title, rows, labels, positive_label, threshold, metrics,
                     training_curve=None, rejected=None, reference_metrics=None, notes=(),
                     summary=(), image_root=None, heatmaps=None) -> None:
    """Write metrics.json, predictions.csv and report.html into ``output_dir``.

    ``rows``: dicts with path, true_label, scores (aligned with ``labels``), predicted_label,
    correct, split. ``metrics`` / ``reference_metrics``: a binary or multi-class report, or a dict
    holding one under ``"test"``. Relative row paths are resolved against ``image_root``.
    """
    out = Path(output_dir)
    atomic_write_bytes(out / "metrics.json", json.dumps(_json_safe(metrics), indent=2).encode("utf-8"))
    atomic_write_bytes(out / "predictions.csv", _predictions_csv(rows, labels))
    write_report_html(out / "report.html", title=title, rows=rows, labels=labels,
                      positive_label=positive_label, threshold=threshold, report=_report_of(metrics),
                      reference=_report_of(reference_metrics), training_curve=training_curve,
                      rejected=rejected, notes=notes, summary=summary, image_root=image_root,
                      heatmaps=heatmaps)


def write_report_html(path, *, title, rows, labels, positive_label=None, threshold=None, report=None,
                      reference=None, training_curve=None, rejected=None, notes=(), summary=(),
                      image_root=None, heatmaps=None) -> None:
    """Render the self-contained HTML report (plots and thumbnails as base64 PNG data URIs).

    ``heatmaps``: as returned by ``_run_heatmaps`` (a border-heat summary and overlay groups), or None.
    """
    labels = list(labels)
    binary = _is_binary(labels, positive_label, threshold)
    notes = [str(n) for n in notes]
    ev = [r for r in rows if r.get("split") == "test"] or list(rows)
    scope = "test split" if any(r.get("split") == "test" for r in rows) else "all rows"
    known = [r for r in ev if r.get("true_label") in labels]
    e = html.escape
    parts = [f"<header><h1>{e(str(title))}</h1>", "<ul class='summary'>"]
    for line in [*summary, *_data_summary(rows, labels, scope)]:
        parts.append(f"<li>{e(str(line))}</li>")
    parts.append("</ul>")
    verdict = (report or {}).get("who_verdict")
    if verdict:
        cls = "meets" if "-> meets" in verdict else "fails"
        parts.append(f"<div class='verdict {cls}'>{e(verdict)}</div>")
    else:
        why = "binary test metrics are not available" if binary else "not a binary task"
        parts.append(f"<div class='verdict na'>WHO TPP verdict: n/a ({e(why)})</div>")
    parts.append("</header>")

    parts.append(f"<section><h2>Metrics ({e(scope)})</h2>")
    if report and "per_class" in report:
        parts.append(_multiclass_tables(report, reference))
    elif report:
        parts.append(_binary_table(report, reference))
    else:
        parts.append("<p class='muted'>No test metrics (no test rows, or a single class).</p>")
    parts.append("</section>")

    plots = _plots(known, labels, positive_label if binary else None, threshold, training_curve, notes)
    if plots:
        parts.append("<section><h2>Plots</h2><div class='plots'>")
        parts += [f"<img class='plot' src='{_uri(png)}' alt='{e(alt)}'>" for alt, png in plots]
        parts.append("</div></section>")
    if heatmaps:
        parts.append(_heatmap_section(heatmaps))

    pos = labels.index(positive_label) if binary else None
    wrong = [r for r in known if r.get("correct") is False]
    wrong.sort(key=lambda r: -abs(r["scores"][pos] - threshold) if binary else -max(r["scores"]))
    if wrong:
        parts.append(f"<section><h2>Misclassified images ({len(wrong)}, {e(scope)}; "
                     f"showing up to {MAX_THUMBS})</h2><div class='thumbs'>")
        for r in wrong[:MAX_THUMBS]:
            score = r["scores"][pos] if binary else max(r["scores"])
            what = f"P({positive_label})" if binary else "score"
            cap = f"true {r['true_label']}, predicted {r['predicted_label']}, {what} {score:.3f}"
            parts.append(_thumb_figure(r["path"], cap, image_root, notes))
        parts.append("</div></section>")
    if rejected:
        parts.append(f"<section><h2>Rejected images ({len(rejected)}; showing up to {MAX_THUMBS})</h2>"
                     "<div class='thumbs'>")
        for p, s in list(rejected)[:MAX_THUMBS]:
            parts.append(_thumb_figure(p, f"rejected, OOD score {_num(s, 3)}", image_root, notes))
        parts.append("</div></section>")
    if notes:
        parts.append("<section><h2>Notes</h2><ul>")
        parts += [f"<li>{e(n)}</li>" for n in notes[:300]]
        if len(notes) > 300:
            parts.append(f"<li>... and {len(notes) - 300} more</li>")
        parts.append("</ul></section>")
    doc = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
           f"<title>{e(str(title))}</title><style>{_CSS}</style></head><body>\n"
           + "\n".join(parts) + "\n</body></html>\n")
    atomic_write_bytes(path, doc.encode("utf-8", "backslashreplace"))  # a path that is not UTF-8


# ----------------------------------------------------------------- helpers
def _is_binary(labels, positive, threshold) -> bool:
    return (len(labels) == 2 and positive in labels and threshold is not None
            and math.isfinite(float(threshold)))


def _report_of(metrics):
    if not isinstance(metrics, dict):
        return None
    if isinstance(metrics.get("test"), dict):
        return metrics["test"]
    return metrics if ("auc" in metrics or "per_class" in metrics) else None


def _json_safe(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _json_safe(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, np.ndarray)):
        return [_json_safe(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if x is None or isinstance(x, str):
        return x
    return str(x)  # Path and anything else


def _predictions_csv(rows, labels) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "true_label", *[f"score_{lab}" for lab in labels], "predicted_label", "correct", "split"])
    for r in rows:
        c = r.get("correct")
        w.writerow([r["path"], r.get("true_label") or "", *[f"{float(s):.6f}" for s in r["scores"]],
                    r["predicted_label"], "" if c is None else int(bool(c)), r.get("split") or ""])
    return buf.getvalue().encode("utf-8", "backslashreplace")  # a path that is not UTF-8


def _data_summary(rows, labels, scope) -> list[str]:
    out = []
    for split in dict.fromkeys(r.get("split") or "(none)" for r in rows):
        sub = [r for r in rows if (r.get("split") or "(none)") == split]
        per = ", ".join(f"{lab} {sum(r.get('true_label') == lab for r in sub)}" for lab in labels)
        out.append(f"Split {split}: {len(sub)} images ({per})")
    out.append(f"Metrics, plots and misclassified images use the {scope}.")
    return out


def _num(v, digits=3) -> str:
    return "n/a" if v is None or not math.isfinite(float(v)) else f"{float(v):.{digits}f}"


def _pct(v, ci=None) -> str:
    if v is None:
        return "n/a"
    s = f"{100 * v:.1f}%"
    if ci and ci[0] is not None and ci[1] is not None and math.isfinite(ci[0]):
        s += f" [{100 * ci[0]:.1f}-{100 * ci[1]:.1f}]"
    return s


def _binary_cells(m) -> list[tuple[str, str]]:
    auc = "n/a" if m.get("auc") is None else f"{m['auc']:.3f}"
    if m.get("auc") is not None and m.get("auc_ci"):
        auc += f" [{m['auc_ci'][0]:.3f}-{m['auc_ci'][1]:.3f}]"
    cells = [("n (positive / negative)", f"{m.get('n')} ({m.get('n_positive')} / {m.get('n_negative')})"),
             ("Threshold", _num(m.get("threshold"), 4)), ("ROC AUC [95% DeLong CI]", auc)]
    for key, name in (("sensitivity", "Sensitivity"), ("specificity", "Specificity"), ("ppv", "PPV"),
                      ("npv", "NPV"), ("accuracy", "Accuracy")):
        cells.append((f"{name} [95% Wilson CI]", _pct(m.get(key), m.get(f"{key}_ci"))))
    cells += [("F1", _num(m.get("f1"))), ("TP / FP / TN / FN", f"{m.get('tp')} / {m.get('fp')} / "
              f"{m.get('tn')} / {m.get('fn')}"), ("Brier score", _num(m.get("brier"), 4))]
    if m.get("ece_uncalibrated") is not None:
        cells.append(("ECE before calibration", _num(m.get("ece_uncalibrated"), 4)))
    cells.append(("ECE" + (" after calibration" if "ece_uncalibrated" in m else ""), _num(m.get("ece"), 4)))
    return cells


def _binary_table(report, reference) -> str:
    e = html.escape
    mine = _binary_cells(report)
    ref = dict(_binary_cells(reference)) if reference and "per_class" not in reference else None
    head = "<tr><th>Metric</th><th>Value</th>" + ("<th>Reference (model's internal test)</th>" if ref else "")
    out = ["<table>", head + "</tr>"]
    for name, val in mine:
        extra = f"<td class='num'>{e(ref.get(name, 'n/a'))}</td>" if ref else ""
        out.append(f"<tr><td>{e(name)}</td><td class='num'>{e(val)}</td>{extra}</tr>")
    return "\n".join(out + ["</table>"])


def _multiclass_tables(report, reference) -> str:
    e = html.escape
    out = ["<table><tr><th>Metric</th><th>Value</th>" + ("<th>Reference</th>" if reference else "") + "</tr>"]
    for key, name in (("accuracy", "Accuracy"), ("macro_auc", "Macro AUC"), ("macro_f1", "Macro F1"),
                      ("macro_sensitivity", "Macro sensitivity"), ("macro_specificity", "Macro specificity")):
        fmt = (lambda m: _pct(m.get("accuracy"), m.get("accuracy_ci"))) if key == "accuracy" \
            else (lambda m, k=key: _num(m.get(k)))
        ref = f"<td class='num'>{e(fmt(reference))}</td>" if reference else ""
        out.append(f"<tr><td>{e(name)}</td><td class='num'>{e(fmt(report))}</td>{ref}</tr>")
    out.append("</table><h3>Per class (one-vs-rest)</h3><table><tr><th>Class</th><th>Support</th>"
               "<th>AUC [95% CI]</th><th>Sensitivity [95% CI]</th><th>Specificity [95% CI]</th>"
               "<th>PPV</th><th>F1</th></tr>")
    for lab, d in report["per_class"].items():
        auc = _num(d.get("auc")) + (f" [{d['auc_ci'][0]:.3f}-{d['auc_ci'][1]:.3f}]" if d.get("auc_ci") else "")
        cells = [str(d.get("support")), auc, _pct(d.get("sensitivity"), d.get("sensitivity_ci")),
                 _pct(d.get("specificity"), d.get("specificity_ci")), _pct(d.get("ppv")), _num(d.get("f1"))]
        out.append(f"<tr><td>{e(str(lab))}</td>" + "".join(f"<td class='num'>{e(c)}</td>" for c in cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _jpeg_uri(png: bytes, quality: int = 88) -> str:
    """Overlays are photographic: as JPEG they are about 1/6 of the PNG and look the same."""
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(io.BytesIO(png)) as im:
        im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumb_figure(path, caption, image_root, notes) -> str:
    p = Path(path)
    if not p.is_absolute() and image_root is not None:
        p = Path(image_root) / p
    e = html.escape
    try:
        from .decode import decode_image, resize

        px = decode_image(p, min_size=THUMB_PX).pixels
        h, w = px.shape
        k = THUMB_PX / max(h, w)
        small = resize(px, (max(1, round(h * k)), max(1, round(w * k)))) if k < 1 else px
        buf = io.BytesIO()
        from PIL import Image

        Image.fromarray(np.round(small * 255).astype(np.uint8), "L").save(buf, format="PNG")
        img = f"<img class='thumb' src='{_uri(buf.getvalue())}' alt='{e(f'{path}: {caption}')}'>"
    except (CxrlabError, OSError, ValueError) as exc:
        notes.append(f"no thumbnail for {path}: {exc}")
        img = "<div class='muted'>(no thumbnail)</div>"
    short = "/".join(Path(str(path)).parts[-2:])
    return f"<figure>{img}<figcaption>{e(short)}<br>{e(caption)}</figcaption></figure>"


# ----------------------------------------------------------------- heatmaps
def _run_heatmaps(model_dir, image_root, rows, labels, notes) -> dict | None:
    """Class activation maps of the test rows: a border-heat summary over (up to HEAT_SUMMARY_MAX of) them
    and overlays of the misclassified and of the most confident correct images of each class.

    Each map explains the row's predicted class. Returns None when there is no saved model or no test row.
    """
    import time

    test = [r for r in rows if r.get("split") == "test" and r.get("true_label") in labels
            and r.get("predicted_label") in labels]
    if model_dir is None or not test or not (Path(model_dir) / "model.onnx").is_file():
        return None
    started = time.perf_counter()
    from importlib import import_module

    from .embed import prepare, read_file
    from .explain import shrink
    from .predict import load_model

    explain = import_module(".explain", __package__)  # the module; cxrlab.explain is the function

    def score(r, lab):
        return r["scores"][labels.index(lab)]

    wrong = [r for r in test if not r["correct"]]
    wrong.sort(key=lambda r: -score(r, r["predicted_label"]))  # most confidently wrong first
    groups = [(f"Misclassified test images ({len(wrong)}; showing up to {HEAT_WRONG})", wrong[:HEAT_WRONG])]
    for lab in labels:
        right = sorted((r for r in test if r["correct"] and r["true_label"] == lab), key=lambda r: -score(r, lab))
        groups.append((f"Most confident correct: {lab}", right[:HEAT_CONFIDENT]))
    shown = {id(r) for _, g in groups for r in g}
    # The summary covers every test image up to a cap; the ones with overlays are always in it.
    rest = [r for r in test if id(r) not in shown]
    step = max(1, len(rest) // max(1, HEAT_SUMMARY_MAX - len(shown)))
    todo = [r for r in test if id(r) in shown] + rest[::step][:max(0, HEAT_SUMMARY_MAX - len(shown))]
    try:
        model = load_model(model_dir)
    except CxrlabError as exc:
        notes.append(f"no heatmaps: {exc}")
        return None
    if "class_maps" not in model.output_names:
        notes.append(f"no heatmaps: {model_dir}/model.onnx has no 'class_maps' output")
        return None
    heat, small = {}, {}
    batch = 16
    for i in range(0, len(todo), batch):
        chunk, arrays = [], []
        for r in todo[i : i + batch]:
            p = Path(r["path"])
            if not p.is_absolute() and image_root is not None:
                p = Path(image_root) / p
            try:
                array, img = prepare(read_file(p), model.input_size, str(p))
            except (CxrlabError, OSError, ValueError) as exc:
                notes.append(f"no heatmap for {r['path']}: {exc}")
                continue
            px = shrink(img.pixels, HEAT_PX)  # overlays are drawn on a shrunk copy: small HTML, fast drawing
            chunk.append(r)
            arrays.append(array)
            small[id(r)] = px
        if not chunk:
            continue
        maps = model.run(np.stack(arrays), ["class_maps"])["class_maps"]
        for j, r in enumerate(chunk):
            lab = r["predicted_label"]
            cam = explain._normalise(maps[j, labels.index(lab)])
            heat[id(r)] = explain.Heatmap(r["path"], lab, score(r, lab), cam,
                                          explain.upsample(cam, small[id(r)].shape))
    summ = explain.summary([heat[id(r)] for r in todo if id(r) in heat])
    summ["n_test"] = len(test)
    out_groups = []
    for title, group in groups:
        figs = []
        for r in group:
            if id(r) not in heat:
                continue
            png = explain.overlay_png(heat[id(r)], small[id(r)])
            cap = (f"true {r['true_label']}, predicted {r['predicted_label']}; "
                   f"map of '{r['predicted_label']}', score {score(r, r['predicted_label']):.3f}; "
                   f"border heat {100 * explain.border_heat_share(heat[id(r)].full):.0f}%")
            figs.append((r["path"], cap, png))
        out_groups.append((title, figs))
    # Timing stays out of the summary (it goes to metrics.json, which must be identical across runs).
    return {"summary": summ, "groups": out_groups, "seconds": round(time.perf_counter() - started, 2)}


def _heatmap_section(heat) -> str:
    e = html.escape
    s = heat["summary"]
    parts = ["<section><h2>Where the model looked</h2>",
             "<p class='muted'>Class activation maps of the predicted class on test images (red = the regions "
             "that raised that class's score most; each map is scaled to its own range).</p>"]
    if s.get("mean_border_share") is None:
        parts.append(f"<p>Border heat share: n/a (n={s.get('n', 0)})</p>")
    else:
        parts.append(f"<p class='border-heat'>Border heat share: mean {100 * s['mean_border_share']:.1f}% "
                     f"(n={s['n']}); median {100 * s['median_border_share']:.1f}%. The border band (the outer 15% of "
                     "each side) covers 51% of the image area: a map with no preference scores about 51%.</p>")
    if s.get("flag"):
        parts.append(f"<div class='warning'>Warning: {e(BORDER_WARNING)}.</div>")
    for title, figs in heat["groups"]:
        if not figs:
            continue
        parts.append(f"<h3>{e(title)}</h3><div class='overlays'>")
        for path, cap, png in figs:
            short = "/".join(Path(str(path)).parts[-2:])
            parts.append(f"<figure><img class='overlay' src='{_jpeg_uri(png)}' alt='{e(f'heatmap of {path}: {cap}')}'>"
                         f"<figcaption>{e(short)}<br>{e(cap)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


# ----------------------------------------------------------------- plots
def _plots(rows, labels, positive, threshold, curve, notes) -> list[tuple[str, bytes]]:
    """(alt text, PNG bytes) for every plot that the data allow."""
    # Figure objects render through Agg without pyplot: headless, and no global backend switch
    # (matplotlib.use would close a caller's open pyplot figures) and no figures left open.
    from matplotlib.figure import Figure

    def _fig(w=4.2, h=4.0):
        fig = Figure(figsize=(w, h))
        return fig, fig.add_subplot()

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        fig.clear()
        return buf.getvalue()

    out = []
    if positive is not None and rows:
        from .metrics import pr_curve, reliability_bins, roc_curve

        pos = labels.index(positive)
        y = np.array([r["true_label"] == positive for r in rows], dtype=int)
        s = np.array([r["scores"][pos] for r in rows], dtype=float)
        if 0 < y.sum() < y.size:
            fpr, tpr, _ = roc_curve(y, s)
            grid, lo, hi = _roc_band(y, s)
            op_fpr, op_tpr = float(np.mean(s[y == 0] >= threshold)), float(np.mean(s[y == 1] >= threshold))
            fig, ax = _fig()
            ax.fill_between(grid, lo, hi, color="tab:blue", alpha=0.2, label=f"95% bootstrap band ({N_BOOT})")
            ax.plot(fpr, tpr, color="tab:blue", label="ROC")
            ax.plot([0, 1], [0, 1], ls=":", color="grey")
            ax.plot([op_fpr], [op_tpr], "o", color="tab:red", label=f"threshold {threshold:.3f}")
            ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
            ax.legend(loc="lower right", fontsize=7)
            out.append(("ROC curve with the operating point and a 95% bootstrap band", png(fig)))
            prec, rec, _ = pr_curve(y, s)
            fig, ax = _fig()
            ax.step(rec, prec, where="post")
            ax.axhline(y.mean(), ls=":", color="grey", label="prevalence")
            ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall",
                   xlim=(0, 1), ylim=(0, 1.01))
            ax.legend(loc="lower left", fontsize=7)
            out.append(("Precision-recall curve", png(fig)))
        if np.all((s >= 0) & (s <= 1)):
            b = reliability_bins(y, s, 10)
            ok = b["count"] > 0
            fig, ax = _fig()
            ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect calibration")
            ax.plot(b["mean_predicted"][ok], b["fraction_positive"][ok], "o-", label="model")
            ax.set(xlabel=f"mean P({positive})", ylabel="fraction positive", title="Reliability",
                   xlim=(0, 1), ylim=(0, 1))
            ax.legend(loc="upper left", fontsize=7)
            out.append(("Reliability diagram (10 equal-width bins)", png(fig)))
            fig, ax = _fig()
            for lab, val in ((labels[1 - pos], 0), (positive, 1)):
                ax.hist(s[y == val], bins=np.linspace(0, 1, 21), alpha=0.55, label=f"true {lab}")
            ax.axvline(threshold, color="tab:red", ls="--", label=f"threshold {threshold:.3f}")
            ax.set(xlabel=f"P({positive})", ylabel="images", title="Score histogram")
            ax.legend(fontsize=7)
            out.append((f"Histogram of P({positive}) per true class with the threshold", png(fig)))
    if rows:
        idx = {lab: i for i, lab in enumerate(labels)}
        cm = np.zeros((len(labels), len(labels)), dtype=int)
        for r in rows:
            if r["predicted_label"] in idx:
                cm[idx[r["true_label"]], idx[r["predicted_label"]]] += 1
        fig, ax = _fig(min(2.5 + 0.5 * len(labels), 9), min(2.3 + 0.45 * len(labels), 8))
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
        out.append(("Confusion matrix (rows true, columns predicted)", png(fig)))
    if curve:
        def col(key):
            return np.array([np.nan if c.get(key) is None else float(c[key]) for c in curve])

        steps = col("step")
        fig = Figure(figsize=(8, 3.2))
        for k, (metric, name) in enumerate((("accuracy", "accuracy"), ("cross_entropy", "cross-entropy"))):
            ax = fig.add_subplot(1, 2, k + 1)
            ax.plot(steps, col(f"train_{metric}" if metric == "accuracy" else metric), label="train")
            v = col(f"validation_{metric}")
            if np.isfinite(v).any():
                ok = np.isfinite(v)
                ax.plot(steps[ok], v[ok], label="validation")
            ax.set(xlabel="step", ylabel=name, title=f"Training {name}")
            ax.legend(fontsize=7)
        out.append(("Training curves: accuracy and cross-entropy per step", png(fig)))
    return out


def _roc_band(y, s, n_boot: int = N_BOOT, seed: int = 0):
    """Stratified bootstrap of the ROC, vertically averaged on a fixed FPR grid: (grid, lo, hi)."""
    from .metrics import roc_curve

    grid = np.linspace(0, 1, 101)
    rng = np.random.default_rng(seed)
    pi, ni = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    tprs = np.empty((n_boot, grid.size))
    for b in range(n_boot):
        i = np.r_[rng.choice(pi, pi.size), rng.choice(ni, ni.size)]
        fpr, tpr, _ = roc_curve(y[i], s[i])
        tprs[b] = np.interp(grid, fpr, tpr)
    lo, hi = np.percentile(tprs, [2.5, 97.5], axis=0)
    return grid, lo, hi
