"""The seed methods (DTEM, PatchMerger, Token Cropr, LTM, MSTM) at inference.

Every method runs on tiny random models of several families with untrained modules, and
its trace must keep the invariants the viewer relies on.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from analysis import ScheduleError, run
from analysis.learned import attach, init_weights
from analysis.reducers import REDUCERS
from analysis.reducers.dtem import metric_from_keys, soft_top_r
from analysis.reducers.tome import match_bipartite
from tests.conftest import tiny

SCHEDULES = {
    "dtem": "dtem:r=3",
    "patchmerger": "patchmerger:tokens=4@1",
    "cropr-llf": "cropr:rate=2,llf=1@0-1",
    "cropr": "cropr:rate=2,llf=0@0-2",
    "ltm": "ltm:keep=0.8",
    "ltm-discard": "ltm:keep=0.7,discard=0.5@0,2",
    "mstm": "mstm:keep=0.5@1,2",
    "mstm-ms": "mstm:keep=0.5,ms=1@1,2",
}
FAMILIES = {
    "plain CLS": ("vit_small_patch16_224", {}),
    "DeiT distilled": ("deit_tiny_distilled_patch16_224", {}),
    "DINOv2 registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 56}),
}


def learned(model, schedule):
    return attach(model, init_weights(model, [schedule]).values())


def check_trace(result, model) -> None:
    """Each patch has one carrier or was dropped once; sizes add up; prefix untouched."""
    trace = result.trace
    prefix = model.module.num_prefix_tokens
    num_patches = trace.num_patches
    assert result.tokens == result.cost.tokens
    dropped_at = trace.dropped_at
    for record in trace.layers:
        owner = record.owner
        alive = owner >= 0
        assert torch.all(owner[alive] >= prefix)  # no patch lands on a prefix token
        assert torch.all(owner < record.tokens)
        # a patch without a carrier was dropped at or before this layer
        assert torch.all((dropped_at[~alive] >= 0) & (dropped_at[~alive] <= record.layer))
        assert torch.all(record.sizes[:, :prefix] == 1)
        patch_sizes = record.sizes[:, prefix:].sum(dim=1)
        assert torch.allclose(patch_sizes, alive.sum(dim=1).float())
        # every patch token carries exactly its patches: sizes agree with the owner map
        counts = torch.zeros_like(record.sizes).scatter_add_(
            1, owner.clamp(min=0).long(), alive.float()
        )
        assert torch.allclose(counts[:, prefix:], record.sizes[:, prefix:])
    assert dropped_at.shape == (result.features.shape[0], num_patches)


@pytest.mark.parametrize("family", FAMILIES, ids=list(FAMILIES))
@pytest.mark.parametrize("key", SCHEDULES, ids=list(SCHEDULES))
def test_shapes_and_trace_invariants(key, family):
    name, overrides = FAMILIES[family]
    model = learned(tiny(name, **overrides), SCHEDULES[key])
    size = model.data_config.input_size
    result = run(model, torch.randn(2, 3, size, size), SCHEDULES[key])
    assert result.features.shape == (2, model.module.embed_dim)
    assert torch.isfinite(result.features).all()
    check_trace(result, model)


@pytest.mark.parametrize("key", SCHEDULES, ids=list(SCHEDULES))
def test_deterministic(key):
    model = learned(tiny("vit_small_patch16_224"), SCHEDULES[key])
    images = torch.randn(2, 3, 64, 64)
    first = run(model, images, SCHEDULES[key])
    second = run(model, images, SCHEDULES[key])
    assert torch.equal(first.features, second.features)
    for a, b in zip(first.trace.layers, second.trace.layers, strict=True):
        assert torch.equal(a.owner, b.owner)


def test_every_seed_method_is_registered_with_params():
    for name in ("dtem", "patchmerger", "cropr", "ltm", "mstm"):
        cls = REDUCERS[name]
        assert cls.params and cls.label and cls.description
        assert cls.strength in {p.name for p in cls.params}


@pytest.mark.parametrize("schedule", ["dtem:r=2", "patchmerger@1", "cropr@0", "ltm@1"])
def test_learned_methods_without_weights_say_so(schedule):
    model = tiny("vit_small_patch16_224")
    with pytest.raises(ScheduleError, match="needs trained weights"):
        run(model, torch.randn(1, 3, 64, 64), schedule)


def test_mstm_core_needs_no_weights():
    model = tiny("vit_small_patch16_224")
    result = run(model, torch.randn(1, 3, 64, 64), "mstm:keep=0.5@1")
    assert result.tokens[1] == 1 + 8
    with pytest.raises(ScheduleError, match="needs trained weights"):
        run(model, torch.randn(1, 3, 64, 64), "mstm:keep=0.5,ms=1@1")


def test_missing_layer_and_wrong_token_count_are_explained():
    model = learned(tiny("vit_small_patch16_224"), "patchmerger:tokens=4@1")
    with pytest.raises(ScheduleError, match="no trained module for layer 2"):
        run(model, torch.randn(1, 3, 64, 64), "patchmerger:tokens=4@2")
    with pytest.raises(ScheduleError, match="trained with tokens=4"):
        run(model, torch.randn(1, 3, 64, 64), "patchmerger:tokens=6@1")


def keys_as_metric(model) -> dict[int, nn.Module]:
    """DTEM metric layers that compute exactly ToMe's metric: keys averaged over heads."""
    return {
        layer: metric_from_keys(block.attn).eval()
        for layer, block in enumerate(model.module.blocks)
    }


