"""Fine-tuning options: every step of the recipe is a field here (or of ``AugmentConfig``), recorded in cxrlab.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..errors import DataError


@dataclass
class AugmentConfig:
    # Defaults are the measured best (Shenzhen 5-fold CV, 8 epochs, TTA x4): the plain recipe's rotation/scale/
    # brightness plus the chest-X-ray set below gave AUC 0.946 +- 0.016 vs 0.939 +- 0.021 without it, and held up
    # better under every simulated site shift (96 px resolution loss: AUC 0.902 vs 0.843).
    rotate: float = 10.0  # degrees, uniform +-
    scale: float = 0.10  # zoom factor in [1/(1+s), 1+s], log-uniform
    aspect: float = 0.10  # anisotropic stretch, log-uniform +- (hospitals squash differently)
    translate: float = 0.05  # fraction of the side, +-
    brightness: float = 0.10  # additive, +-
    contrast: float = 0.20  # multiplicative about the image mean, log-uniform +-
    gamma: float = 0.30  # exponent in [1/(1+g), 1+g], log-uniform
    sharpen: float = 0.5  # unsharp-mask amount in [-s, +s] (negative = blur)
    jpeg: float = 0.25  # probability of JPEG re-compression at quality 20..90
    flip: bool = False  # horizontal flip: off, the heart would swap sides
    invert: float = 0.0  # probability of inverted polarity (off: a negative is an error, not a site)

    @classmethod
    def none(cls) -> "AugmentConfig":
        return cls(0, 0, 0, 0, 0, 0, 0, 0, 0, False, 0)


@dataclass
class FineTuneOptions:
    epochs: int = 8
    batch_size: int = 16
    # Defaults: the measured best = the plain recipe + chest-X-ray augmentation + in-graph percentile windowing
    # + TTA; training.train then Platt-calibrates the head on validation.
    lr: float = 1e-3  # the top backbone unit; the head gets head_lr_mult x, earlier units layer_decay^depth x
    head_lr_mult: float = 1.0  # tried 10 (with 3e-4)
    layer_decay: float = 1.0  # tried 0.8
    weight_decay: float = 0.01
    schedule: str = "onecycle"  # onecycle | cosine
    warmup_head: bool = False  # logistic-regression warm start of the head on frozen embeddings; tried: its
    #   folded-in standardisation gives large weights that diverge once the backbone moves (loss 6.4 at lr 1e-3)
    trainable_units: int = -1  # -1: all; else the last N units (EfficientNet: 18 = stem, 16 blocks, head conv)
    freeze_bn: bool = False  # keep BatchNorm statistics from ImageNet; tried True
    bn_momentum: float = 0.0  # BatchNorm running-statistics momentum while training (0: the backbone's own, 0.01
    #   for EfficientNet-Lite); tried 0.1: same AUC, validation accuracy at 0.5 lower (0.78 vs 0.87, fold 0)
    label_smoothing: float = 0.0  # tried 0.1
    dropout: float = 0.0  # on the raw embedding; >0 shifts a warm-started head's folded-in mean (epoch-1 loss 1.03 at 0.2)
    ema: float = 0.0  # exponential moving average of the weights (decay per step; 0: off), evaluated and exported
    patience: int = 0  # early stopping after this many epochs without a better validation AUC (0: off)
    input_size: int | None = None  # None: the backbone's
    intensity: str = "window"  # none | window (per-image 1-99 percentile) | standardize (per-image mean/std)
    # Test-time augmentation in the exported graph: embedding = mean over the identity and the first tta_views
    # of TTA_VIEWS; (1 + tta_views) x slower predict. Measured: fold-0 AUC 0.951 -> 0.965 (224 px), 0.943 -> 0.963 (256 px)
    tta: bool = True
    tta_views: int = 3
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def set(self, key: str, value: str) -> None:
        """Set ``key`` (a field here or of ``augment``) from a string, e.g. 'lr=1e-4', 'augment.gamma=0'."""
        target, name = (self.augment, key.split(".", 1)[1]) if key.startswith("augment.") else (self, key)
        if name not in {f.name for f in fields(target)} and target is self:
            target, name = self.augment, key
        kinds = {f.name: f.type for f in fields(target)}
        if name not in kinds or name == "augment":
            raise DataError(f"unknown fine-tune option {key!r}; known: "
                            f"{', '.join([f.name for f in fields(self) if f.name != 'augment'] + [f.name for f in fields(AugmentConfig)])}")
        current = getattr(target, name)
        if isinstance(current, bool):
            parsed = value.lower() in ("1", "true", "yes", "on")
        elif name == "input_size":
            parsed = None if value.lower() in ("", "none") else int(value)
        elif isinstance(current, int):
            parsed = int(value)
        elif isinstance(current, float):
            parsed = float(value)
        else:
            parsed = value
        setattr(target, name, parsed)
