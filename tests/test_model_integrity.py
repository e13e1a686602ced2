"""A model directory or model file never silently gives wrong answers.

- the labels file must match the labels stored in model.onnx (or, for a user's bare ONNX, its output count);
- the SHA-256 record in cxrlab.json is mandatory, and covers every file the model needs;
- ``--trust-modified-model`` skips only the hash check (loudly): every value is validated all the same;
- operating-point rules are parsed up front, and a bare number above 1 is refused, not guessed at;
- ``datasets download --sha256`` is honoured on every path.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import cxrlab
from cxrlab.calibrate import OperatingPointSpec, choose_operating_point, parse_operating_point
from cxrlab.cli import build_parser, main
from cxrlab.compat import label_image_main
from cxrlab.errors import DataError, ModelDirError
from cxrlab.modeldir import _info_digest
from cxrlab.predict import Model

from conftest import make_dataset
from conftest import write_tiny_backbone

LABELS = ["abnormal", "normal"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model (tiny ONNX backbone, OOD gate on) and the folder it was trained on."""
    root = tmp_path_factory.mktemp("integrity")
    data = make_dataset(root / "lungs", 12, 64)
    backbone = f"onnx:{write_tiny_backbone(root / 'tiny.onnx')}"
    result = cxrlab.train(data, output=root / "model", backbone=backbone, bottleneck_dir=root / "bn", report=False,
                          validation_percentage=25, testing_percentage=25)
    return result.model_dir, data


