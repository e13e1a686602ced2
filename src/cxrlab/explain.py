"""Explain: (Model, image) -> class activation map and overlay.

The fused model.onnx outputs ``class_maps`` (N, K, h, w): for class k the exact map
sum_c W_kc A_c whose spatial mean plus the bias is the logit (Zhou et al. 2016), so no
gradients or extra passes are needed. Maps are min-max normalised for display; a map with
most of its heat in the outer band suggests the model looks at markers or borders, not lungs.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .embed import prepare, read_file
from .errors import DataError, ImageError, ModelDirError
from .fsutil import atomic_write_bytes
from .outputs import check_output_dir, claim, made_by_cxrlab, model_labels
from .predict import Model, expand_paths, load_model
from .progress import Progress, resolve


@dataclass
class Heatmap:
    path: str
    label: str
    score: float
    cam: np.ndarray  # float32 (h, w) of the explained class, min-max normalised to [0, 1]
    full: np.ndarray  # cam upsampled to the decoded image size (H, W)


def normalise(m: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1]; a constant map becomes zeros."""
    m = np.asarray(m, dtype=np.float32)
    lo, hi = float(m.min()), float(m.max())
    if not np.isfinite(hi - lo) or hi - lo <= 0:
        return np.zeros_like(m)
    return (m - lo) / (hi - lo)


def class_activation_map(model, array: np.ndarray, class_index: int) -> np.ndarray:
    """The normalised (h, w) map of one class for one (S, S) input (constant map -> zeros)."""
    return class_activation_maps(model, [array], [class_index])[0]


def class_activation_maps(model, arrays, class_indices, *, raw: bool = False) -> list[np.ndarray]:
    """One batched pass: the normalised (h, w) map of ``class_indices[i]`` for each (S, S) input ``arrays[i]``
    (``raw``: as the model computed it, in logit units, comparable across images)."""
    maps = model.run(np.stack([np.asarray(a, np.float32) for a in arrays]), ["class_maps"])
    if "class_maps" not in maps:
        raise ModelDirError(f"{model.directory}: model.onnx has no 'class_maps' output (retrain with this cxrlab)")
    pick = (lambda m: np.asarray(m, np.float32)) if raw else normalise
    return [pick(maps["class_maps"][i, c]) for i, c in enumerate(class_indices)]


def upsample(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (h, w) map to (H, W) with Pillow's float mode."""
    from PIL import Image

    h, w = shape
    return np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR),
                      dtype=np.float32)


def explain_array(model, array: np.ndarray, pixels: np.ndarray, name: str, decoded=None,
                  *, class_label: str | None = None) -> Heatmap:
    maps: list = []
    pred = model.predict_arrays([array], [decoded] if decoded is not None else None, names=[name], maps=maps)[0]
    if pred.ood:  # no scores, so no map of one: the picture is not a chest X-ray
        raise ImageError(name, f"not a chest X-ray: {pred.ood_reason}")
    return heatmap_of(model, pred, maps[0], pixels, class_label=class_label)


def heatmap_of(model, pred, class_maps: np.ndarray, pixels: np.ndarray, *, class_label: str | None = None) -> Heatmap:
    """The heatmap of a scored prediction from its class maps (C, h, w): of ``class_label``, else of its decision."""
    label = class_label or pred.label or max(pred.scores, key=pred.scores.get)
    if label not in model.labels:
        raise DataError(f"unknown class {label!r}; the model's classes are {', '.join(model.labels)}")
    cam = normalise(class_maps[model.labels.index(label)])
    return Heatmap(pred.path, label, pred.scores[label], cam, upsample(cam, pixels.shape))


def _load(model, data: bytes, name: str):
    return prepare(data, model.input_size, name)


def explain_file(model, path, *, class_label: str | None = None) -> Heatmap:
    """Heatmap of the model's decision, or of ``class_label``; ImageError for a picture the chest check refuses."""
    array, img = _load(model, read_file(path), str(path))
    return explain_array(model, array, img.pixels, str(path), img, class_label=class_label)


COLORMAP = "inferno"  # perceptually uniform and readable in grey print; 'jet' invents edges and hides order


