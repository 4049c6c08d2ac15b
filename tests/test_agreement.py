"""Agreement between methods: hand-checked metric values and real traces from the engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis import run
from analysis.agreement import (
    METRICS,
    adjusted_rand_index,
    agreement,
    agreement_matrix,
    agreement_over_layers,
    average_ranks,
    cluster_agreement,
    cluster_labels,
    contingency_table,
    depth_correlation,
    homogeneity_completeness,
    kept_iou,
    kept_mask,
    linear_cka,
    pearson,
    spearman,
    v_measure,
)
from analysis.trace import LayerTrace, Trace


def make_trace(*owners: list[int], grid: tuple[int, int] = (2, 3), prefix: int = 1) -> Trace:
    """A one-image trace from each layer's patch -> token list (-1: dropped)."""
    num_patches = grid[0] * grid[1]
    trace = Trace(grid=grid, num_prefix=prefix)
    dropped_at = torch.full((1, num_patches), -1, dtype=torch.int32)
    for layer, owner in enumerate(owners):
        assert len(owner) == num_patches
        owner_t = torch.tensor([owner], dtype=torch.int32)
        tokens = max(prefix, max(owner) + 1)
        sizes = torch.ones(1, tokens)
        alive = owner_t[owner_t >= 0].long()
        sizes[0, prefix:] = 0
        sizes[0].index_add_(0, alive, torch.ones(alive.shape[0]))
        newly = (owner_t < 0) & (dropped_at < 0)
        dropped_at = torch.where(newly, layer, dropped_at)
        trace.layers.append(LayerTrace(layer=layer, tokens=tokens, owner=owner_t, sizes=sizes))
    trace.dropped_at = dropped_at
    return trace


# --- clustering metrics on labelings ----------------------------------------------------


def test_contingency_table():
    table = contingency_table([0, 0, 0, 1, 1, 1], [5, 5, 7, 7, 9, 9])
    assert table.tolist() == [[2, 1, 0], [0, 1, 2]]


def test_ari_textbook_values():
    # Pairs: sum C(n_ij, 2) = 1, rows 1, columns 2, of C(4, 2) = 6: (1 - 1/3) / (3/2 - 1/3).
    assert adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(4 / 7)
    # Table [[2, 1, 0], [0, 1, 2]]: (2 - 6*3/15) / (4.5 - 1.2) = 8/33.
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(8 / 33)
    # The most discordant split of four items: -1/2.
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    # One cluster against all singletons: no pair agrees beyond chance.
    assert adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0


