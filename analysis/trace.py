"""What happened to every original patch at every layer.

Memory grows as patches x layers: per layer we keep, for each patch, the index of the
token that carries it (-1 once dropped), the token sizes, and the scores a reducer used.
Patches pruned but pooled into a fused token (EViT's extra token) are marked as such, so
that a picture can tell them from patches merged with similar ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import Tensor

from analysis.reducers.base import Reduction


@dataclass
class LayerTrace:
    layer: int
    tokens: int  # tokens leaving the layer (prefix included)
    owner: Tensor  # [B, N] int32: token carrying each patch after the layer, -1 if dropped
    sizes: Tensor  # [B, T] float32: size of each token after the layer
    scores: Tensor | None = None  # [B, N] float32: score of each patch's token when reduced
    methods: tuple[str, ...] = ()
    soft_assignment: Tensor | None = None  # [B, N, T] for soft methods (display only)
    fused: Tensor | None = None  # [B, N] bool: patch pruned into a fused token; None: none


@dataclass
class Trace:
    grid: tuple[int, int]
    num_prefix: int
    layers: list[LayerTrace] = field(default_factory=list)
    dropped_at: Tensor | None = None  # [B, N] int32: layer at which each patch was dropped, -1

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokens(self) -> list[int]:
        return [record.tokens for record in self.layers]

    def owner_at(self, layer: int) -> Tensor:
        """Patch -> token after ``layer``; layer -1 is the input (every patch its own token)."""
        if layer < 0:
            batch = self.dropped_at.shape[0] if self.dropped_at is not None else 1
            return (
                torch.arange(self.num_patches, dtype=torch.int32).expand(batch, -1)
                + self.num_prefix
            )
        return self.layers[layer].owner

    def reduced_at(self) -> Tensor:
        """[B, N] the first layer at which each patch stopped being a token of its own
        (merged into a bigger token or dropped); ``depth`` for patches never reduced."""
        depth = len(self.layers)
        batch = self.layers[0].owner.shape[0] if self.layers else 1
        first = torch.full((batch, self.num_patches), depth, dtype=torch.int32)
        for record in reversed(self.layers):
            owner = record.owner.long()
            alive = owner >= 0
            size = record.sizes.gather(1, owner.clamp(min=0))
            reduced = ~alive | (size > 1)
            if record.fused is not None:  # fused alone (size 1) is still out of attention
                reduced |= record.fused
            first = torch.where(reduced, torch.tensor(record.layer, dtype=torch.int32), first)
        return first

    def to_dict(self, image: int = 0) -> dict:
        """A JSON-ready record of one image's trace."""
        return {
            "grid": list(self.grid),
            "num_prefix": self.num_prefix,
            "dropped_at": self.dropped_at[image].tolist() if self.dropped_at is not None else None,
            "layers": [
                {
                    "layer": record.layer,
                    "tokens": record.tokens,
                    "methods": list(record.methods),
                    "owner": record.owner[image].tolist(),
                    "sizes": [round(v, 4) for v in record.sizes[image].tolist()],
                    "scores": None
                    if record.scores is None
                    else [None if v != v else round(v, 6) for v in record.scores[image].tolist()],
                    "fused": None if record.fused is None else record.fused[image].tolist(),
                }
                for record in self.layers
            ],
        }

    def to_json(self, image: int = 0) -> str:
        return json.dumps(self.to_dict(image))


class TraceBuilder:
    """Follows the patches through the reductions of one run (on the run's device)."""

    def __init__(self, batch: int, grid: tuple[int, int], num_prefix: int, device: torch.device):
        self.grid = grid
        self.num_prefix = num_prefix
        num_patches = grid[0] * grid[1]
        self.owner = (torch.arange(num_patches, device=device) + num_prefix).expand(batch, -1)
        self.dropped_at = torch.full((batch, num_patches), -1, dtype=torch.int32, device=device)
        self.fused = torch.zeros((batch, num_patches), dtype=torch.bool, device=device)
        self.pending: list[tuple] = []
        self._scores: Tensor | None = None
        self._soft: Tensor | None = None
        self._methods: list[str] = []

    def apply(self, layer: int, method: str, reduction: Reduction) -> None:
        alive = self.owner >= 0
        safe = self.owner.clamp(min=0)
        if reduction.scores is not None:
            patch_scores = reduction.scores.float().gather(1, safe)
            self._scores = torch.where(alive, patch_scores, torch.nan)
        if reduction.soft_assignment is not None:
            self._soft = reduction.soft_assignment.float().gather(
                1, safe.unsqueeze(-1).expand(-1, -1, reduction.soft_assignment.shape[-1])
            )
        new_owner = torch.where(alive, reduction.token_map.gather(1, safe), -1)
        newly_dropped = alive & (new_owner < 0)
        if reduction.fused is not None:  # pruned into the fused token: marked from now on
            self.fused = self.fused | reduction.fused.gather(1, new_owner.clamp(min=0))
        self.fused = self.fused & (new_owner >= 0)
        self.dropped_at = torch.where(newly_dropped, layer, self.dropped_at)
        self.owner = new_owner
        self._methods.append(method)

    def end_layer(self, layer: int, sizes: Tensor) -> None:
        self.pending.append(
            (
                layer,
                sizes.shape[1],
                self.owner.to(torch.int32),
                sizes.float(),
                self._scores,
                tuple(self._methods),
                self._soft,
                self.fused.clone() if bool(self.fused.any()) else None,
            )
        )
        self._scores = None
        self._soft = None
        self._methods = []

    def finish(self) -> Trace:
        trace = Trace(grid=self.grid, num_prefix=self.num_prefix)
        for layer, tokens, owner, sizes, scores, methods, soft, fused in self.pending:
            trace.layers.append(
                LayerTrace(
                    layer=layer,
                    tokens=tokens,
                    owner=owner.cpu(),
                    sizes=sizes.cpu(),
                    scores=None if scores is None else scores.cpu(),
                    methods=methods,
                    soft_assignment=None if soft is None else soft.cpu(),
                    fused=None if fused is None else fused.cpu(),
                )
            )
        trace.dropped_at = self.dropped_at.cpu()
        return trace
