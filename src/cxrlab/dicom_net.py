"""DICOM network: a C-STORE receiver (pynetdicom) that answers each frontal chest film and sends the answer back.

A PACS sends films to ``cxrlab dicom-listen``; each CR/DX film that is not a lateral view is acknowledged at once,
queued, decoded by the DICOM path every other surface uses, answered by the model, and the answer goes back to
the PACS (``--send-to AE@HOST:PORT``) as a Secondary Capture and a Comprehensive SR in the film's own study
(cxrlab.dicom_results). Other modalities and lateral views are acknowledged and ignored, with the reason logged;
a dataset that cannot be parsed is refused with status C210 and the listener goes on. C-ECHO is answered.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .audit import IGNORED, AuditLog, sha256
from .errors import CxrlabError, ImageError

log = logging.getLogger("cxrlab.dicom")

ACCEPTED_MODALITIES = ("CR", "DX")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "RLO", "LLO")  # ViewPosition values that are not frontal
OVERLAY_SIDE = 1024  # the Secondary Capture's longer side at most, in pixels
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC210
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash, 1-16 characters


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def check_ae_title(text: str, what: str = "AE title") -> str:
    if not _AE_TITLE.match(text) or not text.strip():
        raise CxrlabError(f"{what} {text!r}: 1 to 16 printable characters, no backslash")
    return text


def parse_destination(text: str) -> Destination:
    """``AE@HOST:PORT``, e.g. ``ORTHANC@127.0.0.1:4242``."""
    ae, at, rest = text.rpartition("@")
    host, colon, port = rest.rpartition(":")
    if not at or not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise CxrlabError(f"--send-to {text!r}: expected AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
    return Destination(check_ae_title(ae, "--send-to AE title"), host.strip("[]"), int(port))


def ignore_reason(header) -> str | None:
    """Why a dataset is not a film to answer (another modality, a lateral view), or None."""
    modality = str(header.get("Modality", "") or "").strip().upper()
    if modality not in ACCEPTED_MODALITIES:
        return f"modality {modality or 'missing'}: cxrlab reads CR/DX chest films only"
    view = str(header.get("ViewPosition", "") or "").strip().upper()
    if view in LATERAL_VIEWS:
        return f"view position {view}: a lateral view; the model reads frontal films only"
    return None


def _read_header(data: bytes):
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        for key in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not str(header.get(key, "") or ""):
                raise ValueError(f"no {key}")
        ignore_reason(header)  # touch the elements read later, so that a corrupt one fails here
    return header


class Sender:
    """C-STORE SCU to the PACS: one association per answer, holding its Secondary Capture and SR."""

    def __init__(self, destination: Destination, ae_title: str, timeout_s: float = 30.0):
        from pynetdicom import AE

        from .dicom_results import COMPREHENSIVE_SR, SECONDARY_CAPTURE

        self.destination = destination
        self.ae = AE(ae_title=ae_title)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout_s
        for sop_class in (SECONDARY_CAPTURE, COMPREHENSIVE_SR):
            self.ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])

    def send(self, datasets) -> None:
        d = self.destination
        assoc = self.ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not assoc.is_established:
            raise CxrlabError(f"{d}: association refused or no answer")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None or code not in (0x0000, 0xB000, 0xB007, 0xB006):  # success, or stored with a warning
                    raise CxrlabError(f"{d}: C-STORE of {ds.SOPInstanceUID} answered "
                                      f"{'no status' if code is None else f'status 0x{code:04X}'}")
        finally:
            assoc.release()


class Listener:
    """The C-STORE SCP. ``start()`` returns at once; ``stop()`` stops receiving and finishes the queued films."""

    def __init__(self, model, *, ae_title: str, port: int, send_to: Destination, host: str = "127.0.0.1",
                 audit: AuditLog | None = None, workers: int | None = None, queue_size: int = 64):
        self.model, self.audit = model, audit
        self.ae_title, self.host, self.port = check_ae_title(ae_title), host, port
        self.sender = Sender(send_to, ae_title)
        self.pool = ThreadPoolExecutor(max_workers=workers or max(1, os.cpu_count() or 1),
                                       thread_name_prefix="cxrlab-answer")
        self.queue = threading.BoundedSemaphore(queue_size)  # films received and not yet answered
        self.server = None

    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = 32
        ae.supported_contexts = AllStoragePresentationContexts  # every kind is acknowledged; non-films ignored
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self.on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS)]
        try:
            self.server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise CxrlabError(f"dicom-listen: cannot listen on {self.host}:{self.port} ({exc.strerror or exc})") from None
        log.info("listening as %s on %s:%d; answers go to %s", self.ae_title, self.host, self.port,
                 self.sender.destination)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
        self.pool.shutdown(wait=True)

    def on_store(self, event) -> int:
        """Acknowledge a received dataset: queue a film, ignore anything else. Runs in the association's thread."""
        started = time.monotonic()
        requestor = event.assoc.requestor
        source = f"{requestor.ae_title.strip()}@{requestor.address}"
        try:
            data = event.encoded_dataset(include_meta=True)
            # the dataset as sent, without the file meta header that every hop writes anew
            digest = sha256(event.encoded_dataset(include_meta=False))
            header = _read_header(data)
        except Exception as exc:  # a malformed dataset is refused, never the end of the listener
            log.warning("refused a dataset from %s: cannot parse it (%s)", source, exc)
            self._record(None, source, None, started, decision="error", reason=f"cannot parse the dataset: {exc}")
            return CANNOT_UNDERSTAND
        reason = ignore_reason(header)
        if reason:
            log.info("ignored %s from %s: %s", header.SOPInstanceUID, source, reason)
            self._record(None, source, digest, started, decision=IGNORED, reason=reason)
            return SUCCESS
        if not self.queue.acquire(blocking=False):
            log.warning("refused %s from %s: too many films waiting for an answer", header.SOPInstanceUID, source)
            return OUT_OF_RESOURCES
        log.info("received %s from %s", header.SOPInstanceUID, source)
        self.pool.submit(self._answer_safely, data, header, source, digest, started)
        return SUCCESS

    def _answer_safely(self, *args) -> None:
        try:
            self.answer(*args)
        except Exception:  # one film's failure is logged; the next film is answered all the same
            log.exception("answering %s failed", args[1].SOPInstanceUID)
        finally:
            self.queue.release()

    def answer(self, data: bytes, header, source: str, digest: str, started: float) -> None:
        """Predict one film, send its SR (and for a scored film its Secondary Capture) back, audit the answer."""
        from .dicom_results import answer_line, secondary_capture, structured_report
        from .embed import prepare
        from .explain import prediction_overlay_png
        from .predict import Prediction

        uid = str(header.SOPInstanceUID)
        array = img = None
        maps: list = []  # the heatmap's class maps, from the prediction's own pass through the network
        try:
            array, img = prepare(data, self.model.input_size, uid)
            pred = self.model.predict_arrays([array], [img], names=[uid], maps=maps)[0]
        except ImageError as exc:  # a film whose pixels cannot be read: answered "not assessed"
            pred = Prediction(uid, threshold=self.model.threshold, error=exc.reason)
        line = answer_line(self.model, pred)
        results = [structured_report(header, self.model, pred, line)]
        if not pred.error and not pred.ood:
            png = prediction_overlay_png(self.model, array, img.pixels, pred, max_side=OVERLAY_SIDE, maps=maps[0])
            results.insert(0, secondary_capture(header, png, line))
        reason = None
        try:
            self.sender.send(results)
            log.info("answered %s: %s; sent to %s", uid, line.split(" — ", 2)[-1], self.sender.destination)
        except Exception as exc:  # the PACS is down or refuses: logged and audited, the listener goes on
            reason = f"not delivered: {exc}"
            log.error("answered %s but could not send the result: %s", uid, exc)
        if pred.error:
            reason = "; ".join(filter(None, [pred.error, reason]))
        self._record(pred, source, digest, started, reason=reason)

    def _record(self, pred, source, digest, started, *, decision=None, reason=None) -> None:
        if self.audit is None:
            return
        try:
            self.audit.record(pred, model=self.model, surface="dicom", source=source, input_sha256=digest,
                              latency_s=time.monotonic() - started, decision=decision, reason=reason)
        except Exception:  # a full disk must not stop the answers; it is logged loudly
            log.exception("could not write the audit log")


def listen(model, *, ae_title: str, port: int, send_to: Destination, host: str = "127.0.0.1",
           audit: AuditLog | None = None, workers: int | None = None) -> None:
    """Run the listener until interrupted (Ctrl-C or SIGTERM), then finish the films already received."""
    import signal

    stopping = threading.Event()
    listener = Listener(model, ae_title=ae_title, port=port, send_to=send_to, host=host, audit=audit, workers=workers)
    with_signal = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopping.set()) if with_signal else None
    try:
        listener.start()
        while not stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if listener.server is not None:
            log.info("stopping: finishing the films already received")
        listener.stop()
        if with_signal:
            signal.signal(signal.SIGTERM, previous)
