"""Images held out of training, and batch mixing: what keeps a short run from overfitting.

Trained on 16 offline images, MSTM's fusion at keep 0.7 got closer to the full model on
those images but further from it on unseen ones (``docs/methods.md``, "Why training seemed
to hurt"). Two remedies live here:

* a validation split: the held-out images are scored with the *hard inference path* (the
  one the app runs) every few steps, and training keeps the best step, step 0 included
  (``step_rank`` says which is best, :class:`BestStep` keeps it);
* CutMix/Mixup of the distillation batches (the DeiT recipe DTEM trains with): the
  teacher sees the same mixed image, so no label is needed.

The trainer (:mod:`analysis.train` and its ``train_*`` steps) imports this module; this
module imports only the two bottom layers of training, :mod:`analysis.train_data` (the
image set) and :mod:`analysis.train_losses` (the distillation loss), never the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.train_data import ImageSet
from analysis.train_losses import distill_loss

if TYPE_CHECKING:
    from analysis.models import LoadedModel

AUTO = -1


def auto_holdout(num_images: int) -> int:
    """A quarter of the images, at most 256; none below 8 images (too few to spare)."""
    return 0 if num_images < 8 else min(256, num_images // 4)


def split_images(images: ImageSet, count: int) -> tuple[ImageSet, ImageSet | None]:
    """Hold out ``count`` images spread evenly over the list (the same ones every run)."""
    from analysis.errors import TokenScopeError

    if count == AUTO:
        count = auto_holdout(len(images))
    if count <= 0:
        return images, None
    if count >= len(images):
        raise TokenScopeError(
            f"--val {count} would hold out all {len(images)} training images; use fewer"
        )
    held = sorted(set(np.linspace(0, len(images) - 1, count).round().astype(int).tolist()))
    kept = [i for i in range(len(images)) if i not in held]

    def subset(index: list[int], what: str) -> ImageSet:
        return ImageSet(
            loaders=[images.loaders[i] for i in index],
            labels=None if images.labels is None else [images.labels[i] for i in index],
            description=f"{images.description}, {len(index)} {what}",
            num_classes=images.num_classes,
        )

    return subset(kept, "for training"), subset(held, "held out for validation")


@dataclass
class Validation:
    """Fixed views of the held-out images and the unreduced model's outputs on them."""

    views: Tensor  # [V, 3, H, W]
    labels: Tensor | None
    teacher: Tensor  # logits (classifier) or features (backbone) of the full model
    num_images: int
    history: list[tuple[int, list[float]]] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        model: LoadedModel,
        held: ImageSet,
        augment: Callable[[Any], Tensor],
        views_per_image: int,
        seed: int,
        batch_size: int,
    ) -> Validation:
        """The eval crop of each image plus ``views_per_image − 1`` seeded random views."""
        from analysis.images import to_tensor

        views, labels = [], []
        for index, loader in enumerate(held.loaders):
            image = loader()
            views.append(to_tensor([image], model.data_config)[0][0])
            for view in range(1, views_per_image):
                torch.manual_seed(seed * 7_919 + index * 101 + view)
                views.append(augment(image))
            if held.labels is not None:
                labels.extend([held.labels[index]] * views_per_image)
        stacked = torch.stack(views)
        teacher = _outputs(model, model.module, stacked, None, batch_size)
        return cls(
            views=stacked,
            labels=torch.tensor(labels) if labels else None,
            teacher=teacher,
            num_images=len(held),
        )

    @torch.no_grad()
    def losses(self, model: LoadedModel, module: nn.Module, plans: list[Any], batch: int):
        """Per schedule: the validation loss of the hard (inference) path; lower is better."""
        result = []
        for plan in plans:
            student = _outputs(model, module, self.views, plan, batch)
            if self.labels is not None and model.is_classifier:
                value = F.cross_entropy(student, self.labels.to(student.device))
            else:
                value = distill_loss(model, student, self.teacher.to(student.device))
            result.append(float(value))
        return result


@torch.no_grad()
def _outputs(model: LoadedModel, module: nn.Module, views: Tensor, plan: Any, batch: int) -> Tensor:
    from analysis.engine import forward
    from analysis.schedule import parse_schedule

    if plan is None:
        plan = parse_schedule("none").resolve(model.facts)
    chunks = []
    for start in range(0, views.shape[0], batch):
        logits, features, _ = forward(module, views[start : start + batch].to(model.device), plan)
        chunks.append((logits if model.is_classifier else features).float())
    return torch.cat(chunks)


