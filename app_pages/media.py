"""Keep served pictures a little while after a session stops using them.

Streamlit keeps ``st.image`` pictures in memory and, at the end of every script run of
any session, deletes those that no session references. A session's own rerun first drops
all its references, then adds them back as it draws. When another session's run ends in
between, it deletes pictures this session's browser still shows or is about to fetch:
the browser gets HTTP 404, a broken image. That is what 4 of 8 concurrent browsers saw
(issue 13). Here a picture is deleted only once it has been unreferenced for a grace
period, so a rerun always finds its pictures again. Memory stays bounded: a picture
outlives its last use by the grace period at most.
"""

from __future__ import annotations

import os
import time
from typing import Any

GRACE_ENV = "TOKENSCOPE_MEDIA_GRACE_S"
GRACE_S = 60.0
_NEEDED = ("_lock", "_get_inactive_file_ids", "_delete_file", "_remove_orphaned_deferred_callables")


def grace_seconds() -> float:
    """The grace period: ``$TOKENSCOPE_MEDIA_GRACE_S`` or 60 s (0: Streamlit's own rule)."""
    try:
        return max(0.0, float(os.environ.get(GRACE_ENV, GRACE_S)))
    except ValueError:
        return GRACE_S


def keep_media_files(manager: Any | None = None, grace_s: float | None = None) -> bool:
    """Give the server's media file manager (or ``manager``) the grace period, once.

    Returns False, changing nothing, when there is no server (AppTest, a bare script),
    the grace period is 0, or this Streamlit's manager lacks what the rule relies on.
    """
    grace = grace_seconds() if grace_s is None else grace_s
    if manager is None:
        from streamlit import runtime

        if not runtime.exists():
            return False
        manager = runtime.get_instance().media_file_mgr
    if getattr(manager, "_tokenscope_grace_s", None) is not None:
        return True
    if grace <= 0 or not all(hasattr(manager, name) for name in _NEEDED):
        return False
    unused_since: dict[str, float] = {}

    def remove_orphaned_files() -> None:
        """Streamlit's cleanup, deleting only files unreferenced for ``grace`` seconds."""
        now = time.monotonic()
        with manager._lock:
            inactive = manager._get_inactive_file_ids()
            for file_id in list(unused_since):
                if file_id not in inactive:  # in use again (or already gone)
                    del unused_since[file_id]
            for file_id in inactive:
                if now - unused_since.setdefault(file_id, now) >= grace:
                    manager._delete_file(file_id)
                    del unused_since[file_id]
            manager._remove_orphaned_deferred_callables()

    manager.remove_orphaned_files = remove_orphaned_files  # this instance only
    manager._tokenscope_grace_s = grace
    return True
