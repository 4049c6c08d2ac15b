"""Schedules: which reducer runs at which layer, with which parameters.

Text form: ``METHOD:key=value,key=value@LAYERS`` parts joined by ``;``. LAYERS is a
comma list with ranges (``3,6,9``, ``0-5``); with no ``@`` the method runs at its default
placement, the one its paper uses (``Reducer.default_layers``: every layer for ToMe,
EViT, Top-K, DTEM and LTM; after block L/2 for PatchMerger; every block but the last for
Cropr; blocks 4/7/10 of 12 for MSTM). ``none`` (or an empty string) is the empty
schedule. Layers are 0-based.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from analysis.errors import ScheduleError
from analysis.reducers import Reducer, Site, reducer_class
from analysis.reducers.base import ModelFacts


@dataclass(frozen=True)
class SchedulePart:
    method: str
    params: dict[str, Any] = field(default_factory=dict)  # explicitly given, coerced
    layers: tuple[int, ...] | None = None  # None: the method's default placement

    def layers_for(self, depth: int) -> tuple[int, ...]:
        """The layers this part runs at in a model of ``depth`` layers (raises ScheduleError
        for an unknown method or parameter)."""
        if self.layers is not None:
            return self.layers
        cls = reducer_class(self.method)
        return cls.default_layers(depth, cls.validate_params(self.params))

    def to_text(self) -> str:
        text = self.method
        if self.params:
            text += ":" + ",".join(f"{k}={_format_value(v)}" for k, v in self.params.items())
        if self.layers is not None:
            text += "@" + _format_layers(self.layers)
        return text

    def to_dict(self) -> dict[str, Any]:
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        out: dict[str, Any] = {"method": self.method, "params": params}
        if self.layers is not None:
            out["layers"] = list(self.layers)
        return out


@dataclass(frozen=True)
class LayerPlan:
    """The reducers that run in one layer, by site."""

    inside: Reducer | None = None
    between: Reducer | None = None

    def at(self, site: Site) -> Reducer | None:
        return self.inside if site is Site.INSIDE else self.between


@dataclass(frozen=True)
class ResolvedSchedule:
    """A schedule checked against one model: a plan per layer."""

    layers: tuple[LayerPlan, ...]
    proportional_attention: bool

    def reducers(self) -> list[tuple[int, Reducer]]:
        found = []
        for index, plan in enumerate(self.layers):
            for reducer in (plan.inside, plan.between):
                if reducer is not None:
                    found.append((index, reducer))
        return found


@dataclass(frozen=True)
class Schedule:
    parts: tuple[SchedulePart, ...] = ()
    proportional_attention: bool | None = None  # None: on when any reducer asks for it

    @property
    def is_empty(self) -> bool:
        return not self.parts

    def to_text(self) -> str:
        return ";".join(part.to_text() for part in self.parts) or "none"

    def to_json(self) -> str:
        payload: dict[str, Any] = {"parts": [part.to_dict() for part in self.parts]}
        if self.proportional_attention is not None:
            payload["proportional_attention"] = self.proportional_attention
        return json.dumps(payload)

    def methods(self) -> list[str]:
        return list(dict.fromkeys(part.method for part in self.parts))

    def resolve(self, facts: ModelFacts) -> ResolvedSchedule:
        """Check the schedule against a model and build the per-layer reducers."""
        plans: list[dict[Site, Reducer]] = [{} for _ in range(facts.depth)]
        wants_proportional = False
        for part in self.parts:
            cls = reducer_class(part.method)
            layers = part.layers_for(facts.depth)
            for layer in layers:
                if layer >= facts.depth:
                    raise ScheduleError(
                        f"{part.to_text()}: layer {layer} is beyond the depth of {facts.name} "
                        f"({facts.depth} layers, 0-{facts.depth - 1})"
                    )
            values = cls.validate_params(part.params)
            for layer, layer_values in zip(layers, cls.expand(values, len(layers)), strict=True):
                existing = plans[layer].get(cls.site)
                if existing is not None:
                    raise ScheduleError(
                        f"layer {layer}: {existing.name} and {cls.name} both run at the "
                        f"'{cls.site.value}' site; one site holds one method"
                    )
                reducer = cls(**layer_values)
                reducer.check_model(facts)
                plans[layer][cls.site] = reducer
                wants_proportional |= cls.proportional_attention
        proportional = (
            wants_proportional
            if self.proportional_attention is None
            else self.proportional_attention
        )
        return ResolvedSchedule(
            layers=tuple(
                LayerPlan(inside=p.get(Site.INSIDE), between=p.get(Site.BETWEEN)) for p in plans
            ),
            proportional_attention=proportional,
        )


def parse_schedule(text: str | Schedule | dict | list | None, depth: int | None = None) -> Schedule:
    """Parse the text or JSON form of a schedule; with ``depth``, also check layer numbers."""
    if isinstance(text, Schedule):
        schedule = text
    elif text is None:
        schedule = Schedule()
    elif isinstance(text, (dict, list)):
        schedule = _from_json_value(text)
    else:
        stripped = text.strip()
        if stripped.startswith(("{", "[")):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError as error:
                raise ScheduleError(f"schedule JSON is malformed: {error}") from None
            schedule = _from_json_value(value)
        else:
            schedule = _from_text(stripped)
    if depth is not None:
        _check_depth(schedule, depth)
    return schedule


def _check_depth(schedule: Schedule, depth: int) -> None:
    for part in schedule.parts:
        for layer in part.layers or ():
            if layer >= depth:
                raise ScheduleError(
                    f"{part.to_text()}: layer {layer} is beyond the model's depth "
                    f"({depth} layers, 0-{depth - 1})"
                )


def _from_text(text: str) -> Schedule:
    if text.lower() in {"", "none"}:
        return Schedule()
    parts = []
    for raw in text.split(";"):
        raw = raw.strip()
        if not raw:
            continue
        parts.append(_parse_part(raw))
    return Schedule(parts=tuple(parts))


def _parse_part(raw: str) -> SchedulePart:
    body, _, layer_text = raw.partition("@")
    method_text, _, param_text = body.partition(":")
    cls = reducer_class(method_text)
    params = parse_params(cls, param_text)
    layers = _parse_layers(layer_text, raw) if "@" in raw else None
    return SchedulePart(method=cls.name, params=params, layers=layers)


def parse_params(cls: type[Reducer], text: str, separators: str = ",") -> dict[str, Any]:
    """The explicitly given parameters in ``key=value,...`` text, coerced and range-checked."""
    params: dict[str, Any] = {}
    for item in _split_outside_brackets(text or "", separators):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ScheduleError(f"{cls.name}: expected key=value, got '{item}'")
        spec = cls.param(key.strip())
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):
            if not spec.allows_list:
                raise ScheduleError(f"{cls.name}: parameter '{spec.name}' does not take a list")
            items = [v for v in value[1:-1].split(",") if v.strip()]
            params[spec.name] = spec.coerce(cls.name, items)
        else:
            params[spec.name] = spec.coerce(cls.name, value)
    return params


def _split_outside_brackets(text: str, separators: str = ",") -> list[str]:
    items, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char in separators and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item.strip() for item in items if item.strip()]


def _parse_layers(text: str, raw: str) -> tuple[int, ...]:
    layers: list[int] = []
    if not text.strip():
        raise ScheduleError(f"'{raw}': no layers after '@'")
    for item in text.split(","):
        item = item.strip()
        start_text, is_range, end_text = item.partition("-")
        try:
            start = int(start_text)
            end = int(end_text) if is_range else start
        except ValueError:
            raise ScheduleError(
                f"'{raw}': layers must be 0-based numbers or ranges like 3,6,9 or 0-5, got '{item}'"
            ) from None
        if end < start:
            raise ScheduleError(f"'{raw}': layer range {item} runs backwards")
        layers.extend(range(start, end + 1))
    if any(layer < 0 for layer in layers):
        raise ScheduleError(f"'{raw}': layers are 0-based and cannot be negative")
    if len(set(layers)) != len(layers):
        raise ScheduleError(f"'{raw}': a layer is listed twice")
    return tuple(layers)


def _from_json_value(value: Any) -> Schedule:
    proportional = None
    if isinstance(value, dict):
        proportional = value.get("proportional_attention")
        unknown = set(value) - {"parts", "proportional_attention"}
        if unknown:
            raise ScheduleError(f"schedule JSON: unknown keys {sorted(unknown)}")
        value = value.get("parts", [])
    if not isinstance(value, list):
        raise ScheduleError("schedule JSON: expected a list of parts or {'parts': [...]}")
    parts = []
    for entry in value:
        if not isinstance(entry, dict) or "method" not in entry:
            raise ScheduleError(f"schedule JSON: each part needs a 'method', got {entry!r}")
        cls = reducer_class(str(entry["method"]))
        raw_params = entry.get("params", {}) or {}
        params = {
            cls.param(k).name: cls.param(k).coerce(cls.name, v) for k, v in raw_params.items()
        }
        layers = entry.get("layers")
        if layers is not None:
            if isinstance(layers, str):
                layers = _parse_layers(layers, str(entry))
            elif not all(isinstance(item, int) and item >= 0 for item in layers):
                raise ScheduleError(f"schedule JSON: layers must be 0-based integers, got {layers}")
            layers = tuple(layers)
        parts.append(SchedulePart(method=cls.name, params=params, layers=layers))
    return Schedule(parts=tuple(parts), proportional_attention=proportional)


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _format_layers(layers: tuple[int, ...]) -> str:
    """Compact form: consecutive runs of three or more become ranges."""
    pieces: list[str] = []
    start = prev = None
    for layer in [*list(layers), None]:
        if start is not None and (layer is None or layer != prev + 1):
            if prev - start >= 2:
                pieces.append(f"{start}-{prev}")
            else:
                pieces.extend(str(v) for v in range(start, prev + 1))
            start = None
        if layer is not None:
            if start is None:
                start = layer
            prev = layer
    return ",".join(pieces)
