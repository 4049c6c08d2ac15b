"""Reading user images robustly and preparing them the way timm's eval transform does.

Images come from users, so their size is checked from the file's header before anything
is decoded: at most :data:`MAX_PIXELS` pixels and an aspect ratio of at most
:data:`MAX_ASPECT_RATIO`. With ``max_pixels`` (the app keeps only a downscaled copy),
JPEGs are decoded at reduced size (draft mode) and others are shrunk after decoding.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from analysis.errors import ImageError, shorten
from analysis.models import DataConfig

MAX_PIXELS = 64_000_000  # 64 MP, e.g. 8000 × 8000: 192 MB once decoded as RGB
MAX_ASPECT_RATIO = 32  # longer side over shorter side; a 1 × 30000 strip is refused
WORKING_PIXELS = 2048 * 2048  # what the app keeps of an upload (enough for 2048 px downloads)
MIN_WORKING_SIDE = 1024  # ...but never shrunk below this on its shorter side
READABLE = "jpg, png, webp, bmp, tiff or gif"

# Pillow's own bomb check stays on as a backstop (it raises at twice this value).
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

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

    @property
    def enlargement(self) -> float:
        """How many times the shorter side was enlarged (below 1: it was shrunk)."""
        return min(self.resized_size) / max(1, min(self.original_size))

    def warning(self) -> str | None:
        """A note when the image is smaller than the model input (it gets blurred)."""
        (w, h) = self.original_size
        if min(w, h) >= self.input_size:
            return None
        return (
            f"This image is only {w}×{h} px, smaller than the model's {self.input_size} px "
            f"input: it is enlarged {self.enlargement:.1f}×, so the model sees blurred pixels. "
            "Use a larger image for a meaningful result."
        )


@dataclass(frozen=True)
class DecodedImage:
    """An image read from a file, with what the user should know about how it was read."""

    image: Image.Image  # RGB
    original_size: tuple[int, int]  # (width, height) in the file, after EXIF rotation
    notes: tuple[str, ...] = ()  # e.g. only the first frame was used; it was downscaled


def read_image(
    source: str | Path | bytes | io.BytesIO | Image.Image,
    *,
    name: str | None = None,
    max_pixels: int | None = None,
) -> DecodedImage:
    """Open any common image as RGB, with notes for the user.

    EXIF orientation is applied, alpha composited on white, palette/grey/16-bit/CMYK
    converted, and the first frame of an animation kept. ``name`` is the file name used in
    messages. With ``max_pixels``, the result is downscaled to about that many pixels
    (never below :data:`MIN_WORKING_SIDE` on its shorter side); JPEGs are then decoded at
    reduced size. Raises :class:`ImageError` with a message that names the file.
    """
    label = _label(source, name)
    if isinstance(source, Image.Image):
        image = source
        header = _check_size(image.size, label)
    else:
        image = _open(source, label)
        header = width, height = _check_size(image.size, label)
        if max_pixels is not None and image.format == "JPEG":
            target = _working_size((width, height), max_pixels)
            with contextlib.suppress(Exception):  # draft is an optimisation only
                image.draft(image.mode, target)
        _decode(image, label)
    notes = []
    if _is_animated(image):
        notes.append(f"{label} has several frames; only the first one is used.")
    decoded = image.size
    with contextlib.suppress(Exception):  # broken EXIF must not lose the picture
        image = ImageOps.exif_transpose(image)
    turned = image.size != decoded
    original = (header[1], header[0]) if turned else header
    try:
        rgb = to_rgb(image)
    except (ValueError, OSError, TypeError) as error:
        raise ImageError(
            f"could not convert {label} to RGB ({shorten(error, 80)}). Save it as PNG or "
            "JPEG and try again"
        ) from None
    if max_pixels is not None and rgb.width * rgb.height > max_pixels:
        size = _working_size(rgb.size, max_pixels)
        if size != rgb.size:
            rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
            notes.append(
                f"{label} is {original[0]}×{original[1]} px; a {size[0]}×{size[1]} px copy is "
                "kept (the model's input is far smaller)."
            )
    return DecodedImage(rgb, original, tuple(notes))


def load_image(
    source: str | Path | bytes | io.BytesIO | Image.Image,
    *,
    name: str | None = None,
    max_pixels: int | None = None,
) -> Image.Image:
    """Open any common image as RGB (see :func:`read_image`)."""
    return read_image(source, name=name, max_pixels=max_pixels).image


def _label(source: object, name: str | None) -> str:
    if name:
        return shorten(name, 80)
    if isinstance(source, (str, Path)):
        return shorten(Path(source).name, 80)
    return "the image"


def _open(source: str | Path | bytes | io.BytesIO, label: str) -> Image.Image:
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{label} is empty (0 bytes): upload the file again, or another one")
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        try:
            size = Path(source).stat().st_size
        except OSError as error:
            raise ImageError(
                f"could not read {label}: {error.strerror or 'no such file'}"
            ) from None
        if size == 0:
            raise ImageError(f"{label} is empty (0 bytes): choose another file")
    elif isinstance(source, io.BytesIO) and not source.getbuffer().nbytes:
        raise ImageError(f"{label} is empty (0 bytes): upload the file again, or another one")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source)
    except Image.DecompressionBombError:
        raise ImageError(
            f"{label} claims more than {2 * MAX_PIXELS / 1e6:.0f} megapixels; TokenScope "
            f"reads images up to {MAX_PIXELS / 1e6:.0f} MP. Downscale it and try again"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"could not read {label}: it is not an image TokenScope can read ({READABLE}), "
            "or it is damaged. Save it as PNG or JPEG and try again"
        ) from None
    except Exception as error:  # a malformed header can raise anything inside Pillow
        raise ImageError(
            f"could not read {label}: its header is damaged ({_reason(error)}). Save it as PNG "
            "or JPEG and try again"
        ) from None


def _check_size(size: tuple[int, int], label: str) -> tuple[int, int]:
    """Refuse images too large or too thin before decoding them (from the header)."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"{label} has no pixels ({width}×{height}): choose another image")
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{label} is {width}×{height} px ({width * height / 1e6:.0f} megapixels); "
            f"TokenScope reads images up to {MAX_PIXELS / 1e6:.0f} MP. Downscale it (the model "
            "sees a few hundred pixels anyway) and try again"
        )
    _check_aspect((width, height), label)
    return width, height