@pytest.fixture
def model_copy(trained, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(trained[0], d)
    return d


@pytest.fixture
def image(trained):
    return sorted((trained[1] / "abnormal").glob("*.png"))[0]


def read_info(d: Path) -> dict:
    return json.loads((d / "cxrlab.json").read_text())


def write_info(d: Path, info: dict) -> None:
    (d / "cxrlab.json").write_text(json.dumps(info, indent=2))


def rehash(d: Path) -> None:
    """Record the current files' digests, so that only the value checks can object."""
    info = read_info(d)
    info["files"] = {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in info["files"]}
    info.pop("info_sha256", None)
    info["info_sha256"] = _info_digest(info)
    write_info(d, info)


def set_path(info: dict, path: tuple, value) -> None:
    node = info
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def run_cli(entry, argv, capsys) -> tuple[int, str, str]:
    rc = entry(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc, out, err, *needles):
    assert rc == 1 and out == "", (rc, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


# ------------------------------------------------------------------ labels: file vs the labels in model.onnx
def test_swapped_labels_file_is_refused_for_a_bare_graph(trained, tmp_path, image, capsys):
    model_dir, _ = trained
    swapped = tmp_path / "labels.txt"
    swapped.write_text("normal\nabnormal\n")
    rc, out, err = run_cli(label_image_main, ["--graph", str(model_dir / "model.onnx"), "--labels", str(swapped),
                                              "--image", str(image)], capsys)
    assert_one_line_error(rc, out, err, str(swapped), "inverted")
    with pytest.raises(ModelDirError, match="was trained with"):
        Model.from_graph(model_dir / "model.onnx", swapped)
    # the right labels file, with Windows line ends and stray blank lines, still works
    ok = tmp_path / "ok.txt"
    ok.write_bytes(b"abnormal\r\n\r\nnormal\r\n")
    assert Model.from_graph(model_dir / "model.onnx", ok).labels == LABELS
    # alone, the graph's metadata still carry the shipped decision: the same threshold, the same answers
    bare = Model.from_graph(model_dir / "model.onnx", ok)
    full = Model(model_dir)
    assert bare.threshold == full.threshold and bare.positive_label == full.positive_label == "abnormal"
    assert [p.label for p in bare.predict([str(image)], ood=False)] == \
        [p.label for p in full.predict([str(image)], ood=False)]


def test_swapped_labels_file_is_refused_beside_a_retrain_directory(trained, tmp_path, image, capsys):
    model_dir, _ = trained
    graph = tmp_path / "output_graph.pb"
    shutil.copyfile(model_dir / "model.onnx", graph)
    shutil.copytree(model_dir, tmp_path / "output_graph.cxrlab")
    swapped = tmp_path / "output_labels.txt"
    swapped.write_text("normal\nabnormal\n")
    rc, out, err = run_cli(label_image_main, ["--graph", str(graph), "--labels", str(swapped), "--image", str(image)],
                           capsys)
    assert_one_line_error(rc, out, err, "inverted")
    swapped.write_text("abnormal\nnormal\n")
    rc, out, err = run_cli(label_image_main, ["--graph", str(graph), "--labels", str(swapped), "--image", str(image)],
                           capsys)
    assert rc == 0 and "decision: " in out  # the directory's operating point applies


def test_labels_txt_and_cxrlab_json_swapped_together_are_refused(model_copy):
    """Rehashed so the SHA-256 record agrees: only the labels stored in model.onnx can tell."""
    (model_copy / "labels.txt").write_text("normal\nabnormal\n")
    info = read_info(model_copy)
    info["labels"] = ["normal", "abnormal"]
    write_info(model_copy, info)
    rehash(model_copy)
    with pytest.raises(ModelDirError, match=r"labels\.txt: lists labels .* was trained with .*inverted"):
        cxrlab.load_model(model_copy)


def _strip_metadata(src: Path, dst: Path) -> Path:
    import onnx

    m = onnx.load(str(src))
    del m.metadata_props[:]
    onnx.save(m, str(dst))
    return dst


def test_bare_onnx_without_labels_metadata_needs_the_output_count(trained, tmp_path, image):
    graph = _strip_metadata(trained[0] / "model.onnx", tmp_path / "user.onnx")
    labels = tmp_path / "labels.txt"
    labels.write_text("tb\nhealthy\n")
    model = Model.from_graph(graph, labels)
    assert model.labels == ["tb", "healthy"] and model.threshold is None
    assert model.predict([image])[0].label in ("tb", "healthy")
    for text, message in [("tb\nhealthy\nother\n", "has 3 labels but user.onnx outputs 2 scores"),
                          ("tb\n", "at least two"), ("tb\ntb\n", "must not repeat"), ("\n\n", "at least two")]:
        labels.write_text(text)
        with pytest.raises(ModelDirError, match=message):
            Model.from_graph(graph, labels)


def test_graph_with_broken_labels_metadata_is_refused(trained, tmp_path):
    import onnx

    m = onnx.load(str(trained[0] / "model.onnx"))
    for prop in m.metadata_props:
        if prop.key == "labels":
            prop.value = "{not json"
    onnx.save(m, str(tmp_path / "g.onnx"))
    (tmp_path / "labels.txt").write_text("abnormal\nnormal\n")
    with pytest.raises(ModelDirError, match="'labels' metadata"):
        Model.from_graph(tmp_path / "g.onnx", tmp_path / "labels.txt")


# ------------------------------------------------------------------ the SHA-256 record is mandatory
def _drop(path):
    def edit(info):
        node = info
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


def _assign(path, value):
    return lambda info: set_path(info, path, value)


def _both(*edits):
    def edit(info):
        for e in edits:
            e(info)
    return edit


UNVERIFIABLE = {
    "no-info-sha256+threshold-5": (_both(_drop(("info_sha256",)), _assign(("operating_point", "threshold"), 5.0)),
                                   "no info_sha256 record"),
    "no-info-sha256+valid-edit": (_both(_drop(("info_sha256",)), _assign(("operating_point", "threshold"), 0.9)),
                                  "no info_sha256 record"),
    "no-info-sha256+ood-nan": (_both(_drop(("info_sha256",)), _assign(("ood", "threshold"), math.nan)),
                               "no info_sha256 record"),
    "info-sha256-garbage": (_assign(("info_sha256",), "0" * 64), "content differs from the SHA-256"),
    "info-sha256-not-a-string": (_assign(("info_sha256",), 7), "content differs from the SHA-256"),
}


@pytest.mark.parametrize("case", list(UNVERIFIABLE))
def test_unverifiable_cxrlab_json_is_refused(model_copy, image, case, capsys):
    edit, message = UNVERIFIABLE[case]
    info = read_info(model_copy)
    edit(info)
    write_info(model_copy, info)
    with pytest.raises(ModelDirError, match=message):
        cxrlab.load_model(model_copy)
    rc, out, err = run_cli(main, ["predict", "--model", str(model_copy), str(image)], capsys)
    assert_one_line_error(rc, out, err, message, "--trust-modified-model")


FILES_RECORD = {
    # each: an edit of cxrlab.json (then its own digest is recomputed) and the expected complaint
    "files-deleted": (_drop(("files",)), "no valid 'files' record"),
    "files-not-a-dict": (_assign(("files",), ["model.onnx"]), "no valid 'files' record"),
    "model.onnx-unlisted": (_drop(("files", "model.onnx")), "does not list model.onnx"),
    "labels.txt-unlisted": (_drop(("files", "labels.txt")), "does not list labels.txt"),
    "ood-arrays-unlisted": (_drop(("files", "ood.safetensors")), "does not list ood.safetensors"),
    "model.onnx-wrong-digest": (_assign(("files", "model.onnx"), "0" * 64), "model.onnx: content differs"),
    "extra-entry-missing-file": (_assign(("files", "notes.txt"), "0" * 64), '"notes.txt", listed in cxrlab.json, is missing'),
    "extra-entry-outside-dir": (_assign(("files", "../cxrlab.json"), "0" * 64), '"../cxrlab.json", listed in'),
}


@pytest.mark.parametrize("case", list(FILES_RECORD))
def test_files_record_covers_every_needed_file(model_copy, case):
    edit, message = FILES_RECORD[case]
    info = read_info(model_copy)
    edit(info)
    info["info_sha256"] = _info_digest(info)
    write_info(model_copy, info)
    with pytest.raises(ModelDirError, match=message):
        cxrlab.load_model(model_copy)


def test_altered_ood_arrays_are_refused(model_copy):
    data = bytearray((model_copy / "ood.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (model_copy / "ood.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="ood.safetensors: content differs from the SHA-256"):
        cxrlab.load_model(model_copy)


# ------------------------------------------------------------------ --trust-modified-model
def test_trust_modified_loads_a_valid_edit_with_a_loud_warning(model_copy, image, capsys):
    info = read_info(model_copy)
    info["operating_point"]["threshold"] = 0.9
    del info["info_sha256"]
    write_info(model_copy, info)
    rc, out, err = run_cli(main, ["predict", "--model", str(model_copy), "--trust-modified-model", "--no-ood",
                                  str(image)], capsys)
    assert rc == 0 and "threshold 0.900" in out
    assert err.startswith("WARNING: --trust-modified-model") and "no info_sha256 record" in err
    model = cxrlab.load_model(model_copy, trust_modified=True)
    assert model.threshold == 0.9
    assert "WARNING" in capsys.readouterr().err


def test_trust_modified_on_an_intact_model_still_warns(trained, capsys):
    cxrlab.load_model(trained[0], trust_modified=True)
    assert "WARNING: --trust-modified-model" in capsys.readouterr().err


INVALID_VALUES = {
    "threshold-nan": (("operating_point", "threshold"), math.nan, "operating_point.threshold must be a finite"),
    "threshold-5": (("operating_point", "threshold"), 5.0, "operating_point.threshold"),
    "threshold-negative": (("operating_point", "threshold"), -0.1, "operating_point.threshold"),
    "threshold-string": (("operating_point", "threshold"), "0.5", "operating_point.threshold"),
    "threshold-bool": (("operating_point", "threshold"), True, "operating_point.threshold"),
    "threshold-missing": (("operating_point",), {"rule": "who"}, "operating_point.threshold is missing"),
    "ood-threshold-nan": (("ood", "threshold"), math.nan, "ood.threshold"),
    "ood-threshold-inf": (("ood", "threshold"), math.inf, "ood.threshold"),
    "ood-threshold-huge-int": (("ood", "threshold"), 10**400, "ood.threshold must be a finite number"),
    "temperature-huge-int": (("calibration", "temperature"), 10**400, "calibration.temperature"),
    "ood-threshold-null": (("ood", "threshold"), None, "ood.threshold must not be null"),
    "ood-reject-rate": (("ood", "reject_rate"), 2.0, "ood.reject_rate"),
    "ood-arrays-outside": (("ood", "arrays"), "../ood.safetensors", "ood.arrays must be a plain file name"),
    "ood-n-components": (("ood", "n_components"), 3, "components"),
    "temperature-zero": (("calibration", "temperature"), 0, "calibration.temperature must be a finite number > 0"),
    "temperature-nan": (("calibration", "temperature"), math.nan, "calibration.temperature"),
    "input-size-zero": (("backbone", "input_size"), 0, "backbone.input_size must be an integer"),
    "input-size-float": (("backbone", "input_size"), 64.0, "backbone.input_size"),
    "input-size-huge": (("backbone", "input_size"), 10**400, "backbone.input_size"),
    "input-size-other": (("backbone", "input_size"), 128, "takes 64x64 images but cxrlab.json says input_size 128"),
    "backbone-missing": (("backbone",), None, "backbone must not be null"),
    "backbone-precision": (("backbone", "precision"), "fp8", "backbone.precision"),
    "backbone-std": (("backbone", "std"), 0.0, "backbone.std"),
    "labels-empty": (("labels",), [], "labels must be a list of at least two"),
    "labels-repeated": (("labels",), ["abnormal", "abnormal"], "must not repeat"),
    "labels-not-strings": (("labels",), [1, 2], "labels"),
    "positive-label-unknown": (("positive_label",), "tb", "positive_label must be one of labels"),
    "positive-label-dropped": (("positive_label",), None, "operating_point needs a positive_label"),
    "schema-version-string": (("schema_version",), "1", "schema_version \"1\" is not supported"),
    "schema-version-bool": (("schema_version",), True, "schema_version true is not supported"),
    "metrics-not-object": (("metrics",), [1], "metrics must be an object"),
}


@pytest.mark.parametrize("case", list(INVALID_VALUES))
def test_trust_modified_still_validates_every_value(model_copy, image, case, capsys):
    path, value, message = INVALID_VALUES[case]
    info = read_info(model_copy)
    set_path(info, path, value)
    write_info(model_copy, info)
    with pytest.raises(ModelDirError, match=re.escape(message)):
        cxrlab.load_model(model_copy, trust_modified=True)
    rc, out, err = run_cli(main, ["predict", "--model", str(model_copy), "--trust-modified-model", str(image)], capsys)
    assert rc == 1 and out == "" and "error: " in err and message in err and "Traceback" not in err


def _save_arrays(d: Path, **tensors) -> None:
    from safetensors.numpy import load, save

    arrays = load((d / "ood.safetensors").read_bytes())
    arrays.update(tensors)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    (d / "ood.safetensors").write_bytes(save(arrays))


BAD_ARRAYS = {
    "nan-mean": (lambda a: {"mean": np.full_like(a["mean"], np.nan)}, "array mean must hold finite floats"),
    "int-scales": (lambda a: {"scales": np.ones(a["scales"].shape, np.int64)}, "array scales must hold finite floats"),
    "wrong-shape": (lambda a: {"components": a["components"][:, :3].copy()}, "array components has shape"),
    "zero-spread": (lambda a: {"spreads": np.zeros(2)}, "must be positive"),
    "missing": (lambda a: {"centers": None}, "lacks array(s) centers"),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_ood_arrays_are_validated(model_copy, case):
    from safetensors.numpy import load

    make, message = BAD_ARRAYS[case]
    _save_arrays(model_copy, **make(load((model_copy / "ood.safetensors").read_bytes())))
    rehash(model_copy)
    with pytest.raises(ModelDirError, match=re.escape(message)):
        cxrlab.load_model(model_copy)
    (model_copy / "ood.safetensors").write_bytes(b"not safetensors")
    rehash(model_copy)
    with pytest.raises(ModelDirError, match="not a readable safetensors file"):
        cxrlab.load_model(model_copy)


# ------------------------------------------------------------------ every model-loading command has the flag
def _commands(model: Path, data: Path, image: Path, out: Path) -> dict[str, list[str]]:
    return {
        "predict": ["predict", "--model", str(model), str(image)],
        "evaluate": ["evaluate", "--model", str(model), str(data)],
        "explain": ["explain", "--model", str(model), str(image), "--output", str(out / "heat")],
        "ood-check": ["ood-check", "--model", str(model), str(image)],
        "site-shift": ["site-shift", "--model", str(model), str(data)],
    }


@pytest.mark.parametrize("command", ["predict", "evaluate", "explain", "ood-check", "site-shift"])
def test_every_command_refuses_then_trusts_a_modified_model(model_copy, trained, image, tmp_path, command, capsys):
    info = read_info(model_copy)
    info["created_by"] = "edited by hand"
    write_info(model_copy, info)
    argv = _commands(model_copy, trained[1], image, tmp_path)[command]
    rc, out, err = run_cli(main, argv, capsys)
    assert_one_line_error(rc, out, err, "cxrlab.json: content differs from the SHA-256")
    rc, out, err = run_cli(main, argv + ["--trust-modified-model"], capsys)
    assert rc == 0 and "WARNING: --trust-modified-model" in err and "Traceback" not in err, err


def test_serve_and_label_image_take_the_flag(model_copy, image, capsys):
    from cxrlab.serve import create_app

    info = read_info(model_copy)
    info["created_by"] = "edited by hand"
    write_info(model_copy, info)
    assert build_parser().parse_args(["serve", "--model", str(model_copy), "--trust-modified-model"]).trust_modified_model
    with pytest.raises(ModelDirError, match="content differs"):
        create_app(model_copy)
    assert create_app(model_copy, trust_modified=True).state.model.labels == LABELS
    assert "WARNING: --trust-modified-model" in capsys.readouterr().err
    graph = model_copy.parent / "g.onnx"
    shutil.copyfile(model_copy / "model.onnx", graph)
    shutil.copytree(model_copy, model_copy.parent / "g.cxrlab")
    argv = ["--graph", str(graph), "--labels", str(model_copy / "labels.txt"), "--image", str(image)]
    rc, out, err = run_cli(label_image_main, argv, capsys)
    assert_one_line_error(rc, out, err, "content differs")
    rc, out, err = run_cli(label_image_main, argv + ["--trust-modified-model"], capsys)
    assert rc == 0 and "decision: " in out and "WARNING" in err


# ------------------------------------------------------------------ fuzz: random edits, loaded with trust
CONSUMED = [("schema_version",), ("labels",), ("labels", 0), ("labels", 1), ("positive_label",), ("backbone",),
            ("backbone", "input_size"), ("backbone", "std"), ("backbone", "precision"), ("backbone", "onnx_outputs"),
            ("operating_point",), ("operating_point", "threshold"), ("operating_point", "rule"),
            ("operating_point", "sensitivity"), ("calibration",), ("calibration", "temperature"),
            ("calibration", "method"), ("ood",), ("ood", "threshold"), ("ood", "reject_rate"), ("ood", "arrays"),
            ("ood", "n_components"), ("files",), ("files", "model.onnx"), ("info_sha256",), ("metrics",),
            ("metrics", "test")]

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.integers(),
    st.sampled_from([math.nan, math.inf, -math.inf, 10**400, -(10**400), -1, 0, 1.5, 5.0, 0.5, 1e-300]),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.text(max_size=6),
    st.sampled_from(["abnormal", "normal", "fp32", "int8", "temperature", "../x", "model.onnx", "labels.txt", ""]),
    st.lists(st.sampled_from(["abnormal", "normal", "", 1, None]), max_size=3),
    st.dictionaries(st.sampled_from(["threshold", "rule", "arrays", "input_size", "temperature"]),
                    st.one_of(st.floats(allow_nan=True), st.text(max_size=3), st.integers()), max_size=3),
)


def _all_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _all_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _all_paths(v, prefix + (i,))


@pytest.fixture(scope="module")
def fuzz_dir(trained, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz") / "m"
    shutil.copytree(trained[0], d)
    return d, read_info(d), _gray_array(trained[1])


def _gray_array(data: Path) -> np.ndarray:
    from PIL import Image

    path = sorted((data / "normal").glob("*.png"))[0]
    return np.asarray(Image.open(path).convert("L").resize((64, 64)), np.float32) / 255


def _assert_sane(model: Model, array: np.ndarray) -> None:
    """Whatever loaded, loaded with valid values: never a silently wrong model."""
    assert model.labels == LABELS  # labels.txt is untouched, so a model with other labels must not load
    assert model.input_size == 64
    if model.threshold is not None:
        assert isinstance(model.threshold, float) and 0 <= model.threshold <= 1
        assert model.positive_label in model.labels
    if model.ood_gate is not None:
        assert math.isfinite(model.ood_gate.threshold)
        assert all(np.all(np.isfinite(getattr(model.ood_gate, k))) for k in ("mean", "components", "scales"))
    pred = model.predict_arrays([array])[0]
    assert pred.label in (*LABELS, None) and all(math.isfinite(p) for p in pred.scores.values())
    if pred.ood is not None:
        assert math.isfinite(pred.ood_score)


@settings(max_examples=int(os.environ.get("CXRLAB_FUZZ_EXAMPLES", 120)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_edited_cxrlab_json_loads_valid_or_raises_modeldirerror(fuzz_dir, data):
    d, original, array = fuzz_dir
    info = copy.deepcopy(original)
    paths = list(_all_paths(original))[1:]
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = data.draw(st.one_of(st.sampled_from(CONSUMED), st.sampled_from(paths)), label="path")
        try:
            node = info
            for key in path[:-1]:
                node = node[key]
            if data.draw(st.booleans(), label="delete"):
                del node[path[-1]]
            else:
                node[path[-1]] = data.draw(JUNK, label="value")
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced this path
    (d / "cxrlab.json").write_text(json.dumps(info))
    changed = json.dumps(info, sort_keys=True) != json.dumps(original, sort_keys=True)
    if changed:
        with pytest.raises(ModelDirError):
            cxrlab.load_model(d)  # without the opt-out every edit is refused
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            model = cxrlab.load_model(d, trust_modified=True)
        except ModelDirError as exc:
            assert "\n" not in str(exc)
            event("refused")  # pytest --hypothesis-show-statistics counts the outcomes
            return
    event("loaded")
    assert stderr.getvalue().startswith("WARNING: --trust-modified-model")
    _assert_sane(model, array)


# ------------------------------------------------------------------ operating points
@pytest.mark.parametrize("spec,kind,target", [
    ("who", "who", None), ("Youden", "youden", None), ("argmax", "argmax", None),
    ("sensitivity=0.9", "sensitivity", 0.9), ("sensitivity=90%", "sensitivity", 0.9), ("sens=1", "sensitivity", 1.0),
    ("specificity=0.7", "specificity", 0.7), ("spec:70 %", "specificity", 0.7), ("sensitivity=100%", "sensitivity", 1.0),
])
def test_parse_operating_point_accepts_fractions_and_explicit_percentages(spec, kind, target):
    parsed = parse_operating_point(spec)
    assert isinstance(parsed, OperatingPointSpec) and parsed.kind == kind
    assert parsed.target == (None if target is None else pytest.approx(target))
    assert parse_operating_point(parsed) is parsed and parse_operating_point(str(parsed)) == parsed


@pytest.mark.parametrize("spec", [
    "sensitivity=1.5", "sensitivity=90", "specificity=70", "sensitivity=150%", "sensitivity=0", "sensitivity=0%",
    "sensitivity=nan", "sensitivity=inf", "sensitivity=-0.5", "sensitivity=", "sensitivity=0.9.1", "sensitivity=1e-1",
    "precision=0.9", "best", "", "who=1", None, 0.9,
])
def test_parse_operating_point_refuses_everything_else_showing_the_valid_forms(spec):
    with pytest.raises(DataError) as e:
        parse_operating_point(spec)
    message = str(e.value)
    assert "\n" not in message and "sensitivity=0.9" in message and "sensitivity=90%" in message


def test_choose_operating_point_takes_a_parsed_spec():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    by_text = choose_operating_point(y, s, "sensitivity=90%")
    by_spec = choose_operating_point(y, s, parse_operating_point("sensitivity=0.9"))
    assert by_text.threshold == by_spec.threshold and by_spec.rule == "sensitivity=0.9"
    with pytest.raises(DataError, match="not a fraction"):
        choose_operating_point(y, s, "sensitivity=1.5")


def test_bad_operating_point_fails_before_any_embedding(tmp_path, monkeypatch, capsys):
    import cxrlab.crossval
    import cxrlab.training

    def no_backbone(*a, **k):
        raise AssertionError("the backbone was built before the operating point was checked")

    monkeypatch.setattr(cxrlab.training, "create_backbone", no_backbone)  # cv embeds through training's steps
    data = make_dataset(tmp_path / "lungs", 3, 32)
    rc, out, err = run_cli(main, ["train", str(data), "--operating-point", "sensitivity=1.5", "-q"], capsys)
    assert rc == 2, "a bad option value is a usage error (exit 2), found by the parser"
    assert_one_line_error(1, out, err, "sensitivity=1.5", "not a fraction")
    with pytest.raises(DataError, match="not a fraction"):
        cxrlab.crossval.cross_validate(data, operating_point="sensitivity=90")


# ------------------------------------------------------------------ datasets --sha256
def _archive(path: Path) -> Path:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 100).save(buf, "PNG")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("CXR_png/CHNCXR_0001_1.png", buf.getvalue())
        z.writestr("CXR_png/CHNCXR_0002_0.png", buf.getvalue())
    return path


@pytest.mark.parametrize("where", ["archive", "download-cache"])
def test_datasets_sha256_is_honoured_on_every_path(tmp_path, where, capsys):
    archive = _archive(tmp_path / "ChinaSet_AllFiles.zip")
    actual = hashlib.sha256(archive.read_bytes()).hexdigest()
    dest = tmp_path / "dest"
    argv = ["datasets", "download", "shenzhen", str(dest), "--sha256", "ab" * 32]
    if where == "archive":
        argv += ["--archive", str(archive)]
    else:  # an archive already fetched into dest/.downloads: no network needed
        (dest / ".downloads").mkdir(parents=True)
        shutil.copyfile(archive, dest / ".downloads" / archive.name)
    rc, out, err = run_cli(main, argv, capsys)
    assert_one_line_error(rc, out, err, actual, "ab" * 32, "mismatch")
    assert not (dest / "abnormal").exists() and not (dest / "normal").exists()  # nothing extracted
    if where == "download-cache":
        shutil.copyfile(archive, dest / ".downloads" / archive.name)  # the mismatching copy was deleted
    argv[argv.index("--sha256") + 1] = actual.upper()
    rc, out, err = run_cli(main, argv, capsys)
    assert rc == 0 and "1 abnormal, 1 normal" in out, err
