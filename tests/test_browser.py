"""End to end: a real model trained on Shenzhen, served by uvicorn on loopback, driven by Chromium.

Chromium is Debian's (/usr/bin/chromium, installed by .ci/run); Playwright's Python package drives it
and never downloads a browser. The screenshot goes to test-artifacts/serve.png at the repository root.
"""

from __future__ import annotations

import csv
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.slow


def chromium_path() -> str | None:
    return str(CHROMIUM) if CHROMIUM.is_file() else shutil.which("chromium")


@pytest.fixture(scope="module")
def sync_api():
    if not chromium_path():
        pytest.skip(f"Chromium not found at {CHROMIUM}: .ci/run installs Debian's chromium "
                    "(`apt-get install chromium`); the browser test needs it")
    try:
        from playwright import sync_api
    except ImportError as exc:
        pytest.skip(f"playwright is not importable ({exc}); `pip install -e .[test]` installs it")
    return sync_api


@pytest.fixture(scope="module")
def trained(shenzhen_dir, shenzhen_run):
    """The session's model trained on the shared Shenzhen set, and one abnormal image from its test split."""
    result, _ = shenzhen_run
    with open(Path(result.run_dir) / "split.csv", newline="") as f:
        test_rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    row = next(r for r in test_rows if r["label"] == "abnormal")
    return Path(result.model_dir), shenzhen_dir / row["relpath"]


@pytest.fixture(scope="module")
def server_url(trained):
    """The trained model's page and API, served on a free loopback port."""
    from cxrlab.serve import create_app

    model_dir, _ = trained
    yield from live_server(create_app(model_dir))


def live_server(app):
    """Yield the URL of ``app`` served by uvicorn in a background thread on a socket bound (race free) to a free
    loopback port; stop it after."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_upload_shows_label_score_heatmap(sync_api, trained, server_url):
    _, image = trained
    problems: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text} ({m.location.get('url')})")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
            page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
            page.set_default_timeout(120_000)  # one prediction + heatmap on two shared cores

            page.goto(server_url + "/")
            # the model card is filled from /api/model
            page.wait_for_selector("#model-card-fields .backbone")
            card = page.inner_text("#model-card")
            assert "not a medical device" in card.lower()
            assert "efficientnet-lite0" in card and "Test ROC AUC" in card and "WHO target" in card

            with page.expect_response(lambda r: "/api/predict" in r.url) as response:
                page.set_input_files("#file-input", str(image))
            assert response.value.status == 200
            (api,) = response.value.json()["results"]
            page.wait_for_selector(".result .label")
            page.wait_for_selector(".result .score")
            heatmap = page.wait_for_selector("img.heatmap")
            page.wait_for_function("() => document.querySelectorAll('.result img').length > 0 && "
                                   "[...document.querySelectorAll('.result img')].every(i => i.complete)")

            assert page.inner_text(".result .filename") == image.name
            label = page.inner_text(".result .label")
            assert label in ("abnormal", "normal") and label == api["label"]
            score = page.inner_text(".result .score")
            m = re.fullmatch(r"P\(abnormal\) = (\d+\.\d)%", score.strip())
            assert m, score
            assert abs(float(m.group(1)) - 100 * api["positive_score"]) < 0.051
            assert page.inner_text(".result .verdict").endswith("-> " + label)
            # issue 18: the gates' answers at a glance
            assert page.inner_text(".result .gates .gate-chest").startswith("Chest X-ray check: passed (chest score")
            assert page.inner_text(".result .gates .gate-shift").startswith("Like the training images: ")
            assert api["heatmap_png"], "the server returned no heatmap"
            size = heatmap.evaluate("i => [i.naturalWidth, i.naturalHeight, i.clientWidth, i.clientHeight]")
            assert min(size) > 32, size  # decoded and laid out, not a broken image
            assert page.locator("img.original").evaluate("i => i.naturalWidth") > 0
            assert page.inner_text("#status").startswith("Done: 1 result")

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve.png"), full_page=True)
        finally:
            browser.close()
    assert not problems, problems


def test_refused_upload_shows_why_and_no_score(sync_api, server_url, tmp_path):
    """Issue 16: a picture that is not a chest X-ray gets an 'unknown' card with the reason: no score, no bar."""
    import numpy as np
    from PIL import Image

    photo = tmp_path / "holiday.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8).repeat(32, 0).repeat(32, 1)).save(photo)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(server_url + "/")
            page.wait_for_selector("#model-card-fields .backbone")
            assert "Chest X-ray check" in page.inner_text("#model-card")
            with page.expect_response(lambda r: "/api/predict" in r.url) as response:
                page.set_input_files("#file-input", str(photo))
            (api,) = response.value.json()["results"]
            assert api["ood"] is True and api["scores"] == {} and api["positive_score"] is None
            page.wait_for_selector(".result.refused .ood-warning")
            assert page.inner_text(".result .label") == "unknown"
            assert "Not a chest X-ray: a colour picture" in page.inner_text(".result .ood-warning")
            assert page.locator(".result .score").count() == 0 and page.locator(".result .bar").count() == 0
            assert "%" not in page.inner_text(".result")
        finally:
            browser.close()
