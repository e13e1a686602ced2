"""Train: folder -> model directory, calling each stage in order (discover, split, embed, fit,
calibrate, choose the operating point, evaluate, save)."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__, validate
from .backbones import cache_dir, create_backbone
from .cache import EmbeddingStore
from .calibrate import OperatingPoint, PlattScaler, TemperatureScaler, choose_operating_point, softmax
from .discover import discover
from .embed import Embedder, SkippedFile
from .errors import DataError
from .graph import fuse_head
from .head import AffineHead, LinearHead, StepInfo, select_C
from .metrics import binary_report, multiclass_report, who_verdict
from .modeldir import save_model
from .progress import Progress
from .split import Manifest, split_samples

OOF_FOLDS = 5  # folds for out-of-fold training scores used in calibration / operating point
OOD_SHIFT_IMAGES = 160  # training images whose site-shifted copies widen the OOD gate's notion of genuine
FLIP_WARNING = ("--flip_left_right mirrors chest X-rays: the heart and the lungs swap sides, which no real "
                "PA radiograph shows. Use it only if you know why.")


@dataclass
class TrainResult:
    model_dir: Path
    run_dir: Path
    labels: list[str]
    metrics: dict
    manifest: Manifest
    skipped: list[SkippedFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0
    misclassified: list[tuple[str, str, str]] = field(default_factory=list)  # (path, true, predicted)
    final_test_accuracy: float | None = None
    n_test: int = 0
    seconds: float | None = None  # wall time; kept out of metrics.json so that it is reproducible


def _positive_label(labels: list[str], positive_label: str | None, notes: list[str]) -> str | None:
    if positive_label:
        if positive_label not in labels:
            raise DataError(f"--positive-label {positive_label!r} is not one of the classes: {', '.join(labels)}")
        return positive_label
    if "abnormal" in labels:
        return "abnormal"
    if len(labels) == 2:
        notes.append(f"no class named 'abnormal': '{labels[1]}' is taken as the positive class (set --positive-label)")
        return labels[1]
    return None


def train(
    image_dir: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    backbone: str = "efficientnet-lite0",
    bottleneck_dir: str | os.PathLike | None = None,
    label_from_name: str | None = None,
    label_map: dict[str, str] | None = None,
    group_regex: str | None = None,
    split_file: str | os.PathLike | None = None,
    testing_percentage: float = 10.0,
    validation_percentage: float = 10.0,
    solver: str = "lbfgs",
    how_many_training_steps: int = 4000,
    learning_rate: float = 0.01,
    train_batch_size: int = 100,
    eval_step_interval: int = 10,
    validation_batch_size: int = 100,
    test_batch_size: int = -1,
    positive_label: str | None = None,
    operating_point: str = "who",
    robust_operating_point: bool = False,
    calibration: str = "auto",
    flip_left_right: bool = False,
    random_crop: float = 0.0,
    random_scale: float = 0.0,
    random_brightness: float = 0.0,
    distortion_copies: int = 4,
    ood: bool = True,
    report: bool = True,
    seed: int = 0,
    on_step: Callable[[StepInfo], None] | None = None,
    progress: Progress | None = None,
    fine_tune: bool = False,
    epochs: int = 8,
    fine_tune_options=None,
    on_epoch: Callable[[dict], None] | None = None,
    summaries_dir: str | os.PathLike | None = None,
    precision: str = "fp32",
    workers: int | None = None,
    batch_size: int = 32,
) -> TrainResult:
    """Train a classifier on the images under ``image_dir`` and save a model directory."""
    validate.train_arguments(**locals())  # every option and output path, before any image is read
    started = time.time()
    image_dir = Path(image_dir)
    dataset = discover(image_dir, label_from_name=label_from_name, label_map=label_map)
    notes = list(dataset.warnings)
    previous = Manifest.read(split_file) if split_file else None
    manifest, split_notes = split_samples(dataset.samples, validation_percentage=validation_percentage,
                                          testing_percentage=testing_percentage, group_regex=group_regex,
                                          previous=previous)
    notes += split_notes
    labels = dataset.labels
    if calibration == "platt" and len(labels) != 2:  # before any embedding or fine-tuning is spent
        raise DataError("Platt calibration needs exactly two labels; use calibration='temperature'")
    label_index = {lab: i for i, lab in enumerate(labels)}
    positive = _positive_label(labels, positive_label, notes)

    bb = create_backbone(backbone)
    if precision != "fp32":
        from .precision import with_precision

        bb = with_precision(bb, precision, [image_dir / e.relpath for e in manifest.subset("train")])
    store = EmbeddingStore(Path(bottleneck_dir) if bottleneck_dir else cache_dir() / "embeddings",
                           bb.cache_key(), bb.spec.embed_dim)
    embedder = Embedder(bb, batch_size=batch_size, workers=workers)
    entries = manifest.entries
    emb = embedder.embed_files([image_dir / e.relpath for e in entries], store=store, progress=progress)
    ok = {Path(p).relative_to(image_dir).as_posix(): v for p, v in zip(emb.paths, emb.vectors)}
    kept = [e for e in entries if e.relpath in ok]

    def arrays(split: str):
        rows = [e for e in kept if e.split == split]
        X = np.stack([ok[e.relpath] for e in rows]) if rows else np.zeros((0, bb.spec.embed_dim), np.float32)
        return X, np.array([label_index[e.label] for e in rows], dtype=np.int64), rows

    X_tr, y_tr, rows_tr = arrays("train")
    X_va, y_va, rows_va = arrays("validation")
    X_te, y_te, rows_te = arrays("test")
    if len(X_tr) == 0:
        raise DataError(f"{image_dir}: no usable training images after the split (all skipped or in val/test)")

    ft = None
    if fine_tune:  # end to end in torch; then the same calibration / operating point / OOD / export path
        from .finetune import FineTuneOptions, fine_tune_stage

        options = fine_tune_options or FineTuneOptions(epochs=epochs)
        ft = fine_tune_stage(bb, image_dir, rows_tr, y_tr, rows_va, y_va, kept, options=options, seed=seed,
                             progress=progress, on_epoch=on_epoch)
        bb, embedder, ok, store = ft.backbone, ft.embedder, ft.vectors, None  # never the frozen cache
        kept = [e for e in kept if e.relpath in ok]
        X_tr, y_tr, rows_tr = arrays("train")
        X_va, y_va, rows_va = arrays("validation")
        X_te, y_te, rows_te = arrays("test")

    distortions = {"flip_left_right": flip_left_right, "random_crop": random_crop,
                   "random_scale": random_scale, "random_brightness": random_brightness}
    if ft is not None:
        X_fit, y_fit = X_tr, y_tr
    elif any(distortions.values()):
        from .augment import distorted_embeddings

        if flip_left_right:
            notes.append(FLIP_WARNING)
        X_aug, y_aug = distorted_embeddings(embedder, [image_dir / e.relpath for e in rows_tr], y_tr,
                                            copies=distortion_copies, seed=seed, progress=progress, **distortions)
        X_fit, y_fit = np.concatenate([X_tr, X_aug]), np.concatenate([y_tr, y_aug])
    else:
        X_fit, y_fit = X_tr, y_tr

    C, c_search = (1.0, [])
    if ft is not None:
        solver = "fine-tune"
    elif solver == "lbfgs":
        C, c_search = select_C(X_fit, y_fit, X_va, y_va, seed=seed, steps=how_many_training_steps)
    curve: list[dict] = []

    def record(info: StepInfo):
        curve.append(info.__dict__.copy())
        if on_step is not None:
            on_step(info)

    if ft is not None:
        head = ft.head
        for row in [r for r in ft.info["history"] if "loss" in r]:  # the tutorial's Step lines, one per epoch
            record(StepInfo(row["epoch"], row["train_accuracy"], row["loss"], row.get("val_accuracy"),
                            len(y_va), row.get("val_loss")))
    else:
        head = LinearHead(solver=solver, C=C, learning_rate=learning_rate, steps=how_many_training_steps,
                          batch_size=train_batch_size, eval_step_interval=eval_step_interval,
                          validation_batch_size=validation_batch_size, seed=seed)
        head.fit(X_fit, y_fit, X_val=X_va, y_val=y_va, on_step=record)

    # Calibration and operating point, decided before looking at test: on the validation split, plus
    # out-of-fold scores of the training images where the head is cheap to refit (a threshold at 90%
    # sensitivity set on ~40 validation positives alone moves a lot from one split to the next).
    Z_cal, y_cal = (head.decision_function(X_va), y_va) if len(X_va) else (np.zeros((0, len(labels))), y_va)
    cal_source = "validation split"
    if ft is None and X_fit is X_tr and len(np.unique(y_tr)) >= 2:
        Z_oof = _out_of_fold_logits(X_tr, y_tr, [e.relpath for e in rows_tr], [e.label for e in rows_tr], head, seed,
                                    group_regex)
        Z_cal, y_cal = np.concatenate([Z_oof, Z_cal]), np.concatenate([y_tr, y_va])
        cal_source = f"validation split + out-of-fold training scores ({OOF_FOLDS} folds)"
    if calibration == "auto":  # a fine-tuned network's logits can be shifted as well as over-confident
        calibration = "platt" if ft is not None and len(labels) == 2 else "temperature"
    temperature, platt = 1.0, None
    usable = len(Z_cal) and len(np.unique(y_cal)) >= 2
    if calibration == "platt" and usable:
        platt = PlattScaler().fit(Z_cal[:, 1] - Z_cal[:, 0], y_cal)
        if platt.a_ > 0:
            head = AffineHead(head, platt.a_, platt.b_)  # folded into the exported head: one contract for predict
            Z_cal = head.rescale(Z_cal)
        else:  # scores anti-correlated with the labels on validation: a warning sign, not something to fold in
            notes.append(f"Platt calibration gave slope {platt.a_:.3g} <= 0 on validation; calibration skipped")
            platt = None
    elif calibration == "temperature" and usable:
        temperature = float(TemperatureScaler().fit(Z_cal, y_cal).temperature_)
    elif calibration != "none":
        notes.append(f"no usable validation split: calibration skipped ({calibration} not fitted)")

    def probs(X):
        return softmax(head.decision_function(X) / temperature) if len(X) else np.zeros((0, len(labels)))

    digest_of = {Path(p).relative_to(image_dir).as_posix(): d for p, d in zip(emb.paths, emb.digests)}
    op: OperatingPoint | None = None
    op_source = cal_source
    if positive is not None and len(labels) == 2:
        pos = label_index[positive]
        Z_op, y_op = Z_cal, y_cal
        if robust_operating_point and len(np.unique(y_va)) == 2:
            # Opt-in: the threshold chosen on the validation images under simulated site shifts as well. Measured
            # on a fine-tuned Shenzhen model it is far too conservative (threshold 0.39 -> 0.13, test specificity
            # 82% -> 46%): resolution loss and JPEG move the scores most, so it is off by default.
            from .augment import SITE_SHIFTS, site_shift_embeddings

            for k in range(len(labels)):
                rows_k = [e for e, yy in zip(rows_va, y_va) if yy == k]
                X_k = site_shift_embeddings(embedder, [image_dir / e.relpath for e in rows_k],
                                            [digest_of[e.relpath] for e in rows_k], store=store, progress=progress)
                Z_op = np.concatenate([Z_op, head.decision_function(X_k)])
                y_op = np.concatenate([y_op, np.full(len(X_k), k)])
            op_source = f"{cal_source} + the validation images under {len(SITE_SHIFTS)} simulated site shifts"
        if len(Z_op) and len(np.unique(y_op)) == 2:
            op = choose_operating_point((y_op == pos).astype(int), softmax(Z_op / temperature)[:, pos], operating_point)
            if op.note:
                notes.append(op.note)
        else:
            op = OperatingPoint("argmax", 0.5, float("nan"), float("nan"), False,
                                "validation split has fewer than 2 classes; threshold 0.5 used")
            notes.append(op.note)

    # Test evaluation: the tutorial's argmax accuracy plus the clinical report at the operating point.
    if 0 < test_batch_size < len(X_te):
        pick = np.sort(np.random.default_rng(seed).choice(len(X_te), test_batch_size, replace=False))
        X_te, y_te, rows_te = X_te[pick], y_te[pick], [rows_te[i] for i in pick]
    P_te = probs(X_te)
    metrics: dict = {"n": {s: int(n) for s, n in zip(("train", "validation", "test"), (len(X_tr), len(X_va), len(X_te)))}}
    final_acc = float(np.mean(P_te.argmax(1) == y_te)) if len(X_te) else None
    metrics["final_test_accuracy_argmax"] = final_acc
    if len(X_te) and len(np.unique(y_te)) >= 2:
        if op is not None:
            pos = label_index[positive]
            metrics["test"] = binary_report((y_te == pos).astype(int), P_te[:, pos], op.threshold)
            metrics["test"]["who_verdict"] = who_verdict(metrics["test"])
            P_uncal = softmax(getattr(head, "raw", head).decision_function(X_te))[:, pos]
            metrics["test"]["ece_uncalibrated"] = binary_report((y_te == pos).astype(int), P_uncal, op.threshold)["ece"]
        else:
            metrics["test"] = multiclass_report(y_te, P_te, labels)
    elif len(X_te):
        notes.append("the test split holds a single class: ROC AUC and sensitivity/specificity cannot be computed")
    misclassified = [(str(image_dir / r.relpath), r.label, labels[int(k)])
                     for r, k, t in zip(rows_te, P_te.argmax(1) if len(X_te) else [], y_te) if k != t]

    run_dir, model_dir = _output_dirs(output)
    info = {
        "created_by": f"cxrlab {__version__}",
        "task": "classification",
        "labels": labels,
        "positive_label": positive,
        "backbone": {**bb.spec.to_dict(), "id": bb.id, "weights_sha256": bb.weights_sha256, "onnx_outputs": list(bb.outputs),
                     "precision": bb.precision, "calibration_sha256": bb.calibration_sha256},
        "head": {"type": "linear-softmax", "solver": solver, "C": C, "n_iter": head.n_iter_, "C_search": c_search},
        "calibration": {"method": "platt" if platt else calibration if temperature != 1.0 else "none",
                        "temperature": temperature,
                        **({"platt_a": platt.a_, "platt_b": platt.b_, "folded_into_head": True} if platt else {}),
                        "data": cal_source, "n": int(len(y_cal))},
        "operating_point": {**op.to_dict(), "data": op_source} if op else None,
        "split": {"manifest_sha256": manifest.digest(), "counts": manifest.counts(),
                  "validation_percentage": validation_percentage, "testing_percentage": testing_percentage,
                  "group_regex": group_regex, "label_from_name": label_from_name},
        "training_data": {"image_dir_name": image_dir.resolve().name, "counts": dataset.counts(),
                          "n_skipped": len(emb.skipped)},
        "seed": seed,
        "flags": {"how_many_training_steps": how_many_training_steps, "learning_rate": learning_rate,
                  "train_batch_size": train_batch_size, "eval_step_interval": eval_step_interval,
                  "validation_batch_size": validation_batch_size, "test_batch_size": test_batch_size,
                  "operating_point": operating_point, **distortions, "distortion_copies": distortion_copies},
        "metrics": metrics,
        "versions": _versions(),
    }
    if ft is not None:
        info["fine_tune"] = ft.info
        info["head"] = {"type": "linear-softmax", "solver": "fine-tune", "trained_with_backbone": True}
        if any(distortions.values()):
            notes.append("fine-tuning uses its own augmentation (--ft augment.*); the tutorial's distortion flags were ignored")
    arrays_out: dict[str, bytes] = {}
    if ood:
        from .ood import fit_gate

        from .augment import site_shift_embeddings

        sample = rows_tr[:: max(1, len(rows_tr) // OOD_SHIFT_IMAGES)][:OOD_SHIFT_IMAGES]
        X_shift = site_shift_embeddings(embedder, [image_dir / e.relpath for e in sample],
                                        [digest_of[e.relpath] for e in sample], store=store, progress=progress)
        gate = fit_gate(bb, np.concatenate([X_tr, X_shift]), X_va)
        info["ood"], arrays_out = gate.info(), gate.arrays()
    onnx_bytes = fuse_head(bb.onnx_path, head.coef_, head.intercept_, temperature=temperature,
                           metadata={"labels": json.dumps(labels), "producer": "cxrlab"})
    save_model(model_dir, onnx_bytes=onnx_bytes, labels=labels, info=info, arrays=arrays_out)
    manifest.write(run_dir / "split.csv")
    result = TrainResult(model_dir, run_dir, labels, metrics, manifest, emb.skipped, notes, emb.hits, emb.misses,
                         misclassified, final_acc, len(X_te))
    result.metrics["training_curve"] = curve
    result.seconds = round(time.time() - started, 2)
    if summaries_dir:
        write_tensorboard(summaries_dir, curve, metrics, notes)
    if report:
        from .report import write_run_report

        write_run_report(result, image_dir, entries=kept, probs_by_relpath=_all_probs(kept, ok, probs), info=info)
    return result


def _out_of_fold_logits(X, y, relpaths, labels, head: LinearHead, seed: int, group_regex) -> np.ndarray:
    """Logits of each training image from a head refitted without its (patient-grouped) fold."""
    from .crossval import assign_folds
    from .split import group_key

    folds = assign_folds([group_key(r, group_regex) for r in relpaths], labels, OOF_FOLDS, seed)
    Z = np.zeros((len(X), head.n_classes_))
    for f in range(OOF_FOLDS):
        held = folds == f
        if held.all() or len(np.unique(y[~held])) < 2:
            return head.decision_function(X)  # too few images to refit: in-sample (optimistic) scores
        fold_head = LinearHead(solver=head.solver, C=head.C, learning_rate=head.learning_rate, steps=head.steps,
                               batch_size=head.batch_size, seed=seed).fit(X[~held], y[~held],
                                                                          init=getattr(head, "theta_", None))
        Z[held] = fold_head.decision_function(X[held])
    return Z


def write_tensorboard(summaries_dir, curve: list[dict], metrics: dict, notes: list[str]) -> None:
    """The tutorial's --summaries_dir: training curves and test metrics as TensorBoard scalars (optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        notes.append("--summaries_dir needs the optional tensorboard package: pip install tensorboard")
        return
    with SummaryWriter(str(summaries_dir)) as writer:
        for row in curve:
            for key in ("train_accuracy", "cross_entropy", "validation_accuracy", "validation_cross_entropy"):
                if row.get(key) is not None:
                    writer.add_scalar(key, row[key], row["step"])
        for key, value in (metrics.get("test") or {}).items():
            if isinstance(value, float):
                writer.add_scalar(f"test/{key}", value, 0)


def _all_probs(rows, vectors: dict, probs) -> dict[str, np.ndarray]:
    if not rows:
        return {}
    P = probs(np.stack([vectors[e.relpath] for e in rows]))
    return {e.relpath: p for e, p in zip(rows, P)}


def _output_dirs(output) -> tuple[Path, Path]:
    if output is None:
        run_dir = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        return run_dir, run_dir / "model"
    model_dir = Path(output)
    return model_dir, model_dir


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {"cxrlab": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
