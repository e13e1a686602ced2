"""Site adaptation benchmark: does `cxrlab adapt` hold the WHO point at a hospital the model never saw?

    python benchmarks/adapt.py MODEL_DIR ../shared/data/india_da [--labelled 50] [--repeats 5] [--seed 0]

Per repeat, a stratified draw of ``--labelled`` films of the site is given to ``cxrlab.adapt`` (label-free
BatchNorm re-estimation and OOD reference on those films, and the site's own operating point chosen on their
labels); the adapted model is then scored on the site's *remaining* films. Printed per repeat and as mean ± sd:
AUC, sensitivity and specificity at the adapted threshold (refused images count as not flagged), refusal rate.
The parent model, scored on the same remaining films at its own threshold, is the baseline of the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _link_folder(dest: Path, files: list[tuple[Path, str]]) -> Path:
    for path, label in files:
        (dest / label).mkdir(parents=True, exist_ok=True)
        os.symlink(path.resolve(), dest / label / path.name)
    return dest


def _figures(model, folder: Path) -> dict:
    import cxrlab

    ev = cxrlab.evaluate(model, folder)
    y = np.array([t == model.positive_label for t in ev.true_labels])
    flagged = np.array([p.label == model.positive_label for p in ev.predictions])
    return {"auc": ev.metrics["all"]["auc"], "sensitivity": float(flagged[y].mean()),
            "specificity": float((~flagged[~y]).mean()),
            "refused": float(np.mean([bool(p.ood) for p in ev.predictions]))}


def main(argv=None) -> None:
    import cxrlab
    from cxrlab.discover import discover

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("site")
    p.add_argument("--labelled", type=int, default=50, help="local films given to adapt (stratified)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    site = Path(a.site)
    samples = discover(site).samples
    parent = cxrlab.load_model(a.model)
    rows = []
    for r in range(a.repeats):
        rng = np.random.default_rng(a.seed + r)
        chosen = set()
        for label in sorted({s.label for s in samples}):
            idx = [i for i, s in enumerate(samples) if s.label == label]
            chosen |= set(rng.choice(idx, a.labelled // 2, replace=False).tolist())
        with tempfile.TemporaryDirectory(prefix="cxrlab-adapt-") as tmp:
            tmp = Path(tmp)
            local = _link_folder(tmp / "local", [(site / s.relpath, s.label) for i, s in enumerate(samples) if i in chosen])
            rest = _link_folder(tmp / "rest", [(site / s.relpath, s.label) for i, s in enumerate(samples)
                                               if i not in chosen])
            res = cxrlab.adapt(a.model, local, tmp / "adapted", labelled=True)
            row = {"parent": _figures(parent, rest), "adapted": _figures(cxrlab.load_model(tmp / "adapted"), rest),
                   "threshold": res.operating_point["threshold"], "n_rest": len(samples) - len(chosen)}
        rows.append(row)
        for kind in ("parent", "adapted"):
            f = row[kind]
            print(f"repeat {r} {kind:8}: AUC {f['auc']:.3f}  sens {f['sensitivity']:.3f}  spec {f['specificity']:.3f}"
                  f"  refused {f['refused']:.1%}  (N={row['n_rest']})", flush=True)
    for kind in ("parent", "adapted"):
        cells = []
        for m in ("auc", "sensitivity", "specificity", "refused"):
            v = [row[kind][m] for row in rows]
            cells.append(f"{m} {np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0.0:.3f}")
        print(f"{kind:8}: " + "  ".join(cells))
    holds = [row["adapted"]["sensitivity"] >= 0.9 and row["adapted"]["specificity"] >= 0.7 for row in rows]
    print(f"WHO point (sens >= 0.90, spec >= 0.70) held on the remaining films in {sum(holds)} of {len(rows)} repeats")


if __name__ == "__main__":
    main()
