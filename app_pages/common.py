"""What the pages share: the image inputs, notices and the cached runs (the model inputs
are in :mod:`app_pages.model_inputs`).

Models come from ``analysis.load_model`` (cached once per process and never mutated),
images from ``analysis.images.read_image``, runs from ``analysis.run`` (cached per
model, image and schedule, so a page redraws without running the model again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import streamlit as st
from PIL import Image

from analysis import (
    ImageError,
    LoadedModel,
    RunResult,
    Schedule,
    ScheduleError,
    parse_schedule,
    run,
)
from analysis.engine import attach_weights, cpu_replica
from analysis.errors import DeviceMemoryError
from analysis.fitting import FIT_MODES, FittedImage, fit_image
from analysis.images import WORKING_PIXELS, CropInfo, DecodedImage, read_image
from viz.overlays import display_image, render_crop_box, to_png
from viz.schedule_table import presets

UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"]
NOTICES = "_page_notices"


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
    weights: str  # default, hub, random, upload:DIGEST or an allowed server path
    device: str
    learned: str = ""  # digests of uploaded learned-reducer files, if any
    label: str = ""  # what to call the weights (an uploaded checkpoint's file name)

    def describe(self) -> str:
        name = "DINOv2 ViT-S/14 (embedded default)" if self.name == "default" else self.name
        shown = self.label or self.weights
        weights = "" if self.weights == "default" else f", {shown} weights"
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
    notes: tuple[str, ...] = ()  # how the file was read (first frame only, downscaled)


@dataclass(frozen=True)
class Upload:
    """An uploaded file: its name as the user knows it, and its bytes."""

    name: str
    data: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def notify(message: str, kind: str = "error") -> None:
    """A message for the main area too (where the user is looking), shown by
    :func:`show_notices` under the page title; the sidebar keeps its own copy."""
    notices = st.session_state.setdefault(NOTICES, [])
    if (kind, message) not in notices:
        notices.append((kind, message))


def show_notices() -> None:
    """This run's notices from the sidebar inputs, at the top of the main area."""
    for kind, message in st.session_state.pop(NOTICES, []):
        if kind == "error":
            st.error(message, icon=":material/error:")
        elif kind == "warning":
            st.warning(message, icon=":material/warning:")
        else:
            st.info(message, icon=":material/info:")


def keep_widget_state(*keys: str) -> None:
    """Keep widget values when the user switches pages (Streamlit drops unrendered ones)."""
    for key in keys:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


@st.cache_resource(show_spinner=False, max_entries=len(SAMPLES))
def sample_image(name: str) -> Image.Image:
    return read_image(Image.fromarray(SAMPLES[name]())).image


@st.cache_resource(show_spinner=False, max_entries=8)
def decoded_upload(digest: str, name: str, _data: bytes) -> DecodedImage:
    """An uploaded image decoded once (keyed by its hash); only a copy of at most about
    4 MP is kept. Raises ImageError."""
    return read_image(_data, name=name, max_pixels=WORKING_PIXELS)


def image_sidebar() -> ImageChoice:
    """Sample or upload; a file that cannot be read keeps the previous image on screen."""
    keep_widget_state("sample")
    st.sidebar.header("Image")
    uploaded = st.session_state.get("upload") is not None  # the box must not claim a sample
    sample = st.sidebar.selectbox(
        "Sample image",
        list(SAMPLES),
        key="sample",
        disabled=uploaded,
        format_func=(lambda name: f"{name} (not in use: an upload is)") if uploaded else str,
    )
    upload = st.sidebar.file_uploader(
        "…or your own image",
        type=UPLOAD_TYPES,
        key="upload",
        help="jpg, png, webp, bmp, tiff or gif (first frame); any colour mode; up to 64 "
        "megapixels.",
    )
    choice = ImageChoice(f"sample:{sample}", sample, sample_image(sample))
    if upload is not None:
        data = upload.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        try:
            decoded = decoded_upload(digest, upload.name, data)
        except ImageError as error:
            previous = st.session_state.get("last_good_image")
            kept = previous if isinstance(previous, ImageChoice) else choice
            message = f"Cannot use **{upload.name}**: {error}. Showing {kept.label} instead."
            st.sidebar.error(message)
            notify(message)
            return kept
        choice = ImageChoice(f"upload:{digest}", upload.name, decoded.image, decoded.notes)
        st.sidebar.caption("Remove the upload to go back to the samples.")
    for note in choice.notes:
        st.sidebar.caption(note)
    st.session_state["last_good_image"] = choice
    return choice


