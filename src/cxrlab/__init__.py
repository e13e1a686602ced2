"""cxrlab: turn a folder of labelled chest X-rays into a classifier, and use it honestly.

The public API::

    result = cxrlab.train("lungs", output="models/tb")            # folder -> model directory
    model = cxrlab.load_model("models/tb")
    predictions = model.predict(["x.png", pil_image, numpy_array])  # files, folders, images in memory
    cxrlab.evaluate(model, "other_hospital", output="eval")        # metrics on a labelled folder
    cxrlab.explain(model, ["x.png"], "heatmaps")                   # class activation map overlays
    cxrlab.adapt("models/tb", "new_site", "models/tb-site")        # a model for a new hospital

``train`` is imported on first use: it needs scikit-learn and SciPy, which ``import cxrlab`` and
prediction do not.
"""

from ._version import __version__  # noqa: E402
from .backbones import create_backbone, list_backbones  # noqa: E402
from .errors import BackboneError, CxrlabError, DataError, ImageError, ModelDirError, NotFittedError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .explain import explain  # noqa: E402  (the function; the module is cxrlab.explain in sys.modules)
from .predict import Model, Prediction, load_model  # noqa: E402


def __getattr__(name: str):
    if name == "train":
        from .training import train

        return train
    if name == "adapt":
        from .adaptation import adapt

        return adapt
    raise AttributeError(f"module 'cxrlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"train", "adapt"})


__all__ = [
    "__version__", "train", "adapt", "load_model", "Model", "Prediction", "evaluate", "explain", "create_backbone",
    "list_backbones", "CxrlabError", "DataError", "ImageError", "BackboneError", "ModelDirError", "NotFittedError",
]