@pytest.mark.parametrize("family", FAMILIES, ids=list(FAMILIES))
def test_dtem_inference_equals_tome_with_keys_as_metric(family):
    name, overrides = FAMILIES[family]
    model = tiny(name, **overrides)
    from analysis.reducers.base import LearnedWeights

    model = attach(model, [LearnedWeights("dtem", keys_as_metric(model))])
    size = model.data_config.input_size
    images = torch.randn(2, 3, size, size)
    dtem = run(model, images, "dtem:r=3")
    tome = run(model, images, "tome:r=3")
    assert dtem.tokens == tome.tokens
    for a, b in zip(dtem.trace.layers, tome.trace.layers, strict=True):
        assert torch.equal(a.owner, b.owner)
    assert torch.allclose(dtem.features, tome.features, atol=1e-5)
    # the metric layer costs N·D·f on top of ToMe's matching
    assert dtem.cost.macs > tome.cost.macs


def test_dtem_matching_is_tome_matching():
    torch.manual_seed(0)
    metric = torch.randn(2, 11, 8)
    token_map, num_out = match_bipartite(metric, 3, 1)
    assert num_out == 8
    assert torch.all(token_map[:, 0] == 0)


def test_soft_top_r_chooses_about_r_edges_once_each():
    torch.manual_seed(0)
    scores = torch.randn(2, 16, 15).tanh()
    assign = soft_top_r(scores, r=5, k2=3, tau1=0.1, tau2=0.1)
    rows = assign.sum(dim=-1)
    assert torch.all(rows <= 1 + 1e-5)
    assert torch.allclose(assign.sum(dim=(1, 2)), torch.full((2,), 5.0), atol=0.5)
    assert torch.all((assign > 0).sum(dim=-1) <= 3)  # only the k2 candidates
    # low temperatures make it nearly hard: the chosen rows are the best edges
    best = scores.max(dim=-1).values.topk(5, dim=1).indices
    chosen = rows.topk(5, dim=1).indices
    assert torch.equal(best.sort(dim=1).values, chosen.sort(dim=1).values)


def test_patchmerger_trace_shows_soft_and_hard_assignment():
    model = learned(tiny("vit_small_patch16_224"), "patchmerger:tokens=4@1")
    result = run(model, torch.randn(2, 3, 64, 64), "patchmerger:tokens=4@1")
    record = result.trace.layers[1]
    assert record.soft_assignment is not None
    assert record.soft_assignment.shape == (2, 16, 5)
    # each output's weights over the patches sum to one (softmax over the inputs)
    assert torch.allclose(record.soft_assignment[..., 1:].sum(dim=1), torch.ones(2, 4))
    hard = record.soft_assignment[..., 1:].argmax(dim=-1) + 1
    assert torch.equal(hard.int(), record.owner)


def test_cropr_scores_are_the_heatmap_and_llf_restores_tokens():
    model = learned(tiny("vit_small_patch16_224"), "cropr:rate=2,llf=1@0-1")
    result = run(model, torch.randn(2, 3, 64, 64), "cropr:rate=2,llf=1@0-1")
    trace = result.trace
    assert trace.layers[0].scores is not None and torch.isfinite(trace.layers[0].scores).all()
    # the first module prunes rate + 1, the next rate; LLF brings all back for the last block
    assert result.tokens == [17 - 3, 17 - 5, 17 - 5, 17]
    assert torch.all(trace.layers[-1].owner >= 1)
    assert (trace.dropped_at >= 0).sum(dim=1).tolist() == [5, 5]
    # the restored tokens come back unchanged since their pruning: last-layer counts agree
    assert result.cost.layers[-1].tokens_in == 17


