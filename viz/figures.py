"""Print figures with matplotlib: panels of pictures and plots, exported as PNG, SVG or PDF.

Draws an :class:`analysis.figure_config.FigureData` (no model runs here) into a
``matplotlib.figure.Figure`` of the configured print size:

* **Panels** are laid out by hand in whole pixels at the figure's DPI. Each picture is
  rendered by ``viz.overlays`` at exactly the pixel size of its cell and shown with
  ``interpolation="none"``, so a PNG holds it 1:1 and a PDF or SVG embeds it at that
  resolution (never a small raster scaled up). Labels, colour bars and legends are vector.
* **Plots** (trade-off, tokens per layer, GMACs per layer) give every series its own
  colour, marker and dash (and hatch, for bars), so they survive greyscale printing.

:func:`export` writes PDF with TrueType (Type 42) fonts and SVG with text kept as text,
both without creation dates, so the same figure gives the same bytes.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib import font_manager
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Patch
from matplotlib.textpath import TextToPath

from analysis.curves import Point
from analysis.errors import TokenScopeError
from analysis.figure_config import (
    DEFAULT_ASPECT,
    FONT_FAMILIES,
    FULL_MODEL_COLOR,
    PALETTES,
    FigureConfig,
    PrintSettings,
)
from analysis.figure_data import FigureData, Series
from viz import overlays
from viz.colors import (
    DROPPED_RGB,
    FUSED_RGB,
    HATCH_RGB,
    NEVER_REDUCED_RGB,
    colormap_lut,
    layer_colors,
)
from viz.wrapping import wrap_words

FORMATS: dict[str, str] = {
    "pdf": "application/pdf",
    "svg": "image/svg+xml",
    "png": "image/png",
}
# What makes the vector files acceptable and reproducible: TrueType fonts embedded (no
# Type 3, which conference systems reject), SVG text kept as <text>, fixed SVG ids.
EXPORT_RC: dict[str, Any] = {
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "svg.hashsalt": "tokenscope",
    "svg.image_inline": True,
}
_METADATA: dict[str, dict[str, Any]] = {
    "pdf": {"CreationDate": None, "ModDate": None},
    "svg": {"Date": None},
    "png": {},
}
MIN_TEXT_PT = 7.0  # the smallest text a figure holds (tick labels, legends, caption)
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "h", "<", ">")
DASHES: tuple[Any, ...] = (
    "-",
    (0, (4.0, 1.5)),
    (0, (1.0, 1.2)),
    (0, (4.0, 1.2, 1.0, 1.2)),
    (0, (7.0, 1.5)),
    (0, (6.0, 1.2, 1.0, 1.2, 1.0, 1.2)),
    (0, (2.0, 2.0)),
    (0, (8.0, 1.5, 2.0, 1.5)),
    (0, (1.0, 3.0)),
    (0, (3.0, 3.0)),
)
HATCHES = ("", "////", "\\\\\\\\", "xxxx", "....", "++++", "oooo", "----", "||||", "**")
FULL_HATCH = ""
PAD_IN = 0.04  # around the figure
BAR_IN = 0.08  # thickness of a panel's colour bar
COLORBAR_LABEL = "colorbar"  # the label of a colour bar's axes
GAP_IN = 0.04  # between cells
LINE = 1.2  # line height, in font sizes
_X_TITLES = {
    "gmacs": "GMACs",
    "percent": "% of the full model's GMACs",
    "images_per_second": "images/s (measured)",
}


@dataclass(frozen=True)
class SeriesStyle:
    """How one method or schedule is drawn: each field differs between series."""

    color: str
    marker: str
    dash: Any
    hatch: str


def series_styles(count: int, palette: str = "okabe-ito") -> list[SeriesStyle]:
    """``count`` styles in order: palette colour, marker, dash and hatch all distinct
    (markers and dashes repeat only after ten series)."""
    colors = PALETTES[palette]
    return [
        SeriesStyle(
            colors[i % len(colors)],
            MARKERS[i % len(MARKERS)],
            DASHES[i % len(DASHES)],
            HATCHES[(i + 1) % len(HATCHES)],
        )
        for i in range(count)
    ]


# --------------------------------------------------------------------------- fonts


def check_font(family: str) -> str:
    """The TrueType file of ``family``; a family that is missing here, or is not
    TrueType (whose PDF embedding would not be Type 42), raises TokenScopeError."""
    try:
        path = font_manager.findfont(FontProperties(family=family), fallback_to_default=False)
    except ValueError:
        raise TokenScopeError(
            f"figure configuration: 'print.font_family' {family!r} is not installed here "
            f"(available: {', '.join(available_fonts())})"
        ) from None
    if not path.lower().endswith((".ttf", ".ttc")):
        raise TokenScopeError(
            f"figure configuration: 'print.font_family' {family!r} is not a TrueType font "
            f"({path}); PDFs need TrueType to embed it as Type 42"
        )
    return path


def available_fonts() -> list[str]:
    """Families a figure can use here: matplotlib's bundled ones first (the same on every
    machine), then common paper fonts that are installed."""
    found = list(FONT_FAMILIES)
    for family in ("Liberation Serif", "Liberation Sans", "Times New Roman", "Arial"):
        try:
            path = font_manager.findfont(FontProperties(family=family), fallback_to_default=False)
        except ValueError:
            continue
        if path.lower().endswith((".ttf", ".ttc")):
            found.append(family)
    return found


def style_rc(settings: PrintSettings) -> dict[str, Any]:
    """matplotlib settings for a print figure: the font and sizes, thin lines."""
    size = settings.font_size
    small = max(MIN_TEXT_PT, size - 1)
    return {
        **EXPORT_RC,
        "font.family": [settings.font_family, "DejaVu Sans"],
        "font.size": size,
        "axes.titlesize": size,
        "axes.labelsize": size,
        "xtick.labelsize": small,
        "ytick.labelsize": small,
        "legend.fontsize": small,
        "legend.title_fontsize": small,
        "figure.titlesize": size + 1,
        "text.parse_math": False,
        "axes.unicode_minus": True,
        "axes.linewidth": 0.6,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "xtick.major.width": 0.6,
        "ytick.major.width": 0.6,
        "xtick.major.size": 2.5,
        "ytick.major.size": 2.5,
        "lines.linewidth": 1.2,
        "lines.markersize": 4.0,
        "patch.linewidth": 0.4,
        "hatch.linewidth": 0.5,
        "legend.frameon": False,
        "legend.handlelength": 2.6,
        "figure.facecolor": "white",
        "savefig.facecolor": "white",
        "image.interpolation": "none",
    }


# --------------------------------------------------------------------------- entry points


def draw_figure(data: FigureData) -> Figure:
    """The figure of ``data`` at its print size (inches and DPI of its settings)."""
    settings = data.config.print
    check_font(settings.font_family)
    rc = style_rc(settings)
    with matplotlib.rc_context(rc):
        if data.config.kind == "panel":
            figure = _panel(data, settings)
        elif data.config.kind == "tradeoff":
            figure = _plot(data, settings, _draw_tradeoff)
        elif data.config.kind == "tokens":
            figure = _plot(data, settings, _draw_tokens)
        else:
            figure = _plot(data, settings, _draw_gmacs)
    figure._tokenscope_rc = rc  # type: ignore[attr-defined]  # export draws with it
    return figure


def export(figure: Figure, fmt: str) -> bytes:
    """The figure as PDF, SVG or PNG bytes: the same figure always gives the same bytes."""
    fmt = fmt.lower().lstrip(".")
    if fmt not in FORMATS:
        raise TokenScopeError(f"unknown figure format {fmt!r} (use {', '.join(FORMATS)})")
    buffer = io.BytesIO()
    rc = {**getattr(figure, "_tokenscope_rc", {}), **EXPORT_RC}
    with matplotlib.rc_context(rc):
        figure.savefig(buffer, format=fmt, dpi=figure.dpi, metadata=_METADATA[fmt])
    return buffer.getvalue()


def figure_bytes(data: FigureData, fmt: str) -> bytes:
    """Draw and export in one step."""
    return export(draw_figure(data), fmt)


def _new_figure(width_px: int, height_px: int, dpi: int, **kwargs: Any) -> Figure:
    """A figure of whole pixels at ``dpi``, so the PNG has exactly that size (and the
    page is within half a pixel of the requested inches)."""
    return Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, **kwargs)


# --------------------------------------------------------------------------- text helpers

_MEASURE = TextToPath()


def text_width(text: str, size: float, family: str, dpi: int = 72) -> float:
    """Width of one line of text in inches: the larger of its outline width (PDF, SVG)
    and its width as Agg draws it at ``dpi`` (PNG; hinting widens small text)."""
    if not text:
        return 0.0
    prop = FontProperties(family=[family, "DejaVu Sans"], size=size)
    outline, _, _ = _MEASURE.get_text_width_height_descent(text, prop, ismath=False)
    drawn, _, _ = _agg(dpi).get_text_width_height_descent(text, prop, ismath=False)
    return max(outline / 72.0, drawn / dpi)


@functools.lru_cache(maxsize=8)
def _agg(dpi: int) -> RendererAgg:
    return RendererAgg(1, 1, dpi)


def wrap(
    text: str, width_in: float, size: float, family: str, dpi: int = 72, max_lines: int = 3
) -> list[str]:
    """Greedy word wrap to ``width_in``; extra lines join the last, which may overflow."""
    return wrap_words(
        text,
        lambda line: text_width(line, size, family, dpi) <= width_in,
        max_lines,
        separator=" ",  # not at no-break spaces
    )


def _line_in(size: float) -> float:
    return LINE * size / 72.0


def _caption_lines(data: FigureData, settings: PrintSettings, width_in: float) -> list[str]:
    if not settings.caption or not data.caption:
        return []
    small = max(MIN_TEXT_PT, settings.font_size - 1)
    return wrap(data.caption, width_in, small, settings.font_family, settings.dpi, max_lines=6)


# --------------------------------------------------------------------------- panels


@dataclass(frozen=True)
class _Cell:
    image: int
    series: Series | None  # None: the input picture
    layer: int


def _panel_grid(data: FigureData) -> tuple[list[str], list[str], list[list[_Cell]]]:
    """Row labels, column labels and the cells of a panel."""
    config = data.config
    depth_view = config.view == "depth"
    last = data.depth - 1
    if config.rows == "methods" and depth_view:  # one picture per method sums up all layers
        cells = [[_Cell(0, series, last) for series in data.series]]
        return [data.images[0].label], [s.label for s in data.series], cells
    if config.rows == "methods":
        layers = list(config.layers)
        columns = [f"Layer {layer}" for layer in layers]
        cells = [[_Cell(0, series, layer) for layer in layers] for series in data.series]
        return [s.label for s in data.series], columns, cells
    layer = last if depth_view else config.layers[0]
    columns = (["Input"] if config.input_column else []) + [s.label for s in data.series]
    cells = []
    for index in range(len(data.images)):
        row = [_Cell(index, None, layer)] if config.input_column else []
        row += [_Cell(index, series, layer) for series in data.series]
        cells.append(row)
    return [image.label for image in data.images], columns, cells


def _picture(
    data: FigureData, cell: _Cell, bases: dict[int, np.ndarray], thickness: int
) -> np.ndarray | str:
    """One cell's picture at its print resolution, or the note drawn in its place."""
    base = bases[cell.image]
    series = cell.series
    if series is None:
        return base
    trace = series.trace
    assert trace is not None
    index = cell.image if data.config.rows == "images" else 0
    view = data.config.view
    if view == "segments":
        mode = data.config.segment_mode
        return overlays.render_segments(
            base, trace, cell.layer, index=index, mode=mode, thickness=thickness
        )
    if view == "pruned":
        return overlays.render_pruned(base, trace, cell.layer, index=index)
    if view == "depth":
        return overlays.render_token_depth(base, trace, index=index, legend=False)
    if overlays.layer_scores(trace, cell.layer, index) is None:
        return f"no scores at layer {cell.layer}"
    return overlays.render_heatmap(base, trace, cell.layer, index=index, colorbar=False)


