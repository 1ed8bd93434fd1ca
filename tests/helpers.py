"""Helpers for tests that drive real git and a real agent process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(cwd: Path, *args: str, check: bool = True, env: dict | None = None,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, **GIT_ENV, **(env or {})}
    return subprocess.run(["git", *args], cwd=cwd, env=e, check=check, capture_output=True,
                          input=input)


def make_repo(path: Path, files: dict[str, str] | None = None, bare: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main", *(["--bare"] if bare else []))
    if not bare:
        for name, text in (files or {"README": "hello\n"}).items():
            f = path / name
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
        git(path, "add", "-A")
        git(path, "commit", "-q", "-m", "initial")
    return path


def commit(path: Path, files: dict[str, str], message: str = "change") -> str:
    for name, text in files.items():
        f = path / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", message)
    return git(path, "rev-parse", "HEAD").stdout.decode().strip()


def cli(home: Path, *args: str, check: bool = True, input: bytes | None = None,
        env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = {**os.environ, "EARTHKAMAL_HOME": str(home), **(env or {})}
    res = subprocess.run([sys.executable, "-m", "earthkamal_agent", *args], env=e,
                         capture_output=True, input=input, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"earthkamal-agent {' '.join(args)} exited {res.returncode}:\n"
                             f"{res.stdout.decode()}\n{res.stderr.decode()}")
    return res


def status(home: Path, env: dict | None = None) -> dict:
    return json.loads(cli(home, "status", "--json", env=env).stdout)


def jobs(home: Path, env: dict | None = None) -> list[dict]:
    return status(home, env)["jobs"]


def wait_for(pred: Callable[[], object], timeout: float = 20, interval: float = 0.05,
             what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class AgentProcess:
    """`earthkamal-agent run` as a subprocess, stopped at the end of the test."""

    def __init__(self, home: Path, *args: str, env: dict | None = None) -> None:
        self.home = home
        self.env = {**os.environ, "EARTHKAMAL_HOME": str(home), **(env or {})}
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.log = home / "agent-stderr.log"

    def start(self, wait_ready: bool = True) -> AgentProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        self._err = open(self.log, "ab")
        offset = self.log.stat().st_size
        self.proc = subprocess.Popen([sys.executable, "-m", "earthkamal_agent", "run",
                                      *self.args], env=self.env, stdout=self._err,
                                     stderr=self._err)
        if wait_ready:
            wait_for(lambda: self.proc.poll() is not None or b"running (PID" in
                     self.log.read_bytes()[offset:], timeout=30, what="agent start")
            assert self.proc.poll() is None, self.log.read_text()
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def home_without_tools(tmp_path: Path) -> Path:
    """A state dir whose user config makes any build fail fast and reach no Kamal or desktop:
    for tests of detection and the store that must not start real builds."""
    h = tmp_path / "home"
    (h / "config").mkdir(parents=True)
    (h / "config" / "config.yml").write_text(json.dumps(
        {"docker_binary": "false", "kamal_binary": "/nonexistent/kamal", "approvals": "none"}))
    return h
