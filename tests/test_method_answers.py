"""Hand-built inputs whose right answer is known, one group per seed method.

Trace invariants and shape checks hold for a method that keeps the wrong tokens, merges
into the wrong partner or weighs a merge wrongly. These tests build inputs where the
documented method (docs/methods.md) has one unambiguous answer: which tokens are kept,
which merge into which, with what weights, and what the method's own cost is. Expected
values are written out by hand or computed by plain-Python references of the documented
formulas, never taken from the code under test.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from torch import Tensor

from analysis.learned import TrainContext
from analysis.reducers.base import LearnedWeights, ModelFacts, Signals, TokenState
from analysis.reducers.cropr import Cropr, CroprModule
from analysis.reducers.dtem import DTEM, DTEMMetric, soft_top_r
from analysis.reducers.ltm import LTM, LTMMask
from analysis.reducers.mstm import MSTM
from analysis.reducers.patchmerger import PatchMerger, PatchMergerModule

# Mean-zero, mutually orthogonal directions in R^4: a LayerNorm (weight 1, bias 0) only
# rescales them, so cosines after the norm are the cosines written here.
U1 = torch.tensor([1.0, -1.0, 0.0, 0.0])
U2 = torch.tensor([0.0, 0.0, 1.0, -1.0])
U3 = torch.tensor([1.0, 1.0, -1.0, -1.0])


def facts(dim: int = 8, heads: int = 2, prefix: int = 1, patches: int = 16) -> ModelFacts:
    return ModelFacts(
        name="hand",
        depth=4,
        dim=dim,
        num_heads=heads,
        num_prefix=prefix,
        has_class_token=prefix > 0,
        num_patches=patches,
        mlp_hidden=4 * dim,
        patch_size=16,
        in_chans=3,
    )


def bound(reducer: Any, module: torch.nn.Module, method: str) -> Any:
    reducer.bind(LearnedWeights(method, {0: module}), 0)
    return reducer


def cosine(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


# ----------------------------------------------------------------------------------- Cropr


def cropr(query: Tensor, **values: Any) -> Cropr:
    module = CroprModule(query.shape[0])
    with torch.no_grad():
        module.query.copy_(query)
    settings = {"rate": 2, "llf": False, "first_extra": 1, "first": False, **values}
    return bound(Cropr(**settings), module, "cropr")


def cropr_tokens() -> Tensor:
    """Two images, CLS + 6 patches; coordinate 0 is the score, coordinate 1 names the token."""
    first = torch.tensor(
        [
            [-100.0, 0.3, -1.0, 2.0, 0.5, -0.2, 1.5],
            [-100.0, 1.5, -0.2, 0.5, 2.0, -1.0, 0.3],  # the same scores, patches reversed
        ]
    )
    x = torch.zeros(2, 7, 4)
    x[:, :, 0] = first
    x[:, :, 1] = torch.arange(7.0)
    return x


def test_cropr_keeps_the_highest_scoring_patches_best_first():
    x = cropr_tokens()
    query = torch.tensor([1.0, 0.0, 0.0, 0.0])  # score_i = q·x_i = coordinate 0
    reduction = cropr(query, rate=2).reduce(TokenState(x, torch.ones(2, 7), 1), Signals(0))
    # CLS is kept although it scores lowest; then patches by score 2.0, 1.5, 0.5, 0.3
    assert reduction.x[:, :, 1].tolist() == [[0, 3, 6, 4, 1], [0, 4, 1, 3, 6]]
    assert reduction.token_map.tolist() == [[0, 4, -1, 1, 3, -1, 2], [0, 2, -1, 3, 1, -1, 4]]
    assert torch.equal(reduction.scores[:, 1:], x[:, 1:, 0])
    assert torch.isnan(reduction.scores[:, 0]).all()


def test_cropr_score_is_the_unscaled_dot_product_with_the_query():
    x = cropr_tokens()
    query = torch.tensor([3.0, 0.0, 0.0, 0.0])
    reduction = cropr(query, rate=2).reduce(TokenState(x, torch.ones(2, 7), 1), Signals(0))
    assert torch.equal(reduction.scores[:, 1:], 3.0 * x[:, 1:, 0])


def test_cropr_first_module_prunes_one_more():
    x = cropr_tokens()
    query = torch.tensor([1.0, 0.0, 0.0, 0.0])
    state = TokenState(x, torch.ones(2, 7), 1)
    first = cropr(query, rate=2, first=True)
    assert first.output_tokens(7, 1) == 1 + 6 - 3
    assert first.reduce(state, Signals(0)).x[:, :, 1].tolist() == [[0, 3, 6, 4], [0, 4, 1, 3]]
    none_extra = cropr(query, rate=2, first=True, first_extra=0)
    assert none_extra.output_tokens(7, 1) == 1 + 6 - 2
    assert cropr(query, rate=2).output_tokens(7, 1) == 1 + 6 - 2
    # a part keeps at least one patch token
    assert cropr(query, rate=10).output_tokens(7, 1) == 2


def test_cropr_keeps_every_prefix_token():
    x = cropr_tokens()
    x[:, 1, 0] = -50.0  # a register scoring far below every patch
    query = torch.tensor([1.0, 0.0, 0.0, 0.0])
    reduction = cropr(query, rate=3).reduce(TokenState(x, torch.ones(2, 7), 2), Signals(0))
    assert reduction.x[0, :, 1].tolist() == [0, 1, 3, 6]
    assert reduction.x[1, :, 1].tolist() == [0, 1, 4, 3]


def test_cropr_auxiliary_loss_trains_only_the_module():
    torch.manual_seed(0)
    module = CroprModule(4, aux_out=3)
    reducer = bound(Cropr(rate=2, llf=False, first_extra=1, first=False), module, "cropr")
    x = torch.randn(2, 7, 4, requires_grad=True)
    ctx = TrainContext(aux_loss=lambda prediction: prediction.square().sum())
    reducer.reduce_train(TokenState(x, torch.ones(2, 7), 1), Signals(0), ctx)
    ctx.losses["cropr_aux"].backward()
    assert x.grad is None  # the module sees x.detach()
    assert module.query.grad is not None and float(module.query.grad.norm()) > 0


def test_cropr_own_cost_is_one_dot_product_per_patch_token():
    model = facts(dim=8)
    query = torch.zeros(8)
    assert cropr(query, rate=2).own_macs(17, model) == 16 * 8
    assert cropr(query, rate=2, first=True).own_macs(9, model) == 8 * 8
    assert cropr(query, rate=2).own_macs(9, facts(dim=8, prefix=5)) == 4 * 8
    assert cropr(query, rate=0).own_macs(17, model) == 0  # prunes nothing, costs nothing


# ------------------------------------------------------------------------------------ DTEM


def reference_soft_top_r(
    scores: list[list[float]], r: int, k2: int, tau1: float, tau2: float
) -> list[list[float]]:
    """DTEM's soft top-r for one image, in plain Python, from the documented steps."""
    eps = torch.finfo(torch.float32).eps
    rows, cols = len(scores), len(scores[0])
    k2 = min(k2, cols)
    candidates = [sorted(range(cols), key=lambda j, i=i: -scores[i][j])[:k2] for i in range(rows)]
    logits = [[scores[i][j] / tau1 for j in candidates[i]] for i in range(rows)]
    chosen = [[0.0] * k2 for _ in range(rows)]
    for _ in range(r):
        top = max(value / tau2 for row in logits for value in row)
        exps = [[math.exp(value / tau2 - top) for value in row] for row in logits]
        total = sum(sum(row) for row in exps)
        for i in range(rows):
            step = [value / total for value in exps[i]]
            chosen[i] = [c + s for c, s in zip(chosen[i], step, strict=True)]
            remaining = max(1.0 - sum(step), eps)
            logits[i] = [value + math.log(remaining) for value in logits[i]]
    out = [[0.0] * cols for _ in range(rows)]
    for i in range(rows):
        clip = max(sum(chosen[i]), 1.0)
        for k, j in enumerate(candidates[i]):
            out[i][j] = chosen[i][k] / clip
    return out


