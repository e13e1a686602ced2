"""Reduced precision: an int8 copy of a backbone's ONNX graph, calibrated on training images.

ONNX Runtime's static quantisation (QDQ, per-channel int8 weights, uint8 activations) uses the
CPU's integer dot-product instructions (AVX-512 VNNI / AVX2) where present. Weights use 7 bits
(``reduce_range``): on CPUs without VNNI (AVX2 only) the u8 x s8 products of full-range weights
saturate, and lite0's embeddings then keep a cosine of only 0.57-0.83 to fp32 on Shenzhen films
(0.86-0.93 with reduce_range; measured on an AVX2-only EPYC). The calibration
images change the result, so the quantised graph is keyed by their digests in the cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from .backbones import Backbone, cache_dir
from .errors import BackboneError
from .runtime import TRAIN_PRECISIONS

PRECISIONS = TRAIN_PRECISIONS  # bf16 and auto: the engine's (runtime.py); int8: the graph's
AUC_TOLERANCE = 0.005

# Shenzhen, 5-fold `cxrlab cv` (same folds), mean AUC fp32 -> int8. int8 is offered only where the
# drop stays within AUC_TOLERANCE; re-measure with `cxrlab cv --precision int8` after changes.
INT8_AUC = {
    "efficientnet-lite0": (0.889, 0.901),  # re-measured with 7-bit weights and an fp32 stem (AVX2-only CPU)
    "efficientnet-lite1": (0.906, 0.898),
    "efficientnet-lite2": (0.911, 0.910),
    "inception-v3": (0.899, 0.893),
}


def int8_offered(name: str) -> bool:
    fp32, int8 = INT8_AUC.get(name, (None, None))
    return fp32 is not None and fp32 - int8 <= AUC_TOLERANCE


def quantize_backbone(backbone: Backbone, calibration: list[np.ndarray], *, batch_size: int = 4) -> Backbone:
    """Return an int8 version of ``backbone``; ``calibration`` are resized (S, S) training images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .fsutil import atomic_write_bytes, file_lock

    if not calibration:
        raise BackboneError("int8 needs calibration images (the training images); none were given")
    digest = hashlib.sha256(f"{backbone.weights_sha256} reduce_range fp32-stem".encode())
    for a in calibration:
        digest.update(np.ascontiguousarray(a, np.float32).tobytes())
    tag = digest.hexdigest()[:16]
    target = cache_dir() / "backbones" / f"{Path(backbone.onnx_path).stem}-int8-{tag}.onnx"

    class Reader(CalibrationDataReader):
        """The calibration batches, one range of them at a time (``CalibStridedMinMax``)."""

        def __init__(self):
            self.batches = [np.stack(calibration[i : i + batch_size])[:, None].astype(np.float32)
                            for i in range(0, len(calibration), batch_size)]
            self.set_range(0, len(self.batches))

        def __len__(self):
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int):
            self.todo = iter(self.batches[start_index:end_index])

        def get_next(self):
            batch = next(self.todo, None)
            return None if batch is None else {"image": batch}

    if not target.is_file():
        with file_lock(target.with_suffix(".lock")), tempfile.TemporaryDirectory() as tmp:
            if not target.is_file():
                prepped = os.path.join(tmp, "prepped.onnx")
                out = os.path.join(tmp, "int8.onnx")
                quant_pre_process(str(backbone.onnx_path), prepped, skip_symbolic_shape=True)
                quantize_static(prepped, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                                reduce_range=True, nodes_to_exclude=_stem_conv(prepped),
                                # min/max merged one batch at a time, the same ranges: every intermediate output
                                # of every calibration image held at once took 1.9 GB for lite0, batches of 4 keep it at 0.6 GB
                                extra_options={"CalibStridedMinMax": 1})
                atomic_write_bytes(target, Path(out).read_bytes())
    return replace(backbone, onnx_path=target, precision="int8", calibration_sha256=tag)


def _stem_conv(onnx_path: str) -> list[str]:
    """The first convolution (nodes are stored in topological order): kept in fp32, since it sees the raw
    intensities and costs little (on Shenzhen films this lifts the int8/fp32 embedding cosine from 0.86-0.93
    to 0.89-0.95)."""
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "Conv"][:1]


def with_precision(backbone: Backbone, precision: str, calibration_paths, *, n_calibration: int = 64) -> Backbone:
    """``backbone`` at ``precision``; int8 is calibrated on up to ``n_calibration`` of the given images."""
    from .embed import prepare, read_file
    from .errors import ImageError

    if precision not in PRECISIONS:
        raise BackboneError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "int8":
        return backbone
    if not int8_offered(backbone.id):
        measured = INT8_AUC.get(backbone.id)
        why = (f"on Shenzhen cross-validation its AUC fell from {measured[0]:.3f} to {measured[1]:.3f}, more than "
               f"{AUC_TOLERANCE}" if measured else "it has not been validated against fp32")
        offered = ", ".join(n for n in INT8_AUC if int8_offered(n))
        raise BackboneError(f"int8 is not offered for '{backbone.id}': {why}. Use fp32, or int8 with {offered}.")
    paths = list(calibration_paths)
    step = max(1, len(paths) // n_calibration)
    arrays = []
    for path in paths[::step][:n_calibration]:
        try:
            arrays.append(prepare(read_file(path), backbone.spec.input_size, str(path))[0])
        except ImageError:
            continue
    return quantize_backbone(backbone, arrays)
