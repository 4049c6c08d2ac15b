"""What a learned method's loaded weights were trained at, and whether a schedule stays there.

A learned reducer's weights are only known to work at the settings they were trained
under. A weights file written by ``python -m analysis train`` records them in its
``schedule`` metadata (schedules joined by `` | ``, e.g. ``cropr:rate=8@0-10 |
cropr:rate=16@0-10``). From it and from the modules themselves we read:

* the trained values of the method's *strength* parameter (Cropr's ``rate``, LTM's
  ``keep``, ...), as the layers that use weights saw them;
* the layers that have a trained module (binding refuses any other layer);
* parameters the weights *fix*: a reducer class lists them in ``fixed_by_weights`` and
  each module's ``config`` holds their value (PatchMerger's ``tokens``: M learned queries).
  A fixed strength cannot be solved for; the solver and the sweep move the layer instead.

A strength value between the lowest and the highest trained value counts as trained
(interpolation); outside it the schedule is *extrapolated*: it runs, but nothing says the
weights are any good there. Files without a ``schedule`` (converted official checkpoints,
untrained modules) have no recorded range: nothing is flagged, and :meth:`describe` says so.

Python::

    from analysis import load_model
    from analysis.trained_settings import extrapolation, trained_settings
    model = load_model("default")
    trained_settings(model, "cropr").describe()
    # 'Token Cropr weights trained at rate 8–24 (8, 16, 24) on layers 0–10'
    extrapolation(model, "cropr:rate=69@0-10")
    # 'Token Cropr rate=69 is outside the trained 8–24'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from analysis.errors import ScheduleError, TokenScopeError
from analysis.reducers import Reducer, reducer_class
from analysis.reducers.learned_base import LearnedReducer
from analysis.schedule import Schedule, parse_schedule
from analysis.strength import strength_param, with_strength

if TYPE_CHECKING:
    from analysis.backbone import LoadedModel

SCHEDULE_SEPARATOR = " | "  # how `python -m analysis train` joins its schedules in metadata
_FLOAT_DIGITS = 4  # spread float strengths are rounded to this many decimals


@dataclass(frozen=True)
class TrainedSettings:
    """The settings a method's loaded weights support.

    ``values`` are the strength values seen in training, sorted ((the fixed value,) when the
    weights fix the strength; () when not recorded). ``layers`` are the layers with a trained
    module whose config agrees with ``fixed``.
    """

    method: str  # the registry name
    label: str  # the name shown in the UI
    param: str  # the strength parameter
    values: tuple[int | float, ...]
    layers: tuple[int, ...]
    fixed: dict[str, Any] = field(default_factory=dict, hash=False)  # param -> fixed value
    recorded: bool = True  # whether the weights say what they were trained at
    source: str = ""  # the weights file, for messages

    @property
    def low(self) -> int | float | None:
        return self.values[0] if self.values else None

    @property
    def high(self) -> int | float | None:
        return self.values[-1] if self.values else None

    @property
    def range(self) -> tuple[int | float, int | float] | None:
        """(low, high) of the trained strength, or None when not recorded."""
        return (self.values[0], self.values[-1]) if self.values else None

    @property
    def strength_fixed(self) -> bool:
        """Whether the weights fix the strength itself (then only the layer can move)."""
        return self.param in self.fixed

    @property
    def checked(self) -> bool:
        """Whether a strength value can be checked against a trained range."""
        return bool(self.values) and not self.strength_fixed

    def covers(self, value: int | float) -> bool:
        """Whether ``value`` lies within the trained range (True when nothing is recorded)."""
        if not self.values:
            return True
        low, high = self.values[0], self.values[-1]
        slack = 1e-9 * max(1.0, abs(low), abs(high))
        return low - slack <= value <= high + slack

    def range_text(self) -> str:
        """``8–24``, or ``0.9`` for a single trained value."""
        if not self.values:
            return "not recorded"
        low, high = self.values[0], self.values[-1]
        return _show(low) if low == high else f"{_show(low)}–{_show(high)}"

    def describe(self) -> str:
        """One line for captions: what the weights were trained at, and where."""
        plural = "s" if len(self.layers) > 1 else ""
        where = f"on layer{plural} {layers_text(self.layers)}" if self.layers else "on no layer"
        if self.strength_fixed:
            fixed = ", ".join(f"{k}={_show(v)}" for k, v in self.fixed.items())
            return f"{self.label} weights fix {fixed}; trained {where}"
        if not self.values:
            return (
                f"{self.label} weights {where}; the {self.param} they were trained at is not "
                f"recorded, so {self.param} is not checked against it"
            )
        spread = ""
        if len(self.values) > 1:
            spread = f" ({', '.join(_show(v) for v in self.values)})"
        return f"{self.label} weights trained at {self.param} {self.range_text()}{spread} {where}"


def trained_settings(
    model: LoadedModel, method: str, schedule: str | Schedule | None = None
) -> TrainedSettings | None:
    """The settings ``method``'s loaded weights support on ``model``.

    Returns None for a training-free method, when the model has no weights loaded for it,
    or, with ``schedule``, when none of its parts of ``method`` wants weights (MSTM with
    ``ms=0``): then nothing constrains the method's settings.
    """
    cls = reducer_class(method)
    if not issubclass(cls, LearnedReducer):
        return None
    weights = model.learned.get(cls.name)
    if weights is None:
        return None
    if schedule is not None and not _wants_weights(model, cls, parse_schedule(schedule)):
        return None
    spec = strength_param(cls)
    fixed, layers = _fixed_values(cls, weights.modules)
    if spec.name in fixed:
        values: tuple[int | float, ...] = (fixed[spec.name],)
        recorded = "schedule" in weights.metadata
    else:
        found = _trained_values(model, cls, spec.name, weights.metadata.get("schedule", ""))
        values, recorded = tuple(sorted(found)), bool(found)
    return TrainedSettings(
        method=cls.name,
        label=cls.label,
        param=spec.name,
        values=values,
        layers=layers,
        fixed=fixed,
        recorded=recorded,
        source=weights.metadata.get("source", "the loaded weights"),
    )


def extrapolation(model: LoadedModel, schedule: str | Schedule) -> str:
    """Why ``schedule`` runs a learned method outside its trained strength range, or "".

    Each layer whose reducer uses weights is checked, with the strength as that layer runs
    it (DTEM's ramp spreads ``r`` over layers). Methods without weights, or whose weights
    record no trained range, are not flagged. Parameters the weights fix are not checked
    here: binding refuses them (:func:`analysis.engine.attach_weights`).
    """
    schedule = parse_schedule(schedule)
    reasons = []
    for method in schedule.methods():
        settings = trained_settings(model, method, schedule)
        if settings is None or not settings.checked:
            continue
        cls = reducer_class(method)
        outside: dict[int, list[int | float]] = {}
        used: list[int] = []
        for layer, reducer in _weighted_reducers(model, cls, schedule):
            used.append(layer)
            for value in _flat(reducer.values[settings.param]):
                if not settings.covers(value):
                    outside.setdefault(layer, []).append(value)
        if not outside:
            continue
        values = sorted({v for found in outside.values() for v in found})
        where = ""
        if len(outside) < len(used):
            where = f" at layer{'s' if len(outside) > 1 else ''} {layers_text(sorted(outside))}"
        reasons.append(
            f"{settings.label} {settings.param}={', '.join(_show(v) for v in values)}{where} "
            f"is outside the trained {settings.range_text()}"
        )
    return "; ".join(reasons)


def supported_values(
    model: LoadedModel, method: str, count: int, schedule: str | Schedule | None = None
) -> list[int | float] | None:
    """``count`` strength values spread evenly over the trained range, ends included.

    For a sweep that should stay where the weights were trained. Integers are rounded and
    repeated values dropped, so fewer than ``count`` may come back. A strength the weights
    fix gives its one value (move the layer instead: :func:`supported_schedules`). None
    when the weights do not constrain the strength (see :func:`trained_settings`; also when
    no trained range is recorded): use the parameter's own range then.
    """
    if count < 1:
        raise TokenScopeError(f"count must be at least 1, got {count}")
    settings = trained_settings(model, method, schedule)
    if settings is None or not settings.values:
        return None
    if settings.strength_fixed:
        return [settings.values[0]]
    low, high = settings.values[0], settings.values[-1]
    if count == 1 or low == high:
        return [settings.values[len(settings.values) // 2]]
    spread = [low + (high - low) * i / (count - 1) for i in range(count)]
    if isinstance(low, int) and isinstance(high, int):
        found: list[int | float] = [math.floor(v + 0.5) for v in spread]  # halves round up
    else:
        found = [min(max(round(v, _FLOAT_DIGITS), low), high) for v in spread]
    return sorted(set(found))


def supported_schedules(
    model: LoadedModel, base: str | Schedule, count: int
) -> list[Schedule] | None:
    """Up to ``count`` variants of ``base`` (one method) that its loaded weights support.

    A strength the weights fix (PatchMerger's ``tokens``) stays fixed and the method moves,
    as one single-layer part, to ``count`` of its covered layers (spread evenly, in layer
    order). Otherwise ``base`` takes each of :func:`supported_values`, with layers and other
    parameters as given; a variant that would still extrapolate (a ramp that leaves the
    range on some layers) is left out. None when the weights do not constrain the method.
    """
    base = parse_schedule(base, depth=model.facts.depth)
    methods = base.methods()
    if len(methods) != 1:
        raise ScheduleError(
            f"'{base.to_text()}': give one method per schedule to spread over its trained settings"
        )
    settings = trained_settings(model, methods[0], base)
    if settings is None:
        return None
    if settings.strength_fixed:
        return [at_layer(base, settings, layer) for layer in spread_items(settings.layers, count)]
    values = supported_values(model, settings.method, count, base)
    if values is None:
        return None
    found = []
    for value in values:
        variant = with_fixed(with_strength(base, settings.method, settings.param, value), settings)
        if not extrapolation(model, variant):
            found.append(variant)
    return found


def at_layer(base: Schedule, settings: TrainedSettings, layer: int) -> Schedule:
    """``base``'s method as one part at ``layer``, with the values its weights fix.

    Takes the first part's other parameters; how PatchMerger's placement is varied.
    """
    first = next(part for part in base.parts if part.method == settings.method)
    part = replace(first, params={**first.params, **settings.fixed}, layers=(layer,))
    return replace(base, parts=(part,))


def with_fixed(schedule: Schedule, settings: TrainedSettings) -> Schedule:
    """``schedule`` with the parameters the weights fix set to their trained values."""
    if not settings.fixed:
        return schedule
    parts = tuple(
        replace(part, params={**part.params, **settings.fixed})
        if part.method == settings.method
        else part
        for part in schedule.parts
    )
    return replace(schedule, parts=parts)


def spread_items(items: Sequence[int], count: int) -> list[int]:
    """``count`` of ``items`` spread evenly, ends included (all of them when fewer)."""
    if count < 1:
        raise TokenScopeError(f"count must be at least 1, got {count}")
    if count >= len(items):
        return list(items)
    if count == 1:
        return [items[len(items) // 2]]
    picks = {math.floor(i * (len(items) - 1) / (count - 1) + 0.5) for i in range(count)}
    return [items[i] for i in sorted(picks)]


def layers_text(layers: Sequence[int]) -> str:
    """``0–10`` or ``3, 5–6, 8–10``: layers as runs."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)


# --------------------------------------------------------------------------- helpers


def _fixed_values(
    cls: type[Reducer], modules: dict[int, Any]
) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The values the modules fix (from the lowest layer's config), and the layers whose
    modules agree with them (a module built for another value is refused at binding)."""
    names = getattr(cls, "fixed_by_weights", ())
    layers = sorted(modules)
    if not names or not layers:
        return {}, tuple(layers)
    config = getattr(modules[layers[0]], "config", {})
    fixed = {name: config[name] for name in names if name in config}
    agree = [
        layer
        for layer in layers
        if all(getattr(modules[layer], "config", {}).get(k) == v for k, v in fixed.items())
    ]
    return fixed, tuple(agree)


def _weighted_reducers(
    model: LoadedModel, cls: type[Reducer], schedule: Schedule
) -> list[tuple[int, Reducer]]:
    """The per-layer reducers of ``cls`` in ``schedule`` that use weights."""
    own = replace(schedule, parts=tuple(p for p in schedule.parts if p.method == cls.name))
    return [
        (layer, reducer)
        for layer, reducer in own.resolve(model.facts).reducers()
        if isinstance(reducer, LearnedReducer) and reducer.wants_weights()
    ]


def _wants_weights(model: LoadedModel, cls: type[Reducer], schedule: Schedule) -> bool:
    return bool(_weighted_reducers(model, cls, schedule))


def _trained_values(
    model: LoadedModel, cls: type[Reducer], param: str, recorded: str
) -> set[int | float]:
    """The strength values the recorded training schedules ran at layers with weights.

    A schedule that no longer parses or fits is skipped (its values are unknown)."""
    found: set[int | float] = set()
    for text in recorded.split(SCHEDULE_SEPARATOR.strip()):
        if not text.strip():
            continue
        try:
            schedule = parse_schedule(text.strip())
            reducers = _weighted_reducers(model, cls, schedule)
        except ScheduleError:
            continue
        for _, reducer in reducers:
            found.update(_flat(reducer.values[param]))
    return found


def _flat(value: Any) -> list[int | float]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    return str(value)


__all__ = [
    "TrainedSettings",
    "at_layer",
    "extrapolation",
    "layers_text",
    "spread_items",
    "supported_schedules",
    "supported_values",
    "trained_settings",
    "with_fixed",
]
