"""Cluster: the same embedding, prediction and fine-tuning on a Ray cluster (``--ray [ADDRESS]``).

Ray is imported here only, and only when asked for (the ``cluster`` extra). Embedding and prediction are Ray Data
``map_batches`` over an actor pool, each actor holding one ONNX Runtime session made by ``embed.make_session``
(the options of a local run; ONNX Runtime gives an image the same vector whatever its batch or thread count, so a
cluster run and a laptop run give the same vectors bit for bit). The driver hashes the files and looks them up in
its cache; only the misses go to the cluster, and the driver writes their vectors as whole segments
(``EmbeddingStore.put_many``, atomic), so a killed worker never leaves a half-written row. A killed actor is
restarted by Ray Data (its actor pools default to ``max_restarts=-1``, ``max_task_retries=-1``) and its batch
runs again.

Workers read the images at the driver's paths: on several machines the images lie on a shared file system
mounted at the same place on each. The backbone graph and the model travel through Ray's object store, and this
cxrlab package with the job (``py_modules``); its dependencies must be installed on every machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .embed import EmbedResult, SkippedFile, make_session, prepare, read_file
from .errors import CxrlabError, ImageError
from .progress import Progress, resolve
from .runtime import RAY_DEVICES as DEVICES  # what fine-tuning workers train on (distributed.plan_workers)
from .runtime import REFERENCE, Engine

LOCAL, AUTO = "local", "auto"
INSTALL_HINT = "pip install -e .[cluster]"
CPUS_PER_WORKER = 1  # one single-threaded session per core: the vectors do not depend on it, throughput is best


def ray_module():
    """Ray, or one clear error line saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise CxrlabError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def connect(address: str = AUTO, *, num_cpus: int | None = None):
    """Join the Ray cluster at ``address``: ``auto`` (the ``RAY_ADDRESS`` one, or the one ``ray start --head``
    started on this machine), ``local`` (start one here for this run, ``num_cpus`` cores), or ``HOST:PORT``.
    A session already connected is reused. Quiet: no dashboard, the workers' logs are not echoed."""
    if address not in (AUTO, LOCAL) and not re.fullmatch(r"(ray://)?[\w.-]+:\d+", address):
        raise CxrlabError(f"--ray {address}: not a cluster address (auto, local or HOST:PORT); if it is an image, "
                          f"put --ray after the image paths")
    ray = ray_module()
    if not ray.is_initialized():
        # Ray's C++ core logs notes meant for Ray's developers to the terminal (e.g. that Ray Data keeps actor
        # arguments in the object store); failures still reach us as exceptions. RAY_BACKEND_LOG_LEVEL overrides.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        # This cxrlab travels with the job (Ray's py_modules): every worker runs the driver's code, even on a
        # machine where another version, or none, is installed (its dependencies must be there).
        quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                     runtime_env={"py_modules": [str(Path(__file__).resolve().parent)]})
        try:
            if address == LOCAL:
                ray.init(address=LOCAL, num_cpus=num_cpus, **quiet)  # a new one, whatever RAY_ADDRESS says
            else:
                ray.init(address=address, **quiet)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise CxrlabError(f"--ray {address}: cannot join a Ray cluster there ({_first_line(exc)}); start one "
                              f"with `ray start --head`, or pass --ray local to start one for this run") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notes on bars and plans are not the user's
    return ray


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def cluster_cpus() -> int:
    return max(1, int(ray_module().cluster_resources().get("CPU", 1)))


# ------------------------------------------------------------------ embedding
class _EmbedActor:
    """One ONNX Runtime session; a batch of (index, path) -> index, digest, vector, error (empty when embedded)."""

    def __init__(self, graph: list, size: int, dim: int, threads: int, engine: dict | None = None):
        self.session = make_session(ray_module().get(graph[0]), threads=threads,
                                    engine=Engine(**engine) if engine else REFERENCE)
        self.size, self.dim = size, dim

    def __call__(self, batch: dict) -> dict:
        n = len(batch["path"])
        digests, vectors = np.zeros((n, 32), np.uint8), np.zeros((n, self.dim), np.float32)
        errors, arrays, ok = np.full(n, "", dtype=object), [], []
        for i, path in enumerate(batch["path"]):
            try:
                data = read_file(path)
                arrays.append(prepare(data, self.size, path)[0])
            except ImageError as exc:
                errors[i] = exc.reason
                continue
            digests[i] = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
            ok.append(i)
        if ok:
            vectors[ok] = self.session.run(["embedding"], {"image": np.stack(arrays)[:, None]})[0]
        return {"index": batch["index"], "digest": digests, "vector": vectors, "error": errors}


