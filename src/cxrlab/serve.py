"""Web server: a drag-and-drop page and a JSON API over one loaded model directory.

    GET  /             the page (static/index.html; plain HTML/CSS/JS, works offline)
    POST /api/predict  multipart field ``files`` (one or many) -> {"results": [...]};
                       ``?heatmap=0`` skips the heatmaps (``heatmap_png`` is then null)
    GET  /api/model    the model card
    GET  /api/limits   what one request may hold (files, bytes per file, bytes per request): the page
                       splits a large drop into requests within them
    GET  /healthz      {"status": "ok"} (HEAD too)
    GET  /docs         a self-contained page listing the endpoints; /openapi.json is the schema.
                       Swagger UI and ReDoc are off: FastAPI loads them from a CDN, and the server
                       must work offline.

Uploads are read from Starlette's spooled temporary files in chunks and never written anywhere
else; client file names are only echoed back, never opened. Limits (``ServeLimits``): the request
body is counted while it streams, before the multipart parser spools it (serve_http.RequestGuard);
each image's decode memory is estimated from its header and admitted through a budget shared by
all requests (serve_limits); Host and Origin are checked; slow clients are timed out.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import ctypes.util
import hashlib
import html
import inspect
import logging
import os
import time
import weakref
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from .jsonutil import json_safe
from .decode import decode_image, resize
from .errors import ImageError
from .predict import Model
from .serve_http import (ANY_HOST, LOCAL_NAMES, RequestGuard, allowed_hosts_for, check_host_pattern,
                         guarded_protocol, is_wildcard)
from .serve_limits import DecodeBudget, Overloaded, ServeConfigError, ServeLimits, estimate_decode_bytes, size_text

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
INTENDED_USE = "research and education; decision support for trained readers"
DISCLAIMER = "This is not a medical device."
SUPPORTED = "JPEG, PNG, DICOM, BMP, TIFF, WebP, GIF"
_CHUNK = 1 << 20
_TEST_KEYS = ("n", "n_positive", "n_negative", "threshold", "auc", "auc_ci", "sensitivity", "sensitivity_ci",
              "specificity", "specificity_ci", "accuracy", "accuracy_ci", "ppv", "ppv_ci", "npv", "npv_ci",
              "brier", "ece", "ece_uncalibrated", "who_verdict", "who_status", "sample_warning", "macro_auc",
              "macro_sensitivity", "macro_specificity", "macro_f1")
_CSP = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
_RETRY_AFTER_S = 5
_mib = size_text
# Names TestClient (Starlette's in-process client) sends; not resolvable by DNS, so no rebinding risk.
_IN_PROCESS_NAMES = frozenset({"testserver"})


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


def _clean_name(name: str | None, i: int) -> str:
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable())[:200]
    return base or f"upload{i + 1}"


def _load_heatmapper():
    try:
        from .explain import prediction_overlay_png
    except ImportError:
        return None
    return prediction_overlay_png


def verdict(model: Model, pred) -> str:
    if pred.ood:
        return f"unknown (not a chest X-ray: {pred.ood_reason})"
    t, p = pred.threshold, pred.positive_score
    if t is not None and p is not None:
        side = "above" if p >= t else "below"
        if len(model.labels) == 2:
            return f"{side} threshold {t:.3g} -> {pred.label}"
        return f"P({model.positive_label}) {side} threshold {t:.3g}; highest score -> {pred.label}"
    return f"highest score -> {pred.label}"


def shift_warning(pred) -> str | None:
    """The answer's warning for a film unlike the training images (it is still scored), or None."""
    if not pred.shift:
        return None
    return f"warning: unlike the training images (shift score {pred.shift_score:.1f} > {pred.shift_threshold:.1f})"


def model_card(model: Model) -> dict:
    info = model.info
    metrics = info.get("metrics") or {}
    test = {k: metrics["test"][k] for k in _TEST_KEYS if k in (metrics.get("test") or {})}
    bb = info.get("backbone") or {}
    ood = info.get("ood")
    return json_safe({
        "labels": list(model.labels), "positive_label": model.positive_label, "threshold": model.threshold,
        "backbone": {k: bb[k] for k in ("id", "name", "input_size", "description", "license") if k in bb},
        "input_size": model.input_size,
        "metrics": {"test": test, "n": metrics.get("n"),
                    "final_test_accuracy_argmax": metrics.get("final_test_accuracy_argmax")},
        "operating_point": info.get("operating_point"), "calibration": info.get("calibration"),
        "training_data": info.get("training_data"), "created_by": info.get("created_by"),
        "ood": {"threshold": ood.get("threshold"), "reject_rate": ood.get("reject_rate")} if ood else None,
        "chest_check": model.chest_check,
        "intended_use": INTENDED_USE, "disclaimer": DISCLAIMER,
    })


