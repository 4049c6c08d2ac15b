"""Learned reducers' weights: the per-layer modules, how they are trained, saved and loaded.

A learned reducer (DTEM, PatchMerger, Cropr, LTM, MSTM's multi-scale fusion) owns one
small ``nn.Module`` per layer. Those modules live in a :class:`LearnedWeights` on the
:class:`~analysis.models.LoadedModel` (``model.learned[method]``), and the engine hands
each reducer its layer's module through ``bind``. Nothing here mutates a backbone.

A weights file is safetensors: tensors ``layers.{layer}.{key}`` and string metadata that
says what they are for (method, backbone and its fingerprint, schedule, data, steps, loss).
:func:`load_learned` refuses a file made for another backbone. It also reads DTEM's
official checkpoints (``metric_layer`` keys) after key conversion.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from analysis.backbone import LoadedModel
from analysis.errors import CheckpointMismatchError, ModelLoadError, ScheduleError, shorten
from analysis.reducers import reducer_class
from analysis.reducers.base import LearnedWeights
from analysis.reducers.dtem import DTEMMetric
from analysis.reducers.learned_base import LearnedReducer, TrainContext
from analysis.schedule import parse_schedule

# LearnedReducer and TrainContext live with the reducers (they subclass and use them); they
# are named here too, where trainers and tests have always imported them from.

FORMAT = "tokenscope-learned"
FORMAT_VERSION = "1"
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
INIT_KEYS = "keys"  # train --init keys: DTEM starts from the attention keys (ToMe)
TRAINING_ONLY_PREFIX = "aux."  # module parts used only by training (Cropr's auxiliary head)


def module_config(module: nn.Module) -> dict[str, Any]:
    """The keyword arguments a learned module was built with (without training-only parts)."""
    config = dict(getattr(module, "config", {}))
    if "aux_out" in config:
        config["aux_out"] = 0
    return config


def inference_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's tensors that inference needs (training-only heads left out)."""
    return {
        key: value
        for key, value in module.state_dict().items()
        if not key.startswith(TRAINING_ONLY_PREFIX)
    }


def init_weights(
    model: LoadedModel, schedules: Iterable[Any], *, aux_out: int = 0, seed: int | None = 0
) -> dict[str, LearnedWeights]:
    """Fresh (untrained) modules for every learned reducer the schedules run, by method.

    Layers shared by several schedules share one module. ``aux_out`` > 0 adds training-only
    heads (Cropr's auxiliary classifier) of that width.
    """
    if seed is not None:
        torch.manual_seed(seed)
    facts = model.facts
    found: dict[str, LearnedWeights] = {}
    for schedule in schedules:
        for layer, reducer in parse_schedule(schedule).resolve(facts).reducers():
            if not isinstance(reducer, LearnedReducer) or not reducer.wants_weights():
                continue
            weights = found.setdefault(
                reducer.name,
                LearnedWeights(method=reducer.name, metadata={"source": "untrained modules"}),
            )
            if layer not in weights.modules:
                module = reducer.new_module(facts, reducer.values, aux_out)
                weights.modules[layer] = module.to(model.device)
    return found


# --------------------------------------------------------------------------- backbone identity


@dataclass(frozen=True)
class BackboneId:
    """Which backbone a weights file was trained on."""

    name: str
    fingerprint: str
    dim: int
    depth: int

    def describe(self) -> str:
        return f"'{self.name}' (dim {self.dim}, depth {self.depth}, weights {self.fingerprint})"


def fingerprint(module: nn.Module) -> str:
    """A short hash of weights that identify a backbone (patch embedding, last MLP)."""
    digest = hashlib.sha256()
    for tensor in (module.patch_embed.proj.weight, module.blocks[-1].mlp.fc2.weight):
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def backbone_id(model: LoadedModel) -> BackboneId:
    facts = model.facts
    return BackboneId(model.name, fingerprint(model.module), facts.dim, facts.depth)


# --------------------------------------------------------------------------- saving and loading