@dataclass(frozen=True)
class _PanelBands:
    """What surrounds a panel's grid and does not depend on its cell size: the legend's
    place and size, the caption, the title line and the row labels."""

    small: float  # the legend's and caption's font size
    legend: str  # "right", "bottom", "top" or "none"
    legend_w: float
    legend_h: float
    caption: list[str]
    caption_h: float
    title_h: float
    row_lines: list[list[str]]  # each row label, wrapped
    label_w: float


@dataclass(frozen=True)
class _PanelLayout:
    """Where a panel's parts go: inches from the bottom left, the cells in whole pixels."""

    bands: _PanelBands
    width: float
    height: float
    dpi: int
    side_px: int
    headers: list[list[str]]  # each column label, wrapped to the cell width
    header_h: float
    rows: int
    columns: int

    @property
    def side(self) -> float:
        return self.side_px / self.dpi

    @property
    def width_px(self) -> int:
        return round(self.width * self.dpi)

    @property
    def height_px(self) -> int:
        return round(self.height * self.dpi)

    @property
    def grid_w(self) -> float:
        return self.bands.label_w + self.columns * self.side + (self.columns - 1) * GAP_IN

    @property
    def grid_h(self) -> float:
        return self.rows * self.side + (self.rows - 1) * GAP_IN

    @property
    def left(self) -> float:
        """The left edge of the row labels: the grid is centred beside the legend."""
        return PAD_IN + max(0.0, (self.width - 2 * PAD_IN - self.bands.legend_w - self.grid_w) / 2)

    @property
    def top(self) -> float:
        """The top of the column headers' band (under the title and a legend on top)."""
        top = self.height - PAD_IN - self.bands.title_h
        if self.bands.legend == "top":
            top -= self.bands.legend_h
        return top

    @property
    def header_base(self) -> float:
        return self.top - self.header_h

    @property
    def cell_lefts(self) -> list[float]:
        start = self.left + self.bands.label_w
        return [start + j * (self.side + GAP_IN) for j in range(self.columns)]

    def row_bottom(self, row: int) -> float:
        return self.header_base - (row + 1) * self.side - row * GAP_IN

    def legend_box(self) -> tuple[float, float, float, float]:
        """The legend's x, y, width and height in inches."""
        bands = self.bands
        grid_x = self.left + bands.label_w
        bottom = self.header_base - self.grid_h
        if bands.legend == "top":
            return (grid_x, self.top, self.columns * self.side, bands.legend_h)
        if bands.legend == "bottom":
            return (grid_x, bottom - bands.legend_h, self.columns * self.side, bands.legend_h)
        x = self.left + self.grid_w + 2 * GAP_IN
        return (x, bottom, bands.legend_w - 2 * GAP_IN, self.grid_h)


