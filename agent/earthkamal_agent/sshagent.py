"""A private ssh-agent for one deploy: socket in the 0700 run dir, key loaded from stdin.

The key comes from the keyring (secret SSH_PRIVATE_KEY), goes to `ssh-add -` on stdin only,
and the agent is killed when the deploy ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .errors import UserError
from .runner import Command, run


def agent_command(sock: str) -> Command:
    return Command(("ssh-agent", "-D", "-a", sock), label="ssh-agent")


def add_command(sock: str, key: str) -> Command:
    data = key if key.endswith("\n") else key + "\n"
    return Command(("ssh-add", "-q", "-"), env={"SSH_AUTH_SOCK": sock, "SSH_ASKPASS": None,
                                                 "DISPLAY": None},
                   stdin=data.encode(), timeout=30, label="ssh-add")


def start(run_dir: Path, job_id: int, key: str,
          log: Callable[[str], None]) -> tuple[subprocess.Popen, str]:
    sock = str(run_dir / f"ssh-agent-{job_id}.sock")
    Path(sock).unlink(missing_ok=True)
    c = agent_command(sock)
    try:
        proc = subprocess.Popen(list(c.argv), stdin=subprocess.DEVNULL,  # noqa: S603
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    except FileNotFoundError:
        raise UserError("an SSH key is stored for deploys but ssh-agent is not installed; "
                        "install OpenSSH's client tools.") from None
    Path(sock).with_suffix(".pid").write_text(f"{proc.pid}\n")
    for _ in range(100):
        if os.path.exists(sock):
            break
        time.sleep(0.02)
    res = run(add_command(sock, key), log=log)
    if not res.ok:
        stop(proc)
        raise UserError("the SSH key in the keyring (SSH_PRIVATE_KEY) could not be loaded into "
                        "ssh-agent; store an unencrypted private key with "
                        "`earthkamal-agent secrets set SSH_PRIVATE_KEY < key`.")
    log("private ssh-agent started for this deploy")
    return proc, sock


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
    for a in proc.args if isinstance(proc.args, list) else []:
        if str(a).endswith(".sock"):
            Path(a).unlink(missing_ok=True)
            Path(a).with_suffix(".pid").unlink(missing_ok=True)


def reap_orphans(run_dir: Path) -> list[int]:
    """After a crash: stop ssh-agents a killed agent left behind (their pid files say which)."""
    killed = []
    for pidfile in run_dir.glob("ssh-agent-*.pid"):
        sock = pidfile.with_suffix(".sock")
        try:
            pid = int(pidfile.read_text().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                ours = str(sock).encode() in f.read()
        except (OSError, ValueError):
            ours = False
            pid = 0
        if ours:
            try:
                os.killpg(pid, signal.SIGTERM)
                killed.append(pid)
            except ProcessLookupError:
                pass
        pidfile.unlink(missing_ok=True)
        sock.unlink(missing_ok=True)
    return killed
