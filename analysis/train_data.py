"""The training images: where they come from, how they load, how a view is cut from one.

The lowest layer of training: it imports nothing else of training, so that
:mod:`analysis.holdout` can split an :class:`ImageSet` without importing the trainer.
Which images make the batch of a step is :mod:`analysis.train_batches`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from analysis.errors import TokenScopeError
from analysis.imagesets import SAMPLE_NAMES
from analysis.models import LoadedModel

OFFLINE = "offline"
# skimage.data images that load without a download (colour first, then grey).
OFFLINE_IMAGES = SAMPLE_NAMES
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class ImageSet:
    """Training images (loaded lazily from folders) with optional integer labels."""

    loaders: list[Callable[[], Image.Image]]
    labels: list[int] | None
    description: str
    num_classes: int = 0

    def __len__(self) -> int:
        return len(self.loaders)


def offline_images() -> list[tuple[str, Image.Image]]:
    """The scikit-image sample images that work offline, as RGB PIL images."""
    try:
        from skimage import data as skdata
    except ImportError:
        raise TokenScopeError(
            "the offline training images come from scikit-image: pip install scikit-image"
        ) from None
    from analysis.images import to_rgb

    found = []
    for name in OFFLINE_IMAGES:
        try:
            array = getattr(skdata, name)()
        except Exception:  # a sample that needs a download
            continue
        if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
            array = array[0]
        if array.dtype != np.uint8:  # bool (horse), float (moon variants), uint16
            array = array.astype(np.float64)
            array = (255 * (array - array.min()) / max(1e-8, np.ptp(array))).astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 4:
            array = array[..., :3]
        image = to_rgb(Image.fromarray(array))
        image.thumbnail((640, 640), Image.Resampling.LANCZOS)  # cheaper crops, same content
        found.append((name, image))
    return found


def load_images(data: str, labels: str = "auto") -> ImageSet:
    """``offline`` or a folder: flat (no labels) or one subfolder per class (ImageFolder).

    Class subfolders named by integers (``0``, ``1``, ... or ``n01440764_0``) use that
    integer as the class index; otherwise classes are the sorted folder names.
    """
    if data == OFFLINE:
        if labels == "on":
            raise TokenScopeError("the offline images have no labels; use --labels off")
        images = offline_images()
        if not images:
            raise TokenScopeError("no offline scikit-image sample images could be loaded")
        return ImageSet(
            loaders=[(lambda image=image: image) for _, image in images],
            labels=None,
            description=f"offline: {len(images)} scikit-image sample images",
        )
    root = Path(data)
    if not root.is_dir():
        raise TokenScopeError(f"--data must be 'offline' or an image folder; {root} is not one")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and _images_in(p))
    use_labels = labels == "on" or (labels == "auto" and bool(classes))
    if use_labels and not classes:
        raise TokenScopeError(f"--labels on needs one subfolder per class in {root}")
    from analysis.images import load_image

    paths: list[Path] = []
    targets: list[int] = []
    if use_labels:
        numbered = all(p.name.split("_")[0].isdigit() for p in classes)
        for index, folder in enumerate(classes):
            target = int(folder.name.split("_")[0]) if numbered else index
            for path in _images_in(folder):
                paths.append(path)
                targets.append(target)
    else:
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise TokenScopeError(f"no images found in {root}")
    labelled = f", {len(classes)} classes" if use_labels else ""
    return ImageSet(
        loaders=[(lambda path=path: load_image(path)) for path in paths],
        labels=targets if use_labels else None,
        description=f"folder {root}: {len(paths)} images{labelled}",
        num_classes=(max(targets) + 1) if use_labels else 0,
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def make_transform(model: LoadedModel, augment: bool) -> Callable[[Image.Image], Tensor]:
    """Random-resized crop, flip and colour jitter (training) or timm's eval crop."""
    config = model.data_config
    if not augment:
        from analysis.images import to_tensor

        return lambda image: to_tensor([image], config)[0][0]
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                config.input_size,
                scale=(0.25, 1.0),
                interpolation=transforms.InterpolationMode.BICUBIC,
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.3, 0.3, 0.3, 0.05),
            transforms.ToTensor(),
            transforms.Normalize(config.mean, config.std),
        ]
    )


__all__ = [
    "IMAGE_SUFFIXES",
    "OFFLINE",
    "OFFLINE_IMAGES",
    "ImageSet",
    "load_images",
    "make_transform",
    "offline_images",
]
