"""Lung fields of a frontal chest X-ray, found by the small segmentation net shipped in
``assets/lungseg.onnx`` (rebuilt by ``scripts/build_lung_segmenter.py``; data, seed and held-out
Dice in ``assets/LUNGSEG.md``).

The net sees the image squashed to 128 x 128 (as the Shenzhen films it learnt from were squashed to a
square) and windows it itself to the image's 1st-99th percentile, so any exposure and any size will do::

    mask = lung_mask(gray)              # float (H, W) lung probability, gray = (H, W) float in [0, 1]
    box = lung_box(gray)                # LungBox(top, left, bottom, right, fell_back), bottom/right exclusive
    crop = crop_to_lungs(gray)          # gray[box.top:box.bottom, box.left:box.right]
    boxes = lung_boxes(grays)           # many images, 32 per network call

The box is the bounding box of the two largest lung components, widened by ``margin`` times its own
height (top and bottom) and width (left and right). The net finds aerated lung, so a lung whitened
by disease can be missing: when the two components do not look like a left and a right lung, the
box also takes in its mirror image about the image's vertical centre line. The box is the whole
image, with ``fell_back`` set, when the mask does not look like lungs: less than 5 % or more than
70 % of the image, or a box narrower or shorter than a quarter of the image.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from .decode import resize

ASSET = Path(__file__).resolve().parent / "assets" / "lungseg.onnx"
ASSET_SHA256 = "0ffe750ead84108b285e5b261d5b5358ba365e8d7bf6dc47d028e1b1e7b843b3"  # set by scripts/build_lung_segmenter.py
SIZE = 128  # the net's input and output side
BATCH = 32  # images per network call
THRESHOLD = 0.5  # probability above which a pixel is lung
MIN_AREA, MAX_AREA = 0.05, 0.70  # plausible lung area, as a fraction of the image
MIN_SIDE = 0.25  # a plausible box is at least this fraction of the image's height and of its width


class LungBox(NamedTuple):
    """Pixel rows top:bottom and columns left:right of an image (bottom and right exclusive)."""

    top: int
    left: int
    bottom: int
    right: int
    fell_back: bool  # True: the mask was implausible and the box is the whole image


def held_out(name: str) -> bool:
    """Whether the shipped net was kept from training on this film (about 1 in 10, by a hash of its
    file stem, e.g. "CHNCXR_0001_0"): its Dice on these films is the one LUNGSEG.md reports."""
    return hashlib.sha256(Path(name).stem.encode()).digest()[0] % 10 == 0


def asset_sha256() -> str:
    return hashlib.sha256(ASSET.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def _session():
    from .embed import asset_session

    return asset_session(ASSET, ASSET_SHA256, "lungs.ASSET_SHA256", "scripts/build_lung_segmenter.py")


def _check(gray: np.ndarray) -> np.ndarray:
    arr = np.asarray(gray, dtype=np.float32)
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"expected a 2-D gray image, got shape {arr.shape}")
    return arr


def masks_128(grays: Sequence[np.ndarray], session=None) -> np.ndarray:
    """(N, 128, 128) lung probabilities of the images squashed to the net's size; ``session`` (an
    onnxruntime session of another build of the net) is for the build script."""
    session = session or _session()
    inputs = np.stack([resize(_check(g), SIZE) for g in grays]) if len(grays) else np.zeros((0, SIZE, SIZE), np.float32)
    out = [session.run(["mask"], {"image": inputs[i:i + BATCH, None]})[0][:, 0] for i in range(0, len(inputs), BATCH)]
    return np.concatenate(out) if out else np.zeros((0, SIZE, SIZE), np.float32)


def lung_masks(grays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each image's lung probability (float32 in [0, 1]) at the image's own size."""
    return [resize(m, _check(g).shape) for g, m in zip(grays, masks_128(grays))]


def lung_mask(gray: np.ndarray) -> np.ndarray:
    """The lung probability (float32 in [0, 1]) of one 2-D gray image, at its own size."""
    return lung_masks([gray])[0]


def box_from_mask(prob: np.ndarray, shape: tuple[int, int], margin: float = 0.08) -> LungBox:
    """The lung box in an image of ``shape`` (height, width) from its 128 x 128 probability map."""
    from scipy import ndimage

    h, w = shape
    whole = LungBox(0, 0, h, w, True)
    labels, n = ndimage.label(prob > THRESHOLD)
    if n == 0:
        return whole
    sizes = np.bincount(labels.ravel())[1:]
    largest = 1 + np.argsort(sizes, kind="stable")[::-1][:2]  # labels of the two largest components
    keep = np.isin(labels, largest)
    if not MIN_AREA <= keep.mean() <= MAX_AREA:
        return whole
    rows, cols = np.flatnonzero(keep.any(1)), np.flatnonzero(keep.any(0))
    top, bottom = rows[0] * h / SIZE, (rows[-1] + 1) * h / SIZE  # 128-grid cells -> image pixels
    left, right = cols[0] * w / SIZE, (cols[-1] + 1) * w / SIZE
    if bottom - top < MIN_SIDE * h or right - left < MIN_SIDE * w:
        return whole
    if not _two_lungs(labels, sizes, largest):  # the other lung, whitened by disease, is in its mirror image
        left, right = min(left, w - right), max(right, w - left)
    dy, dx = margin * (bottom - top), margin * (right - left)
    return LungBox(max(0, int(np.floor(top - dy))), max(0, int(np.floor(left - dx))),
                   min(h, int(np.ceil(bottom + dy))), min(w, int(np.ceil(right + dx))), False)


def _two_lungs(labels: np.ndarray, sizes: np.ndarray, largest: np.ndarray) -> bool:
    """Whether the two components look like a left and a right lung: the smaller at least a third of
    the larger, their centres at least a fifth of the width apart."""
    if len(largest) < 2 or sizes[largest[1] - 1] < sizes[largest[0] - 1] / 3:
        return False
    centre = [np.nonzero(labels == k)[1].mean() for k in largest]
    return abs(centre[0] - centre[1]) >= 0.2 * labels.shape[1]


def lung_boxes(grays: Sequence[np.ndarray], margin: float = 0.08) -> list[LungBox]:
    """``lung_box`` of many images, 32 per network call."""
    return [box_from_mask(m, _check(g).shape, margin) for g, m in zip(grays, masks_128(grays))]


def lung_box(gray: np.ndarray, margin: float = 0.08) -> LungBox:
    """The box around both lung fields of a 2-D gray image, widened by ``margin`` of its size; the
    whole image with ``fell_back=True`` when no plausible lungs are found."""
    return lung_boxes([gray], margin)[0]


def crop_to_lungs(gray: np.ndarray, margin: float = 0.08) -> np.ndarray:
    """The image cut to ``lung_box`` (the whole image when that falls back)."""
    b = lung_box(gray, margin)
    return np.asarray(gray)[b.top:b.bottom, b.left:b.right]
