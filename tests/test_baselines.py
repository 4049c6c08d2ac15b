"""ToMe, EViT, Top-K and random against independent step-by-step references."""

from __future__ import annotations

import math

import pytest
import torch

from analysis import run
from analysis.engine import attend
from analysis.reducers.base import Signals, TokenState
from analysis.reducers.evit import EViT
from analysis.reducers.random import RandomDrop
from analysis.reducers.tome import ToMe
from analysis.reducers.topk import TopK
from tests.conftest import tiny


def reference_tome(x, size, metric, r, num_prefix):
    """ToMe's bipartite soft matching for one image, written as plain loops from the paper
    and the official code's ordering rules (A = even, B = odd absolute index)."""
    num_tokens = x.shape[0]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    a_side = list(range(0, num_tokens, 2))
    b_side = list(range(1, num_tokens, 2))
    best = {}
    for i in a_side:
        if i < num_prefix:
            best[i] = (-math.inf, None)
            continue
        options = [(float(unit[i] @ unit[j]), j) for j in b_side if j >= num_prefix]
        best[i] = max(options)
    by_score = sorted(a_side, key=lambda i: -best[i][0])
    merged, unmerged = by_score[:r], by_score[r:]
    if num_prefix > 0:
        unmerged = sorted(unmerged)
    order = (
        [i for i in range(num_prefix)]
        + [i for i in unmerged if i >= num_prefix]
        + [j for j in b_side if j >= num_prefix]
    )
    groups = {j: [j] for j in order}
    for i in merged:
        groups[best[i][1]].append(i)
    new_x, new_size = [], []
    for head in order:
        members = groups[head]
        weights = size[members]
        new_x.append((x[members] * weights[:, None]).sum(0) / weights.sum())
        new_size.append(weights.sum())
    return torch.stack(new_x), torch.stack(new_size)


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("num_tokens", [17, 18])
def test_tome_matches_reference(num_prefix, num_tokens):
    torch.manual_seed(num_prefix * 100 + num_tokens)
    x = torch.randn(3, num_tokens, 8, dtype=torch.float64)
    size = torch.randint(1, 4, (3, num_tokens)).double()
    size[:, :num_prefix] = 1
    keys = torch.randn(3, num_tokens, 4, dtype=torch.float64)
    r = 5
    reduction = ToMe(r=r, inflect=0.0).reduce(
        TokenState(x, size, num_prefix), Signals(layer=0, keys=keys)
    )
    for image in range(3):
        expected_x, expected_size = reference_tome(
            x[image], size[image], keys[image], r, num_prefix
        )
        assert torch.allclose(reduction.x[image], expected_x, atol=1e-12)
        assert torch.allclose(reduction.size[image], expected_size)
        # every old token lands on the new token that holds its value
        for _old, new in enumerate(reduction.token_map[image].tolist()):
            assert 0 <= new < num_tokens - r
        assert torch.equal(reduction.x[image, :num_prefix], x[image, :num_prefix])


def test_tome_r_is_capped_like_the_official_code():
    reducer = ToMe(r=50, inflect=0.0)
    assert reducer.output_tokens(21, 1) == 11  # r capped at (21 - 1) // 2 = 10
    x = torch.randn(1, 21, 4)
    reduction = reducer.reduce(
        TokenState(x, torch.ones(1, 21), 1), Signals(layer=0, keys=torch.randn(1, 21, 4))
    )
    assert reduction.x.shape[1] == 11


def reference_evit(x, cls_attn, keep, fuse):
    """EViT for one image with CLS at 0: top ceil(keep*(T-1)) by attention, best first,
    then (with fusion) sum(a_i x_i) over the rest, not renormalised."""
    patches = x.shape[0] - 1
    kept = math.ceil(keep * patches)
    order = sorted(range(patches), key=lambda i: -float(cls_attn[i]))
    rows = [x[0]] + [x[1 + i] for i in order[:kept]]
    if fuse:
        rows.append(sum(cls_attn[i] * x[1 + i] for i in order[kept:]))
    return torch.stack(rows)


@pytest.mark.parametrize("fuse", [True, False])
def test_evit_and_topk_match_reference(fuse):
    torch.manual_seed(1)
    x = torch.randn(2, 13, 6, dtype=torch.float64)
    cls_attn = torch.rand(2, 12, dtype=torch.float64).softmax(-1)
    state = TokenState(x, torch.ones(2, 13, dtype=torch.float64), 1)
    reducer = EViT(keep=0.6, fuse=fuse) if fuse else TopK(keep=0.6)
    reduction = reducer.reduce(state, Signals(layer=3, cls_attn=cls_attn))
    for image in range(2):
        expected = reference_evit(x[image], cls_attn[image], 0.6, fuse)
        assert torch.allclose(reduction.x[image], expected, atol=1e-12)
    assert reduction.x.shape[1] == reducer.output_tokens(13, 1)
    if fuse:
        assert torch.all(reduction.size[:, -1] == 12 - math.ceil(0.6 * 12))
    assert torch.equal(reduction.scores[:, 1:], cls_attn)


