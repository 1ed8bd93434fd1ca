"""Real components for the test suite, started and stopped by the tests themselves.

A test that needs a component calls :func:`need`. Outside CI a missing component skips the test
with the reason; under CI (``CI`` set) it is a failure, so a green CI means everything ran.
"""

from __future__ import annotations

import os
import shutil

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
