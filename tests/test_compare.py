"""The Compare page: its pure drawing helpers (viz.compare) and the page through AppTest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from analysis import comparison, run
from analysis.agreement import METRICS, AgreementMatrix, agreement_matrix
from tests.test_browser import (
    CHROMIUM_ARGS,
    RUN_TIMEOUT_MS,
    chromium_path,
    open_explore,
    wait_idle,
)
from tests.test_browser import app_url as app_url  # the `streamlit run` fixture, reused
from viz import compare, overlays

APP = str(Path(__file__).resolve().parents[1] / "app.py")
TIMEOUT = 300

# --------------------------------------------------------------------------- viz


@pytest.fixture(scope="module")
def runs(test_vit):
    """Runs of the tiny random test_vit (10×10 grid, 6 layers, a classifier) on a batch
    of three images."""
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (90, 120, 3), np.uint8)) for _ in range(3)]
    schedules = {
        "none": "none",
        "tome": "tome:r=6",
        "evit": "evit:keep=0.6@1,3",
        "topk": "topk:keep=0.5@2",
    }
    return {name: run(test_vit, images, text) for name, text in schedules.items()}


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(80, 80, 3), dtype=np.uint8)


@pytest.mark.parametrize("view", list(compare.VIEWS))
def test_render_view_shapes_and_determinism(runs, picture, view):
    trace = runs["topk"].trace
    first = compare.render_view(picture, trace, view, 2, index=1, legend=False)
    second = compare.render_view(picture, trace, view, 2, index=1, legend=False)
    assert first is not None and first.shape == picture.shape and first.dtype == np.uint8
    assert np.array_equal(first, second)
    if view in ("depth", "heatmap"):  # with a legend or colour bar attached to the right
        framed = compare.render_view(picture, trace, view, 2, index=1)
        assert framed.shape[0] == picture.shape[0] and framed.shape[1] > picture.shape[1]


def test_render_view_heatmap_without_scores_is_none(runs, picture):
    assert compare.render_view(picture, runs["tome"].trace, "heatmap", 2) is None  # ToMe
    assert compare.render_view(picture, runs["topk"].trace, "heatmap", 1) is None  # not here
    with pytest.raises(ValueError, match="unknown view"):
        compare.render_view(picture, runs["tome"].trace, "nope", 0)


def test_compose_grid_shape_labels_and_cells(picture):
    cells = [[picture, picture, "no scores at layer 3"], [picture, None, picture]]
    grid = compare.compose_grid(
        cells, ["row one", "row two"], ["input", "A · ToMe\ntome:r=8", "B"], cell_side=60
    )
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    # three 60 px cells per row (square pictures stay square), and a label column
    assert grid.shape[1] >= 3 * 60 + 40
    assert grid.shape[0] >= 2 * 60
    white = np.all(grid == 255, axis=-1)
    # the labels are drawn: dark ink in the top header band and in the left label band
    header = grid[: grid.shape[0] - 2 * 64]
    assert (header.min(axis=-1) < 100).any()
    left = grid[:, :30]
    assert (left.min(axis=-1) < 100).any()
    # the placeholder cells are light grey boxes of the cell size
    grey = np.all(grid == compare.PLACEHOLDER, axis=-1)
    assert grey.sum() >= 2 * 0.6 * 60 * 60
    assert white.any()


def test_compose_grid_is_deterministic_and_places_pictures(picture):
    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 0] = 255
    first = compare.compose_grid([[red, picture]], ["r"], ["a", "b"], cell_side=40, title="t")
    second = compare.compose_grid([[red, picture]], ["r"], ["a", "b"], cell_side=40, title="t")
    assert np.array_equal(first, second)
    pure_red = np.all(first == (255, 0, 0), axis=-1)
    rows, cols = np.nonzero(pure_red)
    assert rows.max() - rows.min() + 1 == 40 and cols.max() - cols.min() + 1 == 40
    # wider pictures keep their aspect ratio
    wide = np.zeros((20, 60, 3), np.uint8)
    grid = compare.compose_grid([[wide]], ["r"], ["a"], cell_side=40)
    assert np.all(grid == 0, axis=-1).sum() == 40 * 120


def test_compose_grid_footer_and_errors(picture):
    footer = compare.legend_strip("pruned", 12, 300)
    grid = compare.compose_grid([[picture]], ["r"], ["c"], cell_side=50, footer=footer)
    without = compare.compose_grid([[picture]], ["r"], ["c"], cell_side=50)
    assert grid.shape[0] == without.shape[0] + footer.shape[0] + 4
    assert grid.shape[1] >= footer.shape[1]
    with pytest.raises(ValueError, match="rows"):
        compare.compose_grid([[picture]], ["r", "s"], ["c"])
    with pytest.raises(ValueError, match="at least one"):
        compare.compose_grid([], [], [])


@pytest.mark.parametrize("view", list(compare.VIEWS))
def test_legend_strip(view):
    strip = compare.legend_strip(view, 12, 400)
    assert strip.shape[0] == 22 and strip.shape[1] >= 400 and (strip.min(axis=-1) < 100).any()
    # the hatching of pruned patches is drawn as the pictures draw it (not a flat swatch)
    assert (strip == overlays.pattern_swatch("dropped", 4)[1, 1]).all(axis=-1).any()


def test_agreement_heatmap_writes_values_and_na():
    matrix = AgreementMatrix(("A · ToMe", "B · EViT"), np.array([[1.0, 0.25], [0.25, np.nan]]))
    figure = compare.agreement_heatmap(matrix, METRICS["iou"])
    assert isinstance(figure, go.Figure)
    heat = figure.data[0]
    assert list(heat.x) == ["A · ToMe", "B · EViT"]
    assert heat.zmin == 0 and heat.zmax == 1
    assert [list(row) for row in heat.text] == [["1.00", "0.25"], ["0.25", "n/a"]]
    assert heat.z[1][1] is None


def test_lines_and_bars(runs):
    metric = METRICS["ari"]
    figure = compare.agreement_lines({"A–B": [1.0, 0.5, float("nan")]}, metric, layer=1)
    assert len(figure.data) == 1 and list(figure.data[0].y) == [1.0, 0.5, None]
    tokens = compare.tokens_lines(
        {"A": runs["tome"].tokens, "B": runs["evit"].tokens}, runs["none"].tokens, 2
    )
    assert [trace.name for trace in tokens.data] == ["full model", "A", "B"]
    # Issue 14: EViT's and Top-K's counts coincide; each line has its own dash and marker
    lines = compare.tokens_lines({"A": [3, 2], "B": [3, 2], "C": [3, 2]}, [3, 3], styles=[0, 2, 3])
    looks = {(t.line.dash, t.marker.symbol) for t in lines.data[1:]}
    assert len(looks) == 3 and all(t.mode == "lines+markers" for t in lines.data[1:])
    pairs = compare.agreement_lines({"A–B": [1.0, 0.5], "A–C": [1.0, 0.5]}, metric)
    assert len({(t.line.dash, t.marker.symbol) for t in pairs.data}) == 2
    bars = compare.gmacs_bars({"A": runs["tome"].cost}, runs["none"].cost, 2)
    assert len(bars.data) == 2 and "(" in bars.data[1].name
    assert sum(bars.data[1].y) < sum(bars.data[0].y)


def test_summaries_and_table(runs):
    full, tome = runs["none"], runs["topk"]
    row = compare.summarize(
        "A · Top-K", "topk:keep=0.5@2", tome, full, seconds=0.012, device="cpu",
        agreement=0.5, reduced_set=tome, full_set=full,
    )  # fmt: skip
    assert row.top1_same is not None and row.top5_overlap is not None and row.cosine is None
    assert 0 < row.reduction_percent < 100
    assert 0.0 <= row.set_fidelity <= 1.0
    same = compare.summarize("B", "none", full, full, seconds=0.01, device="cpu")
    assert same.top1_same and same.top5_overlap == 5 and same.reduction_percent == 0
    assert compare.set_fidelity(full, full) == 1.0
    table = compare.comparison_table([row, same], agreement_label="IoU vs A")
    assert list(table["method"]) == ["A · Top-K", "B"]
    assert {"top-1 as full", "top-5 shared", "IoU vs A", "run ms"} <= set(table.columns)
    assert "feature cosine" not in table.columns
    assert table["run ms"].tolist() == [12.0, 10.0]
    backbone = compare.MethodSummary("C", "tome", 3.0, 6.0, 0.1, "cpu", cosine=0.99)
    table = compare.comparison_table([backbone])
    assert "feature cosine" in table.columns and "top-1 as full" not in table.columns
    assert table["reduction %"].tolist() == [50.0]


def test_agreement_on_runs_feeds_the_heatmap(runs):
    named = {"A": runs["tome"], "B": runs["evit"], "C": runs["topk"]}
    for metric in METRICS:
        layer = 3 if METRICS[metric].per_layer else None
        matrix = agreement_matrix(named, metric, layer, None)
        figure = compare.agreement_heatmap(matrix, METRICS[metric])
        assert np.asarray(figure.data[0].text).shape == (3, 3)


def test_config_round_trips_through_json():
    config = comparison.ComparisonConfig(
        model={"name": "default", "weights": "default", "device": "cpu"},
        images=[{"key": "sample:astronaut", "label": "astronaut"}],
        columns=[
            comparison.ColumnConfig("A · ToMe", "tome", "tome:r=14", {"param": "r", "value": 14}),
            comparison.ColumnConfig("B", "evit:keep=7", None, error="keep=7.0 is above its range"),
        ],
        layer=6,
        view="segments",
        grid_layers=[0, 3, 6],
        matched={"unit": "percent", "value": 65.0, "tolerance_percent": 1.0},
        metric="iou",
    )
    text = config.to_json()
    assert json.loads(text)["kind"] == "tokenscope.compare"
    assert comparison.ComparisonConfig.from_json(text) == config


# --------------------------------------------------------------------------- page


def open_compare(**state) -> AppTest:
    """The app, switched to the Compare page; ``state`` presets session keys (a small
    image set keeps the tests quick)."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["compare_set"] = ["chelsea (cat)"]
    for key, value in state.items():
        at.session_state[key] = value
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def headers(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith("#### ")]


