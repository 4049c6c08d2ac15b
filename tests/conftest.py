"""Shared fixtures: tiny timm ViTs built in-process (random weights, CPU)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Tests never reach the hub (huggingface_hub reads this once, at import), and never touch
# the user's own cache: the default model is converted into a throwaway folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TOKENSCOPE_CACHE"] = tempfile.mkdtemp(prefix="tokenscope-test-cache-")

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
def default_model() -> LoadedModel:
    """The embedded DINOv2 default, converted once into the session's throwaway cache."""
    from analysis import load_model

    return load_model("default")
