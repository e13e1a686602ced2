"""Is this picture a frontal chest radiograph at all? The same answer for every model, whatever hospital it
was trained on (the model's own shift score, in ``cxrlab.ood``, tells how unlike its training images a film is).

Three rules, in order:
- a colour picture is refused (chest films are gray; a gray film saved as RGB has no colour);
- a blank or nearly uniform picture is refused;
- the small network shipped in ``assets/chestcheck.onnx`` sees the picture squashed to a small square and gives
  the probability that it is a frontal chest radiograph; below
  ``THRESHOLD`` it is refused. Lateral chest films are refused too: a model trained on frontal films cannot
  read them. ``scripts/build_chest_check.py`` rebuilds it from ``../shared/data``; its data and
  cross-validated figures are in ``assets/CHESTCHECK.md``.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .decode import DecodedImage, resize

ASSET = Path(__file__).resolve().parent / "assets" / "chestcheck.onnx"
ASSET_SHA256 = "08812e0d8ef047e133218ce8b04e913b07e62f87d8f67faf285020717c40aaa9"  # set by scripts/build_chest_check.py
THRESHOLD = 0.5  # set by scripts/build_chest_check.py
BATCH = 64
COLOR_LIMIT = 0.06  # mean channel difference on [0, 1]; gray X-rays saved as RGB sit near 0
FLAT_LIMIT = 0.02  # pixel standard deviation of a blank or nearly uniform picture


@dataclass(frozen=True)
class ChestVerdict:
    chest: bool  # True: a frontal chest radiograph, to be scored
    score: float  # the network's probability (0 for a picture refused by the colour or blank rule)
    reason: str  # why it was refused ("" when accepted)


def asset_sha256() -> str:
    return hashlib.sha256(ASSET.read_bytes()).hexdigest()


def info(network: bool = True) -> dict:
    """What a model directory records about the check it was saved with (``network``: False when only the
    colour and blank rules apply)."""
    return {"asset_sha256": ASSET_SHA256, "threshold": THRESHOLD, "color_limit": COLOR_LIMIT, "flat_limit": FLAT_LIMIT,
            "network": network}


@functools.lru_cache(maxsize=1)
def _session():
    from .embed import asset_session

    # One thread: the network is tiny, and a second thread pool spinning beside the model's own slowed
    # predict more than the check's work (measured, head-only lite0: +35 % with two threads, +10 % with one).
    return asset_session(ASSET, ASSET_SHA256, "chest.ASSET_SHA256", "scripts/build_chest_check.py", threads=1)


def probabilities(grays: Sequence[np.ndarray], session=None) -> np.ndarray:
    """(N,) probability that each 2-D gray picture (float in [0, 1], any size) is a frontal chest radiograph;
    ``session`` (an onnxruntime session of another build of the network) is for the build script. The network
    says what it needs: its ``image`` input's side, and a ``lungs`` input where it reads the lung map too."""
    from .lungs import SIZE as LUNG_SIZE, masks_128

    if not len(grays):
        return np.zeros(0, np.float32)
    session = session or _session()
    names = {i.name: i.shape for i in session.get_inputs()}
    size = int(names["image"][2])
    feeds = {"image": np.stack([resize(np.asarray(g, np.float32), size) for g in grays])}
    if "lungs" in names:
        feeds["lungs"] = masks_128([resize(np.asarray(g, np.float32), LUNG_SIZE) for g in grays])
    out = [session.run(["chest"], {k: v[i:i + BATCH, None] for k, v in feeds.items()})[0]
           for i in range(0, len(grays), BATCH)]
    return np.concatenate(out).astype(np.float32)


def check(images: Sequence[DecodedImage | np.ndarray], threshold: float = THRESHOLD, *,
          network: bool = True) -> list[ChestVerdict]:
    """The verdict on each picture: decoded, or a 2-D gray array in [0, 1] (whose colour is then unknown).
    ``network=False``: the colour and blank rules only (for a model whose own images the network refuses)."""
    images = [img if isinstance(img, DecodedImage) else _gray(img) for img in images]
    verdicts: list[ChestVerdict | None] = [None] * len(images)
    to_score = []
    for i, img in enumerate(images):
        if img.colorfulness > COLOR_LIMIT:
            verdicts[i] = ChestVerdict(False, 0.0, f"a colour picture (colourfulness {img.colorfulness:.2f})")
        elif float(img.pixels.std()) < FLAT_LIMIT:
            verdicts[i] = ChestVerdict(False, 0.0, "a blank or nearly uniform picture")
        elif network:
            to_score.append(i)
        else:
            verdicts[i] = ChestVerdict(True, 1.0, "")
    for i, p in zip(to_score, probabilities([images[i].pixels for i in to_score])):
        p = round(float(p), 4)
        verdicts[i] = ChestVerdict(True, p, "") if p >= threshold else ChestVerdict(
            False, p, f"does not look like a frontal chest radiograph (chest score {p:.2f} < {threshold:g})")
    return verdicts


def _gray(pixels: np.ndarray) -> DecodedImage:
    a = np.asarray(pixels, np.float32)
    return DecodedImage(a, a.shape[1], a.shape[0], "array", False, 0.0, 32)
