"""Compare: two to four schedules side by side on one image, optionally at matched cost,
with the agreement metrics of Haurum et al. and grids over several images.

Layout only. Models, images and single-image runs come from ``app_pages.common`` (shared with
Explore, so a choice made there carries over); matched cost from
``analysis.solver.match_cost``; agreement from ``analysis.agreement``; pictures, grids,
charts and the table from ``viz.compare``. Everything that depends on the shared layer
lives in the ``comparison`` fragment, so moving the layer slider only redraws.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from analysis import LoadedModel, RunResult, Schedule, ScheduleError, TokenScopeError
from analysis.agreement import METRICS, agreement_matrix, agreement_over_layers
from analysis.figure_config import panel_config
from analysis.flops import count_macs
from analysis.images import CropInfo, fit_to_input
from analysis.presets import MATCHED_PERCENTS
from analysis.reducers import REDUCERS
from analysis.schedule import parse_schedule
from analysis.solver import DEFAULT_TOLERANCE_PERCENT, MatchedSchedule, full_gmacs, match_cost
from analysis.trained_settings import extrapolation
from app_pages.common import (
    SAMPLES,
    ImageChoice,
    ModelKey,
    TimedRun,
    cached_run,
    check_schedule,
    crop_sidebar,
    display_array,
    fit_choice,
    image_sidebar,
    keep_widget_state,
    model_sidebar,
    sample_image,
    show_notices,
    timed_run,
    usable_presets,
)
from app_pages.figures_link import figure_image, send_to_figures
from viz import compare, overlays, summary
from viz.schedule_table import CUSTOM_PRESET, matching_preset

LETTERS = "ABCD"
COLUMN_CHOICES = (2, 3, 4)
DEFAULT_COLUMNS = 3
DEFAULT_TARGET_PERCENT = 65.0
DEFAULT_COST = MATCHED_PERCENTS[0] / 100  # the columns open on the 75 % matched presets
DEFAULT_SET_SIZE = 4
GRID_CELL = 176
LEGEND_WIDTH, LEGEND_HEIGHT = 760, 26  # the views' legends under the columns, in pixels
SCHEDULE_HELP = (
    "`METHOD:key=value,…@LAYERS`, parts joined by `;`; layers are 0-based. In matched "
    "mode the method's strength parameter is solved and the rest is kept as written."
)
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
    timed: TimedRun | None = None
    error: str | None = None
    extrapolated: str = ""  # why a learned method runs outside its trained settings, or ""

    @property
    def letter(self) -> str:
        return LETTERS[self.index]

    @property
    def ok(self) -> bool:
        return self.timed is not None

    @property
    def result(self) -> RunResult:
        assert self.timed is not None
        return self.timed.result

    @property
    def name(self) -> str:
        """Short name for tables and charts: ``A · ToMe``."""
        if self.schedule is None:
            return f"{self.letter} · (error)"
        methods = self.schedule.methods()
        labels = [REDUCERS[m].label if m in REDUCERS else m for m in methods]
        return f"{self.letter} · {' + '.join(labels) if labels else 'full model'}"

    @property
    def ran(self) -> str:
        return self.schedule.to_text() if self.schedule is not None else self.text

    @property
    def key(self) -> str:
        """What ran, exactly (the JSON form keeps what the text form leaves out)."""
        return self.schedule.to_json() if self.schedule is not None else self.text


@dataclass(frozen=True)
class ImageSet:
    """The images of the multi-image grid and of CKA; the page's image comes first."""

    keys: tuple[str, ...]
    labels: tuple[str, ...]
    images: tuple[Image.Image, ...]


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