@dataclass
class Cluster:
    """A connected Ray cluster and how many workers (actors, training processes) to use; None: one per core.
    ``device``: what fine-tuning workers train on: ``auto`` (GPUs when the cluster has them), ``cpu`` or ``gpu``."""

    address: str = AUTO
    workers: int | None = None
    device: str = "auto"

    def __post_init__(self):
        if self.device not in DEVICES:
            raise CxrlabError(f"--ray-device {self.device}: use one of {', '.join(DEVICES)}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise CxrlabError(f"--workers must be a whole number of at least 1, got {self.workers!r}")
        connect(self.address)

    def n_workers(self) -> int:
        return self.workers or cluster_cpus()

    def embed_files(self, backbone, paths: list, *, store=None, batch_size: int = 32,
                    progress: Progress | None = None, engine: Engine = REFERENCE) -> EmbedResult:
        """``Embedder.embed_files`` on the cluster: the same rows, digests and skipped files, the same vectors."""
        progress = resolve(progress)
        progress.start(len(paths), f"embedding ({backbone.id}) on {self.n_workers()} Ray workers")
        digests, vectors, skipped, hits = {}, {}, [], 0
        misses = []
        for i, (d, reason) in enumerate(_hash_files(paths)):
            if reason is not None:
                skipped.append((i, SkippedFile(str(paths[i]), reason)))
            elif store is not None and (hit := store.lookup(d)) is not None:
                digests[i], vectors[i] = d, hit
                hits += 1
            else:
                misses.append(i)
        progress.advance(len(paths) - len(misses))
        if misses:
            with open(backbone.onnx_path, "rb") as f:
                graph = [ray_module().put(f.read())]  # held here while actors may restart and fetch it again
            args = dict(graph=graph, size=backbone.spec.input_size, dim=backbone.spec.embed_dim,
                        threads=CPUS_PER_WORKER, engine=engine.to_json())
            for out in self._map(_EmbedActor, args, [(i, str(paths[i])) for i in misses], batch_size):
                done_d, done_v = [], []
                for i, d, v, error in zip(out["index"], out["digest"], out["vector"], out["error"]):
                    i = int(i)
                    if error:
                        skipped.append((i, SkippedFile(str(paths[i]), str(error))))
                        continue
                    digests[i], vectors[i] = d.tobytes(), v
                    done_d.append(d.tobytes())
                    done_v.append(v)
                if store is not None and done_d:  # whole batches, written by the driver: one atomic segment each
                    store.put_many(done_d, np.stack(done_v))
                progress.advance(len(out["index"]))
        if store is not None:
            store.hits += hits
            store.misses += len(digests) - hits
            store.maybe_compact()
        progress.close()
        order = sorted(vectors)
        dim = backbone.spec.embed_dim
        return EmbedResult(
            vectors=np.stack([vectors[i] for i in order]).astype(np.float32) if order else np.zeros((0, dim), np.float32),
            paths=[str(paths[i]) for i in order], digests=[digests[i] for i in order],
            skipped=[s for _, s in sorted(skipped, key=lambda t: t[0])], hits=hits, misses=len(order) - hits)

    # -------------------------------------------------------------- prediction
    def predict_files(self, model, paths: list[str], *, ood: bool = True, batch_size: int = 16,
                      progress: Progress | None = None) -> list:
        """``Model.predict`` of image files (folders already expanded), one Prediction per path, in order."""
        from .predict import Prediction

        progress = resolve(progress)
        progress.start(len(paths), f"predicting on {self.n_workers()} Ray workers")
        got: dict[int, Prediction] = {}
        args = dict(files=[ray_module().put(model.files)], threads=CPUS_PER_WORKER, ood=ood,
                    engine=model.engine.to_json())
        for out in self._map(_PredictActor, args, list(enumerate(map(str, paths))), batch_size):
            for i, fields in zip(out["index"], out["prediction"]):
                got[int(i)] = Prediction(**json.loads(fields))
            progress.advance(len(out["index"]))
        progress.close()
        return [got[i] for i in range(len(paths))]

    def _map(self, actor, args: dict, items: list[tuple[int, str]], batch_size: int):
        """Batches of ``actor(batch)`` over (index, path) items, as they finish (any order)."""
        ray = ray_module()
        # a fixed pool larger than the cluster's cores would wait for ever for the actors it cannot place
        n = min(self.n_workers(), cluster_cpus() // CPUS_PER_WORKER, max(1, -(-len(items) // batch_size)))
        ds = ray.data.from_items([{"index": i, "path": p} for i, p in items])
        ds = ds.map_batches(actor, fn_constructor_kwargs=args, batch_size=batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=n), num_cpus=CPUS_PER_WORKER)
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")


class _PredictActor:
    """One loaded model; a batch of (index, path) -> index, prediction (the Prediction's fields as JSON)."""

    def __init__(self, files: list, threads: int, ood: bool, engine: dict):
        from .predict import Model

        self.model = Model.from_files(ray_module().get(files[0]), threads=threads, **engine)  # the driver's engine
        self.ood = ood

    def __call__(self, batch: dict) -> dict:
        preds = self.model.predict([str(p) for p in batch["path"]], ood=self.ood)
        # JSON: the fields vary (None, a dict of scores); Python's float text reads back to the same float
        return {"index": batch["index"], "prediction": np.array([json.dumps(p.to_dict()) for p in preds])}


def _hash_files(paths: list) -> list[tuple[bytes | None, str | None]]:
    """(SHA-256 of the file, None) or (None, why it cannot be read), per path; read in a few threads."""
    def one(path):
        try:
            return hashlib.sha256(read_file(path)).digest(), None
        except ImageError as exc:
            return None, exc.reason

    with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) * 2)) as pool:
        return list(pool.map(one, paths))
