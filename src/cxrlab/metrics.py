"""(y_true, scores) -> metrics with confidence intervals.

Pure numpy/scipy. Binary labels are 0/1 with 1 the positive class; scores are
P(positive) or any monotone score. Reports are JSON-safe: plain floats, lists,
and ``None`` for undefined ratios.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from statistics import NormalDist

from .errors import DataError

__all__ = [
    "wilson_ci", "roc_curve", "roc_auc", "delong_ci", "pr_curve",
    "average_precision", "brier_score", "expected_calibration_error",
    "reliability_bins", "binary_report", "multiclass_report", "who_verdict",
    "bootstrap_ci",
]


# ----------------------------------------------------------------- helpers
def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def _z(alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise DataError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(NormalDist().inv_cdf(1.0 - alpha / 2.0))


def check_binary(y, scores, *, need_both: bool = True, name: str = "scores", what: str = "this metric"):
    """Validate and return (y as int 0/1 array, scores as float array)."""
    y = np.asarray(y)
    s = np.asarray(scores, dtype=float)
    if y.ndim != 1 or s.ndim != 1:
        raise DataError(f"y and {name} must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape[0] != s.shape[0]:
        raise DataError(f"y and {name} differ in length: {y.shape[0]} vs {s.shape[0]}")
    if y.size == 0:
        raise DataError("no samples")
    if not np.all(np.isfinite(s)):
        raise DataError(f"{name} contain NaN or infinite values")
    if y.dtype == bool:
        y = y.astype(int)
    if not np.all(np.isin(y, (0, 1))):
        raise DataError(f"binary labels must be 0 or 1, got values {np.unique(y)[:10].tolist()}")
    y = y.astype(int)
    if need_both:
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == y.size:
            only = "positive (1)" if n_pos else "negative (0)"
            raise DataError(
                f"only one class present ({y.size} samples, all {only}); "
                f"{what} needs both positives and negatives"
            )
    return y, s


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


def _ci_list(k: int, n: int, alpha: float) -> list[float] | None:
    if n == 0:
        return None
    lo, hi = wilson_ci(k, n, alpha)
    return [lo, hi]


# --------------------------------------------------------------- intervals
def wilson_ci(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (nan, nan) if n == 0."""
    if n < 0 or k < 0 or k > n:
        raise DataError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (float("nan"), float("nan"))
    z = _z(alpha)
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (float(lo), float(hi))


# --------------------------------------------------------------- ROC / PR
def _clf_curve(y, s):
    """Cumulative fps, tps at each distinct score (descending) and the scores."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), y.size - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    return fps.astype(float), tps.astype(float), s_sorted[last]


def roc_curve(y, scores):
    """(fpr, tpr, thresholds); thresholds descending, the first +inf (sklearn-style)."""
    y, s = check_binary(y, scores)
    fps, tps, thr = _clf_curve(y, s)
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thr]


def roc_auc(y, scores) -> float:
    """Mann-Whitney AUC, ties counted 1/2; DataError if only one class."""
    y, s = check_binary(y, scores)
    ranks = _midranks(s)  # average ranks handle ties as 1/2
    n1 = int(y.sum())
    n0 = y.size - n1
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def _midrank(x: np.ndarray) -> np.ndarray:
    """Midranks (1-based, ties averaged) as in Sun & Xu (2014)."""
    return _midranks(x)


def delong_ci(y, scores, alpha: float = 0.05) -> tuple[float, float, float]:
    """(auc, lo, hi) with DeLong's variance (fast midrank algorithm), clipped to [0, 1]."""
    y, s = check_binary(y, scores)
    z = _z(alpha)
    pos, neg = s[y == 1], s[y == 0]
    m, n = pos.size, neg.size
    tx, ty, tz = _midrank(pos), _midrank(neg), _midrank(np.r_[pos, neg])
    auc = (tz[:m].sum() - m * (m + 1) / 2.0) / (m * n)
    v01 = (tz[:m] - tx) / n          # structural components of positives
    v10 = 1.0 - (tz[m:] - ty) / m    # structural components of negatives
    sx = np.var(v01, ddof=1) if m > 1 else 0.0
    sy = np.var(v10, ddof=1) if n > 1 else 0.0
    se = float(np.sqrt(max(sx / m + sy / n, 0.0)))
    lo, hi = max(0.0, auc - z * se), min(1.0, auc + z * se)
    return float(auc), float(lo), float(hi)


