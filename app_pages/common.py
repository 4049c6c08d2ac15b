"""What the pages share: the model, device and image inputs, and the cached runs.

Models come from ``analysis.load_model`` (cached once per process and never mutated),
images from ``analysis.images.load_image``, runs from ``analysis.run`` (cached per
model, image and schedule, so a page redraws without running the model again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st
import torch
from PIL import Image

from analysis import (
    ImageError,
    LoadedModel,
    ModelLoadError,
    RunResult,
    Schedule,
    ScheduleError,
    load_model,
    parse_schedule,
    run,
)
from analysis.engine import attach_weights
from analysis.images import CropInfo, fit_to_input, load_image
from analysis.learned import attach, load_learned, provenance
from analysis.reducers import reducer_class
from analysis.reducers.base import LearnedWeights
from viz.overlays import display_image, render_crop_box, to_png
from viz.schedule_table import presets

DEFAULT_SOURCE = "Embedded default (DINOv2 ViT-S/14)"
TIMM_SOURCE = "timm model"
CHECKPOINT_SOURCE = "Local checkpoint"
DEVICES = ("auto", "cuda", "cpu")
DEFAULT_TIMM = "deit_small_patch16_224"
UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"]


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        from skimage import data

        image = getattr(data, name)()
        return image[0] if isinstance(image, tuple) else image

    return read


# Offline images shipped with scikit-image (see docs: they need no download).
SAMPLES: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea (cat)": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "motorcycle": _skimage("stereo_motorcycle"),
    "camera (grey)": _skimage("camera"),
}


@dataclass(frozen=True)
class ModelKey:
    name: str
    weights: str
    device: str
    learned: str = ""  # digests of uploaded learned-reducer files, if any

    def describe(self) -> str:
        name = "DINOv2 ViT-S/14 (embedded default)" if self.name == "default" else self.name
        weights = "" if self.weights == "default" else f", {self.weights} weights"
        learned = ", uploaded reducer weights" if self.learned else ""
        return f"{name}{weights}{learned}"

    def cache_key(self) -> tuple[str, str, str]:
        """What cached runs are keyed by: uploaded reducer weights change the results."""
        weights = f"{self.weights}+learned:{self.learned}" if self.learned else self.weights
        return (self.name, weights, self.device)


@dataclass(frozen=True)
class ImageChoice:
    key: str  # stable identity: a sample name or the upload's hash
    label: str
    image: Image.Image


def keep_widget_state(*keys: str) -> None:
    """Keep widget values when the user switches pages (Streamlit drops unrendered ones)."""
    for key in keys:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


def resolve_device(choice: str) -> tuple[str, str | None]:
    """The torch device to use, and a warning when the choice cannot be honoured."""
    available = torch.cuda.is_available()
    if choice == "cuda" and not available:
        return "cpu", "CUDA is not available on this machine; running on the CPU."
    if choice == "auto":
        return ("cuda" if available else "cpu"), None
    return choice, None


@st.cache_resource(
    show_spinner="Loading the model (the very first start also converts the default "
    "model's weights, about 10 s)…",
    max_entries=3,
)
def cached_model(name: str, weights: str, device: str) -> LoadedModel:
    """One shared, read-only model per (name, weights, device) for all sessions."""
    if name == "default":
        return load_model("default", device=device)
    return load_model(name, weights=weights, device=device)


@st.cache_resource(show_spinner=False, max_entries=1)
def timm_vit_names() -> list[str]:
    import timm

    return sorted(set(timm.list_models(["vit_*", "deit*"])))


def model_sidebar() -> tuple[LoadedModel, ModelKey]:
    """Model and device inputs; falls back to the default model when a choice fails."""
    keep_widget_state("model_source", "timm_name", "timm_weights", "ckpt_arch", "ckpt_path")
    keep_widget_state("device")
    st.sidebar.header("Model")
    source = st.sidebar.radio(
        "Source", [DEFAULT_SOURCE, TIMM_SOURCE, CHECKPOINT_SOURCE], key="model_source"
    )
    key = ModelKey("default", "default", "cpu")
    names = timm_vit_names() if source != DEFAULT_SOURCE else []
    for key_name in ("timm_name", "ckpt_arch"):
        if names and st.session_state.get(key_name) is None:
            st.session_state[key_name] = DEFAULT_TIMM if DEFAULT_TIMM in names else names[0]
    if source == TIMM_SOURCE:
        name = st.sidebar.selectbox(
            "timm architecture",
            names,
            key="timm_name",
            accept_new_options=True,
            help="Any timm VisionTransformer with standard blocks.",
        )
        weights = st.sidebar.radio(
            "Weights",
            ["hub", "random"],
            horizontal=True,
            key="timm_weights",
            help="hub: pretrained weights from the Hugging Face hub (needs the network once, "
            "then cached under HF_HOME). random: untrained, for trying things offline.",
        )
        key = ModelKey(str(name), weights, "cpu")
    elif source == CHECKPOINT_SOURCE:
        arch = st.sidebar.selectbox(
            "timm architecture of the checkpoint",
            names,
            key="ckpt_arch",
            accept_new_options=True,
        )
        path = st.sidebar.text_input(
            "Checkpoint path (.safetensors, .pth, .pt)",
            key="ckpt_path",
            placeholder="/path/to/model.safetensors",
        )
        if path.strip():
            key = ModelKey(str(arch), str(Path(path.strip()).expanduser()), "cpu")
        else:
            st.sidebar.info("Enter a checkpoint path; meanwhile the default model is shown.")
    choice = st.sidebar.radio("Device", DEVICES, horizontal=True, key="device")
    device, warning = resolve_device(choice)
    if warning:
        st.sidebar.warning(warning)
    key = ModelKey(key.name, key.weights, device)
    failures = st.session_state.setdefault("model_failures", {})
    if key not in failures:  # a failed load (e.g. offline hub) is not retried on every rerun
        try:
            model = cached_model(key.name, key.weights, key.device)
        except ModelLoadError as error:
            failures[key] = str(error)
        else:
            return learned_sidebar(model, key)
    st.sidebar.error(f"{failures[key]}\n\nShowing the embedded default model instead.")
    if st.sidebar.button("Retry loading", key="retry_model"):
        failures.pop(key, None)
        st.rerun()
    fallback = ModelKey("default", "default", device)
    try:
        return cached_model(fallback.name, fallback.weights, fallback.device), fallback
    except ModelLoadError as error:
        st.error(str(error))
        st.stop()
        raise  # unreachable: st.stop() ends the run


@st.cache_resource(show_spinner=False, max_entries=16)
def learned_upload(
    digest: str, model_key: tuple[str, str, str], _data: bytes, _model: LoadedModel
) -> LearnedWeights:
    """An uploaded weights file, checked against the model it is for (read once)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "upload.safetensors"
        path.write_bytes(_data)
        return load_learned(path, _model)


