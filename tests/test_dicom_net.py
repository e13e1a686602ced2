"""`cxrlab dicom-listen` against a real PACS: Debian's Orthanc with a temporary configuration.

Films go up to Orthanc over its REST API, Orthanc C-STOREs them to the listener (a `cxrlab dicom-listen`
process), and what comes back is read through Orthanc's REST API. The model is test_serve's tiny hand-written
graph with the real chest check (Shenzhen films), or its colour and blank rules only (synthetic films, when
the shared data are missing).
"""

from __future__ import annotations

import io
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pynetdicom = pytest.importorskip("pynetdicom", reason="pynetdicom is not installed (pip install pynetdicom)")
pydicom = pytest.importorskip("pydicom")

from conftest import SHENZHEN, synthetic_xray  # noqa: E402
from orthanc_server import ORTHANC, Listener, Orthanc, echo, film_dataset, free_port, to_bytes  # noqa: E402
from test_serve import SIZE, tiny_onnx  # noqa: E402

from cxrlab import chest  # noqa: E402
from cxrlab.audit import sha256  # noqa: E402
from cxrlab.dicom_results import COMPREHENSIVE_SR, SECONDARY_CAPTURE, answer_line, secondary_capture  # noqa: E402
from cxrlab.explain import prediction_overlay_png  # noqa: E402
from cxrlab.modeldir import save_model  # noqa: E402
from cxrlab.predict import Model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
needs_orthanc = pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc; "
                                                             ".ci/run installs it)")
HAVE_SHENZHEN = (SHENZHEN / "abnormal").is_dir()


def _films(n: int) -> list[np.ndarray]:
    """n gray 8-bit films: Shenzhen's (both classes) when present, else synthetic chest-like pictures."""
    if not HAVE_SHENZHEN:
        return [synthetic_xray(i, i % 2 == 0, size=256) for i in range(n)]
    from PIL import Image

    paths = sorted((SHENZHEN / "abnormal").glob("*"))[: (n + 1) // 2] + sorted((SHENZHEN / "normal").glob("*"))[: n // 2]
    return [np.asarray(Image.open(p).convert("L")) for p in paths]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    info = {"created_by": "test", "backbone": {"input_size": SIZE, "id": "test-tiny"}, "positive_label": "abnormal",
            "operating_point": {"rule": "who", "threshold": 0.5, "sensitivity": 0.9, "specificity": 0.7,
                                "reachable": True, "note": ""},
            "chest_check": chest.info(network=HAVE_SHENZHEN)}
    return save_model(tmp_path_factory.mktemp("tiny") / "model", onnx_bytes=tiny_onnx(), labels=["abnormal", "normal"],
                      info=info)


@pytest.fixture(scope="module")
def node(model_dir, tmp_path_factory):
    """(Orthanc, the listener) for the module: cxrlab registered in Orthanc as modality 'cxrlab'."""
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc; .ci/run installs it)")
    folder = tmp_path_factory.mktemp("pacs")
    port = free_port()
    with Orthanc(folder / "orthanc", port) as pacs, Listener(model_dir, port, pacs.dicom_port, folder) as listener:
        yield pacs, listener
    assert listener.proc.returncode == 0, listener.text()[-2000:]  # a clean stop on SIGTERM


def _content(pacs, sr: dict) -> dict:
    """An SR's content items by concept meaning: the text, the number, or the referenced SOP instance. Read from
    the file Orthanc stores (its JSON view leaves out long texts)."""
    ds = pydicom.dcmread(io.BytesIO(pacs.get(f"/instances/{_orthanc_id(pacs, sr)}/file")))
    out = {}
    for item in ds.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "NUM":
            out[name] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "IMAGE":
            out[name] = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        else:
            out[name] = item.TextValue
    return out


