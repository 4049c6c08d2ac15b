"""The viz renderers and helpers, without Streamlit: shapes, determinism, geometry."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from PIL import Image

from analysis import ScheduleError, parse_schedule, run
from analysis.images import fit_to_input
from analysis.reducers import REDUCERS
from analysis.reducers.base import Param, Reducer, Site, identity_reduction
from analysis.trace import LayerTrace, Trace
from viz import charts, colors, compare, overlays, schedule_table, summary

# --------------------------------------------------------------------------- fixtures


def synthetic_trace() -> Trace:
    """A 4×4 grid, one prefix token, three layers with known merges and drops.

    layer 0: patches 0 and 1 merge; layer 1: patch 15 is dropped, scores given;
    layer 2: the 0/1 token absorbs patch 4.
    """
    prefix, n = 1, 16
    own = torch.arange(n) + prefix
    layer0 = own.clone()
    layer0[1] = layer0[0]
    sizes0 = torch.ones(1, n + prefix)
    sizes0[0, 1] = 2
    layer1 = layer0.clone()
    layer1[15] = -1
    sizes1 = sizes0.clone()
    sizes1[0, 16] = 0
    scores1 = torch.linspace(0.0, 1.0, n)
    scores1[15] = 0.5
    layer2 = layer1.clone()
    layer2[4] = layer2[0]
    sizes2 = sizes1.clone()
    sizes2[0, 1] = 3
    dropped = torch.full((1, n), -1, dtype=torch.int32)
    dropped[0, 15] = 1
    return Trace(
        grid=(4, 4),
        num_prefix=prefix,
        layers=[
            LayerTrace(0, 16, layer0[None].int(), sizes0, None, ("tome",)),
            LayerTrace(1, 15, layer1[None].int(), sizes1, scores1[None], ("topk",)),
            LayerTrace(2, 14, layer2[None].int(), sizes2, None, ("tome",)),
        ],
        dropped_at=dropped,
    )


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def real_runs(test_vit):
    """Runs of the tiny random test_vit (10×10 grid, 6 layers, a classifier)."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 200, 3), np.uint8))
    return {
        "image": image,
        "none": run(test_vit, image, "none"),
        "tome": run(test_vit, image, "tome:r=6"),
        "evit": run(test_vit, image, "evit:keep=0.6@1,3"),
        "topk": run(test_vit, image, "topk:keep=0.5@2"),
    }


# --------------------------------------------------------------------------- geometry


def test_cell_edges_split_evenly():
    assert overlays.cell_edges(64, 4).tolist() == [0, 16, 32, 48, 64]
    edges = overlays.cell_edges(100, 7)
    assert edges[0] == 0 and edges[-1] == 100 and np.all(np.diff(edges) >= 14)


def test_upsample_cells_puts_each_value_in_its_patch():
    grid = np.arange(12).reshape(3, 4)
    big = overlays.upsample_cells(grid, 30, 40)
    assert big.shape == (30, 40)
    assert big[0, 0] == 0 and big[9, 9] == 0 and big[10, 10] == 5 and big[29, 39] == 11


def test_segment_roots_are_smallest_patch_of_each_token():
    owner = np.array([5, 5, 7, 7, -1, 5])
    assert overlays.segment_roots(owner).tolist() == [0, 0, 2, 2, -1, 0]


@pytest.mark.parametrize("mode", ["mean", "tint"])
def test_segment_boundaries_fall_on_patch_edges(picture, mode):
    trace = synthetic_trace()
    out = overlays.render_segments(picture, trace, 2, mode=mode, thickness=1)
    line = (255, 255, 255) if mode == "mean" else (20, 20, 20)
    edge = np.all(out == line, axis=-1)
    labels = overlays.patch_owner(trace, 2)
    if mode == "tint":  # no lines between patches still a token of their own
        labels[overlays.patch_states(trace, 2) == overlays.OWN] = -2
    expected = overlays.boundary_mask(overlays.upsample_cells(labels.reshape(4, 4), 64, 64), 1)
    assert np.array_equal(edge & expected, expected)
    rows, cols = np.nonzero(expected)
    on_edge = lambda v: np.isin(v % 16, [0, 15])  # noqa: E731
    assert np.all(on_edge(rows) | on_edge(cols))
    # no boundary inside the merged 0/1/4 token: between patches 0 and 1 at x = 15/16, y < 16
    assert not expected[2:14, 15:17].any()
    # a boundary between patch 1 (merged) and patch 2 (its own token)
    assert expected[2:14, 31:33].all()


