"""TokenScope's analysis core: run timm ViTs with token reduction and trace every patch.

Public API::

    from analysis import load_model, parse_schedule, run
    model = load_model("default")
    result = run(model, image, parse_schedule("tome:r=8"))
"""

from analysis.engine import RunResult, run
from analysis.errors import (
    CheckpointMismatchError,
    ImageError,
    ModelLoadError,
    ScheduleError,
    TokenScopeError,
    UnsupportedModelError,
)
from analysis.models import LoadedModel, load_model
from analysis.schedule import Schedule, parse_schedule

__all__ = [
    "CheckpointMismatchError",
    "ImageError",
    "LoadedModel",
    "ModelLoadError",
    "RunResult",
    "Schedule",
    "ScheduleError",
    "TokenScopeError",
    "UnsupportedModelError",
    "load_model",
    "parse_schedule",
    "run",
]
