"""All reducers, by the name used in schedules."""

from __future__ import annotations

from analysis.errors import ScheduleError
from analysis.reducers.base import Reducer, Site
from analysis.reducers.cropr import Cropr
from analysis.reducers.dtem import DTEM
from analysis.reducers.evit import EViT
from analysis.reducers.ltm import LTM
from analysis.reducers.mstm import MSTM
from analysis.reducers.patchmerger import PatchMerger
from analysis.reducers.random import RandomDrop
from analysis.reducers.tome import ToMe
from analysis.reducers.topk import TopK

REDUCERS: dict[str, type[Reducer]] = {cls.name: cls for cls in (ToMe, EViT, TopK, RandomDrop)}
# The seed methods: learned (DTEM, PatchMerger, Cropr, LTM) or partly learned (MSTM).
REDUCERS.update({cls.name: cls for cls in (DTEM, PatchMerger, Cropr, LTM, MSTM)})


def register(cls: type[Reducer]) -> type[Reducer]:
    """Add a reducer class to the registry (used by the seed-method modules)."""
    REDUCERS[cls.name] = cls
    return cls


def reducer_class(name: str) -> type[Reducer]:
    try:
        return REDUCERS[name.strip().lower()]
    except KeyError:
        known = ", ".join(sorted(REDUCERS))
        raise ScheduleError(f"unknown method '{name}' (known: {known})") from None


__all__ = ["REDUCERS", "Reducer", "Site", "reducer_class", "register"]