def default_texts(model: LoadedModel, choices: dict[str, str]) -> list[str]:
    """A schedule per method, in registry order: each method's preset whose analytic
    cost is nearest 75 % of the full model (its cost-matched preset where it has one), so
    that the defaults start comparable. The first column takes the Explore page's
    schedule when there is a valid one."""
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
    explored = st.session_state.get("schedule_text")
    if isinstance(explored, str):
        try:
            first = check_schedule(explored, model)
            if not first.is_empty:  # the others: one column per other method
                same = set(first.methods())
                others = [t for t in texts if not same & set(parse_schedule(t).methods())]
                texts = [explored, *others]
        except ScheduleError:
            pass
    texts = texts or ["none"]
    return [texts[i % len(texts)] for i in range(len(LETTERS))]


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
        for index, text in enumerate(default_texts(model, choices)):
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
    missing = unavailable_methods(model, choices)
    if missing:
        st.caption(
            f"Not available on this model: {', '.join(missing)}.",
            help="\n\n".join(f"**{label}**: {reason}" for label, reason in missing.items()),
        )
    return texts


def unavailable_methods(model: LoadedModel, choices: dict[str, str]) -> dict[str, str]:
    """Registered methods with no usable preset on this model, with the reason."""
    offered = set()
    for text in choices.values():
        offered.update(parse_schedule(text).methods())
    missing = {}
    for name, cls in REDUCERS.items():
        if name in offered:
            continue
        try:
            check_schedule(name, model)
            missing[cls.label] = "no preset fits this model"
        except ScheduleError as error:
            missing[cls.label] = str(error)
    return missing


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
        index, text, schedule=schedule, matched=matched, timed=timed, extrapolated=outside
    )


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


def image_set(choice: ImageChoice, samples: list[str], model: LoadedModel) -> ImageSet:
    """The page's image, then the samples, fitted as the page's image is (crop or pad)."""
    mode = st.session_state.get("fit_mode", "crop")
    keys, labels, images = [choice.key], [choice.label], [choice.image]
    for name in samples:
        sample, _ = fit_choice(ImageChoice(f"sample:{name}", name, sample_image(name)), model, mode)
        if sample.key not in keys:
            keys.append(sample.key)
            labels.append(sample.label)
            images.append(sample.image)
    return ImageSet(tuple(keys), tuple(labels), tuple(images))


def _runs_label(jobs: list[tuple[int | None, str]]) -> str:
    """What a batch of runs is, in words: the full model is no column's schedule."""
    count = sum(index is not None for index, _ in jobs)
    parts = ["the full model"] if any(index is None for index, _ in jobs) else []
    if count:
        parts.append(f"{count} schedule{'' if count == 1 else 's'}")
    return " and ".join(parts)


def set_runs(
    columns: list[Column], images: ImageSet, model: LoadedModel, model_key: ModelKey
) -> tuple[TimedRun | None, dict[int, TimedRun | str]]:
    """The full model and every good column on the whole image set (batched, cached),
    with progress while anything is new. A failure stays with its column."""
    state = st.session_state
    done = state.setdefault("compare_batches_done", set())
    key = model_key.cache_key()
    jobs = [(None, parse_schedule("none").to_json())] + [
        (c.index, c.schedule.to_json()) for c in columns if c.ok and c.schedule is not None
    ]
    fresh = [job for job in jobs if (key, images.keys, job[1]) not in done]
    status = None
    if fresh:
        status = st.status(
            f"Running {_runs_label(fresh)} on {_images(len(images.keys))}…", expanded=False
        )
    full, runs = None, {}
    for index, text in jobs:
        if status is not None:
            what = "the full model" if index is None else f"column {LETTERS[index]}"
            status.update(label=f"Running {what} on {_images(len(images.keys))}…")
        try:
            timed = cached_batch_run(key, images.keys, text, model, images.images)
        except (TokenScopeError, RuntimeError) as error:  # torch's too: the page goes on
            if index is not None:
                runs[index] = str(error)
            continue
        done.add((key, images.keys, text))
        if index is None:
            full = timed
        else:
            runs[index] = timed
    if status is not None:
        status.update(
            label=f"Ran {_runs_label(fresh)} on {_images(len(images.keys))}", state="complete"
        )
    return full, runs


# --------------------------------------------------------------------------- page


