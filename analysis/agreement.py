"""How much two reduction methods agree, after Haurum et al., "Which Tokens to Use?" (2023).

Four views, each a number per pair of methods:

- **Kept patches** (pruning): the IoU of the sets of patches each method keeps at a layer.
- **Patch clusterings** (merging): the adjusted Rand index and the V-measure of the
  partitions of the patches into tokens at a layer. Both are computed here from the
  contingency table with numpy.
- **Final features**: linear CKA between the pooled features of a set of images.
- **Token depth**: the correlation (Pearson or Spearman) between the maps of the layer at
  which each patch stopped being a token of its own (:meth:`Trace.reduced_at`).

Choices, where the paper leaves room:

- *Kept* means, by default, **intact**: the patch is still a token of its own, neither
  dropped nor merged nor fused. For pure pruning (Top-K, random, Cropr) that is exactly
  "owner >= 0". It differs for EViT, whose dropped patches are fused into one extra token
  and so still have an owner: counting them as kept would make every EViT keep-set the
  whole image. ``kept="alive"`` gives the plain owner >= 0 reading. (A fused token that
  happens to hold a single patch counts as intact; this needs exactly one dropped patch.)
- *Dropped patches in a clustering* are, by default, **singletons**, each its own
  cluster: a dropped patch is grouped with nothing, and agreeing on which patches to drop
  is what the IoU measures. ``dropped="shared"`` puts them all in one "dropped" cluster
  instead, which makes pruning agreement count as clustering agreement. With singletons,
  two pure pruning methods always score 1: neither merges anything.
- *Degenerate cases*: two identical trivial partitions (all one cluster, or all
  singletons) have ARI 1 and V-measure 1 by convention (the formula's 0/0). Two empty
  kept-sets have IoU 1. A correlation with a constant map (a method that reduced no patch,
  or every patch at the same layer) is undefined and returns ``nan``, and so does CKA
  when one feature set is constant over the images (one image is always constant).
- Every metric is symmetric in its two methods.

Functions take ``image`` (an index into the batch) or ``image=None`` for the mean over all
images of the batch, NaNs ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from analysis.records import RunResult
from analysis.trace import Trace

KeptMode = Literal["intact", "alive"]
DroppedMode = Literal["singleton", "shared"]
CorrelationMethod = Literal["pearson", "spearman"]
Traced = Trace | RunResult
ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class AgreementMetric:
    """What the viewer needs to know about one agreement metric."""

    name: str
    label: str
    per_layer: bool  # needs a layer (else one value per pair)
    low: float  # the metric's range, for colour scales
    high: float
    needs_features: bool = False  # needs RunResult.features, not just the trace
    description: str = ""


METRICS: dict[str, AgreementMetric] = {
    metric.name: metric
    for metric in (
        AgreementMetric(
            "iou", "Kept-patch IoU", True, 0.0, 1.0,
            description="overlap of the patches each method keeps intact at a layer",
        ),
        AgreementMetric(
            "ari", "Adjusted Rand index", True, -0.5, 1.0,
            description="agreement of the patch-to-token clusterings, chance-corrected",
        ),
        AgreementMetric(
            "v_measure", "V-measure", True, 0.0, 1.0,
            description="harmonic mean of homogeneity and completeness of the clusterings",
        ),
        AgreementMetric(
            "depth_pearson", "Token depth (Pearson)", False, -1.0, 1.0,
            description="correlation of the layer at which each patch was reduced",
        ),
        AgreementMetric(
            "depth_spearman", "Token depth (Spearman)", False, -1.0, 1.0,
            description="rank correlation of the layer at which each patch was reduced",
        ),
        AgreementMetric(
            "cka", "Linear CKA of features", False, 0.0, 1.0, needs_features=True,
            description="similarity of the final pooled features over the batch of images",
        ),
    )
}  # fmt: skip


class ClusterAgreement(NamedTuple):
    """Agreement of two patch clusterings (unpacks as ``ari, v_measure``)."""

    ari: float
    v_measure: float


class AgreementMatrix(NamedTuple):
    """A method × method matrix (unpacks as ``names, matrix``); symmetric."""

    names: tuple[str, ...]
    matrix: np.ndarray  # [M, M] float64, NaN where undefined


# --- pruning: kept-patch IoU ------------------------------------------------------------


def kept_mask(trace: Trace, layer: int, image: int = 0, *, kept: KeptMode = "intact") -> np.ndarray:
    """[N] bool: the patches kept after ``layer`` (layer -1 is the input).

    ``"intact"``: still a token of its own; ``"alive"``: carried by any token (owner >= 0).
    """
    owner = _owner(trace, layer, image)
    alive = owner >= 0
    if kept == "alive":
        return alive
    if kept != "intact":
        raise ValueError(f"kept must be 'intact' or 'alive', got {kept!r}")
    counts = np.bincount(owner[alive], minlength=1)
    intact = np.zeros_like(alive)
    intact[alive] = counts[owner[alive]] == 1
    return intact


def kept_iou(
    trace_a: Trace,
    trace_b: Trace,
    layer: int,
    image: int | None = 0,
    *,
    kept: KeptMode = "intact",
) -> float:
    """IoU of the kept-patch sets of two traces after ``layer`` (1 when both are empty)."""
    _check_pair(trace_a, trace_b)

    def one(index: int) -> float:
        a = kept_mask(trace_a, layer, index, kept=kept)
        b = kept_mask(trace_b, layer, index, kept=kept)
        return set_iou(a, b)

    return _over_images(one, trace_a, image)


def set_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; 1 when both are empty."""
    union = int(np.count_nonzero(a | b))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(a & b)) / union


