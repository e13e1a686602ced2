"""Fine-tuning options: every step of the recipe is a field here (or of ``AugmentConfig``), recorded in cxrlab.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..errors import DataError

# Test-time views (rotation degrees, zoom) after the identity, in the order tta_views takes them.
TTA_VIEWS = ((0.0, 1.06), (4.0, 1.0), (-4.0, 1.0), (0.0, 0.94), (8.0, 1.03), (-8.0, 1.03), (0.0, 1.12))


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
    lowres: float = 0.0  # probability of resolution loss: down to 64-160 px and back (older digitisers, thumbnails)
    noise: float = 0.0  # Gaussian noise, std up to this (in [0, 1] intensity units; quantum noise of low-dose films)
    film_curve: float = 0.0  # probability of a film-like S-curve of random steepness around the image median

    @classmethod
    def none(cls) -> "AugmentConfig":
        return cls(0, 0, 0, 0, 0, 0, 0, 0, 0, False, 0, 0, 0, 0)


@dataclass
class FineTuneOptions:
    # 6, not 8: the whole `cxrlab train` must fit in 10 minutes on 2 CPU cores (8 epochs: 11.8 min). Same split,
    # seed 0: Shenzhen test AUC 0.947 vs 0.958, India DA (never trained on) 0.831 vs 0.841, within noise.
    epochs: int = 6
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
        default = next(f.default for f in fields(target) if f.name == name)  # the field's type, whatever is set now
        old = getattr(target, name)
        setattr(target, name, _parse_option(key, value, default, name))
        try:
            self._rules()[name if target is self else f"augment.{name}"]()
        except DataError:
            setattr(target, name, old)
            raise

    def validate(self) -> None:
        """Every value's type and range, checked before any image is decoded (DataError naming the option)."""
        if not isinstance(self.augment, AugmentConfig):
            raise DataError(f"FineTuneOptions.augment must be an AugmentConfig, got {type(self.augment).__name__}")
        for check in self._rules().values():
            check()
        if self.batch_size < 2 and not self.freeze_bn:
            raise DataError("--ft batch_size must be at least 2 (BatchNorm statistics need 2 images per batch), "
                            "or set --ft freeze_bn=true")

    def _rules(self) -> dict:
        """One check per option, keyed like --ft (``augment.`` for the augmentation fields)."""
        from ..checks import check_choice, check_float, check_int

        def whole(name, lo, hi=None, special=(), special_text=""):
            return lambda: check_int(f"--ft {name}", getattr(self, name), lo, hi, special=special,
                                     special_text=special_text)

        def number(name, lo, hi=None, *, lo_open=False, hi_open=False):
            target, field_name = (self.augment, name[8:]) if name.startswith("augment.") else (self, name)
            return lambda: check_float(f"--ft {name}", getattr(target, field_name), lo, hi, lo_open=lo_open,
                                       hi_open=hi_open)

        def flag(name):
            target, field_name = (self.augment, name[8:]) if name.startswith("augment.") else (self, name)

            def check():
                if not isinstance(getattr(target, field_name), bool):
                    raise DataError(f"--ft {name} must be true or false, got {getattr(target, field_name)!r}")
            return check

        def input_size():
            if self.input_size is not None:
                check_int("--ft input_size", self.input_size, 32, 1024, special_text="or none for the backbone's")

        rules = {
            "epochs": whole("epochs", 1), "batch_size": whole("batch_size", 1),
            "lr": number("lr", 0, lo_open=True), "head_lr_mult": number("head_lr_mult", 0, lo_open=True),
            "layer_decay": number("layer_decay", 0, 1, lo_open=True), "weight_decay": number("weight_decay", 0),
            "schedule": lambda: check_choice("--ft schedule", self.schedule, ("onecycle", "cosine")),
            "warmup_head": flag("warmup_head"),
            "trainable_units": whole("trainable_units", 1, special=(-1,), special_text="or -1 for all"),
            "freeze_bn": flag("freeze_bn"), "bn_momentum": number("bn_momentum", 0, 1),
            "label_smoothing": number("label_smoothing", 0, 1, hi_open=True),
            "dropout": number("dropout", 0, 1, hi_open=True), "ema": number("ema", 0, 1, hi_open=True),
            "patience": whole("patience", 0), "input_size": input_size,
            "intensity": lambda: check_choice("--ft intensity", self.intensity, ("none", "window", "standardize")),
            "tta": flag("tta"), "tta_views": whole("tta_views", 1, len(TTA_VIEWS)),
            "augment.rotate": number("augment.rotate", 0, 180),
            "augment.translate": number("augment.translate", 0, 0.5),
            "augment.flip": flag("augment.flip"),
        }
        for name in ("scale", "aspect", "brightness", "contrast", "gamma", "sharpen", "jpeg", "invert", "lowres",
                     "noise", "film_curve"):
            rules[f"augment.{name}"] = number(f"augment.{name}", 0, 1)
        return rules


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse_option(key: str, value: str, current, name: str):
    """One --ft value from its string, typed like the field's current value."""
    text = value.strip()
    try:
        if isinstance(current, bool):
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if name == "input_size":
            return None if text.lower() in ("", "none") else int(text)
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        kind = ("true or false" if isinstance(current, bool)
                else "a whole number" if isinstance(current, int) or name == "input_size" else "a number")
        raise DataError(f"--ft {key}={value}: the value must be {kind}") from None
    return text
