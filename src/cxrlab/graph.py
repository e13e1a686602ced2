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
    """The fused graph (see the module's docstring); ``metadata``: the ONNX metadata_props (save_model
    replaces them with the model's decision rule, see decision_metadata)."""
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


def decision_metadata(info: dict) -> dict[str, str]:
    """What another runtime needs to reproduce cxrlab's answer from ``model.onnx`` alone (its metadata_props):
    the labels in output order, the positive class and threshold of the decision, the calibration (already
    inside the graph), the input it expects, and the checks cxrlab runs before it believes a score. The
    out-of-distribution arrays and the chest-check network stay in the model folder; their settings are here."""
    import json

    from ._version import __version__

    op, positive, labels = info.get("operating_point"), info.get("positive_label"), info["labels"]
    meta = {"producer": "cxrlab", "cxrlab_version": __version__, "labels": json.dumps(labels),
            "outputs": "probabilities: calibrated, one per label in the order of 'labels'",
            "input": json.dumps({"name": "image", "shape": ["batch", 1, info["backbone"]["input_size"],
                                                           info["backbone"]["input_size"]],
                                 "values": "grey levels in [0, 1]",
                                 "preprocessing": info["backbone"].get("preprocessing")}),
            "calibration": json.dumps(info.get("calibration")),
            "intended_use": "research and education; not a medical device"}
    if op and positive in labels:
        other = [lab for lab in labels if lab != positive]
        meta.update(positive_label=positive, threshold=repr(float(op["threshold"])),
                    operating_point=json.dumps(op),
                    decision=(f"{positive} when probabilities[{labels.index(positive)}] >= {float(op['threshold'])!r}, "
                              f"else {other[0] if len(other) == 1 else 'the highest-scoring other label'}"))
    else:
        meta["decision"] = "the label with the highest probability"
    if info.get("chest_check"):
        meta["chest_check"] = json.dumps(info["chest_check"])
    if info.get("ood"):
        meta["shift_check"] = json.dumps({**info["ood"], "input": "the 'embedding' output"})
    return meta


def set_metadata(onnx_bytes: bytes, metadata: dict[str, str]) -> bytes:
    """``onnx_bytes`` with its metadata_props replaced by ``metadata`` (the graph itself unchanged)."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    del model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    model.producer_name = "cxrlab"
    return model.SerializeToString()
