"""--ray: embedding, prediction and data-parallel fine-tuning on a local Ray cluster of 2 CPUs give what one
process gives (the same vectors bit for bit, the same cache rows, a model that loads and predicts); a worker
killed mid-embedding is replaced by Ray and the run ends with the same output; a training worker killed at the
start of epoch 2 is replaced, the training resumes from epoch 1's checkpoint and ends with the weights of a run
never stopped, its epochs reported as they end. The choice of GPU or CPU workers is tested from resources."""

import json
import os
import signal
import sys
import threading
import time
from dataclasses import replace
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


def test_workers_are_planned_from_the_cluster_resources():
    """GPU workers (NCCL, one GPU and one core each) when the cluster has GPUs and CPU is not asked for; CPU
    workers (gloo) otherwise; never more than the cluster can place or the batch can feed."""
    from cxrlab.finetune.distributed import WorkerPlan, plan_workers

    recipe = dict(workers=None, batch_size=16, freeze_bn=False)
    gpu, cpu = WorkerPlan(4, True, "nccl", {"CPU": 1, "GPU": 1}), WorkerPlan(2, False, "gloo", {"CPU": 1})
    assert plan_workers({"CPU": 2.0}, **recipe) == cpu and plan_workers({"CPU": 2.0}, **recipe, device="cpu") == cpu
    assert plan_workers({"CPU": 32.0, "GPU": 4.0}, **recipe) == gpu == plan_workers(
        {"CPU": 32.0, "GPU": 4.0}, **recipe, device="gpu")
    assert plan_workers({"CPU": 32.0, "GPU": 4.0}, **recipe, device="cpu") == WorkerPlan(8, False, "gloo", {"CPU": 1})
    assert plan_workers({"CPU": 1.0, "GPU": 2.0}, **recipe).workers == 1  # each GPU worker needs a core too
    assert plan_workers({"CPU": 16.0}, workers=16, batch_size=16, freeze_bn=True).workers == 16
    with pytest.raises(CxrlabError, match="no GPU"):
        plan_workers({"CPU": 8.0}, **recipe, device="gpu")
    with pytest.raises(CxrlabError, match="--workers 5: the Ray cluster has 4 GPU"):
        plan_workers({"CPU": 32.0, "GPU": 4.0}, workers=5, batch_size=16, freeze_bn=False)
    with pytest.raises(CxrlabError, match="BatchNorm needs 2"):
        plan_workers({"CPU": 16.0}, workers=16, batch_size=16, freeze_bn=False)
    with pytest.raises(CxrlabError, match="--ray-device tpu"):
        plan_workers({"CPU": 2.0}, **recipe, device="tpu")


@pytest.mark.slow
def test_data_parallel_fine_tune_resumes_after_a_killed_worker_and_exports_a_model_that_predicts(
        cluster, tmp_path, monkeypatch):
    """2 workers, 2 epochs; the last worker kills itself (SIGKILL) at the start of epoch 2. Ray Train restarts
    the workers from epoch 1's checkpoint: each epoch reaches on_epoch once, as it ends, and the model is the
    one a run never stopped gives."""
    import cxrlab
    from cxrlab.backbones import get_spec, weights_path
    from cxrlab.finetune import FineTuneOptions, load_arrays, state_sha256
    from cxrlab.finetune.distributed import KILL_ONCE_ENV, fine_tune_on_ray
    from cxrlab.split import Manifest

    root = make_dataset(tmp_path / "lungs", n_per_class=10, size=72)
    marker = tmp_path / "worker-killed"
    monkeypatch.setenv(KILL_ONCE_ENV, f"2:{marker}")
    epochs, arrived, events = [], [], []

    def on_epoch(row):
        epochs.append(row)
        arrived.append(time.monotonic())
        events.append(("epoch", row["epoch"]))

    options = FineTuneOptions(epochs=2, batch_size=8, input_size=64)
    result = cxrlab.train(root, output=tmp_path / "model", validation_percentage=25, testing_percentage=25,
                          report=False, fine_tune=True, on_epoch=on_epoch, ray="local", workers=2,
                          fine_tune_options=options, on_step=lambda info: events.append(("step", info.step)))
    ft = json.loads((result.model_dir / "cxrlab.json").read_text())["fine_tune"]
    assert marker.exists() and ft["resumed_after_epochs"] == [1]  # a worker died, the run went on after epoch 1
    assert [r["epoch"] for r in ft["history"]] == [r["epoch"] for r in epochs] == [1, 2]  # each epoch once
    assert epochs[1]["resumed_after_epoch"] == 1 and "resumed_after_epoch" not in epochs[0]
    assert arrived[1] - arrived[0] > 1.0  # epoch 1 came as it ended, before the restart, not replayed at the end
    assert events[:4] == [("epoch", 1), ("step", 1), ("epoch", 2), ("step", 2)]  # the Step lines with them
    assert ft["n_train"] == result.metrics["n"]["train"] and 0 <= epochs[0]["train_accuracy"] <= 1

    model = cxrlab.load_model(result.model_dir)
    local = model.predict([str(root)])
    assert len(local) == 20 and all(p.error is None and abs(sum(p.scores.values()) - 1) < 1e-4 for p in local)
    files = [p.path for p in local] + [str(root / "missing.png")]
    on_ray = cluster.predict_files(model, files)  # prediction on the cluster: the same answers
    assert [p.to_dict() for p in on_ray[:-1]] == [p.to_dict() for p in local]
    assert on_ray[-1].error and on_ray[-1].path.endswith("missing.png")

    # The same split's images, trained on 2 workers without a failure: the same weights bit for bit.
    monkeypatch.delenv(KILL_ONCE_ENV)
    manifest, index = Manifest.read(result.run_dir / "split.csv"), {lab: i for i, lab in enumerate(result.labels)}
    (X_tr, _), (X_va, _) = (load_arrays([root / e.relpath for e in manifest.subset(s)], 64) for s in
                            ("train", "validation"))
    y_tr, y_va = ([index[e.label] for e in manifest.subset(s)] for s in ("train", "validation"))
    spec = get_spec(ft["base_backbone"])
    whole = fine_tune_on_ray(replace(spec, input_size=64), weights_path(spec), X_tr, y_tr, X_va, y_va, seed=0,
                             options=options, workers=2)
    assert whole.resumed_after == [] and json.dumps(whole.history, sort_keys=True) == json.dumps(ft["history"],
                                                                                             sort_keys=True)
    assert state_sha256(whole.module, {"options": ft["options"], "base": ft["base_weights_sha256"]}) == \
        ft["weights_sha256"]


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
