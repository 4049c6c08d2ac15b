"""TokenScope's analysis core: run timm ViTs with token reduction and trace every patch.

Public API::

    from analysis import load_model, parse_schedule, run
    model = load_model("default")
    result = run(model, image, parse_schedule("tome:r=8"))

The names below are imported on first use (PEP 562), so a command that needs no model,
such as ``python -m analysis --help``, starts without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "RunResult": "analysis.records",
    "run": "analysis.engine",
    "CheckpointMismatchError": "analysis.errors",
    "ImageError": "analysis.errors",
    "ModelLoadError": "analysis.errors",
    "ScheduleError": "analysis.errors",
    "TokenScopeError": "analysis.errors",
    "UnsupportedModelError": "analysis.errors",
    "LoadedModel": "analysis.models",
    "load_model": "analysis.models",
    "Schedule": "analysis.schedule",
    "parse_schedule": "analysis.schedule",
}

if TYPE_CHECKING:
    from analysis.engine import run
    from analysis.errors import (
        CheckpointMismatchError,
        ImageError,
        ModelLoadError,
        ScheduleError,
        TokenScopeError,
        UnsupportedModelError,
    )
    from analysis.models import LoadedModel, load_model
    from analysis.records import RunResult
    from analysis.schedule import Schedule, parse_schedule


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


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