@pytest.mark.parametrize("layer", [-1, 0, 1, 2])
def test_renderers_shapes_and_determinism(picture, layer):
    trace = synthetic_trace()
    for render in (
        lambda: overlays.render_segments(picture, trace, layer),
        lambda: overlays.render_segments(picture, trace, layer, mode="tint"),
        lambda: overlays.render_pruned(picture, trace, layer),
    ):
        first, second = render(), render()
        assert first.shape == picture.shape and first.dtype == np.uint8
        assert np.array_equal(first, second)


def test_segment_colours_are_stable_across_layers():
    flat = np.full((64, 64, 3), 128, dtype=np.uint8)  # colour comes from the segment alone
    trace = synthetic_trace()
    before = overlays.render_segments(flat, trace, 0, mode="tint", boundaries=False)
    after = overlays.render_segments(flat, trace, 2, mode="tint", boundaries=False)
    # the 0/1 token and untouched patches keep their colours when patch 4 joins 0/1
    for y, x in [(8, 8), (8, 24), (8, 40), (40, 40)]:
        assert np.array_equal(before[y, x], after[y, x])
    # patch 4 takes the colour of the segment it joined
    assert np.array_equal(after[24, 8], before[8, 8])
    assert not np.array_equal(before[24, 8], before[8, 8])


def test_segment_mean_mode_fills_a_token_with_its_mean_colour(picture):
    trace = synthetic_trace()
    out = overlays.render_segments(picture, trace, 0, boundaries=False)
    mean = picture[0:16, 0:32].reshape(-1, 3).mean(axis=0)
    assert np.all(np.abs(out[0:16, 0:32].astype(float) - mean) <= 1.0)


def test_pruned_hatches_dropped_and_greys_merged(picture):
    trace = synthetic_trace()
    out = overlays.render_pruned(picture, trace, 1)
    assert np.array_equal(out[20:28, 20:28], picture[20:28, 20:28])  # own token: unchanged
    dropped = out[48:64, 48:64].reshape(-1, 3)  # patch 15: light stripes on a dark ground
    assert (dropped == colors.HATCH_RGB).all(axis=-1).mean() > 0.2
    assert (dropped.max(axis=-1) <= 90).mean() > 0.5
    merged = out[0:16, 0:32].astype(int)
    assert np.abs(merged[..., 0] - merged[..., 1]).max() <= 0.15 * 255 + 2  # nearly grey


# --------------------------------------------------------------------------- encodings


def one_layer_trace(
    grid: tuple[int, int], *, dropped: tuple[int, ...] = (), fused: tuple[int, ...] = ()
) -> Trace:
    """One layer over ``grid``: the ``dropped`` patches gone, the ``fused`` ones pooled
    into an extra token (as EViT does), the others tokens of their own; scored, with
    NaN for the dropped patches."""
    n = grid[0] * grid[1]
    owner = torch.arange(n) + 1
    sizes = torch.ones(1, n + 2)
    owner[list(dropped)] = -1
    owner[list(fused)] = n + 1  # the extra token, appended last
    sizes[0, n + 1] = len(fused)
    marked = torch.zeros(1, n, dtype=torch.bool)
    marked[0, list(fused)] = True
    scores = torch.linspace(0.0, 1.0, n)
    scores[list(dropped)] = float("nan")
    dropped_at = torch.full((1, n), -1, dtype=torch.int32)
    dropped_at[0, list(dropped)] = 0
    record = LayerTrace(
        0, n + 2 - len(dropped) - len(fused), owner[None].int(), sizes, scores[None], ("evit",)
    )
    record.fused = marked if fused else None
    return Trace(grid=grid, num_prefix=1, layers=[record], dropped_at=dropped_at)


