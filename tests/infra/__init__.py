"""Real components for the test suite, started and stopped by the tests themselves.

A test that needs a component calls :func:`need`. Outside CI a missing component skips the test
with the reason; under CI (``CI`` set) it is a failure, so a green CI means everything ran.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

IN_CI = bool(os.environ.get("CI"))


def need(component: str, ok: bool, reason: str = "") -> None:
    """Skip (locally) or fail (under CI) when ``component`` is not available."""
    if ok:
        return
    msg = f"{component} is not available: {reason or 'not installed'}"
    if IN_CI:
        pytest.fail(f"{msg} (required under CI)", pytrace=False)
    pytest.skip(msg)


def need_bin(*names: str) -> None:
    """Require programs on PATH."""
    for n in names:
        need(n, shutil.which(n) is not None, f"`{n}` not on PATH; run ./tests/run to install it")


def stop_stale_daemon(pidfile: Path, timeout: float = 30) -> None:
    """A daemon (dockerd) left by a killed test run: its pid file would block a new one."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        pidfile.unlink(missing_ok=True)
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            ours = str(pidfile).encode() in f.read()
    except OSError:
        ours = False
    if ours:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


def stop_process(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    """TERM a component the tests started, KILL it when it does not stop in ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