def learned_sidebar(model: LoadedModel, key: ModelKey) -> tuple[LoadedModel, ModelKey]:
    """Weights from ``python -m analysis train``, added to a new model (the cached one is
    shared and stays as it is); a file for another backbone is refused, the rest used."""
    uploads = st.sidebar.file_uploader(
        "Trained reducer weights (.safetensors)",
        type=["safetensors"],
        accept_multiple_files=True,
        key="learned_uploads",
        help="Files written by `python -m analysis train` for this backbone. Each one "
        "replaces the shipped weights of its method.",
    )
    found, digests = [], []
    for upload in uploads or []:
        data = upload.getvalue()
        digest = hashlib.sha256(data).hexdigest()[:16]
        try:
            weights = learned_upload(digest, key.cache_key(), data, model)
        except ModelLoadError as error:
            st.sidebar.error(f"Cannot use **{upload.name}**: {error}")
            continue
        named = {**weights.metadata, "source": upload.name}  # the cached object stays as is
        found.append(dataclasses.replace(weights, metadata=named))
        digests.append(digest)
        st.sidebar.caption(f"{upload.name}: {weights.method} weights in use.")
    if found:
        model = attach(model, found)
        key = dataclasses.replace(key, learned=",".join(digests))
    learned_provenance(model)
    return model, key


