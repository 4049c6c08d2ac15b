"""Pictures of a trace: pure functions from (image, trace, layer) to an RGB uint8 array.

The image is the model's input crop at any display resolution (``display_image`` makes
one from the original). Patch ``(i, j)`` of the grid covers rows ``edges_y[i]:edges_y[i+1]``
and columns ``edges_x[j]:edges_x[j+1]``, so boundaries always fall on patch edges.

Every view draws a patch's fate the same way (:func:`patch_states`): pruned patches are
hatched over a dark copy of the image (light ``/`` stripes: dropped; amber ``\\`` stripes:
pruned and fused into an extra token, EViT's), so that no image content, dark or light,
can pass for a pruned patch.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from analysis.images import CropInfo
from analysis.trace import Trace
from viz.colors import (
    DROPPED_RGB,
    FUSED_RGB,
    HATCH_RGB,
    NEVER_REDUCED_RGB,
    apply_colormap,
    layer_colors,
    segment_colors,
)

DISPLAY_MIN_SIDE = 448
DISPLAY_MAX_SIDE = 896

# What became of a patch by a layer (see patch_states).
OWN, MERGED, FUSED, DROPPED = 0, 1, 2, 3
PATTERNS = {DROPPED: "dropped", FUSED: "fused"}  # the hatched states


class NoScoresError(ValueError):
    """The trace holds no importance scores at the requested layer."""


@dataclass(frozen=True)
class LegendEntry:
    color: tuple[int, int, int]
    label: str
    pattern: str = ""  # "dropped" or "fused": the swatch is hatched as the pictures are


# --------------------------------------------------------------------------- geometry


def cell_edges(length: int, cells: int) -> np.ndarray:
    """Pixel offsets of the ``cells + 1`` edges that split ``length`` pixels evenly."""
    return np.round(np.arange(cells + 1) * (length / cells)).astype(int)


def upsample_cells(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest upsampling of a [gh, gw, ...] grid to [height, width, ...] on patch edges."""
    gh, gw = values.shape[:2]
    rows = np.searchsorted(cell_edges(height, gh), np.arange(height), side="right") - 1
    cols = np.searchsorted(cell_edges(width, gw), np.arange(width), side="right") - 1
    return values[rows][:, cols]


