"""The embedding cache is not a way to poison a model.

Every cached row carries an HMAC under a per-user key: rows planted by another account, altered,
moved between backbones or written by an older cxrlab are ignored (embedded again) and counted in
one warning. A cache folder or segment that another user owns or can write is refused with one
`error:` line before anything is embedded. `retrain` caches in the private per-user folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import cxrlab.embed
from cxrlab.backbones import create_backbone
from cxrlab.cache import EmbeddingStore, user_key
from cxrlab.cli import main
from cxrlab.compat import retrain_main
from cxrlab.embed import Embedder
from cxrlab.errors import CxrlabError
from conftest import write_tiny_backbone

IS_ROOT = os.geteuid() == 0
OTHER_UID = 65534  # nobody


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    name = f"onnx:{write_tiny_backbone(tmp_path_factory.mktemp('bb') / 'tiny.onnx')}"
    create_backbone(name)
    return name


@pytest.fixture(scope="module")
def backbone(tiny):
    return create_backbone(tiny)


@pytest.fixture
def dataset(tiny_dataset, backbone):
    """The tiny dataset, its files, their content digests and their true embeddings."""
    files = sorted(tiny_dataset.rglob("*.png"))
    real = Embedder(backbone).embed_files(files)
    assert len(real.paths) == len(files)
    return tiny_dataset, files, real.digests, real.vectors


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def segments(folder: Path) -> list[Path]:
    return sorted(folder.rglob("seg-*.npz"))


def write_old_segment(folder: Path, digests: list[bytes], vectors: np.ndarray) -> Path:
    """A segment as cxrlab wrote them before rows were checked: keys and vectors only."""
    buf = io.BytesIO()
    np.savez(buf, keys=np.frombuffer(b"".join(digests), np.uint8).reshape(-1, 32),
             vectors=np.asarray(vectors, np.float32))
    folder.mkdir(parents=True, exist_ok=True)
    seg = folder / f"seg-{uuid.uuid4().hex}.npz"
    seg.write_bytes(buf.getvalue())
    os.chmod(seg, 0o600)
    return seg


@contextlib.contextmanager
def another_account(tmp_path: Path):
    """Act as another account: same uid (so the folder checks pass), but that account's own cache key."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CXRLAB_CACHE_DIR", str(tmp_path / "other-account"))
    try:
        yield
    finally:
        mp.undo()


def cli_train(ds: Path, out: Path, bn: Path, tiny: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["train", str(ds), "--output", str(out), "--backbone", tiny, "--bottleneck-dir", str(bn),
                   "--no-ood", "--no-report", "-q"])
    return rc, stdout.getvalue(), stderr.getvalue()


def swapped(vectors: np.ndarray, files: list[Path]) -> np.ndarray:
    """Poison: every image gets the embedding of an image of the other class."""
    abnormal = np.array([f.parent.name == "abnormal" for f in files])
    donors_a, donors_n = vectors[~abnormal], vectors[abnormal]
    return np.stack([donors_a[i % len(donors_a)] if a else donors_n[i % len(donors_n)]
                     for i, a in enumerate(abnormal)])


# ------------------------------------------------------------------ planted and altered rows
def test_planted_vectors_are_rejected_and_the_model_learns_real_embeddings(tmp_path, dataset, tiny, backbone):
    ds, files, digests, real = dataset
    rc, out, err = cli_train(ds, tmp_path / "clean", tmp_path / "clean-bn", tiny)
    assert rc == 0, err

    bn, ns = tmp_path / "bn", backbone.cache_key()
    poison = swapped(real, files)
    assert not np.allclose(poison, real)
    with another_account(tmp_path):  # signed, but with another account's key
        EmbeddingStore(bn, ns, backbone.spec.embed_dim).put_many(digests, poison)
    write_old_segment(bn / ns, digests, poison)  # unsigned (older format)

    rc, out, err = cli_train(ds, tmp_path / "model", bn, tiny)
    assert rc == 0, err
    n = len(files)
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, err
    assert str(bn / ns) in warnings[0] and f"ignored {2 * n} cached vector(s)" in warnings[0]
    assert f"{n} failed the check" in warnings[0] and f"{n} from an older cxrlab" in warnings[0]
    assert f"Embedding cache: 0 hit(s), {n} miss(es)" in out
    # Not one planted row was used: the model is byte for byte the one trained on a clean cache.
    assert (tmp_path / "model" / "model.onnx").read_bytes() == (tmp_path / "clean" / "model.onnx").read_bytes()

    # The untrusted segments were dropped; the cache now holds the real embeddings, and says nothing.
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        store = EmbeddingStore(bn, ns, backbone.spec.embed_dim)
    assert stderr.getvalue() == "" and store.rejected == 0 and len(store) == n
    np.testing.assert_allclose(np.stack(store.get_many(digests)), real, rtol=1e-6)


