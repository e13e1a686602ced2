"""The frontal-chest-X-ray check (cxrlab.chest) and how every surface answers a refused picture."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import cxrlab
from cxrlab import chest
from cxrlab.cli import main
from cxrlab.decode import decode_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _folder(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not found (see shared/data/README.md)")
    return path


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def generated_pictures() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:256, 0:256] / 255
    page = Image.new("L", (320, 320), 235)
    draw = ImageDraw.Draw(page)
    for row in range(12):
        draw.text((12, 12 + 24 * row), "Patient history and examination notes", fill=25)
    return {
        "noise": rng.integers(0, 256, (256, 256), dtype=np.uint8),
        "text page": np.asarray(page),
        "horizontal gradient": (255 * xx).astype(np.uint8),
        "diagonal gradient": (127 * (xx + yy)).astype(np.uint8),
        "colour blocks": (rng.random((8, 8, 3)) * 255).astype(np.uint8).repeat(32, 0).repeat(32, 1),
        "blank": np.full((256, 256), 80, np.uint8),
        "smooth field": (255 * np.asarray(Image.fromarray(rng.random((4, 4)).astype(np.float32)).resize((256, 256),
                                                                                                     Image.BILINEAR))).astype(np.uint8),
    }


def test_shipped_asset_matches_its_record():
    assert chest.asset_sha256() == chest.ASSET_SHA256
    assert 0 < chest.THRESHOLD < 1
    assert chest.ASSET.stat().st_size < 1_000_000  # a small fitted asset, well under 1 MB


@pytest.mark.parametrize("name", sorted(generated_pictures()))
def test_generated_pictures_are_refused_with_a_reason(name):
    img = decode_image(_png(generated_pictures()[name]), name=name)
    (verdict,) = chest.check([img])
    assert not verdict.chest and verdict.reason
    if name == "colour blocks":
        assert "colour" in verdict.reason
    if name == "blank":
        assert "blank" in verdict.reason


def test_arrays_and_decoded_images_get_the_same_network_answer():
    img = decode_image(_png(generated_pictures()["noise"]))
    a, b = chest.check([img])[0], chest.check([img.pixels])[0]
    assert (a.chest, a.score) == (b.chest, b.score)
    assert chest.check([]) == []


def test_network_off_keeps_only_the_colour_and_blank_rules():
    pics = generated_pictures()
    verdicts = chest.check([decode_image(_png(pics[n])) for n in ("noise", "colour blocks", "blank")], network=False)
    assert [v.chest for v in verdicts] == [True, False, False]


def test_not_cxr_is_refused_every_one():
    files = sorted((_folder("not_cxr")).glob("*.jpg"))
    verdicts = chest.check([decode_image(f, min_size=224) for f in files])
    accepted = [f.name for f, v in zip(files, verdicts) if v.chest]
    assert len(files) == 67 and accepted == []


def test_frontal_chest_films_of_other_kinds_are_accepted():
    folder = _folder("cxr_variants")
    frontal = sorted(f for f in folder.glob("*.jpg") if not f.name.startswith("lateral"))
    verdicts = chest.check([decode_image(f, min_size=224) for f in frontal])
    refused = [f.name for f, v in zip(frontal, verdicts) if not v.chest]
    assert len(frontal) == 36 and len(refused) <= 1, refused


def test_a_second_hospital_is_accepted():
    files = sorted(p for p in _folder("india_da").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    verdicts = chest.check([decode_image(f, min_size=224) for f in files])
    assert len(files) == 154 and np.mean([not v.chest for v in verdicts]) <= 0.01


def test_shenzhen_test_split_is_accepted():
    from cxrlab.discover import discover
    from cxrlab.split import split_samples

    root = _folder("shenzhen")
    manifest, _ = split_samples(discover(root).samples)
    test = manifest.subset("test")  # never fitted on: the check's build script keeps this split out
    verdicts = chest.check([decode_image(root / e.relpath, min_size=224) for e in test])
    assert len(test) > 50 and all(v.chest for v in verdicts)


def test_site_shifted_films_are_accepted_and_inverted_ones_refused():
    from cxrlab.siteshift import SHIFTS

    from cxrlab.discover import discover
    from cxrlab.split import split_samples

    root = _folder("shenzhen")
    manifest, _ = split_samples(discover(root).samples)
    pixels = [decode_image(root / e.relpath, min_size=224).pixels for e in manifest.subset("test")]
    for name, fn in SHIFTS.items():
        verdicts = chest.check([np.clip(fn(p), 0, 1).astype(np.float32) for p in pixels])
        refused = sum(not v.chest for v in verdicts)
        # an inverted film (white lungs) is refused by design: no model trained on films can read it
        assert refused == (len(pixels) if name == "inverted" else 0), name


# ------------------------------------------------------------------ surfaces
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import make_dataset

    root = make_dataset(tmp_path_factory.mktemp("data") / "lungs", n_per_class=20)
    out = tmp_path_factory.mktemp("m") / "model"
    cxrlab.train(root, output=out, report=False, fine_tune=False, validation_percentage=25, testing_percentage=25)
    return out, root


def test_a_refused_picture_has_no_scores_anywhere(model_dir, tmp_path, capsys):
    out, root = model_dir
    info = json.loads((out / "cxrlab.json").read_text())
    assert info["chest_check"]["threshold"] == chest.THRESHOLD
    # The synthetic drawings are not chest films: the network part is off for this model, with its reason.
    assert info["chest_check"]["network"] is False and info["chest_check"]["training_accepted"] < 0.8
    assert 0 <= info["metrics"]["test_shift_warned"] <= 1  # how often the model's own unseen films are warned
    colour = tmp_path / "colour.png"
    colour.write_bytes(_png(generated_pictures()["colour blocks"]))
    film = next((root / "normal").glob("*.png"))
    model = cxrlab.load_model(out)
    refused, scored = model.predict([str(colour), str(film)])
    assert refused.ood and refused.scores == {} and refused.label is None and refused.positive_score is None
    assert "colour" in refused.ood_reason and refused.shift is None
    assert not scored.ood and scored.scores and scored.shift_score is not None

    assert main(["predict", "--model", str(out), str(colour)]) == 0
    assert capsys.readouterr().out.strip() == f"unknown (not a chest X-ray: {refused.ood_reason})"
    assert main(["predict", "--model", str(out), "--format", "json", str(colour), str(film)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["scores"] == {} and data[0]["label"] is None and data[0]["ood"] is True
    assert {"shift", "shift_score", "ood_reason"} <= set(data[1]) and data[1]["scores"]
    assert main(["predict", "--model", str(out), "--format", "csv", str(colour), str(film)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows[0]["score_abnormal"] == "" and rows[0]["ood"] == "True" and "colour" in rows[0]["ood_reason"]
    assert rows[1]["score_abnormal"] != "" and rows[1]["shift_score"] != ""

    assert main(["ood-check", "--model", str(out), str(colour), str(film)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("REJECT  not a chest X-ray: a colour picture") and lines[1].startswith("accept")
    assert "shift score" in lines[1]
    assert main(["ood-check", "--model", str(out), str(film)]) == 0


def test_evaluate_counts_refused_pictures_and_reports_each_subset(model_dir, tmp_path):
    out, root = model_dir
    data = tmp_path / "site"
    for label in ("abnormal", "normal"):
        (data / label).mkdir(parents=True)
        for f in sorted((root / label).glob("*.png"))[:6]:
            (data / label / f.name).write_bytes(f.read_bytes())
    (data / "normal" / "photo.png").write_bytes(_png(generated_pictures()["colour blocks"]))
    r = cxrlab.evaluate(out, data, output=tmp_path / "eval")
    m = r.metrics
    assert m["n_images"] == 13 and m["n_rejected"] == 1
    assert m["all"]["n"] == 13 and m["accepted"]["n"] == 12
    rows = list(csv.DictReader(open(tmp_path / "eval" / "predictions.csv")))
    photo = next(row for row in rows if row["path"].endswith("photo.png"))
    assert photo["predicted_label"] == "refused" and photo["score_abnormal"] == "" and "colour" in photo["refused"]
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "Rejected images: not chest X-rays (1;" in html and "accepted as chest X-rays" in html
