"""Shift score: how unlike this model's training images a chest film is. Reported, never a refusal (whether a
picture is a chest film at all is ``cxrlab.chest``'s question): the film is scored and its answer carries
``warning: unlike the training images (shift score ...)``.

Two signals, each turned into a robust z-score against films the model has not fitted:
- Mahalanobis distance of the embedding in a PCA-whitened subspace of the training embeddings;
- the residual norm outside that subspace (what the subspace cannot explain).
The score is the larger z. Centres, spreads and the warning threshold come from the validation split: a
fine-tuned network has fitted its training images, so their embeddings sit tighter than any new film's
(measured: centres from them flagged 2.9 % of the model's own test films, 5.9 % after resolution loss).
The threshold is set so that about ``reject_rate`` of the validation films would be flagged, plus a margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelDirError

ARRAY_FILE = "ood.safetensors"
ARRAY_NAMES = ("mean", "components", "scales", "centers", "spreads")
MIN_REFERENCE = 20  # validation films needed to set the centres and the threshold on them


@dataclass
class OODGate:
    mean: np.ndarray  # (d,)
    components: np.ndarray  # (k, d) principal axes
    scales: np.ndarray  # (k,) sqrt of the explained variances
    centers: np.ndarray  # (2,) medians of [mahalanobis, residual] on the reference (validation) films
    spreads: np.ndarray  # (2,) scaled MADs
    threshold: float
    reject_rate: float

    def raw_signals(self, X: np.ndarray) -> np.ndarray:
        Xc = np.asarray(X, np.float64) - self.mean
        proj = Xc @ self.components.T
        maha = np.sqrt(np.sum((proj / self.scales) ** 2, axis=1))
        resid = np.linalg.norm(Xc - proj @ self.components, axis=1)
        return np.stack([maha, resid], axis=1)

    def score_embeddings(self, X: np.ndarray) -> np.ndarray:
        z = (self.raw_signals(X) - self.centers) / self.spreads
        return z.max(axis=1)

    def score_one(self, outputs: dict, i: int, decoded=None) -> float:
        """The shift score of image ``i`` of a network call's ``outputs`` (``decoded`` is not needed any more)."""
        return round(float(self.score_embeddings(outputs["embedding"][i : i + 1])[0]), 4)

    def info(self) -> dict:
        return {"method": "shift: pca-mahalanobis+residual", "n_components": int(len(self.scales)),
                "threshold": self.threshold, "reject_rate": self.reject_rate, "arrays": ARRAY_FILE}

    def arrays(self) -> dict[str, bytes]:
        from safetensors.numpy import save

        tensors = {k: np.ascontiguousarray(getattr(self, k), np.float64)
                   for k in ARRAY_NAMES}
        return {ARRAY_FILE: save(tensors)}

    @classmethod
    def load(cls, directory, info: dict, *, data: bytes | None = None, embed_dim: int | None = None) -> "OODGate":
        """The gate described by ``info`` (cxrlab.json's ``ood``), its arrays read from ``directory``
        (or given as ``data``, the file's bytes already verified), every array checked."""
        from .modeldir import parse_arrays, read_array_file

        name = info.get("arrays", ARRAY_FILE)
        where = Path(directory) / name
        arrays = read_array_file(directory, name) if data is None else parse_arrays(data, where)
        return cls(*_checked_arrays(arrays, where, info.get("n_components"), embed_dim),
                   _finite(info["threshold"], where, "threshold"), _finite(info["reject_rate"], where, "reject_rate"))


def _finite(value, where, name: str) -> float:
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.nan
    if not math.isfinite(number):
        raise ModelDirError(f"{where}: the gate's {name} must be a finite number, got {str(value)[:40]}")
    return number


def _checked_arrays(arrays: dict, where, n_components: int | None, embed_dim: int | None) -> list[np.ndarray]:
    """mean (d,), components (k, d), scales (k,) > 0, centers (2,), spreads (2,) > 0: finite floats."""
    missing = [k for k in ARRAY_NAMES if k not in arrays]
    if missing:
        raise ModelDirError(f"{where}: the out-of-distribution gate lacks array(s) {', '.join(missing)}")
    out = []
    for name in ARRAY_NAMES:
        a = arrays[name]
        if not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)):
            raise ModelDirError(f"{where}: array {name} must hold finite floats (dtype {a.dtype})")
        out.append(a.astype(np.float64))
    mean, components, scales, centers, spreads = out
    d = embed_dim if embed_dim is not None else mean.shape[-1] if mean.ndim == 1 else -1
    k = n_components if n_components is not None else len(scales) if scales.ndim == 1 else -1
    want = {"mean": (d,), "components": (k, d), "scales": (k,), "centers": (2,), "spreads": (2,)}
    for name, a in zip(ARRAY_NAMES, out):
        if a.shape != want[name] or min(want[name]) < 1:
            raise ModelDirError(f"{where}: array {name} has shape {a.shape}, expected {want[name]} "
                                f"({k} components of a {d}-dimensional embedding)")
    if np.any(scales <= 0) or np.any(spreads <= 0):
        raise ModelDirError(f"{where}: arrays scales and spreads must be positive")
    return out


