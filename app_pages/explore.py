"""Explore: what the ViT does to every patch of one image, layer by layer.

Layout only. The model runs through ``analysis.run`` once per (model, image, schedule),
cached; moving the layer slider reruns only the ``layer_views`` fragment, which redraws
from the cached trace with the pure renderers in ``viz``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from analysis import LoadedModel, ScheduleError, TokenScopeError, parse_schedule
from analysis.curves import Point
from analysis.figure_config import cost_config, panel_config
from analysis.images import CropInfo
from analysis.imagesets import image_set_of
from analysis.reducers import REDUCERS
from analysis.sweep import (
    DEFAULT_BASES,
    IMAGE_CURVE_METHODS,
    full_point,
    image_curves,
    point_of_run,
)
from analysis.sweep_cache import SweepCache
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
    usable_presets,
)
from app_pages.figures_link import figure_image, send_to_figures
from app_pages.model_inputs import model_sidebar
from app_pages.schedule_inputs import schedule_editor, schedule_sidebar
from viz import charts, overlays, summary, tradeoff

DOWNLOAD_MAX_SIDE = 2048
FILMSTRIP_WIDTH = 150  # CSS pixels; drawn at twice that for sharp screens
PAGE_WIDGETS = (
    "schedule_text",
    "schedule_preset",
    "layer",
    "segment_mode",
    "segment_boundaries",
    "heatmap_smooth",
)
@dataclass(frozen=True)
class View:
    """What the layer views draw from: the cached runs and the display image."""

    image: np.ndarray  # the model's crop at display resolution
    original: Image.Image
    crop: CropInfo
    reduced: TimedRun
    full: TimedRun
    key: tuple[str, ...]  # (model, image, schedule): names the run for caches


# --------------------------------------------------------------------------- views


def _picture(view: View, draw: Callable[[np.ndarray], np.ndarray]) -> None:
    """Draw on the display image and show it (PNG, encoded fast, sent as is)."""
    st.image(overlays.to_png(draw(view.image), fast=True), output_format="PNG", width="stretch")


@st.cache_data(show_spinner=False, max_entries=16)
def _token_depth_png(run_key: tuple[str, ...], _view: View) -> bytes:
    """The token-depth map does not depend on the layer: drawn once per run."""
    return overlays.to_png(
        overlays.render_token_depth(_view.image, _view.reduced.result.trace), fast=True
    )


def _full_resolution_png(view: View, draw: Callable[[np.ndarray], np.ndarray]) -> bytes:
    """The picture drawn again on the model's crop at the original's resolution."""
    grid = view.reduced.result.trace.grid
    image = overlays.display_image(view.original, view.crop, grid, max_side=DOWNLOAD_MAX_SIDE)
    return overlays.to_png(draw(image))


def _png_button(
    label: str, view: View, draw: Callable[[np.ndarray], np.ndarray], name: str
) -> None:
    st.download_button(
        label,
        data=partial(_full_resolution_png, view, draw),
        file_name=name,
        mime="image/png",
        key=f"download_{label}",
        on_click="ignore",
        icon=":material/download:",
        help="At the original image's resolution (up to "
        f"{DOWNLOAD_MAX_SIDE} px), drawn when you click",
    )


def _no_scores_message(view: View, layer: int) -> str:
    trace = view.reduced.result.trace
    methods = trace.layers[layer].methods
    labels = [REDUCERS[m].label if m in REDUCERS else m for m in methods]
    if labels:
        message = f"{' and '.join(labels)} at layer {layer} computes no importance scores"
    else:
        message = f"No reducer runs at layer {layer}, so there are no importance scores"
    scored = overlays.scored_layers(trace)
    if scored:
        return f"{message}. Scores exist at layer {overlays.describe_layers(scored)}."
    return f"{message}. None of this schedule's methods scores tokens."


@st.fragment
def layer_views(view: View) -> None:
    """The per-layer pictures and charts; the slider reruns only this fragment."""
    trace = view.reduced.result.trace
    depth = len(trace.layers)
    state = st.session_state
    if state.get("layer", depth - 1) > depth - 1:
        state["layer"] = depth - 1
    # Open where the schedule acts (its last scored layer), and follow a new schedule there
    # until the user moves the slider: the last layer is often empty.
    opening = overlays.opening_layer([trace])
    if "layer" not in state or state["layer"] == state.get("layer_opening"):
        state["layer"] = opening
    state["layer_opening"] = opening
    top = st.columns([3, 2, 1, 1], vertical_alignment="bottom")
    layer = top[0].slider(
        "State after layer", 0, depth - 1, key="layer", help="0-based; the input has every patch"
    )
    mode = top[1].radio("Segments", ["mean colour", "tint"], horizontal=True, key="segment_mode")
    state.setdefault("segment_boundaries", True)
    boundaries = top[2].toggle("Boundaries", key="segment_boundaries")
    smooth = top[3].toggle(
        "Smooth",
        key="heatmap_smooth",
        help="Off: each patch shows the score its token was ranked by. On: interpolated "
        "between patch centres, softer but no longer the values the reducer used.",
    )
    record = trace.layers[layer]
    methods = ", ".join(REDUCERS[m].label if m in REDUCERS else m for m in record.methods)
    scored = overlays.scored_layers(trace)
    st.caption(
        f"After layer {layer}: **{record.tokens}** tokens "
        f"(of {view.full.result.trace.layers[layer].tokens}); "
        + (f"reduced here by {methods}." if methods else "no reducer at this layer.")
        + (
            f" Importance scores at layer {overlays.describe_layers(scored)}."
            if scored
            else " No method of this schedule scores tokens."
        )
    )

    draw_segments = partial(
        overlays.render_segments,
        trace=trace,
        layer=layer,
        mode="mean" if mode == "mean colour" else "tint",
        boundaries=boundaries,
    )
    draw_pruned = partial(overlays.render_pruned, trace=trace, layer=layer)
    draw_depth = partial(overlays.render_token_depth, trace=trace)
    draw_heatmap = partial(overlays.render_heatmap, trace=trace, layer=layer, smooth=smooth)
    has_scores = overlays.layer_scores(trace, layer) is not None

    left, right = st.columns(2)
    with left:
        st.markdown("**Merged-token segments**")
        _picture(view, draw_segments)
        st.caption(
            "A segment per token (tint: only tokens of several patches are coloured; a "
            "colour follows its segment across layers). Hatched: pruned, as on the right."
        )
        _png_button("Segments PNG", view, draw_segments, f"segments_layer{layer}.png")
    with right:
        st.markdown("**Pruned patches**")
        _picture(view, draw_pruned)
        st.caption(
            "Image: a token of its own · grey, outlined: merged with others · amber \\\\ "
            "hatching: pruned and fused into EViT's extra token · light / hatching: dropped."
        )
        _png_button("Pruned PNG", view, draw_pruned, f"pruned_layer{layer}.png")
    left, right = st.columns(2)
    with left:
        st.markdown("**Token depth**: the layer where each patch was merged, fused or dropped")
        st.image(_token_depth_png(view.key, view), output_format="PNG", width="stretch")
        _png_button("Token depth PNG", view, draw_depth, "token_depth.png")
    with right:
        st.markdown(f"**Importance scores used at layer {layer}**")
        if not has_scores:
            st.info(_no_scores_message(view, layer))
        else:
            _picture(view, draw_heatmap)
            st.caption(
                "The score each patch's token was ranked by, one colour per patch. Light / "
                "hatching: gone before this layer; amber \\\\ stripes: in the fused token, "
                "which has one score."
            )
            _png_button("Heatmap PNG", view, draw_heatmap, f"heatmap_layer{layer}.png")


def cost_charts(view: View) -> None:
    """Tokens and GMACs per layer; outside the fragment, so a slider move leaves them be."""
    left, right = st.columns(2)
    reduced_cost, full_cost = view.reduced.result.cost, view.full.result.cost
    left.plotly_chart(charts.tokens_chart(reduced_cost, full_cost), key="tokens_chart")
    right.plotly_chart(charts.gmacs_chart(reduced_cost, full_cost), key="gmacs_chart")


@st.cache_data(show_spinner="Drawing the reference curves for this image…", max_entries=32)
def cached_image_curves(
    model_key: tuple[str, str, str], image_key: str, method: str, _model: LoadedModel, _image
) -> list[Point]:
    """ToMe and EViT (and the schedule's own method) on this image, cached on disk too."""
    images = image_set_of([(image_key, _image)])
    methods = (*IMAGE_CURVE_METHODS, method) if method in DEFAULT_BASES else IMAGE_CURVE_METHODS
    return image_curves(_model, images, methods, cache=SweepCache())


def tradeoff_panel(view: View, model: LoadedModel, model_key: ModelKey, image_key: str) -> None:
    """Where the current schedule sits against the methods' curves on this image. ToMe's
    and EViT's curves are drawn once per image; another method's own curve runs it at six
    costs (most of a second for a learned method), so it is drawn when asked."""
    reduced, full = view.reduced.result, view.full.result
    cosine = summary.feature_cosine(full.features, reduced.features)
    here = point_of_run(reduced.schedule, reduced.gmacs, full.gmacs, [cosine], "feature_cosine")
    own = here.method if here.method in DEFAULT_BASES else ""
    asked = st.session_state.setdefault("own_curves", set())
    optional = own and own not in IMAGE_CURVE_METHODS and (image_key, own) not in asked
    try:
        curves = cached_image_curves(
            model_key.cache_key(), image_key, "" if optional else own, model, view.original
        )
    except TokenScopeError as error:
        st.info(f"No reference curves for this image: {error}")
        return
    figure = tradeoff.mini_tradeoff_figure(
        curves,
        "feature_cosine",
        metric_label="Feature cosine to full",
        higher_is_better=True,
        reference=full_point(curves),
        highlight=here,
    )
    st.plotly_chart(figure, key="explore_tradeoff")
    if optional:
        label = REDUCERS[own].label
        if st.button(f"Add {label}'s own curve on this image", key="own_curve"):
            asked.add((image_key, own))
            st.rerun()
    st.caption(
        "The black-edged marker is this schedule; the lines are ToMe, EViT and, when "
        "added, this method at 35–100 % of the full cost on this image. The Trade-off page "
        "draws them over an image set, with accuracy where labels exist."
    )


def filmstrip(view: View) -> None:
    trace = view.reduced.result.trace
    small = overlays.thumbnail(view.image, min(16 * max(trace.grid), 2 * FILMSTRIP_WIDTH))
    pictures = [
        overlays.render_segments(small, trace, layer, thickness=1)
        for layer in range(len(trace.layers))
    ]
    captions = [f"{i}: {record.tokens} tokens" for i, record in enumerate(trace.layers)]
    st.image(
        [overlays.to_png(p, fast=True) for p in pictures],
        caption=captions,
        width=FILMSTRIP_WIDTH,
        output_format="PNG",
    )


def model_output(view: View, model: LoadedModel) -> None:
    reduced, full = view.reduced.result, view.full.result
    if reduced.logits is not None and full.logits is not None:
        names = model.class_names()
        full_top = summary.top_classes(full.logits, names)
        reduced_top = summary.top_classes(reduced.logits, names)
        same = summary.class_probabilities(reduced.logits, [c.index for c in full_top], names)
        table = pd.DataFrame(
            {
                "full model": [c.short_name for c in full_top],
                "p (full)": [c.probability for c in full_top],
                "reduced model": [c.short_name for c in reduced_top],
                "p (reduced)": [c.probability for c in reduced_top],
            },
            index=pd.RangeIndex(1, len(full_top) + 1, name="rank"),
        )
        left, right = st.columns(2)
        left.dataframe(
            table,
            column_config={
                "p (full)": st.column_config.ProgressColumn(
                    format="%.3f", min_value=0, max_value=1
                ),
                "p (reduced)": st.column_config.ProgressColumn(
                    format="%.3f", min_value=0, max_value=1
                ),
            },
        )
        right.plotly_chart(charts.topk_chart(full_top, same), key="topk_chart")
    else:
        cosine = summary.feature_cosine(full.features, reduced.features)
        st.markdown(
            f"This backbone has no classifier head, so the reduced model is compared with the "
            f"full one: the cosine similarity of their pooled features is **{cosine:.4f}** "
            "(1 is identical)."
        )


# --------------------------------------------------------------------------- page


def explore_page() -> None:
    keep_widget_state(*PAGE_WIDGETS)
    model, model_key = model_sidebar()
    choice: ImageChoice = image_sidebar()
    choice, crop = crop_sidebar(choice, model)  # the padded canvas, when padding
    choices = usable_presets(model)
    schedule, schedule_slot = schedule_sidebar(model, choices)

    st.title("Explore")
    st.caption(
        "One image through the ViT, layer by layer: which patches merge, which are dropped, "
        "and the scores the reducers used."
    )
    show_notices()
    key = model_key.cache_key()
    try:
        full = cached_run(key, choice.key, parse_schedule("none").to_json(), model, choice.image)
        try:
            reduced = cached_run(key, choice.key, schedule.to_json(), model, choice.image)
        except ScheduleError as error:
            schedule_slot.error(f"{error}\n\nShowing the full model.")
            st.error(f"Schedule: {error}\n\nShowing the full model.", icon=":material/error:")
            reduced = full
    except TokenScopeError as error:
        st.error(str(error))
        st.stop()
        return

    result = reduced.result
    _metrics(model, model_key, reduced, full)
    schedule_editor(schedule, model, choices)
    image = display_array(choice.key, crop, result.trace.grid, choice.image)
    view = View(
        image=image,
        original=choice.image,
        crop=crop,
        reduced=reduced,
        full=full,
        key=(*key, choice.key, reduced.result.schedule.to_json()),
    )
    layer_views(view)
    note = summary.attention_artefact_note(model.name, result.schedule.methods())
    if note:
        st.caption(f":material/info: {note}")
    cost_charts(view)
    with st.expander("Where this schedule sits on the trade-off", expanded=True):
        tradeoff_panel(view, model, model_key, choice.key)

    st.subheader("Model output")
    model_output(view, model)
    strip = st.expander("All layers (filmstrip)", key="filmstrip_open", on_change="rerun")
    if strip.open:  # drawn only while open: twelve pictures on every rerun otherwise
        with strip:
            filmstrip(view)
    st.subheader("Downloads")
    cols = st.columns(3)
    with cols[0]:
        st.download_button(
            "Trace JSON",
            data=partial(result.trace.to_json, 0),
            file_name="trace.json",
            mime="application/json",
            key="dl_trace",
            on_click="ignore",
            icon=":material/download:",
        )
    with cols[1]:
        st.download_button(
            "Schedule JSON",
            data=result.schedule.to_json(),
            file_name="schedule.json",
            mime="application/json",
            key="dl_schedule",
            on_click="ignore",
            icon=":material/download:",
        )
    cols[2].caption("Each picture has its own PNG download under it, at full resolution.")
    explore_figure_buttons(model, choice, result.schedule.to_text())


def explore_figure_buttons(model: LoadedModel, choice: ImageChoice, schedule: str) -> None:
    """Send this schedule to the Figures page: its views over layers, or its cost."""
    depth = model.facts.depth
    layers = sorted({*range(depth // 4, depth, max(1, depth // 4)), depth - 1})
    spec = figure_image(choice.key, choice.label, choice.image)
    cols = st.columns(3)
    view = cols[0].selectbox(
        "Figure view",
        ["segments", "pruned", "depth", "heatmap"],
        key="figure_view",
        help="What the panel figure shows, at layers " + ", ".join(map(str, layers)),
    )
    if cols[1].button("Send panel to Figures", icon=":material/image:", key="send_panel"):
        config = panel_config(model, [schedule], [spec], view=view, layers=layers)
        send_to_figures(config, model=model, images={spec.source: choice.image})
    if cols[2].button("Send tokens per layer to Figures", icon=":material/image:", key="send_cost"):
        send_to_figures(cost_config("tokens", model, ["none", schedule]), model=model)


def _metrics(model: LoadedModel, model_key: ModelKey, reduced: TimedRun, full: TimedRun) -> None:
    saved = summary.reduction_percent(reduced.result.gmacs, full.result.gmacs)
    cols = st.columns(4)
    cols[0].metric(
        "GMACs",
        f"{reduced.result.gmacs:.2f}",
        delta=f"-{saved:.1f}% of {full.result.gmacs:.2f}" if saved > 0 else "full model",
        delta_color="inverse" if saved > 0 else "off",
        help="Multiply-accumulates of one image (the papers' 'GFLOPs'), reduced against full.",
    )
    cols[1].metric(
        "Tokens after the last layer",
        f"{reduced.result.tokens[-1]}",
        delta=f"of {full.result.tokens[-1]}",
        delta_color="off",
        delta_arrow="off",
        chart_data=[full.result.tokens[0], *reduced.result.tokens],
        chart_type="area",
    )
    if reduced.result.logits is not None and full.result.logits is not None:
        names = model.class_names()
        top_full = summary.top_classes(full.result.logits, names, 1)[0]
        top_reduced = summary.top_classes(reduced.result.logits, names, 1)[0]
        cols[2].metric(
            "Top-1 (reduced)",
            top_reduced.short_name,
            delta="same as full" if top_full.index == top_reduced.index else "differs from full",
            delta_color="normal" if top_full.index == top_reduced.index else "inverse",
        )
    else:
        cosine = summary.feature_cosine(full.result.features, reduced.result.features)
        cols[2].metric(
            "Feature fidelity",
            f"{cosine:.4f}",
            help="Cosine similarity of the pooled features to the full model's (1 = identical).",
        )
    cols[3].metric(
        "Model run",
        f"{reduced.seconds * 1000:.0f} ms",
        delta=f"on {reduced.device}",
        delta_color="off",
        delta_arrow="off",
        help="Wall time of the reduced run when it was computed (results are cached).",
    )
    st.caption(
        f"Model: {model_key.describe()} · ran on **{reduced.device}** · input "
        f"{model.data_config.input_size} px, {model.facts.num_patches} patches of "
        f"{model.facts.patch_size} px, {model.facts.depth} layers"
    )


explore_page()
