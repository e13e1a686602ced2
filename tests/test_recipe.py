"""One recipe, measured the way it ships: a `cxrlab cv` fold runs the same fit -> calibrate -> threshold steps as
`train`, so on the same split both report the same test figures."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

import cxrlab
from cxrlab.calibrate import calibrate_and_threshold
from cxrlab.crossval import evaluate_entries, fold_entries
from cxrlab.discover import discover
from cxrlab.fit import Fit
from cxrlab.split import Manifest, assign_folds
from cxrlab.training import TrainOptions, embed_images

SRC = Path(__file__).resolve().parents[1] / "src" / "cxrlab"


def _same_split_figures(root, tmp_path, backbone, **options):
    ds = discover(root)
    entries = next(fold_entries(ds.samples, 3, seed=0))
    Manifest(entries).write(tmp_path / "split.csv")
    shipped = cxrlab.train(root, output=tmp_path / "model", backbone=backbone, split_file=tmp_path / "split.csv",
                           report=False, ood=False, **options)
    info = json.loads((shipped.model_dir / "cxrlab.json").read_text())
    o = TrainOptions(backbone=backbone, **options)
    fold = evaluate_entries(root, entries, embed_images(root, ds.samples, o, calibration_rows=ds.samples), o, ds.labels)
    test = shipped.metrics["test"]
    assert fold["n"] == shipped.n_test == sum(e.split == "test" for e in entries)
    assert fold["threshold"] == pytest.approx(info["operating_point"]["threshold"], abs=1e-9)
    for key in ("auc", "sensitivity", "specificity"):
        assert fold[key] == pytest.approx(test[key], abs=1e-9), key
    assert fold["accuracy"] == pytest.approx(shipped.final_test_accuracy, abs=1e-9)
    return info


def test_a_cv_fold_reports_what_train_ships(tiny_dataset, tmp_path):
    from conftest import write_tiny_backbone

    backbone = f"onnx:{write_tiny_backbone(tmp_path / 'tiny.onnx')}"
    info = _same_split_figures(tiny_dataset, tmp_path, backbone)
    assert "out-of-fold" in info["calibration"]["data"]  # cv now measures the shipped calibration policy


@pytest.mark.slow
def test_a_fine_tuned_cv_fold_reports_what_train_ships(tiny_dataset, tmp_path):
    from cxrlab.finetune import FineTuneOptions

    options = FineTuneOptions(epochs=1, batch_size=8, input_size=64)
    info = _same_split_figures(tiny_dataset, tmp_path, "efficientnet-lite0", fine_tune=True, fine_tune_options=options)
    assert info["head"]["solver"] == "fine-tune"


def test_folds_keep_groups_whole_balance_classes_and_repeat():
    groups = [f"p{i // 2}" for i in range(80)]
    labels = [i % 4 == 0 for i in range(80)]
    folds = assign_folds(groups, labels, 4, seed=3)
    assert np.array_equal(folds, assign_folds(groups, labels, 4, seed=3))
    assert all(len({f for g, f in zip(groups, folds) if g == group}) == 1 for group in set(groups))
    positives = [sum(lab for lab, f in zip(labels, folds) if f == k) for k in range(4)]
    assert max(positives) - min(positives) <= 2 and set(folds) == {0, 1, 2, 3}
    with pytest.raises(cxrlab.DataError, match="patient groups"):
        assign_folds(["a", "b"], [0, 1], 3)


def _fit(logits, labels, fine_tuned):
    from cxrlab.head import LinearHead

    head = LinearHead().fit(np.c_[logits, -logits], labels)
    return Fit(None, None, None, {}, head, [], head.decision_function(np.c_[logits, -logits]), labels, "validation split",
               {}, {"history": []} if fine_tuned else None)


def test_auto_calibration_is_platt_for_a_fine_tuned_head_and_temperature_otherwise():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 40)
    z = y * 1.5 + rng.normal(0, 1, len(y))
    tuned = calibrate_and_threshold(_fit(z, y, True), positive=1)
    linear = calibrate_and_threshold(_fit(z, y, False), positive=1)
    assert tuned.calibration_info["method"] == "platt" and tuned.temperature == 1.0
    assert linear.calibration_info["method"] == "temperature" and linear.platt is None
    for cal in (tuned, linear):
        assert cal.operating_point.sensitivity >= 0.9 and cal.operating_point_info["data"] == "validation split"


def _imports(module: str) -> set[str]:
    tree = ast.parse((SRC / module).read_text())
    return {("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}


def test_no_import_cycle_between_backbone_modules_and_no_package_import_for_the_version():
    assert not any(m.endswith("backbones") for m in _imports("onnx_backbone.py"))
    assert "." not in _imports("training.py") and "cxrlab" not in _imports("training.py")


def test_no_private_name_is_imported_across_the_recipe_modules():
    for module in ("training.py", "crossval.py", "fit.py", "calibrate.py", "augment.py", "backbones.py",
                   "onnx_backbone.py", "precision.py", "finetune/stage.py", "finetune/loop.py", "finetune/modules.py"):
        tree = ast.parse((SRC / module).read_text())
        private = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
                   if a.name.startswith("_") and n.module != "__future__"]
        assert not private, f"{module} imports {private}"
