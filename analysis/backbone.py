"""Loading backbones: the embedded default, timm hub weights, random weights, or local files.

A :class:`LoadedModel` is read-only once built: the engine never mutates it, so one
instance can serve many concurrent sessions. Learned reducers' weights are added above
this layer (:mod:`analysis.learned`, :func:`analysis.models.load_model`), which is why
nothing here reads a weights file of theirs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.errors import (
    CheckpointMismatchError,
    ModelLoadError,
    ModelTooLargeError,
    OfflineError,
    UnsupportedModelError,
    shorten,
)
from analysis.reducers.base import LearnedWeights, ModelFacts

DEFAULT_NAME = "default"
MAX_NAME_CHARS = 200
MAX_MODEL_GB_ENV = "TOKENSCOPE_MAX_MODEL_GB"  # the largest model an operator allows
HUB_PROBE_TIMEOUT_S = 3.0
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


def load_backbone(
    name: str = DEFAULT_NAME,
    weights: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    img_size: int | None = None,
) -> LoadedModel:
    """The backbone alone, without learned reducers' weights.

    The arguments are those of :func:`analysis.models.load_model`, less ``learned``.
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
    return LoadedModel(name=name, module=module, data_config=data_config, weights=weights_label)


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


def create_timm_model(name: str, **kwargs: Any) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, **kwargs)
    except ModelLoadError:
        raise
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ModelLoadError(
                f"unknown timm model '{shorten(name, 60)}'; see timm.list_models('vit_*') for names"
            ) from None
        if "out of memory" in str(error).lower() or isinstance(error, torch.OutOfMemoryError):
            raise ModelTooLargeError(
                f"{name} does not fit in memory here: {shorten(error, 120)}"
            ) from None
        raise ModelLoadError(f"timm could not build {name}: {shorten(error, 160)}") from None
    except MemoryError:
        raise ModelTooLargeError(f"{name} does not fit in this machine's memory") from None
    except (TypeError, ValueError, AssertionError, KeyError) as error:  # e.g. img_size
        raise ModelLoadError(f"timm could not build {name}: {shorten(error, 160)}") from None


def timm_arguments(name: str, img_size: int | None) -> dict[str, Any]:
    """The extra ``timm.create_model`` arguments for a checked name and input size;
    ModelLoadError for an unknown name or a size outside 16 to 4096 px."""
    import timm

    extra: dict[str, Any] = {}
    if img_size is not None:
        if not 16 <= int(img_size) <= 4096:
            raise ModelLoadError(f"img_size must be 16 to 4096 px, got {img_size}")
        extra["img_size"] = img_size
    if len(name) > MAX_NAME_CHARS or not timm.is_model(name):
        raise ModelLoadError(
            f"unknown timm model '{shorten(name, 60)}'; see timm.list_models('vit_*') for names"
        )
    return extra


def _load_timm(
    name: str, weights: str | Path | None, img_size: int | None
) -> tuple[nn.Module, DataConfig, str]:

    if weights is None:
        weights = "hub"
    extra = timm_arguments(name, img_size)
    check_before_building(name, extra)
    if weights == "hub":
        module = _create_from_hub(name, extra)
        label = "hub"
    elif weights == "random":
        # Seeded, so every process (a torchrun rank, a rerun) builds the same weights and
        # cached sweep points stay valid; the caller's own random stream is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = create_timm_model(name, pretrained=False, **extra)
        label = "random"
    else:
        path = Path(weights)
        module = create_timm_model(name, pretrained=False, **extra)
        load_checkpoint(module, path, name)
        label = str(path)
    return module, timm_data_config(module), label


def check_before_building(name: str, extra: dict[str, Any] | None = None) -> int:
    """Build ``name`` on the meta device (no memory), refuse it when the engine cannot run
    it or its weights do not fit the memory allowed, and return their size in bytes."""
    with torch.device("meta"):
        template = create_timm_model(name, pretrained=False, **(extra or {}))
    check_supported(template, name)
    needed = sum(t.numel() * t.element_size() for t in template.state_dict().values())
    limit, reason = memory_limit()
    if needed > limit:
        count = sum(p.numel() for p in template.parameters())
        raise ModelTooLargeError(
            f"{name} needs about {needed / 2**30:.1f} GiB for its weights ({count / 1e9:.2f} "
            f"billion parameters in fp32), more than {reason} ({limit / 2**30:.1f} GiB). "
            f"Choose a smaller model, or raise {MAX_MODEL_GB_ENV} on a machine with more memory"
        )
    return needed


