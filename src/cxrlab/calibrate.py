"""Validation scores -> calibration and an operating point, chosen a priori.

Operating points are chosen on validation data by a rule named before looking
at the test set; calibrators (temperature, Platt) are fitted the same way.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, log_expit, logsumexp

from .errors import DataError, NotFittedError
from .metrics import check_binary

__all__ = [
    "OperatingPoint", "parse_rule", "parse_operating_point", "choose_operating_point",
    "TemperatureScaler", "PlattScaler", "softmax", "WHO_MIN_SENSITIVITY",
]

WHO_MIN_SENSITIVITY = 0.90
_VALID_RULES = ("'who'", "'youden'", "'argmax'", "'sensitivity=0.9' (or =90, =90%)",
                "'specificity=0.7' (or =70, =70%)")
_EPS = 1e-12


@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold and what it achieved on the data it was chosen on."""

    rule: str
    threshold: float
    sensitivity: float
    specificity: float
    reachable: bool = True
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OperatingPoint":
        try:
            return cls(rule=str(d["rule"]), threshold=float(d["threshold"]),
                       sensitivity=float(d["sensitivity"]), specificity=float(d["specificity"]),
                       reachable=bool(d.get("reachable", True)), note=str(d.get("note", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"not a valid operating point: {d!r} ({e})") from None


def parse_rule(rule: str) -> tuple[str, float | None]:
    """'who' | 'youden' | 'argmax' | 'sensitivity=s' | 'specificity=s' -> (kind, s or None)."""
    bad = DataError(f"unknown operating-point rule {rule!r}; valid spellings: "
                    + ", ".join(_VALID_RULES))
    if not isinstance(rule, str):
        raise bad
    r = rule.strip().lower().replace(" ", "")
    if r in ("who", "youden", "argmax"):
        return r, None
    m = re.fullmatch(r"(sensitivity|sens|specificity|spec)[=:]([0-9]*\.?[0-9]+)(%?)", r)
    if not m:
        raise bad
    kind = "sensitivity" if m.group(1).startswith("sens") else "specificity"
    value = float(m.group(2))
    if m.group(3) or value > 1.0:
        value /= 100.0
    if not 0.0 < value <= 1.0:
        raise DataError(f"rule {rule!r}: the target must be in (0, 1] (or (0, 100]%)")
    return kind, value


def parse_operating_point(spec: str) -> tuple[str, float | None]:
    """:func:`parse_rule`, stricter, for checking a user's option before any work.

    A bare number above 1 is read as a percentage only from 10 up (``sensitivity=90``): ``sensitivity=1.5``
    is far more likely a mistyped fraction than a 1.5% target, so it is refused rather than guessed.
    """
    kind, value = parse_rule(spec)
    m = re.search(r"[=:]([0-9]*\.?[0-9]+)$", spec.strip().replace(" ", "")) if value is not None else None
    if m and 1.0 < float(m.group(1)) < 10.0:
        raise DataError(f"operating point {spec!r}: the target must be a fraction in (0, 1] (e.g. {kind}=0.9) "
                        f"or a percentage (e.g. {kind}=90 or {kind}=90%)")
    return kind, value


def _rates(y, s, t: float) -> tuple[float, float]:
    pred = s >= t
    return (float(np.mean(pred[y == 1])), float(np.mean(~pred[y == 0])))


def choose_operating_point(y, scores, rule: str = "who") -> OperatingPoint:
    """Pick a threshold on (y, scores) by rule; fall back to Youden when the rule can't be met."""
    kind, target = parse_rule(rule)
    y, s = check_binary(y, scores, what="an operating point")
    if kind == "argmax":
        sens, spec = _rates(y, s, 0.5)
        return OperatingPoint(rule, 0.5, sens, spec, True, "")

    u = np.unique(s)[::-1]  # distinct scores, descending; predict positive iff s >= u[i]
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    pos_at = np.searchsorted(np.sort(s[y == 1]), u, side="left")
    neg_at = np.searchsorted(np.sort(s[y == 0]), u, side="left")
    sens = (n_pos - pos_at) / n_pos          # non-decreasing along u
    spec = neg_at / n_neg                     # non-increasing along u

    reachable, note = True, ""
    if kind == "who":
        target = WHO_MIN_SENSITIVITY
        note = "WHO TPP triage target: sensitivity >= 90%, highest specificity at that sensitivity"
    if kind in ("who", "sensitivity"):
        ok = sens >= target - _EPS
        i = int(np.argmax(ok)) if ok.any() else None   # highest threshold meeting the target
    elif kind == "specificity":
        ok = spec >= target - _EPS
        i = int(np.flatnonzero(ok)[-1]) if ok.any() else None  # lowest, so most sensitive
        if i is not None:  # among equal sensitivity prefer the higher threshold
            i = int(np.argmax(sens >= sens[i] - _EPS))
    else:
        i = None
    if i is None:
        j = sens + spec - 1.0
        i = int(np.argmax(j >= j.max() - _EPS))  # ties -> higher threshold
        if kind != "youden":
            reachable = False
            note = (f"{kind} >= {target:g} cannot be reached on these {y.size} samples "
                    f"(best is {spec.max() if kind == 'specificity' else sens.max():.3f}); "
                    "fell back to the Youden threshold")

    t = float(u[i])
    if i + 1 < u.size:
        mid = 0.5 * (u[i] + u[i + 1])
        if u[i + 1] < mid <= u[i]:
            t = float(mid)
    a_sens, a_spec = _rates(y, s, t)
    return OperatingPoint(rule, t, a_sens, a_spec, reachable, note)


def softmax(logits, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    z = np.asarray(logits, dtype=float)
    return np.exp(z - logsumexp(z, axis=axis, keepdims=True))


def _as_logits_labels(logits, y):
    z = np.asarray(logits, dtype=float)
    if z.ndim == 1:  # binary logit of the positive class -> two columns
        z = np.stack([np.zeros_like(z), z], axis=1)
    if z.ndim != 2 or z.shape[1] < 2 or z.shape[0] == 0:
        raise DataError(f"logits must have shape (n, k>=2) or (n,), got {np.shape(logits)}")
    if not np.all(np.isfinite(z)):
        raise DataError("logits contain NaN or infinite values")
    if y is None:
        return z, None
    yy = np.asarray(y)
    if yy.shape != (z.shape[0],):
        raise DataError(f"labels must have shape ({z.shape[0]},), got {yy.shape}")
    if not np.issubdtype(yy.dtype, np.number) or np.any(yy != np.round(yy)) \
            or yy.min() < 0 or yy.max() >= z.shape[1]:
        raise DataError(f"labels must be integers in [0, {z.shape[1] - 1}]")
    return z, yy.astype(int)


class TemperatureScaler:
    """softmax(logits / T), T fitted by minimising the NLL over log T."""

    LOG_T_BOUNDS = (-5.0, 5.0)

    def __init__(self):
        self.temperature_: float | None = None

    def fit(self, logits, y) -> "TemperatureScaler":
        z, yy = _as_logits_labels(logits, y)
        rows = np.arange(z.shape[0])

        def nll(log_t: float) -> float:
            zt = z / np.exp(log_t)
            return float(np.mean(logsumexp(zt, axis=1) - zt[rows, yy]))

        res = minimize_scalar(nll, bounds=self.LOG_T_BOUNDS, method="bounded",
                              options={"xatol": 1e-6})
        self.temperature_ = float(np.exp(res.x))
        return self

    def transform(self, logits) -> np.ndarray:
        """Calibrated probabilities; for 1-D logits, P(positive)."""
        if self.temperature_ is None:
            raise NotFittedError("TemperatureScaler.transform called before fit")
        binary = np.ndim(logits) == 1
        z, _ = _as_logits_labels(logits, None)
        p = softmax(z / self.temperature_, axis=1)
        return p[:, 1] if binary else p


class PlattScaler:
    """p = sigmoid(a * z + b), fitted with Platt's smoothed targets (no divergence on separable data)."""

    def __init__(self):
        self.a_: float | None = None
        self.b_: float | None = None

    def fit(self, z, y) -> "PlattScaler":
        yy, zz = check_binary(y, z, name="z", what="Platt scaling")
        n_pos = int(yy.sum())
        n_neg = yy.size - n_pos
        t = np.where(yy == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

        def loss(ab):
            f = ab[0] * zz + ab[1]
            val = -np.mean(t * log_expit(f) + (1 - t) * log_expit(-f))
            r = expit(f) - t
            return float(val), np.array([np.mean(r * zz), np.mean(r)])

        res = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
                       options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 1000})
        self.a_, self.b_ = float(res.x[0]), float(res.x[1])
        return self

    def transform(self, z) -> np.ndarray:
        if self.a_ is None:
            raise NotFittedError("PlattScaler.transform called before fit")
        zz = np.asarray(z, dtype=float)
        return expit(self.a_ * zz + self.b_)
