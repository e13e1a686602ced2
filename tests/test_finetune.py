"""Fine-tuning end to end on a tiny generated dataset (one epoch, 64 px): the model directory it writes
is accepted by predict, evaluate and explain, and two runs with the same seed give the same model."""

import json

import numpy as np
import pytest

import cxrlab
from cxrlab.finetune import AugmentConfig, FineTuneOptions, augment_batch


def _options():
    return FineTuneOptions(epochs=1, batch_size=8, input_size=64, patience=0)


def test_head_warm_up_and_cxr_augmentations_run(tmp_path):
    from cxrlab.backbones import weights_path, get_spec
    from cxrlab.finetune import fine_tune

    rng = np.random.default_rng(0)
    X = rng.integers(0, 255, (12, 72, 72), dtype=np.uint8)
    y = np.array([0, 1] * 6)
    spec = get_spec("efficientnet-lite0")
    opts = FineTuneOptions(epochs=1, batch_size=6, input_size=64, warmup_head=True, freeze_bn=True,
                           trainable_units=3, intensity="standardize",
                           augment=AugmentConfig(aspect=0.1, translate=0.05, contrast=0.2, gamma=0.3, sharpen=0.5, jpeg=0.5))
    res = fine_tune(spec, weights_path(spec), X[:8], y[:8], X[8:], y[8:], options=opts)
    assert res.history[0]["stage"] == "head warm-up" and len(res.history) == 2 and res.head_W.shape == (2, 1280)


def test_a_device_given_moves_the_training_there_and_the_cpu_result_is_unchanged():
    """``device``: the network, the head and each batch go there (here the CPU, the one device a CI machine has;
    the GPU path is the same code with a CUDA device); the result is the default run's bit for bit."""
    import torch

    from cxrlab.backbones import get_spec, weights_path
    from cxrlab.finetune import fine_tune, state_sha256

    rng = np.random.default_rng(1)
    X, y = rng.integers(0, 255, (10, 64, 64), dtype=np.uint8), np.array([0, 1] * 5)
    spec = get_spec("efficientnet-lite0")
    opts = FineTuneOptions(epochs=1, batch_size=4, input_size=64, warmup_head=True, ema=0.9)
    runs = [fine_tune(spec, weights_path(spec), X[:6], y[:6], X[6:], y[6:], options=opts, seed=2, device=device)
            for device in (None, torch.device("cpu"))]
    assert state_sha256(runs[0].module) == state_sha256(runs[1].module)
    assert np.array_equal(runs[0].head_W, runs[1].head_W) and runs[0].history == runs[1].history
    assert all(p.device.type == "cpu" for p in runs[1].module.parameters())


@pytest.mark.parametrize("extra", [{}, {"ema": 0.9, "dropout": 0.2, "warmup_head": True}])
def test_training_resumed_from_an_epoch_state_ends_as_one_never_stopped(extra, tmp_path):
    """The state each epoch hands to ``checkpoint`` (what a Ray worker saves), saved to disk and read back into a
    fresh run, continues to the same weights, best epoch and history as the run that never stopped."""
    import torch

    from cxrlab.backbones import get_spec, weights_path
    from cxrlab.finetune.loop import _setup, _train_epochs, _warm_up_head, state_sha256
    from cxrlab.progress import Silent

    rng = np.random.default_rng(0)
    X, y = rng.integers(0, 255, (12, 64, 64), dtype=np.uint8), np.array([0, 1] * 6)
    spec = get_spec("efficientnet-lite0")
    opts = FineTuneOptions(epochs=3, batch_size=4, input_size=64, **extra)

    def run_from(state=None):
        torch.manual_seed(5)
        run = _setup(spec, weights_path(spec), X[:8], y[:8], X[8:], y[8:], opts, 5)
        history = [_warm_up_head(run, 5, Silent())] if opts.warmup_head and state is None else []
        saved = {}

        def checkpoint(row, state_of):
            if row["epoch"] == 1:
                torch.save(state_of(), tmp_path / "epoch1.pt")
                saved["at"] = row["epoch"]

        best = _train_epochs(run, history, None, Silent(), resume=state, checkpoint=checkpoint)
        trained = [r["epoch"] for r in history if "loss" in r]
        run.load(best.weights)
        return state_sha256(run.module), state_sha256(run.head), best.epoch, history, saved, trained

    with torch.random.fork_rng():
        whole = run_from()
        state = torch.load(tmp_path / "epoch1.pt", weights_only=False)
        resumed = run_from(state)
    assert whole[4] == {"at": 1} and state["epoch"] == 1 and resumed[4] == {}  # epoch 1 was not trained again
    assert resumed[:4] == whole[:4] and resumed[5] == whole[5] == [1, 2, 3]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    from conftest import make_dataset

    root = make_dataset(tmp_path_factory.mktemp("data") / "lungs", n_per_class=16, size=72)
    out = tmp_path_factory.mktemp("run") / "model"
    epochs = []
    result = cxrlab.train(root, output=out, validation_percentage=25, testing_percentage=25, report=False,
                          fine_tune=True, fine_tune_options=_options(), on_epoch=epochs.append)
    return root, out, result, epochs


