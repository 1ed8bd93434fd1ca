"""systemd's sd_notify protocol, in a few lines of pure Python.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract
socket); the service sends newline-separated ``KEY=value`` datagrams such as ``READY=1``,
``STATUS=...`` and ``STOPPING=1``. Outside systemd (launchd, a terminal) every call is a no-op.
Nothing here ever raises: telling systemd is best effort and must not stop the agent.
"""

from __future__ import annotations

import os
import socket

_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_detached: dict[str, str] = {}


def _env(name: str) -> str | None:
    return os.environ.get(name) or _detached.get(name)


def _address(raw: str) -> str | None:
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None  # vsock: and other transports are not for a user agent


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"STATUS=idle"``) to systemd; True if sent."""
    try:
        raw = _env("NOTIFY_SOCKET")
        if not raw or not state:
            return False
        addr = _address(raw)
        if addr is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(1.0)
            s.connect(addr)
            s.sendall(state.encode("utf-8", "replace"))
        return True
    except Exception:  # noqa: BLE001 - best effort by contract
        return False


def detach() -> None:
    """Remember the notify variables and remove them from ``os.environ``.

    Children (earthly, kamal, docker) then do not inherit ``NOTIFY_SOCKET``, while
    :func:`notify` keeps working for this process. Call once, early in the daemon.
    """
    for name in _VARS:
        value = os.environ.pop(name, None)
        if value is not None:
            _detached[name] = value


def watchdog_interval() -> float | None:
    """Seconds between the watchdog pings systemd expects (``WATCHDOG_USEC``), or None.

    Ping with ``notify("WATCHDOG=1")`` at about half this interval. The unit sets no
    ``WatchdogSec=`` today, so this returns None unless someone adds one.
    """
    try:
        usec = int(_env("WATCHDOG_USEC") or "0")
        pid = _env("WATCHDOG_PID")
        if usec <= 0 or (pid and int(pid) != os.getpid()):
            return None
        return usec / 1_000_000
    except ValueError:
        return None