def test_altered_or_moved_rows_are_rejected_and_counted(tmp_path, capsys):
    digests = [bytes([i]) * 32 for i in range(10)]
    vectors = np.arange(30, dtype=np.float32).reshape(10, 3)
    EmbeddingStore(tmp_path, "ns", 3).put_many(digests, vectors)
    (seg,) = segments(tmp_path)
    with np.load(seg) as z:
        keys, vecs, macs = z["keys"].copy(), z["vectors"].copy(), z["macs"].copy()
    vecs[3, 1] += 0.5  # an altered vector
    keys[7] = np.frombuffer(b"\xee" * 32, np.uint8)  # a vector moved to another image
    buf = io.BytesIO()
    np.savez(buf, keys=keys, vectors=vecs, macs=macs)
    seg.write_bytes(buf.getvalue())
    capsys.readouterr()

    store = EmbeddingStore(tmp_path, "ns", 3)
    assert store.rejected == 2 and len(store) == 8
    assert store.lookup(digests[3]) is None and store.lookup(b"\xee" * 32) is None
    assert store.lookup(digests[7]) is None
    np.testing.assert_array_equal(store.lookup(digests[4]), vectors[4])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and str(tmp_path / "ns") in err[0], err
    assert "ignored 2 cached vector(s)" in err[0] and "2 failed the check" in err[0]

    # A whole segment copied into another backbone's namespace (same dimension) is not trusted there.
    (tmp_path / "other-ns").mkdir(mode=0o700)
    with np.load(seg) as z:
        np.savez(tmp_path / "other-ns" / "seg-copied.npz", **{k: z[k] for k in z.files})
    os.chmod(tmp_path / "other-ns" / "seg-copied.npz", 0o600)
    assert len(EmbeddingStore(tmp_path, "other-ns", 3)) == 0


def test_old_segments_are_embedded_again_then_dropped(tmp_path, dataset, backbone, capsys):
    ds, files, digests, real = dataset
    bn, ns = tmp_path / "bn", backbone.cache_key()
    old = write_old_segment(bn / ns, digests, real)
    store = EmbeddingStore(bn, ns, backbone.spec.embed_dim)
    err = capsys.readouterr().err
    assert f"ignored {len(files)} cached vector(s)" in err and "from an older cxrlab" in err
    assert len(store) == 0  # untrusted, but not an error

    res = Embedder(backbone).embed_files(files, store=store)
    assert (res.hits, res.misses) == (0, len(files))
    np.testing.assert_allclose(res.vectors, real, rtol=1e-6)
    assert not old.exists() and len(segments(bn)) == 1  # compacted: only checked rows remain

    again = Embedder(backbone).embed_files(files, store=EmbeddingStore(bn, ns, backbone.spec.embed_dim))
    assert (again.hits, again.misses) == (len(files), 0)
    assert capsys.readouterr().err == ""


def test_damaged_segment_is_ignored_not_fatal(tmp_path, capsys):
    EmbeddingStore(tmp_path, "ns", 2).put_many([b"a" * 32], np.ones((1, 2), np.float32))
    for name, data in (("seg-empty.npz", b""), ("seg-cut.npz", b"PK\x03\x04garbage"), ("seg-text.npz", b"hello")):
        (tmp_path / "ns" / name).write_bytes(data)
        os.chmod(tmp_path / "ns" / name, 0o600)
    capsys.readouterr()
    store = EmbeddingStore(tmp_path, "ns", 2)
    assert len(store) == 1 and "3 unreadable segment file(s)" in capsys.readouterr().err


# ------------------------------------------------------------------ folders others can write, or own
def _refused(capsys, rc: int, path: Path, problem: str) -> None:
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: "), cap.err
    assert str(path) in err[0] and problem in err[0] and "--bottleneck_dir" in err[0], err[0]
    assert "Traceback" not in cap.out + cap.err


@pytest.fixture
def no_embedding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("embedded before the cache folder was checked")

    monkeypatch.setattr(cxrlab.embed.Embedder, "run", refuse)


def _make_unsafe(where: str, bn: Path, ns: str, dim: int) -> Path:
    if where == "root":
        bn.mkdir()
        os.chmod(bn, 0o777)
        return bn
    if where == "root-group":
        bn.mkdir()
        os.chmod(bn, 0o770)
        return bn
    EmbeddingStore(bn, ns, dim).put_many([b"x" * 32], np.zeros((1, dim), np.float32))
    if where == "namespace":
        os.chmod(bn / ns, 0o757)
        return bn / ns
    (seg,) = segments(bn)
    os.chmod(seg, 0o666)
    return seg


@pytest.mark.parametrize("where", ["root", "root-group", "namespace", "segment"])
@pytest.mark.parametrize("command", ["train", "retrain"])
def test_cache_writable_by_others_is_refused_before_embedding(tmp_path, tiny_dataset, tiny, backbone, capsys,
                                                               no_embedding, where, command):
    bn = tmp_path / "shared"
    unsafe = _make_unsafe(where, bn, backbone.cache_key(), backbone.spec.embed_dim)
    before = segments(bn)
    if command == "train":
        rc = main(["train", str(tiny_dataset), "--output", str(tmp_path / "model"), "--backbone", tiny,
                   "--bottleneck_dir", str(bn), "-q"])
    else:
        rc = retrain_main(["--image_dir", str(tiny_dataset), "--bottleneck_dir", str(bn), "--architecture", tiny,
                           "--output_graph", str(tmp_path / "g.pb"), "--output_labels", str(tmp_path / "l.txt")])
    _refused(capsys, rc, unsafe, "writable by other users")
    assert segments(bn) == before and not (tmp_path / "model").exists() and not (tmp_path / "g.pb").exists()


