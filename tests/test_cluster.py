"""--ray: embedding, prediction and data-parallel fine-tuning on a local Ray cluster of 2 CPUs give what one
process gives (the same vectors bit for bit, the same cache rows, a model that loads and predicts), and a worker
killed mid-embedding is replaced by Ray and the run ends with the same output."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset

from cxrlab.errors import CxrlabError

BACKBONE = "efficientnet-lite0"


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e .[cluster]); the --ray tests are skipped")
    import ray

    from cxrlab.cluster import Cluster, connect

    connect("local", num_cpus=2)
    try:
        yield Cluster("local", workers=2)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def backbone():
    from cxrlab.backbones import create_backbone

    return create_backbone(BACKBONE)


def _folder(root: Path, n_per_class: int) -> list[Path]:
    make_dataset(root, n_per_class=n_per_class, size=72)
    (root / "abnormal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return sorted(root.rglob("*.png"))


def _store(folder: Path, backbone):
    from cxrlab.cache import EmbeddingStore

    return EmbeddingStore(folder, backbone.cache_key(), backbone.spec.embed_dim)


def test_cluster_embedding_is_the_local_embedding_bit_for_bit(cluster, backbone, tmp_path):
    from cxrlab.embed import Embedder

    paths = _folder(tmp_path / "lungs", 12)
    local = Embedder(backbone, batch_size=32).embed_files(paths, store=_store(tmp_path / "local-cache", backbone))
    got = cluster.embed_files(backbone, paths, store=_store(tmp_path / "ray-cache", backbone), batch_size=5)
    assert got.paths == local.paths and got.digests == local.digests and len(got.paths) == 24
    assert np.array_equal(got.vectors, local.vectors) and got.vectors.dtype == np.float32
    assert [s.path for s in got.skipped] == [str(tmp_path / "lungs" / "abnormal" / "broken.png")]
    assert got.skipped == local.skipped and (got.hits, got.misses) == (0, 24)

    # the rows it cached are the local run's rows; a second run reads them all from the cache
    reopened = _store(tmp_path / "ray-cache", backbone)
    assert reopened.rejected == 0 and len(reopened) == 24
    assert all(np.array_equal(reopened.lookup(d), v) for d, v in zip(local.digests, local.vectors))
    again = cluster.embed_files(backbone, paths, store=reopened)
    assert (again.hits, again.misses) == (24, 0) and np.array_equal(again.vectors, local.vectors)


def _actor_pids() -> set[int]:
    """This user's Ray actor processes that embed (Ray titles them ray::MapWorker(MapBatches(_EmbedActor)))."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"_EmbedActor" in (entry / "cmdline").read_bytes() \
                    and entry.stat().st_uid == os.geteuid():
                pids.add(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_worker_killed_mid_embedding_is_replaced_and_the_output_is_the_same(cluster, backbone, tmp_path):
    from cxrlab.embed import Embedder

    paths = _folder(tmp_path / "lungs", 48)
    local = Embedder(backbone).embed_files(paths)
    store = _store(tmp_path / "cache", backbone)
    before = _actor_pids()
    run: dict = {}
    worker = threading.Thread(target=lambda: run.setdefault("result", cluster.embed_files(
        backbone, paths, store=store, batch_size=2)))
    worker.start()
    deadline = time.time() + 60
    while not list(store.dir.glob("seg-*.npz")) and time.time() < deadline:  # until the first batch is cached
        time.sleep(0.02)
    actors = _actor_pids() - before
    assert actors and worker.is_alive(), "the embedding ended before a worker could be killed (too few images?)"
    victim = min(actors)
    os.kill(victim, signal.SIGKILL)
    killed_during = worker.is_alive() and len(store) < len(local.paths)
    worker.join(120)
    assert not worker.is_alive() and killed_during
    got = run["result"]
    assert got.paths == local.paths and np.array_equal(got.vectors, local.vectors)
    assert not Path(f"/proc/{victim}").exists()
    reopened = _store(tmp_path / "cache", backbone)  # every segment whole: nothing rejected, every row there
    assert not reopened.rejections and len(reopened) == len(local.paths)
    assert all(np.array_equal(reopened.lookup(d), v) for d, v in zip(local.digests, local.vectors))


@pytest.mark.slow
def test_data_parallel_fine_tune_exports_a_model_that_loads_and_predicts(cluster, tmp_path):
    import cxrlab
    from cxrlab.finetune import FineTuneOptions

    root = make_dataset(tmp_path / "lungs", n_per_class=10, size=72)
    epochs = []
    result = cxrlab.train(root, output=tmp_path / "model", validation_percentage=25, testing_percentage=25,
                          report=False, fine_tune=True, on_epoch=epochs.append, ray="local", workers=2,
                          fine_tune_options=FineTuneOptions(epochs=1, batch_size=8, input_size=64))
    ft = json.loads((result.model_dir / "cxrlab.json").read_text())["fine_tune"]
    assert [r["epoch"] for r in ft["history"]] == [1] and len(epochs) == 1 and np.isfinite(epochs[0]["loss"])
    assert ft["n_train"] == result.metrics["n"]["train"] and 0 <= epochs[0]["train_accuracy"] <= 1

    model = cxrlab.load_model(result.model_dir)
    local = model.predict([str(root)])
    assert len(local) == 20 and all(p.error is None and abs(sum(p.scores.values()) - 1) < 1e-4 for p in local)
    files = [p.path for p in local] + [str(root / "missing.png")]
    on_ray = cluster.predict_files(model, files)  # prediction on the cluster: the same answers
    assert [p.to_dict() for p in on_ray[:-1]] == [p.to_dict() for p in local]
    assert on_ray[-1].error and on_ray[-1].path.endswith("missing.png")


def test_train_predict_evaluate_and_cv_with_ray_give_the_local_results(cluster, tiny_backbone, tmp_path, capsys):
    import cxrlab
    from cxrlab.cli import main
    from cxrlab.crossval import cross_validate

    root = make_dataset(tmp_path / "lungs", n_per_class=12, size=72)
    common = ["--backbone", tiny_backbone, "--head-only", "--no-report", "-q"]
    assert main(["train", str(root), "-o", str(tmp_path / "local"), "--bottleneck-dir", str(tmp_path / "c1"), *common]) == 0
    assert main(["train", str(root), "-o", str(tmp_path / "ray"), "--bottleneck-dir", str(tmp_path / "c2"), *common,
                 "--ray", "local", "--workers", "2"]) == 0
    assert (tmp_path / "ray" / "model.onnx").read_bytes() == (tmp_path / "local" / "model.onnx").read_bytes()
    capsys.readouterr()

    model = str(tmp_path / "local")
    assert main(["predict", "--model", model, str(root), "--format", "json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(["predict", "--model", model, str(root), "--format", "json", "--ray", "--workers", "2"]) == 0
    assert json.loads(capsys.readouterr().out) == local and len(local) == 24

    here = cxrlab.evaluate(model, root)
    there = cxrlab.evaluate(model, root, ray="local", workers=2)
    assert there.metrics == here.metrics and [p.to_dict() for p in there.predictions] == \
        [p.to_dict() for p in here.predictions]

    kw = dict(folds=3, backbone=tiny_backbone, fine_tune=False)
    assert cross_validate(root, bottleneck_dir=tmp_path / "c3", ray="local", workers=2, **kw)["folds"] == \
        cross_validate(root, bottleneck_dir=tmp_path / "c4", **kw)["folds"]


def test_ray_missing_is_one_clear_line(monkeypatch, capsys, tmp_path):
    from cxrlab.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    from cxrlab.cluster import connect

    with pytest.raises(CxrlabError, match=r"pip install -e \.\[cluster\]"):
        connect("local")
    image = tmp_path / "a.png"
    assert main(["predict", "--model", str(tmp_path), str(image), "--ray"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e .[cluster]" in err[0]


def test_an_image_taken_for_the_address_is_refused(capsys, tmp_path):
    from cxrlab.cli import main

    assert main(["predict", "--model", str(tmp_path), "--ray", str(tmp_path / "a.png"), str(tmp_path / "b.png")]) == 1
    err = capsys.readouterr().err
    assert "not a cluster address" in err and "put --ray after the image paths" in err
