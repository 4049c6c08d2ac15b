"""Trade-off curves drawn from hand-made points: traces, intervals, front, styles, CSV."""

from __future__ import annotations

import ast
import csv
import io
from pathlib import Path

import pytest

from analysis.curves import Estimate, Point, bootstrap
from viz import tradeoff
from viz.colors import method_color
from viz.tradeoff import (
    CUSTOMDATA_SCHEDULE,
    HIGHLIGHT_NAME,
    PARETO_NAME,
    PLANNED_NAME,
    REFERENCE_NAME,
    method_label,
    method_style,
    mini_tradeoff_figure,
    points_csv,
    points_table,
    tradeoff_figure,
)

FULL_GMACS = 4.6


def point(
    method: str,
    setting: str,
    gmacs: float,
    mean: float,
    spread: tuple[float, float] = (0.02, 0.01),
    *,
    loss: float | None = None,
    extrapolated: str = "",
    images_per_second: float | None = None,
    cached: bool = False,
) -> Point:
    """A point with an asymmetric interval (mean - spread[0], mean + spread[1])."""
    metrics = {"acc": Estimate(mean, mean - spread[0], mean + spread[1])}
    if loss is not None:
        metrics["loss"] = Estimate(loss, loss - 0.05, loss + 0.1)
    return Point(
        schedule=f"{method}:{setting}" if method != "none" else "none",
        method=method,
        setting=setting,
        gmacs=gmacs,
        percent=100.0 * gmacs / FULL_GMACS,
        metrics=metrics,
        num_images=64,
        seconds=1.5,
        cached=cached,
        extrapolated=extrapolated,
        images_per_second=images_per_second,
    )


FULL = point("none", "", FULL_GMACS, 0.80, (0.0, 0.0), loss=0.0, images_per_second=100.0)
# ToMe given out of order; Top-K's 2.0 and 3.5 are dominated by ToMe's 2.0 and 3.0, its 2.5
# is not (cheaper than ToMe 3.0, better than ToMe 2.0).
TOME = [
    point("tome", "r=4", 4.0, 0.79, loss=0.1, images_per_second=120.0),
    point("tome", "r=16", 2.0, 0.70, loss=0.5, images_per_second=220.0),
    point("tome", "r=8", 3.0, 0.76, loss=0.3, images_per_second=160.0),
]
TOPK = [
    point("topk", "keep=0.5", 2.0, 0.60, loss=0.9, images_per_second=230.0),
    point("topk", "keep=0.7", 3.5, 0.75, loss=0.35, images_per_second=None),
    point("topk", "keep=0.6", 2.5, 0.74, loss=0.4, images_per_second=190.0),
]
POINTS = [*TOME, *TOPK]


def trace(figure, name: str):
    matches = [t for t in figure.data if t.name == name]
    assert len(matches) == 1, f"expected one trace named {name!r}, got {len(matches)}"
    return matches[0]


def draw(points=POINTS, **kwargs):
    kwargs.setdefault("metric_label", "top-1 accuracy")
    kwargs.setdefault("higher_is_better", True)
    kwargs.setdefault("reference", FULL)
    return tradeoff_figure(points, kwargs.pop("metric", "acc"), **kwargs)


def method_traces(figure):
    return [t for t in figure.data if t.meta and "method" in t.meta]


# --------------------------------------------------------------------------- traces


def test_one_trace_per_method_sorted_by_x():
    figure = draw()
    assert [t.name for t in method_traces(figure)] == ["ToMe", "Top-K"]
    tome, topk = trace(figure, "ToMe"), trace(figure, "Top-K")
    assert list(tome.x) == [2.0, 3.0, 4.0]
    assert list(tome.y) == [0.70, 0.76, 0.79]
    assert list(topk.x) == [2.0, 2.5, 3.5]
    assert list(topk.y) == [0.60, 0.74, 0.75]
    assert "lines" in tome.mode and "markers" in tome.mode


def test_full_model_in_points_is_the_reference_not_a_method():
    figure = draw([*POINTS, FULL], reference=None)
    assert "Full model" not in [t.name for t in method_traces(figure)]
    star = trace(figure, REFERENCE_NAME)
    assert (list(star.x), list(star.y)) == ([FULL_GMACS], [0.80])