def save_learned(
    path: str | Path,
    method: str,
    modules: dict[int, nn.Module],
    backbone: BackboneId,
    **info: Any,
) -> Path:
    """Write a method's per-layer modules (inference parts only) with their provenance.

    ``info`` becomes string metadata (schedule, data, steps, loss, command, ...).
    """
    if not modules:
        raise ValueError("no modules to save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer, module in sorted(modules.items()):
        for key, value in inference_state(module).items():
            tensors[f"layers.{layer}.{key}"] = value.detach().float().cpu().contiguous()
    first = modules[min(modules)]
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "backbone": backbone.name,
        "backbone_fingerprint": backbone.fingerprint,
        "backbone_dim": str(backbone.dim),
        "backbone_depth": str(backbone.depth),
        "layers": json.dumps(sorted(modules)),
        "module_config": json.dumps(module_config(first)),
    }
    for key, value in info.items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file ({} for other files)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise ModelLoadError(
            f"could not read {path.name}: it is not a safetensors file, or it is damaged "
            f"({shorten(error, 80)}). Write it again with `python -m analysis train`"
        ) from None
    return {str(key): str(value) for key, value in metadata.items()}


MAX_LAYERS = 1024  # no backbone the engine runs is deeper
MAX_DIM = 16384  # widest embedding a weights file may claim


def load_learned(path: str | Path, model: LoadedModel | None = None) -> LearnedWeights:
    """Read a weights file made by ``python -m analysis train`` or an official checkpoint.

    With ``model``, the file must have been made for that backbone: same name, same
    architecture and the same weights (by fingerprint); otherwise CheckpointMismatchError.
    Every size the file states is checked before anything is allocated (the modules are
    built on the meta device first and must match the file's tensors), and weights that
    are not finite (NaN, infinity) are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {shorten(path.name, 80)}")
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        return convert_official(path, model)
    name = shorten(path.name, 80)
    method = _field(metadata, "method", name)
    try:
        cls = reducer_class(shorten(method, 40))
    except ScheduleError as error:
        raise ModelLoadError(f"{name}: {error}") from None
    if not hasattr(cls, "module_class"):
        raise ModelLoadError(f"{name}: {cls.label} has no learned parts to load")
    trained_for = BackboneId(
        _field(metadata, "backbone", name),
        _field(metadata, "backbone_fingerprint", name),
        _int_field(metadata, "backbone_dim", name, 1, MAX_DIM),
        _int_field(metadata, "backbone_depth", name, 1, MAX_LAYERS),
    )
    if model is not None:
        check_backbone(path, cls.label, trained_for, backbone_id(model))
    config = _json_field(metadata, "module_config", name)
    if not isinstance(config, dict) or not all(
        isinstance(value, (int, float, str, bool)) for value in config.values()
    ):
        raise ModelLoadError(f"{name}: 'module_config' must be an object of numbers and names")
    layers = _json_field(metadata, "layers", name)
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(layer, int) and not isinstance(layer, bool) for layer in layers)
        or len(set(layers)) != len(layers)
        or not all(0 <= layer < trained_for.depth for layer in layers)
    ):
        raise ModelLoadError(
            f"{name}: 'layers' must list distinct layers from 0 to {trained_for.depth - 1} "
            f"(the backbone's depth), got {shorten(metadata['layers'], 60)}"
        )
    if config.get("dim", trained_for.dim) != trained_for.dim:
        raise CheckpointMismatchError(
            f"{name}: its modules are {shorten(config.get('dim'), 20)} wide, but the backbone "
            f"it names is {trained_for.dim} wide; the file is damaged. Train it again"
        )
    if "aux_out" in config:  # a training-only head: never built for inference
        config = {**config, "aux_out": 0}
    template = _meta_module(cls, config, name)
    try:
        tensors = load_file(str(path))
    except Exception as error:
        raise ModelLoadError(
            f"could not read the tensors of {name}: {shorten(error, 80)}"
        ) from None
    modules: dict[int, nn.Module] = {}
    for layer in layers:
        prefix = f"layers.{layer}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        _check_state(state, template, f"{name}, layer {layer}")
        module = cls.module_class(**config)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise CheckpointMismatchError(f"{name}, layer {layer}: {shorten(error, 200)}") from None
        modules[layer] = _frozen(module, model)
    metadata["source"] = path.name
    return LearnedWeights(method=cls.name, modules=modules, metadata=metadata)


def _field(metadata: dict[str, str], key: str, name: str) -> str:
    value = metadata.get(key)
    if not value:
        raise ModelLoadError(
            f"{name} has no '{key}' in its metadata: it was not written by `python -m "
            "analysis train`, or it was damaged. Train the weights again"
        )
    return value


def _int_field(metadata: dict[str, str], key: str, name: str, low: int, high: int) -> int:
    text = _field(metadata, key, name)
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ModelLoadError(
            f"{name}: '{key}' in its metadata must be a whole number from {low} to {high}, "
            f"got {shorten(text, 30)}; the file is damaged. Train the weights again"
        )
    return value


def _json_field(metadata: dict[str, str], key: str, name: str) -> Any:
    text = _field(metadata, key, name)
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ModelLoadError(
            f"{name}: '{key}' in its metadata is not valid JSON ({shorten(text, 40)}); "
            "the file is damaged. Train the weights again"
        ) from None


MAX_MODULE_BYTES = 256 * 2**20  # one reducer module; the largest shipped one is about 600 KB


def _meta_module(cls: type, config: dict[str, Any], name: str) -> nn.Module:
    """The module the file's config describes, built without memory, and its size bounded."""
    try:
        with torch.device("meta"):
            module = cls.module_class(**config)
    except Exception as error:  # unknown keys, wrong types, impossible sizes
        raise ModelLoadError(
            f"{name}: its 'module_config' {shorten(json.dumps(config), 80)} does not describe "
            f"a {cls.label} module ({shorten(error, 80)}); the file is damaged. Train it again"
        ) from None
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    if size > MAX_MODULE_BYTES:
        raise ModelLoadError(
            f"{name}: its 'module_config' asks for modules of {size / 2**20:,.0f} MB each "
            f"(the limit is {MAX_MODULE_BYTES / 2**20:.0f} MB); the file is damaged or not "
            "made for TokenScope"
        )
    return module


