"""Bad inputs in the app (issue 13): each shows a message where the user looks, and the
page keeps working; server paths are read only inside folders the operator allows.

Driven headless by Streamlit's AppTest, like tests/test_app.py.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save as safetensors_bytes
from streamlit.testing.v1 import AppTest

from analysis.access import ALLOWED_FOLDERS_ENV

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def start() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def errors(at: AppTest, where: str = "main") -> list[str]:
    found = at.main.error if where == "main" else at.sidebar.error
    return [str(e.value) for e in found]


def encoded(image: Image.Image, fmt: str = "PNG", **extra) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **extra)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width * 3 + 1) * 2)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


BAD_SCHEDULES = [
    ('{"parts": [{"method": "tome", "params": {"r": [[8]]}}]}', "flat list"),
    ('{"parts": [{"method": "tome", "params": [8]}]}', "'params' must be an object"),
    ('{"parts": [{"method": "tome", "layers": 3}]}', "'layers' must be a list"),
    ('{"parts": [], "proportional_attention": "maybe"}', "must be true or false"),
    ("tome@0-99999999", "beyond the model's depth"),
    ("tome:r=8@0;" * 2000, "the limit is 10,000"),
    ("[" * 3000, "nested too deeply"),
    ("tome:r=[[8]]", "flat list of numbers"),
    ("evit:keep=1e400", "must be float"),
    ("dtem:r=8@99", "beyond"),
]


def test_bad_schedules_show_messages_and_keep_the_page(tmp_path):
    at = start()
    for text, message in BAD_SCHEDULES:
        at.text_area(key="schedule_text").input(text).run()
        assert not at.exception, (text[:60], [e.value for e in at.exception])
        shown = errors(at) + errors(at, "sidebar")
        assert any(message in line for line in shown), (text[:60], shown)
        assert all(len(line) < 1200 for line in shown), "a long input was echoed back whole"
        assert at.metric, "the page lost its results"


def test_bad_images_show_messages_and_warnings():
    at = start()
    rng = np.random.default_rng(0)
    photo = encoded(Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)))
    frames = [Image.new("RGB", (64, 64), color) for color in ("red", "blue")]
    cases = [
        ("empty.png", b"", "empty.png is empty (0 bytes)"),
        ("strip.png", encoded(Image.new("L", (1, 30000))), "aspect ratio of 30000:1"),
        ("bomb.png", png_claiming(9000, 9000), "81 megapixels"),
        ("fake.jpg", b"GIF89a not really", "could not read fake.jpg"),
        ("cut.png", photo[:200], "could not read cut.png"),
    ]
    for name, data, message in cases:
        at.file_uploader(key="upload").clear().upload(name, data).run()
        assert not at.exception, (name, [e.value for e in at.exception])
        assert any(message in line for line in errors(at)), (name, errors(at))
        assert "object at 0x" not in " ".join(errors(at))
        assert at.metric, "the previous image stays on screen"
    at.file_uploader(key="upload").clear().upload("tiny.png", encoded(Image.new("RGB", (10, 10))))
    at.run()
    warnings = [str(w.value) for w in at.main.warning]
    assert any("only 10×10 px, smaller than the model's 224 px input" in w for w in warnings)
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    at.file_uploader(key="upload").clear().upload("moving.gif", gif.getvalue()).run()
    assert any("only the first one is used" in str(i.value) for i in at.main.info)


def damaged_weights(tmp_path: Path) -> dict[str, bytes]:
    """Reducer-weights files of the default backbone, each damaged in another way."""
    from safetensors.torch import load_file

    from analysis import load_model
    from analysis.learned import backbone_id, init_weights, read_metadata, save_learned

    model = load_model("default")
    weights = init_weights(model, ["dtem:r=8"], seed=0)["dtem"]
    path = tmp_path / "good.safetensors"
    save_learned(path, "dtem", weights.modules, backbone_id(model), command="test")
    meta, tensors = read_metadata(path), load_file(str(path))
    nan = {k: v.clone() for k, v in tensors.items()}
    nan["layers.0.proj.weight"][0, 0] = float("nan")
    config = json.loads(meta["module_config"]) | {"feat_dim": 3_000_000}
    return {
        "nan.safetensors": safetensors_bytes(nan, metadata=meta),
        "huge.safetensors": safetensors_bytes(
            tensors, metadata=meta | {"module_config": json.dumps(config)}
        ),
        "nometa.safetensors": safetensors_bytes(tensors, metadata={"format": meta["format"]}),
        "layers.safetensors": safetensors_bytes(tensors, metadata=meta | {"layers": "[99]"}),
        "dtem.safetensors": safetensors_bytes({"blocks.0.attn.qkv.metric_layer.bias": nan[
            "layers.0.proj.bias"
        ]}),
    }  # fmt: skip


def test_damaged_reducer_weights_are_refused_with_the_file_name(tmp_path):
    at = start()
    at.text_area(key="schedule_text").input("dtem:r=8").run()
    fidelity = [m.value for m in at.metric if m.label == "Feature fidelity"]
    for name, data in damaged_weights(tmp_path).items():
        at.file_uploader(key="learned_uploads").clear().upload(name, data).run()
        assert not at.exception, (name, [e.value for e in at.exception])
        assert any(name in line for line in errors(at)), (name, errors(at))
        assert [m.value for m in at.metric if m.label == "Feature fidelity"] == fidelity


def checkpoint(arch: str = "deit_tiny_patch16_224", drop: str | None = None) -> bytes:
    torch.manual_seed(0)
    state = timm.create_model(arch, pretrained=False).state_dict()
    if drop:
        state.pop(drop)
    return safetensors_bytes({k: v.contiguous() for k, v in state.items()})


def test_checkpoints_are_uploaded_and_server_paths_are_off(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOWED_FOLDERS_ENV, raising=False)
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(checkpoint())
    at = start()
    at.radio(key="model_source").set_value("Local checkpoint").run()
    at.selectbox(key="ckpt_arch").set_value("deit_tiny_patch16_224").run()
    assert not at.exception
    assert not [t for t in at.text_input if t.key == "ckpt_path"], "a server path box is shown"
    at.file_uploader(key="ckpt_upload").upload("mine.safetensors", checkpoint()).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not errors(at, "sidebar")
    assert "deit_tiny_patch16_224, uploaded mine.safetensors weights" in " ".join(
        str(c.value) for c in at.caption
    )
    at.file_uploader(key="ckpt_upload").clear().upload(
        "short.safetensors", checkpoint(drop="head.weight")
    ).run()
    assert any("short.safetensors does not fit" in line for line in errors(at))
    assert any("missing: head.weight" in line for line in errors(at))


def test_server_paths_only_inside_the_allowed_folders(tmp_path, monkeypatch):
    allowed = tmp_path / "models"
    allowed.mkdir()
    (allowed / "tiny.safetensors").write_bytes(checkpoint())
    (tmp_path / "private.safetensors").write_bytes(checkpoint())
    monkeypatch.setenv(ALLOWED_FOLDERS_ENV, str(allowed))
    at = start()
    at.radio(key="model_source").set_value("Local checkpoint").run()
    at.selectbox(key="ckpt_arch").set_value("deit_tiny_patch16_224").run()
    at.radio(key="ckpt_mode").set_value("Path on the server").run()
    outside = [str(tmp_path / "private.safetensors"), "/etc/passwd", str(allowed / "../x.pt")]
    for path in outside:
        at.text_input(key="ckpt_path").input(path).run()
        assert not at.exception
        (message,) = [line for line in errors(at) if "not inside a folder" in line]
        assert "Showing the embedded default model instead" in message
        assert "does not fit" not in message and "not found" not in message
    at.text_input(key="ckpt_path").input(str(allowed / "tiny.safetensors")).run()
    assert not at.exception and not errors(at, "sidebar"), errors(at, "sidebar")


def test_a_saved_sweep_cannot_name_a_server_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOWED_FOLDERS_ENV, raising=False)
    at = start()
    at.switch_page("app_pages/tradeoff.py")
    at.run()
    config = {"model": "default", "images": str(tmp_path), "methods": [{"base": "tome"}]}
    at.file_uploader(key="sweep_config_upload").upload("sweep.json", json.dumps(config).encode())
    at.run()
    at.button(key="sweep_run_saved").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("reading folders on the server is turned off" in line for line in errors(at))


@pytest.mark.parametrize("offline_model", ["deit_tiny_patch16_224"])
def test_offline_hub_is_worded_for_the_app(offline_model, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    at = start()
    at.radio(key="model_source").set_value("timm model").run()
    at.selectbox(key="timm_name").set_value(offline_model).run()
    assert not at.exception
    (message,) = [line for line in errors(at) if offline_model in line]
    assert "Choose **random** weights" in message and "weights='random'" not in message


def test_compare_columns_keep_bad_schedules_to_themselves():
    at = start()
    at.switch_page("app_pages/compare.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    for text, message in BAD_SCHEDULES[:4]:
        at.text_input(key="compare_schedule_1").input(text).run()
        assert not at.exception, (text[:60], [e.value for e in at.exception])
        assert any(message in line for line in errors(at)), (text[:60], errors(at))
