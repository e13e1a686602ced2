"""Train: folder -> model directory. ``train`` reads as the recipe (discover, split, embed, fit, calibrate and
choose the operating point, evaluate on test, OOD gate, save); each decision lives in its stage's module.
``fit_and_calibrate`` and ``evaluate_split`` are the steps `cxrlab cv` repeats per fold, so that its figures
estimate the model that ``train`` ships."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .backbones import cache_dir, create_backbone
from .cache import EmbeddingStore
from .calibrate import Calibrated, calibrate_and_threshold, check_calibration, softmax
from .discover import Dataset, discover_sites
from .embed import Embedder, SkippedFile
from .errors import DataError, ImageError
from .fit import Fit, Splits, fit_linear
from .graph import fuse_head
from .head import StepInfo
from .metrics import test_report
from .modeldir import model_info, save_model
from .outputs import RUN_FILES, OutputError, check_not_input, check_output_dir, claim, folder_classes, run_dir_for
from .progress import Progress
from .split import Manifest, split_samples
from .train_options import TrainOptions
from .validate import train_arguments

if TYPE_CHECKING:
    from .finetune import FineTuneOptions

CHEST_CHECK_IMAGES = 100  # validation and test images the chest check is tried on before it is switched on
CHEST_CHECK_MIN_ACCEPTED = 0.8  # below this share of the user's own images accepted, the check stays off
OOD_SHIFT_IMAGES = 160  # training images whose site-shifted copies widen the OOD gate's notion of genuine


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
    misclassified: list[tuple[str, str, str]] = field(default_factory=list)  # (path, true, shipped decision)
    final_test_accuracy: float | None = None  # at the shipped operating point (argmax for a multi-class model)
    n_test: int = 0
    seconds: float | None = None  # wall time; kept out of metrics.json so that it is reproducible
    final_test_accuracy_argmax: float | None = None  # the tutorial's figure: the highest score wins (0.5 if binary)
    report_path: Path | None = None  # report.html in the run folder, when written


_DEFAULT = TrainOptions()  # train()'s keyword defaults are read from here: written once


def train(
    image_dir: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    output: str | os.PathLike | None = _DEFAULT.output,
    backbone: str = _DEFAULT.backbone,
    bottleneck_dir: str | os.PathLike | None = _DEFAULT.bottleneck_dir,
    label_from_name: str | None = _DEFAULT.label_from_name,
    label_map: dict[str, str] | None = _DEFAULT.label_map,
    group_regex: str | None = _DEFAULT.group_regex,
    split_file: str | os.PathLike | None = _DEFAULT.split_file,
    testing_percentage: float = _DEFAULT.testing_percentage,
    validation_percentage: float = _DEFAULT.validation_percentage,
    solver: str = _DEFAULT.solver,
    how_many_training_steps: int = _DEFAULT.how_many_training_steps,
    learning_rate: float = _DEFAULT.learning_rate,
    train_batch_size: int = _DEFAULT.train_batch_size,
    eval_step_interval: int = _DEFAULT.eval_step_interval,
    validation_batch_size: int = _DEFAULT.validation_batch_size,
    test_batch_size: int = _DEFAULT.test_batch_size,
    positive_label: str | None = _DEFAULT.positive_label,
    operating_point: str = _DEFAULT.operating_point,
    robust_operating_point: bool = _DEFAULT.robust_operating_point,
    calibration: str = _DEFAULT.calibration,
    flip_left_right: bool = _DEFAULT.flip_left_right,
    random_crop: float = _DEFAULT.random_crop,
    random_scale: float = _DEFAULT.random_scale,
    random_brightness: float = _DEFAULT.random_brightness,
    distortion_copies: int = _DEFAULT.distortion_copies,
    ood: bool = _DEFAULT.ood,
    shift_reference: bool = _DEFAULT.shift_reference,
    report: bool = _DEFAULT.report,
    seed: int = _DEFAULT.seed,
    on_step: Callable[[StepInfo], None] | None = _DEFAULT.on_step,
    progress: Progress | None = _DEFAULT.progress,
    fine_tune: bool = _DEFAULT.fine_tune,
    epochs: int = _DEFAULT.epochs,
    fine_tune_options: FineTuneOptions | None = _DEFAULT.fine_tune_options,
    on_epoch: Callable[[dict], None] | None = _DEFAULT.on_epoch,
    summaries_dir: str | os.PathLike | None = _DEFAULT.summaries_dir,
    precision: str = _DEFAULT.precision,
    runtime: str = _DEFAULT.runtime,
    workers: int | None = _DEFAULT.workers,
    batch_size: int = _DEFAULT.batch_size,
    ray: str | None = _DEFAULT.ray,
    ray_device: str = _DEFAULT.ray_device,
) -> TrainResult:
    """Train a classifier on the images under ``image_dir`` and save a model directory.

    The recipe: discover the images, split them (train / validation / test), embed them with a
    pretrained backbone (cached), fit a linear head (or fine-tune end to end), calibrate and choose
    the operating point on validation, evaluate on test, fit the out-of-distribution gate, save.

    Parameters
    ----------
    image_dir : str, os.PathLike, or a list of them
        Folder with one subfolder per class (``lungs/normal``, ``lungs/abnormal``), or a flat folder
        with ``label_from_name``. Several folders: one per site (hospital), trained on together; each
        is split in the same proportions and every figure is also given per site. A ``.csv`` file with
        columns ``path,label[,site]`` may stand for a folder.
    output : str, os.PathLike or None
        Model directory to write: the deployable model files only. The run's report, predictions, metrics
        and split go into the run folder beside it, ``<output>.run/``. None: ``runs/<timestamp>/model``,
        with the run's files in ``runs/<timestamp>/``.
    backbone : str
        ``efficientnet-lite0`` / ``-lite1`` / ``-lite2``, ``inception-v3`` (see
        :func:`cxrlab.list_backbones`) or ``onnx:PATH`` for your own ONNX feature extractor.
    bottleneck_dir : str, os.PathLike or None
        Embedding cache folder. None: the per-user cache (``CXRLAB_CACHE_DIR``).
    label_from_name : str or None
        Take the label from the file name instead of the folder: ``"nlm"`` (``_1`` abnormal, ``_0``
        normal) or a regular expression with a ``(?P<label>...)`` group.
    label_map : dict of str to str, or None
        Renames the labels that ``label_from_name`` extracts (``{"1": "abnormal"}``).
    group_regex : str or None
        Regular expression on the relative path whose ``(?P<group>...)`` group names the patient;
        one patient's images then stay in one split.
    split_file : str, os.PathLike or None
        A split manifest (``split.csv`` of an earlier run) to reuse; new images are assigned afresh.
    testing_percentage : float
        Percentage of the images held out for the test figures.
    validation_percentage : float
        Percentage used for calibration, the operating point and model selection.
    solver : str
        ``"lbfgs"``: regularised logistic regression; ``"sgd"``: the retrain tutorial's
        mini-batch gradient descent.
    how_many_training_steps : int
        Iterations of the solver.
    learning_rate : float
        Learning rate of the ``"sgd"`` solver.
    train_batch_size : int
        Images per step of the ``"sgd"`` solver.
    eval_step_interval : int
        Steps between two ``on_step`` reports (training and validation accuracy).
    validation_batch_size : int
        Validation images measured at each report (-1: all).
    test_batch_size : int
        Test images scored for the final figures (-1: all).
    positive_label : str or None
        The class that counts as positive for a binary model. None: ``"abnormal"`` when present,
        else the second class (with a note).
    operating_point : str
        Rule for the decision threshold, chosen on validation: ``"who"`` (sensitivity >= 90%,
        then the best specificity), ``"youden"``, ``"argmax"``, ``"sensitivity=0.9"`` or
        ``"specificity=0.7"`` (a fraction, or a percentage with ``%``).
    robust_operating_point : bool
        Choose the threshold on the validation images under simulated site shifts as well (more
        conservative).
    calibration : str
        ``"auto"`` (Platt for a fine-tuned binary model, else temperature), ``"temperature"``,
        ``"platt"`` or ``"none"``.
    flip_left_right : bool
        The tutorial's distortion: random horizontal flips of the training images.
    random_crop : float
        The tutorial's distortion: percentage of random cropping margin.
    random_scale : float
        The tutorial's distortion: percentage of random enlargement.
    random_brightness : float
        The tutorial's distortion: percentage of random brightness change.
    distortion_copies : int
        Distorted copies of each training image when a distortion is on.
    ood : bool
        Keep the frontal-chest-X-ray check (pictures it refuses get no scores) and fit the shift reference
        (``shift_reference``). False: the model scores every image.
    shift_reference : bool
        Fit the shift reference behind the "unlike the training images" warning, on the training images and
        site-shifted copies of up to 160 of them. Embedding those copies is the slowest step of a head-only run
        with a slow backbone (most of ``retrain``'s time with Inception v3); they are cached for later runs on the
        same images. False (``--no-shift-reference``): the chest X-ray check stays, the warning is never given.
    report : bool
        Write ``report.html``, ``metrics.json`` and ``predictions.csv`` into the run folder.
    seed : int
        Seed of every random choice; the same seed and data give the same model.
    on_step : callable or None
        Called with a :class:`cxrlab.head.StepInfo` at each evaluation step (the tutorial's lines).
    progress : cxrlab.progress.Progress or None
        Progress reporter (``TqdmProgress`` for bars); None: silent.
    fine_tune : bool or None
        None (default): the measured best recipe, fine-tuning the backbone end to end in torch, for a
        registry backbone at fp32 precision; else the linear head. True: fine-tune (an error where it
        cannot). False: the tutorial's linear head on frozen embeddings (``--head-only``, fast).
    epochs : int
        Fine-tuning epochs when ``fine_tune_options`` is None.
    fine_tune_options : cxrlab.finetune.FineTuneOptions or None
        Every fine-tuning choice. None: ``FineTuneOptions(epochs=epochs)``.
    on_epoch : callable or None
        Called with each fine-tuning epoch's row (``epoch``, ``loss``, ``val_auc``, ...).
    summaries_dir : str, os.PathLike or None
        Also write TensorBoard scalars here (needs the ``tensorboard`` package).
    precision : str
        ``"auto"`` (bf16 on a CPU with native bf16 for a backbone whose cross-validated AUC it kept, else fp32),
        ``"fp32"``, ``"bf16"`` (OpenVINO; refused on a CPU without native bf16), or ``"int8"`` for a quantised
        backbone calibrated on training images (linear head only).
    runtime : str
        The engine that embeds the images: ``"auto"`` (OpenVINO for bf16, else ONNX Runtime), ``"openvino"`` or
        ``"onnxruntime"``. cxrlab.json records it (``runtime.trained_with``) with a bf16 parity check of the saved
        model on the test split (``runtime.bf16``), which decides whether predict runs it in bf16 by default.
    workers : int or None
        Decoding threads. None: up to 4, one per core. With ``ray``: the Ray workers that embed (one core
        each) and that fine-tune (data-parallel); None: one per core of the cluster (one per GPU when
        fine-tuning on GPUs, see ``ray_device``).
    batch_size : int
        Images per inference batch while embedding.
    ray : str or None
        Run the embedding and fine-tuning on a Ray cluster (needs ``pip install -e .[cluster]``): ``"auto"``
        (the ``RAY_ADDRESS`` cluster or the one started here with ``ray start --head``), ``"local"`` (start one
        for this run) or ``"HOST:PORT"``. The vectors, the recipe and the model directory are the same.
    ray_device : str
        With ``ray``, what the fine-tuning workers train on: ``"auto"`` (one GPU each, NCCL, when the cluster
        has GPUs; else one core each, gloo), ``"cpu"`` or ``"gpu"``.

    Returns
    -------
    TrainResult
        ``model_dir`` (load it with :func:`cxrlab.load_model`), ``run_dir`` (``report_path``, split.csv),
        ``labels``, ``metrics`` (test figures at the operating point), ``final_test_accuracy`` (at the
        operating point; ``final_test_accuracy_argmax`` is the tutorial's), ``skipped`` files and ``notes``.

    Raises
    ------
    cxrlab.CxrlabError
        On a bad option, unusable data or an unsafe output folder, before any lengthy work where possible.
    """
    o = TrainOptions(**{name: value for name, value in locals().items() if name != "image_dir"})
    train_arguments(image_dir=image_dir, **vars(o))  # every option and output path, before any image is read
    o.fine_tune, recipe_note = o.recipe()
    o.cluster()  # --ray: joined (or refused in one line) before any image is read
    started = time.time()
    inputs = [Path(p) for p in (image_dir if isinstance(image_dir, (list, tuple)) else [image_dir])]
    run_dir, model_dir = _output_dirs(o.output, inputs, o.summaries_dir, o.bottleneck_dir)
    dataset = discover_sites(inputs, label_from_name=o.label_from_name, label_map=o.label_map)
    image_dir = dataset.root
    previous = Manifest.read(o.split_file) if o.split_file else None
    manifest, split_notes = split_samples(dataset.samples, validation_percentage=o.validation_percentage,
                                          testing_percentage=o.testing_percentage, group_regex=o.group_regex,
                                          previous=previous)
    notes = list(dataset.warnings) + split_notes + ([recipe_note] if recipe_note else [])
    labels = dataset.labels
    check_calibration(o.calibration, len(labels))  # before any embedding or fine-tuning is spent
    positive = resolve_positive_label(labels, o.positive_label, notes)

    frozen = embed_images(image_dir, manifest.entries, o, calibration_rows=manifest.subset("train"))
    splits = Splits.of(manifest.entries, {lab: i for i, lab in enumerate(labels)}).keep(frozen.vectors)
    fit, cal = fit_and_calibrate(image_dir, splits, frozen, o, positive=positive)
    splits = splits.keep(fit.vectors)
    notes += fit.notes + cal.notes
    metrics, rows_te, P_te = evaluate_split(fit, cal, splits, labels, positive, o.test_batch_size, o.seed, notes)
    metrics["positive_label"] = positive

    gate = _ood_gate(fit, splits, frozen.digests, image_dir, o.progress) if o.ood and o.shift_reference else None
    if gate is not None and splits.test:  # how often the model's own unseen films carry the shift warning
        metrics["test_shift_warned"] = round(float(np.mean(gate.score_embeddings(fit.X(splits.test)) > gate.threshold)), 4)
    chest_check = _chest_check(image_dir, splits.validation + splits.test, fit.backbone.spec.input_size, notes) \
        if o.ood else None
    arrays = {**(gate.arrays() if gate else {}), **_network_arrays(fit, cal)}
    onnx_bytes = fuse_head(fit.backbone.onnx_path, cal.head.coef_, cal.head.intercept_, temperature=cal.temperature)
    runtime_record = _runtime_record(onnx_bytes, fit, cal, splits, frozen.digests, image_dir, positive, labels)
    info = model_info(
        labels=labels, positive_label=positive, backbone=fit.backbone, head=fit.head_info,
        calibration=cal.calibration_info, operating_point=cal.operating_point_info,
        split={"manifest_sha256": manifest.digest(), "counts": manifest.counts(),
               "validation_percentage": o.validation_percentage, "testing_percentage": o.testing_percentage,
               "group_regex": o.group_regex, "label_from_name": o.label_from_name},
        training_data=_training_data(dataset, len(frozen.skipped)),
        seed=o.seed, flags=o.flags(), metrics=metrics, fine_tune=fit.fine_tune_info, ood=gate.info() if gate else None,
        chest_check=chest_check, runtime=runtime_record)
    claim(run_dir, "train", files=([model_dir.name] if model_dir.parent == run_dir else []) + list(RUN_FILES),
          inputs=inputs)
    save_model(model_dir, onnx_bytes=onnx_bytes, labels=labels, info=info, arrays=arrays)
    manifest.write(run_dir / "split.csv")

    decided = decisions(P_te, labels, positive, cal.operating_point and cal.operating_point.threshold)
    misclassified = [(str(image_dir / r.relpath), r.label, d) for r, d in zip(rows_te, decided) if d != r.label]
    test = metrics.get("test") or {}
    shipped_accuracy = test["accuracy"] if "accuracy" in test else (
        float(np.mean([d == r.label for r, d in zip(rows_te, decided)])) if rows_te else None)
    result = TrainResult(model_dir, run_dir, labels, metrics, manifest, frozen.skipped, notes, frozen.hits,
                         frozen.misses, misclassified, shipped_accuracy, len(rows_te),
                         final_test_accuracy_argmax=metrics["final_test_accuracy_argmax"])
    result.metrics["training_curve"] = fit.curve
    result.seconds = round(time.time() - started, 2)
    if o.summaries_dir:
        write_tensorboard(o.summaries_dir, fit.curve, metrics, notes)
    if o.report:
        from .report import write_run_report

        kept = [e for e in manifest.entries if e.relpath in fit.vectors]
        written = write_run_report(result, image_dir, entries=kept, probs_by_relpath=_all_probs(kept, fit, cal),
                                   info=info)
        if "heatmaps" in written:
            result.metrics["heatmaps"] = written["heatmaps"]
        result.report_path = run_dir / "report.html"
    return result


def _runtime_record(onnx_bytes: bytes, fit: Fit, cal: Calibrated, splits: Splits, digests: dict[str, bytes],
                    image_dir: Path, positive: str | None, labels: list[str]) -> dict:
    """cxrlab.json's ``runtime``: the engine the figures were measured with, and the saved model's bf16 parity on
    the test split (run in bf16 by default only where it passed). The parity of the same graph on the same
    images is looked up rather than measured again: a warm re-run of train gives the same bytes."""
    from .cache import read_record, write_record
    from .runtime import native_bf16, openvino_installed, parity
    from .embed import prepare, read_file

    record = {"trained_with": fit.embedder.engine.to_json()}
    if not native_bf16():
        record["bf16_not_checked"] = "no native bf16 on the training machine" if openvino_installed() \
            else "OpenVINO is not installed"
        return record
    threshold = cal.operating_point_info["threshold"] if cal.operating_point_info else None
    pos = labels.index(positive) if positive is not None else None
    key = hashlib.sha256(onnx_bytes)
    for r in splits.test:
        key.update(digests.get(r.relpath, b"") + r.label.encode() + b"\0")
    key.update(repr((pos, threshold, "parity v1")).encode())
    if (known := read_record("parity", key.hexdigest())) is not None:
        record["bf16"] = known
        return record
    arrays, y = [], []
    for r in splits.test:
        try:
            arrays.append(prepare(read_file(image_dir / r.relpath), fit.backbone.spec.input_size, r.relpath)[0])
            y.append(splits.label_index[r.label])
        except ImageError:
            continue
    record["bf16"] = parity(onnx_bytes, arrays, np.asarray(y), positive=pos, threshold=threshold)
    write_record("parity", key.hexdigest(), record["bf16"])
    return record


def decisions(P: np.ndarray, labels: list[str], positive: str | None, threshold: float | None) -> list[str]:
    """The shipped model's answer for each row of probabilities: the operating point for a binary model
    (as cxrlab.predict decides), else the highest score."""
    if positive is None or threshold is None or len(labels) != 2:
        return [labels[int(k)] for k in P.argmax(1)] if len(P) else []
    pos = labels.index(positive)
    return [positive if p[pos] >= threshold else labels[1 - pos] for p in P]


def _network_arrays(fit: Fit, cal: Calibrated) -> dict[str, bytes]:
    """A fine-tuned network is kept beside the model (and named in fit.fine_tune_info) so that it can be adapted."""
    if fit.network is None:
        return {}
    from .finetune.network import NETWORK_FILE, network_arrays

    fit.fine_tune_info["network"] = NETWORK_FILE
    return {NETWORK_FILE: network_arrays(fit.network, cal.head.coef_, cal.head.intercept_, cal.temperature)}


def _training_data(dataset: Dataset, n_skipped: int) -> dict:
    """cxrlab.json's record of the data: folder name(s), class counts, and per site when there are several."""
    out = {"image_dir_name": ", ".join(p.resolve().name for p in dataset.inputs), "counts": dataset.counts(),
           "n_skipped": n_skipped}
    if len(dataset.sites) > 1:
        out["sites"] = dataset.counts_by_site()
    return out


@dataclass
class Embedded:
    """Frozen-backbone embeddings of a folder's images (through the cache)."""

    backbone: object
    embedder: Embedder
    store: EmbeddingStore
    vectors: dict[str, np.ndarray]  # relpath -> embedding, usable images only
    digests: dict[str, bytes]  # relpath -> file digest
    skipped: list[SkippedFile]
    hits: int
    misses: int


def embed_images(image_dir: Path, entries, o: TrainOptions, *, calibration_rows) -> Embedded:
    """Embed ``entries`` with ``o.backbone`` at ``o.precision`` (int8 calibrated on ``calibration_rows``)."""
    bb = create_backbone(o.backbone)
    if o.precision == "int8":
        from .precision import with_precision

        bb = with_precision(bb, o.precision, [image_dir / e.relpath for e in calibration_rows])
    embedder = Embedder(bb, batch_size=o.batch_size, workers=o.workers, engine=o.engine())
    store = EmbeddingStore(Path(o.bottleneck_dir) if o.bottleneck_dir else cache_dir() / "embeddings",
                           embedder.cache_key(), bb.spec.embed_dim)
    files, cluster = [image_dir / e.relpath for e in entries], o.cluster()
    emb = cluster.embed_files(bb, files, store=store, batch_size=o.batch_size, progress=o.progress,
                              engine=embedder.engine) if cluster else \
        embedder.embed_files(files, store=store, progress=o.progress)
    rel = [Path(p).relative_to(image_dir).as_posix() for p in emb.paths]
    return Embedded(bb, embedder, store, dict(zip(rel, emb.vectors)), dict(zip(rel, emb.digests)), emb.skipped,
                    emb.hits, emb.misses)


def fit_and_calibrate(image_dir: Path, splits: Splits, frozen: Embedded, o: TrainOptions, *,
                      positive: str | None) -> tuple[Fit, Calibrated]:
    """The shipped recipe up to the decision rule: fit (linear head or fine-tuning), calibrate, threshold."""
    if not splits.train:
        raise DataError(f"{image_dir}: no usable training images after the split (all skipped or in val/test)")
    if o.fine_tune:  # end to end in torch; then the same calibration / operating point / OOD / export path
        from .finetune import FineTuneOptions, fine_tune_stage

        fit = fine_tune_stage(frozen.backbone, image_dir, splits, options=o.fine_tune_options or FineTuneOptions(
            epochs=o.epochs), seed=o.seed, progress=o.progress, on_epoch=o.on_epoch, on_step=o.on_step,
            engine=frozen.embedder.engine, cluster=o.cluster())
        if any(o.distortions().values()):
            fit.notes.append("fine-tuning uses its own augmentation (--ft augment.*); "
                             "the tutorial's distortion flags were ignored")
    else:
        fit = fit_linear(frozen.backbone, frozen.embedder, frozen.store, frozen.vectors, splits, image_dir,
                         options=o.head(), distortions=o.distortions(), distortion_copies=o.distortion_copies,
                         group_regex=o.group_regex, seed=o.seed, on_step=o.on_step, progress=o.progress)
    pos = splits.label_index[positive] if positive is not None and len(splits.label_index) == 2 else None
    extra = None
    if o.robust_operating_point and pos is not None:
        extra = _site_shifted_validation(fit, splits.keep(fit.vectors), frozen.digests, image_dir, o.progress)
    return fit, calibrate_and_threshold(fit, calibration=o.calibration, positive=pos, rule=o.operating_point,
                                        extra=extra)


def evaluate_split(fit: Fit, cal: Calibrated, splits: Splits, labels: list[str], positive: str | None,
                   test_batch_size: int = -1, seed: int = 0, notes: list[str] | None = None):
    """Test figures of the shipped model: the tutorial's argmax accuracy plus the report at the operating point.
    Returns (metrics, the test rows scored, their calibrated probabilities)."""
    rows = splits.test
    if 0 < test_batch_size < len(rows):
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), test_batch_size, replace=False))
        rows = [rows[i] for i in pick]
    X, y = fit.X(rows), splits.y(rows)
    P = cal.probs(X) if len(X) else np.zeros((0, len(labels)))
    metrics: dict = {"n": {"train": len(splits.train), "validation": len(splits.validation), "test": len(rows)},
                     "final_test_accuracy_argmax": float(np.mean(P.argmax(1) == y)) if len(X) else None}
    pos = splits.label_index[positive] if cal.operating_point is not None else None
    threshold = cal.operating_point and cal.operating_point.threshold
    raw_head = getattr(cal.head, "raw", cal.head)
    if len(X) and len(np.unique(y)) >= 2:
        raw = softmax(raw_head.decision_function(X))[:, pos] if pos is not None else None
        metrics["test"] = test_report(y, P, labels, pos, threshold, raw)
    elif len(X) and notes is not None:
        notes.append("the test split holds a single class: ROC AUC and sensitivity/specificity cannot be computed")
    sites = sorted({r.site for r in rows})
    if len(sites) > 1:
        metrics["test_by_site"] = {site: _site_report(np.array([r.site == site for r in rows]), y, P, X, labels, pos,
                                                      threshold, raw_head) for site in sites}
    return metrics, rows, P


