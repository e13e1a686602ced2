"""The shipped lung segmenter (cxrlab.lungs): Dice on the Shenzhen films it never trained on, boxes
that keep the lungs, a fall-back to the whole image for what is not a chest film, plausible boxes at
another hospital, and an asset that matches its recorded SHA-256."""

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from cxrlab import lungs
from cxrlab.decode import decode_image, resize
from cxrlab.errors import CxrlabError


@pytest.fixture(scope="module")
def held_out_films(shenzhen_dir):
    """(gray, manual mask) of every masked Shenzhen film the asset was not trained on."""
    masks = shenzhen_dir.parent / "shenzhen-lungmasks"
    if not masks.is_dir():
        pytest.skip(f"Shenzhen lung masks not found at {masks} (see shared/data/README.md)")
    films = []
    for path in sorted(masks.glob("CHNCXR_*.png")):
        if lungs.held_out(path.stem):
            label = "abnormal" if path.stem.endswith("_1") else "normal"
            gray = decode_image(shenzhen_dir / label / f"{path.stem}.jpg").pixels
            films.append((gray, np.asarray(Image.open(path).convert("L")) > 127))
    assert len(films) >= 40
    return films


def test_dice_on_held_out_films(held_out_films):
    predicted = lungs.lung_masks([gray for gray, _ in held_out_films])
    dice = [2 * (p > 0.5)[t].sum() / ((p > 0.5).sum() + t.sum()) for p, (_, t) in zip(predicted, held_out_films)]
    assert np.mean(dice) > 0.90, f"mean Dice {np.mean(dice):.3f}, min {np.min(dice):.3f}"


def test_box_keeps_the_manual_lungs(held_out_films):
    boxes = lungs.lung_boxes([gray for gray, _ in held_out_films])
    covered = [t[b.top:b.bottom, b.left:b.right].sum() / t.sum() for b, (_, t) in zip(boxes, held_out_films)]
    assert not any(b.fell_back for b in boxes)
    assert min(covered) >= 0.95, f"worst film: {min(covered):.3f} of its manual lung pixels inside the box"
    gray = held_out_films[0][0]
    b = boxes[0]
    assert lungs.lung_box(gray) == b
    assert np.array_equal(lungs.crop_to_lungs(gray), gray[b.top:b.bottom, b.left:b.right])


def photo_like(seed: int, shape=(300, 400)) -> np.ndarray:
    """A smooth random picture with edges and grain: no chest film."""
    rng = np.random.default_rng(seed)
    img = resize(rng.random((6, 8)).astype(np.float32), shape)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    img[(yy - shape[0] * rng.random()) ** 2 + (xx - shape[1] * rng.random()) ** 2 < (shape[0] / 4) ** 2] *= 0.4
    return np.clip(img + rng.normal(0, 0.04, shape), 0, 1).astype(np.float32)


@pytest.mark.parametrize("name, gray", [
    ("black", np.zeros((256, 256), np.float32)),
    ("uniform gray", np.full((200, 300), 0.5, np.float32)),
    ("white noise", np.random.default_rng(0).random((256, 256)).astype(np.float32)),
    ("photo-like 1", photo_like(1)),
    ("photo-like 2", photo_like(2, (512, 384))),
])
def test_what_is_not_a_chest_film_falls_back(name, gray):
    box = lungs.lung_box(gray)
    assert box == lungs.LungBox(0, 0, *gray.shape, True), name
    assert lungs.crop_to_lungs(gray).shape == gray.shape


def test_one_lung_found_takes_in_its_mirror_image():
    """A lung whitened by disease is not found: the box must not cut it off."""
    prob = np.zeros((lungs.SIZE, lungs.SIZE), np.float32)
    prob[20:100, 70:110] = 1  # the left lung only (image right)
    one = lungs.box_from_mask(prob, (256, 256), margin=0)
    assert not one.fell_back and (one.left, one.right) == (36, 220) and (one.top, one.bottom) == (40, 200)
    prob[20:100, 18:58] = 1  # both lungs
    assert lungs.box_from_mask(prob, (256, 256), margin=0) == lungs.LungBox(40, 36, 200, 220, False)
    prob[20:100, 18:58] = 0
    prob[30:34, 30:34] = 1  # a speck is no lung
    assert lungs.box_from_mask(prob, (256, 256), margin=0) == one


def test_mask_at_the_image_size():
    gray = photo_like(3, (37, 53))
    mask = lungs.lung_mask(gray)
    assert mask.shape == (37, 53) and mask.dtype == np.float32
    assert 0 <= mask.min() and mask.max() <= 1
    assert lungs.lung_boxes([]) == []
    with pytest.raises(ValueError):
        lungs.lung_box(np.zeros((8, 8, 3), np.float32))


def test_asset_matches_its_recorded_sha256():
    sha = lungs.asset_sha256()
    assert sha == lungs.ASSET_SHA256
    record = (lungs.ASSET.parent / "LUNGSEG.md").read_text()
    assert re.search(r"SHA-256 of lungseg.onnx:\*\* `([0-9a-f]{64})`", record).group(1) == sha
    assert lungs.ASSET.stat().st_size < 2_000_000


def test_a_changed_asset_is_refused(tmp_path, monkeypatch):
    changed = tmp_path / "lungseg.onnx"
    shutil.copy(lungs.ASSET, changed)
    data = bytearray(changed.read_bytes())
    data[-1] ^= 1
    changed.write_bytes(bytes(data))
    monkeypatch.setattr(lungs, "ASSET", changed)
    lungs._session.cache_clear()
    try:
        with pytest.raises(CxrlabError, match="SHA-256"):
            lungs.lung_mask(np.zeros((64, 64), np.float32))
    finally:
        monkeypatch.undo()
        lungs._session.cache_clear()


def test_boxes_plausible_at_another_hospital(shenzhen_dir):
    india = shenzhen_dir.parent / "india_da"
    if not india.is_dir():
        pytest.skip(f"India DA films not found at {india} (see shared/data/README.md)")
    grays = [decode_image(p).pixels for p in sorted(india.glob("*/*.jpg"))]
    boxes = lungs.lung_boxes(grays)
    area = [(b.bottom - b.top) * (b.right - b.left) / g.size for b, g in zip(boxes, grays)]
    plausible = [not b.fell_back and 0.2 <= a <= 0.9 for b, a in zip(boxes, area)]
    assert np.mean(plausible) >= 0.90, f"{np.mean(plausible):.1%} of {len(grays)} India DA films plausible"
