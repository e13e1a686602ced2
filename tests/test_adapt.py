"""cxrlab adapt: a fine-tuned model re-estimated on a new site's images (BatchNorm, OOD reference), with the
site's own operating point from labelled films; the parent is never touched and is recorded."""

import json

import numpy as np
import pytest
from PIL import Image

import cxrlab
from cxrlab.runtime import REFERENCE, native_bf16
from conftest import make_dataset
from cxrlab.errors import DataError
from cxrlab.finetune import FineTuneOptions


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("data") / "lungs", n_per_class=16, size=72)
    out = tmp_path_factory.mktemp("run") / "model"
    cxrlab.train(root, output=out, validation_percentage=25, testing_percentage=25, report=False, fine_tune=True,
                 fine_tune_options=FineTuneOptions(epochs=1, batch_size=8, input_size=64, tta=False))
    return out


@pytest.fixture(scope="module")
def new_site(tmp_path_factory):
    """Another hospital: the same kind of films, darker and lower in contrast."""
    root = make_dataset(tmp_path_factory.mktemp("site") / "hospital_b", n_per_class=24, size=80)
    for p in root.rglob("*.png"):
        a = np.asarray(Image.open(p), np.float32)
        Image.fromarray(np.clip(a * 0.6 + 20, 0, 255).astype(np.uint8)).save(p)
    return root


def test_label_free_adaptation_reestimates_batchnorm_and_records_the_parent(parent, new_site, tmp_path):
    before = {p.name: p.read_bytes() for p in parent.iterdir()}
    r = cxrlab.adapt(parent, new_site, tmp_path / "adapted")
    assert r.batchnorm_layers > 10 and r.n_images == 48 and r.operating_point is None
    assert {p.name: p.read_bytes() for p in parent.iterdir()} == before  # the parent is untouched
    info = json.loads((tmp_path / "adapted" / "cxrlab.json").read_text())
    parent_info = json.loads((parent / "cxrlab.json").read_text())
    assert info["adapted"]["parent"]["info_sha256"] == parent_info["info_sha256"]
    assert info["adapted"]["site"] == "hospital_b" and info["adapted"]["n_images"] == 48
    assert info["operating_point"] == parent_info["operating_point"]
    assert (tmp_path / "adapted" / "model.onnx").read_bytes() != (parent / "model.onnx").read_bytes()
    assert set(r.shift) == {"before", "after", "ks_distance"} and "mean_positive_score" in r.shift["after"]
    # a changed network does not inherit its parent's bf16 parity check: without labels it runs in fp32
    assert "bf16" not in info["runtime"] and "without labels" in info["runtime"]["bf16_not_checked"]
    model = cxrlab.load_model(tmp_path / "adapted")
    assert model.engine == REFERENCE
    preds = model.predict([str(new_site)])
    # the site's own films are what the refitted shift reference calls like the training images
    assert sum(bool(p.shift) for p in preds) <= 2 and not any(p.ood for p in preds)
    cow = np.zeros((80, 80, 3), np.uint8)
    cow[..., 0], cow[..., 1] = 200, 120
    assert model.predict([cow])[0].ood


def test_labelled_adaptation_sets_the_site_operating_point_with_intervals(parent, new_site, tmp_path):
    r = cxrlab.adapt(parent, new_site, tmp_path / "adapted", labelled=True, operating_point="sensitivity=0.9")
    op = r.operating_point
    assert op["n_positive"] == 24 and op["n_negative"] == 24 and op["sensitivity"] >= 0.9
    lo, hi = op["sensitivity_ci"]
    assert lo < op["sensitivity"] <= hi
    assert any("small sample" in n for n in r.notes)
    info = json.loads((tmp_path / "adapted" / "cxrlab.json").read_text())
    assert info["operating_point"]["threshold"] == op["threshold"]
    assert info["adapted"]["n_labelled"] == 48
    if native_bf16():  # re-checked on the site's labelled films
        assert info["runtime"]["bf16"]["data"] == "the site's labelled films" and info["runtime"]["bf16"]["n"] == 48
    import onnx  # model.onnx alone carries the adapted decision, not its parent's

    meta = {m.key: m.value for m in onnx.load(str(tmp_path / "adapted" / "model.onnx")).metadata_props}
    assert float(meta["threshold"]) == op["threshold"] and json.loads(meta["labels"]) == info["labels"]
    assert f"{op['threshold']:.4f}" in (tmp_path / "adapted" / "MODEL_CARD.md").read_text()


def test_adapt_refuses_to_write_over_its_parent_and_too_few_images(parent, new_site, tmp_path):
    with pytest.raises(DataError, match="the model being adapted"):
        cxrlab.adapt(parent, new_site, parent)
    few = make_dataset(tmp_path / "few", n_per_class=5)
    with pytest.raises(DataError, match="at least 30"):
        cxrlab.adapt(parent, few, tmp_path / "out")


def test_cli_adapt_prints_the_shift(parent, new_site, tmp_path, capsys):
    from cxrlab.cli import main

    assert main(["adapt", "--model", str(parent), str(new_site), "--output", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm statistics re-estimated" in out and "Warned as unlike the training images" in out
    assert "Refused as not a chest X-ray: 0.0%" in out
