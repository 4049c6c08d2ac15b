"""Figures: a print figure of what Explore, Compare or Trade-off showed.

Layout only. A page sends its figure here (``app_pages.figures_link.send_to_figures``), or a
configuration is uploaded or an example opened. The print settings live in the sidebar;
the preview is the PNG itself, shown at its printed size. The data comes from
``analysis.figure_data`` and the drawing from ``viz.figures``, the same code that
``python -m analysis figure`` runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from functools import partial
from pathlib import Path

import streamlit as st
from PIL import Image

from analysis import LoadedModel, TokenScopeError
from analysis.figure_config import (
    DEFAULT_ASPECT,
    FONT_SIZE_RANGE,
    LEGENDS,
    PALETTES,
    VIEWS,
    WIDTH_PRESETS,
    FigureConfig,
    PrintSettings,
)
from analysis.figure_data import FigureData, build_figure_data, load_figure_model
from app_pages.figures_link import CONFIG_KEY, IMAGES_KEY, MODEL_KEY
from app_pages.model_inputs import cached_model
from viz.figures import FORMATS, available_fonts, draw_figure, export

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
PREVIEW_DPI = 96  # CSS pixels per inch: the preview is as wide as the printed figure
CUSTOM = "Custom"
WIDTHS = {f"One column ({WIDTH_PRESETS['one column']:g} in)": WIDTH_PRESETS["one column"]}
WIDTHS[f"Two columns ({WIDTH_PRESETS['two columns']:g} in)"] = WIDTH_PRESETS["two columns"]
DPIS = (150, 300, 600)
FONT_SIZES = tuple(
    FONT_SIZE_RANGE[0] + 0.5 * i
    for i in range(int(2 * (FONT_SIZE_RANGE[1] - FONT_SIZE_RANGE[0])) + 1)
)
KIND_TITLES = {
    "panel": "Panel",
    "tradeoff": "Trade-off plot",
    "tokens": "Tokens per layer",
    "gmacs": "GMACs per layer",
}
LEGEND_TITLES = {
    "bottom": "Below",
    "right": "Right",
    "top": "Above",
    "inside": "Inside the plot",
    "none": "None",
}


# --------------------------------------------------------------------------- sources


def open_sources() -> None:
    """Upload a configuration, or open one of the examples; either replaces the figure."""
    with st.expander("Open a figure configuration", expanded=CONFIG_KEY not in st.session_state):
        upload = st.file_uploader(
            "Figure configuration (JSON)",
            type=["json"],
            key="figure_upload",
            help="A configuration downloaded from this page, or written by hand. Its images "
            "and weights are checked against the hashes it records.",
        )
        if upload is not None:
            data = upload.getvalue()
            digest = hashlib.sha256(data).hexdigest()
            if st.session_state.get("figure_upload_digest") != digest:
                st.session_state["figure_upload_digest"] = digest
                try:
                    config = FigureConfig.from_json(data.decode("utf-8", errors="replace"))
                except TokenScopeError as error:
                    st.session_state["figure_upload_error"] = f"{upload.name}: {error}"
                else:
                    st.session_state.pop("figure_upload_error", None)
                    set_figure(config)
        examples = sorted(EXAMPLES_DIR.glob("*.json"))
        if examples:
            left, right = st.columns([3, 1], vertical_alignment="bottom")
            name = left.selectbox(
                "…or an example (default model, sample images)",
                [path.stem for path in examples],
                key="figure_example",
            )
            if right.button("Open example", key="figure_open_example"):
                text = (EXAMPLES_DIR / f"{name}.json").read_text(encoding="utf-8")
                set_figure(FigureConfig.from_json(text))
        if "figure_upload_error" in st.session_state:
            st.error(st.session_state["figure_upload_error"])


def set_figure(config: FigureConfig) -> None:
    """Make ``config`` the page's figure (with no model or images of another page)."""
    st.session_state[CONFIG_KEY] = config
    st.session_state[MODEL_KEY] = None
    st.session_state[IMAGES_KEY] = {}
    st.session_state.pop("figure_upload_error", None)


# --------------------------------------------------------------------------- print settings


