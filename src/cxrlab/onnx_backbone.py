"""onnx:PATH backbones: any ONNX feature extractor, adapted to cxrlab's backbone interface.

The user's graph must take one float input (N, C, H, W) with static H and W (C = 1 or 3) in [0, 1]
(wrap it if it needs other normalisation) and yield a (N, D, h, w) feature map or an (N, D)
embedding as its first output. cxrlab prepends gray -> C channels and appends global average pooling,
and writes the adapted graph to the user cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .backbone_types import EXPORT_VERSION, Backbone, BackboneSpec, cache_dir, sha256_file
from .errors import BackboneError


ONNX_PREFIX = "onnx:"


def onnx_file(name: str) -> str | None:
    """The PATH of a backbone name 'onnx:PATH', else None (the one place that reads this syntax)."""
    return name[len(ONNX_PREFIX):] if name.startswith(ONNX_PREFIX) else None


def _load(path: str):
    import onnx

    p = Path(path)
    if not p.is_file():
        raise BackboneError(f"{ONNX_PREFIX}{path}: file not found. Give the path of an .onnx feature extractor, e.g. {ONNX_PREFIX}models/encoder.onnx")
    try:
        return onnx.load(str(p))
    except Exception as exc:
        raise BackboneError(f"{ONNX_PREFIX}{path}: not a readable ONNX model ({exc})") from None


def _shape(model):
    inp = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] not in (1, 3) or not dims[2] or dims[2] != dims[3]:
        raise BackboneError(f"input '{inp.name}' has shape {dims}; cxrlab needs (N, 1 or 3, S, S) with a fixed S")
    out = model.graph.output[0]
    rank = len(out.type.tensor_type.shape.dim)
    dim = out.type.tensor_type.shape.dim[1].dim_value if rank >= 2 else 0
    if rank not in (2, 4) or not dim:
        raise BackboneError(f"first output '{out.name}' must be (N, D) or (N, D, h, w) with a fixed D")
    return dims[1], dims[2], dim, rank


def spec_from_onnx(path: str) -> BackboneSpec:
    channels, size, dim, _ = _shape(_load(path))
    return BackboneSpec(f"{ONNX_PREFIX}{path}", size, dim, mean=0.0, std=1.0, description=f"user ONNX model {path}")


def create_onnx_backbone(path: str) -> Backbone:
    import onnx
    from onnx import TensorProto, helper

    from .fsutil import atomic_write_bytes

    digest = sha256_file(path) if Path(path).is_file() else ""
    model = _load(path)
    channels, size, dim, rank = _shape(model)
    spec = BackboneSpec(f"{ONNX_PREFIX}{path}", size, dim, mean=0.0, std=1.0, weights_sha256=digest,
                        description=f"user ONNX model {Path(path).name}")
    target = cache_dir() / "backbones" / f"onnx-{digest[:16]}-v{EXPORT_VERSION}.onnx"
    if not target.is_file():
        g = model.graph
        user_in, user_out = g.input[0].name, g.output[0].name
        nodes = [helper.make_node("Concat", ["image"] * channels, [user_in], axis=1, name="cxrlab_gray_to_c")]
        del g.input[0]
        g.input.insert(0, helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, size, size]))
        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)
        if opset < 13:
            raise BackboneError(f"{ONNX_PREFIX}{path}: opset {opset} is too old; re-export with opset 13 or newer")
        g.initializer.append(onnx.numpy_helper.from_array(np.array([2, 3], "int64"), "cxrlab_axes"))
        if rank == 4 and opset >= 18:
            tail = [helper.make_node("Identity", [user_out], ["features"]),
                    helper.make_node("ReduceMean", [user_out, "cxrlab_axes"], ["embedding"], keepdims=0)]
        elif rank == 4:
            tail = [helper.make_node("Identity", [user_out], ["features"]),
                    helper.make_node("ReduceMean", [user_out], ["embedding"], axes=[2, 3], keepdims=0)]
        else:
            tail = [helper.make_node("Identity", [user_out], ["embedding"]),
                    helper.make_node("Unsqueeze", [user_out, "cxrlab_axes"], ["features"])]
        new_nodes = nodes + list(g.node) + tail
        del g.node[:]
        g.node.extend(new_nodes)
        del g.output[:]
        g.output.extend([helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim]),
                         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", dim, "h", "w"])])
        atomic_write_bytes(target, model.SerializeToString())
    return Backbone(spec, target, digest, ("embedding", "features"))
