"""Reading a repository with pygit2: tags, peeled commits, files at a commit.

One :class:`pygit2.Repository` per thread (libgit2's rule); :func:`open_repo` caches per
thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pygit2

_local = threading.local()


class NotACommit(Exception):
    """The tag points at a tree or blob, not a commit."""


@dataclass(frozen=True)
class TagTarget:
    name: str
    tag_oid: str      # what the ref points to (a tag object for annotated tags)
    commit_oid: str   # the peeled commit
    annotated: bool


def open_repo(common_dir: str) -> pygit2.Repository:
    """The thread's Repository for a common git dir."""
    cache = getattr(_local, "repos", None)
    if cache is None:
        cache = _local.repos = {}
    repo = cache.get(common_dir)
    if repo is None:
        repo = cache[common_dir] = pygit2.Repository(common_dir)
    return repo


def forget(common_dir: str) -> None:
    cache = getattr(_local, "repos", None)
    if cache:
        cache.pop(common_dir, None)


def _peel(repo: pygit2.Repository, name: str, target: pygit2.Oid) -> TagTarget:
    obj = repo.get(target)
    if obj is None:
        raise NotACommit(f"tag {name} points to a missing object {target}")
    annotated = obj.type == pygit2.enums.ObjectType.TAG
    try:
        commit = obj.peel(pygit2.Commit)
    except (ValueError, pygit2.InvalidSpecError) as e:
        raise NotACommit(f"tag {name} points to a {_kind(obj)}, not a commit") from e
    return TagTarget(name, str(target), str(commit.id), annotated)


def _kind(obj: pygit2.Object) -> str:
    while obj.type == pygit2.enums.ObjectType.TAG:
        obj = obj.get_object()
    return {pygit2.enums.ObjectType.TREE: "tree", pygit2.enums.ObjectType.BLOB: "blob"}.get(
        obj.type, "non-commit object")


def resolve_tag(common_dir: str, name: str) -> TagTarget | None:
    """Re-read ``refs/tags/<name>`` now; None when it does not exist."""
    repo = open_repo(common_dir)
    try:
        ref = repo.references.get(f"refs/tags/{name}")
    except (pygit2.InvalidSpecError, ValueError):
        return None
    if ref is None:
        return None
    return _peel(repo, name, ref.target)


def list_tags(common_dir: str) -> dict[str, TagTarget | NotACommit]:
    """Every tag with its peeled commit (or the reason it has none)."""
    repo = open_repo(common_dir)
    out: dict[str, TagTarget | NotACommit] = {}
    for refname in repo.references:
        if not refname.startswith("refs/tags/"):
            continue
        name = refname[len("refs/tags/"):]
        try:
            out[name] = _peel(repo, name, repo.references[refname].target)
        except NotACommit as e:
            out[name] = e
    return out


def raw_target(common_dir: str, name: str) -> str | None:
    """What ``refs/tags/<name>`` points at, unpeeled (a tree or blob for odd tags)."""
    ref = open_repo(common_dir).references.get(f"refs/tags/{name}")
    return str(ref.target) if ref is not None else None


def read_file(common_dir: str, commit_oid: str, path: str) -> bytes | None:
    """A file's bytes at a commit, or None when it does not exist there."""
    repo = open_repo(common_dir)
    commit = repo.get(commit_oid)
    if commit is None:
        return None
    try:
        entry = commit.peel(pygit2.Tree)[path]
    except KeyError:
        return None
    obj = repo.get(entry.id)
    if not isinstance(obj, pygit2.Blob):
        return None
    return obj.data


def commit_subject(common_dir: str, commit_oid: str) -> str:
    commit = open_repo(common_dir).get(commit_oid)
    return commit.message.split("\n", 1)[0] if commit is not None else ""


def commits_between(common_dir: str, old: str | None, new: str, limit: int = 200) -> list[str]:
    """Subjects of commits reachable from ``new`` but not ``old``, newest first."""
    repo = open_repo(common_dir)
    walker = repo.walk(new, pygit2.enums.SortMode.TOPOLOGICAL)
    if old:
        try:
            walker.hide(old)
        except (KeyError, ValueError):
            pass
    out = []
    for c in walker:
        out.append(c.message.split("\n", 1)[0])
        if len(out) >= limit:
            break
    return out
