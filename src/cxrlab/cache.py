"""Cache: content-addressed embedding store (image SHA-256 -> vector), one namespace per backbone.

Storage is a folder of immutable segment files, each an uncompressed ``.npz`` holding ``keys``
(n, 32) uint8, ``vectors`` (n, d) little-endian float32 and ``macs`` (n, 32) uint8. A segment is
written to a temporary name and renamed into place, so an interrupted run leaves only whole
segments, and two processes never write the same file. Reading loads every segment (duplicates
are identical and collapse). Many small segments are merged into one under a lock.

A cached vector decides what a model learns, so the cache is private and every row is checked:
``macs`` is HMAC-SHA256, under a random per-user key, of (image digest, vector bytes) with a key
derived for this namespace (backbone identity and dimension). A row planted by another account,
altered, moved from another backbone's namespace, or written by an older cxrlab without the check
is ignored (its image is embedded again) and counted in one warning line. A cache folder, or a
segment, that another user owns or can write is refused before anything is embedded.
"""

from __future__ import annotations

import errno
import hmac
import io
import json
import os
import secrets
import stat
import sys
import tempfile
import uuid
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from .backbones import cache_dir
from .errors import CxrlabError
from .fsutil import file_lock

COMPACT_AFTER = 16  # segments
KEY_BYTES = 32
ROW_FORMAT = b"cxrlab embedding cache v1"
VECTOR_DTYPE = np.dtype("<f4")

# The cache is private: folders 0700 and files 0600 whatever the umask. This is the deliberate
# exception to "respect the umask" for model and output files, which are meant to be shared.
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


def default_root() -> Path:
    """The per-user embedding cache that `cxrlab train` and `retrain` use without --bottleneck_dir."""
    return cache_dir() / "embeddings"


# ------------------------------------------------------------------ ownership and permissions
CACHE_HINT = "pass --bottleneck_dir with a new folder under your home, or leave it out for your private cache"
SEGMENT_HINT = "delete it (its images are embedded again), or pass --bottleneck_dir with a new folder under your home"
KEY_HINT = "set CXRLAB_CACHE_DIR to a folder under your home that only you can write"


def _trusted_owner(uid: int) -> bool:
    return uid in (os.geteuid(), 0)  # root can write anything anyway


def _refuse(path: Path, problem: str, hint: str) -> CxrlabError:
    if hint is CACHE_HINT:
        default = default_root()
        private = path == default or default in path.parents
        hint = f"make it private (chmod 700 {path}) or {KEY_HINT}" if private else f"{hint} ({default})"
    return CxrlabError(f"{path}: {problem}, so another account could plant vectors that poison a model; {hint}")


def _check_private(path: Path, what: str, kind=stat.S_ISDIR, hint: str = CACHE_HINT) -> None:
    """Refuse ``path`` unless it is ours (or root's), of the expected kind, and not writable by others.

    FileNotFoundError passes through: a segment may be merged away by another process meanwhile."""
    try:
        link, st = os.lstat(path), os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CxrlabError(f"{path}: cannot be used as the {what}: {exc.strerror}; {hint}") from None
    for s in (link, st):  # a symlink planted by someone else could be pointed elsewhere later
        if not _trusted_owner(s.st_uid):
            raise _refuse(path, f"this {what} belongs to another user (uid {s.st_uid})", hint)
    if not kind(st.st_mode):
        raise CxrlabError(f"{path}: cannot be used as the {what}: it is not a "
                          f"{'folder' if kind is stat.S_ISDIR else 'regular file'}; remove it, or {hint}")
    if st.st_mode & 0o022:
        raise _refuse(path, f"this {what} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})", hint)


def _private_dir(path: Path, what: str, hint: str = CACHE_HINT) -> Path:
    try:
        path.mkdir(mode=PRIVATE_DIR, parents=True)
        os.chmod(path, PRIVATE_DIR)  # mkdir's mode is masked by the umask
    except FileExistsError:
        pass
    except OSError as exc:
        raise CxrlabError(f"{path}: cannot create the {what}: {exc.strerror}; {hint}") from None
    try:
        _check_private(path, what, hint=hint)
    except FileNotFoundError:  # a dangling symlink
        raise CxrlabError(f"{path}: cannot be used as the {what}: it is a link to nothing; remove it, or {hint}") from None
    return path


def _write_private(path: Path, data: bytes, sync: bool = True) -> None:
    """Atomically write ``data`` to ``path`` as a 0600 file (readers see the old file or all of the new)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), PRIVATE_FILE)
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if exc.errno == errno.ENOSPC:
            raise CxrlabError(f"{path}: no space left on the device; nothing was written. Free some space and run again.") from None
        raise


def _private_lock(path: Path):
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE)
        os.fchmod(fd, PRIVATE_FILE)
        os.close(fd)
    except FileExistsError:
        pass
    return file_lock(path)


# ------------------------------------------------------------------ the per-user key
def _read_key(path: Path) -> bytes | None:
    """The key at ``path``; None when missing or damaged (a fresh one is made). Refuses one others can use."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CxrlabError(f"{path}: cannot read the embedding cache key: {exc.strerror}; delete it "
                          f"(a new key is made and cached embeddings are computed again)") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            raise CxrlabError(f"{path}: the embedding cache key belongs to another user or others can read or "
                              f"write it (mode {stat.S_IMODE(st.st_mode):o}); delete it (a new key is made and "
                              f"cached embeddings are computed again)")
        key = f.read(KEY_BYTES + 1)
    return key if len(key) == KEY_BYTES else None


def user_key() -> bytes:
    """This user's random cache key, made once (0600, in a 0700 folder of the user's cache dir)."""
    folder = _private_dir(cache_dir() / "keys", "cxrlab key folder", KEY_HINT)
    path = folder / "embedding-cache.key"
    if (key := _read_key(path)) is not None:
        return key
    with _private_lock(folder / ".lock"):  # two first runs must agree on one key
        if (key := _read_key(path)) is None:
            key = secrets.token_bytes(KEY_BYTES)
            # Not fsynced: a key lost in a crash only means the cache is computed again.
            _write_private(path, key, sync=False)
    return key


# ------------------------------------------------------------------ the store
FAILED, OLD, UNREADABLE = "failed the check", "from an older cxrlab without a check", "unreadable"


class EmbeddingStore:
    """The cache of one backbone. Opening it refuses an unsafe folder (CxrlabError) and prints one warning
    line when rows were ignored; ``rejected`` counts those rows, ``rejections`` them (and unreadable
    segment files) by reason."""

    def __init__(self, root: str | os.PathLike, namespace: str, dim: int):
        self.root = _private_dir(Path(root), "embedding cache folder")
        self.dir = _private_dir(self.root / namespace, "embedding cache folder")
        self.dim = dim
        self._mac_key = hmac.digest(user_key(), b"\0".join([ROW_FORMAT, namespace.encode(), str(dim).encode()]),
                                    "sha256")
        self._index: dict[bytes, np.ndarray] = {}
        self.hits = 0
        self.misses = 0
        self.rejections = self._load(strict=True)  # rows per reason; UNREADABLE counts segment files
        self.rejected = self.rejections[FAILED] + self.rejections[OLD]
        self._untrusted_on_disk = bool(self.rejections)  # dropped by the next compaction
        if self.rejections:
            print(f"warning: {self.rejection_summary()}", file=sys.stderr)

    def rejection_summary(self) -> str:
        r, parts = self.rejections, []
        if self.rejected:
            why = ", ".join(f"{r[w]} {w}" for w in (FAILED, OLD) if r[w])
            parts.append(f"{self.rejected} cached vector(s) that could not be trusted ({why})")
        if r[UNREADABLE]:
            parts.append(f"{r[UNREADABLE]} unreadable segment file(s)")
        return f"embedding cache {self.dir}: ignored {' and '.join(parts)}; their images are embedded again"

    def _segments(self) -> list[Path]:
        return sorted(self.dir.glob("seg-*.npz")) if self.dir.is_dir() else []

    def _row_macs(self, keys: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        rows = np.concatenate([keys, vectors.view(np.uint8)], axis=1)  # digest || vector bytes, one row each
        return np.frombuffer(b"".join(hmac.digest(self._mac_key, r, "sha256") for r in rows),
                             np.uint8).reshape(len(rows), 32)

    def _read_segment(self, seg: Path) -> dict[str, np.ndarray] | None:
        """The arrays of a well-formed segment, None for a damaged or foreign one (FileNotFoundError passes)."""
        try:
            with np.load(seg, allow_pickle=False) as z:
                a = {name: z[name] for name in ("keys", "vectors", "macs") if name in z.files}
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        keys, vectors, macs = a.get("keys"), a.get("vectors"), a.get("macs")
        if keys is None or vectors is None or keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] != 32:
            return None
        if vectors.dtype != VECTOR_DTYPE or vectors.shape != (len(keys), self.dim):
            return None
        if macs is not None and (macs.dtype != np.uint8 or macs.shape != keys.shape):
            return None
        return a

    def _load(self, strict: bool) -> Counter:
        """Index every verified row; count what was rejected. ``strict``: refuse unsafe segment files."""
        rejected: Counter = Counter()
        for seg in self._segments():
            try:
                if strict:
                    _check_private(seg, "embedding cache segment", kind=stat.S_ISREG, hint=SEGMENT_HINT)
                arrays = self._read_segment(seg)
            except FileNotFoundError:  # merged away by another process meanwhile
                continue
            if arrays is None:
                rejected[UNREADABLE] += 1
                continue
            keys, vectors = arrays["keys"], np.ascontiguousarray(arrays["vectors"])
            if "macs" not in arrays:
                rejected[OLD] += len(keys)
                continue
            ok = (self._row_macs(keys, vectors) == arrays["macs"]).all(axis=1)
            rejected[FAILED] += int(len(ok) - ok.sum())
            flat = keys.tobytes()
            for i in np.flatnonzero(ok):
                self._index[flat[32 * i : 32 * i + 32]] = vectors[i]
        return +rejected

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, digest: bytes) -> np.ndarray | None:
        return self._index.get(digest)

    def get_many(self, digests: list[bytes]) -> list[np.ndarray | None]:
        return [self._index.get(d) for d in digests]

    def _write_segment(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez(buf, keys=keys, vectors=vectors, macs=self._row_macs(keys, vectors))
        _write_private(self.dir / f"seg-{uuid.uuid4().hex}.npz", buf.getvalue())

    def put_many(self, digests: list[bytes], vectors: np.ndarray) -> None:
        """Persist a batch as one new segment (atomic)."""
        if not digests:
            return
        vectors = np.ascontiguousarray(vectors, dtype=VECTOR_DTYPE)
        keys = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(digests), 32)
        self._write_segment(keys, vectors)
        for d, v in zip(digests, vectors):
            self._index[d] = v

    def compact(self) -> None:
        """Merge all segments into one, so a big cache loads from a single file; untrusted rows are dropped."""
        with _private_lock(self.dir / ".lock"):
            segments = self._segments()
            if len(segments) <= 1 and not self._untrusted_on_disk:
                return
            self._index.clear()
            self._load(strict=False)
            keys = sorted(self._index)
            self._write_segment(
                np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32),
                np.stack([self._index[k] for k in keys]) if keys else np.zeros((0, self.dim), VECTOR_DTYPE))
            for seg in segments:
                seg.unlink(missing_ok=True)
            self._untrusted_on_disk = False

    def maybe_compact(self) -> None:
        if self._untrusted_on_disk or len(self._segments()) > COMPACT_AFTER:
            self.compact()


# ------------------------------------------------------------------ small measured records
def read_record(kind: str, key: str) -> dict | None:
    """A JSON record that ``write_record`` stored under (kind, key), or None: missing, damaged, or not written
    by this user (its HMAC fails). Used for results that are slow to measure and fixed by their inputs."""
    path = cache_dir() / "records" / kind / f"{key}.json"
    try:
        _check_private(path, f"cached {kind} record", kind=stat.S_ISREG)
        stored = json.loads(path.read_bytes())
        record, mac = stored["record"], bytes.fromhex(stored["mac"])
    except (OSError, ValueError, KeyError, TypeError, CxrlabError):
        return None
    return record if hmac.compare_digest(mac, _record_mac(kind, key, record)) else None


def write_record(kind: str, key: str, record: dict) -> None:
    folder = _private_dir(cache_dir() / "records", "cxrlab record folder")
    folder = _private_dir(folder / kind, f"cached {kind} records")
    data = json.dumps({"record": record, "mac": _record_mac(kind, key, record).hex()}, sort_keys=True)
    _write_private(folder / f"{key}.json", data.encode(), sync=False)


def _record_mac(kind: str, key: str, record: dict) -> bytes:
    message = json.dumps([kind, key, record], sort_keys=True).encode()
    return hmac.new(user_key(), b"cxrlab record v1\0" + message, "sha256").digest()
