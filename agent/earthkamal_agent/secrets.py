"""Secrets in the OS keyring (Secret Service / KWallet on Linux, Keychain on macOS).

Entries live under the keyring service ``earthkamal-agent``. A name is global or scoped to
one repository (``--repo PATH``); a lookup for a repo tries its scope first, then the global
one. Which names exist is kept in an index entry inside the keyring as well, so nothing about
secrets is ever written to a file. Values never travel through argv or logs: the CLI reads
them from a hidden prompt or from stdin.

Backends that are not a real OS store (keyring's fail/null backends, keyrings.alt's file
backends) are refused with a sentence saying what to install.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
from contextlib import closing
from pathlib import Path
from typing import IO

import keyring
import keyring.errors
from keyring.backend import KeyringBackend

from .errors import UserError

SERVICE = "earthkamal-agent"
INDEX = ".names"  # not a valid secret name, so it never collides with one
NAME_RE = re.compile(r"[A-Z_][A-Z0-9_]*\Z")

LOCKED = (
    "The OS keyring is locked; unlock it (log in to your desktop session, or open "
    "Passwords and Keys / Seahorse, or pipe your password to `gnome-keyring-daemon --unlock`) "
    "and try again."
)
NO_BUS = (
    "There is no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS is unset), so the OS keyring "
    "cannot be reached; run this from your desktop session (or under `dbus-run-session`)."
)


def validate_name(name: str) -> str:
    """Return ``name`` if it is an upper-case identifier, else raise UserError."""
    if not NAME_RE.match(name or ""):
        raise UserError(
            f"Invalid secret name {name!r}: use upper-case letters, digits and underscores, "
            "not starting with a digit (for example REGISTRY_PASSWORD)."
        )
    return name


def repo_scope(repo: str | os.PathLike[str] | None) -> str | None:
    """The scope key of a repository: its absolute real path (a ``.git`` dir means its parent)."""
    if repo is None:
        return None
    path = Path(repo).expanduser().resolve()
    if path.name == ".git":
        path = path.parent
    return str(path)


def _user(name: str, scope: str | None) -> str:
    return name if scope is None else f"{scope}:{name}"


def _describe(kr: KeyringBackend) -> str:
    return f"{type(kr).__module__}.{type(kr).__name__}"


def _leaves(kr: KeyringBackend) -> list[KeyringBackend]:
    from keyring.backends.chainer import ChainerBackend

    if isinstance(kr, ChainerBackend):
        return list(kr.backends)
    return [kr]


def _is_os_store(kr: KeyringBackend) -> bool:
    from keyring.backends import fail, null

    if isinstance(kr, (fail.Keyring, null.Keyring)):
        return False
    return not type(kr).__module__.startswith("keyrings.alt")


def _no_store_sentence(kr: KeyringBackend) -> str:
    desc = _describe(kr)
    if any(type(b).__module__.startswith("keyrings.alt") for b in _leaves(kr)):
        return (
            f"The keyring backend is {desc}, which keeps secrets in a file; uninstall "
            "keyrings.alt and use the OS keyring instead (gnome-keyring or KWallet on Linux, "
            "the Keychain on macOS)."
        )
    if sys.platform == "darwin":
        return (
            f"The macOS Keychain is not reachable (keyring chose {desc}); run earthkamal-agent "
            "as your logged-in user, not over a bare SSH session or sudo."
        )
    if sys.platform.startswith("linux"):
        return (
            f"No OS keyring is available (keyring chose {desc}); install and start gnome-keyring "
            "(apt install gnome-keyring) or KWallet in your desktop session."
        )
    return f"No OS keyring is available (keyring chose {desc})."


def _backend() -> KeyringBackend:
    """The keyring backend if it is a real OS store; UserError otherwise."""
    kr = keyring.get_keyring()
    usable = [b for b in _leaves(kr) if _is_os_store(b)]
    if usable:
        return kr
    if sys.platform.startswith("linux") and not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        raise UserError(NO_BUS)
    raise UserError(_no_store_sentence(kr))


def _probe_secret_service(kr: KeyringBackend) -> None:
    """Refuse a locked Secret Service collection without triggering an unlock prompt."""
    import secretstorage
    from secretstorage.exceptions import ItemNotFoundException, SecretStorageException

    if not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        raise UserError(NO_BUS)
    try:
        conn = secretstorage.dbus_init()
    except SecretStorageException as e:
        raise UserError(f"Cannot reach the Secret Service on the D-Bus session bus ({e}).") from e
    with closing(conn):
        path = getattr(kr, "preferred_collection", None)
        try:
            collection = (secretstorage.Collection(conn, path) if path
                          else secretstorage.Collection(conn))
            locked = collection.is_locked()
        except ItemNotFoundException:
            return  # no default collection yet: keyring creates one on first write
        except SecretStorageException as e:
            raise UserError(f"The Secret Service did not answer ({e}).") from e
    if locked:
        raise UserError(LOCKED)


def check_backend() -> None:
    """Raise UserError (one sentence) unless secrets can be stored in a real, unlocked OS store."""
    kr = _backend()
    from keyring.backends import SecretService

    for leaf in _leaves(kr):
        if isinstance(leaf, SecretService.Keyring):
            _probe_secret_service(leaf)
            return


def _call(fn, *args):
    """Run a keyring call, turning its errors into one sentence."""
    try:
        return fn(*args)
    except keyring.errors.KeyringLocked as e:
        raise UserError(LOCKED) from e
    except keyring.errors.NoKeyringError as e:
        raise UserError(_no_store_sentence(keyring.get_keyring())) from e
    except keyring.errors.KeyringError as e:
        raise UserError(f"The OS keyring refused the operation ({type(e).__name__}: {e}).") from e


def _read_index(kr: KeyringBackend, scope: str | None) -> list[str]:
    raw = _call(kr.get_password, SERVICE, _user(INDEX, scope))
    if not raw:
        return []
    try:
        names = json.loads(raw)
    except ValueError:
        return []
    return sorted({n for n in names if isinstance(n, str) and NAME_RE.match(n)})


def _write_index(kr: KeyringBackend, scope: str | None, names: list[str]) -> None:
    key = _user(INDEX, scope)
    if names:
        _call(kr.set_password, SERVICE, key, json.dumps(sorted(set(names))))
    elif _call(kr.get_password, SERVICE, key) is not None:
        _call(kr.delete_password, SERVICE, key)


def set_secret(name: str, value: str, repo: str | os.PathLike[str] | None = None) -> None:
    """Store ``value`` under ``name`` (globally, or for ``repo``)."""
    validate_name(name)
    if not value:
        raise UserError(f"Refusing to store an empty value for {name}.")
    check_backend()
    kr = _backend()
    scope = repo_scope(repo)
    _call(kr.set_password, SERVICE, _user(name, scope), value)
    names = _read_index(kr, scope)
    if name not in names:
        _write_index(kr, scope, [*names, name])


def get_secret(name: str, repo: str | os.PathLike[str] | None = None) -> str | None:
    """The value of ``name``: the repo's own first, then the global one; None if neither."""
    validate_name(name)
    check_backend()
    kr = _backend()
    scope = repo_scope(repo)
    scopes = [scope, None] if scope is not None else [None]
    for s in scopes:
        value = _call(kr.get_password, SERVICE, _user(name, s))
        if value is not None:
            return value
    return None


