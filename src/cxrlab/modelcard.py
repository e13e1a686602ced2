"""The model card: MODEL_CARD.md in every model folder, for the person deciding whether to use the model.

It is rendered from cxrlab.json (which the SHA-256 record covers) and from ``evaluations.json``, the external
evaluations that ``cxrlab evaluate --output`` appends. Neither file is in the SHA-256 record, on purpose:
nothing cxrlab computes reads them, and an evaluation run after training must be able to add to the card
without making the model look altered. The card names the cxrlab.json digest it was written from, and an
evaluation record is kept only while that digest matches (a retrained model starts a new card).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .fsutil import atomic_write_bytes
from .jsonutil import json_bytes
from .metrics import percent
from .outputs import MODEL_DOCS

CARD_FILE, EVALUATIONS_FILE = MODEL_DOCS


def render_card(info: dict, evaluations: list[dict] = ()) -> str:
    """MODEL_CARD.md's text from a model's cxrlab.json content and its external evaluation records (nothing
    else: the same model gives the same card, wherever its folder is)."""
    positive, labels = info.get("positive_label"), list(info.get("labels") or [])
    task = " / ".join(f"`{lab}`" for lab in info.get("labels") or [])
    lines = [f"# Model card: chest X-ray classifier ({task})", "",
             "**Not a medical device.** For research and education only; it must not be used to diagnose, treat "
             "or exclude disease in any person.", "",
             f"Written by {info.get('created_by', 'cxrlab')} from `cxrlab.json` (SHA-256 "
             f"`{str(info.get('info_sha256', ''))[:16]}...`).", ""]
    lines += _intended_use(labels, positive) + _training_data(info) + _operating_point(info)
    lines += _own_test(info.get("metrics") or {}) + _external(evaluations) + _checks(info) + _limitations(info)
    return "\n".join(lines).rstrip() + "\n"


def _intended_use(labels, positive) -> list[str]:
    what = (f"flags frontal chest X-rays as `{positive}` (the positive class) or "
            f"`{next((lab for lab in labels if lab != positive), '?')}`" if positive and len(labels) == 2
            else f"sorts frontal chest X-rays into {', '.join(f'`{lab}`' for lab in labels)}")
    return ["## Intended use", "",
            f"A research classifier that {what}, for studying triage of adult frontal chest X-rays (such as "
            "tuberculosis screening) on data like its training data. Every answer needs a qualified reader; "
            "pictures that are not frontal chest X-rays are refused (see Checks).", ""]


def _training_data(info) -> list[str]:
    data, split, backbone = info.get("training_data") or {}, info.get("split") or {}, info.get("backbone") or {}
    counts = ", ".join(f"{lab} {n}" for lab, n in (data.get("counts") or {}).items())
    out = ["## Training data", "", f"- Folder(s): {data.get('image_dir_name', 'unknown')}" + (f" ({counts})" if counts
                                                                                                 else "")]
    for site, c in (data.get("sites") or {}).items():
        out.append(f"- Site {site}: " + ", ".join(f"{lab} {n}" for lab, n in c.items()))
    if data.get("n_skipped"):
        out.append(f"- Unreadable files skipped: {data['n_skipped']}")
    n = (info.get("metrics") or {}).get("n") or {}
    if n:
        out.append(f"- Split: {n.get('train', '?')} training, {n.get('validation', '?')} validation, "
                   f"{n.get('test', '?')} test images" + (f" (grouped by patient with `{split['group_regex']}`)"
                                                         if split.get("group_regex") else ""))
    recipe = "fine-tuned end to end" if info.get("fine_tune") else "a linear head on frozen embeddings"
    out += [f"- Network: {backbone.get('id', backbone.get('name', '?'))}, {recipe}, "
            f"input {backbone.get('input_size', '?')} px; seed {info.get('seed', '?')}", ""]
    return out


def _operating_point(info) -> list[str]:
    op, cal = info.get("operating_point"), info.get("calibration") or {}
    out = ["## Operating point", ""]
    if not op:
        out.append("None: the label with the highest score is the answer.")
    else:
        sens, spec = op.get("sensitivity"), op.get("specificity")
        out.append(f"- P({info.get('positive_label')}) >= {float(op['threshold']):.4f} gives "
                   f"`{info.get('positive_label')}`; rule `{op.get('rule')}`, chosen on the "
                   f"{op.get('data') or 'validation split'}" + (
                       f" (there: sensitivity {percent(sens)}, specificity {percent(spec)})"
                       if isinstance(sens, float) and isinstance(spec, float) else ""))
        if op.get("note"):
            out.append(f"- {op['note']}")
    if cal:
        out.append(f"- Scores calibrated by {cal.get('method', '?')} scaling on the "
                   f"{cal.get('data') or 'validation split'}")
    return out + [""]


def _figure_rows(m: dict) -> list[str]:
    rows = [f"| Images (positive / negative) | {m.get('n')} ({m.get('n_positive', '?')} / {m.get('n_negative', '?')}) |"]
    if m.get("auc") is not None:
        ci = m.get("auc_ci") or [None, None]
        rows.append(f"| ROC AUC [95% CI] | {m['auc']:.3f}" + (f" [{ci[0]:.3f}-{ci[1]:.3f}]" if None not in ci else "")
                    + " |")
    for key in ("sensitivity", "specificity", "ppv", "npv", "accuracy"):
        if key in m:
            rows.append(f"| {key.capitalize() if len(key) > 3 else key.upper()} [95% CI] | "
                        f"{percent(m[key], m.get(f'{key}_ci'))} |")
    return rows


def _own_test(metrics) -> list[str]:
    test = metrics.get("test") or {}
    out = ["## Performance on its own test split", ""]
    if not test:
        return out + ["Not measured (no test split with both classes).", ""]
    if "per_class" in test:
        out += [f"Accuracy {percent(test.get('accuracy'), test.get('accuracy_ci'))}, macro AUC "
                f"{test.get('macro_auc') or float('nan'):.3f} (N={test.get('n')})."]
    else:
        out += [f"At the operating point (threshold {test.get('threshold', float('nan')):.4f}):", "",
                "| Figure | Value |", "|---|---|", *_figure_rows(test)]
    if test.get("who_verdict"):
        out += ["", test["who_verdict"]]
    if test.get("sample_warning"):
        out += ["", f"**Warning:** {test['sample_warning']}."]
    for site, m in (metrics.get("test_by_site") or {}).items():
        if "sensitivity" in m:
            out.append(f"- Site {site}: sensitivity {percent(m['sensitivity'], m.get('sensitivity_ci'))}, "
                       f"specificity {percent(m['specificity'], m.get('specificity_ci'))} (N={m.get('n')})")
    return out + [""]


def _external(evaluations) -> list[str]:
    out = ["## External evaluations", ""]
    if not evaluations:
        return out + ["None yet. `cxrlab evaluate --model THIS_FOLDER other_hospital/ --output eval/` adds one here.",
                      ""]
    for e in evaluations:
        m = e.get("figures") or {}
        out += [f"### {e.get('data', '?')} ({e.get('date', '?')})", "",
                f"Report: `{e.get('report', '?')}`; {e.get('n_rejected', 0)} image(s) refused as not chest X-rays, "
                "counted as not flagged.", "", "| Figure | Value |", "|---|---|", *_figure_rows(m)]
        if m.get("who_verdict"):
            out += ["", m["who_verdict"]]
        if m.get("sample_warning"):
            out += ["", f"**Warning:** {m['sample_warning']}."]
        out.append("")
    return out


def _checks(info) -> list[str]:
    out = ["## Checks on every image", ""]
    chest, ood = info.get("chest_check"), info.get("ood")
    if chest:
        how = ("colour or blank pictures, and a small network's verdict" if chest.get("network", True)
               else "colour or blank pictures only: the network was off for this model")
        out.append(f"- Not a frontal chest X-ray ({how}): refused, no score.")
    else:
        out.append("- No chest X-ray check: every picture is scored (trained with --no-ood).")
    out.append(f"- Unlike the training images (shift score above {ood['threshold']:.1f}): scored, with a warning."
               if ood else "- No shift warning.")
    return out + [""]


def _limitations(info) -> list[str]:
    sites = (info.get("training_data") or {}).get("image_dir_name", "its training folder")
    return ["## Limitations", "",
            f"- Trained and tested on images from {sites} only: expect different figures at another hospital, "
            "scanner or population. Measure them with `cxrlab evaluate` on local labelled films before any use; "
            "`cxrlab adapt` chooses a local operating point.",
            "- The threshold and the calibration were fitted on validation images of the same source; the "
            "operating point's sensitivity and specificity move with prevalence and image quality.",
            "- Labels are those of the training data (for public TB sets: the radiology reading, not culture).",
            "- It sees one frontal image: no history, no symptoms, no earlier films, no lateral views.",
            "- Not a medical device; not cleared or approved by any regulator.", ""]


def write_card(model_dir: str | os.PathLike, info: dict) -> Path:
    """(Re)write MODEL_CARD.md from ``info`` and the evaluation records that belong to this cxrlab.json."""
    model_dir = Path(model_dir)
    path = model_dir / CARD_FILE
    atomic_write_bytes(path, render_card(info, read_evaluations(model_dir, info)).encode("utf-8"))
    return path


def read_evaluations(model_dir: str | os.PathLike, info: dict) -> list[dict]:
    """The evaluation records of this very model (same cxrlab.json digest); unreadable content counts as none."""
    try:
        records = json.loads((Path(model_dir) / EVALUATIONS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(records, list):
        return []
    return [r for r in records if isinstance(r, dict) and r.get("model_info_sha256") == info.get("info_sha256")]


def record_evaluation(model_dir: str | os.PathLike, info: dict, *, data: str, report: str, figures: dict,
                      n_rejected: int = 0) -> Path:
    """Append one external evaluation to the model folder's record and rewrite MODEL_CARD.md. Raises OSError or
    cxrlab.outputs.OutputError when the folder is not a cxrlab model folder or cannot be written."""
    from .outputs import claim

    model_dir = Path(model_dir)
    claim(model_dir, "train", files=[CARD_FILE, EVALUATIONS_FILE])  # the model folder's own, documentary files
    keep = ("n", "n_positive", "n_negative", "threshold", "auc", "auc_ci", "who_verdict", "sample_warning",
            *(f"{k}{s}" for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy") for s in ("", "_ci")))
    record = {"model_info_sha256": info.get("info_sha256"), "date": time.strftime("%Y-%m-%d"), "data": data,
              "report": report, "n_rejected": n_rejected, "figures": {k: figures[k] for k in keep if k in figures}}
    records = read_evaluations(model_dir, info) + [record]
    atomic_write_bytes(model_dir / EVALUATIONS_FILE, json_bytes(records))
    return write_card(model_dir, info)
