import json
from pathlib import Path
import subprocess
import sys

import pytest

import cxrlab
from cxrlab.cli import main
from cxrlab.compat import label_image_main, retrain_main
from cxrlab.errors import ModelDirError


@pytest.fixture(scope="module")
def bottlenecks(tmp_path_factory):
    return tmp_path_factory.mktemp("bn")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bottlenecks):
    from conftest import make_dataset

    root = make_dataset(tmp_path_factory.mktemp("data") / "lungs", n_per_class=30)
    out = tmp_path_factory.mktemp("run") / "model"
    result = cxrlab.train(root, output=out, validation_percentage=20, testing_percentage=20,
                          bottleneck_dir=bottlenecks, fine_tune=False)  # the fast linear path
    return root, out, result


MODEL_FILES = {"model.onnx", "labels.txt", "cxrlab.json", "MODEL_CARD.md", ".cxrlab-output", "ood.safetensors"}


def test_train_writes_a_complete_model_dir(trained):
    root, out, result = trained
    assert {"model.onnx", "labels.txt", "cxrlab.json", "MODEL_CARD.md"} <= {p.name for p in out.iterdir()}
    info = json.loads((out / "cxrlab.json").read_text())
    assert info["labels"] == ["abnormal", "normal"] and info["positive_label"] == "abnormal"
    assert info["backbone"]["id"] == "efficientnet-lite0" and len(info["backbone"]["weights_sha256"]) == 64
    assert info["split"]["manifest_sha256"] == result.manifest.digest()
    assert 0 < info["operating_point"]["threshold"] < 1
    assert result.final_test_accuracy_argmax >= 0.8  # blotches vs clean lungs is easy
    assert result.final_test_accuracy == info["metrics"]["test"]["accuracy"]  # the headline: at the operating point


def test_the_model_folder_holds_no_patient_data(trained):
    """The deployable folder holds model files only; the report (patient films), predictions and split go to the
    run folder beside it."""
    _, out, result = trained
    assert {p.name for p in out.iterdir()} <= MODEL_FILES
    run = out.with_name("model.run")
    assert result.run_dir == run and result.report_path == run / "report.html"
    assert {"report.html", "metrics.json", "predictions.csv", "split.csv"} <= {p.name for p in run.iterdir()}
    from cxrlab.outputs import find_run_dir

    assert find_run_dir(out) == run


def test_model_onnx_alone_reproduces_the_decision(trained):
    """Labels, threshold and positive class travel in model.onnx's metadata: plain ONNX Runtime decides as cxrlab."""
    import numpy as np
    import onnxruntime as ort

    from cxrlab.embed import prepare, read_file

    root, out, _ = trained
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    info = json.loads((out / "cxrlab.json").read_text())
    labels, positive, threshold = json.loads(meta["labels"]), meta["positive_label"], float(meta["threshold"])
    assert labels == info["labels"] and positive == "abnormal" and threshold == info["operating_point"]["threshold"]
    assert json.loads(meta["calibration"]) == info["calibration"] and "not a medical device" in meta["intended_use"]
    assert json.loads(meta["shift_check"])["threshold"] == info["ood"]["threshold"] and "chest_check" in meta
    images = sorted((root / "abnormal").iterdir())[:3] + sorted((root / "normal").iterdir())[:3]
    size = int(json.loads(meta["input"])["shape"][-1])
    batch = np.stack([prepare(read_file(str(p)), size, str(p))[0] for p in images])[:, None].astype(np.float32)
    probs = session.run(["probabilities"], {"image": batch})[0]
    other = next(lab for lab in labels if lab != positive)
    mine = [positive if p[labels.index(positive)] >= threshold else other for p in probs]
    assert mine == [p.label for p in cxrlab.load_model(out).predict([str(p) for p in images], ood=False)]


