"""Image sets for sweeps: scikit-image samples, uploads, folders and Fashion-MNIST.

An :class:`ImageSet` names its images, loads them lazily as RGB PIL images, and carries
their labels (if any) and a content fingerprint. The fingerprint is what a sweep's cache
key uses, so it hashes the content itself (file bytes or decoded pixels, in order, with
keys and labels), never paths or modification times alone: a changed image is a changed
set, and an untouched one keeps its cached points.

Labels come in two kinds. ``"model-classes"`` labels are the model's own class indices
(an ImageNet folder whose subfolders are synset ids, on a 1000-class model), usable for
top-1/top-5. ``"dataset"`` labels are the set's own classes (any ImageFolder, Fashion-MNIST),
usable only through a k-NN bank (``analysis.metrics``).
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from analysis.errors import ImageError, TokenScopeError
from analysis.images import load_image, to_rgb, to_tensor
from analysis.models import DataConfig

LABEL_KINDS = ("none", "model-classes", "dataset")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# skimage.data images that load without a download (colour first, then grey).
SAMPLE_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "stereo_motorcycle",
    "retina",
    "immunohistochemistry",
    "colorwheel",
    "logo",
    "camera",
    "coins",
    "horse",
    "moon",
    "page",
    "clock",
    "brick",
    "grass",
    "gravel",
    "text",
    "cell",
)

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_SYNSET = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class ImageSet:
    """Named images with optional labels and a content fingerprint.

    ``digests`` holds one sha256 per image (of its bytes or pixels), so that a subset gets
    its own fingerprint without reading the images again.
    """

    name: str  # "samples", "fashion-mnist", "upload", or the folder path
    description: str  # one line for the UI
    keys: tuple[str, ...]  # a stable name per image
    loaders: tuple[Callable[[], Image.Image], ...] = field(compare=False, repr=False)
    labels: tuple[int, ...] | None
    label_kind: str  # one of LABEL_KINDS
    class_names: tuple[str, ...] | None  # indexed by label
    fingerprint: str
    digests: tuple[str, ...] = field(repr=False)  # sha256 per image
    bank: ImageSet | None = None  # a labelled train split for k-NN

    def __post_init__(self) -> None:
        if len(self.loaders) != len(self.keys):
            raise ValueError(f"{len(self.keys)} keys but {len(self.loaders)} loaders")
        if len(self.digests) != len(self.keys):
            raise ValueError(f"{len(self.keys)} keys but {len(self.digests)} digests")
        if self.label_kind not in LABEL_KINDS:
            raise ValueError(f"label_kind must be one of {LABEL_KINDS}, got {self.label_kind!r}")
        if (self.labels is None) != (self.label_kind == "none"):
            raise ValueError("labels go with label_kind 'model-classes' or 'dataset'")
        if self.labels is not None and len(self.labels) != len(self.keys):
            raise ValueError(f"{len(self.keys)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int | None:
        """The number of classes the labels index into (None without labels)."""
        if self.labels is None:
            return None
        if self.class_names is not None:
            return len(self.class_names)
        return max(self.labels, default=-1) + 1

    def image(self, index: int) -> Image.Image:
        """Image ``index`` as RGB; an unreadable file raises :class:`ImageError`."""
        return to_rgb(self.loaders[index]())

    def subset(self, indices: Sequence[int]) -> ImageSet:
        """The images at ``indices`` (in that order), fingerprinted as a set of their own."""
        indices = [int(i) for i in indices]
        for i in indices:
            if not -len(self) <= i < len(self):
                raise IndexError(f"image index {i} is outside this set of {len(self)}")
        keys = tuple(self.keys[i] for i in indices)
        labels = None if self.labels is None else tuple(self.labels[i] for i in indices)
        digests = tuple(self.digests[i] for i in indices)
        description = f"{self.description} — {len(indices)} of {len(self)}"
        return ImageSet(
            name=self.name,
            description=description,
            keys=keys,
            loaders=tuple(self.loaders[i] for i in indices),
            labels=labels,
            label_kind=self.label_kind,
            class_names=self.class_names,
            fingerprint=_fingerprint(keys, digests, labels, self.label_kind, self.bank),
            digests=digests,
            bank=self.bank,
        )

    def batch(self, indices: Sequence[int], config: DataConfig) -> torch.Tensor:
        """The images at ``indices`` prepared for the model: [B, 3, S, S], normalised.

        Each image is decoded, fitted and let go before the next, so a batch of large
        uploads never holds more than one decoded image."""
        return torch.cat([to_tensor([self.image(i)], config)[0] for i in indices])


def _make_set(
    *,
    name: str,
    description: str,
    keys: Sequence[str],
    loaders: Sequence[Callable[[], Image.Image]],
    digests: Sequence[str],
    labels: Sequence[int] | None = None,
    label_kind: str = "none",
    class_names: Sequence[str] | None = None,
    bank: ImageSet | None = None,
) -> ImageSet:
    keys, digests = tuple(keys), tuple(digests)
    labels = None if labels is None else tuple(int(label) for label in labels)
    return ImageSet(
        name=name,
        description=description,
        keys=keys,
        loaders=tuple(loaders),
        labels=labels,
        label_kind=label_kind,
        class_names=None if class_names is None else tuple(class_names),
        fingerprint=_fingerprint(keys, digests, labels, label_kind, bank),
        digests=digests,
        bank=bank,
    )


def _fingerprint(
    keys: Sequence[str],
    digests: Sequence[str],
    labels: Sequence[int] | None,
    label_kind: str,
    bank: ImageSet | None,
) -> str:
    """sha256 over each image's key, content digest and label in order, and the bank's
    fingerprint (k-NN values depend on it)."""
    hasher = hashlib.sha256(f"imageset-v1\0{label_kind}\0".encode())
    for index, (key, digest) in enumerate(zip(keys, digests, strict=True)):
        label = "" if labels is None else str(labels[index])
        hasher.update(f"{key}\0{digest}\0{label}\n".encode())
    hasher.update(f"bank\0{bank.fingerprint if bank is not None else ''}".encode())
    return hasher.hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def balanced_indices(labels: Sequence[int], limit: int | None) -> list[int]:
    """The first ``limit`` indices taken round-robin over classes, in their original order.

    Round r takes each class's r-th image (classes in sorted order), so a limit on a
    sorted ImageNet folder covers many classes instead of the first one.
    """
    if limit is None or limit >= len(labels):
        return list(range(len(labels)))
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    queues = [by_class[label] for label in sorted(by_class)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < limit:
        for queue in queues:
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth])
        depth += 1
    return sorted(chosen)


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise TokenScopeError(f"the image limit must be at least 1, got {limit}")


# --- scikit-image samples ---------------------------------------------------------------


def sample_array_to_rgb(array: np.ndarray) -> Image.Image:
    """A scikit-image sample as an RGB image: bool/float/uint16 scaled to 0–255, grey
    replicated, alpha composited on white (as an uploaded PNG would be)."""
    if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
        array = array[0]
    if array.dtype != np.uint8:  # bool (horse), float, uint16
        array = array.astype(np.float64)
        span = max(1e-8, float(np.ptp(array)))
        array = np.round(255 * (array - array.min()) / span).astype(np.uint8)
    return to_rgb(Image.fromarray(array))


# The app's sidebar names of some samples (app_pages.common.SAMPLES), mapped to the
# scikit-image function names; a figure configuration may use either.
SAMPLE_ALIASES = {
    "chelsea (cat)": "chelsea",
    "motorcycle": "stereo_motorcycle",
    "camera (grey)": "camera",
}


def sample_name(name: str) -> str:
    """The scikit-image name of a sample given by that name or the app's name for it."""
    key = name.strip()
    key = SAMPLE_ALIASES.get(key, key)
    if key not in SAMPLE_NAMES:
        raise TokenScopeError(f"unknown sample image {name!r} (known: {', '.join(SAMPLE_NAMES)})")
    return key


