"""Every long step shows a progress bar on stderr: site-shift (decoding, then every shifted copy), explain and
predict on folders (on a terminal, from PROGRESS_MIN_FILES files), and the shift reference of train and retrain,
the step that takes most of retrain's time, whose bar names it and says how to skip it (--no-shift-reference).

Fast: a tiny ONNX backbone and synthetic images (conftest)."""

from __future__ import annotations

import contextlib
import io

import pytest

import cxrlab
from cxrlab.cli import PROGRESS_MIN_FILES, main
from cxrlab.compat import retrain_main
from cxrlab.siteshift import SUITE

from conftest import make_dataset

GATE_BAR = "shift reference, "
SKIP_HINT = "(--no-shift-reference skips)"


@pytest.fixture(scope="module")
def lungs(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "lungs", n_per_class=12, size=48)


@pytest.fixture(scope="module")
def model(lungs, tiny_backbone, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "model"
    cxrlab.train(lungs, output=out, backbone=tiny_backbone, validation_percentage=25, testing_percentage=25,
                 report=False)
    return out


def call(argv, entry=main):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = entry([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def test_site_shift_shows_decoding_and_every_shifted_copy(model, lungs):
    n = 24
    rc, out, err = call(["site-shift", "--model", model, lungs])
    assert rc == 0 and "shift" in out
    assert "decoding" in err and f"{n}/{n}" in err
    assert f"scoring {len(SUITE)} site shifts" in err and f"{n * len(SUITE)}/{n * len(SUITE)}" in err


@pytest.mark.parametrize("command", ["explain", "predict"])
def test_folders_get_a_bar_on_a_terminal(command, model, lungs, tmp_path, monkeypatch):
    folder = lungs / "normal"  # 12 files, given as a folder
    argv = ([command, "--model", model, folder] +
            (["--output", tmp_path / "heat"] if command == "explain" else []))
    desc = "explaining" if command == "explain" else "predicting"
    rc, out, err = call(argv)
    assert rc == 0 and desc not in err  # stderr is not a terminal here: a log file stays clean
    monkeypatch.setattr("cxrlab.cli._stderr_is_terminal", lambda: True)
    rc, out, err = call(argv[:-1] + [tmp_path / "heat2"] if command == "explain" else argv)
    assert rc == 0 and desc in err and "12/12" in err
    one = sorted(folder.glob("*.png"))[:PROGRESS_MIN_FILES - 1]  # a short list: no bar
    rc, out, err = call([command, "--model", model, *one] +
                        (["--output", tmp_path / "heat3"] if command == "explain" else []))
    assert rc == 0 and desc not in err


def test_predict_explain_option_gets_the_bar_too(model, lungs, tmp_path, monkeypatch):
    monkeypatch.setattr("cxrlab.cli._stderr_is_terminal", lambda: True)
    rc, out, err = call(["predict", "--model", model, lungs / "abnormal", "--explain", tmp_path / "heat"])
    assert rc == 0 and "predicting" in err and "explaining" in err and "12 heatmap(s)" in err


@pytest.mark.parametrize("entry", ["train", "retrain"])
def test_the_shift_reference_bar_names_the_step_and_its_skip(entry, lungs, tiny_backbone, tmp_path):
    if entry == "train":
        argv = ["train", lungs, "--backbone", tiny_backbone, "--no-report", "-o", tmp_path / "m"]
        rc, out, err = call(argv)
    else:
        argv = ["--image_dir", lungs, "--architecture", tiny_backbone, "--no-report",
                "--output_graph", tmp_path / "g.pb", "--output_labels", tmp_path / "labels.txt"]
        rc, out, err = call(argv, retrain_main)
    assert rc == 0, err
    bar = [line for line in err.replace("\r", "\n").splitlines() if GATE_BAR in line]
    assert bar and SKIP_HINT in bar[-1] and "x 8 site shifts" in bar[-1]
    assert "100%" in bar[-1] and "<00:00" in bar[-1]  # the bar ends with the step's elapsed time


def test_no_shift_reference_keeps_the_chest_check(model, lungs, tiny_backbone, tmp_path):
    rc, out, err = call(["train", lungs, "--backbone", tiny_backbone, "--no-report", "--no-shift-reference",
                         "-o", tmp_path / "m"])
    assert rc == 0, err
    assert GATE_BAR not in err
    skipped = cxrlab.load_model(tmp_path / "m")
    assert skipped.ood_gate is None and skipped.chest_check is not None
    assert cxrlab.load_model(model).ood_gate is not None  # the default keeps it
    (p,) = skipped.predict([lungs / "normal" / "img_000.png"])
    assert p.label and p.shift_score is None and not p.shift