def _site_report(mask: np.ndarray, y: np.ndarray, P: np.ndarray, X: np.ndarray, labels, pos, threshold,
                 raw_head) -> dict:
    """One site's test figures at the shared operating point (counts only when it holds a single class)."""
    y_s, P_s = y[mask], P[mask]
    out = {"n": int(mask.sum()), "accuracy": float(np.mean(P_s.argmax(1) == y_s)) if mask.any() else None}
    if len(np.unique(y_s)) >= 2:
        raw = softmax(raw_head.decision_function(X[mask]))[:, pos] if pos is not None else None
        out.update(test_report(y_s, P_s, labels, pos, threshold, raw))
    else:
        out["note"] = "a single class in this site's test images: no AUC or sensitivity/specificity"
    return out


def _site_shifted_validation(fit: Fit, splits: Splits, digests: dict, image_dir: Path, progress):
    """Opt-in robust operating point: the validation images under the simulated site shifts. Measured on a
    fine-tuned Shenzhen model it is far too conservative (threshold 0.39 -> 0.13, test specificity 82% -> 46%):
    resolution loss and JPEG move the scores most, so it is off by default."""
    from .augment import site_shift_embeddings
    from .siteshift import GATE_SHIFTS

    rows, y = splits.validation, splits.y(splits.validation)
    if len(np.unique(y)) != 2:
        return None
    X = site_shift_embeddings(fit.embedder, [image_dir / e.relpath for e in rows], [digests[e.relpath] for e in rows],
                              store=fit.store, progress=progress)
    return X, np.repeat(y, len(GATE_SHIFTS)), f"the validation images under {len(GATE_SHIFTS)} simulated site shifts"