FIT_LABELS = {"crop": "Centre crop", "pad": "Pad to square"}


@st.cache_resource(show_spinner=False, max_entries=16)
def fitted_image(
    image_key: str, mode: str, _model: LoadedModel, _image: Image.Image
) -> FittedImage:
    """The image fitted by ``mode`` (a padded canvas is made once per image)."""
    return fit_image(_image, _model.data_config, mode)


def fit_choice(
    choice: ImageChoice, model: LoadedModel, mode: str
) -> tuple[ImageChoice, FittedImage]:
    """The image the model runs on under ``mode``. A padded canvas gets its own key and
    label, so that runs, caches and figures never take it for the original."""
    config = hashlib.sha256(repr(model.data_config).encode()).hexdigest()[:8]
    key = f"{choice.key}|{config}"  # the canvas depends on the input size and mean colour
    fitted = fitted_image(key, mode, model, choice.image)
    if mode == "pad":
        label = f"{choice.label} (padded)"
        choice = ImageChoice(f"pad:{key}", label, fitted.image, choice.notes)
    return choice, fitted


def crop_sidebar(choice: ImageChoice, model: LoadedModel) -> tuple[ImageChoice, CropInfo]:
    """The fit to the model's square input (centre crop, or pad to square first), shown
    as the model sees it; returns the image the model runs on and its crop."""
    keep_widget_state("fit_mode")
    mode = st.sidebar.radio(
        "Fit to the model's square input",
        FIT_MODES,
        format_func=FIT_LABELS.get,
        horizontal=True,
        key="fit_mode",
        help="Centre crop: timm's eval transform, as the model was trained; a wide or tall "
        "image loses its sides. Pad to square: the whole image on a square of the "
        "dataset's mean colour.",
    )
    choice, fitted = fit_choice(choice, model, mode)
    crop = fitted.crop
    st.sidebar.image(to_png(render_crop_box(choice.image, crop), fast=True), output_format="PNG")
    st.sidebar.caption(f"Model input (yellow box): {fitted.describe()}")
    if mode == "pad":
        st.sidebar.caption(
            "The padding is the dataset's mean colour, zero once normalised, but its patches "
            "are still tokens: the model sees them, and reducers merge or drop them."
        )
    for note in choice.notes:
        if "first one" in note:
            notify(note, "info")
    for warning in (fitted.warning(), crop.warning()):
        if warning:
            st.sidebar.warning(warning)
            notify(f"**{choice.label}**: {warning}", "warning")
    return choice, crop


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
    """Run and time a schedule; outputs move to the CPU so that caches hold no GPU memory.

    When the GPU runs out of memory, the run is repeated on a CPU copy of the model and
    ``device`` says so."""
    start = time.perf_counter()
    device = str(model.device)
    try:
        result = run(model, images, parse_schedule(schedule_json))
    except DeviceMemoryError:
        start = time.perf_counter()
        result = run(cpu_replica(model), images, parse_schedule(schedule_json))
        device = "cpu (the GPU ran out of memory)"
    seconds = time.perf_counter() - start
    result = dataclasses.replace(
        result,
        logits=None if result.logits is None else result.logits.cpu(),
        features=result.features.cpu(),
    )
    return TimedRun(result, seconds, device)


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
