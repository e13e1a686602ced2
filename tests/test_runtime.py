"""The inference engines (cxrlab.runtime): ONNX Runtime as the reference, OpenVINO in fp32 and bf16, how `auto`
chooses, the bf16 parity record a trained model carries, and one pass through the network per image."""

import json
import os

import numpy as np
import pytest

import cxrlab
from cxrlab import runtime
from cxrlab.backbones import cache_dir, create_backbone
from cxrlab.cli import main
from cxrlab.embed import Embedder, prepare, read_file
from cxrlab.errors import CxrlabError
from cxrlab.predict import load_model
from cxrlab.runtime import REFERENCE, Engine, make_session, resolve

from conftest import synthetic_xray

needs_openvino = pytest.mark.skipif(not runtime.openvino_installed(), reason="the 'openvino' package is not installed")
needs_bf16 = pytest.mark.skipif(not runtime.native_bf16(),
                                reason="this CPU has no native bf16 (OpenVINO lists no BF16 capability)")


@pytest.fixture(scope="module")
def tiny_model(tiny_backbone, tmp_path_factory):
    from conftest import make_dataset

    data = make_dataset(tmp_path_factory.mktemp("lungs") / "lungs", n_per_class=30)
    out = tmp_path_factory.mktemp("model") / "model"
    cxrlab.train(data, output=out, backbone=tiny_backbone, fine_tune=False, how_many_training_steps=60, report=False)
    return out, data


def arrays(n: int, size: int) -> np.ndarray:
    return np.stack([np.asarray(synthetic_xray(i, i % 2 == 0, size), np.float32) / 255 for i in range(n)])


# ------------------------------------------------------------------ choosing the engine
def test_unknown_choices_and_impossible_combinations_are_refused_with_a_reason(monkeypatch):
    with pytest.raises(CxrlabError, match="unknown runtime 'tensorrt'"):
        resolve("tensorrt")
    with pytest.raises(CxrlabError, match="int8 is chosen when training"):
        resolve("auto", "int8")
    with pytest.raises(CxrlabError, match="ONNX Runtime's CPU kernels have no bf16"):
        resolve("onnxruntime", "bf16")
    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
    with pytest.raises(CxrlabError, match="no native bf16"):
        resolve("auto", "bf16")


def test_auto_is_the_reference_unless_bf16_is_both_native_and_checked(monkeypatch):
    assert resolve() == REFERENCE
    assert resolve(bf16_ok=True) == (Engine("openvino", "bf16") if runtime.native_bf16() and not runtime._cuda()
                                     else REFERENCE)
    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
    assert resolve(bf16_ok=True) == REFERENCE
    assert resolve("onnxruntime", "auto", bf16_ok=True) == REFERENCE


def test_an_int8_graph_runs_as_its_cross_validated_auc_was_measured_unless_openvino_is_named():
    from cxrlab.train_options import TrainOptions

    assert TrainOptions(precision="int8").engine() == REFERENCE
    assert TrainOptions(precision="int8", runtime="onnxruntime").engine() == REFERENCE
    if runtime.openvino_installed():
        assert TrainOptions(precision="int8", runtime="openvino").engine() == Engine("openvino", "fp32")


def test_bf16_is_offered_only_for_backbones_whose_cross_validated_auc_it_kept():
    for name, (fp32, bf16) in runtime.BF16_AUC.items():
        assert runtime.bf16_offered(name) == (fp32 - bf16 <= runtime.AUC_TOLERANCE)
    assert not runtime.bf16_offered("onnx:/some/graph.onnx")


# ------------------------------------------------------------------ the OpenVINO session
@needs_openvino
def test_openvino_fp32_gives_onnx_runtimes_outputs_names_shapes_and_metadata(tiny_model):
    data = (tiny_model[0] / "model.onnx").read_bytes()
    ort, ov = make_session(data, threads=1), make_session(data, threads=1, engine=Engine("openvino", "fp32"))
    assert [(i.name, i.shape[1:]) for i in ov.get_inputs()] == [(i.name, i.shape[1:]) for i in ort.get_inputs()]
    assert [o.name for o in ov.get_outputs()] == [o.name for o in ort.get_outputs()]
    assert ov.get_modelmeta().custom_metadata_map["labels"] == ort.get_modelmeta().custom_metadata_map["labels"]
    x = arrays(5, 64)[:, None]
    names = ["probabilities", "embedding"]
    for a, b in zip(ort.run(names, {"image": x}), ov.run(names, {"image": x})):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    first = ov.run(["probabilities"], {"image": x})[0]
    ov.run(["probabilities"], {"image": x[::-1].copy()})
    np.testing.assert_array_equal(first, ov.run(["probabilities"], {"image": x})[0])  # outputs are copies


