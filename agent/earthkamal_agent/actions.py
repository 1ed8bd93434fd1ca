"""What a person does to a job from the CLI: approve, reject, retry, cancel, deploy, rollback.

Each records its decision in the store in one transaction and wakes the running agent.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import spool
from .errors import UserError
from .paths import Paths
from .store import Job, Store, TransitionError


def _wake(paths: Paths) -> None:
    spool.wake(paths.spool)


def record_approval(store: Store, job: Job, by: str) -> Job:
    """Approve exactly the commit and digest this job has now."""
    return store.transition(job.id, "approved", expect=("awaiting_approval",), step="approved",
                            decided_by=by, approved_commit=job.commit_oid,
                            approved_digest=job.digest, reason=None)


def approve(paths: Paths, store: Store, job: Job) -> str:
    if job.state != "awaiting_approval":
        raise UserError(f"job {job.id} ({job.tag}) is {job.state}, not waiting for approval; "
                        "only a job in awaiting_approval can be approved.")
    try:
        record_approval(store, job, by="cli")
    except TransitionError as e:
        raise UserError(f"job {job.id} could not be approved: {e}.") from None
    _wake(paths)
    return (f"Approved job {job.id}: {job.tag} ({(job.digest or '')[:19]}) will be deployed"
            f" to {job.destination or 'the default destination'}.")


def reject(paths: Paths, store: Store, job: Job) -> str:
    if job.state != "awaiting_approval":
        raise UserError(f"job {job.id} ({job.tag}) is {job.state}, not waiting for approval; "
                        "only a job in awaiting_approval can be rejected.")
    store.transition(job.id, "rejected", expect=("awaiting_approval",), decided_by="cli",
                     reason="rejected from the command line")
    _wake(paths)
    return f"Rejected job {job.id} ({job.tag})."


def retry(paths: Paths, store: Store, job: Job) -> str:
    if job.state == "interrupted" or (job.state == "failed" and job.step in
                                      ("kamal deploy", "kamal rollback", "verify approval")
                                      and job.approved_digest):
        try:
            store.transition(job.id, "approved", reason=None, step="approved",
                             decided_by=f"{job.decided_by or 'cli'}+retry")
        except TransitionError as e:
            raise UserError(f"job {job.id} cannot be retried: {e}.") from None
        _wake(paths)
        return f"Job {job.id} ({job.tag}) will deploy again (same approved image)."
    if job.state in ("failed", "expired", "canceled", "rejected", "superseded"):
        target = "awaiting_approval" if job.state == "expired" else "detected"
        try:
            if target == "detected":
                _force(store, job, "detected")
            else:
                store.set_data(job.id, expires_at=time.time() + _approval_timeout(store, job))
                store.transition(job.id, target, reason=None)
        except TransitionError as e:
            raise UserError(f"job {job.id} cannot be retried: {e}.") from None
        _wake(paths)
        return f"Job {job.id} ({job.tag}) queued again from the start."
    raise UserError(f"job {job.id} ({job.tag}) is {job.state}; only failed, interrupted, "
                    "expired, canceled, rejected or superseded jobs can be retried.")


def _approval_timeout(store: Store, job: Job) -> float:
    from . import repo as gitrepo
    from .config import REPO_FILE, parse_repo_config

    rec = store.repo(job.repo_id)
    text = gitrepo.read_file(rec.common_dir, job.commit_oid, REPO_FILE) if rec else None
    return parse_repo_config(text, f"{REPO_FILE} at {job.tag}").approval_timeout


def _force(store: Store, job: Job, state: str) -> None:
    """A person's retry restarts a finished job from the start (a new attempt)."""
    with store.tx() as db:
        store._move(db, job.id, job.state, state, step="queued", reason="retried by a person",
                    fields={"attempts": job.attempts + 1, "approved_commit": None,
                            "approved_digest": None, "decided_by": None})


def cancel(paths: Paths, store: Store, job: Job) -> str:
    if job.state == "deploying":
        raise UserError(f"job {job.id} is deploying right now; Kamal cannot be stopped halfway "
                        "safely. Wait for it to finish.")
    try:
        store.transition(job.id, "canceled", reason="canceled by a person")
    except TransitionError:
        raise UserError(f"job {job.id} ({job.tag}) is {job.state} and cannot be canceled.") \
            from None
    _wake(paths)
    return f"Canceled job {job.id} ({job.tag})."


def _repo_for(store: Store, path: str):
    from . import hookinstall

    loc = hookinstall.locate(Path(path))
    rec = store.repo_by_dir(loc.common_dir)
    if rec is None:
        raise UserError(f"{path} is not registered; run `earthkamal-agent install {path}` first.")
    return rec


def deploy_tag(paths: Paths, store: Store, tag: str, repo_path: str) -> str:
    """Enqueue an existing tag by hand (also one recorded as already released)."""
    from . import detect
    from . import repo as gitrepo

    rec = _repo_for(store, repo_path)
    target = gitrepo.resolve_tag(rec.common_dir, tag)
    if target is None:
        raise UserError(f"there is no tag {tag} in {rec.name}; create it with `git tag {tag}`.")
    existing = store.find_job(rec.id, tag, target.commit_oid)
    if existing:
        if existing.state in ("failed", "canceled", "rejected", "expired", "superseded",
                              "interrupted"):
            return retry(paths, store, existing)
        return f"{tag} already has job {existing.id} ({existing.state})."
    with store.tx() as db:
        db.execute("DELETE FROM baseline WHERE repo_id=? AND tag=?", (rec.id, tag))
    jid = detect.handle_tag(store, rec, tag, origin="manual")
    _wake(paths)
    job = store.job(jid) if jid else None
    if job is None:
        raise UserError(f"{tag} could not be queued.")
    return f"Queued {tag} as job {job.id} ({job.state}{': ' + job.reason if job.reason else ''})."


def rollback(paths: Paths, store: Store, destination: str | None, repo_path: str) -> str:
    """Deploy the version before the current one again, through the approval gate."""
    rec = _repo_for(store, repo_path)
    deployed = [j for j in store.jobs(states=("deployed",), repo_id=rec.id)
                if (j.destination or "") == (destination or "")]
    # newest first by the time they were deployed
    deployed.sort(key=lambda j: j.updated_at, reverse=True)
    if len(deployed) < 2:
        raise UserError(f"there is no earlier deployed version of {rec.name} for "
                        f"{destination or 'the default destination'} to roll back to.")
    current, previous = deployed[0], next((j for j in deployed[1:]
                                           if j.version != deployed[0].version), None)
    if previous is None:
        raise UserError("every deployed version in the history is the current one; nothing to "
                        "roll back to.")
    with store.tx() as db:
        store._move(db, previous.id, "deployed", "awaiting_approval", step="approve",
                    reason=f"rollback from {current.version}",
                    fields={"approved_commit": None, "approved_digest": None,
                            "data": _with(previous, rollback=True, rollback_from=current.version)})
    _wake(paths)
    return (f"Rollback of {rec.name} to {previous.version} (job {previous.id}) is waiting for "
            f"approval: `earthkamal-agent approve {previous.id}`.")


def _with(job: Job, **items) -> str:
    import json

    d = job.extra
    d.update(items)
    d.pop("expires_at", None)
    d.pop("changes", None)  # recomputed against what is deployed now
    return json.dumps(d)
