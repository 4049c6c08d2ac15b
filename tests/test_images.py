"""Reading odd images, and preprocessing that matches timm's eval transform."""

from __future__ import annotations

import io

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from analysis import ImageError
from analysis.images import load_image, to_tensor
from analysis.models import DataConfig


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _gradient(mode: str = "RGB") -> Image.Image:
    array = np.linspace(0, 255, 48 * 32 * 3).reshape(32, 48, 3).astype(np.uint8)
    return Image.fromarray(array).convert(mode)


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("JPEG", "RGB"),
        ("PNG", "L"),
        ("PNG", "P"),
        ("WEBP", "RGB"),
        ("BMP", "RGB"),
        ("TIFF", "CMYK"),
        ("GIF", "P"),
        ("PNG", "LA"),
    ],
)
def test_formats_and_modes_become_rgb(fmt, mode):
    image = load_image(_encode(_gradient(mode), fmt))
    assert image.mode == "RGB" and image.size == (48, 32)


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    image = load_image(_encode(rgba, "PNG"))
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((5, 5)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    array = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    image = load_image(_encode(Image.fromarray(array), "PNG"))
    values = np.asarray(image)[..., 0]
    assert values.min() == 0 and values.max() == 255 and len(np.unique(values)) > 30


def test_exif_orientation_is_honoured():
    image = _gradient()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    loaded = load_image(_encode(image, "JPEG", exif=exif))
    assert loaded.size == (32, 48)


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    image = load_image(buffer.getvalue())
    red, _, blue = image.getpixel((4, 4))
    assert red > 200 and blue < 50


@pytest.mark.parametrize("payload", [b"", b"not an image at all", _encode(_gradient(), "PNG")[:60]])
def test_corrupt_images_raise_a_clear_error(payload):
    with pytest.raises(ImageError, match="could not read the image"):
        load_image(payload)


def test_preprocessing_matches_timm_eval_transform():
    from timm.data import create_transform, resolve_data_config

    module = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1)
    cfg = resolve_data_config({}, model=module)
    image = Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8))
    expected = create_transform(**cfg)(image)
    config = DataConfig(
        input_size=cfg["input_size"][-1],
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=cfg["crop_pct"],
        interpolation=cfg["interpolation"],
    )
    ours, _ = to_tensor([image], config)
    assert ours.shape == (1, *expected.shape)
    assert torch.allclose(ours[0], expected, atol=0.05)
