"""The systemd unit, the launchd plist, their commands, and sd_notify."""

from __future__ import annotations

import argparse
import os
import plistlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from earthkamal_agent import sdnotify, service
from earthkamal_agent.errors import UserError

from tests.infra import need

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def _argv_of(cmds: list) -> list[list[str]]:
    return [list(c.argv) for c in cmds]


def _analyze(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    need("systemd-analyze", os.access(SYSTEMD_ANALYZE, os.X_OK), "install systemd")
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--user", str(unit)], env=env,
                          capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- systemd unit

def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "earthkamal_agent"]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "EARTHKAMAL_HOME": str(tmp_path / "home")}
    unit = tmp_path / service.UNIT_NAME
    unit.write_text(service.render_unit(argv, env))
    r = _analyze(unit, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr


def test_unit_escapes_odd_paths_and_still_verifies(tmp_path: Path) -> None:
    odd = tmp_path / "with space $HOME %h"
    odd.mkdir()
    prog = odd / "earthkamal-agent"
    prog.write_text("#!/bin/sh\nexit 0\n")
    prog.chmod(0o755)
    env = {"PATH": f"{odd}:/usr/bin", "EARTHKAMAL_HOME": f'{tmp_path}/a "quoted" %i dir'}
    text = service.render_unit([str(prog), "--x=$HOME", "a b"], env)
    exec_line = next(x for x in text.splitlines() if x.startswith("ExecStart="))
    assert exec_line == (f'ExecStart="{tmp_path}/with space $HOME %%h/earthkamal-agent" '
                         '"--x=$$HOME" "a b" run')
    assert 'Environment="EARTHKAMAL_HOME=' in text and '\\"quoted\\" %%i dir"' in text
    unit = tmp_path / service.UNIT_NAME
    unit.write_text(text)
    r = _analyze(unit, tmp_path)
    assert (r.returncode, r.stderr) == (0, "")


def test_unit_content() -> None:
    text = service.render_unit(["/usr/bin/earthkamal-agent"], {})
    assert text.startswith(service.MARKER)
    lines = [x for x in text.splitlines() if x and not x.startswith("#")]
    for want in ("Type=notify", "NotifyAccess=main", "ExecStart=/usr/bin/earthkamal-agent run",
                 "Restart=on-failure", "RestartSec=2", "After=graphical-session.target",
                 "WantedBy=default.target"):
        assert want in lines
    assert not any(x.startswith(("PartOf=", "BindsTo=", "Environment=")) for x in lines)
    assert "@" not in "\n".join(lines)


def test_unit_refuses_relative_program_and_line_breaks() -> None:
    with pytest.raises(ValueError):
        service.render_unit(["earthkamal-agent"], {})
    with pytest.raises(ValueError):
        service.render_unit(["/usr/bin/x"], {"PATH": "/bin\nExecStartPre=/bin/evil"})
    with pytest.raises(ValueError):
        service.render_unit(["/usr/bin/x", "a\nb"], {})


# ---------------------------------------------------------------- launchd plist

def test_plist_round_trips_with_required_keys(tmp_path: Path) -> None:
    argv = ["/opt/homebrew/bin/earthkamal-agent"]
    data = service.render_plist(argv, {"PATH": "/opt/homebrew/bin:/usr/bin",
                                       "EARTHKAMAL_HOME": "/Users/me/state"},
                                tmp_path / "Logs")
    doc = plistlib.loads(data)
    assert doc["Label"] == service.LABEL == "dev.earthkamal.agent"
    assert doc["ProgramArguments"] == [*argv, "run"]
    assert doc["RunAtLoad"] is True
    assert doc["KeepAlive"] == {"SuccessfulExit": False}
    assert doc["ProcessType"] == "Interactive"
    assert doc["StandardOutPath"] == str(tmp_path / "Logs" / "agent.out.log")
    assert doc["StandardErrorPath"] == str(tmp_path / "Logs" / "agent.err.log")
    assert doc["EnvironmentVariables"] == {"PATH": "/opt/homebrew/bin:/usr/bin",
                                           "EARTHKAMAL_HOME": "/Users/me/state"}
    assert b"@" not in data.replace(b"apple.com", b"")  # no placeholder left


def test_template_plist_is_valid_itself() -> None:
    doc = plistlib.loads((REPO / "launchd" / service.PLIST_NAME).read_bytes())
    assert doc["Label"] == service.LABEL
    assert "PATH" in doc["EnvironmentVariables"]


# ---------------------------------------------------------------- commands

def test_systemd_argv() -> None:
    u = service.UNIT_NAME
    assert _argv_of(service.install_argv("systemd")) == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", u],
        ["systemctl", "--user", "restart", u],
    ]
    assert _argv_of(service.uninstall_argv("systemd")) == [
        ["systemctl", "--user", "disable", "--now", u]]
    assert _argv_of(service.reload_argv("systemd")) == [["systemctl", "--user", "daemon-reload"]]
    (status,) = service.status_argv("systemd")
    assert status.argv[:4] == ("systemctl", "--user", "show", u)
    assert all(c.timeout for c in service.install_argv("systemd"))


