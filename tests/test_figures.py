"""Print figures: configuration, data, drawing, export, the CLI and the Figures page.

Most tests draw the tiny ``test_vit`` (6 layers, 10×10 patches) at a low DPI, so each
figure takes well under a second; the examples in ``examples/`` build on the default model.
"""

from __future__ import annotations

import dataclasses
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pypdf
import pytest
from matplotlib.image import AxesImage
from matplotlib.text import Text
from PIL import Image

from analysis.errors import TokenScopeError
from analysis.figure_config import (
    FigureConfig,
    PrintSettings,
    cost_config,
    image_spec,
    panel_config,
    schedule_label,
    tradeoff_config,
)
from analysis.figure_data import build_figure_data
from analysis.imagesets import SAMPLE_NAMES, pixel_digest, sample_image, sample_name
from viz import figures

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.json"))
SCHEDULES = ["tome:r=4", "evit:keep=0.7@1,3", "topk:keep=0.5@1,3"]
SMALL = PrintSettings(width_in=3.3, dpi=100, font_size=8)


def astronaut():
    return image_spec("sample:astronaut", sample_image("astronaut"), "astronaut")


@pytest.fixture(scope="module")
def panel(test_vit):
    """A methods × layers panel of the tiny model, and its data."""
    config = panel_config(
        test_vit,
        SCHEDULES,
        [astronaut()],
        view="segments",
        layers=[1, 3, 5],
        print_settings=SMALL,
    )
    return config, build_figure_data(config, model=test_vit)


@pytest.fixture(scope="module")
def tradeoff_results() -> dict:
    return json.loads((ROOT / "examples" / "tradeoff.json").read_text())["tradeoff"]["results"]


def pdf_fonts(reader: pypdf.PdfReader) -> list[dict]:
    """Every font dictionary of every page, descendant (CID) fonts included."""
    found = []
    for page in reader.pages:
        fonts = page["/Resources"].get("/Font", {})
        for ref in fonts.values():
            font = ref.get_object()
            found.append(font)
            for child in font.get("/DescendantFonts", []):
                found.append(child.get_object())
    return found


# --------------------------------------------------------------------------- export


def test_pdf_parses_at_the_requested_width_with_embedded_truetype(panel):
    _, data = panel
    payload = figures.figure_bytes(data, "pdf")
    reader = pypdf.PdfReader(io.BytesIO(payload))
    (page,) = reader.pages
    assert float(page.mediabox.width) == pytest.approx(3.3 * 72, abs=0.01)
    fonts = pdf_fonts(reader)
    assert fonts, "the labels are text, so the PDF holds fonts"
    assert not [f for f in fonts if f.get("/Subtype") == "/Type3"]
    assert b"/Type3" not in payload
    described = [f["/FontDescriptor"].get_object() for f in fonts if "/FontDescriptor" in f]
    assert described and all("/FontFile2" in d for d in described)  # TrueType, embedded
    assert b"CreationDate" not in payload


def test_pdf_embeds_each_picture_at_the_print_dpi(panel):
    """A picture is rendered at its cell's size in pixels: never a small raster scaled up."""
    config, data = panel
    figure = figures.draw_figure(data)
    shown = [a for a in figure.findobj(AxesImage) if a.axes.get_label() != figures.COLORBAR_LABEL]
    assert len(shown) == 3 * 3
    for image in shown:
        height, width = image.get_array().shape[:2]
        box = image.axes.get_window_extent()
        assert (width, height) == (round(box.width), round(box.height))
        assert width >= 0.5 * config.print.dpi  # half an inch or more at 100 dpi
    reader = pypdf.PdfReader(io.BytesIO(figures.export(figure, "pdf")))
    objects = reader.pages[0]["/Resources"]["/XObject"].values()
    sizes = {(o.get_object()["/Width"], o.get_object()["/Height"]) for o in objects}
    assert sizes == {(width, height)}


def test_svg_is_xml_with_text_elements(panel):
    _, data = panel
    root = ET.fromstring(figures.figure_bytes(data, "svg"))
    texts = ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "ToMe r=4" in texts and "Layer 3" in texts
    assert float(root.get("width").removesuffix("pt")) == pytest.approx(3.3 * 72, abs=0.01)


