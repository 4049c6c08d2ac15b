"""Preset schedules: every method where its paper runs it, and at matched costs.

For each registered method, in registry order:

1. its **default**: the method alone, at its default parameters and default placement
   (``Reducer.default_layers``: after block L/2 for PatchMerger, every block but the last
   for Cropr, blocks 4/7/10 of 12 for MSTM, every block otherwise);
2. its **paper settings** (``Reducer.paper_settings``): explicit parameters and layers
   (EViT's keep 0.7 at 3/6/9), or a cost point of the paper that the strength is solved
   for on the model at hand (LTM at 86 % of full, its ViT-S figure);
3. a **cost-matched family**: the method's base schedule (:func:`base_schedule`) solved
   to 75 % and 50 % of the full model's GMACs with :func:`analysis.solver.match_cost`,
   so that a first comparison between methods is fair. Learned methods stay where their
   loaded weights hold: PatchMerger moves its layer, and a strength outside the trained
   range is marked "extrapolated".

Presets with the same schedule are one preset whose title lists every note. Without a
model (:func:`layout_presets`) only what needs no cost comes back. Costs come from the
analytic counter, so building the presets runs nothing; :func:`model_presets` caches
them per model and weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeAlias

from analysis.errors import ScheduleError, TokenScopeError
from analysis.flops import count_macs
from analysis.reducers import REDUCERS, Reducer
from analysis.reducers.base import PaperSetting, every_layer
from analysis.schedule import Schedule, SchedulePart

if TYPE_CHECKING:
    from analysis.backbone import LoadedModel

# What preset lists are built for: a loaded model (with costs) or only a depth (without).
# Named here so that the app's tables can say so without importing model loading.
ModelOrDepth: TypeAlias = "LoadedModel | int"

NONE_TITLE = "None (full model)"
MATCHED_PERCENTS = (75.0, 50.0)  # the cost-matched family, % of the full model's GMACs
EXTRAPOLATED = "extrapolated"  # the note of a preset outside its weights' trained range
BASE_DEPTH = 12  # the depth at which `analysis.sweep.DEFAULT_BASES` is written
_CACHE_SIZE = 8


@dataclass(frozen=True)
class Preset:
    """One preset: its schedule text and why it is offered.

    ``notes`` say where it comes from ("default", "paper: DeiT-S 3.0 G", "matched to
    75 %", and "extrapolated" when its weights were not trained there); ``percent`` is
    its cost on the model, as a percentage of the full model (None without a model).
    """

    title: str
    schedule: str
    method: str | None  # None for the full model
    notes: tuple[str, ...] = ()
    percent: float | None = None


def base_schedule(cls: type[Reducer], depth: int) -> Schedule:
    """The schedule a method's sweeps and matched presets start from: its first paper
    setting with explicit parameters (EViT's keep 0.7 at its stages), else the method at
    its default placement; its strength is written out either way."""
    setting = next((s for s in cls.paper_settings if s.percent is None), PaperSetting(""))
    params = _explicit(cls, {**_strength_default(cls), **setting.params}, keep_strength=True)
    return Schedule((SchedulePart(cls.name, params, _layers(cls, setting, depth, params)),))


def default_bases(depth: int = BASE_DEPTH) -> dict[str, str]:
    """:func:`base_schedule` of every registered method, as text (for sweeps)."""
    return {name: base_schedule(cls, depth).to_text() for name, cls in REDUCERS.items()}


def layout_presets(depth: int) -> list[Preset]:
    """The presets that need no model: none, each method's default and its paper
    settings with explicit parameters. Cost points and matched costs need a model."""
    return _collect(depth, _candidates(depth, None))


def model_presets(model: LoadedModel) -> list[Preset]:
    """Every preset for ``model``, with its cost; cached per model and loaded weights."""
    key = _cache_key(model)
    found = _CACHE.get(key)
    if found is None:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        found = tuple(_collect(model.facts.depth, _candidates(model.facts.depth, model), model))
        _CACHE[key] = found
    return list(found)


def matched_schedules(model: LoadedModel, percent: float) -> dict[str, str]:
    """Each method's matched preset at ``percent`` % of full (when reachable), by method."""
    note = _matched_note(percent)
    return {
        preset.method: preset.schedule
        for preset in model_presets(model)
        if preset.method is not None and note in preset.notes
    }


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class _Candidate:
    method: str | None
    schedule: Schedule
    note: str


def _candidates(depth: int, model: LoadedModel | None) -> list[_Candidate]:
    found = [_Candidate(None, Schedule(), "")]
    for name, cls in REDUCERS.items():
        found.append(_Candidate(name, Schedule((SchedulePart(name),)), "default"))
        for setting in cls.paper_settings:
            params = _explicit(cls, setting.params)
            layers = _layers(cls, setting, depth, params)
            schedule = Schedule((SchedulePart(name, params, layers),))
            if setting.percent is None:
                found.append(_Candidate(name, schedule, setting.note))
            elif model is not None:
                solved = _solve(model, schedule, setting.percent)
                if solved is not None:
                    found.append(_Candidate(name, solved, setting.note))
        if model is None:
            continue
        for percent in MATCHED_PERCENTS:
            solved = _solve(model, base_schedule(cls, depth), percent)
            if solved is not None:
                found.append(_Candidate(name, solved, _matched_note(percent)))
    return found


def _solve(model: LoadedModel, base: Schedule, percent: float) -> Schedule | None:
    """``base`` solved to ``percent`` % of full, written as the presets write schedules
    (defaults and the default placement left out); None when the target is out of the
    method's reach on this model."""
    from analysis.solver import DEFAULT_TOLERANCE_PERCENT, match_cost, strength_param

    as_given = _percent(model, base)
    if as_given is not None and abs(as_given - percent) <= DEFAULT_TOLERANCE_PERCENT:
        return _plain(base, model.facts.depth)  # already there (LTM's default keep)
    cls = REDUCERS[base.parts[0].method]
    if model.learned.get(cls.name) is None and strength_param(cls).name in cls.fixed_by_weights:
        return _solve_layer(model, base, percent)
    try:
        (matched,) = match_cost(model, [base], target_percent=percent)
    except (ScheduleError, TokenScopeError):
        return None
    if not matched.reachable:
        return None
    return _plain(matched.schedule, model.facts.depth)


def _solve_layer(model: LoadedModel, base: Schedule, percent: float) -> Schedule | None:
    """For a method whose weights would fix its strength (PatchMerger's M) but which has
    none loaded: keep the paper's value and move the layer, as the solver does with
    weights, rather than solve for an M no one trains."""
    part = base.parts[0]
    costs = {}
    for layer in range(model.facts.depth):
        moved = Schedule((replace(part, layers=(layer,)),))
        cost = _percent(model, moved)
        if cost is not None:
            costs[layer] = (cost, moved)
    if not costs or not min(c for c, _ in costs.values()) <= percent <= 100.0:
        return None
    best = min(costs, key=lambda layer: abs(costs[layer][0] - percent))
    return _plain(costs[best][1], model.facts.depth)


def _plain(schedule: Schedule, depth: int) -> Schedule:
    """``schedule`` without default values or a default placement, so that presets that
    run the same compare equal as text."""
    parts = []
    for part in schedule.parts:
        cls = REDUCERS[part.method]
        params = _explicit(cls, part.params)
        placed = cls.default_layers(depth, cls.validate_params(params))
        parts.append(replace(part, params=params, layers=_unless(part.layers, placed)))
    return Schedule(tuple(parts))


def _unless(layers: tuple[int, ...] | None, placed: tuple[int, ...]) -> tuple[int, ...] | None:
    return None if layers == placed else layers


def _extrapolated(model: LoadedModel, schedule: Schedule) -> bool:
    from analysis.trained_settings import extrapolation

    try:
        return bool(extrapolation(model, schedule))
    except ScheduleError:
        return False


def _collect(
    depth: int, candidates: list[_Candidate], model: LoadedModel | None = None
) -> list[Preset]:
    """One preset per distinct schedule (notes merged), titled, in the candidates' order."""
    notes: dict[str, list[str]] = {}
    first: dict[str, _Candidate] = {}
    for candidate in candidates:
        text = candidate.schedule.to_text()
        first.setdefault(text, candidate)
        merged = notes.setdefault(text, [])
        if candidate.note and candidate.note not in merged:
            merged.append(candidate.note)
    presets: list[Preset] = []
    titles: set[str] = set()
    for text, candidate in first.items():
        percent = None
        if model is not None:
            percent = _percent(model, candidate.schedule)
            if _extrapolated(model, candidate.schedule):  # outside what its weights saw
                notes[text].append(EXTRAPOLATED)
        title = _title(candidate, notes[text], percent, depth)
        while title in titles:  # never two presets under one title
            title += " ·"
        titles.add(title)
        presets.append(Preset(title, text, candidate.method, tuple(notes[text]), percent))
    return presets


def _title(candidate: _Candidate, notes: list[str], percent: float | None, depth: int) -> str:
    if candidate.method is None:
        return NONE_TITLE
    cls = REDUCERS[candidate.method]
    part = candidate.schedule.parts[0]
    values = {**_strength_default(cls), **part.params}
    shown = " ".join(f"{k}={_show(v)}" for k, v in values.items())
    title = f"{cls.label} {shown}".strip() + f", {_where(part.layers_for(depth), depth)}"
    if notes:
        title += f" ({'; '.join(notes)})"
    if percent is not None:
        title += f", {percent:.0f} % of full"
    return title


def _percent(model: LoadedModel, schedule: Schedule) -> float | None:
    facts = model.facts
    try:
        cost = count_macs(facts, schedule.resolve(facts), model.module).macs
        full = count_macs(facts, Schedule().resolve(facts), model.module).macs
    except ScheduleError:
        return None
    return 100.0 * cost / full


def _layers(
    cls: type[Reducer], setting: PaperSetting, depth: int, params: dict[str, Any]
) -> tuple[int, ...] | None:
    """A setting's layers, or None where they are the default placement (no ``@``)."""
    if setting.layers is None:
        return None
    return _unless(setting.layers(depth), cls.default_layers(depth, cls.validate_params(params)))


def _strength_default(cls: type[Reducer]) -> dict[str, Any]:
    from analysis.solver import strength_param

    try:
        spec = strength_param(cls)
    except ScheduleError:
        return {}
    return {spec.name: spec.default}


def _explicit(
    cls: type[Reducer], params: dict[str, Any], keep_strength: bool = False
) -> dict[str, Any]:
    """``params`` without those at their default (the strength kept when asked)."""
    strength = set(_strength_default(cls)) if keep_strength else set()
    defaults = {spec.name: spec.default for spec in cls.params}
    return {k: v for k, v in params.items() if k in strength or defaults.get(k) != v}


def _where(layers: tuple[int, ...], depth: int) -> str:
    """``all layers``, ``at layer 5``, ``at layers 3/6/9`` or ``at layers 0–10``."""
    if layers == every_layer(depth):
        return "all layers"
    if len(layers) == 1:
        return f"at layer {layers[0]}"
    if len(layers) >= 3 and layers == tuple(range(layers[0], layers[-1] + 1)):
        return f"at layers {layers[0]}–{layers[-1]}"
    return "at layers " + "/".join(str(layer) for layer in layers)


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        low, high = min(value), max(value)
        return _show(low) if low == high else f"{_show(low)}–{_show(high)}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _matched_note(percent: float) -> str:
    return f"matched to {percent:g} %"


# --------------------------------------------------------------------------- cache

_CACHE: dict[tuple, tuple[Preset, ...]] = {}


def _cache_key(model: LoadedModel) -> tuple:
    """What the presets depend on: the model's facts and head, and what its learned
    weights cover (layers, recorded schedules, the values their modules fix)."""
    learned = tuple(
        sorted(
            (
                name,
                tuple(sorted(weights.modules)),
                tuple(sorted(weights.metadata.items())),
                tuple(repr(getattr(m, "config", {})) for _, m in sorted(weights.modules.items())),
            )
            for name, weights in model.learned.items()
        )
    )
    head = (
        getattr(model.module, "attn_pool", None) is not None,
        getattr(model.module, "head_dist", None) is not None,
    )
    return (model.name, model.weights, model.facts, head, learned, tuple(REDUCERS))


__all__ = [
    "EXTRAPOLATED",
    "MATCHED_PERCENTS",
    "NONE_TITLE",
    "Preset",
    "base_schedule",
    "default_bases",
    "layout_presets",
    "matched_schedules",
    "model_presets",
]