def compare_page() -> None:
    keep_widget_state(*PAGE_KEYS)
    model, model_key = model_sidebar()
    choice = image_sidebar()
    choice, crop = crop_sidebar(choice, model)  # the padded canvas, when padding
    samples = image_set_sidebar()

    st.title("Compare")
    st.caption(
        "Two to four schedules on the same image, side by side: what each keeps, merges and "
        "drops at one shared layer, what it costs, and how much the methods agree."
    )
    show_notices()
    count, target = comparison_controls(full_gmacs(model.facts, model.module))
    texts = schedule_inputs(model, count)
    try:
        full = cached_run(
            model_key.cache_key(), choice.key, Schedule().to_json(), model, choice.image
        )
    except TokenScopeError as error:
        st.error(str(error))
        st.stop()
        return
    columns = [
        run_column(i, text, model, model_key, choice, target) for i, text in enumerate(texts)
    ]
    column_status(columns)
    images = image_set(choice, samples, model)
    comparison(model, model_key, choice, crop, full, columns, images, target)


def column_status(columns: list[Column]) -> None:
    """Per column: what matched mode set, or the column's error."""
    for column, cell in zip(columns, st.columns(len(columns)), strict=True):
        with cell:
            if column.matched is not None:
                matched_caption(column.matched)
            if column.extrapolated:
                st.warning(
                    f"**Extrapolated**: {column.extrapolated}; its weights were not trained "
                    "at this setting.",
                    icon=":material/warning:",
                )
            if column.error:
                st.error(column.error, icon=":material/error:")


def matched_caption(m: MatchedSchedule) -> None:
    value = _format_value(m.value)
    line = (
        f"**set to `{m.param}={value}`** → {m.gmacs:.3f} GMACs "
        f"({m.percent:.1f}% of full; target {m.target_gmacs:.3f})"
    )
    if m.within_tolerance:
        st.markdown(f"{line}  \n:green[:material/check_circle: within ±{m.tolerance:.3f} GMACs]")
    else:
        st.markdown(line)
        st.warning(m.message, icon=":material/warning:")


