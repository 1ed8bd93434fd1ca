"""Asking the user to approve a deploy: desktop notification, macOS dialog, or the CLI.

``select("auto")`` picks the first usable of D-Bus notifications (Linux), an osascript dialog
(macOS) and the CLI-only approver; an explicit backend that is not usable raises UserError.
"""

from __future__ import annotations

import sys

from ..errors import UserError
from .base import (
    DECISIONS,
    ApprovalRequest,
    Approver,
    Decision,
    DecisionFn,
    body,
    cli_commands,
    summary,
)
from .cli import CliApprover

BACKENDS = ("auto", "dbus", "osascript", "none")

__all__ = [
    "BACKENDS", "DECISIONS", "ApprovalRequest", "Approver", "CliApprover", "Decision",
    "DecisionFn", "body", "cli_commands", "select", "summary",
]


def _make(backend: str) -> Approver:
    if backend == "dbus":
        from .dbus import DBusApprover

        return DBusApprover()
    if backend == "osascript":
        from .macos import OsascriptApprover

        return OsascriptApprover()
    return CliApprover()


def select(backend: str = "auto") -> Approver:
    """The approver for ``backend`` ("auto" | "dbus" | "osascript" | "none")."""
    if backend not in BACKENDS:
        raise UserError(f"Unknown approval backend {backend!r}; use one of {', '.join(BACKENDS)}.")
    if backend != "auto":
        approver = _make(backend)
        reason = approver.available()
        if reason:
            approver.close()
            raise UserError(f"The {backend} approval backend cannot be used: {reason}")
        return approver
    candidates = ["osascript"] if sys.platform == "darwin" else ["dbus"]
    for name in candidates:
        try:
            approver = _make(name)
        except ImportError:  # jeepney is a Linux-only dependency
            continue
        reason = approver.available()
        if reason is None:
            return approver
        approver.close()
        from .base import log

        log.warning("desktop approvals unavailable (%s); approve from the CLI instead", reason)
    return CliApprover()