ENCODED_VIEWS = {  # view: (draw, the hatched states it must show)
    "pruned": (lambda image, trace: overlays.render_pruned(image, trace, 0), "df"),
    "segments, mean": (
        lambda image, trace: overlays.render_segments(image, trace, 0, boundaries=False),
        "df",
    ),
    "segments, tint": (
        lambda image, trace: overlays.render_segments(
            image, trace, 0, mode="tint", boundaries=False
        ),
        "df",
    ),
    "depth": (lambda image, trace: overlays.render_token_depth(image, trace, legend=False), "df"),
    "heatmap": (lambda image, trace: overlays.render_heatmap(image, trace, 0, colorbar=False), "d"),
}


def spread(pixels: np.ndarray) -> int:
    """The contrast inside some pixels: the largest range of a channel (0: one colour)."""
    return int(np.ptp(pixels.reshape(-1, 3).astype(int), axis=0).max())


def patch_pixels(picture: np.ndarray, patch: int, grid: tuple[int, int]) -> np.ndarray:
    """The inside of one patch (2 px in from its edges) of a picture over ``grid``."""
    cell = picture.shape[0] // grid[0]
    row, col = divmod(patch, grid[1])
    return picture[row * cell + 2 : (row + 1) * cell - 2, col * cell + 2 : (col + 1) * cell - 2]


@pytest.mark.parametrize("shade", [0, 255], ids=["black", "white"])
@pytest.mark.parametrize("view", list(ENCODED_VIEWS))
def test_a_pruned_patch_never_looks_like_content(view, shade):
    """Issue 14: dropped patches drawn dark vanished on dark content (Cropr's drops on the
    black coat of `camera`). Hatched, a pruned patch shows strong contrast inside itself
    on a black image and on a white one, where a kept patch of that content is flat; and
    "dropped" and "pruned and fused" look different."""
    grid = (8, 8)
    trace = one_layer_trace(grid, dropped=(27,), fused=(36,))
    image = np.full((128, 128, 3), shade, dtype=np.uint8)
    draw, states = ENCODED_VIEWS[view]
    out = draw(image, trace)[:, :128]
    kept = patch_pixels(out, 0, grid)
    assert spread(kept) == 0, "a kept patch of flat content must stay flat"
    dropped = patch_pixels(out, 27, grid)
    assert spread(dropped) > 150, "a dropped patch must be hatched"
    if "f" in states:
        fused = patch_pixels(out, 36, grid)
        assert spread(fused) > 150, "a fused patch must be hatched"
        assert not np.array_equal(fused, dropped), "fused must differ from dropped"


