"""Cross-validation: stratified, group-aware k folds, each running the recipe ``train`` ships (fit, calibrate on
validation + out-of-fold scores, operating point) so that the figures estimate the shipped model.

Per fold, the test fold is held out and the inner validation split (C, best epoch, calibration, operating point)
is a stratified fifth of the remaining groups. Frozen embeddings are computed once and cached.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .train_options import CV_POSITIVE_LABEL, DEFAULT_FOLDS
from .backbones import DEFAULT_BACKBONE
from .validate import cv_arguments, check_folds
from .discover import discover
from .errors import DataError
from .fit import Splits
from .progress import Progress
from .split import Entry, assign_folds, group_key
from .training import Embedded, TrainOptions, embed_images, evaluate_split, fit_and_calibrate, resolve_positive_label

__all__ = ["assign_folds", "cross_validate", "fold_entries", "evaluate_entries"]

INNER_VALIDATION_FOLDS = 5  # the inner validation split is one fifth of the training folds' groups


def cross_validate(image_dir: str | os.PathLike, *, folds: int = DEFAULT_FOLDS, backbone: str = DEFAULT_BACKBONE,
                   label_from_name: str | None = None, group_regex: str | None = None, positive_label: str = CV_POSITIVE_LABEL,
                   operating_point: str = "who", bottleneck_dir=None, seed: int = 0,
                   progress: Progress | None = None, precision: str = "fp32", fine_tune: bool = False,
                   fine_tune_options=None) -> dict:
    """Per-fold and mean ± sd AUC / accuracy / sensitivity / specificity of the model ``train`` would ship."""
    cv_arguments(**locals())  # before any image is read
    root = Path(image_dir)
    ds = discover(root, label_from_name=label_from_name)
    if len(ds.labels) != 2 or positive_label not in ds.labels:
        raise DataError(f"cv needs two classes including '{positive_label}' (found {', '.join(ds.labels)}); set --positive-label")
    check_folds(folds, _groups_by_label(ds.samples, group_regex))
    options = TrainOptions(backbone=backbone, bottleneck_dir=bottleneck_dir, label_from_name=label_from_name,
                           group_regex=group_regex, positive_label=positive_label, operating_point=operating_point,
                           seed=seed, progress=progress, precision=precision, fine_tune=fine_tune,
                           fine_tune_options=fine_tune_options)
    frozen = embed_images(root, ds.samples, options, calibration_rows=ds.samples)
    samples = [s for s in ds.samples if s.relpath in frozen.vectors]
    check_folds(folds, _groups_by_label(samples, group_regex))  # unreadable images may leave too few
    per_fold = [{"fold": f, **evaluate_entries(root, entries, frozen, options, ds.labels)}
                for f, entries in enumerate(fold_entries(samples, folds, seed, group_regex))]
    summary = {k: {"mean": float(np.mean([r[k] for r in per_fold])), "sd": float(np.std([r[k] for r in per_fold], ddof=1))}
               for k in ("auc", "accuracy", "sensitivity", "specificity")}
    return {"folds": per_fold, "summary": summary, "n_images": len(samples),
            "skipped": [s.__dict__ for s in frozen.skipped], "backbone": frozen.backbone.id,
            "precision": frozen.backbone.precision, "seed": seed, "fine_tune": fine_tune,
            "calibration": "as train ships it (validation split + out-of-fold training scores for the linear head)"}


def _groups_by_label(samples, group_regex) -> dict[str, set]:
    groups: dict[str, set] = {}
    for s in samples:
        groups.setdefault(s.label, set()).add(group_key(s.relpath, group_regex))
    return groups


def fold_entries(samples, folds: int, seed: int = 0, group_regex: str | None = None):
    """Per fold, every sample as a manifest entry: the fold is 'test', a stratified fifth of the other groups
    'validation', the rest 'train'."""
    groups = [group_key(s.relpath, group_regex) for s in samples]
    labels = [s.label for s in samples]
    fold = assign_folds(groups, labels, folds, seed)
    inner = assign_folds(groups, labels, INNER_VALIDATION_FOLDS, seed + 1) == 0
    for f in range(folds):
        split = np.where(fold == f, "test", np.where(inner, "validation", "train"))
        yield [Entry(s.relpath, s.label, g, str(sp)) for s, g, sp in zip(samples, groups, split)]


def evaluate_entries(image_dir: Path, entries: list[Entry], frozen: Embedded, options: TrainOptions,
                     labels: list[str]) -> dict:
    """Fit, calibrate and threshold on the train/validation entries exactly as ``train`` does; score the test ones."""
    splits = Splits.of(entries, {lab: i for i, lab in enumerate(labels)}).keep(frozen.vectors)
    positive = resolve_positive_label(labels, options.positive_label, [])
    fit, cal = fit_and_calibrate(image_dir, splits, frozen, options, positive=positive)
    metrics, rows, _ = evaluate_split(fit, cal, splits.keep(fit.vectors), labels, positive)
    test = metrics.get("test")
    if test is None:
        raise DataError(f"{image_dir}: a test fold holds a single class; use fewer --folds")
    return {"n": len(rows), "auc": test["auc"], "accuracy": metrics["final_test_accuracy_argmax"],
            "sensitivity": test["sensitivity"], "specificity": test["specificity"],
            "threshold": cal.operating_point.threshold}
