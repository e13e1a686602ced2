"""cxrlab.datasets against a local Range-capable HTTP server; never touches the internet."""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import threading
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from cxrlab import datasets
from cxrlab.datasets import DATASETS, DownloadError, download, label_from_name, layout_archive
from cxrlab.errors import CxrlabError, DataError

NAMES = {"CHNCXR_0001_0.png": "normal", "CHNCXR_0002_0.png": "normal",
         "CHNCXR_0003_0.png": "normal", "CHNCXR_0004_1.png": "abnormal",
         "CHNCXR_0005_1.png": "abnormal"}


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), color=seed * 30 % 256).save(buf, format="PNG")
    return buf.getvalue()


def _make_zip(path: Path, extra: dict[str, bytes] | None = None) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        for i, name in enumerate(NAMES):
            zf.writestr(f"ChinaSet_AllFiles/CXR_png/{name}", _png(i))
            zf.writestr(f"ChinaSet_AllFiles/ClinicalReadings/{name[:-4]}.txt", "male 45yrs\nnormal\n")
        zf.writestr("__MACOSX/ChinaSet_AllFiles/CXR_png/._CHNCXR_0004_1.png", b"\x00junk")
        zf.writestr("ChinaSet_AllFiles/NLM-ChinaCXRSet-ReadMe.docx", b"readme")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path.read_bytes()


class _Server:
    def __init__(self, payload: bytes):
        self.payload = payload
        self.honour_range = True
        self.requests: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                outer.requests.append({"path": self.path, "range": self.headers.get("Range")})
                data, rng = outer.payload, self.headers.get("Range")
                if rng and outer.honour_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    body = data[start:]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/ChinaSet_AllFiles.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def payload(tmp_path) -> bytes:
    return _make_zip(tmp_path / "ChinaSet_AllFiles.zip")


@pytest.fixture
def server(payload):
    srv = _Server(payload)
    yield srv
    srv.stop()


def _files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def test_registry_entries():
    sz, mc = DATASETS["shenzhen"], DATASETS["montgomery"]
    assert sz.urls[0].startswith("https://data.lhncbc.nlm.nih.gov/") and len(sz.urls) == 2
    assert sz.archive_name == "ChinaSet_AllFiles.zip" and mc.archive_name == "NLM-MontgomeryCXRSet.zip"
    assert sz.sha256 is None and mc.sha256 is None
    assert sz.expected_counts == {"abnormal": 336, "normal": 326}
    assert mc.expected_counts == {"abnormal": 58, "normal": 80}
    assert "Jaeger" in sz.citation and sz.license_note


def test_label_from_name():
    assert label_from_name("CHNCXR_0001_1") == "abnormal"
    assert label_from_name("MCUCXR_0104_0", DATASETS["montgomery"]) == "normal"
    assert label_from_name("CHNCXR_0001") is None
    assert label_from_name("CHNCXR_0001_2") is None


def test_download_lays_out_labels(tmp_path, server, payload):
    dest = tmp_path / "data"
    res = download("shenzhen", dest, url=server.url)
    assert res.counts == {"abnormal": 2, "normal": 3}
    assert _files(dest / "normal") == {n for n, lab in NAMES.items() if lab == "normal"}
    assert _files(dest / "abnormal") == {n for n, lab in NAMES.items() if lab == "abnormal"}
    assert res.archive == dest / ".downloads" / "ChinaSet_AllFiles.zip"
    assert res.archive.read_bytes() == payload
    assert res.sha256 == hashlib.sha256(payload).hexdigest()
    recorded = Path(str(res.archive) + ".sha256").read_text().split()[0]
    assert recorded == res.sha256
    assert any("expected" in n for n in res.notes)  # 5 images, not 336/326
    assert not list(dest.glob(".unpack-*")) and not list(dest.rglob("*.part"))
    assert sorted(p.name for p in dest.iterdir()) == [".downloads", "abnormal", "normal"]


def test_correct_sha256_passes(tmp_path, server, payload):
    digest = hashlib.sha256(payload).hexdigest()
    res = download("shenzhen", tmp_path / "d", url=server.url, sha256=digest.upper())
    assert res.sha256 == digest and res.counts["normal"] == 3


def test_wrong_sha256_raises_and_deletes(tmp_path, server):
    dest = tmp_path / "d"
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        download("shenzhen", dest, url=server.url, sha256="0" * 64)
    assert not (dest / ".downloads" / "ChinaSet_AllFiles.zip").exists()
    assert not list((dest / ".downloads").glob("*.part"))
    assert not (dest / "normal").exists()


def test_recorded_digest_catches_corrupt_redownload(tmp_path, server, payload):
    dest = tmp_path / "d"
    res = download("shenzhen", dest, url=server.url)
    res.archive.unlink()
    server.payload = payload[:-10] + b"X" * 10
    with pytest.raises(DownloadError, match="recorded"):
        download("shenzhen", dest, url=server.url)
    assert not res.archive.exists()


