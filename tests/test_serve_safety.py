"""`cxrlab serve` under hostile clients: a real uvicorn server on a free 127.0.0.1 port, real sockets.

One test per class of defect: decode memory (declared size refused before decode; concurrent decodes
held within a shared budget; 503 + Retry-After on overload), the body limit while streaming, slow
clients, Host (DNS rebinding), cross-origin POST, HEAD /healthz, an offline /docs page, CLI checks.
Every loop and wait is bounded; nothing listens beyond loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("onnx")
import uvicorn  # noqa: E402
from test_decode import bomb_png  # noqa: E402
from test_serve import SIZE, image_bytes, tiny_onnx  # noqa: E402

from cxrlab import cli  # noqa: E402
from cxrlab import serve as serve_mod  # noqa: E402
from cxrlab.modeldir import save_model  # noqa: E402
from cxrlab.predict import Model  # noqa: E402
from cxrlab.serve_http import allowed_hosts_for  # noqa: E402
from cxrlab.serve_limits import DecodeBudget, Overloaded, ServeLimits, estimate_decode_bytes  # noqa: E402

WAIT = 20.0  # the most any single wait in these tests may take before the test gives up


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "model"
    save_model(d, onnx_bytes=tiny_onnx(), labels=["abnormal", "normal"],
               info={"backbone": {"input_size": SIZE, "id": "test-tiny"}, "positive_label": "abnormal"})
    return Model(d, threads=1)


@contextlib.contextmanager
def running(app, *, header_timeout_s: float = 10.0):
    """uvicorn (with serve's own settings) in a thread, on a socket bound race-free to a loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = serve_mod.server_config(app, host="127.0.0.1", port=port, header_timeout_s=header_timeout_s,
                                     log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=WAIT)
        sock.close()


def post_png(port: int, png: bytes, name: str = "x.png", **headers) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/api/predict", files=[("files", (name, png, "image/png"))],
                      headers=headers, timeout=WAIT)


