"""Fine-tuning's torch pieces: the in-graph intensity normalisation, the exported wrapper, test-time augmentation
views, the network's units (for freezing and layer-wise learning rates) and chest-X-ray-aware batch augmentation."""

from __future__ import annotations

import math

import numpy as np

from ..errors import DataError
from ..siteshift import jpeg_recompress
from .options import TTA_VIEWS, AugmentConfig


def torch_module():
    import torch

    return torch


def make_intensity(mode: str, size: int):
    torch = torch_module()

    class IntensityNorm(torch.nn.Module):
        """Per-image intensity normalisation across hospitals, exported inside the ONNX graph."""

        def __init__(self):
            super().__init__()
            self.mode = mode
            self.k = max(1, int(size * size * 0.01))

        def forward(self, x):
            if self.mode == "none":
                return x
            flat = x.flatten(1)
            if self.mode == "window":
                hi = flat.topk(self.k, dim=1).values[:, -1]
                lo = -(-flat).topk(self.k, dim=1).values[:, -1]
                hi, lo = hi.view(-1, 1, 1, 1), lo.view(-1, 1, 1, 1)
                return ((x - lo) / (hi - lo).clamp(min=0.05)).clamp(0.0, 1.0)
            if self.mode == "standardize":
                m = flat.mean(dim=1).view(-1, 1, 1, 1)
                s = flat.std(dim=1).view(-1, 1, 1, 1)
                return ((x - m) / s.clamp(min=0.02) * 0.22 + 0.5).clamp(0.0, 1.0)
            raise DataError(f"unknown intensity normalisation {self.mode!r}; use none, window or standardize")

    if mode not in ("none", "window", "standardize"):
        raise DataError(f"unknown intensity normalisation {mode!r}; use none, window or standardize")
    return IntensityNorm()


def wrap(backbone, intensity):
    torch = torch_module()

    class FineTuned(torch.nn.Module):
        """Intensity normalisation + the backbone: the exported graph's interface."""

        def __init__(self):
            super().__init__()
            self.pre = intensity
            self.backbone = backbone

        def forward(self, image):
            return self.backbone(self.pre(image))

    return FineTuned()


def tta_grids(size: int, views: int = 3):
    """Fixed sampling grids (views, S, S, 2) of the first ``views`` TTA views, constants in the exported graph."""
    torch = torch_module()
    import torch.nn.functional as F

    if not 1 <= views <= len(TTA_VIEWS):
        raise DataError(f"tta_views must be 1..{len(TTA_VIEWS)}, got {views}")
    thetas = []
    for deg, zoom in TTA_VIEWS[:views]:
        a = math.radians(deg)
        thetas.append([[math.cos(a) / zoom, -math.sin(a) / zoom, 0.0], [math.sin(a) / zoom, math.cos(a) / zoom, 0.0]])
    return F.affine_grid(torch.tensor(thetas), [len(thetas), 1, size, size], align_corners=False)