def _dataset_sha256(ds) -> str:
    """SHA-256 of the dataset without its file meta, as the listener hashes what it receives."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return sha256(buf.getvalue())


def _audit_rows_of(listener, films, timeout: float = 30) -> list:
    """The audit rows, once one names each of ``films``: the listener writes a film's row after it has sent the
    results back (the row records whether they were delivered), so it may trail their arrival in the PACS."""
    wanted = {_dataset_sha256(ds) for ds in films}
    deadline = time.monotonic() + timeout
    rows = listener.audit_rows()
    while not wanted <= {r["input_sha256"] for r in rows} and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = listener.audit_rows()
    return rows


def _results(pacs, ds, n: int = 3, timeout: float = 60) -> dict:
    found = pacs.wait_for_instances(ds.StudyInstanceUID, n, timeout=timeout)
    return {f["SOPClassUID"]: f for f in found if f["SOPInstanceUID"] != ds.SOPInstanceUID}


# ------------------------------------------------------------------ through Orthanc
@needs_orthanc
def test_orthanc_echoes_the_listener(node):
    pacs, listener = node
    assert pacs.request("POST", "/modalities/cxrlab/echo", {}) is not None  # Orthanc raises on a failed echo
    assert echo(listener.port) == 0


@needs_orthanc
def test_a_film_is_answered_into_its_study(node, model_dir):
    pacs, listener = node
    film = _films(1)[0]
    ds = film_dataset(film)
    data = to_bytes(ds)
    source_id = pacs.upload(data)["ID"]
    job = pacs.send_to_cxrlab(source_id)
    assert job["FailedInstancesCount"] == 0 and job["RemoteAet"] == "CXRLAB"
    results = _results(pacs, ds)
    assert set(results) == {SECONDARY_CAPTURE, COMPREHENSIVE_SR}, results.keys()
    sc, sr = results[SECONDARY_CAPTURE], results[COMPREHENSIVE_SR]

    # the same answer as the library gives on the same bytes
    model = Model(model_dir, threads=1)
    expected = model.predict_bytes(data, "film")
    line = answer_line(model, expected)
    assert expected.ood is False and expected.label in ("abnormal", "normal")
    assert f"TB-suggestive: {'yes' if expected.label == 'abnormal' else 'no'}" in line

    for result in (sc, sr):  # in the film's study, a series of its own, the patient copied
        assert result["StudyInstanceUID"] == ds.StudyInstanceUID
        assert result["SeriesInstanceUID"] != ds.SeriesInstanceUID
        assert result["PatientID"] == "P0001" and result["PatientName"] == "Test^Patient"
        assert result["ReferencedImageSequence"][0]["ReferencedSOPInstanceUID"] == ds.SOPInstanceUID
    assert sc["SeriesInstanceUID"] != sr["SeriesInstanceUID"]
    assert sc["SourceImageSequence"][0]["ReferencedSOPInstanceUID"] == ds.SOPInstanceUID
    assert sc["BurnedInAnnotation"] == "YES" and sc["Modality"] == "OT" and sr["Modality"] == "SR"
    evidence = sr["CurrentRequestedProcedureEvidenceSequence"][0]
    assert evidence["StudyInstanceUID"] == ds.StudyInstanceUID
    assert evidence["ReferencedSeriesSequence"][0]["ReferencedSOPSequence"][0]["ReferencedSOPInstanceUID"] == \
        ds.SOPInstanceUID

    content = _content(pacs, sr)
    assert content["Finding"] == line.split(" — ", 2)[-1]
    assert content["TB-suggestive score"] == pytest.approx(expected.positive_score, abs=1e-5)
    assert content["Operating point threshold"] == 0.5
    assert content["Model decision"] == expected.label
    assert content["Model identifier"] == f"sha256:{model.sha256}" == f"sha256:{model.info['info_sha256']}"
    assert content["Frontal chest film check"].startswith("accepted")
    assert content["Intended use"] == "research use, not a medical device"
    assert content["Source of Measurement"] == ds.SOPInstanceUID

    # the Secondary Capture's pixels: the overlay of this answer with this line burned in, exactly
    sc_ds = pydicom.dcmread(io.BytesIO(pacs.get(f"/instances/{_orthanc_id(pacs, sc)}/file")))
    from cxrlab.embed import prepare

    array, img = prepare(data, model.input_size, "film")
    want = secondary_capture(ds, prediction_overlay_png(model, array, img.pixels, expected, max_side=1024), line)
    assert (sc_ds.Rows, sc_ds.Columns, sc_ds.SamplesPerPixel) == (want.Rows, want.Columns, 3)
    assert np.array_equal(sc_ds.pixel_array, want.pixel_array)

    # the audit row: the dataset's hash, the answer, no patient data
    every = _audit_rows_of(listener, [ds])
    rows = [r for r in every if r["input_sha256"] == _dataset_sha256(ds)]
    assert len(rows) == 1, [dict(r) for r in every]
    row = rows[0]
    assert (row["surface"], row["decision"], row["model"]) == ("dicom", expected.label, model.sha256)
    assert row["source"].startswith("ORTHANC@127.0.0.1")
    assert row["score"] == pytest.approx(expected.positive_score, abs=1e-6) and row["threshold"] == 0.5
    assert row["positive"] == (expected.label == "abnormal") and row["latency_ms"] > 0
    assert b"Test^Patient" not in listener.audit.read_bytes()


def _orthanc_id(pacs, tags: dict) -> str:
    (found,) = pacs.request("POST", "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": tags["SOPInstanceUID"]}})
    return found


@needs_orthanc
@pytest.mark.parametrize("kind", ["CT", "lateral"])
def test_other_modalities_and_laterals_are_ignored_and_logged(node, kind):
    pacs, listener = node
    film = _films(1)[0]
    ds = film_dataset(film, modality="CT", view=None) if kind == "CT" else film_dataset(film, view="LL")
    job = pacs.send_to_cxrlab(pacs.upload(to_bytes(ds))["ID"])
    assert job["FailedInstancesCount"] == 0  # acknowledged
    reason = "modality CT" if kind == "CT" else "view position LL"
    deadline = time.monotonic() + 20
    while f"ignored {ds.SOPInstanceUID}" not in listener.text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert re.search(rf"ignored {re.escape(ds.SOPInstanceUID)} from ORTHANC@127\.0\.0\.1: {reason}", listener.text())
    time.sleep(1.0)  # nothing comes back into the study
    assert len(pacs.study_instances(ds.StudyInstanceUID)) == 1
    (row,) = [r for r in listener.audit_rows() if r["input_sha256"] == _dataset_sha256(ds)]
    assert row["decision"] == "ignored" and reason in row["reason"] and row["score"] is None


@needs_orthanc
def test_truncated_datasets_do_not_stop_the_listener(node, tmp_path, monkeypatch):
    from pynetdicom import AE, _config

    pacs, listener = node
    film = _films(1)[0]
    # 1. the pixel data cut short (the header intact), through Orthanc: answered "not assessed" with an SR
    cut = film_dataset(film)
    cut.PixelData = cut.PixelData[: len(cut.PixelData) // 3]
    job = pacs.send_to_cxrlab(pacs.upload(to_bytes(cut))["ID"])
    assert job["FailedInstancesCount"] == 0
    results = _results(pacs, cut, n=2)
    assert set(results) == {COMPREHENSIVE_SR}
    assert _content(pacs, results[COMPREHENSIVE_SR])["Finding"].startswith("not assessed: the film could not be read")

    # 2. the encoded dataset cut in the middle of its header, sent as raw bytes: refused with C210
    whole = to_bytes(film_dataset(film))
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(whole[:420])
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as they are
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="CXRLAB")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(broken)
    finally:
        assoc.release()
    assert status.Status == 0xC210
    assert "cannot parse it" in listener.text()
    assert listener.running()

    # 3. the next film is answered as usual
    ds = film_dataset(film)
    pacs.send_to_cxrlab(pacs.upload(to_bytes(ds))["ID"])
    assert set(_results(pacs, ds)) == {SECONDARY_CAPTURE, COMPREHENSIVE_SR}


@needs_orthanc
def test_twenty_films_sent_in_parallel_all_come_back(node):
    pacs, listener = node
    films = [film_dataset(f) for f in _films(20)]
    ids = [pacs.upload(to_bytes(ds))["ID"] for ds in films]
    with ThreadPoolExecutor(20) as pool:  # 20 store jobs at once: Orthanc opens parallel associations
        jobs = list(pool.map(lambda i: pacs.send_to_cxrlab(i, timeout=120), ids))
    assert all(j["FailedInstancesCount"] == 0 for j in jobs)
    deadline = time.monotonic() + 120
    for ds in films:
        left = max(1.0, deadline - time.monotonic())
        assert set(_results(pacs, ds, timeout=left)) == {SECONDARY_CAPTURE, COMPREHENSIVE_SR}, ds.StudyInstanceUID
    hashes = {r["input_sha256"] for r in _audit_rows_of(listener, films)}
    assert all(_dataset_sha256(ds) in hashes for ds in films)


@needs_orthanc
def test_the_readme_orthanc_lua_routes_films_to_cxrlab(model_dir, tmp_path):
    """The README's Orthanc set-up, verbatim: a film uploaded to Orthanc is answered without anyone sending it."""
    lua = re.search(r"```lua\n(.*?)```", README.read_text(), re.S).group(1)
    port = free_port()
    with Orthanc(tmp_path / "orthanc", port, lua=lua) as pacs, Listener(model_dir, port, pacs.dicom_port, tmp_path):
        ds = film_dataset(_films(1)[0], modality="CR")
        pacs.upload(to_bytes(ds))
        results = _results(pacs, ds, timeout=60)
        assert set(results) == {SECONDARY_CAPTURE, COMPREHENSIVE_SR}
        time.sleep(1.0)  # the results themselves are not routed back to cxrlab: nothing more arrives
        assert len(pacs.study_instances(ds.StudyInstanceUID)) == 3


