"""PatchMerger: M learned queries pool the patch tokens into M new ones (Renggli et al., 2022).

No official code; from the paper's figure: ``Y = softmax(W · LN(X)ᵀ) · LN(X)``, W is M×D,
the softmax runs over the N input tokens for each of the M outputs, with no 1/√D scale.
It sits between two blocks, once, halfway (after block L/2, so ``@5`` of 12 layers), with
M = 8: that is its default placement, used when a schedule gives no ``@``.

Our readings (docs/methods.md): the prefix tokens are kept aside and pass unchanged, only
the patches are merged (as Haurum et al. did for CLS models). For the trace, each patch
belongs to the output that gives it the largest weight (the argmax over M of its column
of the assignment: the "hard segments"), and an output's size is the number of original
patches so assigned. The soft assignment itself is kept for display. Proportional
attention is off: the outputs are plain averages, not size-weighted merges, and the
paper's models were trained without it.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from analysis.errors import ScheduleError
from analysis.reducers.base import (
    ModelFacts,
    PaperSetting,
    Param,
    Reducer,
    Reduction,
    Signals,
    Site,
    TokenState,
    identity_reduction,
)
from analysis.reducers.learned_base import LearnedReducer


class PatchMergerModule(nn.Module):
    """LayerNorm plus M queries: returns the merged tokens and the assignment [B, M, N]."""

    def __init__(self, dim: int, tokens: int) -> None:
        super().__init__()
        self.config = {"dim": dim, "tokens": tokens}
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(tokens, dim) / math.sqrt(dim))

    def forward(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        normed = self.norm(patches)
        assign = (self.queries.to(normed.dtype) @ normed.transpose(-1, -2)).softmax(dim=-1)
        return assign @ normed, assign


class PatchMerger(LearnedReducer, Reducer):
    name: ClassVar[str] = "patchmerger"
    label: ClassVar[str] = "PatchMerger"
    site: ClassVar[Site] = Site.BETWEEN
    strength: ClassVar[str] = "tokens"
    fixed_by_weights: ClassVar[tuple[str, ...]] = ("tokens",)  # M queries: one M per module
    module_class: ClassVar[type[nn.Module]] = PatchMergerModule
    description: ClassVar[str] = (
        "Pool the patches into M tokens with M learned queries (once, between blocks)"
    )
    params: ClassVar[tuple[Param, ...]] = (
        Param("tokens", int, 8, 1, 4096, "M, the number of output tokens (fixed by training)"),
    )
    placement: ClassVar[str] = "once, after block L/2 (layer 5 of 12)"
    paper_settings: ClassVar[tuple[PaperSetting, ...]] = (
        PaperSetting("paper: M=8 after block L/2", {"tokens": 8}),
    )

    @classmethod
    def default_layers(cls, depth: int, values: dict[str, Any]) -> tuple[int, ...]:
        """After block L/2 (1-based), i.e. between 0-based layers L/2 − 1 and L/2."""
        return (max(0, depth // 2 - 1),)

    @classmethod
    def new_module(cls, facts: ModelFacts, values: dict[str, Any], aux_out: int = 0) -> nn.Module:
        return PatchMergerModule(facts.dim, values["tokens"])

    def check_module(self, module: nn.Module, layer: int, source: str) -> None:
        trained = getattr(module, "config", {}).get("tokens")
        if trained != self.values["tokens"]:
            raise ScheduleError(
                f"PatchMerger: {source} was trained with tokens={trained} at layer {layer}, "
                f"but the schedule asks for tokens={self.values['tokens']}"
            )

    def output_tokens(self, num_tokens: int, num_prefix: int) -> int:
        if num_tokens - num_prefix <= self.values["tokens"]:
            return num_tokens
        return num_prefix + self.values["tokens"]

    def own_macs(self, num_tokens: int, facts: ModelFacts) -> int:
        patches = num_tokens - facts.num_prefix
        if patches <= self.values["tokens"]:
            return 0
        return 2 * self.values["tokens"] * patches * facts.dim  # logits and weighted sum

    def reduce(self, state: TokenState, signals: Signals) -> Reduction:
        prefix = state.num_prefix
        patches = state.num_tokens - prefix
        tokens = self.values["tokens"]
        if patches <= tokens:
            return identity_reduction(state)
        merged, assign = self.module(state.x[:, prefix:])  # [B, M, D], [B, M, N]
        batch = state.x.shape[0]
        device = state.x.device
        owner = assign.argmax(dim=1)  # [B, N]: each patch's output (hard segments)
        token_map = torch.cat(
            [torch.arange(prefix, device=device).expand(batch, -1), owner + prefix], dim=1
        )
        out_size = state.size.new_zeros(batch, tokens).scatter_add_(
            1, owner, state.size[:, prefix:]
        )
        soft = assign.new_zeros(batch, state.num_tokens, prefix + tokens)
        soft[:, :prefix, :prefix] = torch.eye(prefix, device=device, dtype=assign.dtype)
        soft[:, prefix:, prefix:] = assign.transpose(-1, -2)
        return Reduction(
            x=torch.cat([state.x[:, :prefix], merged.to(state.x.dtype)], dim=1),
            size=torch.cat([state.size[:, :prefix], out_size], dim=1),
            token_map=token_map,
            soft_assignment=soft,
        )
