"""Cross-validation: stratified, group-aware k folds, each running the recipe ``train`` ships (fit, calibrate on
validation + out-of-fold scores, operating point) so that the figures estimate the shipped model.

Per fold, the test fold is held out and the inner validation split (C, best epoch, calibration, operating point)
is a stratified fifth of the remaining groups. Frozen embeddings are computed once and cached.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .train_options import CV_POSITIVE_LABEL, DEFAULT_FOLDS
from .backbones import DEFAULT_BACKBONE
from .validate import cv_arguments, check_folds
from .discover import discover_sites
from .errors import DataError
from .fit import Splits
from .progress import Progress
from .split import Entry, assign_folds, group_key
from .training import Embedded, TrainOptions, embed_images, evaluate_split, fit_and_calibrate, resolve_positive_label

__all__ = ["assign_folds", "cross_validate", "fold_entries", "site_entries", "evaluate_entries"]

INNER_VALIDATION_FOLDS = 5  # the inner validation split is one fifth of the training folds' groups


def cross_validate(image_dir, *, folds: int = DEFAULT_FOLDS, backbone: str = DEFAULT_BACKBONE,
                   label_from_name: str | None = None, group_regex: str | None = None,
                   positive_label: str = CV_POSITIVE_LABEL, operating_point: str = "who", bottleneck_dir=None,
                   seed: int = 0, progress: Progress | None = None, precision: str = "auto", fine_tune: bool | None = None,
                   fine_tune_options=None, by_site: bool = False, runtime: str = "auto", ray: str | None = None,
                   workers: int | None = None, ray_device: str = "auto") -> dict:
    """Per-fold and mean ± sd AUC / accuracy / sensitivity / specificity of the model ``train`` would ship.

    ``image_dir``: a folder, or a list of folders (one per site; folds are then stratified by site and class).
    ``fine_tune``: None runs the default recipe, as ``train`` does (fine-tuning a registry backbone; slow).
    ``by_site``: leave-one-site-out instead of k folds: each site in turn is the test fold, the model trained
    on the others; its figures estimate how the recipe does at a hospital it has never seen.
    ``precision`` / ``runtime``: as ``train``'s (the engine that embeds and so measures every fold).
    ``ray``: embed (and fine-tune) on that Ray cluster (``auto``, ``local`` or ``HOST:PORT``) with ``workers``,
    fine-tuning on ``ray_device`` (``auto``: GPU workers when the cluster has GPUs, ``cpu``, ``gpu``)."""
    cv_arguments(**locals())  # before any image is read
    fine_tune, recipe_note = TrainOptions(backbone=backbone, precision=precision, fine_tune=fine_tune).recipe()
    ds = discover_sites(image_dir if isinstance(image_dir, (list, tuple)) else [image_dir],
                        label_from_name=label_from_name)
    root = ds.root
    if len(ds.labels) != 2 or positive_label not in ds.labels:
        raise DataError(f"cv needs two classes including '{positive_label}' (found {', '.join(ds.labels)}); set --positive-label")
    _check_fold_plan(ds.samples, folds, group_regex, by_site)
    options = TrainOptions(backbone=backbone, bottleneck_dir=bottleneck_dir, label_from_name=label_from_name,
                           group_regex=group_regex, positive_label=positive_label, operating_point=operating_point,
                           seed=seed, progress=progress, precision=precision, fine_tune=fine_tune,
                           fine_tune_options=fine_tune_options, runtime=runtime, ray=ray, workers=workers,
                           ray_device=ray_device)
    options.cluster()  # --ray: joined (or refused in one line) before any image is read
    frozen = embed_images(root, ds.samples, options, calibration_rows=ds.samples)
    samples = [s for s in ds.samples if s.relpath in frozen.vectors]
    _check_fold_plan(samples, folds, group_regex, by_site)  # unreadable images may leave too few
    plan = site_entries(samples, seed, group_regex) if by_site else fold_entries(samples, folds, seed, group_regex)
    per_fold = [{"fold": f, **({"site": _test_site(entries)} if by_site else {}),
                 **evaluate_entries(root, entries, frozen, options, ds.labels)} for f, entries in enumerate(plan)]
    summary = {k: {"mean": float(np.mean([r[k] for r in per_fold])), "sd": float(np.std([r[k] for r in per_fold], ddof=1))}
               for k in ("auc", "accuracy", "sensitivity", "specificity")}
    return {"folds": per_fold, "summary": summary, "n_images": len(samples), "by_site": by_site,
            "sites": ds.counts_by_site(), "skipped": [s.__dict__ for s in frozen.skipped],
            "backbone": frozen.backbone.id, "precision": frozen.backbone.precision, "seed": seed,
            "fine_tune": fine_tune, "notes": [recipe_note] if recipe_note else [],
            "calibration": "as train ships it (validation split + out-of-fold training scores for the linear head)"}


def _test_site(entries) -> str:
    return next(e.site for e in entries if e.split == "test")


def _check_fold_plan(samples, folds: int, group_regex, by_site: bool) -> None:
    if not by_site:
        check_folds(folds, _groups_by_label(samples, group_regex))
        return
    scorable = [site for site in sorted({s.site for s in samples})
                if len({s.label for s in samples if s.site == site}) == 2]
    if len({s.site for s in samples}) < 2 or not scorable:
        raise DataError("--by-site needs at least two sites (give one folder per site), and one of them with "
                        "both classes to be scored")


def _groups_by_label(samples, group_regex) -> dict[str, set]:
    groups: dict[str, set] = {}
    for s in samples:
        groups.setdefault(s.label, set()).add(group_key(s.relpath, group_regex))
    return groups


def fold_entries(samples, folds: int, seed: int = 0, group_regex: str | None = None):
    """Per fold, every sample as a manifest entry: the fold is 'test', a stratified fifth of the other
    groups 'validation', the rest 'train'. Folds are stratified by class within each site."""
    groups = [group_key(s.relpath, group_regex) for s in samples]
    strata = [f"{getattr(s, 'site', '')}|{s.label}" for s in samples]
    fold = assign_folds(groups, strata, folds, seed)
    inner = assign_folds(groups, strata, INNER_VALIDATION_FOLDS, seed + 1) == 0
    for f in range(folds):
        split = np.where(fold == f, "test", np.where(inner, "validation", "train"))
        yield [Entry(s.relpath, s.label, g, str(sp), getattr(s, "site", "")) for s, g, sp in zip(samples, groups, split)]


def site_entries(samples, seed: int = 0, group_regex: str | None = None):
    """Leave one site out: per site with both classes, the entries with that site 'test' and the other sites
    split into 'train' and a stratified fifth 'validation' (by site and class)."""
    groups = [group_key(s.relpath, group_regex) for s in samples]
    for site in sorted({s.site for s in samples}):
        if len({s.label for s in samples if s.site == site}) < 2:
            continue
        rest = [i for i, s in enumerate(samples) if s.site != site]
        inner = assign_folds([groups[i] for i in rest], [f"{samples[i].site}|{samples[i].label}" for i in rest],
                             INNER_VALIDATION_FOLDS, seed + 1) == 0
        split = dict(zip(rest, np.where(inner, "validation", "train")))
        yield [Entry(s.relpath, s.label, g, str(split.get(i, "test")), s.site)
                     for i, (s, g) in enumerate(zip(samples, groups))]


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
    return {"n": len(rows), "auc": test["auc"], "accuracy": test["accuracy"],  # at the operating point, as shipped
            "sensitivity": test["sensitivity"], "specificity": test["specificity"],
            "threshold": cal.operating_point.threshold}
