import json
import subprocess
import sys

import pytest

import cxrlab
from cxrlab.cli import main
from cxrlab.compat import label_image_main, retrain_main
from cxrlab.errors import ModelDirError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import make_dataset

    root = make_dataset(tmp_path_factory.mktemp("data") / "lungs", n_per_class=30)
    out = tmp_path_factory.mktemp("run") / "model"
    result = cxrlab.train(root, output=out, validation_percentage=20, testing_percentage=20,
                          bottleneck_dir=tmp_path_factory.mktemp("bn"), fine_tune=False)  # the fast linear path
    return root, out, result


def test_train_writes_a_complete_model_dir(trained):
    root, out, result = trained
    assert {"model.onnx", "labels.txt", "cxrlab.json", "report.html", "metrics.json", "predictions.csv",
            "split.csv"} <= {p.name for p in out.iterdir()}
    info = json.loads((out / "cxrlab.json").read_text())
    assert info["labels"] == ["abnormal", "normal"] and info["positive_label"] == "abnormal"
    assert info["backbone"]["id"] == "efficientnet-lite0" and len(info["backbone"]["weights_sha256"]) == 64
    assert info["split"]["manifest_sha256"] == result.manifest.digest()
    assert 0 < info["operating_point"]["threshold"] < 1
    assert result.final_test_accuracy >= 0.8  # blotches vs clean lungs is easy


def test_predict_prints_tutorial_lines(trained, capsys):
    root, out, _ = trained
    image = sorted((root / "abnormal").iterdir())[0]
    assert main(["predict", "--model", str(out), str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(" (score = ")[0] in ("abnormal", "normal")
    scores = [float(line.split("= ")[1].rstrip(")")) for line in lines[:2]]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4
    assert main(["predict", "--model", str(out), "--format", "json", str(root)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 60 and {"ood", "ood_score", "scores", "label"} <= set(data[0])


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
    image = sorted((root / "normal").iterdir())[0]
    assert label_image_main(["--graph", str(graph), "--labels", str(labels), "--image", str(image),
                             "--input_layer", "Mul", "--output_layer", "final_result"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(("normal (score = ", "abnormal (score = "))


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
