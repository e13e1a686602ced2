import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHENZHEN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "shenzhen"


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Backbone exports and embeddings go to a per-session cache, never the user's."""
    if "CXRLAB_CACHE_DIR" not in os.environ:
        os.environ["CXRLAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("cxrlab-cache"))
    yield


@pytest.fixture(scope="session")
def shenzhen_dir():
    if not (SHENZHEN / "abnormal").is_dir():
        pytest.skip(f"Shenzhen data not found at {SHENZHEN} (see shared/data/README.md)")
    return SHENZHEN


@pytest.fixture(scope="session")
def shenzhen_run(shenzhen_dir, tmp_path_factory):
    """One default training run on Shenzhen shared by the slow tests, and its bottleneck folder."""
    import cxrlab

    out = tmp_path_factory.mktemp("shenzhen") / "model"
    bn = tmp_path_factory.mktemp("bottlenecks")
    return cxrlab.train(shenzhen_dir, output=out, bottleneck_dir=bn), bn


def synthetic_xray(seed: int, abnormal: bool, size: int = 96) -> np.ndarray:
    """A gray chest-like picture: two dark lung fields; 'abnormal' adds bright blotches in the upper lungs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.75 - 0.45 * (np.exp(-((xx - 0.3) ** 2 / 0.02 + (yy - 0.5) ** 2 / 0.08))
                         + np.exp(-((xx - 0.7) ** 2 / 0.02 + (yy - 0.5) ** 2 / 0.08)))
    if abnormal:
        for _ in range(3):
            cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.25, 0.45)
            img += 0.35 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.004)
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_dataset(root: Path, n_per_class: int = 24, size: int = 96) -> Path:
    for label in ("abnormal", "normal"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            seed = i * 2 + (label == "abnormal")
            Image.fromarray(synthetic_xray(seed, label == "abnormal", size)).save(root / label / f"img_{i:03d}.png")
    return root


@pytest.fixture
def tiny_dataset(tmp_path):
    return make_dataset(tmp_path / "lungs")