def summary_frame(at: AppTest):
    for frame in at.dataframe:
        if "method" in frame.value.columns:
            return frame.value
    raise AssertionError("no summary table")


def charts(at: AppTest) -> str:
    """The plotly figures' JSON, all together (for titles and names)."""
    return "\n".join(chart.proto.spec for chart in at.get("plotly_chart"))


def page_text(at: AppTest) -> str:
    parts = (*at.markdown, *at.caption, *at.info, *at.error, *at.warning)
    return "\n".join(str(e.value) for e in parts)


def test_page_opens_with_three_columns():
    at = open_compare()
    assert at.title[0].value == "Compare"
    assert len(headers(at)) == 3
    # each method's preset matched to 75 % of the full model, so the first look is fair
    assert [at.text_input(key=f"compare_schedule_{i}").value for i in range(3)] == [
        "tome:r=10",
        "evit:keep=0.8@3,6,9",
        "topk:keep=0.804@3,6,9",
    ]
    table = summary_frame(at)
    assert list(table["method"]) == ["A · ToMe", "B · EViT", "C · Top-K"]
    assert list(table["GMACs"]) == pytest.approx([4.601, 4.590, 4.590], abs=1e-3)
    assert {"feature cosine", "run ms", "device"} <= set(table.columns)
    # Issue 14: three columns ran, plus the full model, which is no column's schedule
    assert [s.label for s in at.status] == ["Ran the full model and 3 schedules on 2 images"]
    # opened where EViT and Top-K have scores (layers 3/6/9), not on the empty last layer
    assert at.slider(key="compare_layer").value == 9
    assert "Scores from" in page_text(at) and "No scores at layer" not in page_text(at)
    assert "Vision Transformers Need Registers" in page_text(at)  # CLS attention on DINOv2
    # per column: segments, pruned; plus the crop thumbnail and the two grids
    assert len(at.get("image")) >= 3 * 2 + 3
    assert len(at.get("plotly_chart")) >= 4  # tokens, GMACs, heatmap, lines
    labels = {b.label for b in at.get("download_button")}
    assert {"Images × methods PNG", "Methods × layers PNG", "Configuration JSON"} <= labels
    assert not at.error

    at.slider(key="compare_layer").set_value(3).run()
    assert not at.exception
    assert "tokens after layer 3" in page_text(at)


