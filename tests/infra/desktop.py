"""A private desktop for the tests: D-Bus session bus + Xvfb + dunst (pytest plugin).

Fixture ``desktop`` (session scope) -> :class:`Desktop`
    Starts ``dbus-daemon`` with a config of our own (no service activation, nothing of the
    user's session), ``Xvfb`` on a free display (``-displayfd``) and ``dunst``, a real
    org.freedesktop.Notifications server with actions. dunst's ``dmenu =`` points at a script
    of ours that picks the context-menu line (``#Deploy (SUMMARY) [ID,approve]``) of the action
    a test asked for, so ``desktop.click("approve")`` makes dunst emit
    ``ActionInvoked(ID, "approve")``. A dunst rule with ``script =`` records every notification
    it displays (``desktop.shown()``), since ``dunstctl history`` lists only closed ones.
    Everything is stopped at the end of the session.

``start_bus(dir)`` is the private bus alone (used by the keyring plugin too).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.infra import need, need_bin, stop_process

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <keep_umask/>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""

# Reads dunst's context menu on stdin; prints the line of the wanted action.
# want file: "KEY" (newest notification offering it) or "KEY ID".
DMENU_SCRIPT = """#!{python}
import json, re, sys
root = {root!r}
lines = sys.stdin.read().splitlines()
want = open(root + "/want").read().split()
key, nid = want[0], (want[1] if len(want) > 1 else None)
best = None
for line in lines:
    m = re.search(r"\\[(\\d+),([^\\]]*)\\]$", line)
    if m and m.group(2) == key and (nid is None or m.group(1) == nid):
        if best is None or int(m.group(1)) > int(best[0]):
            best = (m.group(1), line)
with open(root + "/chosen.tmp", "w") as f:
    json.dump({{"menu": lines, "chosen": best[1] if best else None}}, f)
import os
os.replace(root + "/chosen.tmp", root + "/chosen")
if best:
    print(best[1])
"""

# Run by dunst for every notification it displays; appends one JSON line.
SHOWN_SCRIPT = """#!{python}
import json, os
keys = ("DUNST_ID", "DUNST_APP_NAME", "DUNST_SUMMARY", "DUNST_BODY", "DUNST_URGENCY")
rec = {{k[6:].lower(): os.environ.get(k, "") for k in keys}}
with open({root!r} + "/shown.jsonl", "a") as f:
    f.write(json.dumps(rec) + "\\n")
"""

DUNSTRC = """[global]
    dmenu = {root}/dmenu
    mouse_left_click = close_current
    history_length = 100
    sticky_history = yes
    idle_threshold = 0
    notification_limit = 0

[record_shown]
    script = {root}/shown