@needs_bf16
@needs_openvino
def test_openvino_sends_no_usage_report(tmp_path):
    """OpenVINO's own telemetry writes a client id under ~/intel and posts an event on import; through
    cxrlab it is never loaded."""
    import subprocess
    import sys

    script = ("import sys, numpy as np\n"
              "from cxrlab import runtime\n"
              "from cxrlab.backbones import create_backbone\n"
              "s = runtime.make_session(create_backbone('efficientnet-lite0').onnx_path, "
              "engine=runtime.Engine('openvino', 'fp32'))\n"
              "s.run(['embedding'], {'image': np.zeros((1, 1, 224, 224), np.float32)})\n"
              "print(sys.modules.get('openvino_telemetry'))\n")
    env = {**os.environ, "HOME": str(tmp_path)}
    env.setdefault("CXRLAB_CACHE_DIR", str(cache_dir()))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
    assert not (tmp_path / "intel").exists()


def test_an_embedder_whose_every_image_is_cached_never_compiles_the_graph(tmp_path):
    from cxrlab.cache import EmbeddingStore
    from conftest import make_dataset

    bb = create_backbone("efficientnet-lite0")
    paths = sorted(make_dataset(tmp_path / "lungs", n_per_class=3, size=72).rglob("*.png"))
    store = EmbeddingStore(tmp_path / "cache", bb.cache_key(), bb.spec.embed_dim)
    first = Embedder(bb).embed_files(paths, store=store)
    warm = Embedder(bb)
    again = warm.embed_files(paths, store=EmbeddingStore(tmp_path / "cache", bb.cache_key(), bb.spec.embed_dim))
    assert warm._session is None and again.hits == len(paths)
    assert np.array_equal(first.vectors, again.vectors)