def test_random_is_seeded():
    x = torch.randn(2, 30, 4)
    state = TokenState(x, torch.ones(2, 30), 1)
    first = RandomDrop(keep=0.5, seed=7).reduce(state, Signals(layer=2))
    again = RandomDrop(keep=0.5, seed=7).reduce(state, Signals(layer=2))
    other = RandomDrop(keep=0.5, seed=8).reduce(state, Signals(layer=2))
    assert torch.equal(first.token_map, again.token_map)
    assert not torch.equal(first.token_map, other.token_map)
    assert torch.equal(first.x[:, 0], x[:, 0])


def test_proportional_attention_equals_duplicated_keys():
    """A token of size s must attend and be attended like s identical copies of itself."""
    model = tiny("vit_small_patch16_224")
    attn = model.module.blocks[0].attn
    torch.manual_seed(0)
    x = torch.randn(1, 5, model.facts.dim)
    size = torch.tensor([[1.0, 3.0, 1.0, 2.0, 1.0]])
    expanded = x.repeat_interleave(size[0].long(), dim=1)
    with torch.no_grad():
        proportional, _, _ = attend(attn, x, size.log()[:, None, None, :], [], 1)
        duplicated, _, _ = attend(attn, expanded, None, [], 1)
    firsts = torch.cumsum(size[0].long(), 0) - size[0].long()
    assert torch.allclose(proportional[0], duplicated[0, firsts], atol=1e-5)


SCHEDULES = [
    "tome:r=3",
    "evit:keep=0.6@1,2",
    "evit:keep=0.5,fuse=0@0",
    "topk:keep=0.5@1,3",
    "random:keep=0.7@0-2",
    "tome:r=2@0,1;topk:keep=0.6@2",
]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_trace_invariants(schedule):
    model = tiny("vit_small_patch14_reg4_dinov2", img_size=56)
    result = run(model, torch.randn(2, 3, 56, 56), schedule)
    trace = result.trace
    patches = trace.num_patches
    prefix = trace.num_prefix
    seen_dropped = torch.zeros(2, patches, dtype=torch.bool)
    for record in trace.layers:
        alive = record.owner >= 0
        assert torch.all(record.owner[alive] >= prefix)
        assert torch.all(record.owner < record.tokens)
        assert torch.all(record.sizes[:, :prefix] == 1)
        # sizes of patch tokens add up to the patches still carried
        assert torch.allclose(record.sizes[:, prefix:].sum(1), alive.sum(1).float())
        # each token's size is the number of patches that point to it
        for image in range(2):
            counts = torch.bincount(
                record.owner[image][alive[image]].long(), minlength=record.tokens
            )
            assert torch.allclose(counts[prefix:].float(), record.sizes[image, prefix:])
        newly = ~alive & ~seen_dropped
        assert torch.all(trace.dropped_at[newly] == record.layer)
        assert torch.all(~seen_dropped | ~alive)  # once dropped, never back
        seen_dropped |= ~alive
    assert torch.equal(seen_dropped, trace.dropped_at >= 0)
    assert trace.tokens == result.cost.tokens


def test_scores_recorded_for_attention_methods_only():
    model = tiny("vit_small_patch16_224")
    images = torch.randn(1, 3, 64, 64)
    evit = run(model, images, "evit:keep=0.5@1").trace
    assert evit.layers[1].scores is not None and evit.layers[0].scores is None
    assert torch.isfinite(evit.layers[1].scores).all()
    assert run(model, images, "tome:r=2").trace.layers[0].scores is None


def test_evit_dropping_a_single_patch_still_fuses_it(test_vit):
    """One patch dropped and fused keeps the token count the same: EViT must still run
    (and get its CLS attention), not be taken for a no-op."""
    from analysis import run

    images = torch.randn(1, 3, *test_vit.module.patch_embed.img_size)
    patches = test_vit.facts.num_patches
    keep = (patches - 1) / patches
    result = run(test_vit, images, f"evit:keep={keep}@0")
    assert result.tokens[0] == test_vit.facts.num_patches + test_vit.facts.num_prefix
    full = run(test_vit, images, "none")
    assert not torch.allclose(result.features, full.features)
    assert (result.trace.layers[0].owner >= 0).all()  # the dropped patch lives on, fused