def test_the_hatching_survives_the_grids():
    """The grids scale each picture down to a thumbnail: a dropped patch on black is
    still striped there, a kept one still flat black."""
    grid = (16, 16)
    trace = one_layer_trace(grid, dropped=(5 * 16 + 5,), fused=(10 * 16 + 10,))
    black = np.zeros((352, 352, 3), dtype=np.uint8)  # the page's thumbnails: 2 × the cell
    for view in ("segments", "pruned"):
        picture = compare.render_view(black, trace, view, 0, legend=False)
        sheet = compare.compose_grid([[picture]], [view], ["input"], cell_side=176)
        rows, cols = np.nonzero((sheet == 0).all(axis=-1))  # kept patches (text is not 0)
        cell = sheet[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert cell.shape[:2] == (176, 176)
        assert spread(patch_pixels(cell, 0, grid)) == 0
        for patch in (5 * 16 + 5, 10 * 16 + 10):
            assert spread(patch_pixels(cell, patch, grid)) > 100


def test_a_merge_shows_on_a_black_image():
    """Grey shows no merge on black or grey content: merged tokens are outlined, white on
    dark pixels and black on light ones; a patch still its own token stays untouched."""
    trace = synthetic_trace()  # layer 0: patches 0 and 1 share a token
    for shade, ink in ((0, 255), (255, 0)):
        flat = np.full((64, 64, 3), shade, dtype=np.uint8)
        out = overlays.render_pruned(flat, trace, 0)
        assert (out[2:14, 31:33] == ink).all()  # between patch 1 (merged) and patch 2
        assert not (out[2:14, 15:17] == ink).all()  # no line inside the merged token
        assert (out[34:46, 34:46] == shade).all()  # patch 10, its own token


def test_tint_colours_only_tokens_of_several_patches(picture):
    """Issue 14: tinting every single-patch token turned the image into confetti. A patch
    still a token of its own shows the image untouched (boundaries on); merged ones are
    tinted."""
    trace = synthetic_trace()
    out = overlays.render_segments(picture, trace, 2, mode="tint")
    states = overlays.patch_states(trace, 2)
    assert states[10] == overlays.OWN and states[0] == overlays.MERGED
    for patch in np.flatnonzero(states == overlays.OWN):
        row, col = divmod(int(patch), 4)
        inner = (slice(row * 16 + 2, row * 16 + 14), slice(col * 16 + 2, col * 16 + 14))
        assert np.array_equal(out[inner], picture[inner]), patch
    assert np.array_equal(out[30:46, 30:46], picture[30:46, 30:46])  # inside a singleton run
    assert not np.array_equal(out[2:14, 2:14], picture[2:14, 2:14])  # merged 0/1/4: tinted


def test_the_heatmap_shows_each_patch_its_score():
    """Issue 14: the cubic heatmap did not show the scores the reducer used. By default
    every pixel of a patch has the colormap's colour of that patch's score, exactly."""
    rng = np.random.default_rng(4)
    scores = rng.normal(size=16)
    grey = np.full((64, 64, 3), 90, dtype=np.uint8)
    out = overlays.render_score_map(grey, scores, (4, 4), opacity=1.0, colorbar=False)
    expected = colors.apply_colormap((scores - scores.min()) / np.ptp(scores), "inferno")
    for patch, colour in enumerate(expected):
        row, col = divmod(patch, 4)
        assert (out[row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16] == colour).all(), patch
    trace = synthetic_trace()  # through the trace: layer 1's scores, patch 15 gone (hatched)
    heat = overlays.render_heatmap(grey, trace, 1, opacity=1.0, colorbar=False)
    used = trace.layers[1].scores[0].numpy()[:15]
    colour = colors.apply_colormap((used - used.min()) / np.ptp(used), "inferno")
    assert (heat[4:12, 4:12] == colour[0]).all() and (heat[36:44, 52:60] == colour[11]).all()


def test_evit_marks_the_patches_it_fuses(real_runs):
    """EViT's pruned tokens go into one extra token: the trace marks their patches fused
    (a state of their own in every view), and they stay marked afterwards."""
    trace = real_runs["evit"].trace
    assert trace.layers[0].fused is None  # nothing fused before EViT's first layer
    owner = overlays.patch_owner(trace, 1)
    fused = overlays.fused_patches(trace, 1)
    assert fused.any() and np.array_equal(fused, owner == trace.layers[1].tokens - 1)
    assert (overlays.patch_states(trace, 1)[fused] == overlays.FUSED).all()
    later = overlays.fused_patches(trace, 3)
    assert (later >= fused).all() and (later[overlays.patch_owner(trace, 3) == -1] == 0).all()
    assert trace.to_dict()["layers"][1]["fused"] == fused.tolist()
    assert (trace.reduced_at()[0].numpy()[fused] <= 1).all()
    for name in ("tome", "topk"):
        assert all(record.fused is None for record in real_runs[name].trace.layers)
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    pruned = overlays.render_pruned(image, trace, 1).reshape(-1, 3)
    assert (pruned == colors.FUSED_RGB).all(axis=-1).any()
    assert not (pruned == colors.HATCH_RGB).all(axis=-1).any()  # EViT drops nothing


def test_pages_open_where_the_schedule_acts(real_runs):
    """Issue 14: opened at the last layer, a schedule at layers 3/6/9 showed no heatmap."""
    opening = overlays.opening_layer
    assert opening([real_runs["evit"].trace]) == 3  # its last scored layer
    assert opening([real_runs["topk"].trace]) == 2
    assert opening([real_runs["tome"].trace]) == 5  # no scores: its last reducing layer
    assert opening([real_runs["none"].trace]) == 5
    assert opening([real_runs["tome"].trace, real_runs["topk"].trace]) == 2
    assert overlays.describe_layers([0, 1, 2, 3, 7]) == "0–3, 7"
    assert overlays.describe_layers([3, 6, 9]) == "3, 6, 9"


def test_the_register_artefact_is_named_where_it_shows():
    note = summary.attention_artefact_note("default", ["tome", "evit", "topk", "mstm"])
    assert note is not None
    assert "EViT and Top-K and MSTM" in note and "ToMe" not in note
    assert summary.REGISTERS_PAPER in note
    assert summary.attention_artefact_note("default", ["tome", "dtem"]) is None
    assert summary.attention_artefact_note("vit_small_patch14_reg4_dinov2", ["topk"]) is None
    assert summary.attention_artefact_note("deit_small_patch16_224", ["evit"]) is None
    assert summary.attention_artefact_note("vit_small_patch14_dinov2", ["evit"]) is not None


def test_token_depth_has_legend_and_colours_by_layer(picture):
    trace = synthetic_trace()
    out = overlays.render_token_depth(picture, trace)
    assert out.shape[0] == 64 and out.shape[1] > 64 and out.dtype == np.uint8
    assert trace.reduced_at()[0].tolist()[:5] == [0, 0, 3, 3, 2]
    plain = overlays.render_token_depth(picture, trace, legend=False)
    assert plain.shape == picture.shape
    assert np.array_equal(plain, out[:, :64])


def test_heatmap_needs_scores_and_draws_a_colour_bar(picture):
    trace = synthetic_trace()
    with pytest.raises(overlays.NoScoresError):
        overlays.render_heatmap(picture, trace, 0)
    assert overlays.scored_layers(trace) == [1]
    out = overlays.render_heatmap(picture, trace, 1)
    assert out.shape[0] == 64 and out.shape[1] > 64
    bare = overlays.render_heatmap(picture, trace, 1, colorbar=False)
    assert bare.shape == picture.shape
    assert np.array_equal(bare, overlays.render_heatmap(picture, trace, 1, colorbar=False))
    # the colour bar holds the colormap's extremes
    bar = out[:, 64:].reshape(-1, 3)
    lut = colors.colormap_lut("inferno")
    for extreme in (lut[0], lut[-1]):
        assert np.any(np.all(np.abs(bar.astype(int) - extreme) <= 2, axis=-1))


def test_heatmap_smooths_only_when_asked():
    scores = np.linspace(0.0, 1.0, 16)
    grey = np.full((64, 64, 3), 128, dtype=np.uint8)
    out = overlays.render_score_map(grey, scores, (4, 4), opacity=1.0, colorbar=False, smooth=True)
    brightness = out.astype(float).sum(axis=-1)
    assert brightness[60, 60] > brightness[4, 4]  # high scores bottom right
    assert len(np.unique(out[30].reshape(-1, 3), axis=0)) > 8  # smooth, not blocky
    flat = overlays.render_score_map(grey, scores, (4, 4), opacity=1.0, colorbar=False)
    assert len(np.unique(flat[30].reshape(-1, 3), axis=0)) == 4  # one colour per patch


def test_colormap_and_layer_colours():
    lut = colors.colormap_lut("viridis")
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert tuple(lut[0]) == (0x44, 0x01, 0x54)
    assert colors.layer_colors(12).shape == (12, 3)
    with pytest.raises(ValueError):
        colors.colormap_lut("not-a-map")


def test_segment_colours_are_deterministic_and_distinct():
    roots = np.arange(256)
    first, second = colors.segment_colors(roots), colors.segment_colors(roots)
    assert np.array_equal(first, second)
    assert len({tuple(c) for c in first}) > 200


def test_display_image_maps_the_crop_back_to_the_original(test_vit):
    original = Image.new("RGB", (400, 200), (255, 0, 0))
    original.paste((0, 0, 255), (0, 0, 100, 200))  # blue left quarter, outside the crop
    _, crop = fit_to_input(original, test_vit.data_config)
    shown = overlays.display_image(original, crop, (10, 10))
    assert shown.shape[0] == shown.shape[1] and shown.shape[0] % 10 == 0
    assert shown.shape[0] >= overlays.DISPLAY_MIN_SIDE
    assert np.all(shown[:, :, 2] < 30)  # only the red centre was seen by the model
    thumb = overlays.render_crop_box(original, crop, side=200)
    assert thumb.shape == (100, 200, 3)


@pytest.mark.parametrize("fast", [False, True])
def test_png_round_trip(picture, fast):
    """Both encodings are lossless and keep RGB order (OpenCV's own order is BGR)."""
    data = overlays.to_png(picture, fast=fast)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = Image.open(__import__("io").BytesIO(data))
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), picture)