def test_error_bars_are_the_asymmetric_interval():
    values = [0.1, 0.2, 0.2, 0.3, 0.25, 0.15, 3.0]  # skewed: a lopsided interval
    estimate = bootstrap(values)
    assert estimate.high - estimate.mean != pytest.approx(estimate.mean - estimate.low)
    booted = Point("evit:keep=0.7", "evit", "keep=0.7", 3.0, 65.0, {"acc": estimate}, 12, 1.0)
    figure = draw([*POINTS, booted])
    for t in method_traces(figure):
        group = sorted(
            [p for p in [*POINTS, booted] if method_label(p.method) == t.name],
            key=lambda p: p.gmacs,
        )
        assert t.error_y.symmetric is False
        assert list(t.error_y.array) == pytest.approx(
            [p.metrics["acc"].high - p.metrics["acc"].mean for p in group]
        )
        assert list(t.error_y.arrayminus) == pytest.approx(
            [p.metrics["acc"].mean - p.metrics["acc"].low for p in group]
        )
    evit = trace(figure, "EViT")
    assert evit.error_y.array[0] == pytest.approx(estimate.high - estimate.mean)
    assert evit.error_y.arrayminus[0] == pytest.approx(estimate.mean - estimate.low)


# --------------------------------------------------------------------------- Pareto front


def test_pareto_front_holds_exactly_the_non_dominated_points():
    front = trace(draw(), PARETO_NAME)
    expected = [(2.0, 0.70), (2.5, 0.74), (3.0, 0.76), (4.0, 0.79), (FULL_GMACS, 0.80)]
    assert list(zip(front.x, front.y, strict=True)) == expected
    assert front.line.dash == "dash"
    assert front.line.shape == "hv"
    assert front.marker.symbol == "circle-open"
    assert {row[CUSTOMDATA_SCHEDULE] for row in front.customdata} == {
        "tome:r=16",
        "topk:keep=0.6",
        "tome:r=8",
        "tome:r=4",
        "none",
    }


def test_pareto_front_for_a_lower_is_better_metric():
    figure = draw(metric="loss", metric_label="loss", higher_is_better=False)
    front = trace(figure, PARETO_NAME)
    # Top-K 2.0 (0.9) is beaten by ToMe 2.0 (0.5); Top-K 3.5 (0.35) by ToMe 3.0 (0.3).
    expected = [(2.0, 0.5), (2.5, 0.4), (3.0, 0.3), (4.0, 0.1), (FULL_GMACS, 0.0)]
    assert list(zip(front.x, front.y, strict=True)) == expected
    assert "lower is better" in figure.layout.yaxis.title.text


def test_pareto_front_on_throughput_where_more_is_better():
    figure = draw(x="images_per_second")
    front = trace(figure, PARETO_NAME)
    # Faster is better now: Top-K 2.0 (230/s, 0.60) is the fastest, so it joins the front
    # although ToMe 2.0 beats it on GMACs; Top-K 3.5 has no measured throughput.
    expected = [
        (100.0, 0.80),
        (120.0, 0.79),
        (160.0, 0.76),
        (190.0, 0.74),
        (220.0, 0.70),
        (230.0, 0.60),
    ]
    assert list(zip(front.x, front.y, strict=True)) == expected
    assert front.line.shape == "vh"


# --------------------------------------------------------------------------- reference


def test_reference_star_and_dotted_line_at_full_model():
    figure = draw()
    star = trace(figure, REFERENCE_NAME)
    assert (list(star.x), list(star.y)) == ([FULL_GMACS], [0.80])
    assert star.marker.symbol == "star"
    lines = [s for s in figure.layout.shapes if s.y0 == s.y1 == 0.80]
    assert len(lines) == 1 and lines[0].line.dash == "dot"
    assert lines[0].xref == "x domain"


def test_reference_on_percent_axis_sits_at_100():
    star = trace(draw(x="percent"), REFERENCE_NAME)
    assert star.x[0] == pytest.approx(100.0)


# --------------------------------------------------------------------------- encodings


def test_extrapolated_points_have_open_markers_and_say_why():
    reason = "r=24 outside trained r=4..16"
    odd = point("dtem", "r=24", 1.5, 0.62, extrapolated=reason)
    inside = [point("dtem", "r=8", 3.1, 0.77), point("dtem", "r=16", 2.1, 0.71)]
    figure = draw([*POINTS, odd, *inside])
    dtem = trace(figure, "DTEM")
    symbol = method_style("dtem").symbol
    assert list(dtem.x) == [1.5, 2.1, 3.1]
    assert list(dtem.marker.symbol) == [f"{symbol}-open", symbol, symbol]
    assert f"extrapolated: {reason}" in dtem.text[0]
    assert "extrapolated" not in dtem.text[1]
    for t in method_traces(figure):
        if t.name != "DTEM":
            assert not any(s.endswith("-open") for s in t.marker.symbol)


