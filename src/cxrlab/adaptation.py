"""Adapt: a trained model -> a model for a new site (hospital), written as a new model directory.

Without labels: pictures the chest X-ray check refuses are set aside; the fine-tuned network's BatchNorm statistics
are re-estimated on the site's films (AdaBN), the shift reference is refitted on them so that the site's films are
not warned as unlike the training images, and the shift of the site's scores is reported. With labels (a few dozen local films in class folders): the site's own operating
point is chosen on them, with confidence intervals, as WHO asks programmes to calibrate CAD thresholds locally.
The new directory records its parent (hashes), the site, the image counts and the date.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError, ImageError
from .modeldir import MODEL_FILE, ModelFiles, load_model_files, save_model

MIN_SITE_IMAGES = 30  # fewer: BatchNorm statistics and the shift reference would be guesses
SMALL_SAMPLE = 50  # per class: below it the site's sensitivity/specificity carry wide intervals


@dataclass
class AdaptResult:
    model_dir: Path
    site: str
    n_images: int
    n_labelled: int
    batchnorm_layers: int  # re-estimated on the site's images (0: not a fine-tuned model, or turned off)
    shift: dict  # the site's scores and refusals before and after adaptation
    operating_point: dict | None  # the site's own (with labels), else None (the parent's is kept)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def adapt(model: str | os.PathLike, images: str | os.PathLike, output: str | os.PathLike, *,
          labelled: bool = False, operating_point: str = "who", batchnorm: bool = True,
          label_from_name: str | None = None, seed: int = 0, trust_modified: bool = False) -> AdaptResult:
    """Adapt the model directory ``model`` to the site whose images are in ``images``; write it to ``output``.

    Parameters
    ----------
    model : str or os.PathLike
        A model directory written by :func:`cxrlab.train` (or by ``adapt``).
    images : str or os.PathLike
        The site's images (at least 30), walked recursively. With ``labelled``, laid out as for training
        (one subfolder per class, or ``label_from_name``).
    output : str or os.PathLike
        The new model directory; never the parent model nor inside ``images``.
    labelled : bool
        Choose the site's own operating point on the labelled images (binary models only).
    operating_point : str
        The rule for that threshold: ``"who"`` (sensitivity >= 90 %, best specificity), ``"youden"``,
        ``"sensitivity=0.9"``, ``"specificity=0.7"``.
    batchnorm : bool
        Re-estimate a fine-tuned network's BatchNorm statistics on the site's images.
    label_from_name : str or None
        With ``labelled``: take the label from the file name (``"nlm"`` or a regex with ``(?P<label>...)``).
    seed : int
        Seed of the cross-fitting folds of the site's images for the shift reference.
    trust_modified : bool
        Adapt a parent whose files differ from their SHA-256 record (with a warning); the new model records
        the parent's hashes as found.
    """
    from .calibrate import parse_operating_point
    from .outputs import check_output_dir
    from .validate import check_existing_dir

    model, images = check_existing_dir("--model", model), check_existing_dir("IMAGES", images)
    parse_operating_point(operating_point)
    if os.path.realpath(output) == os.path.realpath(model):
        raise DataError(f"--output {output} is the model being adapted; give a new folder (the parent is kept)")
    check_output_dir(output, "train", inputs=[images, model], replace=True)
    parent = load_model_files(model, trust_modified=trust_modified)
    paths, labels_of = _site_images(images, parent, labelled, label_from_name)
    site = _Site.load(paths, int(parent.info["backbone"]["input_size"]))
    n_read, unadapted = len(site.arrays), _Candidate(parent)
    site = site.chest_films(unadapted.model)  # what is not a chest X-ray is no part of the site
    refused = (n_read - len(site.arrays)) / n_read if n_read else 0.0
    if len(site.arrays) < MIN_SITE_IMAGES:
        raise DataError(f"{images}: {len(site.arrays)} usable image(s); adapting needs at least {MIN_SITE_IMAGES}")
    before = unadapted.score(site)
    files, layers, notes = _adapted_network(parent, site, batchnorm)
    after = _Candidate(files).score(site)
    if parent.info.get("ood"):  # the refit changes only the shift warnings: the network's outputs are reused
        files = _refit_gate(files, after, seed)
        after = {**after, "shift_warned": _Candidate(files).shift_warned(after["embedding"])}
    op, op_notes = (None, []) if not labelled else _site_operating_point(files, site, after, labels_of,
                                                                         operating_point)
    shift = _shift(parent, before, after, refused)
    files.info["adapted"] = _provenance(model, parent, images, site, labels_of, layers, shift, op)
    if op is not None:
        files.info["operating_point"] = op
    if layers:  # a changed network: the parent's bf16 parity check does not carry over
        files.info["runtime"] = _adapted_runtime(files, site, labels_of if labelled else None)
    save_model(output, onnx_bytes=files.onnx_bytes, labels=files.labels, info=files.info, arrays=files.arrays)
    return AdaptResult(Path(output), images.resolve().name, len(site.arrays), len(labels_of) if labelled else 0,
                       layers, shift, op, site.skipped, notes + op_notes)


def _site_images(images: Path, parent: ModelFiles, labelled: bool, label_from_name):
    """The site's image paths and, with labels, {path: class index} (classes must be the model's)."""
    from .discover import discover, walk_images

    if not labelled:
        return [str(p) for p in walk_images(images)], {}
    labels = parent.labels
    if len(labels) != 2 or not (parent.info.get("operating_point") or {}):
        raise DataError("--labelled chooses a binary model's operating point; this model has no operating point")
    ds = discover(images, label_from_name=label_from_name, min_per_class=0)
    unknown = sorted(set(ds.labels) - set(labels))
    if unknown:
        raise DataError(f"{images}: class folder(s) {', '.join(unknown)} are not the model's classes "
                        f"({', '.join(labels)})")
    labels_of = {str(images / s.relpath): labels.index(s.label) for s in ds.samples}
    return list(labels_of), labels_of


@dataclass
class _Site:
    """The site's images, decoded once: the network's (size, size) inputs and what the chest check reads."""

    paths: list[str]
    arrays: list[np.ndarray]
    decoded: list
    skipped: list[tuple[str, str]]

    @classmethod
    def load(cls, paths: list[str], size: int) -> "_Site":
        from .embed import prepare, read_file

        kept, arrays, decoded, skipped = [], [], [], []
        for p in paths:
            try:
                arr, img = prepare(read_file(p), size, p)
            except ImageError as exc:
                skipped.append((p, exc.reason))
                continue
            kept.append(p)
            arrays.append(arr)
            decoded.append(img)
        return cls(kept, arrays, decoded, skipped)

    def chest_films(self, model) -> "_Site":
        """The images the model's chest check accepts; the others join ``skipped`` with the reason."""
        verdicts = model.chest_verdicts(self.arrays, self.decoded)
        keep = [i for i, v in enumerate(verdicts) if v is None or v.chest]
        skipped = self.skipped + [(self.paths[i], f"not a chest X-ray: {v.reason}")
                                  for i, v in enumerate(verdicts) if v is not None and not v.chest]
        return _Site([self.paths[i] for i in keep], [self.arrays[i] for i in keep], [self.decoded[i] for i in keep],
                     skipped)


