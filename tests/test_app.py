"""The app's flows, driven headless by Streamlit's AppTest (no browser).

The default model is converted once per test session into a temporary cache, and
``st.cache_resource`` keeps it for every test of the process.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")
TIMEOUT = 180


@pytest.fixture(scope="session", autouse=True)
def tokenscope_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One converted default model per test session, outside the user's cache."""
    path = tmp_path_factory.getbasetemp() / "tokenscope-cache"
    path.mkdir(exist_ok=True)
    previous = os.environ.get("TOKENSCOPE_CACHE")
    os.environ["TOKENSCOPE_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("TOKENSCOPE_CACHE", None)
    else:
        os.environ["TOKENSCOPE_CACHE"] = previous


def start() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def png_bytes(size=(300, 200), mode="RGB") -> bytes:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def metric(at: AppTest, label: str) -> str:
    for element in at.metric:
        if element.label == label:
            return element.value
    raise AssertionError(f"no metric {label!r}: {[m.label for m in at.metric]}")


def texts(at: AppTest) -> str:
    parts = [str(e.value) for e in (*at.markdown, *at.caption, *at.info, *at.error)]
    return "\n".join(parts)


def sidebar_errors(at: AppTest) -> list[str]:
    return [str(e.value) for e in at.sidebar.error]


def test_default_start_shows_everything(tokenscope_cache):
    at = start()
    assert at.title[0].value == "Explore"
    assert at.text_area(key="schedule_text").value == "tome"
    assert float(metric(at, "GMACs")) < 6.2
    assert metric(at, "Feature fidelity")  # the default backbone: cosine to the full model
    assert at.slider(key="layer").value == 11
    assert len(at.get("image")) >= 4  # crop thumbnail, segments, pruned, token depth, ...
    assert len(at.get("plotly_chart")) >= 3  # tokens, GMACs and the trade-off panel
    assert "Where this schedule sits on the trade-off" in [e.label for e in at.expander]
    labels = [b.label for b in at.get("download_button")]
    assert {"Segments PNG", "Pruned PNG", "Token depth PNG", "Trace JSON"} <= set(labels)
    assert "computes no importance scores" in texts(at)  # ToMe has none
    assert "resized to" in texts(at)  # how the image was fitted
    assert "ran on **cpu**" in texts(at)
    assert not at.error and not sidebar_errors(at)


def test_a_learned_methods_own_curve_is_drawn_when_asked(tokenscope_cache):
    """Its curve runs the method at six costs: a schedule change does not wait for it."""
    at = start()
    at.text_area(key="schedule_text").input("dtem:r=16").run()
    assert not at.exception, [e.value for e in at.exception]
    chart = next(c for c in at.get("plotly_chart") if "explore_tradeoff" in str(c.proto.id))
    names = {trace["name"] for trace in json.loads(chart.proto.spec)["data"]}
    assert not any("DTEM" in name for name in names)
    at.button(key="own_curve").click().run()
    assert not at.exception, [e.value for e in at.exception]
    chart = next(c for c in at.get("plotly_chart") if "explore_tradeoff" in str(c.proto.id))
    names = {trace["name"] for trace in json.loads(chart.proto.spec)["data"]}
    assert any("DTEM" in name for name in names), names
    assert not [b for b in at.get("button") if b.key == "own_curve"]


def test_slider_moves_the_views(tokenscope_cache):
    at = start()
    at.slider(key="layer").set_value(3).run()
    assert not at.exception
    assert "After layer 3: **225** tokens" in texts(at)
    at.slider(key="layer").set_value(0).run()
    assert "After layer 0: **249** tokens" in texts(at)


def test_valid_and_invalid_schedules(tokenscope_cache):
    at = start()
    at.text_area(key="schedule_text").input("evit:keep=0.7@3,6,9").run()
    assert not at.exception and not sidebar_errors(at)
    assert float(metric(at, "GMACs")) == pytest.approx(3.99, abs=0.01)
    assert at.selectbox(key="schedule_preset").value == (
        "EViT keep=0.7, at layers 3/6/9 (paper: DeiT-S 3.0 G), 65 % of full"
    )
    at.slider(key="layer").set_value(3).run()
    assert "Importance scores used at layer 3" in texts(at)
    assert "Heatmap PNG" in [b.label for b in at.get("download_button")]

    at.text_area(key="schedule_text").input("evit:keep=7@3").run()
    assert not at.exception
    (message,) = sidebar_errors(at)
    assert "keep=7.0 is above its range" in message
    assert "last valid schedule: `evit:keep=0.7@3,6,9`" in message
    assert float(metric(at, "GMACs")) == pytest.approx(3.99, abs=0.01)  # outputs still there

    at.text_area(key="schedule_text").input("tome:r=8@20").run()
    assert "beyond" in sidebar_errors(at)[0]
    at.text_area(key="schedule_text").input("nonsense").run()
    assert "unknown method 'nonsense'" in sidebar_errors(at)[0]
    assert len(at.get("image")) >= 4


def test_preset_rewrites_the_text(tokenscope_cache):
    at = start()
    title = "Top-K keep=0.7, at layers 3/6/9 (Haurum et al.: EViT's stages), 65 % of full"
    at.selectbox(key="schedule_preset").set_value(title).run()
    assert at.text_area(key="schedule_text").value == "topk@3,6,9"
    assert not sidebar_errors(at)
    at.selectbox(key="schedule_preset").set_value("None (full model)").run()
    assert at.text_area(key="schedule_text").value == "none"
    assert metric(at, "Feature fidelity") == "1.0000"


def test_explore_opens_where_the_schedule_acts(tokenscope_cache):
    """Issue 14: a schedule at layers 3/6/9 opened on the empty last layer. The slider
    follows a new schedule to its last scored layer until the user moves it; the page
    says which layers have scores, and names DINOv2's artefact for CLS-attention methods."""
    at = start()
    assert at.slider(key="layer").value == 11  # ToMe: no scores, its last layer
    assert "Vision Transformers Need Registers" not in texts(at)
    at.text_area(key="schedule_text").input("evit:keep=0.5@3,6,9").run()
    assert not at.exception
    assert at.slider(key="layer").value == 9
    assert "Heatmap PNG" in [b.label for b in at.get("download_button")]
    assert "Importance scores at layer 3, 6, 9." in texts(at)
    assert "Vision Transformers Need Registers" in texts(at)
    assert at.toggle(key="heatmap_smooth").value is False  # the scores as used, per patch
    at.slider(key="layer").set_value(6).run()
    at.text_area(key="schedule_text").input("topk:keep=0.5@3,6,9").run()
    assert at.slider(key="layer").value == 6  # the user's layer stays


def test_a_panorama_can_be_padded_to_square(tokenscope_cache):
    """Issue 14: a wide image lost most of itself to the centre crop; padding keeps it
    all, and the run, the sidebar and the pictures follow the choice."""
    at = start()
    at.file_uploader(key="upload").upload("pano.png", png_bytes((1200, 100)), "image/png").run()
    assert not at.exception
    assert at.selectbox(key="sample").proto.disabled  # no sample claims to be in use
    warnings = [w.value for w in at.warning]
    assert any("centre crop keeps only 8 %" in w and "Pad to square" in w for w in warnings)
    at.radio(key="fit_mode").set_value("pad").run()
    assert not at.exception and not sidebar_errors(at)
    assert "padded to 1200×1200" in texts(at) and "the model sees 100 %" in texts(at)
    assert not any("centre crop keeps" in w.value for w in at.warning)
    assert len(at.get("image")) >= 4


def test_upload_good_and_corrupt_images(tokenscope_cache):
    at = start()
    at.file_uploader(key="upload").upload("photo.png", png_bytes((300, 200)), "image/png").run()
    assert not at.exception and not sidebar_errors(at)
    assert "300×200 px resized to" in texts(at)
    gmacs = metric(at, "GMACs")

    at.file_uploader(key="upload").clear().upload("broken.png", b"not an image", "image/png").run()
    assert not at.exception
    (message,) = sidebar_errors(at)
    assert "could not read broken.png: it is not an image" in message
    assert "Showing photo.png instead" in message
    assert any("broken.png" in str(e.value) for e in at.main.error)  # where the user looks
    assert "300×200 px resized to" in texts(at)  # the previous image stays
    assert metric(at, "GMACs") == gmacs and len(at.get("image")) >= 4


def encoded(fmt: str, mode: str = "RGB", frames: int = 1) -> bytes:
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).convert(mode)
        for _ in range(frames)
    ]
    buffer = io.BytesIO()
    extra = {"save_all": True, "append_images": images[1:]} if frames > 1 else {}
    images[0].save(buffer, format=fmt, **extra)
    return buffer.getvalue()


