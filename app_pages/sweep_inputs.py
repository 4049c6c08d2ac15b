"""The Trade-off page's inputs: image sources, the method table, saved configurations.

Layout only: every choice becomes an ``analysis`` record (an ImageSet, MethodSweeps, a
SweepSpec). Server folders are offered only when the operator allows folders
(``analysis.access``: ``TOKENSCOPE_ALLOWED_FOLDERS`` or ``--allow-folder``), the same rule
as for checkpoints; users can always upload.
"""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import streamlit as st

from analysis import LoadedModel, ScheduleError, TokenScopeError, access
from analysis.imagesets import (
    ImageSet,
    fashion_mnist_set,
    folder_set,
    samples_set,
    uploaded_set,
)
from analysis.sweep import DEFAULT_BASES, MethodSweep, SweepSpec
from analysis.trained_settings import trained_settings
from app_pages.common import UPLOAD_TYPES
from viz import tradeoff

SAMPLES = "Sample images"
UPLOADS = "Upload images"
FASHION = "Fashion-MNIST (labelled, k-NN)"
FOLDER = "Server folder"
ALLOWED_FOLDERS_ENV = access.ALLOWED_FOLDERS_ENV
MAX_UPLOADS = 64
MAX_SET = 2000  # images per sweep in the app; the CLI has no such cap


def allowed_folders() -> list[str]:
    """The folders the operator allows the app to read (none by default)."""
    return [str(folder) for folder in access.allowed_folders()]


@st.cache_resource(show_spinner="Reading the sample images…", max_entries=1)
def cached_samples() -> ImageSet:
    return samples_set()


@st.cache_resource(show_spinner="Reading Fashion-MNIST…", max_entries=4)
def cached_fashion(limit: int, bank_size: int) -> ImageSet:
    return fashion_mnist_set(limit=limit, bank_size=bank_size)


def cached_folder(path: str, limit: int, model_classes: int | None) -> ImageSet:
    """A server folder's images, only inside the allowed folders (AccessError otherwise,
    whether the folder exists or not)."""
    resolved = access.check_server_path(path, what="folder")
    return _cached_folder(str(resolved), limit, model_classes)


@st.cache_resource(show_spinner="Reading the folder…", max_entries=4)
def _cached_folder(path: str, limit: int, model_classes: int | None) -> ImageSet:
    return folder_set(
        path, limit=limit, allowed_roots=allowed_folders(), model_classes=model_classes
    )


@st.cache_resource(show_spinner="Reading the uploads…", max_entries=4)
def cached_uploads(digest: str, _files: tuple[tuple[str, bytes], ...]) -> ImageSet:
    return uploaded_set(list(_files))


def image_source_inputs(model: LoadedModel) -> ImageSet | None:
    """The image set to sweep over, or None (with a message) when it cannot be had."""
    sources = [SAMPLES, UPLOADS, FASHION] + ([FOLDER] if allowed_folders() else [])
    source = st.radio("Images", sources, horizontal=True, key="sweep_source")
    try:
        if source == SAMPLES:
            images = cached_samples()
            count = st.number_input(
                "Sample images to use", 1, len(images), len(images), key="sweep_limit"
            )
            return images if count == len(images) else images.subset(range(count))
        if source == UPLOADS:
            return _uploads()
        if source == FASHION:
            cols = st.columns(2)
            limit = cols[0].number_input("Test images", 20, MAX_SET, 300, step=20, key="fm_limit")
            bank = cols[1].number_input(
                "k-NN bank (train images)", 100, 10000, 1000, step=100, key="fm_bank"
            )
            st.caption(
                "A demonstration set, not ImageNet: grey 28×28 clothing photos, scored by a "
                "20-NN vote over the full model's features of the train images."
            )
            return cached_fashion(int(limit), int(bank))
        path = st.text_input("Folder on the server", key="sweep_folder", max_chars=1024)
        st.caption(f"Allowed: {', '.join(allowed_folders())}")
        if not path.strip():
            return None
        limit = st.number_input("Images to use", 1, MAX_SET, 200, key="sweep_folder_limit")
        return cached_folder(path.strip(), int(limit), model.facts.num_classes or None)
    except TokenScopeError as error:
        st.error(str(error))
        return None