def _ood_gate(fit: Fit, splits: Splits, digests: dict, image_dir: Path, progress):
    from .augment import site_shift_embeddings
    from .ood import fit_gate
    from .siteshift import GATE_SHIFTS

    sample = splits.train[:: max(1, len(splits.train) // OOD_SHIFT_IMAGES)][:OOD_SHIFT_IMAGES]
    # The slowest step of a head-only run with a slow backbone: its bar names it and how to skip it.
    desc = f"shift reference, {len(sample)} images x {len(GATE_SHIFTS)} site shifts (--no-shift-reference skips)"
    X_shift = site_shift_embeddings(fit.embedder, [image_dir / e.relpath for e in sample],
                                    [digests[e.relpath] for e in sample], store=fit.store, progress=progress,
                                    desc=desc)
    return fit_gate(fit.backbone, np.concatenate([fit.X(splits.train), X_shift]), fit.X(splits.validation))


def _chest_check(image_dir: Path, rows, input_size: int, notes: list[str]) -> dict:
    """The chest check's record for this model. Its network is off (colour and blank pictures are still
    refused), with a note, when it would refuse too many of the user's own held-out images: those are not
    frontal chest films, and refusing them helps no one."""
    from .chest import check, info
    from .decode import decode_image

    sample = rows[:: max(1, len(rows) // CHEST_CHECK_IMAGES)][:CHEST_CHECK_IMAGES]
    pictures = []
    for e in sample:
        try:
            pictures.append(decode_image(image_dir / e.relpath, min_size=input_size))
        except ImageError:
            continue
    if not pictures:
        return info()
    accepted = float(np.mean([v.chest for v in check(pictures)]))
    if accepted < CHEST_CHECK_MIN_ACCEPTED:
        notes.append(f"the frontal-chest-X-ray check accepts only {accepted:.0%} of this folder's held-out images, "
                     "so its network is off for this model: only colour and blank pictures are refused")
        return {**info(network=False), "training_accepted": round(accepted, 4)}
    return {**info(), "training_accepted": round(accepted, 4)}


def resolve_positive_label(labels: list[str], positive_label: str | None, notes: list[str]) -> str | None:
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


def _all_probs(rows, fit: Fit, cal: Calibrated) -> dict[str, np.ndarray]:
    if not rows:
        return {}
    return {e.relpath: p for e, p in zip(rows, cal.probs(fit.X(rows)))}


def _output_dirs(output, inputs, summaries_dir=None, bottleneck_dir=None) -> tuple[Path, Path]:
    """(run folder, model folder), refused before any work where writing would replace, hide or
    delete the user's data (see outputs.py)."""
    classes = [c for folder in inputs for c in folder_classes(folder)]
    inputs = [p.parent if p.suffix.lower() == ".csv" and p.is_file() else p for p in map(Path, inputs)]
    if output is None:
        stamp = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        run_dir, n = stamp, 1
        while os.path.lexists(run_dir):  # a run started in the same second
            n += 1
            run_dir = stamp.with_name(f"{stamp.name}-{n}")
        check_output_dir(run_dir, "train", inputs=inputs, classes=classes, option="the default output folder")
        model_dir = run_dir / "model"
    else:
        model_dir = check_output_dir(output, "train", inputs=inputs, replace=True, classes=classes)
        run_dir = check_output_dir(run_dir_for(output), "train", inputs=inputs, files=RUN_FILES, classes=classes,
                                   option="the run folder beside --output")
    for option, folder in (("--summaries_dir", summaries_dir), ("--bottleneck_dir", bottleneck_dir)):
        if folder is not None:  # their files never collide with the user's, but must not land in the data
            check_not_input(folder, inputs, option, allow_contains=True)
            if os.path.exists(folder) and not os.path.isdir(folder):
                raise OutputError(f"{option} {folder} is an existing file, not a folder; give a folder")
    return run_dir, model_dir