def pr_curve(y, scores):
    """(precision, recall, thresholds) like sklearn's precision_recall_curve."""
    y, s = check_binary(y, scores)
    fps, tps, thr = _clf_curve(y, s)
    ps = tps + fps
    precision = np.divide(tps, ps, out=np.zeros_like(tps), where=ps != 0)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thr[::-1]


def average_precision(y, scores) -> float:
    """Step-wise average precision: sum over thresholds of (R_k - R_{k-1}) P_k."""
    precision, recall, _ = pr_curve(y, scores)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


# ------------------------------------------------------------ calibration
def brier_score(y, p) -> float:
    """Mean squared difference between P(positive) and the 0/1 outcome."""
    y, p = check_binary(y, p, need_both=False, name="p")
    return float(np.mean((p - y) ** 2))


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise DataError(f"n_bins must be a positive integer, got {n_bins!r}")
    if np.any((p < 0) | (p > 1)):
        raise DataError("probabilities must lie in [0, 1]")
    return np.minimum((p * n_bins).astype(int), n_bins - 1)


def reliability_bins(y, p, n_bins: int = 10) -> dict:
    """Equal-width bins on p: edges, mean predicted, fraction positive, count (NaN if empty)."""
    y, p = check_binary(y, p, need_both=False, name="p")
    idx = _bin_index(p, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y.astype(float), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(count > 0, sum_p / np.maximum(count, 1), np.nan)
        frac = np.where(count > 0, sum_y / np.maximum(count, 1), np.nan)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {
        "bin_lower": edges[:-1], "bin_upper": edges[1:], "mean_predicted": mean_p,
        "fraction_positive": frac, "count": count,
    }


def expected_calibration_error(y, p, n_bins: int = 10) -> float:
    """Count-weighted mean of |fraction positive - mean predicted| over equal-width bins."""
    b = reliability_bins(y, p, n_bins)
    ok = b["count"] > 0
    w = b["count"][ok] / b["count"].sum()
    return float(np.sum(w * np.abs(b["fraction_positive"][ok] - b["mean_predicted"][ok])))


# ---------------------------------------------------------------- reports
def binary_report(y_true, scores, threshold: float, *, alpha: float = 0.05) -> dict:
    """Confusion counts, proportions with Wilson CIs, AUC with DeLong CI, Brier, ECE."""
    y, s = check_binary(y_true, scores)
    if not np.isfinite(threshold):
        raise DataError(f"threshold must be finite, got {threshold!r}")
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    n, n_pos, n_neg = int(y.size), tp + fn, tn + fp
    auc, lo, hi = delong_ci(y, s, alpha)
    in_unit = bool(np.all((s >= 0) & (s <= 1)))
    return {
        "n": n, "n_positive": n_pos, "n_negative": n_neg, "threshold": float(threshold),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": _ratio(tp + tn, n), "accuracy_ci": _ci_list(tp + tn, n, alpha),
        "sensitivity": _ratio(tp, n_pos), "sensitivity_ci": _ci_list(tp, n_pos, alpha),
        "specificity": _ratio(tn, n_neg), "specificity_ci": _ci_list(tn, n_neg, alpha),
        "ppv": _ratio(tp, tp + fp), "ppv_ci": _ci_list(tp, tp + fp, alpha),
        "npv": _ratio(tn, tn + fn), "npv_ci": _ci_list(tn, tn + fn, alpha),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auc": auc, "auc_ci": [lo, hi],
        "brier": brier_score(y, s) if in_unit else None,
        "ece": expected_calibration_error(y, s) if in_unit else None,
    }


def multiclass_report(y_true_idx, probs, labels: list[str], *, alpha: float = 0.05) -> dict:
    """Argmax predictions; accuracy, confusion matrix, one-vs-rest per-class metrics, macros."""
    y = np.asarray(y_true_idx)
    P = np.asarray(probs, dtype=float)
    k = len(labels)
    if k < 2:
        raise DataError(f"need at least two labels, got {list(labels)!r}")
    if P.ndim != 2 or P.shape[1] != k:
        raise DataError(f"probs must have shape (n, {k}), got {P.shape}")
    if y.ndim != 1 or y.shape[0] != P.shape[0] or y.size == 0:
        raise DataError(f"y_true_idx must be 1-D with {P.shape[0]} entries, got shape {y.shape}")
    if not np.all(np.isfinite(P)):
        raise DataError("probs contain NaN or infinite values")
    if not np.issubdtype(y.dtype, np.number) or np.any(y != np.round(y)) \
            or y.min() < 0 or y.max() >= k:
        raise DataError(f"y_true_idx must be integers in [0, {k - 1}]")
    y = y.astype(int)
    present = np.unique(y)
    if present.size < 2:
        raise DataError(
            f"only one class present ({labels[int(present[0])]!r}); "
            "the report needs at least two classes in y_true"
        )
    n = int(y.size)
    pred = np.argmax(P, axis=1)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y, pred), 1)
    correct = int(np.trace(cm))
    per_class: dict[str, dict] = {}
    for c, name in enumerate(labels):
        yt = (y == c).astype(int)
        tp = int(cm[c, c])
        fn = int(cm[c].sum()) - tp
        fp = int(cm[:, c].sum()) - tp
        tn = n - tp - fn - fp
        if 0 < yt.sum() < n:
            auc, lo, hi = delong_ci(yt, P[:, c], alpha)
            auc_ci = [lo, hi]
        else:
            auc, auc_ci = None, None
        per_class[name] = {
            "auc": auc, "auc_ci": auc_ci,
            "sensitivity": _ratio(tp, tp + fn), "sensitivity_ci": _ci_list(tp, tp + fn, alpha),
            "specificity": _ratio(tn, tn + fp), "specificity_ci": _ci_list(tn, tn + fp, alpha),
            "ppv": _ratio(tp, tp + fp), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "support": tp + fn,
        }

    def macro(key: str) -> float | None:
        vals = [d[key] for d in per_class.values() if d[key] is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "n": n, "accuracy": correct / n, "accuracy_ci": _ci_list(correct, n, alpha),
        "confusion_matrix": cm.tolist(), "labels": list(labels), "per_class": per_class,
        "macro_auc": macro("auc"), "macro_f1": macro("f1"),
        "macro_sensitivity": macro("sensitivity"), "macro_specificity": macro("specificity"),
    }


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}"