# ------------------------------------------------------------------ without a PACS
def test_send_to_and_ae_title_are_checked(model_dir, capsys):
    from cxrlab.cli import main

    for bad in ("ORTHANC127.0.0.1:4242", "ORTHANC@127.0.0.1", "ORTHANC@127.0.0.1:0", "A\\B@h:1",
                "SEVENTEEN_CHARS_X@h:1"):
        assert main(["dicom-listen", "--model", str(model_dir), "--send-to", bad]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: --send-to") and err.count("\n") == 1, err
    assert main(["dicom-listen", "--model", str(model_dir), "--send-to", "O@h:1", "--ae-title", "X" * 17]) == 1
    assert capsys.readouterr().err.startswith("error: --ae-title")


def test_results_of_a_refused_film(model_dir):
    from cxrlab.dicom_results import structured_report
    from cxrlab.predict import Prediction

    model = Model(model_dir, threads=1)
    ds = film_dataset(np.full((64, 64), 128, np.uint8))
    (pred,) = model.predict(np.full((64, 64), 0.5, np.float32))  # a blank picture: refused by the chest check
    assert pred.ood
    line = answer_line(model, pred)
    assert line.endswith("not assessed: a blank or nearly uniform picture") and "research use" in line
    sr = pydicom.dcmread(io.BytesIO(to_bytes(structured_report(ds, model, pred, line))))
    content = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
    assert content["Frontal chest film check"].TextValue.startswith("refused: a blank")
    assert "TB-suggestive score" not in content and "Model decision" not in content
    assert sr.StudyInstanceUID == ds.StudyInstanceUID and sr.SpecificCharacterSet == "ISO_IR 192"
    error = Prediction("x", threshold=0.5, error="corrupt DICOM pixel data")
    assert answer_line(model, error).endswith("not assessed: the film could not be read (corrupt DICOM pixel data)")
    no_threshold = Prediction("x", {"abnormal": 0.8, "normal": 0.2}, "abnormal")  # a model without operating point
    assert answer_line(model, no_threshold).endswith("— decision: abnormal (score 0.800)")


def test_a_pacs_that_is_down_costs_no_answer_and_no_listener(model_dir, tmp_path):
    """The results cannot be delivered: the film is still acknowledged and answered, the failure logged and
    audited, and the listener keeps receiving (in this process: no PACS needed)."""
    from pynetdicom import AE

    from cxrlab.audit import open_audit
    from cxrlab.dicom_net import Destination, Listener as InProcess

    audit = open_audit(tmp_path / "audit.db")
    listener = InProcess(Model(model_dir, threads=1), ae_title="CXRLAB", port=free_port(),
                         send_to=Destination("NOBODY", "127.0.0.1", free_port()), audit=audit, workers=1)
    listener.start()
    try:
        films = [film_dataset(f) for f in _films(2)]
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="CXRLAB")
        assert assoc.is_established
        try:
            assert [assoc.send_c_store(ds).Status for ds in films] == [0, 0]
        finally:
            assoc.release()
    finally:
        listener.stop()  # waits for the queued films
    rows = sqlite3.connect(audit.path).execute("SELECT source, decision, reason FROM answers").fetchall()
    audit.close()
    assert len(rows) == 2
    assert all(src == "MODALITY@127.0.0.1" and dec in ("abnormal", "normal") and reason.startswith("not delivered")
               for src, dec, reason in rows), rows


def test_a_port_in_use_is_one_error_line(model_dir, capsys):
    import socket

    from cxrlab.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dicom-listen", "--model", str(model_dir), "--port", str(port), "--send-to", "PACS@127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: dicom-listen: cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1, err
