"""Matched cost: set each method's strength so that every method lands on the same GMACs.

Pick a target, in GMACs or as a percentage of the full model, and give one base schedule
per method (``"evit:keep=0.7@3,6,9"``, ``"tome:r=8"``). For each schedule the solver varies
only the method's *strength* parameter, over that parameter's declared range, keeping
the layers and every other parameter as given; all parts of the method get the same
value. Costs come from the analytic counter (:func:`analysis.flops.count_macs`), so no
model runs and methods that need trained weights are solved all the same.

The strength parameter comes from the reducer class itself: a new reducer declares
``strength: ClassVar[str] = "<param name>"``. A class that declares none falls back to its
first numeric parameter with a range. The cost must be monotonic in the strength (either
way round: more ``r`` costs less, more ``keep`` costs more; the direction is read off the
two ends of the range). Floats are bisected until the cost stops changing, then the
shortest decimal with the same cost is reported. Integers are bisected to the pair of
neighbours around the target, and the closer one is taken; when an integer step is
coarser than the tolerance (ToMe's r on DeiT-S moves the cost by about 3 % per step) the
result says so rather than pretending.

Learned methods stay where their loaded weights are valid (given a loaded model, not just
its facts; see :mod:`analysis.trained_settings`). A strength that the weights fix
(PatchMerger's ``tokens``: its M learned queries) is never varied: the method moves, as one
single-layer part, over the layers its weights cover, and the layer whose cost is closest
wins (``param`` is then ``"layer"``). Any other strength is solved over its whole range as
above, and a value outside the range the weights were trained at is reported in
``extrapolated`` (empty when within it, or when the weights record no range).

Python::

    from analysis import load_model
    from analysis.solver import match_cost
    model = load_model("deit_small_patch16_224", weights="random")
    for m in match_cost(model, ["tome:r=8", "evit:keep=0.7@3,6,9"], target_percent=60):
        print(m.label, m.param, m.value, m.gmacs, m.within_tolerance, m.message)

Command line (wired as ``python -m analysis solve``)::

    python -m analysis solve --model deit_small_patch16_224 --weights random \\
        --target-percent 60 --schedule "tome:r=8" --schedule "evit:keep=0.7@3,6,9"
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from analysis.backbone import LoadedModel, model_facts
from analysis.errors import ScheduleError, TokenScopeError
from analysis.flops import count_macs
from analysis.reducers import reducer_class
from analysis.reducers.base import ModelFacts, Param
from analysis.schedule import Schedule, parse_schedule
from analysis.strength import strength_param, with_strength
from analysis.trained_settings import (
    TrainedSettings,
    at_layer,
    extrapolation,
    layers_text,
    trained_settings,
    with_fixed,
)

DEFAULT_TOLERANCE_PERCENT = 1.0  # of the full model's GMACs
_FLOAT_STEPS = 200  # bisection rounds for a float strength (stops early once converged)
_MAX_DECIMALS = 9  # the reported float value is the shortest decimal with the same cost


@dataclass(frozen=True)
class MatchedSchedule:
    """One method's schedule with its strength solved for a target cost.

    ``message`` is empty when the target was met within the tolerance, and otherwise
    says why not (the target is out of reach, or an integer step is too coarse).
    """

    method: str  # the registry name, as used in schedules
    label: str  # the name shown in the UI
    base: Schedule  # the schedule as given
    schedule: Schedule  # the schedule with the solved strength
    param: str  # the strength parameter that was varied ("layer" when the weights fix it)
    value: int | float  # what it was set to
    gmacs: float  # the cost the solved schedule achieves
    target_gmacs: float
    full_gmacs: float  # the model with no reduction
    tolerance: float  # in GMACs
    reachable_range: tuple[float, float]  # (min, max) GMACs over the parameter's range
    message: str = ""
    extrapolated: str = ""  # why the solved setting lies outside the trained range, or ""

    @property
    def error(self) -> float:
        """Achieved minus target, in GMACs (negative: cheaper than the target)."""
        return self.gmacs - self.target_gmacs

    @property
    def within_tolerance(self) -> bool:
        return abs(self.error) <= self.tolerance * (1 + 1e-9)

    @property
    def reachable(self) -> bool:
        """Whether the target lies within the reachable range, give or take the tolerance."""
        low, high = self.reachable_range
        return low - self.tolerance <= self.target_gmacs <= high + self.tolerance

    @property
    def percent(self) -> float:
        """The achieved cost as a percentage of the full model."""
        return 100.0 * self.gmacs / self.full_gmacs

    @property
    def target_percent(self) -> float:
        return 100.0 * self.target_gmacs / self.full_gmacs

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record."""
        return {
            "method": self.method,
            "label": self.label,
            "param": self.param,
            "value": self.value,
            "schedule": self.schedule.to_text(),
            "base": self.base.to_text(),
            "gmacs": self.gmacs,
            "percent": self.percent,
            "target_gmacs": self.target_gmacs,
            "target_percent": self.target_percent,
            "full_gmacs": self.full_gmacs,
            "error": self.error,
            "tolerance": self.tolerance,
            "within_tolerance": self.within_tolerance,
            "reachable": self.reachable,
            "reachable_range": list(self.reachable_range),
            "message": self.message,
            "extrapolated": self.extrapolated,
        }