def test_launchd_argv() -> None:
    plist = "/Users/me/Library/LaunchAgents/dev.earthkamal.agent.plist"
    job = "gui/501/dev.earthkamal.agent"
    assert _argv_of(service.install_argv("launchd", plist, uid=501)) == [
        ["launchctl", "enable", job],
        ["launchctl", "bootstrap", "gui/501", plist],
        ["launchctl", "kickstart", job],
    ]
    assert _argv_of(service.install_argv("launchd", plist, uid=501, loaded=True))[0] == [
        "launchctl", "bootout", job]
    assert _argv_of(service.uninstall_argv("launchd", uid=501)) == [["launchctl", "bootout", job]]
    assert service.uninstall_argv("launchd", uid=501, loaded=False) == []
    assert service.reload_argv("launchd") == []
    assert _argv_of(service.status_argv("launchd", uid=501)) == [["launchctl", "print", job]]


def test_unit_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(service.UNIT_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert service.unit_dir("systemd") == tmp_path / ".config" / "systemd" / "user"
    assert service.unit_dir("launchd") == tmp_path / "Library" / "LaunchAgents"
    monkeypatch.setenv(service.UNIT_DIR_ENV, str(tmp_path / "units"))
    assert service.unit_dir("systemd") == tmp_path / "units"
    assert service.unit_dir("systemd", tmp_path / "x") == tmp_path / "x"


# ---------------------------------------------------------------- handlers

def _ns(**kw: object) -> argparse.Namespace:
    base = {"unit_dir": None, "no_start": False, "action": None}
    return argparse.Namespace(**{**base, **kw})


def test_cli_install_writes_and_uninstall_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EARTHKAMAL_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(service, "detect_manager", lambda platform=None: (None, "no manager"))

    def no_commands(c: object) -> None:
        raise AssertionError(f"no manager command may run, got {c}")

    monkeypatch.setattr(service, "run_quiet", no_commands)
    units = tmp_path / "units"
    before = set(units.rglob("*")) if units.exists() else set()
    assert service.cli_install(_ns(unit_dir=str(units))) == 0
    unit = units / service.UNIT_NAME
    assert unit.read_text().startswith(service.MARKER)
    assert f'Environment="EARTHKAMAL_HOME={tmp_path / "home"}"' in unit.read_text()
    assert "not started" in capsys.readouterr().out
    assert service.cli_status(_ns(unit_dir=str(units))) == 3  # installed, not running
    assert service.cli_install(_ns(unit_dir=str(units))) == 0  # a reinstall overwrites ours
    assert service.cli_uninstall(_ns(unit_dir=str(units))) == 0
    assert set(units.rglob("*")) == before
    assert service.cli_uninstall(_ns(unit_dir=str(units))) == 0  # nothing left: fine


def test_cli_install_refuses_a_foreign_file(tmp_path: Path) -> None:
    unit = tmp_path / service.UNIT_NAME
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    with pytest.raises(UserError, match="not written by earthkamal-agent"):
        service.cli_install(_ns(unit_dir=str(tmp_path)))
    with pytest.raises(UserError, match="not written by earthkamal-agent"):
        service.cli_uninstall(_ns(unit_dir=str(tmp_path)))
    assert unit.exists()


def test_cli_install_without_manager_says_what_to_do(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.delenv(service.UNIT_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(service, "detect_manager",
                        lambda platform=None: (None, "`systemctl --user` cannot reach it"))
    with pytest.raises(UserError) as e:
        service.cli_install(_ns())
    msg = str(e.value)
    assert "earthkamal-agent run" in msg and "--no-start" in msg and "\n" not in msg
    assert not (tmp_path / ".config").exists()  # nothing written


def test_cli_install_with_manager_runs_the_commands(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.delenv(service.UNIT_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setattr(service, "detect_manager", lambda platform=None: ("systemd", "ok"))
    monkeypatch.setattr(service, "default_kind", lambda platform=None: "systemd")
    ran: list[list[str]] = []

    def fake(c: service.Command) -> subprocess.CompletedProcess[bytes]:
        ran.append(list(c.argv))
        return subprocess.CompletedProcess(list(c.argv), 0, b"", b"")

    monkeypatch.setattr(service, "run_quiet", fake)
    assert service.cli_install(_ns()) == 0
    unit = tmp_path / ".config" / "systemd" / "user" / service.UNIT_NAME
    assert unit.exists()
    assert ran == _argv_of(service.install_argv("systemd"))
    ran.clear()
    assert service.cli_uninstall(_ns()) == 0
    assert not unit.exists()
    assert ran == _argv_of(service.uninstall_argv("systemd") + service.reload_argv("systemd"))


def test_detect_manager_here_gives_a_reason() -> None:
    kind, reason = service.detect_manager()
    assert kind in (None, "systemd", "launchd")
    assert reason


# ---------------------------------------------------------------- sd_notify

def _bind(tmp_path: Path, abstract: bool = False) -> tuple[socket.socket, str]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"earthkamal-test-{os.getpid()}-{time.monotonic_ns()}"
        s.bind("\0" + name)
        return s, "@" + name
    path = str(tmp_path / "notify.sock")
    s.bind(path)
    return s, path


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_sends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool) -> None:
    s, addr = _bind(tmp_path, abstract)
    with s:
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", addr)
        assert sdnotify.notify("READY=1") is True
        assert s.recv(4096) == b"READY=1"
        sdnotify.detach()
        try:
            assert "NOTIFY_SOCKET" not in os.environ
            assert sdnotify.notify("STATUS=still here") is True
            assert s.recv(4096) == b"STATUS=still here"
        finally:
            sdnotify._detached.clear()


def test_notify_is_a_noop_and_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + "x" * 200)  # longer than sun_path
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 3.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert sdnotify.watchdog_interval() is None


def _messages(s: socket.socket, until: str, deadline: float) -> list[str]:
    seen: list[str] = []
    while until not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {until} within the time limit; got {seen}")
        s.settimeout(left)
        seen.extend(s.recv(65536).decode().splitlines())
    return seen


def test_agent_reports_ready_and_stopping(tmp_path: Path) -> None:
    """`earthkamal-agent run` says READY=1 once watching, STOPPING=1 after SIGTERM."""
    s, addr = _bind(tmp_path)
    env = {**os.environ, "NOTIFY_SOCKET": addr, "EARTHKAMAL_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join([str(REPO / "agent"), str(REPO)])}
    env.pop("EARTHKAMAL_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "earthkamal_agent", "run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with s:
            got = _messages(s, "READY=1", time.monotonic() + 60)
            assert "STOPPING=1" not in got
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            _messages(s, "STOPPING=1", time.monotonic() + 30)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out = proc.stdout.read().decode() if proc.stdout else ""
    assert "Traceback" not in out, out