# --- merging: ARI and V-measure of the patch clusterings --------------------------------


def cluster_labels(
    trace: Trace, layer: int, image: int = 0, *, dropped: DroppedMode = "singleton"
) -> np.ndarray:
    """[N] int: each patch's cluster after ``layer`` (the token carrying it).

    Dropped patches get a negative label: a distinct one each (``"singleton"``) or -1 for
    all (``"shared"``).
    """
    owner = _owner(trace, layer, image).astype(np.int64)
    gone = owner < 0
    if dropped == "singleton":
        return np.where(gone, -1 - np.arange(owner.shape[0]), owner)
    if dropped == "shared":
        return np.where(gone, -1, owner)
    raise ValueError(f"dropped must be 'singleton' or 'shared', got {dropped!r}")


def contingency_table(labels_a: ArrayLike, labels_b: ArrayLike) -> np.ndarray:
    """[Ka, Kb] int64 counts of items in cluster i of ``a`` and cluster j of ``b``."""
    a, b = _as_labels(labels_a), _as_labels(labels_b)
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in length: {a.shape[0]} vs {b.shape[0]}")
    _, index_a = np.unique(a, return_inverse=True)
    _, index_b = np.unique(b, return_inverse=True)
    rows = int(index_a.max(initial=-1)) + 1
    cols = int(index_b.max(initial=-1)) + 1
    flat = np.bincount(index_a * cols + index_b, minlength=rows * cols)
    return flat.reshape(rows, cols).astype(np.int64)


def adjusted_rand_index(labels_a: ArrayLike, labels_b: ArrayLike) -> float:
    """Hubert & Arabie's adjusted Rand index of two labelings of the same items.

    1 for identical partitions (whatever the label names), about 0 for chance, as low
    as -0.5. Two identical trivial partitions (one cluster, or all singletons) give 1.
    """
    table = contingency_table(labels_a, labels_b)
    n = int(table.sum())
    pairs = _pairs(table).sum()
    pairs_a = _pairs(table.sum(axis=1)).sum()
    pairs_b = _pairs(table.sum(axis=0)).sum()
    total = n * (n - 1) / 2
    if pairs_a == pairs_b and pairs_a in (0, total):  # both all singletons, or both one cluster
        return 1.0  # the formula's 0/0
    expected = pairs_a * pairs_b / total
    maximum = (pairs_a + pairs_b) / 2
    return float((pairs - expected) / (maximum - expected))


