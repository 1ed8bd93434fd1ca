"""From spool hints and tag listings to job rows.

Hook lines are hints: every tag named is re-read with pygit2 and peeled to its commit. A tag
that no longer exists cancels its pending jobs (``git tag -d``); a tag that now points
elsewhere creates a new job that supersedes the old one (``git tag -f``); a tag seen before
(same commit, or in the install baseline) changes nothing, which is what makes ``pack-refs``
and ``gc`` noise harmless.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

from . import repo as gitrepo
from . import spool
from .config import REPO_FILE, ConfigError, parse_repo_config
from .paths import Paths
from .store import ACTIVE, Repo, Store

log = logging.getLogger("earthkamal.detect")

CANCELABLE = tuple(s for s in ACTIVE if s != "deploying")  # Kamal is never stopped halfway

OnJob = Callable[[int], None]


def handle_tag(store: Store, repo: Repo, tag: str, origin: str) -> int | None:
    """Record what ``tag`` means now; return the id of a new job, if any."""
    try:
        target = gitrepo.resolve_tag(repo.common_dir, tag)
    except gitrepo.NotACommit as e:
        oid = gitrepo.raw_target(repo.common_dir, tag)
        if oid is None or store.in_baseline(repo.id, tag, oid) or store.find_job(repo.id, tag, oid):
            return None
        job, created = store.create_job(repo.id, tag, oid, oid, origin, state="refused",
                                        reason=f"{e}; only tags on commits are released")
        return job.id if created else None
    if target is None:
        for job in store.jobs_for_tag(repo.id, tag):
            if job.state in CANCELABLE:
                try:
                    store.transition(job.id, "canceled", expect=CANCELABLE,
                                     reason=f"tag {tag} was deleted")
                    log.info("job %s canceled: tag %s deleted", job.id, tag)
                except Exception:  # noqa: BLE001 - raced with a worker; it will see the state
                    pass
        return None
    if store.find_job(repo.id, tag, target.commit_oid):
        return None
    if store.in_baseline(repo.id, tag, target.commit_oid):
        return None
    where = f"{REPO_FILE} at {tag}"
    try:
        cfg = parse_repo_config(gitrepo.read_file(repo.common_dir, target.commit_oid, REPO_FILE),
                                where)
    except ConfigError as e:
        job, created = store.create_job(repo.id, tag, target.tag_oid, target.commit_oid, origin,
                                        state="failed", reason=str(e), step="config")
        return job.id if created else None
    if not cfg.tag_matches(tag):
        job, created = store.create_job(
            repo.id, tag, target.tag_oid, target.commit_oid, origin, state="ignored",
            reason=f"tag does not match tags: {cfg['tags']} in {REPO_FILE}")
        return job.id if created else None
    extra = {"data": json.dumps({"signed_required": True})} if cfg["require_signed_tags"] else {}
    job, created = store.create_job(repo.id, tag, target.tag_oid, target.commit_oid, origin,
                                    destination=cfg.destination_for(tag), **extra)
    if created:
        log.info("job %s: %s %s at %s (%s)", job.id, repo.name, tag, target.commit_oid[:12],
                 origin)
    return job.id if created else None


def handle_event(store: Store, ev: spool.SpoolEvent) -> list[int]:
    repo = store.repo_by_dir(ev.repo) or store.repo_by_dir(os.path.realpath(ev.repo))
    if repo is None:
        raise spool.SpoolError(f"from an unregistered repo {ev.repo}")
    if ev.state != "committed":
        return []
    new = []
    for tag in ev.tags:
        jid = handle_tag(store, repo, tag, origin=ev.hook)
        if jid is not None:
            new.append(jid)
    return new


def drain(store: Store, paths: Paths) -> list[int]:
    """Process every complete spool file; bad ones are moved aside with the reason."""
    new: list[int] = []
    for path in spool.pending(paths.spool):
        try:
            if spool.is_wake(path):
                spool.done(path)
                continue
            ev = spool.read(path)
            new += handle_event(store, ev)
        except spool.Incomplete as e:
            try:
                age = time.time() - path.stat().st_mtime
            except OSError:
                continue
            if age < spool.INCOMPLETE_GRACE_S:
                continue  # a hook is still writing it; its close-write event wakes us again
            dest = spool.reject(path, paths.rejected, str(e))
            log.warning("spool file %s moved to %s: %s", path.name, dest, e)
            continue
        except spool.SpoolError as e:
            dest = spool.reject(path, paths.rejected, str(e))
            log.warning("spool file %s moved to %s: %s", path.name, dest, e)
            continue
        except Exception as e:  # noqa: BLE001 - a broken repo must not stop the agent
            dest = spool.reject(path, paths.rejected, f"could not be processed: {e}")
            log.warning("spool file %s moved to %s: could not be processed: %s", path.name,
                        dest, e)
            continue
        spool.done(path)
    return new


def reconcile(store: Store, repo: Repo) -> list[int]:
    """Catch up with tags made while the agent was down or by clients that skip hooks."""
    new: list[int] = []
    gitrepo.forget(repo.common_dir)
    try:
        tags = gitrepo.list_tags(repo.common_dir)
    except Exception as e:  # noqa: BLE001
        log.warning("cannot read tags of %s: %s", repo.common_dir, e)
        return new
    for tag in sorted(tags, key=lambda t: _tag_time(repo.common_dir, tags[t])):
        jid = handle_tag(store, repo, tag, origin="reconcile")
        if jid is not None:
            new.append(jid)
    for job in store.jobs(states=CANCELABLE, repo_id=repo.id):
        if job.tag not in tags:
            handle_tag(store, repo, job.tag, origin="reconcile")
    return new


def _tag_time(common_dir: str, target: object) -> float:
    if not isinstance(target, gitrepo.TagTarget):
        return 0.0
    obj = gitrepo.open_repo(common_dir).get(target.tag_oid)
    tagger = getattr(obj, "tagger", None)
    if tagger is not None:
        return float(tagger.time)
    return float(getattr(obj, "commit_time", 0))
