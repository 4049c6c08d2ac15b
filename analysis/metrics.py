"""Per-image metric values that compare a reduced model with the full one, for sweeps.

A sweep runs the unreduced model once on an image set (the *reference*) and then each
reduced schedule; every metric here turns one schedule's outputs into one value per image.
Means and intervals are made later from these values (``analysis.curves.bootstrap``), so
one process or many give the same numbers as long as the values are ordered by image.

Fidelity metrics need no labels: ``feature_cosine`` works for any backbone, and
``top1_agreement`` and ``kl_divergence`` for a classifier. Accuracy metrics need labels:
``top1``/``top5`` when the labels are the model's own class indices (ImageNet folders on
an ImageNet classifier), and ``knn_top1`` for any labelled set through a k-NN bank.

**Why the k-NN bank is built from the full model.** ``knn_top1`` follows DINO's weighted
k-NN evaluation (k=20, T=0.07): each test image votes with its k nearest bank images by
cosine similarity, weighted by ``exp(sim / T)``. DINO builds the bank and the queries with
the same model, which for a sweep would mean a new bank for every schedule: the whole
train split forwarded again at every point. Here the bank is computed once, with the full
model, and reused by every point, so a point costs only its test images. It also answers a
practical question: how well does the reduced model work as a drop-in replacement for
queries against an index that was built with the full model? At the reference point (no
reduction) both protocols agree; away from it this one also charges the reduced model for
drifting away from the full model's feature space, so it can read lower than DINO's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from analysis.errors import TokenScopeError

if TYPE_CHECKING:
    from analysis.records import RunResult

_QUERY_CHUNK = 1024  # k-NN queries per similarity matrix: bounds memory on big banks


@dataclass(frozen=True)
class MetricInfo:
    """What a metric means and what it needs, the one source for the UI, CLI and docs."""

    name: str
    label: str
    higher_is_better: bool
    needs_labels: bool
    needs_classifier: bool
    needs_bank: bool
    description: str


METRICS: dict[str, MetricInfo] = {
    info.name: info
    for info in (
        MetricInfo(
            "feature_cosine",
            "Feature cosine to full",
            higher_is_better=True,
            needs_labels=False,
            needs_classifier=False,
            needs_bank=False,
            description="Cosine similarity between the reduced and the full model's pooled "
            "features of the same image (1 = unchanged).",
        ),
        MetricInfo(
            "top1_agreement",
            "Top-1 agreement with full",
            higher_is_better=True,
            needs_labels=False,
            needs_classifier=True,
            needs_bank=False,
            description="Share of images whose top-1 class is the same as the full model's.",
        ),
        MetricInfo(
            "kl_divergence",
            "KL divergence from full (nats)",
            higher_is_better=False,
            needs_labels=False,
            needs_classifier=True,
            needs_bank=False,
            description="KL(full ‖ reduced) between the two models' softmax outputs, in nats "
            "(0 = the same prediction).",
        ),
        MetricInfo(
            "top1",
            "Top-1 accuracy",
            higher_is_better=True,
            needs_labels=True,
            needs_classifier=True,
            needs_bank=False,
            description="Share of images whose label is the reduced model's top-1 class.",
        ),
        MetricInfo(
            "top5",
            "Top-5 accuracy",
            higher_is_better=True,
            needs_labels=True,
            needs_classifier=True,
            needs_bank=False,
            description="Share of images whose label is among the reduced model's top-5 classes.",
        ),
        MetricInfo(
            "knn_top1",
            "k-NN top-1 accuracy",
            higher_is_better=True,
            needs_labels=True,
            needs_classifier=False,
            needs_bank=True,
            description="Top-1 of DINO's weighted k-NN vote (k=20, T=0.07) of the reduced "
            "features against a labelled bank built once with the full model.",
        ),
    )
}


@dataclass
class Outputs:
    """One model's outputs on a set of images, kept on the CPU in float32."""

    features: Tensor  # [N, D] pooled features (RunResult.features)
    logits: Tensor | None = None  # [N, C], or None for a backbone without a head

    def __post_init__(self) -> None:
        # Metrics are compared across processes and devices: one dtype, one device.
        self.features = self.features.detach().to("cpu", torch.float32)
        if self.features.ndim != 2:
            raise ValueError(f"features must be [N, D], got {tuple(self.features.shape)}")
        if self.logits is not None:
            self.logits = self.logits.detach().to("cpu", torch.float32)
            if self.logits.ndim != 2 or len(self.logits) != len(self.features):
                raise ValueError(
                    f"logits must be [N, C] with N={len(self.features)}, "
                    f"got {tuple(self.logits.shape)}"
                )

    def __len__(self) -> int:
        return len(self.features)

    @classmethod
    def from_run(cls, result: RunResult) -> Outputs:
        """The features and logits of an :class:`analysis.RunResult`."""
        return cls(result.features, result.logits)

    @classmethod
    def cat(cls, parts: list[Outputs]) -> Outputs:
        """Join batches in order (all with logits, or all without)."""
        if not parts:
            raise ValueError("no outputs to join")
        with_logits = {part.logits is not None for part in parts}
        if len(with_logits) != 1:
            raise ValueError("cannot join outputs with and without logits")
        logits = torch.cat([p.logits for p in parts]) if True in with_logits else None
        return cls(torch.cat([p.features for p in parts]), logits)


@dataclass
class KnnBank:
    """A labelled feature bank for DINO's weighted k-NN vote; features are unit length."""

    features: Tensor  # [M, D], L2-normalised
    labels: Tensor  # [M] long
    num_classes: int
    k: int = 20
    temperature: float = 0.07


