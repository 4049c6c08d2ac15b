"""The model inputs every page shares: source, checkpoint, device and learned weights.

Models come from ``analysis.load_model``, cached once per process and never mutated:
uploaded reducer weights go onto a new model (``analysis.learned.attach``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from pathlib import Path

import streamlit as st
import torch

from analysis import LoadedModel, TokenScopeError, load_model
from analysis.access import allowed_folders, check_server_path
from analysis.errors import OfflineError, shorten
from analysis.learned import attach, load_learned, provenance
from analysis.reducers import reducer_class
from analysis.reducers.base import LearnedWeights
from app_pages.common import NOTICES, ModelKey, Upload, keep_widget_state, notify

DEFAULT_SOURCE = "Embedded default (DINOv2 ViT-S/14)"
TIMM_SOURCE = "timm model"
CHECKPOINT_SOURCE = "Local checkpoint"
DEVICES = ("auto", "cuda", "cpu")
DEFAULT_TIMM = "deit_small_patch16_224"
CHECKPOINT_TYPES = ["safetensors", "pth", "pt"]
UPLOADED = "Upload a file"
SERVER_PATH = "Path on the server"


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
def _shared_model(name: str, weights: str, device: str) -> LoadedModel:
    if name == "default":
        return load_model("default", device=device)
    return load_model(name, weights=weights, device=device)


def cached_model(name: str, weights: str, device: str) -> LoadedModel:
    """One shared, read-only model per (name, weights, device) for all sessions.

    ``weights`` that name a server file are read only inside the folders the operator
    allows (:mod:`analysis.access`); otherwise AccessError, whether the file exists or not.
    """
    named = ("default", "hub") if name == "default" else ("default", "hub", "random")
    if weights not in named:
        weights = str(check_server_path(weights, what="checkpoint"))
    return _shared_model(name, weights, device)


@st.cache_resource(show_spinner="Loading the uploaded checkpoint…", max_entries=2)
def uploaded_model(name: str, digest: str, device: str, _upload: Upload) -> LoadedModel:
    """A model built from an uploaded checkpoint, shared by digest (read once)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / safe_file_name(_upload.name, CHECKPOINT_TYPES)
        path.write_bytes(_upload.data)
        model = load_model(name, weights=path, device=device)
    return dataclasses.replace(model, weights=f"uploaded {shorten(_upload.name, 60)}")


def safe_file_name(name: str, suffixes: list[str]) -> str:
    """A local file name for an upload: its own name (for messages), made harmless."""
    base = Path(name).name.replace("\0", "")[-100:] or "upload"
    suffix = Path(base).suffix.lower().lstrip(".")
    return base if suffix in suffixes else f"{base}.{suffixes[0]}"


@st.cache_resource(show_spinner=False, max_entries=1)
def timm_vit_names() -> list[str]:
    import timm

    return sorted(set(timm.list_models(["vit_*", "deit*"])))


def _model_message(error: TokenScopeError, key: ModelKey) -> str:
    """A load failure in the app's words (the core's speak of the Python API)."""
    if isinstance(error, OfflineError):
        return (
            f"The pretrained weights of **{shorten(key.name, 60)}** are not stored on this "
            "server, and the Hugging Face hub cannot be reached from it. Choose **random** "
            "weights, or **Local checkpoint** to upload a checkpoint file."
        )
    return str(error)


def _checkpoint_inputs(arch: str) -> tuple[ModelKey | None, Upload | None]:
    """The checkpoint: uploaded, or a server path when the operator allows folders."""
    folders = allowed_folders()
    mode = UPLOADED
    if folders:
        mode = st.sidebar.radio(
            "Checkpoint from", [UPLOADED, SERVER_PATH], horizontal=True, key="ckpt_mode"
        )
    if mode == SERVER_PATH:
        path = st.sidebar.text_input(
            "Checkpoint path (.safetensors, .pth, .pt)",
            key="ckpt_path",
            placeholder=str(folders[0] / "model.safetensors"),
            max_chars=1024,
        )
        st.sidebar.caption(f"Allowed folders: {', '.join(str(f) for f in folders)}")
        if not path.strip():
            st.sidebar.info("Enter a checkpoint path; meanwhile the default model is shown.")
            return None, None
        return ModelKey(arch, path.strip(), "cpu"), None
    upload = st.sidebar.file_uploader(
        "Checkpoint file (.safetensors, .pth, .pt)",
        type=CHECKPOINT_TYPES,
        key="ckpt_upload",
        help="A state dict for the architecture above. Torch files are read with "
        "weights_only=True, so they cannot run code.",
    )
    if upload is None:
        st.sidebar.info("Upload a checkpoint; meanwhile the default model is shown.")
        return None, None
    file = Upload(upload.name, upload.getvalue())
    key = ModelKey(arch, f"upload:{file.digest[:16]}", "cpu", label=f"uploaded {upload.name}")
    return key, file


def model_sidebar() -> tuple[LoadedModel, ModelKey]:
    """Model and device inputs; falls back to the default model when a choice fails."""
    st.session_state[NOTICES] = []  # the first sidebar input of every page
    keep_widget_state("model_source", "timm_name", "timm_weights", "ckpt_arch", "ckpt_path")
    keep_widget_state("device", "ckpt_mode")
    st.sidebar.header("Model")
    source = st.sidebar.radio(
        "Source", [DEFAULT_SOURCE, TIMM_SOURCE, CHECKPOINT_SOURCE], key="model_source"
    )
    key = ModelKey("default", "default", "cpu")
    upload: Upload | None = None
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
        chosen, upload = _checkpoint_inputs(str(arch))
        key = chosen or key
    choice = st.sidebar.radio("Device", DEVICES, horizontal=True, key="device")
    device, warning = resolve_device(choice)
    if warning:
        st.sidebar.warning(warning)
    key = dataclasses.replace(key, device=device)
    failures = st.session_state.setdefault("model_failures", {})
    if key not in failures:  # a failed load (e.g. offline hub) is not retried on every rerun
        try:
            if upload is not None:
                model = uploaded_model(key.name, key.weights, key.device, upload)
            else:
                model = cached_model(key.name, key.weights, key.device)
        except TokenScopeError as error:
            failures[key] = _model_message(error, key)
        else:
            return learned_sidebar(model, key)
    message = f"{failures[key]}\n\nShowing the embedded default model instead."
    st.sidebar.error(message)
    notify(f"Model: {message}")
    if st.sidebar.button("Retry loading", key="retry_model"):
        failures.pop(key, None)
        st.rerun()
    fallback = ModelKey("default", "default", device)
    try:
        return cached_model(fallback.name, fallback.weights, fallback.device), fallback
    except TokenScopeError as error:
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
        weights = load_learned(path, _model)
    return weights


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
        except TokenScopeError as error:
            message = f"Cannot use the reducer weights **{upload.name}**: {error}"
            st.sidebar.error(message)
            notify(message)
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