def test_fine_tune_writes_a_model_dir_that_predict_evaluate_explain_accept(tuned, tmp_path, capsys):
    from cxrlab.cli import main
    from cxrlab.evaluate import evaluate
    from cxrlab.explain import explain_paths

    root, out, result, epochs = tuned
    info = json.loads((out / "cxrlab.json").read_text())
    ft = info["fine_tune"]
    assert ft["options"]["epochs"] == 1 and ft["options"]["augment"]["flip"] is False
    assert [r["epoch"] for r in ft["history"]] == [1] and len(epochs) == 1 and ft["options"]["intensity"] == "window"
    assert info["backbone"]["input_size"] == 64 and info["backbone"]["weights_sha256"] == ft["weights_sha256"]
    assert info["head"]["solver"] == "fine-tune" and 0 < info["operating_point"]["threshold"] < 1
    assert "ood" in info and result.final_test_accuracy is not None
    cal = info["calibration"]  # Platt by default for fine-tuned models, unless validation cannot support it
    assert (cal["method"] == "platt" and cal["folded_into_head"]) or (cal["method"] == "none" and any(
        "Platt calibration gave slope" in n or "calibration skipped (platt not fitted)" in n for n in result.notes))
    assert info["operating_point"]["data"] == "validation split"

    model = cxrlab.load_model(out)
    preds = model.predict([str(root)])
    assert len(preds) == 32 and all(p.error is None and abs(sum(p.scores.values()) - 1) < 1e-4 for p in preds)
    r = evaluate(model, root)
    assert r.metrics["n_images"] == 32 and 0 <= r.metrics["all"]["auc"] <= 1
    heat = explain_paths(model, [preds[0].path, preds[-1].path], tmp_path / "heat")
    assert len(heat) == 2 and list((tmp_path / "heat").iterdir())
    image = sorted((root / "abnormal").iterdir())[0]
    assert main(["predict", "--model", str(out), str(image)]) == 0
    assert "(score = " in capsys.readouterr().out


