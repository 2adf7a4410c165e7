"""Errors a user can cause (and fix): reported as one line naming the key or path, never a traceback."""

from __future__ import annotations

from trainer.checkpoint import CheckpointError
from trainer.data import DataError


class NonFiniteError(RuntimeError):
    """Loss or gradient norm became NaN/inf (agreed across ranks) and no skips were left."""


class ModelLoadError(RuntimeError):
    """model.path / model.config could not be turned into a model."""


USER_ERRORS = (CheckpointError, DataError, NonFiniteError, ModelLoadError, PermissionError, FileNotFoundError)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