def test_bf16_is_deterministic_and_close_to_fp32():
    bb = create_backbone("efficientnet-lite0")
    x = arrays(4, bb.spec.input_size)
    ref = Embedder(bb).embed_arrays(list(x))
    low = Embedder(bb, engine=Engine("openvino", "bf16"))
    a, b = low.embed_arrays(list(x)), low.embed_arrays(list(x))
    np.testing.assert_array_equal(a, b)
    cosine = np.sum(a * ref, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() > 0.99


def test_each_engine_has_its_own_cache_namespace():
    bb = create_backbone("efficientnet-lite0")
    assert Embedder(bb).cache_key() == bb.cache_key()
    if runtime.openvino_installed():
        keys = {Embedder(bb, engine=e).cache_key() for e in (REFERENCE, Engine("openvino", "fp32"))}
        assert len(keys) == 2


# ------------------------------------------------------------------ what a trained model records and how it is run
def test_a_trained_model_records_its_engine_and_bf16_parity(tiny_model):
    out, _ = tiny_model
    info = json.loads((out / "cxrlab.json").read_text())
    record = info["runtime"]
    assert record["trained_with"] == REFERENCE.to_json()  # an onnx: backbone has no cross-validated bf16 figure
    if runtime.native_bf16():
        parity = record["bf16"]
        assert parity["n"] > 0 and parity["data"] == "test split"
        assert parity["ok"] == (abs(parity["auc_change"]) <= runtime.AUC_TOLERANCE)
        assert parity["max_score_change"] >= 0 and 0 <= parity["decisions_changed"] <= parity["n"]
        assert load_model(out).engine == (Engine("openvino", "bf16") if parity["ok"] else REFERENCE)
    else:
        assert "bf16" not in record and record["bf16_not_checked"]
        assert load_model(out).engine == REFERENCE


def test_a_warm_rerun_reuses_the_parity_of_the_same_graph_and_a_forged_record_is_ignored(tiny_model, tiny_backbone,
                                                                                        tmp_path):
    """The record is keyed by the graph's bytes and the test films: the same training run gives the same
    record without running the graph again; a record edited on disk fails its HMAC and is measured again."""
    if not runtime.native_bf16():
        pytest.skip("this CPU has no native bf16 (OpenVINO lists no BF16 capability)")
    from cxrlab.backbones import cache_dir

    _, data = tiny_model
    records = cache_dir() / "records" / "parity"
    calls = []
    real = runtime.parity

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    def train(out):
        cxrlab.train(data, output=out, backbone=tiny_backbone, fine_tune=False,
                     how_many_training_steps=60, report=False)
        return json.loads((out / "cxrlab.json").read_text())["runtime"]["bf16"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "parity", counting)
        first = train(tmp_path / "a")
        before = len(calls)
        assert train(tmp_path / "b") == first and len(calls) == before  # looked up, not run
        for f in records.glob("*.json"):
            stored = json.loads(f.read_text())
            stored["record"]["ok"] = not stored["record"]["ok"]
            f.write_text(json.dumps(stored))
        assert train(tmp_path / "c") == first and len(calls) == before + 1  # the forgery is not believed


def test_parity_compares_the_same_graph_in_both_precisions(tiny_model):
    if not runtime.native_bf16():
        pytest.skip("this CPU has no native bf16 (OpenVINO lists no BF16 capability)")
    data = (tiny_model[0] / "model.onnx").read_bytes()
    x = list(arrays(12, 64))
    y = np.array([i % 2 == 0 for i in range(12)], int)
    p = runtime.parity(data, x, y, positive=0, threshold=0.5)
    assert p["n"] == 12 and p["auc_fp32"] is not None and p["auc_change"] == pytest.approx(p["auc_bf16"] - p["auc_fp32"], abs=2e-5)
    one_class = runtime.parity(data, x, np.zeros(12, int), positive=0, threshold=0.5)
    assert one_class["auc_fp32"] is None and one_class["ok"] is False  # unmeasurable is not a pass


@needs_openvino
def test_every_engine_answers_the_same_on_the_cli(tiny_model, capsys):
    out, data = tiny_model
    files = sorted(str(p) for p in (data / "abnormal").iterdir())[:6]
    answers = {}
    for rt, pr in (("onnxruntime", "fp32"), ("openvino", "fp32")):
        assert main(["predict", "--model", str(out), *files, "--format", "json", "--runtime", rt, "--precision", pr]) == 0
        answers[rt] = json.loads(capsys.readouterr().out)
    for a, b in zip(answers["onnxruntime"], answers["openvino"]):
        assert a["label"] == b["label"] and a["positive_score"] == pytest.approx(b["positive_score"], abs=1e-4)


def test_an_impossible_engine_choice_is_one_error_line(tiny_model, capsys):
    out, data = tiny_model
    code = main(["predict", "--model", str(out), str(data), "--runtime", "onnxruntime", "--precision", "bf16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "no bf16" in err[0]


# ------------------------------------------------------------------ one pass per image
def test_class_maps_come_from_the_prediction_pass(tiny_model):
    model = load_model(tiny_model[0])
    x = arrays(3, model.input_size)
    maps: list = []
    preds = model.predict_arrays(list(x), maps=maps)
    np.testing.assert_allclose(np.stack(maps), model.run(x, ["class_maps"])["class_maps"], rtol=1e-5, atol=1e-6)
    assert [p.label for p in preds] == [p.label for p in model.predict_arrays(list(x))]


def test_folder_predict_overlaps_decoding_yet_keeps_order_and_errors(tiny_model, tmp_path):
    model = load_model(tiny_model[0])
    files = sorted((tiny_model[1] / "normal").iterdir())[:7]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    order = [str(f) for f in files[:3]] + [str(bad)] + [str(f) for f in files[3:]]
    for batch_size in (1, 2, 16):
        preds = model.predict(order, batch_size=batch_size)
        assert [p.path for p in preds] == order
        assert [bool(p.error) for p in preds] == [p == str(bad) for p in order]
        one_by_one = [model.predict_arrays([prepare(read_file(f), model.input_size, f)[0]])[0] for f in order
                      if f != str(bad)]
        assert [p.scores for p in preds if not p.error] == [p.scores for p in one_by_one]


def test_evaluate_records_the_engine_it_ran_on(tiny_model, tmp_path):
    out, data = tiny_model
    r = cxrlab.evaluate(load_model(out, runtime="onnxruntime", precision="fp32"), data)
    assert r.metrics["engine"] == REFERENCE.to_json()
