"""Per-image sweep metrics: hand-computed values, a hand-built k-NN vote, and a real run."""

from __future__ import annotations

import math

import pytest
import torch

from analysis import TokenScopeError, run
from analysis.metrics import (
    METRICS,
    Outputs,
    available_metrics,
    build_bank,
    knn_scores,
    per_image_values,
)


def unit(degrees: float, length: float = 1.0) -> list[float]:
    """A 2-D vector at ``degrees`` from the x axis."""
    radians = math.radians(degrees)
    return [length * math.cos(radians), length * math.sin(radians)]


def test_identical_outputs_give_perfect_fidelity() -> None:
    generator = torch.Generator().manual_seed(0)
    outputs = Outputs(
        torch.randn(5, 16, generator=generator), torch.randn(5, 10, generator=generator)
    )
    same = Outputs(outputs.features.clone(), outputs.logits.clone())
    assert per_image_values("feature_cosine", outputs, same) == pytest.approx([1.0] * 5, abs=1e-6)
    assert per_image_values("top1_agreement", outputs, same) == [1.0] * 5
    assert per_image_values("kl_divergence", outputs, same) == pytest.approx([0.0] * 5, abs=1e-12)


def test_fidelity_values_by_hand() -> None:
    reference = Outputs(
        torch.tensor([unit(0), unit(0, 3.0)]),
        torch.tensor([[0.0, 0.0], [2.0, 1.0]]),
    )
    # Image 0: features at 90° (cosine 0), softmax (0.75, 0.25) against (0.5, 0.5).
    # Image 1: features at 60° and twice as long (cosine 0.5), the top class flips.
    reduced = Outputs(
        torch.tensor([unit(90), unit(60, 6.0)]),
        torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]]),
    )
    assert per_image_values("feature_cosine", reduced, reference) == pytest.approx(
        [0.0, 0.5], abs=1e-6
    )
    assert per_image_values("top1_agreement", reduced, reference) == [1.0, 0.0]
    # KL(ref || reduced) = sum p_ref log(p_ref / p_red); the other direction differs.
    kl_0 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    p = torch.softmax(torch.tensor([2.0, 1.0], dtype=torch.float64), 0).tolist()
    kl_1 = p[0] * math.log(p[0] / p[1]) + p[1] * math.log(p[1] / p[0])
    assert per_image_values("kl_divergence", reduced, reference) == pytest.approx(
        [kl_0, kl_1], rel=1e-6
    )


def test_top1_and_top5_on_hand_built_logits() -> None:
    # Seven classes; the label sits at rank 1, rank 2, rank 5 and rank 6 of the reduced model.
    logits = torch.tensor(
        [
            [0.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0],
            [9.0, 8.0, 1.0, 2.0, 3.0, 4.0, 5.0],
            [0.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0],
            [0.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0],
        ]
    )
    labels = torch.tensor([1, 1, 5, 6])
    reduced = Outputs(torch.ones(4, 3), logits)
    reference = Outputs(torch.ones(4, 3), torch.zeros(4, 7))  # accuracy ignores the reference
    assert per_image_values("top1", reduced, reference, labels) == [1.0, 0.0, 0.0, 0.0]
    assert per_image_values("top5", reduced, reference, labels) == [1.0, 1.0, 1.0, 0.0]


def test_top1_refuses_labels_that_are_not_model_classes() -> None:
    outputs = Outputs(torch.ones(1, 3), torch.zeros(1, 7))
    with pytest.raises(TokenScopeError, match="class indices"):
        per_image_values("top1", outputs, outputs, torch.tensor([7]))


def hand_bank(k: int, temperature: float):
    """Class 0: one short vector along x. Class 1: two long vectors at ±60°.
    Class 2: three vectors at 90°, the farthest from a query along x."""
    features = torch.tensor(
        [unit(0, 0.5), unit(60, 3.0), unit(-60, 3.0), unit(90), unit(90, 2.0), unit(-90)]
    )
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    return build_bank(features, labels, num_classes=3, k=k, temperature=temperature)


def test_knn_scores_are_dino_weighted_votes() -> None:
    bank = hand_bank(k=3, temperature=0.07)
    scores = knn_scores(bank, torch.tensor([unit(0, 2.0)]))
    # The 3 nearest by cosine are the class-0 vector (cos 1) and the two class-1 ones
    # (cos 0.5); the class-2 vectors (cos 0) are beyond k and do not vote.
    expected = [math.exp(1 / 0.07), 2 * math.exp(0.5 / 0.07), 0.0]
    assert scores[0].tolist() == pytest.approx(expected, rel=1e-4)


def test_knn_weighting_beats_plain_majority() -> None:
    bank = hand_bank(k=3, temperature=0.07)
    queries = torch.tensor([unit(0), unit(75), unit(-80, 5.0)])
    labels = torch.tensor([0, 1, 2])
    # Query 0 (0°): the 3 nearest are class 0 (cos 1) and class 1 twice (cos 0.5). A plain
    # majority says class 1; the weighted vote says class 0, as exp(1/T) > 2 exp(0.5/T).
    # The class-0 vector is also the shortest, so an unnormalised dot product says class 1.
    # Query 1 (75°): class 1 at 60° and class 2 twice at 90° (all cos 0.966): class 2, wrong.
    # Query 2 (-80°): class 2 at -90° (cos 0.985), class 1 at -60° (0.940), class 0 (0.174):
    # class 2, right.
    assert math.exp(1 / 0.07) > 2 * math.exp(0.5 / 0.07)
    features = Outputs(queries)
    values = per_image_values("knn_top1", features, features, labels, bank)
    assert values == [1.0, 0.0, 1.0]