def test_resume_with_range(tmp_path, server, payload):
    dest = tmp_path / "d"
    part = dest / ".downloads" / "ChinaSet_AllFiles.zip.part"
    part.parent.mkdir(parents=True)
    half = len(payload) // 2
    part.write_bytes(payload[:half])
    res = download("shenzhen", dest, url=server.url)
    assert server.requests[-1]["range"] == f"bytes={half}-"
    assert res.archive.read_bytes() == payload
    assert not part.exists()


def test_resume_restarts_when_server_ignores_range(tmp_path, server, payload):
    server.honour_range = False
    part = tmp_path / "d" / ".downloads" / "ChinaSet_AllFiles.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage-from-an-older-file")
    res = download("shenzhen", tmp_path / "d", url=server.url)
    assert server.requests[-1]["range"] == "bytes=26-"
    assert res.archive.read_bytes() == payload


def test_resume_complete_part_416(tmp_path, server, payload):
    part = tmp_path / "d" / ".downloads" / "ChinaSet_AllFiles.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(payload)
    res = download("shenzhen", tmp_path / "d", url=server.url)
    assert res.archive.read_bytes() == payload and res.counts["abnormal"] == 2


def test_second_call_is_offline_and_idempotent(tmp_path, server):
    dest = tmp_path / "d"
    first = download("shenzhen", dest, url=server.url)
    n = len(server.requests)
    assert n == 1
    second = download("shenzhen", dest, url=server.url)
    assert len(server.requests) == n
    assert second.counts == first.counts and second.sha256 == first.sha256
    assert len(list((dest / "normal").iterdir())) == 3
    assert len(list((dest / "abnormal").iterdir())) == 2


def test_offline_gives_one_line_error(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens on this port now
    with pytest.raises(DownloadError) as exc:
        download("shenzhen", tmp_path / "d", url=f"http://127.0.0.1:{port}/x.zip", timeout=5)
    msg = str(exc.value)
    assert "\n" not in msg and "--archive" in msg and "ChinaSet_AllFiles.zip" in msg
    assert isinstance(exc.value, CxrlabError)
    assert not (tmp_path / "d" / ".downloads" / "ChinaSet_AllFiles.zip").exists()


def test_http_404_is_download_error(tmp_path):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_error(404, "Not Found")

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    t = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    t.start()
    try:
        with pytest.raises(DownloadError, match="HTTP 404") as exc:
            download("shenzhen", tmp_path / "d",
                     url=f"http://127.0.0.1:{httpd.server_address[1]}/z.zip", timeout=5)
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(5)
    assert "--archive" in str(exc.value) and "offline" not in str(exc.value)


def test_zip_slip_rejected(tmp_path):
    bad = tmp_path / "bad.zip"
    _make_zip(bad, extra={"../../evil_0.png": _png(1)})
    dest = tmp_path / "d"
    with pytest.raises(DataError, match="unsafe"):
        layout_archive("shenzhen", bad, dest)
    assert not (tmp_path / "evil_0.png").exists()
    assert not (dest / "normal").exists()
    assert not list(dest.glob(".unpack-*"))


def test_absolute_member_rejected(tmp_path):
    bad = tmp_path / "abs.zip"
    _make_zip(bad, extra={"/tmp/evil_1.png": _png(2)})
    with pytest.raises(DataError, match="unsafe"):
        layout_archive("shenzhen", bad, tmp_path / "d")


def test_layout_archive_from_local_file(tmp_path, payload):
    archive = tmp_path / "ChinaSet_AllFiles.zip"
    dest = tmp_path / "out"
    res = layout_archive("shenzhen", archive, dest)
    assert res.counts == {"abnormal": 2, "normal": 3}
    assert res.archive == archive and archive.exists()
    assert res.sha256 == hashlib.sha256(payload).hexdigest()
    again = layout_archive("shenzhen", archive, dest)
    assert again.counts == res.counts and len(list((dest / "normal").iterdir())) == 3
    with pytest.raises(DownloadError, match="mismatch"):
        layout_archive("shenzhen", archive, tmp_path / "o2", sha256="f" * 64)
    assert archive.exists()  # the user's own file is never deleted


def test_unknown_dataset_and_progress(tmp_path, server):
    with pytest.raises(DataError, match="unknown dataset"):
        download("nope", tmp_path / "d")

    class Rec:
        def __init__(self):
            self.events = []

        def start(self, total, desc):
            self.events.append(("start", total, desc))

        def advance(self, n=1):
            self.events.append(("advance", n))

        def close(self):
            self.events.append(("close",))

    rec = Rec()
    download("shenzhen", tmp_path / "d", url=server.url, progress=rec)
    starts = [e for e in rec.events if e[0] == "start"]
    assert len(starts) == 2 and starts[1][1] == 5
    assert rec.events[-1] == ("close",)


def test_no_print(tmp_path, server, capsys):
    download("shenzhen", tmp_path / "d", url=server.url)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert datasets.DownloadError is DownloadError
