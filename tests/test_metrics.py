"""Tests for cxrlab.metrics: hand-computed and published values, brute-force definitions, CIs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import sklearn.metrics as skm

from cxrlab.errors import DataError
from cxrlab.metrics import (
    WHO_MIN_SENSITIVITY, WHO_MIN_SPECIFICITY, average_precision, binary_report, bootstrap_ci, brier_score,
    delong_ci, expected_calibration_error, multiclass_report, pr_curve, reliability_bins, roc_auc,
    roc_band, roc_curve, who_verdict, wilson_ci, who_assessment, sample_warning, percent, test_report,
)

# Hand example: positives score 0.35, 0.7, 0.9; negatives 0.1, 0.4, 0.8.
#   AUC: 0.35 beats 1 negative, 0.7 beats 2, 0.9 beats 3 -> 6/9 = 2/3.
#   Threshold 0.5: predicted positive = {0.8 (neg), 0.7 (pos), 0.9 (pos)}
#   -> tp=2 fp=1 tn=2 fn=1; sens = spec = ppv = npv = acc = f1 = 2/3.
#   Brier: (0.1^2 + 0.4^2 + 0.65^2 + 0.8^2 + 0.3^2 + 0.1^2) / 6 = 1.3325 / 6.
#   ECE (10 bins (a, b] as sklearn's calibration_curve): 0.35 and 0.4 share (0.3, 0.4] (fraction
#   positive 1/2, mean 0.375), every other score is alone in its bin:
#   (0.1 + 2 * 0.125 + 0.3 + 0.8 + 0.1) / 6 = 1.55 / 6.
#   DeLong: per-positive components (share of negatives beaten) 1/3, 2/3, 1 -> variance 1/9;
#   per-negative components (share of positives above) 1, 2/3, 1/3 -> 1/9;
#   Var(AUC) = 1/9 / 3 + 1/9 / 3 = 2/27.
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
    assert r["ece"] == pytest.approx(1.55 / 6)
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


# ---------------------------------------------- brute-force definitions
def _roc_by_definition(y, s):
    thresholds = np.r_[np.inf, np.unique(s)[::-1]]
    tpr = np.array([np.mean(s[y == 1] >= t) for t in thresholds])
    fpr = np.array([np.mean(s[y == 0] >= t) for t in thresholds])
    return fpr, tpr, thresholds


def _auc_by_pairs(y, s):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))


def _average_precision_by_definition(y, s):
    ap, prev_recall = 0.0, 0.0
    for t in np.unique(s)[::-1]:
        hit = s >= t
        recall = np.sum(hit & (y == 1)) / np.sum(y == 1)
        ap += (recall - prev_recall) * np.sum(hit & (y == 1)) / np.sum(hit)
        prev_recall = recall
    return ap


@pytest.mark.parametrize("seed", range(5))
def test_against_definitions(seed):
    y, s = random_tied(seed)
    assert roc_auc(y, s) == pytest.approx(_auc_by_pairs(y, s))
    fpr, tpr, thr = roc_curve(y, s)
    f2, t2, th2 = _roc_by_definition(y, s)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)
    np.testing.assert_array_equal(thr, th2)
    p, r, t = pr_curve(y, s)  # increasing thresholds, a final (precision 1, recall 0) point
    np.testing.assert_array_equal(t, np.unique(s))
    np.testing.assert_allclose(r[:-1], [np.mean(s[y == 1] >= v) for v in t])
    np.testing.assert_allclose(p[:-1], [np.mean(y[s >= v]) for v in t])
    assert (p[-1], r[-1]) == (1.0, 0.0)
    assert average_precision(y, s) == pytest.approx(_average_precision_by_definition(y, s))
    assert brier_score(y, s) == pytest.approx(np.mean((s - y) ** 2))
    rep = binary_report(y, s, 0.5)
    pred = s >= 0.5
    assert (rep["tp"], rep["fp"], rep["tn"], rep["fn"]) == (
        np.sum(pred & (y == 1)), np.sum(pred & (y == 0)), np.sum(~pred & (y == 0)), np.sum(~pred & (y == 1)))


def test_hanley_mcneil_published_auc():
    # Hanley & McNeil (1982), Radiology 143:29, table 1: 5-point ratings of 58 normal and 51
    # abnormal CT images; published area 0.893 (ties counted 1/2).
    neg, pos = [33, 6, 6, 11, 2], [3, 2, 2, 11, 33]
    s = np.r_[np.repeat(np.arange(1, 6), neg), np.repeat(np.arange(1, 6), pos)].astype(float)
    y = np.r_[np.zeros(58, int), np.ones(51, int)]
    assert roc_auc(y, s) == pytest.approx(0.8932, abs=5e-5)
    assert delong_ci(y, s)[0] == pytest.approx(0.8932, abs=5e-5)


def test_multiclass_hand_example():
    # rows: true 0, 0, 1, 1, 2, 2; argmax 0, 1, 1, 1, 2, 0 -> 4/6 correct
    P = np.array([[.7, .2, .1], [.3, .6, .1], [.1, .8, .1], [.2, .5, .3], [.1, .2, .7], [.5, .1, .4]])
    rep = multiclass_report([0, 0, 1, 1, 2, 2], P, ["a", "b", "c"])
    assert rep["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert rep["accuracy"] == pytest.approx(4 / 6)
    b = rep["per_class"]["b"]  # tp 2, fn 0, fp 1, tn 3
    assert (b["support"], b["sensitivity"], b["specificity"], b["ppv"]) == (2, 1.0, 0.75, pytest.approx(2 / 3))
    assert b["f1"] == pytest.approx(0.8)
    # class c one-vs-rest: positives 0.7, 0.4 vs negatives 0.1, 0.1, 0.1, 0.3 -> every pair ranked right
    assert rep["per_class"]["c"]["auc"] == 1.0
    assert rep["macro_sensitivity"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)


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
        assert d["auc_ci"] == list(delong_ci(y == c, P[:, c])[1:])
    assert rep["macro_f1"] == pytest.approx(skm.f1_score(y, P.argmax(1), average="macro"))
    assert rep["macro_auc"] == pytest.approx(skm.roc_auc_score(y, P, multi_class="ovr", average="macro"))
    json.dumps(rep)


# ---------------------------------------------------------------- CIs
def test_wilson_known_values():
    lo, hi = wilson_ci(81, 263)
    # p=0.30798, z=1.95996: centre=(p+z^2/2n)/(1+z^2/n), half=z*sqrt(p(1-p)/n+z^2/4n^2)/(1+z^2/n)
    assert lo == pytest.approx(0.25529, abs=1e-4)
    assert hi == pytest.approx(0.36621, abs=1e-4)
    # 8/10 by hand: centre 0.71674, half-width 0.22658
    assert wilson_ci(8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    # Newcombe (1998), Stat Med 17:857, table I, method 3 (score interval)
    for (k, n), want in {(15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611), (1, 29): (0.0061, 0.1718)}.items():
        assert wilson_ci(k, n) == pytest.approx(want, abs=1e-4), (k, n)
    assert wilson_ci(8, 10, alpha=0.10)[0] > wilson_ci(8, 10)[0]  # 90% interval is narrower
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
    assert (hi - lo) / 2 == pytest.approx(1.959964 * math.sqrt(var_bf), rel=1e-5)


def test_delong_hand_example():
    auc, lo, hi = delong_ci(Y6, S6)
    half = 1.959964 * math.sqrt(2 / 27)
    assert auc == pytest.approx(2 / 3)
    assert lo == pytest.approx(2 / 3 - half, abs=1e-6)
    assert hi == 1.0  # 2/3 + half = 1.20, clipped


def test_delong_narrows_with_n():
    widths = []
    for n in (50, 200, 1000):
        y, s = random_tied(7, n)
        auc, lo, hi = delong_ci(y, s)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]


def test_bootstrap_deterministic():
    y, s = random_tied(3, 120)
    a = bootstrap_ci(roc_auc, y, s, n_boot=100, seed=5)
    b = bootstrap_ci(roc_auc, y, s, n_boot=100, seed=5)
    c = bootstrap_ci(roc_auc, y, s, n_boot=100, seed=6)
    assert a == b and a != c
    assert a[0] < roc_auc(y, s) < a[1] and a[1] - a[0] > 0.05


def test_bootstrap_is_stratified():
    y, s = random_tied(4, 60)
    prevalence = float(np.mean(y))
    # class counts never change under a stratified bootstrap: the prevalence has a zero-width interval
    assert bootstrap_ci(lambda yb, sb: np.mean(yb), y, s, n_boot=50) == (prevalence, prevalence)
    separated = np.where(y == 1, 0.6 + 0.3 * s, 0.3 * s)  # every positive above every negative
    assert bootstrap_ci(roc_auc, y, separated, n_boot=50) == (1.0, 1.0)
    half = bootstrap_ci(lambda yb, sb: None if sb[0] > 0.5 else 0.5, y, s, n_boot=50)
    assert half == (0.5, 0.5)  # undefined resamples (None) are left out
    with pytest.raises(DataError, match="at least 2 positives"):
        bootstrap_ci(roc_auc, [0, 0, 1], [0.1, 0.2, 0.9], n_boot=10)


def test_roc_band():
    y, s = random_tied(5, 200)
    grid, lo, hi = roc_band(y, s, n_boot=100, seed=1)
    assert grid.shape == lo.shape == hi.shape == (101,)
    np.testing.assert_array_equal(roc_band(y, s, n_boot=100, seed=1)[1], lo)  # seeded
    fpr, tpr, _ = roc_curve(y, s)
    observed = np.interp(grid, fpr, tpr)
    assert np.all(lo <= hi) and np.mean((lo <= observed) & (observed <= hi)) > 0.9
    assert np.max(hi - lo) > 0.1 and hi[-1] == lo[-1] == 1.0
    separated = np.where(y == 1, 0.6 + 0.3 * s, 0.3 * s)
    _, lo_sep, _ = roc_band(y, separated, n_boot=20)
    np.testing.assert_array_equal(lo_sep[1:], 1.0)


# ------------------------------------------------------------ calibration
def test_reliability_bins_and_ece():
    b = reliability_bins(Y6, S6, n_bins=10)
    assert b["count"].tolist() == [1, 0, 0, 2, 0, 0, 1, 1, 1, 0]
    assert b["fraction_positive"][3] == 0.5 and b["mean_predicted"][3] == pytest.approx(0.375)
    assert b["mean_predicted"][0] == pytest.approx(0.1) and b["fraction_positive"][0] == 0.0
    assert math.isnan(b["mean_predicted"][1]) and math.isnan(b["fraction_positive"][9])
    assert expected_calibration_error(Y6, S6) == pytest.approx(1.55 / 6)
    assert expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.0
    assert expected_calibration_error([0, 0, 1, 1], [0.0, 0.0, 1.0, 1.0]) == 0.0
    assert expected_calibration_error([1, 1], [0.25, 0.25]) == pytest.approx(0.75)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        brier_score([0, 1], [0.2, 1.2])


# ---------------------------------------------------------------- report
def test_report_is_json_safe_with_none():
    r = binary_report([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 0.9)  # nothing predicted positive
    assert r["ppv"] is None and r["ppv_ci"] is None and r["f1"] == 0.0
    assert r["npv"] == 0.5
    json.dumps(r, allow_nan=False)
    for v in r.values():
        assert not isinstance(v, np.generic)


def test_who_verdict_format():
    """Spelled out, % with % CIs, and each criterion judged by its CI: fails (CI below), inconclusive (CI holds
    the target), met (CI above)."""
    rep = {"sensitivity": 0.912, "sensitivity_ci": [0.85, 0.95],
           "specificity": 0.74, "specificity_ci": [0.661, 0.806]}
    assert who_verdict(rep) == (
        "WHO target product profile for TB triage (sensitivity >= 90%, specificity >= 70%): sensitivity 91.2% "
        "[85.0%-95.0%], specificity 74.0% [66.1%-80.6%] -> inconclusive (sensitivity inconclusive: its 95% CI "
        "contains 90%; specificity inconclusive: its 95% CI contains 70%)")
    assert who_assessment(rep)["verdict"] == "inconclusive"
    rep.update(specificity=0.6, specificity_ci=[0.5, 0.65])
    assert who_verdict(rep).endswith("-> does not meet (specificity fails: its whole 95% CI lies below 70%; "
                                     "sensitivity inconclusive: its 95% CI contains 90%)")
    assert who_assessment(rep)["criteria"]["specificity"]["status"] == "fails"
    strong = {"sensitivity": 0.97, "sensitivity_ci": [0.92, 0.99],
              "specificity": 0.85, "specificity_ci": [0.75, 0.9]}
    assert who_verdict(strong).endswith("-> meets (both targets reached even at the lower end of their 95% CIs)")
    assert "sensitivity >= 85%" in who_verdict(strong, min_sensitivity=0.85)
    assert who_verdict({"sensitivity": None, "specificity": 0.8}).endswith("cannot be judged (sensitivity not measured)")
    assert who_assessment({"sensitivity": 0.95, "specificity": 0.5})["verdict"] == "fails"  # no CI: the point decides


def test_small_samples_are_flagged_as_unreliable():
    """A 5-image test split (AUC 1.000 [1.000-1.000]) carries a warning; a large one does not."""
    y = np.array([1, 1, 1, 0, 0])
    tiny = binary_report(y, np.array([0.9, 0.8, 0.7, 0.2, 0.1]), 0.5)
    assert tiny["auc_ci"] == [1.0, 1.0]
    warning = sample_warning(tiny)
    assert "only 3 positive, 2 negative image(s)" in warning and "zero width (auc" in warning
    assert "unreliable" in warning
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(60, int), np.zeros(60, int)]
    big = binary_report(y, np.r_[rng.normal(1, 1, 60), rng.normal(0, 1, 60)], 0.5)
    assert sample_warning(big) is None
    assert test_report(np.r_[np.zeros(3, int), np.ones(2, int)], np.tile([0.3, 0.7], (5, 1)), ["a", "b"], 1,
                       0.5)["sample_warning"]


def test_percent_is_one_style():
    assert percent(0.9123, [0.85, 0.95]) == "91.2% [85.0%-95.0%]"
    assert percent(None) == "n/a" and percent(0.5) == "50.0%"


    assert (WHO_MIN_SENSITIVITY, WHO_MIN_SPECIFICITY) == (0.90, 0.70)