_GATE_FIELDS = ("ood", "ood_score", "ood_threshold", "ood_reason", "shift", "shift_score", "shift_threshold")


def _failed_result(model: Model, name: str, detail: str) -> dict:
    """The result of an upload that could not be used: the model's fields, no scores, the reason."""
    return {"filename": name, "label": None, "scores": {}, "positive_label": model.positive_label,
            "positive_score": None, "threshold": model.threshold, "verdict": None, "warning": None,
            **dict.fromkeys(_GATE_FIELDS),
            "heatmap_png": None, "error": detail}


def _prediction_result(model: Model, name: str, pred, heatmap: str | None) -> dict:
    scores = pred.scores
    return {"filename": name, "label": pred.label, "scores": scores, "positive_label": model.positive_label,
            "positive_score": pred.positive_score if pred.positive_score is not None
            else scores.get(model.positive_label), "threshold": pred.threshold,
            "verdict": verdict(model, pred), "warning": shift_warning(pred), **{k: getattr(pred, k) for k in _GATE_FIELDS},
            "heatmap_png": heatmap, "error": None}


async def _check_upload(upload: UploadFile, name: str, lim: ServeLimits) -> None:
    """Size and type from what was spooled, before any of it is read into memory."""
    if upload.size is not None and upload.size > lim.max_upload_bytes:  # _read_upload checks it otherwise
        raise _Reject(413, f"{name} is larger than the limit of {_mib(lim.max_upload_bytes)}")
    await upload.seek(0)
    head = await upload.read(132)
    await upload.seek(0)
    if not head:
        raise _Reject(422, f"{name}: empty file (0 bytes)")
    if sniff(head) is None:
        raise _Reject(415, f"{name}: not a supported image ({SUPPORTED})")


async def _read_upload(upload: UploadFile, name: str, lim: ServeLimits) -> bytes:
    chunks, total = [], 0
    while chunk := await upload.read(_CHUNK):
        total += len(chunk)
        if total > lim.max_upload_bytes:
            raise _Reject(413, f"{name} is larger than the limit of {_mib(lim.max_upload_bytes)}")
        chunks.append(chunk)
    return b"".join(chunks)