def relative(losses: list[float], untrained: list[float]) -> tuple[float, float]:
    """How a step compares with step 0: (worst ratio, geometric mean ratio) over schedules.

    Each ratio is the schedule's loss ÷ its untrained loss.
    """
    ratios = [now / max(then, 1e-12) for now, then in zip(losses, untrained, strict=True)]
    return max(ratios), float(np.exp(np.mean(np.log(np.maximum(ratios, 1e-12)))))


def step_rank(losses: list[float], untrained: list[float]) -> tuple[float, float]:
    """Sort key of a validated step; the smallest is kept.

    First, how far its worst schedule is above untrained (0 when none is): one shared
    module must not buy one strength with another. Then, among steps worse at no strength,
    the geometric mean ratio, so that a large gain at one strength is not given away for a
    few per cent at another.
    """
    worst, mean = relative(losses, untrained)
    return max(worst, 1.0), mean


def mix_batch(batch: Tensor, rng: np.random.Generator, probability: float) -> Tensor:
    """With ``probability``, CutMix (λ ~ U(0, 1)) or Mixup (λ ~ Beta(0.8, 0.8)), half each.

    Each image is mixed with the batch rolled by one; the teacher sees the same result.
    """
    if probability <= 0 or batch.shape[0] < 2 or rng.random() >= probability:
        return batch
    other = batch.roll(1, dims=0)
    if rng.random() < 0.5:
        lam = float(rng.beta(0.8, 0.8))
        return lam * batch + (1 - lam) * other
    height, width = batch.shape[-2:]
    side = float(np.sqrt(1.0 - rng.uniform()))
    box_h, box_w = int(height * side), int(width * side)
    top = int(rng.integers(0, height - box_h + 1))
    left = int(rng.integers(0, width - box_w + 1))
    mixed = batch.clone()
    mixed[..., top : top + box_h, left : left + box_w] = other[
        ..., top : top + box_h, left : left + box_w
    ]
    return mixed


def snapshot(modules: dict[int, nn.Module]) -> dict[int, dict[str, Tensor]]:
    return {
        layer: {k: v.detach().clone() for k, v in m.state_dict().items()}
        for layer, m in modules.items()
    }


@dataclass
class BestStep:
    """Validation during training: when it is due, and the best step so far (the one saved).

    ``best`` holds that step's number, losses and modules; it goes into the resume file as
    it is, so a resumed run keeps the same step.
    """

    validation: Validation
    every: int  # steps between validations
    best: dict[str, Any] = field(default_factory=dict)

    def due(self, done: int, steps: int) -> bool:
        """Whether to validate after ``done`` steps: every ``every``, and after the last."""
        return done % self.every == 0 or done == steps

    def record(self, step: int, losses: list[float], modules: dict[int, nn.Module]) -> str:
        """Add ``step``'s losses, keep its modules if it ranks best; returns the line to show."""
        history = self.validation.history
        history.append((step, losses))
        untrained = history[0][1]
        best = self.best
        if not best or step_rank(losses, untrained) < step_rank(best["losses"], untrained):
            best.update(step=step, losses=losses, modules=snapshot(modules))
        worst, mean = relative(losses, untrained)
        return (
            f"step {step}: validation loss "
            + ", ".join(f"{v:.5f}" for v in losses)
            + f" (of untrained: worst {worst:.3f}, mean {mean:.3f}; best step {best['step']})"
        )

    def state(self) -> dict[str, Any]:
        """What a resume file keeps of validation."""
        return {"history": self.validation.history, "best": self.best}

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` as a resume file gave it back (``{}``: nothing)."""
        if state:
            self.validation.history = [(at, list(values)) for at, values in state["history"]]
            self.best.update(state["best"])

    def keep_best(self, modules: dict[int, nn.Module], steps: int) -> dict[str, str]:
        """Load the best step's weights into ``modules``; returns the metadata that says so."""
        if not self.best:
            return {}
        best, history = self.best, self.validation.history
        for layer, state in best["modules"].items():
            modules[layer].load_state_dict(state)
        finished = len(history) and history[-1][0] == steps
        return {
            "val_images": str(self.validation.num_images),
            "val_views": str(self.validation.views.shape[0] // self.validation.num_images),
            "val_every": str(self.every),
            "val_loss_untrained": _joined(history[0][1]),
            "val_loss_kept": _joined(best["losses"]),
            "val_loss_last": _joined(history[-1][1]) if finished else "",
            "kept_step": str(best["step"]),
        }


def _joined(values: list[float]) -> str:
    return " | ".join(f"{value:.6g}" for value in values)


__all__ = [
    "AUTO",
    "BestStep",
    "Validation",
    "auto_holdout",
    "mix_batch",
    "relative",
    "split_images",
    "step_rank",
]
