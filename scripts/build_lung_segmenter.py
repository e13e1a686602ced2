"""Rebuild the lung-field segmenter shipped as src/cxrlab/assets/lungseg.onnx (used by cxrlab.lungs).

    PYTHONPATH=src python scripts/build_lung_segmenter.py            # about 7 minutes on one CPU thread

It trains a small U-Net (4 levels, 8-16-32-64 channels, 128 x 128 input windowed inside the net to
the image's 1st-99th percentile) on the Shenzhen films that have manual lung masks
(../shared/data/shenzhen-lungmasks, see its SOURCES.md), keeping 1 film in 10 (cxrlab.lungs.held_out)
out to measure Dice. Augmentation (rotation, scale, aspect, shift, gamma, contrast, brightness,
blur, resolution loss, noise, and a few non-X-ray pictures with empty masks) is there so the net
holds on other hospitals' films and finds nothing in what is not a chest film. The run is seeded and
single-threaded, so the same data give the same weights. It writes the ONNX file, assets/LUNGSEG.md
(provenance, held-out Dice, SHA-256), and the SHA-256 into cxrlab/lungs.py.
"""

from __future__ import annotations

import argparse
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
from PIL import Image

from cxrlab import lungs
from cxrlab.decode import decode_image, resize

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "src" / "cxrlab" / "assets"
S = lungs.SIZE


class Window(nn.Module):
    """Per-image window: the 1st percentile -> 0, the 99th -> 1, clipped (a flat image -> all 0); ``size``: the
    side of the square images it is given."""

    def __init__(self, size: int = S):
        super().__init__()
        self.lo, self.hi = round(0.01 * (size * size - 1)), round(0.99 * (size * size - 1))  # the percentiles' ranks

    def forward(self, x):
        flat = x.reshape(x.shape[0], -1)
        ranked = torch.sort(flat, dim=1).values
        lo, hi = ranked[:, self.lo:self.lo + 1], ranked[:, self.hi:self.hi + 1]
        return ((flat - lo) / (hi - lo).clamp_min(1e-3)).clamp(0, 1).reshape(x.shape)


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    def __init__(self, channels=(8, 16, 32, 64)):
        super().__init__()
        self.window = Window()
        self.down = nn.ModuleList()
        c = 1
        for o in channels:
            self.down.append(block(c, o))
            c = o
        self.up, self.merge = nn.ModuleList(), nn.ModuleList()
        for o in reversed(channels[:-1]):
            self.up.append(nn.ConvTranspose2d(c, o, 2, stride=2))
            self.merge.append(block(2 * o, o))
            c = o
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, x):  # logits
        x = self.window(x)
        skips = []
        for i, level in enumerate(self.down):
            x = level(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], 1))
        return self.head(x)