def _fmt_min(x: float) -> str:
    return f"{100.0 * x:.10g}%"


def who_verdict(report: dict, *, min_sensitivity: float = 0.90, min_specificity: float = 0.70) -> str:
    """One line comparing a binary report's sensitivity/specificity with the WHO TPP minimums."""
    head = (f"WHO TPP (sens >= {_fmt_min(min_sensitivity)}, "
            f"spec >= {_fmt_min(min_specificity)}): ")
    parts, meets, lower_meets = [], True, True
    for key, minimum in (("sensitivity", min_sensitivity), ("specificity", min_specificity)):
        val, ci = report.get(key), report.get(f"{key}_ci")
        if val is None:
            parts.append(f"{key} n/a")
            meets = lower_meets = False
            continue
        text = f"{key} {_pct(val)}%"
        if ci is not None and ci[0] is not None:
            text += f" [{_pct(ci[0])}-{_pct(ci[1])}]"
            lower_meets = lower_meets and ci[0] >= minimum
        else:
            lower_meets = False
        meets = meets and val >= minimum
        parts.append(text)
    line = head + ", ".join(parts) + (" -> meets" if meets else " -> does not meet")
    if meets and lower_meets:
        level = 100.0 * (1.0 - float(report.get("alpha", 0.05)))
        line += f" (also at the lower {level:.10g}% bound)"
    return line


def bootstrap_ci(fn: Callable, y, scores, *, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile CI of fn(y, scores) under a stratified bootstrap (classes resampled separately)."""
    y, s = check_binary(y, scores)
    _z(alpha)
    if n_boot < 1:
        raise DataError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    stats = np.empty(n_boot, dtype=float)
    for b in range(n_boot):
        idx = np.r_[rng.choice(pos, pos.size, replace=True), rng.choice(neg, neg.size, replace=True)]
        v = fn(y[idx], s[idx])
        stats[b] = np.nan if v is None else float(v)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(lo), float(hi))


def test_report(y_idx, probs, labels: list[str], positive: int | None, threshold: float | None,
                raw_positive_scores=None) -> dict:
    """The test split's report: binary at the operating point (with the WHO verdict and, given the uncalibrated
    scores, their ECE), else per-class."""
    if positive is None or threshold is None:
        return multiclass_report(y_idx, probs, labels)
    y = (np.asarray(y_idx) == positive).astype(int)
    report = binary_report(y, np.asarray(probs)[:, positive], threshold)
    report["who_verdict"] = who_verdict(report)
    if raw_positive_scores is not None:
        report["ece_uncalibrated"] = binary_report(y, raw_positive_scores, threshold)["ece"]
    return report


test_report.__test__ = False  # a report of the test split, not a pytest test