def test_cropr_keeps_prefix_tokens_first():
    model = learned(tiny("vit_small_patch14_reg4_dinov2", img_size=56), "cropr:rate=4@0")
    result = run(model, torch.randn(1, 3, 56, 56), "cropr:rate=4,llf=0@0")
    assert result.tokens[0] == 5 + 16 - 5
    assert torch.all(result.trace.layers[0].owner[result.trace.dropped_at < 0] >= 5)


def test_mstm_multiscale_starts_as_the_core_and_changes_with_weights():
    model = learned(tiny("vit_small_patch16_224"), "mstm:keep=0.5,ms=1@1,2")
    images = torch.randn(2, 3, 64, 64)
    core = run(model, images, "mstm:keep=0.5@1,2")
    fused = run(model, images, "mstm:keep=0.5,ms=1@1,2")
    assert torch.allclose(core.features, fused.features, atol=1e-6)  # zero-initialised
    assert fused.cost.macs > core.cost.macs  # the coarse branch is counted
    module = model.learned["mstm"].modules[1]
    changed = type(module)(**module.config)
    nn.init.normal_(changed.proj.weight, std=0.05)
    from analysis.reducers.base import LearnedWeights

    other = attach(model, [LearnedWeights("mstm", {1: changed})])
    moved = run(other, images, "mstm:keep=0.5,ms=1@1,2")
    assert not torch.allclose(core.features, moved.features, atol=1e-4)


def test_mstm_fusion_is_seen_by_the_attention_of_its_block():
    """The coarse features are added as the first block of the part starts, before its
    attention, so the CLS attention that picks the crucial tokens there already sees them
    (the paper fuses before pruning)."""
    from analysis.reducers.base import LearnedWeights

    model = learned(tiny("vit_small_patch16_224"), "mstm:keep=0.5,ms=1@1,2")
    images = torch.randn(2, 3, 64, 64)
    core = run(model, images, "mstm:keep=0.5@1,2")
    module = model.learned["mstm"].modules[1]
    changed = type(module)(**module.config)
    nn.init.normal_(changed.proj.weight, std=0.5)
    other = attach(model, [LearnedWeights("mstm", {1: changed})])
    fused = run(other, images, "mstm:keep=0.5,ms=1@1,2")
    assert not torch.allclose(core.trace.layers[1].scores, fused.trace.layers[1].scores)
    assert torch.equal(core.trace.layers[0].owner, fused.trace.layers[0].owner)


def ltm_case(keep: float, discard: float, seed: int = 0):
    """An LTM reducer with a random score head, its input state and its mask's parts."""
    from analysis.reducers.base import LearnedWeights, Signals, TokenState
    from analysis.reducers.ltm import LTM, LTMMask
    from analysis.reducers.topk import kept_patches

    torch.manual_seed(seed)
    dim, patches = 32, 16
    module = LTMMask(dim)
    nn.init.normal_(module.score.weight, std=0.3)
    nn.init.normal_(module.size_weight, std=1.0)
    reducer = LTM(keep=keep, discard=discard)
    reducer.bind(LearnedWeights("ltm", {0: module}), 0)
    x = torch.randn(2, 1 + patches, dim)
    size = torch.cat([torch.ones(2, 1), torch.randint(1, 4, (2, patches)).float()], dim=1)
    state = TokenState(x, size, 1)
    count = kept_patches(keep, patches)
    with torch.no_grad():
        scores, targets, logits = module(x[:, 1:], size[:, 1:], count)
        reduction = reducer.reduce(state, Signals(layer=0))
    return state, reduction, scores, targets, logits


def dense_merge(state, scores, targets, logits, kept):
    """The paper's block as written: Gᵀ Z with a one-hot G (a target keeps itself), each
    column weighted by size · exp(score); rows of dropped tokens empty."""
    keep = targets.shape[1]
    mask = torch.nn.functional.one_hot(logits.argmax(dim=-1), keep).float()
    rows = targets.unsqueeze(-1).expand(-1, -1, keep)
    mask = mask.scatter(1, rows, torch.eye(keep).expand(targets.shape[0], -1, -1))
    mask = mask * kept.unsqueeze(-1)
    size = state.size[:, 1:]
    weight = mask * (size * (scores - scores.max(dim=1, keepdim=True).values).exp()).unsqueeze(-1)
    merged = weight.transpose(-1, -2) @ state.x[:, 1:] / weight.sum(dim=1).unsqueeze(-1)
    return merged, (mask * size.unsqueeze(-1)).sum(dim=1)


