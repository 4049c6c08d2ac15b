"""Shared fixtures: tiny timm ViTs built in-process (random weights, CPU)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Tests never reach the hub; huggingface_hub reads this once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.models import LoadedModel, from_module  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny(name: str, **overrides) -> LoadedModel:
    """A small random-weight variant of a timm architecture that keeps its family traits."""
    torch.manual_seed(0)
    kwargs = {"pretrained": False, "depth": 4, "img_size": 64}
    kwargs.update(overrides)
    module = timm.create_model(name, **kwargs)
    return from_module(module, name, weights="random")


@pytest.fixture(scope="session")
def test_vit() -> LoadedModel:
    torch.manual_seed(0)
    return from_module(timm.create_model("test_vit", pretrained=False), "test_vit", "random")


@pytest.fixture(scope="session")
def deit_small() -> LoadedModel:
    torch.manual_seed(0)
    module = timm.create_model("deit_small_patch16_224", pretrained=False)
    return from_module(module, "deit_small_patch16_224", "random")


@pytest.fixture(scope="session")
def default_model(tmp_path_factory) -> LoadedModel:
    """The embedded DINOv2 default, converted once into a throwaway cache."""
    from analysis import load_model

    cache = tmp_path_factory.mktemp("tokenscope-cache")
    previous = os.environ.get("TOKENSCOPE_CACHE")
    os.environ["TOKENSCOPE_CACHE"] = str(cache)
    try:
        return load_model("default")
    finally:
        if previous is None:
            os.environ.pop("TOKENSCOPE_CACHE", None)
        else:
            os.environ["TOKENSCOPE_CACHE"] = previous
