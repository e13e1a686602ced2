"""(y_true, scores) -> metrics with confidence intervals.

Curves, AUC, average precision, Brier score and reliability bins come from scikit-learn; the
Wilson interval and the bootstrap from scipy. DeLong's AUC variance has no mainstream
implementation and is computed here. Binary labels are 0/1 with 1 the positive class; scores are
P(positive) or any monotone score. Reports are JSON-safe: plain floats, lists, and ``None`` for
undefined ratios.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from scipy import stats
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from .errors import DataError

__all__ = [
    "WHO_MIN_SENSITIVITY", "WHO_MIN_SPECIFICITY",
    "check_binary", "wilson_ci", "roc_curve", "roc_auc", "delong_ci", "pr_curve", "roc_band",
    "average_precision", "brier_score", "expected_calibration_error",
    "reliability_bins", "binary_report", "multiclass_report", "meets_who", "who_assessment", "who_verdict",
    "test_report", "percent", "sample_warning", "with_sample_warning",
    "bootstrap_ci",
]

# WHO target product profile for a TB triage test (2014): minimum sensitivity and specificity.
WHO_MIN_SENSITIVITY = 0.90
WHO_MIN_SPECIFICITY = 0.70
# Fewer images of a class than this in a report and its figures are flagged as unreliable: at 20 a Wilson 95% CI
# of a proportion near 90% is still about 25 points wide.
MIN_RELIABLE_PER_CLASS = 20


# ----------------------------------------------------------------- helpers
def _z(alpha: float) -> float:
    _check_alpha(alpha)
    return float(stats.norm.ppf(1.0 - alpha / 2.0))


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise DataError(f"alpha must be in (0, 1), got {alpha!r}")


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


def _check_probabilities(y, p):
    y, p = check_binary(y, p, need_both=False, name="p")
    if np.any((p < 0) | (p > 1)):
        raise DataError("probabilities must lie in [0, 1]")
    return y, p


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


def _ci_list(k: int, n: int, alpha: float) -> list[float] | None:
    return None if n == 0 else list(wilson_ci(k, n, alpha))


# --------------------------------------------------------------- intervals
def wilson_ci(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (nan, nan) if n == 0."""
    if n < 0 or k < 0 or k > n:
        raise DataError(f"need 0 <= k <= n, got k={k}, n={n}")
    _check_alpha(alpha)
    if n == 0:
        return (float("nan"), float("nan"))
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=1.0 - alpha, method="wilson")
    return (float(ci.low), float(ci.high))


def delong_ci(y, scores, alpha: float = 0.05) -> tuple[float, float, float]:
    """(auc, lo, hi) with DeLong's variance (Sun & Xu's fast midrank algorithm), clipped to [0, 1]."""
    y, s = check_binary(y, scores)
    z = _z(alpha)
    pos, neg = s[y == 1], s[y == 0]
    m, n = pos.size, neg.size
    tx, ty, tz = stats.rankdata(pos), stats.rankdata(neg), stats.rankdata(np.r_[pos, neg])
    auc = (tz[:m].sum() - m * (m + 1) / 2.0) / (m * n)
    v01 = (tz[:m] - tx) / n          # structural components of positives
    v10 = 1.0 - (tz[m:] - ty) / m    # structural components of negatives
    sx = np.var(v01, ddof=1) if m > 1 else 0.0
    sy = np.var(v10, ddof=1) if n > 1 else 0.0
    se = float(np.sqrt(max(sx / m + sy / n, 0.0)))
    return float(auc), float(max(0.0, auc - z * se)), float(min(1.0, auc + z * se))


