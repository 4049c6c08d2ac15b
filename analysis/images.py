"""Reading user images robustly and preparing them the way timm's eval transform does."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from analysis.errors import ImageError
from analysis.models import DataConfig

Image.MAX_IMAGE_PIXELS = 200_000_000  # refuse decompression bombs beyond ~200 MP

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class CropInfo:
    """How an image was fitted to the model input, for display."""

    original_size: tuple[int, int]  # (width, height)
    resized_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image
    input_size: int

    def describe(self) -> str:
        (w, h), (rw, rh) = self.original_size, self.resized_size
        left, top, right, bottom = self.crop_box
        return (
            f"{w}×{h} px resized to {rw}×{rh}, centre-cropped to {right - left}×{bottom - top} "
            f"(box {left},{top}–{right},{bottom})"
        )


def load_image(source: str | Path | bytes | io.BytesIO | Image.Image) -> Image.Image:
    """Open any common image as RGB: EXIF orientation applied, alpha composited on white,
    palette/grey/16-bit/CMYK converted, first frame of animations."""
    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            if isinstance(source, bytes):
                source = io.BytesIO(source)
            image = Image.open(source)
            image.seek(0)
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as error:
        raise ImageError(f"could not read the image: {error or type(error).__name__}") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"image is too large to open safely: {error}") from None
    with contextlib.suppress(Exception):  # broken EXIF must not lose the picture
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        array = np.asarray(image, dtype=np.float64)
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
        return Image.fromarray((scaled * 255).round().astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA", "RGBa"}:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fit_to_input(image: Image.Image, config: DataConfig) -> tuple[Image.Image, CropInfo]:
    """Resize the short side to input/crop_pct and centre-crop a square (timm's eval)."""
    size = config.input_size
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError("the image is empty")
    scale_to = int(size / config.crop_pct) if config.crop_pct < 1 else size
    # Same arithmetic as torchvision's Resize(int) and CenterCrop, which timm uses.
    if width <= height:
        new_w, new_h = scale_to, int(scale_to * height / width)
    else:
        new_w, new_h = int(scale_to * width / height), scale_to
    resample = _RESAMPLE.get(config.interpolation, Image.Resampling.BICUBIC)
    resized = image.resize((new_w, new_h), resample=resample)
    left = round((new_w - size) / 2.0)
    top = round((new_h - size) / 2.0)
    box = (left, top, left + size, top + size)
    return resized.crop(box), CropInfo((width, height), (new_w, new_h), box, size)


def to_tensor(images: list[Image.Image], config: DataConfig) -> tuple[torch.Tensor, list[CropInfo]]:
    """Fit, scale to [0, 1] and normalise a list of RGB images into [B, 3, S, S]."""
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    arrays, infos = [], []
    for image in images:
        fitted, info = fit_to_input(to_rgb(image), config)
        array = np.asarray(fitted, dtype=np.float32) / 255.0
        arrays.append(((array - mean) / std).transpose(2, 0, 1))
        infos.append(info)
    return torch.from_numpy(np.stack(arrays)), infos
