"""Two to four schedules side by side: the records the Compare page passes between its
layers, and the computation behind its defaults, summary, agreement, grids and export.

No Streamlit here (the page keeps widgets and caches), so all of it is tested without
an app. Runs come in as :class:`RunResult` records; nothing here runs a model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from analysis.agreement import METRICS, AgreementMatrix, agreement_matrix, agreement_over_layers
from analysis.errors import ScheduleError
from analysis.flops import count_macs
from analysis.presets import MATCHED_PERCENTS
from analysis.records import RunResult
from analysis.reducers import REDUCERS
from analysis.schedule import Schedule, parse_schedule
from analysis.solver import MatchedSchedule, full_gmacs, match_cost

if TYPE_CHECKING:
    from PIL import Image

    from analysis.models import LoadedModel

LETTERS = "ABCD"
DEFAULT_COST = MATCHED_PERCENTS[0] / 100  # the columns open on the 75 % matched presets
VIEW_ALL_LAYERS = "depth"  # token depth sums up every layer: one picture, at no layer

Check = Callable[[str, "LoadedModel"], Schedule]  # parse and check a schedule, or raise


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Target:
    """The matched-cost settings (None on the page when matched mode is off)."""

    unit: str  # "percent" or "gmacs"
    value: float
    tolerance_percent: float


@dataclass(frozen=True)
class Column:
    """One method column: what was asked, what ran, and how it went."""

    index: int
    text: str
    schedule: Schedule | None = None  # what ran (the solved schedule in matched mode)
    matched: MatchedSchedule | None = None
    result: RunResult | None = None  # the page's image; None when the column failed
    seconds: float = 0.0  # wall time of its run
    device: str = ""
    error: str | None = None
    extrapolated: str = ""  # why a learned method runs outside its trained settings, or ""

    @property
    def letter(self) -> str:
        return LETTERS[self.index]

    @property
    def ok(self) -> bool:
        return self.result is not None

    @property
    def name(self) -> str:
        """Short name for tables and charts: ``A · ToMe``."""
        if self.schedule is None:
            return f"{self.letter} · (error)"
        labels = [REDUCERS[m].label if m in REDUCERS else m for m in self.schedule.methods()]
        return f"{self.letter} · {' + '.join(labels) if labels else 'full model'}"

    @property
    def ran(self) -> str:
        return self.schedule.to_text() if self.schedule is not None else self.text

    @property
    def key(self) -> str:
        """What ran, exactly (the JSON form keeps what the text form leaves out)."""
        return self.schedule.to_json() if self.schedule is not None else self.text

    @property
    def methods(self) -> list[str]:
        return self.schedule.methods() if self.schedule is not None else []


@dataclass(frozen=True)
class ComparedImages:
    """The images of the multi-image grid and of CKA; the page's image comes first."""

    keys: tuple[str, ...]
    labels: tuple[str, ...]
    images: tuple[Image.Image, ...] = ()

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class BatchJob:
    """One batched run over the image set: the full model (no column) or a column."""

    index: int | None  # the column's index; None for the full model
    schedule_json: str


@dataclass(frozen=True)
class BatchRuns:
    """The runs over the whole image set: the full model's and each good column's (or
    the column's error, when its batch failed)."""

    full: RunResult | None = None
    by_column: Mapping[int, RunResult | str] = field(default_factory=dict)

    def result(self, index: int) -> RunResult | None:
        found = self.by_column.get(index)
        return found if isinstance(found, RunResult) else None

    def note(self, index: int) -> str:
        """Why a column has no batch result: its error, or that it did not run."""
        found = self.by_column.get(index)
        return found if isinstance(found, str) else "not run"

    @property
    def set_size(self) -> int:
        return 0 if self.full is None else int(self.full.features.shape[0])


@dataclass(frozen=True)
class AgreementRuns:
    """The methods one agreement chart compares, and on which image (None: mean over
    the set, or the set's features for CKA)."""

    columns: tuple[Column, ...]
    runs: tuple[RunResult, ...]
    image_index: int | None

    @property
    def named(self) -> dict[str, RunResult]:
        return {c.name: r for c, r in zip(self.columns, self.runs, strict=True)}


@dataclass(frozen=True)
class GridPlan:
    """What a grid shows, without the runs; its signature keys the grid cache."""

    model_name: str
    model_key: tuple[str, ...]
    image_keys: tuple[str, ...]
    columns: tuple[tuple[str, str, str], ...]  # name, schedule that ran: text and JSON
    view: str
    segment_mode: str
    depth: int

    def signature(self, kind: str, *extra: Any) -> str:
        return json.dumps([kind, dataclasses.asdict(self), *extra])

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.columns]

    @property
    def headers(self) -> list[str]:
        """The images × methods grid's column labels: the input, then name and schedule."""
        return ["input", *(f"{name}\n{ran}" for name, ran, _ in self.columns)]


