"""The job store: SQLite in WAL mode, one transaction per state transition.

A job is identified by (repo, tag, commit oid): duplicate hook lines, reconcile passes and
pack-refs noise collapse into one row. Every transition is checked against the state machine
and recorded in ``transitions`` with its time, step and reason.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1

ACTIVE = ("detected", "snapshotting", "building", "publishing", "awaiting_approval", "approved",
          "deploying")
TERMINAL = ("deployed", "failed", "canceled", "rejected", "expired", "superseded", "ignored",
            "refused", "interrupted")
# `interrupted` is terminal for the machine but waits for a person (retry/cancel).
#: Done for good: history that retention may prune (`interrupted` still waits for a person).
FINISHED = tuple(s for s in TERMINAL if s != "interrupted")
STATES = ACTIVE + TERMINAL

_ALLOWED: dict[str, set[str]] = {
    "detected": {"snapshotting", "ignored", "refused"},
    "snapshotting": {"building"},
    "building": {"publishing"},
    "publishing": {"awaiting_approval", "approved"},
    "awaiting_approval": {"approved", "rejected", "expired", "superseded"},
    "approved": {"deploying", "awaiting_approval"},
    "deploying": {"deployed", "interrupted"},
    "interrupted": {"detected", "approved"},
    "failed": {"detected", "approved"},  # retry of a failed deploy: same approved image
    "rejected": set(),
    "expired": {"awaiting_approval"},
}
# Anything not yet deploying can fail, be canceled or superseded.
for _s in ("detected", "snapshotting", "building", "publishing", "awaiting_approval", "approved"):
    _ALLOWED[_s] |= {"failed", "canceled", "superseded"}
_ALLOWED["deploying"] |= {"failed"}
# After a crash, a job that was preparing its image starts over from `detected`.
for _s in ("snapshotting", "building", "publishing"):
    _ALLOWED[_s] |= {"detected"}
_ALLOWED["interrupted"] |= {"canceled"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS repos (
  id INTEGER PRIMARY KEY,
  common_dir TEXT NOT NULL UNIQUE,
  worktree TEXT,
  name TEXT NOT NULL,
  bare INTEGER NOT NULL DEFAULT 0,
  hook_path TEXT,
  chained_path TEXT,
  hook_kind TEXT,
  added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS baseline (
  repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
  tag TEXT NOT NULL,
  oid TEXT NOT NULL,
  PRIMARY KEY (repo_id, tag, oid)
);
CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY,
  repo_id INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
  tag TEXT NOT NULL,
  tag_oid TEXT,
  commit_oid TEXT NOT NULL,
  state TEXT NOT NULL,
  step TEXT,
  reason TEXT,
  destination TEXT,
  version TEXT,
  image TEXT,
  digest TEXT,
  approved_commit TEXT,
  approved_digest TEXT,
  decided_by TEXT,
  origin TEXT,
  attempts INTEGER NOT NULL DEFAULT 0,
  superseded_by INTEGER,
  data TEXT NOT NULL DEFAULT '{}',
  created_at REAL NOT NULL,
  updated_at REAL NOT NULL,
  step_started_at REAL,
  UNIQUE (repo_id, tag, commit_oid)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS transitions (
  id INTEGER PRIMARY KEY,
  job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  at REAL NOT NULL,
  from_state TEXT,
  to_state TEXT NOT NULL,
  step TEXT,
  reason TEXT
);
"""


class TransitionError(Exception):
    """A transition the state machine does not allow."""


@dataclass
class Repo:
    id: int
    common_dir: str
    worktree: str | None
    name: str
    bare: bool
    hook_path: str | None
    chained_path: str | None
    hook_kind: str | None
    added_at: float


@dataclass
class Job:
    id: int
    repo_id: int
    tag: str
    tag_oid: str | None
    commit_oid: str
    state: str
    step: str | None
    reason: str | None
    destination: str | None
    version: str | None
    image: str | None
    digest: str | None
    approved_commit: str | None
    approved_digest: str | None
    decided_by: str | None
    origin: str | None
    attempts: int
    superseded_by: int | None
    data: str
    created_at: float
    updated_at: float
    step_started_at: float | None

    @property
    def extra(self) -> dict:
        return json.loads(self.data or "{}")


def can_transition(src: str, dst: str) -> bool:
    return dst in _ALLOWED.get(src, set())