def load_widgets(config: FigureConfig) -> None:
    """Set the print-setting widgets from a newly arrived configuration."""
    settings = config.print
    preset = next((k for k, v in WIDTHS.items() if abs(v - settings.width_in) < 1e-9), CUSTOM)
    st.session_state["fig_width_preset"] = preset
    st.session_state["fig_width"] = float(settings.width_in)
    st.session_state["fig_auto_height"] = settings.aspect is None
    aspect = settings.aspect if settings.aspect is not None else DEFAULT_ASPECT
    st.session_state["fig_aspect"] = float(aspect)
    st.session_state["fig_font"] = settings.font_family
    st.session_state["fig_font_size"] = _nearest(FONT_SIZES, settings.font_size)
    st.session_state["fig_palette"] = settings.palette
    st.session_state["fig_legend"] = settings.legend
    st.session_state["fig_dpi"] = settings.dpi
    st.session_state["fig_caption"] = settings.caption
    st.session_state["fig_title"] = settings.title


def print_controls(config: FigureConfig) -> PrintSettings:
    """The sidebar's print settings, starting from the configuration's."""
    sidebar = st.sidebar
    sidebar.header("Print settings")
    preset = sidebar.radio("Width", [*WIDTHS, CUSTOM], key="fig_width_preset")
    if preset == CUSTOM:
        width = sidebar.number_input(
            "Width (inches)", min_value=1.0, max_value=20.0, step=0.1, key="fig_width"
        )
    else:
        width = WIDTHS[preset]
    aspect: float | None
    if config.kind == "panel" and sidebar.toggle(
        "Height from the grid", key="fig_auto_height", help="Off: set height ÷ width yourself."
    ):
        aspect = None
    else:
        aspect = sidebar.number_input(
            "Height ÷ width", min_value=0.1, max_value=3.0, step=0.05, key="fig_aspect"
        )
    fonts = list(dict.fromkeys([*available_fonts(), config.print.font_family]))
    family = sidebar.selectbox(
        "Font",
        fonts,
        key="fig_font",
        help="matplotlib's own fonts (DejaVu, STIX) give the same figure on every machine.",
    )
    size = sidebar.select_slider("Font size (pt)", FONT_SIZES, key="fig_font_size")
    palette = sidebar.selectbox(
        "Palette", list(PALETTES), key="fig_palette", help="Colour-blind safe by default."
    )
    legend = sidebar.selectbox("Legend", LEGENDS, format_func=LEGEND_TITLES.get, key="fig_legend")
    dpis = list(dict.fromkeys([*DPIS, config.print.dpi]))
    dpi = sidebar.selectbox(
        "DPI of the pictures and the PNG",
        sorted(dpis),
        key="fig_dpi",
        help="Image panels are rendered at this resolution; text and plots stay vector in "
        "PDF and SVG.",
    )
    caption = sidebar.toggle(
        "Provenance caption", key="fig_caption", help="Model, weights and images, under it."
    )
    title = sidebar.text_input("Title (optional)", key="fig_title")
    return PrintSettings(
        width_in=float(width),
        aspect=None if aspect is None else float(aspect),
        font_family=str(family),
        font_size=float(size),
        palette=str(palette),
        legend=str(legend),
        dpi=int(dpi),
        caption=bool(caption),
        title=str(title),
    )


# --------------------------------------------------------------------------- building


@st.cache_resource(show_spinner="Loading the figure's model…", max_entries=2)
def model_for(spec_json: str, _config: FigureConfig) -> LoadedModel:
    """The configuration's model with its extra learned files (read once)."""
    return load_figure_model(_config.model, "cpu")


def figure_model(config: FigureConfig) -> LoadedModel | None:
    """The model the sending page ran, else the configuration's, on the CPU."""
    if config.kind == "tradeoff":
        return None
    sent = st.session_state.get(MODEL_KEY)
    if isinstance(sent, LoadedModel):
        return sent
    spec = config.model
    if not any(item.path for item in spec.learned) and spec.img_size is None:
        weights = spec.weights or ("default" if spec.name == "default" else "hub")
        return cached_model(spec.name, weights, "cpu")
    return model_for(repr(spec), config)


