"""Predict: a model directory + image files -> predictions. Needs only ONNX Runtime and numpy."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .decode import DecodedImage, looks_like_image_file
from .embed import make_session, prepare, read_file
from .errors import ImageError, ModelDirError
from .modeldir import MODEL_FILE, read_model_dir


@dataclass
class Prediction:
    path: str
    scores: dict[str, float] = field(default_factory=dict)  # calibrated probabilities, by label
    label: str | None = None  # the decision (operating point for binary models), None when rejected/failed
    positive_score: float | None = None
    threshold: float | None = None
    ood: bool | None = None
    ood_score: float | None = None
    ood_threshold: float | None = None
    error: str | None = None

    def ranked(self) -> list[tuple[str, float]]:
        return sorted(self.scores.items(), key=lambda kv: -kv[1])

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def expand_paths(paths) -> list[str]:
    """Files as given; folders are walked for image files (sorted, hidden entries skipped)."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = len(out)
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                out.extend(str(Path(dirpath) / f) for f in sorted(filenames)
                           if not f.startswith(".") and looks_like_image_file(Path(dirpath) / f))
            if len(out) == found:  # kept, so that it is reported ("folder with no image files")
                out.append(str(p))
        else:
            out.append(str(p))
    return out


class Model:
    """A loaded model directory. ``predict(paths)`` returns one Prediction per file."""

    def __init__(self, directory: str | os.PathLike, *, threads: int | None = None, _loaded=None):
        self.directory = Path(directory)
        self.info, self.labels, onnx_bytes = _loaded or read_model_dir(self.directory)
        try:
            self.session = make_session(onnx_bytes, threads=threads)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelDirError(f"{self.directory / MODEL_FILE}: ONNX Runtime cannot load it ({exc})") from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        shape = self.session.get_outputs()[0].shape
        if isinstance(shape[-1], int) and shape[-1] != len(self.labels):
            raise ModelDirError(f"{self.directory}: labels.txt has {len(self.labels)} labels but model.onnx "
                                f"outputs {shape[-1]} scores")
        self.input_size = int(self.info["backbone"]["input_size"])
        op = self.info.get("operating_point") or {}
        self.positive_label = self.info.get("positive_label")
        self.threshold = op.get("threshold") if self.positive_label in self.labels else None
        self.ood_gate = None
        if self.info.get("ood"):
            from .ood import OODGate

            self.ood_gate = OODGate.load(self.directory, self.info["ood"])

    @classmethod
    def from_graph(cls, graph: str | os.PathLike, labels_file: str | os.PathLike) -> "Model":
        """A bare ONNX file + labels file (the tutorial's --graph/--labels), without cxrlab.json.

        If ``graph`` was written by ``retrain``, its full model directory sits beside it
        (``<stem>.cxrlab/``) and is used instead, so the threshold and the OOD gate apply.
        """
        graph, labels_file = Path(graph), Path(labels_file)
        try:
            data = graph.read_bytes()
            labels = [line for line in labels_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as exc:
            raise ModelDirError(f"{exc.filename}: cannot read ({exc.strerror})") from None
        sibling = graph.with_name(graph.stem + ".cxrlab")
        if (sibling / MODEL_FILE).is_file() and (sibling / MODEL_FILE).read_bytes() == data:
            return cls(sibling)
        import onnx

        try:
            size = onnx.load_from_string(data).graph.input[0].type.tensor_type.shape.dim[-1].dim_value
        except Exception as exc:
            raise ModelDirError(f"{graph}: not an ONNX model written by cxrlab ({exc})") from None
        info = {"labels": labels, "backbone": {"input_size": int(size)}}
        return cls(graph.parent, _loaded=(info, labels, data))

    # -- low level: arrays in, raw outputs out
    def run(self, batch: np.ndarray, outputs=("probabilities",)) -> dict[str, np.ndarray]:
        names = [n for n in outputs if n in self.output_names]
        values = self.session.run(names, {"image": np.ascontiguousarray(batch[:, None], np.float32)})
        return dict(zip(names, values))

    def decide(self, probs: np.ndarray) -> tuple[str, float | None]:
        if self.threshold is not None:
            pos = self.labels.index(self.positive_label)
            p = float(probs[pos])
            if len(self.labels) == 2:
                other = self.labels[1 - pos]
                return (self.positive_label if p >= self.threshold else other), p
            return self.labels[int(np.argmax(probs))], p
        return self.labels[int(np.argmax(probs))], None

    def predict_arrays(self, arrays: list[np.ndarray], decoded: list[DecodedImage | None] | None = None,
                       *, ood: bool = True, names: list[str] | None = None) -> list[Prediction]:
        names = names or [f"image{i}" for i in range(len(arrays))]
        want = ["probabilities", "embedding"] + (["imagenet_logits"] if self.ood_gate is not None else [])
        out = self.run(np.stack(arrays), want) if arrays else {}
        preds = []
        for i, name in enumerate(names):
            probs = out["probabilities"][i]
            label, pos = self.decide(probs)
            pred = Prediction(name, {lab: float(p) for lab, p in zip(self.labels, probs)}, label, pos, self.threshold)
            if ood and self.ood_gate is not None:
                score = self.ood_gate.score_one(out, i, decoded[i] if decoded else None)
                pred.ood, pred.ood_score, pred.ood_threshold = bool(score > self.ood_gate.threshold), score, self.ood_gate.threshold
                if pred.ood:
                    pred.label = None
            preds.append(pred)
        return preds

    def predict(self, paths, *, ood: bool = True, batch_size: int = 16) -> list[Prediction]:
        """Predict every image file (folders are walked). Unreadable files get ``error`` set."""
        files = expand_paths(paths if isinstance(paths, (list, tuple)) else [paths])
        results: list[Prediction] = []
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            arrays, decoded, names, slots = [], [], [], []
            chunk_preds: list[Prediction | None] = [None] * len(chunk)
            for j, path in enumerate(chunk):
                try:
                    arr, img = prepare(read_file(path), self.input_size, path)
                except ImageError as exc:
                    chunk_preds[j] = Prediction(path, error=exc.reason)
                    continue
                arrays.append(arr)
                decoded.append(img)
                names.append(path)
                slots.append(j)
            for j, pred in zip(slots, self.predict_arrays(arrays, decoded, ood=ood, names=names)):
                chunk_preds[j] = pred
            results.extend(chunk_preds)
        return results

    def predict_bytes(self, data: bytes, name: str = "upload", *, ood: bool = True) -> Prediction:
        arr, img = prepare(data, self.input_size, name)
        return self.predict_arrays([arr], [img], ood=ood, names=[name])[0]


def load_model(directory: str | os.PathLike, **kwargs) -> Model:
    return Model(directory, **kwargs)
