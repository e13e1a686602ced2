"""Films per second end to end, Orthanc -> `cxrlab dicom-listen` -> Orthanc, against the bare predict rate.

    python benchmarks/dicom.py --model MODEL_DIR [--images DIR] [--films 40] [--concurrency 8] [--workers N]

The films are the first --films images of --images (default: the shared Shenzhen set, both classes), written as
DX DICOM films, each its own study. Measured in the same run, one after the other:

1. bare predict: ``Model.predict_bytes`` on the same DICOM bytes, one film at a time in this process (decode,
   chest check, network, shift score; ONNX Runtime on every core);
2. the listener's own work without the network: predict, heatmap overlay, Secondary Capture and SR built;
3. end to end: every film uploaded to a real Orthanc first (not timed), then Orthanc is asked to C-STORE them
   all to `cxrlab dicom-listen` (--concurrency store jobs at once) and the clock stops when every study holds
   its Secondary Capture and SR again. The latency per film is the listener's own, from its audit log
   (received -> result acknowledged by Orthanc).

Needs Debian's `orthanc` package (apt-get install orthanc) and pynetdicom. Client, Orthanc and cxrlab share the
machine's cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "shenzhen"


def load_films(root: Path, n: int):
    import numpy as np
    from PIL import Image

    from orthanc_server import film_dataset, to_bytes

    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not paths:
        sys.exit(f"no JPEG/PNG images under {root}")
    step = max(1, len(paths) // n)  # spread over both classes
    films = [film_dataset(np.asarray(Image.open(p).convert("L"))) for p in paths[::step][:n]]
    return films, [to_bytes(ds) for ds in films]


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:6.1f} films/s ({seconds * 1000 / n:.0f} ms per film)"


def bare(model_dir: Path, films, data) -> None:
    from cxrlab.dicom_results import answer_line, secondary_capture, structured_report
    from cxrlab.embed import prepare
    from cxrlab.explain import prediction_overlay_png
    from cxrlab.predict import Model

    model = Model(model_dir)
    model.predict_bytes(data[0], "warm-up")
    started = time.perf_counter()
    for i, d in enumerate(data):
        model.predict_bytes(d, f"film{i}")
    print(f"bare predict (decode, checks, network):           {rate(len(data), time.perf_counter() - started)}")
    started = time.perf_counter()
    for i, (ds, d) in enumerate(zip(films, data)):
        array, img = prepare(d, model.input_size, f"film{i}")
        pred = model.predict_arrays([array], [img])[0]
        line = answer_line(model, pred)
        structured_report(ds, model, pred, line)
        if not pred.ood:
            secondary_capture(ds, prediction_overlay_png(model, array, img.pixels, pred, max_side=1024), line)
    print(f"predict + heatmap + SC and SR built (no network): {rate(len(data), time.perf_counter() - started)}")


def end_to_end(model_dir: Path, films, data, *, concurrency: int, workers: int) -> int:
    from orthanc_server import ORTHANC, Listener, Orthanc, free_port

    if ORTHANC is None:
        sys.exit("Orthanc is not installed (apt-get install orthanc)")
    with tempfile.TemporaryDirectory(prefix="cxrlab-dicom-bench-") as tmp:
        tmp = Path(tmp)
        port = free_port()
        with Orthanc(tmp / "orthanc", port, concurrent_jobs=concurrency) as pacs, \
                Listener(model_dir, port, pacs.dicom_port, tmp, workers=workers) as listener:
            ids = [pacs.upload(d)["ID"] for d in data]
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                jobs = list(pool.map(lambda i: pacs.send_to_cxrlab(i, timeout=600), ids))
            missing = 0
            for ds in films:
                left = max(1.0, 600 - (time.perf_counter() - started))
                missing += len(pacs.wait_for_instances(ds.StudyInstanceUID, 3, timeout=left)) < 3
            elapsed = time.perf_counter() - started
            latencies = [r["latency_ms"] for r in listener.audit_rows() if r["latency_ms"] is not None]
        failed = sum(j["FailedInstancesCount"] for j in jobs)
        print(f"end to end Orthanc -> cxrlab -> Orthanc:          {rate(len(data), elapsed)}  "
              f"[{concurrency} store jobs at once, {workers} listener workers]")
        if latencies:
            q = statistics.quantiles(latencies, n=20)
            print(f"  listener latency per film (received -> results stored): p50 {statistics.median(latencies):.0f} ms, "
                  f"p95 {q[18]:.0f} ms")
        print(f"  store failures {failed}, films without both results {missing}")
        return 1 if failed or missing else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="a model directory")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="JPEG/PNG films, turned into DICOM")
    p.add_argument("--films", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=8, help="Orthanc store jobs at once")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="dicom-listen --workers")
    a = p.parse_args()
    films, data = load_films(a.images, a.films)
    print(f"{len(films)} films of {films[0].Columns} x {films[0].Rows} px from {a.images}; {os.cpu_count()} CPUs; "
          f"model {a.model}")
    bare(a.model, films, data)
    return end_to_end(a.model, films, data, concurrency=a.concurrency, workers=a.workers)


if __name__ == "__main__":
    sys.exit(main())
