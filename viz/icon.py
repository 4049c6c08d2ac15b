"""The app's own icon, drawn here: a named Material icon makes the browser fetch the
favicon from fonts.gstatic.com, which an offline or private server should never need."""

from __future__ import annotations

from PIL import Image, ImageDraw

_CELLS = 4
_MERGED = {(0, 0), (0, 1), (1, 0), (1, 1), (2, 3), (3, 3)}  # two merged tokens
_DROPPED = {(3, 0)}


def app_icon(size: int = 64) -> Image.Image:
    """A 4×4 patch grid with two merged tokens and a dropped patch, ``size`` px square."""
    icon = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(icon)
    cell = size // _CELLS
    for row in range(_CELLS):
        for col in range(_CELLS):
            box = (col * cell + 1, row * cell + 1, (col + 1) * cell - 2, (row + 1) * cell - 2)
            if (row, col) in _DROPPED:
                draw.rectangle(box, fill=(60, 60, 60))
            else:
                fill = (232, 89, 12) if (row, col) in _MERGED else (154, 160, 166)
                draw.rectangle(box, fill=fill)
    return icon
