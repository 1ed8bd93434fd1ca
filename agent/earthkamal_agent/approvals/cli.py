"""The "none" approver: no desktop prompt, the user answers from a terminal."""

from __future__ import annotations

import threading

from .base import ApprovalRequest, DecisionFn, cli_commands, log, summary


class CliApprover:
    """Logs that a deploy waits for approval and which command answers it."""

    name = "none"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: set[int] = set()

    def available(self) -> str | None:
        return None

    def ask(self, req: ApprovalRequest, on_decision: DecisionFn) -> None:
        approve, reject = cli_commands(req.job_id)
        with self._lock:
            self._waiting.add(req.job_id)
        log.warning(
            "%s Waiting for approval: run `%s` to deploy or `%s` to reject.",
            summary(req), approve, reject,
        )

    def withdraw(self, job_id: int) -> None:
        with self._lock:
            self._waiting.discard(job_id)

    def notify(self, summary: str, body: str) -> None:
        log.info("%s %s", summary, body.replace("\n", " "))

    def close(self) -> None:
        with self._lock:
            self._waiting.clear()