def homogeneity_completeness(labels_a: ArrayLike, labels_b: ArrayLike) -> tuple[float, float]:
    """Rosenberg & Hirschberg's homogeneity and completeness of ``b`` against ``a``.

    Homogeneity is 1 when each cluster of ``b`` lies inside one cluster of ``a``;
    completeness is 1 when each cluster of ``a`` lies inside one cluster of ``b``.
    """
    table = contingency_table(labels_a, labels_b).astype(np.float64)
    n = table.sum()
    if n == 0:
        return 1.0, 1.0
    sizes_a, sizes_b = table.sum(axis=1), table.sum(axis=0)
    entropy_a = _entropy(sizes_a / n)
    entropy_b = _entropy(sizes_b / n)
    rows, cols = np.nonzero(table)
    joint = table[rows, cols] / n
    a_given_b = -float(np.sum(joint * np.log(table[rows, cols] / sizes_b[cols])))
    b_given_a = -float(np.sum(joint * np.log(table[rows, cols] / sizes_a[rows])))
    homogeneity = 1.0 if entropy_a == 0 else 1.0 - a_given_b / entropy_a
    completeness = 1.0 if entropy_b == 0 else 1.0 - b_given_a / entropy_b
    return float(np.clip(homogeneity, 0, 1)), float(np.clip(completeness, 0, 1))


def v_measure(labels_a: ArrayLike, labels_b: ArrayLike) -> float:
    """The V-measure (beta = 1): harmonic mean of homogeneity and completeness; symmetric."""
    homogeneity, completeness = homogeneity_completeness(labels_a, labels_b)
    if homogeneity + completeness == 0:
        return 0.0
    return 2 * homogeneity * completeness / (homogeneity + completeness)


def cluster_agreement(
    trace_a: Trace,
    trace_b: Trace,
    layer: int,
    image: int | None = 0,
    *,
    dropped: DroppedMode = "singleton",
) -> ClusterAgreement:
    """ARI and V-measure of the two traces' patch clusterings after ``layer``."""
    _check_pair(trace_a, trace_b)

    def labels(index: int) -> tuple[np.ndarray, np.ndarray]:
        return (
            cluster_labels(trace_a, layer, index, dropped=dropped),
            cluster_labels(trace_b, layer, index, dropped=dropped),
        )

    ari = _over_images(lambda i: adjusted_rand_index(*labels(i)), trace_a, image)
    v = _over_images(lambda i: v_measure(*labels(i)), trace_a, image)
    return ClusterAgreement(ari=ari, v_measure=v)


# --- final features: linear CKA ---------------------------------------------------------


def linear_cka(x: ArrayLike, y: ArrayLike) -> float:
    """Linear CKA (Kornblith et al., 2019) of two feature sets over the same n images.

    ``x`` is [n, d1] and ``y`` [n, d2]. 1 for features equal up to an orthogonal map and
    a scale, 0 when their centred features are orthogonal; ``nan`` when either set is
    constant over the images (always so for n = 1).
    """
    a, b = _as_features(x), _as_features(y)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"feature sets cover different images: {a.shape[0]} vs {b.shape[0]}")
    a = a - a.mean(axis=0, keepdims=True)
    b = b - b.mean(axis=0, keepdims=True)
    if a.shape[0] <= min(a.shape[1], b.shape[1]):  # the n × n Gram form is cheaper
        gram_a, gram_b = a @ a.T, b @ b.T
        cross = float(np.sum(gram_a * gram_b))
        norm_a, norm_b = float(np.linalg.norm(gram_a)), float(np.linalg.norm(gram_b))
    else:
        cross = float(np.linalg.norm(b.T @ a) ** 2)
        norm_a, norm_b = float(np.linalg.norm(a.T @ a)), float(np.linalg.norm(b.T @ b))
    if norm_a == 0 or norm_b == 0:
        return float("nan")
    return float(np.clip(cross / (norm_a * norm_b), 0.0, 1.0))