def test_every_method_has_its_own_colour_symbol_and_dash():
    methods = [m for m in tradeoff.METHOD_LABELS if m != "none"]
    styles = [method_style(m) for m in methods]
    for part in ("color", "symbol", "dash"):
        values = [getattr(s, part) for s in styles]
        assert len(set(values)) == len(values), part
    assert "star" not in {s.symbol for s in styles}  # kept for the full model
    points = [point(m, "a", 2.0 + i / 10, 0.7) for i, m in enumerate(methods)]
    figure = draw(points)
    drawn = [(t.line.color, t.marker.symbol[0], t.line.dash) for t in method_traces(figure)]
    assert len(drawn) == len(methods)
    for part in range(3):
        assert len({d[part] for d in drawn}) == len(methods)


def test_method_colour_matches_the_shared_palette_and_is_stable():
    assert method_style("tome").color == method_color("tome") == "#e8590c"
    assert method_color("none") == method_color("NONE")
    assert method_color("someone-new") == method_color("someone-new")
    assert method_style("someone-new").color == method_color("someone-new")


def test_customdata_carries_the_schedule_text():
    figure = draw(highlight=TOME[2])
    tome = trace(figure, "ToMe")
    assert [row[CUSTOMDATA_SCHEDULE] for row in tome.customdata] == [
        "tome:r=16",
        "tome:r=8",
        "tome:r=4",
    ]
    assert [row[tradeoff.CUSTOMDATA_METHOD] for row in tome.customdata] == ["tome"] * 3
    assert trace(figure, REFERENCE_NAME).customdata[0][CUSTOMDATA_SCHEDULE] == "none"
    assert trace(figure, HIGHLIGHT_NAME).customdata[0][CUSTOMDATA_SCHEDULE] == "tome:r=8"


def test_hover_tells_the_whole_point():
    cached = point("tome", "r=8", 3.0, 0.76, cached=True, images_per_second=160.0)
    text = trace(draw([cached]), "ToMe").text[0]
    for part in (
        "ToMe",
        "r=8",
        "schedule: tome:r=8",
        "3.000 GMACs",
        "65.2 % of full",
        "acc: 0.76 [0.74, 0.77]",
        "64 images",
        "cached",
        "160.0 images/s",
    ):
        assert part in text, part
    fresh = trace(draw([TOME[0]]), "ToMe").text[0]
    assert "computed" in fresh and "cached" not in fresh


# --------------------------------------------------------------------------- axes


def test_percent_axis_uses_the_percent_field():
    figure = draw(x="percent")
    tome = trace(figure, "ToMe")
    assert list(tome.x) == pytest.approx([100 * g / FULL_GMACS for g in (2.0, 3.0, 4.0)])
    assert figure.layout.xaxis.title.text == "% of full GMACs"


def test_throughput_axis_uses_measured_images_per_second():
    figure = draw(x="images_per_second")
    assert figure.layout.xaxis.title.text == "images/s (measured)"
    assert list(trace(figure, "ToMe").x) == [120.0, 160.0, 220.0]
    assert list(trace(figure, "ToMe").y) == [0.79, 0.76, 0.70]
    # Top-K 3.5 has no measured throughput, so it cannot be placed.
    assert list(trace(figure, "Top-K").x) == [190.0, 230.0]


def test_titles_and_legend():
    figure = draw()
    assert figure.layout.xaxis.title.text == "GMACs"
    assert figure.layout.yaxis.title.text.startswith("top-1 accuracy")
    assert figure.layout.legend.orientation == "h"
    assert figure.layout.height == 420
    with pytest.raises(ValueError, match="x must be"):
        draw(x="seconds")


# --------------------------------------------------------------------------- extras


def test_planned_points_sit_faint_and_hollow_along_the_bottom():
    planned = [("tome", 1.5), ("evit", 2.2)]
    figure = draw([], reference=None, planned=planned)
    ghost = trace(figure, PLANNED_NAME)
    assert list(ghost.x) == [1.5, 2.2]
    assert ghost.yaxis == "y2"
    assert figure.layout.yaxis2.range == (0, 1) and figure.layout.yaxis2.visible is False
    assert all(s.endswith("-open") for s in ghost.marker.symbol)
    assert list(ghost.marker.color) == [method_color("tome"), method_color("evit")]
    assert ghost.opacity < 1
    assert not method_traces(figure)
    assert "yaxis2" not in draw().layout.to_plotly_json()


