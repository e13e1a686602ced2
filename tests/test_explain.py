"""Class activation maps: a known-answer test on synthetic blobs, determinism, a model
randomisation sanity check (Adebayo et al. 2018), files written, border share, the CLI."""

import importlib
import io
import time

import numpy as np
import pytest
from PIL import Image

import cxrlab
from cxrlab.cli import main
from cxrlab.embed import make_session, prepare, read_file
from cxrlab.predict import load_model

explain = importlib.import_module("cxrlab.explain")  # the module: cxrlab.explain is the public function

SIZE = 128


def blob_image(seed: int, abnormal: bool) -> np.ndarray:
    """Noise background; 'abnormal' adds a bright Gaussian blob (sigma 8 px) in the top-left quadrant."""
    rng = np.random.default_rng(seed)
    img = 0.4 + rng.normal(0, 0.08, (SIZE, SIZE))
    if abnormal:
        cy, cx = rng.uniform(16, SIZE / 2 - 16, size=2)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        img += 0.5 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 8.0**2))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_set(root, n: int, seed0: int, labels=("abnormal", "normal")):
    for label in labels:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            seed = seed0 + 2 * i + (label == "abnormal")
            Image.fromarray(blob_image(seed, label == "abnormal")).save(root / label / f"{label}_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def blob_model(tmp_path_factory):
    base = tmp_path_factory.mktemp("blobs")
    root = write_set(base / "train", 40, 0)
    held_out = write_set(base / "held_out", 15, 10_000, labels=("abnormal",)) / "abnormal"
    r = cxrlab.train(root, output=base / "model", report=False, ood=False, fine_tune=False)
    return load_model(r.model_dir), sorted(held_out.glob("*.png"))


def test_known_answer_blob_in_top_left(blob_model):
    model, files = blob_model
    hits, t0 = 0, time.perf_counter()
    for f in files:
        hm = explain.explain_file(model, f, class_label="abnormal")
        assert hm.cam.dtype == np.float32 and hm.cam.min() >= 0 and hm.cam.max() <= 1
        assert hm.full.shape == (SIZE, SIZE)
        y, x = np.unravel_index(np.argmax(hm.full), hm.full.shape)
        hits += y < SIZE / 2 and x < SIZE / 2
    per_map = (time.perf_counter() - t0) / len(files)
    print(f"explain_file: {per_map * 1000:.1f} ms per map")
    assert hits / len(files) >= 0.7, f"only {hits}/{len(files)} maps peak in the top-left quadrant"


def test_default_class_is_the_decision(blob_model):
    model, files = blob_model
    hm = explain.explain_file(model, files[0])
    assert hm.label == model.predict([str(files[0])], ood=False)[0].label
    assert hm.score == pytest.approx(model.predict([str(files[0])])[0].scores[hm.label])


def test_deterministic(blob_model):
    model, files = blob_model
    arr, _ = prepare(read_file(files[0]), model.input_size, "x")
    k = model.labels.index("abnormal")
    assert np.array_equal(explain.class_activation_map(model, arr, k), explain.class_activation_map(model, arr, k))


def test_randomised_head_changes_the_maps(blob_model):
    """Model randomisation test: maps must depend on the learned head, not only the input."""
    import onnx
    from onnx import numpy_helper
    from scipy.stats import spearmanr

    model, files = blob_model
    proto = onnx.load(str(model.directory / "model.onnx"))
    init = next(t for t in proto.graph.initializer if t.name == "head_W_conv")
    w = numpy_helper.to_array(init)
    rand = np.random.default_rng(0).normal(0, w.std(), w.shape).astype(np.float32)
    init.CopyFrom(numpy_helper.from_array(rand, "head_W_conv"))
    session = make_session(proto.SerializeToString())
    k = model.labels.index("abnormal")
    rhos = []
    for f in files[:10]:
        arr, _ = prepare(read_file(f), model.input_size, str(f))
        real = explain.class_activation_map(model, arr, k)
        random_map = session.run(["class_maps"], {"image": arr[None, None].astype(np.float32)})[0][0, k]
        again = explain.class_activation_map(model, arr, k)
        assert spearmanr(real.ravel(), again.ravel())[0] == pytest.approx(1.0)
        rhos.append(abs(spearmanr(real.ravel(), random_map.ravel())[0]))
    print(f"mean |rho| real vs random head: {np.mean(rhos):.2f}")
    assert np.mean(rhos) < 0.5, f"maps barely depend on the head: mean |rho| = {np.mean(rhos):.2f}"


def test_explain_paths_writes_files(blob_model, tmp_path):
    model, files = blob_model
    (tmp_path / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    hms = explain.explain_paths(model, [str(files[0]), str(tmp_path / "bad.png")], out)
    assert len(hms) == 1
    stem = files[0].stem
    with Image.open(out / f"{stem}.png") as im:
        assert im.width >= SIZE and im.height >= SIZE
    cam = np.load(out / f"{stem}.npy", allow_pickle=False)
    assert np.array_equal(cam, hms[0].cam)
    png = explain.heatmap_png(model, read_file(files[0]), "upload.png")
    assert png.startswith(b"\x89PNG")
    assert explain.heatmap_png(model, b"junk", "junk.png") is None


def test_border_heat_share():
    ring = np.ones((100, 100), np.float32)
    ring[15:85, 15:85] = 0
    assert explain.border_heat_share(ring) == pytest.approx(1.0)
    yy, xx = np.mgrid[0:100, 0:100]
    blob = np.exp(-((xx - 50) ** 2 + (yy - 50) ** 2) / (2 * 10.0**2))
    assert explain.border_heat_share(blob) < 0.2
    assert explain.border_heat_share(np.zeros((7, 7))) == 0.0
    hm = explain.Heatmap("x", "a", 1.0, ring, ring)
    assert explain.summary([hm, hm])["flag"] is True
    assert explain.summary([explain.Heatmap("x", "a", 1.0, blob, blob)])["flag"] is False


def test_cli_explain_summary(blob_model, tmp_path, capsys):
    model, files = blob_model
    out = tmp_path / "maps"
    assert main(["explain", "--model", str(model.directory), str(files[0].parent), "--output", str(out),
                 "--summary"]) == 0
    assert "border heat share" in capsys.readouterr().out
    assert len(list(out.glob("*.png"))) == len(files)
    assert main(["predict", "--model", str(model.directory), str(files[0]), "--explain", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / f"{files[0].stem}.npy").is_file()


def test_predict_explain_decodes_each_film_once_and_maps_it_as_explain_does(blob_model, tmp_path, monkeypatch, capsys):
    """The heatmaps come from the prediction's own pass: one decode per file, and the same maps as one image
    explained on its own; an unreadable file is reported, not mapped."""
    import cxrlab.predict as predict_module

    model, files = blob_model
    (tmp_path / "in").mkdir()
    for f in files[:5]:
        (tmp_path / "in" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    decoded = []
    real = predict_module.prepare

    def counting(data, size, name):
        decoded.append(name)
        return real(data, size, name)

    monkeypatch.setattr(predict_module, "prepare", counting)
    code = main(["predict", "--model", str(model.directory), str(tmp_path / "in"), "--explain", str(tmp_path / "maps"),
                 "--format", "csv"])
    assert code == 1 and "broken.png" in capsys.readouterr().out  # the bad file is an error row, the run goes on
    assert sorted(decoded) == sorted(str(p) for p in (tmp_path / "in").iterdir())  # each file once
    for f in files[:5]:
        alone = explain.explain_file(model, f)
        assert np.array_equal(np.load(tmp_path / "maps" / f"{f.stem}.npy", allow_pickle=False), alone.cam)
    assert not (tmp_path / "maps" / "broken.npy").exists()


def test_overlay_colours_are_perceptual_and_the_scale_can_be_shared():
    """Issue 18: 'inferno', not jet; with a shared scale, equal map values get equal colours on any image."""
    from matplotlib import colormaps

    rgb = explain.colormap(np.array([0.0, 0.5, 1.0]))
    want = (colormaps["inferno"](np.array([0.0, 0.5, 1.0]))[:, :3] * 255)
    assert np.abs(rgb.astype(int) - want).max() <= 1
    lum = rgb @ np.array([0.299, 0.587, 0.114])
    assert lum[0] < lum[1] < lum[2]  # monotone in lightness: order survives grey print

    pixels = np.full((300, 300), 0.5, np.float32)
    hm = explain.Heatmap("x", "abnormal", 0.9, np.zeros((4, 4), np.float32), np.zeros((300, 300), np.float32))
    low, high = np.full((300, 300), 1.0, np.float32), np.full((300, 300), 3.0, np.float32)
    a = np.asarray(Image.open(io.BytesIO(explain.overlay_png(hm, pixels, map_values=low, scale=(1.0, 3.0)))))
    b = np.asarray(Image.open(io.BytesIO(explain.overlay_png(hm, pixels, map_values=high, scale=(1.0, 3.0)))))
    c = np.asarray(Image.open(io.BytesIO(explain.overlay_png(hm, pixels, map_values=high, scale=(0.0, 6.0)))))
    mid = (a.shape[0] // 2 + 20, 150)
    assert not np.array_equal(a[mid], b[mid])  # different evidence, different colour
    same = np.asarray(Image.open(io.BytesIO(explain.overlay_png(hm, pixels.copy(), map_values=high, scale=(1.0, 3.0)))))
    assert np.array_equal(b[mid], same[mid])
    assert not np.array_equal(b[mid], c[mid])  # the colour depends on the scale given, not on the image's range
