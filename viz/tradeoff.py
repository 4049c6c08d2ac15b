"""Trade-off curves: a metric against cost, one line per method, with intervals and a front.

Draws the ``analysis.curves`` records (``Point``, ``Estimate``) and nothing else: no model
runs here, so the same code serves the live sweep page, Explore's side panel and, later,
the print figures. Every method keeps one colour, marker symbol and dash wherever it is
drawn (``method_style``), so the curves stay readable in greyscale.

Conventions a page relies on:
  * each drawn point's ``customdata`` row is ``[schedule, method, setting]``; the schedule
    text is at index ``CUSTOMDATA_SCHEDULE`` (0), ready to open the point in Explore;
  * method traces are named by ``method_label`` and carry ``meta={"method": name}``;
  * the other traces are named ``PARETO_NAME``, ``REFERENCE_NAME``, ``PLANNED_NAME`` and
    ``HIGHLIGHT_NAME``.
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go

from analysis.curves import Point, pareto_front
from viz.colors import FULL_MODEL_COLOR, METHOD_PALETTE, method_color

X_TITLES: dict[str, str] = {
    "gmacs": "GMACs",
    "percent": "% of full GMACs",
    "images_per_second": "images/s (measured)",
}
CUSTOMDATA_SCHEDULE = 0
CUSTOMDATA_METHOD = 1
CUSTOMDATA_SETTING = 2
PARETO_NAME = "Pareto front"
REFERENCE_NAME = "Full model"
PLANNED_NAME = "planned (not run yet)"
HIGHLIGHT_NAME = "you are here"
PARETO_COLOR = "#495057"
INK = "#111111"

# The UI names of the registered reducers. ``analysis.reducers`` holds the source of truth
# (each class's ``label``), but it imports torch, and this module draws records only; a
# test (tests/test_viz_tradeoff.py) fails if this copy and the reducers' labels diverge.
METHOD_LABELS: dict[str, str] = {
    "none": "Full model",
    "tome": "ToMe",
    "evit": "EViT",
    "topk": "Top-K",
    "random": "Random",
    "dtem": "DTEM",
    "patchmerger": "PatchMerger",
    "cropr": "Token Cropr",
    "ltm": "LTM",
    "mstm": "MSTM",
}
# Symbols and dashes in the palette's method order; each has an "-open" variant for
# extrapolated points. The star is kept for the full model.
_SYMBOLS = (
    "circle",
    "square",
    "diamond",
    "triangle-up",
    "triangle-down",
    "pentagon",
    "hexagon",
    "cross",
    "x",
)
_DASHES = (
    "solid",
    "dash",
    "dot",
    "dashdot",
    "longdash",
    "longdashdot",
    "8px,3px,2px,3px,2px,3px",
    "2px,6px",
    "14px,4px,4px,4px",
)


@dataclass(frozen=True)
class MethodStyle:
    """How one method is drawn: colour, marker symbol and line dash, each distinct."""

    color: str
    symbol: str
    dash: str


def method_label(method: str) -> str:
    """The readable name of a registry method name; an unknown name is shown as given."""
    return METHOD_LABELS.get(method.strip().lower(), method)


def method_style(method: str) -> MethodStyle:
    """The fixed style of a method, so it looks the same on every chart and in greyscale.

    Registered methods each get their own colour, symbol and dash (in palette order); an
    unknown name borrows the style at its colour's palette slot.
    """
    key = method.strip().lower()
    color = method_color(key)
    order = list(METHOD_PALETTE)
    palette = list(METHOD_PALETTE.values())
    if key in order:
        index = order.index(key)
    elif color in palette:
        index = palette.index(color)
    else:  # the full model: a symbol of its own would be a star, drawn elsewhere
        return MethodStyle(color, "star", "solid")
    return MethodStyle(color, _SYMBOLS[index % len(_SYMBOLS)], _DASHES[index % len(_DASHES)])


def tradeoff_figure(
    points: Sequence[Point],
    metric: str,
    *,
    metric_label: str,
    higher_is_better: bool,
    x: str = "gmacs",
    reference: Point | None = None,
    planned: Sequence[tuple[str, float]] = (),
    highlight: Point | None = None,
    height: int = 420,
) -> go.Figure:
    """``metric`` against cost: one line per method, 95 % error bars, the Pareto front.

    Args:
        points: sweep points of any methods; one with method "none" is taken as the full
            model when ``reference`` is not given. Points lacking ``metric`` or the x field
            (unmeasured throughput) cannot be placed and are left out.
        metric: the key into ``Point.metrics`` to draw.
        metric_label: the y-axis title.
        higher_is_better: the metric's direction, which decides the Pareto front.
        x: "gmacs", "percent" or "images_per_second".
        reference: the full model's point: a star and a dotted line at its value.
        planned: ``(method, x)`` pairs for points still to run, in this figure's x units;
            drawn as faint hollow markers along the bottom, so a live page shows where
            the curve will fill in.
        highlight: the current schedule's point (Explore's "you are here").
        height: figure height in pixels.
    """
    return _figure(
        points,
        metric,
        metric_label=metric_label,
        higher_is_better=higher_is_better,
        x=x,
        reference=reference,
        planned=planned,
        highlight=highlight,
        height=height,
        compact=False,
    )


def mini_tradeoff_figure(
    points: Sequence[Point],
    metric: str,
    *,
    metric_label: str,
    higher_is_better: bool,
    x: str = "gmacs",
    reference: Point | None = None,
    planned: Sequence[tuple[str, float]] = (),
    highlight: Point | None = None,
    height: int = 260,
) -> go.Figure:
    """``tradeoff_figure`` for a side panel: same encodings, smaller marks and margins."""
    return _figure(
        points,
        metric,
        metric_label=metric_label,
        higher_is_better=higher_is_better,
        x=x,
        reference=reference,
        planned=planned,
        highlight=highlight,
        height=height,
        compact=True,
    )


def points_table(points: Sequence[Point], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per point for a table or CSV; a metric a point lacks gives None cells."""
    rows = []
    for point in points:
        row: dict[str, Any] = {
            "method": point.method,
            "setting": point.setting,
            "schedule": point.schedule,
            "gmacs": point.gmacs,
            "percent": point.percent,
        }
        for name in metrics:
            estimate = point.metrics.get(name)
            row[f"{name}_mean"] = estimate.mean if estimate else None
            row[f"{name}_low"] = estimate.low if estimate else None
            row[f"{name}_high"] = estimate.high if estimate else None
        row.update(
            num_images=point.num_images,
            seconds=point.seconds,
            cached=point.cached,
            extrapolated=point.extrapolated,
            images_per_second=point.images_per_second,
        )
        rows.append(row)
    return rows