def _check_state(state: dict[str, Tensor], template: nn.Module, where: str) -> None:
    """The file's tensors for one module: the template's keys and shapes, finite floats."""
    expected = {key: tuple(value.shape) for key, value in template.state_dict().items()}
    expected = {k: v for k, v in expected.items() if not k.startswith(TRAINING_ONLY_PREFIX)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{key} {tuple(state[key].shape)} instead of {expected[key]}"
        for key in set(state) & set(expected)
        if tuple(state[key].shape) != expected[key]
    )
    if missing or unexpected or wrong:
        problems = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if keys:
                shown = ", ".join(shorten(k, 60) for k in keys[:4])
                more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
                problems.append(f"{title}: {shown}{more}")
        raise CheckpointMismatchError(f"{where} does not fit its module: {'; '.join(problems)}")
    _check_finite(state, where)


def _check_finite(state: dict[str, Tensor], where: str) -> None:
    for key, value in state.items():
        if not value.is_floating_point():
            raise CheckpointMismatchError(
                f"{where}: tensor {shorten(key, 60)} holds {value.dtype} values, not weights"
            )
        if not bool(torch.isfinite(value).all()):
            raise CheckpointMismatchError(
                f"{where}: tensor {shorten(key, 60)} holds NaN or infinite values; these "
                "weights are broken (training diverged?). Train them again"
            )