def full_gmacs(facts: ModelFacts, module: nn.Module | None = None) -> float:
    """The model's cost with no reduction."""
    return count_macs(facts, Schedule().resolve(facts), module).gmacs


def match_cost(
    model: LoadedModel | ModelFacts,
    schedules: Sequence[str | Schedule],
    *,
    target_gmacs: float | None = None,
    target_percent: float | None = None,
    tolerance_gmacs: float | None = None,
    tolerance_percent: float = DEFAULT_TOLERANCE_PERCENT,
    module: nn.Module | None = None,
    img_size: int | None = None,
) -> list[MatchedSchedule]:
    """Solve every schedule's strength so that all land on one target cost.

    Args:
        model: a loaded model, or just its facts (then pass ``module`` for the exact head
            cost of models with an attention pool or a distillation head). A loaded
            model's learned weights bound what learned methods may be set to.
        schedules: one base schedule per method, as text or :class:`Schedule`; each holds
            a single method (in one or more parts).
        target_gmacs: the target in GMACs; or
        target_percent: the target as a percentage of the full model's cost.
        tolerance_gmacs: how far from the target counts as a match, in GMACs; or
        tolerance_percent: the same as a percentage of the full model (default 1 %).
        module: the timm module, when ``model`` is only facts.
        img_size: the input size in pixels, when not the model's own.

    Returns:
        One :class:`MatchedSchedule` per schedule, in order. A target a method cannot
        reach is reported in its record, not raised.

    Raises:
        TokenScopeError: no target or two targets, or a negative tolerance.
        ScheduleError: a schedule that is empty, mixes methods, or does not fit the model.
    """
    facts, module = _facts_and_module(model, module, img_size)
    full = full_gmacs(facts, module)
    target = _target(full, target_gmacs, target_percent)
    tolerance = _tolerance(full, tolerance_gmacs, tolerance_percent)
    loaded = model if isinstance(model, LoadedModel) else None
    return [
        solve_schedule(facts, schedule, target, tolerance, module=module, full=full, model=loaded)
        for schedule in schedules
    ]


def solve_schedule(
    facts: ModelFacts,
    schedule: str | Schedule,
    target_gmacs: float,
    tolerance_gmacs: float,
    *,
    module: nn.Module | None = None,
    full: float | None = None,
    model: LoadedModel | None = None,
) -> MatchedSchedule:
    """Solve one schedule's strength for ``target_gmacs`` (see :func:`match_cost`).

    With ``model``, its learned weights bound the result: a strength they fix stays fixed
    and the layer is solved instead; a solved value outside the trained range is marked.
    """
    base = parse_schedule(schedule, depth=facts.depth)
    methods = base.methods()
    if not methods:
        raise ScheduleError("nothing to solve: the schedule is empty")
    if len(methods) > 1:
        raise ScheduleError(
            f"'{base.to_text()}' mixes {', '.join(methods)}; matched cost varies one method "
            "per schedule, so give each method its own schedule"
        )
    cls = reducer_class(methods[0])
    spec = strength_param(cls)
    full = full_gmacs(facts, module) if full is None else full
    settings = trained_settings(model, cls.name, base) if model is not None else None
    if settings is not None and settings.strength_fixed:
        return _solve_layer(facts, base, settings, target_gmacs, tolerance_gmacs, module, full)
    # Parameters the weights fix take their trained values: never a setting they refuse.
    varied = with_fixed(base, settings) if settings is not None else base
    cache: dict[int | float, int] = {}

    def macs(value: int | float) -> int:
        if value not in cache:
            resolved = with_strength(varied, cls.name, spec.name, value).resolve(facts)
            cache[value] = count_macs(facts, resolved, module).macs
        return cache[value]

    target_macs = target_gmacs * 1e9
    value, other = _search(spec, macs, target_macs)
    if spec.kind is float:
        value = _shortest(value, macs, spec)
    elif abs(macs(value) - target_macs) > tolerance_gmacs * 1e9:
        value = _blend_per_layer(varied, facts, spec, value, other, macs, target_macs)
    solved = with_strength(varied, cls.name, spec.name, value)
    ends = (macs(_low(spec)) / 1e9, macs(_high(spec)) / 1e9)
    result = MatchedSchedule(
        method=cls.name,
        label=cls.label,
        base=base,
        schedule=solved,
        param=spec.name,
        value=value,
        gmacs=macs(value) / 1e9,
        target_gmacs=target_gmacs,
        full_gmacs=full,
        tolerance=tolerance_gmacs,
        reachable_range=(min(ends), max(ends)),
        extrapolated="" if model is None or settings is None else extrapolation(model, solved),
    )
    return replace(result, message=_explain(result, spec, other, macs))


