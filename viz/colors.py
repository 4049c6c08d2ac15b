"""Colours: deterministic segment colours and colormap lookup tables.

Segment colours come from an integer hash of a segment's root patch (the smallest
original patch index it holds), so a segment keeps its colour from layer to layer and
from run to run. Colormaps are built from plotly's scales (no matplotlib needed).
"""

from __future__ import annotations

import zlib
from functools import cache

import numpy as np
import plotly.colors

DROPPED_RGB = (24, 24, 24)  # the dark ground under the hatching of pruned patches
# Pruned patches are hatched, so they never pass for image content, dark or light: light
# stripes (/) for dropped ones, amber stripes (\) for ones pooled into a fused token.
HATCH_RGB = (240, 240, 240)
FUSED_RGB = (255, 170, 0)
NEVER_REDUCED_RGB = (225, 225, 225)

# One colour per registered method, so a method looks the same on every chart that colours
# by method name (trade-off curves now, print figures later). The first six are the Compare
# page's column palette (viz.compare.METHOD_COLORS), in the same order; ToMe takes the
# orange that the Explore charts use for "reduced".
METHOD_PALETTE: dict[str, str] = {
    "tome": "#e8590c",
    "evit": "#1c7ed6",
    "topk": "#2b8a3e",
    "random": "#ae3ec9",
    "dtem": "#f59f00",
    "patchmerger": "#0b7285",
    "cropr": "#d6336c",
    "ltm": "#8d5524",
    "mstm": "#364fc7",
}
FULL_MODEL_COLOR = "#9aa0a6"


def hash_unit(values: np.ndarray, salt: int = 0) -> np.ndarray:
    """A deterministic hash of non-negative integers to floats in [0, 1) (splitmix64)."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(salt + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (all in [0, 1]) to RGB uint8, shape [..., 3]."""
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros((*np.shape(h), 3))
    for index, (r, g, b) in enumerate(choices):
        where = i == index
        rgb[where] = np.stack([r, g, b], axis=-1)[where]
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def segment_colors(roots: np.ndarray) -> np.ndarray:
    """A bright, distinct RGB colour per root patch index; same index, same colour."""
    roots = np.asarray(roots, dtype=np.int64).clip(min=0)
    hue = hash_unit(roots, salt=1)
    saturation = 0.55 + 0.35 * hash_unit(roots, salt=2)
    value = 0.80 + 0.20 * hash_unit(roots, salt=3)
    return hsv_to_rgb(hue, saturation, value)


@cache
def colormap_lut(name: str = "inferno") -> np.ndarray:
    """A [256, 3] uint8 lookup table for one of plotly's sequential scales (by name)."""
    scale = getattr(plotly.colors.sequential, name.capitalize(), None)
    if scale is None:
        raise ValueError(f"unknown colormap '{name}'")
    anchors = np.array([_to_rgb(color) for color in scale], dtype=np.float64)
    positions = np.linspace(0.0, 1.0, len(anchors))
    steps = np.linspace(0.0, 1.0, 256)
    lut = np.stack([np.interp(steps, positions, anchors[:, c]) for c in range(3)], axis=-1)
    return np.round(lut).astype(np.uint8)


def apply_colormap(values: np.ndarray, name: str = "inferno") -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with a colormap; shape [..., 3]."""
    index = np.clip(np.nan_to_num(values, nan=0.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return colormap_lut(name)[index]


def layer_colors(depth: int, name: str = "viridis") -> np.ndarray:
    """[depth, 3] colours for layers 0..depth-1 (early layers dark, late ones bright)."""
    if depth <= 1:
        return apply_colormap(np.zeros(max(depth, 1)), name)
    return apply_colormap(np.linspace(0.0, 1.0, depth), name)


def method_color(method: str) -> str:
    """The hex colour of a method by registry name; the full model ("none") is grey.

    A name outside the palette gets a palette colour from a CRC32 of the name (not
    Python's salted ``hash``), so it keeps that colour from run to run.
    """
    key = method.strip().lower()
    if key == "none":
        return FULL_MODEL_COLOR
    if key in METHOD_PALETTE:
        return METHOD_PALETTE[key]
    palette = list(METHOD_PALETTE.values())
    return palette[zlib.crc32(key.encode()) % len(palette)]


def _to_rgb(color: str) -> tuple[int, int, int]:
    if color.startswith("#"):
        return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
    values = color[color.index("(") + 1 : color.index(")")].split(",")
    return tuple(int(float(v)) for v in values[:3])  # type: ignore[return-value]
