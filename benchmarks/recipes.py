"""Recipe probe: one fine-tuning variant on Shenzhen's training split, scored on Shenzhen's test split and on
another hospital, plainly and after label-free BatchNorm re-estimation on that hospital (what `cxrlab adapt` does).

    python benchmarks/recipes.py NAME [KEY=VALUE ...] [--data ../shared/data/shenzhen]
        [--external ../shared/data/india_da] [--results recipes.jsonl]

KEY=VALUE are FineTuneOptions fields (``label_smoothing=0.1``, ``augment.lowres=0.3``), ``backbone=NAME``, or
``crop=MARGIN`` (train and score on the lung-field box of ``cxrlab.lungs``, with that margin). Every variant
uses the same split as ``cxrlab train`` (10 % validation, 10 % test, by hash) and the same seed, so variants
differ only by the recipe. Printed and appended to ``--results`` as one JSON line: minutes of fine-tuning,
Shenzhen validation/test AUC, the other hospital's AUC and sensitivity/specificity at the threshold chosen on
Shenzhen's validation split (WHO rule), before and after BatchNorm re-estimation.

This is the quick probe the default recipe was chosen with (one run per variant: the other hospital's AUC
has a 95 % interval of about ±0.06 at 154 films, so only large effects are decisive); benchmarks/accuracy.py
--external measures the shipped recipe through ``cxrlab.train`` itself.
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
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def load(root: Path, entries, size: int, crop: float | None, labels: dict):
    """(N, size, size) uint8 images and their class indices; with ``crop``, each cut to its lung-field box."""
    from cxrlab.decode import decode_image, resize
    from cxrlab.finetune import load_arrays

    y = np.array([labels[e.label] for e in entries])
    if crop is None:
        X, ok = load_arrays([root / e.relpath for e in entries], size)
        return X, y[ok]
    from cxrlab.lungs import lung_boxes

    pixels = [decode_image((root / e.relpath).read_bytes(), name=e.relpath).pixels for e in entries]
    boxes = lung_boxes(pixels, crop)
    X = np.stack([np.round(resize(p[b.top : b.bottom, b.left : b.right], size) * 255).astype(np.uint8)
                  for p, b in zip(pixels, boxes)])
    return X, y


def scores(module, X, W, b, size: int, tta_views: int | None):
    """Positive-minus-negative logit of each image through the (TTA-wrapped) network and the head."""
    import torch

    from cxrlab.finetune import channels_last, resize_to, to_tensor, with_tta

    net = with_tta(module, size, tta_views) if tta_views else module
    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(X), 32):
            z = net(channels_last(resize_to(to_tensor(X[i : i + 32]), size)))[0].numpy() @ W.T + b
            out.append(z[:, 1] - z[:, 0])
    return np.concatenate(out)


def main(argv=None) -> None:
    import torch

    from cxrlab.backbones import create_backbone, weights_path
    from cxrlab.calibrate import choose_operating_point
    from cxrlab.discover import discover
    from cxrlab.finetune import FineTuneOptions, fine_tune
    from cxrlab.finetune.network import reestimate_batchnorm
    from cxrlab.metrics import roc_auc
    from cxrlab.split import split_samples

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("options", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--data", default=str(SHARED / "shenzhen"))
    p.add_argument("--external", default=str(SHARED / "india_da"))
    p.add_argument("--results", default=None, help="append the figures as one JSON line to this file")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    opts, backbone, crop = FineTuneOptions(), "efficientnet-lite0", None
    for item in a.options:
        key, _, value = item.partition("=")
        if key == "backbone":
            backbone = value
        elif key == "crop":
            crop = float(value)
        else:
            opts.set(key, value)
    data, external = Path(a.data), Path(a.external)
    manifest, _ = split_samples(discover(data).samples, validation_percentage=10, testing_percentage=10)
    labels = {"normal": 0, "abnormal": 1}
    bb = create_backbone(backbone)
    size = opts.input_size or bb.spec.input_size
    split = {s: load(data, manifest.subset(s), size, crop, labels) for s in ("train", "validation", "test")}
    X_ext, y_ext = load(external, discover(external).samples, size, crop, labels)

    t0 = time.time()
    res = fine_tune(bb.spec, weights_path(bb.spec), *split["train"], *split["validation"], seed=0, options=opts,
                    on_epoch=lambda r: print(f"{a.name} epoch {r['epoch']}: loss {r['loss']:.3f} "
                                             f"val AUC {r.get('val_auc') or float('nan'):.3f}", flush=True))
    minutes = (time.time() - t0) / 60
    tta = opts.tta_views if opts.tta else None

    def score(module, X):
        return scores(module, X, res.head_W, res.head_b, size, tta)

    s_val = score(res.module, split["validation"][0])
    threshold = choose_operating_point(split["validation"][1], s_val, "who").threshold

    def rates(y, s):
        return float(np.mean(s[y == 1] >= threshold)), float(np.mean(s[y == 0] < threshold))

    s_test, s_ext = score(res.module, split["test"][0]), score(res.module, X_ext)
    adapted = copy.deepcopy(res.module)
    reestimate_batchnorm(adapted, X_ext, size)
    s_ext_bn = score(adapted, X_ext)
    out = {"name": a.name, "options": a.options, "minutes": round(minutes, 2), "best_epoch": res.best_epoch,
           "val_auc": roc_auc(split["validation"][1], s_val), "test_auc": roc_auc(split["test"][1], s_test),
           "test_sens_spec": rates(split["test"][1], s_test), "external": external.name,
           "external_auc": roc_auc(y_ext, s_ext), "external_sens_spec": rates(y_ext, s_ext),
           "external_auc_after_bn": roc_auc(y_ext, s_ext_bn), "external_sens_spec_after_bn": rates(y_ext, s_ext_bn)}
    print(json.dumps(out), flush=True)
    if a.results:
        with open(a.results, "a") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