# --------------------------------------------------------------------------- real traces


@pytest.mark.parametrize("name", ["tome", "evit", "topk"])
def test_renderers_on_real_runs(real_runs, name):
    result = real_runs[name]
    trace = result.trace
    image = overlays.display_image(real_runs["image"], result.crops[0], trace.grid)
    assert image.shape[:2] == (image.shape[0], image.shape[0])
    for layer in range(len(trace.layers)):
        out = overlays.render_segments(image, trace, layer)
        assert out.shape == image.shape
        owner = overlays.patch_owner(trace, layer)
        segments = len(np.unique(owner[owner >= 0]))
        patch_tokens = trace.layers[layer].tokens - trace.num_prefix
        assert segments == patch_tokens or (name == "evit" and segments == patch_tokens - 1)
    assert overlays.render_token_depth(image, trace).shape[0] == image.shape[0]
    scored = overlays.scored_layers(trace)
    assert scored == {"tome": [], "evit": [1, 3], "topk": [2]}[name]
    for layer in scored:
        assert overlays.render_heatmap(image, trace, layer).shape[0] == image.shape[0]


# --------------------------------------------------------------------------- charts, summary


def test_charts_compare_reduced_with_full(real_runs):
    reduced, full = real_runs["tome"].cost, real_runs["none"].cost
    tokens = charts.tokens_chart(reduced, full, layer=2)
    assert isinstance(tokens, go.Figure)
    assert list(tokens.data[0].y) == full.tokens and list(tokens.data[1].y) == reduced.tokens
    assert len(tokens.layout.shapes) == 1
    gmacs = charts.gmacs_chart(reduced, full)
    assert list(gmacs.data[1].y) == pytest.approx(reduced.gmacs_per_layer())
    assert len(gmacs.layout.shapes) == 0
    assert f"{reduced.gmacs:.2f}" in gmacs.layout.title.text


