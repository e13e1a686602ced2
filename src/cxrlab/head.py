"""Head: the tutorial's new final layer (softmax over the classes), trained on cached embeddings.

``LinearHead`` is an sklearn-shaped estimator. Two solvers:

- ``'lbfgs'`` (default): scikit-learn's L2-regularised ``LogisticRegression`` on standardised
  embeddings; ``select_C`` picks the strength on the validation split.
- ``'sgd'``: the tutorial's plain mini-batch gradient descent (learning rate, steps, batch size). It stays a
  small numpy loop: ``SGDClassifier`` updates per sample rather than per averaged mini-batch, and fits one
  binary model per class rather than the tutorial's softmax cross-entropy.

Both standardise with a variance floor and report the tutorial's ``Step N`` figures through ``on_step``
(lbfgs once, at its last iteration). The fitted ``coef_`` / ``intercept_`` act on raw embeddings.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import DataError, NotFittedError

C_GRID = tuple(float(c) for c in np.logspace(-4, -1, 7))  # strong L2 wins on ~1000-d embeddings of a few hundred images
# No feature is standardised up beyond a typical one: an activation that is almost always zero, divided by its
# tiny spread, let a JPEG q20 re-save of a Shenzhen film swing the logit by up to 57 (now 5.5). Measured on
# lite0 against floors of 0.03-0.5: the best 5-fold Shenzhen AUC (0.898) and second-hospital AUC (0.70).
SCALE_FLOOR = 1.0  # fraction of the median feature standard deviation
LBFGS_TOL = 1e-6


@dataclass(frozen=True)
class HeadOptions:
    """How the linear head is trained (the tutorial's flags); C is chosen by ``select_C``."""

    solver: str = "lbfgs"
    steps: int = 4000  # --how_many_training_steps
    learning_rate: float = 0.01
    batch_size: int = 100  # --train_batch_size
    eval_step_interval: int = 10
    validation_batch_size: int = 100

    def to_kwargs(self) -> dict:
        return dict(solver=self.solver, learning_rate=self.learning_rate, steps=self.steps, batch_size=self.batch_size,
                    eval_step_interval=self.eval_step_interval, validation_batch_size=self.validation_batch_size)


@dataclass(frozen=True)
class StepInfo:
    step: int
    train_accuracy: float
    cross_entropy: float
    validation_accuracy: float | None
    validation_n: int
    validation_cross_entropy: float | None


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _cross_entropy(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))


