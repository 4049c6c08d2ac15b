"""Fitting an image of any shape to the model's square input: centre crop, or pad first.

timm's eval transform (``analysis.images.fit_to_input``) resizes the short side and
centre-crops a square, so a panorama loses most of itself: a 4000×300 strip keeps 7.5 % of
its area. *Pad to square* places the image on a square canvas first, large enough that the
eval transform then keeps all of it. The canvas is the dataset's mean colour, which is
zero after normalisation; the padded patches are still tokens that the model sees and that
reducers merge or prune.

The padded canvas is an ordinary image: ``analysis.run`` and the overlays take it as they
take any image, so the trace and the pictures follow the choice with nothing else to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from analysis.errors import ImageError
from analysis.images import CropInfo, fit_to_input, to_rgb
from analysis.models import DataConfig

FIT_MODES = ("crop", "pad")
MAX_CANVAS_SIDE = 2048  # a padded canvas is at most this wide (about 12 MB as RGB)
WARN_BELOW = 0.5  # the crop keeps less than this share of the image: suggest padding


@dataclass(frozen=True)
class FittedImage:
    """An image ready for the model, and how it was fitted."""

    image: Image.Image  # what the model runs on: the original (crop), the canvas (pad)
    crop: CropInfo  # how ``analysis.run`` fits ``image`` to the input (timm's eval)
    mode: str  # "crop" or "pad"
    original_size: tuple[int, int]  # (width, height) of the image before fitting
    placed: tuple[int, int, int, int]  # the original's box in ``image`` (left, top, right, bottom)
    fill: tuple[int, int, int] | None = None  # the pad colour, for "pad"

    @property
    def seen_fraction(self) -> float:
        """The share of the original's area that lies inside the model's input."""
        (resized_w, resized_h), (width, height) = self.crop.resized_size, self.image.size
        left, top, right, bottom = self.crop.crop_box
        sx, sy = width / resized_w, height / resized_h
        view = (left * sx, top * sy, right * sx, bottom * sy)
        px0, py0, px1, py1 = self.placed
        inside_w = max(0.0, min(view[2], px1) - max(view[0], px0))
        inside_h = max(0.0, min(view[3], py1) - max(view[1], py0))
        area = max(1, (px1 - px0) * (py1 - py0))
        return min(1.0, inside_w * inside_h / area)

    def describe(self) -> str:
        """One line on what the model sees."""
        seen = f"the model sees {_percent(self.seen_fraction)} of the image"
        if self.mode == "pad":
            (w, h), (cw, ch) = self.original_size, self.image.size
            return (
                f"{w}×{h} px padded to {cw}×{ch} with the dataset's mean colour, then "
                f"{self.crop.describe()}; {seen}"
            )
        return f"{self.crop.describe()}; {seen}"

    def warning(self) -> str | None:
        """A note when the centre crop loses much of the image (a panorama, a tall strip)."""
        if self.mode != "crop" or self.seen_fraction >= WARN_BELOW:
            return None
        return (
            f"The centre crop keeps only {_percent(self.seen_fraction)} of this image. Choose "
            "**Pad to square** to show the model all of it."
        )


def pad_colour(config: DataConfig) -> tuple[int, int, int]:
    """The dataset's mean colour in pixels: padding of this colour is zero once normalised."""
    return tuple(round(255 * m) for m in config.mean)  # type: ignore[return-value]


def fit_image(image: Image.Image, config: DataConfig, mode: str = "crop") -> FittedImage:
    """Fit ``image`` to the model's input by ``mode``: "crop" is timm's eval transform as
    it is; "pad" first centres the image on a square canvas of the mean colour, sized so
    that the eval transform's resize and crop then keep the whole image."""
    if mode not in FIT_MODES:
        raise ValueError(f"unknown fit mode '{mode}' ({' or '.join(FIT_MODES)})")
    rgb = to_rgb(image)
    width, height = rgb.size
    if width < 1 or height < 1:
        raise ImageError("the image is empty")
    if mode == "crop":
        _, crop = fit_to_input(rgb, config)
        return FittedImage(rgb, crop, mode, (width, height), (0, 0, width, height))
    size = config.input_size
    scale_to = int(size / config.crop_pct) if config.crop_pct < 1 else size
    # The eval crop keeps `kept` of the `scale_to` resized pixels (one fewer on each side
    # than `size`, where the crop's rounding could otherwise cut into the image).
    kept = size if scale_to == size else size - 2

    def canvas_side(longer: int) -> int:
        return math.ceil(longer * scale_to / kept)

    longest = MAX_CANVAS_SIDE * kept // scale_to
    if max(width, height) > longest:  # the model sees `size` pixels: a smaller canvas is as good
        shrink = longest / max(width, height)
        width, height = max(1, round(width * shrink)), max(1, round(height * shrink))
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    fill = pad_colour(config)
    side = canvas_side(max(width, height))
    for _ in range(4):  # a tiny image can lose a fraction of a pixel to rounding: widen
        canvas = Image.new("RGB", (side, side), fill)
        left, top = (side - width) // 2, (side - height) // 2
        canvas.paste(rgb, (left, top))
        _, crop = fit_to_input(canvas, config)
        placed = (left, top, left + width, top + height)
        fitted = FittedImage(canvas, crop, mode, image.size, placed, fill)
        if fitted.seen_fraction >= 1.0:
            break
        side += 2
    return fitted


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.0f} %" if fraction >= 0.01 else f"{100 * fraction:.1f} %"
