"""The exception hierarchy: the CLI catches only CxrlabError and prints its message."""

from __future__ import annotations

import os


class CxrlabError(Exception):
    """Base class of every error cxrlab raises on purpose."""


class DataError(CxrlabError, ValueError):
    """Folder layout, too few classes, a split manifest that does not match the data."""


class ImageError(DataError):
    """One file could not be used as an image. ``path`` names it, ``reason`` says why."""

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class BackboneError(CxrlabError, LookupError):
    """Unknown backbone name, missing weights or a weights hash mismatch, a bad onnx:PATH."""


class ModelDirError(CxrlabError):
    """A model directory that is incomplete, altered, or of an unknown schema."""


class NotFittedError(CxrlabError, ValueError, AttributeError):
    """An estimator was used before fit()."""
