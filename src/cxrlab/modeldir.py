"""Save/load: the model directory, the single contract between training and its consumers.

    model.onnx    backbone + head fused (image in, probabilities out)
    labels.txt    one label per line, in output order (the tutorial's output_labels.txt)
    cxrlab.json   everything needed to reproduce and consume the model, incl. SHA-256 of files
    *.safetensors optional arrays (e.g. the out-of-distribution gate)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ._version import __version__
from .errors import ModelDirError
from .fsutil import atomic_write_bytes, make_temp_dir

SCHEMA_VERSION = 1
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
    from .outputs import MARKER, check_output_dir, marker_bytes, real_path

    directory = Path(directory)
    check_output_dir(directory, "train", replace=True)
    real = real_path(directory)  # a symlink to a model directory: replace the directory it points to
    real.parent.mkdir(parents=True, exist_ok=True)
    files = {MODEL_FILE: onnx_bytes, LABELS_FILE: ("\n".join(labels) + "\n").encode("utf-8"), **(arrays or {})}
    info = {"schema_version": SCHEMA_VERSION, **info, "labels": list(labels),
            "files": {name: _sha256(data) for name, data in sorted(files.items())}}
    info["info_sha256"] = _info_digest(info)
    files[INFO_FILE] = (json.dumps(info, indent=2, sort_keys=True) + "\n").encode("utf-8")
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
               fine_tune: dict | None = None, ood: dict | None = None) -> dict:
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


def read_model_dir(directory: str | os.PathLike) -> tuple[dict, list[str], bytes]:
    """Read and verify a model directory: (info, labels, model bytes)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelDirError(f"{directory}: not a model directory (expected a folder with {MODEL_FILE}, {LABELS_FILE}, {INFO_FILE})")
    try:
        info = json.loads((directory / INFO_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(f"{directory}: {INFO_FILE} is missing; this is not a complete cxrlab model") from None
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{directory / INFO_FILE}: unreadable or not JSON ({exc})") from None
    version = info.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ModelDirError(f"{directory}: schema_version {version!r} is not supported by this cxrlab "
                            f"(supports {SCHEMA_VERSION}); upgrade cxrlab or retrain the model")
    if "info_sha256" in info and info["info_sha256"] != _info_digest(info):
        raise ModelDirError(f"{directory / INFO_FILE}: content differs from the SHA-256 recorded at save time; "
                            "the file was edited or damaged. Retrain or restore the model.")
    blobs = {}
    for name, digest in info.get("files", {}).items():
        try:
            blobs[name] = (directory / name).read_bytes()
        except OSError:
            raise ModelDirError(f"{directory}: {name} is missing; the model directory is incomplete") from None
        if _sha256(blobs[name]) != digest:
            raise ModelDirError(f"{directory / name}: content differs from the SHA-256 recorded at save time; "
                                "the file was altered or damaged. Retrain or restore the model.")
    for required in (MODEL_FILE, LABELS_FILE):
        if required not in blobs:
            raise ModelDirError(f"{directory}: {INFO_FILE} does not list {required}")
    labels = blobs[LABELS_FILE].decode("utf-8").splitlines()
    if labels != info.get("labels"):
        raise ModelDirError(f"{directory}: {LABELS_FILE} and {INFO_FILE} list different labels")
    return info, labels, blobs[MODEL_FILE]


def read_array_file(directory: str | os.PathLike, name: str) -> dict:
    from safetensors.numpy import load

    return load((Path(directory) / name).read_bytes())
