"""Trade-off curve records: estimates with intervals, sweep points, and Pareto fronts.

These are the small typed records that cross from the sweep core (``analysis.sweep``) to
the drawing code (``viz.tradeoff``), the CLI's JSON and the cache. They hold numbers
only (no tensors), so this module imports numpy and nothing heavier.

Intervals are percentile bootstraps over images (``BOOTSTRAP_METHOD``) with a fixed seed:
the same per-image values always give the same interval, whichever process computed them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
BOOTSTRAP_METHOD = f"bootstrap-95 (percentile, {BOOTSTRAP_RESAMPLES} resamples over images)"


@dataclass(frozen=True)
class Estimate:
    """A metric's mean over images with a 95 % interval, and how the interval was made."""

    mean: float
    low: float
    high: float
    method: str = BOOTSTRAP_METHOD

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, data: dict[str, Any], method: str = BOOTSTRAP_METHOD) -> Estimate:
        return cls(float(data["mean"]), float(data["low"]), float(data["high"]), method)


def bootstrap(values: Sequence[float] | np.ndarray, seed: int = BOOTSTRAP_SEED) -> Estimate:
    """Mean and percentile-bootstrap 95 % interval of per-image ``values``.

    One image gives a zero-width interval at its value (nothing to resample); NaN values
    are refused, since a silent NaN would hide a broken method.
    """
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError("no values to summarise")
    if not np.all(np.isfinite(array)):
        raise ValueError("per-image values must be finite")
    mean = float(array.mean())
    if array.size == 1 or np.all(array == array[0]):
        return Estimate(mean, mean, mean)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, array.size, size=(BOOTSTRAP_RESAMPLES, array.size))
    means = array[picks].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Estimate(mean, float(min(low, mean)), float(max(high, mean)))


@dataclass(frozen=True)
class Point:
    """One schedule's place on the trade-off plot.

    ``method`` is the registry name of the one reducer the schedule runs ("none" for the
    full model); ``setting`` says which knob value made it ("r=8", "layer 5", "60 %").
    ``extrapolated`` is empty, or says why a learned method runs outside the settings its
    weights were trained at. ``images_per_second`` is filled only when throughput was
    measured.
    """

    schedule: str
    method: str
    setting: str
    gmacs: float
    percent: float  # of the full model's GMACs
    metrics: dict[str, Estimate]
    num_images: int
    seconds: float
    cached: bool = False
    extrapolated: str = ""
    images_per_second: float | None = None
    values: dict[str, list[float]] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self, with_values: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schedule": self.schedule,
            "method": self.method,
            "setting": self.setting,
            "gmacs": self.gmacs,
            "percent": self.percent,
            "metrics": {name: est.to_dict() for name, est in self.metrics.items()},
            "interval": next(iter(self.metrics.values())).method if self.metrics else "",
            "num_images": self.num_images,
            "seconds": self.seconds,
            "cached": self.cached,
            "extrapolated": self.extrapolated,
            "images_per_second": self.images_per_second,
        }
        if with_values:
            data["values"] = self.values
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Point:
        method = data.get("interval") or BOOTSTRAP_METHOD
        return cls(
            schedule=data["schedule"],
            method=data["method"],
            setting=data.get("setting", ""),
            gmacs=float(data["gmacs"]),
            percent=float(data["percent"]),
            metrics={k: Estimate.from_dict(v, method) for k, v in data["metrics"].items()},
            num_images=int(data["num_images"]),
            seconds=float(data["seconds"]),
            cached=bool(data.get("cached", False)),
            extrapolated=data.get("extrapolated", ""),
            images_per_second=data.get("images_per_second"),
            values={k: list(map(float, v)) for k, v in data.get("values", {}).items()},
        )


def pareto_front(
    points: Sequence[Point], metric: str, *, x: str = "gmacs", higher_is_better: bool = True
) -> list[Point]:
    """The points no other point beats on both cost and ``metric``, sorted by x.

    ``x`` is "gmacs" or "percent" (lower is better) or "images_per_second" (higher is
    better). A point dominates another when it is at least as good on both axes and
    strictly better on one.
    """
    usable = [p for p in points if metric in p.metrics and _x(p, x) is not None]
    x_higher = x == "images_per_second"

    def better_or_equal(a: Point, b: Point) -> tuple[bool, bool]:
        ax, bx = _x(a, x), _x(b, x)
        ay, by = a.metrics[metric].mean, b.metrics[metric].mean
        cost_ok = ax >= bx if x_higher else ax <= bx
        cost_strict = ax > bx if x_higher else ax < bx
        value_ok = ay >= by if higher_is_better else ay <= by
        value_strict = ay > by if higher_is_better else ay < by
        return cost_ok and value_ok, cost_strict or value_strict

    front = []
    for candidate in usable:
        dominated = False
        for other in usable:
            if other is candidate:
                continue
            at_least, strictly = better_or_equal(other, candidate)
            if at_least and strictly:
                dominated = True
                break
        if not dominated:
            front.append(candidate)
    return sorted(front, key=lambda p: _x(p, x))


def _x(point: Point, x: str) -> float | None:
    value = getattr(point, x)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


__all__ = [
    "BOOTSTRAP_METHOD",
    "Estimate",
    "Point",
    "bootstrap",
    "pareto_front",
]
