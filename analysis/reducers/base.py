"""The one interface every token reducer implements.

A reducer is a small object built from validated parameters. The engine hands it the
current tokens and the signals it asked for (keys, CLS attention, ...), and it returns
a :class:`Reduction`: the new tokens, their sizes, and where every old token went.
Reducers never touch the model; learned ones receive their own weights.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from analysis.errors import ScheduleError


class Site(str, Enum):
    """Where in a layer a reducer runs."""

    INSIDE = "inside"  # after the attention residual, before the MLP
    BETWEEN = "between"  # on the block output, before the next block


MAX_LIST = 1024  # values in a per-layer list (ToMe's r=[...]): one per layer at most


@dataclass(frozen=True)
class Param:
    """A reducer parameter with its type, default and allowed range (inclusive)."""

    name: str
    kind: type
    default: Any
    low: float | None = None
    high: float | None = None
    help: str = ""
    allows_list: bool = False  # ToMe's explicit per-layer r list

    def coerce(self, method: str, value: Any) -> Any:
        """Convert a raw value (text or JSON) to this parameter's type, checking its range."""
        if self.allows_list and isinstance(value, (list, tuple)):
            if len(value) > MAX_LIST:
                raise ScheduleError(
                    f"{method}: the '{self.name}' list has {len(value):,} values; at most "
                    f"{MAX_LIST} (one per layer)"
                )
            return tuple(self._coerce_one(method, item) for item in value)
        return self._coerce_one(method, value)

    def _coerce_one(self, method: str, value: Any) -> Any:
        try:
            if isinstance(value, (list, tuple, dict, set)):
                raise TypeError(value)
            if self.kind is bool:
                if isinstance(value, str):
                    lowered = value.strip().lower()
                    if lowered not in {"0", "1", "true", "false", "yes", "no", "on", "off"}:
                        raise ValueError(value)
                    coerced: Any = lowered in {"1", "true", "yes", "on"}
                elif isinstance(value, (bool, int, float)) and value in (0, 1):
                    coerced = bool(value)
                else:
                    raise ValueError(value)
            elif self.kind is int:
                as_float = float(value)
                if not as_float.is_integer():
                    raise ValueError(value)
                coerced = int(as_float)
            else:
                coerced = float(value)
                if not math.isfinite(coerced):
                    raise ValueError(value)
        except (TypeError, ValueError, OverflowError):
            shown = repr(value)
            shown = shown if len(shown) <= 40 else f"{shown[:39]}…"
            raise ScheduleError(
                f"{method}: parameter '{self.name}' must be {self.kind.__name__}, got {shown}"
            ) from None
        if self.kind is not bool:
            if self.low is not None and coerced < self.low:
                raise ScheduleError(
                    f"{method}: {self.name}={coerced} is below its range [{self.low}, {self.high}]"
                )
            if self.high is not None and coerced > self.high:
                raise ScheduleError(
                    f"{method}: {self.name}={coerced} is above its range [{self.low}, {self.high}]"
                )
        return coerced


def every_layer(depth: int) -> tuple[int, ...]:
    """All layers: ToMe's placement (and the meaning of a schedule part without ``@``)."""
    return tuple(range(depth))


