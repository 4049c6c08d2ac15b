"""Seeded fuzz cases for everything a user can hand TokenScope, and how each is judged.

Seven kinds of input: image bytes, schedule text, schedule JSON, sweep configurations,
figure configurations, model checkpoints and reducer-weights files. Case ``i`` of a kind
is a pure function of ``(kind, i, seed)``, so any case can be rebuilt from its number.

A case is judged by what the code under test does with it:

- ``ok``: it was accepted, and what came out is sound (finite features, a schedule that
  reads back the same from its text);
- ``clean``: it was refused with a :class:`~analysis.errors.TokenScopeError`, whose
  message is meant for the user;
- ``crash``: any other exception, a wrong result, or code run from a pickle.

``tests/test_fuzz.py`` runs a few hundred cases in-process; ``benchmarks/fuzz.py`` runs
thousands, each in a forked process with a memory cap and a timeout.
"""

from __future__ import annotations

import io
import json
import random
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

KINDS = (
    "image",
    "schedule_text",
    "schedule_json",
    "sweep_config",
    "figure_config",
    "checkpoint",
    "reducer_weights",
)
METHODS = ("tome", "evit", "topk", "random", "dtem", "patchmerger", "cropr", "ltm", "mstm")
LEARNED = {
    "dtem": "dtem:r=2",
    "patchmerger": "patchmerger:tokens=4",
    "cropr": "cropr:rate=2@0-1",
    "ltm": "ltm:keep=0.7",
    "mstm": "mstm:keep=0.5,ms=1@1,2",
}
MARKER = "tokenscope-fuzz-pickle-ran"  # a pickle that runs code would create this file


@dataclass(frozen=True)
class Outcome:
    """What one case did."""

    kind: str
    index: int
    status: str  # ok, clean or crash
    detail: str = ""  # the error's type and message


# --------------------------------------------------------------------------- random values


def random_text(rng: random.Random, longest: int = 40) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_-.:;,@=[]{}()\"' \t\n\\/\0é→🙂"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


def random_number(rng: random.Random) -> Any:
    return rng.choice(
        [
            0,
            1,
            -1,
            2,
            8,
            13,
            0.5,
            0.7,
            1e-9,
            -0.0,
            1e308,
            -1e308,
            10**40,
            -(10**12),
            float("nan"),
            float("inf"),
            rng.randint(-5, 40),
            rng.random() * rng.choice([1, 10, 1000]),
            rng.random(),
            round(rng.uniform(0.05, 1.0), rng.randint(1, 4)),
            True,
            False,
        ]
    )


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value, nested a little."""
    roll = rng.random()
    if depth > 3 or roll < 0.45:
        return rng.choice(
            [None, True, False, random_number(rng), random_text(rng), random_number(rng)]
        )
    if roll < 0.75:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_text(rng, 8): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def mutate_json(rng: random.Random, value: Any, depth: int = 0) -> Any:
    """``value`` with one to a few structural changes somewhere inside it."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        out = dict(value)
        key = rng.choice(list(out))
        action = rng.random()
        if action < 0.5:
            out[key] = mutate_json(rng, out[key], depth + 1)
        elif action < 0.65:
            del out[key]
        elif action < 0.8:
            out[random_text(rng, 10)] = random_json(rng)
        else:
            out[key] = random_json(rng)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        out = list(value)
        index = rng.randrange(len(out))
        action = rng.random()
        if action < 0.5:
            out[index] = mutate_json(rng, out[index], depth + 1)
        elif action < 0.7:
            del out[index]
        elif action < 0.85:
            out.append(rng.choice([out[index], random_json(rng)]))
        else:
            out = out * rng.randint(2, 50)
        return out
    return random_json(rng)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Flips, insertions, deletions, truncation or splices, a few at a time."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if not out:
            out.extend(rng.randbytes(rng.randint(1, 16)))
            continue
        roll = rng.random()
        at = rng.randrange(len(out))
        if roll < 0.35:
            out[at] ^= 1 << rng.randrange(8)
        elif roll < 0.5:
            out[at] = rng.choice([0, 0xFF, 0x7F, 0x80])
        elif roll < 0.65:
            out[at:at] = rng.randbytes(rng.randint(1, 32))
        elif roll < 0.8:
            del out[at : at + rng.randint(1, 64)]
        elif roll < 0.9:
            del out[rng.randint(0, len(out)) :]
        else:
            start = rng.randrange(len(out))
            out[at:at] = out[start : start + rng.randint(1, 64)]
    return bytes(out)


