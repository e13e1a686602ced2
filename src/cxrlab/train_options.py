"""Every option of ``cxrlab.train`` with its default, in a module light enough for the CLI to read at start-up
(``training`` itself loads scipy and scikit-learn)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .backbones import DEFAULT_BACKBONE, can_fine_tune
from .progress import Progress


if TYPE_CHECKING:
    from .finetune import FineTuneOptions
    from .head import StepInfo

DEFAULT_FOLDS = 5  # cxrlab cv
CV_POSITIVE_LABEL = "abnormal"


@dataclass
class TrainOptions:
    """Every option of :func:`train` (the retrain tutorial's flags and cxrlab's own), with its default.

    The single home of the defaults: ``train``'s keyword defaults are read from here, and its docstring
    documents each field."""

    output: str | os.PathLike | None = None
    backbone: str = DEFAULT_BACKBONE
    bottleneck_dir: str | os.PathLike | None = None
    label_from_name: str | None = None
    label_map: dict[str, str] | None = None
    group_regex: str | None = None
    split_file: str | os.PathLike | None = None
    testing_percentage: float = 10.0
    validation_percentage: float = 10.0
    solver: str = "lbfgs"
    how_many_training_steps: int = 4000
    learning_rate: float = 0.01
    train_batch_size: int = 100
    eval_step_interval: int = 10
    validation_batch_size: int = 100
    test_batch_size: int = -1
    positive_label: str | None = None
    operating_point: str = "who"
    robust_operating_point: bool = False
    calibration: str = "auto"
    flip_left_right: bool = False
    random_crop: float = 0.0
    random_scale: float = 0.0
    random_brightness: float = 0.0
    distortion_copies: int = 4
    ood: bool = True
    shift_reference: bool = True
    report: bool = True
    seed: int = 0
    on_step: Callable[[StepInfo], None] | None = None
    progress: Progress | None = None
    fine_tune: bool | None = None  # None: the default recipe, see recipe()
    epochs: int = 6  # see FineTuneOptions.epochs
    fine_tune_options: FineTuneOptions | None = None  # None: FineTuneOptions(epochs=epochs)
    on_epoch: Callable[[dict], None] | None = None
    summaries_dir: str | os.PathLike | None = None
    precision: str = "auto"
    runtime: str = "auto"
    workers: int | None = None  # decoding threads; with ``ray``, the Ray workers
    batch_size: int = 32
    ray: str | None = None  # a Ray cluster's address (``auto``, ``local``, ``HOST:PORT``) to run on; None: here
    ray_device: str = "auto"  # with ``ray``: fine-tune on GPU workers when the cluster has GPUs (auto), cpu or gpu

    def recipe(self) -> tuple[bool, str | None]:
        """(fine-tune?, a note when the default could not be followed). The default recipe fine-tunes the network
        (measured best, within another hospital too); an ``onnx:`` backbone or ``int8`` precision only carries the
        tutorial's linear head (``fine_tune=False``, ``--head-only``)."""
        if self.fine_tune is not None:
            return bool(self.fine_tune), None
        if not can_fine_tune(self.backbone):
            return False, f"backbone {self.backbone} cannot be fine-tuned: trained the linear head only"
        if self.precision == "int8":
            return False, f"--precision {self.precision} quantises a frozen backbone: trained the linear head only"
        return True, None

    def cluster(self):
        """The connected Ray cluster of ``ray`` (cluster.Cluster), or None to run on this machine."""
        if not self.ray:
            return None
        from .cluster import Cluster

        return Cluster(self.ray, self.workers, self.ray_device)

    def head(self):
        """The linear head's options (head.HeadOptions)."""
        from .head import HeadOptions

        return HeadOptions(self.solver, self.how_many_training_steps, self.learning_rate, self.train_batch_size,
                           self.eval_step_interval, self.validation_batch_size)

    def engine(self):
        """The engine that embeds (and so measures) this run: ``runtime`` and ``precision`` resolved on this machine
        (bf16 by default only for a backbone whose cross-validated AUC it kept, runtime.BF16_AUC)."""
        from .runtime import bf16_offered, resolve

        # An int8 graph's cross-validated AUC (precision.INT8_AUC) was measured with its float parts in fp32: it
        # runs so unless OpenVINO is asked for by name.
        execution = "fp32" if self.precision == "int8" else self.precision
        return resolve(self.runtime, execution, bf16_ok=bf16_offered(self.backbone))

    def distortions(self) -> dict:
        return {"flip_left_right": self.flip_left_right, "random_crop": self.random_crop,
                "random_scale": self.random_scale, "random_brightness": self.random_brightness}

    def flags(self) -> dict:
        return {"how_many_training_steps": self.how_many_training_steps, "learning_rate": self.learning_rate,
                "train_batch_size": self.train_batch_size, "eval_step_interval": self.eval_step_interval,
                "validation_batch_size": self.validation_batch_size, "test_batch_size": self.test_batch_size,
                "operating_point": self.operating_point, **self.distortions(),
                "distortion_copies": self.distortion_copies}
