"""The spool: one small text file per git transaction, written by the hook.

Format (UTF-8, one item per line)::

    earthkamal-spool 1
    repo /abs/path/to/repo/.git        # the repo's common git dir
    hook reference-transaction         # or post-receive
    state committed
    <old-oid> <new-oid> refs/tags/<name>
    ...
    end

The hook creates ``<pid>.<n>.ev`` exclusively (noclobber) with shell builtins only, no child
process, so it costs git no fork+exec of ``mv``; the file is complete once its last line is
``end``. The agent skips a young file without that line (the hook is mid-write; inotify's
close-write event wakes the agent again) and moves aside one that stays incomplete. Lines are
hints only:
the agent re-reads every named ref. A file that cannot be read is moved to ``spool-rejected/``
with a ``.why`` file next to it and never stops the agent.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

MAGIC = "earthkamal-spool 1"
MAX_BYTES = 1 << 20
_OID = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
_ZERO = re.compile(r"^0+$")


class SpoolError(Exception):
    """A spool file is unusable; the message says why."""


class Incomplete(SpoolError):
    """No `end` line yet: a hook may still be writing it."""

#: How long an incomplete file may be a hook mid-write before it is moved aside.
INCOMPLETE_GRACE_S = 30.0


@dataclass(frozen=True)
class RefUpdate:
    old: str
    new: str
    ref: str

    @property
    def tag(self) -> str:
        return self.ref[len("refs/tags/") :]

    @property
    def is_deletion(self) -> bool:
        return bool(_ZERO.match(self.new))


@dataclass(frozen=True)
class SpoolEvent:
    path: Path
    repo: str
    hook: str
    state: str
    updates: tuple[RefUpdate, ...]

    @property
    def tags(self) -> list[str]:
        seen: dict[str, None] = {}
        for u in self.updates:
            seen.setdefault(u.tag, None)
        return list(seen)


def pending(spool_dir: Path) -> list[Path]:
    """Complete spool files, oldest first (temp files of a hook mid-write are skipped)."""
    try:
        entries = list(os.scandir(spool_dir))
    except FileNotFoundError:
        return []
    files = [e for e in entries if e.name.endswith(".ev") and not e.name.startswith(".")]

    def key(e: os.DirEntry) -> tuple[float, str]:
        try:
            return (e.stat(follow_symlinks=False).st_mtime, e.name)
        except OSError:
            return (0.0, e.name)

    return [Path(e.path) for e in sorted(files, key=key)]


def parse(text: str, path: Path) -> SpoolEvent:
    """Parse the text of a spool file; raise SpoolError with a reason."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or (len(lines) == 1 and MAGIC.startswith(lines[0])):
        # Created by the hook, not yet written (or cut short): wait for the rest.
        raise Incomplete("incomplete: empty or cut short before its `end` line")
    if lines[0] != MAGIC:
        raise SpoolError("not an earthkamal spool file (bad first line)")
    if lines[-1] != "end":
        raise Incomplete("incomplete: cut short before its `end` line")
    head: dict[str, str] = {}
    updates: list[RefUpdate] = []
    for line in lines[1:-1]:
        key, _, value = line.partition(" ")
        if key in ("repo", "hook", "state") and key not in head:
            head[key] = value
            continue
        parts = line.split(" ")
        if len(parts) != 3 or not (_OID.match(parts[0]) and _OID.match(parts[1])):
            raise SpoolError(f"malformed ref line {line[:80]!r}")
        if not parts[2].startswith("refs/tags/") or parts[2] == "refs/tags/":
            continue
        updates.append(RefUpdate(*parts))
    for key in ("repo", "hook", "state"):
        if key not in head:
            raise SpoolError(f"missing `{key}` line")
    if not os.path.isabs(head["repo"]):
        raise SpoolError("repo path is not absolute")
    return SpoolEvent(path, head["repo"], head["hook"], head["state"], tuple(updates))


def read(path: Path) -> SpoolEvent:
    """Read and validate one spool file: a regular file of ours, small, UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == 40:  # ELOOP: a symlink in place of a spool file
            raise SpoolError("is a symlink; spool entries must be regular files") from e
        raise SpoolError(f"cannot open: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpoolError("not a regular file")
        if st.st_uid != os.getuid():
            raise SpoolError(f"owned by another user (uid {st.st_uid}); ignored")
        if st.st_size > MAX_BYTES:
            raise SpoolError(f"too large ({st.st_size} bytes, limit {MAX_BYTES})")
        data = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    if b"\0" in data:
        raise SpoolError("binary content")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpoolError("not valid UTF-8") from e
    return parse(text, path)


def reject(path: Path, rejected_dir: Path, reason: str) -> Path:
    """Move a bad spool file aside with a ``.why`` note; return its new path."""
    rejected_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    dest = rejected_dir / path.name
    n = 0
    while dest.exists() or dest.is_symlink():
        n += 1
        dest = rejected_dir / f"{path.name}.{n}"
    try:
        os.rename(path, dest)
    except OSError:
        try:
            os.unlink(path)
        except OSError:
            pass
    try:
        fd = os.open(f"{dest}.why", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(reason + "\n")
    except OSError:
        pass
    return dest


def done(path: Path) -> None:
    """Remove a processed spool file."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


WAKE = "earthkamal-wake 1"
WAKE_PREFIX = "wake-"


def is_wake(path: Path) -> bool:
    """A nudge from the CLI (see :func:`wake`): nothing to read, just delete it."""
    return path.name.startswith(WAKE_PREFIX)


def wake(spool_dir: Path) -> None:
    """Nudge a running agent (a decision was recorded): a tiny spool file it just deletes."""
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(prefix="." + WAKE_PREFIX, dir=spool_dir)
        with os.fdopen(fd, "w") as f:
            f.write(WAKE + "\n")
        os.rename(tmp, os.path.join(spool_dir, os.path.basename(tmp)[1:] + ".ev"))
    except OSError:
        pass
