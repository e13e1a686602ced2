"""Tests for cxrlab.metrics: hand-computed cases, scikit-learn agreement, CIs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cxrlab.errors import DataError
from cxrlab.metrics import (
    average_precision, binary_report, bootstrap_ci, brier_score, delong_ci,
    expected_calibration_error, multiclass_report, pr_curve, reliability_bins,
    roc_auc, roc_curve, who_verdict, wilson_ci,
)

skm = pytest.importorskip("sklearn.metrics")

# Hand example: positives score 0.35, 0.7, 0.9; negatives 0.1, 0.4, 0.8.
#   AUC: 0.35 beats 1 negative, 0.7 beats 2, 0.9 beats 3 -> 6/9 = 2/3.
#   Threshold 0.5: predicted positive = {0.8 (neg), 0.7 (pos), 0.9 (pos)}
#   -> tp=2 fp=1 tn=2 fn=1; sens = spec = ppv = npv = acc = f1 = 2/3.
#   Brier: (0.1^2 + 0.4^2 + 0.65^2 + 0.8^2 + 0.3^2 + 0.1^2) / 6 = 1.3325 / 6.
#   ECE (10 bins, each sample alone in its bin): (0.1+0.4+0.65+0.8+0.3+0.1)/6 = 2.35/6.
Y6 = np.array([0, 0, 1, 0, 1, 1])
S6 = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9])


def random_tied(seed, n=200):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.clip(np.round(0.3 * y + rng.normal(0.4, 0.25, n), 1), 0, 1)  # heavy ties
    y[:2] = [0, 1]
    return y, s


# ----------------------------------------------------------------- AUC
def test_perfect_inverted_tied():
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    r = binary_report(y, [0.1, 0.2, 0.8, 0.9], 0.5)
    assert r["sensitivity"] == r["specificity"] == r["accuracy"] == 1.0
    assert r["auc"] == 1.0 and r["auc_ci"] == [1.0, 1.0]


def test_hand_example():
    assert roc_auc(Y6, S6) == pytest.approx(2 / 3)
    r = binary_report(Y6, S6, 0.5)
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (2, 1, 2, 1)
    assert (r["n"], r["n_positive"], r["n_negative"]) == (6, 3, 3)
    for key in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "f1", "auc"):
        assert r[key] == pytest.approx(2 / 3), key
    assert r["brier"] == pytest.approx(1.3325 / 6)
    assert brier_score(Y6, S6) == pytest.approx(1.3325 / 6)
    assert r["ece"] == pytest.approx(2.35 / 6)
    assert r["sensitivity_ci"] == pytest.approx(list(wilson_ci(2, 3)))


@pytest.mark.parametrize("fn", [roc_auc, delong_ci, roc_curve, pr_curve, average_precision])
@pytest.mark.parametrize("y", [[1, 1, 1], [0, 0, 0]])
def test_single_class_raises(fn, y):
    with pytest.raises(DataError, match="only one class"):
        fn(np.array(y), np.array([0.2, 0.5, 0.9]))


def test_single_class_report_raises():
    with pytest.raises(DataError, match="only one class"):
        binary_report([1, 1], [0.3, 0.8], 0.5)
    with pytest.raises(DataError, match="only one class"):
        multiclass_report([2, 2], np.full((2, 3), 1 / 3), ["a", "b", "c"])


def test_bad_input_raises():
    with pytest.raises(DataError):
        roc_auc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(DataError):
        roc_auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(DataError):
        roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(DataError):
        expected_calibration_error([0, 1], [0.1, 1.5])


# -------------------------------------------------------- sklearn agreement
@pytest.mark.parametrize("seed", range(5))
def test_against_sklearn(seed):
    y, s = random_tied(seed)
    assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    fpr, tpr, thr = roc_curve(y, s)
    f2, t2, th2 = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)
    assert thr[0] == np.inf and np.all(np.diff(thr) < 0)
    np.testing.assert_allclose(thr[1:], th2[1:])
    p, r, t = pr_curve(y, s)
    p2, r2, t2_ = skm.precision_recall_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(p, p2)
    np.testing.assert_allclose(r, r2)
    np.testing.assert_allclose(t, t2_)
    assert average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s))
    assert brier_score(y, s) == pytest.approx(skm.brier_score_loss(y, s))
    rep = binary_report(y, s, 0.5)
    tn, fp, fn, tp = skm.confusion_matrix(y, (s >= 0.5).astype(int)).ravel()
    assert (rep["tn"], rep["fp"], rep["fn"], rep["tp"]) == (tn, fp, fn, tp)


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, k = 300, 3
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    P = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    rep = multiclass_report(y, P, ["normal", "tb", "other"])
    assert rep["confusion_matrix"] == skm.confusion_matrix(y, P.argmax(1)).tolist()
    assert rep["accuracy"] == pytest.approx(np.mean(y == P.argmax(1)))
    for c, name in enumerate(["normal", "tb", "other"]):
        d = rep["per_class"][name]
        assert d["auc"] == pytest.approx(skm.roc_auc_score(y == c, P[:, c]))
        assert d["support"] == int(np.sum(y == c))
        assert d["sensitivity"] == pytest.approx(skm.recall_score(y, P.argmax(1), labels=[c], average=None)[0])
        assert d["f1"] == pytest.approx(skm.f1_score(y, P.argmax(1), labels=[c], average=None)[0])
        assert d["auc_ci"][0] <= d["auc"] <= d["auc_ci"][1]
    assert rep["macro_f1"] == pytest.approx(skm.f1_score(y, P.argmax(1), average="macro"))
    assert rep["macro_auc"] == pytest.approx(skm.roc_auc_score(y, P, multi_class="ovr", average="macro"))
    json.dumps(rep)


# ---------------------------------------------------------------- CIs
def test_wilson_known_values():
    lo, hi = wilson_ci(81, 263)
    # p=0.30798, z=1.95996: centre=(p+z^2/2n)/(1+z^2/n), half=z*sqrt(p(1-p)/n+z^2/4n^2)/(1+z^2/n)
    assert lo == pytest.approx(0.25529, abs=1e-4)
    assert hi == pytest.approx(0.36621, abs=1e-4)
    assert wilson_ci(0, 10)[0] == 0.0 and wilson_ci(10, 10)[1] == 1.0
    assert all(math.isnan(v) for v in wilson_ci(0, 0))


def _delong_bruteforce(y, s):
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(1), psi.mean(0)
    return psi.mean(), np.var(v10, ddof=1) / pos.size + np.var(v01, ddof=1) / neg.size


@pytest.mark.parametrize("seed", range(3))
def test_delong_matches_bruteforce(seed):
    y, s = random_tied(seed, 150)
    auc, lo, hi = delong_ci(y, s)
    auc_bf, var_bf = _delong_bruteforce(y, s)
    assert auc == pytest.approx(auc_bf)
    assert lo <= auc <= hi
    assert (hi - lo) / 2 == pytest.approx(1.959964 * math.sqrt(var_bf), rel=1e-5)


def test_delong_narrows_with_n():
    widths = []
    for n in (50, 200, 1000):
        y, s = random_tied(7, n)
        auc, lo, hi = delong_ci(y, s)
        assert lo <= auc <= hi and 0 <= lo and hi <= 1
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]


def test_bootstrap_deterministic():
    y, s = random_tied(3, 120)
    a = bootstrap_ci(roc_auc, y, s, n_boot=200, seed=5)
    b = bootstrap_ci(roc_auc, y, s, n_boot=200, seed=5)
    c = bootstrap_ci(roc_auc, y, s, n_boot=200, seed=6)
    assert a == b and a != c
    assert a[0] <= roc_auc(y, s) <= a[1]


# ------------------------------------------------------------ calibration
def test_reliability_bins_and_ece():
    b = reliability_bins(Y6, S6, n_bins=10)
    assert b["count"].sum() == 6 and len(b["bin_lower"]) == 10
    assert b["count"][3] == 1 and b["fraction_positive"][3] == 1.0
    assert math.isnan(b["mean_predicted"][0])
    assert expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.0


# ---------------------------------------------------------------- report
def test_report_is_json_safe_with_none():
    r = binary_report([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 0.9)  # nothing predicted positive
    assert r["ppv"] is None and r["ppv_ci"] is None and r["f1"] == 0.0
    assert r["npv"] == 0.5
    json.dumps(r, allow_nan=False)
    for v in r.values():
        assert not isinstance(v, np.generic)


def test_who_verdict_format():
    rep = {"sensitivity": 0.912, "sensitivity_ci": [0.85, 0.95],
           "specificity": 0.74, "specificity_ci": [0.661, 0.806]}
    assert who_verdict(rep) == (
        "WHO TPP (sens >= 90%, spec >= 70%): sensitivity 91.2% [85.0-95.0], "
        "specificity 74.0% [66.1-80.6] -> meets")
    rep["specificity"] = 0.69
    assert who_verdict(rep).endswith("-> does not meet")
    strong = {"sensitivity": 0.97, "sensitivity_ci": [0.92, 0.99],
              "specificity": 0.85, "specificity_ci": [0.75, 0.9]}
    assert who_verdict(strong).endswith("-> meets (also at the lower 95% bound)")
    assert "sens >= 85%" in who_verdict(strong, min_sensitivity=0.85)
    assert who_verdict({"sensitivity": None, "specificity": 0.8}).endswith("does not meet")