class _Uploads:
    """Uploads -> results for one model: each upload checked, admitted through the decode budget and an
    inference slot (both shared by all requests), decoded and inferred in a worker thread."""

    def __init__(self, model: Model, lim: ServeLimits, audit=None):
        self.model, self.lim, self.audit = model, lim, audit
        self.heatmapper = _load_heatmapper()
        self.slots = lim.inference_slots or max(1, os.cpu_count() or 1)
        # Heavy images (a quarter of the per-image decode limit and up) may use only half the slots, so a
        # client posting 50-megapixel images does not take every core from everyone else.
        self.heavy_cost = lim.max_decode_bytes // 4
        self.lanes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per event loop: (all, heavy)
        self.budget = DecodeBudget(lim.decode_budget_bytes)

    async def predict_all(self, files: list[UploadFile], want_heatmap: bool, client: str | None = None) -> JSONResponse:
        """One result per file in order; the first error's status when every file fails."""
        if len(files) > self.lim.max_files:
            raise HTTPException(413, f"{len(files)} files in one request; the limit is {self.lim.max_files}")
        results, failures = [], []
        for i, upload in enumerate(files):
            try:
                results.append(await self.handle(upload, i, want_heatmap, client))
            except _Reject as exc:
                failures.append(exc)
                results.append(_failed_result(self.model, _clean_name(upload.filename, i), exc.detail))
        if failures and len(failures) == len(results):
            raise HTTPException(failures[0].status, "; ".join(f.detail for f in failures))
        return JSONResponse(json_safe({"results": results}))

    async def handle(self, upload: UploadFile, i: int, want_heatmap: bool = True, client: str | None = None) -> dict:
        name = _clean_name(upload.filename, i)
        await _check_upload(upload, name, self.lim)
        cost = await run_in_threadpool(self.decode_cost, upload, name)
        try:
            await self.budget.acquire(cost, self.lim.decode_wait_s)
        except Overloaded:
            raise HTTPException(503, f"the server is busy decoding other images ({_mib(self.budget.total)} "
                                     f"decode budget in use for {self.lim.decode_wait_s:g} s); retry later",
                                headers={"Retry-After": str(_RETRY_AFTER_S)}) from None
        try:
            data = await _read_upload(upload, name, self.lim)
            all_slots, heavy_slots = self.slots_of(asyncio.get_running_loop())
            heavy = cost >= self.heavy_cost
            async with heavy_slots if heavy else contextlib.nullcontext():
                async with all_slots:
                    return await run_in_threadpool(self.infer, data, name, want_heatmap, heavy, client)
        finally:
            self.budget.release(cost)

    def slots_of(self, loop) -> tuple[asyncio.Semaphore, asyncio.Semaphore]:
        """(all slots, heavy slots) of this event loop (a semaphore belongs to one loop)."""
        if loop not in self.lanes:
            self.lanes[loop] = asyncio.Semaphore(self.slots), asyncio.Semaphore(max(1, self.slots // 2))
        return self.lanes[loop]

    def decode_cost(self, upload: UploadFile, name: str) -> int:  # runs in a worker thread: reads the spooled file
        lim = self.lim
        try:
            estimate = estimate_decode_bytes(upload.file, min_size=self.model.input_size, max_pixels=lim.max_pixels)
        finally:
            upload.file.seek(0)
        if estimate is None:  # the decoder will fail on the same header; until then assume the worst allowed
            return lim.max_decode_bytes
        if estimate.nbytes > lim.max_decode_bytes:
            raise _Reject(413, f"{name}: decoding this {estimate.describe()} would take about "
                               f"{_mib(estimate.nbytes)} of memory, more than the per-image limit of "
                               f"{_mib(lim.max_decode_bytes)} (--max-decode-mb); send a smaller image")
        return estimate.nbytes

    def infer(self, data: bytes, name: str, want_heatmap: bool = True, heavy: bool = False,
              client: str | None = None) -> dict:  # worker thread
        model, started = self.model, time.monotonic()
        try:
            img = decode_image(data, name=name, max_pixels=self.lim.max_pixels, min_size=model.input_size)
            array = resize(img.pixels, model.input_size)
            maps: list | None = [] if want_heatmap and self.heatmapper is not None else None
            pred = model.predict_arrays([array], [img], names=[name], maps=maps)[0]
        except ImageError as exc:
            self.record(None, data, client, started, exc.reason)
            raise _Reject(422, f"{name}: {exc.reason}") from None
        finally:
            if heavy:
                _trim_heap()
        heatmap = self.heatmap(array, img, pred, name, maps[0]) if maps and not pred.ood else None
        self.record(pred, data, client, started)
        return _prediction_result(model, name, pred, heatmap)

    def record(self, pred, data: bytes, client: str | None, started: float, error: str | None = None) -> None:
        """The answer into the audit log, when there is one: the upload's SHA-256, never its name or pixels."""
        if self.audit is None:
            return
        from .audit import sha256

        try:
            self.audit.record(pred, model=self.model, surface="web", source=client, input_sha256=sha256(data),
                              latency_s=time.monotonic() - started, reason=error)
        except Exception:  # a full disk must not cost the answer; it is logged loudly
            log.exception("could not write the audit log")

    def heatmap(self, array, img, pred, name: str, maps=None) -> str | None:
        """The heatmap overlay as base64 PNG, or None (no explain module, or it failed)."""
        if self.heatmapper is None:
            return None
        try:
            png = self.heatmapper(self.model, array, img.pixels, pred, maps=maps)
            return base64.b64encode(png).decode("ascii") if png else None
        except Exception:  # a failed explanation must not cost the prediction
            log.exception("heatmap failed for %s", name)
            return None


def _answered_hosts(allowed_hosts) -> frozenset[str]:
    try:
        return frozenset(LOCAL_NAMES | _IN_PROCESS_NAMES) if allowed_hosts is None else \
            frozenset(check_host_pattern(h) for h in allowed_hosts)
    except ValueError as exc:
        raise ServeConfigError(f"serve: --allowed-host {exc}") from None


async def _nosniff(request, call_next):
    response = await call_next(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


def upload_limits(lim: ServeLimits) -> dict:
    """The limits a client must respect to be answered (the page batches its uploads by them)."""
    return {"max_files": lim.max_files, "max_upload_bytes": lim.max_upload_bytes,
            "max_request_bytes": lim.max_request_bytes}


def _add_page_routes(app: FastAPI, model: Model, lim: ServeLimits) -> None:
    """/ (the page), /healthz, /api/model, /api/limits and /docs."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"})

    @app.get("/healthz", summary="Liveness check")
    async def healthz():
        """Answers {"status": "ok"} (HEAD answers with no body) while the server runs."""
        return {"status": "ok"}

    app.head("/healthz", include_in_schema=False)(healthz)

    @app.get("/api/model", summary="The model card")
    async def get_model():
        """Labels, operating point, test metrics, calibration, training data and intended use."""
        return model_card(model)

    @app.get("/api/limits", summary="Upload limits")
    async def get_limits():
        """`max_files` per request, `max_upload_bytes` per file (--max-upload-mb) and `max_request_bytes` per
        request body (--max-request-mb): send more files as several requests within these."""
        return upload_limits(lim)

    @app.api_route("/docs", methods=["GET", "HEAD"], include_in_schema=False)
    async def docs():
        return HTMLResponse(docs_page(app.openapi()), headers={"Content-Security-Policy": _DOCS_CSP})


def _add_predict_route(app: FastAPI, uploads: _Uploads) -> None:
    @app.post("/api/predict", summary="Classify uploaded images")
    async def predict(request: Request,
                      files: list[UploadFile] = File(..., description=f"one or more images ({SUPPORTED})"),
                      heatmap: bool = Query(True, description="compute a heatmap per image (0 to skip)")):
        """Multipart field `files`, one or more images; answers {"results": [...]}, one per file in order,
        with a per-file `error` when some files fail (the status is the first error's when all fail:
        413 too large, 415 not an image, 422 unreadable). 503 with Retry-After when the server is busy."""
        return await uploads.predict_all(files, heatmap, request.client.host if request.client else None)


def create_app(model_dir_or_model, *, allowed_hosts=None, trust_modified: bool = False,
               limits: ServeLimits | None = None, runtime: str = "auto", precision: str = "auto",
               audit=None) -> FastAPI:
    """The web app (page and JSON API) for one model.

    Parameters
    ----------
    model_dir_or_model : str, os.PathLike or Model
        A model directory, loaded here, or a loaded Model.
    allowed_hosts : iterable of str, optional
        The Host names answered ('*' answers any); default: the loopback names.
    trust_modified : bool
        Load a model directory whose files differ from their SHA-256 record (a warning is printed).
    limits : ServeLimits, optional
        What the server accepts (upload and request sizes, decode memory, timeouts, parallelism);
        default: ``ServeLimits()``.
    runtime, precision : str
        The inference engine of a model directory loaded here (see :func:`cxrlab.load_model`).
    audit : cxrlab.audit.AuditLog, optional
        Record every answer (the upload's SHA-256, the client's address, the decision, score and latency).
    """
    lim = ServeLimits() if limits is None else limits
    hosts = _answered_hosts(allowed_hosts)
    # Parallelism comes from up to ``slots`` (one per CPU) requests inferring at once, so each ONNX Runtime
    # run gets one thread: threads per run on top oversubscribe the cores (benchmarks/serve.py, 2 CPUs,
    # 8 concurrent: 47 -> 69 req/s, p50 163 -> 108 ms; unchanged one request at a time).
    model = (model_dir_or_model if isinstance(model_dir_or_model, Model)
             else Model(model_dir_or_model, threads=1, trust_modified=trust_modified, runtime=runtime,
                        precision=precision))
    uploads = _Uploads(model, lim, audit)
    app = FastAPI(title="cxrlab", description=f"Chest X-ray classifier. {DISCLAIMER} Intended use: {INTENDED_USE}.",
                  docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None, **_form_limits())
    app.add_middleware(RequestGuard, allowed_hosts=hosts, max_body=lim.max_request_bytes,
                       body_timeout=lim.body_timeout_s,
                       body_hint="; send fewer files per request, or raise --max-request-mb")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.state.model, app.state.limits, app.state.decode_budget = model, lim, uploads.budget
    app.middleware("http")(_nosniff)
    _add_page_routes(app, model, lim)
    _add_predict_route(app, uploads)
    return app


_DOCS_STYLE = ("body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
               "code{background:#f2f2f2;padding:0 .2em}li{margin:.2em 0}")
_DOCS_CSP = (f"default-src 'none'; style-src 'sha256-"
             f"{base64.b64encode(hashlib.sha256(_DOCS_STYLE.encode()).digest()).decode()}'; "
             f"base-uri 'none'; frame-ancestors 'none'; form-action 'none'")


def docs_page(schema: dict) -> str:
    """The API reference as one HTML page without scripts or external resources (works offline)."""
    e = html.escape
    info = schema.get("info", {})
    items = []
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            params = [f"<li><code>{e(p['name'])}</code> ({e(p.get('in', ''))}): "
                      f"{e(p.get('description') or p.get('schema', {}).get('description', ''))}</li>"
                      for p in op.get("parameters", [])]
            body = op.get("requestBody", {}).get("content", {})
            if body:
                params.append(f"<li>body: <code>{e(', '.join(body))}</code></li>")
            items.append(f"<section><h2><code>{e(method.upper())} {e(path)}</code></h2>"
                         f"<p><b>{e(op.get('summary', ''))}.</b> {e(op.get('description', ''))}</p>"
                         f"<ul>{''.join(params)}</ul></section>")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(info.get('title', 'API'))} API"
            f"</title><style>{_DOCS_STYLE}</style></head><body><h1>{e(info.get('title', 'API'))} API</h1>"
            f"<p>{e(info.get('description', ''))}</p><p>The machine-readable schema is "
            f"<a href=\"/openapi.json\"><code>/openapi.json</code></a>; the web page is <a href=\"/\">/</a>. "
            f"Swagger UI is not served: it would load from a CDN, and this server works offline.</p>"
            f"{''.join(items)}</body></html>")


def _load_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS after a heavy decode. glibc keeps freed blocks in per-thread
    arenas, so after 50-megapixel images were decoded on several worker threads the RSS would stay at
    several times what is in use (benchmarks/serve.py --bomb-clients 2: peak RSS 1220 -> 606-636 MiB)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _form_limits() -> dict:
    """Non-file multipart fields are held in memory: allow few and small ones (FastAPI >= 0.13x)."""
    if "form_limits" not in inspect.signature(FastAPI).parameters:
        return {}
    return {"form_limits": {"max_fields": 16, "max_part_size": 64 * 2**10}}


def server_config(app, *, host: str, port: int | None = None, header_timeout_s: float = 10.0, **uvicorn_kw):
    """uvicorn settings that hold up against slow and many clients: the h11 protocol with a header deadline
    (serve_http.guarded_protocol), idle keep-alive closed after 5 s, request headers of at most 16 KiB, and
    503 once 512 connections are open (uvicorn counts idle ones too, so the limit sits well above the slow
    clients one header deadline lets linger)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port or 0, http=guarded_protocol(header_timeout_s),
                          timeout_keep_alive=5, limit_concurrency=512, h11_max_incomplete_event_size=16 * 2**10,
                          **uvicorn_kw)


def serve(model_dir, *, host: str = "127.0.0.1", port: int = 8000, allowed_hosts=(), trust_modified: bool = False,
          limits: ServeLimits | None = None, runtime: str = "auto", precision: str = "auto", audit=None) -> None:
    """Load a model directory and serve it with uvicorn until interrupted.

    Parameters
    ----------
    model_dir : str or os.PathLike
        The model directory.
    host : str
        The address to bind ('0.0.0.0' for all interfaces).
    port : int
        The port, 0..65535 (0: any free port).
    allowed_hosts : iterable of str
        Host names answered besides the loopback names and the bound address ('*' answers any).
    trust_modified : bool
        Load a model directory whose files differ from their SHA-256 record (a warning is printed).
    limits : ServeLimits, optional
        What the server accepts, and its header timeout; default: ``ServeLimits()``. The options are
        checked before the model is loaded.
    runtime, precision : str
        The inference engine (see :func:`cxrlab.load_model`).
    audit : cxrlab.audit.AuditLog, optional
        Record every answer in this audit log.
    """
    import uvicorn

    lim = ServeLimits() if limits is None else limits
    try:
        hosts = allowed_hosts_for(host, allowed_hosts)
    except ValueError as exc:
        raise ServeConfigError(f"serve: --allowed-host {exc}") from None
    if not 0 <= port <= 65535:
        raise ServeConfigError(f"serve: --port must be 0..65535, got {port}")
    app = create_app(model_dir, allowed_hosts=hosts, trust_modified=trust_modified, limits=lim, runtime=runtime,
                     precision=precision, audit=audit)
    if ANY_HOST not in hosts and is_wildcard(host) and not allowed_hosts:
        log.warning("serving on all interfaces, but only the Host names %s are answered; "
                    "add --allowed-host NAME for the names clients use", ", ".join(sorted(hosts)))
    uvicorn.Server(server_config(app, host=host, port=port, header_timeout_s=lim.header_timeout_s)).run()