def test_top_classes_and_fidelity(real_runs, test_vit):
    full, reduced = real_runs["none"], real_runs["tome"]
    names = test_vit.class_names()
    top = summary.top_classes(full.logits, names)
    assert len(top) == 5
    assert [c.probability for c in top] == sorted((c.probability for c in top), reverse=True)
    assert top[0].name == names[top[0].index]
    same = summary.class_probabilities(reduced.logits, [c.index for c in top], names)
    figure = charts.topk_chart(top, same)
    assert list(figure.data[0].y) == [f"{c.short_name} ({c.index})" for c in top][::-1]
    assert summary.ClassScore(1, "gas pump, gasoline pump", 0.5).short_name == "gas pump"
    assert summary.feature_cosine(full.features, full.features) == pytest.approx(1.0)
    assert -1.0 <= summary.feature_cosine(full.features, reduced.features) <= 1.0
    assert summary.reduction_percent(3.0, 4.0) == pytest.approx(25.0)
    assert summary.top_classes(torch.tensor([[0.0, 1.0]]))[0].name == "class 1"


# --------------------------------------------------------------------------- schedule table


def _layer_values(schedule, facts):
    resolved = schedule.resolve(facts)
    return [
        tuple(
            (reducer.name, reducer.values)
            for reducer in (plan.inside, plan.between)
            if reducer is not None
        )
        for plan in resolved.layers
    ]


