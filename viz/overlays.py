"""Pictures of a trace: pure functions from (image, trace, layer) to an RGB uint8 array.

The image is the model's input crop at any display resolution (``display_image`` makes
one from the original). Patch ``(i, j)`` of the grid covers rows ``edges_y[i]:edges_y[i+1]``
and columns ``edges_x[j]:edges_x[j+1]``, so boundaries always fall on patch edges.
"""

from __future__ import annotations

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
    NEVER_REDUCED_RGB,
    apply_colormap,
    layer_colors,
    segment_colors,
)

DISPLAY_MIN_SIDE = 448
DISPLAY_MAX_SIDE = 896


class NoScoresError(ValueError):
    """The trace holds no importance scores at the requested layer."""


@dataclass(frozen=True)
class LegendEntry:
    color: tuple[int, int, int]
    label: str
    hatched: bool = False


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
    ``mode="tint"`` shows the image tinted with the segment's stable colour.
    Dropped patches are shown dark.
    """
    image = _rgb(image)
    height, width = image.shape[:2]
    gh, gw = trace.grid
    owner = patch_owner(trace, layer, index)
    alive = owner >= 0
    if mode == "mean":
        means = patch_means(image, trace.grid).reshape(-1, 3)
        label = np.where(alive, owner, 0)
        weight = alive.astype(np.float64)
        count = np.bincount(label, weights=weight, minlength=label.max() + 1)
        fill = np.stack(
            [
                np.bincount(label, weights=means[:, c] * weight, minlength=count.size)
                for c in range(3)
            ],
            axis=-1,
        )
        patch_rgb = fill[label] / np.maximum(count, 1)[label, None]
        dark = 0.25 * (means @ _LUMA)[:, None] + 0.75 * np.asarray(DROPPED_RGB, dtype=np.float64)
        patch_rgb = np.where(alive[:, None], patch_rgb, dark)
        out = upsample_cells(_to_uint8(patch_rgb).reshape(gh, gw, 3), height, width)
    elif mode == "tint":
        colors = segment_colors(segment_roots(owner)).reshape(gh, gw, 3)
        out = cv2.addWeighted(image, 1 - tint, upsample_cells(colors, height, width), tint, 0)
        if not alive.all():
            dropped = upsample_cells((~alive).reshape(gh, gw), height, width)
            out = np.where(dropped[..., None], _darkened(image), out)
    else:
        raise ValueError(f"unknown segment mode '{mode}' (mean or tint)")
    if boundaries:
        labels = upsample_cells(owner.reshape(gh, gw), height, width)
        edge = boundary_mask(labels, thickness or default_thickness(image))
        out[edge] = (255, 255, 255) if mode == "mean" else (20, 20, 20)
    return np.ascontiguousarray(out)


def render_pruned(
    image: np.ndarray,
    trace: Trace,
    layer: int,
    *,
    index: int = 0,
    dim: float = 0.15,
    grey_merged: bool = True,
) -> np.ndarray:
    """Dropped patches blacked out; with ``grey_merged``, patches that share a token
    with others (merged or fused) in grey; patches still their own token in colour."""
    image = _rgb(image)
    height, width = image.shape[:2]
    gh, gw = trace.grid
    sizes = token_sizes(trace, layer, index).reshape(gh, gw)
    state = np.where(sizes == 0, 2, np.where(sizes > 1, 1, 0)).astype(np.uint8)
    if not grey_merged:
        state[state == 1] = 0
    per_pixel = upsample_cells(state, height, width)[..., None]
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    merged = cv2.convertScaleAbs(grey, alpha=0.7, beta=40)
    merged = cv2.addWeighted(image, 0.15, merged, 0.85, 0)
    dropped = cv2.convertScaleAbs(grey, alpha=dim, beta=0)
    return np.where(per_pixel == 2, dropped, np.where(per_pixel == 1, merged, image))


def render_token_depth(
    image: np.ndarray,
    trace: Trace,
    *,
    index: int = 0,
    opacity: float = 0.75,
    legend: bool = True,
) -> np.ndarray:
    """Each patch coloured by the layer at which it stopped being a token of its own
    (merged or dropped; dropped ones hatched), over a grey copy of the image, with a legend."""
    image = _rgb(image)
    height, width = image.shape[:2]
    gh, gw = trace.grid
    depth = len(trace.layers)
    reduced = trace.reduced_at()[index].numpy().astype(np.int64)
    dropped = (trace.dropped_at[index].numpy() >= 0) if trace.dropped_at is not None else None
    palette = np.vstack([layer_colors(depth), np.array([NEVER_REDUCED_RGB])]).astype(np.uint8)
    colors = upsample_cells(palette[reduced].reshape(gh, gw, 3), height, width)
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    out = cv2.addWeighted(grey, 1 - opacity, colors, opacity, 0)
    shade = np.zeros((height, width), dtype=bool)
    if dropped is not None and dropped.any():
        hatch = _hatch(height, width, period=max(6, height // 48))
        shade |= upsample_cells(dropped.reshape(gh, gw), height, width) & hatch
    shade |= boundary_mask(upsample_cells(reduced.reshape(gh, gw), height, width), 1)
    out[shade] = out[shade] // 3
    if not legend:
        return out
    entries = [LegendEntry(tuple(int(v) for v in palette[i]), f"layer {i}") for i in range(depth)]
    entries.append(LegendEntry(NEVER_REDUCED_RGB, "never"))
    extras = [LegendEntry((90, 90, 90), "dropped", hatched=True)] if dropped is not None else []
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
) -> np.ndarray:
    """The importance scores used at ``layer``, upsampled smoothly over the image, with a
    colour bar. Raises :class:`NoScoresError` where the layer has no scores."""
    scores = layer_scores(trace, layer, index)
    if scores is None:
        raise NoScoresError(f"no importance scores at layer {layer}")
    return render_score_map(
        image, scores, trace.grid, colormap=colormap, opacity=opacity, colorbar=colorbar
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
) -> np.ndarray:
    """Per-patch values [N] (NaN: no value) as a smooth colormapped overlay."""
    image = _rgb(image)
    height, width = image.shape[:2]
    gh, gw = grid
    values = np.asarray(scores, dtype=np.float64).reshape(gh, gw)
    valid = np.isfinite(values)
    low = float(values[valid].min()) if valid.any() else 0.0
    high = float(values[valid].max()) if valid.any() else 1.0
    span = high - low if high > low else 1.0
    normalised = np.where(valid, (values - low) / span, 0.0).astype(np.float32)
    smooth = cv2.resize(normalised, (width, height), interpolation=cv2.INTER_CUBIC)
    heat = apply_colormap(np.clip(smooth, 0.0, 1.0), colormap)
    out = cv2.addWeighted(image, 1 - opacity, heat, opacity, 0)
    if not valid.all():
        missing = upsample_cells(~valid, height, width)
        out = np.where(missing[..., None], _darkened(image, 0.3, 0), out)
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
    ImageDraw.Draw(out).rectangle(
        (max(0, x0), max(0, y0), min(size[0], x1) - 1, min(size[1], y1) - 1),
        outline=(255, 200, 0),
        width=2,
    )
    return np.asarray(out)


def to_png(image: np.ndarray, *, fast: bool = False) -> bytes:
    """PNG bytes of an RGB array; ``fast`` trades file size for speed (for display)."""
    buffer = io.BytesIO()
    Image.fromarray(_rgb(image)).save(buffer, format="PNG", compress_level=1 if fast else 6)
    return buffer.getvalue()


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
        if entry.hatched:
            tile[_hatch(swatch, swatch, period=max(4, swatch // 3))] = 20
            tile[~_hatch(swatch, swatch, period=max(4, swatch // 3))] = 235
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


def _hatch(height: int, width: int, period: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return ((x + y) % period) < max(1, period // 3)


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
