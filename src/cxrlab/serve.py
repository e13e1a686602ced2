"""Web server: a drag-and-drop page and a JSON API over one loaded model directory.

    GET  /             the page (static/index.html; plain HTML/CSS/JS, works offline)
    POST /api/predict  multipart field ``files`` (one or many) -> {"results": [...]};
                       ``?heatmap=0`` skips the heatmaps (``heatmap_png`` is then null)
    GET  /api/model    the model card
    GET  /healthz      {"status": "ok"}

Uploads are read from Starlette's spooled temporary files in chunks and never written anywhere
else; client file names are only echoed back, never opened.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import os
import weakref
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from .decode import decode_image, resize
from .errors import ImageError
from .predict import Model

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
INTENDED_USE = "research and education; decision support for trained readers"
DISCLAIMER = "This is not a medical device."
SUPPORTED = "JPEG, PNG, DICOM, BMP, TIFF, WebP, GIF"
_CHUNK = 1 << 20
_TEST_KEYS = ("n", "n_positive", "n_negative", "threshold", "auc", "auc_ci", "sensitivity", "sensitivity_ci",
              "specificity", "specificity_ci", "accuracy", "accuracy_ci", "ppv", "ppv_ci", "npv", "npv_ci",
              "brier", "ece", "ece_uncalibrated", "who_verdict", "macro_auc", "macro_sensitivity",
              "macro_specificity", "macro_f1")
_CSP = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"


class _Reject(Exception):
    """One upload cannot be used: ``status`` is the HTTP code it earns on its own."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def sniff(head: bytes) -> str | None:
    """The image format from the first 132 bytes, or None; the file name is never consulted."""
    if head[128:132] == b"DICM":
        return "DICOM"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and len(head) >= 26:
        return "BMP"
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.4g} MiB" if n >= 2**20 else f"{n:,} bytes"


def _clean_name(name: str | None, i: int) -> str:
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable())[:200]
    return base or f"upload{i + 1}"


def _jsonable(x):
    """NaN/inf (which strict JSON cannot carry) become null, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _load_heatmapper():
    try:
        from .explain import prediction_overlay_png
    except ImportError:
        return None
    return prediction_overlay_png


def verdict(model: Model, pred) -> str:
    if pred.ood:
        return (f"rejected: not a chest X-ray like the training images "
                f"(ood score {pred.ood_score:.1f} > {pred.ood_threshold:.1f})")
    t, p = pred.threshold, pred.positive_score
    if t is not None and p is not None:
        side = "above" if p >= t else "below"
        if len(model.labels) == 2:
            return f"{side} threshold {t:.3g} -> {pred.label}"
        return f"P({model.positive_label}) {side} threshold {t:.3g}; highest score -> {pred.label}"
    return f"highest score -> {pred.label}"


def model_card(model: Model) -> dict:
    info = model.info
    metrics = info.get("metrics") or {}
    test = {k: metrics["test"][k] for k in _TEST_KEYS if k in (metrics.get("test") or {})}
    bb = info.get("backbone") or {}
    ood = info.get("ood")
    return _jsonable({
        "labels": list(model.labels), "positive_label": model.positive_label, "threshold": model.threshold,
        "backbone": {k: bb[k] for k in ("id", "name", "input_size", "description", "license") if k in bb},
        "input_size": model.input_size,
        "metrics": {"test": test, "n": metrics.get("n"),
                    "final_test_accuracy_argmax": metrics.get("final_test_accuracy_argmax")},
        "operating_point": info.get("operating_point"), "calibration": info.get("calibration"),
        "training_data": info.get("training_data"), "created_by": info.get("created_by"),
        "ood": {"threshold": ood.get("threshold"), "reject_rate": ood.get("reject_rate")} if ood else None,
        "intended_use": INTENDED_USE, "disclaimer": DISCLAIMER,
    })


class _BodyLimit:
    """ASGI middleware: refuse a request body larger than ``limit`` before it is all received."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        detail = f"request body is larger than the limit of {_mib(self.limit)}"
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI re-raises HTTPException from body parsing as is
                raise HTTPException(413, detail)
            return message

        await self.app(scope, counted, send)


