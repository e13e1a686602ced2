"""Accuracy benchmark: k-fold CV on Shenzhen, linear head vs fine-tuned variants, same folds for every variant;
with --external, each variant also trained as `cxrlab train` ships it and scored on hospitals it never saw.

    python benchmarks/accuracy.py ../shared/data/shenzhen --variants linear,plain,best --folds 5 [--run-folds 0,1]
        [--ft KEY=VALUE ...] [--site-shift] [--external ../shared/data/india_da ...] [--output results.json]

--external DIR (repeatable): per variant, one model trained by ``cxrlab.train`` on all of DATA (its own split, as
the README's command does) and evaluated on DIR: ROC AUC with its DeLong 95% CI, sensitivity/specificity at the
shipped threshold (an image refused as "not a chest X-ray like the training images" counts as not flagged), the
refusal rate, and the minutes the training took. ``--run-folds none`` skips the cross-validation.

Every variant runs the steps `cxrlab train` ships, through the functions `cxrlab cv` uses (crossval.fold_entries,
training.fit_and_calibrate, training.evaluate_split): fit (linear head or fine-tuning), calibration (Platt folded
into a fine-tuned head, temperature for the linear head, on validation + out-of-fold scores where the head is
cheap to refit), the WHO operating point, then the test fold. Prints per fold and mean ± sd: AUC, accuracy
(argmax of the calibrated probabilities), sensitivity/specificity at the operating point, minutes per fold. With
--site-shift, the site-shift table per variant (test folds, pooled) at each fold's operating point, scored through
the exported graph (TTA included). For other TTA view counts, run a variant with --ft tta_views=N.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cxrlab.finetune import AugmentConfig, FineTuneOptions  # noqa: E402

VARIANTS = {
    # The plain fine-tune: AdamW, one-cycle, rotation/scale/brightness, batch 16, no extras.
    "plain": lambda: FineTuneOptions(
        lr=1e-3, head_lr_mult=1.0, layer_decay=1.0, warmup_head=False, freeze_bn=False, label_smoothing=0.0,
        dropout=0.0, patience=0, intensity="none", tta=False,
        augment=AugmentConfig(rotate=10, scale=0.1, aspect=0, translate=0, brightness=0.1, contrast=0, gamma=0,
                              sharpen=0, jpeg=0)),
    # FineTuneOptions' defaults, the measured best: plain + in-graph 1-99 percentile windowing + the chest-X-ray
    # augmentations (aspect, translate, contrast, gamma, sharpen/blur, JPEG) + 4-view TTA.
    "best": lambda: FineTuneOptions(),
    # Every extra at once: head warm-up, layer-wise lr, frozen BN, label smoothing, all CXR augmentations.
    "cxr_all": lambda: _cxr_all(),
    # CPU-cheap: only the top units train (no backward through the early layers), with the extras.
    "top6": lambda: _cxr_all(trainable_units=6),
}


def _cxr_all(**kw):
    return FineTuneOptions(lr=3e-4, head_lr_mult=10.0, layer_decay=0.8, warmup_head=True, freeze_bn=True,
                           label_smoothing=0.1, dropout=0.0, patience=3,
                           augment=AugmentConfig(aspect=0.10, translate=0.05, brightness=0.08, contrast=0.20,
                                                 gamma=0.30, sharpen=0.5, jpeg=0.25), **kw)


def run_variant(name, options, root, samples, labels, run_folds, *, folds, seed, site_shift, threads):
    """``options``: None for the linear head, else FineTuneOptions."""
    import torch

    from cxrlab.crossval import fold_entries
    from cxrlab.decode import decode_image
    from cxrlab.fit import Splits
    from cxrlab.siteshift import shift_rows
    from cxrlab.training import TrainOptions, embed_images, evaluate_split, fit_and_calibrate

    torch.set_num_threads(threads)
    o = TrainOptions(seed=seed, fine_tune=options is not None, fine_tune_options=copy.deepcopy(options),
                     on_epoch=lambda r: print(f"  [{name}] epoch {r['epoch']}: loss {r['loss']:.3f} "
                                              f"val AUC {r.get('val_auc') or float('nan'):.3f}", flush=True))
    frozen = embed_images(root, samples, o, calibration_rows=samples)
    samples = [s for s in samples if s.relpath in frozen.vectors]
    rows, shift_by_fold = [], []
    for f, entries in enumerate(fold_entries(samples, folds, seed)):
        if f not in run_folds:
            continue
        t0 = time.time()
        splits = Splits.of(entries, {lab: i for i, lab in enumerate(labels)}).keep(frozen.vectors)
        fit, cal = fit_and_calibrate(root, splits, frozen, o, positive="abnormal")
        splits = splits.keep(fit.vectors)
        metrics, test_rows, _ = evaluate_split(fit, cal, splits, labels, "abnormal")
        minutes = (time.time() - t0) / 60
        t = metrics["test"]
        row = {"fold": f, "n": len(test_rows), "minutes": round(minutes, 2), "auc": t["auc"],
               "accuracy": metrics["final_test_accuracy_argmax"], "sensitivity": t["sensitivity"],
               "specificity": t["specificity"], "threshold": cal.operating_point.threshold,
               "calibration": cal.calibration_info, "best_epoch": (fit.fine_tune_info or {}).get("best_epoch")}
        print(f"{name} fold {f}: AUC {row['auc']:.3f} acc {row['accuracy']:.3f} sens {row['sensitivity']:.3f} "
              f"spec {row['specificity']:.3f} | {minutes:.1f} min", flush=True)
        if site_shift:
            pos = labels.index("abnormal")
            pixels = [decode_image(root / e.relpath).pixels for e in test_rows]

            def score(batch, fit=fit, cal=cal):
                return cal.probs(fit.embedder.embed_arrays(list(batch.astype(np.float32))))[:, pos]

            y = np.array([e.label == "abnormal" for e in test_rows], np.int64)
            shift_by_fold.append(shift_rows(y, pixels, fit.backbone.spec.input_size, score, row["threshold"]))
        rows.append(row)
    return rows, shift_by_fold


def external_figures(name, options, root, externals, *, seed, threads, keep=None):
    """Train the variant as `cxrlab train` ships it, then score it on every external site (never trained on).
    ``keep``: a folder to keep the trained model in (as ``keep/name``), e.g. for benchmarks/adapt.py."""
    import tempfile

    import torch

    import cxrlab

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="cxrlab-bench-") as tmp:
        t0 = time.time()
        r = cxrlab.train(root, output=Path(keep or tmp) / name, fine_tune=options is not None,
                         fine_tune_options=copy.deepcopy(options), seed=seed, report=False)
        minutes = (time.time() - t0) / 60
        model = cxrlab.load_model(r.model_dir)
        out = {"minutes": round(minutes, 2), "own_test_auc": r.metrics["test"]["auc"], "sites": {}}
        for ext in externals:
            ev = cxrlab.evaluate(model, ext)
            y = np.array([t == model.positive_label for t in ev.true_labels])
            flagged = np.array([p.label == model.positive_label for p in ev.predictions])  # refused: not flagged
            refused = np.array([bool(p.ood) for p in ev.predictions])
            rep = ev.metrics["all"]
            site = {"auc": rep["auc"], "auc_ci": rep["auc_ci"], "sensitivity": float(flagged[y].mean()),
                    "specificity": float((~flagged[~y]).mean()), "refused": float(refused.mean()), "n": int(len(y))}
            out["sites"][Path(ext).name] = site
            print(f"{name} on {Path(ext).name}: AUC {site['auc']:.3f} [{site['auc_ci'][0]:.3f}-{site['auc_ci'][1]:.3f}]"
                  f"  sens {site['sensitivity']:.3f} spec {site['specificity']:.3f} at the shipped threshold"
                  f"  refused {site['refused']:.1%}  (N={site['n']}; trained in {minutes:.1f} min)", flush=True)
    return out


def summary(rows):
    out = {}
    for m in ("auc", "accuracy", "sensitivity", "specificity"):
        v = [r[m] for r in rows]
        out[m] = (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    return out


def pooled_shift_table(shift_by_fold):
    """Mean over folds of each shift's AUC / sens / spec (each fold at its own stored operating point)."""
    from cxrlab.metrics import meets_who

    names = [r["shift"] for r in shift_by_fold[0]]
    table = []
    for i, n in enumerate(names):
        vals = {m: float(np.mean([f[i][m] for f in shift_by_fold])) for m in ("auc", "sensitivity", "specificity")}
        table.append({"shift": n, **vals, "meets_who": meets_who(vals["sensitivity"], vals["specificity"])})
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "shenzhen"))
    p.add_argument("--variants", default="linear,plain,best")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--run-folds", default=None, help="comma-separated fold indices to run (default: all)")
    p.add_argument("--ft", action="append", default=[], metavar="KEY=VALUE", help="override an option of every fine-tuned variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--site-shift", action="store_true")
    p.add_argument("--output", default=None, help="write all figures as JSON here")
    p.add_argument("--external", action="append", default=[], metavar="DIR",
                   help="also train each variant as shipped and score it on this hospital's labelled folder")
    p.add_argument("--keep-models", metavar="DIR", help="with --external: keep each variant's model in DIR/VARIANT")
    a = p.parse_args(argv)

    from cxrlab.discover import discover

    root = Path(a.data)
    ds = discover(root)
    run_folds = ([] if a.run_folds == "none" else [int(f) for f in a.run_folds.split(",")] if a.run_folds
                 else list(range(a.folds)))
    results = {"data": str(root), "n": len(ds.samples), "folds": a.folds, "run_folds": run_folds, "variants": {}}
    for name in a.variants.split(","):
        options = None if name == "linear" else VARIANTS[name]()
        for item in a.ft if options is not None else []:
            k, _, v = item.partition("=")
            options.set(k, v)
        rows, shifts = run_variant(name, options, root, ds.samples, ds.labels, run_folds, folds=a.folds, seed=a.seed,
                                   site_shift=a.site_shift, threads=a.threads) if run_folds else ([], [])
        entry = {"options": options.to_dict() if options else None, "folds": rows}
        if a.external:
            entry["external"] = external_figures(name, options, root, a.external, seed=a.seed, threads=a.threads,
                                                 keep=a.keep_models)
        results["variants"][name] = entry
        if not rows:
            if a.output:
                Path(a.output).write_text(json.dumps(results, indent=2, default=float))
            continue
        entry.update(summary=summary(rows), minutes_per_fold=float(np.mean([r["minutes"] for r in rows])))
        s = entry["summary"]
        print(f"{name}: AUC {s['auc'][0]:.3f} ± {s['auc'][1]:.3f}  accuracy {s['accuracy'][0]:.3f} ± {s['accuracy'][1]:.3f}  "
              f"sens {s['sensitivity'][0]:.3f} spec {s['specificity'][0]:.3f}  "
              f"({entry['minutes_per_fold']:.1f} min per fold, {len(rows)} fold(s))", flush=True)
        if shifts:
            from cxrlab.siteshift import format_rows

            entry["site_shift"] = pooled_shift_table(shifts)
            entry["site_shift_per_fold"] = shifts
            print(f"site shift ({name}, test folds, each at its fold's operating point):")
            print("\n".join(format_rows(entry["site_shift"])), flush=True)
        results["variants"][name] = entry
        if a.output:
            Path(a.output).write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