def _solve_layer(
    facts: ModelFacts,
    base: Schedule,
    settings: TrainedSettings,
    target_gmacs: float,
    tolerance_gmacs: float,
    module: nn.Module | None,
    full: float,
) -> MatchedSchedule:
    """Solve where a method whose weights fix its strength runs: one single-layer part at
    each layer the weights cover, the closest cost wins (ties: nearest the base's layer)."""
    layers = [layer for layer in settings.layers if layer < facts.depth]
    if not layers:
        raise ScheduleError(
            f"{settings.label}: {settings.source} has no trained module for any layer of "
            f"{facts.name}, so matched cost has nowhere to place it"
        )
    costs = {
        layer: count_macs(facts, at_layer(base, settings, layer).resolve(facts), module).gmacs
        for layer in layers
    }
    given = [layer for part in base.parts for layer in part.layers_for(facts.depth)]
    near = given[0] if given else 0
    best = min(layers, key=lambda layer: (abs(costs[layer] - target_gmacs), abs(layer - near)))
    across = [
        layer
        for layer in layers
        if (costs[layer] - target_gmacs) * (costs[best] - target_gmacs) < 0
    ]
    other = min(across, key=lambda layer: abs(costs[layer] - target_gmacs), default=None)
    result = MatchedSchedule(
        method=settings.method,
        label=settings.label,
        base=base,
        schedule=at_layer(base, settings, best),
        param="layer",
        value=best,
        gmacs=costs[best],
        target_gmacs=target_gmacs,
        full_gmacs=full,
        tolerance=tolerance_gmacs,
        reachable_range=(min(costs.values()), max(costs.values())),
    )
    return replace(result, message=_explain_layer(result, settings, costs, other))


def _explain_layer(
    result: MatchedSchedule,
    settings: TrainedSettings,
    costs: dict[int, float],
    other: int | None,
) -> str:
    if result.within_tolerance:
        return ""
    fixed = ", ".join(f"{k}={_show(v)}" for k, v in settings.fixed.items())
    target = f"{result.target_gmacs:.3f} GMACs ({result.target_percent:.1f}% of full)"
    trained = f"its weights ({settings.source}) fix {fixed}, so only its layer can move"
    low, high = result.reachable_range
    if not result.reachable:
        side = "below" if result.target_gmacs < low else "above"
        return (
            f"{result.label} cannot reach {target} with its trained {fixed} "
            f"({settings.source}): only its layer can move, and "
            f"its trained layers {layers_text(sorted(costs))} span {low:.3f}-{high:.3f} GMACs "
            f"({100 * low / result.full_gmacs:.1f}-{100 * high / result.full_gmacs:.1f}%), so "
            f"the target is {side} its range; the closest is layer {result.value} at "
            f"{result.gmacs:.3f} GMACs. Train it at another layer to move the range."
        )
    step = ""
    if other is not None:
        step = f" and layer {other} gives {costs[other]:.3f}"
    return (
        f"{result.label} cannot land within ±{result.tolerance:.3f} GMACs of {target}: "
        f"{trained} (layers {layers_text(sorted(costs))}), and layer {result.value} gives "
        f"{result.gmacs:.3f}{step} GMACs. The closest, layer {result.value}, is used (error "
        f"{result.error:+.3f} GMACs); widen the tolerance to accept it."
    )