def boundary_mask(labels: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Pixels within ``thickness`` of a change of label, on both sides of the edge."""
    edge = np.zeros(labels.shape, dtype=bool)
    horizontal = labels[:, 1:] != labels[:, :-1]
    vertical = labels[1:, :] != labels[:-1, :]
    for shift in range(thickness):
        edge[:, : edge.shape[1] - 1 - shift] |= horizontal[:, shift:]
        edge[:, 1 + shift :] |= horizontal[:, : horizontal.shape[1] - shift]
        edge[: edge.shape[0] - 1 - shift, :] |= vertical[shift:, :]
        edge[1 + shift :, :] |= vertical[: vertical.shape[0] - shift, :]
    return edge


def default_thickness(image: np.ndarray) -> int:
    return max(1, round(min(image.shape[:2]) / 448))


def display_image(
    original: Image.Image,
    crop: CropInfo,
    grid: tuple[int, int],
    *,
    min_side: int = DISPLAY_MIN_SIDE,
    max_side: int = DISPLAY_MAX_SIDE,
) -> np.ndarray:
    """The region of ``original`` the model saw, at a display size that is a whole number
    of pixels per patch (between ``min_side`` and ``max_side`` where the grid allows)."""
    (width, height), (resized_w, resized_h) = crop.original_size, crop.resized_size
    sx, sy = width / resized_w, height / resized_h
    left, top, right, bottom = crop.crop_box
    box = (left * sx, top * sy, right * sx, bottom * sy)
    cells = max(grid)
    native = max(box[2] - box[0], box[3] - box[1])
    cell = round(native / cells)
    cell = max(cell, math.ceil(min_side / cells))
    cell = max(1, min(cell, max_side // cells))
    size = (grid[1] * cell, grid[0] * cell)
    return np.asarray(
        original.convert("RGB").resize(size, Image.Resampling.LANCZOS, box=box), dtype=np.uint8
    )


def thumbnail(image: np.ndarray, side: int) -> np.ndarray:
    """A smaller copy of an image (area averaging), ``side`` pixels on its longer edge."""
    height, width = image.shape[:2]
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


# --------------------------------------------------------------------------- trace reading


def patch_owner(trace: Trace, layer: int, index: int = 0) -> np.ndarray:
    """[N] token carrying each patch after ``layer`` (-1: input, -1 values: dropped)."""
    return trace.owner_at(layer)[index].numpy().astype(np.int64)


def segment_roots(owner: np.ndarray) -> np.ndarray:
    """For each patch, the smallest patch index sharing its token (-1 for dropped patches).

    A merged segment keeps the root of one of the segments it absorbed, which makes the
    root (and so the colour) stable from layer to layer.
    """
    owner = np.asarray(owner, dtype=np.int64)
    alive = owner >= 0
    roots = np.full(owner.shape, -1, dtype=np.int64)
    if not alive.any():
        return roots
    smallest = np.full(owner.max() + 1, owner.size, dtype=np.int64)
    patches = np.arange(owner.size)
    np.minimum.at(smallest, owner[alive], patches[alive])
    roots[alive] = smallest[owner[alive]]
    return roots


def token_sizes(trace: Trace, layer: int, index: int = 0) -> np.ndarray:
    """[N] how many patches the token carrying each patch holds (0 for dropped patches)."""
    owner = patch_owner(trace, layer, index)
    if layer < 0:
        return np.ones(owner.shape, dtype=np.float64)
    sizes = trace.layers[layer].sizes[index].numpy().astype(np.float64)
    return np.where(owner >= 0, sizes[owner.clip(min=0)], 0.0)


def layer_scores(trace: Trace, layer: int, index: int = 0) -> np.ndarray | None:
    """[N] the importance scores the reducer used at ``layer`` (NaN where a patch was
    already gone), or None when no reducer scored tokens there."""
    if layer < 0 or trace.layers[layer].scores is None:
        return None
    return trace.layers[layer].scores[index].numpy().astype(np.float64)


def scored_layers(trace: Trace) -> list[int]:
    return [record.layer for record in trace.layers if record.scores is not None]


def describe_layers(layers: Sequence[int]) -> str:
    """Layers in words, runs joined: ``[0, 1, 2, 3, 7]`` -> ``"0–3, 7"``."""
    parts: list[str] = []
    for layer in sorted(set(layers)):
        if parts and parts[-1].split("–")[-1] == str(layer - 1):
            parts[-1] = f"{parts[-1].split('–')[0]}–{layer}"
        else:
            parts.append(str(layer))
    return ", ".join(parts)


def fused_patches(trace: Trace, layer: int, index: int = 0) -> np.ndarray:
    """[N] bool: patches pruned into a fused token (EViT's extra token) by ``layer``."""
    if layer < 0 or trace.layers[layer].fused is None:
        return np.zeros(trace.num_patches, dtype=bool)
    return trace.layers[layer].fused[index].numpy().astype(bool)


def patch_states(trace: Trace, layer: int, index: int = 0) -> np.ndarray:
    """[N] what became of each patch by ``layer``: OWN (still a token of its own), MERGED
    (shares a token with other patches), FUSED (pruned from attention, but pooled into a
    fused extra token) or DROPPED. Fused is its own state: such a token is no segment of
    similar patches, and calling it merged would hide that its patches were pruned."""
    owner = patch_owner(trace, layer, index)
    states = np.where(token_sizes(trace, layer, index) > 1, MERGED, OWN)
    states[fused_patches(trace, layer, index)] = FUSED
    states[owner < 0] = DROPPED
    return states.astype(np.uint8)


def opening_layer(traces: Sequence[Trace]) -> int:
    """The layer a page opens at: the last one where some trace has importance scores,
    else the last one where a reducer ran, else the last layer. (The last layer is often
    empty: a schedule at layers 3/6/9 has no scores there to show.)"""
    depth = max((len(trace.layers) for trace in traces), default=0)
    scored = [layer for trace in traces for layer in scored_layers(trace)]
    if scored:
        return max(scored)
    acted = [record.layer for trace in traces for record in trace.layers if record.methods]
    return max(acted) if acted else max(depth - 1, 0)


# --------------------------------------------------------------------------- renderers


def render_segments(
    image: np.ndarray,
    trace: Trace,
    layer: int,
    *,
    index: int = 0,
    mode: str = "mean",
    boundaries: bool = True,
    tint: float = 0.55,
    thickness: int | None = None,
) -> np.ndarray:
    """Every token's patches as one segment, with segment boundaries drawn.

    ``mode="mean"`` fills a segment with the mean image colour of its patches;
    ``mode="tint"`` tints the segments of two or more patches with their stable colour
    and leaves patches still a token of their own as the image (colouring those too
    turns the picture into confetti). Pruned patches are hatched (see the module notes),
    never filled as a segment: EViT's fused token is no group of similar patches.
    """
    image = _rgb(image)
    height, width = image.shape[:2]
    gh, gw = trace.grid
    owner = patch_owner(trace, layer, index)
    states = patch_states(trace, layer, index)
    if mode == "mean":
        shown = (states == OWN) | (states == MERGED)
        means = patch_means(image, trace.grid).reshape(-1, 3)
        label = np.where(shown, owner, 0)
        weight = shown.astype(np.float64)
        count = np.bincount(label, weights=weight, minlength=label.max() + 1)
        fill = np.stack(
            [
                np.bincount(label, weights=means[:, c] * weight, minlength=count.size)
                for c in range(3)
            ],
            axis=-1,
        )
        patch_rgb = fill[label] / np.maximum(count, 1)[label, None]
        out = upsample_cells(_to_uint8(patch_rgb).reshape(gh, gw, 3), height, width)
    elif mode == "tint":
        colors = segment_colors(segment_roots(owner)).reshape(gh, gw, 3)
        tinted = cv2.addWeighted(image, 1 - tint, upsample_cells(colors, height, width), tint, 0)
        merged = upsample_cells((states == MERGED).reshape(gh, gw), height, width)
        out = np.where(merged[..., None], tinted, image)
    else:
        raise ValueError(f"unknown segment mode '{mode}' (mean or tint)")
    out = hatch_pruned(np.array(out, order="C"), image, states, trace.grid)
    if boundaries:
        labels = owner.copy()
        if mode == "tint":  # no lines between patches left as the image
            labels[states == OWN] = -2
        labels = upsample_cells(labels.reshape(gh, gw), height, width)
        edge = boundary_mask(labels, thickness or default_thickness(image))
        _paint(out, edge, (255, 255, 255) if mode == "mean" else (20, 20, 20))
    return np.ascontiguousarray(out)


def render_pruned(
    image: np.ndarray,
    trace: Trace,
    layer: int,
    *,
    index: int = 0,
    grey_merged: bool = True,
    thickness: int | None = None,
) -> np.ndarray:
    """What each patch is at ``layer``: the image where it is a token of its own; grey
    and outlined (with ``grey_merged``) where it shares a token with others; hatched where
    it was pruned (light ``/``: dropped; amber ``\\``: pruned and fused into an extra
    token). The outline is white on dark pixels and black on light ones: grey alone
    cannot show a merge on a grey or black image."""
    image = _rgb(image)
    height, width = image.shape[:2]
    gh, gw = trace.grid
    states = patch_states(trace, layer, index)
    if not grey_merged:
        states[states == MERGED] = OWN
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    merged = cv2.convertScaleAbs(grey, alpha=0.7, beta=40)
    merged = cv2.addWeighted(image, 0.15, merged, 0.85, 0)
    per_pixel = upsample_cells((states == MERGED).reshape(gh, gw), height, width)
    out = hatch_pruned(np.where(per_pixel[..., None], merged, image), image, states, trace.grid)
    if (states == MERGED).any():
        labels = np.where(states == MERGED, patch_owner(trace, layer, index), -2)
        labels = upsample_cells(labels.reshape(gh, gw), height, width)
        edge = boundary_mask(labels, thickness or default_thickness(image))
        light = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY) >= 128
        _paint(out, edge & light, (0, 0, 0))
        _paint(out, edge & ~light, (255, 255, 255))
    return out


def render_token_depth(
    image: np.ndarray,
    trace: Trace,
    *,
    index: int = 0,
    opacity: float = 0.75,
    legend: bool = True,
) -> np.ndarray:
    """Each patch coloured by the layer at which it stopped being a token of its own
    (merged, fused or dropped), over a grey copy of the image, with a legend. Dropped
    patches carry thin light ``/`` stripes and fused ones amber ``\\`` stripes, each edged
    in black so that they show on every layer colour."""
    image = _rgb(image)
    height, width = image.shape[:2]
    gh, gw = trace.grid
    depth = len(trace.layers)
    reduced = trace.reduced_at()[index].numpy().astype(np.int64)
    dropped = (trace.dropped_at[index].numpy() >= 0) if trace.dropped_at is not None else None
    fused = np.zeros(trace.num_patches, dtype=bool)
    for layer in range(depth):
        fused |= fused_patches(trace, layer, index)
    palette = np.vstack([layer_colors(depth), np.array([NEVER_REDUCED_RGB])]).astype(np.uint8)
    colors = upsample_cells(palette[reduced].reshape(gh, gw, 3), height, width)
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    out = cv2.addWeighted(grey, 1 - opacity, colors, opacity, 0)
    out[boundary_mask(upsample_cells(reduced.reshape(gh, gw), height, width), 1)] //= 3
    if dropped is not None and dropped.any():
        out = _stripe_cells(out, dropped, trace.grid, "dropped")
    if fused.any():
        out = _stripe_cells(out, fused & (dropped is None or ~dropped), trace.grid, "fused")
    if not legend:
        return out
    entries = [LegendEntry(tuple(int(v) for v in palette[i]), f"layer {i}") for i in range(depth)]
    entries.append(LegendEntry(NEVER_REDUCED_RGB, "never"))
    extras = [LegendEntry(DROPPED_RGB, "dropped", "dropped")] if dropped is not None else []
    if fused.any():
        extras.append(LegendEntry(DROPPED_RGB, "fused", "fused"))
    return attach_panel(out, discrete_legend(height, entries, extras, title="reduced at"))


def render_heatmap(
    image: np.ndarray,
    trace: Trace,
    layer: int,
    *,
    index: int = 0,
    colormap: str = "inferno",
    opacity: float = 0.6,
    colorbar: bool = True,
    smooth: bool = False,
) -> np.ndarray:
    """The importance scores used at ``layer``, one flat colour per patch (the values the
    reducer ranked; ``smooth`` interpolates them, for a softer look), with a colour bar.
    Patches already pooled into a fused token share its one score: amber stripes over
    it say so. Raises :class:`NoScoresError` where the layer has no scores."""
    scores = layer_scores(trace, layer, index)
    if scores is None:
        raise NoScoresError(f"no importance scores at layer {layer}")
    return render_score_map(
        image,
        scores,
        trace.grid,
        colormap=colormap,
        opacity=opacity,
        colorbar=colorbar,
        smooth=smooth,
        pooled=fused_patches(trace, layer - 1, index),
    )


def render_score_map(
    image: np.ndarray,
    scores: np.ndarray,
    grid: tuple[int, int],
    *,
    colormap: str = "inferno",
    opacity: float = 0.6,
    colorbar: bool = True,
    title: str = "score",
    smooth: bool = False,
    pooled: np.ndarray | None = None,
) -> np.ndarray:
    """Per-patch values [N] (NaN: no value, hatched as dropped) as a colormapped overlay,
    one flat colour per patch unless ``smooth`` (bicubic between patch centres).
    ``pooled`` [N] bool marks patches whose value is a fused token's (amber stripes)."""
    image = _rgb(image)
    height, width = image.shape[:2]
    gh, gw = grid
    values = np.asarray(scores, dtype=np.float64).reshape(gh, gw)
    valid = np.isfinite(values)
    low = float(values[valid].min()) if valid.any() else 0.0
    high = float(values[valid].max()) if valid.any() else 1.0
    span = high - low if high > low else 1.0
    normalised = np.where(valid, (values - low) / span, 0.0).astype(np.float32)
    if smooth:
        spread = cv2.resize(normalised, (width, height), interpolation=cv2.INTER_CUBIC)
        heat = apply_colormap(np.clip(spread, 0.0, 1.0), colormap)
    else:
        heat = upsample_cells(apply_colormap(normalised, colormap), height, width)
    out = cv2.addWeighted(image, 1 - opacity, heat, opacity, 0)
    if not valid.all():
        states = np.where(valid, OWN, DROPPED).reshape(-1)
        out = hatch_pruned(out, image, states, grid)
    if pooled is not None and pooled.any():
        out = _stripe_cells(out, pooled & valid.reshape(-1), grid, "fused")
    if not colorbar:
        return out
    ticks = [
        (0.0, _format_tick(low)),
        (0.5, _format_tick((low + high) / 2)),
        (1.0, _format_tick(high)),
    ]
    return attach_panel(out, continuous_colorbar(height, colormap, ticks, title=title))


def render_crop_box(original: Image.Image, crop: CropInfo, *, side: int = 320) -> np.ndarray:
    """A thumbnail of the original image with the model's crop outlined, outside dimmed."""
    rgb = original.convert("RGB")
    scale = side / max(rgb.size)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    thumb = np.asarray(rgb.resize(size, Image.Resampling.LANCZOS), dtype=np.float64)
    resized_w, resized_h = crop.resized_size
    left, top, right, bottom = crop.crop_box
    fx, fy = size[0] / resized_w, size[1] / resized_h
    x0, y0 = round(left * fx), round(top * fy)
    x1, y1 = round(right * fx), round(bottom * fy)
    inside = np.zeros(thumb.shape[:2], dtype=bool)
    inside[max(0, y0) : y1, max(0, x0) : x1] = True
    thumb[~inside] *= 0.35
    out = Image.fromarray(_to_uint8(thumb))
    # A very thin image has a one-pixel thumbnail side: keep the box at least one pixel.
    box_x0, box_y0 = min(max(0, x0), size[0] - 1), min(max(0, y0), size[1] - 1)
    box_x1 = max(box_x0, min(size[0], x1) - 1)
    box_y1 = max(box_y0, min(size[1], y1) - 1)
    ImageDraw.Draw(out).rectangle((box_x0, box_y0, box_x1, box_y1), outline=(255, 200, 0), width=2)
    return np.asarray(out)


def to_png(image: np.ndarray, *, fast: bool = False) -> bytes:
    """PNG bytes of an RGB array. ``fast`` (for display) compresses lightly with libpng's
    fast row filters: two thirds of the time of Pillow's fastest level, at the same size."""
    rgb = _rgb(image)
    if fast:
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), _FAST_PNG)
        if ok:
            return encoded.tobytes()
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1 if fast else 6)
    return buffer.getvalue()