def provenance(weights: LearnedWeights) -> str:
    """Where a method's weights came from, in one line: what a figure's caption needs."""
    info = weights.metadata
    parts = [info.get("source", "untrained modules")]
    if "converted_from" in info:
        parts.append(f"converted from a {info['converted_from']}")
    if "schedule" in info:
        parts.append(f"trained under {info['schedule']}")
    if "steps" in info:
        kept = info.get("kept_step")
        steps = f"{info['steps']} step" + ("" if info["steps"] == "1" else "s")
        if kept == "0":
            steps += ", kept step 0 (no step beat the start on validation)"
        elif kept not in (None, "", info["steps"]):
            steps += f", kept step {kept} (best on validation)"
        parts.append(steps)
    init = info.get("init")
    if init == INIT_KEYS:
        parts.append("started from the attention keys (ToMe's metric)")
    elif init not in (None, "new modules"):
        parts.append(f"started from {init}")
    if "data" in info:
        parts.append(f"data: {info['data']}")
    if info.get("backbone_frozen") == "no":
        parts.append("backbone tuned too")
    return "; ".join(parts)


def check_backbone(path: Path, label: str, trained: BackboneId, loaded: BackboneId) -> None:
    if trained == loaded:
        return
    if (trained.dim, trained.depth) != (loaded.dim, loaded.depth) or trained.name != loaded.name:
        reason = "another backbone"
    else:
        reason = "the same architecture with other weights"
    raise CheckpointMismatchError(
        f"{path.name} holds {label} weights trained on {trained.describe()}, but the loaded "
        f"model is {loaded.describe()} ({reason}). Load the model it was trained on, or "
        f"train weights for this one: python -m analysis train --model {loaded.name} ..."
    )


def _frozen(module: nn.Module, model: LoadedModel | None) -> nn.Module:
    module = module.eval().requires_grad_(False)
    if model is not None:
        module = module.to(model.device)
    return module


def attach(model: LoadedModel, weights: Iterable[LearnedWeights]) -> LoadedModel:
    """A new LoadedModel with these weights added (replacing the same method's)."""
    learned = dict(model.learned)
    for item in weights:
        learned[item.method] = item
    return replace(model, learned=learned)


def shipped_assets(model: LoadedModel) -> list[Path]:
    """The files in ``assets/`` made for this model's backbone (by name)."""
    found = []
    for path in sorted(ASSETS_DIR.glob("*.safetensors")):
        try:
            metadata = read_metadata(path)
        except ModelLoadError:
            continue
        if metadata.get("format") == FORMAT and metadata.get("backbone") == model.name:
            found.append(path)
    return found


# --------------------------------------------------------------------------- official checkpoints

_DTEM_METRIC = re.compile(r"^(?:module\.)?blocks\.(\d+)\.attn\.qkv\.metric_layer\.(weight|bias)$")
_DTEM_QKV = re.compile(r"^(?:module\.)?blocks\.(\d+)\.attn\.qkv\.qkv_layer\.weight$")


def read_state(path: Path) -> dict[str, Tensor]:
    """A flat state dict from safetensors or a torch file (``.pth``, ``.pth.tar``, ...)."""
    name = shorten(path.name, 80)
    try:
        if path.suffix.lower() == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # damaged file, pickled code refused by weights_only, ...
        raise ModelLoadError(f"could not read checkpoint {name}: {shorten(error, 120)}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{name} does not hold a state dict")
    return {str(k): v for k, v in state.items() if isinstance(v, Tensor)}


