"""A real Orthanc PACS (Debian's `orthanc` package) with a temporary configuration, `cxrlab dicom-listen` in a
process of its own, and DICOM films to send them.

Used by tests/test_dicom_net.py and benchmarks/dicom.py. Both of Orthanc's ports are free ones picked on
127.0.0.1; its HTTP server answers loopback clients only (RemoteAccessAllowed false), while its DICOM port
listens on every interface for the test's few seconds (Orthanc 1.10 has no option to bind it to one address).
Its database lives in the temporary folder and goes with it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ORTHANC = shutil.which("Orthanc") or (Path("/usr/sbin/Orthanc") if Path("/usr/sbin/Orthanc").exists() else None)
ORTHANC_AET = "ORTHANC"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """``with Orthanc(folder, cxrlab_port) as pacs:`` starts Orthanc with cxrlab registered as modality 'cxrlab'."""

    def __init__(self, folder: Path, cxrlab_port: int, *, cxrlab_aet: str = "CXRLAB", lua: str | None = None,
                 concurrent_jobs: int = 8):
        self.folder = Path(folder)
        self.dicom_port, self.http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "cxrlab-test", "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomAet": ORTHANC_AET, "DicomPort": self.dicom_port, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
            "DicomModalities": {"cxrlab": [cxrlab_aet, "127.0.0.1", cxrlab_port]},
            "ConcurrentJobs": concurrent_jobs, "DicomThreadsCount": 8, "DicomScuTimeout": 30,
            "Plugins": [], "SaveJobs": False, "StorageCompression": False,
        }
        if lua:
            (self.folder / "route.lua").write_text(lua)
            config["LuaScripts"] = [str(self.folder / "route.lua")]
        (self.folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log_path = self.folder / "orthanc.log"
        self.proc = None

    def __enter__(self):
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(ORTHANC), str(self.folder / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/system")
                return self
            except (OSError, urllib.error.URLError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"Orthanc did not start; its log: {self.log_path.read_text()[-2000:]}")
                time.sleep(0.1)

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()

    # -- REST
    def request(self, method: str, path: str, body: bytes | dict | list | None = None, timeout: float = 60):
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw[:1] in (b"{", b"[") else raw

    def get(self, path: str, timeout: float = 10):
        return self.request("GET", path, timeout=timeout)

    def upload(self, dicom: bytes) -> dict:
        return self.request("POST", "/instances", dicom)

    def send_to_cxrlab(self, instance_id: str, timeout: float = 60) -> dict:
        """Orthanc C-STOREs the instance to cxrlab (synchronously: answers when the store is acknowledged)."""
        return self.request("POST", "/modalities/cxrlab/store", {"Resources": [instance_id], "Synchronous": True},
                            timeout=timeout)

    def study_instances(self, study_uid: str) -> list[dict]:
        """Every instance of the study, with its simplified tags."""
        found = self.request("POST", "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})
        return [self.get(f"/instances/{i}/tags?simplify") for i in found]

    def wait_for_instances(self, study_uid: str, n: int, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.study_instances(study_uid)
            if len(found) >= n or time.monotonic() > deadline:
                return found
            time.sleep(0.2)


class Listener:
    """`cxrlab dicom-listen` in its own process, its log in a file."""

    def __init__(self, model_dir: Path, port: int, pacs_port: int, folder: Path, workers: int = 2):
        self.port, self.log_path, self.audit = port, folder / "listen.log", folder / "audit.db"
        self.cmd = [sys.executable, "-m", "cxrlab", "dicom-listen", "--model", str(model_dir), "--port", str(port),
                    "--ae-title", "CXRLAB", "--send-to", f"{ORTHANC_AET}@127.0.0.1:{pacs_port}", "--audit",
                    str(self.audit), "--workers", str(workers)]

    def __enter__(self):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while echo(self.port) != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"dicom-listen did not start: {self.text()[-2000:]}")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    def audit_rows(self) -> list[sqlite3.Row]:
        con = sqlite3.connect(self.audit)
        con.row_factory = sqlite3.Row
        try:
            return con.execute("SELECT * FROM answers ORDER BY id").fetchall()
        finally:
            con.close()


def echo(port: int, timeout: float = 5) -> int | None:
    """C-ECHO status from the listener, None when nothing answers."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRLAB")
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return getattr(status, "Status", None)
    finally:
        assoc.release()


def film_dataset(pixels: np.ndarray, *, modality: str = "DX", view: str | None = "PA", patient: str = "Test^Patient"):
    """A DICOM film (pydicom Dataset) of 8-bit gray pixels: its own study, series and instance."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = {"DX": "1.2.840.10008.5.1.4.1.1.1.1", "CR": "1.2.840.10008.5.1.4.1.1.1",
                 "CT": "1.2.840.10008.5.1.4.1.1.2"}[modality]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient, "P0001", "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    if view:
        ds.ViewPosition = view
    if modality != "CT":
        ds.BodyPartExamined = "CHEST"
    if modality == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
    if modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, np.uint8).tobytes()
    return ds


def to_bytes(ds) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
