"""Values -> strict JSON: what metrics.json, compare.json and the server's answers are written with."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

__all__ = ["json_safe", "json_bytes"]


def json_safe(x):
    """Plain JSON types, recursively: dataclasses as dicts, numpy values as Python ones, NaN/inf as None,
    and anything else (a Path, say) as its string."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return json_safe(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, np.ndarray)):
        return [json_safe(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if x is None or isinstance(x, str):
        return x
    return str(x)


def json_bytes(x) -> bytes:
    """``json_safe(x)`` as indented UTF-8 JSON (never NaN, which strict parsers reject)."""
    return json.dumps(json_safe(x), indent=2, allow_nan=False).encode("utf-8")
