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

from analysis.errors import ScheduleError, shorten
from analysis.reducers import Reducer, Site, reducer_class
from analysis.reducers.base import ModelFacts

MAX_SCHEDULE_CHARS = 10_000  # a 40-layer per-layer schedule needs under 2,000
MAX_LAYERS = 1024  # no model the engine runs is deeper; layers beyond are refused unexpanded
PROPORTIONAL_KEY = "proportional_attention"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_PART_KEYS = {"method", "params", "layers"}


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
        pieces = [part.to_text() for part in self.parts]
        if self.proportional_attention is not None:
            pieces.append(f"{PROPORTIONAL_KEY}={int(self.proportional_attention)}")
        return ";".join(pieces) or "none"

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
                        f"{shorten(part.to_text())}: layer {layer} is beyond the depth of "
                        f"{facts.name} ({facts.depth} layers, 0-{facts.depth - 1})"
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
        given = parse_flag(self.proportional_attention, PROPORTIONAL_KEY)
        proportional = wants_proportional if given is None else given
        return ResolvedSchedule(
            layers=tuple(
                LayerPlan(inside=p.get(Site.INSIDE), between=p.get(Site.BETWEEN)) for p in plans
            ),
            proportional_attention=proportional,
        )


def parse_schedule(text: str | Schedule | dict | list | None, depth: int | None = None) -> Schedule:
    """Parse the text or JSON form of a schedule; with ``depth``, also check layer numbers."""
    limit = MAX_LAYERS if depth is None else min(depth, MAX_LAYERS)
    if isinstance(text, Schedule):
        schedule = text
    elif text is None:
        schedule = Schedule()
    elif isinstance(text, (dict, list)):
        schedule = _from_json_value(text, limit)
    elif isinstance(text, str):
        if len(text) > MAX_SCHEDULE_CHARS:
            raise ScheduleError(
                f"the schedule is {len(text):,} characters long; the limit is "
                f"{MAX_SCHEDULE_CHARS:,}. Use layer ranges (0-11) instead of listing layers"
            )
        stripped = text.strip()
        if stripped.startswith(("{", "[")):
            try:
                value = json.loads(stripped)
            except (json.JSONDecodeError, RecursionError) as error:
                reason = "it is nested too deeply" if isinstance(error, RecursionError) else error
                raise ScheduleError(f"schedule JSON is malformed: {reason}") from None
            schedule = _from_json_value(value, limit)
        else:
            schedule = _from_text(stripped, limit)
    else:
        raise ScheduleError(
            f"a schedule is text or JSON, not {type(text).__name__}; e.g. 'tome:r=8'"
        )
    if depth is not None:
        _check_depth(schedule, depth)
    return schedule


def _check_depth(schedule: Schedule, depth: int) -> None:
    for part in schedule.parts:
        for layer in part.layers or ():
            if layer >= depth:
                raise ScheduleError(
                    f"{shorten(part.to_text())}: layer {layer} is beyond the model's depth "
                    f"({depth} layers, 0-{depth - 1})"
                )


