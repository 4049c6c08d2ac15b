"""A schedule as a table with a row per layer, and presets, for the per-layer editor.

Everything here is read off the reducer registry (names, labels, sites, parameters with
their defaults, default placements and paper settings), so a newly registered method
appears in the editor and the presets without any change to this file.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from analysis.errors import ScheduleError
from analysis.presets import NONE_TITLE, ModelOrDepth, layout_presets, model_presets
from analysis.reducers import REDUCERS, Reducer, Site, reducer_class
from analysis.schedule import Schedule, SchedulePart, parse_schedule
from analysis.schedule import parse_params as parse_schedule_params

NO_METHOD = "—"
LAYER_COLUMN = "layer"
NONE_PRESET = NONE_TITLE
CUSTOM_PRESET = "Custom"


@dataclass(frozen=True)
class EditorColumn:
    """The two editor columns (method, params) of one reducer site."""

    site: Site
    method: str  # the column keys
    params: str
    method_title: str = "method"  # what the editor shows
    params_title: str = "params"

    @property
    def options(self) -> list[str]:
        return [NO_METHOD, *(cls.label for cls in methods_at(self.site))]


def methods_at(site: Site) -> list[type[Reducer]]:
    return [cls for cls in REDUCERS.values() if cls.site is site]


def editor_columns() -> list[EditorColumn]:
    """One column pair per site that has a registered method (sites in their enum order)."""
    sites = [site for site in Site if methods_at(site)]
    if len(sites) == 1:
        return [EditorColumn(sites[0], "method", "params")]
    return [
        EditorColumn(site, f"method ({site.value})", f"params ({site.value})", site.value)
        for site in sites
    ]


def class_for_label(label: str) -> type[Reducer]:
    """The reducer class shown as ``label`` in the editor (its name works too)."""
    for cls in REDUCERS.values():
        if label == cls.label:
            return cls
    return reducer_class(label)


def format_params(values: dict[str, Any]) -> str:
    """``{"r": 8, "inflect": 0.0}`` as ``r=8, inflect=0``."""
    return ", ".join(f"{key}={_format_value(value)}" for key, value in values.items())


def parse_params(cls: type[Reducer], text: str) -> dict[str, Any]:
    """The explicitly given parameters of a cell like ``keep=0.7, fuse=true``, coerced."""
    return parse_schedule_params(cls, text, separators=",;")


def schedule_to_rows(schedule: Schedule, depth: int) -> list[dict[str, Any]]:
    """A row per layer: for each site, the method's label and its values at that layer."""
    columns = editor_columns()
    rows: list[dict[str, Any]] = []
    for layer in range(depth):
        row: dict[str, Any] = {LAYER_COLUMN: layer}
        for column in columns:
            row[column.method] = NO_METHOD
            row[column.params] = ""
        rows.append(row)
    by_site = {column.site: column for column in columns}
    for part in schedule.parts:
        cls = reducer_class(part.method)
        layers = [layer for layer in part.layers_for(depth) if layer < depth]
        if not layers:
            continue
        per_layer = cls.expand(cls.validate_params(part.params), len(layers))
        column = by_site[cls.site]
        for layer, values in zip(layers, per_layer, strict=True):
            rows[layer][column.method] = cls.label
            rows[layer][column.params] = format_params(_declared(cls, values))
    return rows


def rows_to_schedule(
    rows: Sequence[dict[str, Any]], depth: int, proportional_attention: bool | None = None
) -> Schedule:
    """The schedule a table describes, written compactly: a method with the same values
    everywhere becomes one part, a method whose list parameter varies per layer (ToMe's r)
    one part with a list, anything else a part per group of equal values.

    Raises ScheduleError, naming the layer, for an unknown method or a bad parameter.
    """
    per_method: dict[str, dict[int, dict[str, Any]]] = {}
    for column in editor_columns():
        for position, row in enumerate(rows):
            layer = int(row.get(LAYER_COLUMN, position))
            label = str(row.get(column.method) or NO_METHOD).strip()
            if label in {NO_METHOD, "", "none", "None"}:
                continue
            try:
                cls = class_for_label(label)
                values = cls.validate_params(parse_params(cls, str(row.get(column.params) or "")))
            except ScheduleError as error:
                raise ScheduleError(f"layer {layer}: {error}") from None
            if cls.site is not column.site:
                raise ScheduleError(
                    f"layer {layer}: {cls.label} runs at the '{cls.site.value}' site, "
                    f"not '{column.site.value}'"
                )
            per_method.setdefault(cls.name, {})[layer] = values
    parts: list[SchedulePart] = []
    for name, by_layer in per_method.items():
        parts.extend(_method_parts(reducer_class(name), by_layer, depth))
    parts.sort(key=lambda part: min(part.layers_for(depth), default=0))
    return Schedule(parts=tuple(parts), proportional_attention=proportional_attention)