@dataclass(frozen=True)
class ColumnConfig:
    name: str
    schedule: str  # as the user wrote it
    ran: str | None  # what ran (the solved schedule in matched mode); None: it failed
    solved: dict[str, Any] | None = None  # {param, value, gmacs, within_tolerance}
    error: str | None = None


@dataclass(frozen=True)
class ComparisonConfig:
    """How a comparison was made: enough to draw its figures again (saved as JSON)."""

    model: dict[str, str]  # name, weights, device
    images: list[dict[str, str]]  # key and label of each image, in row order
    columns: list[ColumnConfig]
    layer: int
    view: str
    grid_layers: list[int] = field(default_factory=list)
    matched: dict[str, Any] | None = None  # unit, target, tolerance_percent
    metric: str = ""
    kind: str = "tokenscope.compare"
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ComparisonConfig:
        data = json.loads(text)
        columns = [ColumnConfig(**column) for column in data.pop("columns")]
        return cls(columns=columns, **data)


# --------------------------------------------------------------------------- columns


def default_texts(
    model: LoadedModel,
    choices: Mapping[str, str],
    explored: str | None = None,
    explored_schedule: Schedule | None = None,
) -> list[str]:
    """A schedule per column, in registry order: each method's preset whose analytic
    cost is nearest 75 % of the full model (its cost-matched preset where it has one), so
    that the defaults start comparable. The first column takes the Explore page's
    schedule (``explored``, already checked as ``explored_schedule``) when it reduces;
    the others then skip its methods."""
    facts = model.facts
    full = full_gmacs(facts, model.module)
    nearest: dict[str, tuple[float, str]] = {}
    for text in choices.values():
        schedule = parse_schedule(text, depth=facts.depth)
        if schedule.is_empty or len(schedule.methods()) != 1:
            continue
        cost = count_macs(facts, schedule.resolve(facts), model.module).gmacs
        distance = abs(cost / full - DEFAULT_COST)
        method = schedule.methods()[0]
        if method not in nearest or distance < nearest[method][0]:
            nearest[method] = (distance, text)
    texts = [nearest[name][1] for name in REDUCERS if name in nearest]
    if explored is not None and explored_schedule is not None and not explored_schedule.is_empty:
        same = set(explored_schedule.methods())
        texts = [explored, *(t for t in texts if not same & set(parse_schedule(t).methods()))]
    texts = texts or ["none"]
    return [texts[i % len(texts)] for i in range(len(LETTERS))]


def unavailable_methods(
    model: LoadedModel, choices: Mapping[str, str], check: Check
) -> dict[str, str]:
    """Registered methods with no usable preset on this model, label to reason.
    ``check`` is the app's schedule check, so the reason is the one a run would give."""
    offered: set[str] = set()
    for text in choices.values():
        offered.update(parse_schedule(text).methods())
    missing = {}
    for name, cls in REDUCERS.items():
        if name in offered:
            continue
        try:
            check(name, model)
            missing[cls.label] = "no preset fits this model"
        except ScheduleError as error:
            missing[cls.label] = str(error)
    return missing


def solve(model: LoadedModel, schedule: Schedule, target: Target) -> MatchedSchedule:
    """One column's strength, solved for the target (analytic, no model run)."""
    if schedule.is_empty:
        raise ScheduleError(
            "matched cost needs a reducer in this column: there is no strength to solve"
        )
    kwargs = (
        {"target_percent": target.value}
        if target.unit == "percent"
        else {"target_gmacs": target.value}
    )
    (matched,) = match_cost(model, [schedule], tolerance_percent=target.tolerance_percent, **kwargs)
    return matched


def batch_jobs(columns: Sequence[Column]) -> list[BatchJob]:
    """The runs over the image set: the full model first, then every column that ran."""
    full = BatchJob(None, Schedule().to_json())
    return [full, *(BatchJob(c.index, c.key) for c in columns if c.schedule is not None and c.ok)]


# --------------------------------------------------------------------------- agreement


def metric_or_default(name: object) -> str:
    """The chosen agreement metric, or kept-patch IoU for a name that is not one."""
    return name if isinstance(name, str) and name in METRICS else "iou"


def agreement_with_first(
    good: Sequence[Column], batch: BatchRuns, metric_name: str, layer: int
) -> list[float | None]:
    """Each column's agreement with the first good column, for the summary table: on
    the page's image at ``layer``, or (CKA) over the image set's features. None where
    a run is missing or the metric has no value."""
    metric = METRICS[metric_name]
    values: list[float | None] = []
    for column in good:
        if metric.needs_features:
            pair = (batch.result(good[0].index), batch.result(column.index))
            image_index = None
        else:
            pair, image_index = (good[0].result, column.result), 0
        value = None
        if pair[0] is not None and pair[1] is not None:
            runs = {"first": pair[0], "this": pair[1]}
            found = float(agreement_matrix(runs, metric_name, layer, image_index).matrix[0, 1])
            value = found if math.isfinite(found) else None
        values.append(value)
    return values