UPLOADS = {
    "photo.jpg": lambda: encoded("JPEG"),
    "cmyk.jpg": lambda: encoded("JPEG", "CMYK"),
    "photo.webp": lambda: encoded("WEBP"),
    "photo.bmp": lambda: encoded("BMP"),
    "grey16.tiff": lambda: encoded("TIFF", "I;16"),
    "animated.gif": lambda: encoded("GIF", "P", frames=3),
    "alpha.png": lambda: encoded("PNG", "RGBA"),
    "palette.png": lambda: encoded("PNG", "P"),
    "grey.png": lambda: encoded("PNG", "L"),
}


def test_upload_every_format_and_mode(tokenscope_cache):
    at = start()
    for name, make in UPLOADS.items():
        at.file_uploader(key="upload").clear().upload(name, make()).run()
        assert not at.exception, (name, [e.value for e in at.exception])
        assert not sidebar_errors(at), (name, sidebar_errors(at))
        assert "120×90 px resized to" in texts(at), name


def test_timm_classifier_shows_top5(tokenscope_cache):
    at = start()
    at.radio(key="model_source").set_value("timm model").run()
    at.selectbox(key="timm_name").set_value("deit_tiny_patch16_224").run()
    at.radio(key="timm_weights").set_value("random").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not sidebar_errors(at)
    assert metric(at, "Top-1 (reduced)")
    assert any("full model" in list(frame.value.columns) for frame in at.dataframe)
    assert "deit_tiny_patch16_224, random weights" in texts(at)


