"""What was deployed where, and what a release changes since then (approvals, status, plan)."""

from __future__ import annotations

from . import repo as gitrepo
from .store import Job, Store

MAX_SUBJECTS = 5


def last_deployed(store: Store, repo_id: int, destination: str | None,
                  before: int | None = None) -> Job | None:
    """The newest deployed job of a repo for a destination (other than job ``before``)."""
    for j in store.jobs(states=("deployed",), repo_id=repo_id):
        if (j.destination or "") == (destination or "") and (before is None or j.id != before):
            return j
    return None


def changes(store: Store, repo_id: int, common_dir: str, commit: str,
            destination: str | None, before: int | None = None) -> dict:
    """``{"since": version|None, "count": n|None, "subjects": [...]}``; None = first deploy."""
    prev = last_deployed(store, repo_id, destination, before=before)
    if prev is None:
        return {"since": None, "count": None, "subjects": []}
    subjects = gitrepo.commits_between(common_dir, prev.commit_oid, commit)
    return {"since": prev.version, "count": len(subjects), "subjects": subjects[:MAX_SUBJECTS]}