_FAST_PNG = [
    cv2.IMWRITE_PNG_COMPRESSION,
    1,
    cv2.IMWRITE_PNG_FILTER,
    cv2.IMWRITE_PNG_FAST_FILTERS,
]


# --------------------------------------------------------------------------- legends


def continuous_colorbar(
    height: int, colormap: str, ticks: Sequence[tuple[float, str]], *, title: str = ""
) -> np.ndarray:
    """A vertical colour bar panel (top is 1.0) with tick labels, ``height`` pixels tall."""
    font = _font(height)
    pad = max(4, _size(font) // 2)
    bar_w = max(10, _size(font))
    top, bottom = pad + (_size(font) + pad if title else 0), height - pad - _size(font) // 2
    bar_h = max(2, bottom - top)
    label_w = max(_text_width(font, text) for _, text in ticks) if ticks else 0
    width = pad + bar_w + pad + label_w + pad
    panel = Image.new("RGB", (max(width, _text_width(font, title) + 2 * pad), height), "white")
    gradient = apply_colormap(np.linspace(1.0, 0.0, bar_h)[:, None].repeat(bar_w, axis=1), colormap)
    panel.paste(Image.fromarray(gradient), (pad, top))
    draw = ImageDraw.Draw(panel)
    draw.rectangle((pad - 1, top - 1, pad + bar_w, top + bar_h), outline=(60, 60, 60))
    if title:
        draw.text((pad, pad), title, fill=(30, 30, 30), font=font)
    for fraction, text in ticks:
        y = top + (1.0 - fraction) * (bar_h - 1)
        draw.line((pad + bar_w, y, pad + bar_w + pad // 2, y), fill=(60, 60, 60))
        draw.text((2 * pad + bar_w, y), text, fill=(30, 30, 30), font=font, anchor="lm")
    return np.asarray(panel)


def discrete_legend(
    height: int,
    entries: Sequence[LegendEntry],
    extras: Sequence[LegendEntry] = (),
    *,
    title: str = "",
) -> np.ndarray:
    """A vertical legend panel: contiguous colour blocks (labels thinned to fit), then
    separate swatches for ``extras``."""
    font = _font(height)
    pad = max(4, _size(font) // 2)
    swatch = max(10, _size(font))
    extras_h = len(extras) * (swatch + pad)
    top = pad + (_size(font) + pad if title else 0)
    bar_h = max(len(entries), height - top - pad - extras_h)
    block = bar_h / max(1, len(entries))
    every = max(1, math.ceil((_size(font) + 2) / block))
    labels = [entry.label for entry in (*entries, *extras)]
    label_w = max((_text_width(font, text) for text in labels), default=0)
    width = max(pad + swatch + pad + label_w + pad, _text_width(font, title) + 2 * pad)
    panel = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(panel)
    if title:
        draw.text((pad, pad), title, fill=(30, 30, 30), font=font)
    for i, entry in enumerate(entries):
        y0, y1 = top + i * block, top + (i + 1) * block
        draw.rectangle(
            (pad, round(y0), pad + swatch - 1, max(round(y0), round(y1) - 1)), fill=entry.color
        )
        if i % every == 0 or i == len(entries) - 1:
            draw.text(
                (2 * pad + swatch, (y0 + y1) / 2),
                entry.label,
                fill=(30, 30, 30),
                font=font,
                anchor="lm",
            )
    y = top + bar_h + pad
    for entry in extras:
        tile = np.full((swatch, swatch, 3), entry.color, dtype=np.uint8)
        if entry.pattern:
            tile = pattern_swatch(entry.pattern, swatch)
        panel.paste(Image.fromarray(tile), (pad, round(y)))
        draw.rectangle(
            (pad, round(y), pad + swatch - 1, round(y) + swatch - 1), outline=(60, 60, 60)
        )
        draw.text(
            (2 * pad + swatch, y + swatch / 2),
            entry.label,
            fill=(30, 30, 30),
            font=font,
            anchor="lm",
        )
        y += swatch + pad
    return np.asarray(panel)


def attach_panel(image: np.ndarray, panel: np.ndarray, gap: int = 0) -> np.ndarray:
    """The image with a legend panel to its right (both as tall as the image)."""
    height = image.shape[0]
    if panel.shape[0] != height:
        raise ValueError("the panel must be as tall as the image")
    spacer = np.full((height, gap, 3), 255, dtype=np.uint8)
    return np.concatenate([_rgb(image), spacer, panel], axis=1)


# --------------------------------------------------------------------------- helpers


def patch_means(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[gh, gw, 3] the mean colour of each patch."""
    image = _rgb(image)
    height, width = image.shape[:2]
    if height % grid[0] == 0 and width % grid[1] == 0:  # whole pixels per patch: exact and fast
        small = cv2.resize(
            image.astype(np.float32), (grid[1], grid[0]), interpolation=cv2.INTER_AREA
        )
        return small.astype(np.float64)
    image = image.astype(np.float64)
    ys, xs = cell_edges(height, grid[0]), cell_edges(width, grid[1])
    sums = image.cumsum(0).cumsum(1)
    sums = np.pad(sums, ((1, 0), (1, 0), (0, 0)))
    total = (
        sums[ys[1:]][:, xs[1:]]
        - sums[ys[:-1]][:, xs[1:]]
        - sums[ys[1:]][:, xs[:-1]]
        + sums[ys[:-1]][:, xs[:-1]]
    )
    area = np.outer(np.diff(ys), np.diff(xs))[..., None]
    return total / np.maximum(area, 1)


def _rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8, copy=False)


_LUMA = np.array([0.299, 0.587, 0.114])


def _darkened(image: np.ndarray, weight: float = 0.25, base: int = DROPPED_RGB[0]) -> np.ndarray:
    """A dark grey copy of the image, for patches that are gone."""
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.convertScaleAbs(grey, alpha=weight, beta=(1 - weight) * base)


def hatch_pruned(
    out: np.ndarray, image: np.ndarray, states: np.ndarray, grid: tuple[int, int]
) -> np.ndarray:
    """``out`` with its DROPPED and FUSED patches hatched over a dark grey copy of
    ``image`` (light ``/`` stripes: dropped; amber ``\\`` stripes: fused). A kept patch
    shows the image, so it is never striped: the hatching reads on black and white alike.
    """
    height, width = out.shape[:2]
    per_pixel = upsample_cells(np.asarray(states).reshape(grid), height, width)
    pruned = (per_pixel == DROPPED) | (per_pixel == FUSED)
    if not pruned.any():
        return out
    out = np.array(out, order="C")
    _paint(out, pruned, _darkened(image))
    period = hatch_period(height, grid[0])
    for state, color in ((DROPPED, HATCH_RGB), (FUSED, FUSED_RGB)):
        lines, _ = _stripes(height, width, period, PATTERNS[state])
        _paint(out, (per_pixel == state) & lines, color)
    return out


def hatch_period(height: int, cells: int) -> int:
    """Stripe period in pixels: two stripes a patch, so that a single pruned patch shows
    its hatching, and at least 6 px, so that it survives a thumbnail."""
    return max(6, round(height / max(1, cells) / 2))


def pattern_swatch(pattern: str, size: int) -> np.ndarray:
    """A ``size``-pixel legend square hatched as pruned patches are ("dropped", "fused")."""
    tile = np.full((size, size, 3), DROPPED_RGB, dtype=np.uint8)
    lines, _ = _stripes(size, size, max(5, size // 3), pattern)
    tile[lines] = HATCH_RGB if pattern == "dropped" else FUSED_RGB
    return tile


@functools.lru_cache(maxsize=32)
def _stripes(
    height: int, width: int, period: int, pattern: str, fraction: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """Diagonal stripes (``/`` for "dropped", ``\\`` for "fused") covering ``fraction``
    of the area, and the as wide dark edge beside each stripe, as read-only boolean masks
    (cached: every picture of a size shares them)."""
    y, x = np.ogrid[0:height, 0:width]
    along = (x + y) if pattern == "dropped" else (x - y)
    width_ = max(1, round(fraction * period))
    phase = along % period
    lines, edges = phase < width_, (phase >= width_) & (phase < min(period, 2 * width_))
    lines.flags.writeable = False
    edges.flags.writeable = False
    return lines, edges


def _stripe_cells(
    out: np.ndarray, cells: np.ndarray, grid: tuple[int, int], pattern: str
) -> np.ndarray:
    """``out`` with stripes (no dark ground) over ``cells`` [N] bool: a state drawn over
    what the patch shows, such as the score of the fused token its patches share."""
    height, width = out.shape[:2]
    where = upsample_cells(np.asarray(cells).reshape(grid), height, width)
    lines, edges = _stripes(height, width, hatch_period(height, grid[0]), pattern, 0.15)
    out = np.array(out, order="C")
    _paint(out, where & edges, DROPPED_RGB)
    _paint(out, where & lines, HATCH_RGB if pattern == "dropped" else FUSED_RGB)
    return out


def _paint(out: np.ndarray, mask: np.ndarray, source: np.ndarray | Sequence[int]) -> None:
    """``out[mask] = source`` in place (``source`` an image or one colour; ``out`` C-ordered,
    as every renderer here makes it). OpenCV's masked copy: numpy's boolean indexing of
    whole pictures was most of the drawing time."""
    if not (isinstance(source, np.ndarray) and source.ndim == 3):
        source = _solid(out.shape[:2], tuple(int(v) for v in source))
    mask = np.ascontiguousarray(mask).view(np.uint8)
    cv2.copyTo(np.ascontiguousarray(source, dtype=np.uint8), mask, out)


def _solid(size: tuple[int, int], color: tuple[int, ...]) -> np.ndarray:
    """A ``size`` picture of one RGB colour."""
    return cv2.merge([np.full(size, value, dtype=np.uint8) for value in color])


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def _font(height: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(10, min(22, height // 30)))


def _text_width(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> int:
    if not text:
        return 0
    left, _, right, _ = font.getbbox(text)
    return math.ceil(right - left)


def _format_tick(value: float) -> str:
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _size(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    return int(getattr(font, "size", 11))
