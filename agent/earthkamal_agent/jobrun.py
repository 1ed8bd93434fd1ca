"""What every stage of a job shares: :class:`JobRun` and the errors that end a stage."""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from . import kamal
from .config import RepoConfig
from .errors import UserError
from .joblog import JobLog
from .paths import Paths
from .redact import Redactor
from .runner import Command, Result, run
from .store import Job, Repo, Store, TransitionError


class _LazySecrets:
    """The keyring is imported on first use: it costs ~10 MB the idle agent need not hold."""

    def __getattr__(self, name: str):
        from . import secrets

        return getattr(secrets, name)


keyring_secrets = _LazySecrets()

SSH_KEY_SECRET = "SSH_PRIVATE_KEY"


class Canceled(Exception):
    """The job was canceled, superseded or deleted while a stage ran."""


class StageFailed(UserError):
    """A stage failed; the message is the sentence for status."""


@dataclass
class JobRun:
    """One job's run through the stages: its store connection, log, scratch dir, and the
    few things every stage does (move state, mark a step, run a command)."""

    store: Store
    job: Job
    repo: Repo
    log: JobLog
    redactor: Redactor
    user: dict
    paths: Paths
    cancel: threading.Event
    scratch: Path
    cfg: RepoConfig | None = None
    app: Path | None = None
    names: kamal.KamalNames | None = None

    @property
    def scope(self) -> str:
        """Where this repo's secrets live in the keyring."""
        return self.repo.worktree or self.repo.common_dir

    def move(self, state: str, step: str | None = None, **fields) -> None:
        """One transition; a job canceled meanwhile stops the stage."""
        if self.cancel.is_set():
            raise Canceled()
        try:
            self.job = self.store.transition(self.job.id, state, step=step, **fields)
        except TransitionError as e:
            raise Canceled(str(e)) from None
        self.log(f"== {state}" + (f" ({step})" if step else ""))

    def step(self, step: str) -> None:
        self.store.update(self.job.id, step=step)
        self.log(f"-- {step}")

    def run(self, command: Command, what: str = "", cancellable: bool = True) -> Result:
        """Run through the one runner; the child's process group is recorded for recovery.

        ``cancellable=False`` (Kamal deploys): stopping the agent must not kill it halfway.
        """
        res = run(command, log=self.log, redactor=self.redactor,
                  cancel=self.cancel if cancellable else None, capture=True,
                  on_start=self._started)
        if cancellable and (res.canceled or self.cancel.is_set()):
            raise Canceled()
        return res

    def secret(self, name: str) -> str | None:
        """A keyring secret of this repo (or global); its value is masked in this job's log."""
        value = keyring_secrets.get_secret(name, self.scope)
        if value:
            self.redactor.add(value)
        return value

    def run_ok(self, command: Command, what: str) -> Result:
        res = self.run(command, what)
        if not res.ok:
            raise StageFailed(f"{what} failed: {res.last_line() or 'see the job log'}")
        return res

    def _started(self, pid: int) -> None:
        self.store.set_data(self.job.id, pgid=pid, pgid_start=proc_start(pid))


def platform_of(names: kamal.KamalNames) -> str:
    """linux/<arch> from Kamal's builder.arch (one architecture per image)."""
    if len(names.arch) != 1:
        raise StageFailed(f"builder.arch lists {', '.join(names.arch)}; the agent builds one "
                          "architecture per image: set builder.arch to the servers' one.")
    return f"linux/{names.arch[0]}"


def scratch_prefix(run_dir: Path) -> str:
    """Per user and per state dir, so two agents (EARTHKAMAL_HOME) never touch each other's."""
    import hashlib

    tag = hashlib.sha256(str(run_dir).encode()).hexdigest()[:10]
    return f"earthkamal-{os.getuid()}-{tag}-"


def pick_scratch(run_dir: Path, job_id: int) -> Path:
    """A private dir for temp DOCKER_CONFIG and secret files: memory-backed when possible."""
    base = Path("/dev/shm")
    if base.is_dir() and os.access(base, os.W_OK):
        return Path(tempfile.mkdtemp(prefix=f"{scratch_prefix(run_dir)}job{job_id}-", dir=base))
    d = run_dir / f"job-{job_id}"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def proc_start(pid: int) -> str | None:
    """A process's start time (Linux /proc), so a reused PID is never mistaken for ours."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive_group(pgid: object, start: object) -> bool:
    """The process group we started is still there (same leader, same start time)."""
    if not isinstance(pgid, int) or pgid <= 1 or start is None:
        return False
    return proc_start(pgid) == start