def _uploads() -> ImageSet | None:
    files = st.file_uploader(
        "Images for the sweep",
        type=UPLOAD_TYPES,
        accept_multiple_files=True,
        key="sweep_uploads",
        help=f"Up to {MAX_UPLOADS} images; no labels, so the metrics compare with the full model.",
    )
    if not files:
        st.info("Upload a few images to sweep over them.")
        return None
    if len(files) > MAX_UPLOADS:
        st.warning(f"Using the first {MAX_UPLOADS} of {len(files)} images.")
        files = files[:MAX_UPLOADS]
    named = tuple((file.name, file.getvalue()) for file in files)
    digest = hashlib.sha256(b"".join(hashlib.sha256(d).digest() for _, d in named)).hexdigest()
    return cached_uploads(digest, named)


def method_table(
    model: LoadedModel, chosen: list[str], targets: tuple[float, ...]
) -> list[MethodSweep]:
    """One editable row per chosen method: its base schedule and, optionally, values."""
    if not chosen:
        return []
    rows = []
    for method in chosen:
        settings = trained_settings(model, method, DEFAULT_BASES[method])
        rows.append(
            {
                "Method": tradeoff.method_label(method),
                "Base schedule": DEFAULT_BASES[method],
                "Strength values": "",
                "Weights trained at": settings.describe() if settings else "training-free",
            }
        )
    edited = st.data_editor(
        pd.DataFrame(rows),
        hide_index=True,
        disabled=["Method", "Weights trained at"],
        key=f"sweep_table_{'-'.join(chosen)}",
        column_config={
            "Base schedule": st.column_config.TextColumn(
                help="Where the method runs and its other parameters; the sweep varies its "
                "strength (PatchMerger: its layer)."
            ),
            "Strength values": st.column_config.TextColumn(
                help="Optional: comma-separated values of the strength parameter instead of "
                "the cost targets, e.g. 4,8,12,16."
            ),
        },
    )
    methods = []
    for row in edited.to_dict("records"):
        base = str(row["Base schedule"] or "").strip()
        values_text = str(row["Strength values"] or "").strip()
        try:
            values = tuple(float(v) for v in values_text.split(",") if v.strip())
        except ValueError:
            st.error(f"{row['Method']}: strength values must be numbers separated by commas.")
            continue
        methods.append(MethodSweep(base=base, values=values, targets=() if values else targets))
    return methods


def spec_upload() -> SweepSpec | None:
    """A saved sweep configuration, read and checked (None when there is none)."""
    upload = st.file_uploader(
        "Reopen a saved sweep (sweep.json)",
        type=["json"],
        key="sweep_config_upload",
        help="A configuration downloaded from this page or written for `python -m analysis "
        "sweep --config`. Its points come from the cache when they were computed before.",
    )
    if upload is None:
        return None
    try:
        data = json.loads(upload.getvalue())
        return SweepSpec.from_dict(data.get("config", data) if isinstance(data, dict) else data)
    except (ValueError, UnicodeDecodeError):
        st.error(f"{upload.name} is not a JSON file.")
    except (TokenScopeError, ScheduleError, TypeError) as error:
        st.error(f"Cannot use {upload.name}: {error}")
    return None


def images_for_spec(spec: SweepSpec, model: LoadedModel) -> ImageSet | None:
    """The image set a saved configuration names (uploads: the ones on the page now)."""
    limit = spec.limit or MAX_SET
    try:
        if spec.images == "samples":
            images = cached_samples()
            return images if limit >= len(images) else images.subset(range(limit))
        if spec.images == "fashion-mnist":
            return cached_fashion(min(limit, MAX_SET), 1000)
        if spec.images == "upload":
            st.error(
                "This sweep ran on uploaded images: choose *Upload images* above, add the same "
                "images and press **Run sweep** (their points come from the cache)."
            )
            return None
        return cached_folder(spec.images, min(limit, MAX_SET), model.facts.num_classes or None)
    except TokenScopeError as error:
        st.error(str(error))
        return None
