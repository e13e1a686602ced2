"""Tests for cxrlab.calibrate: operating-point rules, temperature and Platt scaling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrlab.calibrate import (
    OperatingPoint, PlattScaler, TemperatureScaler, choose_operating_point,
    parse_rule, softmax,
)
from cxrlab.errors import DataError, NotFittedError
from cxrlab.metrics import expected_calibration_error

# 10 positives and 10 negatives.  Distinct scores, descending:
# 0.95 .. 0.65 (pos), 0.62 (neg), 0.6, 0.55 (pos), 0.5, 0.45, 0.4, 0.35 (neg), 0.3 (pos), 0.25 ...
POS = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.3]
NEG = [0.62, 0.5, 0.45, 0.4, 0.35, 0.25, 0.2, 0.15, 0.1, 0.05]
Y = np.array([1] * 10 + [0] * 10)
S = np.array(POS + NEG)


# ------------------------------------------------------------ parse_rule
@pytest.mark.parametrize("text,expected", [
    ("who", ("who", None)), ("WHO", ("who", None)), ("youden", ("youden", None)),
    ("argmax", ("argmax", None)),
    ("sensitivity=0.9", ("sensitivity", 0.9)),
    ("sensitivity=90%", ("sensitivity", 0.9)), ("specificity=0.7", ("specificity", 0.7)),
    ("specificity=70%", ("specificity", 0.7)), (" sensitivity = 1 ", ("sensitivity", 1.0)),
])
def test_parse_rule_accepts(text, expected):
    kind, value = parse_rule(text)
    assert kind == expected[0]
    assert value == (None if expected[1] is None else pytest.approx(expected[1]))


@pytest.mark.parametrize("junk", ["", "best", "sensitivity", "sensitivity=", "sensitivity=abc",
                                  "specificity=0", "specificity=150", "precision=0.9", "who=1",
                                  "sensitivity=90", "sensitivity=1.5"])  # a bare number above 1 is not guessed at
def test_parse_rule_rejects(junk):
    with pytest.raises(DataError, match="valid spellings|target must be"):
        parse_rule(junk)


def test_parse_rule_message_lists_spellings():
    with pytest.raises(DataError) as e:
        parse_rule("nonsense")
    for spelling in ("who", "youden", "argmax", "sensitivity=", "specificity="):
        assert spelling in str(e.value)


# ---------------------------------------------------- operating points
def test_who_rule_exact():
    op = choose_operating_point(Y, S, "who")
    # 9/10 positives need t <= 0.55; the highest such distinct score is 0.55,
    # the next lower is 0.5 -> midpoint 0.525; only the 0.62 negative is above.
    assert op.threshold == pytest.approx(0.525)
    assert op.sensitivity == pytest.approx(0.9) and op.specificity == pytest.approx(0.9)
    assert op.reachable and "WHO" in op.note
    # maximal specificity among all distinct-score thresholds with sens >= 0.9
    best = max(np.mean(S[Y == 0] < t) for t in np.unique(S) if np.mean(S[Y == 1] >= t) >= 0.9)
    assert op.specificity == pytest.approx(best)


@pytest.mark.parametrize("rule,thr,sens,spec", [
    ("sensitivity=1.0", 0.275, 1.0, 0.5),      # t=0.3 then midpoint with 0.25
    ("sensitivity=0.9", 0.525, 0.9, 0.9),
    ("specificity=0.7", 0.525, 0.9, 0.9),      # t=0.45 and t=0.55 tie on sens -> higher
    ("specificity=1.0", 0.635, 0.7, 1.0),      # must be above the 0.62 negative
    ("youden", 0.525, 0.9, 0.9),
    ("argmax", 0.5, 0.9, 0.8),
])
def test_rules_exact(rule, thr, sens, spec):
    op = choose_operating_point(Y, S, rule)
    assert op.rule == rule and op.reachable and op.threshold == pytest.approx(thr)
    assert (op.sensitivity, op.specificity) == (pytest.approx(sens), pytest.approx(spec))
    # the reported rates are those of the returned threshold
    assert op.sensitivity == np.mean(S[Y == 1] >= op.threshold)
    assert op.specificity == np.mean(S[Y == 0] < op.threshold)


def test_unreachable_specificity_falls_back_to_youden():
    y = np.array([0, 0, 0, 1, 1, 0])
    s = np.array([0.9, 0.9, 0.9, 0.9, 0.5, 0.1])  # 3 of 4 negatives tie at the top score
    op = choose_operating_point(y, s, "specificity=0.7")
    assert not op.reachable and "Youden" in op.note and "specificity" in op.note
    assert op.threshold == pytest.approx(0.3)  # youden picks t=0.5 (J=0.25), midpoint with 0.1
    assert (op.sensitivity, op.specificity) == (1.0, 0.25)


def test_operating_point_errors_and_roundtrip():
    with pytest.raises(DataError, match="only one class"):
        choose_operating_point([1, 1, 1], [0.2, 0.5, 0.9], "who")
    with pytest.raises(DataError):
        choose_operating_point(Y, S, "bogus")
    op = choose_operating_point(Y, S, "who")
    assert OperatingPoint.from_dict(op.to_dict()) == op
    with pytest.raises(DataError):
        OperatingPoint.from_dict({"rule": "who"})


@settings(max_examples=200, deadline=None)
@given(data=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 20)), min_size=2, max_size=60),
       target=st.floats(0.01, 1.0))
def test_sensitivity_rule_property(data, target):
    y = np.array([d[0] for d in data])
    s = np.array([d[1] / 20 for d in data])  # coarse grid -> many ties
    if y.min() == y.max():
        with pytest.raises(DataError):
            choose_operating_point(y, s, f"sensitivity={target}")
        return
    op = choose_operating_point(y, s, f"sensitivity={target}")
    assert op.reachable
    assert op.sensitivity >= target - 1e-12
    assert op.sensitivity == np.mean(s[y == 1] >= op.threshold)
    # no distinct-score threshold meeting the target has higher specificity
    best = max(np.mean(s[y == 0] < t) for t in np.unique(s) if np.mean(s[y == 1] >= t) >= target - 1e-12)
    assert op.specificity == pytest.approx(best)


# -------------------------------------------------------- calibrators
def test_softmax():
    p = softmax(np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]]))
    np.testing.assert_allclose(p, [[0.5, 0.5], [0.25, 0.75]])


def _overconfident(seed, n=6000, k=3, t_true=3.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 4.0, size=(n, k))
    p = softmax(z / t_true)
    y = np.array([rng.choice(k, p=row) for row in p])
    return z, y


@pytest.mark.parametrize("seed", [0, 1])
def test_temperature_recovers_t(seed):
    z, y = _overconfident(seed)
    ts = TemperatureScaler().fit(z, y)
    assert ts.temperature_ == pytest.approx(3.0, rel=0.10)
    p = ts.transform(z)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert TemperatureScaler().fit(z, y).temperature_ == ts.temperature_  # deterministic


def test_calibration_lowers_ece_binary():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 4.0, 5000)
    y = (rng.random(5000) < 1 / (1 + np.exp(-z / 3.0))).astype(int)
    raw = 1 / (1 + np.exp(-z))
    ece_raw = expected_calibration_error(y, raw)
    ts = TemperatureScaler().fit(z, y)  # 1-D logits = binary
    assert ts.temperature_ == pytest.approx(3.0, rel=0.10)
    ece_t = expected_calibration_error(y, ts.transform(z))
    pl = PlattScaler().fit(z, y)
    assert pl.a_ == pytest.approx(1 / 3, rel=0.10) and abs(pl.b_) < 0.15
    ece_p = expected_calibration_error(y, pl.transform(z))
    assert ece_t < 0.5 * ece_raw and ece_p < 0.5 * ece_raw


def test_calibrator_errors():
    with pytest.raises(NotFittedError):
        TemperatureScaler().transform(np.zeros((2, 2)))
    with pytest.raises(NotFittedError):
        PlattScaler().transform(np.zeros(2))
    with pytest.raises(DataError):
        TemperatureScaler().fit(np.zeros((3, 2)), [0, 1, 2])
    with pytest.raises(DataError, match="only one class"):
        PlattScaler().fit([0.1, 0.2], [1, 1])
    # separable data must not blow up
    pl = PlattScaler().fit([-2.0, -1.0, 1.0, 2.0], [0, 0, 1, 1])
    assert np.all(np.isfinite([pl.a_, pl.b_]))