def learned_provenance(model: LoadedModel) -> None:
    """Which weights each learned method runs with, so a figure can say so."""
    if not model.learned:
        return
    with st.sidebar.expander("Learned weights in use"):
        for method, weights in sorted(model.learned.items()):
            st.markdown(f"**{reducer_class(method).label}**: {provenance(weights)}")


@st.cache_resource(show_spinner=False, max_entries=len(SAMPLES))
def sample_image(name: str) -> Image.Image:
    return load_image(Image.fromarray(SAMPLES[name]()))


@st.cache_resource(show_spinner=False, max_entries=8)
def decoded_upload(digest: str, _data: bytes) -> Image.Image:
    """An uploaded image decoded once (keyed by its hash); raises ImageError."""
    return load_image(_data)


def image_sidebar() -> ImageChoice:
    """Sample or upload; a file that cannot be read keeps the previous image on screen."""
    keep_widget_state("sample")
    st.sidebar.header("Image")
    sample = st.sidebar.selectbox("Sample image", list(SAMPLES), key="sample")
    upload = st.sidebar.file_uploader(
        "…or your own image",
        type=UPLOAD_TYPES,
        key="upload",
        help="jpg, png, webp, bmp, tiff or gif (first frame); any colour mode.",
    )
    choice = ImageChoice(f"sample:{sample}", sample, sample_image(sample))
    if upload is not None:
        data = upload.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        try:
            choice = ImageChoice(f"upload:{digest}", upload.name, decoded_upload(digest, data))
        except ImageError as error:
            previous = st.session_state.get("last_good_image")
            kept = previous if isinstance(previous, ImageChoice) else choice
            st.sidebar.error(
                f"Cannot use **{upload.name}**: {error}. Showing {kept.label} instead."
            )
            return kept
        st.sidebar.caption("Remove the upload to go back to the samples.")
    st.session_state["last_good_image"] = choice
    return choice


def crop_sidebar(choice: ImageChoice, model: LoadedModel) -> CropInfo:
    """Show how the image is fitted to the model's input, and return that fit."""
    _, crop = fit_to_input(choice.image, model.data_config)
    st.sidebar.image(to_png(render_crop_box(choice.image, crop), fast=True), output_format="PNG")
    st.sidebar.caption(f"Model input (yellow box): {crop.describe()}")
    return crop


@st.cache_data(show_spinner=False, max_entries=16)
def display_array(
    image_key: str, crop: CropInfo, grid: tuple[int, int], _image: Image.Image
) -> np.ndarray:
    """The model's view of the image at display resolution (cached per image and crop)."""
    return display_image(_image, crop, grid)


@dataclass(frozen=True)
class TimedRun:
    result: RunResult
    seconds: float
    device: str


@st.cache_data(show_spinner="Running the model…", max_entries=64)
def cached_run(
    model_key: tuple[str, str, str],
    image_key: str,
    schedule_json: str,
    _model: LoadedModel,
    _image: Image.Image,
) -> TimedRun:
    """One forward pass with its trace, cached per (model, image, schedule)."""
    return timed_run(_model, _image, schedule_json)


def timed_run(
    model: LoadedModel, images: Image.Image | list[Image.Image], schedule_json: str
) -> TimedRun:
    """Run and time a schedule; outputs move to the CPU so that caches hold no GPU memory."""
    start = time.perf_counter()
    result = run(model, images, parse_schedule(schedule_json))
    seconds = time.perf_counter() - start
    result = dataclasses.replace(
        result,
        logits=None if result.logits is None else result.logits.cpu(),
        features=result.features.cpu(),
    )
    return TimedRun(result, seconds, str(model.device))


def check_schedule(text: str, model: LoadedModel) -> Schedule:
    """Parse and fully check a schedule against the model, including that learned methods
    have their weights (the check ``run`` makes); raises ScheduleError."""
    schedule = parse_schedule(text, depth=model.facts.depth)
    # The engine's own check, so the app never disagrees with run().
    attach_weights(schedule.resolve(model.facts), model)
    return schedule


def usable_presets(model: LoadedModel) -> dict[str, str]:
    """The presets (solved once per model, in `analysis.presets`) that this model can run."""
    found = {}
    for title, text in presets(model).items():
        try:
            check_schedule(text, model)
        except ScheduleError:
            continue
        found[title] = text
    return found
