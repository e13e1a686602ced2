"""Embed: image files -> (n, d) float32 embeddings (ONNX Runtime or OpenVINO, see runtime.py), through the cache.

Worker threads read and hash each file; a cache hit is returned at once, a miss is decoded and
resized in a small thread pool (Pillow and ONNX Runtime release the GIL) while the previous
batch runs through the network. At most a few batches are in flight, so memory stays flat.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backbones import Backbone
from .cache import EmbeddingStore
from .decode import DecodedImage, decode_image, read_image_bytes, resize
from .errors import CxrlabError, ImageError
from .progress import Progress, resolve
from .runtime import REFERENCE, Engine, default_threads, lane_batch, lanes, make_session


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass
class EmbedResult:
    vectors: np.ndarray  # (n_ok, d), rows aligned with `paths`
    paths: list[str]  # the files that were embedded (skipped ones removed)
    digests: list[bytes]
    skipped: list[SkippedFile] = field(default_factory=list)
    hits: int = 0
    misses: int = 0


def asset_session(path: Path, sha256: str, where: str, script: str, *, threads: int | None = None):
    """A session of a model file shipped in the package, refused unless it matches its recorded SHA-256
    (``where`` names the constant holding it, ``script`` the script that rebuilds it)."""
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CxrlabError(f"{path} does not match its recorded SHA-256 ({where}); "
                          f"reinstall cxrlab or rebuild it with {script}")
    return make_session(data, threads=threads)


def read_file(path: str | os.PathLike) -> bytes:
    """The file's bytes; every way of failing (a folder, FIFO, missing, unreadable or oversized
    file, even MemoryError) is an ImageError naming the file, so one file never ends a run."""
    if os.path.isdir(path):
        raise ImageError(path, "is a folder with no image files in it (JPEG, PNG, BMP, TIFF, WebP, GIF, JPEG 2000, DICOM)")
    return read_image_bytes(path)


def prepare(data: bytes, size: int, name: str) -> tuple[np.ndarray, DecodedImage]:
    """Decode bytes and resize to the network's square input: (size, size) float32."""
    img = decode_image(data, name=name, min_size=size)
    try:
        return resize(img.pixels, size), img
    except MemoryError:
        raise ImageError(name, f"out of memory resizing a {img.width} x {img.height} image; resize it first") from None


