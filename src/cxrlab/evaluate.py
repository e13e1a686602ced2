"""Evaluate: a model directory + any labelled folder -> metrics at the stored operating point."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .discover import Dataset, Sample, discover
from .errors import DataError
from .outputs import REPORT_FILES, check_output_dir, claim, model_labels
from .predict import Model, Prediction, predict_files
from .progress import Progress, resolve
from .validate import evaluate_arguments


@dataclass
class EvalResult:
    metrics: dict  # {'all': report, 'accepted': report or None, 'in_distribution': ..., 'n_rejected': int, ...}
    predictions: list[Prediction]
    true_labels: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    output_dir: Path | None = None
    model_card: Path | None = None  # MODEL_CARD.md the evaluation was appended to
    notes: list[str] = field(default_factory=list)


def _report(model: Model, y_true: list[str], preds: list[Prediction]) -> dict:
    """The figures at the operating point. A refused image (no scores) counts as not flagged: for a triage
    tool a film it would not read is a film it did not flag."""
    from .metrics import (binary_report, multiclass_report, who_assessment, who_verdict,  # scikit-learn: when scoring
                          with_sample_warning)

    labels = model.labels
    if model.threshold is None and any(p.ood for p in preds):
        raise DataError("figures on all images need a binary model when some were refused (no scores)")
    P = np.array([[p.scores.get(lab, 0.0) for lab in labels] for p in preds])
    if model.threshold is not None:
        pos = model.positive_label
        rep = binary_report(np.array([t == pos for t in y_true], int), P[:, labels.index(pos)], model.threshold)
        rep["who_verdict"], rep["who_status"] = who_verdict(rep), who_assessment(rep)["verdict"]
    else:
        rep = multiclass_report(np.array([labels.index(t) for t in y_true]), P, labels)
    return with_sample_warning(rep)


def evaluate(model: Model | str | os.PathLike, data_dir: str | os.PathLike, *, label_from_name: str | None = None,
             label_map: dict | None = None, output: str | os.PathLike | None = None, ood: bool = True,
             progress: Progress | None = None, ray: str | None = None, workers: int | None = None) -> EvalResult:
    """Score every labelled image under ``data_dir`` and report metrics on all and on accepted images.

    Metrics are taken at the model's stored operating point: for a binary model sensitivity and
    specificity (with confidence intervals), ROC AUC and the WHO triage verdict; for more classes
    accuracy and per-class figures. ``all`` counts a refused image (not a chest X-ray: no scores) as not
    flagged; ``accepted`` repeats the figures without the refused images, ``in_distribution`` also without
    the films warned as unlike the training images (shift score); each is None when it would hold the same
    images as ``all``.

    Parameters
    ----------
    model : cxrlab.Model, str or os.PathLike
        A loaded model, or the model directory to load.
    data_dir : str or os.PathLike
        Labelled images: one subfolder per class (names among the model's labels), or a flat
        folder with ``label_from_name``.
    label_from_name : str or None
        Take the label from the file name instead of the folder: ``"nlm"`` (``_1`` abnormal,
        ``_0`` normal) or a regular expression with a ``(?P<label>...)`` group.
    label_map : dict of str to str, or None
        Renames the labels that ``label_from_name`` extracts (``{"1": "abnormal"}``).
    output : str, os.PathLike or None
        Folder for ``metrics.json``, ``predictions.csv`` and ``report.html``. None: write nothing.
        Refused, before any work, when it lies over, around or inside the data or the model.
    ood : bool
        Apply the chest X-ray check (refused images count in ``n_rejected``) and the shift warning
        (``n_shift``).
    progress : cxrlab.progress.Progress or None
        Progress reporter (``TqdmProgress`` for a bar); None: silent.
    ray : str or None
        Predict on a Ray cluster (``"auto"``, ``"local"`` or ``"HOST:PORT"``; ``pip install -e .[cluster]``).
        The figures are the same.
    workers : int or None
        With ``ray``: the model copies (Ray actors, one core each) that predict. None: one per core of the cluster.

    Returns
    -------
    EvalResult
        ``metrics`` (``all``, ``accepted``, ``in_distribution``, ``n_images``, ``n_skipped``,
        ``n_rejected``, ``n_shift``, ``internal_test``), ``predictions`` and ``true_labels`` of the scored images, ``skipped``
        (path, reason) of unreadable files, and ``output_dir``.

    Raises
    ------
    cxrlab.CxrlabError
        When the data hold a class the model does not know, no image is readable, or ``output``
        is unsafe.
    """
    evaluate_arguments(**locals())  # before the model is loaded or any image read
    inputs, classes = [getattr(model, "directory", model), data_dir], model_labels(model)
    if output is not None:  # before any work: never over, around or inside the data or the model
        check_output_dir(output, "evaluate", inputs=inputs, files=REPORT_FILES, classes=classes)
    cluster = None
    if ray:
        from .cluster import Cluster

        cluster = Cluster(ray, workers)  # joined (or refused in one line) before any image is read
    model = model if isinstance(model, Model) else Model(model)
    data_dir = Path(data_dir)
    ds = _labelled_images(model, data_dir, label_from_name, label_map)
    preds, truth, skipped = _score(model, data_dir, ds.samples, ood, resolve(progress), cluster)
    if not preds:
        raise DataError(f"{data_dir}: none of the images could be read")
    metrics = _metrics(model, truth, preds, skipped)
    result = EvalResult(metrics, preds, truth, skipped)
    if output is not None:
        claim(output, "evaluate", files=REPORT_FILES, inputs=inputs, classes=classes)
        _write_report(Path(output), model, data_dir, result)
        result.output_dir = Path(output)
        result.model_card = _append_to_card(model, data_dir, Path(output), metrics, result.notes)
    return result


def _append_to_card(model: Model, data_dir: Path, output: Path, metrics: dict, notes: list[str]) -> Path | None:
    """This evaluation appended to the model folder's MODEL_CARD.md; a model folder that cannot take it (read-only,
    not cxrlab's, a bare graph, a model in memory) keeps its card, with a note."""
    from .modelcard import record_evaluation
    from .modeldir import INFO_FILE
    from .outputs import OutputError

    on_disk = model.directory / INFO_FILE
    if not metrics.get("all") or not on_disk.is_file():
        return None
    try:
        if json.loads(on_disk.read_text(encoding="utf-8")).get("info_sha256") != model.info.get("info_sha256"):
            raise OutputError("its cxrlab.json changed since the model was loaded")
        return record_evaluation(model.directory, model.info, data=os.path.abspath(data_dir),
                                 report=os.path.abspath(output / "report.html"),
                                 figures=metrics["all"], n_rejected=metrics.get("n_rejected", 0))
    except (OSError, ValueError, OutputError) as exc:
        notes.append(f"the model card in {model.directory} was not updated: {exc}")
        return None


def _labelled_images(model: Model, data_dir: Path, label_from_name: str | None, label_map: dict | None) -> Dataset:
    """The labelled images under ``data_dir``; every class must be one of the model's labels."""
    ds = discover(data_dir, label_from_name=label_from_name, label_map=label_map, min_per_class=0, require_classes=1)
    unknown = sorted(set(ds.labels) - set(model.labels))
    if unknown:
        raise DataError(f"{data_dir}: class(es) {', '.join(unknown)} are not among the model's labels "
                        f"({', '.join(model.labels)}); rename the folders or use --label-from-name")
    return ds


def _score(model: Model, data_dir: Path, samples: list[Sample], ood: bool, progress: Progress, cluster=None):
    """(predictions, their true labels, (path, reason) of the unreadable files), on ``cluster`` (cluster.Cluster)
    when given."""
    paths = [str(data_dir / s.relpath) for s in samples]
    every = predict_files(model, paths, ood=ood, progress=progress, title="evaluating", cluster=cluster)
    preds, truth, skipped = [], [], []
    for s, p in zip(samples, every):
        if p.error:
            skipped.append((p.path, p.error))
        else:
            preds.append(p)
            truth.append(s.label)
    return preds, truth, skipped


def _metrics(model: Model, truth: list[str], preds: list[Prediction], skipped: list) -> dict:
    """The figures on all readable images (refused = not flagged), on those the chest check accepted, on those
    like the training images (no shift warning), and the model's internal test figures."""
    metrics: dict = {"n_images": len(preds), "n_skipped": len(skipped),
                     "n_rejected": sum(bool(p.ood) for p in preds), "n_shift": sum(bool(p.shift) for p in preds)}
    subsets = {"all": lambda p: True, "accepted": lambda p: not p.ood,
               "in_distribution": lambda p: not p.ood and not p.shift}
    for name, keep in subsets.items():
        chosen = [(t, p) for t, p in zip(truth, preds) if keep(p)]
        if name != "all" and len(chosen) == len(preds):
            metrics[name] = None  # the same images as "all"
            continue
        try:
            if not chosen:
                raise DataError(f"no image is left in '{name}': every image was refused or warned")
            metrics[name] = _report(model, [t for t, _ in chosen], [p for _, p in chosen])
        except DataError as exc:
            metrics[name] = None
            metrics[f"{name}_note"] = str(exc)
    metrics["internal_test"] = model.info.get("metrics", {}).get("test")
    metrics["engine"] = model.engine.to_json()
    return metrics


def _write_report(out: Path, model: Model, data_dir: Path, result: EvalResult) -> None:
    """metrics.json, predictions.csv and report.html in ``out`` (already claimed)."""
    from .report import write_evaluation

    metrics, preds, truth = result.metrics, result.predictions, result.true_labels
    rows = [{"path": p.path, "true_label": t, "scores": [p.scores[lab] for lab in model.labels] if not p.ood else None,
             "predicted_label": p.label or "refused", "correct": p.label == t, "split": "external",
             "refused": p.ood_reason if p.ood else None, "shift_score": p.shift_score} for t, p in zip(truth, preds)]
    subsets = {title: metrics[key] for key, title in (
        ("all", "all images (refused = not flagged)"), ("accepted", "accepted as chest X-rays"),
        ("in_distribution", "like the training images (no shift warning)")) if metrics.get(key)}
    write_evaluation(out, title=f"Evaluation of {model.directory} on {data_dir}", rows=rows,
                     labels=model.labels, positive_label=model.positive_label, threshold=model.threshold,
                     metrics={**(metrics["all"] or {}), "positive_label": model.positive_label},  # for compare
                     rejected=[(p.path, p.ood_reason) for p in preds if p.ood],
                     reference_metrics=metrics["internal_test"], subsets=subsets if len(subsets) > 1 else None,
                     notes=[f"{path}: {reason}" for path, reason in result.skipped])
