"""The Compare page's tables, metric tiles and sentences, drawn from its records.

Pure functions (no Streamlit, no model runs): the page passes in the columns and runs
from ``analysis.comparison`` and shows what comes back, so the wording and the numbers
are tested without an app.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.agreement import METRICS
from analysis.comparison import BatchJob, BatchRuns, Column
from analysis.records import RunResult
from analysis.solver import MatchedSchedule
from analysis.trace import Trace
from viz import overlays, summary
from viz.compare import MethodSummary, comparison_table, summarize


@dataclass(frozen=True)
class Tile:
    """One ``st.metric``: a label, a value, and how it differs from the full model."""

    label: str
    value: str
    delta: str | None = None
    delta_color: str = "normal"  # "normal", "inverse" or "off"
    help: str = ""


# --------------------------------------------------------------------------- words


def images_word(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


def format_value(value: object) -> str:
    """A solved parameter as schedules write it: ``14``, ``0.6``, ``[3,6]``."""
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def runs_label(jobs: Sequence[BatchJob]) -> str:
    """What a batch of runs is, in words: the full model is no column's schedule."""
    count = sum(job.index is not None for job in jobs)
    parts = ["the full model"] if any(job.index is None for job in jobs) else []
    if count:
        parts.append(f"{count} schedule{'' if count == 1 else 's'}")
    return " and ".join(parts)


def matched_text(m: MatchedSchedule) -> str:
    """What matched mode set a column to, in markdown; within tolerance, a green check
    (otherwise the page shows ``m.message`` as a warning)."""
    line = (
        f"**set to `{m.param}={format_value(m.value)}`** → {m.gmacs:.3f} GMACs "
        f"({m.percent:.1f}% of full; target {m.target_gmacs:.3f})"
    )
    if m.within_tolerance:
        return f"{line}  \n:green[:material/check_circle: within ±{m.tolerance:.3f} GMACs]"
    return line


def left_out_note(columns: Sequence[Column]) -> str:
    """Which failed columns the summary, agreement and grids leave out ("" for none)."""
    bad = [c for c in columns if not c.ok]
    if not bad:
        return ""
    return (
        "Left out of the summary, the agreement and the grids: "
        + ", ".join(f"column {c.letter}" for c in bad)
        + " (its error is shown under its schedule)."
    )


def score_range(trace: Trace, layer: int) -> str:
    """The scores behind a heatmap's colours, from dark to bright (the colour bar's ticks)."""
    scores = overlays.layer_scores(trace, layer)
    found = scores[np.isfinite(scores)] if scores is not None else np.array([])
    if found.size == 0:
        return ""
    return f"Scores from {found.min():.3g} (dark) to {found.max():.3g} (bright)."


def no_scores_message(trace: Trace, layer: int) -> str:
    scored = overlays.scored_layers(trace)
    if not scored:
        return "This schedule's methods compute no importance scores."
    return f"No scores at layer {layer}; scores exist at layer {overlays.describe_layers(scored)}."


# --------------------------------------------------------------------------- tiles


def gmacs_tile(result: RunResult, full: RunResult) -> Tile:
    """A column's cost, with what it saves against the full model."""
    saved = summary.reduction_percent(result.gmacs, full.gmacs)
    return Tile(
        "GMACs",
        f"{result.gmacs:.2f}",
        delta=f"-{saved:.1f}%" if saved > 0 else "full model",
        delta_color="inverse" if saved > 0 else "off",
        help=f"Analytic multiply-accumulates of one image; the full model needs {full.gmacs:.2f}.",
    )


def output_tile(result: RunResult, full: RunResult, names: Sequence[str] | None) -> Tile:
    """A classifier's top-1 against the full model's; a backbone's feature cosine."""
    if result.logits is not None and full.logits is not None:
        mine = summary.top_classes(result.logits, names, 1)[0]
        theirs = summary.top_classes(full.logits, names, 1)[0]
        same = mine.index == theirs.index
        return Tile(
            "Top-1",
            mine.name[:22],
            delta="same as full" if same else "differs from full",
            delta_color="normal" if same else "inverse",
            help=f"{mine.name} (p = {mine.probability:.3f})",
        )
    return Tile(
        "Feature cosine",
        f"{summary.feature_cosine(full.features, result.features):.4f}",
        help="Cosine similarity of the pooled features to the full model's (1 = identical)",
    )