# --- token depth ------------------------------------------------------------------------


def depth_correlation(
    trace_a: Trace,
    trace_b: Trace,
    image: int | None = 0,
    *,
    method: CorrelationMethod = "pearson",
) -> float:
    """Correlation of the two traces' token-depth maps (:meth:`Trace.reduced_at`).

    ``nan`` when either map is constant (nothing reduced, or all at one layer).
    """
    _check_pair(trace_a, trace_b)
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    correlate = pearson if method == "pearson" else spearman
    depth_a = trace_a.reduced_at().numpy()
    depth_b = trace_b.reduced_at().numpy()
    return _over_images(lambda i: correlate(depth_a[i], depth_b[i]), trace_a, image)


def pearson(a: ArrayLike, b: ArrayLike) -> float:
    """Pearson correlation of two equal-length vectors; ``nan`` if either is constant."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"vectors differ in length: {x.shape[0]} vs {y.shape[0]}")
    x = x - x.mean()
    y = y - y.mean()
    scale = float(np.sqrt(np.sum(x * x) * np.sum(y * y)))
    if scale == 0:
        return float("nan")
    return float(np.clip(np.sum(x * y) / scale, -1.0, 1.0))


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation (ties get their average rank); ``nan`` if either is constant."""
    return pearson(average_ranks(a), average_ranks(b))


def average_ranks(values: ArrayLike) -> np.ndarray:
    """Ranks from 1, ties sharing the mean of the ranks they span."""
    x = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(x, kind="stable")
    sorted_values = x[order]
    starts = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], x.shape[0]] - 1
    ranks = np.empty_like(x)
    ranks[order] = (first[group] + last[group]) / 2 + 1
    return ranks


# --- over layers and over methods -------------------------------------------------------


def agreement(
    a: Traced,
    b: Traced,
    metric: str,
    layer: int | None = None,
    image: int | None = 0,
    *,
    kept: KeptMode = "intact",
    dropped: DroppedMode = "singleton",
) -> float:
    """One metric (a key of :data:`METRICS`) for one pair of methods.

    ``layer`` is needed by the per-layer metrics and ignored by the others. CKA needs
    :class:`RunResult` inputs (it uses their features over the whole batch; ``image`` is
    ignored). ``kept`` applies to the IoU and ``dropped`` to ARI and V-measure.
    """
    spec = _metric(metric)
    if spec.needs_features:
        if not (isinstance(a, RunResult) and isinstance(b, RunResult)):
            raise ValueError(f"'{metric}' compares features: pass RunResults, not Traces")
        return linear_cka(a.features, b.features)
    trace_a, trace_b = _trace(a), _trace(b)
    if spec.per_layer:
        if layer is None:
            raise ValueError(f"'{metric}' is measured at a layer: pass layer=")
        if metric == "iou":
            return kept_iou(trace_a, trace_b, layer, image, kept=kept)
        scores = cluster_agreement(trace_a, trace_b, layer, image, dropped=dropped)
        return scores.ari if metric == "ari" else scores.v_measure
    method = "pearson" if metric == "depth_pearson" else "spearman"
    return depth_correlation(trace_a, trace_b, image, method=method)


def agreement_over_layers(
    a: Traced,
    b: Traced,
    metric: str,
    image: int | None = 0,
    *,
    kept: KeptMode = "intact",
    dropped: DroppedMode = "singleton",
) -> list[float]:
    """A per-layer metric at every layer of the two traces (for a line over depth)."""
    spec = _metric(metric)
    if not spec.per_layer:
        raise ValueError(f"'{metric}' is not measured per layer")
    trace_a, trace_b = _trace(a), _trace(b)
    _check_pair(trace_a, trace_b)
    return [
        agreement(trace_a, trace_b, metric, layer, image, kept=kept, dropped=dropped)
        for layer in range(len(trace_a.layers))
    ]


