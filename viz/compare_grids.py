"""The Compare page's two grids as labelled RGB arrays: images × methods at one layer,
and methods × layers on the page's image.

Pure drawing from ``analysis.comparison`` records: the page passes the thumbnails and
the runs, and caches and encodes what comes back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from analysis.comparison import BatchRuns, Column, ComparedImages, GridPlan, view_layer
from viz.compare import VIEWS, Cell, compose_grid, legend_strip, render_view

GRID_CELL = 176  # pixels per cell side
LEGEND_WIDTH = 640


def grid_legend(plan: GridPlan) -> np.ndarray | None:
    """The one legend under a grid (the cells carry none)."""
    return legend_strip(plan.view, plan.depth, LEGEND_WIDTH)


def images_heading(plan: GridPlan, layer: int) -> str:
    """The images × methods grid's heading, in markdown."""
    count = len(plan.image_keys)
    images = f"{count} image" if count == 1 else f"{count} images"
    at = view_layer(plan.view, layer)
    where = "" if at is None else f", after layer {at}"
    return f"**{images} × {len(plan.columns)} methods**{where}"


def images_grid(
    plan: GridPlan,
    thumbnails: Sequence[np.ndarray],
    good: Sequence[Column],
    batch: BatchRuns,
    images: ComparedImages,
    layer: int,
) -> np.ndarray:
    """Rows: the image set; columns: the input, then each method at ``layer`` (a grey
    note where a column's batch failed or a heatmap has no scores)."""
    rows = []
    for position, small in enumerate(thumbnails):
        row: list[Cell] = [small]
        for column in good:
            result = batch.result(column.index)
            if result is None:
                row.append(batch.note(column.index))
                continue
            picture = render_view(
                small,
                result.trace,
                plan.view,
                layer,
                index=position,
                segment_mode=plan.segment_mode,
                legend=False,
            )
            row.append(picture if picture is not None else f"no scores at layer {layer}")
        rows.append(row)
    at = view_layer(plan.view, layer)
    where = "" if at is None else f" · after layer {at}"
    return compose_grid(
        rows,
        list(images.labels),
        plan.headers,
        cell_side=GRID_CELL,
        title=f"{plan.model_name} · {VIEWS[plan.view]}{where}",
        footer=grid_legend(plan),
    )


def layers_grid(
    plan: GridPlan,
    base: np.ndarray,
    good: Sequence[Column],
    image_label: str,
    layers: Sequence[int],
) -> np.ndarray:
    """Rows: the methods; columns: ``layers`` (one for token depth), on ``base``."""
    cells = []
    for column in good:
        if column.result is None:
            cells.append(["not run"] * len(layers))
            continue
        row: list[Cell] = []
        for at in layers:
            picture = render_view(
                base,
                column.result.trace,
                plan.view,
                at,
                segment_mode=plan.segment_mode,
                legend=False,
            )
            row.append(picture if picture is not None else f"no scores at layer {at}")
        cells.append(row)
    all_layers = view_layer(plan.view, 0) is None
    return compose_grid(
        cells,
        plan.names,
        ["all layers"] if all_layers else [f"layer {at}" for at in layers],
        cell_side=GRID_CELL,
        title=f"{plan.model_name} · {image_label} · {VIEWS[plan.view]}",
        footer=grid_legend(plan),
    )
