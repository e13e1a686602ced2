"""The report's figures as PNG bytes (matplotlib, headless).

Figure objects render through Agg without pyplot: no global backend switch (matplotlib.use would close
a caller's open pyplot figures) and no figures left open.
"""

from __future__ import annotations

import io

import numpy as np

__all__ = ["binary_plots", "confusion_png", "training_curve_png", "roc_overlay_png"]

RELIABILITY_BINS = 10


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    fig.clear()
    return buf.getvalue()


def _axes(w=4.2, h=4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    return fig, fig.add_subplot()


def binary_plots(y, s, positive: str, negative: str, threshold: float, *, n_boot: int = 200,
                 ece_before: float | None = None) -> list[tuple[str, bytes]]:
    """(alt text, PNG) of the ROC with a bootstrap band, precision-recall, reliability diagram and score
    histograms, as far as the data allow: curves need both classes, the last two scores in [0, 1].
    ``ece_before``: the ECE of the same images before calibration, shown beside the ECE of ``s``."""
    y, s = np.asarray(y, dtype=int), np.asarray(s, dtype=float)
    out = []
    if 0 < y.sum() < y.size:
        out += [("ROC curve with the operating point and a 95% bootstrap band", _roc_png(y, s, threshold, n_boot)),
                ("Precision-recall curve", _pr_png(y, s))]
    if np.all((s >= 0) & (s <= 1)):
        from .metrics import expected_calibration_error

        ece = expected_calibration_error(y, s, RELIABILITY_BINS)
        out += [(f"Reliability diagram ({RELIABILITY_BINS} equal-width bins, images per bin below; "
                 f"{_ece_text(ece, ece_before)})", _reliability_png(y, s, positive, ece, ece_before)),
                (f"Histogram of P({positive}) per true class with the threshold",
                 _histogram_png(y, s, positive, negative, threshold))]
    return out


def _roc_png(y, s, threshold, n_boot) -> bytes:
    from .metrics import roc_band, roc_curve

    fig, ax = _axes()
    if min(y.sum(), y.size - y.sum()) >= 2:  # a bootstrap needs two of each class
        grid, lo, hi = roc_band(y, s, n_boot=n_boot)
        ax.fill_between(grid, lo, hi, color="tab:blue", alpha=0.2, label=f"95% bootstrap band ({n_boot})")
    fpr, tpr, _ = roc_curve(y, s)
    ax.plot(fpr, tpr, color="tab:blue", label="ROC")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.plot([np.mean(s[y == 0] >= threshold)], [np.mean(s[y == 1] >= threshold)], "o", color="tab:red",
            label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    return _png(fig)


def _pr_png(y, s) -> bytes:
    from .metrics import pr_curve

    prec, rec, _ = pr_curve(y, s)
    fig, ax = _axes()
    ax.step(rec, prec, where="post")
    ax.axhline(y.mean(), ls=":", color="grey", label="prevalence")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=7)
    return _png(fig)


def _ece_text(ece: float, before: float | None) -> str:
    if before is None or not np.isfinite(before):
        return f"ECE {ece:.3f}"
    return f"ECE {ece:.3f} after calibration, {before:.3f} before"


def _reliability_png(y, s, positive, ece, ece_before) -> bytes:
    """The calibration curve with each bin's image count beside its point, and the counts as bars below:
    a bin of three images says little, and the reader should see which bins those are."""
    from matplotlib.figure import Figure

    from .metrics import reliability_bins

    b = reliability_bins(y, s, RELIABILITY_BINS)
    filled = b["count"] > 0
    fig = Figure(figsize=(4.2, 5.0))
    ax, bars = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect calibration")
    ax.plot(b["mean_predicted"][filled], b["fraction_positive"][filled], "o-", label="model")
    for x, f, n in zip(b["mean_predicted"][filled], b["fraction_positive"][filled], b["count"][filled]):
        ax.annotate(str(n), (x, f), textcoords="offset points", xytext=(4, -10), fontsize=7, color="dimgrey")
    ax.set(ylabel="fraction positive", title=f"Reliability ({_ece_text(ece, ece_before)})", xlim=(0, 1), ylim=(0, 1))
    ax.title.set_fontsize(9)
    ax.legend(loc="upper left", fontsize=7)
    width = b["bin_upper"] - b["bin_lower"]
    bars.bar(b["bin_lower"], b["count"], width=width, align="edge", color="tab:blue", alpha=0.5, edgecolor="white")
    bars.set(xlabel=f"mean P({positive})", ylabel="images")
    return _png(fig)


def _histogram_png(y, s, positive, negative, threshold) -> bytes:
    fig, ax = _axes()
    for lab, val in ((negative, 0), (positive, 1)):
        ax.hist(s[y == val], bins=np.linspace(0, 1, 21), alpha=0.55, label=f"true {lab}")
    ax.axvline(threshold, color="tab:red", ls="--", label=f"threshold {threshold:.3f}")
    ax.set(xlabel=f"P({positive})", ylabel="images", title="Score histogram")
    ax.legend(fontsize=7)
    return _png(fig)


def confusion_png(cm, labels) -> bytes:
    """The confusion matrix (rows true, columns predicted) with its counts."""
    cm = np.asarray(cm)
    fig, ax = _axes(min(2.5 + 0.5 * len(labels), 9), min(2.3 + 0.45 * len(labels), 8))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    return _png(fig)


def training_curve_png(curve) -> bytes:
    """Accuracy and cross-entropy per step, training and (where measured) validation."""
    from matplotlib.figure import Figure

    def col(key):
        return np.array([np.nan if c.get(key) is None else float(c[key]) for c in curve])

    steps = col("step")
    fig = Figure(figsize=(8, 3.2))
    for k, (train_key, val_key, name) in enumerate((("train_accuracy", "validation_accuracy", "accuracy"),
                                                    ("cross_entropy", "validation_cross_entropy", "cross-entropy"))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.plot(steps, col(train_key), label="train")
        v = col(val_key)
        if np.isfinite(v).any():
            ax.plot(steps[np.isfinite(v)], v[np.isfinite(v)], label="validation")
        ax.set(xlabel="step", ylabel=name, title=f"Training {name}")
        ax.legend(fontsize=7)
    return _png(fig)


def roc_overlay_png(curves) -> bytes:
    """One ROC plot of several runs: ``curves`` holds (name, auc, n, y, scores, threshold or None)."""
    from .metrics import roc_curve

    fig, ax = _axes(5.5, 5.0)
    for k, (name, auc, n, y, s, thr) in enumerate(curves):
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, color=f"C{k % 10}", label=f"{name} (AUC {auc:.3f}, n={n})")
        if thr is not None and np.isfinite(thr):
            ax.plot([np.mean(s[y == 0] >= thr)], [np.mean(s[y == 1] >= thr)], "o", color=f"C{k % 10}")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (dots: operating points)",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    return _png(fig)
