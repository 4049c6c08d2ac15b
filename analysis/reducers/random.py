"""Random pruning: keep a seeded random subset of the patch tokens (a sanity baseline)."""

from __future__ import annotations

from typing import ClassVar

import torch

from analysis.reducers.base import (
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
from analysis.reducers.topk import kept_patches


class RandomDrop(Reducer):
    name: ClassVar[str] = "random"
    label: ClassVar[str] = "Random"
    site: ClassVar[Site] = Site.INSIDE
    strength: ClassVar[str] = "keep"
    description: ClassVar[str] = "Keep a seeded random subset of the tokens"
    params: ClassVar[tuple[Param, ...]] = (
        Param("keep", float, 0.7, 0.01, 1.0, "fraction of patch tokens kept"),
        Param("seed", int, 0, 0, 2**31 - 1, "random seed (per layer: seed + layer)"),
    )
    paper_settings: ClassVar[tuple[PaperSetting, ...]] = (
        PaperSetting("Haurum et al.: EViT's stages", {"keep": 0.7}, stage_layers),
    )

    def output_tokens(self, num_tokens: int, num_prefix: int) -> int:
        return num_prefix + kept_patches(self.values["keep"], num_tokens - num_prefix)

    def reduce(self, state: TokenState, signals: Signals) -> Reduction:
        patches = state.num_tokens - state.num_prefix
        keep = kept_patches(self.values["keep"], patches)
        if keep == patches:
            return identity_reduction(state)
        # Drawn on the CPU so that CPU and GPU runs keep the same tokens.
        generator = torch.Generator().manual_seed(self.values["seed"] + signals.layer)
        noise = torch.rand(state.x.shape[0], patches, generator=generator).to(state.x.device)
        kept = topk_patch_indices(noise, keep, state.num_prefix).sort(dim=1).values
        keep_idx = torch.cat([prefix_indices(state), kept], dim=1)
        return select_tokens(state, keep_idx)
