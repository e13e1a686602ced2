"""The web server against a tiny hand-written ONNX model (no torch, no trained weights)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
onnx = pytest.importorskip("onnx")
from fastapi.testclient import TestClient  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from cxrlab import serve as serve_mod  # noqa: E402
from cxrlab.modeldir import save_model  # noqa: E402
from cxrlab.predict import Model, Prediction  # noqa: E402
from cxrlab.serve_limits import ServeLimits  # noqa: E402

SIZE = 32


def tiny_onnx() -> bytes:
    """probabilities = softmax([k(m - .5), -k(m - .5)]) where m is the image mean: bright -> abnormal."""
    f = TensorProto.FLOAT
    c = lambda name, v: helper.make_tensor(name, f, [], [v])  # noqa: E731
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["m4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["m4"], ["m"], axis=1),
        helper.make_node("Sub", ["m", "half"], ["centered"]),
        helper.make_node("Mul", ["centered", "k"], ["pos"]),
        helper.make_node("Neg", ["pos"], ["neg"]),
        helper.make_node("Concat", ["pos", "neg"], ["logits"], axis=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("AveragePool", ["image"], ["p16"], kernel_shape=[16, 16], strides=[16, 16]),
        helper.make_node("Flatten", ["p16"], ["embedding"], axis=1),
        helper.make_node("AveragePool", ["image"], ["p8"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Neg", ["p8"], ["p8neg"]),
        helper.make_node("Concat", ["p8", "p8neg"], ["class_maps"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", f, ["N", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("probabilities", f, ["N", 2]),
         helper.make_tensor_value_info("logits", f, ["N", 2]),
         helper.make_tensor_value_info("embedding", f, ["N", 4]),
         helper.make_tensor_value_info("class_maps", f, ["N", 2, 4, 4])],
        initializer=[c("half", 0.5), c("k", 8.0)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "model"
    info = {
        "created_by": "test", "backbone": {"input_size": SIZE, "id": "test-tiny"}, "positive_label": "abnormal",
        "operating_point": {"rule": "who", "threshold": 0.5, "sensitivity": 0.9, "specificity": 0.7,
                            "reachable": True, "note": ""},
        "calibration": {"method": "temperature", "temperature": 1.5},
        "training_data": {"image_dir_name": "tiny", "counts": {"abnormal": 3, "normal": 4}},
        "metrics": {"n": {"train": 5, "validation": 1, "test": 1},
                    "test": {"auc": 0.9, "auc_ci": [0.8, float("nan")], "sensitivity": 0.95,
                             "sensitivity_ci": [0.9, 0.99], "specificity": 0.75, "specificity_ci": [0.7, 0.8],
                             "who_verdict": "meets the WHO target", "who_status": "met", "tp": 7,
                             "sample_warning": "only 1 test image: its figures are anecdotes"}},
    }
    return save_model(d, onnx_bytes=tiny_onnx(), labels=["abnormal", "normal"], info=info)


@pytest.fixture(scope="module")
def model(model_dir):
    return Model(model_dir, threads=1)


@pytest.fixture(scope="module")
def client(model):
    return TestClient(serve_mod.create_app(model))


def image_bytes(fmt: str, value: int = 200, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, fmt)
    return buf.getvalue()


def dicom_bytes(tmp_path, value: int = 50000) -> bytes:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "OT", "Test^Tiny"
    arr = np.full((40, 40), value, np.uint16)
    arr[:20] = 1000  # not constant, so min-max scaling keeps structure
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = arr.tobytes()
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).pixel_array.shape == (40, 40)
    return path.read_bytes()


def post(client, *files):
    return client.post("/api/predict", files=[("files", f) for f in files])


def check_result(r, name):
    assert r["filename"] == name and r["error"] is None
    assert set(r["scores"]) == {"abnormal", "normal"}
    assert abs(sum(r["scores"].values()) - 1) < 1e-5
    assert r["positive_label"] == "abnormal" and r["threshold"] == 0.5
    assert r["positive_score"] == pytest.approx(r["scores"]["abnormal"])
    assert r["label"] == ("abnormal" if r["positive_score"] >= 0.5 else "normal")
    assert r["verdict"].endswith("-> " + r["label"]) and "threshold 0.5" in r["verdict"]
    assert r["ood"] is None and "heatmap_png" in r


def test_jpeg_png_dicom(client, tmp_path):
    bright = post(client, ("a.jpg", image_bytes("JPEG", 230), "image/jpeg"))
    assert bright.status_code == 200, bright.text
    (r,) = bright.json()["results"]
    check_result(r, "a.jpg")
    assert r["label"] == "abnormal" and r["verdict"].startswith("above threshold")

    dark = post(client, ("b.png", image_bytes("PNG", 20), "image/png")).json()["results"][0]
    check_result(dark, "b.png")
    assert dark["label"] == "normal" and dark["verdict"].startswith("below threshold")

    dcm = post(client, ("c.dcm", dicom_bytes(tmp_path), "application/dicom"))
    assert dcm.status_code == 200, dcm.text
    check_result(dcm.json()["results"][0], "c.dcm")


def test_type_is_sniffed_not_named(client):
    # a PNG called .jpg works; text called .png is refused with 415
    ok = post(client, ("really-png.jpg", image_bytes("PNG"), "image/jpeg"))
    assert ok.status_code == 200
    bad = post(client, ("x.png", b"hello, this is text and not an image at all\n" * 4, "image/png"))
    assert bad.status_code == 415
    assert bad.json()["detail"].startswith("x.png: not a supported image (JPEG, PNG, DICOM")


def test_corrupt_jpeg_is_422(client):
    data = image_bytes("JPEG", 128, (200, 200))
    r = post(client, ("broken.jpg", data[: len(data) // 3] + b"\x00" * 20, "image/jpeg"))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("broken.jpg: ") and ("JPEG" in detail or "corrupt" in detail), detail


def test_empty_and_missing(client):
    assert post(client, ("e.png", b"", "image/png")).status_code == 422
    assert client.post("/api/predict").status_code == 422  # no files field


def test_oversized_upload_is_413(model):
    c = TestClient(serve_mod.create_app(model, limits=ServeLimits(max_upload_bytes=2000)))
    big = image_bytes("PNG", 0, (300, 300)) + b"\x00" * 5000  # PNG ignores trailing bytes
    r = post(c, ("big.png", big, "image/png"))
    assert r.status_code == 413
    assert r.json()["detail"] == "big.png is larger than the limit of 2,000 bytes"
    # the same file among good ones becomes a per-file error
    r = post(c, ("big.png", big, "image/png"), ("small.png", image_bytes("PNG", size=(8, 8)), "image/png"))
    assert r.status_code == 200
    first, second = r.json()["results"]
    assert "larger than the limit" in first["error"] and first["label"] is None
    assert second["error"] is None and second["label"] in ("abnormal", "normal")


def test_whole_body_limit(model):
    assert serve_mod._mib(32 * 2**20) == "32 MiB"
    c = TestClient(serve_mod.create_app(model, limits=ServeLimits(max_upload_bytes=1000, max_files=2)))
    r = post(c, ("a.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 4_000_000, "image/png"))
    assert r.status_code == 413 and "request body" in r.json()["detail"]

    def chunked():  # no Content-Length: counted while it arrives
        yield b'--xx\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n\x89PNG\r\n\x1a\n'
        for _ in range(40):
            yield b"\x00" * 100_000
        yield b"\r\n--xx--\r\n"

    r = c.post("/api/predict", content=chunked(), headers={"content-type": "multipart/form-data; boundary=xx"})
    assert r.status_code == 413 and "request body" in r.json()["detail"]


def test_too_many_files_is_413(model):
    c = TestClient(serve_mod.create_app(model, limits=ServeLimits(max_files=3)))
    png = image_bytes("PNG", size=(8, 8))
    r = post(c, *[(f"{i}.png", png, "image/png") for i in range(4)])
    assert r.status_code == 413 and "limit is 3" in r.json()["detail"]


def test_max_pixels_is_passed_to_decode(model):
    c = TestClient(serve_mod.create_app(model, limits=ServeLimits(max_pixels=1000)))
    r = post(c, ("wide.png", image_bytes("PNG", size=(100, 100)), "image/png"))
    assert r.status_code == 422 and "more than the limit of 1,000" in r.json()["detail"]


def test_many_files_and_mixed_errors(client):
    files = [(f"img{i}.png", image_bytes("PNG", 25 * i), "image/png") for i in range(10)]
    r = post(client, *files)
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [f"img{i}.png" for i in range(10)]
    assert all(x["error"] is None for x in results)
    assert results[0]["label"] == "normal" and results[9]["label"] == "abnormal"

    mixed = post(client, files[0], ("notes.png", b"plain text " * 20, "image/png"))
    assert mixed.status_code == 200
    assert "not a supported image" in mixed.json()["results"][1]["error"]

    all_bad = post(client, ("a.png", b"text " * 40, "text/plain"), ("b.png", b"more text " * 40, "text/plain"))
    assert all_bad.status_code == 415
    assert "a.png" in all_bad.json()["detail"] and "b.png" in all_bad.json()["detail"]


def test_client_path_is_not_used(client):
    r = post(client, ("../../etc/passwd.png", image_bytes("PNG"), "image/png"))
    assert r.status_code == 200 and r.json()["results"][0]["filename"] == "passwd.png"


def maps_hw(model) -> tuple[int, int]:
    x = np.zeros((1, model.input_size, model.input_size), np.float32)
    return model.run(x, ["class_maps"])["class_maps"].shape[2:]


def test_heatmap_when_explain_is_available(model, monkeypatch):
    calls = []

    def fake(m, array, pixels, pred, maps=None):
        calls.append((m, pred.path, maps.shape))  # the class maps come from the prediction's own pass
        return b"\x89PNG fake"

    monkeypatch.setattr(serve_mod, "_load_heatmapper", lambda: fake)
    c = TestClient(serve_mod.create_app(model))
    r = post(c, ("a.png", image_bytes("PNG"), "image/png")).json()["results"][0]
    assert base64.b64decode(r["heatmap_png"]) == b"\x89PNG fake" and calls == [(model, "a.png", (len(model.labels), *maps_hw(model)))]

    def broken(m, array, pixels, pred, maps=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(serve_mod, "_load_heatmapper", lambda: broken)
    c = TestClient(serve_mod.create_app(model))
    r = post(c, ("a.png", image_bytes("PNG"), "image/png"))
    assert r.status_code == 200 and r.json()["results"][0]["heatmap_png"] is None


def test_heatmap_query_parameter(model, monkeypatch):
    calls = []

    def fake(m, array, pixels, pred, maps=None):
        calls.append(pred.path)
        return b"\x89PNG fake"

    monkeypatch.setattr(serve_mod, "_load_heatmapper", lambda: fake)
    c = TestClient(serve_mod.create_app(model))
    png = ("a.png", image_bytes("PNG"), "image/png")
    for query in ("?heatmap=0", "?heatmap=false"):
        r = c.post("/api/predict" + query, files=[("files", png)])
        assert r.status_code == 200, r.text
        check_result(r.json()["results"][0], "a.png")
        assert r.json()["results"][0]["heatmap_png"] is None
    assert calls == []
    for query in ("", "?heatmap=1"):  # on by default
        r = c.post("/api/predict" + query, files=[("files", png)]).json()["results"][0]
        assert base64.b64decode(r["heatmap_png"]) == b"\x89PNG fake"
    assert calls == ["a.png", "a.png"]
    assert c.post("/api/predict?heatmap=maybe", files=[("files", png)]).status_code == 422


def test_refused_and_shift_verdicts(model):
    # issue 16: a refused picture answers "unknown (not a chest X-ray: why)"; a film unlike the training
    # images is scored, with a warning
    pred = Prediction("x", {}, None, None, 0.5, True, 0.97, 0.5, "a colour picture (colourfulness 0.30)")
    assert serve_mod.verdict(model, pred) == "unknown (not a chest X-ray: a colour picture (colourfulness 0.30))"
    pred = Prediction("x", {"abnormal": 0.9, "normal": 0.1}, "abnormal", 0.9, 0.5, False, 0.02, 0.5, None,
                      True, 8.31, 3.1)
    assert serve_mod.verdict(model, pred) == "above threshold 0.5 -> abnormal"
    assert serve_mod.shift_warning(pred) == "warning: unlike the training images (shift score 8.3 > 3.1)"
    pred.shift = False
    assert serve_mod.shift_warning(pred) is None


def test_model_card(client):
    r = client.get("/api/model")
    assert r.status_code == 200
    m = r.json()
    assert m["labels"] == ["abnormal", "normal"] and m["positive_label"] == "abnormal"
    assert m["backbone"]["id"] == "test-tiny" and m["input_size"] == SIZE
    assert m["operating_point"]["threshold"] == 0.5 and m["operating_point"]["rule"] == "who"
    assert m["metrics"]["test"]["auc"] == 0.9 and m["metrics"]["test"]["auc_ci"] == [0.8, None]  # NaN -> null
    assert "tp" not in m["metrics"]["test"] and m["metrics"]["test"]["who_verdict"]
    assert m["metrics"]["test"]["who_status"] == "met"  # the web card shows both, and the small-sample warning
    assert m["metrics"]["test"]["sample_warning"].startswith("only 1 test image")
    assert m["training_data"]["counts"] == {"abnormal": 3, "normal": 4}
    assert m["calibration"]["method"] == "temperature" and m["created_by"] == "test"
    assert "decision support" in m["intended_use"] and m["disclaimer"] == "This is not a medical device."


def test_health_page_static_docs(client, model_dir):
    assert client.get("/healthz").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="dropzone"' in page.text and 'type="file"' in page.text and "multiple" in page.text
    assert "not a medical device" in page.text.lower()
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/../serve.py").status_code == 404
    assert client.get("/docs").status_code == 200
    assert "/api/predict" in client.get("/openapi.json").json()["paths"]
    # create_app also accepts a directory
    assert TestClient(serve_mod.create_app(model_dir)).get("/healthz").status_code == 200


def test_limits_endpoint_advertises_what_is_enforced(model):
    """The page batches a large drop by /api/limits: the numbers must be the ones the server enforces."""
    lim = ServeLimits(max_files=3, max_upload_bytes=2**20, max_request_bytes=3 * 2**20)
    client = TestClient(serve_mod.create_app(model, limits=lim))
    assert client.get("/api/limits").json() == {"max_files": 3, "max_upload_bytes": 2**20,
                                                "max_request_bytes": 3 * 2**20}
    assert "/api/limits" in client.get("/openapi.json").json()["paths"]
    png = ("a.png", image_bytes("PNG"), "image/png")
    assert post(client, *[png] * 3).status_code == 200
    assert post(client, *[png] * 4).status_code == 413  # one over max_files