def _panel(data: FigureData, settings: PrintSettings) -> Figure:
    """A grid of pictures under column headers with row labels at its left, then the
    legend and the caption: laid out first, in whole pixels, then drawn."""
    row_labels, column_labels, cells = _panel_grid(data)
    layout = _panel_layout(data, settings, row_labels, column_labels, len(cells))
    size, small = settings.font_size, layout.bands.small
    figure = _new_figure(layout.width_px, layout.height_px, settings.dpi)
    if settings.title:
        figure.text(
            0.5, 1 - (PAD_IN / layout.height), settings.title, ha="center", va="top", size=size + 1
        )
    _draw_column_headers(figure, layout, size)
    _draw_panel_rows(figure, data, layout, cells, size)
    if layout.bands.legend != "none":
        place, box = layout.bands.legend, layout.legend_box()
        _panel_legend(figure, data.config, data, place, box, (layout.width, layout.height), small)
    if layout.bands.caption:
        figure.text(
            PAD_IN / layout.width,
            PAD_IN / layout.height,
            "\n".join(layout.bands.caption),
            ha="left",
            va="bottom",
            size=small,
            linespacing=LINE,
        )
    return figure


def _panel_bands(
    data: FigureData, settings: PrintSettings, row_labels: list[str], rows: int
) -> _PanelBands:
    """Measure the legend, caption, title and row labels of a panel of ``rows`` rows."""
    config = data.config
    family, size, dpi, width = (
        settings.font_family,
        settings.font_size,
        settings.dpi,
        settings.width_in,
    )
    small = max(MIN_TEXT_PT, size - 1)
    legend = _panel_legend_kind(config, settings)
    if legend == "right" and rows * 0.8 < _right_legend_height(config, small):
        legend = "bottom"  # a short grid has no room for it at the side
    legend_w = _legend_width(config, data, small, family, dpi) if legend == "right" else 0.0
    has_bar = _colorbar_mappable(config, data.depth) is not None
    legend_h = _band_height(small, has_bar) if legend in ("bottom", "top") else 0.0
    caption = _caption_lines(data, settings, width - 2 * PAD_IN)
    label_max = 0.26 * width
    row_lines = [wrap(text, label_max, size, family, dpi) for text in row_labels]
    label_w = max(text_width(line, size, family, dpi) for lines in row_lines for line in lines)
    return _PanelBands(
        small=small,
        legend=legend,
        legend_w=legend_w,
        legend_h=legend_h,
        caption=caption,
        caption_h=len(caption) * _line_in(small) + (3 * GAP_IN if caption else 0.0),
        title_h=_line_in(size + 1) + GAP_IN if settings.title else 0.0,
        row_lines=row_lines,
        label_w=min(label_w, label_max) + 2 * GAP_IN,
    )


