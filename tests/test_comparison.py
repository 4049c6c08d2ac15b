"""The Compare page's computation and drawing, without Streamlit: ``analysis.comparison``
(records, defaults, agreement, grid plans, export), ``viz.compare_tables`` (tables, tiles,
sentences) and ``viz.compare_grids`` (the two grids)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analysis import run
from analysis.agreement import METRICS
from analysis.comparison import (
    BatchJob,
    BatchRuns,
    Column,
    ComparedImages,
    ComparisonConfig,
    Target,
    agreement_runs,
    agreement_series,
    agreement_with_first,
    batch_jobs,
    comparison_config,
    default_grid_layers,
    default_texts,
    grid_layers,
    grid_plan,
    metric_or_default,
    pair_indices,
    shown_layers,
    solve,
    unavailable_methods,
    view_layer,
)
from analysis.errors import ScheduleError
from analysis.schedule import Schedule, parse_schedule
from analysis.solver import MatchedSchedule
from viz import compare, compare_grids, compare_tables

SCHEDULES = {
    "none": "none",
    "tome": "tome:r=6",
    "evit": "evit:keep=0.6@1,3",
    "topk": "topk:keep=0.5@2",
}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)) for _ in range(3)]


@pytest.fixture(scope="module")
def one(test_vit, images):
    """Runs of the tiny classifier on the page's image alone."""
    return {name: run(test_vit, images[:1], text) for name, text in SCHEDULES.items()}


@pytest.fixture(scope="module")
def batch_of_three(test_vit, images):
    """The same schedules over an image set of three."""
    return {name: run(test_vit, images, text) for name, text in SCHEDULES.items()}


def column(index: int, name: str, one, **fields) -> Column:
    """A column that ran ``SCHEDULES[name]`` on the page's image."""
    schedule = parse_schedule(SCHEDULES[name])
    return Column(index, SCHEDULES[name], schedule=schedule, result=one[name], **fields)


def matched(within: bool) -> MatchedSchedule:
    base = parse_schedule("tome:r=4")
    return MatchedSchedule(
        method="tome",
        label="ToMe",
        base=base,
        schedule=parse_schedule("tome:r=7"),
        param="r",
        value=7,
        gmacs=2.0 if within else 2.4,
        target_gmacs=2.0,
        full_gmacs=4.0,
        tolerance=0.04,
        reachable_range=(1.0, 4.0),
        message="" if within else "ToMe cannot land within ±0.040 GMACs",
    )


# --------------------------------------------------------------------------- records


def test_column_names_what_ran(one):
    tome = column(0, "tome", one)
    assert tome.name == "A · ToMe" and tome.ok and tome.letter == "A"
    assert tome.ran == "tome:r=6" and json.loads(tome.key)["parts"][0]["method"] == "tome"
    assert Column(1, "none", schedule=Schedule()).name == "B · full model"
    failed = Column(2, "evit:keep=7", error="too high")
    assert failed.name == "C · (error)" and not failed.ok
    assert failed.ran == failed.key == "evit:keep=7" and failed.methods == []


def test_batch_jobs_put_the_full_model_first_and_skip_failed_columns(one):
    columns = [
        column(0, "tome", one),
        Column(1, "nonsense", error="unknown"),
        column(2, "evit", one),
    ]
    jobs = batch_jobs(columns)
    assert [job.index for job in jobs] == [None, 0, 2]
    assert jobs[0].schedule_json == Schedule().to_json()
    assert jobs[2].schedule_json == columns[2].key
    assert compare_tables.runs_label(jobs) == "the full model and 2 schedules"
    assert compare_tables.runs_label(jobs[1:2]) == "1 schedule"
    assert compare_tables.runs_label([BatchJob(None, "{}")]) == "the full model"


def test_batch_runs_results_notes_and_size(batch_of_three):
    batch = BatchRuns(batch_of_three["none"], {0: batch_of_three["tome"], 1: "out of memory"})
    assert batch.result(0) is batch_of_three["tome"]
    assert batch.result(1) is None and batch.note(1) == "out of memory"
    assert batch.result(3) is None and batch.note(3) == "not run"
    assert batch.set_size == 3 and BatchRuns().set_size == 0


