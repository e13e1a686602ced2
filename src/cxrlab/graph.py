"""Graph: fuse an exported backbone and a trained linear head into one ONNX model.

The fused graph takes ``image`` (N, 1, S, S) in [0, 1] and yields ``probabilities`` (calibrated
softmax), ``logits``, ``embedding``, ``class_maps`` (the exact class activation maps
sum_c W_kc A_c, whose spatial mean plus the bias is the logit) and, where the backbone has
one, ``imagenet_logits``.
"""

from __future__ import annotations

import numpy as np

MODEL_OUTPUTS = ("probabilities", "logits", "embedding", "class_maps")


def fuse_head(backbone_onnx: str | bytes, coef: np.ndarray, intercept: np.ndarray, *, temperature: float = 1.0,
              metadata: dict[str, str] | None = None) -> bytes:
    import onnx  # only when a model is built: predict and the CLI start without it
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(backbone_onnx) if isinstance(backbone_onnx, bytes) else onnx.load(backbone_onnx)
    g = model.graph
    k, d = coef.shape
    extra = [o.name for o in g.output if o.name == "imagenet_logits"]
    g.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(coef, np.float32), "head_W"),
        numpy_helper.from_array(np.ascontiguousarray(intercept, np.float32), "head_b"),
        numpy_helper.from_array(np.ascontiguousarray(coef, np.float32).reshape(k, d, 1, 1), "head_W_conv"),
        numpy_helper.from_array(np.array(temperature, np.float32), "head_T"),
    ])
    g.node.extend([
        helper.make_node("Gemm", ["embedding", "head_W", "head_b"], ["logits"], transB=1, name="head_gemm"),
        helper.make_node("Div", ["logits", "head_T"], ["logits_calibrated"], name="head_temperature"),
        helper.make_node("Softmax", ["logits_calibrated"], ["probabilities"], axis=1, name="head_softmax"),
        helper.make_node("Conv", ["features", "head_W_conv"], ["class_maps"], kernel_shape=[1, 1], name="head_cam"),
    ])
    outputs = {o.name: o for o in g.output}
    del g.output[:]
    g.output.extend([
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", k]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k]),
        outputs["embedding"],
        helper.make_tensor_value_info("class_maps", TensorProto.FLOAT, ["batch", k, "h", "w"]),
        *[outputs[name] for name in extra],
    ])
    del model.metadata_props[:]
    for key, value in sorted((metadata or {}).items()):
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    model.producer_name = "cxrlab"
    onnx.checker.check_model(model)
    return model.SerializeToString()
