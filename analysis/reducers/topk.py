"""Top-K: keep the patch tokens the CLS token attends to most, drop the rest."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

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
    prefix_indices,
    select_tokens,
    stage_layers,
    topk_patch_indices,
)


def kept_patches(keep: float, num_patches: int) -> int:
    """EViT's count: ceil(keep * patches), never fewer than one."""
    return max(1, min(num_patches, math.ceil(keep * num_patches)))


class TopK(Reducer):
    name: ClassVar[str] = "topk"
    label: ClassVar[str] = "Top-K"
    site: ClassVar[Site] = Site.INSIDE
    needs_cls_attn: ClassVar[bool] = True
    needs_class_token: ClassVar[bool] = True
    strength: ClassVar[str] = "keep"
    description: ClassVar[str] = "Keep the tokens with the highest CLS attention"
    params: ClassVar[tuple[Param, ...]] = (
        Param("keep", float, 0.7, 0.01, 1.0, "fraction of patch tokens kept"),
    )
    paper_settings: ClassVar[tuple[PaperSetting, ...]] = (
        PaperSetting("Haurum et al.: EViT's stages", {"keep": 0.7}, stage_layers),
    )

    def output_tokens(self, num_tokens: int, num_prefix: int) -> int:
        patches = num_tokens - num_prefix
        return num_prefix + kept_patches(self.values["keep"], patches)

    def reduces(self, num_tokens: int, num_prefix: int) -> bool:
        """Whether any patch is dropped. Not the token count: EViT that drops one patch
        fuses it into a new token, so its count stays the same while it still works."""
        patches = num_tokens - num_prefix
        return kept_patches(self.values["keep"], patches) < patches

    def own_macs(self, num_tokens: int, facts: ModelFacts) -> int:
        """The CLS query row against every key (T·D), which the engine computes beside SDPA
        (which gives no attention weights). EViT's code reads that row off the attention
        map its block builds anyway, so its paper counts nothing here."""
        if not self.reduces(num_tokens, facts.num_prefix):
            return 0
        return num_tokens * facts.dim

    def reduce(self, state: TokenState, signals: Signals) -> Reduction:
        patches = state.num_tokens - state.num_prefix
        keep = kept_patches(self.values["keep"], patches)
        if keep == patches:
            return identity_reduction(state)
        assert signals.cls_attn is not None
        kept = topk_patch_indices(signals.cls_attn, keep, state.num_prefix)
        keep_idx = torch.cat([prefix_indices(state), kept], dim=1)
        reduction = select_tokens(state, keep_idx, scores=_pad_prefix(signals.cls_attn, state))
        return reduction


def _pad_prefix(patch_scores: torch.Tensor, state: TokenState) -> torch.Tensor:
    """Scores over all tokens, NaN for the prefix tokens that are never scored."""
    pad = patch_scores.new_full((patch_scores.shape[0], state.num_prefix), float("nan"))
    return torch.cat([pad, patch_scores], dim=1)
