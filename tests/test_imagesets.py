"""Image sets for sweeps: folders, uploads, samples and Fashion-MNIST, on files made here."""

from __future__ import annotations

import gzip
import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analysis import ImageError, TokenScopeError
from analysis.imagesets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    fashion_mnist_set,
    folder_set,
    open_image_set,
    sample_array_to_rgb,
    samples_set,
    uploaded_set,
)
from analysis.models import DataConfig

CONFIG = DataConfig(input_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), crop_pct=1.0)


def png_bytes(value: int, size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_image(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(value))
    return path


def make_folder(root: Path, layout: dict[str, int]) -> Path:
    """One subfolder per class with ``count`` images each (value = a running number)."""
    value = 0
    for name, count in layout.items():
        for index in range(count):
            write_image(root / name / f"img{index:02d}.png", value)
            value += 1
    return root


def test_image_folder_labels_follow_sorted_class_names(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", {"dog": 2, "cat": 1, "zebra": 1})
    (root / "notes.txt").write_text("not an image")
    write_image(root / "dog" / "._img00.png")  # a macOS AppleDouble file, skipped
    images = folder_set(root)
    assert images.label_kind == "dataset"
    assert images.class_names == ("cat", "dog", "zebra")
    assert images.keys == ("cat/img00.png", "dog/img00.png", "dog/img01.png", "zebra/img00.png")
    assert images.labels == (0, 1, 1, 2)
    assert images.num_classes == 3
    assert images.image(1).mode == "RGB"


def test_synset_folders_map_to_imagenet_indices(tmp_path: Path) -> None:
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo().label_names()
    chosen = ["n01443537", "n01440764", synsets[500]]  # goldfish, tench, one further in
    root = make_folder(tmp_path / "val", dict.fromkeys(chosen, 1))
    images = folder_set(root, model_classes=1000)
    assert images.label_kind == "model-classes"
    by_folder = dict(zip([key.split("/")[0] for key in images.keys], images.labels, strict=True))
    assert by_folder == {"n01440764": 0, "n01443537": 1, synsets[500]: 500}
    assert images.class_names[0].startswith("tench")
    # On a model that is not an ImageNet-1k classifier, the folders are plain classes.
    plain = folder_set(root, model_classes=None)
    assert plain.label_kind == "dataset"
    assert plain.labels == (0, 1, 2)


def test_unknown_synsets_stay_dataset_classes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "val", {"n01440764": 1, "n99999999": 1})
    images = folder_set(root, model_classes=1000)
    assert images.label_kind == "dataset"
    assert images.labels == (0, 1)


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    for name in ("b.jpg", "a.PNG", "c.webp"):
        buffer = io.BytesIO()
        suffix = Path(name).suffix.lower().lstrip(".")
        Image.new("RGB", (5, 5), "red").save(buffer, format={"jpg": "JPEG"}.get(suffix, suffix))
        (tmp_path / name).write_bytes(buffer.getvalue())
    (tmp_path / "empty").mkdir()  # a subfolder without images is not a class
    images = folder_set(tmp_path)
    assert images.labels is None
    assert images.label_kind == "none"
    assert images.num_classes is None
    assert images.keys == ("a.PNG", "b.jpg", "c.webp")
    assert folder_set(tmp_path, limit=2).keys == ("a.PNG", "b.jpg")


def test_limit_is_spread_over_classes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", {"a": 5, "b": 2, "c": 4})
    images = folder_set(root, limit=7)
    # Round-robin: a0 b0 c0, a1 b1 c1, then a2 reaches the limit of 7.
    assert Counter(images.labels) == {0: 3, 1: 2, 2: 2}
    assert images.keys == (
        "a/img00.png",
        "a/img01.png",
        "a/img02.png",
        "b/img00.png",
        "b/img01.png",
        "c/img00.png",
        "c/img01.png",
    )
    assert folder_set(root, limit=7).fingerprint == images.fingerprint


def test_fingerprint_follows_content(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", {"a": 2, "b": 2})
    Image.new("RGB", (4, 4), (1, 2, 3)).save(root / "a" / "img00.bmp")
    before = folder_set(root).fingerprint
    assert folder_set(root).fingerprint == before  # nothing changed
    os.utime(root / "a" / "img00.png", (1, 1))  # a new mtime alone is not a change
    assert folder_set(root).fingerprint == before
    # Same name and size (BMP is uncompressed), one other pixel value.
    Image.new("RGB", (4, 4), (1, 2, 4)).save(root / "a" / "img00.bmp")
    changed = folder_set(root).fingerprint
    assert changed != before
    (root / "b").rename(root / "c")  # same bytes, other label names: same labels, new keys
    assert folder_set(root).fingerprint != changed


def test_subset_has_its_own_fingerprint(tmp_path: Path) -> None:
    images = folder_set(make_folder(tmp_path / "data", {"a": 2, "b": 2}))
    subset = images.subset([3, 0])
    assert subset.keys == ("b/img01.png", "a/img00.png")
    assert subset.labels == (1, 0)
    assert subset.fingerprint != images.fingerprint
    assert subset.fingerprint != images.subset([0, 3]).fingerprint  # order matters
    assert subset.fingerprint == images.subset([3, 0]).fingerprint
    assert images.subset(range(len(images))).fingerprint == images.fingerprint
    assert np.array_equal(np.asarray(subset.image(0)), np.asarray(images.image(3)))


def test_allowed_roots_refuse_paths_outside(tmp_path: Path) -> None:
    allowed = make_folder(tmp_path / "allowed", {"a": 1})
    outside = make_folder(tmp_path / "outside", {"secret": 1})
    assert len(folder_set(allowed, allowed_roots=[allowed])) == 1
    for path in (outside, allowed / ".." / "outside"):
        with pytest.raises(TokenScopeError, match="reading server folders is turned off"):
            folder_set(path, allowed_roots=[allowed])
    (allowed / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(TokenScopeError, match="reading server folders is turned off"):
        folder_set(allowed / "link", allowed_roots=[allowed])
    with pytest.raises(TokenScopeError, match="reading server folders is turned off"):
        open_image_set(str(allowed / "link"), allowed_roots=[allowed])
    # A class folder, or one file, inside the allowed folder that points outside it.
    with pytest.raises(TokenScopeError, match="reading server folders is turned off"):
        folder_set(allowed, allowed_roots=[allowed])
    (allowed / "link").unlink()
    (allowed / "a" / "leak.png").symlink_to(outside / "secret" / "img00.png")
    with pytest.raises(TokenScopeError, match="reading server folders is turned off"):
        folder_set(allowed, allowed_roots=[allowed])
    # Without a restriction (the CLI), the same folder reads fine.
    assert len(folder_set(allowed)) == 2


def test_upload_names_the_unreadable_file() -> None:
    good = ("cat.png", png_bytes(10))
    with pytest.raises(ImageError, match=r"holiday\.jpg"):
        uploaded_set([good, ("holiday.jpg", b"not an image at all")])
    images = uploaded_set([good, ("dog.png", png_bytes(20)), ("cat.png", png_bytes(30))])
    assert images.keys == ("cat.png", "dog.png", "cat.png (2)")
    assert images.image(1).getpixel((0, 0)) == (20, 20, 20)
    other = uploaded_set([good, ("dog.png", png_bytes(21)), ("cat.png", png_bytes(30))])
    assert other.fingerprint != images.fingerprint


def test_unreadable_folder_image_is_named_when_loaded(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    # Cut in half: PIL's own message ("image file is truncated") does not name the file.
    write_image(tmp_path / "cls" / "fine.png")
    (tmp_path / "cls" / "broken.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    images = folder_set(tmp_path)
    with pytest.raises(ImageError, match=r"cls/broken\.png"):
        images.image(0)
    assert images.image(1).size == (8, 6)


def test_batch_is_normalised(tmp_path: Path) -> None:
    images = uploaded_set([("white.png", png_bytes(255, (40, 30))), ("black.png", png_bytes(0))])
    batch = images.batch([1, 0], CONFIG)
    assert batch.shape == (2, 3, 32, 32)
    mean, std = torch.tensor(CONFIG.mean), torch.tensor(CONFIG.std)
    assert torch.allclose(batch[0].mean(dim=(1, 2)), (0 - mean) / std, atol=1e-5)
    assert torch.allclose(batch[1].mean(dim=(1, 2)), (1 - mean) / std, atol=1e-5)


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_fashion(root: Path, test_labels: list[int], train_labels: list[int]) -> None:
    """Tiny IDX files whose image i is filled with the value i (so the index is visible)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, labels in (("t10k", test_labels), ("train", train_labels)):
        pixels = np.stack([np.full((28, 28), i, np.uint8) for i in range(len(labels))])
        pixels[:, 0, 0] = 255  # one bright corner: the image is not uniform
        write_idx(root / f"{split}-images-idx3-ubyte.gz", pixels, 2051)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.asarray(labels), 2049)


def test_fashion_mnist_from_idx_files(tmp_path: Path) -> None:
    test_labels = [3, 3, 3, 7, 3, 7, 1, 3, 1, 9]
    make_fashion(tmp_path, test_labels, train_labels=[0, 0, 0, 1, 2, 2, 1, 1])
    images = fashion_mnist_set(limit=6, bank_size=6, root=tmp_path)
    # Round-robin over the classes 1, 3, 7, 9: 6, 0, 3, 9, then 8, 1.
    assert images.keys == ("t10k-0", "t10k-1", "t10k-3", "t10k-6", "t10k-8", "t10k-9")
    assert images.labels == tuple(test_labels[int(k.split("-")[1])] for k in images.keys)
    assert images.label_kind == "dataset"
    assert images.class_names == FASHION_MNIST_CLASSES
    assert images.class_names[9] == "Ankle boot"
    picture = images.image(2)
    assert picture.mode == "RGB"
    assert picture.size == (28, 28)
    assert picture.getpixel((5, 5)) == (3, 3, 3)  # t10k image 3
    assert picture.getpixel((0, 0)) == (255, 255, 255)
    assert images.bank is not None
    assert images.bank.keys == ("train-0", "train-1", "train-3", "train-4", "train-5", "train-6")
    assert Counter(images.bank.labels) == {0: 2, 1: 2, 2: 2}
    # The bank is part of the set's identity: k-NN values depend on it.
    assert fashion_mnist_set(limit=6, bank_size=4, root=tmp_path).fingerprint != images.fingerprint
    assert fashion_mnist_set(limit=6, bank_size=0, root=tmp_path).bank is None


def test_fashion_mnist_checks_its_files(tmp_path: Path) -> None:
    with pytest.raises(TokenScopeError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_set(root=tmp_path)
    make_fashion(tmp_path, [0, 1], [0, 1])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.asarray([0, 1]), 2051)  # wrong magic
    with pytest.raises(TokenScopeError, match="magic number 2051, expected 2049"):
        fashion_mnist_set(root=tmp_path)


def test_real_fashion_mnist_loads() -> None:
    if not (FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").exists():
        message = "Fashion-MNIST missing: apt-get install dataset-fashion-mnist (.ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    images = fashion_mnist_set(limit=20, bank_size=20)
    assert len(images) == 20
    assert len(images.bank) == 20
    assert Counter(images.labels) == dict.fromkeys(range(10), 2)
    assert images.labels[0] == 9  # the first t10k image is an ankle boot
    first = images.image(0)
    assert first.size == (28, 28)
    assert first.mode == "RGB"
    assert np.asarray(first).std() > 10  # a real picture, not a blank


def test_sample_arrays_become_rgb() -> None:
    def pixels(array) -> list:
        image = sample_array_to_rgb(array)
        assert image.mode == "RGB"
        return np.asarray(image).reshape(-1, 3).tolist()

    white, black = [255, 255, 255], [0, 0, 0]
    assert pixels(np.array([[False, True]])) == [black, white]  # skimage's horse is bool
    assert pixels(np.array([[0.2, 0.4, 0.6]])) == [black, [128] * 3, white]  # scaled span
    assert pixels(np.array([[0, 1000]], dtype=np.uint16)) == [black, white]
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255]]], dtype=np.uint8)
    assert pixels(rgba) == [white, [10, 20, 30]]  # transparent on white, as an upload
    left, right = np.zeros((1, 1, 3), np.uint8), np.full((1, 1, 3), 9, np.uint8)
    assert pixels((left, right, np.ones((1, 1)))) == [black]  # stereo: the left view


def test_samples_and_open_image_set(tmp_path: Path) -> None:
    samples = samples_set()
    assert samples.name == "samples"
    assert {"astronaut", "camera", "horse"} <= set(samples.keys)
    assert samples.labels is None
    assert all(samples.image(samples.keys.index(k)).mode == "RGB" for k in ("camera", "horse"))
    assert samples_set().fingerprint == samples.fingerprint
    limited = open_image_set("samples", limit=3)
    assert limited.keys == samples.keys[:3]
    root = make_folder(tmp_path / "data", {"a": 1, "b": 1})
    assert open_image_set(f"folder:{root}").keys == folder_set(root).keys
    assert open_image_set(str(root)).labels == (0, 1)
    with pytest.raises(TokenScopeError, match="unknown image set 'imagenet'"):
        open_image_set("imagenet")
    with pytest.raises(TokenScopeError, match="is not a folder"):
        open_image_set(f"folder:{tmp_path / 'missing'}")


def test_image_set_of_in_memory_images_hashes_pixels():
    from analysis.imagesets import image_set_of

    grey = Image.new("RGB", (20, 10), (90, 90, 90))
    other = grey.copy()
    other.putpixel((3, 4), (91, 90, 90))
    first = image_set_of([("a", grey)])
    assert first.fingerprint == image_set_of([("a", grey.copy())]).fingerprint
    assert first.fingerprint != image_set_of([("a", other)]).fingerprint
    assert np.array_equal(np.asarray(first.image(0)), np.asarray(grey))