def _blend_per_layer(
    base: Schedule,
    facts: ModelFacts,
    spec: Param,
    value: int | float,
    other: int | float | None,
    macs: Callable[[int | float], int],
    target: float,
) -> int | float | tuple[int, ...]:
    """Between two neighbouring integers, an explicit per-layer list (ToMe's list form):
    the first k layers take the larger value, the rest the smaller; the k closest to the
    target wins. Used only when one integer for every layer misses the tolerance."""
    if not spec.allows_list or other is None or len(base.parts) != 1:
        return value
    part = base.parts[0]
    num_layers = len(part.layers_for(facts.depth))
    high, low = max(value, other), min(value, other)
    candidates = [tuple([high] * k + [low] * (num_layers - k)) for k in range(num_layers + 1)]
    best = min(candidates, key=lambda values: abs(macs(values) - target))
    return best if abs(macs(best) - target) < abs(macs(value) - target) else value


def _search(
    spec: Param, macs: Callable[[int | float], int], target: float
) -> tuple[int | float, int | float | None]:
    """The strength whose cost is closest to ``target``, and the runner-up across it.

    Bisects on ``reached(v)``: "the cost at v has got to the target", which is false at
    the low end of the range and true at the high end once the target is clamped into
    the reachable range. Returns the closer of the last false/true pair (and the other
    one, for messages), or the low end alone when it already reaches the target.
    """
    low, high = _low(spec), _high(spec)
    cost_low, cost_high = macs(low), macs(high)
    increasing = cost_high >= cost_low
    clamped = min(max(target, min(cost_low, cost_high)), max(cost_low, cost_high))

    def reached(value: int | float) -> bool:
        cost = macs(value)
        return cost >= clamped if increasing else cost <= clamped

    if reached(low):
        return low, None
    below, above = low, high  # reached(below) is False, reached(above) is True
    if spec.kind is int:
        while above - below > 1:
            middle = (below + above) // 2
            below, above = (below, middle) if reached(middle) else (middle, above)
    else:
        for _ in range(_FLOAT_STEPS):
            middle = (below + above) / 2
            if middle in (below, above):  # adjacent floats: converged
                break
            below, above = (below, middle) if reached(middle) else (middle, above)
    if abs(macs(above) - target) <= abs(macs(below) - target):
        return above, below
    return below, above


def _shortest(value: float, macs: Callable[[int | float], int], spec: Param) -> float:
    """The shortest decimal in range whose cost equals that of ``value``."""
    cost = macs(value)
    for decimals in range(_MAX_DECIMALS + 1):
        scale = 10.0**decimals
        for candidate in sorted(
            {math.floor(value * scale) / scale, math.ceil(value * scale) / scale},
            key=lambda c: abs(c - value),
        ):
            if _low(spec) <= candidate <= _high(spec) and macs(candidate) == cost:
                return candidate
    return value


def _explain(
    result: MatchedSchedule,
    spec: Param,
    other: int | float | None,
    macs: Callable[[int | float], int],
) -> str:
    if result.within_tolerance:
        return ""
    setting = f"{spec.name}={_show(result.value)}"
    target = f"{result.target_gmacs:.3f} GMACs ({result.target_percent:.1f}% of full)"
    low, high = result.reachable_range
    if not result.reachable:
        side = "below" if result.target_gmacs < low else "above"
        return (
            f"{result.label} cannot reach {target}: with {spec.name} in "
            f"[{_show(_low(spec))}, {_show(_high(spec))}] this schedule spans "
            f"{low:.3f}-{high:.3f} GMACs ({100 * low / result.full_gmacs:.1f}-"
            f"{100 * high / result.full_gmacs:.1f}%), so the target is {side} its range; "
            f"the closest is {setting} at {result.gmacs:.3f} GMACs. Change its layers or "
            "other parameters to move the range."
        )
    step = ""
    if other is not None:
        step = f" and {spec.name}={_show(other)} gives {macs(other) / 1e9:.3f}"
    kind = f"{spec.name} is an integer" if spec.kind is int else "the cost moves in whole tokens"
    return (
        f"{result.label} cannot land within ±{result.tolerance:.3f} GMACs of {target}: "
        f"{kind}, and {setting} gives {result.gmacs:.3f}{step} GMACs. The closest, "
        f"{setting}, is used (error {result.error:+.3f} GMACs); widen the tolerance to accept it."
    )


def _low(spec: Param) -> int | float:
    assert spec.low is not None
    return math.ceil(spec.low) if spec.kind is int else float(spec.low)


def _high(spec: Param) -> int | float:
    assert spec.high is not None
    return math.floor(spec.high) if spec.kind is int else float(spec.high)


