"""Predict: a model directory + image files -> predictions, on ONNX Runtime or OpenVINO (runtime.py)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .decode import DecodedImage, decode_array, decode_pil, resize
from .discover import walk_images
from .embed import in_lanes, in_order, make_session, prepare, read_file
from .errors import DataError, ImageError, ModelDirError
from .modeldir import LABELS_FILE, MODEL_FILE, ModelFiles, load_model_files, model_identity
from .modelschema import INPUT_SIZE_RANGE, Invalid, show
from .modelschema import labels as check_labels
from .progress import resolve as resolve_progress
from .runtime import default_threads, lane_batch


@dataclass
class Prediction:
    path: str
    scores: dict[str, float] = field(default_factory=dict)  # calibrated probabilities, by label
    label: str | None = None  # the decision (operating point for binary models), None when rejected/failed
    positive_score: float | None = None
    threshold: float | None = None
    ood: bool | None = None  # refused as not a frontal chest X-ray (cxrlab.chest): no scores, no label
    ood_score: float | None = None  # 1 - the chest check's probability of a frontal chest X-ray
    ood_threshold: float | None = None  # refused above this
    ood_reason: str | None = None
    shift: bool | None = None  # scored, with a warning: unlike the model's training images (cxrlab.ood)
    shift_score: float | None = None
    shift_threshold: float | None = None
    error: str | None = None

    def ranked(self) -> list[tuple[str, float]]:
        return sorted(self.scores.items(), key=lambda kv: -kv[1])

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def expand_paths(paths) -> list[str]:
    """Files as given; folders are walked for image files (sorted, hidden entries skipped, linked
    folders not entered). A folder with no image file is kept, so that it is reported."""
    out = []
    for p in paths:
        p = Path(p)
        found = [str(f) for f in walk_images(p, follow_links=False)] if p.is_dir() else []
        out.extend(found or [str(p)])
    return out


class Model:
    """A loaded model directory. ``predict(paths)`` returns one Prediction per file.

    Loading refuses a directory whose files differ from their SHA-256 record, whose cxrlab.json holds
    an invalid value, or whose labels disagree with the ones stored in model.onnx at training time.
    ``trust_modified=True`` loads a modified directory anyway (with a warning on stderr); every value
    is still validated. ``runtime`` / ``precision`` choose the engine (``cxrlab.runtime.resolve``): by default
    bf16 on OpenVINO where this CPU has native bf16 and the model passed its bf16 parity check, else ONNX
    Runtime fp32; ``self.engine`` says which.
    """

    def __init__(self, directory: str | os.PathLike, *, threads: int | None = None, trust_modified: bool = False,
                 runtime: str = "auto", precision: str = "auto",
                 _loaded: ModelFiles | None = None, _sources: tuple[str, str] | None = None):
        from .runtime import lanes, resolve

        self.directory = Path(directory)
        files = _loaded or load_model_files(self.directory, trust_modified=trust_modified)
        self.info, self.labels = files.info, files.labels
        self.files = files  # verified content, for workers that load the same model elsewhere (cluster.py)
        self.sha256 = model_identity(files)  # what the audit log and the DICOM results name the model by
        graph_name, labels_name = _sources or (str(self.directory / MODEL_FILE), str(self.directory / LABELS_FILE))
        bf16 = (self.info.get("runtime") or {}).get("bf16") or {}
        self.engine = resolve(runtime, precision, bf16_ok=bool(bf16.get("ok")))
        self.lanes, lane_threads = lanes(threads, self.engine)
        try:
            self.session = make_session(files.onnx_bytes, threads=lane_threads, engine=self.engine)
        except Exception as exc:  # onnxruntime and openvino raise their own untyped errors
            raise ModelDirError(f"{graph_name}: {self.engine.runtime} cannot load it ({exc})") from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_size = int(self.info["backbone"]["input_size"])
        _check_graph(self.session, self.labels, self.input_size, graph_name, labels_name)
        op = self.info.get("operating_point") or {}
        self.positive_label = self.info.get("positive_label")
        self.threshold = float(op["threshold"]) if op and self.positive_label in self.labels else None
        # Models saved before the chest check existed had a gate that refused pictures: they get the check too.
        self.chest_check = self.info["chest_check"] if "chest_check" in self.info else (
            _chest_info() if self.info.get("ood") else None)
        self.ood_gate = None
        if self.info.get("ood"):
            from .ood import OODGate

            if "embedding" not in self.output_names:
                raise ModelDirError(f"{graph_name}: has no 'embedding' output for the out-of-distribution gate")
            name = self.info["ood"]["arrays"]
            self.ood_gate = OODGate.load(self.directory, self.info["ood"], data=files.arrays.get(name),
                                         embed_dim=_static_dim(self.session, "embedding"))

    @classmethod
    def from_files(cls, files: ModelFiles, *, threads: int | None = None, runtime: str = "auto",
                   precision: str = "auto") -> "Model":
        """A model held in memory (verified or just built, e.g. by ``cxrlab adapt`` before it is written)."""
        return cls(".", threads=threads, runtime=runtime, precision=precision, _loaded=files,
                   _sources=("<model in memory>", "<labels in memory>"))

    @classmethod
    def from_graph(cls, graph: str | os.PathLike, labels_file: str | os.PathLike, *,
                   trust_modified: bool = False, threads: int | None = None, runtime: str = "auto",
                   precision: str = "auto") -> "Model":
        """A bare ONNX file + labels file (the tutorial's --graph/--labels), without cxrlab.json.

        If ``graph`` was written by ``retrain``, its full model directory sits beside it
        (``<stem>.cxrlab/``) and is used instead, so the threshold and the OOD gate apply. Alone, the
        graph's own metadata give the positive class and threshold (cxrlab writes them there). Either way
        the labels file must list the labels the model was trained with, in the same order.
        """
        graph, labels_file = Path(graph), Path(labels_file)
        try:
            data = graph.read_bytes()
            text = labels_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelDirError(f"{exc.filename}: cannot read ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise ModelDirError(f"{labels_file}: not UTF-8 text (expected one label per line)") from None
        labels = [line.strip() for line in text.splitlines() if line.strip()]
        sibling = graph.with_name(graph.stem + ".cxrlab")
        if (sibling / MODEL_FILE).is_file() and (sibling / MODEL_FILE).read_bytes() == data:
            model = cls(sibling, trust_modified=trust_modified, threads=threads, runtime=runtime, precision=precision)
            _same_labels(labels, model.labels, labels_file, str(sibling))
            return model
        try:
            check_labels(labels)
        except Invalid as e:
            raise ModelDirError(f"{labels_file}: the labels {e.message}") from None
        info = {"labels": labels, "backbone": {"input_size": _graph_input_size(data, graph)},
                **_graph_decision(data, labels)}
        return cls(graph.parent, threads=threads, runtime=runtime, precision=precision, _loaded=ModelFiles(info, labels, data),
                   _sources=(str(graph), str(labels_file)))

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
                       *, ood: bool = True, names: list[str] | None = None, verdicts: list | None = None,
                       maps: list | None = None) -> list[Prediction]:
        """``ood``: refuse what is not a frontal chest X-ray (no scores) and flag films unlike the training images;
        ``verdicts``: the chest check's, when already made (from ``decoded``, which is then not needed);
        ``maps``: a list that receives each image's class maps (C, h, w) from the same pass through the network
        (None for a refused image), for heatmaps without a second pass."""
        names = names or [f"image{i}" for i in range(len(arrays))]
        if verdicts is None:
            verdicts = self.chest_verdicts(arrays, decoded) if ood else [None] * len(arrays)
        kept = [i for i, v in enumerate(verdicts) if v is None or v.chest]
        wanted = ["probabilities", "embedding", *(["class_maps"] if maps is not None else [])]
        out = self.run(np.stack([arrays[i] for i in kept]), wanted) if kept else {}
        row = {i: r for r, i in enumerate(kept)}
        if maps is not None:
            if kept and "class_maps" not in out:
                raise ModelDirError(f"{self.directory}: model.onnx has no 'class_maps' output (retrain with this cxrlab)")
            maps.extend(out["class_maps"][row[i]] if i in row else None for i in range(len(arrays)))
        cutoff = round(1 - float(self.chest_check["threshold"]), 4) if self.chest_check else None
        preds = []
        for i, name in enumerate(names):
            v = verdicts[i]
            if v is not None and not v.chest:
                preds.append(Prediction(name, threshold=self.threshold, ood=True, ood_score=round(1 - v.score, 4),
                                        ood_threshold=cutoff, ood_reason=v.reason))
                continue
            probs = out["probabilities"][row[i]]
            label, pos = self.decide(probs)
            pred = Prediction(name, {lab: float(p) for lab, p in zip(self.labels, probs)}, label, pos, self.threshold)
            if v is not None:
                pred.ood, pred.ood_score, pred.ood_threshold = False, round(1 - v.score, 4), cutoff
            if ood and self.ood_gate is not None:
                score = self.ood_gate.score_one(out, row[i])
                pred.shift, pred.shift_score, pred.shift_threshold = bool(score > self.ood_gate.threshold), score, self.ood_gate.threshold
            preds.append(pred)
        return preds

    def chest_verdicts(self, arrays: list[np.ndarray], decoded: list[DecodedImage | None] | None = None) -> list:
        """The chest check's verdict on each image (None for all when this model has no check)."""
        if not self.chest_check:
            return [None] * len(arrays)
        from .chest import check

        pictures = [d if d is not None else a for a, d in zip(arrays, decoded or [None] * len(arrays))]
        return check(pictures, threshold=float(self.chest_check["threshold"]),
                     network=bool(self.chest_check.get("network", True)))

    def predict(self, images, *, ood: bool = True, batch_size: int = 16, progress=None,
                on_maps=None) -> list[Prediction]:
        """Predict each image: files, folders of image files, and images already in memory.

        Parameters
        ----------
        images : str, os.PathLike, PIL.Image.Image, numpy.ndarray, or a list or tuple of them
            One item or a list of items, which may be mixed. A path names an image file (JPEG, PNG,
            BMP, TIFF, WebP, GIF, JPEG 2000 or DICOM) or a folder, walked for image files in sorted
            order. A Pillow image or a numpy array (``(H, W)`` grey of any integer, boolean or
            float type, or ``(H, W, 3)`` RGB / ``(H, W, 4)`` RGBA) is decoded by the rules a file of
            the same samples follows: uint8 / 255, 16-bit data by their bit depth, float data in
            0..1 as they are (see :mod:`cxrlab.decode`). A single 3-D array is one colour image;
            pass a list for several images.
        ood : bool
            Refuse what is not a frontal chest X-ray (``cxrlab.chest``): it gets ``ood=True``, the
            reason in ``ood_reason``, and no scores or ``label``; and flag a chest film unlike the
            training images (``shift=True``, ``shift_score``): it is still scored.
        batch_size : int
            Images in the network at once (memory versus speed), shared by its lanes (``cxrlab.runtime.lanes``).
        progress : cxrlab.progress.Progress or None
            Advanced by each batch's images (started and closed by the caller).
        on_maps : callable or None
            ``on_maps(index, prediction, decoded, class_maps)`` for each image the network scored, with its
            position among the images found, its DecodedImage and its class maps (C, h, w) from the same pass,
            called in the thread that ran its batch while the decoded image is still held: heatmaps without a
            second decode or pass (``cxrlab.explain``).

        Returns
        -------
        list of Prediction
            One per file found or image given, in order. ``path`` is the file's path, or
            ``"<PIL image I>"`` / ``"<array I>"`` for the item at position I of ``images``. An image
            that cannot be used (unreadable file, bad array: wrong shape or type, empty, no finite
            value) gets ``error`` set, and the others are still predicted.

        Raises
        ------
        TypeError
            For an item that is none of the above (the whole call fails: a programming error).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise DataError(f"predict: batch_size must be a whole number of at least 1, got {batch_size!r}")
        items = list(enumerate(_input_items(images)))
        results: list[Prediction] = []
        keep = on_maps is not None
        # Decoding (and the chest check, which needs the full decoded image) runs in worker threads ahead of the
        # network, whose batches run side by side in lanes; only the network's small inputs are kept (and the
        # decoded images of the batches in flight, for on_maps), so memory stays flat.
        with ThreadPoolExecutor(min(4, default_threads())) as pool, ThreadPoolExecutor(self.lanes) as lanes_pool:
            share = lane_batch(batch_size, self.lanes)
            prepared = in_order(pool, lambda item: self._prepare_item(item, ood, keep), items,
                                lookahead=(self.lanes + 1) * share)
            batches = _batches((future.result() for _, future in prepared), share)
            for batch, preds in in_lanes(lanes_pool, lambda b: self._predict_prepared(b, ood, on_maps), batches,
                                         lanes=self.lanes):
                results.extend(preds)
                if progress is not None:
                    progress.advance(len(batch))
        return results

    def _prepare_item(self, item: tuple[int, tuple[str, object]], ood: bool, keep: bool) -> _Prepared:
        """The network's input and the chest verdict of one image, or why it cannot be used."""
        index, (name, source) = item
        try:
            arr, img = self._prepare(source, name)
        except ImageError as exc:
            return _Prepared(index, name, None, exc.reason)
        return _Prepared(index, name, arr, self.chest_verdicts([arr], [img])[0] if ood else None,
                         img if keep else None)

    def _predict_prepared(self, batch: list[_Prepared], ood: bool, on_maps) -> list[Prediction]:
        usable = [p for p in batch if p.array is not None]
        maps: list | None = [] if on_maps is not None else None
        preds = self.predict_arrays([p.array for p in usable], ood=ood, names=[p.name for p in usable],
                                    verdicts=[p.verdict for p in usable], maps=maps) if usable else []
        if on_maps is not None:
            for p, pred, m in zip(usable, preds, maps):
                if m is not None:
                    on_maps(p.index, pred, p.decoded, m)
        scored = iter(preds)
        return [next(scored) if p.array is not None else Prediction(p.name, error=p.verdict) for p in batch]

    def _prepare(self, source, name: str) -> tuple[np.ndarray, DecodedImage]:
        """The network's (size, size) input and the decoded image, from a path or an image in memory."""
        if isinstance(source, str):
            return prepare(read_file(source), self.input_size, name)
        decode = decode_pil if isinstance(source, Image.Image) else decode_array
        img = decode(source, name=name, min_size=self.input_size)
        try:
            return resize(img.pixels, self.input_size), img
        except MemoryError:
            raise ImageError(name, f"out of memory resizing a {img.width} x {img.height} image") from None

    def predict_bytes(self, data: bytes, name: str = "upload", *, ood: bool = True) -> Prediction:
        arr, img = prepare(data, self.input_size, name)
        return self.predict_arrays([arr], [img], ood=ood, names=[name])[0]


@dataclass
class _Prepared:
    """One image on its way to the network: its input, and the chest check's verdict (or why it is unusable)."""

    index: int
    name: str
    array: np.ndarray | None
    verdict: object  # the chest check's verdict; the reason it cannot be used when ``array`` is None
    decoded: DecodedImage | None = None  # kept only for heatmaps


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _chest_info() -> dict:
    from .chest import info

    return info()


def load_model(directory: str | os.PathLike, *, trust_modified: bool = False, threads: int | None = None,
               runtime: str = "auto", precision: str = "auto") -> Model:
    """Load a model directory written by :func:`cxrlab.train`.

    Parameters
    ----------
    directory : str or os.PathLike
        The model directory (``model.onnx``, ``labels.txt``, ``cxrlab.json`` and their SHA-256 record).
    trust_modified : bool
        Load a directory whose files differ from their SHA-256 record anyway, with a warning on
        stderr (CLI ``--trust-modified-model``); every value is still validated.
    threads : int or None
        Inference threads. None: one per core.
    runtime : str
        ``"auto"``, ``"openvino"`` or ``"onnxruntime"`` (see :func:`cxrlab.runtime.resolve`).
    precision : str
        ``"auto"`` (bf16 where this CPU has it natively and the model passed its bf16 parity check on its test
        split, recorded in cxrlab.json under ``runtime.bf16``; else fp32), ``"fp32"`` or ``"bf16"``.

    Returns
    -------
    Model
        Call :meth:`Model.predict` on it.

    Raises
    ------
    cxrlab.ModelDirError
        When the directory is missing, modified (without ``trust_modified``), or holds an invalid value.
    """
    return Model(directory, trust_modified=trust_modified, threads=threads, runtime=runtime, precision=precision)


def predict_files(model: "Model", files: list[str], *, ood: bool = True, progress=None, title: str = "predicting",
                  cluster=None) -> list[Prediction]:
    """``model.predict`` over ``files`` (on ``cluster``, a cluster.Cluster, when given) with ``progress`` started
    under ``title`` and closed here."""
    if cluster is not None:
        return cluster.predict_files(model, files, ood=ood, progress=progress)
    progress = resolve_progress(progress)
    progress.start(len(files), title)
    try:
        return model.predict(files, ood=ood, progress=progress)
    finally:
        progress.close()


def _input_items(images) -> list[tuple[str, object]]:
    """(name, source) per image: folders walked into their files (sources: path strings), images in memory as
    given, named by their position in ``images``."""
    given = list(images) if isinstance(images, (list, tuple)) else [images]
    items: list[tuple[str, object]] = []
    for i, item in enumerate(given):
        if isinstance(item, (str, os.PathLike)):
            items.extend((path, path) for path in expand_paths([item]))
        elif isinstance(item, Image.Image):
            items.append((f"<PIL image {i}>", item))
        elif isinstance(item, np.ndarray):
            items.append((f"<array {i}>", item))
        else:
            raise TypeError(f"predict: item {i} is a {type(item).__name__}; expected a file or folder path, "
                            "a PIL image or a numpy array")
    return items


def _static_dim(session, output: str) -> int | None:
    """The last dimension of ``output`` when the graph fixes it, else None."""
    for o in session.get_outputs():
        if o.name == output:
            return o.shape[-1] if o.shape and isinstance(o.shape[-1], int) else None
    return None


def _check_graph(session, labels: list[str], input_size: int, graph_name: str, labels_name: str) -> None:
    """The graph takes ``image`` at ``input_size``, outputs one probability per label, and was trained
    with these labels in this order when it says which (cxrlab writes them into its metadata)."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if "image" not in inputs or "probabilities" not in outputs:
        raise ModelDirError(f"{graph_name}: not a cxrlab classifier (needs an 'image' input and a 'probabilities' "
                            f"output; has inputs {sorted(inputs)}, outputs {sorted(outputs)})")
    side = inputs["image"][-1] if inputs["image"] else None
    if isinstance(side, int) and side != input_size:
        raise ModelDirError(f"{graph_name}: takes {side}x{side} images but cxrlab.json says input_size {input_size}")
    n = _static_dim(session, "probabilities")
    if n is not None and n != len(labels):
        raise ModelDirError(f"{Path(graph_name).parent}: {Path(labels_name).name} has {len(labels)} labels but "
                            f"{Path(graph_name).name} outputs {n} scores")
    stored = session.get_modelmeta().custom_metadata_map.get("labels")
    if stored is not None:
        try:
            trained = json.loads(stored)
            check_labels(trained)
        except (ValueError, RecursionError, Invalid):
            raise ModelDirError(f"{graph_name}: its 'labels' metadata is not a list of label names") from None
        _same_labels(labels, trained, labels_name, graph_name)


def _same_labels(given: list[str], trained: list[str], given_name, trained_name: str) -> None:
    if [x.strip() for x in given] != [x.strip() for x in trained]:
        effect = "every answer would be inverted" if len(given) == 2 else "answers would be mislabelled"
        hint = f" (the same labels in another order: {effect})" if sorted(given) == sorted(trained) else ""
        raise ModelDirError(f"{given_name}: lists labels {show(given)} but {trained_name} was trained with "
                            f"{show(trained)}{hint}; use the labels file written with the model")


def _graph_decision(data: bytes, labels: list[str]) -> dict:
    """The positive class and threshold a cxrlab graph carries in its metadata (cxrlab.graph.decision_metadata),
    as cxrlab.json's fields; nothing when absent or not valid for these labels (the highest score then decides)."""
    import math

    import onnx

    try:
        meta = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
        positive, threshold = meta.get("positive_label"), float(meta.get("threshold", "nan"))
    except Exception:  # noqa: BLE001 - unreadable metadata: decide by the highest score
        return {}
    if positive not in labels or len(labels) != 2 or not (math.isfinite(threshold) and 0 <= threshold <= 1):
        return {}
    return {"positive_label": positive, "operating_point": {"threshold": threshold, "rule": "from the graph"}}


def _graph_input_size(data: bytes, graph: Path) -> int:
    import onnx

    try:
        dims = onnx.load_from_string(data).graph.input[0].type.tensor_type.shape.dim
    except Exception as exc:  # protobuf raises several untyped errors on a file that is not ONNX
        raise ModelDirError(f"{graph}: not an ONNX model written by cxrlab ({exc})") from None
    size = dims[-1].dim_value if len(dims) else 0
    lo, hi = INPUT_SIZE_RANGE
    if not lo <= size <= hi:
        raise ModelDirError(f"{graph}: the input image size is not fixed in the graph ({size}); "
                            f"cxrlab needs a graph with a static 'image' input of {lo}..{hi} pixels")
    return int(size)
