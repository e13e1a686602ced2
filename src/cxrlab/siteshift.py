"""Site-shift suite: test images transformed the ways hospitals' X-rays differ, scored at the model's
stored operating point (AUC and sensitivity/specificity per shift).

Each shift maps a gray float image in [0, 1] (any size, before the network's resize) to another.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .decode import resize
from .progress import Progress, resolve


def _stretch(p: np.ndarray, fx: float, fy: float) -> np.ndarray:
    """Stretch by (fx, fy) then centre-crop back: an X-ray squashed to another aspect ratio."""
    h, w = p.shape
    big = resize(p, (max(h, int(round(h * fy))), max(w, int(round(w * fx)))))
    top, left = (big.shape[0] - h) // 2, (big.shape[1] - w) // 2
    return big[top : top + h, left : left + w]


def jpeg_recompress(p: np.ndarray, quality: int) -> np.ndarray:
    """A gray float image in [0, 1] after a round trip through JPEG at ``quality``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(p, 0, 1) * 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf), np.float32) / 255.0


def _lowres(p: np.ndarray, side: int) -> np.ndarray:
    h, w = p.shape
    return resize(resize(p, (max(8, side * h // max(h, w)), max(8, side * w // max(h, w)))), (h, w))


def _contrast_curve(p: np.ndarray, k: float = 8.0) -> np.ndarray:
    """A film-like S-curve (sigmoid around the image median), renormalised to [0, 1]."""
    s = 1 / (1 + np.exp(-k * (p - np.median(p))))
    return (s - s.min()) / max(float(s.max() - s.min()), 1e-6)


def _marker(p: np.ndarray, text: str, corner: str) -> np.ndarray:
    """Paste a white text marker (a lead 'R', 'PA ERECT') near a corner, as hospitals print them."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = p.shape
    img = Image.fromarray(np.round(np.clip(p, 0, 1) * 255).astype(np.uint8))
    size = max(10, h // (8 if len(text) <= 2 else 14))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    margin = max(2, h // 30)
    x = margin if corner.endswith("left") else w - (x1 - x0) - margin
    y = margin if corner.startswith("top") else h - (y1 - y0) - margin
    draw.rectangle([x - 2, y - 2, x + (x1 - x0) + 2, y + (y1 - y0) + 2], fill=0)
    draw.text((x - x0, y - y0), text, fill=255, font=font)
    return np.asarray(img, np.float32) / 255.0


# How hospitals' X-rays differ from one another: the one table, used by the site-shift suite (SUITE) and to widen
# what the out-of-distribution gate and the robust operating point call genuine (GATE_SHIFTS).
SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda p: p,
    "aspect_wide": lambda p: _stretch(p, 1.25, 1.0),
    "aspect_tall": lambda p: _stretch(p, 1.0, 1.25),
    "gamma_0.6": lambda p: p**0.6,
    "gamma_1.6": lambda p: p**1.6,
    "contrast_curve": _contrast_curve,
    "contrast_low": lambda p: (p - 0.5) * 0.6 + 0.5,
    "contrast_high": lambda p: (p - 0.5) * 1.5 + 0.5,
    "bright": lambda p: p * 1.3,
    "dark": lambda p: p * 0.7,
    "lowres_96": lambda p: _lowres(p, 96),
    "jpeg_q20": lambda p: jpeg_recompress(p, 20),
    "jpeg_q25": lambda p: jpeg_recompress(p, 25),
    "inverted": lambda p: 1.0 - p,
    "marker_R": lambda p: _marker(p, "R", "top-left"),
    "marker_PA_ERECT": lambda p: _marker(p, "PA ERECT", "top-right"),
}
SUITE = ("none", "aspect_wide", "aspect_tall", "gamma_0.6", "gamma_1.6", "contrast_curve", "contrast_low",
         "lowres_96", "jpeg_q20", "inverted", "marker_R", "marker_PA_ERECT")
GATE_SHIFTS = ("contrast_low", "contrast_high", "bright", "dark", "gamma_0.6", "gamma_1.6", "lowres_96", "jpeg_q25")


def shifted_inputs(pixels: list[np.ndarray], size: int, shift: str) -> np.ndarray:
    """(n, size, size) float32 network inputs of each image under ``shift``."""
    fn = SHIFTS[shift]
    return np.stack([resize(np.clip(fn(p), 0, 1).astype(np.float32), size) for p in pixels])


def shift_rows(y: np.ndarray, pixels: list[np.ndarray], size: int, score: Callable[[np.ndarray], np.ndarray],
               threshold: float, shifts=None, progress: Progress | None = None) -> list[dict]:
    """AUC and sensitivity/specificity at ``threshold`` for each shift; ``score`` maps inputs to P(positive)."""
    from .metrics import binary_report, meets_who

    y = np.asarray(y, np.int64)
    shifts = shifts or SUITE
    progress = resolve(progress)
    progress.start(len(shifts) * len(pixels), f"scoring {len(shifts)} site shifts")
    rows = []
    try:
        for name in shifts:
            s = score(shifted_inputs(pixels, size, name))
            progress.advance(len(pixels))
            rep = binary_report(y, s, threshold)
            rows.append({"shift": name, "n": int(len(y)), "auc": rep["auc"], "sensitivity": rep["sensitivity"],
                         "specificity": rep["specificity"], "accuracy": rep["accuracy"],
                         "meets_who": meets_who(rep["sensitivity"], rep["specificity"])})
    finally:
        progress.close()
    return rows


def site_shift_table(model, paths, labels, shifts=None, progress: Progress | None = None) -> list[dict]:
    """Rows per shift for a loaded model (cxrlab.load_model): ``labels`` are label names or 0/1 (1 = positive);
    ``progress`` sees the decoding, then the scoring of every shifted copy."""
    from .decode import decode_image
    from .errors import DataError, ImageError

    if model.threshold is None or model.positive_label is None:
        raise DataError("the site-shift suite needs a binary model with a stored operating point")
    pos = model.labels.index(model.positive_label)
    y = np.array([int(lab == model.positive_label) if isinstance(lab, str) else int(lab) for lab in labels])
    pixels, keep = [], []
    progress = resolve(progress)
    progress.start(len(paths), "decoding")
    try:
        for i, p in enumerate(paths):
            try:
                pixels.append(decode_image(os.fspath(p)).pixels)
                keep.append(i)
            except ImageError:
                pass
            progress.advance()
    finally:
        progress.close()

    def score(batch: np.ndarray) -> np.ndarray:
        out = [model.run(batch[i : i + 32])["probabilities"][:, pos] for i in range(0, len(batch), 32)]
        return np.concatenate(out)

    return shift_rows(y[keep], pixels, model.input_size, score, float(model.threshold), shifts, progress)


def site_shift_folder(model, data_dir: str | os.PathLike, *, label_from_name: str | None = None, shifts=None,
                      progress: Progress | None = None) -> list[dict]:
    from .discover import discover

    ds = discover(Path(data_dir), label_from_name=label_from_name, min_per_class=0, require_classes=1)
    return site_shift_table(model, [Path(data_dir) / s.relpath for s in ds.samples], [s.label for s in ds.samples],
                            shifts, progress)


def format_rows(rows: list[dict]) -> list[str]:
    lines = [f"{'shift':18} {'AUC':>6} {'sens':>6} {'spec':>6}  WHO(sens>=.90,spec>=.70)"]
    for r in rows:
        lines.append(f"{r['shift']:18} {r['auc']:6.3f} {r['sensitivity']:6.3f} {r['specificity']:6.3f}  "
                     f"{'yes' if r['meets_who'] else 'no'}")
    return lines
