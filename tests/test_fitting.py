"""Fitting odd shapes to the square input: centre crop (timm's eval) or pad to square."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from analysis import run
from analysis.fitting import MAX_CANVAS_SIDE, fit_image, pad_colour
from analysis.images import to_tensor
from analysis.models import DataConfig
from viz import overlays

DINO = DataConfig(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crop_pct=1.0)
DEIT = DataConfig(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crop_pct=0.875)


def panorama(size: tuple[int, int] = (4000, 300)) -> Image.Image:
    """A wide strip: red on the left third, green in the middle, blue on the right."""
    width, height = size
    array = np.zeros((height, width, 3), dtype=np.uint8)
    third = width // 3
    array[:, :third, 0] = array[:, third : 2 * third, 1] = array[:, 2 * third :, 2] = 255
    return Image.fromarray(array)


@pytest.mark.parametrize("config", [DINO, DEIT], ids=["crop_pct=1", "crop_pct=0.875"])
def test_the_crop_loses_a_panorama_and_padding_keeps_it(config):
    """Issue 14: a 4000×300 panorama loses about 92 % of its area to the centre crop."""
    cropped = fit_image(panorama(), config, "crop")
    assert cropped.seen_fraction == pytest.approx(224 / 2986 if config is DINO else 0.0574, 0.02)
    assert "Pad to square" in cropped.warning()
    padded = fit_image(panorama(), config, "pad")
    assert padded.seen_fraction == 1.0 and padded.warning() is None
    assert padded.image.width == padded.image.height <= MAX_CANVAS_SIDE
    left, top, right, bottom = padded.placed
    assert (right - left) / (bottom - top) == pytest.approx(4000 / 300, rel=0.01)
    canvas = np.asarray(padded.image)
    assert (canvas[0, 0] == pad_colour(config)).all()  # the padding is the mean colour


def test_a_square_image_is_left_as_it_is():
    square = panorama((512, 512))
    for mode in ("crop", "pad"):
        fitted = fit_image(square, DINO, mode)
        assert fitted.seen_fraction == 1.0 and fitted.image.size == (512, 512)
    assert fit_image(panorama((451, 300)), DINO, "crop").warning() is None  # a 3:2 photo
    with pytest.raises(ValueError, match="unknown fit mode"):
        fit_image(square, DINO, "stretch")


def test_padding_is_zero_after_normalisation_and_every_part_is_seen(test_vit):
    """The model sees the whole padded image: all three colours of the strip reach the
    input, and the padding normalises to about zero (the mean colour)."""
    config = test_vit.data_config
    padded = fit_image(panorama((1200, 200)), config, "pad")
    tensor, _ = to_tensor([padded.image], config)
    assert tensor[0, :, 0, 0].abs().max() < 0.03  # a padded corner: the mean, normalised
    middle = tensor[0, :, tensor.shape[2] // 2]  # the row through the strip
    colours = {int(c) for c in middle.argmax(dim=0)[middle.max(dim=0).values > 0.9]}
    assert colours == {0, 1, 2}  # red, green and blue all seen
    cropped, _ = to_tensor([panorama((1200, 200))], config)
    middle = cropped[0, :, cropped.shape[2] // 2]
    assert {int(c) for c in middle.argmax(dim=0)} == {1}  # the crop sees the green only


def test_the_trace_and_the_overlays_follow_the_padding(test_vit):
    """The padded canvas is what runs and what the overlays draw on: the display image
    holds the whole strip and the mean-coloured padding, on the trace's patch grid."""
    padded = fit_image(panorama((1200, 200)), test_vit.data_config, "pad")
    result = run(test_vit, padded.image, "topk:keep=0.5@1")
    assert result.crops[0] == padded.crop
    shown = overlays.display_image(padded.image, padded.crop, result.trace.grid)
    assert shown.shape[0] == shown.shape[1]
    row, width = shown[shown.shape[0] // 2], shown.shape[1]
    assert row[width // 10, 0] > 200 and row[-width // 10, 2] > 200  # red left, blue right
    assert (np.abs(shown[2, 2].astype(int) - pad_colour(test_vit.data_config)) <= 2).all()
    pruned = overlays.render_pruned(shown, result.trace, 1)
    assert pruned.shape == shown.shape