# --------------------------------------------------------------------------- images


def _encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    """A small PNG whose header claims ``width`` × ``height``."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    rows = zlib.compress(b"\x00" * min(1 << 16, (width * 3 + 1) * 2))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


def _with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0/SOF2) claims another size."""
    out = bytearray(data)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = out.find(marker)
        if at >= 0:
            out[at + 5 : at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
            break
    return bytes(out)


def _image_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels)
    grey16 = Image.fromarray((rng.random((20, 28)) * 65535).astype(np.uint16))
    floats = Image.fromarray(rng.random((16, 16)).astype(np.float32), mode="F")
    frames = [Image.fromarray(np.roll(pixels, k, 0)).convert("P") for k in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    return [
        _encode(rgb, "PNG"),
        _encode(rgb.convert("RGBA"), "PNG"),
        _encode(rgb.convert("P"), "PNG"),
        _encode(rgb.convert("L"), "PNG"),
        _encode(grey16, "PNG"),
        _encode(rgb, "JPEG", quality=80),
        _encode(rgb, "JPEG", progressive=True),
        _encode(rgb.convert("CMYK"), "JPEG"),
        gif.getvalue(),
        _encode(rgb, "TIFF"),
        _encode(rgb, "TIFF", compression="tiff_deflate"),
        _encode(grey16, "TIFF"),
        _encode(floats, "TIFF"),
        _encode(rgb, "WEBP"),
        _encode(rgb, "BMP"),
        _encode(Image.new("RGB", (1, 1)), "PNG"),
    ]


_IMAGE_SEEDS: list[bytes] = []


def image_case(rng: random.Random) -> bytes:
    """Image bytes: a valid image, one with a lying header, or a mutated one."""
    if not _IMAGE_SEEDS:
        _IMAGE_SEEDS.extend(_image_seeds())
    roll = rng.random()
    if roll < 0.05:
        return rng.choice([b"", rng.randbytes(rng.randint(1, 200))])
    if roll < 0.2:
        sizes = [1, 2, 7, 224, 4096, 30000, 65000, 2**31 - 1, 0]
        width, height = rng.choice(sizes), rng.choice(sizes)
        if rng.random() < 0.5:
            return png_claiming(width, height, rng.choice([8, 16]), rng.choice([0, 2, 6]))
        return _with_jpeg_size(_IMAGE_SEEDS[5], width, height)
    if roll < 0.3:
        shape = rng.choice([(1, 1), (1, 500), (300, 1), (10, 10), (2, 64), (3000, 40)])
        return _encode(Image.new(rng.choice(["RGB", "L", "I;16"]), shape), "PNG")
    seed = rng.choice(_IMAGE_SEEDS)
    return seed if roll < 0.35 else mutate_bytes(rng, seed)


def check_image(data: bytes) -> None:
    """The app's path for an upload: read (downscaled copy), fit, draw the crop box."""
    from analysis.images import WORKING_PIXELS, read_image, to_tensor
    from analysis.models import DataConfig
    from viz.overlays import render_crop_box

    config = DataConfig(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875, "bicubic")
    decoded = read_image(data, name="fuzz.png", max_pixels=WORKING_PIXELS)
    tensor, (crop,) = to_tensor([decoded.image], config)
    if tensor.shape != (1, 3, 224, 224) or not bool(torch.isfinite(tensor).all()):
        raise AssertionError(f"bad model input {tuple(tensor.shape)}")
    render_crop_box(decoded.image, crop)
    crop.warning()


# --------------------------------------------------------------------------- schedules


def _layers_text(rng: random.Random) -> str:
    items = []
    for _ in range(rng.randint(1, 4)):
        low = rng.choice([0, 1, 2, 3, 5, 11, -1, 40, 10**9, rng.randint(0, 6)])
        if rng.random() < 0.4:
            high = rng.choice([low, low + 1, low + 3, low - 1, 99999999, rng.randint(0, 6)])
            items.append(f"{low}-{high}")
        else:
            items.append(str(low))
    if rng.random() < 0.05:
        items.append(random_text(rng, 6))
    return ",".join(items)


def _param_text(rng: random.Random, method: str) -> str:
    from analysis.reducers import REDUCERS

    names = [p.name for p in REDUCERS[method].params] if method in REDUCERS else ["x"]
    pairs = []
    for _ in range(rng.randint(0, 3)):
        name = rng.choice([*names, random_text(rng, 5)]) if rng.random() < 0.95 else ""
        value = rng.choice(
            [
                str(random_number(rng)),
                f"[{','.join(str(rng.randint(-2, 30)) for _ in range(rng.randint(0, 14)))}]",
                "[[8]]",
                "[1,[2]]",
                "yes",
                "no",
                "1e400",
                "nan",
                random_text(rng, 6),
            ]
        )
        pairs.append(f"{name}={value}" if rng.random() < 0.95 else name)
    return ",".join(pairs)


def schedule_text_case(rng: random.Random) -> str:
    """Schedule text from the grammar, with wrong pieces mixed in."""
    roll = rng.random()
    if roll < 0.03:
        return random_text(rng, 200)
    if roll < 0.05:
        return "tome:r=1@0;" * rng.randint(900, 3000)
    parts = []
    for _ in range(rng.randint(0, 4)):
        method = rng.choice([*METHODS, random_text(rng, 6)]) if rng.random() < 0.97 else "TOME"
        text = method
        params = _param_text(rng, method)
        if params or rng.random() < 0.1:
            text += ":" + params
        if rng.random() < 0.5:
            text += "@" + (_layers_text(rng) if rng.random() < 0.95 else "")
        parts.append(text)
    if rng.random() < 0.15:
        parts.append(f"proportional_attention={rng.choice(['0', '1', 'yes', 'no', 'maybe', ''])}")
    text = ";".join(parts)
    return mutate_bytes(rng, text.encode()).decode("utf-8", "replace") if roll > 0.9 else text


def schedule_json_case(rng: random.Random) -> str:
    """Schedule JSON near the real shape, with wrong types and sizes."""
    from analysis.reducers import REDUCERS

    parts = []
    for _ in range(rng.randint(0, 3)):
        method = rng.choice(METHODS)
        names = [p.name for p in REDUCERS[method].params]
        part: dict[str, Any] = {"method": method}
        if names and rng.random() < 0.8:
            part["params"] = {
                rng.choice(names): rng.choice(
                    [random_number(rng), [rng.randint(0, 20) for _ in range(rng.randint(0, 13))]]
                )
                for _ in range(rng.randint(1, 2))
            }
        if rng.random() < 0.6:
            part["layers"] = rng.choice(
                [
                    sorted(rng.sample(range(6), rng.randint(1, 4))),
                    _layers_text(rng),
                    [rng.randint(0, 5) for _ in range(3)],
                ]
            )
        parts.append(part)
    value: Any = {"parts": parts}
    if rng.random() < 0.3:
        value["proportional_attention"] = rng.choice([True, False, 0, 1, "no", "yes", None, 2])
    if rng.random() < 0.6:
        value = mutate_json(rng, value)
    if rng.random() < 0.1:
        value = value["parts"] if isinstance(value, dict) and "parts" in value else value
    text = json.dumps(value)
    if rng.random() < 0.03:
        text = "[" * rng.randint(100, 6000)
    return text


# --------------------------------------------------------------------------- configurations


def sweep_config_case(rng: random.Random) -> Any:
    from analysis.sweep import MethodSweep, SweepSpec

    spec = SweepSpec(
        model="test",
        images="samples",
        limit=rng.choice([None, 1, 2, 4]),
        methods=tuple(
            MethodSweep(
                base=rng.choice(["tome:r=2", "evit:keep=0.7@1", "topk@1,2"]), targets=(50.0, 80.0)
            )
            for _ in range(rng.randint(0, 2))
        ),
        schedules=tuple(
            rng.choice(["tome:r=1", "none", "evit@1"]) for _ in range(rng.randint(0, 2))
        ),
    ).to_dict()
    for _ in range(rng.randint(1, 3)):
        spec = mutate_json(rng, spec)
    return spec


def check_sweep_config(data: Any, model: Any) -> None:
    from analysis.sweep import SweepSpec, plan_sweep

    spec = SweepSpec.from_dict(data)
    if (
        len(spec.methods)
        * max(1, max((len(m.targets) + len(m.values) for m in spec.methods), default=1))
        > 64
    ):
        return  # a legitimately large plan: planning it is not the point here
    plan_sweep(
        model, schedules=spec.schedules, methods=spec.methods, include_full=spec.include_full
    )


_FIGURE_SEEDS: list[Any] = []


def figure_config_case(rng: random.Random) -> Any:
    if not _FIGURE_SEEDS:
        folder = Path(__file__).resolve().parents[1] / "examples"
        for path in sorted(folder.glob("*.json")):
            _FIGURE_SEEDS.append(json.loads(path.read_text()))
    value = rng.choice(_FIGURE_SEEDS) if _FIGURE_SEEDS else {}
    for _ in range(rng.randint(1, 3)):
        value = mutate_json(rng, value)
    return value


def check_figure_config(data: Any) -> None:
    from analysis.figure_config import FigureConfig

    config = FigureConfig.from_dict(data)
    config.to_dict()


# --------------------------------------------------------------------------- checkpoints


def _safetensors_bytes(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def canonical(data: bytes) -> bytes:
    """A safetensors file with its header keys sorted (the writer's order varies)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    raw = json.dumps(header, sort_keys=True).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def evil_pickle(marker: Path) -> bytes:
    """A pickle that would create ``marker`` if it were loaded without weights_only."""
    return b"cposix\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


def _evil_zip(marker: Path) -> bytes:
    """A torch zip archive whose data.pkl runs a command."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", evil_pickle(marker))
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")
    return buffer.getvalue()


class Seeds:
    """Valid files to start from: checkpoints of the fuzz backbone and reducer weights."""

    def __init__(self, folder: Path, model: Any, checkpoint_state: dict[str, torch.Tensor]):
        from safetensors.torch import save as save_bytes

        from analysis.learned import backbone_id, init_weights, save_learned

        self.folder = folder
        self.marker = folder / MARKER
        self.checkpoints = [
            (
                "safetensors",
                canonical(save_bytes({k: v.contiguous() for k, v in checkpoint_state.items()})),
            ),
            ("pth", _torch_bytes({"model": checkpoint_state})),
            ("pth", _torch_bytes(checkpoint_state)),
        ]
        self.weights: list[tuple[str, bytes]] = []
        for method, schedule in LEARNED.items():
            found = init_weights(model, [schedule], seed=0)
            if method not in found:
                continue
            path = folder / f"seed-{method}.safetensors"
            save_learned(path, method, found[method].modules, backbone_id(model), command="seed")
            self.weights.append(("safetensors", canonical(path.read_bytes())))
        dim = model.facts.dim
        official = {
            f"blocks.{i}.attn.qkv.metric_layer.weight": torch.randn(16, dim) for i in range(2)
        }
        official.update(
            {f"blocks.{i}.attn.qkv.metric_layer.bias": torch.zeros(16) for i in range(2)}
        )
        self.weights.append(("pth", _torch_bytes({"model": official})))


def _tensor_dict_case(rng: random.Random, state: dict[str, torch.Tensor]) -> Any:
    """A state dict with a few keys renamed, reshaped, retyped, made non-finite or added."""
    out = dict(sorted(state.items()))  # loaders return keys in any order
    for _ in range(rng.randint(1, 3)):
        if not out:
            out[random_text(rng, 12)] = torch.zeros(1)
        key = rng.choice(list(out))
        roll = rng.random()
        if roll < 0.2:
            out[f"{key}.x"] = out.pop(key)
        elif roll < 0.4:
            out[key] = torch.zeros(rng.choice([(1,), (2, 3), (0,), (rng.randint(1, 9),)]))
        elif roll < 0.55:
            out[key] = out[key].to(
                rng.choice([torch.int64, torch.float16, torch.bool, torch.uint8])
            )
        elif roll < 0.75:
            broken = out[key].clone().float()
            if broken.numel():
                broken.view(-1)[0] = rng.choice([float("nan"), float("inf")])
            out[key] = broken
        elif roll < 0.85:
            del out[key]
        else:
            out[random_text(rng, 12)] = torch.zeros(rng.randint(1, 4))
    return out


def _safetensors_header_case(rng: random.Random, data: bytes) -> bytes:
    """A safetensors file with a lying header: shapes, offsets, dtypes, metadata."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    keys = [k for k in header if k != "__metadata__"]
    if keys:
        key = rng.choice(keys)
        entry = dict(header[key])
        roll = rng.random()
        if roll < 0.3:
            entry["shape"] = rng.choice([[2**40], [65536, 65536], [-1], [0], [3, 2**33], []])
        elif roll < 0.5:
            entry["data_offsets"] = rng.choice(
                [[0, 2**40], [5, 1], [0, len(body) + 8], [-4, 4], [0, 0]]
            )
        elif roll < 0.7:
            entry["dtype"] = rng.choice(["F64", "BOOL", "I8", "U64", "F8_E4M3", "XYZ", 7])
        else:
            entry = mutate_json(rng, entry)
        header[key] = entry
    if rng.random() < 0.4:
        meta = header.get("__metadata__", {})
        header["__metadata__"] = mutate_json(rng, meta if isinstance(meta, dict) else {})
    return _safetensors_bytes(header, body)


def checkpoint_case(
    rng: random.Random, seeds: Seeds, state: dict[str, torch.Tensor]
) -> tuple[str, bytes]:
    from safetensors.torch import save as save_bytes

    roll = rng.random()
    if roll < 0.05:
        return rng.choice(["pth", "pt", "safetensors"]), rng.choice([b"", rng.randbytes(64)])
    if roll < 0.1:
        return "pth", rng.choice([evil_pickle(seeds.marker), _evil_zip(seeds.marker)])
    if roll < 0.35:
        changed = _tensor_dict_case(rng, state)
        if rng.random() < 0.5:
            try:
                tensors = {k: v.contiguous() for k, v in changed.items()}
                return "safetensors", canonical(save_bytes(tensors))
            except Exception:
                pass
        return "pth", _torch_bytes({"state_dict": changed} if rng.random() < 0.5 else changed)
    if roll < 0.45:
        odd = rng.choice([[1, 2], {"model": [torch.zeros(1)]}, {"a": {"b": torch.zeros(1)}}, 7])
        return "pth", _torch_bytes(odd)
    suffix, data = rng.choice(seeds.checkpoints)
    if suffix == "safetensors" and roll < 0.6:
        return suffix, _safetensors_header_case(rng, data)
    return suffix, data if roll < 0.62 else mutate_bytes(rng, data)


def _metadata_case(rng: random.Random, data: bytes) -> bytes:
    """A reducer-weights file whose metadata lies: sizes, layers, method, backbone."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    meta = dict(header.get("__metadata__", {}))
    field = rng.choice(
        [
            "method",
            "backbone",
            "backbone_fingerprint",
            "backbone_dim",
            "backbone_depth",
            "layers",
            "module_config",
            "format",
        ]
    )
    roll = rng.random()
    if roll < 0.2:
        meta.pop(field, None)
    elif field == "module_config" and roll < 0.7:
        try:
            config = json.loads(meta.get(field, "{}"))
        except ValueError:
            config = {}
        if isinstance(config, dict) and config:
            key = rng.choice(list(config))
            config[key] = rng.choice([30000, 2_000_000, 0, -1, 10**12, 1.5, "wide", None, [3]])
        meta[field] = json.dumps(config)
    elif field == "layers" and roll < 0.7:
        meta[field] = json.dumps(
            rng.choice([[99], [-1], [0, 0], [], [True], "0-3", [2**40], list(range(500))])
        )
    else:
        meta[field] = rng.choice([random_text(rng, 20), json.dumps(random_json(rng)), "9" * 30])
    header["__metadata__"] = {str(k): str(v) for k, v in meta.items()}
    return _safetensors_bytes(header, data[8 + length :])


def reducer_weights_case(rng: random.Random, seeds: Seeds) -> tuple[str, bytes]:
    from safetensors.torch import load as load_bytes
    from safetensors.torch import save as save_bytes

    suffix, data = rng.choice(seeds.weights)
    roll = rng.random()
    if suffix == "pth":
        if roll < 0.5:
            state = torch.load(io.BytesIO(data), weights_only=True)["model"]
            return "pth", _torch_bytes({"model": _tensor_dict_case(rng, state)})
        return "pth", data if roll < 0.55 else mutate_bytes(rng, data)
    if roll < 0.45:
        return "safetensors", _metadata_case(rng, data)
    if roll < 0.7:
        (length,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + length]).get("__metadata__", {})
        changed = _tensor_dict_case(rng, load_bytes(data))
        try:
            tensors = {k: v.contiguous() for k, v in changed.items()}
            return "safetensors", canonical(save_bytes(tensors, metadata=meta))
        except Exception:
            return "safetensors", data
    if roll < 0.8:
        return "safetensors", _safetensors_header_case(rng, data)
    return "safetensors", data if roll < 0.82 else mutate_bytes(rng, data)


