"""Loading weights: local files, mismatching checkpoints, and the offline hub message."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from analysis import CheckpointMismatchError, ModelLoadError, load_model, run

NAME = "test_vit"


@pytest.fixture(scope="module")
def source_state():
    torch.manual_seed(3)
    return timm.create_model(NAME, pretrained=False).state_dict()


def test_safetensors_and_pth_load_the_same_weights(tmp_path, source_state):
    safetensors_path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source_state.items()}, str(safetensors_path))
    pth_path = tmp_path / "w.pth"
    torch.save({"model": source_state}, pth_path)
    images = torch.randn(1, 3, 160, 160)
    from_safetensors = run(load_model(NAME, weights=safetensors_path), images).logits
    from_pth = run(load_model(NAME, weights=str(pth_path)), images).logits
    assert torch.equal(from_safetensors, from_pth)
    random_weights = run(load_model(NAME, weights="random"), images).logits
    assert not torch.allclose(from_safetensors, random_weights)


def test_mismatching_checkpoint_names_the_keys(tmp_path, source_state):
    state = dict(source_state)
    state.pop("head.weight")
    state["extra.weight"] = torch.zeros(2)
    state["pos_embed"] = torch.zeros(1, 5, 64)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointMismatchError) as error:
        load_model(NAME, weights=path)
    message = str(error.value)
    assert "missing: head.weight" in message
    assert "unexpected: extra.weight" in message
    assert "pos_embed (1, 5, 64)" in message


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": object()}, path)
    with pytest.raises(ModelLoadError, match="could not read checkpoint"):
        load_model(NAME, weights=path)


@pytest.mark.parametrize(
    ("weights", "message"),
    [("missing.safetensors", "checkpoint not found"), ("weights.npz", "unsupported checkpoint")],
)
def test_bad_paths_are_clear(tmp_path, weights, message):
    path = tmp_path / weights
    if weights.endswith(".npz"):
        path.write_bytes(b"xx")
    with pytest.raises(ModelLoadError, match=message):
        load_model(NAME, weights=path)


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="unknown timm model 'vit_nonexistent'"):
        load_model("vit_nonexistent", weights="random")


def test_offline_hub_without_cache_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="offline with no cached copy") as error:
        load_model("vit_tiny_patch16_224", weights="hub")
    assert "weights='random'" in str(error.value)


def test_default_model_loads_offline(default_model):
    assert default_model.name == "default"
    assert default_model.facts.depth == 12 and default_model.facts.num_patches == 256
    assert not default_model.is_classifier
