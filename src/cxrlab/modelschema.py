"""The values of cxrlab.json, checked on every load and save: one table of field -> check.

A check raises ``Invalid`` naming what is wrong; ``check_info`` turns the first problem into one
ModelDirError line such as ``m/cxrlab.json: operating_point.threshold must be a finite number in
[0, 1], got NaN``. Unknown keys are allowed (informational additions within a schema version);
every value a consumer reads is in the table.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ModelDirError

SCHEMA_VERSION = 1
INPUT_SIZE_RANGE = (8, 4096)
PRECISIONS = ("fp32", "int8")


class Invalid(Exception):
    def __init__(self, message: str, path: tuple[str, ...] = ()):
        super().__init__(message)
        self.message, self.path = message, path


Check = Callable[[Any], None]


@dataclass(frozen=True)
class Field:
    check: Check
    required: bool = False
    nullable: bool = False


def show(value) -> str:
    """A short rendering of any JSON value for a one-line message (containers via reprlib: bounded)."""
    if isinstance(value, (dict, list)):
        text = reprlib.repr(value)
    elif isinstance(value, str):
        text = json.dumps(value[:40])
    else:
        text = repr(value) if isinstance(value, float) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number(lo: float = -math.inf, hi: float = math.inf, *, above: float | None = None,
           nan_ok: bool = False) -> Check:
    """A JSON number (not a bool), finite, in [lo, hi] (or > above)."""
    bounds = f" > {above:g}" if above is not None else (
        f" in [{lo:g}, {hi:g}]" if math.isfinite(lo) and math.isfinite(hi) else
        f" >= {lo:g}" if math.isfinite(lo) else "")
    want = f"must be a finite number{bounds}" + (" (or NaN)" if nan_ok else "")

    def check(v):
        if not _is_number(v):
            raise Invalid(f"{want}, got {show(v)}")
        if isinstance(v, float) and math.isnan(v) and nan_ok:
            return
        try:
            finite = math.isfinite(float(v))  # a huge JSON integer is no usable float either
        except OverflowError:
            finite = False
        if not finite or not lo <= v <= hi or (above is not None and not v > above):
            raise Invalid(f"{want}, got {show(v)}")
    return check


def integer(lo: int, hi: int | None = None) -> Check:
    want = f"must be an integer in [{lo}, {hi}]" if hi is not None else f"must be an integer >= {lo}"

    def check(v):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
            raise Invalid(f"{want}, got {show(v)}")
    return check


def text(choices: tuple[str, ...] | None = None) -> Check:
    def check(v):
        if not isinstance(v, str):
            raise Invalid(f"must be a string, got {show(v)}")
        if choices is not None and v not in choices:
            raise Invalid(f"must be one of {', '.join(choices)}, got {show(v)}")
    return check


def flag(v) -> None:
    if not isinstance(v, bool):
        raise Invalid(f"must be true or false, got {show(v)}")


def file_name(v) -> None:
    """A plain file name inside the model directory (nothing outside it can be named)."""
    if not isinstance(v, str) or not v or v in (".", "..") or "/" in v or "\\" in v or "\0" in v:
        raise Invalid(f"must be a plain file name inside the model directory, got {show(v)}")


def list_of(item: Check) -> Check:
    def check(v):
        if not isinstance(v, list):
            raise Invalid(f"must be a list, got {show(v)}")
        for i, x in enumerate(v):
            try:
                item(x)
            except Invalid as e:
                raise Invalid(e.message, (f"[{i}]",) + e.path) from None
    return check


def labels(v) -> None:
    """At least two distinct, non-blank, single-line strings (labels.txt holds one per line)."""
    if not isinstance(v, list) or len(v) < 2:
        raise Invalid(f"must be a list of at least two label strings, got {show(v)}")
    for x in v:
        if not isinstance(x, str) or not x.strip() or x.splitlines() != [x]:
            raise Invalid(f"must hold non-blank single-line strings, got {show(x)}")
    if len(set(v)) != len(v):
        raise Invalid(f"must not repeat a label, got {show(v)}")


def mapping(fields: dict[str, Field]) -> Check:
    def check(v):
        if not isinstance(v, dict):
            raise Invalid(f"must be an object, got {show(v)}")
        for key, field in fields.items():
            if key not in v:
                if field.required:
                    raise Invalid("is missing", (key,))
                continue
            if v[key] is None:
                if not field.nullable:
                    raise Invalid("must not be null", (key,))
                continue
            try:
                field.check(v[key])
            except Invalid as e:
                raise Invalid(e.message, (key,) + e.path) from None
    return check


ANY_OBJECT = mapping({})
UNIT = number(0.0, 1.0)

BACKBONE = {
    "input_size": Field(integer(*INPUT_SIZE_RANGE), required=True),
    "embed_dim": Field(integer(1)),
    "id": Field(text()),
    "name": Field(text()),
    "mean": Field(number()),
    "std": Field(number(above=0.0)),
    "precision": Field(text(PRECISIONS)),
    "onnx_outputs": Field(list_of(text())),
    "imagenet_head": Field(flag),
    "weights_sha256": Field(text(), nullable=True),
    "calibration_sha256": Field(text(), nullable=True),
    "preprocessing": Field(ANY_OBJECT),
}
OPERATING_POINT = {
    "threshold": Field(UNIT, required=True),
    "rule": Field(text(), required=True),
    "sensitivity": Field(number(0.0, 1.0, nan_ok=True)),  # NaN: no validation split to measure it on
    "specificity": Field(number(0.0, 1.0, nan_ok=True)),
    "reachable": Field(flag),
    "note": Field(text()),
    "data": Field(text(), nullable=True),
}
CALIBRATION = {
    "method": Field(text(("temperature", "platt", "none"))),
    "temperature": Field(number(above=0.0), required=True),
    "platt_a": Field(number(above=0.0)),
    "platt_b": Field(number()),
    "folded_into_head": Field(flag),
    "n": Field(integer(0)),
    "data": Field(text(), nullable=True),
}
OOD = {
    "threshold": Field(number(), required=True),
    "reject_rate": Field(UNIT, required=True),
    "arrays": Field(file_name, required=True),
    "n_components": Field(integer(1)),
    "color_limit": Field(number(0.0)),
    "method": Field(text()),
}
CHEST_CHECK = {
    "threshold": Field(UNIT, required=True),
    "asset_sha256": Field(text()),
    "color_limit": Field(number(0.0)),
    "flat_limit": Field(number(0.0)),
    "training_accepted": Field(UNIT),
    "network": Field(flag),
}
ENGINE = {"runtime": Field(text(("onnxruntime", "openvino")), required=True),
          "precision": Field(text(("fp32", "bf16")), required=True)}
PARITY = {
    "ok": Field(flag, required=True),
    "n": Field(integer(0)),
    "auc_fp32": Field(number(0.0, 1.0), nullable=True),
    "auc_bf16": Field(number(0.0, 1.0), nullable=True),
    "auc_change": Field(number(), nullable=True),
    "max_score_change": Field(number(0.0)),
    "decisions_changed": Field(integer(0)),
    "data": Field(text()),
}
RUNTIME = {"trained_with": Field(mapping(ENGINE)), "bf16": Field(mapping(PARITY), nullable=True),
           "bf16_not_checked": Field(text())}
METRICS = {"test": Field(ANY_OBJECT, nullable=True), "n": Field(ANY_OBJECT)}

INFO = {
    "schema_version": Field(integer(SCHEMA_VERSION, SCHEMA_VERSION), required=True),
    "labels": Field(labels, required=True),
    "positive_label": Field(text(), nullable=True),
    "backbone": Field(mapping(BACKBONE), required=True),
    "operating_point": Field(mapping(OPERATING_POINT), nullable=True),
    "calibration": Field(mapping(CALIBRATION), nullable=True),
    "ood": Field(mapping(OOD), nullable=True),
    "chest_check": Field(mapping(CHEST_CHECK), nullable=True),
    "runtime": Field(mapping(RUNTIME)),
    "task": Field(text(("classification",))),
    "created_by": Field(text()),
    "seed": Field(integer(0)),
    "metrics": Field(mapping(METRICS)),
    "fine_tune": Field(mapping({"network": Field(file_name)})),  # a file read on load: a plain name only
    **{key: Field(ANY_OBJECT) for key in ("head", "split", "training_data", "flags", "versions", "adapted")},
}

# Relations between fields, checked once every field is itself valid.
RELATIONS: tuple[tuple[str, Callable[[dict], bool], str], ...] = (
    ("positive_label", lambda i: i.get("positive_label") is None or i["positive_label"] in i["labels"],
     "must be one of labels"),
    ("operating_point", lambda i: i.get("operating_point") is None or i.get("positive_label") in i["labels"],
     "needs a positive_label that is one of labels"),
)


def check_info(info, where: str) -> None:
    """Raise ModelDirError (one line, prefixed with ``where``) unless every value of ``info`` is valid."""
    try:
        mapping(INFO)(info)
        for key, holds, message in RELATIONS:
            if not holds(info):
                raise Invalid(f"{message}, got {show(info.get(key))}", (key,))
    except Invalid as e:
        name = ".".join(e.path).replace(".[", "[") or "the content"
        raise ModelDirError(f"{where}: {name} {e.message}; retrain the model or restore its files") from None
