import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cxrlab
from cxrlab.backbones import REGISTRY, create_backbone, get_spec, list_backbones
from cxrlab.errors import BackboneError


@pytest.mark.parametrize("name", list(REGISTRY))
def test_registry_entries_are_complete(name):
    spec = get_spec(name)
    assert spec.input_size >= 224 and spec.embed_dim >= 1000 and len(spec.weights_sha256) == 64
    assert spec.preprocessing()["input_size"] == spec.input_size and spec.license


def test_unknown_backbone_suggests():
    with pytest.raises(BackboneError, match="Did you mean 'efficientnet-lite2'"):
        get_spec("efficientnet-lite3")
    assert "onnx:PATH" in list_backbones()


def test_lite0_onnx_matches_torch():
    import torch

    bb = create_backbone("efficientnet-lite0")
    spec = bb.spec
    module = spec.builder(spec, __import__("cxrlab.backbones", fromlist=["weights_path"]).weights_path(spec)).eval()
    x = np.random.default_rng(0).random((2, 1, 224, 224), dtype=np.float32)
    from cxrlab.embed import make_session

    ort_emb = make_session(bb.onnx_path).run(["embedding"], {"image": x})[0]
    with torch.no_grad():
        torch_emb = module(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(ort_emb, torch_emb, atol=1e-3, rtol=1e-3)


def _user_onnx(path, opset):
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])], "user",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 30, 30])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)


@pytest.mark.parametrize("opset", [13, 18])
def test_user_onnx_backbone_trains_and_predicts(tmp_path, tiny_dataset, opset):
    path = tmp_path / "enc.onnx"
    _user_onnx(path, opset)
    result = cxrlab.train(tiny_dataset, output=tmp_path / "m", backbone=f"onnx:{path}", report=False)
    model = cxrlab.load_model(result.model_dir)
    pred = model.predict([sorted((tiny_dataset / "normal").iterdir())[0]])[0]
    assert pred.error is None and set(pred.scores) == {"abnormal", "normal"}
    with pytest.raises(BackboneError, match="file not found"):
        create_backbone(f"onnx:{tmp_path / 'missing.onnx'}")


def test_distortions_bypass_cache_and_warn_about_flips(tmp_path, tiny_dataset):
    r = cxrlab.train(tiny_dataset, output=tmp_path / "m", flip_left_right=True, random_brightness=10,
                     random_crop=5, distortion_copies=2, report=False, ood=False, fine_tune=False)
    assert any("heart" in n for n in r.notes)
    assert r.metrics["n"]["train"] > 0


def test_int8_only_where_validated(tmp_path, tiny_dataset, shenzhen_dir):
    """int8 embeddings of real films stay close to fp32 (calibrated on other films of the same set).

    Synthetic 96 px blobs are no stand-in here: how close int8 stays depends on the CPU's integer kernels
    (AVX2 without VNNI saturates full-range weights), and only real films show what a user gets."""
    from cxrlab.precision import int8_offered, with_precision

    assert int8_offered("efficientnet-lite0") and not int8_offered("inception-v3")
    bb = create_backbone("efficientnet-lite0")
    films = sorted(shenzhen_dir.rglob("*.jpg")) + sorted(shenzhen_dir.rglob("*.png"))
    calibration, held_out = films[::10], films[5:200:25]
    q = with_precision(bb, "int8", calibration, n_calibration=64)
    assert q.precision == "int8" and q.cache_key() != bb.cache_key()
    from cxrlab.embed import Embedder

    e32, e8 = Embedder(bb).embed_files(held_out).vectors, Embedder(q).embed_files(held_out).vectors
    cos = np.sum(e32 * e8, 1) / np.linalg.norm(e32, axis=1) / np.linalg.norm(e8, axis=1)
    assert len(cos) == 8 and cos.mean() > 0.92 and cos.min() > 0.88
    paths = sorted(tiny_dataset.rglob("*.png"))
    spec_onnx = tmp_path / "x.onnx"
    _user_onnx(spec_onnx, 13)
    with pytest.raises(BackboneError, match="not been validated"):
        with_precision(create_backbone(f"onnx:{spec_onnx}"), "int8", paths)


def test_inception_v3_exports_and_matches_torch():
    import torch

    from cxrlab.backbones import weights_path
    from cxrlab.embed import make_session

    bb = create_backbone("inception-v3")
    module = bb.spec.builder(bb.spec, weights_path(bb.spec))
    x = np.random.default_rng(0).random((1, 1, 299, 299), dtype=np.float32)
    ort_emb, feats = make_session(bb.onnx_path).run(["embedding", "features"], {"image": x})
    with torch.no_grad():
        torch_emb = module(torch.from_numpy(x))[0].numpy()
    assert ort_emb.shape == (1, 2048) and feats.shape == (1, 2048, 8, 8)
    np.testing.assert_allclose(ort_emb, torch_emb, atol=1e-3, rtol=1e-3)
