"""cxrlab: turn a folder of labelled chest X-rays into a classifier, and use it honestly."""

from ._version import __version__  # noqa: E402
from .backbones import create_backbone, list_backbones  # noqa: E402
from .errors import BackboneError, CxrlabError, DataError, ImageError, ModelDirError, NotFittedError  # noqa: E402
from .predict import Model, Prediction, load_model  # noqa: E402


def train(image_dir, **kwargs):
    """Train a model from a folder of labelled images; see :func:`cxrlab.training.train`."""
    from .training import train as _train

    return _train(image_dir, **kwargs)


__all__ = [
    "__version__", "train", "load_model", "Model", "Prediction", "create_backbone", "list_backbones",
    "CxrlabError", "DataError", "ImageError", "BackboneError", "ModelDirError", "NotFittedError",
]
