"""Accuracy benchmark: k-fold CV on Shenzhen, linear head vs fine-tuned variants, same folds for every variant.

    python benchmarks/accuracy.py ../shared/data/shenzhen --variants linear,plain,best --folds 5 [--run-folds 0,1]
        [--ft KEY=VALUE ...] [--tta] [--site-shift] [--output results.json]

Folds are crossval.assign_folds (the `cxrlab cv` folds); the inner validation split (head warm-up's C,
best epoch, Platt calibration, operating point) is a stratified fifth of the training folds, as in `cxrlab cv`.
Prints per fold and mean ± sd: AUC, accuracy at 0.5 after Platt calibration (as `cxrlab train --fine-tune`
exports it), sensitivity/specificity at the WHO operating point chosen on the clean validation images,
minutes of training per fold; --tta adds the same numbers with 4 and 8 test-time views (one trained
model per fold, scored several ways); with --site-shift, the site-shift table per variant (test folds,
pooled) at each fold's operating point, scored the way the variant's exported model scores.
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


def _arrays(pixels, size):
    from cxrlab.decode import resize

    return np.stack([np.round(resize(p, size) * 255).astype(np.uint8) for p in pixels])


def _view_logits(module, head_W, head_b, X, size, views=0):
    """(1 + views, N, k) logits: the identity, then the first ``views`` of finetune.TTA_VIEWS (the exported TTA)."""
    import torch
    import torch.nn.functional as F

    from cxrlab.finetune import _cl, _resize_to, _to_tensor, tta_grids

    W, b = torch.from_numpy(head_W), torch.from_numpy(head_b)
    grids = tta_grids(size, views) if views else None
    out = []
    module.eval()
    with torch.no_grad():
        for i in range(0, len(X), 32):
            x = _resize_to(_to_tensor(X[i : i + 32]), size)
            per_view = [module(_cl(x))[0] @ W.T + b]
            for v in range(views):
                g = grids[v : v + 1].expand(len(x), -1, -1, -1)
                per_view.append(module(_cl(F.grid_sample(x, g, mode="bilinear", padding_mode="zeros",
                                                         align_corners=False)))[0] @ W.T + b)
            out.append(torch.stack(per_view).numpy())
    return np.concatenate(out, axis=1).astype(np.float64)


def _scores(module, head_W, head_b, X, size, views=0):
    return _view_logits(module, head_W, head_b, X, size, views).mean(0)


def run_variant(name, options, pixels, y, fold, inner_val, run_folds, *, seed, tta, site_shift, threads):
    import torch

    from cxrlab.backbones import _weights_path, get_spec
    from scipy.special import expit

    from cxrlab.calibrate import PlattScaler, TemperatureScaler, choose_operating_point, softmax
    from cxrlab.finetune import fine_tune
    from cxrlab.metrics import binary_report, roc_auc
    from cxrlab.siteshift import shift_rows

    torch.set_num_threads(threads)
    base = get_spec("efficientnet-lite0")
    size = options.input_size or base.input_size
    X = _arrays(pixels, size)
    rows, shift_by_fold = [], []
    for f in run_folds:
        test = fold == f
        tr, va = ~test & ~inner_val, ~test & inner_val
        t0 = time.time()
        res = fine_tune(base, _weights_path(base), X[tr], y[tr], X[va], y[va], seed=seed, options=copy.deepcopy(options),
                        on_epoch=lambda r: print(f"  [{name} fold {f}] epoch {r['epoch']}: loss {r['loss']:.3f} "
                                                 f"val AUC {r.get('val_auc', float('nan')):.3f} "
                                                 f"val acc {r.get('val_accuracy', float('nan')):.3f}", flush=True))
        minutes = (time.time() - t0) / 60
        row = {"fold": f, "n": int(test.sum()), "train_minutes": round(minutes, 2), "best_epoch": res.best_epoch,
               "history": res.history}
        view_counts = sorted({0, options.tta_views if options.tta else 0} | ({3, 7} if tta else set()))
        L_va = _view_logits(res.module, res.head_W, res.head_b, X[va], size, max(view_counts))
        L_te = _view_logits(res.module, res.head_W, res.head_b, X[test], size, max(view_counts))
        for views in view_counts:
            z_va, z_te = L_va[: 1 + views].mean(0), L_te[: 1 + views].mean(0)
            T = TemperatureScaler().fit(z_va, y[va]).temperature_
            platt = PlattScaler().fit(z_va[:, 1] - z_va[:, 0], y[va])  # what `cxrlab train --fine-tune` folds in
            p_va, p_te = platt.transform(z_va[:, 1] - z_va[:, 0]), platt.transform(z_te[:, 1] - z_te[:, 0])
            op = choose_operating_point(y[va], p_va, "who")
            rep = binary_report(y[test], p_te, op.threshold)
            key = f"tta{views}" if views else "plain"
            row[key] = {"auc": roc_auc(y[test], p_te), "accuracy": float(np.mean((p_te >= 0.5) == y[test])),
                        "accuracy_temperature": float(np.mean((softmax(z_te / T)[:, 1] >= 0.5) == y[test])),
                        "sensitivity": rep["sensitivity"], "specificity": rep["specificity"],
                        "threshold": op.threshold, "platt": (platt.a_, platt.b_)}
        deployed = row[f"tta{options.tta_views}" if options.tta else "plain"]  # what the exported model does
        print(f"{name} fold {f}: AUC {row['plain']['auc']:.3f} acc {row['plain']['accuracy']:.3f} "
              f"(temperature only {row['plain']['accuracy_temperature']:.3f}) "
              f"sens {row['plain']['sensitivity']:.3f} spec {row['plain']['specificity']:.3f} "
              + "".join(f"| TTA x{v + 1} AUC {row[f'tta{v}']['auc']:.3f} acc {row[f'tta{v}']['accuracy']:.3f} "
                        for v in view_counts[1:])
              + f"| {minutes:.1f} min training, best epoch {res.best_epoch}", flush=True)
        if site_shift:
            idx = np.flatnonzero(test)
            W, b, platt_ab = res.head_W, res.head_b, deployed["platt"]
            views = options.tta_views if options.tta else 0

            def score(batch, module=res.module):
                z = _scores(module, W, b, batch.astype(np.float32), size, views)
                return expit(platt_ab[0] * (z[:, 1] - z[:, 0]) + platt_ab[1])

            shift_by_fold.append(shift_rows(y[idx], [pixels[i] for i in idx], size, score, deployed["threshold"]))
        rows.append(row)
    return rows, shift_by_fold


def run_linear(root, fold_seed):
    from cxrlab.crossval import cross_validate

    t0 = time.time()
    r = cross_validate(root, folds=5, seed=fold_seed)
    r["minutes_total"] = round((time.time() - t0) / 60, 2)
    return r


def summary(rows, key="plain"):
    out = {}
    for m in ("auc", "accuracy", "sensitivity", "specificity"):
        v = [r[key][m] if key in r else r[m] for r in rows]
        out[m] = (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
    return out


def pooled_shift_table(shift_by_fold):
    """Mean over folds of each shift's AUC / sens / spec (each fold at its own stored operating point)."""
    names = [r["shift"] for r in shift_by_fold[0]]
    table = []
    for i, n in enumerate(names):
        vals = {m: float(np.mean([f[i][m] for f in shift_by_fold])) for m in ("auc", "sensitivity", "specificity")}
        table.append({"shift": n, **vals, "meets_who": vals["sensitivity"] >= 0.9 and vals["specificity"] >= 0.7})
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "shenzhen"))
    p.add_argument("--variants", default="linear,plain,best")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--run-folds", default=None, help="comma-separated fold indices to fine-tune (default: all)")
    p.add_argument("--ft", action="append", default=[], metavar="KEY=VALUE", help="override an option of every fine-tuned variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tta", action="store_true")
    p.add_argument("--site-shift", action="store_true")
    p.add_argument("--output", default=None, help="write all figures as JSON here")
    a = p.parse_args(argv)

    from cxrlab.crossval import assign_folds
    from cxrlab.decode import decode_image
    from cxrlab.discover import discover
    from cxrlab.split import group_key

    root = Path(a.data)
    ds = discover(root)
    samples = ds.samples
    y = np.array([s.label == "abnormal" for s in samples], np.int64)
    groups = [group_key(s.relpath, None) for s in samples]
    fold = assign_folds(groups, [s.label for s in samples], a.folds, a.seed)  # the folds of `cxrlab cv`
    inner_val = assign_folds(groups, [s.label for s in samples], 5, a.seed + 1) == 0
    run_folds = [int(f) for f in a.run_folds.split(",")] if a.run_folds else list(range(a.folds))
    results = {"data": str(root), "n": len(samples), "folds": a.folds, "run_folds": run_folds, "variants": {}}
    pixels = None
    for name in a.variants.split(","):
        if name == "linear":
            r = run_linear(root, a.seed)
            results["variants"]["linear"] = r
            for row in r["folds"]:
                print(f"linear fold {row['fold']}: AUC {row['auc']:.3f} acc {row['accuracy']:.3f} "
                      f"sens {row['sensitivity']:.3f} spec {row['specificity']:.3f}")
            s = r["summary"]
            print(f"linear: AUC {s['auc']['mean']:.3f} ± {s['auc']['sd']:.3f}  accuracy {s['accuracy']['mean']:.3f} ± "
                  f"{s['accuracy']['sd']:.3f}  ({r['minutes_total'] / a.folds:.2f} min per fold incl. embedding)", flush=True)
            continue
        if pixels is None:
            pixels = [decode_image(root / s.relpath).pixels for s in samples]
        options = VARIANTS[name]()
        for item in a.ft:
            k, _, v = item.partition("=")
            options.set(k, v)
        rows, shifts = run_variant(name, options, pixels, y, fold, inner_val, run_folds, seed=a.seed, tta=a.tta,
                                   site_shift=a.site_shift, threads=a.threads)
        entry = {"options": options.to_dict(), "folds": rows, "summary": summary(rows),
                 "minutes_per_fold": float(np.mean([r["train_minutes"] for r in rows]))}
        for key in [k for k in rows[0] if k.startswith("tta")]:
            entry[f"summary_{key}"] = summary(rows, key)
        s = entry["summary"]
        print(f"{name}: AUC {s['auc'][0]:.3f} ± {s['auc'][1]:.3f}  accuracy {s['accuracy'][0]:.3f} ± {s['accuracy'][1]:.3f}  "
              f"sens {s['sensitivity'][0]:.3f} spec {s['specificity'][0]:.3f}  "
              f"({entry['minutes_per_fold']:.1f} min training per fold, {len(rows)} fold(s))", flush=True)
        for key in [k for k in rows[0] if k.startswith("tta")]:
            t = entry[f"summary_{key}"]
            print(f"{name} + TTA x{int(key[3:]) + 1}: AUC {t['auc'][0]:.3f} ± {t['auc'][1]:.3f}  accuracy "
                  f"{t['accuracy'][0]:.3f} ± {t['accuracy'][1]:.3f}  sens {t['sensitivity'][0]:.3f} spec {t['specificity'][0]:.3f}")
        if shifts:
            from cxrlab.siteshift import format_rows

            entry["site_shift"] = pooled_shift_table(shifts)
            entry["site_shift_per_fold"] = shifts
            print(f"site shift ({name}, test folds, each at its fold's operating point):")
            print("\n".join(format_rows(entry["site_shift"])), flush=True)
        results["variants"][name] = entry
        if a.output:
            Path(a.output).write_text(json.dumps(results, indent=2, default=float))
    if a.output:
        Path(a.output).write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