def colormap(values: np.ndarray, name: str = COLORMAP) -> np.ndarray:
    """Values in [0, 1] through a matplotlib colour map, as uint8 RGB."""
    from matplotlib import colormaps

    lut = (colormaps[name].resampled(256)(np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return lut[np.round(np.clip(values, 0, 1) * 255).astype(np.intp)]


_MIN_SIDE = 256


def _fitting_font(text: str, size: int, width: float):
    """Pillow's default font at ``size`` px, or smaller (down to 8) until ``text`` fits ``width``."""
    from PIL import ImageFont

    font = ImageFont.load_default(size=size)
    while size > 8 and font.getlength(text) > width:
        size -= 1
        font = ImageFont.load_default(size=size)
    return font


def _vertical_text(text: str, font, height: int) -> "Image.Image":
    """``text`` rotated to read bottom-up, on white, for the colour bar's title."""
    from PIL import Image, ImageDraw

    w = int(font.getlength(text)) + 4
    box = Image.new("RGB", (max(w, height), int(font.size * 1.3)), "white")
    ImageDraw.Draw(box).text((box.width / 2, box.height / 2), text, fill="black", font=font, anchor="mm")
    return box.rotate(90, expand=True)


def overlay_png(heatmap: Heatmap, pixels: np.ndarray, *, alpha: float = 0.45, scale: tuple[float, float] | None = None,
                map_values: np.ndarray | None = None) -> bytes:
    """The gray image at its own resolution, the heatmap on top in a perceptual colour map, a colour bar with
    its values and title, and a caption.

    By default the map is the heatmap's own, normalised to this image (the bar reads 0 = its least, 1 = its most
    heat). With ``map_values`` (the raw class activation map at the image's size) and ``scale`` (lo, hi), every
    overlay drawn with the same ``scale`` uses the same colours for the same evidence (the report's shared scale).
    Drawn with Pillow rather than matplotlib: about 100 times faster, which matters in serve."""
    from PIL import Image, ImageDraw, ImageFont

    H, W = pixels.shape
    if map_values is not None and scale is not None:
        lo, hi = scale
        full = (np.asarray(map_values, np.float32) - lo) / (hi - lo if hi > lo else 1.0)
        title, ticks = "class evidence (shared scale)", (lo, (lo + hi) / 2, hi)
    else:
        full = heatmap.full if heatmap.full.shape == pixels.shape else upsample(heatmap.cam, pixels.shape)
        title, ticks = "relative heat (this image)", (0.0, 0.5, 1.0)
    if max(H, W) < _MIN_SIDE:  # a small image is drawn larger, so that the bar's and caption's text fit beside it
        f = -(-_MIN_SIDE // max(H, W))
        pixels = np.repeat(np.repeat(pixels, f, axis=0), f, axis=1)
        H, W = pixels.shape
        full = upsample(full, (H, W))
    gray = np.repeat((np.clip(pixels, 0, 1) * 255)[..., None], 3, axis=2)
    blended = ((1 - alpha) * gray + alpha * colormap(full)).astype(np.uint8)
    font_px = int(max(12, min(40, W / 14)))  # overlays are shown shrunk: 1/14 of the width stays legible
    font = ImageFont.load_default(size=font_px)
    small = _fitting_font(title, int(font_px * 0.8), 0.95 * H)
    labels = [f"{v:.2g}" for v in ticks]
    caption_h, bar_w, pad = font_px * 2, max(14, W // 25), max(6, W // 60)
    label_w = int(max(font.getlength(t) for t in labels)) + pad
    side = _vertical_text(title, small, H)
    canvas = Image.new("RGB", (W + 2 * pad + bar_w + label_w + side.width + pad, H + caption_h), "white")
    canvas.paste(Image.fromarray(blended), (0, caption_h))
    ramp = np.linspace(1, 0, H)[:, None].repeat(bar_w, axis=1)
    canvas.paste(Image.fromarray(colormap(ramp)), (W + pad, caption_h))
    canvas.paste(side.crop((0, max(0, (side.height - H) // 2), side.width, max(0, (side.height - H) // 2) + H)),
                 (W + 2 * pad + bar_w + label_w, caption_h))
    draw = ImageDraw.Draw(canvas)
    for frac, text in zip((0.0, 0.5, 1.0), labels):
        y = caption_h + int((1 - frac) * (H - 1))
        draw.text((W + pad + bar_w + 3, y), text, fill="black", font=font,
                  anchor="lt" if frac == 1.0 else ("lb" if frac == 0.0 else "lm"))
    caption = f"{heatmap.label} (score = {heatmap.score:.5f})"
    draw.text((canvas.width / 2, caption_h / 2), caption, fill="black",
              font=_fitting_font(caption, font_px, 0.96 * canvas.width), anchor="mm")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", compress_level=1)  # zlib level 6 took 2/3 of the time for little gain
    return buf.getvalue()


def shrink(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """The image scaled down so that its longer side is at most ``max_side`` (display only)."""
    from .decode import resize

    h, w = pixels.shape
    scale = max_side / max(h, w)
    return pixels if scale >= 1 else resize(pixels, (max(1, round(h * scale)), max(1, round(w * scale))))


def prediction_overlay_png(model, array: np.ndarray, pixels: np.ndarray, pred, *, max_side: int = 512,
                           maps: np.ndarray | None = None) -> bytes:
    """Overlay for a prediction already made on ``array``; its class ``maps`` (C, h, w) from the same pass
    (``Model.predict_arrays(maps=...)``), or None for one extra pass.

    Drawn at most ``max_side`` pixels wide: a 3000 px original would be slow and heavy."""
    label = pred.label or max(pred.scores, key=pred.scores.get)
    cam = (class_activation_map(model, array, model.labels.index(label)) if maps is None
           else normalise(maps[model.labels.index(label)]))
    small = shrink(pixels, max_side)
    return overlay_png(Heatmap(pred.path, label, pred.scores[label], cam, upsample(cam, small.shape)), small)


def heatmap_png(model, data: bytes, name: str, *, max_side: int = 512) -> bytes | None:
    """Decode uploaded bytes, predict, and return the overlay PNG of the decision (None if unreadable or
    refused as not a chest X-ray)."""
    try:
        array, img = _load(model, data, name)
    except ImageError:
        return None
    maps: list = []
    pred = model.predict_arrays([array], [img], names=[name], maps=maps)[0]
    if pred.ood:
        return None
    return prediction_overlay_png(model, array, img.pixels, pred, max_side=max_side, maps=maps[0])


HEATMAP_SUFFIXES = (".png", ".npy")


def check_output(output_dir, model, paths) -> Path:
    """Refuse, before any work, a heatmap folder over, around or inside the images or the model, or
    inside a folder of class subfolders (the heatmaps would become training images)."""
    paths = paths if isinstance(paths, (list, tuple)) else [paths]
    return check_output_dir(output_dir, "explain", inputs=[getattr(model, "directory", model), *paths],
                            classes=model_labels(model))


def _heatmap_stems(out: Path, files: list[str]) -> list[str]:
    """One stem per file: its own, or <stem>-2... when taken by another file of this run or by a file
    that explain did not write (a user's file is never overwritten)."""
    made = made_by_cxrlab(out) if out.is_dir() else None
    owned = made.entries if made else {}

    def free(stem: str) -> bool:
        return all(not os.path.lexists(out / f"{stem}{x}") or owned.get(f"{stem}{x}") == "explain"
                   for x in HEATMAP_SUFFIXES)

    stems: list[str] = []
    used: set[str] = set()
    for path in files:
        base = Path(path).stem
        stem, n = base, 1
        while stem in used or not free(stem):
            n += 1
            stem = f"{base}-{n}"
        used.add(stem)
        stems.append(stem)
    return stems


def explain_paths(model, paths, output_dir: str | os.PathLike, *,
                  skipped: list[tuple[str, str]] | None = None, progress: Progress | None = None,
                  predictions: list | None = None, ood: bool = True, title: str = "explaining") -> list[Heatmap]:
    """Write <stem>.png (overlay) and <stem>.npy (the raw (h, w) map) per readable image
    (<stem>-2... when two files share a name or the name is taken); unreadable files go to
    ``skipped`` as (path, reason); ``progress`` advances once per file. The heatmaps come from the
    prediction's own pass (``Model.predict(on_maps=...)``, with its ``ood`` checks); ``predictions``, a list,
    receives that prediction."""
    paths = list(paths) if isinstance(paths, (list, tuple)) else [paths]
    out = check_output(output_dir, model, paths)
    files = expand_paths(paths)
    stems = _heatmap_stems(out, files)
    claim(out, "explain", files=[f"{stem}{x}" for stem in stems for x in HEATMAP_SUFFIXES])
    written: dict[int, Heatmap] = {}

    def write(index: int, pred, decoded, class_maps) -> None:
        hm = heatmap_of(model, pred, class_maps, decoded.pixels)
        atomic_write_bytes(out / f"{stems[index]}.png", overlay_png(hm, decoded.pixels))
        buf = io.BytesIO()
        np.save(buf, hm.cam, allow_pickle=False)
        atomic_write_bytes(out / f"{stems[index]}.npy", buf.getvalue())
        written[index] = hm

    progress = resolve(progress)
    progress.start(len(files), title)
    try:
        preds = model.predict(files, ood=ood, progress=progress, on_maps=write)
    finally:
        progress.close()
    for pred in preds:
        if skipped is not None and (pred.error or pred.ood):  # unreadable, or refused as not a chest X-ray
            skipped.append((pred.path, pred.error or f"not a chest X-ray: {pred.ood_reason}"))
    if predictions is not None:
        predictions.extend(preds)
    return [written[i] for i in sorted(written)]


@dataclass
class ExplainResult:
    heatmaps: list[Heatmap]  # one per readable image, in input order
    skipped: list[tuple[str, str]]  # (path, reason) of each unreadable file
    summary: dict  # border heat share over the heatmaps (see ``summary``)
    output_dir: Path


def explain(model, paths, output_dir: str | os.PathLike, *, trust_modified: bool = False) -> ExplainResult:
    """Write a class activation map overlay for each image: where the model looked.

    For each readable image, ``<stem>.png`` (the image with the map of the predicted class on top,
    its score in the caption) and ``<stem>.npy`` (the raw (h, w) map, normalised to [0, 1]) go into
    ``output_dir``; ``<stem>-2`` ... when two images share a name or the name is taken by a file
    that cxrlab did not write.

    Parameters
    ----------
    model : cxrlab.Model, str or os.PathLike
        A loaded model, or the model directory to load.
    paths : str, os.PathLike, or a list of them
        Image files; folders are walked for image files.
    output_dir : str or os.PathLike
        Folder for the heatmaps (created). Refused, before any work, when it lies over, around or
        inside the images or the model, or in a folder of class subfolders.
    trust_modified : bool
        When ``model`` is a directory: load it even if its files differ from their SHA-256 record
        (see :func:`cxrlab.load_model`).

    Returns
    -------
    ExplainResult
        ``heatmaps`` (path, label, score and the map of each image), ``skipped`` (path, reason) of
        unreadable files, ``summary`` (share of heat in the image border: a high share suggests the
        model reads markers or borders rather than lungs) and ``output_dir``.
    """
    if not isinstance(model, Model):
        check_output(output_dir, model, paths)  # before loading: a refused folder fails first
        model = load_model(model, trust_modified=trust_modified)
    skipped: list[tuple[str, str]] = []
    heatmaps = explain_paths(model, paths, output_dir, skipped=skipped)
    return ExplainResult(heatmaps, skipped, summary(heatmaps), Path(output_dir))


def border_heat_share(cam: np.ndarray, border: float = 0.15) -> float:
    """Share of the total heat in the outer band (``border`` of each side)."""
    cam = np.clip(np.asarray(cam, np.float64), 0, None)
    h, w = cam.shape
    bh, bw = max(1, int(round(h * border))), max(1, int(round(w * border)))
    total = cam.sum()
    if total <= 0:
        return 0.0
    inner = cam[bh:h - bh, bw:w - bw].sum() if h > 2 * bh and w > 2 * bw else 0.0
    return float((total - inner) / total)


def summary(heatmaps) -> dict:
    """Mean/median border heat share; ``flag`` when the mean is above one half."""
    shares = [border_heat_share(h.full if h.full is not None else h.cam) for h in heatmaps]
    if not shares:
        return {"n": 0, "mean_border_share": None, "median_border_share": None, "flag": False}
    mean = float(np.mean(shares))
    return {"n": len(shares), "mean_border_share": mean, "median_border_share": float(np.median(shares)),
            "flag": mean > 0.5}
