"""Multi-Scale Token Mergence (Bian et al., arXiv 2306.04897): keep the crucial tokens,
merge the others into them, with multi-scale features fused first.

No code was found; the abstract gives the idea and the rest is our reading (see
docs/methods.md):

* It reduces at blocks 4/7/10 of 12 (0-based 3, 6, 9; depth/4, depth/2, 3·depth/4), its
  default placement when a schedule gives no ``@`` (the paper's stages, as EViT's).
* Importance is the CLS attention of the block, averaged over heads. The ⌈keep·N⌉
  patches with the highest importance are the crucial tokens.
* Each non-crucial token merges, size-weighted, into its most similar crucial token by
  cosine similarity of the attention keys (averaged over heads, as ToMe's metric). Only
  the non-crucial rows of that similarity are computed: (N − K)·K·head_dim MACs.
* Multi-scale fusion (``ms=1``, learned): the image downsampled 2× is patch-embedded with
  the model's own patch embedding and position embedding (a coarse grid of ⌊g/2⌋² tokens);
  a learned ``Linear(D, D)`` (zero at initialisation) maps each coarse token, which is
  then added to the fine tokens it covers, on entering the first block of the part,
  before its attention (the engine's ``enter`` hook), so that the importance, the keys
  and the choice of crucial tokens at that block all see the fused features.
  The training-free core (``ms=0``, the default) needs no weights.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    merge_by_map,
    stage_layers,
)
from analysis.reducers.learned_base import LearnedReducer
from analysis.reducers.topk import kept_patches


class MultiScaleFusion(nn.Module):
    """The learned projection of the coarse tokens (zero-initialised: starts as a no-op)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.config = {"dim": dim}
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, coarse: Tensor) -> Tensor:
        return self.proj(coarse)


