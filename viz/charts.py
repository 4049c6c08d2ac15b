"""Plotly charts of a run: tokens and GMACs per layer, and the top classes."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from analysis.flops import CostReport
from viz.summary import ClassScore

FULL_COLOR = "#9aa0a6"
REDUCED_COLOR = "#e8590c"
MARKER_COLOR = "rgba(30, 30, 30, 0.35)"


def tokens_chart(
    reduced: CostReport, full: CostReport, layer: int | None = None, *, height: int = 300
) -> go.Figure:
    """Tokens leaving each layer, reduced against full, with the selected layer marked."""
    layers = list(range(len(reduced.layers)))
    figure = go.Figure()
    figure.add_trace(
        go.Scatter(
            x=layers,
            y=full.tokens,
            name="full",
            mode="lines+markers",
            line={"color": FULL_COLOR, "dash": "dash"},
        )
    )
    figure.add_trace(
        go.Scatter(
            x=layers,
            y=reduced.tokens,
            name="reduced",
            mode="lines+markers",
            line={"color": REDUCED_COLOR, "width": 3},
        )
    )
    _mark_layer(figure, layer)
    return _layout(figure, "Tokens per layer", "tokens after the layer", height)


def gmacs_chart(
    reduced: CostReport, full: CostReport, layer: int | None = None, *, height: int = 300
) -> go.Figure:
    """GMACs spent in each layer (block plus reducer), reduced against full."""
    layers = list(range(len(reduced.layers)))
    figure = go.Figure()
    figure.add_trace(
        go.Bar(x=layers, y=full.gmacs_per_layer(), name="full", marker_color=FULL_COLOR)
    )
    figure.add_trace(
        go.Bar(x=layers, y=reduced.gmacs_per_layer(), name="reduced", marker_color=REDUCED_COLOR)
    )
    figure.update_layout(barmode="group", bargap=0.2)
    _mark_layer(figure, layer)
    title = f"GMACs per layer: {reduced.gmacs:.2f} of {full.gmacs:.2f} in all"
    return _layout(figure, title, "GMACs", height)


def topk_chart(
    full: Sequence[ClassScore], reduced: Sequence[ClassScore], *, height: int = 300
) -> go.Figure:
    """Probabilities of the full model's top classes, under the full and reduced model."""
    names = [f"{score.short_name} ({score.index})" for score in full][::-1]
    figure = go.Figure()
    figure.add_trace(
        go.Bar(
            y=names,
            x=[score.probability for score in full][::-1],
            name="full",
            orientation="h",
            marker_color=FULL_COLOR,
        )
    )
    figure.add_trace(
        go.Bar(
            y=names,
            x=[score.probability for score in reduced][::-1],
            name="reduced",
            orientation="h",
            marker_color=REDUCED_COLOR,
        )
    )
    figure.update_layout(barmode="group")
    figure = _layout(figure, "Top classes of the full model", "probability", height)
    top = max([score.probability for score in (*full, *reduced)], default=1.0)
    figure.update_xaxes(title_text="probability", range=[0, min(1.0, 1.1 * top) or 1.0])
    figure.update_yaxes(title_text=None)
    return figure


def _mark_layer(figure: go.Figure, layer: int | None) -> None:
    if layer is None:
        return
    figure.add_vrect(
        x0=layer - 0.5, x1=layer + 0.5, fillcolor=MARKER_COLOR, opacity=0.25, line_width=0
    )


def _layout(figure: go.Figure, title: str, y_title: str, height: int) -> go.Figure:
    figure.update_layout(
        title={"text": title, "font": {"size": 14}},
        height=height,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1},
        template="plotly_white",
    )
    figure.update_xaxes(title_text="layer", dtick=1 if len(figure.data[0].x or ()) <= 16 else None)
    figure.update_yaxes(title_text=y_title, rangemode="tozero")
    return figure
