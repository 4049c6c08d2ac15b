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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from analysis.errors import CheckpointMismatchError, ModelLoadError, ScheduleError
from analysis.reducers.base import LearnedWeights, ModelFacts

if TYPE_CHECKING:
    from analysis.models import LoadedModel

FORMAT = "tokenscope-learned"
FORMAT_VERSION = "1"
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
INIT_KEYS = "keys"  # train --init keys: DTEM starts from the attention keys (ToMe)
TRAINING_ONLY_PREFIX = "aux."  # module parts used only by training (Cropr's auxiliary head)


# --------------------------------------------------------------------------- training hooks


@dataclass
class TrainContext:
    """What a reducer's ``reduce_train`` may read and add to during one training forward.

    ``aux_loss`` scores an auxiliary prediction against this batch's target (labels or the
    unreduced model's output); reducers append their auxiliary terms to ``losses``.
    ``scratch`` holds state carried from layer to layer within one forward (DTEM's count of
    active tokens).
    """

    aux_loss: Callable[[Tensor], Tensor] | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)

    def add_loss(self, name: str, value: Tensor) -> None:
        self.losses[name] = self.losses[name] + value if name in self.losses else value


class LearnedReducer:
    """Mixin for reducers with a trained module per layer.

    Subclasses set ``module_class`` (built from keyword config) and implement
    :meth:`new_module`. ``bind`` stores this run's module on the (per-run) reducer instance;
    the module itself is never modified.
    """

    module_class: ClassVar[type[nn.Module]]
    name: ClassVar[str]
    label: ClassVar[str]
    default_lr: ClassVar[float] = 1e-3  # AdamW learning rate of `python -m analysis train`

    _module: nn.Module | None = None
    _source: str = ""

    def wants_weights(self) -> bool:
        return True

    def bind(self, weights: LearnedWeights, layer: int) -> None:
        module = weights.modules.get(layer)
        source = weights.metadata.get("source", "the loaded weights")
        if module is None:
            covered = ", ".join(str(i) for i in sorted(weights.modules)) or "none"
            raise ScheduleError(
                f"{self.label}: {source} has no trained module for layer {layer} (it covers "
                f"layers {covered}). Run {self.name} at those layers, or train one for this "
                f"layer: python -m analysis train --schedule '{self.name}@{layer}' ..."
            )
        self.check_module(module, layer, source)
        self._module = module
        self._source = source

    def check_module(self, module: nn.Module, layer: int, source: str) -> None:
        """Refuse a module whose shape does not fit this reducer's parameters."""

    @property
    def module(self) -> nn.Module:
        if self._module is None:
            raise ScheduleError(f"{self.label} needs trained weights; none are bound")
        return self._module

    @classmethod
    def new_module(
        cls, facts: ModelFacts, values: dict[str, Any], aux_out: int = 0
    ) -> nn.Module:  # pragma: no cover - abstract
        """A freshly initialised module for training (``aux_out``: auxiliary head width)."""
        raise NotImplementedError


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
    from analysis.schedule import parse_schedule

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
    from safetensors.torch import save_file

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
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:
        raise ModelLoadError(f"could not read {path.name}: {error}") from None


def load_learned(path: str | Path, model: LoadedModel | None = None) -> LearnedWeights:
    """Read a weights file made by ``python -m analysis train`` or an official checkpoint.

    With ``model``, the file must have been made for that backbone: same name, same
    architecture and the same weights (by fingerprint); otherwise CheckpointMismatchError.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"weights file not found: {path}")
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        return convert_official(path, model)
    from safetensors.torch import load_file

    from analysis.reducers import reducer_class

    method = metadata["method"]
    cls = reducer_class(method)
    if not hasattr(cls, "module_class"):
        raise ModelLoadError(f"{path.name}: {cls.label} has no learned parts to load")
    trained_for = BackboneId(
        metadata["backbone"],
        metadata["backbone_fingerprint"],
        int(metadata["backbone_dim"]),
        int(metadata["backbone_depth"]),
    )
    if model is not None:
        check_backbone(path, cls.label, trained_for, backbone_id(model))
    tensors = load_file(str(path))
    config = json.loads(metadata["module_config"])
    modules: dict[int, nn.Module] = {}
    for layer in json.loads(metadata["layers"]):
        prefix = f"layers.{layer}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        module = cls.module_class(**config)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise CheckpointMismatchError(f"{path.name}, layer {layer}: {error}") from None
        modules[layer] = _frozen(module, model)
    metadata["source"] = path.name
    return LearnedWeights(method=cls.name, modules=modules, metadata=metadata)


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
    from dataclasses import replace

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
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelLoadError(f"could not read checkpoint {path.name}: {error}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path.name} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def convert_official(path: Path, model: LoadedModel | None = None) -> LearnedWeights:
    """Convert an official checkpoint into TokenScope weights (DTEM's metric layers).

    DTEM (movinghoon/DTEM) saves the whole patched model: each block's ``attn.qkv`` is a
    ``DTEMLinear`` with ``qkv_layer`` (the backbone's qkv) and ``metric_layer`` (the
    decoupled metric, ``Linear(D, f)``), possibly under a DDP ``module.`` prefix. We keep
    the metric layers, and check ``qkv_layer`` against the loaded backbone when present.
    """
    from analysis.reducers.dtem import DTEMMetric

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
            f"{path.name} is neither a TokenScope weights file (made by `python -m analysis "
            "train`) nor an official checkpoint we can convert (DTEM: keys "
            "'blocks.N.attn.qkv.metric_layer.weight')"
        )
    if model is not None:
        facts = model.facts
        layers = sorted(metric)
        dim = metric[layers[0]]["weight"].shape[1]
        if dim != facts.dim or layers[-1] >= facts.depth:
            raise CheckpointMismatchError(
                f"{path.name} holds DTEM metric layers for dim {dim} and {layers[-1] + 1}+ "
                f"blocks, but {model.name} has dim {facts.dim} and {facts.depth} blocks"
            )
        for layer, weight in qkv.items():
            ours = model.module.blocks[layer].attn.qkv.weight.detach().cpu().float()
            if weight.shape != ours.shape or not torch.allclose(weight.float(), ours, atol=1e-4):
                raise CheckpointMismatchError(
                    f"{path.name} was trained on another backbone: its block {layer} qkv "
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