@pytest.mark.parametrize(("width", "dpi", "aspect"), [(3.3, 100, 0.75), (6.9, 150, 0.8)])
def test_png_is_width_times_dpi(test_vit, width, dpi, aspect):
    settings = PrintSettings(width_in=width, dpi=dpi, aspect=aspect)
    data = build_figure_data(
        cost_config("tokens", test_vit, SCHEDULES, print_settings=settings), model=test_vit
    )
    image = Image.open(io.BytesIO(figures.figure_bytes(data, "png")))
    assert image.size == (round(width * dpi), round(width * aspect * dpi))


def test_panel_png_height_is_the_grid_when_aspect_is_free(panel):
    _, data = panel
    figure = figures.draw_figure(data)
    image = Image.open(io.BytesIO(figures.export(figure, "png")))
    width_in, height_in = figure.get_size_inches()
    assert image.size == (round(3.3 * 100), round(height_in * 100))
    assert width_in == pytest.approx(3.3, abs=0.01)


def test_same_configuration_same_bytes(test_vit, panel):
    config, _ = panel
    config = config.with_print(caption=True, title="Determinism")
    first = build_figure_data(config, model=test_vit)
    second = build_figure_data(FigureConfig.from_json(config.to_json()), model=test_vit)
    png = [
        np.asarray(Image.open(io.BytesIO(figures.figure_bytes(d, "png")))) for d in (first, second)
    ]
    assert np.array_equal(*png)
    for fmt in ("pdf", "svg"):
        assert figures.figure_bytes(first, fmt) == figures.figure_bytes(second, fmt)


def test_unknown_format_is_refused(panel):
    with pytest.raises(TokenScopeError, match="eps"):
        figures.export(figures.draw_figure(panel[1]), "eps")


# --------------------------------------------------------------------------- drawing


@pytest.mark.parametrize("view", ["heatmap", "depth", "pruned"])
def test_views_carry_their_legend_and_readable_text(test_vit, view):
    config = panel_config(
        test_vit, SCHEDULES[1:], [astronaut()], view=view, layers=[1, 3], print_settings=SMALL
    )
    figure = figures.draw_figure(build_figure_data(config, model=test_vit))
    labels = {t.get_text() for legend in figure.legends for t in legend.get_texts()}
    colorbars = [a for a in figure.axes if a.get_label() == figures.COLORBAR_LABEL]
    if view == "heatmap":
        assert len(colorbars) == 1
    elif view == "depth":
        assert len(colorbars) == 1 and {"never reduced", "dropped"} <= labels
    else:
        assert not colorbars and "dropped" in labels
    assert_legible(figure)


def assert_legible(figure) -> None:
    """Every piece of text, tick labels included, is at least the minimum print size."""
    figures.export(figure, "png")  # ticks exist only once drawn, with the figure's style
    sizes = [t.get_fontsize() for t in figure.findobj(Text) if t.get_text().strip()]
    assert sizes and min(sizes) >= figures.MIN_TEXT_PT


def test_images_by_methods_panel_has_an_input_column(test_vit):
    names = ["astronaut", "coffee"]
    images = [image_spec(f"sample:{n}", sample_image(n)) for n in names]
    config = panel_config(
        test_vit,
        SCHEDULES[:2],
        images,
        view="pruned",
        layers=[3],
        rows="images",
        print_settings=SMALL,
    )
    figure = figures.draw_figure(build_figure_data(config, model=test_vit))
    texts = {t.get_text() for t in figure.texts}
    assert {"Input", "ToMe r=4", "astronaut", "coffee"} <= texts
    assert len(figure.findobj(AxesImage)) == 2 * 3