ROUND_TRIPS = [
    "none",
    "tome:r=8",
    "tome:r=4,inflect=-1",
    "tome:r=[4,3,2]",
    "evit:keep=0.7@3,6,9",
    "evit:keep=0.5,fuse=0@2;topk:keep=0.8@5",
    "random:keep=0.5,seed=3@1-4;tome:r=2@6-11",
    "patchmerger:tokens=8",
    "cropr:rate=8;mstm:keep=0.5",
    "cropr:rate=4,llf=1;ltm:keep=0.9@0-3",
]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_schedule_table_round_trip_keeps_every_layer(text, deit_small):
    facts = deit_small.facts
    schedule = parse_schedule(text)
    rows = schedule_table.schedule_to_rows(schedule, facts.depth)
    assert [row["layer"] for row in rows] == list(range(facts.depth))
    again = schedule_table.rows_to_schedule(rows, facts.depth)
    assert _layer_values(again, facts) == _layer_values(schedule, facts)
    # the text form is short: one part per method where the values allow it
    assert len(again.parts) <= max(1, len(schedule.parts))
    assert parse_schedule(again.to_text()).to_text() == again.to_text()


def test_editor_edits_become_schedule_text():
    rows = schedule_table.schedule_to_rows(parse_schedule("none"), 12)
    column = schedule_table.editor_columns()[0]
    for layer in (3, 6, 9):
        rows[layer][column.method] = "EViT"
        rows[layer][column.params] = "keep=0.7"
    assert schedule_table.rows_to_schedule(rows, 12).to_text() == "evit@3,6,9"
    rows[6][column.params] = "keep=0.5"
    assert schedule_table.rows_to_schedule(rows, 12).to_text() == "evit@3,9;evit:keep=0.5@6"
    rows[9][column.params] = "keep=7"
    with pytest.raises(ScheduleError, match=r"layer 9: evit: keep=7\.0 is above"):
        schedule_table.rows_to_schedule(rows, 12)
    rows[9][column.params] = "speed=3"
    with pytest.raises(ScheduleError, match="layer 9: evit: unknown parameter 'speed'"):
        schedule_table.rows_to_schedule(rows, 12)


def test_presets_cover_every_registered_method():
    found = schedule_table.presets(12)
    assert found[schedule_table.NONE_PRESET] == "none"
    for cls in REDUCERS.values():
        assert cls.name in found.values()  # the method at its default placement
    match = schedule_table.matching_preset
    tome = "ToMe r=8, all layers (default; paper: DeiT-S 3.4 G)"
    assert match(" tome ", found, 12) == tome
    assert match("tome:r=8@0-11", found, 12) == tome
    evit = "EViT keep=0.7, at layers 3/6/9 (paper: DeiT-S 3.0 G)"
    assert match("evit:keep=0.7,fuse=1@3,6,9", found, 12) == evit
    # the paper placements: PatchMerger after block L/2, Cropr all but the last, MSTM 3/6/9
    merger = "PatchMerger tokens=8, at layer 5 (default; paper: M=8 after block L/2)"
    assert match("patchmerger:tokens=8@5", found, 12) == merger
    assert match("cropr:rate=8@0-10", found, 12).startswith("Token Cropr rate=8, at layers 0–10")
    assert match("mstm:keep=0.7@3,6,9", found, 12) == "MSTM keep=0.7, at layers 3/6/9 (default)"
    assert match("patchmerger:tokens=8@6", found, 12) == schedule_table.CUSTOM_PRESET
    assert match("tome:r=3", found, 12) == schedule_table.CUSTOM_PRESET
    assert match("broken", found, 12) == schedule_table.CUSTOM_PRESET
    help_rows = schedule_table.method_help()
    assert {row["parameter"] for row in help_rows} >= {"r", "keep"}


