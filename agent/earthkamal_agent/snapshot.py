"""The tagged commit, exported into an agent-owned build dir.

libgit2 writes the commit's tree straight into the dir (``checkout_tree`` with a target
directory and ``DONT_UPDATE_INDEX``), so the user's index, working tree, branches and stash
are never touched and only committed files reach the build: an untracked ``.env`` or
``.secret`` in the working copy stays where it is. Initialised submodules are exported from
their own repos under ``.git/modules``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pygit2

from . import repo as gitrepo
from .errors import UserError

_STRATEGY = (pygit2.enums.CheckoutStrategy.FORCE
             | pygit2.enums.CheckoutStrategy.DONT_UPDATE_INDEX
             | pygit2.enums.CheckoutStrategy.DONT_WRITE_INDEX
             | pygit2.enums.CheckoutStrategy.RECREATE_MISSING)


def build_dir(builds: Path, job_id: int) -> Path:
    return builds / f"job-{job_id}"


def export(common_dir: str, commit_oid: str, dest: Path) -> Path:
    """Write the commit's files (and submodules) into ``dest``; return it."""
    remove(dest)
    dest.mkdir(mode=0o700, parents=True)
    repo = gitrepo.open_repo(common_dir)
    _export_tree(repo, commit_oid, dest, common_dir)
    return dest


def _export_tree(repo: pygit2.Repository, commit_oid: str, dest: Path, common_dir: str) -> None:
    commit = repo.get(commit_oid)
    if commit is None:
        raise UserError(f"commit {commit_oid[:12]} is not in {common_dir}; fetch it and retry.")
    tree = commit.peel(pygit2.Tree)
    repo.checkout_tree(tree, directory=str(dest), strategy=_STRATEGY)
    if ".gitmodules" not in tree:
        return
    for sub_path, sub_oid in _gitlinks(repo, tree):
        module_dir = _module_repo(common_dir, repo, sub_path)
        if module_dir is None:
            raise UserError(
                f"submodule {sub_path} is not initialised in {common_dir}; run "
                "`git submodule update --init --recursive` there and retry the job."
            )
        sub = pygit2.Repository(module_dir)
        target = dest / sub_path
        target.mkdir(parents=True, exist_ok=True)
        _export_tree(sub, sub_oid, target, module_dir)


def _gitlinks(repo: pygit2.Repository, tree: pygit2.Tree, prefix: str = ""):
    for entry in tree:
        path = f"{prefix}{entry.name}"
        if entry.filemode == pygit2.enums.FileMode.COMMIT:
            yield path, str(entry.id)
        elif entry.type_str == "tree":
            yield from _gitlinks(repo, repo.get(entry.id), path + "/")


def _module_repo(common_dir: str, repo: pygit2.Repository, sub_path: str) -> str | None:
    try:
        name = None
        for sm in repo.listall_submodules():
            if sm == sub_path:
                name = repo.submodules[sm].name
        candidates = [Path(common_dir, "modules", name or sub_path)]
        if repo.workdir:
            candidates.append(Path(repo.workdir, sub_path, ".git"))
    except Exception:  # noqa: BLE001
        candidates = [Path(common_dir, "modules", sub_path)]
    for c in candidates:
        if c.exists():
            return str(c)
    return None


def remove(path: Path) -> None:
    """Delete a build dir (read-only files included)."""
    if not path.exists() and not path.is_symlink():
        return

    def onerror(func, p, _exc):  # noqa: ANN001
        os.chmod(p, 0o700)
        func(p)

    if path.is_symlink():
        path.unlink()
        return
    shutil.rmtree(path, onerror=onerror)