def test_knn_counts_only_k_neighbours() -> None:
    # At T=1 the three class-1 vectors at cos 0.8 outweigh the single class-0 one at cos 1
    # when all vote (3 e^0.8 > e^1); with k=1 only the nearest, class 0, votes.
    features = torch.tensor([unit(0), unit(36.87), unit(-36.87), unit(36.87, 2.0)])
    labels = torch.tensor([0, 1, 1, 1])
    query = Outputs(torch.tensor([unit(0)]))
    near = build_bank(features, labels, num_classes=2, k=1, temperature=1.0)
    wide = build_bank(features, labels, num_classes=2, k=4, temperature=1.0)
    assert per_image_values("knn_top1", query, query, torch.tensor([0]), near) == [1.0]
    assert per_image_values("knn_top1", query, query, torch.tensor([0]), wide) == [0.0]


def test_knn_scores_in_chunks_match_one_pass(monkeypatch) -> None:
    bank = hand_bank(k=3, temperature=0.07)
    queries = torch.tensor([unit(angle, 1 + angle / 90) for angle in (0, 40, 75, 130, -80)])
    whole = knn_scores(bank, queries)
    monkeypatch.setattr("analysis.metrics._QUERY_CHUNK", 2)  # 5 queries in 3 chunks
    assert torch.equal(knn_scores(bank, queries), whole)
    assert whole.argmax(dim=1).tolist() == [0, 1, 2, 2, 2]


def test_knn_bank_is_normalised_and_checked() -> None:
    bank = hand_bank(k=20, temperature=0.07)
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(len(bank.features)))
    with pytest.raises(ValueError, match="labels"):
        build_bank(torch.ones(2, 2), torch.tensor([0, 3]), num_classes=3)


def test_available_metrics() -> None:
    def names(**flags: bool) -> list[str]:
        base = dict(has_labels=False, labels_are_model_classes=False, has_bank=False)
        return available_metrics(**{**base, **flags})

    assert names(is_classifier=False) == ["feature_cosine"]
    assert names(is_classifier=True) == ["feature_cosine", "top1_agreement", "kl_divergence"]
    assert names(is_classifier=True, has_labels=True, labels_are_model_classes=True) == [
        "feature_cosine",
        "top1_agreement",
        "kl_divergence",
        "top1",
        "top5",
    ]
    # Dataset labels (Fashion-MNIST) are not the model's classes: k-NN only, given a bank.
    assert names(is_classifier=True, has_labels=True) == [
        "feature_cosine",
        "top1_agreement",
        "kl_divergence",
    ]
    assert names(is_classifier=False, has_labels=True, has_bank=True) == [
        "feature_cosine",
        "knn_top1",
    ]
    assert names(is_classifier=False, has_bank=True) == ["feature_cosine"]
    # Every name listed is described for the UI.
    assert all(METRICS[name].description for name in METRICS)


@pytest.mark.parametrize(
    ("metric", "reason"),
    [
        ("top1", "needs a classifier"),
        ("kl_divergence", "needs a classifier"),
        ("knn_top1", "needs a labelled k-NN bank"),
        ("nope", "unknown metric"),
    ],
)
def test_metrics_that_cannot_be_computed_say_why(metric: str, reason: str) -> None:
    backbone = Outputs(torch.ones(2, 4))
    with pytest.raises(TokenScopeError, match=reason) as caught:
        per_image_values(metric, backbone, backbone, torch.tensor([0, 1]))
    assert metric in str(caught.value)


def test_labels_are_required_where_needed() -> None:
    outputs = Outputs(torch.ones(2, 4), torch.zeros(2, 7))
    with pytest.raises(TokenScopeError, match=r"top5.*needs labelled images"):
        per_image_values("top5", outputs, outputs)


def test_outputs_join_batches_in_order() -> None:
    first = Outputs(torch.zeros(2, 3), torch.zeros(2, 4))
    second = Outputs(torch.ones(1, 3, dtype=torch.float64), torch.ones(1, 4))
    joined = Outputs.cat([first, second])
    assert joined.features.dtype == torch.float32
    assert joined.features[:, 0].tolist() == [0.0, 0.0, 1.0]
    assert joined.logits[:, 0].tolist() == [0.0, 0.0, 1.0]


def test_real_run_against_itself(test_vit) -> None:
    torch.manual_seed(1)
    images = torch.randn(2, 3, 160, 160)
    full = Outputs.from_run(run(test_vit, images, None))
    again = Outputs.from_run(run(test_vit, images, None))
    assert per_image_values("feature_cosine", again, full) == pytest.approx([1.0, 1.0], abs=1e-6)
    assert per_image_values("top1_agreement", again, full) == [1.0, 1.0]
    assert per_image_values("kl_divergence", again, full) == pytest.approx([0.0, 0.0], abs=1e-9)
    # A reduced run is not identical, so the cosine moves off 1.
    reduced = Outputs.from_run(run(test_vit, images, "topk:keep=0.25@0"))
    assert max(per_image_values("feature_cosine", reduced, full)) < 0.9999