def raw_request(port: int, request: bytes) -> bytes:
    """Send ``request`` and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


class DecodeSpy:
    """Stands in for serve's decode_image: counts decodes running at once, holds each until
    ``overlap`` are running (or ``hold_s`` passed), then decodes for real."""

    def __init__(self, monkeypatch, *, overlap: int = 1, hold_s: float = 0.0):
        self.real = serve_mod.decode_image
        self.calls = self.active = self.max_active = 0
        self.overlap, self.hold_s = overlap, hold_s
        self.cond = threading.Condition()
        monkeypatch.setattr(serve_mod, "decode_image", self)

    def __call__(self, *args, **kwargs):
        with self.cond:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.active >= self.overlap, timeout=self.hold_s)
        try:
            return self.real(*args, **kwargs)
        finally:
            with self.cond:
                self.active -= 1


def test_declared_size_over_the_decode_limit_is_refused_before_decode(model, monkeypatch, tmp_path):
    spy = DecodeSpy(monkeypatch)
    app = serve_mod.create_app(model, limits=ServeLimits(max_decode_bytes=32 * 2**20,
                                                         decode_budget_bytes=64 * 2**20))
    bomb = bomb_png(7000, 7000)  # 49 Mpx (under the 50 Mpx cap) declared in a few dozen bytes
    assert len(bomb) < 200
    with running(app) as port:
        r = post_png(port, bomb, "bomb.png")
        assert r.status_code == 413, r.text
        assert r.json()["detail"].startswith("bomb.png: decoding this 7000 x 7000 image would take about ")
        assert "more than the per-image limit of 32 MiB (--max-decode-mb)" in r.json()["detail"]
        ok = post_png(port, image_bytes("PNG", size=(64, 48)))  # an ordinary image still goes through
        assert ok.status_code == 200 and ok.json()["results"][0]["error"] is None
        # DICOM: rows x columns from the header, no pixel data needed to refuse it
        pydicom = pytest.importorskip("pydicom")
        from test_serve import dicom_bytes

        ds = pydicom.dcmread(io.BytesIO(dicom_bytes(tmp_path)))
        ds.Rows = ds.Columns = 7000
        buf = io.BytesIO()
        ds.save_as(buf)
        r = post_png(port, buf.getvalue(), "huge.dcm")
        assert r.status_code == 413 and "7000 x 7000 image" in r.json()["detail"], r.text
    assert spy.calls == 1  # only the ordinary image reached the decoder
    assert app.state.decode_budget.in_use == 0


def test_concurrent_decodes_stay_within_the_shared_budget(model, monkeypatch):
    png = image_bytes("PNG", 90, (600, 600))
    cost = estimate_decode_bytes(io.BytesIO(png), min_size=SIZE, max_pixels=50_000_000).nbytes
    # room for two at a time; eight inference slots so only the budget can be what holds the others back
    app = serve_mod.create_app(model, limits=ServeLimits(max_decode_bytes=cost, decode_budget_bytes=int(2.5 * cost),
                                                         inference_slots=8, decode_wait_s=WAIT))
    spy = DecodeSpy(monkeypatch, overlap=2, hold_s=2.0)
    with running(app) as port, ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda i: post_png(port, png, f"{i}.png"), range(6)))
    assert [r.status_code for r in responses] == [200] * 6
    assert spy.calls == 6 and spy.max_active == 2
    budget = app.state.decode_budget
    assert budget.peak == 2 * cost <= budget.total and budget.in_use == 0


def test_decode_overload_answers_503_with_retry_after(model, monkeypatch):
    png = image_bytes("PNG", 90, (600, 600))
    cost = estimate_decode_bytes(io.BytesIO(png), min_size=SIZE, max_pixels=50_000_000).nbytes
    app = serve_mod.create_app(model, limits=ServeLimits(max_decode_bytes=cost, decode_budget_bytes=cost,
                                                         decode_wait_s=0.2))
    release = threading.Event()
    real = serve_mod.decode_image

    def slow_decode(*args, **kwargs):  # holds the whole budget until the second request was answered
        release.wait(WAIT)
        return real(*args, **kwargs)

    monkeypatch.setattr(serve_mod, "decode_image", slow_decode)
    with running(app) as port, ThreadPoolExecutor(1) as pool:
        first = pool.submit(post_png, port, png, "first.png")
        deadline = time.monotonic() + WAIT
        while app.state.decode_budget.in_use == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = post_png(port, png, "second.png")
        release.set()
        assert second.status_code == 503, second.text
        assert second.headers["retry-after"].isdigit() and "busy" in second.json()["detail"]
        assert first.result(timeout=WAIT).status_code == 200
    assert app.state.decode_budget.in_use == 0


def test_decode_budget_admits_what_fits_and_leaks_nothing():
    async def scenario():
        budget = DecodeBudget(100)
        await budget.acquire(60, timeout=1)
        big = asyncio.ensure_future(budget.acquire(50, timeout=WAIT))  # must wait for room
        await asyncio.sleep(0)
        await budget.acquire(30, timeout=1)  # fits beside the first: not held up by the big one waiting
        assert budget.in_use == 90 and not big.done()
        with pytest.raises(Overloaded):
            await budget.acquire(20, timeout=0.05)
        cancelled = asyncio.ensure_future(budget.acquire(40, timeout=WAIT))
        await asyncio.sleep(0)
        cancelled.cancel()
        budget.release(60)
        await big
        assert budget.in_use == 80 and budget.peak == 90
        budget.release(30)
        budget.release(50)
        with contextlib.suppress(asyncio.CancelledError):
            await cancelled
        assert budget.in_use == 0 and budget.peak <= budget.total

    asyncio.run(scenario())


def _chunked_head(port: int) -> bytes:
    return (f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Type: multipart/form-data; boundary=xx\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_body_limit_is_enforced_while_streaming(model, monkeypatch):
    limit = 256 * 2**10
    spooled = []
    from starlette.datastructures import UploadFile

    real_spool = UploadFile.write

    async def counting_write(self, data):  # what the multipart parser spools, file by file
        spooled.append(len(data))
        return await real_spool(self, data)

    monkeypatch.setattr(UploadFile, "write", counting_write)
    app = serve_mod.create_app(model, limits=ServeLimits(max_upload_bytes=limit, max_request_bytes=limit))
    part = b'--xx\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n\x89PNG\r\n\x1a\n'
    with running(app) as port:
        # a declared Content-Length over the limit: 413 before a byte of the body is sent
        answer = raw_request(port, f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {2**30}\r\n"
                                   f"Content-Type: multipart/form-data; boundary=xx\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 413") and b"request body is larger than the limit" in answer

        # chunked, no length: exactly limit + 1 bytes, body left unfinished -> 413, then the server closes
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            s.sendall(_chunked_head(port) + _chunk(part))
            sent = len(part)
            while sent <= limit:
                block = b"\0" * min(16384, limit + 1 - sent)
                s.sendall(_chunk(block))
                sent += len(block)
            assert sent == limit + 1
            answer = b""
            while chunk := s.recv(65536):  # returns b"" once the server closed the connection
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower()
        assert sum(spooled) <= limit

        # a 1 GiB chunked stream is never read in full: the server answers and hangs up early
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            s.sendall(_chunked_head(port) + _chunk(part))
            block, sent = _chunk(b"\0" * 65536), 0
            with contextlib.suppress(ConnectionError):
                while sent < 2**30:
                    s.sendall(block)
                    sent += 65536
        assert sent < 2**30 // 8, sent  # loopback socket buffers take a few MiB, not the gigabyte
        assert sum(spooled) <= 2 * limit
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=WAIT).status_code == 200


def test_slow_clients_are_dropped(model):
    app = serve_mod.create_app(model, limits=ServeLimits(body_timeout_s=1.0))
    with running(app, header_timeout_s=1.0) as port:
        slow = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(50)]
        try:
            for s in slow:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
            # the server still answers others while they dangle
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=WAIT).status_code == 200
            # trickling a header byte now and then does not keep a connection open
            open_ = set(range(len(slow)))
            deadline = time.monotonic() + WAIT
            while open_ and time.monotonic() < deadline:
                for i in list(open_):
                    try:
                        slow[i].sendall(b"X")
                    except OSError:
                        open_.discard(i)
                time.sleep(0.2)
            assert not open_, f"{len(open_)} slow connections still open"
            for s in slow:
                s.settimeout(WAIT)
                with contextlib.suppress(ConnectionError):
                    assert s.recv(100) == b""
        finally:
            for s in slow:
                s.close()

        # a body trickled byte by byte: 408 at the body deadline, connection closed
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
            s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                      b"Content-Type: multipart/form-data; boundary=xx\r\n\r\n--xx\r\n")
            answer, deadline = b"", time.monotonic() + WAIT
            s.settimeout(0.2)
            while not answer and time.monotonic() < deadline:  # one byte per 0.2 s until the server answers
                s.sendall(b"a")
                with contextlib.suppress(TimeoutError):
                    answer = s.recv(65536)
            s.settimeout(WAIT)
            with contextlib.suppress(ConnectionError):  # the rest of the answer, until the server hangs up
                while chunk := s.recv(65536):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=WAIT).status_code == 200


def test_host_header_is_checked(model):
    with running(serve_mod.create_app(model)) as port:
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "localhost.evil.example"):
            answer = raw_request(port, f"GET /api/model HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 400") and b"DNS rebinding" in answer, (host, answer[:200])
        answer = raw_request(port, b"GET /healthz HTTP/1.0\r\n\r\n")  # no Host at all
        assert answer.startswith(b"HTTP/1.1 400")
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
            answer = raw_request(port, f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 200"), (host, answer[:200])
    with running(serve_mod.create_app(model, allowed_hosts=allowed_hosts_for("0.0.0.0", ["lab.example"]))) as port:
        ok = httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"host": "lab.example"}, timeout=WAIT)
        assert ok.status_code == 200
        bad = httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"host": "0.0.0.0"}, timeout=WAIT)
        assert bad.status_code == 400 and "--allowed-host 0.0.0.0" in bad.json()["detail"]
    assert "10.1.2.3" in allowed_hosts_for("10.1.2.3") and "::1" in allowed_hosts_for("::")


def test_cross_origin_post_is_refused(model):
    png = image_bytes("PNG")
    with running(serve_mod.create_app(model)) as port:
        for headers in ({"origin": "http://evil.example"}, {"origin": f"http://evil.example:{port}"},
                        {"origin": f"http://localhost:{port + 1}"}, {"origin": "null"},
                        {"origin": f"https://127.0.0.1:{port}x"}, {"sec-fetch-site": "cross-site"},
                        {"sec-fetch-site": "same-site"}):
            r = post_png(port, png, **headers)
            assert r.status_code == 403 and "cross-origin request refused" in r.json()["detail"], (headers, r.text)
        for headers in ({"origin": f"http://127.0.0.1:{port}"}, {"sec-fetch-site": "same-origin"}, {}):
            r = post_png(port, png, **headers)  # the page itself, and scripts that send no browser markers
            assert r.status_code == 200, (headers, r.text)
        cross_get = httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"origin": "http://evil.example"})
        assert cross_get.status_code == 200  # reading needs CORS, which the server never grants
        assert "access-control-allow-origin" not in cross_get.headers


def test_head_healthz(model):
    with running(serve_mod.create_app(model)) as port:
        r = httpx.head(f"http://127.0.0.1:{port}/healthz", timeout=WAIT)
        assert r.status_code == 200 and r.content == b""
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=WAIT).json() == {"status": "ok"}


def test_docs_work_offline(model):
    with running(serve_mod.create_app(model)) as port:
        base = f"http://127.0.0.1:{port}"
        docs = httpx.get(base + "/docs", timeout=WAIT)
        assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
        assert "/api/predict" in docs.text and "/openapi.json" in docs.text
        assert "default-src 'none'" in docs.headers["content-security-policy"]
        assert "/api/predict" in httpx.get(base + "/openapi.json", timeout=WAIT).json()["paths"]
        assert httpx.get(base + "/redoc", timeout=WAIT).status_code == 404
        for page in (docs.text, httpx.get(base + "/", timeout=WAIT).text):
            assert not re.search(r"https?:|//[a-z0-9]", page, re.I), "a page references an external URL"
            assert all(u.startswith("/") for u in re.findall(r'(?:src|href)="([^"]*)"', page))


@pytest.mark.parametrize("args, message", [
    (["--max-upload-mb", "0"], "--max-upload-mb (max_upload_bytes) must be a positive number, got 0.0"),
    (["--max-upload-mb", "200", "--max-request-mb", "100"], "raise --max-request-mb"),
    (["--max-decode-mb", "4096", "--decode-budget-mb", "1024"], "raise --decode-budget-mb"),
    (["--request-timeout", "nan"], "--request-timeout (body_timeout_s) must be a positive number"),
    (["--allowed-host", "evil/path"], "--allowed-host 'evil/path' is not a host name"),
])
def test_serve_options_are_checked_before_loading(tmp_path, capsys, args, message):
    missing = tmp_path / "no-model-here"  # never loaded: the options fail first
    assert cli.main(["serve", "--model", str(missing), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_readme_rest_api_and_curl_example(model, tmp_path):
    """The README's REST API section: every endpoint it names exists, and its curl line works as written."""
    import json
    import shlex
    import shutil
    import subprocess
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### The web page and its REST API", 1)[1].split("\n### ", 1)[0]
    named = set(re.findall(r"`(GET|POST) (/[a-z/]+)", section))
    assert {("POST", "/api/predict"), ("GET", "/api/limits"), ("GET", "/api/model")} <= named
    (line,) = [s.strip() for s in section.splitlines() if s.strip().startswith("curl ")]
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    (tmp_path / "x.png").write_bytes(image_bytes("PNG", 200))
    (tmp_path / "y.jpg").write_bytes(image_bytes("JPEG", 30))
    with running(serve_mod.create_app(model)) as port:
        paths = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=WAIT).json()["paths"]
        for method, path in named:
            assert method.lower() in paths.get(path, {}) or path == "/healthz", (method, path)
        args = shlex.split(line.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
        out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True).stdout
    results = json.loads(out)["results"]
    assert [r["filename"] for r in results] == ["x.png", "y.jpg"]
    assert all(r["error"] is None and r["heatmap_png"] is None for r in results)
