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
from .metrics import WHO_MIN_SENSITIVITY, check_binary

__all__ = [
    "OperatingPoint", "OperatingPointSpec", "parse_operating_point", "parse_rule", "choose_operating_point",
    "TemperatureScaler", "PlattScaler", "softmax", "WHO_MIN_SENSITIVITY",
    "CALIBRATIONS", "check_calibration", "Calibrated", "calibrate_and_threshold",
]

_VALID_RULES = ("'who'", "'youden'", "'argmax'", "'sensitivity=0.9' (a fraction in (0, 1]) or 'sensitivity=90%'",
                "'specificity=0.7' or 'specificity=70%'")
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


@dataclass(frozen=True)
class OperatingPointSpec:
    """A validated operating-point rule: ``kind`` and, for sensitivity/specificity, a target in (0, 1]."""

    kind: str  # who | youden | argmax | sensitivity | specificity
    target: float | None = None

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}={self.target:g}"


def parse_operating_point(spec) -> OperatingPointSpec:
    """'who' | 'youden' | 'argmax' | 'sensitivity=0.9' | 'sensitivity=90%' | 'specificity=...'.

    A target is a fraction in (0, 1] or a percentage in (0, 100] with an explicit '%': a bare number
    above 1 ('sensitivity=90', 'sensitivity=1.5') is refused rather than guessed at. Call it before any
    training so a bad rule fails in a second, not after the embedding.
    """
    if isinstance(spec, OperatingPointSpec):
        return spec

    def bad(why: str) -> DataError:
        return DataError(f"operating point {spec!r}: {why}; valid spellings: " + ", ".join(_VALID_RULES))

    if not isinstance(spec, str):
        raise bad("not a rule")
    r = spec.strip().lower().replace(" ", "")
    if r in ("who", "youden", "argmax"):
        return OperatingPointSpec(r)
    m = re.fullmatch(r"(sensitivity|sens|specificity|spec)[=:]([0-9]*\.?[0-9]+)(%?)", r)
    if not m:
        raise bad("unknown rule or malformed target")
    kind = "sensitivity" if m.group(1).startswith("sens") else "specificity"
    value, percent = float(m.group(2)), bool(m.group(3))
    if not percent and value > 1.0:
        raise bad(f"the target {m.group(2)} is not a fraction; write {value / 100:g} or {m.group(2)}% if a "
                  "percentage was meant" if value <= 100 else f"the target {m.group(2)} is out of range")
    target = value / 100.0 if percent else value
    if not 0.0 < target <= 1.0:
        raise bad(f"the target must be in (0, 1] (or (0%, 100%]), got {m.group(2)}{m.group(3)}")
    return OperatingPointSpec(kind, target)


def parse_rule(rule) -> tuple[str, float | None]:
    """(kind, target or None) of a rule; see ``parse_operating_point``."""
    spec = parse_operating_point(rule)
    return spec.kind, spec.target


def _rates(y, s, t: float) -> tuple[float, float]:
    pred = s >= t
    return (float(np.mean(pred[y == 1])), float(np.mean(~pred[y == 0])))


def choose_operating_point(y, scores, rule: str | OperatingPointSpec = "who") -> OperatingPoint:
    """Pick a threshold on (y, scores) by rule; fall back to Youden when the rule can't be met."""
    spec = parse_operating_point(rule)
    kind, target = spec.kind, spec.target
    rule = rule if isinstance(rule, str) else str(spec)
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
        note = "WHO target product profile for TB triage: sensitivity >= 90%, then the highest specificity"
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


CALIBRATIONS = ("auto", "temperature", "platt", "none")


def check_calibration(calibration: str, n_labels: int | None = None) -> None:
    """Refuse an unknown method, or Platt on more than two labels, before any embedding or training is spent."""
    if calibration not in CALIBRATIONS:
        raise DataError(f"unknown calibration {calibration!r}; use auto, temperature, platt or none")
    if calibration == "platt" and n_labels is not None and n_labels != 2:
        raise DataError("Platt calibration needs exactly two labels; use calibration='temperature'")


@dataclass
class Calibrated:
    """The head as shipped (Platt folded in where chosen), its temperature, the operating point and what they
    were chosen on, for cxrlab.json."""

    head: object
    temperature: float
    platt: PlattScaler | None
    operating_point: OperatingPoint | None
    notes: list
    calibration_info: dict
    operating_point_info: dict | None

    def probs(self, X) -> np.ndarray:
        """Calibrated class probabilities of embeddings ``X`` (what the exported model outputs)."""
        Z = self.head.decision_function(X)
        return softmax(Z / self.temperature) if len(Z) else np.zeros(Z.shape)


def calibrate_and_threshold(fit, *, calibration: str = "auto", positive: int | None = None, rule: str = "who",
                            extra: tuple | None = None) -> Calibrated:
    """Calibrate ``fit``'s head on its calibration logits and choose the operating point there.

    ``calibration='auto'``: Platt (folded into the head) for a fine-tuned binary head, whose logits can be shifted
    as well as over-confident; else temperature. ``positive``: the positive class index of a binary task (None: no
    operating point). ``extra``: (embeddings, labels, description) that join the operating point's data only.
    """
    check_calibration(calibration)
    n_classes = fit.cal_logits.shape[1]
    if calibration == "auto":
        calibration = "platt" if fit.fine_tuned and n_classes == 2 else "temperature"
    head, Z, y, notes = fit.head, fit.cal_logits, fit.cal_labels, []
    temperature, platt = 1.0, None
    usable = len(Z) and len(np.unique(y)) >= 2
    if calibration == "platt" and usable:
        platt = PlattScaler().fit(Z[:, 1] - Z[:, 0], y)
        if platt.a_ > 0:
            from .head import AffineHead

            head = AffineHead(head, platt.a_, platt.b_)  # folded into the exported head: one contract for predict
            Z = head.rescale(Z)
        else:  # scores anti-correlated with the labels on validation: a warning sign, not something to fold in
            notes.append(f"Platt calibration gave slope {platt.a_:.3g} <= 0 on validation; calibration skipped")
            platt = None
    elif calibration == "temperature" and usable:
        temperature = float(TemperatureScaler().fit(Z, y).temperature_)
    elif calibration != "none":
        notes.append(f"no usable validation split: calibration skipped ({calibration} not fitted)")
    calibration_info = {"method": "platt" if platt else calibration if temperature != 1.0 else "none",
                        "temperature": temperature,
                        **({"platt_a": platt.a_, "platt_b": platt.b_, "folded_into_head": True} if platt else {}),
                        "data": fit.cal_source, "n": int(len(y))}
    op, source = None, fit.cal_source
    if positive is not None and n_classes == 2:
        if extra is not None:
            Z, y = np.concatenate([Z, head.decision_function(extra[0])]), np.concatenate([y, extra[1]])
            source = f"{source} + {extra[2]}"
        op = _operating_point(Z, y, positive, temperature, rule)
        if op.note:
            notes.append(op.note)
    op_info = {**op.to_dict(), "data": source} if op else None
    return Calibrated(head, temperature, platt, op, notes, calibration_info, op_info)


def _operating_point(Z, y, positive: int, temperature: float, rule: str) -> OperatingPoint:
    if len(Z) and len(np.unique(y)) == 2:
        return choose_operating_point((y == positive).astype(int), softmax(Z / temperature)[:, positive], rule)
    return OperatingPoint("argmax", 0.5, float("nan"), float("nan"), False,
                          "validation split has fewer than 2 classes; threshold 0.5 used")
