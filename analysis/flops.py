"""Analytic cost in GMACs, the papers' "GFLOPs" (one multiply-add counts once).

Per block: ``4·Na·d² + 2·Na²·d + 2·Nm·d·hidden`` where ``Na`` tokens enter attention and
``Nm`` enter the MLP; plus the patch embedding, the head and each reducer's own cost.
Token counts come from the reducers' own ``output_tokens``, so no model is run.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from analysis.reducers.base import ModelFacts
from analysis.schedule import ResolvedSchedule


@dataclass(frozen=True)
class LayerCost:
    layer: int
    tokens_in: int  # entering attention
    tokens_mlp: int  # entering the MLP
    tokens_out: int  # leaving the layer
    macs_block: int
    macs_reducers: int

    @property
    def macs(self) -> int:
        return self.macs_block + self.macs_reducers


@dataclass(frozen=True)
class CostReport:
    layers: tuple[LayerCost, ...]
    macs_embed: int
    macs_head: int

    @property
    def macs(self) -> int:
        return self.macs_embed + self.macs_head + sum(layer.macs for layer in self.layers)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def tokens(self) -> list[int]:
        """Tokens leaving each layer."""
        return [layer.tokens_out for layer in self.layers]

    def gmacs_per_layer(self) -> list[float]:
        return [layer.macs / 1e9 for layer in self.layers]


def block_macs(facts: ModelFacts, tokens_attn: int, tokens_mlp: int) -> int:
    d = facts.dim
    attention = 4 * tokens_attn * d * d + 2 * tokens_attn * tokens_attn * d
    mlp = 2 * tokens_mlp * d * facts.mlp_hidden
    return attention + mlp


def embed_macs(facts: ModelFacts) -> int:
    return facts.num_patches * facts.in_chans * facts.patch_size**2 * facts.dim


def head_macs(facts: ModelFacts, tokens: int, module: nn.Module | None = None) -> int:
    """The pooling (attention pool where the model has one) and the classifier."""
    heads = 2 if getattr(module, "head_dist", None) is not None else 1  # DeiT distilled
    macs = heads * facts.dim * facts.num_classes
    attn_pool = getattr(module, "attn_pool", None) if module is not None else None
    if attn_pool is not None:
        pooled = (
            tokens if getattr(module, "pool_include_prefix", False) else tokens - facts.num_prefix
        )
        queries = attn_pool.latent_len
        d = facts.dim
        hidden = attn_pool.mlp.fc1.out_features
        macs += queries * d * d  # q
        macs += pooled * 2 * d * d  # kv
        macs += 2 * queries * pooled * d  # scores and weighted sum
        macs += queries * d * d  # proj
        macs += 2 * queries * d * hidden  # mlp
    return macs


def count_macs(
    facts: ModelFacts, resolved: ResolvedSchedule, module: nn.Module | None = None
) -> CostReport:
    """Cost of one image through the model under ``resolved``, layer by layer."""
    tokens = facts.num_patches + facts.num_prefix
    layers = []
    aside = 0  # tokens set aside by a reducer with `keeps_aside` (Cropr's LLF)
    for index, plan in enumerate(resolved.layers):
        if aside and index == len(resolved.layers) - 1:  # they return before the final block
            tokens, aside = tokens + aside, 0
        tokens_in = tokens
        reducer_macs = 0
        if plan.inside is not None:
            reducer_macs += plan.inside.own_macs(tokens, facts)
            before, tokens = tokens, plan.inside.output_tokens(tokens, facts.num_prefix)
            aside += before - tokens if getattr(plan.inside, "keeps_aside", False) else 0
        tokens_mlp = tokens
        macs = block_macs(facts, tokens_in, tokens_mlp)
        if plan.between is not None:
            reducer_macs += plan.between.own_macs(tokens, facts)
            before, tokens = tokens, plan.between.output_tokens(tokens, facts.num_prefix)
            aside += before - tokens if getattr(plan.between, "keeps_aside", False) else 0
        layers.append(LayerCost(index, tokens_in, tokens_mlp, tokens, macs, reducer_macs))
    return CostReport(
        layers=tuple(layers),
        macs_embed=embed_macs(facts),
        macs_head=head_macs(facts, tokens, module),
    )
