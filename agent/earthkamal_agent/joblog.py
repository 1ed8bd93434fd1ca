"""One log file per job (0600), appended line by line, secrets redacted."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from .redact import Redactor


def log_path(logs: Path, job_id: int) -> Path:
    return logs / f"job-{job_id}.log"


class JobLog:
    """A job's log; each line is timestamped and passed through the redactor."""

    def __init__(self, logs: Path, job_id: int, redactor: Redactor | None = None) -> None:
        self.path = log_path(logs, job_id)
        self.redactor = redactor or Redactor()
        self._lock = threading.Lock()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        self._f = os.fdopen(fd, "a", encoding="utf-8", errors="replace")
        self.broken = False

    def __call__(self, line: str) -> None:
        text = self.redactor(line)
        stamp = time.strftime("%H:%M:%S")
        with self._lock:
            if self.broken:
                return
            try:
                self._f.write(f"{stamp} {text}\n")
                self._f.flush()
            except OSError:
                # Disk full or similar: the job goes on, its state stays in the store.
                self.broken = True

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass
