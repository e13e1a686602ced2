"""Cache: content-addressed embedding store (image SHA-256 -> vector), one namespace per backbone.

Storage is a folder of immutable segment files, each an uncompressed ``.npz`` holding ``keys``
(n, 32) uint8 and ``vectors`` (n, d) float32. A segment is written to a temporary name and
renamed into place, so an interrupted run leaves only whole segments, and two processes never
write the same file. Reading loads every segment (duplicates are identical and collapse).
Many small segments are merged into one under a lock.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import numpy as np

from .fsutil import atomic_write_bytes, file_lock

COMPACT_AFTER = 16  # segments


class EmbeddingStore:
    def __init__(self, root: str | os.PathLike, namespace: str, dim: int):
        self.dir = Path(root) / namespace
        self.dim = dim
        self._index: dict[bytes, np.ndarray] = {}
        self.hits = 0
        self.misses = 0
        self._load()

    def _segments(self) -> list[Path]:
        return sorted(self.dir.glob("seg-*.npz")) if self.dir.is_dir() else []

    def _load(self) -> None:
        for seg in self._segments():
            try:
                with np.load(seg, allow_pickle=False) as z:
                    keys, vectors = z["keys"], z["vectors"]
            except FileNotFoundError:  # merged away by another process meanwhile
                continue
            except (OSError, ValueError, KeyError):
                continue  # foreign or damaged file: its images are simply embedded again
            if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(keys) != len(vectors):
                continue
            for k, v in zip(keys, vectors):
                self._index[k.tobytes()] = v

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, digest: bytes) -> np.ndarray | None:
        return self._index.get(digest)

    def get_many(self, digests: list[bytes]) -> list[np.ndarray | None]:
        return [self._index.get(d) for d in digests]

    def put_many(self, digests: list[bytes], vectors: np.ndarray) -> None:
        """Persist a batch as one new segment (atomic)."""
        if not digests:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        keys = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(digests), 32)
        buf = io.BytesIO()
        np.savez(buf, keys=keys, vectors=vectors)
        atomic_write_bytes(self.dir / f"seg-{uuid.uuid4().hex}.npz", buf.getvalue())
        for d, v in zip(digests, vectors):
            self._index[d] = v

    def compact(self) -> None:
        """Merge all segments into one, so a big cache loads from a single file."""
        with file_lock(self.dir / ".lock"):
            segments = self._segments()
            if len(segments) <= 1:
                return
            self._index.clear()
            self._load()
            keys = sorted(self._index)
            buf = io.BytesIO()
            np.savez(
                buf,
                keys=np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32),
                vectors=np.stack([self._index[k] for k in keys]) if keys else np.zeros((0, self.dim), np.float32),
            )
            atomic_write_bytes(self.dir / f"seg-{uuid.uuid4().hex}.npz", buf.getvalue())
            for seg in segments:
                seg.unlink(missing_ok=True)

    def maybe_compact(self) -> None:
        if len(self._segments()) > COMPACT_AFTER:
            self.compact()
