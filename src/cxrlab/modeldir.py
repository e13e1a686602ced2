"""Save/load: the model directory, the single contract between training and its consumers.

    model.onnx    backbone + head fused (image in, probabilities out)
    labels.txt    one label per line, in output order (the tutorial's output_labels.txt)
    cxrlab.json   everything needed to reproduce and consume the model, incl. SHA-256 of files
    *.safetensors optional arrays (e.g. the out-of-distribution gate)
    MODEL_CARD.md for people: rendered from cxrlab.json (+ evaluations.json, appended by `cxrlab evaluate`);
                  outside the SHA-256 record, see cxrlab.modelcard

model.onnx carries the decision in its metadata (labels, positive class, threshold, calibration, checks), so
that another runtime can reproduce cxrlab's answer from that file alone (cxrlab.graph.decision_metadata).

Loading verifies every file the model needs against the SHA-256 record (mandatory) and validates
every value of cxrlab.json (cxrlab.modelschema), so an edited or damaged model is refused rather
than giving wrong answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ._version import __version__
from .errors import ModelDirError
from .fsutil import atomic_write_bytes, make_temp_dir
from .modelschema import SCHEMA_VERSION, Invalid, check_info, file_name, show
MODEL_FILE, LABELS_FILE, INFO_FILE = "model.onnx", "labels.txt", "cxrlab.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _info_digest(info: dict) -> str:
    """SHA-256 of cxrlab.json's content without its own ``info_sha256`` (canonical JSON)."""
    body = {k: v for k, v in info.items() if k != "info_sha256"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def save_model(directory: str | os.PathLike, *, onnx_bytes: bytes, labels: list[str], info: dict,
               arrays: dict[str, bytes] | None = None) -> Path:
    """Write a complete model directory atomically (a half-written one never appears).

    An existing ``directory`` is replaced only when everything in it is cxrlab's (see outputs.py)."""
    from .graph import decision_metadata, set_metadata
    from .modelcard import CARD_FILE, render_card
    from .outputs import MARKER, check_output_dir, marker_bytes, real_path

    directory = Path(directory)
    check_output_dir(directory, "train", replace=True)
    real = real_path(directory)  # a symlink to a model directory: replace the directory it points to
    real.parent.mkdir(parents=True, exist_ok=True)
    files = {MODEL_FILE: onnx_bytes, LABELS_FILE: ("\n".join(labels) + "\n").encode("utf-8"), **(arrays or {})}
    info = {"schema_version": SCHEMA_VERSION, **info, "labels": list(labels)}
    check_info(info, f"{directory / INFO_FILE} (not written)")  # never write a model that would not load
    files[MODEL_FILE] = set_metadata(onnx_bytes, decision_metadata(info))  # model.onnx alone can decide too
    info["files"] = {name: _sha256(data) for name, data in sorted(files.items())}
    info["info_sha256"] = _info_digest(info)
    if any(name not in files for name in needed_files(info)):
        raise ModelDirError(f"{directory}: not written: cxrlab.json refers to files {needed_files(info)} "
                            f"but only {sorted(files)} were given")
    files[INFO_FILE] = (json.dumps(info, indent=2, sort_keys=True) + "\n").encode("utf-8")
    files[CARD_FILE] = render_card(info).encode("utf-8")  # documentation: outside the record
    files[MARKER] = marker_bytes("train", {name: "train" for name in files})
    staging = make_temp_dir(real.parent, f".{real.name}.")
    try:
        for name, data in files.items():
            atomic_write_bytes(staging / name, data)
        _swap_in(staging, real)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def model_info(*, labels: list[str], positive_label: str | None, backbone, head: dict, calibration: dict,
               operating_point: dict | None, split: dict, training_data: dict, seed: int, flags: dict, metrics: dict,
               fine_tune: dict | None = None, ood: dict | None = None, chest_check: dict | None = None,
               runtime: dict | None = None) -> dict:
    """cxrlab.json's content (save_model adds schema, labels, file digests): the one place its layout is defined."""
    info = {
        "created_by": f"cxrlab {__version__}",
        "task": "classification",
        "labels": labels,
        "positive_label": positive_label,
        "backbone": {**backbone.spec.to_dict(), "id": backbone.id, "weights_sha256": backbone.weights_sha256,
                     "onnx_outputs": list(backbone.outputs), "precision": backbone.precision,
                     "calibration_sha256": backbone.calibration_sha256},
        "head": head,
        "calibration": calibration,
        "operating_point": operating_point,
        "split": split,
        "training_data": training_data,
        "seed": seed,
        "flags": flags,
        "metrics": metrics,
        "versions": _versions(),
    }
    if fine_tune is not None:
        info["fine_tune"] = fine_tune
    if ood is not None:
        info["ood"] = ood
    if chest_check is not None:
        info["chest_check"] = chest_check
    if runtime is not None:
        info["runtime"] = runtime
    return info


def _versions() -> dict:
    import platform

    import numpy as np
    import onnx
    import onnxruntime

    return {"cxrlab": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _swap_in(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` (already checked) is put back on failure."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = make_temp_dir(target.parent, f".{target.name}.old-")  # renaming a folder onto an empty one is allowed
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class ModelFiles:
    """A model directory's verified content."""

    info: dict
    labels: list[str]
    onnx_bytes: bytes
    arrays: dict[str, bytes] = field(default_factory=dict)  # array files the info refers to, by name


def read_model_dir(directory: str | os.PathLike, *, trust_modified: bool = False) -> tuple[dict, list[str], bytes]:
    """Read and verify a model directory: (info, labels, model bytes)."""
    m = load_model_files(directory, trust_modified=trust_modified)
    return m.info, m.labels, m.onnx_bytes


def load_model_files(directory: str | os.PathLike, *, trust_modified: bool = False) -> ModelFiles:
    """Read a model directory, verify every file against cxrlab.json's SHA-256 record, validate every value.

    The SHA-256 record is mandatory. ``trust_modified`` loads a directory whose record is missing or
    does not match (with a warning on stderr); the values are validated all the same.
    """
    directory = Path(directory)
    info = _read_info(directory)
    modified = _check_info_digest(directory, info, trust_modified)
    check_info(info, str(directory / INFO_FILE))
    needed = needed_files(info)
    blobs = {name: _read_needed(directory, name) for name in needed}
    modified += _check_file_digests(directory, info, blobs, trust_modified)
    try:
        labels = blobs[LABELS_FILE].decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ModelDirError(f"{directory / LABELS_FILE}: not UTF-8 text") from None
    if labels != info["labels"]:
        raise ModelDirError(f"{directory}: {LABELS_FILE} and {INFO_FILE} list different labels "
                            f"({show(labels)} vs {show(info['labels'])})")
    if trust_modified:
        _warn_trusted(directory, modified)
    arrays = {name: blobs[name] for name in needed[2:]}
    return ModelFiles(info, labels, blobs[MODEL_FILE], arrays)


def model_identity(files: ModelFiles) -> str:
    """A stable identifier of the model as loaded: SHA-256 of its cxrlab.json with the digests of the files
    actually loaded. For an intact directory this is the ``info_sha256`` recorded in cxrlab.json; a modified
    one (``trust_modified``) gets another value, so its answers are never attributed to the trained model."""
    actual = {MODEL_FILE: _sha256(files.onnx_bytes),
              LABELS_FILE: _sha256(("\n".join(files.labels) + "\n").encode("utf-8")),
              **{name: _sha256(data) for name, data in files.arrays.items()}}
    recorded = files.info.get("files")
    return _info_digest({**files.info, "files": {**(recorded if isinstance(recorded, dict) else {}), **actual}})


def needed_files(info: dict) -> list[str]:
    """The files a model cannot be used without: the graph, its labels, the arrays the info refers to."""
    network = (info.get("fine_tune") or {}).get("network")  # a fine-tuned network, kept for `cxrlab adapt`
    return [MODEL_FILE, LABELS_FILE] + ([info["ood"]["arrays"]] if info.get("ood") else []) + (
        [network] if network else [])


_RESTORE = "Retrain or restore the model (--trust-modified-model loads it anyway)."


def _read_info(directory: Path) -> dict:
    if not directory.is_dir():
        raise ModelDirError(f"{directory}: not a model directory (expected a folder with {MODEL_FILE}, {LABELS_FILE}, {INFO_FILE})")
    try:
        info = json.loads((directory / INFO_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(f"{directory}: {INFO_FILE} is missing; this is not a complete cxrlab model") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelDirError(f"{directory / INFO_FILE}: unreadable or not JSON ({exc})") from None
    if not isinstance(info, dict):
        raise ModelDirError(f"{directory / INFO_FILE}: not a JSON object; this is not a cxrlab model description")
    version = info.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise ModelDirError(f"{directory}: schema_version {show(version)} is not supported by this cxrlab "
                            f"(supports {SCHEMA_VERSION}); upgrade cxrlab or retrain the model")
    return info


def _refuse_or_note(problem: str, trust_modified: bool) -> list[str]:
    if not trust_modified:
        raise ModelDirError(f"{problem}. {_RESTORE}")
    return [problem]


def _check_info_digest(directory: Path, info: dict, trust_modified: bool) -> list[str]:
    recorded = info.get("info_sha256")
    try:
        intact = recorded == _info_digest(info)
    except (RecursionError, ValueError):  # nested past what json can write back: not what cxrlab saved
        intact = False
    if recorded is None:
        problem = (f"{directory / INFO_FILE}: has no info_sha256 record, so its content cannot be verified; "
                   "the file was edited or damaged")
    elif not intact:
        problem = (f"{directory / INFO_FILE}: content differs from the SHA-256 recorded at save time; "
                   "the file was edited or damaged")
    else:
        return []
    return _refuse_or_note(problem, trust_modified)


def _read_needed(directory: Path, name: str) -> bytes:
    try:
        return (directory / name).read_bytes()
    except OSError:
        raise ModelDirError(f"{directory}: {name} is missing or unreadable; the model directory is incomplete") from None


def _check_file_digests(directory: Path, info: dict, blobs: dict[str, bytes], trust_modified: bool) -> list[str]:
    """Every needed file listed in ``files`` with a matching digest, and every listed file present and intact."""
    files = info.get("files")
    if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
        return _refuse_or_note(f"{directory / INFO_FILE}: no valid 'files' record of SHA-256 digests, "
                               "so the files cannot be verified", trust_modified)
    problems = []
    for name in blobs:
        if name not in files:
            problems += _refuse_or_note(f"{directory / INFO_FILE}: does not list {name} in 'files', "
                                        "so it cannot be verified", trust_modified)
        elif _sha256(blobs[name]) != files[name]:
            problems += _refuse_or_note(f"{directory / name}: content differs from the SHA-256 recorded at save "
                                        "time; the file was altered or damaged", trust_modified)
    for name, digest in files.items():
        if name in blobs:
            continue
        try:
            file_name(name)
            data = (directory / name).read_bytes()
        except (Invalid, OSError):
            problems += _refuse_or_note(f"{directory}: {show(name)}, listed in {INFO_FILE}, is missing; "
                                        "the model directory is incomplete", trust_modified)
            continue
        if _sha256(data) != digest:
            problems += _refuse_or_note(f"{directory / name}: content differs from the SHA-256 recorded at save "
                                        "time; the file was altered or damaged", trust_modified)
    return problems


def _warn_trusted(directory: Path, modified: list[str]) -> None:
    if modified:
        print(f"WARNING: --trust-modified-model: {directory} was modified after training and is loaded anyway; "
              f"its answers may not be the trained model's ({'; '.join(modified)})", file=sys.stderr)
    else:
        print(f"WARNING: --trust-modified-model given; {directory} matches its SHA-256 record, nothing was skipped",
              file=sys.stderr)


def parse_arrays(data: bytes, where: str | os.PathLike) -> dict:
    """The arrays of a safetensors file (never unpickled); ModelDirError when it is not one."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return load(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise ModelDirError(f"{where}: not a readable safetensors file ({exc})") from None


def read_array_file(directory: str | os.PathLike, name: str) -> dict:
    return parse_arrays(_read_needed(Path(directory), name), Path(directory) / name)
