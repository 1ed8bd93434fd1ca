"""macOS: an `osascript` dialog with Deploy / Reject buttons.

The script is a constant; every piece of text reaches it as an item of ``argv`` of its
``on run`` handler, so nothing the repo controls (commit subjects) is ever interpolated into
AppleScript source. Works from a launchd agent in the user's GUI session.
"""

from __future__ import annotations

import re
import shutil
import sys
import threading

from ..runner import Command, CommandNotFound, run
from .base import (
    ApprovalRequest,
    Decision,
    DecisionFn,
    body,
    log,
    safe_call,
    summary,
)

TITLE = "earthkamal-agent"
DEPLOY = "Deploy"
REJECT = "Reject"

# item 1 is a fixed word (so no later item can be taken for an osascript option),
# item 2 the title, item 3 the message, item 4 the seconds before giving up.
_DIALOG_SCRIPT = (
    "on run argv",
    "set theTitle to item 2 of argv",
    "set theText to item 3 of argv",
    "set theWait to (item 4 of argv) as integer",
    f'display dialog theText with title theTitle buttons {{"{REJECT}", "{DEPLOY}"}} '
    "with icon caution giving up after theWait",
    "return result",
    "end run",
)
_NOTIFY_SCRIPT = (
    "on run argv",
    "display notification (item 3 of argv) with title (item 2 of argv)",
    "end run",
)
_RESULT = re.compile(r"button returned:(?P<button>.*?), gave up:(?P<gave_up>true|false)\s*$")


def _osascript(script: tuple[str, ...], *items: str) -> tuple[str, ...]:
    argv = ["osascript"]
    for line in script:
        argv += ["-e", line]
    return (*argv, "earthkamal-agent", *items)


def dialog_argv(req: ApprovalRequest, give_up_after: int) -> tuple[str, ...]:
    """The osascript argv asking about ``req``; the text travels as data."""
    return _osascript(
        _DIALOG_SCRIPT, TITLE, f"{summary(req)}\n\n{body(req, with_actions=True)}",
        str(int(give_up_after)),
    )


def notify_argv(summary_text: str, body_text: str) -> tuple[str, ...]:
    """The osascript argv for an informational notification."""
    return _osascript(_NOTIFY_SCRIPT, summary_text, body_text)


def parse_dialog_output(stdout: str) -> Decision | None:
    """``button returned:Deploy, gave up:false`` → "approve"; gave up / anything else → None."""
    m = _RESULT.search(stdout.strip())
    if not m or m.group("gave_up") == "true":
        return None
    button = m.group("button").strip()
    if button == DEPLOY:
        return "approve"
    if button == REJECT:
        return "reject"
    return None


class OsascriptApprover:
    """One dialog per request, each in its own thread; withdraw kills that dialog."""

    name = "osascript"

    def __init__(self, give_up_after: int = 3600) -> None:
        self.give_up_after = give_up_after
        self._lock = threading.Lock()
        self._open: dict[int, threading.Event] = {}

    def available(self) -> str | None:
        if sys.platform != "darwin":
            return "osascript dialogs are only available on macOS."
        if shutil.which("osascript") is None:
            return "osascript is not on PATH."
        return None

    def ask(self, req: ApprovalRequest, on_decision: DecisionFn) -> None:
        cancel = threading.Event()
        with self._lock:
            old = self._open.pop(req.job_id, None)
            if old:
                old.set()
            self._open[req.job_id] = cancel
        threading.Thread(
            target=self._dialog, args=(req, on_decision, cancel),
            name=f"approval-{req.job_id}", daemon=True,
        ).start()

    def _dialog(
        self, req: ApprovalRequest, on_decision: DecisionFn, cancel: threading.Event
    ) -> None:
        command = Command(argv=dialog_argv(req, self.give_up_after),
                          timeout=self.give_up_after + 60, label="approval dialog")
        try:
            res = run(command, cancel=cancel, capture=True)
        except CommandNotFound as e:
            log.warning("cannot show the approval dialog: %s", e)
            return
        finally:
            with self._lock:
                if self._open.get(req.job_id) is cancel:
                    del self._open[req.job_id]
        if cancel.is_set():
            return
        decision = parse_dialog_output(res.output) if res.returncode == 0 else None
        if decision is None:
            log.info("approval dialog for job %s closed without an answer (%s)",
                     req.job_id, res.last_line() or f"exit {res.returncode}")
            return
        safe_call(on_decision, req.job_id, decision)

    def withdraw(self, job_id: int) -> None:
        with self._lock:
            cancel = self._open.pop(job_id, None)
        if cancel:
            cancel.set()

    def notify(self, summary: str, body: str) -> None:
        def show() -> None:
            try:
                run(Command(argv=notify_argv(summary, body), timeout=30))
            except CommandNotFound as e:
                log.warning("cannot show a notification: %s", e)

        threading.Thread(target=show, name="notify", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            pending = list(self._open.values())
            self._open.clear()
        for cancel in pending:
            cancel.set()