@lru_cache(maxsize=8)
def _sample(name: str) -> Image.Image:
    try:
        from skimage import data as skdata
    except ImportError:
        raise TokenScopeError(
            "the sample images come from scikit-image: pip install scikit-image"
        ) from None
    try:
        array = getattr(skdata, name)()
    except Exception as error:  # a sample that needs a download (offline)
        raise TokenScopeError(f"the sample image {name!r} could not be loaded: {error}") from None
    return sample_array_to_rgb(array)


def sample_image(name: str) -> Image.Image:
    """One scikit-image sample as RGB (read once per process; a copy is returned)."""
    return _sample(sample_name(name)).copy()


def pixel_digest(image: Image.Image) -> str:
    """sha256 of an image's decoded RGB pixels and shape: the samples' content digest,
    unchanged by a lossless re-encoding of the file."""
    pixels = np.asarray(to_rgb(image))
    return _sha256(f"{pixels.shape}".encode() + pixels.tobytes())


@lru_cache(maxsize=1)
def _sample_images() -> tuple[tuple[str, Image.Image, str], ...]:
    """(name, image, pixel digest) of every sample that loads offline, read once."""
    try:
        from skimage import data as skdata
    except ImportError:
        raise TokenScopeError(
            "the sample images come from scikit-image: pip install scikit-image"
        ) from None
    found = []
    for name in SAMPLE_NAMES:
        try:
            array = getattr(skdata, name)()
        except Exception:  # a sample that needs a download (offline) or a missing one
            continue
        image = sample_array_to_rgb(array)
        pixels = np.asarray(image)
        digest = _sha256(f"{pixels.shape}".encode() + pixels.tobytes())
        found.append((name, image, digest))
    return tuple(found)