# --------------------------------------------------------------------------- columns


def test_default_texts_take_each_methods_preset_nearest_75_percent(test_vit):
    choices = {
        "ToMe light": "tome:r=1",
        "ToMe strong": "tome:r=12",
        "EViT": "evit:keep=0.7@1,3",
        "Top-K": "topk:keep=0.7@1,3",
        "both": "tome:r=2;evit:keep=0.7@3",  # two methods: never a default
    }
    texts = default_texts(test_vit, choices)
    assert len(texts) == 4
    assert texts[:3] == ["tome:r=12", "evit:keep=0.7@1,3", "topk:keep=0.7@1,3"]
    assert texts[3] == texts[0]  # four columns, three methods: round again
    explored = "topk:keep=0.5@2"
    carried = default_texts(test_vit, choices, explored, parse_schedule(explored))
    assert carried == [explored, "tome:r=12", "evit:keep=0.7@1,3", explored]
    empty = default_texts(test_vit, choices, "none", Schedule())  # nothing to carry
    assert empty == texts
    assert default_texts(test_vit, {}) == ["none"] * 4


def test_unavailable_methods_give_the_checks_reason(test_vit):
    def check(text: str, model) -> Schedule:
        if text == "evit":
            raise ScheduleError("needs a CLS token")
        return parse_schedule(text)

    missing = unavailable_methods(test_vit, {"ToMe": "tome:r=2"}, check)
    assert "ToMe" not in missing
    assert missing["EViT"] == "needs a CLS token"
    assert missing["Top-K"] == "no preset fits this model"


def test_solve_lands_on_the_target_and_refuses_an_empty_schedule(test_vit):
    solved = solve(test_vit, parse_schedule("tome:r=1"), Target("percent", 70.0, 5.0))
    assert solved.param == "r" and solved.within_tolerance
    assert abs(solved.percent - 70.0) <= 5.0
    with pytest.raises(ScheduleError, match="no strength to solve"):
        solve(test_vit, Schedule(), Target("percent", 70.0, 1.0))


# --------------------------------------------------------------------------- agreement


def test_agreement_with_first_on_the_image_and_over_the_set(one, batch_of_three):
    good = [column(0, "topk", one), column(1, "evit", one), column(3, "topk", one)]
    batch = BatchRuns(
        batch_of_three["none"], {0: batch_of_three["topk"], 3: batch_of_three["topk"]}
    )
    iou = agreement_with_first(good, batch, "iou", 3)
    assert iou[0] == pytest.approx(1.0) and iou[2] == pytest.approx(1.0)
    assert 0.0 <= iou[1] < 1.0  # EViT keeps other patches than Top-K
    cka = agreement_with_first(good, batch, "cka", 3)  # over the set's features
    assert cka[0] == pytest.approx(1.0) and cka[2] == pytest.approx(1.0)
    assert cka[1] is None  # column B's batch is missing


def test_agreement_runs_and_series_name_pairs_by_letter(one, batch_of_three):
    good = [column(0, "tome", one), column(1, "evit", one), column(2, "topk", one)]
    batch = BatchRuns(None, {0: batch_of_three["tome"], 1: "failed", 2: batch_of_three["topk"]})
    on_set = agreement_runs(good, batch, "set")
    assert [c.letter for c in on_set.columns] == ["A", "C"] and on_set.image_index is None
    assert on_set.runs == (batch_of_three["tome"], batch_of_three["topk"])
    on_image = agreement_runs(good, batch, "image")
    assert len(on_image.runs) == 3 and on_image.image_index == 0
    assert list(on_set.named) == ["A · ToMe", "C · Top-K"]
    series = agreement_series(on_set, "ari", "first")
    assert list(series) == ["A–C"] and len(series["A–C"]) == 6  # one value per layer
    assert list(agreement_series(on_image, "ari", "all")) == ["A–B", "A–C", "B–C"]
    assert list(agreement_series(on_image, "ari", "first")) == ["A–B", "A–C"]


