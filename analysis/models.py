"""Loading models for the engine: a backbone and the learned reducers' weights that fit it.

This is the top of model loading. The backbone comes from :mod:`analysis.backbone`, the
weights files are read by :mod:`analysis.learned`; composing them here lets both import
downwards only (reducers <- backbone <- learned <- models). The records and helpers of
the backbone layer are named here too, where callers have always imported them from.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from analysis.backbone import (
    DEFAULT_NAME,
    DataConfig,
    LoadedModel,
    check_supported,
    from_module,
    load_backbone,
    load_checkpoint,
    model_facts,
    timm_data_config,
)
from analysis.errors import ModelLoadError
from analysis.learned import attach, load_learned, shipped_assets


def load_model(
    name: str = DEFAULT_NAME,
    weights: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    img_size: int | None = None,
    learned: Iterable[str | Path] = (),
) -> LoadedModel:
    """Load a model for the engine.

    Args:
        name: ``"default"`` (the embedded DINOv2 ViT-S/14) or any timm ViT name.
        weights: ``"hub"`` (default for names), ``"random"``, or a path to a
            ``.safetensors``/``.pth``/``.pt`` checkpoint.
        device: where the module lives.
        img_size: build the model at another input size (the position grid is resampled).
        learned: weights files for learned reducers (``python -m analysis train`` output or
            an official DTEM checkpoint); each must fit this backbone. The default model
            also gets the files shipped in ``assets/``.
    """
    model = load_backbone(name, weights, device=device, img_size=img_size)
    if name == DEFAULT_NAME:
        model = _with_shipped(model)
    return with_learned(model, *learned) if learned else model


def with_learned(model: LoadedModel, *paths: str | Path) -> LoadedModel:
    """A new LoadedModel with learned-reducer weights added; ``model`` is left as it was.

    A file made for another backbone raises CheckpointMismatchError, saying which.
    """
    return attach(model, [load_learned(path, model) for path in paths])


def _with_shipped(model: LoadedModel) -> LoadedModel:
    """Attach the weights shipped in ``assets/`` for this backbone (skipping misfits)."""
    found = []
    for path in shipped_assets(model):
        try:
            found.append(load_learned(path, model))
        except ModelLoadError as error:
            warnings.warn(f"skipping shipped weights {path.name}: {error}", stacklevel=3)
    return attach(model, found) if found else model


__all__ = [
    "DEFAULT_NAME",
    "DataConfig",
    "LoadedModel",
    "check_supported",
    "from_module",
    "load_checkpoint",
    "load_model",
    "model_facts",
    "timm_data_config",
    "with_learned",
]