def samples_set() -> ImageSet:
    """The scikit-image sample images that load offline (no labels)."""
    samples = _sample_images()
    if not samples:
        raise TokenScopeError("no scikit-image sample image could be loaded")
    return _make_set(
        name="samples",
        description=f"{len(samples)} scikit-image samples (no labels)",
        keys=[name for name, _, _ in samples],
        loaders=[(lambda image=image: image.copy()) for _, image, _ in samples],
        digests=[digest for _, _, digest in samples],
    )


# --- uploads ----------------------------------------------------------------------------


def uploaded_set(files: Sequence[tuple[str, bytes]]) -> ImageSet:
    """Uploaded images as (file name, bytes); each is decoded once here to check it."""
    if not files:
        raise TokenScopeError("no images were uploaded")
    keys: list[str] = []
    seen: dict[str, int] = {}
    for name, data in files:
        try:
            load_image(data)
        except ImageError as error:
            raise ImageError(f"{name}: {error} — remove it from the upload or convert it") from None
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return _make_set(
        name="upload",
        description=f"{len(files)} uploaded image{'s' if len(files) != 1 else ''} (no labels)",
        keys=keys,
        loaders=[(lambda data=data: load_image(data)) for _, data in files],
        digests=[_sha256(data) for _, data in files],
    )


def image_set_of(images: Sequence[tuple[str, Image.Image]], name: str = "images") -> ImageSet:
    """Images already in memory (Explore's current image), by (key, PIL image)."""
    if not images:
        raise TokenScopeError("no images given")
    rgb = [(key, to_rgb(image)) for key, image in images]
    digests = [_sha256(f"{image.size}{image.mode}".encode() + image.tobytes()) for _, image in rgb]
    return _make_set(
        name=name,
        description=f"{len(rgb)} image{'s' if len(rgb) != 1 else ''} (no labels)",
        keys=[key for key, _ in rgb],
        loaders=[(lambda image=image: image.copy()) for _, image in rgb],
        digests=digests,
    )


# --- folders ----------------------------------------------------------------------------


