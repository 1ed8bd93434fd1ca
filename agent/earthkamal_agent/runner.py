"""The one place that runs external commands.

Every command is a :class:`Command`, built by a pure function elsewhere. The runner streams
its output line by line into a log (redacted), enforces a timeout and cancellation, and
returns the exit code with the tail of the output for error messages.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .errors import UserError
from .redact import Redactor

LogFn = Callable[[str], None]


@dataclass(frozen=True)
class Command:
    """An external command as data: argv, extra environment, working dir, limits.

    ``env`` entries are added to a clean copy of the agent's environment; a value of None
    removes the variable. ``secret_env`` names the entries of ``env`` whose values are secrets:
    they are never logged and are redacted from the output. ``stdin`` is fed to the process
    (also treated as secret).
    """

    argv: tuple[str, ...]
    env: Mapping[str, str | None] = field(default_factory=dict)
    cwd: str | None = None
    timeout: float | None = None
    secret_env: frozenset[str] = frozenset()
    stdin: bytes | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise TypeError("argv must be a non-empty sequence of str")

    def display(self) -> str:
        """The argv for logs and `plan`: secret values never appear in argv by construction."""
        return " ".join(_quote(a) for a in self.argv)

    def public_env(self) -> dict[str, str | None]:
        return {k: ("********" if k in self.secret_env else v) for k, v in self.env.items()}


def cmd(*argv: str, **kw) -> Command:
    """Shorthand: ``cmd("git", "status", cwd=...)``."""
    return Command(argv=tuple(argv), **kw)


@dataclass
class Result:
    """What a command did."""

    returncode: int
    tail: list[str]
    duration: float
    timed_out: bool = False
    canceled: bool = False
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.canceled

    def last_line(self) -> str:
        for line in reversed(self.tail):
            if line.strip():
                return line.strip()
        return ""


class CommandNotFound(UserError):
    """The program of a command is not installed."""


_BINARY_KEYS = {"docker": "docker_binary", "earthly": "earthly_binary", "earth": "earthly_binary",
                "kamal": "kamal_binary"}


def not_found_sentence(program: str) -> str:
    key = _BINARY_KEYS.get(os.path.basename(program))
    where = f", or set `{key}` in the agent's config.yml to its path" if key else ""
    return f"`{program}` is not installed or not on PATH; install it{where}."


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


def build_env(command: Command, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for k, v in command.env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run(
    command: Command,
    log: LogFn | None = None,
    redactor: Redactor | None = None,
    cancel: threading.Event | None = None,
    capture: bool = False,
    tail_lines: int = 40,
    on_start: Callable[[int], None] | None = None,
) -> Result:
    """Run ``command``; stream stdout+stderr lines (redacted) to ``log``."""
    red = redactor or Redactor()
    red.add(*(v for k, v in command.env.items() if k in command.secret_env and v))
    if command.stdin:
        red.add(command.stdin.decode("utf-8", "replace"))
    if log:
        log(f"$ {command.display()}")
    start = time.monotonic()
    try:
        proc = subprocess.Popen(  # noqa: S603 - argv list, never a shell
            list(command.argv),
            cwd=command.cwd,
            env=build_env(command),
            stdin=subprocess.PIPE if command.stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise CommandNotFound(not_found_sentence(command.argv[0])) from None
    if on_start is not None:
        on_start(proc.pid)  # the child leads its own process group (start_new_session)
    if command.stdin is not None:
        def feed() -> None:
            try:
                proc.stdin.write(command.stdin)
                proc.stdin.close()
            except OSError:
                pass

        threading.Thread(target=feed, daemon=True).start()
    tail: deque[str] = deque(maxlen=tail_lines)
    out: list[str] = []
    state = {"timed_out": False, "canceled": False}

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = red(raw.decode("utf-8", "replace").rstrip("\n"))
            tail.append(line)
            if capture:
                out.append(line)
            if log:
                log(line)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    deadline = start + command.timeout if command.timeout else None
    while proc.poll() is None:
        if cancel is not None and cancel.is_set():
            state["canceled"] = True
            _kill(proc)
            break
        if deadline and time.monotonic() > deadline:
            state["timed_out"] = True
            _kill(proc)
            break
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()
    t.join(timeout=5)
    res = Result(
        returncode=proc.returncode,
        tail=list(tail),
        duration=time.monotonic() - start,
        output="\n".join(out),
        **state,
    )
    if log and res.timed_out:
        log(f"timed out after {command.timeout:.0f} s")
    return res


def _kill(proc: subprocess.Popen) -> None:
    """Stop the whole process group: TERM, then KILL after 5 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_quiet(command: Command,
              env_base: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a short command to completion and capture its output (git, docker inspect...)."""
    try:
        return subprocess.run(  # noqa: S603
            list(command.argv),
            cwd=command.cwd,
            env=build_env(command, env_base),
            input=command.stdin,
            capture_output=True,
            timeout=command.timeout,
        )
    except FileNotFoundError:
        raise CommandNotFound(not_found_sentence(command.argv[0])) from None