def test_world_writable_tmp_itself_is_refused(tmp_path):
    if not os.stat("/tmp").st_mode & 0o002:
        pytest.skip("/tmp is not world-writable here")
    with pytest.raises(CxrlabError, match="writable by other users"):
        EmbeddingStore("/tmp", f"cxrlab-test-{uuid.uuid4().hex}", 2)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to give a file to another user")
@pytest.mark.parametrize("where", ["root", "namespace", "segment", "symlink"])
def test_cache_owned_by_another_user_is_refused(tmp_path, tiny_dataset, tiny, backbone, capsys, no_embedding, where):
    bn, ns = tmp_path / "bn", backbone.cache_key()
    EmbeddingStore(bn, ns, backbone.spec.embed_dim).put_many([b"x" * 32], np.zeros((1, backbone.spec.embed_dim),
                                                                                   np.float32))
    owned = {"root": bn, "namespace": bn / ns, "segment": segments(bn)[0], "symlink": tmp_path / "link"}[where]
    if where == "symlink":  # a link planted by another user, even to one's own folder
        owned.symlink_to(bn)
        bn = owned
    os.lchown(owned, OTHER_UID, -1)
    rc = main(["train", str(tiny_dataset), "--output", str(tmp_path / "model"), "--backbone", tiny,
               "--bottleneck-dir", str(bn), "-q"])
    _refused(capsys, rc, owned, f"belongs to another user (uid {OTHER_UID})")


# ------------------------------------------------------------------ private by default, whatever the umask
def test_retrain_caches_in_the_private_per_user_folder(tmp_path, dataset, tiny, backbone, monkeypatch):
    ds, files, digests, _ = dataset
    user_cache = tmp_path / "user-cache"
    monkeypatch.setenv("CXRLAB_CACHE_DIR", str(user_cache))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = retrain_main(["--image_dir", str(ds), "--architecture", tiny, "--output_graph", str(tmp_path / "g.pb"),
                           "--output_labels", str(tmp_path / "l.txt"), "--no_ood", "--no_report"])
    assert rc == 0, err.getvalue()
    root = user_cache / "embeddings"
    store = EmbeddingStore(root, backbone.cache_key(), backbone.spec.embed_dim)
    assert all(v is not None for v in store.get_many(digests))
    assert mode(root) == mode(root / backbone.cache_key()) == 0o700
    assert {mode(s) for s in segments(root)} == {0o600}


@pytest.mark.parametrize("umask", [0o000, 0o002, 0o022])
def test_cache_files_are_private_whatever_the_umask(tmp_path, monkeypatch, umask):
    monkeypatch.setenv("CXRLAB_CACHE_DIR", str(tmp_path / "user-cache"))
    old = os.umask(umask)
    try:
        store = EmbeddingStore(tmp_path / "bn", "ns", 2)
        for i in range(3):
            store.put_many([bytes([i]) * 32], np.zeros((1, 2), np.float32))
        store.compact()
        assert len(EmbeddingStore(tmp_path / "bn", "ns", 2)) == 3  # its own files pass its own checks
    finally:
        os.umask(old)
    assert mode(tmp_path / "bn") == mode(tmp_path / "bn" / "ns") == 0o700
    assert {mode(p) for p in (tmp_path / "bn" / "ns").iterdir()} == {0o600}  # segment and lock
    keys = tmp_path / "user-cache" / "keys"
    assert mode(keys) == 0o700 and mode(keys / "embedding-cache.key") == 0o600


# ------------------------------------------------------------------ the per-user key
def test_key_is_made_once_even_by_concurrent_first_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRLAB_CACHE_DIR", str(tmp_path / "user-cache"))
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: user_key(), range(16)))
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert user_key() == keys[0]
    assert [p.name for p in (tmp_path / "user-cache" / "keys").iterdir() if p.name != ".lock"] == ["embedding-cache.key"]


def test_key_others_can_read_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRLAB_CACHE_DIR", str(tmp_path / "user-cache"))
    user_key()
    key_file = tmp_path / "user-cache" / "keys" / "embedding-cache.key"
    os.chmod(key_file, 0o644)
    with pytest.raises(CxrlabError, match="embedding-cache.key.*delete it"):
        EmbeddingStore(tmp_path / "bn", "ns", 2)


def test_damaged_key_is_replaced_and_its_rows_distrusted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXRLAB_CACHE_DIR", str(tmp_path / "user-cache"))
    EmbeddingStore(tmp_path / "bn", "ns", 2).put_many([b"k" * 32], np.ones((1, 2), np.float32))
    (tmp_path / "user-cache" / "keys" / "embedding-cache.key").write_bytes(b"")  # e.g. lost in a crash
    store = EmbeddingStore(tmp_path / "bn", "ns", 2)
    assert len(store) == 0 and store.rejected == 1 and "1 failed the check" in capsys.readouterr().err