def check_allowed(path: str | Path, allowed_roots: Sequence[str | Path] | None) -> Path:
    """``path`` resolved (symlinks and ``..`` followed); refused unless it lies inside one
    of ``allowed_roots`` (None: no restriction, for the CLI)."""
    resolved = Path(path).expanduser().resolve()
    if allowed_roots is None:
        return resolved
    roots = [Path(root).expanduser().resolve() for root in allowed_roots]
    if not any(resolved.is_relative_to(root) for root in roots):
        shown = ", ".join(str(root) for root in roots) or "none"
        raise TokenScopeError(
            f"reading server folders is turned off outside the allowed folders ({shown}); "
            f"{path} is not inside one. Upload the images instead, or ask the operator to "
            "allow that folder"
        )
    return resolved


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    """Image files under ``folder`` in sorted order, hidden files (``._x.jpg``) skipped."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = [
        path
        for path in candidates
        if path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    ]
    return sorted(files, key=lambda path: path.relative_to(folder).as_posix())


def _imagenet_indices(synsets: Sequence[str]) -> dict[str, int] | None:
    """ImageNet-1k class index per synset id, or None when one is not an ImageNet-1k class."""
    from timm.data import ImageNetInfo

    table = {synset: index for index, synset in enumerate(ImageNetInfo().label_names())}
    if not all(synset in table for synset in synsets):
        return None
    return {synset: table[synset] for synset in synsets}


def _imagenet_descriptions() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def folder_set(
    path: str | Path,
    *,
    limit: int | None = None,
    allowed_roots: Sequence[str | Path] | None = None,
    model_classes: int | None = None,
) -> ImageSet:
    """Images from a folder: flat (no labels), or one subfolder per class (ImageFolder).

    Classes are the sorted subfolder names (label_kind ``"dataset"``). When every subfolder
    is an ImageNet-1k synset id (``n01440764``) and the model has 1000 classes, the labels
    are the model's ImageNet class indices instead (``"model-classes"``). With class
    subfolders, images loose in the top folder are ignored. ``limit`` takes images
    round-robin over classes, so that 100 images of ImageNet val are not all tench.
    """
    _check_limit(limit)
    root = check_allowed(path, allowed_roots)
    if not root.is_dir():
        raise TokenScopeError(
            f"{path} is not a folder: give a folder of images (flat, or one subfolder per class)"
        )
    classes = [
        sub
        for sub in sorted(root.iterdir(), key=lambda p: p.name)
        if sub.is_dir() and not sub.name.startswith(".") and _image_files(sub, recursive=True)
    ]
    files: list[Path] = []
    labels: list[int] | None = None
    label_kind = "none"
    class_names: list[str] | None = None
    if classes:
        names = [sub.name for sub in classes]
        mapping = None
        if model_classes == 1000 and all(_SYNSET.fullmatch(name) for name in names):
            mapping = _imagenet_indices(names)
        if mapping is not None:
            label_kind, class_names = "model-classes", _imagenet_descriptions()
        else:
            label_kind, class_names = "dataset", names
        labels = []
        for index, sub in enumerate(classes):
            found = _image_files(sub, recursive=True)
            files.extend(found)
            labels.extend([mapping[sub.name] if mapping else index] * len(found))
    else:
        files = _image_files(root, recursive=False)
    if not files:
        raise TokenScopeError(
            f"no images ({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)}) found in {path}"
        )
    if labels is not None:
        chosen = balanced_indices(labels, limit)
    else:
        chosen = list(range(len(files) if limit is None else min(limit, len(files))))
    files = [files[i] for i in chosen]
    if labels is not None:
        labels = [labels[i] for i in chosen]
    keys = [file.relative_to(root).as_posix() for file in files]
    digests = []
    for file, key in zip(files, keys, strict=True):
        if allowed_roots is not None:
            check_allowed(file, allowed_roots)  # a symlinked file or class folder escaping
        try:
            digests.append(_sha256(file.read_bytes()))
        except OSError as error:
            raise ImageError(f"{key}: could not read the file ({error.strerror})") from None
    kind = {"none": "no labels", "dataset": f"{len(classes)} classes"}.get(
        label_kind, f"{len(classes)} ImageNet classes"
    )
    return _make_set(
        name=str(root),
        description=f"{len(files)} images from {root} ({kind})",
        keys=keys,
        loaders=[
            (lambda file=file, key=key: _load_file(file, key))
            for file, key in zip(files, keys, strict=True)
        ],
        digests=digests,
        labels=labels,
        label_kind=label_kind,
        class_names=class_names,
    )


def _load_file(file: Path, key: str) -> Image.Image:
    try:
        return load_image(file)
    except ImageError as error:
        raise ImageError(f"{key}: {error} — remove or convert this file") from None


# --- Fashion-MNIST ----------------------------------------------------------------------


@lru_cache(maxsize=4)
def _read_idx_cached(path: str, magic: int, stamp: tuple[int, int]) -> np.ndarray:
    del stamp  # part of the cache key only: a replaced file is read again
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 8:
        raise TokenScopeError(f"{path} is not an IDX file (too short)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise TokenScopeError(
            f"{path} is not an IDX {'image' if magic == _IDX_IMAGES_MAGIC else 'label'} file "
            f"(magic number {found}, expected {magic})"
        )
    count = int.from_bytes(data[4:8], "big")
    if magic == _IDX_IMAGES_MAGIC:
        rows, cols = int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big")
        shape, offset = (count, rows, cols), 16
    else:
        shape, offset = (count,), 8
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise TokenScopeError(
            f"{path} is truncated or corrupt: {len(data) - offset} bytes of data, "
            f"expected {expected} for shape {shape}"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)
    array.flags.writeable = False
    return array


def read_idx(path: Path, magic: int) -> np.ndarray:
    """A gzip IDX file (the MNIST format) as uint8: [N, H, W] images or [N] labels."""
    try:
        stat = path.stat()
        return _read_idx_cached(str(path), magic, (stat.st_mtime_ns, stat.st_size))
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise TokenScopeError(f"could not read {path}: {error}") from None


def _fashion_split(
    root: Path, split: str, limit: int | None, key_prefix: str, name: str
) -> tuple[list[str], list[Callable[[], Image.Image]], list[str], list[int]]:
    images = read_idx(root / FASHION_MNIST_FILES[f"{split}_images"], _IDX_IMAGES_MAGIC)
    labels = read_idx(root / FASHION_MNIST_FILES[f"{split}_labels"], _IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise TokenScopeError(f"{name}: {len(images)} images but {len(labels)} labels in {root}")
    if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise TokenScopeError(f"{name}: label {int(labels.max())} is not a Fashion-MNIST class")
    chosen = balanced_indices(labels.tolist(), limit)
    picked = np.ascontiguousarray(images[chosen])  # keep only what we use, not all 60k
    keys = [f"{key_prefix}-{i}" for i in chosen]
    loaders = [(lambda pixels=pixels: Image.fromarray(pixels).convert("RGB")) for pixels in picked]
    digests = [_sha256(pixels.tobytes()) for pixels in picked]
    return keys, loaders, digests, [int(labels[i]) for i in chosen]


def fashion_mnist_set(
    *,
    limit: int | None = 300,
    bank_size: int | None = 1000,
    root: str | Path = FASHION_MNIST_ROOT,
) -> ImageSet:
    """Fashion-MNIST test images (balanced over the 10 classes) with a k-NN bank of train
    images (also balanced). Grey 28×28 becomes RGB; the model's transform resizes it.

    ``limit``/``bank_size`` None takes the whole split; ``bank_size`` 0 gives no bank.
    """
    _check_limit(limit)
    if bank_size is not None and bank_size < 0:
        raise TokenScopeError(f"the k-NN bank size must be 0 or more, got {bank_size}")
    root = Path(root).expanduser()
    missing = [name for name in FASHION_MNIST_FILES.values() if not (root / name).is_file()]
    if missing:
        raise TokenScopeError(
            f"Fashion-MNIST is not in {root} (missing {', '.join(missing)}). Install it with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point root= at a "
            "folder holding the four .gz files of the Fashion-MNIST release "
            "(github.com/zalandoresearch/fashion-mnist)"
        )
    bank = None
    if bank_size is None or bank_size > 0:
        keys, loaders, digests, labels = _fashion_split(
            root, "train", bank_size, "train", "Fashion-MNIST train"
        )
        bank = _make_set(
            name="fashion-mnist-train",
            description=f"{len(keys)} Fashion-MNIST train images (k-NN bank)",
            keys=keys,
            loaders=loaders,
            digests=digests,
            labels=labels,
            label_kind="dataset",
            class_names=FASHION_MNIST_CLASSES,
        )
    keys, loaders, digests, labels = _fashion_split(
        root, "test", limit, "t10k", "Fashion-MNIST t10k"
    )
    with_bank = f", k-NN bank of {len(bank)} train images" if bank is not None else ""
    return _make_set(
        name="fashion-mnist",
        description=f"{len(keys)} Fashion-MNIST test images, 10 classes{with_bank}",
        keys=keys,
        loaders=loaders,
        digests=digests,
        labels=labels,
        label_kind="dataset",
        class_names=FASHION_MNIST_CLASSES,
        bank=bank,
    )


# --- by name ----------------------------------------------------------------------------


def open_image_set(
    spec: str,
    *,
    limit: int | None = None,
    allowed_roots: Sequence[str | Path] | None = None,
    model_classes: int | None = None,
) -> ImageSet:
    """``"samples"``, ``"fashion-mnist"``, or a folder (``PATH`` or ``"folder:PATH"``).

    ``limit`` caps the number of images (Fashion-MNIST defaults to 300 test images).
    """
    _check_limit(limit)
    spec = spec.strip()
    if spec == "samples":
        images = samples_set()
        return images if limit is None or limit >= len(images) else images.subset(range(limit))
    if spec == "fashion-mnist":
        return fashion_mnist_set(limit=300 if limit is None else limit)
    if spec.startswith("folder:"):
        path = spec.removeprefix("folder:")
    else:
        path = spec
        check_allowed(path, allowed_roots)
        if not Path(path).expanduser().is_dir():
            raise TokenScopeError(
                f"unknown image set {spec!r}: use 'samples', 'fashion-mnist', or the path of "
                "an image folder (folder:PATH)"
            )
    return folder_set(path, limit=limit, allowed_roots=allowed_roots, model_classes=model_classes)