def test_model_card_and_appended_evaluations(trained, tmp_path):
    import shutil

    root, out, _ = trained
    model = tmp_path / "m"
    shutil.copytree(out, model)
    card = (model / "MODEL_CARD.md").read_text()
    for part in ("Not a medical device", "## Intended use", "## Training data", "## Operating point",
                 "rule `who`", "## Performance on its own test split", "[95% CI]", "WHO target product profile",
                 "## External evaluations", "None yet", "## Limitations"):
        assert part in card, part
    r = cxrlab.evaluate(model, root / "abnormal" / "..", output=tmp_path / "eval")
    assert r.model_card == model / "MODEL_CARD.md"
    card = r.model_card.read_text()
    assert "None yet" not in card and str(tmp_path / "eval" / "report.html") in card
    assert card.count("WHO target product profile for TB triage (") == 2  # own test and this evaluation
    cxrlab.load_model(model)  # the card and its record are outside the SHA-256 record: still intact
    cxrlab.evaluate(model, root, output=tmp_path / "eval2")
    assert len(json.loads((model / "evaluations.json").read_text())) == 2
    again = cxrlab.train(root, output=model, validation_percentage=20, testing_percentage=20, report=False,
                         fine_tune=False, ood=False)  # replacing the folder is allowed, and starts a new card
    assert "None yet" in (again.model_dir / "MODEL_CARD.md").read_text()


