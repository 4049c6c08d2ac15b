"""Compare: two to four schedules side by side on one image, optionally at matched cost,
with the agreement metrics of Haurum et al. and grids over several images.

Layout only. Models, images and single-image runs come from ``app_pages.common`` (shared with
Explore, so a choice made there carries over); the inputs, the runs and each column's views
from ``app_pages.compare_columns``; the records, matched cost, agreement, grid plans and the
export record from ``analysis.comparison``; pictures, grids, charts, tables and sentences
from ``viz.compare``, ``viz.compare_grids`` and ``viz.compare_tables``. Everything that
depends on the shared layer lives in the ``comparison`` fragment, so moving the layer slider
only redraws.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import streamlit as st

from analysis import LoadedModel, Schedule, TokenScopeError
from analysis.agreement import METRICS
from analysis.comparison import (
    LETTERS,
    BatchRuns,
    Column,
    ComparedImages,
    GridPlan,
    Target,
    agreement_runs,
    agreement_series,
    agreement_with_first,
    comparison_config,
    default_grid_layers,
    grid_layers,
    grid_plan,
    metric_or_default,
    pair_indices,
    runs_matrix,
    shown_layers,
    view_layer,
)
from analysis.figure_config import panel_config
from analysis.images import CropInfo, fit_to_input
from analysis.solver import full_gmacs
from app_pages import compare_columns
from app_pages.common import (
    ImageChoice,
    ModelKey,
    TimedRun,
    cached_run,
    crop_sidebar,
    display_array,
    image_sidebar,
    keep_widget_state,
    show_notices,
)
from app_pages.figures_link import figure_image, send_to_figures
from app_pages.model_inputs import model_sidebar
from viz import compare, compare_grids, compare_tables, overlays, summary
from viz.compare_tables import images_word

PAGE_KEYS = (
    "compare_count",
    "compare_matched",
    "compare_target_unit",
    "compare_target_percent",
    "compare_target_gmacs",
    "compare_tolerance",
    "compare_set",
    "compare_layer",
    "compare_views",
    "compare_segment_mode",
    "compare_metric",
    "compare_measure",
    "compare_pairs",
    "compare_grid_view",
    "compare_grid_layers",
    *(f"compare_schedule_{i}" for i in range(len(LETTERS))),
    *(f"compare_preset_{i}" for i in range(len(LETTERS))),
)


# --------------------------------------------------------------------------- page


def compare_page() -> None:
    keep_widget_state(*PAGE_KEYS)
    model, model_key = model_sidebar()
    choice = image_sidebar()
    choice, crop = crop_sidebar(choice, model)  # the padded canvas, when padding
    samples = compare_columns.image_set_sidebar()

    st.title("Compare")
    st.caption(
        "Two to four schedules on the same image, side by side: what each keeps, merges and "
        "drops at one shared layer, what it costs, and how much the methods agree."
    )
    show_notices()
    count, target = compare_columns.comparison_controls(full_gmacs(model.facts, model.module))
    texts = compare_columns.schedule_inputs(model, count)
    try:
        full = cached_run(
            model_key.cache_key(), choice.key, Schedule().to_json(), model, choice.image
        )
    except TokenScopeError as error:
        st.error(str(error))
        st.stop()
        return
    columns = [
        compare_columns.run_column(i, text, model, model_key, choice, target)
        for i, text in enumerate(texts)
    ]
    compare_columns.column_status(columns)
    images = compare_columns.image_set(choice, samples, model)
    comparison(model, model_key, choice, crop, full, columns, images, target)


@st.fragment
def comparison(
    model: LoadedModel,
    model_key: ModelKey,
    choice: ImageChoice,
    crop: CropInfo,
    full: TimedRun,
    columns: list[Column],
    images: ComparedImages,
    target: Target | None,
) -> None:
    """Everything that depends on the shared layer; the slider reruns only this."""
    good = [c for c in columns if c.ok]
    layer, views, segment_mode = compare_columns.view_controls(model.facts.depth, good)
    colors = compare.method_colors(len(LETTERS))
    image = display_array(choice.key, crop, full.result.trace.grid, choice.image)
    source = [*model_key.cache_key(), choice.key]
    for column, cell in zip(columns, st.columns(len(columns)), strict=True):
        with cell:
            compare_columns.column_views(
                column, source, image, layer, views, segment_mode, full, model, colors
            )
    compare_columns.view_legends(views, model.facts.depth)
    note = summary.attention_artefact_note(model.name, [m for c in good for m in c.methods])
    if note:
        st.caption(f":material/info: {note}")

    st.subheader("Summary", divider="gray")
    metric_name = metric_or_default(st.session_state.get("compare_metric", "iou"))
    batch = compare_columns.set_runs(columns, images, model, model_key) if good else BatchRuns()
    summary_section(good, columns, full, batch, metric_name, layer, colors)

    st.subheader("Agreement between methods", divider="gray")
    agreement_section(good, batch, images, layer, colors)

    st.subheader("Grids", divider="gray")
    grid_view, chosen = grids(model, model_key, good, batch, images, layer, segment_mode)

    st.subheader("Export", divider="gray")
    fields = ("name", "weights", "device", "learned")
    config = comparison_config(
        {name: getattr(model_key, name) for name in fields},
        images,
        columns,
        layer=layer,
        view=grid_view,
        grid_layers=chosen,
        target=target,
        metric=metric_name,
    )
    left, right = st.columns([1, 3], vertical_alignment="center")
    left.download_button(
        "Configuration JSON",
        data=config.to_json(),
        file_name="compare_config.json",
        mime="application/json",
        key="compare_dl_config",
        on_click="ignore",
        icon=":material/download:",
    )
    right.caption(
        "Model, images, schedules (as written and as run), layer, view, grid layers, metric "
        "and matched target. **Send to Figures** opens the Figures page on either grid, "
        "labelled with readable method names and sized for print (PDF, SVG, PNG)."
    )
    if good:
        figure_buttons(model, good, images, layer, grid_view, chosen)


def figure_buttons(
    model: LoadedModel,
    good: list[Column],
    images: ComparedImages,
    layer: int,
    view: str,
    grid_layers: list[int],
) -> None:
    """Send either grid to the Figures page, with the schedules that ran."""
    specs = [
        figure_image(key, label, image)
        for key, label, image in zip(images.keys, images.labels, images.images, strict=True)
    ]
    pictures = {spec.source: image for spec, image in zip(specs, images.images, strict=True)}
    schedules = [column.ran for column in good]
    left, right = st.columns(2)
    if left.button("Send images × methods to Figures", icon=":material/image:"):
        config = panel_config(model, schedules, specs, view=view, layers=[layer], rows="images")
        send_to_figures(config, model=model, images=pictures)
    if right.button("Send methods × layers to Figures", icon=":material/image:"):
        config = panel_config(
            model, schedules, specs[:1], view=view, layers=grid_layers, rows="methods"
        )
        send_to_figures(config, model=model, images={specs[0].source: images.images[0]})


def summary_section(
    good: list[Column],
    columns: list[Column],
    full: TimedRun,
    batch: BatchRuns,
    metric_name: str,
    layer: int,
    colors: list[str],
) -> None:
    """The summary table, tokens and GMACs per layer, and which columns are left out."""
    if not good:
        st.info("No column ran; fix the schedules above.")
    else:
        agreements = agreement_with_first(good, batch, metric_name, layer)
        st.dataframe(
            compare_tables.summary_table(good, full.result, batch, agreements, metric_name),
            hide_index=True,
            column_config={
                "GMACs": st.column_config.NumberColumn(format="%.3f"),
                "reduction %": st.column_config.NumberColumn(format="%.1f %%"),
                "run ms": st.column_config.NumberColumn(format="%.0f"),
            },
        )
        st.caption(
            compare_tables.summary_caption(
                good, full.result, full.seconds, full.device, metric_name, layer
            )
        )
        left, right = st.columns(2)
        used = [colors[c.index] for c in good]
        tokens = {c.name: c.result.tokens for c in good if c.result is not None}
        left.plotly_chart(
            compare.tokens_lines(
                tokens, full.result.tokens, layer, colors=used, styles=[c.index for c in good]
            ),
            key="compare_tokens",
        )
        costs = {c.name: c.result.cost for c in good if c.result is not None}
        right.plotly_chart(
            compare.gmacs_bars(costs, full.result.cost, layer, colors=used), key="compare_gmacs"
        )
    left_out = compare_tables.left_out_note(columns)
    if left_out:
        st.caption(left_out)


def agreement_section(
    good: list[Column],
    batch: BatchRuns,
    images: ComparedImages,
    layer: int,
    colors: list[str],
) -> None:
    if len(good) < 2:
        st.info("Agreement needs at least two columns that ran.")
        return
    count = len(images)
    controls = st.columns(3, vertical_alignment="bottom")
    metric_name = controls[0].selectbox(
        "Metric",
        list(METRICS),
        format_func=lambda name: METRICS[name].label,
        key="compare_metric",
        help="After Haurum et al. (2023): kept-patch IoU for pruning, ARI and V-measure of "
        "the patch clusterings for merging, token-depth correlation, and linear CKA of the "
        "final features over the image set.",
    )
    metric = METRICS[metric_name]
    if metric.needs_features:
        controls[1].markdown(f"Over the **image set** ({images_word(count)})")
        measure = "set"
    else:
        measure = controls[1].radio(
            "Measured on",
            ["image", "set"],
            format_func={"image": "this image", "set": f"image set (mean of {count})"}.get,
            horizontal=True,
            key="compare_measure",
        )
    pairs = controls[2].radio(
        "Lines",
        ["first", "all"],
        horizontal=True,
        key="compare_pairs",
        format_func={"first": f"each vs {good[0].letter}", "all": "all pairs"}.get,
        disabled=not metric.per_layer,
    )
    st.caption(f"**{metric.label}**: {metric.description}.")
    runs = agreement_runs(good, batch, measure)
    if len(runs.runs) < 2:
        st.info("Fewer than two methods ran on the image set.")
        return
    left, right = st.columns(2)
    title = compare_tables.heatmap_title(metric_name, layer, measure, count)
    heatmap = compare.agreement_heatmap(runs_matrix(runs, metric_name, layer), metric, title=title)
    left.plotly_chart(heatmap, key="compare_heatmap")
    if not metric.per_layer:
        right.info(
            f"{metric.label} is one number per pair of methods, not one per layer, so "
            "there is no line over layers.",
            icon=":material/info:",
        )
    else:
        indices = pair_indices(len(runs.columns), pairs)
        line_colors = (
            [colors[runs.columns[j].index] for _, j in indices] if pairs == "first" else None
        )
        lines = compare.agreement_lines(
            agreement_series(runs, metric_name, pairs), metric, layer, colors=line_colors
        )
        right.plotly_chart(lines, key="compare_lines")
    note = compare_tables.cka_note(metric_name, count)
    if note is not None:
        (st.warning if note[0] == "warning" else st.caption)(note[1])


def grids(
    model: LoadedModel,
    model_key: ModelKey,
    good: list[Column],
    batch: BatchRuns,
    images: ComparedImages,
    layer: int,
    segment_mode: str,
) -> tuple[str, list[int]]:
    """The images × methods grid at the shared layer and the methods × layers grid of the
    page's image, each with its PNG download; returns the view and the grid's layers."""
    depth = model.facts.depth
    controls = st.columns([2, 3], vertical_alignment="bottom")
    view = controls[0].radio(
        "View",
        list(compare.VIEWS),
        format_func=compare.VIEWS.get,
        horizontal=True,
        key="compare_grid_view",
    )
    spread = default_grid_layers(depth)
    if any(v >= depth for v in st.session_state.get("compare_grid_layers", [])):
        st.session_state["compare_grid_layers"] = spread  # chosen on a deeper model
    st.session_state.setdefault("compare_grid_layers", spread)
    chosen = grid_layers(
        controls[1].multiselect(
            "Layers of the methods × layers grid", list(range(depth)), key="compare_grid_layers"
        ),
        layer,
    )
    if not good:
        st.info("No column ran, so there is nothing to lay out.")
        return view, chosen
    layers = shown_layers(view, chosen, depth)
    plan = grid_plan(
        model_key.describe(), model_key.cache_key(), images, good, view, segment_mode, depth
    )
    build = partial(images_grid, plan, model, good, batch, images, layer)
    by_image, shown = cached_grid(plan.signature("images", view_layer(view, layer)), build)
    st.markdown(compare_grids.images_heading(plan, layer))
    st.image(shown, output_format="PNG")
    download("Images × methods PNG", by_image, f"compare_images_{view}_layer{layer}.png")

    build = partial(layers_grid, plan, model, good, images, layers)
    by_layer, shown = cached_grid(plan.signature("layers", layers), build)
    st.markdown(f"**{len(good)} methods × {len(layers)} layers**, {images.labels[0]}")
    if view == "depth":
        st.caption("Token depth already sums up every layer, so this grid has one column.")
    st.image(shown, output_format="PNG")
    download("Methods × layers PNG", by_layer, f"compare_layers_{view}.png")
    return view, chosen


@st.cache_data(show_spinner=False, max_entries=12)
def cached_grid(signature: str, _build: Callable[[], np.ndarray]) -> tuple[np.ndarray, bytes]:
    """A grid and its quick PNG, drawn once per signature (revisiting a layer is free)."""
    grid = _build()
    return grid, overlays.to_png(grid, fast=True)


def images_grid(
    plan: GridPlan,
    model: LoadedModel,
    good: list[Column],
    batch: BatchRuns,
    images: ComparedImages,
    layer: int,
) -> np.ndarray:
    """The images × methods grid; its thumbnails are made inside the cached build."""
    smalls = thumbnails(model, images, good[0].result.trace.grid)
    return compare_grids.images_grid(plan, smalls, good, batch, images, layer)


def layers_grid(
    plan: GridPlan,
    model: LoadedModel,
    good: list[Column],
    images: ComparedImages,
    layers: list[int],
) -> np.ndarray:
    """The methods × layers grid on the page's image (its thumbnail alone)."""
    (base,) = thumbnails(model, images, good[0].result.trace.grid, count=1)
    return compare_grids.layers_grid(plan, base, good, images.labels[0], layers)


def thumbnails(
    model: LoadedModel, images: ComparedImages, grid: tuple[int, int], count: int | None = None
) -> list[np.ndarray]:
    pairs = list(zip(images.keys, images.images, strict=True))[:count]
    return [
        overlays.thumbnail(
            display_array(key, fit_to_input(image, model.data_config)[1], grid, image),
            2 * compare_grids.GRID_CELL,
        )
        for key, image in pairs
    ]


def download(label: str, picture: np.ndarray, name: str) -> None:
    st.download_button(
        label,
        data=partial(overlays.to_png, picture),
        file_name=name,
        mime="image/png",
        key=f"compare_dl_{label}",
        on_click="ignore",
        icon=":material/download:",
        help="One PNG with the labels drawn in, encoded when you click",
    )


compare_page()
