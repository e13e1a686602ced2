"""Head: the tutorial's new final layer (softmax over the classes), trained on cached embeddings.

``LinearHead`` is an sklearn-shaped estimator. Two solvers:

- ``'lbfgs'`` (default): L2-regularised multinomial logistic regression on standardised
  embeddings, solved by L-BFGS; ``select_C`` picks the strength on the validation split.
- ``'sgd'``: the tutorial's plain mini-batch gradient descent (learning rate, steps, batch size).

Both report the tutorial's ``Step N`` figures through ``on_step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import DataError, NotFittedError

C_GRID = tuple(float(c) for c in np.logspace(-4, -1, 7))  # strong L2 wins on ~1000-d embeddings of a few hundred images


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
        """Fit on embeddings ``X``; ``init`` (another fit's ``theta_``) warm-starts the lbfgs solver."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
            raise DataError(f"expected X of shape (n, d) and y of shape (n,), got {X.shape} and {y.shape}")
        self.n_classes_ = int(max(y.max(), (y_val.max() if y_val is not None and len(y_val) else 0)) + 1)
        if len(np.unique(y)) < 2:
            raise DataError("the training split holds only one class; add images of the other class(es)")
        self.n_features_in_ = X.shape[1]
        self.mean_ = X.mean(axis=0)
        self.scale_ = X.std(axis=0) + 1e-6
        Z = (X - self.mean_) / self.scale_
        rng = np.random.default_rng(self.seed)
        val = None
        if X_val is not None and len(X_val):
            Zv = (np.asarray(X_val, np.float64) - self.mean_) / self.scale_
            yv = np.asarray(y_val, np.int64)
            if 0 < self.validation_batch_size < len(Zv):
                pick = np.sort(rng.choice(len(Zv), self.validation_batch_size, replace=False))
                Zv, yv = Zv[pick], yv[pick]
            val = (Zv, yv)
        report = self._reporter(Z, y, val, on_step)
        if self.solver not in ("lbfgs", "sgd"):
            raise DataError(f"unknown solver {self.solver!r}; use 'lbfgs' or 'sgd'")
        # These matrices are small: OpenBLAS's threads cost more to wake than they save (measured:
        # a warm Shenzhen retrain took 5.2 s with 2 BLAS threads and 2.3 s with one).
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            if self.solver == "lbfgs":
                W, b = self._fit_lbfgs(Z, y, report, init)
            else:
                W, b = self._fit_sgd(Z, y, rng, report)
        # Fold the standardisation into the weights so the exported layer acts on raw embeddings.
        self.coef_ = (W / self.scale_).astype(np.float32)
        self.intercept_ = (b - (W / self.scale_) @ self.mean_).astype(np.float32)
        return self

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
        from scipy.optimize import minimize

        n, d = Z.shape
        k = self.n_classes_
        Y = np.eye(k)[y]
        alpha = 1.0 / (self.C * n)

        def loss_grad(theta):
            W = theta[: k * d].reshape(k, d)
            b = theta[k * d :]
            p = _softmax(Z @ W.T + b)
            loss = -np.sum(Y * np.log(np.clip(p, 1e-300, None))) / n + 0.5 * alpha * np.sum(W * W)
            g = (p - Y) / n
            return loss, np.concatenate([(g.T @ Z + alpha * W).ravel(), g.sum(0)])

        state = {"step": 0}

        def callback(theta):
            state["step"] += 1
            report(state["step"], theta[: k * d].reshape(k, d), theta[k * d :])

        x0 = init if init is not None and init.shape == (k * d + k,) else np.zeros(k * d + k)
        res = minimize(loss_grad, x0, jac=True, method="L-BFGS-B", callback=callback,
                       options={"maxiter": max(1, self.steps), "gtol": 1e-6})
        self.theta_ = res.x
        W, b = res.x[: k * d].reshape(k, d), res.x[k * d :]
        self.n_iter_ = int(res.nit)
        report(max(state["step"], 1), W, b, final=True)
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
    """Pick the regularisation strength with the lowest validation cross-entropy."""
    if X_val is None or len(X_val) == 0 or len(np.unique(y_val)) < 2:
        return 1.0, []
    scores = []
    theta = None  # strongest regularisation first; each solution warm-starts the next
    for C in sorted(grid):
        head = LinearHead(solver="lbfgs", C=C, steps=steps, seed=seed, validation_batch_size=-1).fit(X, y, init=theta)
        theta = head.theta_
        p = head.predict_proba(X_val)
        scores.append({"C": C, "validation_cross_entropy": _cross_entropy(p, np.asarray(y_val)),
                       "validation_accuracy": float(np.mean(p.argmax(1) == y_val))})
    best = min(scores, key=lambda s: (round(s["validation_cross_entropy"], 6), -s["C"]))
    return best["C"], scores
