"""Runtime: an ONNX graph -> an inference session on the engine that measured fastest for it here.

Two engines run the same graphs. ONNX Runtime is the reference (and the GPU engine, with its CUDA
provider). OpenVINO runs them in bfloat16 on CPUs with native bf16 instructions (AVX512-BF16, AMX),
where it measured 1.7-2.4x ONNX Runtime's fp32 rate on cxrlab's graphs; in fp32 it measured no faster
(0.97x a head-only model, 0.73x a fine-tuned one with test-time augmentation), so ``auto`` keeps ONNX
Runtime unless bf16 is to be used. bf16 changes scores slightly: a model is run in bf16 by default only
where its recorded parity check (``parity``: AUC within ``AUC_TOLERANCE`` of fp32 on its test split)
passed, and a backbone embeds in bf16 by default only where its Shenzhen cross-validated AUC did
(``BF16_AUC``). Int8 lives in the graph (``cxrlab.precision``), not in the engine.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .errors import CxrlabError

RUNTIMES = ("auto", "openvino", "onnxruntime")
EXECUTION_PRECISIONS = ("auto", "fp32", "bf16")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "int8")  # int8: a quantised backbone graph (precision.py)
RAY_DEVICES = ("auto", "cpu", "gpu")  # what fine-tuning workers on a Ray cluster train on (--ray-device)
AUC_TOLERANCE = 0.005

# Shenzhen, 5-fold `cxrlab cv --head-only` (same folds), mean AUC with embeddings in fp32 -> bf16.
# A backbone embeds in bf16 by default only where the drop stays within AUC_TOLERANCE; re-measure
# with `cxrlab cv --head-only --precision fp32|bf16` after changes.
BF16_AUC: dict[str, tuple[float, float]] = {
    "efficientnet-lite0": (0.898, 0.897),  # 2026-12-02, an AMD EPYC with AVX512-BF16
    "efficientnet-lite1": (0.914, 0.917),
    "efficientnet-lite2": (0.913, 0.910),
    "inception-v3": (0.905, 0.904),
}


@dataclass(frozen=True)
class Engine:
    runtime: str = "onnxruntime"
    precision: str = "fp32"  # execution precision; an int8 graph runs its int8 parts as int8 either way

    def __str__(self) -> str:
        return f"{self.runtime} {self.precision}"

    def to_json(self) -> dict:
        return {"runtime": self.runtime, "precision": self.precision}


REFERENCE = Engine()


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


@functools.cache
def openvino():
    """The ``openvino`` module, imported without its usage reporting.

    Importing OpenVINO sends an event with a persistent client id to Google Analytics (its
    ``openvino_telemetry`` package, on unless the user opted out). Films of patients are read on these
    machines: nothing is sent. Marking that package absent makes OpenVINO use the silent stub it ships
    for when the package is missing; the user's own settings files are left alone."""
    sys.modules.setdefault("openvino_telemetry", None)
    import openvino as ov

    return ov


@functools.cache
def openvino_installed() -> bool:
    try:
        openvino()
    except ImportError:
        return False
    return True


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU runs bf16 natively (OpenVINO lists BF16 among its CPU capabilities only then)."""
    if not openvino_installed():
        return False
    try:
        return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # OpenVINO raises its own untyped errors for a device it cannot open
        return False


@functools.cache
def _cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def lanes(threads: int | None, engine: Engine) -> tuple[int, int]:
    """(lanes, threads per lane) for a long run of batches: with ``threads`` given, one lane of that many
    threads; else on a CPU one single-threaded lane per core, each running its own batch (about 15% less CPU
    per image than one batch on all cores, whose threads wait for each other at every layer and for the
    decoding threads that share the cores), and on a GPU one lane."""
    if threads:
        return 1, int(threads)
    if engine.runtime == "onnxruntime" and _cuda():
        return 1, default_threads()
    return default_threads(), 1


def lane_batch(batch_size: int, n_lanes: int) -> int:
    """Each lane's share of a batch of ``batch_size`` images: lanes do not multiply the memory of a batch."""
    return -(-batch_size // n_lanes)


def bf16_offered(backbone: str) -> bool:
    fp32, bf16 = BF16_AUC.get(backbone, (None, None))
    return fp32 is not None and fp32 - bf16 <= AUC_TOLERANCE


def resolve(runtime: str = "auto", precision: str = "auto", *, bf16_ok: bool = False, why_not: str = "") -> Engine:
    """The engine for ``runtime`` / ``precision`` (see RUNTIMES, EXECUTION_PRECISIONS). ``auto`` precision is
    bf16 only on a CPU with native bf16 and where ``bf16_ok`` (a parity check passed); ``auto`` runtime is
    OpenVINO only for bf16. An explicit choice this machine cannot honour is an error naming why."""
    if runtime not in RUNTIMES:
        raise CxrlabError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if precision not in EXECUTION_PRECISIONS:
        raise CxrlabError(f"unknown precision {precision!r} for running a model; use one of "
                          f"{', '.join(EXECUTION_PRECISIONS)} (int8 is chosen when training: --precision int8)")
    if runtime == "openvino" and not openvino_installed():
        raise CxrlabError("--runtime openvino: the 'openvino' package is not installed (pip install openvino)")
    if precision == "bf16":
        if runtime == "onnxruntime":
            raise CxrlabError("--precision bf16 runs on OpenVINO; ONNX Runtime's CPU kernels have no bf16")
        if not native_bf16():
            raise CxrlabError("--precision bf16: this CPU has no native bf16 instructions (AVX512-BF16 or AMX), "
                              "where it would run slower than fp32; use fp32")
        return Engine("openvino", "bf16")
    if precision == "auto" and bf16_ok and runtime != "onnxruntime" and native_bf16() and not _cuda():
        return Engine("openvino", "bf16")
    if runtime == "openvino":
        return Engine("openvino", "fp32")
    return REFERENCE


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks of up to 32 MB for reuse instead of handing them back to the kernel.

    Every decoded film allocates a few fresh arrays of a few hundred kB. By default glibc maps each one anew
    and unmaps it when freed, and the first touch of every 4 kB page is then a page fault: about 220 per
    image, which (at 2-2.5 us each in a virtual machine) doubled the time to decode and resize a film here.
    Process-wide and harmless where it does not apply (another C library: nothing is changed)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 64 << 20))