# --------------------------------------------------------------------------- the harness


class Harness:
    """Builds every case and judges it; one per process (it holds a small model)."""

    def __init__(self, seed: int = 0, folder: Path | None = None) -> None:
        import timm

        from analysis.models import from_module

        self.seed = seed
        self.folder = Path(folder or tempfile.mkdtemp(prefix="tokenscope-fuzz-"))
        torch.manual_seed(0)
        module = timm.create_model("vit_small_patch16_224", pretrained=False, depth=4, img_size=64)
        self.model = from_module(module, "vit_small_patch16_224", weights="random")
        self.images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        self.checkpoint_state = timm.create_model("test_vit", pretrained=False).state_dict()
        self.seeds = Seeds(self.folder, self.model, self.checkpoint_state)

    def rng(self, kind: str, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{kind}:{index}")

    def case(self, kind: str, index: int) -> Any:
        """Case ``index`` of ``kind`` (the same on every run with the same seed)."""
        rng = self.rng(kind, index)
        makers: dict[str, Callable[[], Any]] = {
            "image": lambda: image_case(rng),
            "schedule_text": lambda: schedule_text_case(rng),
            "schedule_json": lambda: schedule_json_case(rng),
            "sweep_config": lambda: sweep_config_case(rng),
            "figure_config": lambda: figure_config_case(rng),
            "checkpoint": lambda: checkpoint_case(rng, self.seeds, self.checkpoint_state),
            "reducer_weights": lambda: reducer_weights_case(rng, self.seeds),
        }
        return makers[kind]()

    def check(self, kind: str, case: Any) -> None:
        """Feed ``case`` to the code a user's input reaches; raises what that code raises."""
        if kind == "image":
            check_image(case)
        elif kind in ("schedule_text", "schedule_json"):
            self.check_schedule(case)
        elif kind == "sweep_config":
            check_sweep_config(case, self.model)
        elif kind == "figure_config":
            check_figure_config(case)
        elif kind == "checkpoint":
            self.check_checkpoint(*case)
        elif kind == "reducer_weights":
            self.check_weights(*case)
        else:
            raise ValueError(f"unknown kind {kind!r}")

    def check_schedule(self, text: str) -> None:
        from analysis.engine import run
        from analysis.learned import attach, init_weights
        from analysis.schedule import parse_schedule

        facts = self.model.facts
        schedule = parse_schedule(text)
        schedule.resolve(facts)
        again = parse_schedule(schedule.to_text())
        if again != schedule or parse_schedule(schedule.to_json()) != schedule:
            raise AssertionError(
                f"round trip changed {schedule.to_text()!r} into {again.to_text()!r}"
            )
        model = self.model
        learned = [m for m in schedule.methods() if m in LEARNED]
        if learned:
            model = attach(model, init_weights(model, [schedule], seed=0).values())
        result = run(model, self.images, schedule)
        if not bool(torch.isfinite(result.features).all()):
            raise AssertionError("non-finite features")

    def _file(self, suffix: str, data: bytes) -> Path:
        path = self.folder / f"case.{suffix}"
        path.write_bytes(data)
        return path

    def check_checkpoint(self, suffix: str, data: bytes) -> None:
        from analysis.engine import run
        from analysis.models import load_model

        path = self._file(suffix, data)
        try:
            model = load_model("test_vit", weights=path)
        finally:
            self._no_code_ran()
        images = torch.randn(1, 3, model.data_config.input_size, model.data_config.input_size)
        if not bool(torch.isfinite(run(model, images).features).all()):
            raise AssertionError("a checkpoint with finite weights gave non-finite features")

    def check_weights(self, suffix: str, data: bytes) -> None:
        from analysis.engine import run
        from analysis.learned import attach, load_learned
        from analysis.reducers import reducer_class

        path = self._file(suffix, data)
        try:
            weights = load_learned(path, self.model)
        finally:
            self._no_code_ran()
        model = attach(self.model, [weights])
        cls = reducer_class(weights.method)
        layers = sorted(weights.modules)
        values = ""
        if weights.method == "patchmerger":
            values = f":tokens={weights.modules[layers[0]].config['tokens']}"
        elif weights.method == "mstm":
            values = ":keep=0.5,ms=1"
        schedule = f"{cls.name}{values}@{','.join(map(str, layers))}"
        result = run(model, self.images, schedule)
        if not bool(torch.isfinite(result.features).all()):
            raise AssertionError("accepted weights gave non-finite features")

    def _no_code_ran(self) -> None:
        if self.seeds.marker.exists():
            self.seeds.marker.unlink()
            raise AssertionError("a pickle ran code")

    def judge(self, kind: str, index: int) -> Outcome:
        """Build and check one case; never raises."""
        from analysis.errors import TokenScopeError

        try:
            case = self.case(kind, index)
        except Exception as error:  # a generator bug is not a finding about the code
            return Outcome(kind, index, "skipped", f"case not built: {error!r}"[:300])
        try:
            self.check(kind, case)
        except TokenScopeError as error:
            return Outcome(kind, index, "clean", f"{type(error).__name__}: {error}"[:300])
        except Exception as error:
            return Outcome(kind, index, "crash", f"{type(error).__name__}: {error}"[:500])
        return Outcome(kind, index, "ok")


def describe(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """Counts per kind and status."""
    table: dict[str, dict[str, int]] = {}
    for outcome in outcomes:
        row = table.setdefault(outcome.kind, {})
        row[outcome.status] = row.get(outcome.status, 0) + 1
    return table