class Store:
    """A connection to the job database (one per thread)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        if path.is_symlink():
            from .paths import UnsafePathError

            raise UnsafePathError(f"{path} is a symlink; the agent keeps its database only in a "
                                  "real file it owns. Remove the link and run the command again.")
        new = not path.exists()
        if new:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
            os.close(fd)
        self.db = sqlite3.connect(path, timeout=timeout, isolation_level=None,
                                  check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=10000")
        if new or self._version() != SCHEMA_VERSION:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            with self.tx():
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
            for suffix in ("-wal", "-shm"):
                p = Path(str(path) + suffix)
                if p.exists():
                    p.chmod(0o600)
        else:
            self.db.execute("PRAGMA synchronous=NORMAL")

    def _version(self) -> int:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.OperationalError:
            return 0
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")

    # repos -------------------------------------------------------------------------------
    def add_repo(self, common_dir: str, worktree: str | None, name: str, bare: bool,
                 hook_path: str | None, chained_path: str | None, hook_kind: str | None,
                 baseline: Iterable[tuple[str, str]]) -> Repo:
        with self.tx() as db:
            db.execute(
                "INSERT INTO repos (common_dir, worktree, name, bare, hook_path, chained_path,"
                " hook_kind, added_at) VALUES (?,?,?,?,?,?,?,?)"
                " ON CONFLICT(common_dir) DO UPDATE SET worktree=excluded.worktree,"
                " hook_path=excluded.hook_path, chained_path=excluded.chained_path,"
                " hook_kind=excluded.hook_kind",
                (common_dir, worktree, name, int(bare), hook_path, chained_path, hook_kind,
                 time.time()),
            )
            repo_id = db.execute("SELECT id FROM repos WHERE common_dir=?",
                                 (common_dir,)).fetchone()[0]
            db.executemany(
                "INSERT OR IGNORE INTO baseline VALUES (?,?,?)",
                [(repo_id, t, o) for t, o in baseline],
            )
        repo = self.repo_by_dir(common_dir)
        assert repo
        return repo

    def remove_repo(self, repo_id: int) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM repos WHERE id=?", (repo_id,))

    def repos(self) -> list[Repo]:
        return [Repo(**dict(r)) for r in self.db.execute("SELECT * FROM repos ORDER BY id")]

    def repo(self, repo_id: int) -> Repo | None:
        r = self.db.execute("SELECT * FROM repos WHERE id=?", (repo_id,)).fetchone()
        return Repo(**dict(r)) if r else None

    def repo_by_dir(self, common_dir: str) -> Repo | None:
        r = self.db.execute("SELECT * FROM repos WHERE common_dir=?", (common_dir,)).fetchone()
        return Repo(**dict(r)) if r else None

    def in_baseline(self, repo_id: int, tag: str, oid: str) -> bool:
        return self.db.execute(
            "SELECT 1 FROM baseline WHERE repo_id=? AND tag=? AND oid=?", (repo_id, tag, oid)
        ).fetchone() is not None

    # jobs --------------------------------------------------------------------------------
    def job(self, job_id: int) -> Job | None:
        r = self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job(**dict(r)) if r else None

    def find_job(self, repo_id: int, tag: str, commit_oid: str) -> Job | None:
        r = self.db.execute(
            "SELECT * FROM jobs WHERE repo_id=? AND tag=? AND commit_oid=?",
            (repo_id, tag, commit_oid),
        ).fetchone()
        return Job(**dict(r)) if r else None

    def jobs(self, states: Iterable[str] | None = None, repo_id: int | None = None,
             limit: int | None = None) -> list[Job]:
        q = "SELECT * FROM jobs WHERE 1=1"
        args: list = []
        if states is not None:
            states = list(states)
            q += f" AND state IN ({','.join('?' * len(states))})"
            args += states
        if repo_id is not None:
            q += " AND repo_id=?"
            args.append(repo_id)
        q += " ORDER BY id DESC"
        if limit:
            q += f" LIMIT {int(limit)}"
        return [Job(**dict(r)) for r in self.db.execute(q, args)]

    def jobs_for_tag(self, repo_id: int, tag: str) -> list[Job]:
        return [Job(**dict(r)) for r in self.db.execute(
            "SELECT * FROM jobs WHERE repo_id=? AND tag=? ORDER BY id", (repo_id, tag))]

    def create_job(self, repo_id: int, tag: str, tag_oid: str | None, commit_oid: str,
                   origin: str, state: str = "detected", reason: str | None = None,
                   **fields) -> tuple[Job, bool]:
        """Insert a job unless (repo, tag, commit) exists; return (job, created).

        Older active jobs for the same tag (a moved tag: ``git tag -f``) become superseded in
        the same transaction.
        """
        now = time.time()
        with self.tx() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE repo_id=? AND tag=? AND commit_oid=?",
                (repo_id, tag, commit_oid),
            ).fetchone()
            if row:
                job = self.job(row[0])
                assert job
                return job, False
            cols = ["repo_id", "tag", "tag_oid", "commit_oid", "state", "reason", "origin",
                    "created_at", "updated_at", "step_started_at"]
            vals = [repo_id, tag, tag_oid, commit_oid, state, reason, origin, now, now, now]
            for k, v in fields.items():
                cols.append(k)
                vals.append(v)
            cur = db.execute(
                f"INSERT INTO jobs ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})", vals
            )
            job_id = cur.lastrowid
            db.execute(
                "INSERT INTO transitions (job_id, at, from_state, to_state, reason)"
                " VALUES (?,?,?,?,?)", (job_id, now, None, state, reason or origin),
            )
            for old in db.execute(
                f"SELECT id, state FROM jobs WHERE repo_id=? AND tag=? AND id<>? AND state IN"
                f" ({','.join('?' * len(ACTIVE))}) AND state NOT IN ('deploying')",
                (repo_id, tag, job_id, *ACTIVE),
            ).fetchall():
                self._move(db, old[0], old[1], "superseded",
                           reason=f"tag {tag} moved to {commit_oid[:12]}",
                           fields={"superseded_by": job_id})
        job = self.job(job_id)
        assert job
        return job, True

    def _move(self, db: sqlite3.Connection, job_id: int, src: str, dst: str, *,
              step: str | None = None, reason: str | None = None,
              fields: dict | None = None) -> None:
        now = time.time()
        sets = ["state=?", "updated_at=?", "reason=?"]
        vals: list = [dst, now, reason]
        if step is not None:
            sets += ["step=?", "step_started_at=?"]
            vals += [step, now]
        for k, v in (fields or {}).items():
            sets.append(f"{k}=?")
            vals.append(v)
        db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id=?", (*vals, job_id))
        db.execute(
            "INSERT INTO transitions (job_id, at, from_state, to_state, step, reason)"
            " VALUES (?,?,?,?,?,?)", (job_id, now, src, dst, step, reason),
        )

    def transition(self, job_id: int, dst: str, *, expect: Iterable[str] | None = None,
                   step: str | None = None, reason: str | None = None, **fields) -> Job:
        """Move a job to ``dst`` in one transaction; raise TransitionError if not allowed."""
        with self.tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise TransitionError(f"job {job_id} does not exist")
            src = row[0]
            if expect is not None and src not in set(expect):
                raise TransitionError(f"job {job_id} is {src}, not {'/'.join(expect)}")
            if not can_transition(src, dst):
                raise TransitionError(f"job {job_id} cannot go from {src} to {dst}")
            self._move(db, job_id, src, dst, step=step, reason=reason, fields=fields)
        job = self.job(job_id)
        assert job
        return job

    def update(self, job_id: int, **fields) -> None:
        """Set fields on a job without a state change (step progress, image, digest)."""
        if not fields:
            return
        now = time.time()
        if "step" in fields:
            fields.setdefault("step_started_at", now)
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.tx() as db:
            db.execute(f"UPDATE jobs SET {sets}, updated_at=? WHERE id=?",
                       (*fields.values(), now, job_id))

    def set_data(self, job_id: int, **items) -> None:
        """Merge items into a job's JSON ``data`` (never secrets)."""
        with self.tx() as db:
            row = db.execute("SELECT data FROM jobs WHERE id=?", (job_id,)).fetchone()
            data = json.loads(row[0] or "{}") if row else {}
            data.update(items)
            db.execute("UPDATE jobs SET data=? WHERE id=?", (json.dumps(data), job_id))

    def transitions(self, job_id: int) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT * FROM transitions WHERE job_id=? ORDER BY id", (job_id,)
        ).fetchall()

    def prune(self, keep: int, max_age_s: float) -> list[int]:
        """Delete finished jobs beyond the newest ``keep`` or older than ``max_age_s``."""
        cutoff = time.time() - max_age_s
        marks = ",".join("?" * len(FINISHED))
        rows = self.db.execute(
            f"SELECT id FROM jobs WHERE state IN ({marks}) AND (updated_at < ? OR id NOT IN"
            f" (SELECT id FROM jobs ORDER BY id DESC LIMIT ?))",
            (*FINISHED, cutoff, keep),
        ).fetchall()
        ids = [r[0] for r in rows]
        if ids:
            with self.tx() as db:
                db.executemany("DELETE FROM jobs WHERE id=?", [(i,) for i in ids])
        return ids
