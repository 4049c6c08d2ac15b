"""What training minimises besides each method's own loss: distillation and LTM's IB bound.

Below :mod:`analysis.holdout`, which scores held-out images with :func:`distill_loss` too;
it imports nothing of training but the image set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from analysis.models import LoadedModel
from analysis.train_data import ImageSet

IB_IMAGES = 2048  # the images LTM's clusters are fitted on, at most


def distill_loss(model: LoadedModel, student: Tensor, teacher: Tensor) -> Tensor:
    """KL on the logits (classifier) or 1 − cosine on the features (backbone)."""
    if model.is_classifier:
        return F.kl_div(
            student.float().log_softmax(-1),
            teacher.float().log_softmax(-1),
            log_target=True,
            reduction="batchmean",
        )
    return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean()


def soft_assign(vectors: Tensor, centroids: Tensor) -> Tensor:
    """φ(v, k) = softmax_k(−‖v/‖v‖ − c_k‖²)."""
    unit = F.normalize(vectors.float(), dim=-1)
    return (-torch.cdist(unit, centroids).pow(2)).softmax(dim=-1)


def kmeans(vectors: Tensor, k: int, seed: int, iterations: int = 20) -> Tensor:
    """Plain k-means on L2-normalised vectors; returns k centroids."""
    unit = F.normalize(vectors.float(), dim=-1)
    k = max(1, min(k, unit.shape[0]))
    generator = torch.Generator().manual_seed(seed)
    centroids = unit[torch.randperm(unit.shape[0], generator=generator)[:k]].clone()
    for _ in range(iterations):
        nearest = torch.cdist(unit, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, unit)
        counts = torch.bincount(nearest, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


def pixel_vectors(images: Tensor) -> Tensor:
    """The input side of the IB term: the image at 16×16, flattened."""
    return F.adaptive_avg_pool2d(images.float(), 16).flatten(1)


@dataclass
class IBState:
    """LTM's information-bottleneck bound: input and output clusters, Q[b, y]."""

    input_centroids: Tensor
    output_centroids: Tensor | None = None
    q: Tensor | None = None  # [clusters_out, classes]

    def bound(self, images: Tensor, features: Tensor, labels: Tensor) -> Tensor:
        assert self.output_centroids is not None and self.q is not None
        phi_x = soft_assign(pixel_vectors(images), self.input_centroids.to(images.device))
        phi_f = soft_assign(features, self.output_centroids.to(features.device))
        # Σ_ab φ(f,b) φ(x,a) log φ(x,a): constant in the model (Σ_b φ(f,b) = 1), kept as given
        first = (phi_f.sum(-1) * (phi_x * phi_x.clamp(min=1e-12).log()).sum(-1)).mean()
        log_q = self.q.to(features.device).clamp(min=1e-12).log()[:, labels].t()  # [B, b]
        second = -(phi_f * log_q).sum(-1).mean()
        return first + second


def start_ib(images: ImageSet, model: LoadedModel, clusters: int, seed: int) -> IBState:
    """The input clusters, fitted once on the eval crops of the training images."""
    from analysis.images import to_tensor

    count = min(len(images), IB_IMAGES)
    pixels = torch.cat(
        [
            pixel_vectors(to_tensor([images.loaders[i]()], model.data_config)[0])
            for i in range(count)
        ]
    )
    return IBState(input_centroids=kmeans(pixels, clusters, seed))


@torch.no_grad()
def refresh_ib(
    ib: IBState,
    images: ImageSet,
    student: LoadedModel,
    plan: Any,
    batch_size: int,
    clusters: int,
    seed: int,
) -> None:
    """Recompute the output clusters and Q[b, y] with the current reduced model."""
    from analysis.engine import forward
    from analysis.images import to_tensor

    assert images.labels is not None
    count = min(len(images), IB_IMAGES)
    features, labels = [], []
    for begin in range(0, count, batch_size):
        index = list(range(begin, min(count, begin + batch_size)))
        batch = torch.cat(
            [to_tensor([images.loaders[i]()], student.data_config)[0] for i in index]
        ).to(student.device)
        features.append(forward(student.module, batch, plan)[1].float().cpu())
        labels.extend(images.labels[i] for i in index)
    stacked = torch.cat(features)
    ib.output_centroids = kmeans(stacked, clusters, seed + 1)
    phi = soft_assign(stacked, ib.output_centroids)  # [n, b]
    target = torch.tensor(labels)
    classes = max(images.num_classes, int(target.max()) + 1)
    q = torch.zeros(phi.shape[1], classes).index_add_(1, target, phi.t())
    ib.q = q / q.sum(dim=0, keepdim=True).clamp(min=1e-12)


__all__ = ["IBState", "distill_loss", "kmeans", "refresh_ib", "soft_assign", "start_ib"]
