"""Errors that carry a message meant for the user, not a traceback.

Every error a user can cause (a file, a schedule, a path, a model name) is a
:class:`TokenScopeError`; the app shows its message, the CLI prints it and exits with 2.
"""


class TokenScopeError(Exception):
    """Base class: the message says what went wrong and what to do."""


class ScheduleError(TokenScopeError, ValueError):
    """A schedule that cannot run on the chosen model."""


class ModelLoadError(TokenScopeError):
    """A model or its weights could not be loaded."""


class UnsupportedModelError(ModelLoadError):
    """A timm model whose blocks the engine cannot run exactly."""


class CheckpointMismatchError(ModelLoadError):
    """A checkpoint whose keys or shapes do not fit the architecture."""


class OfflineError(ModelLoadError):
    """Pretrained weights that are neither cached nor reachable (no network)."""

    def __init__(self, message: str, model: str = "") -> None:
        super().__init__(message)
        self.model = model


class ModelTooLargeError(ModelLoadError):
    """A model whose weights need more memory than this machine allows."""


class ImageError(TokenScopeError, ValueError):
    """An image that cannot be read or converted."""


class AccessError(TokenScopeError, PermissionError):
    """A server path the operator has not allowed (the app reads only allowed folders)."""


class DeviceMemoryError(TokenScopeError):
    """The GPU ran out of memory; callers may retry smaller or on the CPU."""

    def __init__(self, message: str, batch: int = 0) -> None:
        super().__init__(message)
        self.batch = batch


class CacheError(TokenScopeError):
    """A cache folder that cannot be written (read-only, full)."""


def shorten(text: object, limit: int = 80) -> str:
    """``text`` for an error message: at most ``limit`` characters, marked when cut."""
    value = str(text)
    if len(value) <= limit:
        return value
    return f"{value[: limit - 1]}… ({len(value):,} characters)"
