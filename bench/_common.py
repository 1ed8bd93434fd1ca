"""Shared helpers for the benchmarks in bench/ (stdlib only; not a test module).

Every benchmark makes its own temp repo(s) and temp EARTHKAMAL_HOME, starts and stops its own
agent, and removes everything it made. Figures are compared with a baseline measured in the
same run, because absolute times on a shared machine are noise.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Reproducible git: no system/global config, fixed identity, no pager, no auto gc/maintenance.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "Bench", "GIT_COMMITTER_EMAIL": "bench@example.com",
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0",
}
os.environ.update(GIT_ENV)


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, check=check, capture_output=True)


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "gc.auto", "0")
    git(path, "config", "maintenance.auto", "false")
    (path / "README").write_text("hello\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


def cli(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "EARTHKAMAL_HOME": str(home)}
    res = subprocess.run([sys.executable, "-m", "earthkamal_agent", *args], env=env,
                         capture_output=True, timeout=300)
    if check and res.returncode != 0:
        raise SystemExit(f"earthkamal-agent {' '.join(args)} exited {res.returncode}:\n"
                         f"{res.stdout.decode()}{res.stderr.decode()}")
    return res


class TempDir:
    """A temp dir removed on exit (also on error)."""

    def __init__(self, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f"ek-bench-{prefix}-"))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        for p in self.path.rglob("*"):  # a test may have left a dir read-only
            if p.is_dir() and not p.is_symlink():
                try:
                    p.chmod(0o700)
                except OSError:
                    pass
        shutil.rmtree(self.path, ignore_errors=True)


class Agent:
    """`python -m earthkamal_agent run --hold` as a child process."""

    def __init__(self, home: Path, *args: str) -> None:
        self.home = home
        self.args = args or ("--hold",)
        self.proc: subprocess.Popen | None = None
        self.log = home / "bench-agent-stderr.log"

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30) -> Agent:
        self.home.mkdir(parents=True, exist_ok=True)
        self._err = open(self.log, "ab")
        offset = self.log.stat().st_size
        env = {**os.environ, "EARTHKAMAL_HOME": str(self.home)}
        self.proc = subprocess.Popen([sys.executable, "-m", "earthkamal_agent", "run",
                                      *self.args], env=env, stdout=self._err,
                                     stderr=self._err)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"agent exited {self.proc.returncode}:\n"
                                 f"{self.log.read_text(errors='replace')}")
            if b"running (PID" in self.log.read_bytes()[offset:]:
                return self
            time.sleep(0.01)
        self.stop()
        raise SystemExit("agent did not start within 30 s")

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        return self.proc.returncode

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def wait_until(pred, timeout: float = 30, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def ms(s: float) -> str:
    return f"{s * 1000:.2f} ms"
