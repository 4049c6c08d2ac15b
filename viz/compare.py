"""Pictures, charts and tables that put several methods side by side.

Pure functions, testable without Streamlit: ``render_view`` draws one method's trace in
one of the Explore views, ``compose_grid`` lays such pictures out as one labelled RGB
array (images × methods, or methods × layers) ready to save as a PNG,
``agreement_heatmap``/``agreement_lines`` draw the agreement metrics, and
``comparison_table`` turns per-method summaries into a table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from PIL import Image, ImageDraw, ImageFont

from analysis.agreement import AgreementMatrix, AgreementMetric
from analysis.flops import CostReport
from analysis.records import RunResult
from analysis.trace import Trace
from viz import overlays, summary
from viz.colors import (
    NEVER_REDUCED_RGB,
    apply_colormap,
    hsv_to_rgb,
    layer_colors,
)
from viz.wrapping import wrap_words

VIEWS: dict[str, str] = {
    "segments": "Segments",
    "pruned": "Pruned patches",
    "depth": "Token depth",
    "heatmap": "Importance",
}
METHOD_COLORS = ("#e8590c", "#1c7ed6", "#2b8a3e", "#ae3ec9", "#f59f00", "#0b7285")
FULL_COLOR = "#9aa0a6"
LINE_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
# Open symbols: where two methods' lines coincide (EViT and Top-K keep the same counts),
# both markers still show.
LINE_SYMBOLS = ("circle-open", "square-open", "diamond-open", "triangle-up-open", "x", "cross")
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
PLACEHOLDER = (236, 236, 236)

Cell = np.ndarray | str | None  # a picture, a note drawn in a grey box, or an empty box


# --------------------------------------------------------------------------- pictures


def render_view(
    image: np.ndarray,
    trace: Trace,
    view: str,
    layer: int,
    *,
    index: int = 0,
    segment_mode: str = "mean",
    legend: bool = True,
) -> np.ndarray | None:
    """One of the Explore views of one image of a trace; None for ``"heatmap"`` at a
    layer where no reducer scored tokens. ``legend=False`` leaves out the colour bar and
    the depth legend (for grids, which carry one shared legend)."""
    if view == "segments":
        return overlays.render_segments(image, trace, layer, index=index, mode=segment_mode)
    if view == "pruned":
        return overlays.render_pruned(image, trace, layer, index=index)
    if view == "depth":
        return overlays.render_token_depth(image, trace, index=index, legend=legend)
    if view == "heatmap":
        if overlays.layer_scores(trace, layer, index) is None:
            return None
        return overlays.render_heatmap(image, trace, layer, index=index, colorbar=legend)
    raise ValueError(f"unknown view '{view}' (known: {', '.join(VIEWS)})")


def compose_grid(
    cells: Sequence[Sequence[Cell]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    *,
    cell_side: int = 192,
    title: str = "",
    footer: np.ndarray | None = None,
    gap: int = 4,
) -> np.ndarray:
    """Pictures on a grid, one RGB array: column labels on top, row labels on the left.

    Every picture is scaled to ``cell_side`` pixels tall (keeping its aspect ratio; all
    cells of a column take the widest one's width). A string cell is drawn as a grey box
    holding that note, None as an empty grey box. ``footer`` (e.g. a legend strip) goes
    under the grid, left-aligned. Deterministic: the same input gives the same pixels.
    """
    rows, columns = len(row_labels), len(column_labels)
    if len(cells) != rows or any(len(row) != columns for row in cells):
        raise ValueError(f"expected {rows} rows of {columns} cells")
    if rows == 0 or columns == 0:
        raise ValueError("a grid needs at least one row and one column")
    scaled = [[_scale_cell(cell, cell_side) for cell in row] for row in cells]
    widths = [
        max((cell.shape[1] for cell in column if cell is not None), default=cell_side)
        for column in zip(*scaled, strict=True)
    ]
    font = _font(max(11, min(18, cell_side // 12)))
    line = _line_height(font)
    label_w = min(
        max(cell_side, 80),
        max((_text_width(font, text) for text in row_labels), default=0) + 2 * gap,
    )
    wrapped = [
        _wrap(font, text, width - 2) for text, width in zip(column_labels, widths, strict=True)
    ]
    header_h = max(len(lines) for lines in wrapped) * line + gap
    title_h = (line + 2 * gap) if title else 0
    grid_w = label_w + sum(widths) + gap * columns
    grid_h = title_h + header_h + rows * (cell_side + gap)
    footer_h = footer.shape[0] + gap if footer is not None else 0
    width = max(grid_w + gap, footer.shape[1] + 2 * gap if footer is not None else 0)
    canvas = Image.new("RGB", (width, grid_h + footer_h + gap), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, gap), _fit(font, title, width - 2 * gap), fill=INK, font=font)
    x0 = label_w + gap
    lefts = [x0 + sum(widths[:j]) + gap * j for j in range(columns)]
    for left, width_j, lines in zip(lefts, widths, wrapped, strict=True):
        for k, text in enumerate(lines):
            y = title_h + k * line
            draw.text((left + width_j / 2, y), text, fill=INK, font=font, anchor="ma")
    for i, (label, row) in enumerate(zip(row_labels, scaled, strict=True)):
        top = title_h + header_h + i * (cell_side + gap)
        text = _fit(font, label, label_w - 2 * gap)
        draw.text((gap, top + cell_side / 2), text, fill=INK, font=font, anchor="lm")
        for j, cell in enumerate(row):
            if cell is None:
                note = cells[i][j] if isinstance(cells[i][j], str) else ""
                box = _placeholder(cell_side, widths[j], note, font)
            else:
                box = cell
            offset = (widths[j] - box.shape[1]) // 2
            canvas.paste(Image.fromarray(box), (lefts[j] + offset, top))
    if footer is not None:
        canvas.paste(Image.fromarray(_rgb(footer)), (gap, grid_h + gap))
    return np.asarray(canvas)


PRUNED_ENTRIES = (
    ("dropped", "dropped"),
    ("fused", "pruned, fused into one token (EViT)"),
)


def legend_strip(view: str, depth: int, width: int, *, height: int = 22) -> np.ndarray | None:
    """A one-line legend for a grid of ``view`` pictures, its swatches drawn as the
    pictures draw (the hatching of pruned patches included). ``depth`` is the model's
    number of layers."""
    font = _font(max(11, height - 8))
    swatch = height - 6
    hatched = [(overlays.pattern_swatch(kind, swatch + 1), label) for kind, label in PRUNED_ENTRIES]
    if view == "segments":
        return _swatch_strip([(None, "one colour per token"), *hatched], width, height, font)
    if view == "pruned":
        entries = [
            (None, "its own token (image)"),
            ((170, 170, 170), "merged (outlined)"),
            *hatched,
        ]
        return _swatch_strip(entries, width, height, font)
    if view == "depth":
        colors = layer_colors(depth)
        label = f"reduced at layer 0 … {depth - 1}"
        extras = [(NEVER_REDUCED_RGB, "never"), *hatched]
        return _gradient_strip(colors, label, extras, width, height, font)
    if view == "heatmap":
        ramp = apply_colormap(np.linspace(0.0, 1.0, 32), "inferno")
        label = "importance score, low … high (per picture)"
        extras = [(hatched[0][0], "gone before this layer"), (hatched[1][0], "in the fused token")]
        return _gradient_strip(ramp, label, extras, width, height, font)
    return None


# --------------------------------------------------------------------------- charts


def method_colors(count: int) -> list[str]:
    """A distinct colour per method column, the same on every chart."""
    return [METHOD_COLORS[i % len(METHOD_COLORS)] for i in range(count)]


def line_style(position: int, color: str) -> dict[str, Any]:
    """A line's look: its colour, and a dash and an open marker of its own, so that
    lines lying on each other (EViT's and Top-K's token counts) stay apart."""
    return {
        "mode": "lines+markers",
        "line": {"color": color, "width": 2, "dash": LINE_DASHES[position % len(LINE_DASHES)]},
        "marker": {
            "symbol": LINE_SYMBOLS[position % len(LINE_SYMBOLS)],
            "size": 9,
            "line": {"width": 2, "color": color},
        },
    }


def agreement_heatmap(
    result: AgreementMatrix, metric: AgreementMetric, *, title: str = "", height: int = 360
) -> go.Figure:
    """The method × method matrix of one metric, values written in the cells."""
    names = list(result.names)
    matrix = np.asarray(result.matrix, dtype=np.float64)
    text = [["n/a" if not math.isfinite(v) else f"{v:.2f}" for v in row] for row in matrix]
    figure = go.Figure(
        go.Heatmap(
            z=np.where(np.isfinite(matrix), matrix, None).tolist(),
            x=names,
            y=names,
            zmin=metric.low,
            zmax=metric.high,
            colorscale="Viridis",
            text=text,
            texttemplate="%{text}",
            hovertemplate="%{y} vs %{x}: %{text}<extra></extra>",
            colorbar={"title": {"text": metric.label, "side": "right"}, "thickness": 12},
        )
    )
    figure.update_layout(
        title={"text": title or metric.label, "font": {"size": 14}},
        height=height,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
    )
    figure.update_yaxes(autorange="reversed")
    return figure


def agreement_lines(
    series: Mapping[str, Sequence[float]],
    metric: AgreementMetric,
    layer: int | None = None,
    *,
    colors: Sequence[str] | None = None,
    height: int = 360,
) -> go.Figure:
    """A per-layer metric over depth, one line per pair of methods, each with its own
    colour, dash and marker."""
    figure = go.Figure()
    palette = list(colors) if colors else method_colors(len(series))
    for i, ((name, values), color) in enumerate(zip(series.items(), palette, strict=False)):
        figure.add_trace(
            go.Scatter(
                x=list(range(len(values))),
                y=[v if math.isfinite(v) else None for v in values],
                name=name,
                **line_style(i, color),
            )
        )
    _mark_layer(figure, layer)
    figure.update_yaxes(range=[metric.low - 0.02, metric.high + 0.02])
    return _layout(figure, f"{metric.label} over layers", metric.label, height)


def tokens_lines(
    tokens: Mapping[str, Sequence[int]],
    full: Sequence[int],
    layer: int | None = None,
    *,
    colors: Sequence[str] | None = None,
    styles: Sequence[int] | None = None,
    height: int = 320,
) -> go.Figure:
    """Tokens leaving each layer, one line per method and the full model dashed. Each
    method has its own dash and marker (``styles``: its column's position, so that it
    keeps them when another column fails), as methods often keep the same counts."""
    figure = go.Figure()
    figure.add_trace(
        go.Scatter(
            x=list(range(len(full))),
            y=list(full),
            name="full model",
            mode="lines",
            line={"color": FULL_COLOR, "dash": "dash"},
        )
    )
    palette = list(colors) if colors else method_colors(len(tokens))
    positions = list(styles) if styles else list(range(len(tokens)))
    for (name, values), color, position in zip(tokens.items(), palette, positions, strict=False):
        figure.add_trace(
            go.Scatter(
                x=list(range(len(values))),
                y=list(values),
                name=name,
                **line_style(position, color),
            )
        )
    _mark_layer(figure, layer)
    figure.update_yaxes(rangemode="tozero")
    return _layout(figure, "Tokens per layer", "tokens after the layer", height)


def gmacs_bars(
    costs: Mapping[str, CostReport],
    full: CostReport,
    layer: int | None = None,
    *,
    colors: Sequence[str] | None = None,
    height: int = 320,
) -> go.Figure:
    """GMACs spent in each layer (block plus reducer), one bar per method and the full
    model, with every method's total in the legend."""
    layers = list(range(len(full.layers)))
    figure = go.Figure()
    figure.add_trace(
        go.Bar(
            x=layers,
            y=full.gmacs_per_layer(),
            name=f"full model ({full.gmacs:.2f})",
            marker_color=FULL_COLOR,
        )
    )
    palette = list(colors) if colors else method_colors(len(costs))
    for (name, cost), color in zip(costs.items(), palette, strict=False):
        figure.add_trace(
            go.Bar(
                x=layers,
                y=cost.gmacs_per_layer(),
                name=f"{name} ({cost.gmacs:.2f})",
                marker_color=color,
            )
        )
    figure.update_layout(barmode="group", bargap=0.15, bargroupgap=0.05)
    _mark_layer(figure, layer)
    figure.update_yaxes(rangemode="tozero")
    return _layout(figure, "GMACs per layer (total in the legend)", "GMACs", height)


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class MethodSummary:
    """One method column's numbers, for the comparison table."""

    name: str  # e.g. "A · ToMe"
    schedule: str  # the schedule that ran (solved, in matched mode)
    gmacs: float
    full_gmacs: float
    seconds: float  # time of the run() call
    device: str
    cosine: float | None = None  # feature fidelity to the full model (this image)
    top1_same: bool | None = None  # classifiers: the full model's top-1 kept
    top5_overlap: int | None = None  # classifiers: shared top-5 classes
    agreement: float | None = None  # with the first column, in the chosen metric
    set_fidelity: float | None = None  # over the image set: mean cosine or top-1 rate

    @property
    def reduction_percent(self) -> float:
        if self.full_gmacs <= 0:
            return 0.0
        return 100.0 * (1.0 - self.gmacs / self.full_gmacs)


def summarize(
    name: str,
    schedule: str,
    reduced: RunResult,
    full: RunResult,
    *,
    seconds: float,
    device: str,
    agreement: float | None = None,
    reduced_set: RunResult | None = None,
    full_set: RunResult | None = None,
) -> MethodSummary:
    """A method's row: its cost against the full model's, its fidelity on this image
    (feature cosine for backbones, top-1/top-5 agreement for classifiers) and, given
    runs over an image set, its fidelity there (:func:`set_fidelity`)."""
    cosine = top1 = overlap = None
    if reduced.logits is not None and full.logits is not None:
        mine = [c.index for c in summary.top_classes(reduced.logits)]
        theirs = [c.index for c in summary.top_classes(full.logits)]
        top1, overlap = mine[0] == theirs[0], len(set(mine) & set(theirs))
    else:
        cosine = summary.feature_cosine(full.features, reduced.features)
    on_set = None
    if reduced_set is not None and full_set is not None:
        on_set = set_fidelity(full_set, reduced_set)
    return MethodSummary(
        name=name,
        schedule=schedule,
        gmacs=reduced.gmacs,
        full_gmacs=full.gmacs,
        seconds=seconds,
        device=device,
        cosine=cosine,
        top1_same=top1,
        top5_overlap=overlap,
        agreement=None if agreement is None or not math.isfinite(agreement) else agreement,
        set_fidelity=on_set,
    )


def set_fidelity(full: RunResult, reduced: RunResult) -> float:
    """Fidelity over a batch of images: for classifiers the share of images whose top-1
    class is the full model's, otherwise the mean cosine of the pooled features."""
    if full.logits is not None and reduced.logits is not None:
        same = full.logits.argmax(dim=-1) == reduced.logits.argmax(dim=-1)
        return float(same.float().mean())
    count = full.features.shape[0]
    return float(
        np.mean(
            [summary.feature_cosine(full.features, reduced.features, index=i) for i in range(count)]
        )
    )


def comparison_table(
    rows: Sequence[MethodSummary],
    *,
    agreement_label: str = "agreement",
    set_label: str = "fidelity (image set)",
) -> pd.DataFrame:
    """A row per method: schedule, GMACs, reduction %, fidelity, agreement, time.

    Fidelity columns appear only where some row has them: the cosine to the full
    model's features for backbones, top-1/top-5 agreement for classifiers.
    """
    table: dict[str, list[Any]] = {
        "method": [r.name for r in rows],
        "parameters": [r.schedule for r in rows],
        "GMACs": [round(r.gmacs, 3) for r in rows],
        "reduction %": [round(r.reduction_percent, 1) for r in rows],
    }
    if any(r.cosine is not None for r in rows):
        table["feature cosine"] = [_round(r.cosine, 4) for r in rows]
    if any(r.top1_same is not None for r in rows):
        table["top-1 as full"] = [r.top1_same for r in rows]
        table["top-5 shared"] = [
            None if r.top5_overlap is None else f"{r.top5_overlap}/5" for r in rows
        ]
    if any(r.set_fidelity is not None for r in rows):
        table[set_label] = [_round(r.set_fidelity, 4) for r in rows]
    table[agreement_label] = [_round(r.agreement, 3) for r in rows]
    table["run ms"] = [round(1000 * r.seconds, 1) for r in rows]
    table["device"] = [r.device for r in rows]
    return pd.DataFrame(table)


# --------------------------------------------------------------------------- helpers


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def _scale_cell(cell: Cell, side: int) -> np.ndarray | None:
    if cell is None or isinstance(cell, str):
        return None
    image = _rgb(cell)
    height, width = image.shape[:2]
    new_w = max(1, round(width * side / height))
    interpolation = cv2.INTER_AREA if height > side else cv2.INTER_NEAREST
    return cv2.resize(image, (new_w, side), interpolation=interpolation)


def _placeholder(height: int, width: int, note: str, font) -> np.ndarray:
    box = Image.new("RGB", (width, height), PLACEHOLDER)
    if note:
        draw = ImageDraw.Draw(box)
        lines = _wrap(font, note, width - 8, max_lines=3)
        line = _line_height(font)
        top = (height - line * len(lines)) / 2
        for k, text in enumerate(lines):
            draw.text((width / 2, top + k * line), text, fill=(90, 90, 90), font=font, anchor="ma")
    return np.asarray(box)


def _swatch_strip(entries, width: int, height: int, font) -> np.ndarray:
    """Swatches with labels; a swatch is a colour, a tile (an array) or None (a rainbow:
    the image's own colours). Wider than ``width`` where the labels need it."""
    canvas = Image.new("RGB", (4 * width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    x, swatch = 0, height - 6
    for color, label in entries:
        tile = None
        if color is None:  # the image's own colours: a small rainbow
            hue = np.linspace(0.0, 0.85, swatch + 1)[None].repeat(swatch + 1, axis=0)
            tile = hsv_to_rgb(hue, np.full_like(hue, 0.6), np.full_like(hue, 0.9))
        elif isinstance(color, np.ndarray):
            tile, color = color, None
        x = _legend_entry(canvas, draw, x, swatch, color, tile, label, font)
    return np.asarray(canvas)[:, : max(width, x - 12)]


def _legend_entry(canvas, draw, x: int, size: int, color, tile, label: str, font) -> int:
    """A square (a flat colour, or ``tile`` when there is none) and its label at ``x``;
    returns where the next entry starts."""
    box = (x, 3, x + size, 3 + size)
    if tile is not None:
        canvas.paste(Image.fromarray(tile), (x, 3))
        draw.rectangle(box, outline=(60, 60, 60))
    else:
        draw.rectangle(box, fill=tuple(color), outline=(60, 60, 60))
    draw.text((x + size + 4, canvas.height / 2), label, fill=INK, font=font, anchor="lm")
    return x + size + 4 + _text_width(font, label) + 16


def _gradient_strip(ramp: np.ndarray, label: str, extras, width: int, height: int, font):
    canvas = Image.new("RGB", (4 * width, height), BACKGROUND)
    bar_w, bar_h = max(60, min(200, width // 4)), height - 6
    bar = np.repeat(np.asarray(ramp, dtype=np.uint8)[None], bar_h, axis=0)
    bar = cv2.resize(bar, (bar_w, bar_h), interpolation=cv2.INTER_NEAREST)
    canvas.paste(Image.fromarray(bar), (0, 3))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 3, bar_w - 1, 2 + bar_h), outline=(60, 60, 60))
    x = bar_w + 6
    draw.text((x, height / 2), label, fill=INK, font=font, anchor="lm")
    x += _text_width(font, label) + 16
    for color, text in extras:
        tile = None
        if isinstance(color, np.ndarray):  # hatched, as pruned patches are drawn
            tile, color = color, None
        x = _legend_entry(canvas, draw, x, bar_h, color, tile, text, font)
    return np.asarray(canvas)[:, : max(width, x - 12)]


def _wrap(font, text: str, width: int, max_lines: int = 2) -> list[str]:
    """Greedy word wrap to ``width`` pixels, keeping explicit line breaks; lines beyond
    ``max_lines`` join the last one, which is cut with an ellipsis."""
    lines = wrap_words(text, lambda line: _text_width(font, line) <= width, max_lines)
    return [_fit(font, line, width) for line in lines] or [""]


def _fit(font, text: str, width: int) -> str:
    if _text_width(font, text) <= width:
        return text
    while text and _text_width(font, text + "…") > width:
        text = text[:-1]
    return text + "…"


def _font(size: int):
    return ImageFont.load_default(size=size)


def _text_width(font, text: str) -> int:
    if not text:
        return 0
    left, _, right, _ = font.getbbox(text)
    return math.ceil(right - left)


def _line_height(font) -> int:
    _, top, _, bottom = font.getbbox("Ag")
    return math.ceil(bottom - top) + 4


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8, copy=False)


def _mark_layer(figure: go.Figure, layer: int | None) -> None:
    if layer is None:
        return
    figure.add_vrect(
        x0=layer - 0.5,
        x1=layer + 0.5,
        fillcolor="rgba(30, 30, 30, 0.35)",
        opacity=0.25,
        line_width=0,
    )


def _layout(figure: go.Figure, title: str, y_title: str, height: int) -> go.Figure:
    figure.update_layout(
        title={"text": title, "font": {"size": 14}},
        height=height,
        margin={"l": 10, "r": 10, "t": 40, "b": 40},
        legend={"orientation": "h", "yanchor": "top", "y": -0.25, "xanchor": "left", "x": 0},
    )
    figure.update_xaxes(title_text="layer", dtick=1)
    figure.update_yaxes(title_text=y_title)
    return figure
