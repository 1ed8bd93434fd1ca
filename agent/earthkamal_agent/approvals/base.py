"""The approval interface and the words every approver shows.

An :class:`Approver` puts an :class:`ApprovalRequest` in front of the user and reports the
answer through a callback; it never blocks the pipeline. The CLI (`earthkamal-agent approve
<job>` / `reject <job>`) is always a way to answer, so every text names it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

Decision = Literal["approve", "reject"]
DecisionFn = Callable[[int, Decision], None]
DECISIONS: tuple[Decision, ...] = ("approve", "reject")

CLI = "earthkamal-agent"
#: How many commit subjects a notification lists.
MAX_CHANGES = 5

log = logging.getLogger("earthkamal.approvals")


@dataclass(frozen=True)
class ApprovalRequest:
    """Everything the user needs to decide on one deploy."""

    job_id: int
    service: str
    version: str
    destination: str | None
    repo: str
    commit: str
    subject: str
    digest: str
    changes: tuple[str, ...] = ()  # first few commit subjects since the last deployed version
    change_count: int | None = None  # None = first deploy to this destination
    previous_version: str | None = None  # the version deployed there before, when known


@runtime_checkable
class Approver(Protocol):
    """A way to ask the user. Implementations are thread safe."""

    name: str

    def available(self) -> str | None:
        """None when usable, else a one-sentence reason."""
        ...

    def ask(self, req: ApprovalRequest, on_decision: DecisionFn) -> None:
        """Show the request; call ``on_decision(job_id, decision)`` later (any thread)."""
        ...

    def withdraw(self, job_id: int) -> None:
        """Decided elsewhere, superseded or expired: take the question away."""
        ...

    def notify(self, summary: str, body: str) -> None:
        """Informational message (deployed, failed)."""
        ...

    def close(self) -> None:
        """Release resources; outstanding questions are withdrawn."""
        ...


def destination_text(destination: str | None) -> str:
    return destination if destination else "the default destination"


def short_commit(commit: str) -> str:
    return commit[:7]


def short_digest(digest: str) -> str:
    """``sha256:0123456789ab`` (12 hex digits), or the value as-is when it is not a digest."""
    algo, sep, hexpart = digest.partition(":")
    if sep and hexpart:
        return f"{algo}:{hexpart[:12]}"
    return digest[:19]


def summary(req: ApprovalRequest) -> str:
    """``Deploy myapp v1.4.0 to production?``"""
    return f"Deploy {req.service} {req.version} to {destination_text(req.destination)}?"


def cli_commands(job_id: int) -> tuple[str, str]:
    """The terminal commands that answer a request."""
    return (f"{CLI} approve {job_id}", f"{CLI} reject {job_id}")


def changes_text(req: ApprovalRequest, limit: int = MAX_CHANGES) -> list[str]:
    """``N commits since vX`` plus the first few subjects, or ``First deploy ...``."""
    if req.change_count is None:
        return [f"First deploy to {destination_text(req.destination)}."]
    n = req.change_count
    since = req.previous_version or "the last deploy"
    if n == 0:
        return [f"No new commits since {since}."]
    lines = [f"{n} commit{'s' if n != 1 else ''} since {since}:"]
    shown = req.changes[:limit]
    lines += [f"  • {s}" for s in shown]
    rest = n - len(shown)
    if rest > 0 and shown:
        lines.append(f"  … and {rest} more")
    return lines


def body(req: ApprovalRequest, with_actions: bool) -> str:
    """The notification body. ``with_actions``: the server shows Deploy/Reject buttons."""
    approve, reject = cli_commands(req.job_id)
    lines = [
        f"Repo: {req.repo}",
        f"Commit: {short_commit(req.commit)} {req.subject}".rstrip(),
        f"Image: {short_digest(req.digest)}",
        *changes_text(req),
    ]
    if with_actions:
        lines.append(f"Or from a terminal: {approve} (or: {reject})")
    else:
        lines.append(f"To deploy, run: {approve}")
        lines.append(f"To reject, run: {reject}")
    return "\n".join(lines)


def safe_call(on_decision: DecisionFn, job_id: int, decision: Decision) -> None:
    """Call the callback; an exception in it is logged, never raised into our threads."""
    try:
        on_decision(job_id, decision)
    except Exception:  # noqa: BLE001 - a callback must not kill the listener
        log.exception("approval callback for job %s failed", job_id)