def make_session(onnx: str | os.PathLike | bytes, *, threads: int | None = None, engine: Engine = REFERENCE):
    """An inference session with ONNX Runtime's interface (``run``, ``get_inputs``, ``get_outputs``,
    ``get_modelmeta``) on ``engine``. Sessions are made before heavy work: the allocator is tuned for it here."""
    keep_freed_memory()
    threads = threads or default_threads()
    if engine.runtime == "openvino":
        return OpenVINOSession(onnx, threads=threads, precision=engine.precision)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    source = onnx if isinstance(onnx, bytes) else str(onnx)
    return ort.InferenceSession(source, so, providers=providers)


@functools.cache
def _core():
    return openvino().Core()


class OpenVINOSession:
    """An OpenVINO CPU compilation of an ONNX graph behind ONNX Runtime's session interface.

    ``threads`` threads per inference, as the ONNX Runtime sessions are set up; with fewer threads than cores
    (serve runs one request per core, each on one thread) as many streams as fit, so that requests from several
    threads run side by side. Each calling thread gets its own infer request (a compiled model is shared, a
    request is not)."""

    def __init__(self, onnx: str | os.PathLike | bytes, *, threads: int, precision: str = "fp32"):
        core = _core()
        # Read by OpenVINO itself: the onnx package costs a second of start-up, most of a one-image predict.
        model = core.read_model(onnx if isinstance(onnx, bytes) else Path(onnx).read_bytes(), b"")
        self._metadata = _metadata(model)
        self._outputs = [_port(o) for o in model.outputs]
        # A cxrlab model's linear head runs here in fp32: in bf16 it moved probabilities by up to 6e-4 from the
        # figures train measured (on the same bf16 embeddings), for no speed.
        model, self._head = _split_head(model)
        if self._head is not None:  # OpenVINO leaves the embedding's width open; the head's weights fix it
            for o in self._outputs:
                if o.name == "embedding":
                    o.shape = [o.shape[0], self._head.W.shape[1]]
        streams = max(1, default_threads() // int(threads))
        self._compiled = core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": streams * int(threads), "NUM_STREAMS": streams})
        self._inputs = [_port(p) for p in self._compiled.inputs]
        self._local = threading.local()

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs

    def get_modelmeta(self):
        return SimpleNamespace(custom_metadata_map=dict(self._metadata))

    def run(self, output_names, feeds: dict) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        if _numpy_bridge_ready.is_set():
            by_name = _infer(request, feeds)
        else:
            # OpenVINO's bindings set up their numpy bridge on first use without guarding against a second thread:
            # two lanes starting at once deadlocked. The first inference of the process runs alone.
            with _first_inference:
                by_name = _infer(request, feeds)
                _numpy_bridge_ready.set()
        if self._head is not None:
            by_name.update(self._head.outputs(by_name))
        names = output_names or [o.name for o in self._outputs]
        return [by_name[n] for n in names]


_first_inference = threading.Lock()
_numpy_bridge_ready = threading.Event()


def _infer(request, feeds: dict) -> dict[str, np.ndarray]:
    result = request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
    # The request reuses its output buffers on the next call: keep copies.
    return {name: array for port, value in result.items() for array in [np.array(value)] for name in port.get_names()}


@dataclass(frozen=True)
class _Head:
    """The linear head that cxrlab.graph.fuse_head appends, computed in fp32 numpy as ONNX Runtime does."""

    W: np.ndarray  # (k, d)
    b: np.ndarray  # (k,)
    T: np.float32
    W_conv: np.ndarray  # (k, c)

    def outputs(self, body: dict) -> dict:
        logits = body["embedding"].astype(np.float32) @ self.W.T + self.b
        z = logits / self.T
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return {"logits": logits, "probabilities": e / e.sum(axis=1, keepdims=True),
                "class_maps": np.einsum("kc,nchw->nkhw", self.W_conv, body["features"].astype(np.float32))}


HEAD_WEIGHTS = ("head_W", "head_b", "head_T", "head_W_conv")
HEAD_OUTPUTS = ("probabilities", "logits", "class_maps")


def _split_head(model):
    """(body, head): cxrlab's fused head taken out of an OpenVINO model read from ONNX (the body ends at
    ``embedding`` and ``features``), or (model, None) for a graph without one."""
    ops = {op.get_friendly_name(): op for op in model.get_ops()}
    ports = {name: port for op in model.get_ops() if op.get_type_name() != "Result"
             for port in op.outputs() for name in port.get_names()}
    if not all(name in ops and ops[name].get_type_name() == "Constant" for name in HEAD_WEIGHTS) \
            or "features" not in ports:
        return model, None
    w = {name: np.array(ops[name].get_data(), np.float32) for name in HEAD_WEIGHTS}
    kept = [o.get_any_name() for o in model.outputs if o.get_any_name() not in HEAD_OUTPUTS]
    body = openvino().Model([ports[name] for name in [*kept, "features"]], model.get_parameters(), "body")
    W = w["head_W"]
    return body, _Head(W, w["head_b"], np.float32(w["head_T"]), w["head_W_conv"].reshape(W.shape[0], -1))


def _metadata(model) -> dict[str, str]:
    """The ONNX file's metadata_props, which OpenVINO keeps under rt_info["framework"]."""
    if not model.has_rt_info(["framework"]):
        return {}
    keys = model.get_rt_info(["framework"]).astype(dict)
    return {key: model.get_rt_info(["framework", key]).astype(str) for key in keys}


def _port(port) -> SimpleNamespace:
    shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
    return SimpleNamespace(name=port.get_any_name(), shape=shape)




def parity(onnx: bytes, arrays: list[np.ndarray], y: np.ndarray, *, positive: int | None, threshold: float | None,
           batch_size: int = 16, threads: int | None = None) -> dict:
    """The same graph on the same images, fp32 on ONNX Runtime against bf16 on OpenVINO: AUC of each, the largest
    change of any probability, and how many decisions changed. ``ok``: the AUC moved by at most AUC_TOLERANCE."""
    from sklearn.metrics import roc_auc_score

    def probabilities(engine: Engine) -> np.ndarray:
        session = make_session(onnx, threads=threads, engine=engine)
        out = [session.run(["probabilities"], {"image": np.stack(arrays[i:i + batch_size])[:, None]})[0]
               for i in range(0, len(arrays), batch_size)]
        return np.concatenate(out).astype(np.float64)

    if not arrays:
        return {"ok": False, "n": 0, "auc_fp32": None, "auc_bf16": None, "auc_change": None, "max_score_change": 0.0,
                "decisions_changed": 0, "data": "no usable test image to check bf16 on"}
    ref, low = probabilities(REFERENCE), probabilities(Engine("openvino", "bf16"))
    if positive is not None and threshold is not None:
        changed = int(np.sum((ref[:, positive] >= threshold) != (low[:, positive] >= threshold)))
    else:
        changed = int(np.sum(ref.argmax(1) != low.argmax(1)))
    aucs = [None, None]
    if len(np.unique(y)) == ref.shape[1] >= 2:
        pos = 1 if positive is None else positive
        for k, p in enumerate((ref, low)):
            aucs[k] = float(roc_auc_score(y == pos, p[:, pos]) if ref.shape[1] == 2
                            else roc_auc_score(y, p, multi_class="ovr"))
    change = None if aucs[0] is None else aucs[1] - aucs[0]
    return {"ok": change is not None and abs(change) <= AUC_TOLERANCE, "n": len(arrays),
            "auc_fp32": _r(aucs[0]), "auc_bf16": _r(aucs[1]), "auc_change": _r(change),
            "max_score_change": round(float(np.abs(ref - low).max()), 5), "decisions_changed": changed,
            "data": "test split"}


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 5) + 0.0  # no -0.0