def points_csv(points: Sequence[Point], metrics: Sequence[str]) -> str:
    """CSV text of ``points_table``; floats are written in full (repr), None as empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(metrics), lineterminator="\n")
    writer.writeheader()
    writer.writerows(points_table(points, metrics))
    return buffer.getvalue()


# --------------------------------------------------------------------------- drawing


def _figure(
    points: Sequence[Point],
    metric: str,
    *,
    metric_label: str,
    higher_is_better: bool,
    x: str,
    reference: Point | None,
    planned: Sequence[tuple[str, float]],
    highlight: Point | None,
    height: int,
    compact: bool,
) -> go.Figure:
    if x not in X_TITLES:
        raise ValueError(f"x must be one of {', '.join(X_TITLES)}, not '{x}'")
    if reference is None:
        reference = next((p for p in points if p.method == "none"), None)
    reduced = [p for p in points if p.method != "none" and _placeable(p, metric, x)]
    size = 6 if compact else 8
    figure = go.Figure()

    front_pool = [*reduced, reference] if reference is not None else reduced
    front = pareto_front(front_pool, metric, x=x, higher_is_better=higher_is_better)
    if front:
        figure.add_trace(_pareto_trace(front, metric, x, size))

    by_method: dict[str, list[Point]] = {}
    for point in reduced:
        by_method.setdefault(point.method, []).append(point)
    for method, group in by_method.items():
        figure.add_trace(_method_trace(method, group, metric, x, size, compact))

    if reference is not None and metric in reference.metrics:
        value = reference.metrics[metric].mean
        figure.add_hline(y=value, line={"color": FULL_MODEL_COLOR, "dash": "dot", "width": 1})
        if _x(reference, x) is not None:
            figure.add_trace(_reference_trace(reference, metric, x, size))

    if planned:
        figure.add_trace(_planned_trace(planned, x, size))
    if highlight is not None and _placeable(highlight, metric, x):
        figure.add_trace(_highlight_trace(highlight, metric, x, size))

    return _layout(figure, metric_label, higher_is_better, x, height, compact, bool(planned))


def _method_trace(
    method: str, group: list[Point], metric: str, x: str, size: int, compact: bool
) -> go.Scatter:
    style = method_style(method)
    group = sorted(group, key=lambda p: _x(p, x))
    estimates = [p.metrics[metric] for p in group]
    symbols = [f"{style.symbol}-open" if p.extrapolated else style.symbol for p in group]
    return go.Scatter(
        x=[_x(p, x) for p in group],
        y=[e.mean for e in estimates],
        error_y={
            "type": "data",
            "symmetric": False,
            "array": [e.high - e.mean for e in estimates],
            "arrayminus": [e.mean - e.low for e in estimates],
            "color": style.color,
            "thickness": 1.0 if compact else 1.3,
            "width": 2 if compact else 4,
        },
        name=method_label(method),
        legendgroup=method,
        meta={"method": method},
        mode="lines+markers",
        line={"color": style.color, "dash": style.dash, "width": 1.5 if compact else 2},
        marker={
            "symbol": symbols,
            "size": size + 2,
            "color": style.color,
            "line": {"color": style.color, "width": 1.5},
        },
        customdata=[_customdata(p) for p in group],
        text=[_hover(p, metric) for p in group],
        hovertemplate="%{text}<extra></extra>",
    )


def _pareto_trace(front: list[Point], metric: str, x: str, size: int) -> go.Scatter:
    # The attainable region is a staircase: with cheaper-is-better x the best value at a
    # cost between two front points is the cheaper one's (go across, then up); with
    # throughput, where more is better, it is the faster one's (go up, then across).
    shape = "vh" if x == "images_per_second" else "hv"
    return go.Scatter(
        x=[_x(p, x) for p in front],
        y=[p.metrics[metric].mean for p in front],
        name=PARETO_NAME,
        mode="lines+markers",
        line={"color": PARETO_COLOR, "dash": "dash", "width": 1, "shape": shape},
        marker={
            "symbol": "circle-open",
            "size": size + 10,
            "color": PARETO_COLOR,
            "line": {"width": 1.5, "color": PARETO_COLOR},
        },
        customdata=[_customdata(p) for p in front],
        hoverinfo="skip",
    )


def _reference_trace(reference: Point, metric: str, x: str, size: int) -> go.Scatter:
    return go.Scatter(
        x=[_x(reference, x)],
        y=[reference.metrics[metric].mean],
        name=REFERENCE_NAME,
        mode="markers",
        marker={
            "symbol": "star",
            "size": size + 8,
            "color": FULL_MODEL_COLOR,
            "line": {"color": INK, "width": 1},
        },
        customdata=[_customdata(reference)],
        text=[_hover(reference, metric)],
        hovertemplate="%{text}<extra></extra>",
    )


def _planned_trace(planned: Sequence[tuple[str, float]], x: str, size: int) -> go.Scatter:
    # On a hidden overlaid axis fixed to [0, 1], so they sit along the bottom whatever the
    # metric's range is, even before the first point has arrived.
    styles = [method_style(method) for method, _ in planned]
    unit = X_TITLES[x]
    return go.Scatter(
        x=[float(value) for _, value in planned],
        y=[0.03] * len(planned),
        yaxis="y2",
        name=PLANNED_NAME,
        mode="markers",
        opacity=0.45,
        marker={
            "symbol": [f"{s.symbol}-open" for s in styles],
            "size": size + 2,
            "color": [s.color for s in styles],
        },
        text=[f"planned: {method_label(m)} at {v:.4g} {unit}" for m, v in planned],
        hovertemplate="%{text}<extra></extra>",
    )


def _highlight_trace(point: Point, metric: str, x: str, size: int) -> go.Scatter:
    style = method_style(point.method)
    return go.Scatter(
        x=[_x(point, x)],
        y=[point.metrics[metric].mean],
        name=HIGHLIGHT_NAME,
        mode="markers",
        marker={
            "symbol": style.symbol,
            "size": size + 12,
            "color": style.color,
            "line": {"color": INK, "width": 2.5},
        },
        customdata=[_customdata(point)],
        text=[f"<b>you are here</b><br>{_hover(point, metric)}"],
        hovertemplate="%{text}<extra></extra>",
    )


def _layout(
    figure: go.Figure,
    metric_label: str,
    higher_is_better: bool,
    x: str,
    height: int,
    compact: bool,
    planned: bool,
) -> go.Figure:
    direction = "higher is better" if higher_is_better else "lower is better"
    font = 10 if compact else 12
    figure.update_layout(
        height=height,
        template="plotly_white",
        margin={"l": 10, "r": 10, "t": 30 if compact else 40, "b": 10},
        font={"size": font},
        legend={
            "orientation": "h",
            "yanchor": "bottom",
            "y": 1.02,
            "xanchor": "left",
            "x": 0,
            "title": {"text": ""},
            "font": {"size": font - 1 if compact else font},
        },
        hovermode="closest",
    )
    figure.update_xaxes(title_text=X_TITLES[x])
    figure.update_yaxes(title_text=f"{metric_label} ({direction})")
    if planned:
        figure.update_layout(
            yaxis2={"overlaying": "y", "range": [0, 1], "visible": False, "fixedrange": True}
        )
    return figure


# --------------------------------------------------------------------------- helpers


def _hover(point: Point, metric: str) -> str:
    estimate = point.metrics[metric]
    lines = [f"<b>{html.escape(method_label(point.method))}</b> {html.escape(point.setting)}"]
    lines.append(f"schedule: {html.escape(point.schedule)}")
    lines.append(f"{point.gmacs:.3f} GMACs ({point.percent:.1f} % of full)")
    lines.append(
        f"{html.escape(metric)}: {estimate.mean:.4g} [{estimate.low:.4g}, {estimate.high:.4g}]"
    )
    images = f"{point.num_images} image{'s' if point.num_images != 1 else ''}"
    lines.append(f"{images} · {'cached' if point.cached else 'computed'}")
    if point.images_per_second is not None:
        lines.append(f"{point.images_per_second:.1f} images/s (measured)")
    if point.extrapolated:
        lines.append(f"extrapolated: {html.escape(point.extrapolated)}")
    return "<br>".join(lines)


def _customdata(point: Point) -> list[str]:
    return [point.schedule, point.method, point.setting]


def _placeable(point: Point, metric: str, x: str) -> bool:
    return metric in point.metrics and _x(point, x) is not None


def _x(point: Point, x: str) -> float | None:
    value = getattr(point, x)
    if value is None or value != value:  # None or NaN: cannot be placed
        return None
    return float(value)


def _columns(metrics: Sequence[str]) -> list[str]:
    stats = [f"{name}_{stat}" for name in metrics for stat in ("mean", "low", "high")]
    head = ["method", "setting", "schedule", "gmacs", "percent"]
    tail = ["num_images", "seconds", "cached", "extrapolated", "images_per_second"]
    return [*head, *stats, *tail]


__all__ = [
    "CUSTOMDATA_METHOD",
    "CUSTOMDATA_SCHEDULE",
    "CUSTOMDATA_SETTING",
    "HIGHLIGHT_NAME",
    "METHOD_LABELS",
    "PARETO_NAME",
    "PLANNED_NAME",
    "REFERENCE_NAME",
    "X_TITLES",
    "MethodStyle",
    "method_label",
    "method_style",
    "mini_tradeoff_figure",
    "points_csv",
    "points_table",
    "tradeoff_figure",
]