def _check_aspect(size: tuple[int, int], label: str) -> None:
    width, height = size
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"{label} is {width}×{height} px, an aspect ratio of {ratio:.0f}:1; TokenScope "
            f"reads images up to {MAX_ASPECT_RATIO}:1. Crop it to the part you want to see "
            "and try again"
        )


def _decode(image: Image.Image, label: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.seek(0)
            image.load()
    except MemoryError:
        image.close()
        raise ImageError(
            f"{label} is too large to decode on this server; downscale it and try again"
        ) from None
    except Exception as error:  # truncated or damaged data raises many kinds of errors
        image.close()
        raise ImageError(
            f"could not read {label}: the file is damaged or cut short ({_reason(error)}). "
            "Save it again as PNG or JPEG and retry"
        ) from None
    _check_size(image.size, label)


def _reason(error: Exception) -> str:
    text = str(error).split(" <_io.")[0].strip() or type(error).__name__
    return shorten(text, 80)


def _is_animated(image: Image.Image) -> bool:
    try:
        return bool(getattr(image, "is_animated", False))
    except Exception:  # counting frames of a damaged file
        return False


def _working_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """``size`` scaled down to about ``max_pixels``, its shorter side kept at least
    :data:`MIN_WORKING_SIDE` (or as it was, when already shorter)."""
    width, height = size
    if width * height <= max_pixels:
        return size
    scale = math.sqrt(max_pixels / (width * height))
    shorter = min(width, height)
    scale = max(scale, min(1.0, MIN_WORKING_SIDE / shorter))
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}:
        array = np.asarray(image, dtype=np.float32)
        finite = np.isfinite(array)
        if not finite.all():
            array = np.where(finite, array, np.float32(0))
        low, high = float(array.min()), float(array.max())
        if high > low:
            array -= low
            array *= 255.0 / (high - low)
        else:
            array[...] = 0
        return Image.fromarray(np.rint(array).astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fit_to_input(image: Image.Image, config: DataConfig) -> tuple[Image.Image, CropInfo]:
    """Resize the short side to input/crop_pct and centre-crop a square (timm's eval).

    The aspect ratio is at most :data:`MAX_ASPECT_RATIO`, so the resized image stays small
    (about 256 × 8192 px at most); a thinner strip is refused before it is resized.
    """
    size = config.input_size
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError("the image is empty")
    _check_aspect((width, height), "the image")
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