def memory_limit() -> tuple[int, str]:
    """The most memory a model's weights may take, in bytes, and where that limit comes from:
    ``$TOKENSCOPE_MAX_MODEL_GB``, else half the memory available now."""
    raw = os.environ.get(MAX_MODEL_GB_ENV, "").strip()
    if raw:
        try:
            return int(float(raw) * 2**30), f"the {MAX_MODEL_GB_ENV}={raw} limit"
        except ValueError:
            pass
    available = _available_memory()
    if available is None:
        return 8 * 2**30, "the default limit"
    return available // 2, "half the memory this machine has free"


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def module_bytes(module: nn.Module) -> int:
    """The memory a module's parameters and buffers take."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _create_from_hub(name: str, extra: dict[str, Any]) -> nn.Module:
    """Pretrained weights from the local hub cache when present (no network at all), else
    from the hub after a quick check that it can be reached."""
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import LocalEntryNotFoundError  # type: ignore[no-redef]
    cached = cached_hub_file(name)
    if cached is not None:
        overlay = {"file": cached}
        return create_timm_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **extra)
    host = _hub_host(name)
    if hub_offline() or (host is not None and not reachable(host)):
        raise _offline(name, "offline mode is on" if hub_offline() else f"{host} cannot be reached")
    try:
        return create_timm_model(name, pretrained=True, **extra)
    except (LocalEntryNotFoundError, OSError, ConnectionError) as error:
        raise _offline(name, type(error).__name__) from None


def _offline(name: str, reason: str) -> OfflineError:
    return OfflineError(
        f"could not get pretrained weights for '{name}' from the Hugging Face hub ({reason}). "
        "You seem to be offline with no cached copy. Either connect once so timm can cache "
        "them (HF_HOME sets the cache folder), pass a local checkpoint with weights=PATH, or "
        "use weights='random'.",
        model=name,
    )


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE``)."""
    value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def cached_hub_file(name: str) -> str | None:
    """The hub weights file of ``name`` when the local Hugging Face cache holds it."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:  # an old timm, an unknown tag: let timm itself decide
        return None
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    repo, _, revision = str(repo).partition("@")
    names = [getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"]
    cache = os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None
    )
    for filename in filter(None, names):
        try:
            found = try_to_load_from_cache(
                repo, filename, cache_dir=cache, revision=revision or None
            )
        except Exception:
            continue
        if isinstance(found, str):
            return found
    return None


def _hub_host(name: str) -> str | None:
    """The host timm would download ``name``'s weights from (None: unknown or a proxy)."""
    from urllib.parse import urlparse

    if any(os.environ.get(key) for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return None  # the proxy decides what is reachable
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:
        return None
    if cfg is None:
        return None
    if getattr(cfg, "hf_hub_id", None):
        endpoint = os.environ.get("HF_ENDPOINT")
        if not endpoint:
            try:
                from huggingface_hub import constants

                endpoint = constants.ENDPOINT
            except (ImportError, AttributeError):
                endpoint = "https://huggingface.co"
        return urlparse(endpoint).hostname
    url = getattr(cfg, "url", None)
    return urlparse(url).hostname if url else None


_REACHABLE: dict[str, tuple[float, bool]] = {}


def reachable(host: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host``:443 opens within ``timeout`` (remembered 60 s)."""
    import socket
    import time

    now = time.monotonic()
    known = _REACHABLE.get(host)
    if known is not None and now - known[0] < 60:
        return known[1]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            found = True
    except OSError:
        found = False
    _REACHABLE[host] = (now, found)
    return found


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file (weights only, never pickled code)."""
    name = shorten(path.name, 80)
    try:
        found = path.is_file()
    except OSError:  # a name too long, a loop of links
        found = False
    if not found:
        raise ModelLoadError(f"checkpoint not found: {shorten(path, 120)}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif suffix in {".pth", ".pt", ".bin"}:
            state = _torch_load(path)
        else:
            raise ModelLoadError(
                f"unsupported checkpoint type '{shorten(suffix, 20)}' for {name}; "
                "use .safetensors, .pth or .pt"
            )
    except ModelLoadError:
        raise
    except Exception as error:  # corrupt file, pickled code refused by weights_only, ...
        raise ModelLoadError(f"could not read checkpoint {name}: {shorten(error, 160)}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{name} does not hold a state dict of tensors")
    return state


def _torch_load(path: Path) -> Any:
    """``torch.load`` with weights only, memory-mapped when the file format allows it."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):  # only the legacy (non-zip) format cannot be mapped
            raise
    return torch.load(str(path), map_location="cpu", weights_only=True)


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor names and shapes from a safetensors header, without reading the data
    (None for other formats)."""
    if path.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:
        raise ModelLoadError(
            f"could not read checkpoint {shorten(path.name, 80)}: {shorten(error, 160)}"
        ) from None


def load_checkpoint(module: nn.Module, path: Path, name: str) -> None:
    """Load a checkpoint strictly, naming every key that does not fit.

    A safetensors file is checked from its header first, so one that does not fit is
    refused without reading its tensors."""
    try:
        shapes = checkpoint_shapes(path)
    except ModelLoadError:
        shapes = None  # read_checkpoint below says what is wrong with the file
    if shapes is None:
        state = read_checkpoint(path)
        shapes = {key: tuple(value.shape) for key, value in state.items()}
    else:
        state = None
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong_shape = sorted(
        f"{key} {shapes[key]} vs {expected[key]}"
        for key in set(shapes) & set(expected)
        if shapes[key] != expected[key]
    )
    if missing or unexpected or wrong_shape:
        lines = [f"checkpoint {shorten(path.name, 80)} does not fit {name}:"]
        for title, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", wrong_shape),
        ):
            if keys:
                shown = ", ".join(shorten(key, 80) for key in keys[:8])
                more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                lines.append(f"  {title}: {shown}{more}")
        raise CheckpointMismatchError("\n".join(lines))
    if state is None:
        state = read_checkpoint(path)
    bad = [
        key
        for key, value in state.items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if bad:
        raise CheckpointMismatchError(
            f"checkpoint {shorten(path.name, 80)} holds NaN or infinite values "
            f"({', '.join(shorten(key, 60) for key in bad[:3])}); the weights are broken"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:  # dtypes that cannot be copied, ...
        raise CheckpointMismatchError(
            f"checkpoint {shorten(path.name, 80)} does not fit {name}: {shorten(error, 160)}"
        ) from None