def test_highlight_is_large_and_black_edged():
    figure = draw(highlight=TOPK[2])
    here = trace(figure, HIGHLIGHT_NAME)
    assert (list(here.x), list(here.y)) == ([2.5], [0.74])
    assert here.marker.line.color in ("#111111", "black", "#000000")
    assert here.marker.line.width >= 2
    assert here.marker.size > trace(figure, "Top-K").marker.size
    assert figure.data[-1] is here  # drawn on top


def test_mini_figure_keeps_the_encodings():
    big = draw(planned=[("tome", 1.0)], highlight=TOME[0])
    small = mini_tradeoff_figure(
        POINTS,
        "acc",
        metric_label="top-1 accuracy",
        higher_is_better=True,
        reference=FULL,
        planned=[("tome", 1.0)],
        highlight=TOME[0],
    )
    assert small.layout.height == 260
    assert [t.name for t in small.data] == [t.name for t in big.data]
    for a, b in zip(small.data, big.data, strict=True):
        assert list(a.x) == list(b.x) and list(a.y) == list(b.y)
        assert a.marker.symbol == b.marker.symbol and a.line.dash == b.line.dash
    assert not small.layout.legend.title.text
    small.to_json()  # every property validates and serialises


# --------------------------------------------------------------------------- tables


def test_points_table_rows():
    rows = points_table([TOME[0]], ["acc", "missing"])
    assert rows[0]["method"] == "tome" and rows[0]["setting"] == "r=4"
    assert rows[0]["acc_mean"] == 0.79 and rows[0]["acc_low"] == 0.77
    assert rows[0]["acc_high"] == 0.8
    assert rows[0]["missing_mean"] is None
    assert list(rows[0]) == [
        "method",
        "setting",
        "schedule",
        "gmacs",
        "percent",
        "acc_mean",
        "acc_low",
        "acc_high",
        "missing_mean",
        "missing_low",
        "missing_high",
        "num_images",
        "seconds",
        "cached",
        "extrapolated",
        "images_per_second",
    ]


def test_csv_round_trips_the_numbers():
    odd = point(
        "dtem", "r=24", 1.5, 0.1 + 0.2, extrapolated='outside, "trained" range', cached=True
    )
    points = [*POINTS, odd]
    text = points_csv(points, ["acc", "loss"])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(points)
    for row, p in zip(rows, points, strict=True):
        assert row["schedule"] == p.schedule and row["method"] == p.method
        assert float(row["gmacs"]) == p.gmacs and float(row["percent"]) == p.percent
        for stat in ("mean", "low", "high"):
            assert float(row[f"acc_{stat}"]) == getattr(p.metrics["acc"], stat)
        if "loss" in p.metrics:
            assert float(row["loss_low"]) == p.metrics["loss"].low
        else:
            assert row["loss_mean"] == ""
        assert int(row["num_images"]) == p.num_images
        assert float(row["seconds"]) == p.seconds
        assert row["cached"] == str(p.cached)
        assert row["extrapolated"] == p.extrapolated
        ips = row["images_per_second"]
        assert (float(ips) if ips else None) == p.images_per_second
    header = next(csv.reader(io.StringIO(points_csv([], ["acc"]))))
    assert header[:6] == ["method", "setting", "schedule", "gmacs", "percent", "acc_mean"]


# --------------------------------------------------------------------------- labels


def test_method_labels():
    assert method_label("tome") == "ToMe"
    assert method_label("topk") == "Top-K"
    assert method_label("none") == "Full model"
    assert method_label("my-method") == "my-method"


def test_labels_match_the_reducers_own():
    """The table in viz copies each reducer's ``label``; this keeps the two in step."""
    from analysis.reducers import REDUCERS

    for name, cls in REDUCERS.items():
        assert method_label(name) == cls.label, name
        assert name in tradeoff.METHOD_LABELS, name
        assert method_color(name) != method_color("none"), name


def test_tradeoff_reads_records_only():
    """viz.tradeoff draws records: it must not reach the engine, the reducers or torch."""
    source = Path(tradeoff.__file__).read_text()
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module or "")
    assert {m for m in modules if m.startswith("analysis")} == {"analysis.curves"}
    assert not {m for m in modules if m.split(".")[0] in ("torch", "timm", "streamlit")}
