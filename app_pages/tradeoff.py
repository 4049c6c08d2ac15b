"""Trade-off: accuracy (or fidelity) against cost, one curve per method, grown live.

Layout only. Planning, running and caching are ``analysis.sweep`` (in a background
thread, ``analysis.sweep_job``), so the rest of the app stays usable while a sweep runs;
the pictures are ``viz.tradeoff``. A fragment redraws once a second while the sweep runs.
"""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from analysis import LoadedModel, ScheduleError, TokenScopeError
from analysis.curves import BOOTSTRAP_METHOD
from analysis.figure_config import tradeoff_config
from analysis.imagesets import ImageSet
from analysis.metrics import METRICS
from analysis.reducers import REDUCERS
from analysis.sweep import (
    DEFAULT_BASES,
    MethodSweep,
    SweepPlan,
    SweepSpec,
    check_metrics,
    cost_targets,
    default_metrics,
    full_point,
    plan_sweep,
    results_document,
)
from analysis.sweep_cache import SweepCache
from analysis.sweep_job import JobState, SweepJob
from app_pages.common import ModelKey, keep_widget_state, show_notices
from app_pages.figures_link import send_to_figures
from app_pages.model_inputs import model_sidebar
from app_pages.sweep_inputs import image_source_inputs, images_for_spec, method_table, spec_upload
from viz import tradeoff

DEFAULT_METHODS = ("tome", "evit", "dtem", "patchmerger", "cropr", "ltm", "mstm")
X_AXES = {"GMACs": "gmacs", "% of full GMACs": "percent", "Measured images/s": "images_per_second"}
PAGE_WIDGETS = (
    "sweep_methods",
    "sweep_targets",
    "sweep_count",
    "sweep_metric",
    "sweep_x",
    "sweep_batch",
    "sweep_source",
    "sweep_limit",
)


def sweep_controls(model: LoadedModel) -> tuple[list[MethodSweep], tuple[float, ...]]:
    """The methods to sweep with their bases, and the cost targets."""
    names = [name for name in REDUCERS if name in DEFAULT_BASES]
    st.session_state.setdefault(
        "sweep_methods", [n for n in DEFAULT_METHODS if n in names and _usable(model, n)]
    )
    chosen = st.multiselect(
        "Methods",
        names,
        key="sweep_methods",
        format_func=tradeoff.method_label,
        help="Each method's strength is solved for every cost target (learned methods move "
        "only what their weights allow; see the table).",
    )
    left, right = st.columns([3, 1])
    low, high = left.slider(
        "Cost targets (% of full GMACs)", 10, 100, (35, 100), step=5, key="sweep_targets"
    )
    count = right.number_input("Points per method", 2, 16, 6, key="sweep_count")
    targets = cost_targets(float(low), float(high), int(count))
    methods = method_table(model, chosen, targets)
    return methods, targets


def _usable(model: LoadedModel, method: str) -> bool:
    try:
        plan_sweep(model, schedules=[DEFAULT_BASES[method]], include_full=False)
    except (ScheduleError, TokenScopeError):
        return False
    return True


def start_job(
    model: LoadedModel, images: ImageSet, plan: SweepPlan, metrics: tuple[str, ...], spec: SweepSpec
) -> None:
    previous: SweepJob | None = st.session_state.get("sweep_job")
    if previous is not None:
        previous.cancel()
    st.session_state["sweep_job"] = SweepJob(
        model,
        images,
        plan,
        metrics,
        batch_size=spec.batch_size,
        cache=SweepCache(),
        throughput=spec.throughput,
    ).start()
    st.session_state["sweep_spec"] = spec


def progress_line(state: JobState) -> str:
    done = len(state.points)
    cached = sum(point.cached for point in state.points)
    words = f"{done} of {state.planned} points"
    if cached:
        words += f" ({cached} from the cache)"
    if state.running:
        words += f" · point {done + 1}: {state.images_done}/{state.images_total} images"
    return f"{words} · {state.seconds:.0f} s"