def agreement_runs(good: Sequence[Column], batch: BatchRuns, measure: str) -> AgreementRuns:
    """The runs the agreement charts compare: each column on the page's image
    (``measure="image"``), or those whose batch over the image set ran (``"set"``)."""
    if measure == "set":
        used = [c for c in good if batch.result(c.index) is not None]
        runs = [batch.result(c.index) for c in used]
        return AgreementRuns(tuple(used), tuple(r for r in runs if r is not None), None)
    return AgreementRuns(tuple(good), tuple(c.result for c in good if c.result is not None), 0)


def runs_matrix(runs: AgreementRuns, metric_name: str, layer: int) -> AgreementMatrix:
    """The method × method matrix; ``layer`` counts only for per-layer metrics."""
    at = layer if METRICS[metric_name].per_layer else None
    return agreement_matrix(runs.named, metric_name, at, runs.image_index)


def pair_indices(count: int, pairs: str) -> list[tuple[int, int]]:
    """Which pairs get a line: each against the first (``"first"``) or all pairs."""
    if pairs == "first":
        return [(0, j) for j in range(1, count)]
    return [(i, j) for i in range(count) for j in range(i + 1, count)]


def agreement_series(runs: AgreementRuns, metric_name: str, pairs: str) -> dict[str, list[float]]:
    """A per-layer metric over depth for each pair, named by letters (``A–B``)."""
    series = {}
    for i, j in pair_indices(len(runs.columns), pairs):
        name = f"{runs.columns[i].letter}–{runs.columns[j].letter}"
        series[name] = agreement_over_layers(
            runs.runs[i], runs.runs[j], metric_name, runs.image_index
        )
    return series


# --------------------------------------------------------------------------- grids


def default_grid_layers(depth: int) -> list[int]:
    """About five layers spread over the depth, the last included."""
    return sorted({*range(0, depth, max(1, depth // 4)), depth - 1})


def grid_layers(chosen: Sequence[int], layer: int) -> list[int]:
    """The methods × layers grid's layers: those chosen, else the shared layer."""
    return sorted(int(v) for v in chosen) or [layer]


def shown_layers(view: str, layers: Sequence[int], depth: int) -> list[int]:
    """Token depth is one picture over all layers; the other views show each layer."""
    return [depth - 1] if view == VIEW_ALL_LAYERS else list(layers)


def view_layer(view: str, layer: int) -> int | None:
    """The layer a view's picture depends on (None: the same at every layer)."""
    return None if view == VIEW_ALL_LAYERS else layer


def grid_plan(
    model_name: str,
    model_key: tuple[str, ...],
    images: ComparedImages,
    good: Sequence[Column],
    view: str,
    segment_mode: str,
    depth: int,
) -> GridPlan:
    return GridPlan(
        model_name,
        tuple(model_key),
        images.keys,
        tuple((c.name, c.ran, c.key) for c in good),
        view,
        segment_mode,
        depth,
    )


# --------------------------------------------------------------------------- export


def column_config(column: Column) -> ColumnConfig:
    """A column as the export records it: as written, as run, and what was solved."""
    solved = None
    if column.matched is not None:
        m = column.matched
        solved = {
            "param": m.param,
            "value": list(m.value) if isinstance(m.value, tuple) else m.value,
            "gmacs": m.gmacs,
            "target_gmacs": m.target_gmacs,
            "within_tolerance": m.within_tolerance,
            "message": m.message,
            "extrapolated": m.extrapolated,
        }
    return ColumnConfig(
        name=column.name,
        schedule=column.text,
        ran=column.ran if column.ok else None,
        solved=solved,
        error=column.error,
    )


def comparison_config(
    model: Mapping[str, str],
    images: ComparedImages,
    columns: Sequence[Column],
    *,
    layer: int,
    view: str,
    grid_layers: Sequence[int],
    target: Target | None,
    metric: str,
) -> ComparisonConfig:
    """The configuration JSON's record: every column, the failed ones included."""
    return ComparisonConfig(
        model=dict(model),
        images=[{"key": k, "label": v} for k, v in zip(images.keys, images.labels, strict=True)],
        columns=[column_config(c) for c in columns],
        layer=layer,
        view=view,
        grid_layers=list(grid_layers),
        matched=None if target is None else asdict(target),
        metric=metric,
    )
