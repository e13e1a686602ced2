"""A model's answer on a DICOM film -> DICOM objects for the film's own study (pydicom).

- a Secondary Capture: the heatmap overlay with the answer burned in on a black band
  ("cxrlab <version> — research use, not a medical device — TB-suggestive: yes (score 0.873, threshold 0.242)");
- a Comprehensive SR: the finding, score, threshold, the model's decision, the model identifier (its SHA-256),
  the chest check's and the shift warning's answers, and a reference to the source image.

Both carry the source's patient and study attributes (same StudyInstanceUID), a new series each, and reference
the source SOP instance. Concepts without a standard code use the private coding scheme ``99CXRLAB``.
"""

from __future__ import annotations

import functools
import io
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from ._version import __version__

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
INTENDED_USE = "research use, not a medical device"
SC_SERIES_NUMBER, SR_SERIES_NUMBER = 9901, 9902
_PATIENT_STUDY = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                  "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription")
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")
PRIVATE = "99CXRLAB"
CONCEPTS = {  # name -> (code value, coding scheme, code meaning)
    "report": ("18748-4", "LN", "Diagnostic imaging report"),
    "finding": ("121071", "DCM", "Finding"),
    "algorithm_name": ("111001", "DCM", "Algorithm Name"),
    "algorithm_version": ("111003", "DCM", "Algorithm Version"),
    "source": ("121112", "DCM", "Source of Measurement"),
    "score": ("CXR001", PRIVATE, "TB-suggestive score"),
    "threshold": ("CXR002", PRIVATE, "Operating point threshold"),
    "decision": ("CXR003", PRIVATE, "Model decision"),
    "model": ("CXR004", PRIVATE, "Model identifier"),
    "chest_check": ("CXR005", PRIVATE, "Frontal chest film check"),
    "shift": ("CXR006", PRIVATE, "Site shift warning"),
    "intended_use": ("CXR007", PRIVATE, "Intended use"),
}
NO_UNITS = ("1", "UCUM", "no units")


def tb_suggestive(model, pred) -> bool | None:
    """True/False for a scored film of a model with a positive label, else None."""
    if pred.ood or pred.error or pred.label is None or pred.positive_score is None or model.positive_label is None:
        return None  # not scored, or a model without an operating point
    return pred.label == model.positive_label


def answer_line(model, pred) -> str:
    """The one line burned into the Secondary Capture and written as the SR's finding."""
    head = f"cxrlab {__version__} — {INTENDED_USE} — "
    if pred.error:
        return head + f"not assessed: the film could not be read ({pred.error})"
    if pred.ood:
        return head + f"not assessed: {pred.ood_reason}"
    tb = tb_suggestive(model, pred)
    if tb is None:
        score = max(pred.scores.values())
        return head + f"decision: {pred.label} (score {score:.3f})"
    line = head + f"TB-suggestive: {'yes' if tb else 'no'} (score {pred.positive_score:.3f}"
    line += f", threshold {pred.threshold:.3f})" if pred.threshold is not None else ")"
    return line + (" — warning: unlike the training images" if pred.shift else "")