SCORES = [
    [0.9, 0.2, 0.5, -0.3],
    [0.1, 0.8, 0.7, 0.0],
    [0.6, -0.5, 0.55, 0.4],
]


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    flat = itertools.chain.from_iterable
    pairs = zip(flat(a), flat(b), strict=True)
    return max(abs(x - y) for x, y in pairs)


def test_dtem_soft_top_r_uses_both_temperatures_in_their_places():
    tau1, tau2 = 0.5, 0.2
    expected = reference_soft_top_r(SCORES, r=2, k2=2, tau1=tau1, tau2=tau2)
    # the answer tells the temperatures apart: swapping or dropping one changes it
    for wrong in [(tau2, tau1), (1.0, tau2), (tau1, 1.0)]:
        other = reference_soft_top_r(SCORES, r=2, k2=2, tau1=wrong[0], tau2=wrong[1])
        assert max_difference(other, expected) > 0.05
    ours = soft_top_r(torch.tensor([SCORES]), r=2, k2=2, tau1=tau1, tau2=tau2)[0]
    assert max_difference(ours.tolist(), expected) < 1e-6
    # only the k2 best candidates of each row get any mass
    assert (ours > 0).sum(dim=1).tolist() == [2, 2, 2]


def test_dtem_soft_top_r_accumulates_r_rounds_and_clips_rows():
    expected = reference_soft_top_r(SCORES, r=3, k2=3, tau1=0.2, tau2=0.1)
    ours = soft_top_r(torch.tensor([SCORES]), r=3, k2=3, tau1=0.2, tau2=0.1)[0]
    assert max_difference(ours.tolist(), expected) < 1e-6
    # rounds lower a chosen row, so r = 3 spreads its mass over three rows, each at most 1
    assert ours.sum().item() == pytest.approx(sum(map(sum, expected)), abs=1e-6)
    assert all(sum(row) <= 1 + 1e-6 for row in expected)
    assert sum(sum(row) for row in expected) > 2.5


