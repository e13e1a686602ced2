"""Fine-tune: end-to-end training of a registry backbone plus a linear head, in torch, on CPU.

Recipe (each step a field of ``FineTuneOptions`` / ``AugmentConfig``, recorded in cxrlab.json):

1. every image is decoded once into memory (uint8, the network's input size);
2. optional head warm-up: the tutorial's logistic regression on the (frozen) embeddings, C chosen
   on validation, copied into a ``torch.nn.Linear`` (off by default: measured worse);
3. fine-tuning of the last ``trainable_units`` units (all by default) with AdamW, a one-cycle or
   cosine schedule and layer-wise learning rates (lower for early layers), chest-X-ray-aware
   batch augmentation in torch (small rotations, scale/aspect/translation, brightness/contrast/
   gamma, blur/sharpen, JPEG re-compression; no horizontal flip), label smoothing;
4. the epoch with the best validation AUC is kept (early stopping after ``patience`` epochs);
5. the fine-tuned backbone is exported to ONNX with the registry backbones' interface, with
   the intensity normalisation and test-time augmentation *inside* the graph, so predict applies
   the same steps (calibrate.calibrate_and_threshold then Platt-calibrates the head on validation and folds it in).

Training runs in ``channels_last`` memory format: oneDNN's fast convolution path on CPU.

Determinism: ``torch.manual_seed``, a seeded ``torch.Generator`` for shuffling and augmentation,
``torch.use_deterministic_algorithms(True)`` while training.

Modules: ``options`` (FineTuneOptions, AugmentConfig), ``modules`` (torch modules, TTA, batch augmentation),
``loop`` (the training loop), ``stage`` (fine-tuning as a pipeline stage returning a ``fit.Fit``).
"""

from .loop import FineTuneResult, fine_tune, state_sha256
from .modules import (
    TTA_VIEWS, augment_batch, channels_last, make_intensity, network_units, resize_to, to_tensor, tta_grids, with_tta,
    wrap,
)
from .options import AugmentConfig, FineTuneOptions
from .stage import FineTunedHead, export_onnx, fine_tune_stage, load_arrays

__all__ = [
    "AugmentConfig", "FineTuneOptions", "FineTuneResult", "fine_tune", "state_sha256", "TTA_VIEWS", "augment_batch",
    "channels_last", "make_intensity", "network_units", "resize_to", "to_tensor", "tta_grids", "with_tta", "wrap",
    "FineTunedHead", "export_onnx", "fine_tune_stage", "load_arrays",
]
