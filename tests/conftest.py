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
    """One linear-head training run on Shenzhen shared by the slow tests, and its bottleneck folder. The default
    recipe (fine-tuning) costs 8 CPU-minutes here; what these tests check (figures, the cache, the tutorial's
    lines, the chest X-ray check) does not depend on it, and the check itself is the same for every model."""
    import cxrlab

    out = tmp_path_factory.mktemp("shenzhen") / "model"
    bn = tmp_path_factory.mktemp("bottlenecks")
    return cxrlab.train(shenzhen_dir, output=out, bottleneck_dir=bn, fine_tune=False), bn


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


def write_tiny_backbone(path: Path, size: int = 64, ch: int = 8) -> Path:
    """A tiny ONNX feature extractor (two 3x3 convolutions) for fast tests: use it as backbone="onnx:PATH"."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (ch, 1, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (ch,)).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (ch, ch, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["h2"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h2"], ["feat"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, size, size])],
        [helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["n", ch, size // 4, size // 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """'onnx:PATH' of the tiny backbone, written once per test session."""
    return f"onnx:{write_tiny_backbone(tmp_path_factory.mktemp('tiny-backbone') / 'tiny.onnx')}"
