"""The Compare page's columns: the inputs that set them up, their runs, and what each
column shows under its schedule.

Layout only. Defaults, matched cost and the records come from ``analysis.comparison``;
tiles, tables and sentences from ``viz.compare_tables``; pictures from ``viz.compare``.
Single-image runs are ``app_pages.common``'s, shared with Explore.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial

import numpy as np
import streamlit as st
from PIL import Image

from analysis import LoadedModel, Schedule, ScheduleError, TokenScopeError
from analysis.comparison import (
    LETTERS,
    BatchRuns,
    Column,
    ComparedImages,
    Target,
    batch_jobs,
    default_texts,
    solve,
    unavailable_methods,
    view_layer,
)
from analysis.solver import DEFAULT_TOLERANCE_PERCENT
from analysis.trained_settings import extrapolation
from app_pages.common import (
    SAMPLES,
    ImageChoice,
    ModelKey,
    TimedRun,
    cached_run,
    check_schedule,
    fit_choice,
    sample_image,
    timed_run,
    usable_presets,
)
from viz import compare, compare_tables, overlays
from viz.compare_tables import Tile, images_word
from viz.schedule_table import CUSTOM_PRESET, matching_preset

COLUMN_CHOICES = (2, 3, 4)
DEFAULT_COLUMNS = 3
DEFAULT_TARGET_PERCENT = 65.0
DEFAULT_SET_SIZE = 4
LEGEND_WIDTH, LEGEND_HEIGHT = 760, 26  # the views' legends under the columns, in pixels
SCHEDULE_HELP = (
    "`METHOD:key=value,…@LAYERS`, parts joined by `;`; layers are 0-based. In matched "
    "mode the method's strength parameter is solved and the rest is kept as written."
)


# --------------------------------------------------------------------------- inputs


def image_set_sidebar() -> list[str]:
    """The samples of the image set (the grid's rows and CKA's images)."""
    st.sidebar.header("Image set")
    st.session_state.setdefault("compare_set", list(SAMPLES)[:DEFAULT_SET_SIZE])
    chosen = st.sidebar.multiselect(
        "Samples for the grid and CKA",
        list(SAMPLES),
        key="compare_set",
        help="The page's image is always the first row. Linear CKA compares the methods' "
        "final features over these images.",
    )
    return list(chosen)


def comparison_controls(full: float) -> tuple[int, Target | None]:
    """How many columns, and the matched-cost target (None when matched mode is off)."""
    state = st.session_state
    state.setdefault("compare_count", DEFAULT_COLUMNS)
    state.setdefault("compare_target_percent", DEFAULT_TARGET_PERCENT)
    state.setdefault("compare_target_gmacs", round(full * DEFAULT_TARGET_PERCENT / 100, 2))
    state.setdefault("compare_tolerance", DEFAULT_TOLERANCE_PERCENT)
    cells = st.columns([1.2, 1, 1.1, 1.2, 1.2], vertical_alignment="bottom")
    count = cells[0].radio(
        "Methods side by side", COLUMN_CHOICES, horizontal=True, key="compare_count"
    )
    matched = cells[1].toggle(
        "Matched cost",
        key="compare_matched",
        help="Solve each column's strength parameter (ToMe's r, EViT's keep, …) so that "
        "all columns cost the same. Solved from the analytic FLOPs, without running the "
        "model; layers and other parameters stay as written.",
    )
    unit = cells[2].radio(
        "Target in",
        ["percent", "gmacs"],
        format_func={"percent": "% of full", "gmacs": "GMACs"}.get,
        horizontal=True,
        key="compare_target_unit",
        disabled=not matched,
    )
    if unit == "percent":
        value = cells[3].number_input(
            "Target, % of full",
            min_value=1.0,
            max_value=100.0,
            step=5.0,
            format="%.1f",
            key="compare_target_percent",
            disabled=not matched,
        )
    else:
        value = cells[3].number_input(
            f"Target GMACs (full: {full:.2f})",
            min_value=0.01,
            step=0.1,
            format="%.2f",
            key="compare_target_gmacs",
            disabled=not matched,
        )
    tolerance = cells[4].number_input(
        "Tolerance, % of full",
        min_value=0.0,
        max_value=25.0,
        step=0.5,
        format="%.1f",
        key="compare_tolerance",
        disabled=not matched,
        help="How far from the target a solved schedule may land and still count as matched",
    )
    target = Target(unit, float(value), float(tolerance)) if matched else None
    return int(count), target


def _on_preset(index: int, choices: dict[str, str]) -> None:
    title = st.session_state[f"compare_preset_{index}"]
    if title in choices:
        st.session_state[f"compare_schedule_{index}"] = choices[title]


def _on_text(index: int, choices: dict[str, str], depth: int) -> None:
    text = st.session_state[f"compare_schedule_{index}"]
    st.session_state[f"compare_preset_{index}"] = matching_preset(text, choices, depth)


def schedule_inputs(model: LoadedModel, count: int) -> list[str]:
    """A preset picker and a schedule box per column; returns the schedule texts."""
    state = st.session_state
    depth = model.facts.depth
    choices = usable_presets(model)
    options = [*choices, CUSTOM_PRESET]
    if any(f"compare_schedule_{index}" not in state for index in range(count)):
        explored, checked = explored_schedule(model)
        for index, text in enumerate(default_texts(model, choices, explored, checked)):
            state.setdefault(f"compare_schedule_{index}", text)
    texts = []
    for index, cell in enumerate(st.columns(count)):
        text_key, preset_key = f"compare_schedule_{index}", f"compare_preset_{index}"
        if state.get(preset_key) not in options:
            state[preset_key] = matching_preset(state[text_key], choices, depth)
        with cell:
            st.selectbox(
                f"Column {LETTERS[index]}",
                options,
                key=preset_key,
                on_change=_on_preset,
                args=(index, choices),
                help="Presets for every method that can run on this model",
            )
            st.text_input(
                "Schedule",
                key=text_key,
                on_change=_on_text,
                args=(index, choices, depth),
                help=SCHEDULE_HELP,
                label_visibility="collapsed",
            )
        texts.append(state[text_key])
    missing = unavailable_methods(model, choices, check_schedule)
    if missing:
        st.caption(
            f"Not available on this model: {', '.join(missing)}.",
            help="\n\n".join(f"**{label}**: {reason}" for label, reason in missing.items()),
        )
    return texts


def explored_schedule(model: LoadedModel) -> tuple[str | None, Schedule | None]:
    """The Explore page's schedule and its check, when it is valid on this model."""
    explored = st.session_state.get("schedule_text")
    if not isinstance(explored, str):
        return None, None
    try:
        return explored, check_schedule(explored, model)
    except ScheduleError:
        return None, None


