"""LTM: learnable token merging (Wang & Yang, arXiv 2407.15219, TPAMI 2025).

The paper's block: attention gives Z (N tokens); a mask module takes Z and the previous
block's mask and outputs a merging mask G (N×N′); the MLP runs on the merged tokens Gᵀ Z.
The official repository lacks the block, so the mask module here is our reading (every
choice is listed in docs/methods.md):

* Scores: ``s_i = w·LN(z_i) + b + α·log(size_i) − β·max_{j≠i} cos(LN z_i, LN z_j)``. The
  previous block's mask enters through the token sizes it produced (its column sums),
  weighted by a learned α; the last term (β learned, 5 at initialisation) makes a token
  that has a near-twin a likely merge source, so an untrained module merges redundant
  tokens first.
* The N′ = ⌈keep·N⌉ best-scoring patch tokens are the merge targets (columns of G).
* Row i of G: ``softmax_j(cos(LN z_i, LN z_j) / τ + s_j)`` over the targets j, with a
  learned temperature τ; a target token keeps itself.
* Columns are normalised with the weights ``size_i · exp(s_i)``: a merged token is an
  importance- and size-weighted average (so the mask's values, not only its pattern, are
  learned); its size is ``Σ_i G_ij · size_i``, the number of patches it stands for.
* Training uses G soft (τ starts at 0.02, so soft rows are close to their argmax);
  inference makes each row hard, and merges with a scatter (no dense N×N′ product). The
  module has D + 4 parameters plus its LayerNorm's 2D.
* ``discard`` (default 0) is the paper figure's variant, whose binary mask has empty rows:
  that fraction of the non-target tokens, those whose best row logit is lowest (the
  tokens that fit no target), gets an empty row and is dropped rather than merged.
* Default: every block (the paper replaces every block) at keep 0.968, the per-block
  ratio that puts ViT-S/16 at the paper's cost point (3.7 of 4.3 GFLOPs, 86 %).
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
)
from analysis.reducers.learned_base import LearnedReducer, TrainContext
from analysis.reducers.topk import kept_patches


class LTMMask(nn.Module):
    """The mask module of one block: token scores and the soft merging mask."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.config = {"dim": dim}
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1)
        nn.init.zeros_(self.score.weight)  # untrained: redundancy alone, no seed lottery
        nn.init.zeros_(self.score.bias)
        self.size_weight = nn.Parameter(torch.zeros(()))  # α: the previous mask's sizes
        self.redundancy_weight = nn.Parameter(torch.tensor(5.0))  # β: similarity to the rest
        self.log_tau = nn.Parameter(torch.tensor(math.log(0.02)))

    def forward(self, patches: Tensor, size: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor]:
        """Scores [B, N], target indices [B, N′] (sorted), assignment logits [B, N, N′]."""
        normed = self.norm(patches)
        unit = F.normalize(normed.float(), dim=-1)
        similarity = unit @ unit.transpose(-1, -2)
        eye = torch.eye(unit.shape[1], dtype=torch.bool, device=unit.device)
        redundancy = similarity.masked_fill(eye, -1.0).amax(dim=-1)  # [B, N]
        scores = self.score(normed).squeeze(-1).float()
        scores = scores + self.size_weight * size.float().clamp(min=1e-6).log()
        scores = scores - self.redundancy_weight * redundancy
        targets = scores.topk(keep, dim=1).indices.sort(dim=1).values
        columns = targets.unsqueeze(1).expand(-1, unit.shape[1], -1)
        logits = similarity.gather(2, columns) / self.log_tau.exp()
        logits = logits + scores.gather(1, targets).unsqueeze(1)
        return scores, targets, logits


