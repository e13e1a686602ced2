"""Embedding-cache load time: a 10k-row cache (EfficientNet-Lite0's 1280-d vectors), opened again and again.

    PYTHONPATH=src python benchmarks/cache_load.py [--rows 10000] [--dim 1280] [--repeats 7]

Writes random rows as 1 segment and as 16 segments in a throwaway folder (and a throwaway key folder),
then prints the median and minimum wall and CPU time of EmbeddingStore(...) over the repeats. CPU time is
the steadier figure on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="cxrlab-cache-bench-"))
    os.environ["CXRLAB_CACHE_DIR"] = str(base / "user-cache")
    from cxrlab.cache import EmbeddingStore

    rng = np.random.default_rng(0)
    try:
        for n_segments in (1, 16):
            root = base / f"cache-{n_segments}"
            store = EmbeddingStore(root, "ns", a.dim)
            digests = [rng.bytes(32) for _ in range(a.rows)]
            vectors = rng.normal(size=(a.rows, a.dim)).astype(np.float32)
            for part in np.array_split(np.arange(a.rows), n_segments):
                store.put_many([digests[i] for i in part], vectors[part])
            wall, cpu = [], []
            for _ in range(a.repeats):
                t, c = time.perf_counter(), time.process_time()
                assert len(EmbeddingStore(root, "ns", a.dim)) == a.rows
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            print(f"{n_segments:2d} segment(s), {a.rows} rows x {a.dim}: wall median {np.median(wall) * 1e3:.0f} ms "
                  f"(min {min(wall) * 1e3:.0f}), CPU median {np.median(cpu) * 1e3:.0f} ms (min {min(cpu) * 1e3:.0f})")
    finally:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