def coarse_tokens(module: nn.Module, images: Tensor) -> tuple[Tensor, int, int]:
    """Patch-embed the image at half resolution: tokens [B, gc², D], fine and coarse grids."""
    from timm.layers import resample_abs_pos_embed

    patch_embed = module.patch_embed
    patch = patch_embed.patch_size[0]
    fine = images.shape[-1] // patch
    coarse = max(1, fine // 2)
    small = F.interpolate(
        images, size=(coarse * patch, coarse * patch), mode="bilinear", antialias=True
    )
    x = patch_embed.proj(small).flatten(2).transpose(1, 2)
    x = patch_embed.norm(x)
    pos_embed = module.pos_embed
    if pos_embed is not None:
        prefix = 0 if module.no_embed_class else module.num_prefix_tokens
        grid = resample_abs_pos_embed(
            pos_embed,
            new_size=(coarse, coarse),
            old_size=patch_embed.grid_size,
            num_prefix_tokens=prefix,
        )
        x = x + grid[:, prefix:]
    return x, fine, coarse


class MSTM(LearnedReducer, Reducer):
    name: ClassVar[str] = "mstm"
    label: ClassVar[str] = "MSTM"
    site: ClassVar[Site] = Site.INSIDE
    needs_keys: ClassVar[bool] = True
    needs_cls_attn: ClassVar[bool] = True
    needs_class_token: ClassVar[bool] = True
    proportional_attention: ClassVar[bool] = True
    strength: ClassVar[str] = "keep"
    default_lr: ClassVar[float] = 1e-4  # a D-wide map: Adam's per-weight steps add up fast
    module_class: ClassVar[type[nn.Module]] = MultiScaleFusion
    description: ClassVar[str] = (
        "Keep the tokens with the highest CLS attention, merge each other one into its most "
        "similar kept token; ms=1 fuses a coarse patch grid first (trained weights)"
    )
    params: ClassVar[tuple[Param, ...]] = (
        Param("keep", float, 0.7, 0.01, 1.0, "fraction of patch tokens kept as crucial"),
        Param("ms", bool, False, help="multi-scale fusion before the first reduction (learned)"),
    )
    placement: ClassVar[str] = "blocks 4/7/10 of 12 (0-based 3, 6, 9), as EViT's stages"
    paper_settings: ClassVar[tuple[PaperSetting, ...]] = (
        PaperSetting("paper: DeiT-S at −33 % FLOPs", percent=67.0),
    )

    @classmethod
    def default_layers(cls, depth: int, values: dict[str, Any]) -> tuple[int, ...]:
        return stage_layers(depth)

    _coarse: Tensor | None = None
    _grids: tuple[int, int] = (0, 0)

    @classmethod
    def expand(cls, values: dict[str, Any], num_layers: int) -> list[dict[str, Any]]:
        return [{**values, "first": index == 0} for index in range(num_layers)]

    @classmethod
    def new_module(cls, facts: ModelFacts, values: dict[str, Any], aux_out: int = 0) -> nn.Module:
        return MultiScaleFusion(facts.dim)

    def _fuses(self) -> bool:
        return bool(self.values["ms"]) and bool(self.values.get("first", False))

    def wants_weights(self) -> bool:
        return self._fuses()

    def prepare(self, module: nn.Module, images: Tensor) -> None:
        if self._fuses():
            self._coarse, fine, coarse = coarse_tokens(module, images)
            self._grids = (fine, coarse)

    def output_tokens(self, num_tokens: int, num_prefix: int) -> int:
        return num_prefix + kept_patches(self.values["keep"], num_tokens - num_prefix)

    def own_macs(self, num_tokens: int, facts: ModelFacts) -> int:
        patches = num_tokens - facts.num_prefix
        keep = kept_patches(self.values["keep"], patches)
        macs = 0
        if keep < patches:
            # The CLS attention row, which the engine recomputes beside SDPA (EViT's code
            # reads it off its own attention map), and the non-crucial similarity rows.
            head_dim = facts.dim // facts.num_heads
            macs += num_tokens * facts.dim + (patches - keep) * keep * head_dim
        if self._fuses():
            coarse = max(1, math.isqrt(facts.num_patches) // 2) ** 2
            macs += coarse * facts.in_chans * facts.patch_size**2 * facts.dim  # prepare()
            if patches == facts.num_patches:  # projected and added only onto the full grid
                macs += coarse * facts.dim * facts.dim
        return macs

    def enter(self, state: TokenState) -> TokenState:
        """On entering the block, before its attention: the multi-scale fusion (ms=1, at
        the first layer of the part only)."""
        return self.fuse(state) if self._fuses() else state

    def fuse(self, state: TokenState) -> TokenState:
        """Add the projected coarse tokens to the fine tokens they cover (full grid only)."""
        fine, coarse = self._grids
        prefix = state.num_prefix
        if self._coarse is None or state.num_tokens != prefix + fine * fine:
            return state
        added = self.module(self._coarse.to(state.x.dtype))  # [B, gc², D]
        batch, _, dim = added.shape
        grid = added.transpose(1, 2).reshape(batch, dim, coarse, coarse)
        grid = F.interpolate(grid, size=(fine, fine), mode="nearest")
        added = grid.flatten(2).transpose(1, 2)
        x = torch.cat([state.x[:, :prefix], state.x[:, prefix:] + added], dim=1)
        return TokenState(x, state.size, prefix)

    def reduce(self, state: TokenState, signals: Signals) -> Reduction:
        prefix = state.num_prefix
        patches = state.num_tokens - prefix
        keep = kept_patches(self.values["keep"], patches)
        if keep == patches:  # nothing to merge (the engine computed no signals)
            return identity_reduction(state)
        assert signals.cls_attn is not None and signals.keys is not None
        batch = state.x.shape[0]
        importance = signals.cls_attn.float()
        padded = torch.cat([importance.new_full((batch, prefix), torch.nan), importance], 1)
        crucial = importance.topk(keep, dim=1).indices.sort(dim=1).values  # [B, K]
        is_crucial = torch.zeros_like(importance, dtype=torch.bool).scatter(1, crucial, True)
        others = is_crucial.to(torch.int8).argsort(dim=1, stable=True)[:, : patches - keep]
        keys = F.normalize(signals.keys[:, prefix:].float(), dim=-1)
        dim = keys.shape[-1]
        crucial_keys = keys.gather(1, crucial.unsqueeze(-1).expand(-1, -1, dim))
        other_keys = keys.gather(1, others.unsqueeze(-1).expand(-1, -1, dim))
        nearest = (other_keys @ crucial_keys.transpose(-1, -2)).argmax(dim=-1)  # [B, N - K]
        own = torch.arange(keep, device=nearest.device).expand(batch, -1)
        target = torch.empty_like(importance, dtype=torch.long)
        target = target.scatter(1, crucial, own).scatter(1, others, nearest)
        prefix_map = torch.arange(prefix, device=target.device).expand(batch, -1)
        token_map = torch.cat([prefix_map, target + prefix], dim=1)
        x, size = merge_by_map(state, token_map, prefix + keep)
        return Reduction(x=x, size=size, token_map=token_map, scores=padded)