def test_pair_indices():
    assert pair_indices(3, "first") == [(0, 1), (0, 2)]
    assert pair_indices(4, "all") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert pair_indices(1, "all") == [] and pair_indices(1, "first") == []


def test_metric_or_default():
    assert metric_or_default("cka") == "cka"
    assert metric_or_default("gone") == "iou" and metric_or_default(None) == "iou"


# --------------------------------------------------------------------------- grids


def test_grid_layers_and_views():
    assert default_grid_layers(12) == [0, 3, 6, 9, 11]
    assert default_grid_layers(6) == [0, 1, 2, 3, 4, 5]
    assert default_grid_layers(1) == [0]
    assert grid_layers([9, 2], 5) == [2, 9] and grid_layers([], 5) == [5]
    assert shown_layers("depth", [2, 9], 12) == [11]
    assert shown_layers("segments", [2, 9], 12) == [2, 9]
    assert view_layer("depth", 4) is None and view_layer("heatmap", 4) == 4


def test_grid_plan_signature_keys_what_the_grid_shows(one):
    images = ComparedImages(("a", "b"), ("cat", "dog"))
    good = [column(0, "tome", one), column(2, "topk", one)]
    plan = grid_plan("test_vit", ("test_vit", "random", "cpu"), images, good, "pruned", "mean", 6)
    assert plan.names == ["A · ToMe", "C · Top-K"]
    assert plan.headers == ["input", "A · ToMe\ntome:r=6", "C · Top-K\ntopk:keep=0.5@2"]
    assert plan.signature("images", 3) == plan.signature("images", 3)
    assert plan.signature("images", 3) != plan.signature("images", 4)
    other = grid_plan("test_vit", ("test_vit", "random", "cpu"), images, good, "depth", "mean", 6)
    assert plan.signature("images", 3) != other.signature("images", 3)


# --------------------------------------------------------------------------- export


def test_comparison_config_records_every_column(one):
    columns = [
        column(0, "tome", one, matched=matched(True)),
        Column(1, "evit:keep=7", error="keep=7.0 is above its range"),
    ]
    images = ComparedImages(("sample:cat",), ("cat",))
    model = {"name": "test_vit", "weights": "random", "device": "cpu", "learned": ""}
    config = comparison_config(
        model,
        images,
        columns,
        layer=3,
        view="segments",
        grid_layers=(0, 3),
        target=Target("percent", 50.0, 1.0),
        metric="iou",
    )
    assert config.images == [{"key": "sample:cat", "label": "cat"}]
    first, second = config.columns
    assert first.ran == "tome:r=6" and first.solved["param"] == "r" and first.solved["value"] == 7
    assert first.solved["within_tolerance"] is True
    assert second.ran is None and second.error == "keep=7.0 is above its range"
    assert config.matched == {"unit": "percent", "value": 50.0, "tolerance_percent": 1.0}
    assert config.grid_layers == [0, 3]
    assert ComparisonConfig.from_json(config.to_json()) == config
    unmatched = comparison_config(
        model, images, columns, layer=3, view="depth", grid_layers=[], target=None, metric="cka"
    )
    assert unmatched.matched is None and json.loads(unmatched.to_json())["metric"] == "cka"


# --------------------------------------------------------------------------- tables


def test_summary_table_rows_labels_and_caption(one, batch_of_three):
    good = [column(0, "tome", one, seconds=0.02, device="cpu"), column(2, "topk", one)]
    batch = BatchRuns(batch_of_three["none"], {0: batch_of_three["tome"]})
    rows = compare_tables.summary_rows(good, one["none"], batch, [1.0, None])
    assert [r.name for r in rows] == ["A · ToMe", "C · Top-K"]
    assert rows[0].seconds == 0.02 and rows[0].device == "cpu"
    assert rows[0].set_fidelity is not None and rows[1].set_fidelity is None
    assert rows[0].agreement == 1.0 and rows[1].agreement is None
    table = compare_tables.summary_table(good, one["none"], batch, [1.0, 0.25], "iou")
    assert list(table["method"]) == ["A · ToMe", "C · Top-K"]
    assert "top-1 as full (3 images)" in table.columns  # a classifier, three images
    assert table[f"{METRICS['iou'].label} vs A"].tolist() == [1.0, 0.25]
    caption = compare_tables.summary_caption(good, one["none"], 0.5, "cpu", "iou", 3)
    assert "at layer 3, this image" in caption and "500 ms" in caption and "**cpu**" in caption
    assert "over the image set" in compare_tables.summary_caption(
        good, one["none"], 0.5, "cpu", "cka", 3
    )


