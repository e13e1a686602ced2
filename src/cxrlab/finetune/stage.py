"""Fine-tuning as a training-pipeline stage: decode the images once, fine-tune, export the network (with the
in-graph preprocessing and test-time augmentation) and embed every image through it; the result is a ``Fit``
like the linear head's, so calibration, the operating point, the OOD gate and export are the same."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from ..fit import Fit, Splits, curve_recorder
from ..head import StepInfo
from ..progress import Progress
from .loop import fine_tune, state_sha256
from .modules import with_tta
from .options import FineTuneOptions


class FineTunedHead:
    """The fine-tuned torch Linear, in LinearHead's shape (coef_, intercept_, decision_function)."""

    def __init__(self, W: np.ndarray, b: np.ndarray):
        self.coef_, self.intercept_ = W.astype(np.float32), b.astype(np.float32)
        self.n_iter_ = 0

    def decision_function(self, X) -> np.ndarray:
        return np.asarray(X, np.float32) @ self.coef_.T + self.intercept_


def export_onnx(module, size: int, outputs: tuple[str, ...]) -> bytes:
    """The backbone interface (input 'image', outputs embedding, features[, imagenet_logits]), as registry backbones."""
    from ..backbones import export_torch_onnx

    return export_torch_onnx(module, size, outputs)


def load_arrays(paths, size: int) -> tuple[np.ndarray, list[int]]:
    """Decode every image once (as predict does) to (n, size, size) uint8; returns the rows that decoded."""
    from ..embed import prepare, read_file
    from ..errors import ImageError

    out, ok = [], []
    for i, p in enumerate(paths):
        try:
            arr, _ = prepare(read_file(p), size, str(p))
        except ImageError:
            continue
        out.append(np.round(arr * 255).astype(np.uint8))
        ok.append(i)
    return (np.stack(out) if out else np.zeros((0, size, size), np.uint8)), ok


def fine_tune_stage(bb, image_dir: Path, splits: Splits, *, options: FineTuneOptions, seed: int = 0,
                    progress: Progress | None = None, on_epoch: Callable[[dict], None] | None = None,
                    on_step: Callable[[StepInfo], None] | None = None, engine=None, cluster=None) -> Fit:
    """Fine-tune ``bb`` on the train split (best epoch on validation), export it, embed every image through it
    (on ``engine``, a runtime.Engine; None: the reference, ONNX Runtime fp32). ``cluster`` (a
    ``cxrlab.cluster.Cluster``): train data-parallel and embed on that Ray cluster instead."""
    from ..backbones import Backbone, cache_dir, weights_path
    from ..embed import Embedder
    from ..fsutil import atomic_write_bytes

    if bb.spec.builder is None:
        raise DataError(f"backbone '{bb.id}' cannot be fine-tuned (no torch builder); use a registry backbone")
    size = options.input_size or bb.spec.input_size
    spec = replace(bb.spec, input_size=size)
    X_tr, ok_tr = load_arrays([image_dir / r.relpath for r in splits.train], size)
    X_va, ok_va = load_arrays([image_dir / r.relpath for r in splits.validation], size)
    if cluster is not None:  # data-parallel with Ray Train (finetune/distributed.py)
        from functools import partial

        from .distributed import fine_tune_on_ray

        train = partial(fine_tune_on_ray, workers=cluster.workers, device=cluster.device)
    else:
        train = fine_tune
    curve, record = curve_recorder(on_step)

    def epoch_ended(row: dict) -> None:  # as each epoch ends: on_epoch, then the tutorial's Step lines
        if on_epoch is not None:
            on_epoch(row)
        record(StepInfo(row["epoch"], row["train_accuracy"], row["loss"], row.get("val_accuracy"), len(ok_va),
                        row.get("val_loss")))

    res = train(spec, weights_path(bb.spec), X_tr, splits.y(splits.train)[ok_tr], X_va,
                splits.y(splits.validation)[ok_va], seed=seed, options=options, on_epoch=epoch_ended, progress=progress)
    sha = state_sha256(res.module, {"options": options.to_dict(), "base": bb.weights_sha256})
    exported = with_tta(res.module, size, options.tta_views) if options.tta else res.module
    path = cache_dir() / "finetuned" / f"{spec.name}-ft-{sha[:16]}.onnx"
    atomic_write_bytes(path, export_onnx(exported, size, bb.outputs))
    new_bb = Backbone(replace(spec, weights_sha256=sha, builder=None), path, sha, bb.outputs)
    embedder = Embedder(new_bb, **({"engine": engine} if engine is not None else {}))
    rows = splits.train + splits.validation + splits.test
    files = [image_dir / r.relpath for r in rows]
    emb = cluster.embed_files(new_bb, files, progress=progress, engine=embedder.engine) if cluster is not None else \
        embedder.embed_files(files, store=None, progress=progress)
    vectors = {Path(p).relative_to(image_dir).as_posix(): v for p, v in zip(emb.paths, emb.vectors)}
    head = FineTunedHead(res.head_W, res.head_b)
    validation = splits.keep(vectors).validation
    fit = Fit(new_bb, embedder, None, vectors, head, curve, None, splits.y(validation), "validation split",
              {"type": "linear-softmax", "solver": "fine-tune", "trained_with_backbone": True})
    fit.cal_logits = head.decision_function(fit.X(validation))
    fit.network = res.module  # saved beside the model (finetune.network), for `cxrlab adapt`
    fit.fine_tune_info = {
        "base_backbone": bb.id, "base_weights_sha256": bb.weights_sha256, "weights_sha256": sha,
        "options": options.to_dict(), "history": res.history, "best_epoch": res.best_epoch, "seconds": res.seconds,
        "n_train": int(len(X_tr)), "n_validation": int(len(X_va)),
        "preprocessing": {"intensity": options.intensity, "aspect": "squash (predict's resize)", "input_size": size,
                          "in_graph": True},
        "seed": seed, "deterministic": True}
    if res.resumed_after:  # a Ray worker failed: the run went on from the last epoch's checkpoint
        fit.fine_tune_info["resumed_after_epochs"] = res.resumed_after
    return fit