def with_tta(module, size: int, views: int = 3):
    """The exported interface with test-time augmentation: the embedding is averaged over the views (the head
    is linear, so this averages the logits); features (heatmaps) and imagenet_logits come from the identity view."""
    torch = torch_module()
    import torch.nn.functional as F

    class TTA(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module
            self.register_buffer("grids", tta_grids(size, views))

        def forward(self, image):
            # Every view in one batch through one copy of the network: four copies sharing their weights kept
            # OpenVINO from fusing the residual additions into the convolutions (a quarter of the time went to
            # them) and ran four small batches; in one batch the graph ran 2.7x faster in fp32, 1.8x in bf16,
            # with the same outputs (eval-mode BatchNorm does not mix images).
            n = image.shape[0]
            views = [image] + [F.grid_sample(image, self.grids[v : v + 1].expand(n, -1, -1, -1), mode="bilinear",
                                             padding_mode="zeros", align_corners=False)
                               for v in range(self.grids.shape[0])]
            out = self.inner(torch.cat(views))
            return (out[0].reshape(len(views), n, -1).mean(0), *(o[:n] for o in out[1:]))

    return TTA().eval()


def network_units(backbone) -> list:
    """The backbone's layers in order, as units for freezing and layer-wise learning rates."""
    net = getattr(backbone, "net", None)
    if net is not None and hasattr(net, "_blocks"):  # EfficientNet-Lite
        return [[net._conv_stem, net._bn0], *[[b] for b in net._blocks], [net._conv_head, net._bn1]]
    layers = getattr(backbone, "layers", None)
    if layers is not None:  # Inception v3 (2015 graph)
        return [[m] for m in layers.children()]
    return [[backbone]]


def augment_batch(x, size: int, cfg: AugmentConfig, gen):
    """x: (N,1,H,W) float in [0,1] -> (N,1,size,size), seeded by ``gen``. Geometry with one grid_sample."""
    torch = torch_module()
    import torch.nn.functional as F

    n = x.shape[0]

    def u(lo=-1.0, hi=1.0):
        return torch.rand(n, generator=gen) * (hi - lo) + lo

    ang = u() * math.radians(cfg.rotate)
    zoom = torch.exp(u() * math.log1p(cfg.scale))
    asp = torch.exp(u() * math.log1p(cfg.aspect))
    sx, sy = zoom * asp.sqrt(), zoom / asp.sqrt()
    tx, ty = u() * 2 * cfg.translate, u() * 2 * cfg.translate
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([cos / sx * flip, -sin / sy, tx], 1),
                         torch.stack([sin / sx * flip, cos / sy, ty], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    view = (n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * torch.exp(u() * math.log1p(cfg.contrast)).view(view) + mean + (u() * cfg.brightness).view(view)
    x = x.clamp(0.0, 1.0) ** torch.exp(u() * math.log1p(cfg.gamma)).view(view)
    if cfg.sharpen:
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).view(1, 1, 3, 3)
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)
        x = x + (u() * cfg.sharpen).view(view) * (x - blurred)
    x = x.clamp(0.0, 1.0)
    if cfg.film_curve:
        x = _film_curve(x, cfg.film_curve, gen)
    if cfg.lowres:
        pick = torch.rand(n, generator=gen) < cfg.lowres
        sides = torch.randint(64, 161, (n,), generator=gen)
        x = _each(x, pick, lambda i, xi: F.interpolate(
            F.interpolate(xi, size=(int(sides[i]),) * 2, mode="bilinear", antialias=True, align_corners=False),
            size=(size, size), mode="bilinear", align_corners=False))
    if cfg.noise:
        x = (x + torch.randn(x.shape, generator=gen) * (u(0.0, 1.0) * cfg.noise).view(view)).clamp(0.0, 1.0)
    if cfg.invert:
        inv = (torch.rand(n, generator=gen) < cfg.invert).view(view)
        x = torch.where(inv, 1.0 - x, x)
    if cfg.jpeg:
        pick = torch.rand(n, generator=gen) < cfg.jpeg
        quality = torch.randint(20, 91, (n,), generator=gen)
        x = _each(x, pick, lambda i, xi: torch.from_numpy(jpeg_recompress(xi[0, 0].numpy(), int(quality[i])))[None, None])
    return x


def _each(x, pick, change):
    """``x`` with ``change(i, x[i:i+1])`` applied to each picked image (one by one: each has its own parameter)."""
    if not bool(pick.any()):
        return x
    x = x.clone()
    for i in torch_module().nonzero(pick).flatten().tolist():
        x[i : i + 1] = change(i, x[i : i + 1])
    return x


def _film_curve(x, probability: float, gen):
    """A film-like S-curve of random steepness around each picked image's median, renormalised to [0, 1]."""
    torch = torch_module()
    n, view = x.shape[0], (x.shape[0], 1, 1, 1)
    pick = (torch.rand(n, generator=gen) < probability).view(view)
    k = (4.0 + 8.0 * torch.rand(n, generator=gen)).view(view)
    s = torch.sigmoid(k * (x - x.flatten(1).median(dim=1).values.view(view)))
    lo, hi = s.amin(dim=(1, 2, 3), keepdim=True), s.amax(dim=(1, 2, 3), keepdim=True)
    return torch.where(pick, (s - lo) / (hi - lo).clamp(min=1e-6), x)


def to_tensor(X):
    torch = torch_module()
    X = np.asarray(X)
    t = torch.from_numpy(np.ascontiguousarray(X))
    t = t.float() / 255.0 if X.dtype == np.uint8 else t.float()
    return t[:, None] if t.ndim == 3 else t


def resize_to(t, size: int):
    import torch.nn.functional as F

    if t.shape[-1] == size and t.shape[-2] == size:
        return t
    return F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def channels_last(t):
    return t.contiguous(memory_format=torch_module().channels_last)
