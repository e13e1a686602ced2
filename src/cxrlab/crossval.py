"""Cross-validation: stratified, group-aware k folds over cached embeddings (the head is refitted per fold)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from . import validate
from .backbones import cache_dir, create_backbone
from .cache import EmbeddingStore
from .calibrate import TemperatureScaler, choose_operating_point, softmax
from .discover import discover
from .embed import Embedder
from .errors import DataError
from .head import LinearHead, select_C
from .metrics import binary_report, roc_auc
from .progress import Progress
from .split import group_key


def assign_folds(groups: list[str], labels: list[str], k: int, seed: int = 0) -> np.ndarray:
    """Each group goes to one fold; groups are dealt round-robin per class in a seeded hash order."""
    first_label = {}
    for g, lab in zip(groups, labels):
        first_label.setdefault(g, lab)
    fold_of = {}
    for lab in sorted(set(first_label.values())):
        members = sorted((g for g, l in first_label.items() if l == lab),
                         key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())
        for i, g in enumerate(members):
            fold_of[g] = i % k
    return np.array([fold_of[g] for g in groups])


def _groups_by_label(samples, group_regex) -> dict[str, set]:
    groups: dict[str, set] = {}
    for s in samples:
        groups.setdefault(s.label, set()).add(group_key(s.relpath, group_regex))
    return groups


def cross_validate(image_dir: str | os.PathLike, *, folds: int = 5, backbone: str = "efficientnet-lite0",
                   label_from_name: str | None = None, group_regex: str | None = None, positive_label: str = "abnormal",
                   operating_point: str = "who", bottleneck_dir=None, seed: int = 0,
                   progress: Progress | None = None, precision: str = "fp32") -> dict:
    """Per-fold and mean ± sd AUC / accuracy / sensitivity / specificity of the linear head."""
    validate.cv_arguments(**locals())  # before any image is read
    root = Path(image_dir)
    ds = discover(root, label_from_name=label_from_name)
    if len(ds.labels) != 2 or positive_label not in ds.labels:
        raise DataError(f"cv needs two classes including '{positive_label}' (found {', '.join(ds.labels)}); set --positive-label")
    validate.check_folds(folds, _groups_by_label(ds.samples, group_regex))
    bb = create_backbone(backbone)
    if precision != "fp32":
        from .precision import with_precision

        bb = with_precision(bb, precision, [root / s.relpath for s in ds.samples])
    store = EmbeddingStore(Path(bottleneck_dir) if bottleneck_dir else cache_dir() / "embeddings", bb.cache_key(), bb.spec.embed_dim)
    emb = Embedder(bb).embed_files([root / s.relpath for s in ds.samples], store=store, progress=progress)
    kept = {Path(p).relative_to(root).as_posix() for p in emb.paths}
    samples = [s for s in ds.samples if s.relpath in kept]
    validate.check_folds(folds, _groups_by_label(samples, group_regex))  # unreadable images may leave too few
    X = emb.vectors
    y = np.array([s.label == positive_label for s in samples], dtype=np.int64)
    groups = [group_key(s.relpath, group_regex) for s in samples]
    fold = assign_folds(groups, [s.label for s in samples], folds, seed)
    # Inner validation (C, calibration, threshold): a stratified fifth of the training folds' groups.
    inner_val = assign_folds(groups, [s.label for s in samples], 5, seed + 1) == 0
    per_fold = []
    for f in range(folds):
        test = fold == f
        tr, va = ~test & ~inner_val, ~test & inner_val
        C, _ = select_C(X[tr], y[tr], X[va], y[va], seed=seed)
        head = LinearHead(C=C, seed=seed).fit(X[tr], y[tr])
        T = TemperatureScaler().fit(head.decision_function(X[va]), y[va]).temperature_
        p_va = softmax(head.decision_function(X[va]) / T)[:, 1]
        op = choose_operating_point(y[va], p_va, operating_point)
        p_te = softmax(head.decision_function(X[test]) / T)[:, 1]
        rep = binary_report(y[test], p_te, op.threshold)
        per_fold.append({"fold": f, "n": int(test.sum()), "auc": roc_auc(y[test], p_te),
                         "accuracy": float(np.mean((p_te >= 0.5) == y[test])),
                         "sensitivity": rep["sensitivity"], "specificity": rep["specificity"], "threshold": op.threshold})
    summary = {k: {"mean": float(np.mean([r[k] for r in per_fold])), "sd": float(np.std([r[k] for r in per_fold], ddof=1))}
               for k in ("auc", "accuracy", "sensitivity", "specificity")}
    return {"folds": per_fold, "summary": summary, "n_images": len(samples), "skipped": [s.__dict__ for s in emb.skipped],
            "backbone": bb.id, "precision": bb.precision, "seed": seed}
