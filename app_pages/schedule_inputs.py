"""Explore's schedule inputs: preset, text and the per-layer editor, kept in sync.

Layout only; parsing and the preset match live in :mod:`viz.schedule_table`.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import LoadedModel, Schedule, ScheduleError
from analysis.errors import shorten
from analysis.reducers import REDUCERS
from app_pages.common import check_schedule, notify
from viz.schedule_table import (
    CUSTOM_PRESET,
    LAYER_COLUMN,
    NO_METHOD,
    editor_columns,
    matching_preset,
    method_reference,
    rows_to_schedule,
    schedule_to_rows,
)

SCHEDULE_HELP = (
    "`METHOD:key=value,…@LAYERS` parts joined by `;`. Layers are 0-based: `3,6,9` or `0-5`; "
    "no `@` means the method's default placement ("
    + "; ".join(f"{cls.label}: {cls.placement}" for cls in REDUCERS.values())
    + "). Examples: `tome:r=8`, `evit:keep=0.7@3,6,9`, `patchmerger:tokens=8`, "
    "`tome:r=[16,12,8]`, `none`."
)


def _bump_editor() -> None:
    st.session_state["editor_version"] = st.session_state.get("editor_version", 0) + 1
    st.session_state.pop("editor_error", None)


def _on_preset(choices: dict[str, str]) -> None:
    title = st.session_state["schedule_preset"]
    if title in choices:
        st.session_state["schedule_text"] = choices[title]
    _bump_editor()


def _on_text(choices: dict[str, str], depth: int) -> None:
    text = st.session_state["schedule_text"]
    st.session_state["schedule_preset"] = matching_preset(text, choices, depth)
    _bump_editor()


def _on_editor(key: str, rows: list[dict], depth: int, choices: dict[str, str]) -> None:
    edits = st.session_state.get(key, {}).get("edited_rows", {})
    table = [dict(row) for row in rows]
    for index, changes in edits.items():
        table[int(index)].update(changes)
    try:
        text = rows_to_schedule(table, depth).to_text()
    except ScheduleError as error:
        st.session_state["editor_error"] = str(error)
        return
    st.session_state["schedule_text"] = text
    st.session_state["schedule_preset"] = matching_preset(text, choices, depth)
    _bump_editor()


def schedule_sidebar(model: LoadedModel, choices: dict[str, str]):
    """Preset and text, kept in sync with each other and the per-layer editor; returns
    the schedule to run and the placeholder for messages about it."""
    state = st.session_state
    depth = model.facts.depth
    options = [*choices, CUSTOM_PRESET]
    first_method = next((t for t in choices if choices[t] != "none"), None)
    state.setdefault("schedule_text", choices[first_method] if first_method else "none")
    if state.get("schedule_preset") not in options:
        state["schedule_preset"] = matching_preset(state["schedule_text"], choices, depth)

    st.sidebar.header("Schedule")
    st.sidebar.selectbox(
        "Preset", options, key="schedule_preset", on_change=_on_preset, args=(choices,)
    )
    st.sidebar.text_area(
        "Schedule text",
        key="schedule_text",
        on_change=_on_text,
        args=(choices, depth),
        help=SCHEDULE_HELP,
    )
    slot = st.sidebar.empty()
    try:
        schedule = check_schedule(state["schedule_text"], model)
        state["last_valid_schedule"] = schedule.to_json()
    except ScheduleError as error:
        schedule = _fallback_schedule(model)
        shown = "no reduction" if schedule.is_empty else f"`{shorten(schedule.to_text())}`"
        slot.error(f"{error}\n\nShowing the last valid schedule: {shown}.")
        notify(f"Schedule: {error}\n\nShowing the last valid schedule: {shown}.")

    st.sidebar.caption(
        "Or edit it layer by layer: **Per-layer schedule editor**, above the pictures."
    )
    return schedule, slot


def schedule_editor(schedule: Schedule, model: LoadedModel, choices: dict[str, str]) -> None:
    """The per-layer editor (a row per layer), kept in sync with the schedule text."""
    state = st.session_state
    depth = model.facts.depth
    with st.expander("Per-layer schedule editor", icon=":material/table_edit:"):
        left, right = st.columns([3, 2])
        rows = schedule_to_rows(schedule, depth)
        key = f"schedule_editor_{state.get('editor_version', 0)}_{depth}"
        config = {
            LAYER_COLUMN: st.column_config.NumberColumn("layer", disabled=True, width="small")
        }
        for column in editor_columns():
            config[column.method] = st.column_config.SelectboxColumn(
                column.method_title,
                options=column.options,
                required=True,
                help=f"Methods that run at the '{column.site.value}' site of a layer",
            )
            config[column.params] = st.column_config.TextColumn(
                column.params_title,
                width="medium",
                help="key=value pairs, comma separated; empty for the defaults",
            )
        with left:
            st.data_editor(
                pd.DataFrame(rows),
                key=key,
                column_config=config,
                hide_index=True,
                num_rows="fixed",
                on_change=_on_editor,
                args=(key, rows, depth, choices),
                width="stretch",
                height=36 * (depth + 1) + 3,
            )
            if state.get("editor_error"):
                st.error(state["editor_error"])
            st.caption(
                f"A row per layer. Pick `{NO_METHOD}` for no reducer; edits rewrite the "
                "schedule text in the sidebar, and editing the text rewrites this table."
            )
        with right:
            st.markdown("**Methods and parameters**")
            st.markdown(method_reference())


def _fallback_schedule(model: LoadedModel) -> Schedule:
    text = st.session_state.get("last_valid_schedule")
    if text:
        try:
            return check_schedule(text, model)
        except ScheduleError:
            pass
    return Schedule()
