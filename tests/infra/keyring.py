"""A real Secret Service for the tests: gnome-keyring-daemon on a private bus (pytest plugin).

Fixture ``os_keyring`` (session scope) -> :class:`OsKeyring`
    Starts a private D-Bus session bus (see ``tests.infra.desktop.start_bus``) and
    ``gnome-keyring-daemon --foreground --unlock --components=secrets`` on it with a test
    password on stdin, with HOME and the XDG dirs in a temporary directory, so the user's real
    keyring is never touched. It creates and unlocks a "login" collection, which becomes the
    default. ``env`` is what a child process needs (``full_env()`` = os.environ + env);
    ``use_in_process(monkeypatch)`` points this process's ``keyring`` at it for one test;
    ``with os_keyring.locked():`` locks the collection for the "locked keyring" test.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.infra import need, need_bin, stop_process
from tests.infra.desktop import clean_env, start_bus, wait_for

PASSWORD = "earthkamal-test-keyring"
SECRETS = "org.freedesktop.secrets"


def _connect(address: str):
    from jeepney.io.blocking import open_dbus_connection

    return open_dbus_connection(bus=address)


@dataclass
class OsKeyring:
    """The running keyring daemon."""

    root: Path
    bus_address: str
    env: dict[str, str]
    password: str = PASSWORD
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def full_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a child process using this keyring (no DISPLAY: no prompts)."""
        return clean_env({**self.env, **(extra or {})})

    def use_in_process(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point os.environ and the ``keyring`` module of this process at this daemon."""
        import keyring.core
        from keyring.backends import SecretService

        for k, v in self.env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("DISPLAY", raising=False)
        monkeypatch.setattr(keyring.core, "_keyring_backend", SecretService.Keyring())

    def _collection_path(self, conn) -> str:
        from jeepney import DBusAddress, new_method_call

        service = DBusAddress("/org/freedesktop/secrets", bus_name=SECRETS,
                              interface="org.freedesktop.Secret.Service")
        reply = conn.send_and_get_reply(new_method_call(service, "ReadAlias", "s", ("default",)))
        return reply.body[0]

    def is_locked(self) -> bool:
        import secretstorage

        with contextlib.closing(_connect(self.bus_address)) as conn:
            return secretstorage.Collection(conn, self._collection_path(conn)).is_locked()

    def lock(self) -> None:
        import secretstorage

        with contextlib.closing(_connect(self.bus_address)) as conn:
            secretstorage.Collection(conn, self._collection_path(conn)).lock()

    def unlock(self) -> None:
        """Unlock with the password (gnome-keyring's own interface; no prompt involved)."""
        from jeepney import DBusAddress, new_method_call
        from secretstorage.util import format_secret, open_session

        with contextlib.closing(_connect(self.bus_address)) as conn:
            path = self._collection_path(conn)
            secret = format_secret(open_session(conn), self.password.encode(), "text/plain")
            internal = DBusAddress(
                "/org/freedesktop/secrets", bus_name=SECRETS,
                interface="org.gnome.keyring.InternalUnsupportedGuiltRiddenInterface",
            )
            reply = conn.send_and_get_reply(
                new_method_call(internal, "UnlockWithMasterPassword", "o(oayays)", (path, secret))
            )
            if reply.header.message_type.name == "error":
                raise RuntimeError(f"unlock failed: {reply.body}")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Lock the default collection for the duration of the block."""
        self.lock()
        try:
            yield
        finally:
            self.unlock()

    def stop(self) -> None:
        for name in ("keyring", "bus"):
            stop_process(self._procs.pop(name, None))


def start_keyring(root: Path, bus_address: str | None = None) -> OsKeyring:
    """Bus (unless ``bus_address`` is given) + unlocked gnome-keyring under ``root``; the
    caller stops it."""
    if bus_address is None:
        bus, address = start_bus(root / "bus")
    else:
        bus, address = None, bus_address
    home = root / "home"
    env = {
        "DBUS_SESSION_BUS_ADDRESS": address,
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / ".local/share"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_RUNTIME_DIR": str(root / "run"),
    }
    for d in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR"):
        Path(env[d]).mkdir(parents=True, exist_ok=True, mode=0o700)
    kr = OsKeyring(root=root, bus_address=address, env=env, _procs={"bus": bus} if bus else {})
    try:
        proc = subprocess.Popen(
            ["gnome-keyring-daemon", "--foreground", "--unlock", "--components=secrets"],
            stdin=subprocess.PIPE, stdout=open(root / "keyring.log", "wb"),
            stderr=subprocess.STDOUT, env=kr.full_env(), start_new_session=True,
        )
        kr._procs["keyring"] = proc
        assert proc.stdin is not None
        proc.stdin.write(PASSWORD.encode())
        proc.stdin.close()

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"gnome-keyring-daemon exited: "
                                   f"{(root / 'keyring.log').read_text()}")
            try:
                return not kr.is_locked()
            except Exception:  # noqa: BLE001 - not up yet
                return False

        wait_for(ready, 15, "gnome-keyring-daemon to serve an unlocked login keyring")
        return kr
    except BaseException:
        kr.stop()
        raise


def _keyring_session(prefix: str, bus_address: str | None = None) -> Iterator[OsKeyring]:
    """Start an unlocked gnome-keyring under a fresh tmp dir; stop and remove it after."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        kr = start_keyring(root, bus_address=bus_address)
    except (RuntimeError, AssertionError, OSError) as e:
        need("gnome-keyring (Secret Service)", False, str(e))
        raise
    try:
        yield kr
    finally:
        kr.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def os_keyring() -> Iterator[OsKeyring]:
    """gnome-keyring on a private bus with a throwaway HOME, unlocked."""
    need_bin("dbus-daemon", "gnome-keyring-daemon")
    try:
        import secretstorage  # noqa: F401
    except ImportError:
        need("secretstorage", False, "the Python package is not installed")
    yield from _keyring_session("ek-keyring-")


@pytest.fixture(scope="session")
def desktop_keyring(desktop) -> Iterator[OsKeyring]:  # noqa: ANN001
    """gnome-keyring on the `desktop` fixture's bus: one session, like a real desktop, so one
    agent process reaches both the notification server and the Secret Service."""
    need_bin("gnome-keyring-daemon")
    yield from _keyring_session("ek-dkeyring-", bus_address=desktop.bus_address)
