"""The data step: the images a run trains on, and the batch of each step.

A batch is a pure function of (seed, step), so a resumed run sees the same batches, and
worker processes (``--workers``) prepare exactly those an in-process run would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from analysis.errors import TokenScopeError
from analysis.holdout import mix_batch, split_images
from analysis.models import LoadedModel
from analysis.train_config import TrainConfig, mix_probability
from analysis.train_data import ImageSet, load_images

Batch = tuple[Tensor, Tensor | None]  # images, and their labels when the data has them


def training_images(model: LoadedModel, config: TrainConfig) -> tuple[ImageSet, ImageSet | None]:
    """The images trained on and those held out, refusing what ``model`` cannot learn from.

    The refusals come before any model work, so a wrong option fails at once.
    """
    images, held = split_images(load_images(config.data, config.labels), config.val)
    labelled = images.labels is not None
    mix_probability(config, labelled)  # refuse --mix with labels
    classes = model.facts.num_classes
    if labelled and model.is_classifier and images.num_classes > classes:
        raise TokenScopeError(
            f"the data has class index {images.num_classes - 1}, but {model.name} has "
            f"{classes} classes; name the class folders by the model's class indices"
        )
    return images, held


def sample_batch(
    images: ImageSet,
    transform: Callable,
    step: int,
    batch_size: int,
    seed: int,
    mix: float = 0.0,
) -> Batch:
    """The batch of ``step``: a pure function of (seed, step), so resuming is exact."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    index = torch.randint(len(images), (batch_size,), generator=generator).tolist()
    torch.manual_seed(seed * 1_000_003 + step)  # torchvision's transforms draw from here
    batch = torch.stack([transform(images.loaders[i]()) for i in index])
    batch = mix_batch(batch, np.random.default_rng([seed, step]), mix)
    labels = None
    if images.labels is not None:
        labels = torch.tensor([images.labels[i] for i in index])
    return batch, labels


class StepBatches(torch.utils.data.Dataset):
    """Item k is the batch of step ``start + k`` (so workers can prepare them ahead)."""

    def __init__(self, images: ImageSet, transform: Callable, config: TrainConfig, start: int):
        self.images, self.transform, self.config, self.start = images, transform, config, start

    def __len__(self) -> int:
        return max(0, self.config.steps - self.start)

    def __getitem__(self, index: int) -> Batch:
        config = self.config
        step = self.start + index
        mix = mix_probability(config, self.images.labels is not None)
        return sample_batch(self.images, self.transform, step, config.batch_size, config.seed, mix)


def step_batches(
    images: ImageSet, transform: Callable, config: TrainConfig, start: int
) -> Iterable[Batch]:
    """The batches of steps ``start`` on, in order: made here, or by ``config.workers``."""
    dataset = StepBatches(images, transform, config, start)
    if config.workers <= 0:
        return (dataset[k] for k in range(len(dataset)))
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=config.workers, prefetch_factor=2
    )


__all__ = ["StepBatches", "sample_batch", "step_batches", "training_images"]
