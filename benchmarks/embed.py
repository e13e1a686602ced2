"""Embedding throughput: cxrlab's ONNX Runtime pipeline vs a naive PyTorch eager loop, same run.

    python benchmarks/embed.py [IMAGE_DIR] [--backbone efficientnet-lite0] [--eager-images 64]

Prints images/s end to end (read + decode + resize + forward) for both, their ratio, and the
wall time of a warm `cxrlab train` (every embedding a cache hit) as a separate process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "shenzhen"


def images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def bench_cxrlab(paths, backbone: str) -> float:
    from cxrlab.backbones import create_backbone
    from cxrlab.embed import Embedder

    embedder = Embedder(create_backbone(backbone))
    embedder.embed_files(paths[:32])  # warm-up: session initialisation, page cache
    start = time.perf_counter()
    result = embedder.embed_files(paths)  # no store: every image decoded and forwarded
    elapsed = time.perf_counter() - start
    assert len(result.paths) == len(paths)
    return len(paths) / elapsed


def bench_eager(paths, backbone: str) -> float:
    """The tutorial-style baseline: PIL decode + resize, one torch eager forward per batch of 16."""
    import torch
    from PIL import Image

    from cxrlab.backbones import _weights_path, get_spec

    spec = get_spec(backbone)
    module = spec.builder(spec, _weights_path(spec)).eval()
    torch.set_num_threads(os.cpu_count() or 1)

    def load(p):
        img = Image.open(p).convert("L").resize((spec.input_size, spec.input_size), Image.BILINEAR)
        return np.asarray(img, np.float32)[None] / 255.0

    with torch.no_grad():
        module(torch.from_numpy(np.stack([load(paths[0])])))
        start = time.perf_counter()
        for i in range(0, len(paths), 16):
            module(torch.from_numpy(np.stack([load(p) for p in paths[i : i + 16]])))
    return len(paths) / (time.perf_counter() - start)


def warm_train_seconds(root: Path, backbone: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "cxrlab", "train", str(root), "--backbone", backbone, "--output",
               f"{tmp}/model", "--bottleneck-dir", f"{tmp}/bn", "--quiet", "--no-report"]
        subprocess.run(cmd, check=True, capture_output=True)  # cold: fills the cache
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image_dir", nargs="?", default=str(DEFAULT_DIR))
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--eager-images", type=int, default=96, help="images for the (slow) eager baseline")
    a = ap.parse_args()
    paths = images(Path(a.image_dir))
    if not paths:
        sys.exit(f"no images under {a.image_dir}")
    ort_rate = bench_cxrlab(paths, a.backbone)
    eager_rate = bench_eager(paths[: a.eager_images], a.backbone)
    print(f"backbone: {a.backbone}; images: {len(paths)}; cores: {os.cpu_count()}")
    print(f"cxrlab ONNX Runtime pipeline: {ort_rate:8.1f} img/s end to end")
    print(f"PyTorch eager baseline:       {eager_rate:8.1f} img/s ({a.eager_images} images)")
    print(f"ratio:                        {ort_rate / eager_rate:8.1f}x")
    print(f"warm `cxrlab train` (all cache hits), whole process: {warm_train_seconds(Path(a.image_dir), a.backbone):.2f} s")


if __name__ == "__main__":
    main()