def top5_frame(result: RunResult, full: RunResult, names: Sequence[str] | None) -> pd.DataFrame:
    """A classifier column's top-5, each marked if it is in the full model's top-5."""
    full_top = {c.index for c in summary.top_classes(full.logits, names)}
    rows = summary.top_classes(result.logits, names)
    return pd.DataFrame(
        {
            "top-5": [c.name for c in rows],
            "p": [c.probability for c in rows],
            "full top-5": [c.index in full_top for c in rows],
        }
    )


# --------------------------------------------------------------------------- summary


def summary_rows(
    good: Sequence[Column],
    full: RunResult,
    batch: BatchRuns,
    agreements: Sequence[float | None],
) -> list[MethodSummary]:
    """A row per column that ran: its cost and fidelity against ``full`` (the page's
    image), its agreement with the first column, and its fidelity over the image set."""
    return [
        summarize(
            column.name,
            column.ran,
            column.result,
            full,
            seconds=column.seconds,
            device=column.device,
            agreement=agreement,
            reduced_set=batch.result(column.index),
            full_set=batch.full,
        )
        for column, agreement in zip(good, agreements, strict=True)
        if column.result is not None
    ]


def agreement_label(metric_name: str, good: Sequence[Column]) -> str:
    return f"{METRICS[metric_name].label} vs {good[0].letter}"


def summary_table(
    good: Sequence[Column],
    full: RunResult,
    batch: BatchRuns,
    agreements: Sequence[float | None],
    metric_name: str,
) -> pd.DataFrame:
    """The summary table, its set column named for what it measures and on how many
    images, its agreement column for the metric and the first column."""
    count = images_word(batch.set_size)
    on_set = "top-1 as full" if full.logits is not None else "feature cosine"
    return comparison_table(
        summary_rows(good, full, batch, agreements),
        agreement_label=agreement_label(metric_name, good),
        set_label=f"{on_set} ({count})",
    )


def summary_caption(
    good: Sequence[Column],
    full: RunResult,
    seconds: float,
    device: str,
    metric_name: str,
    layer: int,
) -> str:
    """What the summary's numbers are measured on, and where the times come from."""
    where = (
        "over the image set"
        if METRICS[metric_name].needs_features
        else f"at layer {layer}, this image"
    )
    return (
        f"Fidelity on this image against the full model ({full.gmacs:.2f} GMACs, "
        f"{1000 * seconds:.0f} ms); {agreement_label(metric_name, good)} {where} (pick the "
        "metric under *Agreement*). Run ms: the wall time of one `run()` of this image on "
        f"**{device}**, measured when first computed (results are cached)."
    )


# --------------------------------------------------------------------------- agreement


def heatmap_title(metric_name: str, layer: int, measure: str, count: int) -> str:
    """The agreement heatmap's title: the metric, where, and over which images."""
    metric = METRICS[metric_name]
    where = f"at layer {layer}" if metric.per_layer else "per pair"
    if metric.needs_features:
        scope = f"features of {images_word(count)}"
    elif measure == "set":
        scope = f"mean over {images_word(count)}"
    else:
        scope = "this image"
    return f"{metric.label} {where} ({scope})"


def cka_note(metric_name: str, count: int) -> tuple[str, str] | None:
    """A warning (one image) or a caption (a few) for CKA, which compares features
    across images; None for other metrics or a large enough set."""
    if not METRICS[metric_name].needs_features:
        return None
    if count < 2:
        return "warning", "CKA compares features across images: add samples to the image set."
    if count < 5:
        return (
            "caption",
            f"CKA over {count} images is coarse; add samples to the image set in the sidebar "
            "for a steadier number.",
        )
    return None