@st.cache_resource(show_spinner="Running the schedules…", max_entries=4)
def figure_data(
    data_key: str,
    _config: FigureConfig,
    _model: LoadedModel | None,
    _images: dict[str, Image.Image],
) -> FigureData:
    """The figure's data, gathered once per configuration (print settings aside)."""
    return build_figure_data(_config, model=_model, images=_images)


@st.cache_data(show_spinner="Drawing…", max_entries=8)
def figure_file(config_json: str, fmt: str, _data: FigureData) -> bytes:
    """The figure as a file, drawn once per configuration and format."""
    return export(draw_figure(_data), fmt)


# --------------------------------------------------------------------------- page


def figures_page() -> None:
    st.title("Figures")
    st.caption(
        "Print figures for papers: PDF and SVG keep text and plots as vectors with embedded "
        "TrueType fonts; pictures are rendered at the chosen DPI. Send a figure from "
        "Explore, Compare or Trade-off, upload a configuration, or open an example. The "
        "configuration rebuilds the same figure with "
        "`python -m analysis figure --config fig.json --out fig.pdf`."
    )
    open_sources()
    pending = st.session_state.get(CONFIG_KEY)
    if not isinstance(pending, FigureConfig):
        st.info(
            "No figure yet. Use **Send to Figures** on Explore, Compare or Trade-off, or "
            "open a configuration above."
        )
        return
    loaded = pending.to_json()
    if st.session_state.get("figure_loaded") != loaded:
        st.session_state["figure_loaded"] = loaded
        load_widgets(pending)
    settings = print_controls(pending)
    config = dataclasses.replace(pending, print=settings)
    st.subheader(_describe(config), divider="gray")
    images = st.session_state.get(IMAGES_KEY) or {}
    try:
        data = figure_data(config.data_key, config, figure_model(config), images)
        data = dataclasses.replace(data, config=dataclasses.replace(data.config, print=settings))
        png = figure_file(data.config.to_json(), "png", data)
    except TokenScopeError as error:
        st.error(str(error))
        return
    with Image.open(io.BytesIO(png)) as image:
        pixels = image.size
    st.caption(
        f"{settings.width_in:g} × {pixels[1] / settings.dpi:.2f} in at {settings.dpi} dpi "
        f"(PNG {pixels[0]} × {pixels[1]} px). The preview below is the PNG at its printed "
        "size (96 screen pixels per inch)."
    )
    st.image(png, width=max(1, round(settings.width_in * PREVIEW_DPI)))
    downloads(data, png)


def downloads(data: FigureData, png: bytes) -> None:
    """The figure in each format, and its configuration."""
    config = data.config
    stem = f"figure_{config.kind}" + (f"_{config.view}" if config.kind == "panel" else "")
    columns = st.columns(4)
    for column, fmt in zip(columns, ("pdf", "svg", "png"), strict=False):
        payload = png if fmt == "png" else partial(figure_file, config.to_json(), fmt, data)
        column.download_button(
            fmt.upper(),
            data=payload,
            file_name=f"{stem}.{fmt}",
            mime=FORMATS[fmt],
            key=f"figure_dl_{fmt}",
            on_click="ignore",
            icon=":material/download:",
        )
    columns[3].download_button(
        "Configuration JSON",
        data=config.to_json(),
        file_name=f"{stem}.json",
        mime="application/json",
        key="figure_dl_config",
        on_click="ignore",
        icon=":material/download:",
        help="Model, weights and images with their hashes, schedules, view, layers and "
        "print settings: `python -m analysis figure --config` rebuilds this figure.",
    )
    if config.print.caption:
        st.caption(f"Caption line: {data.caption}")


def _describe(config: FigureConfig) -> str:
    title = KIND_TITLES[config.kind]
    if config.kind == "panel":
        rows = "methods × layers" if config.rows == "methods" else "images × methods"
        return f"{title}: {rows}, {VIEWS[config.view].lower()}"
    return title


def _nearest(options: tuple[float, ...], value: float) -> float:
    return min(options, key=lambda option: abs(option - value))


figures_page()