@pytest.mark.parametrize("count", [2, 4])
def test_two_and_four_columns(count):
    at = open_compare(compare_count=count)
    assert len(headers(at)) == count
    table = summary_frame(at)
    assert len(table) == count
    if count == 4:
        assert table["method"].iloc[3] == "D · Random"
    assert len(at.get("image")) >= count * 2 + 3
    assert not at.error


def test_matched_mode_lands_every_column_on_the_target():
    at = open_compare(compare_count=4)
    at.toggle(key="compare_matched").set_value(True).run()
    assert not at.exception, [e.value for e in at.exception]
    text = page_text(at)
    assert text.count("set to") == 4
    assert text.count("within ±") == 4
    assert "`r=" in text and "`keep=" in text
    table = summary_frame(at)
    full = table["GMACs"].iloc[0] / (1 - table["reduction %"].iloc[0] / 100)
    assert np.allclose(table["GMACs"], 0.65 * full, atol=0.01 * full + 1e-3)

    at.number_input(key="compare_tolerance").set_value(0.05).run()  # ToMe's r is coarse
    assert not at.exception, [e.value for e in at.exception]
    tome = next(m.value for m in at.markdown if "set to `r=" in m.value)
    assert "within ±" in tome or any("ToMe cannot land" in w.value for w in at.warning)

    at.number_input(key="compare_tolerance").set_value(1.0).run()
    at.number_input(key="compare_target_percent").set_value(2.0).run()
    assert not at.exception
    warnings = [w.value for w in at.warning]
    assert len(warnings) == 4 and all("cannot reach" in w for w in warnings)
    assert len(summary_frame(at)) == 4  # the closest settings still run


