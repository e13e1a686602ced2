"""The linear head (scikit-learn underneath) and the OOD gate's PCA, checked against known answers."""

from __future__ import annotations

import numpy as np
import pytest

from cxrlab.errors import DataError
from cxrlab.head import C_GRID, SCALE_FLOOR, LinearHead, select_C


def _logit(head: LinearHead, X) -> np.ndarray:
    z = head.decision_function(X)
    return z[:, 1] - z[:, 0]


def _symmetric_problem(n: int = 200, seed: int = 0):
    """Points labelled by the side of the line x0 + x1 = 0, mirrored (x0 <-> x1) and negated (x -> -x, y -> 1 - y),
    so the exact optimum has equal weights on both features and no offset between the two classes."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, 2))
    A = A[np.abs(A.sum(1)) > 0.3]
    X = np.concatenate([A, A[:, ::-1], -A, -A[:, ::-1]])
    y = (X.sum(1) > 0).astype(int)
    return X, y


def test_a_separable_2d_problem_learns_the_known_boundary_direction():
    X, y = _symmetric_problem()
    head = LinearHead(C=1.0).fit(X, y)
    w = head.coef_[1] - head.coef_[0]
    b = head.intercept_[1] - head.intercept_[0]
    assert w[0] > 1 and abs(w[0] - w[1]) < 1e-3 * w[0]  # normal of x0 + x1 = 0
    assert abs(b) < 1e-3 * w[0]
    assert np.array_equal(head.predict(X), y)
    # two classes: the two softmax rows are opposite, so the softmax is the sigmoid of the binary logit
    np.testing.assert_allclose(head.coef_[0], -head.coef_[1], rtol=1e-6)
    np.testing.assert_allclose(head.predict_proba(X)[:, 1], 1 / (1 + np.exp(-_logit(head, X))), atol=1e-6)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_coef_on_raw_embeddings_reproduces_logistic_regression_on_floor_standardised_features(n_classes):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    centres = rng.normal(0, 1.5, (n_classes, 6))
    y = rng.integers(0, n_classes, 300)
    # offsets and very different scales: the fold of the standardisation into the weights must undo both
    X = (centres[y] + rng.normal(size=(300, 6))) * np.array([1e3, 1.0, 0.05, 20.0, 3.0, 0.2]) + 50.0
    scale = np.maximum(X.std(0), SCALE_FLOOR * np.median(X.std(0)))
    Z = (X - X.mean(0)) / scale
    reference = LogisticRegression(C=0.05, tol=1e-8, max_iter=10_000).fit(Z, y)
    head = LinearHead(C=0.05).fit(X, y)
    np.testing.assert_allclose(head.predict_proba(X), reference.predict_proba(Z), atol=2e-4)
    np.testing.assert_allclose(head.decision_function(X), X.astype(np.float32) @ head.coef_.T + head.intercept_,
                               rtol=1e-6, atol=1e-4)
    assert head.coef_.shape == (n_classes, 6) and head.n_classes_ == n_classes and head.n_iter_ > 0


def test_the_variance_floor_bounds_the_logit_move_of_a_near_constant_feature():
    rng = np.random.default_rng(2)
    y = np.array([0, 1] * 100)
    informative = rng.normal(size=(200, 5)) + y[:, None]
    nearly_constant = 1e-6 * (2 * y - 1) + rng.normal(0, 1e-7, 200)  # separates the classes on its own, at 1e-6
    constant = np.full(200, 3.0)
    X = np.column_stack([informative, nearly_constant, constant])
    head = LinearHead(C=1.0).fit(X, y)
    scale = SCALE_FLOOR * np.median(X.std(0))  # the floor the tiny feature is divided by
    for column, nudge in ((5, 0.01), (5, -0.01), (6, 0.5)):
        moved = X.copy()
        moved[:, column] += nudge  # what a JPEG re-save does to an almost-always-zero activation
        shift = np.abs(_logit(head, moved) - _logit(head, X)).max()
        # the standardised weight of one feature stays within a few units, so the move is about |nudge| / floor
        assert shift <= 5 * abs(nudge) / scale, (column, shift)
    assert abs(head.coef_[:, 6]).max() < 1e-6  # a constant feature carries no weight at all


def test_lbfgs_is_deterministic_and_a_warm_start_from_theta_lands_on_the_same_solution():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(150, 20))
    y = (X[:, 0] - X[:, 3] + rng.normal(0, 1, 150) > 0).astype(int)
    a, b = LinearHead(C=0.1, seed=5).fit(X, y), LinearHead(C=0.1, seed=5).fit(X, y)
    assert np.array_equal(a.coef_, b.coef_) and np.array_equal(a.intercept_, b.intercept_)
    warm = LinearHead(C=0.1).fit(X, y, init=a.theta_)
    np.testing.assert_allclose(warm.coef_, a.coef_, atol=1e-5)
    assert warm.n_iter_ < a.n_iter_
    ignored = LinearHead(C=0.1).fit(X[:, :5], y, init=a.theta_)  # a theta of another shape is not used
    assert ignored.coef_.shape == (2, 5)


def test_lbfgs_reports_one_final_step_with_the_validation_figures():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(200, 8))
    y = (X[:, 0] + rng.normal(0, 0.5, 200) > 0).astype(int)
    steps = []
    head = LinearHead(C=1.0, validation_batch_size=-1).fit(X[:150], y[:150], X_val=X[150:], y_val=y[150:],
                                                           on_step=steps.append)
    assert len(steps) == 1 and steps[0].step == head.n_iter_
    info = steps[0]
    assert info.validation_n == 50
    assert info.validation_accuracy == pytest.approx(np.mean(head.predict(X[150:]) == y[150:]))
    assert info.train_accuracy == pytest.approx(np.mean(head.predict(X[:150]) == y[:150]))
    p = head.predict_proba(X[150:])[np.arange(50), y[150:]]
    assert info.validation_cross_entropy == pytest.approx(-np.mean(np.log(p)), abs=1e-5)


def test_sgd_is_the_tutorials_stepped_loop_deterministic_per_seed():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(120, 6))
    y = (X[:, 1] > 0).astype(int)
    steps = []
    kw = dict(solver="sgd", steps=30, eval_step_interval=10, batch_size=16, learning_rate=0.1)
    head = LinearHead(seed=1, **kw).fit(X, y, X_val=X[:40], y_val=y[:40], on_step=steps.append)
    assert [s.step for s in steps] == [0, 10, 20, 29] and head.n_iter_ == 30
    assert all(s.validation_n == 40 for s in steps)
    assert np.array_equal(head.coef_, LinearHead(seed=1, **kw).fit(X, y).coef_)
    assert not np.array_equal(head.coef_, LinearHead(seed=2, **kw).fit(X, y).coef_)
    assert np.mean(head.predict(X) == y) > 0.9


def test_select_C_picks_strong_regularisation_on_pure_noise():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(2150, 30)), rng.integers(0, 2, 2150)
    C, scores = select_C(X[:150], y[:150], X[150:], y[150:])
    assert [s["C"] for s in scores] == sorted(C_GRID) and C <= 1e-3
    chosen = next(s for s in scores if s["C"] == C)["validation_cross_entropy"]
    assert chosen == pytest.approx(np.log(2), abs=0.01)  # nothing to learn: a coin's cross-entropy
    assert scores[-1]["validation_cross_entropy"] > chosen + 0.02  # weak regularisation fits the noise


def test_select_C_scores_are_those_of_the_head_it_chooses():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(300, 30))
    y = (X[:, :3].sum(1) + rng.normal(0, 1, 300) > 0).astype(int)
    C, scores = select_C(X[:200], y[:200], X[200:], y[200:])
    best = min(scores, key=lambda s: s["validation_cross_entropy"])
    assert C == best["C"]
    head = LinearHead(C=C).fit(X[:200], y[:200])
    p = head.predict_proba(X[200:])[np.arange(100), y[200:]]
    assert best["validation_cross_entropy"] == pytest.approx(-np.mean(np.log(p)), abs=1e-5)
    assert select_C(X, y, None, None) == (1.0, [])


def test_a_class_seen_only_in_validation_gets_a_probability_below_one_over_n():
    rng = np.random.default_rng(8)
    X = rng.normal(size=(60, 4))
    y = (X[:, 0] > 0).astype(int)
    head = LinearHead().fit(X, y, X_val=X[:5], y_val=np.array([2, 0, 1, 2, 0]))
    assert head.n_classes_ == 3 and head.coef_.shape == (3, 4)
    assert head.predict_proba(X)[:, 2].max() < 1 / len(X)


def test_bad_input_is_refused_in_one_line():
    X = np.zeros((4, 3))
    with pytest.raises(DataError, match="only one class"):
        LinearHead().fit(X, np.zeros(4, int))
    with pytest.raises(DataError, match="unknown solver"):
        LinearHead(solver="adam").fit(X, np.array([0, 1, 0, 1]))
    with pytest.raises(DataError, match="X has 5 features, but the head expects 3"):
        LinearHead().fit(np.eye(4)[:, :3], np.array([0, 1, 0, 1])).decision_function(np.zeros((1, 5)))


def _eigh_gate_axes(X, k):
    """The top-k principal axes and scales as the covariance eigendecomposition defines them (the reference)."""
    from scipy.linalg import eigh

    Xc = X - X.mean(0)
    values, vectors = eigh(Xc.T @ Xc / (len(X) - 1))
    order = np.argsort(values)[::-1][:k]
    return vectors[:, order].T, np.sqrt(values[order])


@pytest.mark.parametrize("d", [40, 6])  # 40: more dims than axes (ARPACK); 6: every axis kept (full SVD)
def test_gate_pca_matches_the_covariance_eigendecomposition(d):
    from safetensors.numpy import load

    from cxrlab.ood import ARRAY_FILE, ARRAY_NAMES, OODGate, _robust, fit_gate

    rng = np.random.default_rng(9)
    X = rng.normal(size=(300, d)) * np.linspace(3, 0.1, d) + rng.normal(size=d)
    X_val, X_new = rng.normal(size=(60, d)), rng.normal(0, 2, size=(50, d))
    gate = fit_gate(None, X, X_val, n_components=12)
    k = min(12, d)
    axes, scales = _eigh_gate_axes(X, k)
    assert gate.components.shape == (k, d)
    np.testing.assert_allclose(np.abs(gate.components @ axes.T), np.eye(k), atol=1e-6)  # same axes up to sign
    np.testing.assert_allclose(gate.scales, scales, rtol=1e-6)
    reference = OODGate(X.mean(0), axes, scales, np.zeros(2), np.ones(2), np.inf, 0.01)
    # centres and spreads come from the validation films: the training ones were fitted
    reference.centers, reference.spreads = _robust(reference.raw_signals(X_val))
    np.testing.assert_allclose(gate.score_embeddings(X_new), reference.score_embeddings(X_new), atol=1e-5)
    # each axis's largest entry is positive, so a refit writes the same arrays
    assert np.all(gate.components[np.arange(k), np.abs(gate.components).argmax(1)] > 0)
    saved = load(gate.arrays()[ARRAY_FILE])
    assert set(saved) == set(ARRAY_NAMES) and all(a.dtype == np.float64 for a in saved.values())
    again = fit_gate(None, X, X_val, n_components=12)
    assert all(np.array_equal(saved[name], load(again.arrays()[ARRAY_FILE])[name]) for name in ARRAY_NAMES)
