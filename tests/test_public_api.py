"""The public API: every function's parameters are named, documented and visible in help();
Model.predict takes PIL images and numpy arrays, scored exactly as the same image saved as a file."""

import dataclasses
import inspect
import io
import pydoc
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cxrlab
from cxrlab.decode import decode_array, decode_image, decode_pil
from cxrlab.training import TrainOptions

PUBLIC = {"train": lambda: cxrlab.train, "load_model": lambda: cxrlab.load_model,
          "Model.predict": lambda: cxrlab.Model.predict, "evaluate": lambda: cxrlab.evaluate,
          "explain": lambda: cxrlab.explain}


def documented_parameters(doc: str) -> list[str]:
    """Names in a numpydoc 'Parameters' section: its 'name : type' lines, up to the next section's title."""
    lines = inspect.cleandoc(doc).splitlines()
    start = lines.index("Parameters") + 2
    assert re.fullmatch(r"-{3,}", lines[start - 1])
    names = []
    for line, following in zip(lines[start:], lines[start + 1:] + [""]):
        if line.strip() and re.fullmatch(r"-{3,}", following.strip()):
            break
        match = re.match(r"(\w+) : ", line)
        if match:
            names.append(match.group(1))
    return names


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_each_parameter_is_named_documented_and_in_help(name):
    func = PUBLIC[name]()
    params = [p for p in inspect.signature(func).parameters.values() if p.name != "self"]
    hidden = [p.name for p in params if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    assert not hidden, f"{name} hides options behind *{hidden}"
    assert documented_parameters(func.__doc__) == [p.name for p in params], name
    help_text = pydoc.render_doc(func, renderer=pydoc.plaintext)
    signature = help_text[help_text.index(f"{func.__name__}("):].split(") ->")[0]
    missing = [p.name for p in params if not re.search(rf"\b{p.name}\b", signature)]
    assert not missing, f"help({name}) does not list {missing}"


def test_the_public_names_are_exported():
    for name in ("train", "load_model", "Model", "Prediction", "evaluate", "explain"):
        assert name in cxrlab.__all__ and name in dir(cxrlab)
    assert callable(cxrlab.explain) and callable(cxrlab.evaluate) and callable(cxrlab.train)


def test_train_options_are_keywords_with_the_defaults_of_train_options():
    params = list(inspect.signature(cxrlab.train).parameters.values())
    assert params[0].name == "image_dir" and params[0].kind == params[0].POSITIONAL_OR_KEYWORD
    fields = dataclasses.fields(TrainOptions)
    assert [p.name for p in params[1:]] == [f.name for f in fields]
    assert all(p.kind == p.KEYWORD_ONLY for p in params[1:])
    assert {p.name: p.default for p in params[1:]} == dataclasses.asdict(TrainOptions())


def test_train_names_a_misspelt_keyword(tmp_path):
    with pytest.raises(TypeError, match="outptu"):
        cxrlab.train(tmp_path, outptu=tmp_path / "m")


def test_import_cxrlab_stays_light():
    code = ("import sys, cxrlab; heavy = [m for m in ('sklearn', 'scipy', 'torch', 'cxrlab.training') "
            "if m in sys.modules]; cxrlab.train; print(heavy, 'cxrlab.training' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True"]


def test_modules_named_like_public_functions_still_load():
    import importlib

    module = importlib.import_module("cxrlab.explain")
    assert inspect.ismodule(module) and module.explain is cxrlab.explain
    assert cxrlab.explain is module.explain  # importing the module does not replace the function


# ------------------------------------------------------------------ images in memory
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small model on the tiny ONNX backbone (64 px input), with its OOD gate."""
    from conftest import make_dataset
    from conftest import write_tiny_backbone

    root = make_dataset(tmp_path_factory.mktemp("data") / "lungs", n_per_class=12)
    backbone = f"onnx:{write_tiny_backbone(tmp_path_factory.mktemp('bb') / 'tiny.onnx')}"
    out = tmp_path_factory.mktemp("run") / "model"
    cxrlab.train(root, output=out, backbone=backbone, validation_percentage=25, testing_percentage=25, report=False)
    return cxrlab.load_model(out), root


def xray(size: int = 96) -> np.ndarray:
    from conftest import synthetic_xray

    big = np.kron(synthetic_xray(3, True, 96), np.ones((size // 96 + 1,) * 2, np.uint8))
    return np.ascontiguousarray(big[:size, : size * 5 // 6])


def saved(tmp_path, image: Image.Image, name: str) -> str:
    path = tmp_path / name
    image.save(path)
    return str(path)


def same_prediction(a, b):
    assert a.error is None and b.error is None
    assert a.scores == b.scores and a.label == b.label
    assert (a.ood, a.ood_score) == (b.ood, b.ood_score)


@pytest.mark.parametrize("size", [96, 400])  # 400: large enough for the box-reduction while decoding
def test_arrays_and_pil_images_score_as_their_png_file(tiny_model, tmp_path, size):
    model, _ = tiny_model
    grey = xray(size)
    grey16 = grey.astype(np.uint16) * 16 + 7  # 12-bit data in a 16-bit container
    rgb = np.stack([grey, grey, np.clip(grey.astype(int) + 40, 0, 255).astype(np.uint8)], axis=-1)
    cases = [(grey, "grey.png"), (grey16, "grey16.png"), (rgb, "rgb.png"), (np.dstack([rgb, grey]), "rgba.png")]
    for array, name in cases:
        path = saved(tmp_path, Image.fromarray(array), name)
        from_file, from_array, from_pil = model.predict([path, array, Image.open(path)])
        same_prediction(from_array, from_file)
        same_prediction(from_pil, from_file)
        assert (from_array.path, from_pil.path) == ("<array 1>", "<PIL image 2>")


def test_float_and_wide_integer_arrays_follow_the_file_rules(tiny_model, tmp_path):
    model, _ = tiny_model
    grey = xray()
    path = saved(tmp_path, Image.fromarray(grey), "grey.png")
    by_file = model.predict(path)[0]
    for array in (grey / 255.0, (grey / 255.0).astype(np.float32), grey.astype(np.int64), grey.astype(np.float64),
                  grey[..., None]):
        pred = model.predict(array)[0]
        assert pred.scores == pytest.approx(by_file.scores, abs=1e-6) and pred.label == by_file.label
    float_tiff = saved(tmp_path, Image.fromarray((grey * 3.5).astype(np.float32)), "f.tiff")
    same_prediction(model.predict(float_tiff)[0], model.predict((grey * 3.5).astype(np.float32))[0])


@pytest.mark.parametrize("dtype,scale,offset", [(np.uint16, 64, 0), (np.int32, 1, -100), (np.float32, 1 / 255, 0)])
def test_decode_array_matches_decode_image_of_the_same_samples(tmp_path, dtype, scale, offset):
    samples = (xray().astype(np.float64) * scale + offset).astype(dtype)
    fmt = "PNG" if dtype == np.uint16 else "TIFF"
    buf = io.BytesIO()
    Image.fromarray(samples).save(buf, fmt)
    by_file = decode_image(buf.getvalue(), name=f"x.{fmt.lower()}")
    for decoded in (decode_array(samples), decode_pil(Image.fromarray(samples))):
        assert np.array_equal(decoded.pixels, by_file.pixels)
        assert (decoded.width, decoded.height, decoded.bit_depth) == (by_file.width, by_file.height,
                                                                      by_file.bit_depth)


def test_wide_colour_arrays_use_the_grey_level_rules():
    grey = xray()
    rgb16 = np.stack([grey, grey, grey], axis=-1).astype(np.uint16) * 16  # 12-bit colour
    decoded = decode_array(rgb16)
    assert np.allclose(decoded.pixels, grey * 16.0 / 4095, atol=1e-6) and decoded.bit_depth == 12
    assert not decoded.color


def test_a_mixed_list_keeps_its_order_and_walks_folders(tiny_model):
    model, root = tiny_model
    folder = root / "normal"
    files = sorted(str(p) for p in folder.iterdir())
    grey = xray()
    preds = model.predict([grey, str(folder), Image.fromarray(grey), files[0]])
    assert [p.path for p in preds] == ["<array 0>", *files, "<PIL image 2>", files[0]]
    assert all(p.error is None for p in preds)
    same_prediction(preds[0], preds[len(files) + 1])
    same_prediction(preds[1], preds[-1])


def test_bad_arrays_come_back_as_errors_like_unreadable_files(tiny_model, tmp_path):
    model, _ = tiny_model
    bad = {"wrong ndim": np.zeros((2, 32, 32, 3), np.uint8), "channels first": np.zeros((3, 40, 40), np.uint8),
           "empty": np.zeros((0, 64), np.uint8), "NaN only": np.full((40, 40), np.nan),
           "infinite only": np.full((40, 40), np.inf, np.float32), "complex": np.zeros((40, 40), complex),
           "object": np.array([[None, 1], [2, 3]], dtype=object), "0-d": np.array(3.0),
           "absurd aspect": np.zeros((1, 5000), np.uint8)}
    preds = model.predict([*bad.values(), xray(), str(tmp_path / "missing.png")])
    for (case, _), pred in zip(bad.items(), preds):
        assert pred.error and pred.label is None and not pred.scores, case
    reasons = dict(zip(bad, (p.error for p in preds)))
    assert "shape (2, 32, 32, 3)" in reasons["wrong ndim"] and "moveaxis" in reasons["channels first"]
    assert "empty" in reasons["empty"] and "no finite value" in reasons["NaN only"]
    assert "complex" in reasons["complex"] and "aspect ratio" in reasons["absurd aspect"]
    assert preds[-2].error is None and preds[-2].path == f"<array {len(bad)}>"
    assert preds[-1].error and "not found" in preds[-1].error


def test_predict_refuses_an_item_of_another_type(tiny_model):
    model, _ = tiny_model
    with pytest.raises(TypeError, match="item 1 is a dict"):
        model.predict([xray(), {"image": 1}])


def test_public_evaluate_and_explain_take_a_model_or_its_directory(tiny_model, tmp_path):
    model, root = tiny_model
    files = sorted((root / "abnormal").iterdir())[:2]
    result = cxrlab.explain(model.directory, [*files, tmp_path / "missing.png"], tmp_path / "heat")
    assert [h.path for h in result.heatmaps] == [str(f) for f in files]
    assert [p for p, _ in result.skipped] == [str(tmp_path / "missing.png")] and result.summary["n"] == 2
    assert sorted(p.name for p in result.output_dir.iterdir() if not p.name.startswith(".")) == sorted(
        f"{f.stem}{x}" for f in files for x in (".npy", ".png"))
    evaluation = cxrlab.evaluate(model, root)
    assert evaluation.metrics["n_images"] == 24 and 0 <= evaluation.metrics["all"]["auc"] <= 1
