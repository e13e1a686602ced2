"""Load test of `cxrlab serve` on loopback: a bounded number of POST /api/predict, one image each.

    python benchmarks/serve.py [--model MODEL_DIR] [--images DIR] [--requests 500] [--concurrency 8]
                               [--heatmap both|on|off] [--bomb-clients N] [--server-args "..."]
    python benchmarks/serve.py --decode-memory     # estimated vs measured decode memory, per image kind

The server is `cxrlab serve` in a separate process on 127.0.0.1; the client is httpx in a thread
pool of this process, so client and server share the machine's cores (but not a GIL).
Without --model a quick model is trained on the shared Shenzhen set first (about a minute cold).
Each mode prints p50/p95/p99 latency per request (= per image), throughput and the error count;
an error is a transport failure, a non-200 status, a per-file error, or a missing heatmap when one
was asked for. Exits 1 if there was any error.

--bomb-clients N adds N clients that post, back to back, small PNGs declaring up to 50 million pixels
(decompression bombs under the pixel cap); their answers (413 refused by the decode-memory estimate,
503 budget full, 200 decoded) and the server's peak RSS are printed. --decode-memory prints, for each
kind of image, the decode memory serve_limits estimates from the header and the peak RSS increase
measured when decode + resize run in a fresh process (each estimate must be at least the measurement).
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import socket
import subprocess
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

    def __init__(self, model_dir: Path, extra_args=()):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "cxrlab", "serve", "--model", str(model_dir), "--port", str(self.port),
                    *extra_args]

    def peak_rss_mib(self) -> float | None:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
        except (OSError, StopIteration):
            return None

    def __enter__(self):
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


def bomb_pngs() -> list[tuple[str, bytes]]:
    """Small PNGs that decode big: each under the default 50 Mpx cap."""
    from PIL import Image

    specs = [("P", (7000, 7000)), ("RGBA", (7000, 7000)), ("I;16", (7000, 7000)), ("L", (49000, 1000)),
             ("1", (7000, 7000))]
    out = []
    for mode, size in specs:
        buf = io.BytesIO()
        Image.new(mode, size, 1).save(buf, "PNG", optimize=True)
        out.append((f"bomb-{mode.replace(';', '')}-{size[0]}x{size[1]}.png", buf.getvalue()))
    return out


def run_bombs(url: str, bombs, stop: threading.Event, counts: dict, lock: threading.Lock) -> None:
    import httpx

    with httpx.Client(timeout=120) as client:
        i = 0
        while not stop.is_set():
            name, data = bombs[i % len(bombs)]
            i += 1
            try:
                key = client.post(f"{url}/api/predict", files=[("files", (name, data, "image/png"))]).status_code
            except Exception as exc:
                key = type(exc).__name__
            with lock:
                counts[key] = counts.get(key, 0) + 1


_MEASURE_CHILD = r"""
import io, sys
from PIL import Image
from cxrlab.decode import decode_image, resize
from cxrlab.serve_limits import estimate_decode_bytes

def rss(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))

data, min_size = open(sys.argv[1], "rb").read(), int(sys.argv[2])
for fmt in ("PNG", "JPEG", "TIFF", "WEBP", "GIF", "BMP"):  # warm up every decoder first
    b = io.BytesIO(); Image.new("RGB", (600, 500), (1, 2, 3)).save(b, fmt)
    resize(decode_image(b.getvalue(), name="w", min_size=min_size).pixels, min_size)