def build_bank(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> KnnBank:
    """Normalise a bank once, so each query costs one matrix product."""
    features = features.detach().to("cpu", torch.float32)
    labels = torch.as_tensor(labels).detach().to("cpu", torch.long).reshape(-1)
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"bank features must be a non-empty [M, D], got {tuple(features.shape)}")
    if len(labels) != len(features):
        raise ValueError(f"{len(features)} bank features but {len(labels)} labels")
    if num_classes < 1 or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"bank labels must lie in [0, {num_classes})")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"the temperature must be positive, got {temperature}")
    return KnnBank(F.normalize(features, dim=1), labels, int(num_classes), int(k), temperature)


def knn_scores(bank: KnnBank, queries: Tensor) -> Tensor:
    """Class scores [N, num_classes]: for each query, the sum of ``exp(cos / T)`` over its
    k nearest bank entries, per class (DINO's ``knn_classifier``).

    A bank smaller than k uses all of its entries.
    """
    queries = F.normalize(queries.detach().to("cpu", torch.float32), dim=1)
    if queries.ndim != 2 or queries.shape[1] != bank.features.shape[1]:
        raise ValueError(
            f"queries must be [N, {bank.features.shape[1]}], got {tuple(queries.shape)}"
        )
    k = min(bank.k, len(bank.features))
    scores = torch.zeros(len(queries), bank.num_classes)
    for start in range(0, len(queries), _QUERY_CHUNK):
        chunk = queries[start : start + _QUERY_CHUNK]
        similarity, index = (chunk @ bank.features.T).topk(k, dim=1)
        weights = (similarity / bank.temperature).exp()
        scores[start : start + len(chunk)].scatter_add_(1, bank.labels[index], weights)
    return scores


def available_metrics(
    *,
    is_classifier: bool,
    has_labels: bool,
    labels_are_model_classes: bool,
    has_bank: bool,
) -> list[str]:
    """The metrics that can be computed for a model and an image set, in display order."""
    names = []
    for name, info in METRICS.items():
        if info.needs_classifier and not is_classifier:
            continue
        if info.needs_labels and not has_labels:
            continue
        if info.needs_bank and not has_bank:
            continue
        if name in {"top1", "top5"} and not labels_are_model_classes:
            continue  # dataset labels are not the model's classes: only k-NN can use them
        names.append(name)
    return names


def per_image_values(
    metric: str,
    outputs: Outputs,
    reference: Outputs,
    labels: Tensor | None = None,
    bank: KnnBank | None = None,
) -> list[float]:
    """One value per image of ``metric`` for ``outputs`` (a reduced run) against
    ``reference`` (the full model on the same images, in the same order).

    ``labels`` are class indices per image: the model's own for ``top1``/``top5``, the
    bank's for ``knn_top1``. The accuracy metrics do not read ``reference``.
    """
    if metric not in METRICS:
        raise TokenScopeError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    info = METRICS[metric]
    if len(outputs) != len(reference):
        raise ValueError(f"{len(outputs)} outputs but {len(reference)} reference outputs")
    if len(outputs) == 0:
        return []
    if info.needs_classifier and (outputs.logits is None or reference.logits is None):
        raise TokenScopeError(
            f"{info.label} ({metric}) needs a classifier: this model has no head and gives "
            "features only; use feature_cosine or knn_top1"
        )
    if info.needs_labels:
        labels = _check_labels(metric, labels, len(outputs))
    if metric == "feature_cosine":
        cosine = F.cosine_similarity(outputs.features, reference.features, dim=1)
        return cosine.clamp(-1.0, 1.0).tolist()
    if metric == "top1_agreement":
        same = outputs.logits.argmax(dim=1) == reference.logits.argmax(dim=1)
        return same.double().tolist()
    if metric == "kl_divergence":
        # float64: identical logits must give 0, not float32 rounding noise.
        log_ref = F.log_softmax(reference.logits.double(), dim=1)
        log_out = F.log_softmax(outputs.logits.double(), dim=1)
        kl = (log_ref.exp() * (log_ref - log_out)).sum(dim=1)
        return kl.clamp(min=0.0).tolist()
    if metric in {"top1", "top5"}:
        num_classes = outputs.logits.shape[1]
        k = 1 if metric == "top1" else 5
        if num_classes < k:
            raise TokenScopeError(
                f"{metric} needs at least {k} classes; this model has {num_classes}"
            )
        if int(labels.max()) >= num_classes:
            raise TokenScopeError(
                f"{metric} needs labels that are this model's class indices (0 to "
                f"{num_classes - 1}), got label {int(labels.max())}; use knn_top1 for a "
                "dataset with its own classes"
            )
        top = outputs.logits.topk(k, dim=1).indices
        return (top == labels[:, None]).any(dim=1).double().tolist()
    # knn_top1
    if bank is None:
        raise TokenScopeError(
            f"{info.label} ({metric}) needs a labelled k-NN bank (a train split, such as "
            "Fashion-MNIST's); this image set has none"
        )
    if int(labels.max()) >= bank.num_classes:
        raise TokenScopeError(
            f"{metric}: label {int(labels.max())} is not one of the bank's "
            f"{bank.num_classes} classes"
        )
    predicted = knn_scores(bank, outputs.features).argmax(dim=1)
    return (predicted == labels).double().tolist()


def _check_labels(metric: str, labels: Tensor | None, count: int) -> Tensor:
    if labels is None:
        raise TokenScopeError(
            f"{METRICS[metric].label} ({metric}) needs labelled images: use an ImageNet "
            "folder with one subfolder per class, or Fashion-MNIST for k-NN"
        )
    labels = torch.as_tensor(labels).detach().to("cpu", torch.long).reshape(-1)
    if len(labels) != count:
        raise ValueError(f"{count} images but {len(labels)} labels")
    if count and int(labels.min()) < 0:
        raise TokenScopeError(f"{metric}: labels must be class indices (0 or more)")
    return labels
