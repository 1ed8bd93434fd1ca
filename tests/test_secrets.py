"""Secrets: name rules, backend refusal, and real round trips through gnome-keyring."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from earthkamal_agent import secrets
from earthkamal_agent.errors import UserError
from keyring.backend import KeyringBackend
from keyring.backends import fail

AGENT_DIR = Path(__file__).resolve().parent.parent / "agent"
VALUE = "s3cr3t-Value-that-must-not-leak-7f3a"


def _child_env(os_keyring, extra: dict[str, str] | None = None) -> dict[str, str]:
    pp = os.pathsep.join(p for p in (str(AGENT_DIR), os.environ.get("PYTHONPATH")) if p)
    return os_keyring.full_env({"PYTHONPATH": pp, **(extra or {})})


# -- pure ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "lower", "1ABC", "A-B", "A B", "ÄB", "A\n"])
def test_invalid_names_refused(bad: str) -> None:
    with pytest.raises(UserError) as e:
        secrets.validate_name(bad)
    assert str(e.value).startswith("Invalid secret name")
    assert str(e.value).count(". ") == 0  # one sentence


def test_valid_names() -> None:
    for ok in ("A", "_X", "REGISTRY_PASSWORD", "KAMAL_REGISTRY_PASSWORD_2"):
        assert secrets.validate_name(ok) == ok


def test_repo_scope(tmp_path: Path) -> None:
    assert secrets.repo_scope(None) is None
    assert secrets.repo_scope(tmp_path / ".git") == str(tmp_path.resolve())
    assert secrets.repo_scope(str(tmp_path)) == str(tmp_path.resolve())


# -- backends that are not an OS store -------------------------------------------------------------

class PlaintextKeyring(KeyringBackend):
    """Stands in for keyrings.alt.file.PlaintextKeyring (same module prefix)."""

    priority = 1  # type: ignore[assignment]

    def get_password(self, service, username):
        return None

    def set_password(self, service, username, password):
        raise AssertionError("must never be used")

    def delete_password(self, service, username):
        raise AssertionError("must never be used")


PlaintextKeyring.__module__ = "keyrings.alt.file"


def _use(monkeypatch: pytest.MonkeyPatch, backend: KeyringBackend) -> None:
    import keyring.core

    monkeypatch.setattr(keyring.core, "_keyring_backend", backend)


def test_fail_backend_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, fail.Keyring())
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent")
    with pytest.raises(UserError) as e:
        secrets.check_backend()
    assert str(e.value) == (
        "No OS keyring is available (keyring chose keyring.backends.fail.Keyring); install and "
        "start gnome-keyring (apt install gnome-keyring) or KWallet in your desktop session."
    )
    with pytest.raises(UserError, match="No OS keyring"):
        secrets.set_secret("TOKEN", VALUE)


def test_no_session_bus_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, fail.Keyring())
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    with pytest.raises(UserError) as e:
        secrets.check_backend()
    assert str(e.value) == secrets.NO_BUS


def test_plaintext_and_chainer_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from keyring.backends.chainer import ChainerBackend

    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent")
    _use(monkeypatch, PlaintextKeyring())
    with pytest.raises(UserError, match="keeps secrets in a file; uninstall keyrings.alt"):
        secrets.check_backend()
    monkeypatch.setattr(ChainerBackend, "backends", [PlaintextKeyring(), fail.Keyring()])
    _use(monkeypatch, ChainerBackend())
    with pytest.raises(UserError, match="keeps secrets in a file"):
        secrets.check_backend()


def test_macos_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, fail.Keyring())
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(UserError, match="macOS Keychain is not reachable"):
        secrets.check_backend()


# -- a real gnome-keyring ------------------------------------------------------------------------

@pytest.fixture
def real_keyring(os_keyring, monkeypatch: pytest.MonkeyPatch):
    os_keyring.use_in_process(monkeypatch)
    yield os_keyring
    for scope in (None, "/srv/app-a"):
        for name in secrets.list_names(scope):
            secrets.delete_secret(name, scope)


def test_set_get_list_delete(real_keyring) -> None:
    secrets.check_backend()
    secrets.set_secret("REGISTRY_PASSWORD", "global-pw")
    secrets.set_secret("REGISTRY_PASSWORD", "repo-pw", repo="/srv/app-a")
    secrets.set_secret("ONLY_GLOBAL", "g2")
    assert secrets.get_secret("REGISTRY_PASSWORD") == "global-pw"
    assert secrets.get_secret("REGISTRY_PASSWORD", repo="/srv/app-a") == "repo-pw"
    assert secrets.get_secret("REGISTRY_PASSWORD", repo="/srv/other") == "global-pw"
    assert secrets.get_secret("ONLY_GLOBAL", repo="/srv/app-a") == "g2"
    assert secrets.get_secret("MISSING") is None
    # the keyring is shared by the session: other tests' global names may be there too
    assert {"ONLY_GLOBAL", "REGISTRY_PASSWORD"} <= set(secrets.list_names())
    assert secrets.list_names("/srv/app-a") == ["REGISTRY_PASSWORD"]
    assert secrets.delete_secret("REGISTRY_PASSWORD", repo="/srv/app-a") is True
    assert secrets.delete_secret("REGISTRY_PASSWORD", repo="/srv/app-a") is False
    assert secrets.get_secret("REGISTRY_PASSWORD", repo="/srv/app-a") == "global-pw"
    assert secrets.list_names("/srv/app-a") == []
    with pytest.raises(UserError, match="Invalid secret name"):
        secrets.set_secret("bad name", "x")


def test_cli_list_and_delete(real_keyring, capsys: pytest.CaptureFixture[str]) -> None:
    secrets.set_secret("A_TOKEN", "aaa")
    secrets.set_secret("A_TOKEN", "bbb", repo="/srv/app-a")
    secrets.set_secret("B_TOKEN", "ccc")
    assert secrets.cli_list("/srv/app-a") == 0
    out = capsys.readouterr().out
    assert out.splitlines() == ["A_TOKEN  global (overridden)", "A_TOKEN  repo",
                                "B_TOKEN  global"]
    assert "aaa" not in out and "bbb" not in out
    assert secrets.cli_delete("B_TOKEN", None) == 0
    with pytest.raises(UserError, match="No secret B_TOKEN is stored globally"):
        secrets.cli_delete("B_TOKEN", None)


def test_cli_set_reads_stdin_in_a_subprocess(os_keyring, real_keyring, tmp_path: Path) -> None:
    code = ("import sys; from earthkamal_agent.secrets import cli_set, cli_provider; "
            "sys.exit(cli_set('DEPLOY_TOKEN', None, sys.stdin.isatty()))")
    argv = [sys.executable, "-c", code]
    env = _child_env(os_keyring, {"EARTHKAMAL_HOME": str(tmp_path / "state")})
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        time.sleep(0.5)  # it is now waiting for stdin: its argv must not hold the value
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert VALUE.encode() not in cmdline
        out, err = proc.communicate(VALUE.encode() + b"\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert out.decode() == "Stored DEPLOY_TOKEN globally in the OS keyring.\n"
    assert VALUE not in (out + err).decode()
    assert VALUE not in " ".join(argv)
    assert secrets.get_secret("DEPLOY_TOKEN") == VALUE  # exactly one trailing newline stripped
    # the value is in no file: neither the keyring's (encrypted) nor the agent's state
    for root in (os_keyring.root, tmp_path):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_socket():
                assert VALUE.encode() not in path.read_bytes(), path
    # Earthly's secret_provider protocol: raw value, exit 2 when missing
    prov = "import sys; from earthkamal_agent.secrets import cli_provider; " \
           "sys.exit(cli_provider(sys.argv[1]))"
    got = subprocess.run([sys.executable, "-c", prov, "DEPLOY_TOKEN"], env=env,
                         capture_output=True, timeout=30)
    assert (got.returncode, got.stdout) == (0, VALUE.encode())
    missing = subprocess.run([sys.executable, "-c", prov, "NOPE"], env=env,
                             capture_output=True, timeout=30)
    assert missing.returncode == 2 and missing.stdout == b""


def test_cli_set_empty_stdin_refused(os_keyring, real_keyring) -> None:
    code = ("import sys\nfrom earthkamal_agent.errors import UserError\n"
            "from earthkamal_agent.secrets import cli_set\n"
            "try:\n    sys.exit(cli_set('EMPTY_ONE', None, False))\n"
            "except UserError as e:\n    print(e, file=sys.stderr); sys.exit(1)\n")
    got = subprocess.run([sys.executable, "-c", code], input=b"\n", env=_child_env(os_keyring),
                         capture_output=True, timeout=30)
    assert got.returncode == 1
    assert got.stderr.decode().strip() == "No value given for EMPTY_ONE; nothing was stored."


def test_locked_keyring_sentence(os_keyring, real_keyring) -> None:
    secrets.set_secret("LOCKED_TEST", "v")
    with os_keyring.locked():
        assert os_keyring.is_locked()
        with pytest.raises(UserError) as e:
            secrets.check_backend()
        assert str(e.value) == secrets.LOCKED
        with pytest.raises(UserError, match="keyring is locked"):
            secrets.get_secret("LOCKED_TEST")
        # and in a child process (no DISPLAY, so no prompt can hang it)
        code = ("import sys\nfrom earthkamal_agent.errors import UserError\n"
                "from earthkamal_agent.secrets import cli_list\n"
                "try:\n    sys.exit(cli_list(None))\n"
                "except UserError as e:\n    print(e, file=sys.stderr); sys.exit(1)\n")
        got = subprocess.run([sys.executable, "-c", code], env=_child_env(os_keyring),
                             capture_output=True, timeout=30)
        assert got.returncode == 1
        assert got.stderr.decode().strip() == secrets.LOCKED
    assert not os_keyring.is_locked()
    assert secrets.get_secret("LOCKED_TEST") == "v"