def stage_layers(depth: int) -> tuple[int, ...]:
    """EViT's three stages: blocks 4/7/10 of 12 (0-based 3, 6, 9), i.e. depth/4, depth/2
    and 3·depth/4 for other depths (fewer when they coincide in a shallow model)."""
    return tuple(sorted({depth // 4, depth // 2, (3 * depth) // 4}))


@dataclass(frozen=True)
class PaperSetting:
    """A setting taken from a method's paper or official code, offered as a preset.

    Either explicit parameters, run at ``layers`` (a function of the depth; None: the
    method's default placement), or a cost point: ``percent`` of the full model's GMACs,
    for which the strength is solved on each model (LTM's paper gives only its cost).
    ``note`` is the short label shown in the preset's title; docs/methods.md cites where
    each number comes from.
    """

    note: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    layers: Callable[[int], tuple[int, ...]] | None = None
    percent: float | None = None


@dataclass
class TokenState:
    """Tokens between two steps of the engine: prefix tokens first, then patch tokens."""

    x: Tensor  # [B, T, C]
    size: Tensor  # [B, T], how many original patches each token stands for
    num_prefix: int

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]


@dataclass
class Signals:
    """What the engine computed for a reducer at this site, on request."""

    layer: int
    keys: Tensor | None = None  # [B, T, head_dim]: keys averaged over heads (after k_norm)
    cls_attn: Tensor | None = None  # [B, T - P]: CLS -> token attention, mean over heads
    block_input: Tensor | None = None  # [B, T, C]: norm1(x) of this block (for DTEM)


@dataclass
class Reduction:
    """A reducer's output.

    ``token_map[b, i]`` is the new index of old token ``i``, or -1 when it was dropped.
    ``scores`` are the importance scores the reducer used, over the old tokens, or None.
    """

    x: Tensor
    size: Tensor
    token_map: Tensor
    scores: Tensor | None = None
    soft_assignment: Tensor | None = None  # [B, T_old, T_new] for soft methods, display only
    fused: Tensor | None = None  # [B, T_new] bool: tokens pooling pruned ones (EViT), display


@dataclass(frozen=True)
class ModelFacts:
    """The facts about a model that schedules and reducers are checked against."""

    name: str
    depth: int
    dim: int
    num_heads: int
    num_prefix: int
    has_class_token: bool
    num_patches: int
    mlp_hidden: int
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 0


class Reducer(ABC):
    """Base class: subclasses declare their name, site, parameters and what they need."""

    name: ClassVar[str]
    label: ClassVar[str]
    site: ClassVar[Site]
    params: ClassVar[tuple[Param, ...]] = ()
    needs_keys: ClassVar[bool] = False
    needs_cls_attn: ClassVar[bool] = False
    needs_block_input: ClassVar[bool] = False
    needs_class_token: ClassVar[bool] = False
    proportional_attention: ClassVar[bool] = False
    description: ClassVar[str] = ""
    strength: ClassVar[str | None] = None  # the parameter that sets how much is reduced
    # Parameters a learned reducer's trained modules fix (read from each module's ``config``):
    # the solver and the sweep never move them, only where the method runs.
    fixed_by_weights: ClassVar[tuple[str, ...]] = ()
    # Where the method runs when a schedule part has no ``@`` (see ``default_layers``), in
    # words for the docs and the app, and its paper's settings, offered as presets.
    placement: ClassVar[str] = "every block"
    paper_settings: ClassVar[tuple[PaperSetting, ...]] = ()

    def __init__(self, **values: Any) -> None:
        self.values: dict[str, Any] = dict(values)

    def __repr__(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.values.items())
        return f"{self.name}({args})"

    @classmethod
    def param(cls, name: str) -> Param:
        for spec in cls.params:
            if spec.name == name:
                return spec
        known = ", ".join(p.name for p in cls.params) or "none"
        raise ScheduleError(f"{cls.name}: unknown parameter '{name}' (known: {known})")

    @classmethod
    def validate_params(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults and coerce every value, refusing unknown names."""
        values = {spec.name: spec.default for spec in cls.params}
        for key, value in raw.items():
            values[key] = cls.param(key).coerce(cls.name, value)
        return values

    @classmethod
    def default_layers(cls, depth: int, values: dict[str, Any]) -> tuple[int, ...]:
        """Where the method runs when its schedule part gives no layers: its paper's
        placement (every block unless a subclass says otherwise). ``values`` are the
        part's validated parameters (Cropr's last-layer fusion moves its last module)."""
        return every_layer(depth)

    @classmethod
    def expand(cls, values: dict[str, Any], num_layers: int) -> list[dict[str, Any]]:
        """Per-layer parameter values for a part that covers ``num_layers`` layers."""
        return [dict(values) for _ in range(num_layers)]

    def check_model(self, facts: ModelFacts) -> None:
        """Refuse a model this reducer cannot run on."""
        if self.needs_class_token and not facts.has_class_token:
            raise ScheduleError(
                f"{self.label} scores tokens by CLS attention, but {facts.name} has no class token"
            )

    @abstractmethod
    def output_tokens(self, num_tokens: int, num_prefix: int) -> int:
        """How many tokens leave this reducer, without running it (for analytic FLOPs)."""

    def reduces(self, num_tokens: int, num_prefix: int) -> bool:
        """Whether it changes ``num_tokens`` tokens. The engine computes a reducer's
        signals (the CLS attention row) only when it does, so a no-op costs nothing."""
        return self.output_tokens(num_tokens, num_prefix) != num_tokens

    def own_macs(self, num_tokens: int, facts: ModelFacts) -> int:
        """Multiply-adds the reducer itself spends on ``num_tokens`` input tokens."""
        return 0

    @abstractmethod
    def reduce(self, state: TokenState, signals: Signals) -> Reduction:
        """Reduce the tokens; must keep the prefix tokens first and unchanged."""


@dataclass
class LearnedWeights:
    """Weights a learned reducer needs, keyed by layer, with their provenance."""

    method: str
    modules: dict[int, nn.Module] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def select_tokens(state: TokenState, keep_idx: Tensor, scores: Tensor | None = None) -> Reduction:
    """Keep the tokens at ``keep_idx`` [B, K] (prefix included), in that order; drop the rest."""
    batch, num_tokens, dim = state.x.shape
    x = state.x.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, dim))
    size = state.size.gather(1, keep_idx)
    token_map = torch.full((batch, num_tokens), -1, dtype=torch.long, device=state.x.device)
    new_positions = torch.arange(keep_idx.shape[1], device=state.x.device).expand_as(keep_idx)
    token_map.scatter_(1, keep_idx, new_positions)
    return Reduction(x=x, size=size, token_map=token_map, scores=scores)


def merge_by_map(state: TokenState, token_map: Tensor, num_out: int) -> tuple[Tensor, Tensor]:
    """Size-weighted average of the tokens that ``token_map`` sends to each new index."""
    batch, _, dim = state.x.shape
    work = torch.promote_types(state.x.dtype, torch.float32)  # sums in at least fp32
    size = state.size.to(work)
    index = token_map.unsqueeze(-1).expand(-1, -1, dim)
    weighted = state.x.to(work) * size.unsqueeze(-1)
    summed = weighted.new_zeros(batch, num_out, dim).scatter_add_(1, index, weighted)
    new_size = size.new_zeros(batch, num_out).scatter_add_(1, token_map, size)
    return (summed / new_size.unsqueeze(-1)).to(state.x.dtype), new_size.to(state.size.dtype)


def topk_patch_indices(scores: Tensor, keep: int, num_prefix: int) -> Tensor:
    """Indices (into all tokens) of the ``keep`` best-scoring patch tokens, best first."""
    best = scores.topk(keep, dim=1, largest=True, sorted=True).indices
    return best + num_prefix


def prefix_indices(state: TokenState) -> Tensor:
    batch = state.x.shape[0]
    return torch.arange(state.num_prefix, device=state.x.device).expand(batch, -1)


def identity_reduction(state: TokenState) -> Reduction:
    batch, num_tokens = state.size.shape
    token_map = torch.arange(num_tokens, device=state.x.device).expand(batch, -1).clone()
    return Reduction(x=state.x, size=state.size, token_map=token_map)