def _show(value: int | float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _facts_and_module(
    model: LoadedModel | ModelFacts, module: nn.Module | None, img_size: int | None
) -> tuple[ModelFacts, nn.Module | None]:
    if isinstance(model, LoadedModel):
        module = model.module if module is None else module
        if img_size is None:
            return model.facts, module
        patch = model.facts.patch_size
        if img_size <= 0 or img_size % patch:
            raise TokenScopeError(
                f"input size {img_size} px is not a positive multiple of the patch size {patch}"
            )
        return model_facts(model.module, model.name, img_size), module
    if img_size is not None:
        raise TokenScopeError("img_size needs a loaded model; build the facts at that size")
    return model, module


def _target(full: float, gmacs: float | None, percent: float | None) -> float:
    if (gmacs is None) == (percent is None):
        raise TokenScopeError("give exactly one target: in GMACs or as a percentage of full")
    target = gmacs if gmacs is not None else full * percent / 100.0
    if not math.isfinite(target) or target <= 0:
        raise TokenScopeError(f"the target cost must be positive, got {target}")
    return target


def _tolerance(full: float, gmacs: float | None, percent: float) -> float:
    tolerance = gmacs if gmacs is not None else full * percent / 100.0
    if not math.isfinite(tolerance) or tolerance < 0:
        raise TokenScopeError(f"the tolerance must be zero or more, got {tolerance}")
    return tolerance


def solve_main(argv: list[str]) -> int:
    """``python -m analysis solve``: print each method's solved strength.

    Exit status: 0 when every method is within tolerance, 1 when some are not, 2 when
    the input is wrong (unknown model, bad schedule, no target).
    """
    parser = argparse.ArgumentParser(
        prog="python -m analysis solve",
        description=(
            "Set each method's strength so that all cost the same (analytic GMACs; no model runs)."
        ),
    )
    parser.add_argument("--model", default="default", help="timm ViT name, or 'default'")
    parser.add_argument(
        "--weights", default=None, help="'hub', 'random' (no download) or a checkpoint path"
    )
    parser.add_argument("--img-size", type=int, default=None, help="input size in pixels")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-gmacs", type=float, help="target cost in GMACs")
    target.add_argument("--target-percent", type=float, help="target as %% of the full model")
    parser.add_argument(
        "--schedule",
        action="append",
        required=True,
        metavar="SCHEDULE",
        help="a base schedule, one method each, e.g. 'evit:keep=0.7@3,6,9' (repeatable)",
    )
    tolerance = parser.add_mutually_exclusive_group()
    tolerance.add_argument("--tolerance-gmacs", type=float, help="tolerance in GMACs")
    tolerance.add_argument(
        "--tolerance-percent",
        type=float,
        default=DEFAULT_TOLERANCE_PERCENT,
        help="tolerance as %% of the full model (default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    from analysis.models import load_model

    try:
        model = load_model(args.model, weights=args.weights, img_size=args.img_size)
        results = match_cost(
            model,
            args.schedule,
            target_gmacs=args.target_gmacs,
            target_percent=args.target_percent,
            tolerance_gmacs=args.tolerance_gmacs,
            tolerance_percent=args.tolerance_percent,
            img_size=args.img_size,
        )
    except TokenScopeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([result.to_dict() for result in results], indent=2))
    else:
        print(format_table(results, model.name))
    return 0 if all(result.within_tolerance for result in results) else 1


def format_table(results: Sequence[MatchedSchedule], model_name: str = "") -> str:
    """A plain-text table of solved schedules, followed by any messages."""
    if not results:
        return "no schedules"
    first = results[0]
    lines = [
        f"{model_name + ': ' if model_name else ''}full {first.full_gmacs:.3f} GMACs; "
        f"target {first.target_gmacs:.3f} GMACs ({first.target_percent:.1f}%) "
        f"± {first.tolerance:.3f}",
        "",
    ]
    header = ("method", "param", "value", "GMACs", "% full", "error", "ok", "trained", "schedule")
    rows = [
        (
            r.label,
            r.param,
            _show(r.value),
            f"{r.gmacs:.3f}",
            f"{r.percent:.1f}",
            f"{r.error:+.3f}",
            "yes" if r.within_tolerance else "NO",
            "EXTRAPOLATED" if r.extrapolated else "",
            r.schedule.to_text(),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        lines.append(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    notes = [f"- {r.label}: {r.message}" for r in results if r.message]
    notes += [f"- {r.label}: extrapolated: {r.extrapolated}" for r in results if r.extrapolated]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


__all__ = [
    "DEFAULT_TOLERANCE_PERCENT",
    "MatchedSchedule",
    "format_table",
    "full_gmacs",
    "match_cost",
    "solve_main",
    "solve_schedule",
    "strength_param",
    "with_strength",
]