def bootstrap_ci(fn: Callable, y, scores, *, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile CI of fn(y, scores) under a stratified bootstrap (classes resampled separately).

    Resamples where ``fn`` is undefined (None or NaN) are left out; (nan, nan) if all are."""
    y, s = check_binary(y, scores)
    _check_alpha(alpha)

    def value(yb, sb) -> float:
        v = fn(yb, sb)
        return np.nan if v is None else float(v)

    dist = _stratified_bootstrap(value, y, s, n_boot, seed)
    dist = dist[np.isfinite(dist)]
    if dist.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(dist, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(lo), float(hi))


def _stratified_bootstrap(statistic, y, s, n_boot: int, seed: int) -> np.ndarray:
    """statistic(y, s) over ``n_boot`` resamples that keep the class counts (scipy resamples each
    sample separately); the bootstrap distribution, one row per resample."""
    if n_boot < 1:
        raise DataError(f"n_boot must be >= 1, got {n_boot}")
    pos, neg = s[y == 1], s[y == 0]
    if min(pos.size, neg.size) < 2:
        raise DataError(f"a bootstrap needs at least 2 positives and 2 negatives, got {pos.size} and {neg.size}")
    y_b = np.r_[np.ones(pos.size, int), np.zeros(neg.size, int)]
    with warnings.catch_warnings():  # the callers take the percentiles, leaving undefined resamples out
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap((pos, neg), lambda p, n: statistic(y_b, np.r_[p, n]), n_resamples=n_boot,
                              vectorized=False, method="percentile", rng=np.random.default_rng(seed))
    return np.asarray(res.bootstrap_distribution, dtype=float).T


# --------------------------------------------------------------- ROC / PR
def roc_curve(y, scores):
    """(fpr, tpr, thresholds) at every distinct score; thresholds descending, the first +inf."""
    y, s = check_binary(y, scores)
    return skm.roc_curve(y, s, drop_intermediate=False)


def roc_auc(y, scores) -> float:
    """Mann-Whitney AUC, ties counted 1/2; DataError if only one class."""
    y, s = check_binary(y, scores)
    return float(skm.roc_auc_score(y, s))


def roc_band(y, scores, *, n_boot: int = 200, seed: int = 0, alpha: float = 0.05, points: int = 101):
    """Stratified bootstrap band of the ROC, vertically averaged on a fixed FPR grid: (grid, lo, hi)."""
    y, s = check_binary(y, scores)
    _check_alpha(alpha)
    grid = np.linspace(0.0, 1.0, points)

    def tpr_on_grid(yb, sb):
        fpr, tpr, _ = skm.roc_curve(yb, sb, drop_intermediate=False)
        return np.interp(grid, fpr, tpr)

    tprs = _stratified_bootstrap(tpr_on_grid, y, s, n_boot, seed)
    lo, hi = np.quantile(tprs, [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
    return grid, lo, hi


def pr_curve(y, scores):
    """(precision, recall, thresholds) at every distinct score, as sklearn's precision_recall_curve."""
    y, s = check_binary(y, scores)
    return skm.precision_recall_curve(y, s, drop_intermediate=False)


def average_precision(y, scores) -> float:
    """Step-wise average precision: sum over thresholds of (R_k - R_{k-1}) P_k."""
    y, s = check_binary(y, scores)
    return float(skm.average_precision_score(y, s))


# ------------------------------------------------------------ calibration
def brier_score(y, p) -> float:
    """Mean squared difference between P(positive) and the 0/1 outcome."""
    y, p = _check_probabilities(y, p)
    return float(skm.brier_score_loss(y, p, pos_label=1))


def reliability_bins(y, p, n_bins: int = 10) -> dict:
    """Equal-width bins (a, b] on p (the first also holds 0), as sklearn's calibration_curve:
    edges, mean predicted, fraction positive (NaN where empty) and count."""
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise DataError(f"n_bins must be a positive integer, got {n_bins!r}")
    y, p = _check_probabilities(y, p)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    frac_nonempty, mean_nonempty = calibration_curve(y, p, n_bins=n_bins, strategy="uniform", pos_label=1)
    # calibration_curve drops empty bins and returns no counts: count with its own bin rule.
    count = np.bincount(np.searchsorted(edges[1:-1], p), minlength=n_bins)
    mean_p, frac = np.full(n_bins, np.nan), np.full(n_bins, np.nan)
    mean_p[count > 0], frac[count > 0] = mean_nonempty, frac_nonempty
    return {"bin_lower": edges[:-1], "bin_upper": edges[1:], "mean_predicted": mean_p,
            "fraction_positive": frac, "count": count}


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
    tn, fp, fn, tp = (int(v) for v in skm.confusion_matrix(y, (s >= threshold).astype(int), labels=[0, 1]).ravel())
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


def _check_multiclass(y, P, labels) -> np.ndarray:
    k = len(labels)
    if k < 2:
        raise DataError(f"need at least two labels, got {list(labels)!r}")
    if P.ndim != 2 or P.shape[1] != k:
        raise DataError(f"probs must have shape (n, {k}), got {P.shape}")
    if y.ndim != 1 or y.shape[0] != P.shape[0] or y.size == 0:
        raise DataError(f"y_true_idx must be 1-D with {P.shape[0]} entries, got shape {y.shape}")
    if not np.all(np.isfinite(P)):
        raise DataError("probs contain NaN or infinite values")
    if not np.issubdtype(y.dtype, np.number) or np.any(y != np.round(y)) or y.min() < 0 or y.max() >= k:
        raise DataError(f"y_true_idx must be integers in [0, {k - 1}]")
    y = y.astype(int)
    present = np.unique(y)
    if present.size < 2:
        raise DataError(f"only one class present ({labels[int(present[0])]!r}); "
                        "the report needs at least two classes in y_true")
    return y


def multiclass_report(y_true_idx, probs, labels: list[str], *, alpha: float = 0.05) -> dict:
    """Argmax predictions; accuracy, confusion matrix, one-vs-rest per-class metrics, macros."""
    P = np.asarray(probs, dtype=float)
    y = _check_multiclass(np.asarray(y_true_idx), P, labels)
    n, k = int(y.size), len(labels)
    cm = skm.confusion_matrix(y, np.argmax(P, axis=1), labels=list(range(k)))
    correct = int(np.trace(cm))
    per_class: dict[str, dict] = {}
    for c, name in enumerate(labels):
        yt = (y == c).astype(int)
        tp = int(cm[c, c])
        fn = int(cm[c].sum()) - tp
        fp = int(cm[:, c].sum()) - tp
        tn = n - tp - fn - fp
        auc, lo, hi = delong_ci(yt, P[:, c], alpha) if 0 < yt.sum() < n else (None, None, None)
        per_class[name] = {
            "auc": auc, "auc_ci": None if auc is None else [lo, hi],
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


def percent(value: float | None, ci=None) -> str:
    """A proportion as '91.2%', with its interval as '91.2% [85.0%-95.0%]'; 'n/a' when undefined. The one
    style of every percentage cxrlab prints or reports."""
    if value is None or not np.isfinite(float(value)):
        return "n/a"
    text = f"{100.0 * value:.1f}%"
    if ci is not None and ci[0] is not None and ci[1] is not None and np.isfinite(float(ci[0])):
        text += f" [{100.0 * ci[0]:.1f}%-{100.0 * ci[1]:.1f}%]"
    return text


def _fmt_min(x: float) -> str:
    return f"{100.0 * x:.10g}%"


def meets_who(sensitivity: float | None, specificity: float | None) -> bool:
    """Whether a point reaches the WHO target product profile's minimums (missing figures do not)."""
    return bool((sensitivity or 0) >= WHO_MIN_SENSITIVITY and (specificity or 0) >= WHO_MIN_SPECIFICITY)


def who_assessment(report: dict, *, min_sensitivity: float = WHO_MIN_SENSITIVITY,
                   min_specificity: float = WHO_MIN_SPECIFICITY) -> dict:
    """Each WHO target product profile criterion judged with its confidence interval: ``met`` (the whole CI
    reaches the target), ``fails`` (the whole CI lies below it), ``inconclusive`` (the CI contains it), ``n/a``.
    Without a CI the point estimate decides (``met`` / ``fails``). ``verdict``: ``meets`` when every criterion is
    met, ``fails`` when any fails, ``n/a`` when one cannot be judged, else ``inconclusive``."""
    criteria = {}
    for key, target in (("sensitivity", min_sensitivity), ("specificity", min_specificity)):
        value, ci = report.get(key), report.get(f"{key}_ci")
        if value is None or not np.isfinite(float(value)):
            status = "n/a"
        elif ci is None or ci[0] is None or not np.isfinite(float(ci[0])):
            status = "met" if value >= target else "fails"
        elif ci[0] >= target:
            status = "met"
        elif ci[1] < target:
            status = "fails"
        else:
            status = "inconclusive"
        criteria[key] = {"status": status, "target": target, "value": value, "ci": ci}
    statuses = [c["status"] for c in criteria.values()]
    verdict = ("meets" if all(s == "met" for s in statuses) else "fails" if "fails" in statuses
               else "n/a" if "n/a" in statuses else "inconclusive")
    return {"verdict": verdict, "criteria": criteria}


def who_verdict(report: dict, *, min_sensitivity: float = WHO_MIN_SENSITIVITY,
                min_specificity: float = WHO_MIN_SPECIFICITY) -> str:
    """One line comparing a binary report's sensitivity/specificity (95% CIs) with the WHO target product
    profile's minimums for a TB triage test, naming each criterion that fails or is inconclusive."""
    a = who_assessment(report, min_sensitivity=min_sensitivity, min_specificity=min_specificity)
    c = a["criteria"]
    head = (f"WHO target product profile for TB triage (sensitivity >= {_fmt_min(min_sensitivity)}, "
            f"specificity >= {_fmt_min(min_specificity)}): ")
    figures = ", ".join(f"{key} {percent(v['value'], v['ci'])}" for key, v in c.items())
    why = {"fails": "fails: its whole 95% CI lies below {t}", "inconclusive": "inconclusive: its 95% CI contains {t}",
           "n/a": "not measured"}
    order = {"fails": 0, "n/a": 1, "inconclusive": 2}
    reasons = "; ".join(f"{key} {why[v['status']].format(t=_fmt_min(v['target']))}" for key, v in
                        sorted(c.items(), key=lambda kv: order.get(kv[1]["status"], 3)) if v["status"] in why)
    if a["verdict"] == "meets":
        tail = "meets (both targets reached even at the lower end of their 95% CIs)"
    else:
        word = {"fails": "does not meet", "inconclusive": "inconclusive", "n/a": "cannot be judged"}[a["verdict"]]
        tail = f"{word} ({reasons})"
    return f"{head}{figures} -> {tail}"


def sample_warning(report: dict | None) -> str | None:
    """A warning when a report's figures rest on too few images to mean much: fewer than
    MIN_RELIABLE_PER_CLASS images of a class, or a confidence interval of zero width (such as AUC 1.000
    [1.000-1.000] from a handful of films). None when neither holds."""
    if not report:
        return None
    if "per_class" in report:
        counts = {name: d.get("support") or 0 for name, d in report["per_class"].items()}
    else:
        counts = {"positive": report.get("n_positive") or 0, "negative": report.get("n_negative") or 0}
    few = {name: n for name, n in counts.items() if n < MIN_RELIABLE_PER_CLASS}
    degenerate = [key for key in ("auc", "sensitivity", "specificity", "accuracy")
                  if isinstance(report.get(f"{key}_ci"), (list, tuple)) and None not in report[f"{key}_ci"]
                  and report[f"{key}_ci"][0] == report[f"{key}_ci"][1]]
    if not few and not degenerate:
        return None
    parts = []
    if few:
        parts.append("only " + ", ".join(f"{n} {name}" for name, n in few.items()) + " image(s)")
    if degenerate:
        parts.append(f"a 95% CI of zero width ({', '.join(degenerate)})")
    advice = (f"test on at least {MIN_RELIABLE_PER_CLASS} images of each class" if few else
              "an interval of zero width understates the uncertainty; more images are needed")
    return f"these figures rest on {' and '.join(parts)}: they are unreliable; {advice}"


def test_report(y_idx, probs, labels: list[str], positive: int | None, threshold: float | None,
                raw_positive_scores=None) -> dict:
    """The test split's report: binary at the operating point (with the WHO verdict and, given the uncalibrated
    scores, their ECE), else per-class."""
    if positive is None or threshold is None:
        return with_sample_warning(multiclass_report(y_idx, probs, labels))
    y = (np.asarray(y_idx) == positive).astype(int)
    report = binary_report(y, np.asarray(probs)[:, positive], threshold)
    report["who_verdict"] = who_verdict(report)
    report["who_status"] = who_assessment(report)["verdict"]
    if raw_positive_scores is not None:
        report["ece_uncalibrated"] = binary_report(y, raw_positive_scores, threshold)["ece"]
    return with_sample_warning(report)


def with_sample_warning(report: dict) -> dict:
    """``report`` with its ``sample_warning`` (see :func:`sample_warning`) when it has one."""
    warning = sample_warning(report)
    return {**report, "sample_warning": warning} if warning else report


test_report.__test__ = False  # a report of the test split, not a pytest test