def _code(name: str) -> Dataset:
    value, scheme, meaning = CONCEPTS[name] if name in CONCEPTS else name
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _item(value_type: str, concept: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = value_type
    item.ConceptNameCodeSequence = Sequence([_code(concept)])
    return item


def _text(concept: str, text: str) -> Dataset:
    item = _item("TEXT", concept)
    item.TextValue = text
    return item


def _num(concept: str, value: float) -> Dataset:
    item = _item("NUM", concept)
    measured = Dataset()
    measured.NumericValue = f"{value:.6g}"
    measured.MeasurementUnitsCodeSequence = Sequence([_code(NO_UNITS)])
    item.MeasuredValueSequence = Sequence([measured])
    return item


def _reference(source: Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return ref


def _derived(source: Dataset, sop_class: str, modality: str, series_number: int, description: str) -> Dataset:
    """Patient and study copied from ``source``, a new series and instance, the equipment, the reference."""
    now = datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the burned line has dashes, names may have any script
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    for key in _PATIENT_STUDY:
        if key in source:
            setattr(ds, key, source[key].value)
        elif key in _TYPE2:
            setattr(ds, key, "")
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = series_number, 1
    ds.SeriesDescription = description
    ds.Manufacturer, ds.ManufacturerModelName = "cxrlab", "cxrlab"
    ds.SoftwareVersions = __version__
    ds.InstanceCreationDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.ReferencedImageSequence = Sequence([_reference(source)])
    return ds


@functools.lru_cache(maxsize=32)
def _font(size: int):
    """DejaVu Sans (shipped with matplotlib: it has the dashes), else Pillow's own font."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.__file__).parent / "mpl-data/fonts/ttf/DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def _wrap(line: str, font, width: float) -> list[str]:
    """The line cut at its dashes into as few lines as fit ``width``."""
    parts = line.split(" — ")
    lines = [parts[0]]
    for part in parts[1:]:
        joined = f"{lines[-1]} — {part}"
        if font.getlength(joined) <= width:
            lines[-1] = joined
        else:
            lines.append("— " + part)
    return lines


def _burn(png: bytes, line: str) -> np.ndarray:
    """The overlay with ``line`` in white on a black band below it: cut into lines at its dashes where the image is
    narrow, the font shrunk (not below 8 px) until every line fits."""
    from PIL import Image, ImageDraw

    top = Image.open(io.BytesIO(png)).convert("RGB")
    w = top.width
    size = max(12, min(24, w // 50))
    while True:
        font = _font(size)
        lines = _wrap(line, font, w - 8)
        if size <= 8 or all(font.getlength(t) <= w - 8 for t in lines):
            break
        size -= 1
    step = int(size * 1.4)
    canvas = Image.new("RGB", (w, top.height + step * len(lines) + size // 2), "black")
    canvas.paste(top, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(lines):
        draw.text((4, top.height + size // 4 + step * i), text, fill="white", font=font, anchor="la")
    return np.asarray(canvas, dtype=np.uint8)


def secondary_capture(source: Dataset, overlay_png: bytes, line: str) -> Dataset:
    """The heatmap overlay (PNG) with ``line`` burned in, as a Secondary Capture of ``source``'s study."""
    rgb = _burn(overlay_png, line)
    ds = _derived(source, SECONDARY_CAPTURE, "OT", SC_SERIES_NUMBER, "cxrlab heatmap (research use)")
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "YES"
    ds.DerivationDescription = "class activation map of the cxrlab model's decision over the source film"
    ds.SourceImageSequence = Sequence([_reference(source)])
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    return ds


def gate_texts(pred) -> tuple[str, str]:
    """(the chest check's answer, the shift warning's answer) in words."""
    if pred.ood is None:
        chest = "not run"
    elif pred.ood:
        chest = f"refused: {pred.ood_reason} (not-chest score {pred.ood_score:.3f})"
    else:
        chest = f"accepted as a frontal chest film (not-chest score {pred.ood_score:.3f} < {pred.ood_threshold:g})"
    if pred.shift is None:
        shift = "not run"
    elif pred.shift:
        shift = f"yes: unlike the training images (shift score {pred.shift_score:.2f} > {pred.shift_threshold:.2f})"
    else:
        shift = f"no (shift score {pred.shift_score:.2f} <= {pred.shift_threshold:.2f})"
    return chest, shift


def structured_report(source: Dataset, model, pred, line: str) -> Dataset:
    """A Comprehensive SR of the answer on ``source``, in its study."""
    ds = _derived(source, COMPREHENSIVE_SR, "SR", SR_SERIES_NUMBER, "cxrlab result (research use)")
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = Sequence()
    evidence_series = Dataset()
    evidence_series.SeriesInstanceUID = source.SeriesInstanceUID
    evidence_series.ReferencedSOPSequence = Sequence([_reference(source)])
    evidence = Dataset()
    evidence.StudyInstanceUID = source.StudyInstanceUID
    evidence.ReferencedSeriesSequence = Sequence([evidence_series])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("report")])
    chest, shift = gate_texts(pred)
    items = [_text("finding", line.split(" — ", 2)[-1]), _text("intended_use", INTENDED_USE),
             _text("algorithm_name", "cxrlab"), _text("algorithm_version", __version__),
             _text("model", f"sha256:{model.sha256}")]
    if pred.label is not None:
        items.append(_text("decision", pred.label))
    if pred.positive_score is not None:
        items.append(_num("score", pred.positive_score))
    if pred.threshold is not None:
        items.append(_num("threshold", pred.threshold))
    items += [_text("chest_check", chest), _text("shift", shift)]
    image = _item("IMAGE", "source")
    image.ReferencedSOPSequence = Sequence([_reference(source)])
    ds.ContentSequence = Sequence(items + [image])
    return ds