def test_sentences(one):
    assert (
        compare_tables.images_word(1) == "1 image" and compare_tables.images_word(0) == "0 images"
    )
    assert (
        compare_tables.format_value((3, 6)) == "[3,6]" and compare_tables.format_value(0.6) == "0.6"
    )
    assert compare_tables.format_value(7) == "7"
    within = compare_tables.matched_text(matched(True))
    assert "**set to `r=7`** → 2.000 GMACs (50.0% of full; target 2.000)" in within
    assert "within ±0.040 GMACs" in within
    assert "within" not in compare_tables.matched_text(matched(False))
    ran = Column(1, "none", schedule=Schedule(), result=one["none"])
    columns = [Column(0, "tome", error="x"), ran, Column(2, "evit", error="y")]
    assert compare_tables.left_out_note(columns).startswith(
        "Left out of the summary, the agreement and the grids: column A, column C"
    )
    assert compare_tables.left_out_note([]) == ""


def test_agreement_titles_and_cka_notes():
    assert compare_tables.heatmap_title("iou", 3, "image", 4) == (
        f"{METRICS['iou'].label} at layer 3 (this image)"
    )
    assert compare_tables.heatmap_title("iou", 3, "set", 4).endswith("(mean over 4 images)")
    cka = compare_tables.heatmap_title("cka", 3, "set", 1)
    assert cka.endswith("per pair (features of 1 image)")
    assert compare_tables.cka_note("cka", 1)[0] == "warning"
    kind, text = compare_tables.cka_note("cka", 3)
    assert kind == "caption" and text.startswith("CKA over 3 images is coarse")
    assert compare_tables.cka_note("cka", 5) is None and compare_tables.cka_note("iou", 1) is None


def test_tiles_and_top5(one, test_vit):
    full, tome = one["none"], one["tome"]
    same = compare_tables.gmacs_tile(full, full)
    assert same.delta == "full model" and same.delta_color == "off"
    cheaper = compare_tables.gmacs_tile(tome, full)
    assert cheaper.delta.startswith("-") and cheaper.delta_color == "inverse"
    assert cheaper.value == f"{tome.gmacs:.2f}"
    names = test_vit.class_names()
    top1 = compare_tables.output_tile(full, full, names)
    assert top1.label == "Top-1" and top1.delta == "same as full"
    backbone = dataclass_without_logits(tome)
    cosine = compare_tables.output_tile(backbone, dataclass_without_logits(full), names)
    assert cosine.label == "Feature cosine" and cosine.delta is None
    frame = compare_tables.top5_frame(full, full, names)
    assert len(frame) == 5 and frame["full top-5"].all()
    assert frame["p"].is_monotonic_decreasing


def dataclass_without_logits(result):
    import dataclasses

    return dataclasses.replace(result, logits=None)


def test_score_sentences(one):
    topk, tome = one["topk"].trace, one["tome"].trace
    assert compare_tables.score_range(topk, 2).startswith("Scores from ")
    assert compare_tables.score_range(topk, 1) == ""
    assert compare_tables.no_scores_message(topk, 1) == (
        "No scores at layer 1; scores exist at layer 2."
    )
    assert compare_tables.no_scores_message(tome, 1).startswith("This schedule's methods")


# --------------------------------------------------------------------------- grids


