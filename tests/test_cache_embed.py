import errno
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from cxrlab.backbones import create_backbone
from cxrlab.cache import EmbeddingStore
from cxrlab.embed import Embedder
from cxrlab.errors import CxrlabError


@pytest.fixture(scope="module")
def embedder():
    return Embedder(create_backbone("efficientnet-lite0"), batch_size=4)


def test_store_round_trip_and_compaction(tmp_path):
    store = EmbeddingStore(tmp_path, "ns", dim=3)
    keys = [bytes([i]) * 32 for i in range(5)]
    for k in keys:
        store.put_many([k], np.full((1, 3), k[0], np.float32))
    again = EmbeddingStore(tmp_path, "ns", dim=3)
    assert len(again) == 5 and again.lookup(keys[2])[0] == 2
    again.compact()
    assert len(list((tmp_path / "ns").glob("seg-*.npz"))) == 1
    assert len(EmbeddingStore(tmp_path, "ns", dim=3)) == 5
    assert not list((tmp_path / "ns").glob(".*tmp"))


def test_store_write_failure_leaves_no_entry(tmp_path, monkeypatch):
    store = EmbeddingStore(tmp_path, "ns", dim=2)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(CxrlabError, match="no space left"):
        store.put_many([b"k" * 32], np.zeros((1, 2), np.float32))
    monkeypatch.undo()
    assert os.listdir(tmp_path / "ns") == []
    assert len(EmbeddingStore(tmp_path, "ns", dim=2)) == 0


def test_cache_hit_after_rename_miss_after_change(tmp_path, tiny_dataset, embedder):
    store_dir = tmp_path / "cache"
    files = sorted(tiny_dataset.rglob("*.png"))[:6]
    key = embedder.backbone.cache_key()
    first = embedder.embed_files(files, store=EmbeddingStore(store_dir, key, 1280))
    assert (first.hits, first.misses) == (0, 6)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_dataset, moved)
    renamed = moved / "abnormal" / "renamed.png"
    os.rename(moved / files[0].relative_to(tiny_dataset), renamed)
    second = embedder.embed_files([renamed], store=EmbeddingStore(store_dir, key, 1280))
    assert (second.hits, second.misses) == (1, 0)
    np.testing.assert_allclose(second.vectors[0], first.vectors[0])
    Image.new("L", (96, 96), 30).save(renamed)  # same name, new content
    third = embedder.embed_files([renamed], store=EmbeddingStore(store_dir, key, 1280))
    assert (third.hits, third.misses) == (0, 1)


def test_bad_files_are_skipped_and_named(tmp_path, tiny_dataset, embedder):
    good = sorted(tiny_dataset.rglob("*.png"))[:2]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, not an image")
    data = good[0].read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    paths = [good[0], tmp_path / "empty.png", tmp_path / "text.jpg", tmp_path / "cut.png", tmp_path / "gone.png", good[1]]
    res = embedder.embed_files(paths)
    assert res.paths == [str(good[0]), str(good[1])]
    reasons = {os.path.basename(s.path): s.reason for s in res.skipped}
    assert set(reasons) == {"empty.png", "text.jpg", "cut.png", "gone.png"}
    assert "empty" in reasons["empty.png"] and "not an image" in reasons["text.jpg"]
