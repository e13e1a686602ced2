"""Distortions (the tutorial's --flip_left_right --random_crop --random_scale --random_brightness).

Distorted images bypass the embedding cache: each training image is decoded once and
``copies`` seeded random variants of it are embedded and added to the training set.
"""

from __future__ import annotations

import numpy as np

from .decode import resize
from .embed import Embedder, prepare, read_file
from .errors import ImageError
from .progress import Progress, resolve
from .siteshift import GATE_SHIFTS, SHIFTS


def distort(pixels: np.ndarray, rng: np.random.Generator, *, flip_left_right: bool = False, random_crop: float = 0.0,
            random_scale: float = 0.0, random_brightness: float = 0.0) -> np.ndarray:
    """One random variant, with the tutorial's meaning of each percentage."""
    h, w = pixels.shape
    # The tutorial enlarges by (1 + crop%) * (1 + U(0, scale%)) and takes a centred-at-random crop.
    factor = (1.0 + random_crop / 100.0) * (1.0 + rng.uniform(0, random_scale / 100.0))
    if factor > 1.0:
        ch, cw = max(1, int(round(h / factor))), max(1, int(round(w / factor)))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        pixels = pixels[top : top + ch, left : left + cw]
    if flip_left_right and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    if random_brightness:
        pixels = pixels * rng.uniform(1 - random_brightness / 100.0, 1 + random_brightness / 100.0)
    return np.clip(np.ascontiguousarray(pixels), 0, 1).astype(np.float32)


def distorted_embeddings(embedder: Embedder, paths, y: np.ndarray, *, copies: int = 4, seed: int = 0,
                         progress: Progress | None = None, **distortions) -> tuple[np.ndarray, np.ndarray]:
    progress = resolve(progress)
    progress.start(len(paths) * copies, "embedding distorted copies")
    rng = np.random.default_rng(seed)
    size = embedder.size
    vectors, labels = [], []
    for path, label in zip(paths, y):
        try:
            _, img = prepare(read_file(path), size, str(path))
        except ImageError:
            progress.advance(copies)
            continue
        variants = [resize(distort(img.pixels, rng, **distortions), size) for _ in range(copies)]
        vectors.append(embedder.embed_arrays(variants))
        labels.extend([label] * copies)
        progress.advance(copies)
    progress.close()
    if not vectors:
        return np.zeros((0, embedder.backbone.spec.embed_dim), np.float32), np.zeros(0, np.int64)
    return np.concatenate(vectors), np.array(labels, np.int64)


def site_shift_embeddings(embedder: Embedder, paths, digests: list[bytes], *, store=None,
                          shifts=GATE_SHIFTS, progress: Progress | None = None,
                          desc: str = "embedding site-shifted copies") -> np.ndarray:
    """Embeddings of each image under each site shift, cached under keys derived from the image digest;
    ``desc`` names the step on the progress bar."""
    import hashlib

    progress = resolve(progress)
    progress.start(len(paths) * len(shifts), desc)
    size = embedder.size
    out = []
    for path, digest in zip(paths, digests):
        keys = [hashlib.sha256(digest + f"shift:{name}".encode()).digest() for name in shifts]
        cached = store.get_many(keys) if store is not None else [None] * len(keys)
        if any(v is None for v in cached):
            try:
                _, img = prepare(read_file(path), size, str(path))
            except ImageError:
                progress.advance(len(shifts))
                continue
            missing = [i for i, v in enumerate(cached) if v is None]
            arrays = [resize(np.clip(SHIFTS[shifts[i]](img.pixels), 0, 1).astype(np.float32), size) for i in missing]
            vectors = embedder.embed_arrays(arrays)
            if store is not None:
                store.put_many([keys[i] for i in missing], vectors)
            for i, v in zip(missing, vectors):
                cached[i] = v
        out.extend(cached)
        progress.advance(len(shifts))
    progress.close()
    return np.stack(out) if out else np.zeros((0, embedder.backbone.spec.embed_dim), np.float32)