def _panel_layout(
    data: FigureData,
    settings: PrintSettings,
    row_labels: list[str],
    column_labels: list[str],
    rows: int,
) -> _PanelLayout:
    """Size the cells to the print width (and height, for a fixed aspect), in whole
    pixels that hold each patch in the same number of pixels."""
    bands = _panel_bands(data, settings, row_labels, rows)
    side, height = _cell_side(settings, bands, column_labels, rows)
    dpi, size, family = settings.dpi, settings.font_size, settings.font_family
    cells_per_side = max(data.grid)
    side_px = max(cells_per_side, cells_per_side * int(side * dpi // cells_per_side))
    headers = [wrap(text, side_px / dpi, size, family, dpi) for text in column_labels]
    header_h = max(len(h) for h in headers) * _line_in(size) + GAP_IN
    if height is None:  # a free aspect: as tall as the grid needs
        grid_h = rows * (side_px / dpi) + (rows - 1) * GAP_IN
        height = 2 * PAD_IN + bands.title_h + header_h + grid_h + bands.legend_h + bands.caption_h
    return _PanelLayout(
        bands=bands,
        width=settings.width_in,
        height=height,
        dpi=dpi,
        side_px=side_px,
        headers=headers,
        header_h=header_h,
        rows=rows,
        columns=len(column_labels),
    )


def _cell_side(
    settings: PrintSettings, bands: _PanelBands, column_labels: list[str], rows: int
) -> tuple[float, float | None]:
    """The largest cell side (inches) the width allows, and, for a fixed aspect, the
    height, the side shrunk to fit it; refuses a figure with no room for its pictures."""
    family, size, dpi, width = (
        settings.font_family,
        settings.font_size,
        settings.dpi,
        settings.width_in,
    )
    columns = len(column_labels)
    usable = width - 2 * PAD_IN - bands.label_w - bands.legend_w - (columns - 1) * GAP_IN
    side = min(usable / columns, 2.4)
    if side < 0.25:
        raise TokenScopeError(
            f"figure configuration: 'print.width_in' {width:g} in is too narrow for "
            f"{columns} columns of pictures; widen the figure or show fewer columns"
        )
    if settings.aspect is None:
        return side, None

    def fixed(side_in: float) -> float:
        lines = max(len(wrap(text, side_in, size, family, dpi)) for text in column_labels)
        return (
            2 * PAD_IN
            + bands.title_h
            + lines * _line_in(size)
            + GAP_IN
            + bands.legend_h
            + bands.caption_h
        )

    height = width * settings.aspect
    for _ in range(3):  # a smaller cell can wrap its header onto more lines
        room = (height - fixed(side) - (rows - 1) * GAP_IN) / rows
        side = min(side, room)
    if side < 0.25:
        raise TokenScopeError(
            f"figure configuration: 'print.aspect' {settings.aspect:g} leaves no room "
            f"for {rows} rows of pictures; give a taller aspect (or none, to fit the grid)"
        )
    return side, height


def _draw_column_headers(figure: Figure, layout: _PanelLayout, size: float) -> None:
    for x, lines in zip(layout.cell_lefts, layout.headers, strict=True):
        figure.text(
            (x + layout.side / 2) / layout.width,
            (layout.header_base + GAP_IN / 2) / layout.height,
            "\n".join(lines),
            ha="center",
            va="bottom",
            size=size,
            linespacing=LINE,
        )


def _draw_panel_rows(
    figure: Figure, data: FigureData, layout: _PanelLayout, cells: list[list[_Cell]], size: float
) -> None:
    """Each row's label, then its pictures, each in an axes of exactly its pixels."""
    side_px, width, height = layout.side_px, layout.width, layout.height
    thickness = max(1, round(0.25 / 72 * layout.dpi))  # each side of a segment edge: 1/4 pt
    bases = {
        index: overlays.display_image(
            image.original, image.crop, data.grid, min_side=side_px, max_side=side_px
        )
        for index, image in enumerate(data.images)
    }
    label_x = (layout.left + layout.bands.label_w - GAP_IN) / width
    for i, (lines, row) in enumerate(zip(layout.bands.row_lines, cells, strict=True)):
        y = layout.row_bottom(i)
        figure.text(
            label_x,
            (y + layout.side / 2) / height,
            "\n".join(lines),
            ha="right",
            va="center",
            size=size,
            multialignment="right",
            linespacing=LINE,
        )
        for x, cell in zip(layout.cell_lefts, row, strict=True):
            box = (
                round(x * layout.dpi) / layout.width_px,
                round(y * layout.dpi) / layout.height_px,
                side_px / layout.width_px,
                side_px / layout.height_px,
            )
            axes = figure.add_axes(box)
            axes.set_axis_off()
            picture = _picture(data, cell, bases, thickness)
            if isinstance(picture, str):
                _placeholder(axes, picture, layout.bands.small)
            else:
                axes.imshow(picture, interpolation="none", resample=False, aspect="equal")


def _placeholder(axes: Axes, note: str, size: float) -> None:
    axes.set_axis_on()
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_facecolor("#ececec")
    for spine in axes.spines.values():
        spine.set_visible(False)
    axes.text(0.5, 0.5, note, ha="center", va="center", size=size, color="#444444", wrap=True)


def _panel_legend_kind(config: FigureConfig, settings: PrintSettings) -> str:
    if settings.legend == "none" or config.view == "segments":
        return "none"
    return "bottom" if settings.legend == "inside" else settings.legend


def _legend_entries(config: FigureConfig, depth: int) -> list[Patch]:
    def rgb(color: Sequence[int]) -> tuple[float, ...]:
        return tuple(c / 255 for c in color)

    # Hatched as the pictures hatch pruned patches (viz.overlays): light / stripes for
    # dropped, amber \ stripes for patches pruned and fused into EViT's extra token.
    def hatched(color: Sequence[int], hatch: str, label: str) -> Patch:
        return Patch(facecolor=rgb(DROPPED_RGB), edgecolor=rgb(color), hatch=hatch, label=label)

    dropped = hatched(HATCH_RGB, "///", "dropped")
    fused = hatched(FUSED_RGB, "\\\\\\", "fused (EViT)")
    if config.view == "pruned":
        return [
            Patch(facecolor="white", edgecolor="#555555", label="own token (image colours)"),
            Patch(facecolor=rgb((170, 170, 170)), edgecolor="#555555", label="merged"),
            dropped,
            fused,
        ]
    if config.view == "depth":
        return [
            Patch(facecolor=rgb(NEVER_REDUCED_RGB), edgecolor="#555555", label="never reduced"),
            dropped,
            fused,
        ]
    return [hatched(HATCH_RGB, "///", "gone before"), hatched(FUSED_RGB, "\\\\\\", "fused")]


def _legend_width(
    config: FigureConfig, data: FigureData, size: float, family: str, dpi: int
) -> float:
    labels = [p.get_label() for p in _legend_entries(config, data.depth)]
    labels += [_bar_title(config)]
    return max(text_width(text, size, family, dpi) for text in labels) + 0.35


def _bar_title(config: FigureConfig) -> str:
    if config.view == "depth":
        return "reduced at layer"
    if config.view == "heatmap":
        return "importance (per picture)"
    return ""


def _colorbar_mappable(config: FigureConfig, depth: int) -> ScalarMappable | None:
    if config.view == "depth":
        colors = layer_colors(depth) / 255.0
        bounds = np.arange(depth + 1) - 0.5
        return ScalarMappable(BoundaryNorm(bounds, depth), ListedColormap(colors))
    if config.view == "heatmap":
        return ScalarMappable(Normalize(0.0, 1.0), ListedColormap(colormap_lut("inferno") / 255.0))
    return None


def _panel_legend(
    figure: Figure,
    config: FigureConfig,
    data: FigureData,
    place: str,
    box: tuple[float, float, float, float],
    size_in: tuple[float, float],
    small: float,
) -> None:
    """A colour bar (heatmap, token depth) and swatches for the view, inside ``box``
    (x, y, width, height in inches)."""
    width, height = size_in
    x, y, w, h = box
    mappable = _colorbar_mappable(config, data.depth)
    entries = _legend_entries(config, data.depth)
    options = {
        "handles": entries,
        "fontsize": small,
        "handlelength": 1.2,
        "handleheight": 1.0,
        "borderaxespad": 0.0,
        "borderpad": 0.0,
    }
    if place in ("bottom", "top"):
        # title line, bar, tick labels, from the top of the band down
        bar_y = y + h - GAP_IN - (_line_in(small) + BAR_IN if mappable is not None else h / 2)
        bar_w = min(2.0, 0.45 * w) if mappable is not None else 0.0
        if mappable is not None:
            box = (x / width, bar_y / height, bar_w / width, BAR_IN / height)
            cax = figure.add_axes(box, label=COLORBAR_LABEL)
            _colorbar(figure, cax, mappable, config, data.depth, "horizontal", small)
        anchor = ((x + bar_w + (0.15 if bar_w else 0.0)) / width, (bar_y + BAR_IN / 2) / height)
        figure.legend(
            loc="center left",
            bbox_to_anchor=anchor,
            ncol=len(entries),
            columnspacing=1.0,
            **options,
        )
        return
    bar_h = min(1.6, 0.6 * h - _line_in(small)) if mappable is not None else 0.0
    if mappable is not None:
        top = y + h - _line_in(small) - GAP_IN  # under the bar's title
        box = (x / width, (top - bar_h) / height, BAR_IN / width, bar_h / height)
        cax = figure.add_axes(box, label=COLORBAR_LABEL)
        _colorbar(figure, cax, mappable, config, data.depth, "vertical", small)
    below = y + h - (bar_h + _line_in(small) + GAP_IN + 0.12 if bar_h else 0.0)
    figure.legend(loc="upper left", bbox_to_anchor=(x / width, below / height), ncol=1, **options)


def _right_legend_height(config: FigureConfig, small: float) -> float:
    """The height a legend at the side needs: title, a short bar and the swatches."""
    entries = len(_legend_entries(config, 0))
    bar = 0.5 + 2 * _line_in(small) if _colorbar_mappable(config, 2) is not None else 0.0
    return bar + entries * 1.6 * _line_in(small)


def _band_height(small: float, has_bar: bool) -> float:
    """The legend band under or over a panel: title, bar and tick labels, or a line of
    swatches."""
    if not has_bar:
        return 2 * GAP_IN + _line_in(small)
    return 2 * GAP_IN + 2 * _line_in(small) + BAR_IN + 0.03


def _colorbar(
    figure: Figure,
    cax: Axes,
    mappable: ScalarMappable,
    config: FigureConfig,
    depth: int,
    orientation: str,
    small: float,
) -> None:
    bar = figure.colorbar(mappable, cax=cax, orientation=orientation)
    bar.outline.set_linewidth(0.4)
    bar.minorticks_off()
    if config.view == "depth":
        ticks = sorted({0, depth // 2, depth - 1})
        bar.set_ticks(ticks, labels=[str(t) for t in ticks])
    else:
        bar.set_ticks([0.0, 1.0], labels=["low", "high"])
    bar.ax.tick_params(labelsize=small, length=2, width=0.4, pad=1.5)
    if orientation == "horizontal":
        bar.ax.set_title(_bar_title(config), size=small, pad=2, loc="left")
    else:
        bar.ax.set_title(_bar_title(config), size=small, pad=3, loc="left")


# --------------------------------------------------------------------------- plots


def _plot(
    data: FigureData,
    settings: PrintSettings,
    draw: Callable[[Axes, FigureData, PrintSettings], list[Any]],
) -> Figure:
    """A single-axes plot at the print size, laid out by matplotlib's constrained layout
    inside the room the legend band and the caption leave."""
    family, size, dpi = settings.font_family, settings.font_size, settings.dpi
    small = max(MIN_TEXT_PT, size - 1)
    width = settings.width_in
    height = width * (settings.aspect if settings.aspect is not None else DEFAULT_ASPECT)
    figure = _new_figure(round(width * dpi), round(height * dpi), dpi, layout="constrained")
    axes = figure.add_subplot()
    handles = draw(axes, data, settings)
    caption = _caption_lines(data, settings, width - 2 * PAD_IN)
    caption_h = len(caption) * _line_in(small) + (2 * PAD_IN if caption else 0.0)
    legend_h = 0.0
    if handles and settings.legend in ("bottom", "top"):
        columns = _legend_columns(handles, width - 2 * PAD_IN, small, family, dpi)
        lines = math.ceil(len(handles) / columns)
        legend_h = lines * _line_in(small) * 1.25 + 2 * PAD_IN
        anchor_y = (caption_h if settings.legend == "bottom" else height - legend_h) / height
        figure.legend(
            handles=_row_major(handles, columns),
            loc="lower center",
            bbox_to_anchor=(0.5, anchor_y + PAD_IN / height),
            ncol=columns,
            fontsize=small,
            columnspacing=1.2,
            borderaxespad=0.0,
        )
    elif handles and settings.legend == "right":
        axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=small)
    elif handles and settings.legend == "inside":
        axes.legend(handles=handles, loc="best", fontsize=small)
    bottom = caption_h + (legend_h if settings.legend == "bottom" else 0.0)
    top = legend_h if settings.legend == "top" else 0.0
    axes.margins(y=0.08)
    # The y label runs along the axes: wrap it to their height (less the x axis' labels).
    room = height - bottom - top - 2 * PAD_IN - 2.5 * _line_in(size)
    label = axes.get_ylabel()
    axes.set_ylabel("\n".join(wrap(label, max(room, 0.5), size, family, dpi, max_lines=2)))
    if settings.title:
        figure.suptitle(settings.title, size=size + 1)
    if bottom + top > 0.8 * height:
        raise TokenScopeError(
            "figure configuration: 'print.aspect' leaves no room for the plot under its "
            "legend and caption; give a taller aspect or turn the caption off"
        )
    engine = figure.get_layout_engine()
    assert engine is not None
    engine.set(
        w_pad=PAD_IN,
        h_pad=PAD_IN,
        rect=(0.0, bottom / height, 1.0, (height - bottom - top) / height),
    )
    if caption:
        figure.text(
            PAD_IN / width,
            PAD_IN / height,
            "\n".join(caption),
            ha="left",
            va="bottom",
            size=small,
            linespacing=LINE,
        )
    return figure


def _row_major(handles: list[Any], columns: int) -> list[Any]:
    """Handles reordered so that a legend, which fills column by column, reads by rows."""
    rows = math.ceil(len(handles) / columns)
    order = [r * columns + c for c in range(columns) for r in range(rows)]
    return [handles[i] for i in order if i < len(handles)]


def _legend_columns(handles: list[Any], width_in: float, size: float, family: str, dpi: int) -> int:
    """As many legend columns as fit the width (entries: handle, gap, label, spacing)."""
    entry = max(text_width(h.get_label(), size, family, dpi) for h in handles)
    entry += (2.6 + 0.8 + 1.2) * size / 72.0
    return max(1, min(len(handles), int(width_in // entry)))


def _draw_tradeoff(axes: Axes, data: FigureData, settings: PrintSettings) -> list[Any]:
    config = data.config
    assert config.tradeoff is not None
    x_name = config.tradeoff.x
    reference = next((p for p in data.points if p.method == "none"), None)
    methods = list(dict.fromkeys(p.method for p in data.points if p.method != "none"))
    styles = series_styles(len(methods), settings.palette)
    handles = []
    for method, style in zip(methods, styles, strict=True):
        group = sorted(
            (p for p in data.points if p.method == method and _x(p, x_name) is not None),
            key=lambda p: _x(p, x_name),
        )
        if not group:
            continue
        xs = [_x(p, x_name) for p in group]
        estimates = [p.metrics[data.metric] for p in group]
        means = [e.mean for e in estimates]
        errors = [[e.mean - e.low for e in estimates], [e.high - e.mean for e in estimates]]
        line = axes.errorbar(
            xs,
            means,
            yerr=errors,
            color=style.color,
            marker=style.marker,
            linestyle=style.dash,
            capsize=1.8,
            elinewidth=0.7,
            capthick=0.7,
            markeredgewidth=0.8,
            label=data.method_labels.get(method, method),
        )
        handles.append(line)
        open_points = [(x, m) for x, m, p in zip(xs, means, group, strict=True) if p.extrapolated]
        if open_points:
            axes.plot(
                *zip(*open_points, strict=True),
                linestyle="none",
                marker=style.marker,
                markerfacecolor="white",
                markeredgecolor=style.color,
                markeredgewidth=0.8,
            )
    if reference is not None and data.metric in reference.metrics:
        value = reference.metrics[data.metric].mean
        axes.axhline(value, color=FULL_MODEL_COLOR, linestyle=(0, (1.0, 1.5)), linewidth=0.8)
        if _x(reference, x_name) is not None:
            (star,) = axes.plot(
                [_x(reference, x_name)],
                [value],
                linestyle="none",
                marker="*",
                markersize=7,
                color=FULL_MODEL_COLOR,
                markeredgecolor="black",
                markeredgewidth=0.4,
                label="Full model",
            )
            handles.append(star)
    arrow = "\u00a0↑" if data.higher_is_better else "\u00a0↓"  # no-break space: kept together
    axes.set_xlabel(_X_TITLES[x_name])
    axes.set_ylabel(f"{data.metric_label}{arrow}")
    axes.grid(True, linewidth=0.3, color="#dddddd")
    axes.set_axisbelow(True)
    return handles


def _draw_tokens(axes: Axes, data: FigureData, settings: PrintSettings) -> list[Any]:
    layers = list(range(data.depth))
    handles = []
    if data.full is not None:
        (full,) = axes.plot(
            layers,
            data.full.cost.tokens,
            color=FULL_MODEL_COLOR,
            linewidth=2.0,
            label="Full model",
        )
        handles.append(full)
    styles = series_styles(len(data.series), settings.palette)
    for series, style in zip(data.series, styles, strict=True):
        (line,) = axes.plot(
            layers,
            series.cost.tokens,
            color=style.color,
            marker=style.marker,
            linestyle=style.dash,
            label=series.label,
        )
        handles.append(line)
    axes.set_xlabel("Layer (0-based)")
    axes.set_ylabel("Tokens after the layer")
    axes.set_ylim(bottom=0)
    axes.set_xticks(_layer_ticks(data.depth, settings.width_in))
    axes.grid(True, axis="y", linewidth=0.3, color="#dddddd")
    axes.set_axisbelow(True)
    return handles


def _draw_gmacs(axes: Axes, data: FigureData, settings: PrintSettings) -> list[Any]:
    layers = np.arange(data.depth)
    everything = ([data.full] if data.full is not None else []) + list(data.series)
    styles = series_styles(len(data.series), settings.palette)
    width = 0.84 / len(everything)
    handles = []
    for k, series in enumerate(everything):
        if series is data.full:
            color, hatch = FULL_MODEL_COLOR, FULL_HATCH
        else:
            style = styles[k - (1 if data.full is not None else 0)]
            color, hatch = style.color, style.hatch
        bars = axes.bar(
            layers - 0.42 + (k + 0.5) * width,
            series.cost.gmacs_per_layer(),
            width=width,
            color=color,
            hatch=hatch,
            edgecolor="#222222",
            linewidth=0.3,
            label=f"{series.label} ({series.cost.gmacs:.2f} GMACs)",
        )
        handles.append(bars)
    axes.set_xlabel("Layer (0-based)")
    axes.set_ylabel("GMACs in the layer")
    axes.set_xticks(_layer_ticks(data.depth, settings.width_in))
    axes.grid(True, axis="y", linewidth=0.3, color="#dddddd")
    axes.set_axisbelow(True)
    return handles


def _layer_ticks(depth: int, width_in: float) -> list[int]:
    """Layer numbers for the x axis: about two per inch of figure width, so they never
    run into each other."""
    step = math.ceil(depth / max(4, int(width_in * 2.2)))
    return list(range(0, depth, step))


def _x(point: Point, name: str) -> float | None:
    value = getattr(point, name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


__all__ = [
    "EXPORT_RC",
    "FORMATS",
    "SeriesStyle",
    "available_fonts",
    "check_font",
    "draw_figure",
    "export",
    "figure_bytes",
    "series_styles",
    "style_rc",
    "text_width",
    "wrap",
]