def test_train_prints_the_shipped_figures_first(trained, bottlenecks, tmp_path, capsys):
    import csv

    root, _, _ = trained
    assert main(["train", str(root), "--output", str(tmp_path / "m"), "--head-only", "--validation_percentage", "20",
                 "--testing_percentage", "20", "--bottleneck_dir", str(bottlenecks),
                 "--print_misclassified_test_images", "--no-ood", "-q"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Test at the shipped operating point (P(abnormal) >= ")
    assert "sensitivity " in out[0] and "%]" in out[0]
    tutorial = next(line for line in out if line.startswith("Final test accuracy = "))
    assert "the tutorial's figure" in tutorial and "not the shipped decision" in tutorial
    start = out.index("=== MISCLASSIFIED TEST IMAGES === (at the shipped operating point)")
    listed = {line.split()[0] for line in out[start + 1:] if line.startswith(" ")}
    run = tmp_path / "m.run"
    with open(run / "predictions.csv", newline="") as f:
        wrong = {Path(r["path"]).name for r in csv.DictReader(f) if r["split"] == "test" and r["correct"] == "0"}
    assert listed == wrong
    assert any(line.startswith("WHO target product profile for TB triage") for line in out)
    assert f"Report written to {run / 'report.html'}" in "\n".join(out)


def test_model_dir_integrity(trained, tmp_path):
    import shutil

    _, out, _ = trained
    bad = tmp_path / "m"
    shutil.copytree(out, bad)
    (bad / "labels.txt").write_text("normal\nabnormal\n")
    with pytest.raises(ModelDirError, match="labels.txt.*SHA-256"):
        cxrlab.load_model(bad)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    info = json.loads((bad / "cxrlab.json").read_text())
    info["schema_version"] = 99
    (bad / "cxrlab.json").write_text(json.dumps(info))
    with pytest.raises(ModelDirError, match="schema_version 99"):
        cxrlab.load_model(bad)
    (bad / "cxrlab.json").unlink()
    with pytest.raises(ModelDirError, match="cxrlab.json is missing"):
        cxrlab.load_model(bad)


def test_same_seed_same_model(trained, tmp_path):
    root, out, _ = trained
    again = cxrlab.train(root, output=tmp_path / "again", validation_percentage=20, testing_percentage=20, report=False,
                         fine_tune=False)
    assert (again.model_dir / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


def test_cli_error_is_one_line(tmp_path, capsys):
    (tmp_path / "only" / "normal").mkdir(parents=True)
    assert main(["train", str(tmp_path / "only")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "at least 2" in err[0]
    assert main(["predict", "--model", str(tmp_path / "nope"), "x.png"]) == 1
    assert "not a model directory" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["train", "predict", "evaluate", "ood-check", "datasets", "serve", "explain", "cv", "compare"])
def test_every_command_has_help_with_example(cmd):
    out = subprocess.run([sys.executable, "-m", "cxrlab", cmd, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "example: cxrlab" in out.stdout


def test_retrain_and_label_image_with_tutorial_flags(trained, tmp_path, capsys):
    root, _, _ = trained
    graph, labels = tmp_path / "output_graph.pb", tmp_path / "output_labels.txt"
    rc = retrain_main(["--image_dir", str(root), "--output_graph", str(graph), "--output_labels", str(labels),
                       "--bottleneck_dir", str(tmp_path / "bottlenecks"), "--architecture", "efficientnet-lite0",
                       "--how_many_training_steps", "200", "--learning_rate", "0.01", "--solver", "sgd",
                       "--eval_step_interval", "50", "--print_misclassified_test_images", "--no_report"])
    out = capsys.readouterr().out
    assert rc == 0 and graph.is_file() and labels.read_text().split() == ["abnormal", "normal"]
    assert "Step 0: Train accuracy = " in out and "Step 199: Cross entropy = " in out
    assert "Validation accuracy = " in out and "Final test accuracy = " in out and "(N=" in out
    assert "=== MISCLASSIFIED TEST IMAGES ===" in out
    assert (tmp_path / "output_graph.cxrlab.run" / "split.csv").is_file()
    image = sorted((root / "normal").iterdir())[0]
    assert label_image_main(["--graph", str(graph), "--labels", str(labels), "--image", str(image),
                             "--input_layer", "Mul", "--output_layer", "final_result"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("decision: ") and lines[1].startswith(("normal (score = ", "abnormal (score = "))


def test_cv_reports_mean_and_sd(trained, capsys):
    from cxrlab.crossval import assign_folds, cross_validate

    root, _, _ = trained
    r = cross_validate(root, folds=3)
    assert len(r["folds"]) == 3 and sum(f["n"] for f in r["folds"]) == 60
    assert 0.5 < r["summary"]["auc"]["mean"] <= 1 and r["summary"]["auc"]["sd"] >= 0
    folds = assign_folds(["a", "a", "b", "c", "d"], ["x", "x", "x", "y", "y"], 2)
    assert folds[0] == folds[1]  # one group, one fold
    assert main(["cv", str(root), "--folds", "3"]) == 0
    assert "auc" in capsys.readouterr().out


def test_summaries_dir_writes_tensorboard_scalars(trained, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, _ = trained
    cxrlab.train(root, output=tmp_path / "m", summaries_dir=tmp_path / "tb", report=False, ood=False,
                 validation_percentage=20, testing_percentage=20, fine_tune=False)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train_accuracy", "cross_entropy", "validation_accuracy", "test/auc"} <= tags


def test_affine_head_is_platt_scaling_folded_into_the_weights():
    import numpy as np

    from cxrlab.calibrate import PlattScaler, softmax
    from cxrlab.head import AffineHead, LinearHead

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 8)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.normal(size=200) > 0.3).astype(int)
    head = LinearHead(C=1.0).fit(X[:120], y[:120])
    z = head.decision_function(X[120:])
    platt = PlattScaler().fit(z[:, 1] - z[:, 0], y[120:])
    folded = AffineHead(head, platt.a_, platt.b_)
    np.testing.assert_allclose(softmax(folded.decision_function(X[120:]))[:, 1],
                               platt.transform(z[:, 1] - z[:, 0]), atol=1e-5)
    np.testing.assert_allclose(folded.rescale(z), folded.decision_function(X[120:]), atol=1e-4)


def test_platt_calibration_is_recorded_and_exported(trained, tmp_path):
    import numpy as np

    root, _, _ = trained
    result = cxrlab.train(root, output=tmp_path / "platt", validation_percentage=20, testing_percentage=20,
                          calibration="platt", report=False, ood=False)
    cal = json.loads((result.model_dir / "cxrlab.json").read_text())["calibration"]
    assert cal["method"] == "platt" and cal["platt_a"] > 0 and cal["folded_into_head"] and cal["temperature"] == 1.0
    preds = cxrlab.load_model(result.model_dir).predict([str(root)])
    assert all(abs(sum(p.scores.values()) - 1) < 1e-4 for p in preds)
    assert np.mean([max(p.scores, key=p.scores.get) == p.path.split("/")[-2] for p in preds]) >= 0.8
    robust = cxrlab.train(root, output=tmp_path / "robust", validation_percentage=20, testing_percentage=20,
                          robust_operating_point=True, report=False, ood=False)
    op = json.loads((robust.model_dir / "cxrlab.json").read_text())["operating_point"]
    assert "8 simulated site shifts" in op["data"] and 0 < op["threshold"] < 1
    with pytest.raises(Exception, match="unknown calibration"):
        cxrlab.train(root, output=tmp_path / "bad", calibration="isotonic", report=False, ood=False)