def create_app(model_dir_or_model, *, max_upload_bytes: int = 32 * 2**20, max_pixels: int = 50_000_000,
               max_files: int = 32, trust_modified: bool = False) -> FastAPI:
    # Parallelism comes from up to ``slots`` (one per CPU) requests inferring at once, so each ONNX Runtime
    # run gets one thread: threads per run on top oversubscribe the cores (benchmarks/serve.py, 2 CPUs,
    # 8 concurrent: 47 -> 69 req/s, p50 163 -> 108 ms; unchanged one request at a time).
    model = (model_dir_or_model if isinstance(model_dir_or_model, Model)
             else Model(model_dir_or_model, threads=1, trust_modified=trust_modified))
    heatmapper = _load_heatmapper()
    slots = max(1, os.cpu_count() or 1)
    semaphores: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one per event loop

    app = FastAPI(title="cxrlab", description=f"Chest X-ray classifier. {DISCLAIMER} Intended use: {INTENDED_USE}.")
    app.add_middleware(_BodyLimit, limit=max_files * max_upload_bytes + 2**20)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.state.model = model

    @app.middleware("http")
    async def nosniff(request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    def infer(data: bytes, name: str, want_heatmap: bool = True) -> dict:  # runs in a worker thread
        try:
            img = decode_image(data, name=name, max_pixels=max_pixels, min_size=model.input_size)
            array = resize(img.pixels, model.input_size)
            pred = model.predict_arrays([array], [img], names=[name])[0]
        except ImageError as exc:
            raise _Reject(422, f"{name}: {exc.reason}") from None
        heatmap = None
        if want_heatmap and heatmapper is not None and not pred.ood:
            try:
                png = heatmapper(model, array, img.pixels, pred)
                heatmap = base64.b64encode(png).decode("ascii") if png else None
            except Exception:  # a failed explanation must not cost the prediction
                log.exception("heatmap failed for %s", name)
        scores = pred.scores
        return {"filename": name, "label": pred.label, "scores": scores, "positive_label": model.positive_label,
                "positive_score": pred.positive_score if pred.positive_score is not None
                else scores.get(model.positive_label), "threshold": pred.threshold,
                "verdict": verdict(model, pred), "ood": pred.ood, "ood_score": pred.ood_score,
                "ood_threshold": pred.ood_threshold, "heatmap_png": heatmap, "error": None}

    async def read_upload(upload: UploadFile, name: str) -> bytes:
        chunks, total = [], 0
        while chunk := await upload.read(_CHUNK):
            total += len(chunk)
            if total > max_upload_bytes:
                raise _Reject(413, f"{name} is larger than the limit of {_mib(max_upload_bytes)}")
            chunks.append(chunk)
        data = b"".join(chunks)
        if not data:
            raise _Reject(422, f"{name}: empty file (0 bytes)")
        if sniff(data[:132]) is None:
            raise _Reject(415, f"{name}: not a supported image ({SUPPORTED})")
        return data

    async def handle(upload: UploadFile, i: int, want_heatmap: bool = True) -> dict:
        name = _clean_name(upload.filename, i)
        data = await read_upload(upload, name)
        loop = asyncio.get_running_loop()
        sem = semaphores.get(loop) or semaphores.setdefault(loop, asyncio.Semaphore(slots))
        async with sem:
            return await run_in_threadpool(infer, data, name, want_heatmap)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"})

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/api/model")
    async def get_model():
        return model_card(model)

    @app.post("/api/predict")
    async def predict(files: list[UploadFile] = File(..., description=f"one or more images ({SUPPORTED})"),
                      heatmap: bool = Query(True, description="compute a heatmap per image (0 to skip)")):
        if len(files) > max_files:
            raise HTTPException(413, f"{len(files)} files in one request; the limit is {max_files}")
        results, failures = [], []
        for i, upload in enumerate(files):
            try:
                results.append(await handle(upload, i, heatmap))
            except _Reject as exc:
                failures.append(exc)
                results.append({"filename": _clean_name(upload.filename, i), "label": None, "scores": {},
                                "positive_label": model.positive_label, "positive_score": None,
                                "threshold": model.threshold, "verdict": None, "ood": None, "ood_score": None,
                                "ood_threshold": None, "heatmap_png": None, "error": exc.detail})
        if failures and len(failures) == len(results):
            raise HTTPException(failures[0].status, "; ".join(f.detail for f in failures))
        return JSONResponse(_jsonable({"results": results}))

    return app


def serve(model_dir, *, host: str = "127.0.0.1", port: int = 8000, **limits) -> None:
    """Load ``model_dir`` and serve it with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(model_dir, **limits), host=host, port=port)