def standardiser(X: np.ndarray):
    """A ``StandardScaler`` fitted on ``X`` whose scales are at least ``SCALE_FLOOR`` x their median."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    scaler.scale_ = np.maximum(scaler.scale_, SCALE_FLOOR * np.median(scaler.scale_))
    return scaler


def _logistic(C: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, solver="lbfgs", tol=LBFGS_TOL, max_iter=max(1, max_iter), warm_start=True)


def _fit_quietly(model, Z, y):
    """Fit; a run stopped at ``max_iter`` (the user's --how_many_training_steps) is a choice, not a warning."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(Z, y)


def _softmax_weights(model, k: int, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``model``'s weights as one row per class 0..k-1 (a softmax layer).

    A binary fit's single logit w.x + b becomes the rows -(w, b)/2 and +(w, b)/2, whose softmax is the same
    sigmoid. A class absent from training gets no weights and an intercept that keeps its probability under
    1/n on every training embedding."""
    present = model.classes_.astype(np.int64)
    coef, intercept = model.coef_, model.intercept_
    if len(present) == 2:
        coef, intercept = np.vstack([-coef, coef]) / 2, np.array([-intercept[0], intercept[0]]) / 2
    W, b = np.zeros((k, Z.shape[1])), np.zeros(k)
    W[present], b[present] = coef, intercept
    absent = np.setdiff1d(np.arange(k), present)
    if len(absent):
        logits = Z @ coef.T + intercept
        lse = logits.max(1) + np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1))
        b[absent] = lse.min() - np.log(len(Z) + 1)
    return W, b


class LinearHead:
    def __init__(self, *, solver: str = "lbfgs", C: float = 1.0, learning_rate: float = 0.01,
                 steps: int = 4000, batch_size: int = 100, eval_step_interval: int = 10,
                 validation_batch_size: int = 100, seed: int = 0):
        self.solver = solver
        self.C = C
        self.learning_rate = learning_rate
        self.steps = steps
        self.batch_size = batch_size
        self.eval_step_interval = eval_step_interval
        self.validation_batch_size = validation_batch_size
        self.seed = seed

    # --- fitted parameters are on raw embeddings: logits = X @ coef_.T + intercept_
    def fit(self, X: np.ndarray, y: np.ndarray, *, X_val=None, y_val=None,
            on_step: Callable[[StepInfo], None] | None = None, init: np.ndarray | None = None) -> "LinearHead":
        """Fit on embeddings ``X``; ``init`` (another lbfgs fit's ``theta_``) warm-starts the lbfgs solver."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
            raise DataError(f"expected X of shape (n, d) and y of shape (n,), got {X.shape} and {y.shape}")
        if self.solver not in ("lbfgs", "sgd"):
            raise DataError(f"unknown solver {self.solver!r}; use 'lbfgs' or 'sgd'")
        self.n_classes_ = int(max(y.max(), (y_val.max() if y_val is not None and len(y_val) else 0)) + 1)
        if len(np.unique(y)) < 2:
            raise DataError("the training split holds only one class; add images of the other class(es)")
        self.n_features_in_ = X.shape[1]
        self.scaler_ = standardiser(X)
        Z = self.scaler_.transform(X)
        rng = np.random.default_rng(self.seed)
        report = self._reporter(Z, y, self._validation(X_val, y_val, rng), on_step)
        # These matrices are small: OpenBLAS's threads cost more to wake than they save (measured:
        # a warm Shenzhen retrain took 5.2 s with 2 BLAS threads and 2.3 s with one).
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            W, b = self._fit_lbfgs(Z, y, report, init) if self.solver == "lbfgs" else self._fit_sgd(Z, y, rng, report)
        # Fold the standardisation into the weights so the exported layer acts on raw embeddings.
        W_raw = W / self.scaler_.scale_
        self.coef_ = W_raw.astype(np.float32)
        self.intercept_ = (b - W_raw @ self.scaler_.mean_).astype(np.float32)
        return self

    def _validation(self, X_val, y_val, rng):
        """The standardised validation embeddings the Step lines report on (``validation_batch_size`` of them)."""
        if X_val is None or not len(X_val):
            return None
        Zv = self.scaler_.transform(np.asarray(X_val, np.float64))
        yv = np.asarray(y_val, np.int64)
        if 0 < self.validation_batch_size < len(Zv):
            pick = np.sort(rng.choice(len(Zv), self.validation_batch_size, replace=False))
            Zv, yv = Zv[pick], yv[pick]
        return Zv, yv

    def _reporter(self, Z, y, val, on_step):
        interval = max(1, self.eval_step_interval)
        last = {"step": -1}

        def report(step: int, W: np.ndarray, b: np.ndarray, final: bool = False):
            if on_step is None or step == last["step"] or not (final or step % interval == 0):
                return
            last["step"] = step
            p = _softmax(Z @ W.T + b)
            info = dict(step=step, train_accuracy=float(np.mean(p.argmax(1) == y)), cross_entropy=_cross_entropy(p, y),
                        validation_accuracy=None, validation_n=0, validation_cross_entropy=None)
            if val is not None:
                pv = _softmax(val[0] @ W.T + b)
                info.update(validation_accuracy=float(np.mean(pv.argmax(1) == val[1])), validation_n=len(val[1]),
                            validation_cross_entropy=_cross_entropy(pv, val[1]))
            on_step(StepInfo(**info))

        return report

    def _fit_lbfgs(self, Z, y, report, init=None):
        model = _logistic(self.C, self.steps)
        n_rows = 1 if len(np.unique(y)) == 2 else len(np.unique(y))
        if init is not None and np.shape(init) == (n_rows * (Z.shape[1] + 1),):
            model.coef_ = np.asarray(init[: n_rows * Z.shape[1]], np.float64).reshape(n_rows, -1)
            model.intercept_ = np.asarray(init[n_rows * Z.shape[1]:], np.float64)
        _fit_quietly(model, Z, y)
        self.theta_ = np.concatenate([model.coef_.ravel(), model.intercept_])
        self.n_iter_ = int(np.max(model.n_iter_))
        W, b = _softmax_weights(model, self.n_classes_, Z)
        report(max(self.n_iter_, 1), W, b, final=True)
        return W, b

    def _fit_sgd(self, Z, y, rng, report):
        n, d = Z.shape
        k = self.n_classes_
        # The tutorial's layer starts from a truncated normal with stddev 0.001.
        W = np.clip(rng.normal(0, 0.001, (k, d)), -0.002, 0.002)
        b = np.zeros(k)
        Y = np.eye(k)[y]
        for step in range(self.steps):
            idx = rng.integers(0, n, self.batch_size) if self.batch_size > 0 else np.arange(n)
            p = _softmax(Z[idx] @ W.T + b)
            g = (p - Y[idx]) / len(idx)
            W -= self.learning_rate * (g.T @ Z[idx])
            b -= self.learning_rate * g.sum(0)
            report(step, W, b, final=step == self.steps - 1)
        self.n_iter_ = self.steps
        return W, b

    def _check(self, X):
        if not hasattr(self, "coef_"):
            raise NotFittedError("this LinearHead is not fitted yet; call fit(X, y) first")
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise DataError(f"X has {X.shape[-1]} features, but the head expects {self.n_features_in_} "
                            "(embeddings of a different backbone?)")
        return X

    def decision_function(self, X) -> np.ndarray:
        return self._check(X) @ self.coef_.T + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        return _softmax(self.decision_function(X).astype(np.float64))

    def predict(self, X) -> np.ndarray:
        return self.decision_function(X).argmax(axis=1)


class AffineHead:
    """A binary head with Platt scaling folded into its weights: softmax gives sigmoid(a (z1 - z0) + b)."""

    def __init__(self, head, a: float, b: float):
        self.raw, self.a, self.b = head, float(a), float(b)
        self.coef_ = (np.asarray(head.coef_) * self.a).astype(np.float32)
        self.intercept_ = (np.asarray(head.intercept_) * self.a + np.array([0.0, self.b])).astype(np.float32)
        self.n_iter_ = getattr(head, "n_iter_", 0)

    def rescale(self, Z) -> np.ndarray:
        """The raw head's logits -> this head's."""
        return np.asarray(Z) * self.a + np.array([0.0, self.b])

    def decision_function(self, X) -> np.ndarray:
        return np.asarray(X, np.float32) @ self.coef_.T + self.intercept_


def select_C(X, y, X_val, y_val, *, grid=C_GRID, seed: int = 0, steps: int = 4000) -> tuple[float, list[dict]]:
    """Pick the regularisation strength with the lowest validation cross-entropy: one standardisation, then
    sklearn's warm-started path from the strongest regularisation to the weakest. (``seed`` is kept for the
    callers' signature: lbfgs is deterministic.)"""
    if X_val is None or len(X_val) == 0 or len(np.unique(y_val)) < 2:
        return 1.0, []
    X, y, y_val = np.asarray(X, np.float64), np.asarray(y, np.int64), np.asarray(y_val, np.int64)
    if len(np.unique(y)) < 2:
        raise DataError("the training split holds only one class; add images of the other class(es)")
    scaler = standardiser(X)
    Z, Zv = scaler.transform(X), scaler.transform(np.asarray(X_val, np.float64))
    k = int(max(y.max(), y_val.max()) + 1)
    model, scores = _logistic(1.0, steps), []
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        for C in sorted(grid):
            _fit_quietly(model.set_params(C=C), Z, y)
            W, b = _softmax_weights(model, k, Z)
            p = _softmax(Zv @ W.T + b)
            scores.append({"C": C, "validation_cross_entropy": _cross_entropy(p, y_val),
                           "validation_accuracy": float(np.mean(p.argmax(1) == y_val))})
    best = min(scores, key=lambda s: (round(s["validation_cross_entropy"], 6), -s["C"]))
    return best["C"], scores