class _Candidate:
    """A model held in memory (not yet written) and its outputs on the site's images."""

    def __init__(self, files: ModelFiles):
        from .predict import Model

        self.files = files
        self.model = Model.from_files(files)

    def shift_warned(self, embeddings: np.ndarray) -> np.ndarray:
        """The shift warning on embeddings already computed (by this same network)."""
        gate = self.model.ood_gate
        if gate is None:
            return np.zeros(len(embeddings), bool)
        return gate.score_embeddings(embeddings) > gate.threshold

    def score(self, site: _Site, batch: int = 16) -> dict:
        probs, emb = [], []
        for i in range(0, len(site.arrays), batch):
            out = self.model.run(np.stack(site.arrays[i : i + batch]), ("probabilities", "embedding"))
            probs.append(out["probabilities"])
            emb.append(out["embedding"])
        embedding = np.concatenate(emb)
        return {"probs": np.concatenate(probs), "embedding": embedding, "shift_warned": self.shift_warned(embedding)}


def _adapted_network(parent: ModelFiles, site: _Site, batchnorm: bool) -> tuple[ModelFiles, int, list[str]]:
    """The parent's files with the fine-tuned network's BatchNorm statistics re-estimated on the site (when it
    has a saved network), else the parent's files unchanged."""
    from .finetune.network import NETWORK_FILE

    info = {k: v for k, v in parent.info.items() if k not in ("files", "info_sha256", "schema_version", "labels")}
    arrays = dict(parent.arrays)
    name = (parent.info.get("fine_tune") or {}).get("network")
    if not batchnorm:
        return ModelFiles(info, parent.labels, parent.onnx_bytes, arrays), 0, []
    if name != NETWORK_FILE:
        return ModelFiles(info, parent.labels, parent.onnx_bytes, arrays), 0, [
            "BatchNorm statistics were not re-estimated: only a fine-tuned model (the default recipe, not "
            "--head-only) carries its network; the shift reference and operating point were still adapted"]
    from .finetune.network import export_network, network_arrays, rebuild_network, reestimate_batchnorm
    from .graph import fuse_head

    module, coef, intercept, temperature = rebuild_network(parent.info, parent.arrays[name], name)
    size = int(parent.info["fine_tune"]["preprocessing"]["input_size"])
    u8 = np.stack([np.round(a * 255).astype(np.uint8) for a in site.arrays])
    layers = reestimate_batchnorm(module, u8, size)
    outputs = tuple(parent.info["backbone"].get("onnx_outputs") or ("embedding", "features"))
    onnx_bytes = fuse_head(export_network(module, parent.info, outputs), coef, intercept, temperature=temperature,
                           metadata={"labels": json.dumps(parent.labels), "producer": "cxrlab"})
    arrays[name] = network_arrays(module, coef, intercept, temperature)
    return ModelFiles(info, parent.labels, onnx_bytes, arrays), layers, []