def test_editor_writes_a_default_placement_without_layers():
    """A method at its paper placement is written without `@`, anywhere else with it."""
    for text, depth, expected in [
        ("patchmerger:tokens=8@5", 12, "patchmerger"),
        ("patchmerger:tokens=8@1", 4, "patchmerger"),
        ("patchmerger:tokens=8@6", 12, "patchmerger@6"),
        ("cropr:rate=8@0-10", 12, "cropr"),
        ("cropr:rate=8,llf=1@0-9", 12, "cropr:llf=1"),
        ("cropr:rate=8,llf=1@0-10", 12, "cropr:llf=1@0-10"),
        ("mstm:keep=0.5@3,6,9", 12, "mstm:keep=0.5"),
        ("mstm:keep=0.5@0-11", 12, "mstm:keep=0.5@0-11"),
        ("tome:r=8@0-11", 12, "tome"),
    ]:
        assert schedule_table.canonical_text(text, depth) == expected, text
        rows = schedule_table.schedule_to_rows(parse_schedule(expected), depth)
        again = schedule_table.rows_to_schedule(rows, depth).to_text()
        assert schedule_table.canonical_text(again, depth) == expected


class _Dummy(Reducer):
    name: ClassVar[str] = "dummy"
    label: ClassVar[str] = "Dummy"
    site: ClassVar[Site] = Site.BETWEEN
    description: ClassVar[str] = "does nothing"
    params: ClassVar[tuple[Param, ...]] = (Param("strength", float, 0.5, 0.0, 1.0, "how much"),)

    def output_tokens(self, num_tokens: int, num_prefix: int) -> int:
        return num_tokens

    def reduce(self, state, signals):
        return identity_reduction(state)


def test_a_newly_registered_method_appears_without_app_changes(monkeypatch):
    monkeypatch.setitem(REDUCERS, "dummy", _Dummy)
    assert "Dummy strength=0.5, all layers (default)" in schedule_table.presets(12)
    columns = schedule_table.editor_columns()
    assert [c.site for c in columns] == [Site.INSIDE, Site.BETWEEN]
    assert "Dummy" in columns[1].options and "Dummy" not in columns[0].options
    rows = schedule_table.schedule_to_rows(parse_schedule("tome:r=4;dummy:strength=0.2@2"), 4)
    assert rows[2][columns[1].method] == "Dummy"
    assert rows[2][columns[1].params] == "strength=0.2"
    text = schedule_table.rows_to_schedule(rows, 4).to_text()
    assert text == "tome:r=4;dummy:strength=0.2@2"


def test_display_image_keeps_native_resolution_up_to_the_cap(test_vit):
    original = Image.new("RGB", (1500, 1000), (10, 200, 30))
    _, crop = fit_to_input(original, test_vit.data_config)
    native = overlays.display_image(original, crop, (10, 10), max_side=2048)
    assert native.shape[0] == 950  # the crop covers 95 % of the short side, 95 px per patch
    capped = overlays.display_image(original, crop, (10, 10), max_side=500)
    assert capped.shape[:2] == (500, 500)
    tiny_image = Image.new("RGB", (64, 64))
    _, tiny_crop = fit_to_input(tiny_image, test_vit.data_config)
    small = overlays.display_image(tiny_image, tiny_crop, (10, 10))
    assert small.shape[0] >= overlays.DISPLAY_MIN_SIDE


def test_wrap_words_breaks_greedily_and_joins_the_overflow():
    from viz.wrapping import wrap_words

    def fits(line: str) -> bool:
        return len(line) <= 10

    assert wrap_words("aaa bbb ccc ddd\neee", fits, 5) == ["aaa bbb", "ccc ddd", "eee"]
    assert wrap_words("aaa bbb ccc ddd eee", fits, 2) == ["aaa bbb", "ccc ddd eee"]
    assert wrap_words("averyverylongword x", fits, 3) == ["averyverylongword", "x"]
    kept = "5\u00a0pt text"  # a no-break space holds its words together when asked
    assert wrap_words(kept, lambda line: len(line) <= 4, 3, separator=" ") == ["5\u00a0pt", "text"]
    assert wrap_words(kept, lambda line: len(line) <= 4, 3) == ["5 pt", "text"]