est = estimate_decode_bytes(io.BytesIO(data), min_size=min_size, max_pixels=10**9).nbytes
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak RSS (Linux >= 4.0)
base = rss("VmRSS")
resize(decode_image(data, name="x", max_pixels=10**9, min_size=min_size).pixels, min_size)
print(rss("VmHWM") - base, est)
"""


def decode_memory_cases():
    from PIL import Image

    def pil(mode, size, fmt, **kw):
        buf = io.BytesIO()
        Image.new(mode, size, 1).save(buf, fmt, **kw)
        return buf.getvalue()

    shapes = [(4000, 4000), (40000, 400), (12000, 1200)]
    for mode, fmt, kw in [("RGBA", "PNG", {}), ("RGB", "PNG", {}), ("L", "PNG", {}), ("I;16", "PNG", {}),
                          ("P", "PNG", {}), ("LA", "PNG", {}), ("1", "PNG", {}), ("F", "TIFF", {}),
                          ("I", "TIFF", {}), ("RGB", "JPEG", {}), ("P", "GIF", {}), ("RGBA", "TIFF", {})]:
        for size in shapes:
            yield f"{fmt} {mode} {size[0]}x{size[1]}", pil(mode, size, fmt, **kw)
    for size in [(4000, 4000), (16000, 1000)]:
        yield f"WEBP RGBA {size[0]}x{size[1]}", pil("RGBA", size, "WEBP", lossless=True)
    for rows, cols, bits, spp in [(4000, 4000, 16, 1), (4000, 4000, 8, 3), (40000, 400, 16, 1)]:
        yield f"DICOM {bits}-bit x{spp} {cols}x{rows}", dicom_bytes(rows, cols, bits, spp)


def dicom_bytes(rows, cols, bits, spp) -> bytes:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, spp
    ds.PhotometricInterpretation = "RGB" if spp == 3 else "MONOCHROME2"
    if spp == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = (np.arange(rows * cols * spp) % 251).astype(np.uint16 if bits == 16 else np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def decode_memory(min_size: int) -> int:
    """Estimate vs measured peak per case; exits 1 if any estimate falls short."""
    short = 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1] / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    print(f"min_size {min_size}; MiB; ratio = estimate / measured peak")
    for label, data in decode_memory_cases():
        with tempfile.NamedTemporaryFile(suffix=".img") as f:
            f.write(data)
            f.flush()
            out = subprocess.run([sys.executable, "-c", _MEASURE_CHILD, f.name, str(min_size)], env=env,
                                 capture_output=True, text=True)
        if out.returncode:
            print(f"{label:32s} failed: {out.stderr.strip().splitlines()[-1]}")
            short += 1
            continue
        peak, est = map(int, out.stdout.split())
        short += est < peak
        print(f"{label:32s} {len(data) / 1e3:9.0f} KB  measured {peak / 2**20:6.0f}  estimate {est / 2**20:6.0f}"
              f"  ratio {est / max(peak, 1):5.2f}{'  SHORT' if est < peak else ''}", flush=True)
    return 1 if short else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="model directory (default: train a quick one on --images)")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of test images (Shenzhen)")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=16, help="requests sent first and not counted")
    ap.add_argument("--heatmap", choices=["both", "on", "off"], default="both")
    ap.add_argument("--bomb-clients", type=int, default=0, help="clients posting decompression bombs meanwhile")
    ap.add_argument("--server-args", default="", help="extra `cxrlab serve` options, e.g. '--max-decode-mb 512'")
    ap.add_argument("--decode-memory", action="store_true", help="only compare decode memory estimates")
    ap.add_argument("--min-size", type=int, default=224, help="model input size for --decode-memory")
    args = ap.parse_args(argv)
    if args.decode_memory:
        return decode_memory(args.min_size)
    if args.requests < 1 or args.concurrency < 1 or args.bomb_clients < 0:
        ap.error("--requests and --concurrency must be positive, --bomb-clients not negative")

    images = load_images(args.images, 64)
    with tempfile.TemporaryDirectory(prefix="cxrlab-bench-") as work:
        model_dir = args.model or quick_model(args.images, Path(work))
        modes = {"both": [False, True], "on": [True], "off": [False]}[args.heatmap]
        print(f"model {model_dir}; {len(images)} distinct images; {os.cpu_count()} CPUs; "
              f"{args.requests} requests, {args.concurrency} concurrent, {args.warmup} warm-up, "
              f"{args.bomb_clients} bomb clients", flush=True)
        results = []
        bombs = bomb_pngs() if args.bomb_clients else []
        if bombs:
            print("bombs: " + ", ".join(f"{n} ({len(d) / 1e3:.0f} KB)" for n, d in bombs), flush=True)
        with Server(model_dir, shlex.split(args.server_args)) as server:
            for heatmap in modes:
                stop, lock, counts = threading.Event(), threading.Lock(), {}
                bombers = [threading.Thread(target=run_bombs, args=(server.url, bombs, stop, counts, lock))
                           for _ in range(args.bomb_clients)]
                for t in bombers:
                    t.start()
                try:
                    r = run_load(server.url, images, requests=args.requests, concurrency=args.concurrency,
                                 heatmap=heatmap, warmup=args.warmup)
                finally:
                    stop.set()
                    for t in bombers:
                        t.join()
                results.append(r)
                print(f"heatmap={'on ' if heatmap else 'off'}  p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  "
                      f"p99 {r['p99_ms']:7.1f} ms  mean {r['mean_ms']:7.1f} ms  "
                      f"{r['throughput_rps']:6.1f} req/s  errors {r['errors']}/{r['requests']}"
                      f"  ({r['wall_s']:.1f} s)", flush=True)
                for e in r["error_examples"]:
                    print(f"  error: {e}")
                bomb_answers = f"bomb answers {dict(sorted(counts.items(), key=str))}; " if bombers else ""
                print(f"  {bomb_answers}server peak RSS so far {server.peak_rss_mib():.0f} MiB", flush=True)
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