def load(data: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[np.ndarray]]:
    """Names, 128 px images and soft masks, and the 299 px manual masks, of every masked film."""
    names, images, masks, full = [], [], [], []
    for mask_path in sorted((data / "shenzhen-lungmasks").glob("CHNCXR_*.png")):
        label = "abnormal" if mask_path.stem.endswith("_1") else "normal"
        gray = decode_image(data / "shenzhen" / label / f"{mask_path.stem}.jpg").pixels
        mask = np.asarray(Image.open(mask_path).convert("L"), dtype=np.float32) / 255.0
        names.append(mask_path.stem)
        images.append(resize(gray, S))
        masks.append(resize(mask, S))
        full.append(mask > 0.5)
    return names, np.stack(images), np.stack(masks), full


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of each (1, S, S) image with its own sigma (pixels)."""
    t = torch.arange(-4, 5, dtype=x.dtype)
    k = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (n, 9)
    n = x.shape[0]
    y = F.conv2d(F.pad(x.transpose(0, 1), (4, 4, 0, 0), mode="replicate"), k[:, None, None, :], groups=n)
    y = F.conv2d(F.pad(y, (0, 0, 4, 4), mode="replicate"), k[:, None, :, None], groups=n)
    return y.transpose(0, 1)


def not_xrays(n: int, g: torch.Generator) -> torch.Tensor:
    """Pictures that are not chest films: flat, white noise, smooth random fields, gradients."""
    out = torch.empty(n, 1, S, S)
    for i in range(n):
        kind = int(torch.randint(4, (1,), generator=g))
        if kind == 0:
            out[i] = torch.rand(1, generator=g)
        elif kind == 1:
            out[i] = torch.rand(1, S, S, generator=g)
        elif kind == 2:
            cells = int(torch.randint(2, 33, (1,), generator=g))
            field = torch.rand(1, 1, cells, cells, generator=g)
            out[i] = F.interpolate(field, size=(S, S), mode="bilinear", align_corners=False)[0]
            out[i] += 0.05 * torch.randn(1, S, S, generator=g)
        else:
            a = torch.rand(3, generator=g)
            yy, xx = torch.meshgrid(torch.linspace(0, 1, S), torch.linspace(0, 1, S), indexing="ij")
            out[i] = a[0] * xx + a[1] * yy + a[2] * torch.rand(1, S, S, generator=g)
    return out.clamp(0, 1)


def augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=g)

    # Geometry: rotation +-10 deg, zoom 0.8-1.25 (the film's lungs smaller or larger), aspect +-12 %, shift +-8 %.
    angle, zoom, aspect = u(-10, 10) * math.pi / 180, torch.exp(u(math.log(0.8), math.log(1.25))), torch.exp(u(-0.12, 0.12))
    sx, sy = 1 / (zoom * aspect), aspect / zoom
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx, -sin * sy, u(-0.16, 0.16)], 1),
                         torch.stack([sin * sx, cos * sy, u(-0.16, 0.16)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x, y = F.grid_sample(x, grid, align_corners=False), F.grid_sample(y, grid, align_corners=False)
    # Exposure and film curve: gamma, contrast, brightness (the net's window undoes only the linear part).
    x = x.clamp(0, 1) ** torch.exp(u(-0.6, 0.6))[:, None, None, None]
    x = ((x - 0.5) * u(0.6, 1.4)[:, None, None, None] + 0.5 + u(-0.15, 0.15)[:, None, None, None]).clamp(0, 1)
    # Resolution: blur, or a trip through a smaller image.
    sharp = torch.rand(n, generator=g) < 0.5
    x = torch.where(sharp[:, None, None, None], x, blur(x, u(0.3, 1.8)))
    small = torch.rand(n, generator=g) < 0.2
    if small.any():
        side = int(torch.randint(32, 96, (1,), generator=g))
        lowres = F.interpolate(F.interpolate(x, size=(side, side), mode="area"), size=(S, S), mode="bilinear", align_corners=False)
        x = torch.where(small[:, None, None, None], lowres, x)
    x = x + u(0, 0.03)[:, None, None, None] * torch.randn(x.shape, generator=g) * (torch.rand(n, generator=g) < 0.3)[:, None, None, None]
    # One picture in 16 is not a chest film: it should get an empty mask.
    other = torch.rand(n, generator=g) < 1 / 16
    if other.any():
        x = torch.where(other[:, None, None, None], not_xrays(n, g), x)
        y = torch.where(other[:, None, None, None], torch.zeros_like(y), y)
    return x.clamp(0, 1), y.clamp(0, 1)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    dice = (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + (1 - dice)


def export(model: nn.Module) -> bytes:
    model.eval()
    buf = io.BytesIO()
    torch.onnx.export(nn.Sequential(model, nn.Sigmoid()), (torch.zeros(2, 1, S, S),), buf, input_names=["image"],
                      output_names=["mask"], dynamic_axes={"image": {0: "n"}, "mask": {0: "n"}}, opset_version=17,
                      dynamo=False)
    return buf.getvalue()


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    inter = np.logical_and(pred, truth).sum()
    return 2 * inter / max(1, pred.sum() + truth.sum()), inter / max(1, np.logical_or(pred, truth).sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder holding shenzhen/ and shenzhen-lungmasks/")
    ap.add_argument("--steps", type=int, default=600, help="training steps of --batch films (default 600)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ASSETS, help="where lungseg.onnx and LUNGSEG.md go (default: the package's assets)")
    a = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    names, images, masks, full = load(a.data)
    test = np.array([lungs.held_out(n) for n in names])
    x_train, y_train = torch.from_numpy(images[~test, None]), torch.from_numpy(masks[~test, None])
    print(f"{len(names)} masked films: {int((~test).sum())} to train on, {int(test.sum())} held out")

    model = UNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=a.steps, pct_start=0.1)
    start = time.monotonic()
    model.train()
    for step in range(a.steps):
        pick = torch.randint(len(x_train), (a.batch,), generator=g)
        with torch.no_grad():
            x, y = augment(x_train[pick], y_train[pick], g)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {(time.monotonic() - start) / 60:.1f} min", flush=True)
    minutes = (time.monotonic() - start) / 60

    onnx_bytes = export(model)
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    probs = lungs.masks_128([images[i] for i in np.flatnonzero(test)], session=session)
    scores = np.array([dice_iou(resize(p, full[i].shape) > lungs.THRESHOLD, full[i])
                       for p, i in zip(probs, np.flatnonzero(test))])
    dice, iou = scores[:, 0], scores[:, 1]
    print(f"held-out films: Dice mean {dice.mean():.4f} (min {dice.min():.3f}), IoU mean {iou.mean():.4f}")

    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "lungseg.onnx").write_bytes(onnx_bytes)
    sha = hashlib.sha256(onnx_bytes).hexdigest()
    worst = ", ".join(f"{names[i]} {d:.3f}" for d, i in sorted(zip(dice, np.flatnonzero(test)))[:3])
    (a.out / "LUNGSEG.md").write_text(f"""# lungseg.onnx: lung-field segmenter