def test_same_seed_same_fine_tuned_model(tuned, tmp_path):
    root, out, _, _ = tuned
    again = cxrlab.train(root, output=tmp_path / "again", validation_percentage=25, testing_percentage=25,
                         report=False, fine_tune=True, fine_tune_options=_options())
    assert (again.model_dir / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


def test_augment_batch_is_seeded_and_keeps_range():
    import torch

    x = torch.rand(4, 1, 80, 80)
    a = augment_batch(x, 64, AugmentConfig(jpeg=1.0), torch.Generator().manual_seed(1))
    b = augment_batch(x, 64, AugmentConfig(jpeg=1.0), torch.Generator().manual_seed(1))
    assert a.shape == (4, 1, 64, 64) and torch.equal(a, b) and 0 <= float(a.min()) and float(a.max()) <= 1
    ident = augment_batch(x, 80, AugmentConfig.none(), torch.Generator().manual_seed(1))
    assert torch.allclose(ident, x, atol=1e-5)


def test_acquisition_shift_augmentations_are_seeded_and_change_the_images():
    import torch

    x = torch.rand(6, 1, 96, 96) * 0.5 + 0.25
    cfg = AugmentConfig.none()
    for name, value in (("lowres", 1.0), ("noise", 0.05), ("film_curve", 1.0)):
        one = AugmentConfig(**{**cfg.__dict__, name: value})
        a = augment_batch(x, 96, one, torch.Generator().manual_seed(3))
        b = augment_batch(x, 96, one, torch.Generator().manual_seed(3))
        assert torch.equal(a, b), name
        assert 0 <= float(a.min()) and float(a.max()) <= 1, name
        assert float((a - x).abs().mean()) > 0.005, name  # each really alters the films
    blurred = augment_batch(x, 96, AugmentConfig(**{**cfg.__dict__, "lowres": 1.0}), torch.Generator().manual_seed(3))
    assert float((blurred[:, :, :, 1:] - blurred[:, :, :, :-1]).abs().mean()) < float(
        (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean())  # resolution loss smooths pixel-to-pixel noise


def test_options_from_strings():
    o = FineTuneOptions()
    o.set("lr", "1e-4")
    o.set("augment.gamma", "0")
    o.set("jpeg", "0.5")
    o.set("input_size", "299")
    o.set("freeze_bn", "false")
    assert (o.lr, o.augment.gamma, o.augment.jpeg, o.input_size, o.freeze_bn) == (1e-4, 0.0, 0.5, 299, False)
    with pytest.raises(cxrlab.errors.CxrlabError, match="unknown fine-tune option"):
        o.set("nope", "1")


def test_site_shift_table_and_cli(tuned, capsys):
    from cxrlab.cli import main
    from cxrlab.siteshift import GATE_SHIFTS, SHIFTS, SUITE, site_shift_folder

    root, out, _, _ = tuned
    img = np.linspace(0, 1, 90 * 80, dtype=np.float32).reshape(90, 80)
    for name, fn in SHIFTS.items():
        shifted = fn(img)
        assert shifted.shape == img.shape, name
    assert not np.allclose(SHIFTS["marker_R"](img), img)
    rows = site_shift_folder(cxrlab.load_model(out), root)
    assert set(SUITE) | set(GATE_SHIFTS) == set(SHIFTS)  # one table for the suite and the OOD gate
    assert [r["shift"] for r in rows] == list(SUITE) and all(0 <= r["auc"] <= 1 for r in rows)
    assert main(["site-shift", "--model", str(out), str(root)]) == 0
    assert "inverted" in capsys.readouterr().out


def test_tta_export_matches_torch(tmp_path):
    import torch

    from cxrlab.backbones import weights_path, get_spec
    from cxrlab.embed import make_session
    from cxrlab.finetune import export_onnx, make_intensity, with_tta, wrap

    spec = get_spec("efficientnet-lite0")
    module = with_tta(wrap(spec.builder(spec, weights_path(spec)), make_intensity("window", 64)).eval(), 64)
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        ref = module(x)
    sess = make_session(export_onnx(module, 64, ("embedding", "features", "imagenet_logits")), threads=1)
    emb, feat = sess.run(["embedding", "features"], {"image": x.numpy()})
    assert np.allclose(emb, ref[0].numpy(), atol=1e-4) and feat.shape == tuple(ref[1].shape)


def test_tta_views_are_configurable_and_checked():
    from cxrlab.errors import DataError
    from cxrlab.finetune import TTA_VIEWS, tta_grids

    assert tta_grids(32, 1).shape == (1, 32, 32, 2) and tta_grids(32, len(TTA_VIEWS)).shape[0] == len(TTA_VIEWS)
    with pytest.raises(DataError, match="tta_views"):
        tta_grids(32, len(TTA_VIEWS) + 1)