def results_view(job: SweepJob, metric: str, x_name: str) -> None:
    """The curve, the table and the downloads of the session's sweep."""
    state = job.snapshot()
    if state.running:
        st.progress(state.fraction, text=progress_line(state))
        if st.button("Cancel", icon=":material/stop:", key="sweep_cancel"):
            job.cancel()
            st.rerun()
    elif state.error:
        st.error(state.error)
    elif state.cancelled:
        st.warning(f"Cancelled: {progress_line(state)}. The finished points are kept.")
    else:
        st.success(f"Done: {progress_line(state)}.")
    for notice in state.notices:
        st.warning(notice, icon=":material/memory:")
    x = X_AXES[x_name]
    if x == "images_per_second" and not any(p.images_per_second for p in state.points):
        st.info("Throughput is measured after the last point; showing GMACs until then.")
        x = "gmacs"
    if metric not in job.metrics:
        st.info(f"This sweep measured {', '.join(job.metrics)}; run again for {metric}.")
        metric = job.metrics[0]
    info = METRICS[metric]
    done = {point.schedule for point in state.points}
    planned = [
        (p.method, getattr(p, x))
        for p in job.plan.points
        if p.schedule not in done and x != "images_per_second"
    ]
    figure = tradeoff.tradeoff_figure(
        state.points,
        metric,
        metric_label=info.label,
        higher_is_better=info.higher_is_better,
        x=x,
        reference=full_point(state.points),
        planned=planned,
    )
    event = st.plotly_chart(
        figure, key="tradeoff_chart", on_select="rerun", selection_mode="points"
    )
    open_selected(event)
    st.caption(
        f"{len(job.images)} images ({job.images.description}). Error bars: {BOOTSTRAP_METHOD}. "
        "Open markers ran a learned method outside the settings its weights were trained at. "
        "Select a point to open its schedule in Explore."
    )
    if state.points:
        table(job, state, metric, x)


def open_selected(event) -> None:
    """A selected point's schedule goes to Explore's schedule box."""
    selection = getattr(event, "selection", None) or {}
    points = selection.get("points", []) if isinstance(selection, dict) else []
    for point in points:
        data = point.get("customdata")
        schedule = data[0] if isinstance(data, list) and data else data
        if isinstance(schedule, str) and schedule:
            st.session_state["schedule_text"] = schedule
            st.session_state.pop("schedule_preset", None)
            st.switch_page("app_pages/explore.py")


def table(job: SweepJob, state: JobState, metric: str, x: str) -> None:
    rows = tradeoff.points_table(state.points, job.metrics)
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="sweep_table")
    if job.plan.skipped:
        with st.expander(f"{len(job.plan.skipped)} requested settings left out"):
            for note in job.plan.skipped:
                st.markdown(f"- {note}")
    spec: SweepSpec = st.session_state.get("sweep_spec", SweepSpec())
    document = results_document(spec, job.model, job.images, job.plan, job.metrics, state.points)
    if st.button("Send to Figures", icon=":material/image:", key="sweep_to_figures"):
        config = tradeoff_config(document, metric=metric, x=x, model=job.model)
        send_to_figures(config, model=job.model)
    cols = st.columns(3)
    cols[0].download_button(
        "Results CSV",
        tradeoff.points_csv(state.points, job.metrics),
        file_name="tradeoff.csv",
        mime="text/csv",
        on_click="ignore",
        icon=":material/download:",
    )
    cols[1].download_button(
        "Results JSON",
        json.dumps(document, indent=2),
        file_name="tradeoff.json",
        mime="application/json",
        on_click="ignore",
        icon=":material/download:",
    )
    cols[2].download_button(
        "Sweep configuration",
        json.dumps(spec.to_dict(), indent=2),
        file_name="sweep.json",
        mime="application/json",
        on_click="ignore",
        icon=":material/download:",
        help="Upload it here later (or pass it to `python -m analysis sweep --config`) to "
        "reopen the same sweep, served from the cache.",
    )


