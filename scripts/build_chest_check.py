"""Rebuild the frontal-chest-X-ray check shipped as src/cxrlab/assets/chestcheck.onnx (used by cxrlab.chest).

    PYTHONPATH=src python scripts/build_chest_check.py          # 5-fold cross-validation, then the shipped fit

The check answers one question for any model, whatever hospital it was trained on: is this picture a frontal
chest radiograph at all? A small CNN sees the picture squashed to 128 x 128 (windowed to its own 1st-99th
percentile) and the lung-field probability map of the shipped segmenter (assets/lungseg.onnx), and gives
the probability that the picture is a frontal chest radiograph.

Positives: the Shenzhen films of the train and validation splits (the project's default hash split; the
test split is kept out to measure), and the frontal films of ../shared/data/cxr_variants (pediatric,
portable/AP, tubes and lines). Negatives: ../shared/data/not_cxr (other body parts, CT, MRI, ultrasound,
photos, documents), the lateral chest films of cxr_variants (the check refuses laterals: a model trained
on frontal films cannot read them), and generated pictures (flat, noise, smooth fields, gradients, text
pages, stripes, checkerboards, ellipse phantoms, cartoon lungs). Every picture is augmented (geometry, exposure, film
curve, resolution, noise, burnt-in markers, borders) so that neither class is told apart by how it was
acquired. ../shared/data/india_da is never used to fit: it measures.

Figures on the folders the check is fitted on are cross-validated by source: each source repository (and
the Shenzhen films, at random) falls in one of 5 folds, and a fold's pictures are scored by a check fitted
without them. The run is seeded and single-threaded, so the same data give the same weights. It writes the
ONNX file, assets/CHESTCHECK.md (provenance and every figure) and the SHA-256 and threshold into
cxrlab/chest.py.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from cxrlab import chest, lungs
from cxrlab.decode import decode_image, resize
from cxrlab.discover import discover
from cxrlab.split import split_samples

from build_lung_segmenter import Window, blur  # the same per-image window and blur as the lung segmenter

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "src" / "cxrlab" / "assets"
S = lungs.SIZE  # pictures are kept at the segmenter's size; the network sees them at --size
FOLDS = 5


def down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ChestNet(nn.Module):
    """image (N, 1, size, size) [+ lung probability (N, 1, S, S)] -> logit that it is a frontal chest radiograph."""

    def __init__(self, size: int, lungs: bool, channels=(16, 32, 48, 64)):
        super().__init__()
        self.size, self.lungs = size, lungs
        self.window = Window(size)
        layers, c = [], 2 if lungs else 1
        for o in channels:
            layers.append(down(c, o))
            c = o
        self.features = nn.Sequential(*layers)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(2 * c, 1)

    def forward(self, image, lung=None):
        x = self.window(image)
        x = self.features(torch.cat([x, lung], 1) if self.lungs else x)
        x = torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)
        return self.fc(self.drop(x))[:, 0]


class Probability(nn.Module):
    def __init__(self, net: ChestNet):
        super().__init__()
        self.net = net

    def forward(self, image, *lung):
        return torch.sigmoid(self.net(image, *lung))


# ------------------------------------------------------------------ data
def gray128(path: Path) -> np.ndarray:
    # The way cxrlab.chest sees a picture: decoded (at least 224 px, as every model decodes), squashed to S.
    return resize(decode_image(path, min_size=224).pixels, S)


def manifest_groups(folder: Path) -> dict[str, str]:
    with open(folder / "manifest.csv", newline="") as f:
        return {Path(r["file"]).name: f"{folder.name}:{r['label']}:{r['source_repo']}" for r in csv.DictReader(f)}


def load(data: Path):
    """Pictures (N, S, S), targets (1 = frontal chest film), groups (source), kinds, names; and the
    Shenzhen test films and India DA films, to measure."""
    x, y, group, kind, names = [], [], [], [], []
    ds = discover(data / "shenzhen")
    manifest, _ = split_samples(ds.samples)
    test = []
    rng = np.random.default_rng(0)
    for e in manifest.entries:
        if e.split == "test":
            test.append(gray128(data / "shenzhen" / e.relpath))
            continue
        x.append(gray128(data / "shenzhen" / e.relpath)); y.append(1); kind.append("shenzhen")
        group.append(f"shenzhen:{rng.integers(FOLDS)}"); names.append(e.relpath)
    variants = manifest_groups(data / "cxr_variants")
    for name, g in sorted(variants.items()):
        lateral = name.startswith("lateral")
        x.append(gray128(data / "cxr_variants" / name)); y.append(0 if lateral else 1)
        kind.append("lateral" if lateral else "variant"); group.append(g); names.append(name)
    for name, g in sorted(manifest_groups(data / "not_cxr").items()):
        x.append(gray128(data / "not_cxr" / name)); y.append(0); kind.append("not_cxr"); group.append(g); names.append(name)
    india = [gray128(data / "india_da" / s.relpath) for s in discover(data / "india_da").samples]
    return (np.stack(x), np.array(y, np.float32), np.array(group), np.array(kind), names,
            np.stack(test), np.stack(india))


def fold_of(groups: np.ndarray) -> np.ndarray:
    """Each source group in one fold; groups dealt largest first so folds come out of similar size."""
    names, counts = np.unique(groups, return_counts=True)
    load_, fold = np.zeros(FOLDS), {}
    for i in np.argsort(-counts, kind="stable"):
        if names[i].startswith("shenzhen:"):
            fold[names[i]] = int(names[i].split(":")[1])
        else:
            fold[names[i]] = int(np.argmin(load_))
        load_[fold[names[i]]] += counts[i]
    return np.array([fold[g] for g in groups])


# ------------------------------------------------------------------ generated negatives
def generated(n: int, g: np.random.Generator) -> np.ndarray:
    """Pictures that are not radiographs: flat, noise, smooth fields, gradients, text pages, stripes,
    checkerboards, ellipse phantoms (cross-section-like), cartoon lungs (two dark blobs on a plain field)."""
    yy, xx = np.mgrid[0:S, 0:S] / (S - 1)
    out = np.empty((n, S, S), np.float32)
    for i in range(n):
        k = g.integers(10)
        if k == 0:
            a = np.full((S, S), g.random())
        elif k == 1:
            a = g.random((S, S))
        elif k == 2:
            cells = int(g.integers(2, 33))
            a = resize(g.random((cells, cells)).astype(np.float32), S)
        elif k == 3:
            c = g.random(3)
            a = c[0] * xx + c[1] * yy + c[2] * g.random((S, S)) * 0.2
        elif k == 4:
            a = _text_page(g)
        elif k == 5:
            f, th = g.uniform(2, 20), g.uniform(0, np.pi)
            a = 0.5 + 0.5 * np.sin(2 * np.pi * f * (xx * np.cos(th) + yy * np.sin(th)))
        elif k == 6:
            cells = int(g.integers(2, 16))
            a = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(float)
        elif k == 7:
            a = _phantom(g)
        else:
            a = _cartoon_lungs(g)
        out[i] = a
    return np.clip(out, 0, 1)


def _cartoon_lungs(g: np.random.Generator) -> np.ndarray:
    """Two dark lung-shaped blobs (soft or hard-edged) on a plain field, maybe with bright spots: a drawing of
    a chest film, not one."""
    yy, xx = np.mgrid[0:S, 0:S] / (S - 1)
    a = np.full((S, S), g.uniform(0.4, 0.95)) + g.uniform(-0.2, 0.2) * (yy - 0.5)
    sep, cy, depth = g.uniform(0.12, 0.28), g.uniform(0.35, 0.65), g.uniform(0.2, 0.7)
    w, h = g.uniform(0.005, 0.05), g.uniform(0.02, 0.15)
    for cx in (0.5 - sep, 0.5 + sep):
        d = (xx - cx) ** 2 / w + (yy - cy) ** 2 / h
        a -= depth * (np.exp(-d) if g.random() < 0.6 else (d <= 1.5))
    for _ in range(int(g.integers(0, 5))):
        cx, cyy = g.uniform(0.2, 0.8, 2)
        a += g.uniform(0.1, 0.4) * np.exp(-((xx - cx) ** 2 + (yy - cyy) ** 2) / g.uniform(0.001, 0.01))
    return a + g.uniform(0, 0.05) * g.standard_normal((S, S))


def _text_page(g: np.random.Generator) -> np.ndarray:
    img = Image.new("L", (S * 2, S * 2), int(g.integers(150, 256)))
    d = ImageDraw.Draw(img)
    ink = int(g.integers(0, 100))
    for row in range(int(g.integers(4, 20))):
        y = int(g.integers(0, S * 2))
        text = "".join(chr(int(c)) for c in g.integers(65, 91, int(g.integers(5, 40))))
        d.text((int(g.integers(0, S)), y), text, fill=ink)
    return np.asarray(img.resize((S, S), Image.BILINEAR), np.float32) / 255


def _phantom(g: np.random.Generator) -> np.ndarray:
    """Ellipses inside an ellipse on black: the look of a CT or MRI slice."""
    yy, xx = np.mgrid[-1:1:S * 1j, -1:1:S * 1j]
    a = np.zeros((S, S))
    for j in range(int(g.integers(1, 8))):
        cx, cy = (0, 0) if j == 0 else g.uniform(-0.5, 0.5, 2)
        rx, ry = (g.uniform(0.6, 0.95), g.uniform(0.5, 0.95)) if j == 0 else g.uniform(0.05, 0.4, 2)
        th = g.uniform(0, np.pi)
        u, v = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th), -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        inside = (u / rx) ** 2 + (v / ry) ** 2 <= 1
        a[inside] = g.uniform(0.6, 1.0) if j == 0 else g.uniform(0, 1)
    return a + 0.03 * g.standard_normal((S, S))


# ------------------------------------------------------------------ augmentation
def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The same acquisition changes for every class: geometry, borders, exposure, film curve, resolution,
    noise, burnt-in markers."""
    n = x.shape[0]

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=g)

    def some(p):
        return (torch.rand(n, generator=g) < p)[:, None, None, None]

    x = torch.where(some(0.5), x.flip(3), x)
    # rotation +-15 deg, zoom 0.65-1.3 (below 1: the film smaller in the frame, with a border), aspect, shift
    angle, zoom, aspect = u(-15, 15) * math.pi / 180, torch.exp(u(math.log(0.65), math.log(1.3))), torch.exp(u(-0.15, 0.15))
    sx, sy = 1 / (zoom * aspect), aspect / zoom
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx, -sin * sy, u(-0.15, 0.15)], 1),
                         torch.stack([sin * sx, cos * sy, u(-0.15, 0.15)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    border = torch.where(torch.rand(n, generator=g) < 0.5, torch.zeros(n), u(0, 1))[:, None, None, None]
    inside = F.grid_sample(torch.ones_like(x), grid, align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False) + (1 - inside) * border
    x = x.clamp(0, 1) ** torch.exp(u(-0.7, 0.7))[:, None, None, None]
    x = ((x - 0.5) * u(0.6, 1.4)[:, None, None, None] + 0.5 + u(-0.15, 0.15)[:, None, None, None]).clamp(0, 1)
    curve = torch.sigmoid((x - 0.5) * 8)
    x = torch.where(some(0.2), (curve - curve.amin((2, 3), keepdim=True)) /
                    (curve.amax((2, 3), keepdim=True) - curve.amin((2, 3), keepdim=True)).clamp_min(1e-3), x)
    x = torch.where(some(0.5), x, blur(x, u(0.3, 1.8)))
    side = int(torch.randint(24, 96, (1,), generator=g))
    lowres = F.interpolate(F.interpolate(x, size=(side, side), mode="area"), size=(S, S), mode="bilinear", align_corners=False)
    x = torch.where(some(0.25), lowres, x)
    x = x + some(0.3) * u(0, 0.04)[:, None, None, None] * torch.randn(x.shape, generator=g)
    for i in torch.nonzero(torch.rand(n, generator=g) < 0.3)[:, 0].tolist():  # a burnt-in marker or label
        h, w = (int(v) for v in torch.randint(4, 20, (2,), generator=g))
        top, left = (int(v) for v in torch.randint(0, S - 20, (2,), generator=g))
        x[i, 0, top:top + h, left:left + w] = float(torch.rand(1, generator=g) > 0.3)
    return x.clamp(0, 1)


# ------------------------------------------------------------------ training
def lung_maps(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(lungs.masks_128(list(x[:, 0].numpy())))[:, None]


def net_inputs(model: ChestNet, image: torch.Tensor) -> tuple:
    """What the network is given for pictures at S x S: the picture at its size [and the lung map]."""
    small = F.interpolate(image, size=(model.size, model.size), mode="area") if model.size != S else image
    return (small, lung_maps(image)) if model.lungs else (small,)


def fit(x: np.ndarray, y: np.ndarray, kind: np.ndarray, *, steps: int, batch: int, seed: int, size: int,
        lungs: bool) -> ChestNet:
    """Each batch: half positives (a quarter of them from the variants), half negatives (half of them
    generated)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    pools = {"pos": np.flatnonzero((y == 1) & (kind != "variant")), "variant": np.flatnonzero(kind == "variant"),
             "neg": np.flatnonzero(y == 0)}
    quarter = batch // 4
    model = ChestNet(size, lungs)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    start = time.monotonic()
    for step in range(steps):
        pick = np.concatenate([rng.choice(pools["pos"], batch // 2 - (quarter // 2 if len(pools["variant"]) else 0)),
                               rng.choice(pools["variant"], quarter // 2) if len(pools["variant"]) else [],
                               rng.choice(pools["neg"], quarter)]).astype(int)
        pics = np.concatenate([x[pick], generated(batch - len(pick), rng)])
        target = torch.from_numpy(np.concatenate([y[pick], np.zeros(batch - len(pick), np.float32)]))
        with torch.no_grad():
            inputs = net_inputs(model, augment(torch.from_numpy(pics[:, None].astype(np.float32)), g))
        loss = F.binary_cross_entropy_with_logits(model(*inputs), target * 0.96 + 0.02)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.4f}  {(time.monotonic() - start) / 60:.1f} min", flush=True)
    return model.eval()


def export(model: ChestNet) -> bytes:
    buf = io.BytesIO()
    names = ["image", "lungs"] if model.lungs else ["image"]
    example = (torch.zeros(2, 1, model.size, model.size),) + ((torch.zeros(2, 1, S, S),) if model.lungs else ())
    torch.onnx.export(Probability(model).eval(), example, buf, input_names=names, output_names=["chest"],
                      dynamic_axes={**{n: {0: "n"} for n in names}, "chest": {0: "n"}}, opset_version=17, dynamo=False)
    return buf.getvalue()


def scores(model: ChestNet, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(model(*net_inputs(model, torch.from_numpy(x[:, None].astype(np.float32))))).numpy()


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=0.5, help="refuse below this probability (default 0.5)")
    ap.add_argument("--size", type=int, default=64, help="the network's input side (default 64)")
    ap.add_argument("--lungs", action="store_true", help="also give the network the segmenter's lung map (slower)")
    ap.add_argument("--no-cv", action="store_true", help="skip the cross-validation (the figures then stay unmeasured)")
    ap.add_argument("--out", type=Path, default=ASSETS)
    ap.add_argument("--scores", type=Path, help="also save every score (cross-validated and shipped) to this .npz")
    a = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    x, y, group, kind, names, test, india = load(a.data)
    print(f"{len(x)} pictures to fit ({int(y.sum())} frontal chest films); {len(test)} Shenzhen test films and "
          f"{len(india)} India DA films to measure")
    t = a.threshold
    lines = []
    if not a.no_cv:
        fold = fold_of(group)
        oos = np.zeros(len(x))
        for f in range(FOLDS):
            print(f"fold {f + 1}/{FOLDS}: {int((fold == f).sum())} held out")
            m = fit(x[fold != f], y[fold != f], kind[fold != f], steps=a.steps, batch=a.batch, seed=a.seed,
                    size=a.size, lungs=a.lungs)
            oos[fold == f] = scores(m, x[fold == f])
        for k, what in (("shenzhen", "Shenzhen train+validation films refused"),
                        ("variant", "frontal cxr_variants refused"), ("lateral", "lateral cxr_variants refused"),
                        ("not_cxr", "not_cxr accepted")):
            sel = kind == k
            bad = oos[sel] < t if k != "not_cxr" else oos[sel] >= t
            wrong = ", ".join(n for n, b in zip(np.array(names)[sel], bad) if b) or "none"
            lines.append(f"  * {what}: {int(bad.sum())} of {int(sel.sum())} ({wrong if bad.sum() <= 6 else 'many'})")
    start = time.monotonic()
    model = fit(x, y, kind, steps=a.steps, batch=a.batch, seed=a.seed, size=a.size, lungs=a.lungs)
    minutes = (time.monotonic() - start) / 60
    onnx_bytes = export(model)
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    gen = generated(400, np.random.default_rng(a.seed + 1))

    def refused(pics):
        p = chest.probabilities(list(pics), session=session)
        return int((p < t).sum()), len(p)

    if a.scores:
        np.savez_compressed(a.scores, names=np.array(names), kind=kind, group=group,
                            cross_validated=oos if not a.no_cv else np.full(len(x), np.nan),
                            shenzhen_test=chest.probabilities(list(test), session=session),
                            india=chest.probabilities(list(india), session=session),
                            generated=chest.probabilities(list(gen), session=session))
    shown = {"Shenzhen test films refused": refused(test), "India DA films refused (never fitted on)": refused(india),
             "generated pictures accepted by the network (400 new ones, another seed)": (len(gen) - refused(gen)[0], len(gen))}
    measured = [f"  * {k}: {n} of {m}" for k, (n, m) in shown.items()]
    print("\n".join(["cross-validated (by source):"] + lines + ["shipped check:"] + measured))

    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "chestcheck.onnx").write_bytes(onnx_bytes)
    sha = hashlib.sha256(onnx_bytes).hexdigest()
    n_params = sum(p.numel() for p in model.parameters())
    counts = {k: int((kind == k).sum()) for k in ("shenzhen", "variant", "lateral", "not_cxr")}
    lung_text = (f", and `lungs` (N, 1, {S}, {S}), the lung probability of `lungseg.onnx` on the same picture"
                 if a.lungs else "")
    (a.out / "CHESTCHECK.md").write_text(f"""# chestcheck.onnx: is this a frontal chest radiograph?

Used by `cxrlab.chest` for every model, whatever it was trained on: a picture it refuses is answered
`unknown (not a chest X-ray: ...)` and gets no scores.

* **Network:** {len(model.features)} strided convolution blocks ({'-'.join(str(b[0].out_channels) for b in model.features)} channels), mean and max pooling, one
  linear output; {n_params:,} parameters (fp32), ONNX opset 17. Input `image` (N, 1, {a.size}, {a.size}), gray in
  [0, 1], the picture squashed to a square (windowed inside the net to its own 1st-99th percentile){lung_text}.
  Output `chest` (N,): the probability that the picture is a frontal chest radiograph; below **{t}** it is
  refused.
* **Data:** positives: {counts['shenzhen']} Shenzhen films (`shared/data/shenzhen/`, the train and validation
  splits of the default hash split; its test split is kept out) and {counts['variant']} frontal films of
  `shared/data/cxr_variants/` (pediatric, portable/AP, tubes and lines). Negatives: {counts['not_cxr']} pictures of
  `shared/data/not_cxr/`, the {counts['lateral']} lateral films of `cxr_variants` (laterals are refused as "not a
  frontal chest X-ray": a model trained on frontal films cannot read them), and generated pictures (flat,
  noise, smooth fields, gradients, text pages, stripes, checkerboards, ellipse phantoms, cartoon lungs: two
  dark blobs on a plain field). Provenance and
  licences of each folder are in its `SOURCES.md`. `shared/data/india_da/` is never fitted on.
* **Training:** {a.steps} steps of {a.batch} pictures (half frontal chest films, a quarter real and a quarter
  generated negatives), AdamW, one-cycle learning rate up to 2e-3, BCE with 2 % label smoothing; every
  picture augmented the same way (flip, rotation +-15 deg, zoom 0.65-1.3 with borders, aspect, shift,
  gamma, contrast, brightness, film curve, blur, resolution loss, noise, burnt-in markers). Seed {a.seed},
  torch {torch.__version__}, 1 CPU thread: {minutes:.1f} minutes for the shipped fit.
* **Cross-validated by source** ({FOLDS} folds; each source repository of not_cxr and cxr_variants in one fold,
  the Shenzhen films dealt at random; each picture scored by a check fitted without its fold), threshold {t}:
{chr(10).join(lines) if lines else '  * not measured (--no-cv)'}
* **The shipped check on pictures it was not fitted on**, threshold {t}:
{chr(10).join(measured)}
* **Rebuild:** `PYTHONPATH=src python scripts/build_chest_check.py --seed {a.seed} --steps {a.steps} --size {a.size}{' --lungs' if a.lungs else ''}` (from the
  repository root, with `../shared/data`); it rewrites this file, the ONNX file, and `ASSET_SHA256` and
  `THRESHOLD` in `src/cxrlab/chest.py`.
* **SHA-256 of chestcheck.onnx:** `{sha}` ({len(onnx_bytes):,} bytes)
""")
    if a.out.resolve() == ASSETS.resolve():
        src = REPO / "src" / "cxrlab" / "chest.py"
        text = re.sub(r'^ASSET_SHA256 = "[0-9a-f]*"', f'ASSET_SHA256 = "{sha}"', src.read_text(), count=1, flags=re.M)
        src.write_text(re.sub(r"^THRESHOLD = [0-9.]+", f"THRESHOLD = {t}", text, count=1, flags=re.M))
    print(f"wrote {a.out / 'chestcheck.onnx'} ({len(onnx_bytes):,} bytes, sha256 {sha}) and CHESTCHECK.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
