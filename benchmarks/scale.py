"""Embedding throughput on a Ray cluster started here with 1 and 2 workers, the scaling efficiency, and the projected
time to embed NIH ChestX-ray14 (112,120 films) on N workers from the measured per-worker rate.

    python benchmarks/scale.py [IMAGE_DIR] [--images 160] [--backbone efficientnet-lite0] [--cpus 2]

Every run embeds the same films from their files (read + decode + resize + forward, no cache) through
``cluster.Cluster.embed_files``, as ``cxrlab train --ray`` does. A run pays a fixed cost (starting the actors,
loading the graph into each) besides the per-image work, so each worker count is timed on two sizes and the rate
is the slope: (N_large - N_small) / (t_large - t_small), each time the best of two runs. Scaling efficiency =
rate(2) / (2 x rate(1)). The projection divides 112,120 by N x the one-worker rate, plus the fixed cost once: it
assumes each worker has a core of its own and the files arrive as fast as they are embedded. The load average is
printed: on a shared machine the other processes take cores from the workers (and from the driver and Ray's own
processes, which share the same cores here).
IMAGE_DIR defaults to the shared Shenzhen set (full-size films); without it, generated 1024 px films are used.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "shenzhen"
NIH_FILMS = 112_120


def films(root: Path | None, n: int) -> list[Path]:
    if root is not None and root.is_dir():
        found = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        if len(found) >= n:
            return found[:: max(1, len(found) // n)][:n]
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import synthetic_xray

    folder = Path(tempfile.mkdtemp(prefix="cxrlab-scale-"))
    for i in range(n):
        Image.fromarray(synthetic_xray(i, i % 2 == 1, 1024)).save(folder / f"film_{i:04d}.png")
    return sorted(folder.iterdir())


def timed_run(cluster, backbone, paths) -> float:
    start = time.perf_counter()
    out = cluster.embed_files(backbone, paths, store=None)
    assert len(out.paths) == len(paths), out.skipped[:3]
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image_dir", nargs="?", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--images", type=int, default=160, help="films in the large run (the small run: a quarter)")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    a = ap.parse_args()

    import ray

    from cxrlab.backbones import create_backbone
    from cxrlab.cluster import Cluster, connect
    from cxrlab.embed import Embedder

    paths = films(a.image_dir, a.images)
    small = paths[: max(2, len(paths) // 4)]
    backbone = create_backbone(a.backbone)
    start = time.perf_counter()
    Embedder(backbone, threads=1, workers=1).embed_files(paths)
    one_process = len(paths) / (time.perf_counter() - start)
    connect("local", num_cpus=a.cpus)
    rates, fixed = {}, {}
    try:
        for workers in (1, 2):
            cluster = Cluster("local", workers=workers)
            timed_run(cluster, backbone, small)  # warm: the worker processes exist, files are in the page cache
            t_small = min(timed_run(cluster, backbone, small) for _ in range(2))
            t_large = min(timed_run(cluster, backbone, paths) for _ in range(2))
            rates[workers] = (len(paths) - len(small)) / (t_large - t_small)
            fixed[workers] = t_small - len(small) / rates[workers]
            print(f"{workers} worker(s): {len(paths)} films in {t_large:.1f} s ({len(paths) / t_large:.1f} films/s "
                  f"end to end), {rates[workers]:.1f} films/s per-image rate, fixed cost {fixed[workers]:.1f} s per run")
    finally:
        ray.shutdown()
    efficiency = rates[2] / (2 * rates[1])
    print(f"one process, no Ray, one thread: {one_process:.1f} films/s")
    print(f"scaling efficiency 1 -> 2 workers: {efficiency:.0%} ({a.cpus} CPUs given to Ray, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the end)")
    print(f"projected time for {NIH_FILMS:,} films (NIH ChestX-ray14) at {rates[1]:.1f} films/s per worker:")
    for n in (1, 2, 8, 32, 64):
        print(f"  {n:3d} workers: {(NIH_FILMS / (n * rates[1]) + fixed[1]) / 60:7.1f} min")


if __name__ == "__main__":
    main()