def test_v_measure_textbook_values():
    assert v_measure([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(0.8)
    assert homogeneity_completeness([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx((1.0, 2 / 3))
    # a = [0,0,0,1,1,1], b = [0,0,1,1,2,2]: h = 1 - (ln 2 / 3) / ln 2, c = (2/3) ln 2 / ln 3.
    h, c = 2 / 3, (2 / 3) * math.log(2) / math.log(3)
    assert homogeneity_completeness([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx((h, c))
    assert v_measure([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(2 * h * c / (h + c))
    assert v_measure([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0


@pytest.mark.parametrize("score", [adjusted_rand_index, v_measure])
def test_clustering_scores_identity_permutation_symmetry(score):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, size=50)
    b = rng.integers(0, 4, size=50)
    assert score(a, a) == pytest.approx(1.0)
    relabel = rng.permutation(100)  # a different name for every cluster
    assert score(relabel[a], a) == pytest.approx(1.0)
    assert score(relabel[a], b) == pytest.approx(score(a, b))
    assert score(a, b) == pytest.approx(score(b, a))
    assert score(torch.tensor(a), torch.tensor(b)) == pytest.approx(score(a, b))


@pytest.mark.parametrize("score", [adjusted_rand_index, v_measure])
def test_trivial_partitions_agree_by_convention(score):
    assert score([3, 3, 3, 3], [0, 0, 0, 0]) == 1.0  # one cluster each
    assert score([0, 1, 2, 3], [7, 6, 5, 4]) == 1.0  # all singletons each
    assert score([0], [0]) == 1.0


# --- kept-patch IoU and clusterings on traces ---------------------------------------------


def test_kept_iou_identical_disjoint_and_partial():
    # Six patches, one prefix token: owners >= 1, -1 dropped.
    keep_012 = make_trace([1, 2, 3, -1, -1, -1])
    keep_345 = make_trace([-1, -1, -1, 1, 2, 3])
    keep_123 = make_trace([-1, 1, 2, 3, -1, -1])
    assert kept_iou(keep_012, keep_012, 0) == 1.0
    assert kept_iou(keep_012, keep_345, 0) == 0.0
    assert kept_iou(keep_012, keep_123, 0) == pytest.approx(2 / 4)
    assert kept_iou(keep_012, keep_123, -1) == 1.0  # the input: everything kept
    nothing = make_trace([-1] * 6)
    assert kept_iou(nothing, nothing, 0) == 1.0  # two empty sets are the same set


def test_kept_means_intact_so_fused_patches_are_not_kept():
    # EViT-like: patches 3-5 fused into token 4; ToMe-like: 0+1 merged, the rest intact.
    fused = make_trace([1, 2, 3, 4, 4, 4])
    merged = make_trace([1, 1, 2, 3, 4, 5])
    pruned = make_trace([1, 2, 3, -1, -1, -1])
    assert kept_mask(fused, 0).tolist() == [True, True, True, False, False, False]
    assert kept_mask(fused, 0, kept="alive").all()
    assert kept_iou(fused, pruned, 0) == 1.0
    assert kept_iou(fused, pruned, 0, kept="alive") == pytest.approx(3 / 6)
    assert kept_iou(merged, pruned, 0) == pytest.approx(1 / 6)  # {2,3,4,5} vs {0,1,2}


def test_cluster_agreement_on_traces_and_dropped_modes():
    a = make_trace([1, 1, 2, 2, 3, 3])
    renamed = make_trace([3, 3, 1, 1, 2, 2])
    assert cluster_agreement(a, renamed, 0) == (1.0, 1.0)
    ari, v = cluster_agreement(a, make_trace([1, 1, 1, 2, 2, 2]), 0)
    assert ari == pytest.approx(adjusted_rand_index([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1]))
    assert v == pytest.approx(v_measure([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1]))

    pruned = make_trace([-1, -1, 1, 2, 3, 4])  # patches 0 and 1 dropped
    merged = make_trace([1, 1, 2, 3, 4, 5])  # patches 0 and 1 merged
    assert cluster_labels(pruned, 0).tolist() == [-1, -2, 1, 2, 3, 4]
    assert cluster_labels(pruned, 0, dropped="shared").tolist() == [-1, -1, 1, 2, 3, 4]
    # Singletons: pruning is no clustering, so it shares nothing with the merge.
    assert cluster_agreement(pruned, merged, 0).ari == 0.0
    # Shared: "both grouped 0 with 1" counts as agreement.
    assert cluster_agreement(pruned, merged, 0, dropped="shared") == (1.0, 1.0)
    # Two pruning methods never merge: singletons make them trivially equal.
    other = make_trace([1, 2, -1, -1, 3, 4])
    assert cluster_agreement(pruned, other, 0) == (1.0, 1.0)


# --- linear CKA ---------------------------------------------------------------------------


def test_cka_invariances():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 8))
    y = x @ rng.normal(size=(8, 5)) + 0.5 * rng.normal(size=(20, 5))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)
    base = linear_cka(x, y)
    assert 0.0 < base < 1.0
    assert linear_cka(x @ q, y) == pytest.approx(base)
    assert linear_cka(x, 0.01 * y) == pytest.approx(base)
    assert linear_cka(x + 5.0, y) == pytest.approx(base)  # a shift is centred away
    assert linear_cka(y, x) == pytest.approx(base)
    # Few images, many features: the n × n Gram path; check it against the feature form.
    wide = rng.normal(size=(6, 30))
    wide_y = wide @ rng.normal(size=(30, 40)) + rng.normal(size=(6, 40))
    a, b = wide - wide.mean(0), wide_y - wide_y.mean(0)
    feature_form = np.linalg.norm(b.T @ a) ** 2 / np.linalg.norm(a.T @ a) / np.linalg.norm(b.T @ b)
    assert linear_cka(wide, wide_y) == pytest.approx(feature_form)
    assert linear_cka(torch.tensor(x), torch.tensor(y)) == pytest.approx(base)


def test_cka_hand_values_and_undefined_cases():
    # One feature each: CKA is the squared Pearson correlation, here 0.8² (centred dot 4 / 5).
    assert linear_cka([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.64)
    # Orthogonal after centring.
    assert linear_cka([[1], [-1], [1], [-1]], [[1], [1], [-1], [-1]]) == pytest.approx(0.0)
    assert math.isnan(linear_cka(np.ones((5, 3)), np.random.default_rng(0).normal(size=(5, 3))))
    assert math.isnan(linear_cka([[1.0, 2.0]], [[3.0, 4.0]]))  # a single image
    with pytest.raises(ValueError, match="different images"):
        linear_cka(np.zeros((3, 2)), np.zeros((4, 2)))


# --- token depth ----------------------------------------------------------------------------


def test_ranks_and_correlations():
    assert average_ranks([3, 1, 3, 2, 3]).tolist() == [4, 1, 4, 2, 4]
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 2, 3], [5, 5, 5]))
    # Monotone but not linear: Spearman 1, Pearson below 1.
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 10, 100, 1000]) < 0.95
    # Ties: ranks [1, 2, 3.5, 5, 3.5] against 1..5.
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(
        pearson([1, 2, 3, 4, 5], [1, 2, 3.5, 5, 3.5])
    )


def test_depth_correlation_on_traces():
    # Patches dropped at layers 0, 1, 2 (and three never reduced: depth 3).
    early = make_trace([-1, 1, 2, 3, 4, 5], [-1, -1, 1, 2, 3, 4], [-1, -1, -1, 1, 2, 3])
    late = make_trace([1, 2, 3, 4, 5, -1], [1, 2, 3, 4, -1, -1], [1, 2, 3, -1, -1, -1])
    assert early.reduced_at()[0].tolist() == [0, 1, 2, 3, 3, 3]
    assert depth_correlation(early, early) == pytest.approx(1.0)
    expected = pearson([0, 1, 2, 3, 3, 3], [3, 3, 3, 2, 1, 0])
    assert depth_correlation(early, late) == pytest.approx(expected)
    assert depth_correlation(early, late, method="spearman") == pytest.approx(
        spearman([0, 1, 2, 3, 3, 3], [3, 3, 3, 2, 1, 0])
    )
    untouched = make_trace(*[[1, 2, 3, 4, 5, 6]] * 3)
    assert math.isnan(depth_correlation(early, untouched))  # a constant map


def test_mismatched_traces_and_bad_arguments_are_refused():
    a = make_trace([1, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="grid"):
        kept_iou(a, make_trace([1, 2, 3, 4], grid=(2, 2)), 0)
    with pytest.raises(ValueError, match="depths"):
        cluster_agreement(a, make_trace([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]), 0)
    with pytest.raises(IndexError, match="layer 3"):
        kept_iou(a, a, 3)
    with pytest.raises(IndexError, match="image 1"):
        kept_iou(a, a, 0, image=1)
    with pytest.raises(ValueError, match="unknown metric"):
        agreement(a, a, "nmi", 0)
    with pytest.raises(ValueError, match="layer="):
        agreement(a, a, "iou")
    with pytest.raises(ValueError, match="RunResults"):
        agreement(a, a, "cka")
    with pytest.raises(ValueError, match="per layer"):
        agreement_over_layers(a, a, "depth_pearson")


# --- real traces from the engine --------------------------------------------------------


@pytest.fixture(scope="module")
def runs(test_vit):
    torch.manual_seed(0)
    images = torch.randn(3, 3, 160, 160)
    return {
        "ToMe": run(test_vit, images, "tome:r=10"),
        "ToMe again": run(test_vit, images, "tome:r=10"),
        "EViT": run(test_vit, images, "evit:keep=0.6@1,3"),
        "Top-K": run(test_vit, images, "topk:keep=0.6@1,3"),
    }


def test_same_schedule_twice_agrees_everywhere(runs):
    a, b = runs["ToMe"], runs["ToMe again"]
    depth = len(a.trace.layers)
    for metric in ("iou", "ari", "v_measure"):
        assert agreement_over_layers(a, b, metric, image=None) == pytest.approx([1.0] * depth)
    assert agreement(a, b, "depth_pearson", image=None) == pytest.approx(1.0)
    assert agreement(a, b, "depth_spearman", image=2) == pytest.approx(1.0)
    assert agreement(a, b, "cka") == pytest.approx(1.0)


def test_different_methods_give_values_in_range(runs):
    tome, evit, topk = runs["ToMe"], runs["EViT"], runs["Top-K"]
    for metric in ("iou", "ari", "v_measure"):
        spec = METRICS[metric]
        for image in (0, 1, None):
            values = agreement_over_layers(tome, evit, metric, image=image)
            assert len(values) == len(tome.trace.layers)
            assert all(spec.low - 1e-9 <= v <= spec.high + 1e-9 for v in values)
    # Top-K and EViT keep by the same CLS attention at layer 1: the same patches.
    assert kept_iou(evit.trace, topk.trace, 1) == 1.0
    # Nothing reduced before layer 1; after it ToMe has merged, so the clusterings differ.
    assert cluster_agreement(tome.trace, evit.trace, 0).ari < 1.0
    rho = depth_correlation(tome.trace, evit.trace, image=None)
    assert -1.0 <= rho <= 1.0
    assert 0.0 <= agreement(tome, evit, "cka") <= 1.0


def test_agreement_matrix_is_symmetric_with_unit_diagonal(runs):
    names, matrix = agreement_matrix(runs, "iou", layer=3)
    assert names == ("ToMe", "ToMe again", "EViT", "Top-K")
    assert matrix.shape == (4, 4)
    assert np.allclose(matrix, matrix.T)
    assert np.allclose(np.diag(matrix), 1.0)
    assert matrix[0, 1] == pytest.approx(1.0)
    traces = {name: result.trace for name, result in runs.items()}
    for metric, spec in METRICS.items():
        if spec.needs_features:
            result = agreement_matrix(runs, metric)
        else:
            result = agreement_matrix(traces, metric, layer=2, image=None)
        finite = result.matrix[np.isfinite(result.matrix)]
        assert np.all((finite >= spec.low - 1e-9) & (finite <= spec.high + 1e-9)), metric
