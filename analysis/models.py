"""Loading models: the embedded default, timm hub weights, random weights, or local files.

A :class:`LoadedModel` is read-only once built: the engine never mutates it, so one
instance can serve many concurrent sessions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.errors import CheckpointMismatchError, ModelLoadError, UnsupportedModelError
from analysis.reducers.base import LearnedWeights, ModelFacts

DEFAULT_NAME = "default"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataConfig:
    """How images are prepared for the model (timm's eval transform)."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class LoadedModel:
    name: str
    module: nn.Module
    data_config: DataConfig
    weights: str
    learned: dict[str, LearnedWeights] = field(default_factory=dict)

    @property
    def facts(self) -> ModelFacts:
        return model_facts(self.module, self.name, self.data_config.input_size)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def is_classifier(self) -> bool:
        return getattr(self.module, "num_classes", 0) > 0

    def class_names(self) -> list[str] | None:
        """Human-readable labels for an ImageNet-1k classifier, else None."""
        if getattr(self.module, "num_classes", 0) != 1000:
            return None
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]


def model_facts(module: nn.Module, name: str, input_size: int | None = None) -> ModelFacts:
    """Facts the schedule and FLOP counter need, read off a timm VisionTransformer."""
    block = module.blocks[0]
    patch = module.patch_embed.patch_size
    patch_size = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
    if input_size is None:
        grid = module.patch_embed.grid_size
        num_patches = grid[0] * grid[1]
    else:
        num_patches = (input_size // patch_size) ** 2
    return ModelFacts(
        name=name,
        depth=len(module.blocks),
        dim=module.embed_dim,
        num_heads=block.attn.num_heads,
        num_prefix=module.num_prefix_tokens,
        has_class_token=module.cls_token is not None,
        num_patches=num_patches,
        mlp_hidden=block.mlp.fc1.out_features,
        patch_size=patch_size,
        in_chans=module.patch_embed.proj.in_channels,
        num_classes=getattr(module, "num_classes", 0),
    )


def check_supported(module: nn.Module, name: str) -> None:
    """Refuse models whose blocks the engine cannot run exactly."""
    from timm.layers.attention import Attention
    from timm.layers.mlp import Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(module, VisionTransformer):
        raise UnsupportedModelError(
            f"{name} is a {type(module).__name__}, not a timm VisionTransformer; "
            "TokenScope runs plain ViT blocks only"
        )
    for index, block in enumerate(module.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise UnsupportedModelError(
                f"{name}: block {index} is a {type(block).__name__} with "
                f"{type(getattr(block, 'attn', None)).__name__} attention; the engine runs "
                "timm's standard Block/Attention only, so it cannot run this model exactly"
            )
        if getattr(block.attn, "gate", None) is not None:
            raise UnsupportedModelError(f"{name}: gated attention is not supported")
        if type(block.mlp) is not Mlp:
            raise UnsupportedModelError(
                f"{name}: block {index} uses a {type(block.mlp).__name__} MLP; "
                "only timm's standard Mlp is supported"
            )
    if getattr(module, "patch_embed", None) is None or module.patch_embed.proj is None:
        raise UnsupportedModelError(f"{name}: no convolutional patch embedding")


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
    if name == DEFAULT_NAME:
        module, data_config = _load_default()
        weights_label = "default"
        if weights == "random":
            raise ModelLoadError(
                "the default model has no random-weight form; use a timm name, e.g. "
                "vit_small_patch14_dinov2 with weights='random'"
            )
        if weights not in (None, "default", "hub"):  # e.g. a backbone tuned by `train --unfreeze`
            load_checkpoint(module, Path(weights), name)
            weights_label = str(weights)
    else:
        module, data_config, weights_label = _load_timm(name, weights, img_size)
    check_supported(module, name)
    module = module.eval().requires_grad_(False).to(device)
    model = LoadedModel(name=name, module=module, data_config=data_config, weights=weights_label)
    if name == DEFAULT_NAME:
        model = _with_shipped(model)
    return with_learned(model, *learned) if learned else model


def with_learned(model: LoadedModel, *paths: str | Path) -> LoadedModel:
    """A new LoadedModel with learned-reducer weights added; ``model`` is left as it was.

    A file made for another backbone raises CheckpointMismatchError, saying which.
    """
    from analysis.learned import attach, load_learned

    return attach(model, [load_learned(path, model) for path in paths])


def _with_shipped(model: LoadedModel) -> LoadedModel:
    """Attach the weights shipped in ``assets/`` for this backbone (skipping misfits)."""
    import warnings

    from analysis.learned import attach, load_learned, shipped_assets

    found = []
    for path in shipped_assets(model):
        try:
            found.append(load_learned(path, model))
        except ModelLoadError as error:
            warnings.warn(f"skipping shipped weights {path.name}: {error}", stacklevel=3)
    return attach(model, found) if found else model


def from_module(module: nn.Module, name: str, weights: str = "in-memory") -> LoadedModel:
    """Wrap a timm ViT built elsewhere (a notebook, a test) for the engine."""
    check_supported(module, name)
    return LoadedModel(
        name=name,
        module=module.eval().requires_grad_(False),
        data_config=timm_data_config(module),
        weights=weights,
    )


def timm_data_config(module: nn.Module) -> DataConfig:
    """timm's eval preprocessing for a model, as a small record."""
    import timm

    config = timm.data.resolve_data_config({}, model=module)
    return DataConfig(
        input_size=int(module.patch_embed.img_size[-1]),  # the built size, not the cfg default
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        crop_pct=float(config.get("crop_pct", 1.0)),
        interpolation=str(config.get("interpolation", "bicubic")),
    )


def _load_default() -> tuple[nn.Module, DataConfig]:
    from analysis.default_model import build_default_model

    module, spec = build_default_model()
    return module, DataConfig(
        input_size=spec.img_size, mean=tuple(spec.mean), std=tuple(spec.std), crop_pct=1.0
    )


def _create(name: str, **kwargs: Any) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ModelLoadError(
                f"unknown timm model '{name}'; see timm.list_models('vit_*') for names"
            ) from None
        raise


def _load_timm(
    name: str, weights: str | Path | None, img_size: int | None
) -> tuple[nn.Module, DataConfig, str]:
    import timm

    if weights is None:
        weights = "hub"
    extra: dict[str, Any] = {}
    if img_size is not None:
        extra["img_size"] = img_size
    if not timm.is_model(name):
        raise ModelLoadError(
            f"unknown timm model '{name}'; see timm.list_models('vit_*') for names"
        )
    if weights == "hub":
        module = _create_from_hub(name, extra)
        label = "hub"
    elif weights == "random":
        # Seeded, so every process (a torchrun rank, a rerun) builds the same weights and
        # cached sweep points stay valid; the caller's own random stream is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = _create(name, pretrained=False, **extra)
        label = "random"
    else:
        path = Path(weights)
        module = _create(name, pretrained=False, **extra)
        load_checkpoint(module, path, name)
        label = str(path)
    return module, timm_data_config(module), label


def _create_from_hub(name: str, extra: dict[str, Any]) -> nn.Module:
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import LocalEntryNotFoundError  # type: ignore[no-redef]
    try:
        return _create(name, pretrained=True, **extra)
    except (LocalEntryNotFoundError, OSError, ConnectionError) as error:
        raise ModelLoadError(
            f"could not get pretrained weights for '{name}' from the Hugging Face hub "
            f"({type(error).__name__}). You seem to be offline with no cached copy. Either "
            "connect once so timm can cache them (HF_HOME sets the cache folder), pass a local "
            "checkpoint with weights=PATH, or use weights='random'."
        ) from None


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file (weights only, never pickled code)."""
    if not path.exists():
        raise ModelLoadError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif suffix in {".pth", ".pt", ".bin"}:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise ModelLoadError(
                f"unsupported checkpoint type '{suffix}' for {path.name}; "
                "use .safetensors, .pth or .pt"
            )
    except ModelLoadError:
        raise
    except Exception as error:  # corrupt file, pickled code refused by weights_only, ...
        raise ModelLoadError(f"could not read checkpoint {path.name}: {error}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path.name} does not hold a state dict of tensors")
    return state


def load_checkpoint(module: nn.Module, path: Path, name: str) -> None:
    """Load a checkpoint strictly, naming every key that does not fit."""
    state = read_checkpoint(path)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        for key in set(state) & set(expected)
        if state[key].shape != expected[key].shape
    )
    if missing or unexpected or wrong_shape:
        lines = [f"checkpoint {path.name} does not fit {name}:"]
        for title, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", wrong_shape),
        ):
            if keys:
                shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointMismatchError("\n".join(lines))
    module.load_state_dict(state, strict=True)