def test_ltm_hard_merge_is_the_one_hot_mask_product():
    """Inference merges with a scatter (no N×N′ product to count); same numbers."""
    state, reduction, scores, targets, logits = ltm_case(keep=0.5, discard=0.0)
    assert torch.all(reduction.token_map >= 0)  # without `discard` no token is dropped
    merged, size = dense_merge(state, scores, targets, logits, torch.ones_like(scores))
    torch.testing.assert_close(reduction.x[:, 1:], merged)
    torch.testing.assert_close(reduction.size[:, 1:], size)


@pytest.mark.parametrize("seed", [0, 1])
def test_ltm_discard_drops_the_tokens_that_fit_no_target(seed):
    """The figure's variant: ⌊0.5·(16 − 8)⌋ = 4 non-target rows are empty, those whose
    best logit is lowest; they are dropped, not merged, and the token count is unchanged."""
    state, reduction, scores, targets, logits = ltm_case(keep=0.5, discard=0.5, seed=seed)
    dropped = reduction.token_map[:, 1:] < 0
    best = logits.amax(dim=-1).scatter(1, targets, torch.inf)
    expected = torch.zeros_like(dropped).scatter(1, best.topk(4, largest=False).indices, True)
    assert torch.equal(dropped, expected)
    assert not dropped.gather(1, targets).any()  # a target is never dropped
    assert reduction.x.shape[1] == 1 + 8
    merged, size = dense_merge(state, scores, targets, logits, (~dropped).float())
    torch.testing.assert_close(reduction.x[:, 1:], merged)
    torch.testing.assert_close(reduction.size[:, 1:], size)
    kept_size = state.size[:, 1:].masked_fill(dropped, 0).sum(dim=1)
    torch.testing.assert_close(reduction.size[:, 1:].sum(dim=1), kept_size)


def test_cropr_auxiliary_parts_start_as_the_official_code():
    """The official model runs timm's ViT init after building its Cropr modules: every
    Linear of the auxiliary MLP and head is truncated normal (std 0.02) with a zero bias,
    and the query is truncated normal with std D^-½, cut at two std."""
    from analysis.reducers.cropr import CroprModule

    torch.manual_seed(0)
    dim = 256
    module = CroprModule(dim, aux_out=100)
    for linear in (module.aux.mlp[0], module.aux.mlp[2], module.aux.head):
        assert torch.count_nonzero(linear.bias) == 0
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert module.query.std().item() == pytest.approx(dim**-0.5, rel=0.15)
    assert module.query.abs().max().item() <= 2 * dim**-0.5
    assert module.aux.mlp_norm.eps == 1e-6 and module.aux.head_norm.eps == 1e-5


def test_ltm_scores_feed_the_heatmap():
    model = learned(tiny("vit_small_patch16_224"), "ltm:keep=0.5@1")
    result = run(model, torch.randn(1, 3, 64, 64), "ltm:keep=0.5@1")
    assert result.tokens[1] == 1 + 8
    assert result.trace.layers[1].scores is not None


SHIPPED = {
    "dtem": "dtem:r=16",
    "patchmerger": "patchmerger:tokens=8@5",
    "cropr": "cropr:rate=16@0-9",
    "ltm": "ltm:keep=0.9",
    "mstm": "mstm:keep=0.5,ms=1@3,6,9",
}


@pytest.mark.parametrize("method", SHIPPED)
def test_shipped_weights_work_on_the_default_model(method, default_model):
    from analysis.learned import ASSETS_DIR, read_metadata

    path = ASSETS_DIR / f"{method}-default.safetensors"
    assert path.exists(), f"{path.name} must be shipped in assets/"
    metadata = read_metadata(path)
    assert metadata["backbone"] == "default"
    assert metadata["command"].startswith("python -m analysis train")
    assert path.stat().st_size < 2_000_000
    assert method in default_model.learned
    result = run(default_model, torch.randn(1, 3, 224, 224), SHIPPED[method])
    check_trace(result, default_model)