"""





def wait_for(check: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``check`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ without anything pointing at the user's session, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY")}
    env.update(extra or {})
    return env


def start_bus(directory: Path) -> tuple[subprocess.Popen, str]:
    """A private session bus in ``directory``: (process, address)."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "bus.conf"
    conf.write_text(BUS_CONFIG.format(socket=directory / "bus"))
    proc = subprocess.Popen(
        ["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address=1"],
        stdout=subprocess.PIPE, stderr=open(directory / "bus.log", "wb"),
        env=clean_env(), start_new_session=True,
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().decode().strip()
    if not address:
        stop_process(proc)
        raise RuntimeError(f"dbus-daemon did not start: {(directory / 'bus.log').read_text()}")
    return proc, address


@dataclass
class Desktop:
    """The running desktop. ``env`` holds DBUS_SESSION_BUS_ADDRESS and DISPLAY."""

    root: Path
    bus_address: str
    display: str
    env: dict[str, str]
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def full_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a child process on this desktop."""
        return clean_env({**self.env, **(extra or {})})

    def dunstctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["dunstctl", *args], env=self.full_env(), capture_output=True,
                              text=True, timeout=10, check=check)

    # -- notification server --------------------------------------------------------------

    def server_running(self) -> bool:
        proc = self._procs.get("dunst")
        return proc is not None and proc.poll() is None

    def start_server(self) -> None:
        """Start dunst (again) and wait until it owns org.freedesktop.Notifications."""
        if self.server_running():
            return
        self._procs["dunst"] = subprocess.Popen(
            ["dunst", "-config", str(self.root / "dunstrc")], env=self.full_env(),
            stdout=open(self.root / "dunst.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(lambda: self.dunstctl("is-paused", check=False).returncode == 0, 10,
                 "dunst to own org.freedesktop.Notifications")

    def kill_server(self) -> None:
        """Kill dunst outright (SIGKILL): the server vanishes mid-conversation."""
        proc = self._procs.pop("dunst", None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=5)

    # -- what dunst showed -------------------------------------------------------------------

    def shown(self) -> list[dict[str, str]]:
        """Every notification dunst displayed: id, app_name, summary, body, urgency."""
        path = self.root / "shown.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_shown(self, summary: str, timeout: float = 10, after: int = 0) -> dict[str, str]:
        """The newest displayed notification with this summary (waits for it).

        ``after``: ignore the first ``after`` records (``len(desktop.shown())`` taken earlier).
        """
        def find() -> dict[str, str] | None:
            hits = [n for n in self.shown()[after:] if n["summary"] == summary]
            return hits[-1] if hits else None

        return wait_for(find, timeout, f"dunst to show {summary!r}")  # type: ignore[return-value]

    def history(self) -> list[dict[str, object]]:
        """``dunstctl history`` (closed notifications), each as a plain dict of values."""
        data = json.loads(self.dunstctl("history").stdout)
        return [{k: v.get("data") for k, v in n.items()} for n in data.get("data", [[]])[0]]

    def displayed_count(self) -> int:
        return int(self.dunstctl("count", "displayed").stdout.strip() or 0)

    # -- acting on them -----------------------------------------------------------------------

    def click(self, action_key: str, notification_id: int | None = None,
              timeout: float = 10) -> str:
        """Invoke ``action_key`` through dunst's context menu; returns the chosen menu line.

        Without ``notification_id`` the newest notification offering that action is used.
        Raises AssertionError when no displayed notification offers it.
        """
        want = action_key if notification_id is None else f"{action_key} {notification_id}"
        (self.root / "want").write_text(want + "\n")
        chosen = self.root / "chosen"
        chosen.unlink(missing_ok=True)
        self.dunstctl("context")
        try:
            wait_for(chosen.exists, timeout, "dunst's context menu")
        except AssertionError:
            # dunst opens no menu at all when nothing displayed has actions
            raise AssertionError(
                f"no notification offers action {want!r} (dunst opened no context menu)"
            ) from None
        result = json.loads(chosen.read_text())
        if not result["chosen"]:
            raise AssertionError(f"no notification offers action {want!r}; menu: {result['menu']}")
        return result["chosen"]

    def close_all(self) -> None:
        self.dunstctl("close-all", check=False)

    def stop(self) -> None:
        for name in ("dunst", "xvfb", "bus"):
            stop_process(self._procs.pop(name, None))


def _start_xvfb(root: Path) -> tuple[subprocess.Popen, str]:
    r, w = os.pipe()
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(w), "-nolisten", "tcp", "-screen", "0", "1280x1024x24"],
        pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=open(root / "xvfb.log", "wb"),
        env=clean_env(), start_new_session=True,
    )
    os.close(w)
    with os.fdopen(r) as f:
        number = f.readline().strip()
    if not number:
        stop_process(proc)
        raise RuntimeError(f"Xvfb did not start: {(root / 'xvfb.log').read_text()}")
    return proc, f":{number}"


def start_desktop(root: Path) -> Desktop:
    """Bus, Xvfb and dunst under ``root``; the caller stops it with ``.stop()``."""
    bus, address = start_bus(root)
    procs = {"bus": bus}
    try:
        xvfb, display = _start_xvfb(root)
        procs["xvfb"] = xvfb
        for name, text in (("dmenu", DMENU_SCRIPT), ("shown", SHOWN_SCRIPT)):
            p = root / name
            p.write_text(text.format(python=sys.executable, root=str(root)))
            p.chmod(0o755)
        (root / "dunstrc").write_text(DUNSTRC.format(root=root))
        (root / "want").write_text("none\n")
        desk = Desktop(root=root, bus_address=address, display=display,
                       env={"DBUS_SESSION_BUS_ADDRESS": address, "DISPLAY": display},
                       _procs=procs)
        desk.start_server()
        return desk
    except BaseException:
        for p in procs.values():
            stop_process(p)
        raise


@pytest.fixture(scope="session")
def desktop() -> Iterator[Desktop]:
    """A private D-Bus session + Xvfb + dunst for the whole session."""
    need_bin("dbus-daemon", "Xvfb", "dunst", "dunstctl", "dbus-send")
    root = Path(tempfile.mkdtemp(prefix="ek-desktop-"))
    try:
        desk = start_desktop(root)
    except (RuntimeError, AssertionError, OSError) as e:
        need("desktop (dbus + Xvfb + dunst)", False, str(e))
        raise
    try:
        yield desk
    finally:
        desk.stop()
        shutil.rmtree(root, ignore_errors=True)
