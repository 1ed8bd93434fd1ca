"""Masking secrets in anything the agent writes down."""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "********"

# Things that look like credentials even when we were not told the value.
_PATTERNS = [
    re.compile(r"(?i)((?:password|passwd|secret|token|api[_-]?key)[\"']?\s*[=:]\s*[\"']?)([^\s\"',]+)"),
    re.compile(r"(?i)(authorization:\s*(?:basic|bearer)\s+)(\S+)"),
    re.compile(r"(https?://[^/\s:@]+:)([^@\s/]+)(@)"),
    re.compile(r"()(-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----)()"),
    re.compile(r"()(\bgh[pousr]_[A-Za-z0-9]{20,}\b)()"),
]


def _mask(m: re.Match) -> str:
    return m.group(1) + MASK + (m.group(3) if (m.lastindex or 0) >= 3 else "")


class Redactor:
    """Replaces known secret values and credential-looking text with a mask."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._values: set[str] = set()
        self.add(*secrets)

    def add(self, *values: str) -> None:
        for v in values:
            if v and len(v) >= 3:
                self._values.add(v)
                for line in v.splitlines():
                    if len(line.strip()) >= 8:
                        self._values.add(line.strip())

    def __call__(self, text: str) -> str:
        for v in sorted(self._values, key=len, reverse=True):
            if v in text:
                text = text.replace(v, MASK)
        for pat in _PATTERNS:
            text = pat.sub(_mask, text)
        return text
