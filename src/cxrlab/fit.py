"""Fit: the one result of both training pipelines (linear head on cached embeddings, or fine-tuning), and the
linear-head pipeline itself. Calibration and the operating point (calibrate.py) take a ``Fit`` whichever made it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .head import HeadOptions, LinearHead, StepInfo, select_C
from .progress import Progress
from .split import Entry, assign_folds, group_key

OOF_FOLDS = 5  # folds for out-of-fold training scores used in calibration / operating point
FLIP_WARNING = ("--flip_left_right mirrors chest X-rays: the heart and the lungs swap sides, which no real "
                "PA radiograph shows. Use it only if you know why.")


@dataclass
class Splits:
    """The usable manifest entries of each split and the class index of every label."""

    train: list[Entry]
    validation: list[Entry]
    test: list[Entry]
    label_index: dict[str, int]

    @classmethod
    def of(cls, entries, label_index: dict[str, int]) -> "Splits":
        return cls(*([e for e in entries if e.split == s] for s in ("train", "validation", "test")), label_index)

    def y(self, rows: list[Entry]) -> np.ndarray:
        return np.array([self.label_index[e.label] for e in rows], dtype=np.int64)

    def keep(self, vectors: dict) -> "Splits":
        """Only the entries that have an embedding."""
        return Splits(*([e for e in rows if e.relpath in vectors] for rows in (self.train, self.validation, self.test)),
                      self.label_index)


@dataclass
class Fit:
    """A trained head and what calibration needs, never touching the test split."""

    backbone: object  # backbones.Backbone the head sits on (a fine-tuned graph after fine-tuning)
    embedder: object  # embed.Embedder of that backbone
    store: object | None  # embedding cache of that backbone; None for a fine-tuned graph
    vectors: dict[str, np.ndarray]  # relpath -> embedding, every usable image
    head: object  # LinearHead or finetune.FineTunedHead: coef_, intercept_, decision_function
    curve: list[dict]  # the tutorial's Step figures (one row per step or epoch)
    cal_logits: np.ndarray  # logits calibration and the operating point are chosen on
    cal_labels: np.ndarray
    cal_source: str
    head_info: dict  # cxrlab.json's "head"
    fine_tune_info: dict | None = None
    notes: list[str] = field(default_factory=list)
    network: object | None = None  # the fine-tuned torch module (None for the linear head)

    @property
    def fine_tuned(self) -> bool:
        return self.fine_tune_info is not None

    def X(self, rows: list[Entry]) -> np.ndarray:
        if not rows:
            return np.zeros((0, self.backbone.spec.embed_dim), np.float32)
        return np.stack([self.vectors[e.relpath] for e in rows])


def curve_recorder(on_step: Callable[[StepInfo], None] | None):
    """(curve, record): ``record`` appends a StepInfo to ``curve`` and forwards it to ``on_step``."""
    curve: list[dict] = []

    def record(info: StepInfo):
        curve.append(info.__dict__.copy())
        if on_step is not None:
            on_step(info)

    return curve, record


def fit_linear(backbone, embedder, store, vectors: dict, splits: Splits, image_dir: Path, *,
               options: HeadOptions, distortions: dict, distortion_copies: int = 4, group_regex=None,
               seed: int = 0, on_step=None, progress: Progress | None = None) -> Fit:
    """The tutorial's new final layer on cached embeddings: C chosen on validation, then out-of-fold training
    scores join the validation scores for calibration (a threshold at 90% sensitivity set on ~40 validation
    positives alone moves a lot from one split to the next)."""
    fit = Fit(backbone, embedder, store, vectors, None, [], None, None, "validation split", {})
    X_tr, y_tr = fit.X(splits.train), splits.y(splits.train)
    X_va, y_va = fit.X(splits.validation), splits.y(splits.validation)
    X_fit, y_fit = X_tr, y_tr
    if any(distortions.values()):
        from .augment import distorted_embeddings

        if distortions.get("flip_left_right"):
            fit.notes.append(FLIP_WARNING)
        X_aug, y_aug = distorted_embeddings(embedder, [image_dir / e.relpath for e in splits.train], y_tr,
                                            copies=distortion_copies, seed=seed, progress=progress, **distortions)
        X_fit, y_fit = np.concatenate([X_tr, X_aug]), np.concatenate([y_tr, y_aug])
    C, c_search = (1.0, [])
    if options.solver == "lbfgs":
        C, c_search = select_C(X_fit, y_fit, X_va, y_va, seed=seed, steps=options.steps)
    fit.curve, record = curve_recorder(on_step)
    fit.head = LinearHead(C=C, seed=seed, **options.to_kwargs()).fit(X_fit, y_fit, X_val=X_va, y_val=y_va,
                                                                      on_step=record)
    fit.head_info = {"type": "linear-softmax", "solver": options.solver, "C": C, "n_iter": fit.head.n_iter_,
                     "C_search": c_search}
    fit.cal_logits, fit.cal_labels = fit.head.decision_function(X_va), y_va
    if X_fit is X_tr and len(np.unique(y_tr)) >= 2:
        Z_oof = out_of_fold_logits(X_tr, y_tr, splits.train, fit.head, seed, group_regex)
        fit.cal_logits, fit.cal_labels = np.concatenate([Z_oof, fit.cal_logits]), np.concatenate([y_tr, y_va])
        fit.cal_source = f"validation split + out-of-fold training scores ({OOF_FOLDS} folds)"
    return fit


def out_of_fold_logits(X, y, rows: list[Entry], head: LinearHead, seed: int, group_regex) -> np.ndarray:
    """Logits of each training image from a head refitted without its (patient-grouped) fold."""
    groups = [group_key(e.relpath, group_regex) for e in rows]
    if len(set(groups)) < OOF_FOLDS:
        return head.decision_function(X)  # too few images to refit: in-sample (optimistic) scores
    folds = assign_folds(groups, y, OOF_FOLDS, seed)
    Z = np.zeros((len(X), head.n_classes_))
    for f in range(OOF_FOLDS):
        held = folds == f
        if held.all() or len(np.unique(y[~held])) < 2:
            return head.decision_function(X)
        fold_head = LinearHead(solver=head.solver, C=head.C, learning_rate=head.learning_rate, steps=head.steps,
                               batch_size=head.batch_size, seed=seed).fit(X[~held], y[~held],
                                                                          init=getattr(head, "theta_", None))
        Z[held] = fold_head.decision_function(X[held])
    return Z