def convert_official(path: Path, model: LoadedModel | None = None) -> LearnedWeights:
    """Convert an official checkpoint into TokenScope weights (DTEM's metric layers).

    DTEM (movinghoon/DTEM) saves the whole patched model: each block's ``attn.qkv`` is a
    ``DTEMLinear`` with ``qkv_layer`` (the backbone's qkv) and ``metric_layer`` (the
    decoupled metric, ``Linear(D, f)``), possibly under a DDP ``module.`` prefix. We keep
    the metric layers, and check ``qkv_layer`` against the loaded backbone when present.
    """
    name = shorten(path.name, 80)
    state = read_state(path)
    metric: dict[int, dict[str, Tensor]] = {}
    qkv: dict[int, Tensor] = {}
    for key, value in state.items():
        if match := _DTEM_METRIC.match(key):
            metric.setdefault(int(match.group(1)), {})[match.group(2)] = value
        elif match := _DTEM_QKV.match(key):
            qkv[int(match.group(1))] = value
    if not metric:
        raise ModelLoadError(
            f"{name} is neither a TokenScope weights file (made by `python -m analysis "
            "train`) nor an official checkpoint we can convert (DTEM: keys "
            "'blocks.N.attn.qkv.metric_layer.weight')"
        )
    depth = model.facts.depth if model is not None else MAX_LAYERS
    dims = _check_dtem_metric(metric, name, depth)
    if model is not None:
        facts = model.facts
        dim = dims[0]
        if dim != facts.dim:
            raise CheckpointMismatchError(
                f"{name} holds DTEM metric layers for dim {dim}, but {model.name} has dim "
                f"{facts.dim}. Load the backbone it was trained on (DTEM: the timm DeiT "
                "fb_in1k weights)"
            )
        for layer, weight in qkv.items():
            if layer >= facts.depth:
                raise CheckpointMismatchError(
                    f"{name} has qkv weights for block {layer}, but {model.name} has "
                    f"{facts.depth} blocks: it was trained on another backbone"
                )
            ours = model.module.blocks[layer].attn.qkv.weight.detach().cpu().float()
            if weight.shape != ours.shape or not torch.allclose(weight.float(), ours, atol=1e-4):
                raise CheckpointMismatchError(
                    f"{name} was trained on another backbone: its block {layer} qkv "
                    f"weights differ from those of the loaded {model.name} ({model.weights}). "
                    "Load the backbone it was trained on (DTEM: the timm DeiT fb_in1k weights)."
                )
    modules: dict[int, nn.Module] = {}
    for layer, parts in sorted(metric.items()):
        weight = parts["weight"].float()
        module = DTEMMetric(dim=weight.shape[1], feat_dim=weight.shape[0])
        module.proj.weight.data.copy_(weight)
        if "bias" in parts:
            module.proj.bias.data.copy_(parts["bias"].float())
        else:
            module.proj.bias.data.zero_()
        modules[layer] = _frozen(module, model)
    metadata = {
        "format": "converted",
        "method": "dtem",
        "source": path.name,
        "converted_from": "movinghoon/DTEM checkpoint",
        "backbone": model.name if model is not None else "unknown",
    }
    return LearnedWeights(method="dtem", modules=modules, metadata=metadata)


def _check_dtem_metric(
    metric: dict[int, dict[str, Tensor]], name: str, depth: int
) -> tuple[int, int]:
    """Every metric layer: a finite [f, D] weight (and [f] bias), the same D and f for all,
    at a block the backbone has. Returns (D, f)."""
    dims: set[tuple[int, int]] = set()
    for layer, parts in sorted(metric.items()):
        where = f"{name}, block {layer}"
        if layer >= depth:
            raise CheckpointMismatchError(
                f"{where}: the backbone has {depth} blocks (0-{depth - 1}); this checkpoint "
                "was made for a deeper model"
            )
        weight = parts.get("weight")
        if weight is None or weight.ndim != 2 or min(weight.shape) < 1:
            raise CheckpointMismatchError(
                f"{where}: metric_layer.weight must be a matrix [features, dim], got "
                f"{'none' if weight is None else tuple(weight.shape)}"
            )
        bias = parts.get("bias")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise CheckpointMismatchError(
                f"{where}: metric_layer.bias has shape {tuple(bias.shape)}, but the weight has "
                f"{weight.shape[0]} features"
            )
        if weight.shape[1] > MAX_DIM or weight.shape[0] > MAX_DIM:
            raise CheckpointMismatchError(f"{where}: a {tuple(weight.shape)} metric is too large")
        _check_finite(parts, where)
        dims.add((int(weight.shape[1]), int(weight.shape[0])))
    if len(dims) > 1:
        raise CheckpointMismatchError(
            f"{name}: its metric layers have different sizes {sorted(dims)}; the file is damaged"
        )
    return dims.pop()


__all__ = [
    "INIT_KEYS",
    "BackboneId",
    "LearnedReducer",
    "TrainContext",
    "attach",
    "backbone_id",
    "convert_official",
    "fingerprint",
    "init_weights",
    "load_learned",
    "provenance",
    "save_learned",
    "shipped_assets",
]