def dtem(metric_weight: Tensor, **values: Any) -> DTEM:
    dim = metric_weight.shape[1]
    module = DTEMMetric(dim, metric_weight.shape[0])
    with torch.no_grad():
        module.proj.weight.copy_(metric_weight)
        module.proj.bias.zero_()
    settings = {"r": 1, "inflect": 0.0, "k2": 3, "tau1": 0.1, "tau2": 0.1, **values}
    return bound(DTEM(**settings), module, "dtem")


def test_dtem_training_merge_is_size_weighted():
    """A token of size 3 merges (with weight 1) into its twin of size 1: (3·xa + xb) / 4."""
    e = torch.eye(4)
    # CLS, then A0, B0, A1, B1: A0 and B0 share a direction (cosine 1); A1 is opposite B1
    # and orthogonal to B0, so the one soft choice (r = 1) is the edge A0 -> B0, with
    # weight 1 to float precision (exp(-100) next to exp(0) after the two temperatures).
    metric = torch.stack([e[3], e[0], e[0], -e[2], e[2]]).unsqueeze(0)
    x = torch.tensor([[[9.0, 9.0], [4.0, 0.0], [0.0, 8.0], [1.0, 1.0], [2.0, 3.0]]])
    size = torch.tensor([[1.0, 3.0, 1.0, 2.5, 1.5]])
    ctx = TrainContext()
    reduction = dtem(torch.eye(4), r=1).reduce_train(
        TokenState(x, size, 1), Signals(0, block_input=metric), ctx
    )
    # sorted by size: B0 (1 + 3), A1 (2.5), B1 (1.5), A0 (faded to 0)
    assert reduction.size.tolist() == [[1.0, 4.0, 2.5, 1.5, 0.0]]
    expected = torch.tensor([[[9.0, 9.0], [3.0, 2.0], [1.0, 1.0], [2.0, 3.0], [4.0, 0.0]]])
    torch.testing.assert_close(reduction.x, expected)
    assert ctx.scratch["dtem_active"] == 5 - 1