def agreement_matrix(
    runs: Mapping[str, Traced],
    metric: str,
    layer: int | None = None,
    image: int | None = 0,
    *,
    kept: KeptMode = "intact",
    dropped: DroppedMode = "singleton",
) -> AgreementMatrix:
    """The metric between every pair of methods, named by the mapping's keys, in order.

    The matrix is symmetric; its diagonal is each method against itself (1, or ``nan``
    where the metric is undefined for that method, e.g. a constant depth map).
    """
    names = tuple(runs)
    values = list(runs.values())
    matrix = np.full((len(names), len(names)), np.nan)
    for i in range(len(names)):
        for j in range(i, len(names)):
            score = agreement(
                values[i], values[j], metric, layer, image, kept=kept, dropped=dropped
            )
            matrix[i, j] = matrix[j, i] = score
    return AgreementMatrix(names=names, matrix=matrix)


# --- helpers ----------------------------------------------------------------------------


def _metric(name: str) -> AgreementMetric:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric '{name}' (known: {', '.join(METRICS)})") from None


def _trace(item: Traced) -> Trace:
    return item.trace if isinstance(item, RunResult) else item


def _owner(trace: Trace, layer: int, image: int) -> np.ndarray:
    depth = len(trace.layers)
    if not -1 <= layer < depth:
        raise IndexError(f"layer {layer} is outside the trace (-1 for the input, 0-{depth - 1})")
    owner = trace.owner_at(layer)
    if not 0 <= image < owner.shape[0]:
        raise IndexError(f"image {image} is outside the batch of {owner.shape[0]}")
    return owner[image].numpy().astype(np.int64)


def _batch(trace: Trace) -> int:
    if trace.layers:
        return int(trace.layers[0].owner.shape[0])
    return int(trace.dropped_at.shape[0]) if trace.dropped_at is not None else 1


def _check_pair(trace_a: Trace, trace_b: Trace) -> None:
    if trace_a.grid != trace_b.grid:
        raise ValueError(f"traces cover different patch grids: {trace_a.grid} vs {trace_b.grid}")
    if len(trace_a.layers) != len(trace_b.layers):
        raise ValueError(
            f"traces have different depths: {len(trace_a.layers)} vs {len(trace_b.layers)}"
        )
    if _batch(trace_a) != _batch(trace_b):
        raise ValueError(
            f"traces cover different batches: {_batch(trace_a)} vs {_batch(trace_b)} images"
        )


def _over_images(score: Callable[[int], float], trace: Trace, image: int | None) -> float:
    if image is not None:
        return float(score(image))
    values = np.array([score(index) for index in range(_batch(trace))], dtype=np.float64)
    if np.all(np.isnan(values)):
        return float("nan")
    return float(np.nanmean(values))


def _pairs(counts: np.ndarray) -> np.ndarray:
    counts = counts.astype(np.float64)
    return counts * (counts - 1) / 2


def _entropy(probabilities: np.ndarray) -> float:
    p = probabilities[probabilities > 0]
    return float(-np.sum(p * np.log(p)))


def _as_labels(labels: ArrayLike) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels).ravel()


def _as_features(features: ArrayLike) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().float().cpu().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"features must be [n, d], got shape {array.shape}")
    return array


__all__ = [
    "METRICS",
    "AgreementMatrix",
    "AgreementMetric",
    "ClusterAgreement",
    "adjusted_rand_index",
    "agreement",
    "agreement_matrix",
    "agreement_over_layers",
    "average_ranks",
    "cluster_agreement",
    "cluster_labels",
    "contingency_table",
    "depth_correlation",
    "homogeneity_completeness",
    "kept_iou",
    "kept_mask",
    "linear_cka",
    "pearson",
    "set_iou",
    "spearman",
    "v_measure",
]
