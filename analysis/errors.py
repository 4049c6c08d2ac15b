"""Errors that carry a message meant for the user, not a traceback."""


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


class ImageError(TokenScopeError, ValueError):
    """An image that cannot be read or converted."""