def test_every_series_differs_in_colour_marker_and_dash(test_vit, tradeoff_results):
    styles = figures.series_styles(6)
    for field in ("color", "marker", "dash", "hatch"):
        values = [repr(getattr(s, field)) for s in styles]
        assert len(set(values)) == 6, field
    data = build_figure_data(tradeoff_config(tradeoff_results))
    axes = figures.draw_figure(data).axes[0]
    curves = [container.lines[0] for container in axes.containers]  # one per method
    drawn = {(line.get_marker(), repr(line.get_linestyle())) for line in curves}
    assert len(drawn) == len(curves) == 2  # ToMe and EViT
    assert "*" in {line.get_marker() for line in axes.get_lines()}  # the full model


def test_tradeoff_axis_without_values_is_refused(tradeoff_results):
    config = tradeoff_config(tradeoff_results, x="images_per_second")
    with pytest.raises(TokenScopeError, match=r"'tradeoff\.x'.*--throughput"):
        build_figure_data(config)


def test_tradeoff_plot_draws_intervals_and_the_full_model(tradeoff_results):
    data = build_figure_data(tradeoff_config(tradeoff_results, metric="feature_cosine"))
    assert data.metric_label == "Feature cosine to full"
    axes = figures.draw_figure(data).axes[0]
    legend = [t.get_text() for t in axes.figure.legends[0].get_texts()]
    assert legend == ["ToMe", "EViT", "Full model"]
    assert axes.collections, "error bars"
    assert "bootstrap" in data.caption


def test_gmacs_bars_are_hatched_and_name_totals(test_vit):
    config = cost_config("gmacs", test_vit, SCHEDULES[:2], print_settings=SMALL)
    figure = figures.draw_figure(build_figure_data(config, model=test_vit))
    hatches = {bar.get_hatch() for bar in figure.axes[0].patches}
    assert len(hatches) == 3  # the full model's plain bars and two hatched methods
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert labels[0].startswith("Full model (") and "GMACs)" in labels[0]
    assert_legible(figure)


def test_caption_names_model_weights_and_images(default_model):
    config = panel_config(
        default_model,
        ["dtem:r=8"],
        [astronaut()],
        view="segments",
        layers=[5],
        print_settings=SMALL,
    )
    assert [f.method for f in config.model.learned] == ["dtem"]
    caption = build_figure_data(config, model=default_model).caption
    assert "DINOv2 ViT-S/14" in caption and config.model.weights_sha256 in caption
    assert "dtem-default.safetensors" in caption and "astronaut" in caption


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("schedule", "label"),
    [
        ("none", "Full model"),
        ("tome", "ToMe r=8"),
        ("tome:r=8", "ToMe r=8"),
        ("evit:keep=0.7@3,6,9", "EViT keep 0.7 @ 3,6,9"),
        ("evit:keep=0.7,fuse=0@3,6,9", "EViT keep 0.7, fuse off @ 3,6,9"),
        ("dtem:r=[15,15,15,14,10,9,8,7,6,5,4,3]", "DTEM r≈9.25 (per layer)"),
        ("tome:r=[6,6,6]@0-2", "ToMe r=6 @ 0-2"),
        ("tome:r=8@0-5;evit@9", "ToMe r=8 @ 0-5 + EViT keep 0.7 @ 9"),
    ],
)
def test_schedule_labels_are_readable(schedule, label):
    assert schedule_label(schedule) == label


def test_app_sample_names_resolve():
    from app_pages.common import SAMPLES

    for name in SAMPLES:
        assert sample_name(name) in SAMPLE_NAMES
    assert pixel_digest(sample_image("chelsea (cat)")) == pixel_digest(sample_image("chelsea"))


# --------------------------------------------------------------------------- bad configurations


def _good() -> dict:
    return {
        "kind": "panel",
        "model": {"name": "test_vit", "weights": "random"},
        "images": ["sample:astronaut"],
        "schedules": ["tome:r=4"],
        "layers": [1],
        "tradeoff": {"results": {"points": [{"schedule": "none"}]}},
    }


