"""Load test of `cxrlab serve` on loopback: a bounded number of POST /api/predict, one image each.

    python benchmarks/serve.py [--model MODEL_DIR] [--images DIR] [--requests 500] [--concurrency 8]
                               [--heatmap both|on|off]

The server is `cxrlab serve` in a separate process on 127.0.0.1; the client is httpx in a thread
pool of this process, so client and server share the machine's cores (but not a GIL).
Without --model a quick model is trained on the shared Shenzhen set first (about a minute cold).
Each mode prints p50/p95/p99 latency per request (= per image), throughput and the error count;
an error is a transport failure, a non-200 status, a per-file error, or a missing heatmap when one
was asked for. Exits 1 if there was any error.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "shenzhen"


def load_images(root: Path, n: int) -> list[tuple[str, bytes]]:
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not paths:
        sys.exit(f"no JPEG/PNG images under {root}")
    step = max(1, len(paths) // n)  # spread over both classes
    return [(p.name, p.read_bytes()) for p in paths[::step][:n]]


def quick_model(image_dir: Path, work: Path) -> Path:
    import cxrlab

    print(f"training a quick model on {image_dir} ...", flush=True)
    started = time.perf_counter()
    result = cxrlab.train(image_dir, output=work / "model", bottleneck_dir=work / "bottlenecks", report=False)
    print(f"  trained in {time.perf_counter() - started:.0f} s -> {result.model_dir}", flush=True)
    return Path(result.model_dir)


class Server:
    """`cxrlab serve` in its own process on a free 127.0.0.1 port (its own GIL, like a real deployment)."""

    def __init__(self, model_dir: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "cxrlab", "serve", "--model", str(model_dir), "--port", str(self.port)]

    def __enter__(self):
        import subprocess
        import urllib.request

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1).read()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("cxrlab serve did not start") from None
                time.sleep(0.1)

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def run_load(url: str, images, *, requests: int, concurrency: int, heatmap: bool, warmup: int) -> dict:
    import httpx

    endpoint = f"{url}/api/predict?heatmap={int(heatmap)}"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    errors: list[str] = []
    lock = threading.Lock()

    with httpx.Client(limits=limits, timeout=120) as client:
        def one(i: int) -> float | None:
            name, data = images[i % len(images)]
            start = time.perf_counter()
            try:
                r = client.post(endpoint, files=[("files", (name, data, "image/jpeg"))])
                elapsed = time.perf_counter() - start
                problem = None
                if r.status_code != 200:
                    problem = f"HTTP {r.status_code}: {r.text[:200]}"
                else:
                    (res,) = r.json()["results"]
                    if res["error"] or res["label"] is None:
                        problem = f"{name}: {res['error'] or 'no label'}"
                    elif heatmap and not res["heatmap_png"] and not res["ood"]:
                        problem = f"{name}: no heatmap"
            except Exception as exc:  # transport errors count, they do not stop the run
                elapsed, problem = time.perf_counter() - start, f"{type(exc).__name__}: {exc}"
            if problem:
                with lock:
                    errors.append(problem)
                return None
            return elapsed

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(warmup)))  # session warm-up, connection set-up; not counted
            errors.clear()
            started = time.perf_counter()
            latencies = list(pool.map(one, range(requests)))
            wall = time.perf_counter() - started

    ok = sorted(x for x in latencies if x is not None)
    q = statistics.quantiles(ok, n=100, method="inclusive") if len(ok) > 1 else ok * 99

    return {"heatmap": heatmap, "requests": requests, "concurrency": concurrency, "errors": len(errors),
            "error_examples": errors[:3], "p50_ms": 1000 * q[49] if ok else None,
            "p95_ms": 1000 * q[94] if ok else None, "p99_ms": 1000 * q[98] if ok else None,
            "mean_ms": 1000 * statistics.fmean(ok) if ok else None, "wall_s": wall,
            "throughput_rps": requests / wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="model directory (default: train a quick one on --images)")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of test images (Shenzhen)")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=16, help="requests sent first and not counted")
    ap.add_argument("--heatmap", choices=["both", "on", "off"], default="both")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        ap.error("--requests and --concurrency must be positive")

    images = load_images(args.images, 64)
    with tempfile.TemporaryDirectory(prefix="cxrlab-bench-") as work:
        model_dir = args.model or quick_model(args.images, Path(work))
        modes = {"both": [False, True], "on": [True], "off": [False]}[args.heatmap]
        print(f"model {model_dir}; {len(images)} distinct images; {os.cpu_count()} CPUs; "
              f"{args.requests} requests, {args.concurrency} concurrent, {args.warmup} warm-up", flush=True)
        results = []
        with Server(model_dir) as server:
            for heatmap in modes:
                r = run_load(server.url, images, requests=args.requests, concurrency=args.concurrency,
                             heatmap=heatmap, warmup=args.warmup)
                results.append(r)
                print(f"heatmap={'on ' if heatmap else 'off'}  p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  "
                      f"p99 {r['p99_ms']:7.1f} ms  mean {r['mean_ms']:7.1f} ms  "
                      f"{r['throughput_rps']:6.1f} req/s  errors {r['errors']}/{r['requests']}"
                      f"  ({r['wall_s']:.1f} s)", flush=True)
                for e in r["error_examples"]:
                    print(f"  error: {e}")
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