def delete_secret(name: str, repo: str | os.PathLike[str] | None = None) -> bool:
    """Delete ``name`` from exactly that scope; False if it was not there."""
    validate_name(name)
    check_backend()
    kr = _backend()
    scope = repo_scope(repo)
    existed = _call(kr.get_password, SERVICE, _user(name, scope)) is not None
    if existed:
        _call(kr.delete_password, SERVICE, _user(name, scope))
    names = _read_index(kr, scope)
    if name in names:
        _write_index(kr, scope, [n for n in names if n != name])
        existed = True
    return existed


def list_names(repo: str | os.PathLike[str] | None = None) -> list[str]:
    """Names stored in exactly that scope (global when ``repo`` is None), sorted."""
    check_backend()
    return _read_index(_backend(), repo_scope(repo))


# -- CLI handlers (wired into earthkamal_agent.cli) ---------------------------------------------

def _scope_text(repo: str | os.PathLike[str] | None) -> str:
    scope = repo_scope(repo)
    return f"for {scope}" if scope else "globally"


def read_value(name: str, stdin_is_tty: bool, stdin: IO[str] | None = None) -> str:
    """A value from a hidden prompt (TTY) or all of stdin minus one trailing newline."""
    if stdin_is_tty:
        value = getpass.getpass(f"Value for {name} (input hidden): ")
    else:
        value = (stdin or sys.stdin).read()
        if value.endswith("\r\n"):
            value = value[:-2]
        elif value.endswith("\n"):
            value = value[:-1]
    if not value:
        raise UserError(f"No value given for {name}; nothing was stored.")
    return value


def cli_set(name: str, repo: str | None, stdin_is_tty: bool) -> int:
    """`secret set NAME [--repo PATH]`: the value comes from a prompt or stdin, never argv."""
    validate_name(name)
    check_backend()  # fail before the user types anything
    value = read_value(name, stdin_is_tty)
    set_secret(name, value, repo)
    print(f"Stored {name} {_scope_text(repo)} in the OS keyring.")
    return 0


def cli_list(repo: str | None) -> int:
    """`secret list [--repo PATH]`: names only, with their scope; never values."""
    own = list_names(repo) if repo is not None else []
    shared = list_names(None)
    rows = [(n, "repo") for n in own]
    rows += [(n, "global (overridden)" if n in own else "global") for n in shared]
    if not rows:
        print(f"No secrets stored {_scope_text(repo)}.", file=sys.stderr)
        return 0
    width = max(len(n) for n, _ in rows)
    for n, where in sorted(rows):
        print(f"{n.ljust(width)}  {where}")
    return 0


def cli_delete(name: str, repo: str | None) -> int:
    """`secret delete NAME [--repo PATH]`."""
    if not delete_secret(name, repo):
        raise UserError(f"No secret {name} is stored {_scope_text(repo)}.")
    print(f"Deleted {name} {_scope_text(repo)}.")
    return 0


def cli_provider(name: str, repo: str | None = None) -> int:
    """Earthly ``secret_provider`` protocol: raw value on stdout, exit 2 when not found."""
    if not NAME_RE.match(name or ""):
        return 2
    value = get_secret(name, repo)
    if value is None:
        return 2
    sys.stdout.write(value)
    sys.stdout.flush()
    return 0