def _set(path: str, value):
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        target = data
        for key in parents:
            target = target.setdefault(key, {})
        target[last] = value

    return change


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (_set("kind", "pie"), "'kind'"),
        (_set("print.dpi", 5), "'print.dpi'"),
        (_set("print.width_in", "wide"), "'print.width_in'"),
        (_set("print.font_size", 20), "'print.font_size'"),
        (_set("print.palette", "rainbow"), "'print.palette'"),
        (_set("print.legend", "left"), "'print.legend'"),
        (_set("print.caption", "yes"), "'print.caption'"),
        (_set("print.colour", "red"), "'print.colour'"),
        (_set("colour", "red"), "'colour'"),
        (_set("view", "xray"), "'view'"),
        (_set("rows", "columns"), "'rows'"),
        (_set("layers", [1, -2]), "'layers[1]'"),
        (_set("layers", [1, 2]), "'layers'"),  # rows "images" below
        (_set("schedules", ["tome:r=4", "tome:r=banana"]), "'schedules[1]'"),
        (_set("images", [{"source": ""}]), "'images[0].source'"),
        (_set("model.weights_sha256", 7), "'model.weights_sha256'"),
        (_set("model.learned", [{"sha256": "x"}]), "'model.learned[0].method'"),
        (_set("kind", "tradeoff"), "'tradeoff.results.points[0]'"),
    ],
)
def test_bad_configuration_names_the_field(change, field):
    data = _good()
    change(data)
    if field == "'layers'":
        data["rows"] = "images"
    if data["kind"] != "tradeoff":
        data.pop("tradeoff")
    with pytest.raises(
        TokenScopeError, match=field.replace("[", r"\[").replace("]", r"\]")
    ) as info:
        FigureConfig.from_dict(data)
    assert str(info.value).count("\n") == 0


def test_malformed_json_is_one_clear_error():
    with pytest.raises(TokenScopeError, match=r"not valid JSON: .* line 1"):
        FigureConfig.from_json('{"kind": "panel",')


def test_changed_image_or_weights_are_refused(test_vit, panel, tmp_path):
    config, _ = panel
    moved = dataclasses.replace(config.images[0], sha256="0" * 64)
    with pytest.raises(TokenScopeError, match=r"'images\[0\].sha256'.*changed"):
        build_figure_data(dataclasses.replace(config, images=(moved,)), model=test_vit)
    other = dataclasses.replace(config.model, weights_sha256="feedfacefeedface")
    with pytest.raises(TokenScopeError, match=r"'model\.weights_sha256'"):
        build_figure_data(dataclasses.replace(config, model=other), model=test_vit)
    missing = dataclasses.replace(config.images[0], source=str(tmp_path / "gone.png"))
    with pytest.raises(TokenScopeError, match=r"'images\[0\].source'.*missing"):
        build_figure_data(dataclasses.replace(config, images=(missing,)), model=test_vit)
    deep = dataclasses.replace(config, layers=(1, 9))
    with pytest.raises(TokenScopeError, match=r"'layers\[1\]'.*6 layers"):
        build_figure_data(deep, model=test_vit)


def test_image_file_with_its_hash_rebuilds(test_vit, tmp_path):
    path = tmp_path / "cat.png"
    sample_image("chelsea").save(path)
    config = FigureConfig.from_dict(
        {
            "kind": "panel",
            "model": {"name": "test_vit", "weights": "random"},
            "images": [{"source": "cat.png", "sha256": pixel_digest(sample_image("chelsea"))}],
            "schedules": ["tome:r=4"],
            "layers": [2],
            "print": {"width_in": 3.3, "dpi": 80},
        }
    )
    data = build_figure_data(config, model=test_vit, base=tmp_path)
    assert data.images[0].label == "cat"
    assert data.config.model.weights_sha256  # filled in


def test_missing_font_names_the_field(panel):
    _, data = panel
    settings = dataclasses.replace(data.config.print, font_family="No Such Font")
    broken = dataclasses.replace(data, config=dataclasses.replace(data.config, print=settings))
    with pytest.raises(TokenScopeError, match=r"'print\.font_family'.*No Such Font"):
        figures.draw_figure(broken)


# --------------------------------------------------------------------------- CLI and examples