# --------------------------------------------------------------------------- runs


def run_column(
    index: int,
    text: str,
    model: LoadedModel,
    model_key: ModelKey,
    choice: ImageChoice,
    target: Target | None,
) -> Column:
    """Check, solve (in matched mode) and run one column; any error stays in the column."""
    matched = None
    try:
        schedule = check_schedule(text, model)
        if target is not None:
            matched = solve(model, schedule, target)
            schedule = matched.schedule
        outside = matched.extrapolated if matched is not None else extrapolation(model, schedule)
        timed = cached_run(
            model_key.cache_key(), choice.key, schedule.to_json(), model, choice.image
        )
    except TokenScopeError as error:
        return Column(index, text, matched=matched, error=str(error))
    return Column(
        index,
        text,
        schedule=schedule,
        matched=matched,
        result=timed.result,
        seconds=timed.seconds,
        device=timed.device,
        extrapolated=outside,
    )


@st.cache_data(show_spinner=False, max_entries=24)
def cached_batch_run(
    model_key: tuple[str, str, str],
    image_keys: tuple[str, ...],
    schedule_json: str,
    _model: LoadedModel,
    _images: tuple[Image.Image, ...],
) -> TimedRun:
    """One batched forward pass over the image set, cached per (model, images, schedule)."""
    return timed_run(_model, list(_images), schedule_json)


def image_set(choice: ImageChoice, samples: list[str], model: LoadedModel) -> ComparedImages:
    """The page's image, then the samples, fitted as the page's image is (crop or pad)."""
    mode = st.session_state.get("fit_mode", "crop")
    keys, labels, images = [choice.key], [choice.label], [choice.image]
    for name in samples:
        sample, _ = fit_choice(ImageChoice(f"sample:{name}", name, sample_image(name)), model, mode)
        if sample.key not in keys:
            keys.append(sample.key)
            labels.append(sample.label)
            images.append(sample.image)
    return ComparedImages(tuple(keys), tuple(labels), tuple(images))


def set_runs(
    columns: list[Column], images: ComparedImages, model: LoadedModel, model_key: ModelKey
) -> BatchRuns:
    """The full model and every good column on the whole image set (batched, cached),
    with progress while anything is new. A failure stays with its column."""
    done = st.session_state.setdefault("compare_batches_done", set())
    key, count = model_key.cache_key(), images_word(len(images))
    jobs = batch_jobs(columns)
    fresh = [job for job in jobs if (key, images.keys, job.schedule_json) not in done]
    status = None
    if fresh:
        label = f"Running {compare_tables.runs_label(fresh)} on {count}…"
        status = st.status(label, expanded=False)
    full, runs = None, {}
    for job in jobs:
        if status is not None:
            what = "the full model" if job.index is None else f"column {LETTERS[job.index]}"
            status.update(label=f"Running {what} on {count}…")
        try:
            timed = cached_batch_run(key, images.keys, job.schedule_json, model, images.images)
        except (TokenScopeError, RuntimeError) as error:  # torch's too: the page goes on
            if job.index is not None:
                runs[job.index] = str(error)
            continue
        done.add((key, images.keys, job.schedule_json))
        if job.index is None:
            full = timed.result
        else:
            runs[job.index] = timed.result
    if status is not None:
        label = f"Ran {compare_tables.runs_label(fresh)} on {count}"
        status.update(label=label, state="complete")
    return BatchRuns(full, runs)


# --------------------------------------------------------------------------- columns


