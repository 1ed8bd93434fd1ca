"""Who holds the agent lock: cheap enough for `status` (no heavy imports)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def read_lock(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def agent_running(path: Path) -> dict[str, str] | None:
    """The lock file's contents when an agent holds the lock, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return read_lock(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
