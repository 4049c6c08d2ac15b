"""Reading odd images, and preprocessing that matches timm's eval transform."""

from __future__ import annotations

import io

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from analysis import ImageError
from analysis.images import fit_to_input, load_image, read_image, to_tensor
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


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "photo.png is empty \\(0 bytes\\)"),
        (b"not an image at all", "could not read photo.png: it is not an image"),
        (_encode(_gradient(), "PNG")[:60], "could not read photo.png: the file is damaged"),
    ],
)
def test_corrupt_images_raise_a_clear_error(payload, message):
    with pytest.raises(ImageError, match=message) as error:
        load_image(payload, name="photo.png")
    assert "_io.BytesIO" not in str(error.value) and "0x" not in str(error.value)


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` × ``height`` (its data is a few rows)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * ((width * 3 + 1) * 4))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def test_pixel_limit_is_checked_before_decoding():
    # 81 MP: under Pillow's own bomb limit (twice MAX_PIXELS), over ours.
    with pytest.raises(ImageError, match=r"9000×9000 px \(81 megapixels\).*up to 64 MP"):
        load_image(_png_header(9000, 9000), name="big.png")
    with pytest.raises(ImageError, match="claims more than 128 megapixels"):
        load_image(_png_header(15000, 15000), name="bomb.png")


def test_thin_images_are_refused_with_their_ratio():
    strip = _encode(Image.new("L", (1, 30000)), "PNG")
    with pytest.raises(ImageError, match=r"1×30000 px, an aspect ratio of 30000:1.*32:1"):
        load_image(strip, name="strip.png")
    config = DataConfig(224, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ImageError, match="aspect ratio"):
        fit_to_input(Image.new("RGB", (1, 400)), config)


def test_working_copy_is_downscaled_and_jpeg_decoded_small():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), np.uint8))
    decoded = read_image(_encode(big, "JPEG"), name="big.jpg", max_pixels=2048 * 2048)
    assert decoded.original_size == (4000, 3000)
    width, height = decoded.image.size
    assert width * height <= 2048 * 2048 * 1.01 and min(width, height) >= 1024
    assert any("4000×3000" in note for note in decoded.notes)
    assert load_image(_encode(big, "JPEG")).size == (4000, 3000)  # the API keeps full size


def test_small_images_and_animations_are_reported():
    config = DataConfig(224, (0.5,) * 3, (0.5,) * 3)
    _, crop = fit_to_input(Image.new("RGB", (10, 10)), config)
    assert "only 10×10 px, smaller than the model's 224 px input" in crop.warning()
    assert fit_to_input(Image.new("RGB", (300, 240)), config)[1].warning() is None
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = read_image(buffer.getvalue(), name="moving.gif")
    assert decoded.notes == ("moving.gif has several frames; only the first one is used.",)


def test_float_images_with_nan_become_rgb():
    array = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    array[0, 0], array[0, 1] = np.nan, np.inf
    image = load_image(_encode(Image.fromarray(array, mode="F"), "TIFF"))
    values = np.asarray(image)[..., 0]
    assert values.max() == 255 and values[0, 0] == 0


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
