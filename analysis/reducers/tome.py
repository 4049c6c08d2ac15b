"""ToMe: bipartite soft matching on the attention keys (Bolya et al., ICLR 2023).

Matches the official code's order of operations: alternate A/B split over the absolute
token index, best B partner per A token, the r best edges merged by size-weighted
average, output [prefix, unmerged A, B]. Unlike the official patch, every prefix token
(CLS, distillation, registers) is protected.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

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
    merge_by_map,
)


def ramp_r(r: int, inflect: float, num_layers: int) -> list[int]:
    """ToMe's ``parse_r`` ramp: inflect=0 is constant, -1 decreases from 2r to 0."""
    if num_layers == 1:
        return [r]
    low = int(r * (1.0 - inflect))
    high = 2 * r - low
    step = (high - low) / (num_layers - 1)
    return [int(low + step * i) for i in range(num_layers)]


def capped_r(r: int, num_tokens: int, num_prefix: int) -> int:
    """The official cap: at most half the unprotected tokens, and no protected A token."""
    num_a = (num_tokens + 1) // 2
    free_a = num_a - (num_prefix + 1) // 2
    return max(0, min(r, (num_tokens - num_prefix) // 2, free_a))


def match_bipartite(metric: Tensor, r: int, num_prefix: int) -> tuple[Tensor, int]:
    """Bipartite soft matching; returns the old->new token map and the new token count.

    ``metric`` is [B, T, F]. Parity is over absolute indices so CLS-first models match the
    official split exactly.
    """
    batch, num_tokens, _ = metric.shape
    device = metric.device
    num_a = (num_tokens + 1) // 2
    num_b = num_tokens // 2
    prefix_a = (num_prefix + 1) // 2
    prefix_b = num_prefix // 2
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    scores[:, :prefix_a, :] = -torch.inf
    scores[:, :, :prefix_b] = -torch.inf

    node_max, node_idx = scores.max(dim=-1)
    edge_order = node_max.argsort(dim=-1, descending=True)
    merged_a = edge_order[:, :r]
    unmerged_a = edge_order[:, r:]
    if num_prefix > 0:  # the official code re-sorts only when there is a class token
        unmerged_a = unmerged_a.sort(dim=-1).values

    num_unmerged = num_a - r
    num_out = num_tokens - r
    new_of_a = torch.empty(batch, num_a, dtype=torch.long, device=device)
    new_of_b = torch.empty(batch, num_b, dtype=torch.long, device=device)

    # Prefix tokens keep their absolute positions; then unmerged A patches, then B patches.
    positions = torch.arange(num_unmerged, device=device)
    unmerged_new = torch.where(
        positions < prefix_a, 2 * positions, num_prefix + positions - prefix_a
    ).expand(batch, -1)
    new_of_a.scatter_(1, unmerged_a, unmerged_new)
    cols = torch.arange(num_b, device=device)
    b_new = torch.where(
        cols < prefix_b, 2 * cols + 1, num_prefix + (num_unmerged - prefix_a) + cols - prefix_b
    )
    new_of_b[:] = b_new
    partner = node_idx.gather(1, merged_a)
    new_of_a.scatter_(1, merged_a, new_of_b.gather(1, partner))

    token_map = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    token_map[:, ::2] = new_of_a
    token_map[:, 1::2] = new_of_b
    return token_map, num_out


class ToMe(Reducer):
    name: ClassVar[str] = "tome"
    label: ClassVar[str] = "ToMe"
    site: ClassVar[Site] = Site.INSIDE
    needs_keys: ClassVar[bool] = True
    proportional_attention: ClassVar[bool] = True
    strength: ClassVar[str] = "r"
    description: ClassVar[str] = "Merge the r most similar token pairs (keys, bipartite matching)"
    params: ClassVar[tuple[Param, ...]] = (
        Param("r", int, 8, 0, 4096, "tokens merged per layer (a list gives r per layer)", True),
        Param("inflect", float, 0.0, -1.0, 1.0, "ramp: 0 constant, -1 decreasing from 2r to 0"),
    )
    paper_settings: ClassVar[tuple[PaperSetting, ...]] = (
        PaperSetting("paper: DeiT-S 3.4 G", {"r": 8}),
        PaperSetting("paper: DeiT-S 2.7 G", {"r": 13}),
    )

    @classmethod
    def expand(cls, values: dict[str, Any], num_layers: int) -> list[dict[str, Any]]:
        r = values["r"]
        if isinstance(r, tuple):
            if len(r) > num_layers:
                raise ScheduleError(
                    f"tome: the r list has {len(r)} values but the part covers {num_layers} layers"
                )
            per_layer = list(r) + [0] * (num_layers - len(r))
        else:
            per_layer = ramp_r(r, values["inflect"], num_layers)
        return [{"r": value, "inflect": 0.0} for value in per_layer]

    def output_tokens(self, num_tokens: int, num_prefix: int) -> int:
        return num_tokens - capped_r(self.values["r"], num_tokens, num_prefix)

    def own_macs(self, num_tokens: int, facts: ModelFacts) -> int:
        if capped_r(self.values["r"], num_tokens, facts.num_prefix) == 0:
            return 0
        head_dim = facts.dim // facts.num_heads
        return ((num_tokens + 1) // 2) * (num_tokens // 2) * head_dim

    def reduce(self, state: TokenState, signals: Signals) -> Reduction:
        r = capped_r(self.values["r"], state.num_tokens, state.num_prefix)
        if r == 0:  # a no-op: the engine computed no signals for it
            return identity_reduction(state)
        assert signals.keys is not None
        token_map, num_out = match_bipartite(signals.keys, r, state.num_prefix)
        x, size = merge_by_map(state, token_map, num_out)
        return Reduction(x=x, size=size, token_map=token_map)