class LTM(LearnedReducer, Reducer):
    name: ClassVar[str] = "ltm"
    label: ClassVar[str] = "LTM"
    site: ClassVar[Site] = Site.INSIDE
    proportional_attention: ClassVar[bool] = True
    strength: ClassVar[str] = "keep"
    default_lr: ClassVar[float] = 1e-4  # a D-wide map: Adam's per-weight steps add up fast
    module_class: ClassVar[type[nn.Module]] = LTMMask
    description: ClassVar[str] = (
        "Merge N tokens into keep·N with a learned merging mask (needs trained weights)"
    )
    params: ClassVar[tuple[Param, ...]] = (
        Param("keep", float, 0.968, 0.01, 1.0, "compression ratio N′/N of the patch tokens"),
        Param(
            "discard",
            float,
            0.0,
            0.0,
            1.0,
            "fraction of the non-target tokens dropped, not merged (the paper figure's empty rows)",
        ),
    )
    paper_settings: ClassVar[tuple[PaperSetting, ...]] = (
        PaperSetting("paper: ViT-S 3.7 of 4.3 G", percent=86.0),
        PaperSetting("paper: ViT-B 12.9 of 17.6 G", percent=73.3),
    )

    @classmethod
    def new_module(cls, facts: ModelFacts, values: dict[str, Any], aux_out: int = 0) -> nn.Module:
        return LTMMask(facts.dim)

    def output_tokens(self, num_tokens: int, num_prefix: int) -> int:
        return num_prefix + kept_patches(self.values["keep"], num_tokens - num_prefix)

    def own_macs(self, num_tokens: int, facts: ModelFacts) -> int:
        patches = num_tokens - facts.num_prefix
        keep = kept_patches(self.values["keep"], patches)
        if keep == patches:
            return 0
        return patches * facts.dim + patches * patches * facts.dim  # scores, similarities

    def _mask(self, state: TokenState) -> tuple[int, Tensor, Tensor, Tensor] | None:
        prefix = state.num_prefix
        patches = state.num_tokens - prefix
        keep = kept_patches(self.values["keep"], patches)
        if keep == patches:
            return None
        scores, targets, logits = self.module(state.x[:, prefix:], state.size[:, prefix:], keep)
        return keep, scores, targets, logits

    def reduce(self, state: TokenState, signals: Signals) -> Reduction:
        return self._reduce(state, soft=False)

    def reduce_train(self, state: TokenState, signals: Signals, ctx: TrainContext) -> Reduction:
        return self._reduce(state, soft=True)

    def _reduce(self, state: TokenState, soft: bool) -> Reduction:
        """Merge with the mask G: soft rows in training, their argmax at inference.

        Column j of G weights token i by ``G_ij · size_i · exp(s_i)``: the merged token is
        an importance- and size-weighted average; its size is ``Σ_i G_ij · size_i``. Rows
        left empty (``discard``) drop their token.
        """
        found = self._mask(state)
        if found is None:
            return identity_reduction(state)
        keep, scores, targets, logits = found
        prefix = state.num_prefix
        batch, _, dim = state.x.shape
        own = torch.arange(keep, device=logits.device).expand(batch, -1)
        assign = logits.argmax(dim=-1).scatter(1, targets, own)  # a target keeps itself
        kept = ~self._discarded(logits, targets, keep)  # [B, N]
        size = state.size[:, prefix:].to(logits.dtype) * kept
        importance = (scores - scores.max(dim=1, keepdim=True).values.detach()).exp()
        weight = size * importance.clamp(min=1e-6)  # [B, N]; 0 on discarded rows
        patches = state.x[:, prefix:].to(logits.dtype)
        if soft:
            mask = logits.softmax(dim=-1)
            index = targets.unsqueeze(-1).expand(-1, -1, keep)
            mask = mask.scatter(1, index, F.one_hot(own, keep).to(mask.dtype))
            weights = mask * weight.unsqueeze(-1)  # [B, N, N′]
            merged = weights.transpose(-1, -2) @ patches / weights.sum(dim=1).unsqueeze(-1)
            new_size = (mask * size.unsqueeze(-1)).sum(dim=1)
        else:  # one-hot rows: a scatter, not a dense N×N′ product
            spread = assign.unsqueeze(-1).expand(-1, -1, dim)
            summed = patches.new_zeros(batch, keep, dim).scatter_add_(
                1, spread, patches * weight.unsqueeze(-1)
            )
            total = weight.new_zeros(batch, keep).scatter_add_(1, assign, weight)
            merged = summed / total.unsqueeze(-1)
            new_size = size.new_zeros(batch, keep).scatter_add_(1, assign, size)
        x = torch.cat([state.x[:, :prefix], merged.to(state.x.dtype)], dim=1)
        new_size = torch.cat([state.size[:, :prefix], new_size.to(state.size.dtype)], dim=1)
        prefix_map = torch.arange(prefix, device=x.device).expand(batch, -1)
        token_map = torch.cat([prefix_map, torch.where(kept, assign + prefix, -1)], dim=1)
        padded = torch.cat([scores.new_full((batch, prefix), torch.nan), scores], dim=1)
        return Reduction(x=x, size=new_size, token_map=token_map, scores=padded)

    def _discarded(self, logits: Tensor, targets: Tensor, keep: int) -> Tensor:
        """The rows ``discard`` empties: of the non-target tokens, the ⌊discard·(N − N′)⌋
        whose best logit is lowest. Chosen without gradient, like the hard rows."""
        batch, patches, _ = logits.shape
        dropped = torch.zeros(batch, patches, dtype=torch.bool, device=logits.device)
        count = math.floor(self.values.get("discard", 0.0) * (patches - keep) + 1e-9)
        if count <= 0:
            return dropped
        best = logits.detach().amax(dim=-1).scatter(1, targets, torch.inf)  # targets stay
        worst = best.topk(count, dim=1, largest=False).indices
        return dropped.scatter(1, worst, True)
