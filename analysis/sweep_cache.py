"""The sweeps' persistent cache: one small file per computed thing, written atomically.

Files live under ``$TOKENSCOPE_CACHE/sweeps`` (see :func:`analysis.default_model.cache_dir`).
A key is the sha256 of a canonical JSON of everything that decides the result: the model
and its weights (learned ones included), the image set's content, the schedule, the
metric with its parameters, the precision and :func:`code_version`. Nothing else (batch
size, device count, time of day) enters a key, so reopening a page, rerunning a command
or resuming an interrupted sweep finds what was already computed.

Writes go to a temporary file in the same folder and are moved into place with
``os.replace``, so a killed process leaves either the old file, the new file or a stray
temporary file, never half a file. A file that fails to parse is treated as missing.
A folder that cannot be written (read-only, full) does not stop a sweep: the points are
computed but not saved, and :attr:`SweepCache.write_error` says why.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from analysis.models import LoadedModel

ANALYSIS_DIR = Path(__file__).resolve().parent
# Sources whose edits cannot change a number a sweep computes.
_NOT_RESULT_SOURCES = {"cli.py", "sweep_cli.py", "bench.py", "train.py", "holdout.py"}


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of the ``analysis/`` sources that affect results.

    Safer than a version string that someone forgets to bump: any edit to the engine, a
    reducer, the metrics or the image handling invalidates the cached points.
    """
    digest = hashlib.sha256()
    for path in sorted(ANALYSIS_DIR.rglob("*.py")):
        if path.name in _NOT_RESULT_SOURCES:
            continue
        digest.update(str(path.relative_to(ANALYSIS_DIR)).encode())
        digest.update(path.read_bytes())
    digest.update(f"torch {torch.__version__}".encode())
    return digest.hexdigest()[:16]


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model: LoadedModel) -> dict[str, Any]:
    """What identifies a model's results: name, weights, backbone and learned weights.

    The backbone is hashed in full (every parameter), so two checkpoints with the same
    name never share cached points. Cached on the module's identity per process.
    """
    return {
        "name": model.name,
        "weights": model.weights,
        "input_size": model.data_config.input_size,
        "backbone": _module_digest(model.module),
        "learned": {
            method: _learned_digest(weights) for method, weights in sorted(model.learned.items())
        },
    }


_MODULE_DIGESTS: dict[int, tuple[Any, str]] = {}


def _module_digest(module: torch.nn.Module) -> str:
    held = _MODULE_DIGESTS.get(id(module))
    if held is not None and held[0] is module:
        return held[1]
    value = tensor_digest(dict(module.state_dict()))
    _MODULE_DIGESTS[id(module)] = (module, value)
    return value


def _learned_digest(weights: Any) -> str:
    tensors = {
        f"{layer}.{key}": value
        for layer, module in weights.modules.items()
        for key, value in module.state_dict().items()
    }
    return tensor_digest(tensors) if tensors else "none"


def make_key(**parts: Any) -> str:
    """The sha256 of the canonical JSON of ``parts`` (plus the code version)."""
    payload = json.dumps({**parts, "code": code_version()}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class SweepCache:
    """JSON records and tensor files by key, under one folder."""

    def __init__(self, root: str | Path | None = None) -> None:
        if root is None:
            from analysis.default_model import cache_dir

            root = cache_dir() / "sweeps"
        self.root = Path(root)
        self.write_error: str | None = None  # set when a write failed: say it once

    def _path(self, key: str, suffix: str) -> Path:
        return self.root / key[:2] / f"{key}{suffix}"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key, ".json")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, record: dict[str, Any]) -> None:
        self._write(self._path(key, ".json"), json.dumps(record).encode())

    def get_tensors(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(key, ".pt")
        if not path.exists():
            return None
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:  # a stray or corrupt file counts as missing
            return None

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        import io

        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in tensors.items()}, buffer)
        self._write(self._path(key, ".pt"), buffer.getvalue())

    def _write(self, path: Path, data: bytes) -> None:
        if self.write_error is not None:
            return
        try:
            atomic_write(path, data)
        except OSError as error:
            self.write_error = (
                f"The cache folder {self.root} cannot be written ({error.strerror or error}); "
                "results are computed but not saved. Set TOKENSCOPE_CACHE to a writable folder."
            )


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


__all__ = ["SweepCache", "atomic_write", "code_version", "make_key", "model_fingerprint"]
