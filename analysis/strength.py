"""A method's strength: the one parameter that sets how strongly it reduces.

The solver varies it to match costs and the trained settings read the range the weights
were trained at; both need it, so it sits below them and each imports it from here.
"""

from __future__ import annotations

from dataclasses import replace

from analysis.errors import ScheduleError
from analysis.reducers import Reducer
from analysis.reducers.base import Param
from analysis.schedule import Schedule


def strength_param(cls: type[Reducer]) -> Param:
    """The parameter that sets how strongly ``cls`` reduces.

    The class's ``strength`` attribute names it; without one, the first int or float
    parameter that has a range is used.
    """
    name = getattr(cls, "strength", None)
    if name:
        spec = cls.param(name)
    else:
        numeric = [
            p
            for p in cls.params
            if p.kind in (int, float) and p.low is not None and p.high is not None
        ]
        if not numeric:
            raise ScheduleError(
                f"{cls.label} has no strength parameter to solve for: declare "
                '`strength = "<param>"` on the class, naming a numeric parameter with a range'
            )
        spec = numeric[0]
    if spec.kind not in (int, float):
        raise ScheduleError(
            f"{cls.label}: its strength parameter '{spec.name}' is a {spec.kind.__name__}, "
            "not a number"
        )
    if spec.low is None or spec.high is None or spec.low > spec.high:
        raise ScheduleError(
            f"{cls.label}: its strength parameter '{spec.name}' needs a range (low, high) "
            "to be solved over"
        )
    return spec


def with_strength(schedule: Schedule, method: str, param: str, value: int | float) -> Schedule:
    """``schedule`` with ``param`` set to ``value`` in every part of ``method``."""
    parts = tuple(
        replace(part, params={**part.params, param: value}) if part.method == method else part
        for part in schedule.parts
    )
    return replace(schedule, parts=parts)


__all__ = ["strength_param", "with_strength"]