def test_matched_mode_keeps_learned_methods_where_their_weights_are_valid():
    """Issue 10: PatchMerger's weights fix tokens=8, so its layer is solved (no error
    column); Cropr pushed past the rates it was trained at runs, with a warning."""
    at = open_compare(
        compare_count=2,
        compare_schedule_0="patchmerger:tokens=8@5",
        compare_schedule_1="cropr:rate=16@0-10",
        compare_matched=True,
        compare_target_percent=35.0,
    )
    assert not at.error, [e.value for e in at.error]
    assert "set to `layer=3`" in page_text(at)
    (warning,) = [w.value for w in at.warning if "Extrapolated" in w.value]
    assert "Token Cropr rate=" in warning and "trained 8–24" in warning
    assert list(summary_frame(at)["method"]) == ["A · PatchMerger", "B · Token Cropr"]


def test_bad_schedule_in_one_column_leaves_the_others():
    at = open_compare(compare_count=3)
    images_before = len(at.get("image"))
    at.text_input(key="compare_schedule_1").input("evit:keep=7@3").run()
    assert not at.exception, [e.value for e in at.exception]
    (message,) = [e.value for e in at.error]
    assert "keep=7.0 is above its range" in message
    assert at.selectbox(key="compare_preset_1").value == "Custom"
    table = summary_frame(at)
    assert list(table["method"]) == ["A · ToMe", "C · Top-K"]
    # the good columns keep their pictures; the bad one (EViT) loses its three: segments,
    # pruned and the heatmap of layer 9, where the page opens
    assert len(at.get("image")) == images_before - 3
    assert "Left out of the summary" in page_text(at)

    at.text_input(key="compare_schedule_1").input("nonsense").run()
    assert "unknown method 'nonsense'" in at.error[0].value
    at.toggle(key="compare_matched").set_value(True).run()  # still isolated when matched
    assert not at.exception and len(summary_frame(at)) == 2