Used by `cxrlab.lungs` (`lung_mask`, `lung_box`, `crop_to_lungs`).

* **Network:** U-Net, 4 levels of 8-16-32-64 channels, {sum(p.numel() for p in model.parameters()):,} parameters
  (fp32), ONNX opset 17. Input `image` (N, 1, {S}, {S}) float, gray in [0, 1], the image squashed to a
  square; the net windows each image to its own 1st-99th percentile. Output `mask` (N, 1, {S}, {S}) lung
  probability; lung = probability > {lungs.THRESHOLD}.
* **Data:** the {len(names)} Shenzhen films (`shared/data/shenzhen/`, 299 px) with manual lung masks by Stirenko et
  al. 2018 (`shared/data/shenzhen-lungmasks/`; provenance and licence, CC BY-NC-SA 4.0 as reported, in
  its `SOURCES.md`). {int((~test).sum())} trained on; {int(test.sum())} held out (`cxrlab.lungs.held_out`: first byte of
  SHA-256 of the file stem divisible by 10). The masks outline the aerated lung, so opacified or
  collapsed regions of some TB films are left out, and the net learnt that. The weights derive from
  these masks: whether they may ship under the package's Apache-2.0 licence, or carry the masks'
  non-commercial, share-alike terms, is not settled; check before commercial use.
* **Training:** {a.steps} steps of {a.batch} films, AdamW, one-cycle learning rate up to 3e-3, BCE + Dice loss;
  augmentation: rotation +-10 deg, zoom 0.8-1.25, aspect +-12 %, shift +-8 %, gamma, contrast, brightness,
  blur, resolution loss, noise, and 1 in 16 pictures replaced by a non-X-ray (flat, noise, smooth
  field, gradient) with an empty mask. Seed {a.seed}, torch {torch.__version__}, 1 CPU thread:
  {minutes:.1f} minutes.
* **Held-out films ({int(test.sum())}), at 299 px:** Dice {dice.mean():.4f} mean, {np.median(dice):.4f} median, {dice.min():.3f} min
  (lowest: {worst}); IoU {iou.mean():.4f} mean.
* **Rebuild:** `PYTHONPATH=src python scripts/build_lung_segmenter.py --seed {a.seed} --steps {a.steps}` (from the
  repository root, with `../shared/data`); it rewrites this file, the ONNX file and `ASSET_SHA256` in
  `src/cxrlab/lungs.py`.
* **SHA-256 of lungseg.onnx:** `{sha}` ({len(onnx_bytes):,} bytes)
""")
    if a.out.resolve() == ASSETS.resolve():
        src = REPO / "src" / "cxrlab" / "lungs.py"
        text = src.read_text()
        src.write_text(re.sub(r'^ASSET_SHA256 = "[0-9a-f]{64}"', f'ASSET_SHA256 = "{sha}"', text, count=1, flags=re.M))
    print(f"wrote {a.out / 'lungseg.onnx'} ({len(onnx_bytes):,} bytes, sha256 {sha}) and LUNGSEG.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