def test_cli_rebuilds_a_pdf_and_refuses_a_bad_config(tmp_path, capsys):
    from analysis.cli import main

    out = tmp_path / "tradeoff.pdf"
    assert (
        main(["figure", "--config", str(ROOT / "examples" / "tradeoff.json"), "--out", str(out)])
        == 0
    )
    reader = pypdf.PdfReader(out)
    assert float(reader.pages[0].mediabox.width) == pytest.approx(3.3 * 72, abs=0.01)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "panel", "print": {"dpi": 5}}))
    capsys.readouterr()
    assert main(["figure", "--config", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'print.dpi'" in err


def test_cli_output_is_the_same_bytes_in_another_process(tmp_path):
    """What a reader rebuilds elsewhere: separate processes, other hash seeds."""
    import os
    import subprocess
    import sys

    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"figure{seed}.pdf"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        config = str(ROOT / "examples" / "tradeoff.json")
        command = [sys.executable, "-m", "analysis", "figure", "--config", config, "--out"]
        subprocess.run([*command, str(out)], check=True, cwd=ROOT, env=env, capture_output=True)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_builds(path, default_model):
    config = FigureConfig.from_json(path.read_text())
    model = None if config.kind == "tradeoff" else default_model
    data = build_figure_data(config, model=model, base=path.parent)
    assert data.config.to_json() == config.to_json(), "the example records every hash"
    image = Image.open(io.BytesIO(figures.figure_bytes(data, "png")))
    assert image.size[0] == round(config.print.width_in * config.print.dpi)
    shown = path.with_suffix(".png")
    assert shown.is_file(), f"{shown.name}: the README shows it"
    assert Image.open(shown).size == image.size


def test_examples_cover_the_showcase():
    kinds = {(c.kind, c.rows) for c in (FigureConfig.from_json(p.read_text()) for p in EXAMPLES)}
    assert {("panel", "methods"), ("panel", "images"), ("tradeoff", "methods")} <= kinds


# --------------------------------------------------------------------------- the page


def test_figures_page_previews_and_offers_every_download(tradeoff_results):
    from streamlit.testing.v1 import AppTest

    config = tradeoff_config(tradeoff_results)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page("app_pages/figures.py")
    at.session_state["figure_config"] = config
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Figures"
    labels = {b.label for b in at.get("download_button")}
    assert labels == {"PDF", "SVG", "PNG", "Configuration JSON"}
    assert len(at.get("image")) == 1
    captions = " ".join(str(c.value) for c in at.caption)
    assert "3.3 × " in captions and "PNG 990 × " in captions  # one column at 300 dpi
    two = next(o for o in at.sidebar.radio(key="fig_width_preset").options if "Two" in o)
    at.sidebar.radio(key="fig_width_preset").set_value(two).run()
    captions = " ".join(str(c.value) for c in at.caption)
    assert "6.9 × " in captions and "PNG 2070 × " in captions
    broken = json.dumps({"kind": "panel", "print": {"palette": "rainbow"}}).encode()
    at.file_uploader(key="figure_upload").upload("broken.json", broken, "application/json").run()
    assert not at.exception
    assert any("'print.palette'" in str(e.value) for e in at.error)
    assert "6.9 × " in " ".join(str(c.value) for c in at.caption)  # the figure stays


def test_figures_page_draws_a_sent_panel_with_an_uploaded_image(test_vit):
    """What Send to Figures leaves in the session: the config, the model that ran, and
    the images that are not on disk."""
    from streamlit.testing.v1 import AppTest

    from app_pages.figures_link import CONFIG_KEY, IMAGES_KEY, MODEL_KEY, figure_image

    photo = sample_image("coffee")
    spec = figure_image("upload:0123abcd", "my photo.png", photo)
    assert spec.source == "upload:my photo.png" and spec.sha256 == pixel_digest(photo)
    config = panel_config(
        test_vit, SCHEDULES[:2], [spec], view="depth", rows="methods", print_settings=SMALL
    )
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page("app_pages/figures.py")
    at.session_state[CONFIG_KEY] = config
    at.session_state[MODEL_KEY] = test_vit
    at.session_state[IMAGES_KEY] = {spec.source: photo}
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert "token depth" in at.subheader[0].value
    assert len(at.get("image")) == 1
    assert "my photo.png" in " ".join(str(c.value) for c in at.caption)
