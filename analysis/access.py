"""Which server paths a served app may read: none, unless the operator allows folders.

The app runs on a server that several people reach through their browsers, so a path
typed into it must never open a server file the operator has not allowed. The operator
names allowed folders in ``TOKENSCOPE_ALLOWED_FOLDERS`` (a path list, like ``PATH``) or on
the command line, ``streamlit run app.py -- --allow-folder /data/models``. Without either,
users upload their files instead. The CLI and the Python API are not restricted.

A refusal never says whether the path exists, so it cannot be used to probe the server.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from analysis.errors import AccessError, shorten

ALLOWED_FOLDERS_ENV = "TOKENSCOPE_ALLOWED_FOLDERS"
ALLOW_FLAG = "--allow-folder"
MAX_PATH_CHARS = 1024


def allowed_folders() -> list[Path]:
    """The folders the operator allows the app to read (none by default)."""
    raw = os.environ.get(ALLOWED_FOLDERS_ENV, "")
    return [Path(item).expanduser() for item in raw.split(os.pathsep) if item.strip()]


def allow_from_args(argv: Sequence[str]) -> list[str]:
    """Add the folders named by ``--allow-folder PATH`` (repeatable) in ``argv`` to
    ``TOKENSCOPE_ALLOWED_FOLDERS``; returns the folders found."""
    found: list[str] = []
    items = list(argv)
    for index, item in enumerate(items):
        if item == ALLOW_FLAG and index + 1 < len(items):
            found.append(items[index + 1])
        elif item.startswith(ALLOW_FLAG + "="):
            found.append(item.split("=", 1)[1])
    if found:
        current = [str(path) for path in allowed_folders()]
        merged = list(dict.fromkeys([*current, *found]))
        os.environ[ALLOWED_FOLDERS_ENV] = os.pathsep.join(merged)
    return found


def check_server_path(
    path: str | Path, roots: Sequence[str | Path] | None = None, *, what: str = "file"
) -> Path:
    """``path`` resolved (links and ``..`` followed) when it lies inside an allowed folder.

    ``roots`` defaults to :func:`allowed_folders`. Raises :class:`AccessError` otherwise,
    with the same message whether or not the path exists.
    """
    text = str(path).strip()
    folders = allowed_folders() if roots is None else [Path(root) for root in roots]
    if not folders:
        raise AccessError(
            f"reading {what}s on the server is turned off here: upload the {what} instead. "
            f"(The person who runs the app can allow folders with {ALLOWED_FOLDERS_ENV} or "
            f"`streamlit run app.py -- {ALLOW_FLAG} PATH`.)"
        )
    shown = ", ".join(str(folder) for folder in folders)
    if not text or len(text) > MAX_PATH_CHARS or "\0" in text:
        raise AccessError(
            f"give the path of a {what} inside {shown} (at most {MAX_PATH_CHARS} characters)"
        )
    try:
        resolved = Path(text).expanduser().resolve()
        inside = any(resolved.is_relative_to(folder.resolve()) for folder in folders)
    except (OSError, RuntimeError, ValueError):  # a loop of links, a name too long
        inside = False
    if not inside:
        raise AccessError(
            f"{shorten(text, 80)} is not inside a folder this app may read ({shown}). "
            f"Upload the {what} instead, or give a path inside one of those folders"
        )
    return resolved


__all__ = [
    "ALLOWED_FOLDERS_ENV",
    "ALLOW_FLAG",
    "allow_from_args",
    "allowed_folders",
    "check_server_path",
]