def _refit_gate(files: ModelFiles, scored: dict, seed: int) -> ModelFiles:
    """The shift reference refitted on the site's images (embeddings of the adapted network), cross-fitted so
    that the site's films it did not see are judged like the ones it did."""
    from .ood import fit_gate_cross

    gate = fit_gate_cross(scored["embedding"], seed=seed)
    arrays = {**files.arrays, **gate.arrays()}
    info = {**files.info, "ood": {**gate.info(), "data": "the adapted site's images (cross-fitted)"}}
    return ModelFiles(info, files.labels, files.onnx_bytes, arrays)


def _adapted_runtime(files: ModelFiles, site: _Site, labels_of: dict | None) -> dict:
    """cxrlab.json's ``runtime`` for the adapted network: its bf16 parity on the site's labelled films, or none
    (so that it runs in fp32 by default)."""
    from .runtime import native_bf16, parity

    record = {k: v for k, v in (files.info.get("runtime") or {}).items() if k == "trained_with"}
    if labels_of is None or not native_bf16():
        record["bf16_not_checked"] = ("the network was adapted without labels" if labels_of is None
                                      else "no native bf16 on the adapting machine")
        return record
    pos = files.labels.index(files.info["positive_label"])
    op = files.info.get("operating_point") or {}
    record["bf16"] = {**parity(files.onnx_bytes, site.arrays, np.array([labels_of[p] for p in site.paths]),
                                       positive=pos, threshold=op.get("threshold")),
                      "data": "the site's labelled films"}
    return record


def _site_operating_point(files: ModelFiles, site: _Site, after: dict, labels_of: dict, rule: str):
    """The site's own threshold on its labelled films, with Wilson intervals and a small-sample warning."""
    from .calibrate import choose_operating_point
    from .metrics import wilson_ci

    pos = files.labels.index(files.info["positive_label"])
    y = np.array([labels_of[p] == pos for p in site.paths], dtype=int)
    if len(np.unique(y)) < 2:
        raise DataError("--labelled needs films of both classes to choose the site's operating point")
    s = after["probs"][:, pos]
    op = choose_operating_point(y, s, rule)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    sens_ci = wilson_ci(round(op.sensitivity * n_pos), n_pos)
    spec_ci = wilson_ci(round(op.specificity * n_neg), n_neg)
    notes = [op.note] if op.note else []
    if min(n_pos, n_neg) < SMALL_SAMPLE:
        notes.append(f"small sample: {n_pos} positive and {n_neg} negative film(s); the site's sensitivity "
                     f"{op.sensitivity:.0%} has a 95% interval of {sens_ci[0]:.0%}-{sens_ci[1]:.0%} and its "
                     f"specificity {op.specificity:.0%} one of {spec_ci[0]:.0%}-{spec_ci[1]:.0%}; "
                     f"at least {SMALL_SAMPLE} films per class give a threshold to rely on")
    info = {"rule": op.rule, "threshold": float(np.clip(op.threshold, 0.0, 1.0)), "sensitivity": op.sensitivity,
            "specificity": op.specificity, "reachable": op.reachable, "note": op.note,
            "data": f"{len(y)} labelled films of the site ({n_pos} positive, {n_neg} negative)",
            "sensitivity_ci": list(sens_ci), "specificity_ci": list(spec_ci), "n_positive": n_pos,
            "n_negative": n_neg}
    return info, notes


def _shift(parent: ModelFiles, before: dict, after: dict, refused: float) -> dict:
    """How far the site's scores moved: mean positive score, share flagged at the threshold, share warned as
    unlike the training images; and the share refused as not chest X-rays (the same before and after)."""
    op = parent.info.get("operating_point") or {}
    pos = parent.labels.index(parent.info["positive_label"]) if parent.info.get("positive_label") else None

    def summary(scored: dict) -> dict:
        out = {"refused": refused, "shift_warned": float(scored["shift_warned"].mean())}
        if pos is not None:
            s = scored["probs"][:, pos]
            out["mean_positive_score"] = float(s.mean())
            if op:
                out["flagged_at_parent_threshold"] = float(np.mean(s >= op["threshold"]))
        return out

    out = {"before": summary(before), "after": summary(after)}
    if pos is not None:  # how far the whole distribution moved, not only its mean (0: same, 1: disjoint)
        from scipy.stats import ks_2samp

        out["ks_distance"] = float(ks_2samp(before["probs"][:, pos], after["probs"][:, pos]).statistic)
    return out


def _provenance(model: Path, parent: ModelFiles, images: Path, site: _Site, labels_of: dict, layers: int,
                shift: dict, op: dict | None) -> dict:
    return {"parent": {"name": model.resolve().name, "info_sha256": parent.info.get("info_sha256"),
                       "model_sha256": parent.info["files"][MODEL_FILE], "adapted": parent.info.get("adapted")},
            "site": images.resolve().name, "n_images": len(site.arrays), "n_skipped": len(site.skipped),
            "n_labelled": len(labels_of), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "batchnorm_layers_reestimated": layers, "ood_refitted": bool(parent.info.get("ood")),
            "operating_point": "the site's own (labelled films)" if op else "the parent's", "score_shift": shift}