@st.fragment
def comparison(
    model: LoadedModel,
    model_key: ModelKey,
    choice: ImageChoice,
    crop: CropInfo,
    full: TimedRun,
    columns: list[Column],
    images: ImageSet,
    target: Target | None,
) -> None:
    """Everything that depends on the shared layer; the slider reruns only this."""
    state = st.session_state
    depth = model.facts.depth
    if state.get("compare_layer", depth - 1) > depth - 1:
        state["compare_layer"] = depth - 1
    # Open where the schedules act (the last layer with scores in some column), and follow
    # new schedules there until the user moves the slider.
    good = [c for c in columns if c.ok]
    opening = overlays.opening_layer([c.result.trace for c in good])
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
    colors = compare.method_colors(len(LETTERS))
    image = display_array(choice.key, crop, full.result.trace.grid, choice.image)
    for column, cell in zip(columns, st.columns(len(columns)), strict=True):
        with cell:
            column_views(
                column,
                [*model_key.cache_key(), choice.key],
                image,
                layer,
                views or [],
                segment_mode,
                full,
                model,
                colors,
            )
    view_legends(views or [], depth)
    note = summary.attention_artefact_note(
        model.name, [m for c in good if c.schedule is not None for m in c.schedule.methods()]
    )
    if note:
        st.caption(f":material/info: {note}")

    st.subheader("Summary", divider="gray")
    metric_name = state.get("compare_metric", "iou")
    metric_name = metric_name if metric_name in METRICS else "iou"
    full_set, batch = set_runs(columns, images, model, model_key) if good else (None, {})
    summary_table(good, full, full_set, batch, metric_name, layer)
    if good:
        left, right = st.columns(2)
        used = [colors[c.index] for c in good]
        left.plotly_chart(
            compare.tokens_lines(
                {c.name: c.result.tokens for c in good},
                full.result.tokens,
                layer,
                colors=used,
                styles=[c.index for c in good],
            ),
            key="compare_tokens",
        )
        right.plotly_chart(
            compare.gmacs_bars(
                {c.name: c.result.cost for c in good}, full.result.cost, layer, colors=used
            ),
            key="compare_gmacs",
        )
    bad = [c for c in columns if not c.ok]
    if bad:
        st.caption(
            "Left out of the summary, the agreement and the grids: "
            + ", ".join(f"column {c.letter}" for c in bad)
            + " (its error is shown under its schedule)."
        )

    st.subheader("Agreement between methods", divider="gray")
    agreement_section(good, batch, images, layer, colors)

    st.subheader("Grids", divider="gray")
    grid_view, grid_layers = grids(model, model_key, good, batch, images, layer, segment_mode)

    st.subheader("Export", divider="gray")
    config = compare.ComparisonConfig(
        model={
            "name": model_key.name,
            "weights": model_key.weights,
            "device": model_key.device,
            "learned": model_key.learned,
        },
        images=[{"key": k, "label": v} for k, v in zip(images.keys, images.labels, strict=True)],
        columns=[column_config(c) for c in columns],
        layer=layer,
        view=grid_view,
        grid_layers=grid_layers,
        matched=None if target is None else dataclasses.asdict(target),
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
        figure_buttons(model, good, images, layer, grid_view, grid_layers)


def figure_buttons(
    model: LoadedModel,
    good: list[Column],
    images: ImageSet,
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
    st.markdown(f"#### {_dot(colors[column.index])} {column.name}", unsafe_allow_html=True)
    if not column.ok:
        st.caption(f"`{column.text}`")
        st.info("Nothing to show for this column until its schedule is fixed.")
        return
    result = column.result
    st.caption(
        f"{result.trace.layers[layer].tokens} tokens after layer {layer}",
        help=f"Ran `{column.ran}`",
    )
    metrics = st.columns(2)
    saved = summary.reduction_percent(result.gmacs, full.result.gmacs)
    metrics[0].metric(
        "GMACs",
        f"{result.gmacs:.2f}",
        delta=f"-{saved:.1f}%" if saved > 0 else "full model",
        delta_color="inverse" if saved > 0 else "off",
        help=f"Analytic multiply-accumulates of one image; the full model needs "
        f"{full.result.gmacs:.2f}.",
    )
    output_metric(metrics[1], result, full.result, model)
    for view in views:
        at = None if view == "depth" else layer  # token depth is the same at every layer
        signature = json.dumps([source, column.key, view, at, segment_mode, "bare"])
        # No colour bar inside the picture: scaled into a narrow column its labels shrink
        # to a few pixels. The legends sit under the columns (view_legends), readable.
        draw = partial(compare.render_view, image, result.trace, view, layer, legend=False)
        png = cached_picture(signature, partial(draw, segment_mode=segment_mode))
        st.markdown(f"**{compare.VIEWS[view]}**" + (" (all layers)" if view == "depth" else ""))
        if png is None:
            st.info(no_scores_message(result, layer), icon=":material/info:")
        else:
            st.image(png, output_format="PNG", width="stretch")
            if view == "heatmap":
                st.caption(score_range(result, layer))
    if result.logits is not None and full.result.logits is not None:
        top5(result, full.result, model)


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


def score_range(result: RunResult, layer: int) -> str:
    """The scores behind a heatmap's colours, from dark to bright (the colour bar's ticks)."""
    scores = overlays.layer_scores(result.trace, layer)
    found = scores[np.isfinite(scores)] if scores is not None else np.array([])
    if found.size == 0:
        return ""
    return f"Scores from {found.min():.3g} (dark) to {found.max():.3g} (bright)."


def no_scores_message(result: RunResult, layer: int) -> str:
    scored = overlays.scored_layers(result.trace)
    if not scored:
        return "This schedule's methods compute no importance scores."
    return f"No scores at layer {layer}; scores exist at layer {overlays.describe_layers(scored)}."


def output_metric(cell, result: RunResult, full: RunResult, model: LoadedModel) -> None:
    if result.logits is not None and full.logits is not None:
        names = model.class_names()
        mine = summary.top_classes(result.logits, names, 1)[0]
        theirs = summary.top_classes(full.logits, names, 1)[0]
        same = mine.index == theirs.index
        cell.metric(
            "Top-1",
            mine.name[:22],
            delta="same as full" if same else "differs from full",
            delta_color="normal" if same else "inverse",
            help=f"{mine.name} (p = {mine.probability:.3f})",
        )
    else:
        cell.metric(
            "Feature cosine",
            f"{summary.feature_cosine(full.features, result.features):.4f}",
            help="Cosine similarity of the pooled features to the full model's (1 = identical)",
        )


def top5(result: RunResult, full: RunResult, model: LoadedModel) -> None:
    names = model.class_names()
    full_top = {c.index for c in summary.top_classes(full.logits, names)}
    rows = summary.top_classes(result.logits, names)
    st.dataframe(
        pd.DataFrame(
            {
                "top-5": [c.name for c in rows],
                "p": [c.probability for c in rows],
                "full top-5": [c.index in full_top for c in rows],
            }
        ),
        hide_index=True,
        column_config={
            "p": st.column_config.ProgressColumn(format="%.3f", min_value=0, max_value=1)
        },
    )


def summary_table(
    good: list[Column],
    full: TimedRun,
    full_set: TimedRun | None,
    batch: dict[int, TimedRun | str],
    metric_name: str,
    layer: int,
) -> None:
    if not good:
        st.info("No column ran; fix the schedules above.")
        return
    metric = METRICS[metric_name]
    first = good[0]
    rows = []
    for column in good:
        mine = batch.get(column.index)
        mine_set = mine.result if isinstance(mine, TimedRun) else None
        if metric.needs_features:  # CKA: over the image set
            theirs = batch.get(first.index)
            pair = (theirs.result, mine_set) if isinstance(theirs, TimedRun) else (None, None)
            image_index = None
        else:
            pair, image_index = (first.result, column.result), 0
        value = None
        if pair[0] is not None and pair[1] is not None:
            value = agreement_matrix(
                {"first": pair[0], "this": pair[1]}, metric_name, layer, image_index
            ).matrix[0, 1]
        assert column.timed is not None
        rows.append(
            compare.summarize(
                column.name,
                column.ran,
                column.result,
                full.result,
                seconds=column.timed.seconds,
                device=column.timed.device,
                agreement=None if value is None else float(value),
                reduced_set=mine_set,
                full_set=None if full_set is None else full_set.result,
            )
        )
    classifier = full.result.logits is not None
    count = _set_size(full_set)
    set_label = (
        f"top-1 as full ({_images(count)})" if classifier else f"feature cosine ({_images(count)})"
    )
    agreement_label = f"{metric.label} vs {first.letter}"
    table = compare.comparison_table(rows, agreement_label=agreement_label, set_label=set_label)
    st.dataframe(
        table,
        hide_index=True,
        column_config={
            "GMACs": st.column_config.NumberColumn(format="%.3f"),
            "reduction %": st.column_config.NumberColumn(format="%.1f %%"),
            "run ms": st.column_config.NumberColumn(format="%.0f"),
        },
    )
    where = "over the image set" if metric.needs_features else f"at layer {layer}, this image"
    st.caption(
        f"Fidelity on this image against the full model ({full.result.gmacs:.2f} GMACs, "
        f"{1000 * full.seconds:.0f} ms); {agreement_label} {where} (pick the metric under "
        "*Agreement*). Run ms: the wall time of one `run()` of this image on "
        f"**{full.device}**, measured when first computed (results are cached)."
    )


def agreement_section(
    good: list[Column],
    batch: dict[int, TimedRun | str],
    images: ImageSet,
    layer: int,
    colors: list[str],
) -> None:
    if len(good) < 2:
        st.info("Agreement needs at least two columns that ran.")
        return
    count = len(images.keys)
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
        controls[1].markdown(f"Over the **image set** ({_images(count)})")
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
    if measure == "set":
        used = [c for c in good if isinstance(batch.get(c.index), TimedRun)]
        runs = {c.name: batch[c.index].result for c in used}  # type: ignore[union-attr]
        image_index = None
    else:
        used = good
        runs = {c.name: c.result for c in used}
        image_index = 0
    if len(runs) < 2:
        st.info("Fewer than two methods ran on the image set.")
        return
    matrix = agreement_matrix(runs, metric_name, layer if metric.per_layer else None, image_index)
    where = f"at layer {layer}" if metric.per_layer else "per pair"
    scope = {"image": "this image", "set": f"mean over {_images(count)}"}[measure]
    if metric.needs_features:
        scope = f"features of {_images(count)}"
    left, right = st.columns(2)
    left.plotly_chart(
        compare.agreement_heatmap(matrix, metric, title=f"{metric.label} {where} ({scope})"),
        key="compare_heatmap",
    )
    with right:
        if not metric.per_layer:
            st.info(
                f"{metric.label} is one number per pair of methods, not one per layer, so "
                "there is no line over layers.",
                icon=":material/info:",
            )
        else:
            letters = [c.letter for c in used]
            values = list(runs.values())
            indices = (
                [(0, j) for j in range(1, len(used))]
                if pairs == "first"
                else [(i, j) for i in range(len(used)) for j in range(i + 1, len(used))]
            )
            series = {
                f"{letters[i]}–{letters[j]}": agreement_over_layers(
                    values[i], values[j], metric_name, image_index
                )
                for i, j in indices
            }
            line_colors = [colors[used[j].index] for _, j in indices] if pairs == "first" else None
            st.plotly_chart(
                compare.agreement_lines(series, metric, layer, colors=line_colors),
                key="compare_lines",
            )
    if metric.needs_features and count < 2:
        st.warning("CKA compares features across images: add samples to the image set.")
    elif metric.needs_features and count < 5:
        st.caption(
            f"CKA over {count} images is coarse; add samples to the image set in the sidebar "
            "for a steadier number."
        )


def grids(
    model: LoadedModel,
    model_key: ModelKey,
    good: list[Column],
    batch: dict[int, TimedRun | str],
    images: ImageSet,
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
    spread = sorted({*range(0, depth, max(1, depth // 4)), depth - 1})
    if any(v >= depth for v in st.session_state.get("compare_grid_layers", [])):
        st.session_state["compare_grid_layers"] = spread  # chosen on a deeper model
    st.session_state.setdefault("compare_grid_layers", spread)
    chosen = controls[1].multiselect(
        "Layers of the methods × layers grid", list(range(depth)), key="compare_grid_layers"
    )
    grid_layers = sorted(int(v) for v in chosen) or [layer]
    if not good:
        st.info("No column ran, so there is nothing to lay out.")
        return view, grid_layers
    layers_shown = [depth - 1] if view == "depth" else grid_layers
    where = "" if view == "depth" else f", after layer {layer}"
    plan = GridPlan(
        model_key.describe(),
        model_key.cache_key(),
        images.keys,
        tuple((c.name, c.ran, c.key) for c in good),
        view,
        segment_mode,
        depth,
    )
    build = partial(images_grid, plan, model, good, batch, images, layer)
    at = None if view == "depth" else layer  # token depth is the same at every layer
    by_image, shown = cached_grid(plan.signature("images", at), build)
    st.markdown(f"**{_images(len(images.keys))} × {len(good)} methods**{where}")
    st.image(shown, output_format="PNG")
    download("Images × methods PNG", by_image, f"compare_images_{view}_layer{layer}.png")

    build = partial(layers_grid, plan, model, good, images, layers_shown)
    by_layer, shown = cached_grid(plan.signature("layers", layers_shown), build)
    st.markdown(f"**{len(good)} methods × {len(layers_shown)} layers**, {images.labels[0]}")
    if view == "depth":
        st.caption("Token depth already sums up every layer, so this grid has one column.")
    st.image(shown, output_format="PNG")
    download("Methods × layers PNG", by_layer, f"compare_layers_{view}.png")
    return view, grid_layers


@dataclass(frozen=True)
class GridPlan:
    """What a grid shows, without the runs; its signature keys the grid cache."""

    model_name: str
    model_key: tuple[str, str, str]
    image_keys: tuple[str, ...]
    columns: tuple[tuple[str, str, str], ...]  # name, schedule that ran: text and JSON
    view: str
    segment_mode: str
    depth: int

    def signature(self, kind: str, *extra) -> str:
        return json.dumps([kind, dataclasses.asdict(self), *extra])

    @property
    def legend(self) -> np.ndarray | None:
        return compare.legend_strip(self.view, self.depth, 640)


@st.cache_data(show_spinner=False, max_entries=12)
def cached_grid(signature: str, _build: Callable[[], np.ndarray]) -> tuple[np.ndarray, bytes]:
    """A grid and its quick PNG, drawn once per signature (revisiting a layer is free)."""
    grid = _build()
    return grid, overlays.to_png(grid, fast=True)


def thumbnails(model: LoadedModel, images: ImageSet, grid: tuple[int, int]) -> list[np.ndarray]:
    return [
        overlays.thumbnail(
            display_array(key, fit_to_input(image, model.data_config)[1], grid, image),
            2 * GRID_CELL,
        )
        for key, image in zip(images.keys, images.images, strict=True)
    ]


def images_grid(
    plan: GridPlan,
    model: LoadedModel,
    good: list[Column],
    batch: dict[int, TimedRun | str],
    images: ImageSet,
    layer: int,
) -> np.ndarray:
    """Rows: the image set; columns: the input, then each method at ``layer``."""
    rows = []
    for position, small in enumerate(thumbnails(model, images, good[0].result.trace.grid)):
        row: list[compare.Cell] = [small]
        for column in good:
            timed = batch.get(column.index)
            if not isinstance(timed, TimedRun):
                row.append(timed if isinstance(timed, str) else "not run")
                continue
            picture = compare.render_view(
                small,
                timed.result.trace,
                plan.view,
                layer,
                index=position,
                segment_mode=plan.segment_mode,
                legend=False,
            )
            row.append(picture if picture is not None else f"no scores at layer {layer}")
        rows.append(row)
    where = "" if plan.view == "depth" else f" · after layer {layer}"
    return compare.compose_grid(
        rows,
        list(images.labels),
        ["input", *(f"{name}\n{ran}" for name, ran, _ in plan.columns)],
        cell_side=GRID_CELL,
        title=f"{plan.model_name} · {compare.VIEWS[plan.view]}{where}",
        footer=plan.legend,
    )


def layers_grid(
    plan: GridPlan,
    model: LoadedModel,
    good: list[Column],
    images: ImageSet,
    layers: list[int],
) -> np.ndarray:
    """Rows: the methods; columns: the chosen layers, on the page's image."""
    base = thumbnails(model, images, good[0].result.trace.grid)[0]
    cells = []
    for column in good:
        row: list[compare.Cell] = []
        for at in layers:
            picture = compare.render_view(
                base,
                column.result.trace,
                plan.view,
                at,
                segment_mode=plan.segment_mode,
                legend=False,
            )
            row.append(picture if picture is not None else f"no scores at layer {at}")
        cells.append(row)
    return compare.compose_grid(
        cells,
        [name for name, _, _ in plan.columns],
        ["all layers"] if plan.view == "depth" else [f"layer {at}" for at in layers],
        cell_side=GRID_CELL,
        title=f"{plan.model_name} · {images.labels[0]} · {compare.VIEWS[plan.view]}",
        footer=plan.legend,
    )


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


def column_config(column: Column) -> compare.ColumnConfig:
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
    return compare.ColumnConfig(
        name=column.name,
        schedule=column.text,
        ran=column.ran if column.ok else None,
        solved=solved,
        error=column.error,
    )


def _format_value(value) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _dot(color: str) -> str:
    return f'<span style="color:{color}">●</span>'


def _images(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


def _set_size(timed: TimedRun | None) -> int:
    return 0 if timed is None else int(timed.result.features.shape[0])


compare_page()