def parse_flag(value: Any, where: str) -> bool | None:
    """A yes/no setting from text or JSON: true/false, 1/0, yes/no, on/off (None stays None)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
    raise ScheduleError(f"{where} must be true or false (1 or 0), got {shorten(repr(value), 40)}")


def _from_text(text: str, limit: int = MAX_LAYERS) -> Schedule:
    if text.lower() in {"", "none"}:
        return Schedule()
    parts = []
    proportional: bool | None = None
    for raw in text.split(";"):
        raw = raw.strip()
        if not raw or raw.lower() == "none":
            continue
        key, sep, value = raw.partition("=")
        if sep and key.strip().lower() == PROPORTIONAL_KEY:
            if proportional is not None:
                raise ScheduleError(f"'{PROPORTIONAL_KEY}' is given twice")
            proportional = parse_flag(value, PROPORTIONAL_KEY)
            continue
        parts.append(_parse_part(raw, limit))
    return Schedule(parts=tuple(parts), proportional_attention=proportional)


def _parse_part(raw: str, limit: int = MAX_LAYERS) -> SchedulePart:
    body, _, layer_text = raw.partition("@")
    method_text, _, param_text = body.partition(":")
    cls = reducer_class(shorten(method_text, 40))
    params = parse_params(cls, param_text)
    layers = _parse_layers(layer_text, raw, limit) if "@" in raw else None
    return SchedulePart(method=cls.name, params=params, layers=layers)


def parse_params(cls: type[Reducer], text: str, separators: str = ",") -> dict[str, Any]:
    """The explicitly given parameters in ``key=value,...`` text, coerced and range-checked."""
    params: dict[str, Any] = {}
    for item in _split_outside_brackets(text or "", separators):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ScheduleError(f"{cls.name}: expected key=value, got '{shorten(item, 60)}'")
        spec = cls.param(shorten(key.strip(), 40))
        if spec.name in params:
            raise ScheduleError(f"{cls.name}: parameter '{spec.name}' is given twice")
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):
            if not spec.allows_list:
                raise ScheduleError(f"{cls.name}: parameter '{spec.name}' does not take a list")
            inner = value[1:-1]
            if "[" in inner or "]" in inner:
                raise ScheduleError(
                    f"{cls.name}: '{spec.name}' takes a flat list of numbers, e.g. [16,12,8]"
                )
            items = [v for v in inner.split(",") if v.strip()]
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


def _parse_layers(text: str, raw: str, limit: int = MAX_LAYERS) -> tuple[int, ...]:
    """Layer numbers from ``3,6,9`` or ``0-5``; each is checked against ``limit`` (the
    depth, when known) before a range is expanded."""
    layers: list[int] = []
    where = shorten(raw, 60)
    if not text.strip():
        raise ScheduleError(f"'{where}': no layers after '@'")
    for item in text.split(","):
        item = item.strip()
        start_text, is_range, end_text = item.partition("-")
        try:
            start = int(start_text)
            end = int(end_text) if is_range else start
        except ValueError:
            raise ScheduleError(
                f"'{where}': layers must be 0-based numbers or ranges like 3,6,9 or 0-5, "
                f"got '{shorten(item, 30)}'"
            ) from None
        if end < start:
            raise ScheduleError(f"'{where}': layer range {shorten(item, 30)} runs backwards")
        if start < 0:
            raise ScheduleError(f"'{where}': layers are 0-based and cannot be negative")
        _check_layer(end, limit, where)
        layers.extend(range(start, end + 1))
    if len(set(layers)) != len(layers):
        raise ScheduleError(f"'{where}': a layer is listed twice")
    return tuple(layers)


def _check_layer(layer: int, limit: int, where: str) -> None:
    if layer < limit:
        return
    if limit < MAX_LAYERS:
        raise ScheduleError(
            f"'{where}': layer {shorten(layer, 20)} is beyond the model's depth "
            f"({limit} layers, 0-{limit - 1})"
        )
    raise ScheduleError(
        f"'{where}': layer {shorten(layer, 20)} is beyond any model TokenScope runs "
        f"(layers 0-{MAX_LAYERS - 1})"
    )


def _from_json_value(value: Any, limit: int = MAX_LAYERS) -> Schedule:
    proportional = None
    if isinstance(value, dict):
        unknown = set(value) - {"parts", PROPORTIONAL_KEY}
        if unknown:
            shown = ", ".join(shorten(repr(key), 30) for key in sorted(map(str, unknown))[:5])
            raise ScheduleError(f"schedule JSON: unknown keys {shown}")
        proportional = parse_flag(
            value.get(PROPORTIONAL_KEY), f"schedule JSON: '{PROPORTIONAL_KEY}'"
        )
        value = value.get("parts", [])
    if not isinstance(value, list):
        raise ScheduleError("schedule JSON: expected a list of parts or {'parts': [...]}")
    parts = []
    for index, entry in enumerate(value):
        where = f"schedule JSON, part {index + 1}"
        if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
            raise ScheduleError(
                f"{where}: each part is an object with a 'method' name, got "
                f"{shorten(repr(entry), 60)}"
            )
        unknown = set(entry) - _PART_KEYS
        if unknown:
            shown = ", ".join(shorten(repr(key), 30) for key in sorted(map(str, unknown))[:5])
            raise ScheduleError(f"{where}: unknown keys {shown} (known: method, params, layers)")
        cls = reducer_class(shorten(entry["method"], 40))
        raw_params = entry.get("params")
        if raw_params is None:
            raw_params = {}
        if not isinstance(raw_params, dict):
            raise ScheduleError(f"{where}: 'params' must be an object like {{\"r\": 8}}")
        params = {}
        for key, item in raw_params.items():
            spec = cls.param(shorten(key, 40))
            if isinstance(item, list) and any(isinstance(v, (list, dict)) for v in item):
                raise ScheduleError(
                    f"{where}: '{spec.name}' takes a number or a flat list of numbers"
                )
            params[spec.name] = spec.coerce(cls.name, item)
        layers = entry.get("layers")
        if layers is not None:
            layers = _json_layers(layers, where, limit)
        parts.append(SchedulePart(method=cls.name, params=params, layers=layers))
    return Schedule(parts=tuple(parts), proportional_attention=proportional)


def _json_layers(layers: Any, where: str, limit: int) -> tuple[int, ...]:
    """A JSON part's layers: a list of 0-based integers or the text form ("0-5")."""
    if isinstance(layers, str):
        return _parse_layers(layers, f"{where}: {layers}", limit)
    if not isinstance(layers, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in layers
    ):
        raise ScheduleError(
            f"{where}: 'layers' must be a list of 0-based integers or text like \"0-5\", "
            f"got {shorten(repr(layers), 60)}"
        )
    for item in layers:
        _check_layer(item, limit, where)
    if len(set(layers)) != len(layers):
        raise ScheduleError(f"{where}: a layer is listed twice")
    return tuple(layers)


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        short = f"{value:g}"  # 0.7, 1e-05: the usual look, when it reads back the same
        return short if float(short) == value else repr(value)
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