def column_status(columns: list[Column]) -> None:
    """Per column: what matched mode set, or the column's error."""
    for column, cell in zip(columns, st.columns(len(columns)), strict=True):
        with cell:
            if column.matched is not None:
                st.markdown(compare_tables.matched_text(column.matched))
                if not column.matched.within_tolerance:
                    st.warning(column.matched.message, icon=":material/warning:")
            if column.extrapolated:
                st.warning(
                    f"**Extrapolated**: {column.extrapolated}; its weights were not trained "
                    "at this setting.",
                    icon=":material/warning:",
                )
            if column.error:
                st.error(column.error, icon=":material/error:")


def view_controls(depth: int, good: list[Column]) -> tuple[int, list[str], str]:
    """The shared layer, the views and the segment colouring. The layer opens where the
    schedules act (the last layer with scores in some column) and follows new
    schedules there until the user moves the slider."""
    state = st.session_state
    if state.get("compare_layer", depth - 1) > depth - 1:
        state["compare_layer"] = depth - 1
    opening = overlays.opening_layer([c.result.trace for c in good if c.result is not None])
    if "compare_layer" not in state or state["compare_layer"] == state.get("compare_opening"):
        state["compare_layer"] = opening
    state["compare_opening"] = opening
    state.setdefault("compare_views", ["segments", "pruned", "heatmap"])
    controls = st.columns([3, 3, 2], vertical_alignment="bottom")
    layer = controls[0].slider(
        "State after layer (shared by all columns)",
        0,
        depth - 1,
        key="compare_layer",
        help="0-based; the same layer for every column, the grids and the agreement metrics",
    )
    views = controls[1].pills(
        "Views",
        list(compare.VIEWS),
        selection_mode="multi",
        format_func=compare.VIEWS.get,
        key="compare_views",
    )
    segment_mode = controls[2].radio(
        "Segments",
        ["mean", "tint"],
        horizontal=True,
        key="compare_segment_mode",
        format_func={"mean": "mean colour", "tint": "tint"}.get,
    )
    return int(layer), list(views or []), str(segment_mode)


def column_views(
    column: Column,
    source: list,  # what the image is: the model's key and the image's key
    image: np.ndarray,
    layer: int,
    views: list[str],
    segment_mode: str,
    full: TimedRun,
    model: LoadedModel,
    colors: list[str],
) -> None:
    dot = f'<span style="color:{colors[column.index]}">●</span>'
    st.markdown(f"#### {dot} {column.name}", unsafe_allow_html=True)
    result = column.result
    if result is None:
        st.caption(f"`{column.text}`")
        st.info("Nothing to show for this column until its schedule is fixed.")
        return
    st.caption(
        f"{result.trace.layers[layer].tokens} tokens after layer {layer}",
        help=f"Ran `{column.ran}`",
    )
    names = model.class_names()
    for cell, tile in zip(
        st.columns(2),
        [
            compare_tables.gmacs_tile(result, full.result),
            compare_tables.output_tile(result, full.result, names),
        ],
        strict=True,
    ):
        show_tile(cell, tile)
    for view in views:
        signature = json.dumps(
            [source, column.key, view, view_layer(view, layer), segment_mode, "bare"]
        )
        # No colour bar inside the picture: scaled into a narrow column its labels shrink
        # to a few pixels. The legends sit under the columns (view_legends), readable.
        draw = partial(compare.render_view, image, result.trace, view, layer, legend=False)
        png = cached_picture(signature, partial(draw, segment_mode=segment_mode))
        st.markdown(f"**{compare.VIEWS[view]}**" + (" (all layers)" if view == "depth" else ""))
        if png is None:
            message = compare_tables.no_scores_message(result.trace, layer)
            st.info(message, icon=":material/info:")
        else:
            st.image(png, output_format="PNG", width="stretch")
            if view == "heatmap":
                st.caption(compare_tables.score_range(result.trace, layer))
    if result.logits is not None and full.result.logits is not None:
        st.dataframe(
            compare_tables.top5_frame(result, full.result, names),
            hide_index=True,
            column_config={
                "p": st.column_config.ProgressColumn(format="%.3f", min_value=0, max_value=1)
            },
        )


def show_tile(cell, tile: Tile) -> None:
    cell.metric(
        tile.label, tile.value, delta=tile.delta, delta_color=tile.delta_color, help=tile.help
    )


@st.cache_data(show_spinner=False, max_entries=96)
def cached_picture(signature: str, _draw: Callable[[], np.ndarray | None]) -> bytes | None:
    """A column's picture as a quick PNG, drawn once per signature."""
    picture = _draw()
    return None if picture is None else overlays.to_png(picture, fast=True)


def view_legends(views: list[str], depth: int) -> None:
    """One legend per view shown, named, under all the columns, at its own size."""
    for view in views:
        strip = compare.legend_strip(view, depth, LEGEND_WIDTH, height=LEGEND_HEIGHT)
        if strip is not None:
            name, legend = st.columns([1, 6], vertical_alignment="center")
            name.markdown(f"**{compare.VIEWS[view]}**")
            legend.image(overlays.to_png(strip, fast=True), width=int(strip.shape[1]))