def test_agreement_metrics_and_views():
    at = open_compare(compare_count=2)
    for metric in METRICS:
        at.selectbox(key="compare_metric").set_value(metric).run()
        assert not at.exception, (metric, [e.value for e in at.exception])
        assert METRICS[metric].label in page_text(at)
        assert any(METRICS[metric].label in c for c in summary_frame(at).columns)
    at.selectbox(key="compare_metric").set_value("iou").run()
    at.radio(key="compare_measure").set_value("set").run()
    assert not at.exception
    assert "mean over 2 images" in charts(at)
    at.selectbox(key="compare_metric").set_value("cka").run()
    assert "features of 2 images" in charts(at)
    assert "CKA over 2 images is coarse" in page_text(at)
    for view in compare.VIEWS:
        at.radio(key="compare_grid_view").set_value(view).run()
        assert not at.exception, (view, [e.value for e in at.exception])
    at.pills(key="compare_views").set_value(list(compare.VIEWS)).run()
    assert not at.exception


def test_an_image_set_of_one_image():
    at = open_compare(compare_count=2, compare_set=[])
    assert "1 image × 2 methods" in page_text(at)
    at.selectbox(key="compare_metric").set_value("cka").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("add samples to the image set" in w.value for w in at.warning)
    assert "n\\u002fa" in charts(at)  # "n/a", as plotly escapes it: CKA of one image


def test_classifier_shows_top5_per_column():
    at = open_compare(compare_count=2)
    at.radio(key="model_source").set_value("timm model").run()
    at.selectbox(key="timm_name").set_value("deit_tiny_patch16_224").run()
    at.radio(key="timm_weights").set_value("random").run()
    assert not at.exception, [e.value for e in at.exception]
    assert [m.label for m in at.metric].count("Top-1") == 2
    top5 = [f.value for f in at.dataframe if "top-5" in f.value.columns]
    assert len(top5) == 2 and all(len(frame) == 5 for frame in top5)
    table = summary_frame(at)
    assert {"top-1 as full", "top-5 shared", "top-1 as full (2 images)"} <= set(table.columns)
    assert "feature cosine" not in table.columns
    assert table["GMACs"].max() < 1.3  # DeiT-Tiny: 1.3 GMACs in full


def test_explore_schedule_carries_over():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["compare_set"] = ["chelsea (cat)"]
    at.run()
    at.text_area(key="schedule_text").input("topk:keep=0.5@3,6,9").run()
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.text_input(key="compare_schedule_0").value == "topk:keep=0.5@3,6,9"


# --------------------------------------------------------------------------- browser


@pytest.mark.browser
@pytest.mark.slow
def test_compare_page_in_chromium(app_url: str, tmp_path: Path):
    """From Explore to Compare through the navigation, then matched mode and a bad
    column, in real Chromium: pictures load and nothing raises."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page, main = open_explore(browser, app_url)
            page.locator('[data-testid="stSidebarNav"]').get_by_text(
                "Compare", exact=True
            ).first.click()
            main.get_by_text("Methods × layers PNG").first.wait_for(timeout=RUN_TIMEOUT_MS)
            wait_idle(page)
            pictures = main.locator('[data-testid="stImage"] img')
            assert pictures.count() >= 3 * 2 + 2
            assert pictures.first.evaluate("img => img.complete && img.naturalWidth") > 0
            assert main.locator(".js-plotly-plot").count() >= 4

            main.get_by_text("Matched cost", exact=True).click()
            main.get_by_text("within ±").first.wait_for(timeout=RUN_TIMEOUT_MS)
            wait_idle(page)
            box = main.locator('[data-testid="stTextInput"] input').nth(1)
            box.fill("evit:keep=7@3")
            box.press("Enter")
            main.get_by_text("is above its range").first.wait_for(timeout=RUN_TIMEOUT_MS)
            wait_idle(page)
            assert main.get_by_text("C · Top-K").count() >= 1
            assert page.locator('[data-testid="stException"]').count() == 0
            page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
        finally:
            browser.close()


def test_compare_sends_three_methods_to_figures():
    """The issue's newcomer: three methods on Compare, sent to Figures as a panel."""
    at = open_compare(compare_count=3)
    button = next(b for b in at.button if b.label == "Send images × methods to Figures")
    button.click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Figures"
    config = at.session_state["figure_config"]
    assert config.kind == "panel" and config.rows == "images"
    assert len(config.schedules) == 3
    labels = {b.label for b in at.get("download_button")}
    assert "PDF" in labels