@pytest.mark.parametrize("count", [1, 2, 3])
def test_images_grid_has_a_column_per_method(one, batch_of_three, count, monkeypatch):
    """N good columns: the input and N pictures per row, a row per image; a column whose
    batch failed shows its error in a grey box."""
    names = ["tome", "evit", "topk"][:count]
    good = [column(i, name, one) for i, name in enumerate(names)]
    images = ComparedImages(("a", "b", "c"), ("cat", "dog", "fox"))
    plan = grid_plan("test_vit", ("m",), images, good, "pruned", "mean", 6)
    smalls = [np.full((40, 40, 3), 60 * i, np.uint8) for i in range(3)]
    runs = {i: batch_of_three[name] for i, name in enumerate(names)}
    grid = compare_grids.images_grid(plan, smalls, good, BatchRuns(None, runs), images, 2)
    again = compare_grids.images_grid(plan, smalls, good, BatchRuns(None, runs), images, 2)
    assert np.array_equal(grid, again)
    cell = compare_grids.GRID_CELL
    assert grid.shape[1] >= (count + 1) * cell and grid.shape[1] < (count + 2) * cell + 200
    assert grid.shape[0] >= 3 * cell
    grey = np.all(grid == compare.PLACEHOLDER, axis=-1).sum()
    failed = BatchRuns(None, {**runs, 0: "out of memory"})
    with_note = compare_grids.images_grid(plan, smalls, good, failed, images, 2)
    assert np.all(with_note == compare.PLACEHOLDER, axis=-1).sum() > grey + 2 * cell * cell
    laid_out = []
    real = compare_grids.compose_grid
    monkeypatch.setattr(
        compare_grids,
        "compose_grid",
        lambda cells, *args, **kw: laid_out.append(cells) or real(cells, *args, **kw),
    )
    compare_grids.images_grid(plan, smalls, good, failed, images, 2)
    assert [row[1] for row in laid_out[-1]] == ["out of memory"] * 3  # the error, in words
    assert all(row[0] is small for row, small in zip(laid_out[-1], smalls, strict=True))
    assert compare_grids.images_heading(plan, 2) == f"**3 images × {count} methods**, after layer 2"


def test_layers_grid_has_a_column_per_layer_and_one_for_depth(one, monkeypatch):
    good = [column(0, "tome", one), column(1, "topk", one)]
    images = ComparedImages(("a",), ("cat",))
    base = np.full((40, 40, 3), 128, np.uint8)
    cell = compare_grids.GRID_CELL
    plan = grid_plan("test_vit", ("m",), images, good, "heatmap", "mean", 6)
    three = compare_grids.layers_grid(plan, base, good, "cat", [0, 2, 5])
    assert three.shape[1] >= 3 * cell and three.shape[0] >= 2 * cell
    laid_out = []
    real = compare_grids.compose_grid
    monkeypatch.setattr(
        compare_grids,
        "compose_grid",
        lambda cells, rows, columns, **kw: (
            laid_out.append((cells, rows, columns, kw)) or real(cells, rows, columns, **kw)
        ),
    )
    compare_grids.layers_grid(plan, base, good, "cat", [0, 2, 5])
    cells, rows, columns, options = laid_out[-1]
    assert rows == ["A · ToMe", "B · Top-K"] and columns == ["layer 0", "layer 2", "layer 5"]
    assert options["title"] == "test_vit · cat · Importance"
    # ToMe scores nothing, Top-K only at layer 2: notes in grey boxes, not pictures
    assert cells[0] == ["no scores at layer 0", "no scores at layer 2", "no scores at layer 5"]
    assert isinstance(cells[1][1], np.ndarray) and cells[1][0] == "no scores at layer 0"
    depth = grid_plan("test_vit", ("m",), images, good, "depth", "mean", 6)
    compare_grids.layers_grid(depth, base, good, "cat", shown_layers("depth", [0, 2, 5], 6))
    cells, _, columns, _ = laid_out[-1]
    assert columns == ["all layers"] and all(len(row) == 1 for row in cells)
    assert compare_grids.images_heading(depth, 2) == "**1 image × 2 methods**"


def test_run_result_lives_in_records_and_viz_loads_no_engine():
    """Issue 14: the record moved out of the engine; the old import paths still work,
    and drawing a comparison never imports the engine."""
    import subprocess
    import sys

    import analysis
    import analysis.engine
    import analysis.records

    assert analysis.RunResult is analysis.engine.RunResult is analysis.records.RunResult
    code = (
        "import sys; import viz.compare, viz.compare_grids, viz.compare_tables; "
        "sys.exit('analysis.engine' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0
