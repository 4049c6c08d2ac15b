"""DTEM: token merging on a learned, decoupled metric (Lee & Hong, NeurIPS 2024).

Official code: movinghoon/DTEM. Each block gets an extra ``Linear(D, f)`` applied to
``norm1(x)`` (f = head_dim when D < 1024, else 2·head_dim). Inference is exactly ToMe's
bipartite matching with that metric in place of the keys (all prefix tokens protected),
a size-weighted merge and proportional attention. Training replaces the hard matching by
the paper's soft relaxation (:func:`soft_top_r`, :meth:`DTEM.reduce_train`): top-k2
candidates per A token, temperatures τ1 and τ2, r rounds of a soft top-1 over all edges,
the soft size-weighted merge, and a sort by size; tokens fade rather than leave.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.errors import ScheduleError
from analysis.reducers.base import (
    ModelFacts,
    PaperSetting,
    Param,
    Reduction,
    Signals,
    TokenState,
    identity_reduction,
    merge_by_map,
)
from analysis.reducers.learned_base import LearnedReducer, TrainContext
from analysis.reducers.tome import ToMe, capped_r, match_bipartite


class DTEMMetric(nn.Module):
    """The decoupled metric of one block: ``Linear(D, f)`` on ``norm1(x)``."""

    def __init__(self, dim: int, feat_dim: int) -> None:
        super().__init__()
        self.config = {"dim": dim, "feat_dim": feat_dim}
        self.proj = nn.Linear(dim, feat_dim)

    def forward(self, normed: Tensor) -> Tensor:
        return self.proj(normed)


def metric_from_keys(attn: nn.Module) -> DTEMMetric:
    """A metric layer computing ToMe's metric, the block's keys averaged over heads.

    Training from it (``python -m analysis train --init keys``) starts at ToMe instead of at
    a random projection, so the untrained module is a known baseline. Exact for blocks
    without ``k_norm``; with one, it starts from the keys before their norm.
    """
    dim = attn.qkv.in_features
    heads, head_dim = attn.num_heads, attn.head_dim
    weight = attn.qkv.weight.detach()[dim : 2 * dim].reshape(heads, head_dim, dim).mean(dim=0)
    module = DTEMMetric(dim, head_dim)
    with torch.no_grad():
        module.proj.weight.copy_(weight)
        bias = attn.qkv.bias
        if bias is None:
            module.proj.bias.zero_()
        else:
            module.proj.bias.copy_(bias.detach()[dim : 2 * dim].reshape(heads, head_dim).mean(0))
    return module.to(weight.device)


def default_feat_dim(facts: ModelFacts) -> int:
    head_dim = facts.dim // facts.num_heads
    return head_dim if facts.dim < 1024 else 2 * head_dim


def soft_top_r(scores: Tensor, r: int, k2: int, tau1: float, tau2: float) -> Tensor:
    """DTEM's differentiable top-r over the A×B similarity ``scores`` [B, Na, Nb].

    Each A row keeps its k2 best candidates (scaled by 1/τ1). Then, r times, a softmax over
    all A×k2 edges (temperature τ2) is added to the running assignment, and every row's
    logits are lowered by log(1 − the mass that row just took), so that each A token is
    chosen about once. Row sums are finally clipped to at most 1 (dividing by a detached
    factor, as the official code does). Returns the soft assignment Π [B, Na, Nb].
    """
    eps = torch.finfo(torch.float32).eps
    scores = scores.float()
    batch, num_a, num_b = scores.shape
    k2 = min(k2, num_b)
    values, index = scores.topk(k2, dim=-1)
    logits = values / tau1
    chosen = torch.zeros_like(logits)
    for _ in range(r):
        step = F.softmax(logits.reshape(batch, -1) / tau2, dim=-1).reshape(batch, num_a, k2)
        chosen = chosen + step
        remaining = (1.0 - step.sum(dim=-1, keepdim=True)).clamp(min=eps)
        logits = logits + remaining.log()
    over = (chosen.sum(dim=-1, keepdim=True).detach() - 1.0).clamp(min=0.0) + 1.0
    chosen = chosen / over
    return scores.new_zeros(batch, num_a, num_b).scatter_add(-1, index, chosen)


class DTEM(LearnedReducer, ToMe):
    name: ClassVar[str] = "dtem"
    label: ClassVar[str] = "DTEM"
    needs_keys: ClassVar[bool] = False
    needs_block_input: ClassVar[bool] = True
    proportional_attention: ClassVar[bool] = True
    strength: ClassVar[str] = "r"
    module_class: ClassVar[type[nn.Module]] = DTEMMetric
    description: ClassVar[str] = (
        "Merge the r most similar token pairs on a learned metric (needs trained weights)"
    )
    params: ClassVar[tuple[Param, ...]] = (
        Param("r", int, 16, 0, 4096, "tokens merged per layer (a list gives r per layer)", True),
        Param("inflect", float, 0.0, -1.0, 1.0, "ramp: 0 constant, -1 decreasing from 2r to 0"),
        Param("k2", int, 3, 1, 64, "training only: candidates kept per A token"),
        Param("tau1", float, 0.1, 0.001, 10.0, "training only: similarity temperature"),
        Param("tau2", float, 0.1, 0.001, 10.0, "training only: soft top-r temperature"),
    )
    paper_settings: ClassVar[tuple[PaperSetting, ...]] = (
        PaperSetting("official: r=16", {"r": 16}),
        PaperSetting("paper: DeiT-S at −37.2 % FLOPs", percent=62.8),
    )

    @classmethod
    def expand(cls, values: dict[str, Any], num_layers: int) -> list[dict[str, Any]]:
        extra = {k: v for k, v in values.items() if k not in {"r", "inflect"}}
        return [{**layer, **extra} for layer in ToMe.expand(values, num_layers)]

    @classmethod
    def new_module(cls, facts: ModelFacts, values: dict[str, Any], aux_out: int = 0) -> nn.Module:
        return DTEMMetric(facts.dim, default_feat_dim(facts))

    def check_module(self, module: nn.Module, layer: int, source: str) -> None:
        if not isinstance(module, DTEMMetric):
            raise ScheduleError(f"DTEM: {source} layer {layer} is not a DTEM metric layer")

    def own_macs(self, num_tokens: int, facts: ModelFacts) -> int:
        if capped_r(self.values["r"], num_tokens, facts.num_prefix) == 0:
            return 0
        feat_dim = default_feat_dim(facts)
        if self._module is not None:
            feat_dim = self._module.config["feat_dim"]
        metric = num_tokens * facts.dim * feat_dim
        matching = ((num_tokens + 1) // 2) * (num_tokens // 2) * feat_dim
        return metric + matching

    def metric(self, signals: Signals) -> Tensor:
        assert signals.block_input is not None
        return self.module(signals.block_input)

    def reduce(self, state: TokenState, signals: Signals) -> Reduction:
        r = capped_r(self.values["r"], state.num_tokens, state.num_prefix)
        if r == 0:
            return identity_reduction(state)
        token_map, num_out = match_bipartite(self.metric(signals).float(), r, state.num_prefix)
        x, size = merge_by_map(state, token_map, num_out)
        return Reduction(x=x, size=size, token_map=token_map)

    def reduce_train(self, state: TokenState, signals: Signals, ctx: TrainContext) -> Reduction:
        """The soft relaxation; only the first ``active`` tokens take part (prefix excluded).

        The token count does not change: merged-away A tokens keep their place with a size
        near 0 and fade through proportional attention. Tokens are sorted by size so that
        the active ones stay first; the active count shrinks by r.
        """
        assert signals.block_input is not None
        prefix = state.num_prefix
        active = ctx.scratch.get("dtem_active", state.num_tokens)
        r = min(self.values["r"], (active - prefix) // 2)
        if r <= 0:
            return identity_reduction(state)
        metric = self.module(signals.block_input.detach())
        metric = metric / metric.norm(dim=-1, keepdim=True)
        x, size = state.x, state.size
        xa, xb = x[:, prefix:active:2], x[:, prefix + 1 : active : 2]
        sa, sb = size[:, prefix:active:2], size[:, prefix + 1 : active : 2]
        ma, mb = metric[:, prefix:active:2], metric[:, prefix + 1 : active : 2]
        assign = soft_top_r(
            ma @ mb.transpose(-1, -2),
            r,
            self.values["k2"],
            self.values["tau1"],
            self.values["tau2"],
        ).to(x.dtype)
        moved = assign.transpose(-1, -2) @ (sa.unsqueeze(-1) * xa)
        sb_new = sb + (assign.transpose(-1, -2) @ sa.unsqueeze(-1)).squeeze(-1)
        xb = (sb.unsqueeze(-1) * xb + moved) / sb_new.unsqueeze(-1)
        rest = 1.0 - assign.sum(dim=-1)
        sa = sa * (rest + (rest.clamp(0.0, 1.0) - rest).detach())
        merged_x = torch.cat([xa, xb], dim=1)
        merged_size = torch.cat([sa, sb_new], dim=1)
        order = merged_size.argsort(dim=-1, descending=True)
        merged_size = merged_size.gather(1, order)
        merged_x = merged_x.gather(1, order.unsqueeze(-1).expand_as(merged_x))
        ctx.scratch["dtem_active"] = active - r
        x = torch.cat([x[:, :prefix], merged_x, x[:, active:]], dim=1)
        size = torch.cat([size[:, :prefix], merged_size, size[:, active:]], dim=1)
        token_map = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        return Reduction(x=x, size=size, token_map=token_map)