class Embedder:
    """Runs a backbone's ONNX graph over batches of images."""

    def __init__(self, backbone: Backbone, *, batch_size: int = 32, workers: int | None = None, threads: int | None = None,
                 engine: Engine = REFERENCE):
        self.backbone = backbone
        self.engine = engine
        self.size = backbone.spec.input_size
        self.batch_size = batch_size  # images in the network at once, over all lanes
        self.workers = workers or min(4, default_threads())
        self.lanes, self.threads = lanes(threads, engine)
        self.lane_batch = lane_batch(batch_size, self.lanes)
        self._session = None
        self._session_lock = threading.Lock()

    @property
    def session(self):
        """Made on first use: a run whose every image is cached never compiles the graph."""
        with self._session_lock:
            if self._session is None:
                self._session = make_session(self.backbone.onnx_path, threads=self.threads, engine=self.engine)
        return self._session

    def cache_key(self) -> str:
        """The cache namespace of this embedder's vectors: the backbone's, and the engine's unless it is the reference."""
        return self.backbone.cache_key(None if self.engine == REFERENCE else self.engine.to_json())

    def run(self, batch: np.ndarray, outputs=("embedding",)) -> list[np.ndarray]:
        return self.session.run(list(outputs), {"image": batch[:, None, :, :]})

    def embed_arrays(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Embed already-resized (size, size) arrays."""
        n = self.lane_batch
        batches = (np.stack(arrays[i : i + n]) for i in range(0, len(arrays), n))
        with ThreadPoolExecutor(self.lanes) as pool:
            out = [vectors for _, (vectors,) in in_lanes(pool, self.run, batches, lanes=self.lanes)]
        return np.concatenate(out) if out else np.zeros((0, self.backbone.spec.embed_dim), np.float32)

    def embed_files(
        self,
        paths: list[str | os.PathLike],
        *,
        store: EmbeddingStore | None = None,
        progress: Progress | None = None,
    ) -> EmbedResult:
        """Embed image files through ``store`` (looked up by content digest, misses added); unreadable
        files are skipped with their reason. Rows come back in the order of ``paths``."""
        progress = resolve(progress)
        progress.start(len(paths), f"embedding ({self.backbone.id})")
        got = _Collected(len(paths), self.backbone.spec.embed_dim)
        with ThreadPoolExecutor(self.workers) as decoders, ThreadPoolExecutor(self.lanes) as lanes_pool:
            loads = in_order(decoders, lambda path: self._load(path, store), paths,
                             lookahead=(self.lanes + 1) * self.lane_batch)
            batches = self._batches_to_run(loads, paths, got, progress)
            for batch, out in in_lanes(lanes_pool, self._forward, batches, lanes=self.lanes):
                for (i, _, _), v in zip(batch, out):
                    got.put(i, v)
                if store is not None:
                    store.put_many([d for _, d, _ in batch], out)
                progress.advance(len(batch))
        if store is not None:
            store.hits += got.hits
            store.misses += len(got.digests) - got.hits
            store.maybe_compact()
        progress.close()
        return got.result(paths)

    def _batches_to_run(self, loads, paths: list, got: "_Collected", progress: Progress):
        """Batches of (index, digest, image) not in the cache; cache hits and unreadable files are noted in ``got``."""
        batch: list[tuple[int, bytes, np.ndarray]] = []
        for i, fut in loads:
            try:
                d, value, was_hit = fut.result()
            except ImageError as exc:
                got.skipped.append((i, SkippedFile(str(paths[i]), exc.reason)))
                progress.advance()
                continue
            got.digests[i] = d
            if was_hit:
                got.put(i, value)
                got.hits += 1
                progress.advance()
                continue
            batch.append((i, d, value))
            if len(batch) == self.lane_batch:
                yield batch
                batch = []
        if batch:
            yield batch

    def _forward(self, batch: list[tuple[int, bytes, np.ndarray]]) -> np.ndarray:
        return self.run(np.stack([a for _, _, a in batch]))[0]

    def _load(self, path: str | os.PathLike, store: EmbeddingStore | None) -> tuple[bytes, np.ndarray, bool]:
        """(digest, cached embedding or resized image, whether it was cached); runs in a worker thread."""
        data = read_file(path)
        d = hashlib.sha256(data).digest()
        if store is not None and (hit := store.lookup(d)) is not None:
            return d, hit, True
        return d, prepare(data, self.size, str(path))[0], False


def in_order(pool: ThreadPoolExecutor, fn, items: list, *, lookahead: int):
    """Yield (index, future of fn(item)) in order, with at most ``lookahead`` submitted ahead (memory stays flat)."""
    in_flight: deque = deque()
    next_i = 0
    while next_i < len(items) or in_flight:
        while next_i < len(items) and len(in_flight) < lookahead:
            in_flight.append((next_i, pool.submit(fn, items[next_i])))
            next_i += 1
        yield in_flight.popleft()


def in_lanes(pool: ThreadPoolExecutor, fn, batches, *, lanes: int):
    """Yield (batch, fn(batch)) in the order of ``batches``, with ``lanes`` of them running at once on ``pool``
    (and one more queued, so that a lane never waits for the next batch to be gathered)."""
    in_flight: deque = deque()
    for batch in batches:
        in_flight.append((batch, pool.submit(fn, batch)))
        while len(in_flight) > lanes:
            done, future = in_flight.popleft()
            yield done, future.result()
    while in_flight:
        done, future = in_flight.popleft()
        yield done, future.result()


class _Collected:
    """What one embed_files run has gathered, by the index of the file: the vectors go straight into one array
    (no per-image copies to stack at the end: at 20,000 images those doubled the run's memory)."""

    def __init__(self, n: int, dim: int):
        self.vectors = np.zeros((n, dim), np.float32)
        self.filled = np.zeros(n, bool)
        self.digests: dict[int, bytes] = {}
        self.skipped: list[tuple[int, SkippedFile]] = []
        self.hits = 0

    def put(self, i: int, vector: np.ndarray) -> None:
        self.vectors[i] = vector
        self.filled[i] = True

    def result(self, paths: list) -> EmbedResult:
        order = np.flatnonzero(self.filled)
        return EmbedResult(
            vectors=self.vectors if len(order) == len(self.filled) else self.vectors[order],
            paths=[str(paths[i]) for i in order],
            digests=[self.digests[i] for i in order],
            skipped=[s for _, s in sorted(self.skipped, key=lambda t: t[0])],
            hits=self.hits,
            misses=len(order) - self.hits,
        )