def _robust(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    center = np.median(values, axis=0)
    spread = 1.4826 * np.median(np.abs(values - center), axis=0) + 1e-9
    return center, spread


def _subspace(X: np.ndarray, k: int, reject_rate: float) -> OODGate:
    """The gate's PCA subspace of ``X`` (k axes); centres, spreads and threshold still to be set."""
    # Only the top k axes are needed: ARPACK finds them (exactly, from a seeded start) several times faster
    # than a full SVD of the ~1700 x 1280 gate data; it needs k below both dimensions, a full SVD does not.
    # PCA (scikit-learn >= 1.5) makes each axis's largest entry positive, so the saved axes never flip sign.
    # One BLAS thread: measured 0.35-1.0 s against 3.3 s with two on a busy two-core machine.
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    solver = "arpack" if k < min(X.shape) else "full"
    with threadpool_limits(limits=1, user_api="blas"):
        pca = PCA(n_components=k, svd_solver=solver, random_state=0).fit(X)
    scales = np.sqrt(np.clip(pca.explained_variance_, 0, None)) + 1e-9
    return OODGate(pca.mean_, pca.components_, scales, np.zeros(2), np.ones(2), np.inf, reject_rate)


def fit_gate_cross(X: np.ndarray, *, folds: int = 4, reject_rate: float = 0.01, margin: float = 1.5,
                   seed: int = 0) -> OODGate:
    """The gate for a few dozen images (a new site's, in ``cxrlab adapt``). Each image's signals also come from a
    subspace fitted without it (``folds``-fold cross-fitting): a subspace fitted on few images explains them
    almost exactly, so in-sample signals alone make the site's other films look far away (measured: 15 % of a
    site's remaining films refused, 50 fitted)."""
    X = np.asarray(X, np.float64)
    k = int(max(2, min(32, len(X) // 5, X.shape[1] - 1)))
    fold = np.random.default_rng(seed).permutation(len(X)) % folds
    signals = np.zeros((len(X), 2))
    for f in range(folds):
        signals[fold == f] = _subspace(X[fold != f], k, reject_rate).raw_signals(X[fold == f])
    gate = _subspace(X, k, reject_rate)
    # The site's own images (in the subspace: larger Mahalanobis, smaller residual) and its unseen ones (out of
    # it: the reverse) must both pass, so the centres, spreads and threshold are set on the two pooled.
    pooled = np.concatenate([signals, gate.raw_signals(X)])
    gate.centers, gate.spreads = _robust(pooled)
    z = ((pooled - gate.centers) / gate.spreads).max(axis=1)
    gate.threshold = round(float(np.quantile(z, 1 - reject_rate)) + margin, 4)
    return gate


def fit_gate(backbone, X_train: np.ndarray, X_val: np.ndarray | None = None, *, n_components: int = 32,
             reject_rate: float = 0.01, margin: float = 1.5) -> OODGate:
    """The subspace of the training embeddings; centres, spreads and threshold from the validation embeddings
    (``MIN_REFERENCE`` of them at least, else from the training ones)."""
    X = np.asarray(X_train, np.float64)
    k = int(min(n_components, len(X) - 1, X.shape[1]))
    gate = _subspace(X, k, reject_rate)
    reference = np.asarray(X_val, np.float64) if X_val is not None and len(X_val) >= MIN_REFERENCE else X
    gate.centers, gate.spreads = _robust(gate.raw_signals(reference))
    scores = gate.score_embeddings(reference)
    # The quantile of a small validation split is noisy; the margin (in robust z units) keeps
    # genuine images from other hospitals, which sit a little further out, on the accepted side.
    gate.threshold = round(float(np.quantile(scores, 1 - reject_rate)) + margin, 4)
    return gate
