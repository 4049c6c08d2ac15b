"""EViT: keep the attentive tokens, fuse the inattentive ones (Liang et al., ICLR 2022).

As in the official code, the fused token is sum(a_i * x_i) over the dropped tokens with
their CLS attention a_i, *not* renormalised by sum(a_i); kept tokens are ordered by
attention, best first, and the fused token is appended last.
"""

from __future__ import annotations

import torch

from analysis.reducers.base import (
    PaperSetting,
    Param,
    Reduction,
    Signals,
    TokenState,
    identity_reduction,
    prefix_indices,
    select_tokens,
    stage_layers,
    topk_patch_indices,
)
from analysis.reducers.topk import TopK, _pad_prefix, kept_patches


class EViT(TopK):
    name = "evit"
    label = "EViT"
    description = "Keep the tokens with the highest CLS attention, fuse the rest into one"
    params = (
        Param("keep", float, 0.7, 0.01, 1.0, "fraction of patch tokens kept"),
        Param("fuse", bool, True, help="fuse the dropped tokens into one extra token"),
    )
    paper_settings = (
        PaperSetting("paper: DeiT-S 3.0 G", {"keep": 0.7}, stage_layers),
        PaperSetting("paper: DeiT-S 2.3 G", {"keep": 0.5}, stage_layers),
    )

    def output_tokens(self, num_tokens: int, num_prefix: int) -> int:
        patches = num_tokens - num_prefix
        keep = kept_patches(self.values["keep"], patches)
        fused = 1 if self.values["fuse"] and keep < patches else 0
        return num_prefix + keep + fused

    def reduce(self, state: TokenState, signals: Signals) -> Reduction:
        if not self.values["fuse"]:
            return super().reduce(state, signals)
        patches = state.num_tokens - state.num_prefix
        keep = kept_patches(self.values["keep"], patches)
        if keep == patches:
            return identity_reduction(state)
        assert signals.cls_attn is not None
        kept = topk_patch_indices(signals.cls_attn, keep, state.num_prefix)
        keep_idx = torch.cat([prefix_indices(state), kept], dim=1)
        scores = _pad_prefix(signals.cls_attn, state)
        reduction = select_tokens(state, keep_idx, scores=scores)

        dropped = reduction.token_map < 0  # [B, T]; prefix tokens are always kept
        weights = torch.where(dropped, scores.nan_to_num(0.0), 0.0).to(state.x.dtype)
        fused_x = (weights.unsqueeze(-1) * state.x).sum(dim=1, keepdim=True)
        fused_size = (state.size * dropped).sum(dim=1, keepdim=True)
        fused_index = keep_idx.shape[1]
        token_map = torch.where(dropped, fused_index, reduction.token_map)
        fused = torch.zeros(
            token_map.shape[0], fused_index + 1, dtype=torch.bool, device=token_map.device
        )
        fused[:, fused_index] = True  # the trace tells pruned-and-fused from merged by this
        return Reduction(
            x=torch.cat([reduction.x, fused_x], dim=1),
            size=torch.cat([reduction.size, fused_size], dim=1),
            token_map=token_map,
            scores=scores,
            fused=fused,
        )