def reference_dtem_train(
    x: Tensor, size: Tensor, metric: Tensor, prefix: int, active: int, **values: Any
) -> tuple[Tensor, Tensor]:
    """DTEM's training merge for one image, from the documented steps (plain loops)."""
    unit = [row / row.norm() for row in metric]
    a_side = list(range(prefix, active, 2))
    b_side = list(range(prefix + 1, active, 2))
    r = min(values["r"], (active - prefix) // 2)
    scores = [[float(unit[i] @ unit[j]) for j in b_side] for i in a_side]
    assign = reference_soft_top_r(scores, r, values["k2"], values["tau1"], values["tau2"])
    new_x: dict[int, Tensor] = {}
    new_size: dict[int, float] = {}
    for col, j in enumerate(b_side):
        weights = [assign[row][col] * float(size[i]) for row, i in enumerate(a_side)]
        total = float(size[j]) + sum(weights)
        summed = float(size[j]) * x[j] + sum(w * x[i] for w, i in zip(weights, a_side, strict=True))
        new_x[j], new_size[j] = summed / total, total
    for row, i in enumerate(a_side):
        new_x[i] = x[i]
        new_size[i] = float(size[i]) * min(max(1.0 - sum(assign[row]), 0.0), 1.0)
    order = sorted(new_x, key=lambda t: -new_size[t])
    gaps = [new_size[a] - new_size[b] for a, b in itertools.pairwise(order)]
    assert min(gaps) > 1e-3, "the inputs must give distinct sizes, so the order is known"
    rows = [x[t] for t in range(prefix)] + [new_x[t] for t in order]
    rows += [x[t] for t in range(active, x.shape[0])]
    sizes = [float(size[t]) for t in range(prefix)] + [new_size[t] for t in order]
    sizes += [float(size[t]) for t in range(active, x.shape[0])]
    return torch.stack(rows), torch.tensor(sizes, dtype=x.dtype)


@pytest.mark.parametrize(
    "values",
    [
        {"r": 2, "k2": 2, "tau1": 0.3, "tau2": 0.5},
        {"r": 3, "k2": 3, "tau1": 0.8, "tau2": 0.6},
        {"r": 9, "k2": 1, "tau1": 1.5, "tau2": 2.0},  # r above its cap of 4
    ],
)
def test_dtem_training_merge_matches_its_documented_steps(values):
    """Two prefix tokens (both protected), nine active patches and two inactive ones."""
    generator = torch.Generator().manual_seed(4)
    prefix, active, tokens = 2, 11, 13
    x = torch.randn(2, tokens, 3, generator=generator, dtype=torch.float64)
    metric = torch.randn(2, tokens, 5, generator=generator, dtype=torch.float64)
    size = torch.tensor([1.0, 1.0, *[0.5 + 0.9 * i for i in range(11)]], dtype=torch.float64)
    size = torch.stack([size, size.flip(0)])
    size[:, :prefix] = 1.0
    ctx = TrainContext()
    ctx.scratch["dtem_active"] = active
    reducer = dtem(torch.eye(5, dtype=torch.float64), **values)
    reducer.module.double()
    reduction = reducer.reduce_train(
        TokenState(x, size, prefix), Signals(0, block_input=metric), ctx
    )
    for image in range(2):
        expected_x, expected_size = reference_dtem_train(
            x[image], size[image], metric[image], prefix, active, **values
        )
        torch.testing.assert_close(reduction.size[image], expected_size, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(reduction.x[image], expected_x, atol=1e-6, rtol=1e-6)
    assert ctx.scratch["dtem_active"] == active - min(values["r"], 4)
    # merging moves size, it does not create or destroy it
    torch.testing.assert_close(reduction.size.sum(dim=1), size.sum(dim=1))


def test_dtem_own_cost_is_the_metric_plus_the_matching():
    model = facts(dim=8, heads=2)  # f = head_dim = 4
    reducer = dtem(torch.zeros(4, 8), r=3)
    assert reducer.own_macs(17, model) == 17 * 8 * 4 + 9 * 8 * 4
    assert reducer.own_macs(16, model) == 16 * 8 * 4 + 8 * 8 * 4
    wide = dtem(torch.zeros(6, 8), r=3)  # a checkpoint's metric width wins over the default
    assert wide.own_macs(17, model) == 17 * 8 * 6 + 9 * 8 * 6
    assert dtem(torch.zeros(4, 8), r=0).own_macs(17, model) == 0


# ------------------------------------------------------------------------------------ MSTM


def mstm_case() -> tuple[TokenState, Signals, list[list[int]]]:
    """CLS + 6 patches. Importance makes p1, p3, p5 crucial (keep 0.5); each other patch
    is most cosine-similar to exactly one of them. Key p1 is long (norm 10), so that the
    raw dot product would send p4 to p1 though its direction is p3's.
    Image 2 is image 1 with the patches reversed. Returns the expected groups."""
    importance = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.02, 0.28])
    keys = torch.tensor(
        [
            [0.9, 0.1, 0.3],  # p0: closest to p1's direction
            [10.0, 0.0, 0.0],  # p1: crucial
            [0.1, 0.2, 5.0],  # p2: closest to p5
            [0.0, 1.0, 0.0],  # p3: crucial
            [0.5, 1.0, 0.0],  # p4: cosine says p3 (0.89 against 0.45), dot says p1
            [0.0, 0.0, 1.0],  # p5: crucial
        ]
    )
    cls_key = torch.tensor([[0.3, 0.3, 0.3]])
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 5, generator=generator, dtype=torch.float64)
    size = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.5, 1.0, 2.5], dtype=torch.float64)
    size = torch.stack([size, torch.cat([size[:1], size[1:].flip(0)])])
    signals = Signals(
        layer=3,
        keys=torch.stack([torch.cat([cls_key, keys]), torch.cat([cls_key, keys.flip(0)])]),
        cls_attn=torch.stack([importance, importance.flip(0)]),
    )
    # patch indices (1-based token indices) merged into each crucial token, in index order
    groups = [[[1, 2], [4, 5], [3, 6]], [[1, 4], [2, 3], [5, 6]]]
    return TokenState(x, size, 1), signals, groups