def _method_parts(
    cls: type[Reducer], by_layer: dict[int, dict[str, Any]], depth: int
) -> list[SchedulePart]:
    layers = sorted(by_layer)
    wanted = [by_layer[layer] for layer in layers]
    for params in _candidate_params(cls, wanted):
        if _expands_to(cls, params, wanted):
            # Written without `@` when the layers are the method's default placement.
            placed = cls.default_layers(depth, cls.validate_params(params))
            covered = None if tuple(layers) == placed else tuple(layers)
            return [SchedulePart(cls.name, params, covered)]
    groups: dict[tuple, list[int]] = {}
    for layer in layers:
        groups.setdefault(_key(by_layer[layer]), []).append(layer)
    parts = []
    for group in groups.values():
        params = _explicit(cls, by_layer[group[0]])
        same = [by_layer[layer] for layer in group]
        if _expands_to(cls, params, same):
            parts.append(SchedulePart(cls.name, params, tuple(group)))
        else:  # values that depend on the part's length: a part per layer
            parts.extend(SchedulePart(cls.name, params, (layer,)) for layer in group)
    return parts


def _candidate_params(cls: type[Reducer], wanted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Single-part parameter sets that might reproduce ``wanted``, shortest first."""
    candidates = []
    if all(values == wanted[0] for values in wanted):
        candidates.append(_explicit(cls, wanted[0]))
    for spec in cls.params:
        if not spec.allows_list:
            continue
        others = [{k: v for k, v in values.items() if k != spec.name} for values in wanted]
        if any(other != others[0] for other in others):
            continue
        listed = [values[spec.name] for values in wanted]
        for length in range(1, len(listed) + 1):  # the shortest list that expands the same
            params = {**_explicit(cls, others[0]), spec.name: tuple(listed[:length])}
            if _expands_to(cls, params, wanted):
                candidates.append(params)
                break
    return candidates


def _expands_to(cls: type[Reducer], params: dict[str, Any], wanted: list[dict[str, Any]]) -> bool:
    try:
        expanded = cls.expand(cls.validate_params(params), len(wanted))
    except ScheduleError:
        return False
    return [_declared(cls, values) for values in expanded] == [
        _declared(cls, values) for values in wanted
    ]


def _declared(cls: type[Reducer], values: dict[str, Any]) -> dict[str, Any]:
    """The values of the declared parameters (``expand`` may add internal ones)."""
    return {spec.name: values[spec.name] for spec in cls.params if spec.name in values}


def _explicit(cls: type[Reducer], values: dict[str, Any]) -> dict[str, Any]:
    """The values that differ from the defaults, in the parameters' order."""
    defaults = {spec.name: spec.default for spec in cls.params}
    return {k: v for k, v in values.items() if k not in defaults or v != defaults[k]}


def _key(values: dict[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in values.items()))


def presets(model: ModelOrDepth) -> dict[str, str]:
    """Preset schedules by title (:mod:`analysis.presets`): none, then per method its
    default, its paper settings and, given a model, its matches at 75 % and 50 % of the
    full model's cost. With only a depth, the presets that need no cost."""
    found = layout_presets(model) if isinstance(model, int) else model_presets(model)
    return {preset.title: preset.schedule for preset in found}


@functools.lru_cache(maxsize=512)
def canonical_text(text: str, depth: int) -> str:
    """A schedule's shortest text form: defaults left out, layers compacted, so that
    ``evit:keep=0.7@3,6,9`` and ``evit@3,6,9`` compare equal. Raises ScheduleError.
    Cached: every rerun compares the schedule with each preset."""
    schedule = parse_schedule(text, depth=depth)
    return rows_to_schedule(schedule_to_rows(schedule, depth), depth).to_text()


def matching_preset(text: str, choices: dict[str, str], depth: int) -> str:
    """The preset that describes the same schedule as ``text``, else Custom."""
    try:
        wanted = canonical_text(text, depth)
    except ScheduleError:
        return CUSTOM_PRESET
    for title, preset in choices.items():
        if canonical_text(preset, depth) == wanted:
            return title
    return CUSTOM_PRESET


def method_help() -> list[dict[str, str]]:
    """A row per registered method and parameter, for a reference table."""
    rows = []
    for cls in REDUCERS.values():
        for spec in cls.params or ():
            bounds = (
                ""
                if spec.kind is bool
                else f"[{_format_value(spec.low)}, {_format_value(spec.high)}]"
            )
            rows.append(
                {
                    "method": f"{cls.label} ({cls.name})",
                    "parameter": spec.name,
                    "default": _format_value(spec.default),
                    "range": bounds,
                    "meaning": spec.help,
                }
            )
    return rows


def _format_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return ""
    return str(value)


def method_reference() -> str:
    """Every registered method with its parameters, defaults and ranges, as markdown."""
    by_method: dict[str, list[dict[str, str]]] = {}
    for row in method_help():
        by_method.setdefault(row["method"], []).append(row)
    lines = []
    for cls in REDUCERS.values():
        lines.append(f"**{cls.label}** (`{cls.name}`, {cls.site.value}): {cls.description}")
        for row in by_method.get(f"{cls.label} ({cls.name})", []):
            bounds = f" in {row['range']}" if row["range"] else ""
            lines.append(f"- `{row['parameter']}={row['default']}`{bounds}: {row['meaning']}")
        lines.append("")
    return "\n".join(lines)