def test_offline_hub_is_explained(tokenscope_cache, monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(
        try_to_load_from_cache("timm/deit_tiny_patch16_224.fb_in1k", "model.safetensors"), str
    ):
        pytest.skip("the hub weights are cached here, so the offline path cannot be shown")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = start()
    at.radio(key="model_source").set_value("timm model").run()
    at.selectbox(key="timm_name").set_value("deit_tiny_patch16_224").run()
    assert not at.exception
    message = " ".join(sidebar_errors(at))
    assert (
        "cannot be reached" in message and "Showing the embedded default model instead" in message
    )
    assert metric(at, "Feature fidelity")  # the page still works on the default model


def test_device_choice_is_reported(tokenscope_cache):
    import torch

    at = start()
    at.radio(key="device").set_value("cuda").run()
    assert not at.exception
    if torch.cuda.is_available():
        assert "ran on **cuda" in texts(at)
    else:
        assert "CUDA is not available" in " ".join(str(w.value) for w in at.sidebar.warning)
        assert "ran on **cpu**" in texts(at)
    at.radio(key="device").set_value("cpu").run()
    assert "ran on **cpu**" in texts(at)


def test_run_errors_are_shown_not_raised(tokenscope_cache, monkeypatch):
    import app_pages.common
    from analysis import TokenScopeError

    at = start()

    def out_of_memory(*args, **kwargs):
        raise TokenScopeError("the GPU ran out of memory on a batch of 1 at 224 px")

    monkeypatch.setattr(app_pages.common, "run", out_of_memory)
    at.text_area(key="schedule_text").input("tome:r=3@1").run()  # not cached yet
    assert not at.exception
    assert any("ran out of memory" in str(e.value) for e in at.error)


def provenance_lines(at: AppTest) -> str:
    """The sidebar's "Learned weights in use" list, one method per line."""
    (panel,) = [e for e in at.sidebar.expander if e.label == "Learned weights in use"]
    return "\n".join(str(line.value).split(";")[0] for line in panel.markdown)


def learned_file(model, path: Path, seed: int) -> bytes:
    """A DTEM weights file for ``model`` with fresh modules (the format training writes)."""
    from analysis.learned import backbone_id, init_weights, save_learned

    weights = init_weights(model, ["dtem:r=16"], seed=seed)["dtem"]
    save_learned(path, "dtem", weights.modules, backbone_id(model), command="test")
    return path.read_bytes()


def test_uploaded_reducer_weights_are_used_or_refused(tokenscope_cache, tmp_path):
    from analysis import load_model
    from tests.conftest import tiny

    at = start()
    at.text_area(key="schedule_text").input("dtem:r=16").run()
    shipped = metric(at, "Feature fidelity")
    default = load_model("default")
    data = learned_file(default, tmp_path / "mine.safetensors", seed=123)
    at.file_uploader(key="learned_uploads").upload("mine.safetensors", data).run()
    assert not at.exception and not sidebar_errors(at)
    assert "mine.safetensors: dtem weights in use." in texts(at)
    assert metric(at, "Feature fidelity") != shipped  # other weights, another result
    assert "**DTEM**: mine.safetensors" in provenance_lines(at)
    assert "**LTM**: ltm-default.safetensors" in provenance_lines(at)  # the others stay

    other = learned_file(tiny("vit_small_patch16_224"), tmp_path / "other.safetensors", seed=0)
    at.file_uploader(key="learned_uploads").clear().upload("other.safetensors", other).run()
    assert not at.exception
    (message,) = sidebar_errors(at)
    assert "other.safetensors" in message and "trained on 'vit_small_patch16_224'" in message
    assert metric(at, "Feature fidelity") == shipped  # the shared model kept its weights
    assert "**DTEM**: dtem-default.safetensors" in provenance_lines(at)

    at.file_uploader(key="learned_uploads").clear().upload("junk.safetensors", b"junk").run()
    assert not at.exception
    (message,) = sidebar_errors(at)
    assert "junk.safetensors" in message
    assert metric(at, "Feature fidelity") == shipped


def open_tradeoff(at: AppTest) -> AppTest:
    at.switch_page("app_pages/tradeoff.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Trade-off"
    return at


def wait_for_sweep(at: AppTest, timeout: float = 240.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while at.session_state["sweep_job"].snapshot().running:
        assert time.monotonic() < deadline, "the sweep did not finish in time"
        time.sleep(0.5)
    at.run()
    assert not at.exception, [e.value for e in at.exception]


def test_tradeoff_page_runs_a_small_sweep(tokenscope_cache):
    at = open_tradeoff(start())
    at.number_input(key="sweep_limit").set_value(2)
    at.multiselect(key="sweep_methods").set_value(["tome", "patchmerger"])
    at.number_input(key="sweep_count").set_value(2)
    at.run()
    at.button(key="sweep_run").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    wait_for_sweep(at)
    state = at.session_state["sweep_job"].snapshot()
    assert not state.error, state.error
    methods = [point.method for point in state.points]
    assert methods[0] == "none" and "tome" in methods and "patchmerger" in methods
    assert all(point.num_images == 2 for point in state.points)
    # PatchMerger keeps the token count its weights were trained with.
    assert all("tokens=8" in p.schedule for p in state.points if p.method == "patchmerger")
    assert at.get("plotly_chart"), "no trade-off chart"
    labels = {b.label for b in at.get("download_button")}
    assert {"Results CSV", "Results JSON", "Sweep configuration"} <= labels
    # A second run of the same sweep comes from the cache.
    at.button(key="sweep_run").click()
    at.run()
    wait_for_sweep(at)
    again = at.session_state["sweep_job"].snapshot()
    assert again.points and all(point.cached for point in again.points)
    # The downloaded configuration, uploaded again, reopens the same sweep from the cache.
    import json

    saved = json.dumps(at.session_state["sweep_spec"].to_dict()).encode()
    fresh = open_tradeoff(start())
    fresh.file_uploader(key="sweep_config_upload").upload("sweep.json", saved, "application/json")
    fresh.run()
    fresh.button(key="sweep_run_saved").click()
    fresh.run()
    wait_for_sweep(fresh)
    reopened = fresh.session_state["sweep_job"].snapshot()
    assert [p.schedule for p in reopened.points] == [p.schedule for p in again.points]
    assert all(point.cached for point in reopened.points)


def test_tradeoff_refuses_a_broken_configuration(tokenscope_cache):
    at = open_tradeoff(start())
    at.file_uploader(key="sweep_config_upload").upload(
        "sweep.json", b'{"batch_size": 0}', "application/json"
    )
    at.run()
    assert not at.exception
    assert any("batch_size" in str(e.value) for e in at.error)
    at.file_uploader(key="sweep_config_upload").clear().upload(
        "broken.json", b"not json", "application/json"
    )
    at.run()
    assert any("broken.json is not a JSON file" in str(e.value) for e in at.error)


def test_tradeoff_cancel_keeps_finished_points(tokenscope_cache):
    import time

    at = open_tradeoff(start())
    at.number_input(key="sweep_limit").set_value(3)
    at.multiselect(key="sweep_methods").set_value(["evit"])
    at.number_input(key="sweep_count").set_value(8)
    at.run()
    at.button(key="sweep_run").click()
    at.run()
    job = at.session_state["sweep_job"]
    deadline = time.monotonic() + 120
    while len(job.snapshot().points) < 2:  # the full model and one more
        assert time.monotonic() < deadline and job.snapshot().running
        time.sleep(0.2)
    at.button(key="sweep_cancel").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert job.wait(60)
    state = job.snapshot()
    assert state.cancelled and 2 <= len(state.points) < state.planned
    at.run()
    assert any("Cancelled" in str(w.value) for w in at.warning)
    assert at.get("plotly_chart")


def test_explore_sends_its_schedule_to_figures(tokenscope_cache):
    at = start()
    at.selectbox(key="figure_view").set_value("pruned")
    at.button(key="send_panel").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Figures"
    config = at.session_state["figure_config"]
    assert config.kind == "panel" and config.view == "pruned"
    assert [s.schedule for s in config.schedules] == ["tome"]
    assert {b.label for b in at.get("download_button")} >= {"PDF"}


def test_tradeoff_sends_its_curves_to_figures(tokenscope_cache):
    at = open_tradeoff(start())
    at.number_input(key="sweep_limit").set_value(2)
    at.multiselect(key="sweep_methods").set_value(["tome"])
    at.number_input(key="sweep_count").set_value(2)
    at.run()
    at.button(key="sweep_run").click()
    at.run()
    wait_for_sweep(at)
    at.button(key="sweep_to_figures").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value == "Figures"
    config = at.session_state["figure_config"]
    assert config.kind == "tradeoff"
    assert len(config.tradeoff.results["points"]) >= 2