def test_mstm_keeps_the_most_attended_and_merges_into_the_most_similar():
    state, signals, groups = mstm_case()
    reduction = MSTM(keep=0.5, ms=False, first=True).reduce(state, signals)
    assert reduction.token_map.tolist() == [[0, 1, 1, 3, 2, 2, 3], [0, 1, 2, 2, 1, 3, 3]]
    for image in range(2):
        x, size = state.x[image], state.size[image]
        torch.testing.assert_close(reduction.x[image, 0], x[0])
        for slot, members in enumerate(groups[image], start=1):
            weights = size[members]
            expected = (weights[:, None] * x[members]).sum(0) / weights.sum()
            torch.testing.assert_close(reduction.x[image, slot], expected)
            assert float(reduction.size[image, slot]) == pytest.approx(float(weights.sum()))
    assert torch.equal(reduction.scores[:, 1:], signals.cls_attn)


def test_mstm_crucial_tokens_keep_their_own_place():
    """Two crucial tokens with the same key direction stay two tokens."""
    importance = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    keys = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]]])
    x = torch.arange(10.0).reshape(1, 5, 2)
    state = TokenState(x, torch.ones(1, 5), 1)
    reduction = MSTM(keep=0.5, ms=False, first=True).reduce(
        state, Signals(layer=3, keys=keys, cls_attn=importance)
    )
    # p0 and p2 are crucial; p2 is not merged into p0 although their keys are parallel
    assert reduction.token_map[0, 1].item() == 1 and reduction.token_map[0, 3].item() == 2
    assert torch.isfinite(reduction.x).all()


def test_mstm_keeps_the_ceiling_of_keep_times_n():
    state, signals, _ = mstm_case()
    reducer = MSTM(keep=0.6, ms=False, first=True)
    assert reducer.output_tokens(7, 1) == 1 + 4  # ⌈0.6 · 6⌉
    assert reducer.reduce(state, signals).x.shape[1] == 5