def tradeoff_page() -> None:
    keep_widget_state(*PAGE_WIDGETS)
    model, model_key = model_sidebar()
    st.title("Trade-off")
    st.caption(
        "Accuracy or fidelity against cost as each method's strength varies, on an image "
        "set, with 95 % intervals. Points are cached, so a sweep you ran before comes back "
        "at once."
    )
    show_notices()
    images = image_source_inputs(model)
    methods, _ = sweep_controls(model)
    metric, x_name, batch = metric_inputs(model, images)
    spec = _spec(model_key, images, methods, batch, x_name)
    if st.button("Run sweep", type="primary", icon=":material/play_arrow:", key="sweep_run"):
        launch(model, images, spec)
    with st.expander("Reopen a saved sweep", icon=":material/upload_file:"):
        saved = spec_upload()
        if saved is not None:
            run_saved(model, model_key, saved)
    job: SweepJob | None = st.session_state.get("sweep_job")
    if job is None:
        st.info("Choose methods and an image set, then **Run sweep**.")
        return
    live = job.snapshot().running
    st.fragment(run_every=1.0 if live else None)(_live)(job, metric, x_name, live)


def _live(job: SweepJob, metric: str, x_name: str, was_running: bool) -> None:
    results_view(job, metric, x_name)
    if was_running and not job.snapshot().running:
        st.rerun()  # the whole page, so the fragment stops polling


def launch(model: LoadedModel, images: ImageSet | None, spec: SweepSpec) -> None:
    if images is None:
        st.error("Choose an image set first.")
        return
    try:
        plan = plan_sweep(
            model, schedules=spec.schedules, methods=spec.methods, include_full=spec.include_full
        )
        metrics = check_metrics(model, images, spec.metrics)
    except TokenScopeError as error:
        st.error(str(error))
        return
    start_job(model, images, plan, metrics, spec)


def run_saved(model: LoadedModel, model_key: ModelKey, saved: SweepSpec) -> None:
    """Offer to rerun an uploaded configuration on its own image set."""
    if saved.model != model_key.name:
        st.warning(
            f"This configuration is for the model '{saved.model}'; choose it in the sidebar "
            "to reopen the same sweep."
        )
        return
    st.caption(
        f"Saved sweep: {len(saved.methods)} methods, {len(saved.schedules)} schedules, "
        f"images '{saved.images}'."
    )
    if st.button("Run the saved sweep", icon=":material/replay:", key="sweep_run_saved"):
        launch(model, images_for_spec(saved, model), saved)


def metric_inputs(model: LoadedModel, images: ImageSet | None) -> tuple[str, str, int]:
    allowed = default_metrics(model, images) if images is not None else ("feature_cosine",)
    cols = st.columns(3)
    if st.session_state.get("sweep_metric") not in allowed:
        st.session_state["sweep_metric"] = allowed[0]
    metric = cols[0].selectbox(
        "Metric",
        allowed,
        key="sweep_metric",
        format_func=lambda name: METRICS[name].label,
        help="Accuracy needs labels (a classifier's own classes, or a k-NN bank for a "
        "backbone); without labels the reduced model is compared with the full one.",
    )
    x_name = cols[1].selectbox("x-axis", list(X_AXES), key="sweep_x")
    batch = cols[2].number_input("Batch size", 1, 256, 8, key="sweep_batch")
    st.caption(METRICS[metric].description)
    return metric, x_name, int(batch)


def _spec(
    model_key: ModelKey, images: ImageSet | None, methods, batch: int, x_name: str
) -> SweepSpec:
    return SweepSpec(
        model=model_key.name,
        weights=None if model_key.weights == "default" else model_key.weights,
        images=images.name if images is not None else "samples",
        limit=len(images) if images is not None else None,
        methods=tuple(methods),
        batch_size=batch,
        device=model_key.device,
        throughput=X_AXES[x_name] == "images_per_second",
    )


tradeoff_page()
