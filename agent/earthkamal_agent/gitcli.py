"""The few things only the git CLI knows (hooksPath, git-path, version, verify-tag)."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from .runner import Command, run_quiet

_ENV = {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
# A hook's environment can carry GIT_DIR etc.; never let them redirect our git calls.
_CLEAR = {k: None for k in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR",
                            "GIT_OBJECT_DIRECTORY", "GIT_NAMESPACE")}


def git(cwd: str | os.PathLike, *args: str, timeout: float = 30) -> Command:
    """A git command as data."""
    return Command(("git", *args), env={**_CLEAR, **_ENV}, cwd=str(cwd), timeout=timeout)


@functools.lru_cache(maxsize=1)
def version() -> tuple[int, int]:
    res = run_quiet(git("/", "version"))
    m = re.search(rb"(\d+)\.(\d+)", res.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def rev_parse(cwd: Path, *args: str) -> list[str] | None:
    res = run_quiet(git(cwd, "rev-parse", *args))
    if res.returncode != 0:
        return None
    return res.stdout.decode().splitlines()


def git_path(cwd: Path, name: str) -> str:
    res = run_quiet(git(cwd, "rev-parse", "--git-path", name))
    return res.stdout.decode().strip()


def config_get(cwd: Path, key: str) -> str | None:
    res = run_quiet(git(cwd, "config", "--get", key))
    out = res.stdout.decode().strip()
    return out if res.returncode == 0 and out else None


def has_commits(cwd: Path) -> bool:
    return run_quiet(git(cwd, "rev-parse", "--verify", "-q", "HEAD^{commit}")).returncode == 0 or \
        bool(run_quiet(git(cwd, "for-each-ref", "--count=1", "refs/")).stdout.strip())


def verify_tag(common_dir: str, tag: str) -> tuple[bool, str]:
    """``git verify-tag`` on a tag: (accepted, git's words)."""
    res = run_quiet(git(common_dir, "verify-tag", "--", tag))
    text = (res.stderr or res.stdout).decode("utf-8", "replace").strip()
    return res.returncode == 0, text