def test_mstm_own_cost():
    """T·D for the CLS attention row and (N − K)·K·head_dim for the non-crucial rows of the
    similarity, when it merges; with ms=1 at the part's first layer, the coarse patch
    embedding (Nc·3p²·D) and, on the full grid, the projection (Nc·D²)."""
    model = facts(dim=8, heads=2, patches=16)  # head_dim 4, a 4×4 grid of 16-px patches
    core = MSTM(keep=0.5, ms=False, first=True)
    assert core.own_macs(17, model) == 17 * 8 + (16 - 8) * 8 * 4
    assert core.own_macs(9, model) == 9 * 8 + (8 - 4) * 4 * 4
    assert MSTM(keep=1.0, ms=False, first=True).own_macs(17, model) == 0
    coarse = (4 // 2) ** 2  # half of the 4×4 grid
    embed, project = coarse * 3 * 16 * 16 * 8, coarse * 8 * 8
    fused = MSTM(keep=0.5, ms=True, first=True)
    assert fused.own_macs(17, model) == core.own_macs(17, model) + embed + project
    assert fused.own_macs(9, model) == core.own_macs(9, model) + embed
    # the fusion runs once, at the first layer of the part
    later = MSTM(keep=0.5, ms=True, first=False)
    assert later.own_macs(17, model) == core.own_macs(17, model)
    assert not later.wants_weights()


# ------------------------------------------------------------------------------------- LTM


def ltm(keep: float, *, alpha: float, beta: float, tau: float) -> LTM:
    module = LTMMask(4)
    with torch.no_grad():
        module.size_weight.fill_(alpha)
        module.redundancy_weight.fill_(beta)
        module.log_tau.fill_(math.log(tau))
    return bound(LTM(keep=keep), module, "ltm")


def ltm_case() -> tuple[TokenState, list[float]]:
    """CLS + 6 patches of known directions: p1 = U1, p3 = U2, p5 = U3 and one near each."""
    patches = torch.stack([2 * U1 + 0.3 * U2, U1, U3 + 0.2 * U1, U2, U2 + 0.1 * U3, U3])
    x = torch.cat([torch.full((1, 4), 7.0), patches]).unsqueeze(0)
    sizes = [1.0, 5.0, 2.0, 7.0, 3.0, 4.0]
    return TokenState(x, torch.tensor([[1.0, *sizes]]), 1), sizes


def test_ltm_merges_into_its_highest_scored_tokens():
    """With α = 1 and β = 0 the score is log(size): p3 (7), p1 (5) and p5 (4) are the
    targets; every other patch joins the target its direction is closest to."""
    state, sizes = ltm_case()
    reduction = ltm(0.5, alpha=1.0, beta=0.0, tau=0.02).reduce(state, Signals(layer=0))
    assert reduction.token_map.tolist() == [[0, 1, 1, 3, 2, 2, 3]]
    torch.testing.assert_close(reduction.scores[0, 1:], torch.tensor(sizes).log())
    # weights size_i · exp(s_i − max s) = size_i² / 7: an importance- and size-weighted mean
    patches = state.x[0, 1:]
    for slot, members in enumerate([[0, 1], [3, 4], [2, 5]], start=1):
        weights = torch.tensor([sizes[i] ** 2 for i in members])
        expected = (weights[:, None] * patches[members]).sum(0) / weights.sum()
        torch.testing.assert_close(reduction.x[0, slot], expected)
        assert reduction.size[0, slot].item() == pytest.approx(sum(sizes[i] for i in members))
    torch.testing.assert_close(reduction.x[0, 0], state.x[0, 0])


def test_ltm_redundant_tokens_are_merged_first():
    """With the untrained module (w = 0, α = 0, β = 5) the score is −5 × the token's
    highest cosine to another token: the two near-twins score lowest and merge."""
    patches = torch.stack([U1 + 0.3 * U2, U1 + 0.35 * U2, U2, U3])
    x = torch.cat([torch.zeros(1, 4), patches]).unsqueeze(0)
    state = TokenState(x, torch.tensor([[1.0, 1.0, 2.0, 3.0, 4.0]]), 1)
    reduction = ltm(0.5, alpha=0.0, beta=5.0, tau=0.02).reduce(state, Signals(layer=0))
    assert reduction.token_map.tolist() == [[0, 1, 1, 1, 2]]
    assert reduction.size.tolist() == [[1.0, 6.0, 4.0]]
    twin = cosine(patches[0], patches[1])
    expected = [-5 * twin, -5 * twin, -5 * cosine(patches[1], U2), 0.0]
    torch.testing.assert_close(reduction.scores[0, 1:], torch.tensor(expected))


def test_ltm_targets_keep_themselves():
    """A target whose own row would prefer another target (a near-twin with a higher
    score, at τ = 1) still keeps itself: targets are never merged away."""
    patches = torch.stack([U1, U1 + 0.2 * U2, U2, U3])
    x = torch.cat([torch.zeros(1, 4), patches]).unsqueeze(0)
    state = TokenState(x, torch.tensor([[1.0, 3.0, 9.0, 1.0, 1.0]]), 1)
    # scores log(size): targets p0 (3) and p1 (9); row p0 scores p1 higher than itself
    assert cosine(patches[0], patches[1]) + math.log(9) > 1.0 + math.log(3)
    reduction = ltm(0.5, alpha=1.0, beta=0.0, tau=1.0).reduce(state, Signals(layer=0))
    assert reduction.token_map.tolist() == [[0, 1, 2, 2, 2]]
    assert reduction.size.tolist() == [[1.0, 3.0, 11.0]]
    torch.testing.assert_close(reduction.x[0, 1], patches[0])


def test_ltm_discard_drops_the_tokens_that_fit_no_target():
    """discard=0.5 of the three non-targets is one row: the token whose best logit is
    lowest, here the one pointing away from every target."""
    patches = torch.stack([U1 + 0.1 * U2, U1, -(U1 + U2 + U3), U2, U2 + 0.1 * U3, U3])
    x = torch.cat([torch.zeros(1, 4), patches]).unsqueeze(0)
    state = TokenState(x, torch.tensor([[1.0, 1.0, 5.0, 2.0, 7.0, 3.0, 4.0]]), 1)
    reducer = ltm(0.5, alpha=1.0, beta=0.0, tau=0.02)
    reducer.values["discard"] = 0.5
    reduction = reducer.reduce(state, Signals(layer=0))
    assert reduction.token_map.tolist() == [[0, 1, 1, -1, 2, 2, 3]]
    assert reduction.size.tolist() == [[1.0, 1.0 + 5.0, 7.0 + 3.0, 4.0]]


def reference_ltm_soft(
    patches: Tensor, sizes: list[float], scores: list[float], targets: list[int], tau: float
) -> tuple[Tensor, list[float]]:
    """The soft merge of docs/methods.md, one image, plain loops over the mask G."""
    count = len(sizes)
    mask = []
    for i in range(count):
        if i in targets:
            mask.append([1.0 if j == i else 0.0 for j in targets])
            continue
        logits = [cosine(patches[i], patches[j]) / tau + scores[j] for j in targets]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        mask.append([v / sum(exps) for v in exps])
    top_score = max(scores)
    merged, new_sizes = [], []
    for col in range(len(targets)):
        weights = [mask[i][col] * sizes[i] * math.exp(scores[i] - top_score) for i in range(count)]
        merged.append(sum(w * patches[i] for i, w in enumerate(weights)) / sum(weights))
        new_sizes.append(sum(mask[i][col] * sizes[i] for i in range(count)))
    return torch.stack(merged), new_sizes


def test_ltm_training_merge_is_the_soft_mask():
    state, sizes = ltm_case()
    tau = 0.7  # warm: rows spread over several targets
    reduction = ltm(0.5, alpha=1.0, beta=0.0, tau=tau).reduce_train(
        state, Signals(layer=0), TrainContext()
    )
    scores = [math.log(s) for s in sizes]
    merged, new_sizes = reference_ltm_soft(state.x[0, 1:], sizes, scores, [1, 3, 5], tau)
    torch.testing.assert_close(reduction.x[0, 1:], merged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reduction.size[0, 1:], torch.tensor(new_sizes), atol=1e-5, rtol=0)
    assert sum(new_sizes) == pytest.approx(sum(sizes))


def test_ltm_keeps_the_ceiling_of_keep_times_n():
    state, _ = ltm_case()
    reducer = ltm(0.6, alpha=1.0, beta=0.0, tau=0.02)
    assert reducer.output_tokens(7, 1) == 1 + 4  # ⌈0.6 · 6⌉
    assert reducer.reduce(state, Signals(layer=0)).x.shape[1] == 5


def test_ltm_own_cost_is_scores_plus_similarities():
    model = facts(dim=8)
    reducer = LTM(keep=0.5)
    assert reducer.own_macs(17, model) == 16 * 8 + 16 * 16 * 8
    assert LTM(keep=1.0).own_macs(17, model) == 0


# ----------------------------------------------------------------------------- PatchMerger


def patchmerger(queries: Tensor) -> PatchMerger:
    module = PatchMergerModule(queries.shape[1], queries.shape[0])
    with torch.no_grad():
        module.queries.copy_(queries)
    return bound(PatchMerger(tokens=queries.shape[0]), module, "patchmerger")


def layer_norm(row: Tensor) -> Tensor:
    """LayerNorm with weight 1, bias 0 and eps 1e-5, written out."""
    mean = row.mean()
    variance = ((row - mean) ** 2).mean()
    return (row - mean) / torch.sqrt(variance + 1e-5)


def test_patchmerger_pools_with_softmax_over_the_patches():
    queries = torch.stack([2 * U1, 2 * U2])
    patches = torch.stack(
        [U1 + 0.5, 2 * U1 + 0.1 * U2, U2, U2 + 0.2 * U1 - 1.0, 0.5 * U1 + 0.4 * U2]
    )  # shifts and scales are undone by the norm
    x = torch.cat([torch.full((1, 4), 3.0), patches]).unsqueeze(0)
    size = torch.tensor([[1.0, 1.0, 2.0, 3.0, 1.0, 2.0]])
    reduction = patchmerger(queries).reduce(TokenState(x, size, 1), Signals(layer=5))

    normed = [layer_norm(row) for row in patches]
    assign = []
    for query in queries:  # each output: a softmax over the five patches, no 1/√D
        logits = [float(query @ row) for row in normed]
        exps = [math.exp(v - max(logits)) for v in logits]
        assign.append([v / sum(exps) for v in exps])
    expected = torch.stack([sum(w * row for w, row in zip(a, normed, strict=True)) for a in assign])
    torch.testing.assert_close(reduction.x[0, 1:], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reduction.x[0, 0], x[0, 0])
    soft = reduction.soft_assignment
    assert soft is not None
    torch.testing.assert_close(soft[0, 1:, 1:], torch.tensor(assign).T, atol=1e-6, rtol=1e-5)
    # hard segments: each patch goes to the output weighing it most; sizes count patches
    owners = [max(range(2), key=lambda m, j=j: assign[m][j]) for j in range(5)]
    assert owners == [0, 0, 1, 1, 0]  # the answer the directions were built for
    assert reduction.token_map.tolist() == [[0, *[o + 1 for o in owners]]]
    assert reduction.size.tolist() == [[1.0, 1.0 + 2.0 + 2.0, 3.0 + 1.0]]


def test_patchmerger_leaves_few_patches_alone():
    reducer = patchmerger(torch.stack([U1, U2, U3]))
    x = torch.randn(1, 4, 4)
    state = TokenState(x, torch.ones(1, 4), 1)
    assert reducer.output_tokens(4, 1) == 4
    assert torch.equal(reducer.reduce(state, Signals(layer=5)).x, x)
    assert reducer.output_tokens(5, 1) == 4


def test_patchmerger_own_cost_is_logits_plus_weighted_sum():
    model = facts(dim=8)
    reducer = PatchMerger(tokens=4)
    assert reducer.own_macs(17, model) == 2 * 4 * 16 * 8
    assert reducer.own_macs(5, model) == 0  # four patches: nothing to merge
