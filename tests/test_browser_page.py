"""The web page and report.html in Chromium, at desktop (1280 px) and phone (390 px) widths.

Fast: the page serves the tiny hand-written ONNX model of test_serve.py, the report comes from a training
run on synthetic films with the tiny test backbone. Screenshots are saved under pytest's tmp path and, when
CXRLAB_ARTIFACTS names a folder, copied there (the issue 18 before/after screenshots were taken this way).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_browser import LAUNCH_ARGS, chromium_path, live_server

pytest.importorskip("fastapi")
pytest.importorskip("onnx")

WIDTHS = {"desktop": 1280, "phone": 390}


@pytest.fixture(scope="module")
def sync_api():
    if not chromium_path():
        pytest.skip("Chromium not found at /usr/bin/chromium: .ci/run installs Debian's chromium "
                    "(`apt-get install chromium`); the browser tests need it")
    try:
        from playwright import sync_api
    except ImportError as exc:
        pytest.skip(f"playwright is not importable ({exc}); `pip install -e .[test]` installs it")
    return sync_api


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """save(page, name): a full-page PNG under tmp, copied to $CXRLAB_ARTIFACTS when set; returns its path."""
    folder = tmp_path_factory.mktemp("screenshots")
    extra = os.environ.get("CXRLAB_ARTIFACTS")

    def save(page, name: str, full_page: bool = True) -> Path:
        path = folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(extra) / path.name)
        with Image.open(path) as im:
            assert im.width == page.viewport_size["width"], (name, im.size)
        return path

    return save


# ----------------------------------------------------------------- the page
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """test_serve's tiny model, with the chest check's colour and blank rules (no network), so every answer has
    a gate verdict: gray films pass, a colour picture is refused."""
    from test_serve import SIZE, tiny_onnx

    from cxrlab.modeldir import save_model

    info = {
        "created_by": "test", "backbone": {"input_size": SIZE, "id": "test-tiny"}, "positive_label": "abnormal",
        "operating_point": {"rule": "who", "threshold": 0.4, "sensitivity": 0.9, "specificity": 0.7,
                            "reachable": True, "note": ""},
        "calibration": {"method": "temperature", "temperature": 1.5},
        "chest_check": {"threshold": 0.5, "network": False},
        "training_data": {"image_dir_name": "tiny", "counts": {"abnormal": 3, "normal": 4}},
        "metrics": {"n": {"train": 5, "validation": 1, "test": 1},
                    "test": {"auc": 0.9, "auc_ci": [0.8, 0.97], "sensitivity": 0.95, "sensitivity_ci": [0.9, 0.99],
                             "specificity": 0.75, "specificity_ci": [0.7, 0.8], "who_verdict": "meets the WHO target",
                             "who_status": "met", "sample_warning": "only 1 test image: its figures are anecdotes"}},
    }
    d = tmp_path_factory.mktemp("tiny-page") / "model"
    return save_model(d, onnx_bytes=tiny_onnx(), labels=["abnormal", "normal"], info=info)


# small limits, so that byte-based batching and the per-file limit are exercised with small files
LIMITS = {"max_files": 32, "max_upload_bytes": 64 * 2**10, "max_request_bytes": 256 * 2**10}


@pytest.fixture(scope="module")
def page_server(tiny_model_dir):
    from cxrlab.serve import create_app
    from cxrlab.serve_limits import ServeLimits

    yield from live_server(create_app(tiny_model_dir, limits=ServeLimits(**LIMITS, inference_slots=2)))


def png(seed: int, size: int = 64, colour: bool = False, noise: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    if noise:  # incompressible: the file is about size * size bytes
        a = rng.integers(0, 256, (size, size), dtype=np.uint8)
    else:
        yy, xx = np.mgrid[0:size, 0:size] / size
        a = (255 * np.clip(0.2 + 0.6 * (seed % 7) / 6 + 0.1 * np.sin(9 * xx + seed) * yy, 0, 1)).astype(np.uint8)
    if colour:  # a holiday photo: random colour blocks
        a = (rng.random((8, 8, 3)) * 255).astype(np.uint8).repeat(size // 8, 0).repeat(size // 8, 1)
    img = Image.fromarray(a)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def drop(page, files: list[tuple[str, bytes]]) -> None:
    """A real drop event on the drop zone, carrying File objects built in the page."""
    payload = [{"name": n, "b64": base64.b64encode(d).decode()} for n, d in files]
    transfer = page.evaluate_handle("""files => {
        const dt = new DataTransfer();
        for (const f of files) {
          const bin = atob(f.b64), a = new Uint8Array(bin.length);
          for (let i = 0; i < bin.length; i++) a[i] = bin.charCodeAt(i);
          dt.items.add(new File([a], f.name, {type: "image/png"}));
        }
        return dt;
      }""", payload)
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})


def open_page(browser, url, width, problems):
    context = browser.new_context(viewport={"width": width, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    # offline: anything not from this server is refused (and reported)
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith((url, "data:", "blob:"))
               else (problems.append(f"external request: {route.request.url}"), route.abort()))
    page.goto(url + "/")
    page.wait_for_selector("#model-card-fields .backbone")
    return page


def no_sideways_scroll(page) -> None:
    width = page.viewport_size["width"]
    assert page.evaluate("() => document.documentElement.scrollWidth") <= width, "the page scrolls sideways"


def test_dropping_33_files_analyses_all_of_them(sync_api, page_server, shots):
    """Issue 18: 33 files (over the 32 per request) used to give 'Error 413' and no result."""
    files = [(f"film_{i:02d}.png", png(i)) for i in range(32)] + [("holiday photo.png", png(99, colour=True))]
    problems, posts = [], []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=LAUNCH_ARGS)
        try:
            page = open_page(browser, page_server, WIDTHS["desktop"], problems)
            assert page.inner_text("#limits-note") == "Up to 64 KiB per file; any number of files (sent 32 at a time)."
            page.on("response", lambda r: posts.append(r.status) if "/api/predict" in r.url else None)
            drop(page, files)
            page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('Done')")
            assert page.inner_text("#status") == "Done: 33 result(s)."
            assert len(posts) >= 2 and set(posts) == {200}, posts  # batches, each answered
            cards = page.locator(".result")
            assert cards.count() == 33
            names = [n.strip() for n in page.locator(".result .filename").all_inner_texts()]
            assert names == [n for n, _ in files]  # every file, in the order dropped

            # at a glance: decision, the score against the threshold (a tick on the bar), the gates' answers
            first = page.locator(".result").first
            assert first.locator(".label").inner_text() in ("abnormal", "normal")
            assert first.locator(".bar .mark").count() == 1
            bar, mark = first.locator(".bar").bounding_box(), first.locator(".bar .mark").bounding_box()
            assert (mark["x"] + mark["width"] / 2 - bar["x"]) / bar["width"] == pytest.approx(0.4, abs=0.01)
            verdict = first.locator(".verdict").inner_text()
            assert verdict.startswith(("above the threshold of 40.0% -> ", "below the threshold of 40.0% -> "))
            assert first.locator(".gates .gate-chest").inner_text().startswith("Chest X-ray check: passed")
            assert page.locator(".result .gate-chest").count() == 32
            refused = page.locator(".result.refused")
            assert refused.count() == 1 and "Not a chest X-ray" in refused.inner_text()
            assert refused.locator(".score, .bar").count() == 0 and "%" not in refused.inner_text()
            assert page.locator(".result img.heatmap").count() == 32
            shots(page, "page-desktop")

            # downloads: CSV and JSON of every result, the heatmaps as a ZIP of PNGs
            with page.expect_download() as d:
                page.click("#download-csv")
            rows = list(csv.DictReader(io.StringIO(Path(d.value.path()).read_text())))
            assert [r["filename"] for r in rows] == names
            assert sum(r["chest_check"] == "passed" for r in rows) == 32
            assert next(r for r in rows if r["filename"] == "holiday photo.png")["positive_score"] == ""
            scored = [r for r in rows if r["positive_score"]]
            assert all((float(r["positive_score"]) >= float(r["threshold"])) == (r["label"] == "abnormal")
                       for r in scored)
            with page.expect_download() as d:
                page.click("#download-json")
            results = json.loads(Path(d.value.path()).read_text())["results"]
            assert len(results) == 33 and sum(bool(r["heatmap_png"]) for r in results) == 32
            with page.expect_download() as d:
                page.click("#download-heatmaps")
            with zipfile.ZipFile(d.value.path()) as z:
                assert z.testzip() is None
                assert sorted(z.namelist()) == sorted(f"film_{i:02d}_heatmap.png" for i in range(32))
                with Image.open(io.BytesIO(z.read("film_00_heatmap.png"))) as im:
                    assert im.format == "PNG" and min(im.size) > 32

            page.set_viewport_size({"width": WIDTHS["phone"], "height": 844})
            no_sideways_scroll(page)
            shots(page, "page-phone")
        finally:
            browser.close()
    assert not problems, problems


def test_batches_by_bytes_and_names_files_over_the_limit(sync_api, page_server):
    """Ten 40 KB films exceed the 256 KiB request limit together: several requests; a 90 KB file is over the
    64 KiB per-file limit: it is not sent, and its card says why."""
    files = [(f"big_{i}.png", png(i, size=200, noise=True)) for i in range(10)] + [("huge.png", png(5, 300, noise=True))]
    assert all(40_000 <= len(d) < 64 * 2**10 for _, d in files[:-1]) and len(files[-1][1]) > 64 * 2**10
    problems, posts = [], []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=LAUNCH_ARGS)
        try:
            page = open_page(browser, page_server, WIDTHS["desktop"], problems)
            page.on("response", lambda r: posts.append(r.status) if "/api/predict" in r.url else None)
            drop(page, files)
            page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('Done')")
            assert page.inner_text("#status") == "Done: 11 result(s), 1 not analysed."
            assert len(posts) >= 2 and set(posts) == {200}, posts
            failed = page.locator(".result.failed")
            assert failed.count() == 1
            assert "huge.png is larger than the limit of 64 KiB per file" in failed.inner_text()
            assert page.locator(".result .score").count() == 10
        finally:
            browser.close()
    assert not problems, problems


def test_docs_page_works_offline_in_the_browser(sync_api, page_server):
    problems = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=LAUNCH_ARGS)
        try:
            page = open_page(browser, page_server, WIDTHS["desktop"], problems)
            # the model card says whether the WHO target is met and warns of a small test set, as the CLI does
            assert page.locator("#model-card-fields .who-met").count() == 1
            assert "only 1 test image" in page.inner_text("#model-card-fields .sample-warning")
            page.click("footer a[href='/docs']")
            page.wait_for_selector("h1")
            text = page.inner_text("body")
            for endpoint in ("POST /api/predict", "GET /api/model", "GET /api/limits", "GET /healthz"):
                assert endpoint in text, endpoint
        finally:
            browser.close()
    assert not problems, problems


# ----------------------------------------------------------------- the report
@pytest.fixture(scope="module")
def report_html(tmp_path_factory):
    """report.html of a real training run (tiny backbone) on synthetic films, some of them mislabelled so that
    the report has misclassified images."""
    import cxrlab
    from conftest import make_dataset, write_tiny_backbone

    tmp = tmp_path_factory.mktemp("report-run")
    root = make_dataset(tmp / "lungs", n_per_class=30, size=256)
    for i in range(0, 30, 5):  # a fifth of each class filed under the other label
        (root / "abnormal" / f"img_{i:03d}.png").rename(root / "normal" / f"relabelled_abnormal_{i:03d}.png")
        (root / "normal" / f"img_{i + 1:03d}.png").rename(root / "abnormal" / f"relabelled_normal_{i + 1:03d}.png")
    backbone = f"onnx:{write_tiny_backbone(tmp / 'tiny.onnx')}"
    result = cxrlab.train(root, output=tmp / "model", backbone=backbone, validation_percentage=25,
                          testing_percentage=40, ood=False)
    return result.run_dir / "report.html"


def test_report_in_chromium(sync_api, report_html, shots):
    metrics = json.loads((report_html.parent / "metrics.json").read_text())["test"]
    assert metrics["fp"] + metrics["fn"] > 0
    problems = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=LAUNCH_ARGS)
        try:
            for kind, width in WIDTHS.items():
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.goto(report_html.as_uri())
                reliability = page.locator("img.plot[alt^='Reliability diagram']")
                alt = reliability.get_attribute("alt")
                assert f"ECE {metrics['ece']:.3f} after calibration, {metrics['ece_uncalibrated']:.3f} before" in alt
                assert "images per bin" in alt
                assert "Every map below shares one colour scale" in page.inner_text("body")
                no_sideways_scroll(page)
                for img in page.locator("img").all():  # every image decoded and inside the page
                    box = img.bounding_box()
                    assert img.evaluate("i => i.complete && i.naturalWidth > 0")
                    assert box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5, box
                shots(page, f"report-{kind}")

                # a misclassified film: its name readable (whole, wrapped inside its figure) and enlarged on click
                fig = page.locator(".thumbs figure.zoomable").first
                name = fig.locator(".name").inner_text()
                assert name.endswith(".png") and "/" in name
                assert fig.locator(".name").evaluate("n => n.scrollWidth <= n.clientWidth")
                small = fig.locator("img").bounding_box()
                fig.locator("img").click()
                big = fig.locator("img").bounding_box()
                assert big["width"] > 2 * small["width"] and big["width"] <= width, (small, big)
                shots(page, f"report-{kind}-enlarged", full_page=False)
                page.mouse.click(5, 5)  # beside it: back to the thumbnail
                assert fig.locator("img").bounding_box()["width"] == pytest.approx(small["width"], abs=1)
                page.close()
        finally:
            browser.close()
    assert not problems, problems
