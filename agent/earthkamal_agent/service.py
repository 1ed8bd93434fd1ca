"""Run the agent as a per-user service: a systemd user unit or a launchd agent.

Pure functions render the unit/plist from the shipped templates and build the
``systemctl --user`` / ``launchctl`` commands; the ``cli_*`` handlers write the file, run the
commands and undo exactly that. ``--no-start`` (or a custom ``--unit-dir``) only writes the
file, which is how tests and machines without a user service manager use it.
"""

from __future__ import annotations

import argparse
import json
import os
import plistlib
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from .errors import UserError
from .paths import data_path
from .runner import Command, CommandNotFound, run_quiet

Kind = Literal["systemd", "launchd"]
KINDS: tuple[Kind, ...] = ("systemd", "launchd")

UNIT_NAME = "earthkamal-agent.service"
LABEL = "dev.earthkamal.agent"
PLIST_NAME = f"{LABEL}.plist"
MARKER = "# Written by earthkamal-agent"
UNIT_DIR_ENV = "EARTHKAMAL_UNIT_DIR"
# Variables the service gets from the installing shell: launchd and systemd start the agent
# with their own minimal PATH, which lacks pipx, Homebrew, gem and pyenv dirs.
PASSED_ENV = ("PATH", "EARTHKAMAL_HOME", "EARTHKAMAL_CONFIG")
MANAGER_TIMEOUT = 120.0  # `restart` of a Type=notify unit waits for READY=1

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SAFE_WORD = re.compile(r"^[A-Za-z0-9/._+:=,@-]+$")


# ---------------------------------------------------------------- where and what

def default_kind(platform: str | None = None) -> Kind:
    """The manager this platform would use: launchd on macOS, systemd elsewhere."""
    return "launchd" if (platform or sys.platform) == "darwin" else "systemd"


def file_name(kind: Kind) -> str:
    return PLIST_NAME if kind == "launchd" else UNIT_NAME


def default_unit_dir(kind: Kind) -> Path:
    """``~/.config/systemd/user`` (honouring XDG_CONFIG_HOME) or ``~/Library/LaunchAgents``."""
    if kind == "launchd":
        return Path.home() / "Library" / "LaunchAgents"
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return base / "systemd" / "user"


def unit_dir(kind: Kind, override: str | os.PathLike[str] | None = None) -> Path:
    """The folder for the unit/plist: ``override``, else ``$EARTHKAMAL_UNIT_DIR``, else default."""
    chosen = override or os.environ.get(UNIT_DIR_ENV)
    return Path(chosen).absolute() if chosen else default_unit_dir(kind)


def default_log_dir() -> Path:
    """Where launchd writes the agent's stdout/stderr."""
    return Path.home() / "Library" / "Logs" / "earthkamal-agent"


def exec_argv() -> list[str]:
    """The agent's program: the console script next to this interpreter, else ``python -m``."""
    python = Path(sys.executable).absolute()  # not resolved: a venv's python is a symlink
    script = python.parent / "earthkamal-agent"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [str(python), "-m", "earthkamal_agent"]


def service_env(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the service: PATH and the state/config dirs of the installing shell.

    With the ``python -m`` form from a source checkout, PYTHONPATH points at the checkout.
    """
    environ = os.environ if environ is None else environ
    env = {k: environ[k] for k in PASSED_ENV if environ.get(k)}
    for k in ("EARTHKAMAL_HOME", "EARTHKAMAL_CONFIG"):
        if k in env:
            env[k] = str(Path(env[k]).absolute())
    if len(argv) >= 3 and argv[1:3] == ["-m", "earthkamal_agent"]:
        root = Path(__file__).resolve().parent.parent
        if "site-packages" not in root.parts and "dist-packages" not in root.parts:
            env["PYTHONPATH"] = str(root)
    return env


# ---------------------------------------------------------------- rendering

def _systemd_word(arg: str, program: bool = False) -> str:
    """One ExecStart= word: quoted when needed; ``%`` specifiers and ``$`` expansion escaped.

    systemd expands ``$VAR`` only in the arguments, never in the program path.
    """
    if "\n" in arg or "\r" in arg or "\0" in arg:
        raise ValueError(f"a service argument cannot contain a line break: {arg!r}")
    escaped = arg.replace("%", "%%")
    if not program:
        escaped = escaped.replace("$", "$$")
    if escaped == ";":
        return "\\;"
    if _SAFE_WORD.match(escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _systemd_env(name: str, value: str) -> str:
    if not _ENV_NAME.match(name):
        raise ValueError(f"not an environment variable name: {name!r}")
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError(f"environment value of {name} contains a line break")
    quoted = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'Environment="{name}={quoted}"'


def render_unit(exec_argv: Sequence[str], env: Mapping[str, str]) -> str:
    """The systemd user unit: the template with ExecStart= and Environment= filled in."""
    argv = list(exec_argv)
    if not argv or not os.path.isabs(argv[0]):
        raise ValueError(f"the service program must be an absolute path, got {argv[:1]}")
    text = data_path("systemd", UNIT_NAME).read_text(encoding="utf-8")
    env_lines = "".join(_systemd_env(k, env[k]) + "\n" for k in sorted(env))
    text = text.replace("@ENVIRONMENT@\n", env_lines)
    words = [_systemd_word(argv[0], program=True)] + [_systemd_word(a) for a in argv[1:]]
    return text.replace("@EXEC@", " ".join(words))


def render_plist(
    exec_argv: Sequence[str], env: Mapping[str, str], log_dir: str | os.PathLike[str]
) -> bytes:
    """The launchd agent plist (XML): the template with program, environment and logs filled."""
    argv = list(exec_argv)
    if not argv or not os.path.isabs(argv[0]):
        raise ValueError(f"the service program must be an absolute path, got {argv[:1]}")
    doc = plistlib.loads(data_path("launchd", PLIST_NAME).read_bytes())
    program: list[str] = []
    for item in doc["ProgramArguments"]:
        program.extend(argv if item == "@EXEC@" else [item])
    doc["ProgramArguments"] = program
    logs = str(Path(log_dir).absolute())
    for key in ("StandardOutPath", "StandardErrorPath"):
        doc[key] = doc[key].replace("@LOG_DIR@", logs)
    doc["EnvironmentVariables"] = {**doc.get("EnvironmentVariables", {}), **dict(env)}
    return plistlib.dumps(doc, fmt=plistlib.FMT_XML, sort_keys=False)


# ---------------------------------------------------------------- commands

def _systemctl(*args: str) -> Command:
    return Command(argv=("systemctl", "--user", *args), timeout=MANAGER_TIMEOUT)


def _launchctl(*args: str) -> Command:
    return Command(argv=("launchctl", *args), timeout=MANAGER_TIMEOUT)


def _uid(uid: int | None) -> int:
    return os.getuid() if uid is None else uid


def install_argv(
    kind: Kind,
    path: str | os.PathLike[str] | None = None,
    *,
    loaded: bool = False,
    uid: int | None = None,
) -> list[Command]:
    """Commands that enable and (re)start the service once its file is written at ``path``.

    systemd: reload, enable, restart (starts it, or restarts it on a reinstall so the new
    binary runs). launchd: bootout first when ``loaded`` (a loaded job keeps its old plist),
    clear a disable override, bootstrap (RunAtLoad starts it), kickstart if it did not.
    """
    if kind == "systemd":
        return [_systemctl("daemon-reload"), _systemctl("enable", UNIT_NAME),
                _systemctl("restart", UNIT_NAME)]
    domain = f"gui/{_uid(uid)}"
    plist = str(path) if path is not None else str(default_unit_dir("launchd") / PLIST_NAME)
    cmds = [_launchctl("bootout", f"{domain}/{LABEL}")] if loaded else []
    return cmds + [
        _launchctl("enable", f"{domain}/{LABEL}"),
        _launchctl("bootstrap", domain, plist),
        _launchctl("kickstart", f"{domain}/{LABEL}"),
    ]


def uninstall_argv(kind: Kind, *, loaded: bool = True, uid: int | None = None) -> list[Command]:
    """Commands that stop and disable the service, run before its file is removed."""
    if kind == "systemd":
        return [_systemctl("disable", "--now", UNIT_NAME)]
    return [_launchctl("bootout", f"gui/{_uid(uid)}/{LABEL}")] if loaded else []


def reload_argv(kind: Kind) -> list[Command]:
    """Commands run after the file is removed (systemd forgets the unit)."""
    return [_systemctl("daemon-reload")] if kind == "systemd" else []


def status_argv(kind: Kind, *, uid: int | None = None) -> list[Command]:
    """One command whose output describes the service (key=value for systemd)."""
    if kind == "systemd":
        return [Command(
            argv=("systemctl", "--user", "show", UNIT_NAME,
                  "--property=LoadState,ActiveState,SubState,UnitFileState,MainPID,"
                  "StatusText,NRestarts,ExecMainStatus"),
            timeout=15,
        )]
    return [Command(argv=("launchctl", "print", f"gui/{_uid(uid)}/{LABEL}"), timeout=15)]


# ---------------------------------------------------------------- the manager

def _probe(command: Command) -> tuple[bool, str]:
    try:
        r = run_quiet(command)
    except CommandNotFound:
        return False, f"{command.argv[0]} is not on PATH"
    except (subprocess.TimeoutExpired, OSError) as e:
        return False, f"{command.argv[0]} did not answer ({e.__class__.__name__})"
    text = (r.stderr or r.stdout or b"").decode("utf-8", "replace").strip().splitlines()
    return r.returncode == 0, (text[-1] if text else f"exit code {r.returncode}")


def detect_manager(platform: str | None = None) -> tuple[Kind | None, str]:
    """The user service manager that answers here, with the reason for the verdict."""
    if (platform or sys.platform) == "darwin":
        if shutil.which("launchctl") is None:
            return None, "launchctl is not on PATH"
        ok, why = _probe(Command(argv=("launchctl", "print", f"gui/{os.getuid()}"), timeout=10))
        if ok:
            return "launchd", f"launchd GUI session gui/{os.getuid()}"
        return None, f"no launchd GUI session for this user: {why}"
    if shutil.which("systemctl") is None:
        return None, "systemctl is not on PATH (no systemd)"
    ok, why = _probe(Command(argv=("systemctl", "--user", "show-environment"), timeout=10))
    if ok:
        return "systemd", "the systemd user manager answers"
    return None, f"systemctl --user: {why}"


def _no_manager(reason: str) -> UserError:
    return UserError(
        f"No user service manager runs here ({reason}), so the agent cannot be installed as a "
        "service: keep `earthkamal-agent run` running yourself (a terminal, tmux, or your "
        "session's autostart), or pass --no-start to only write the unit file."
    )


def _quiet(args: argparse.Namespace) -> bool:
    """True when the handler must not talk to systemctl/launchctl (--no-start, custom dir)."""
    return bool(getattr(args, "no_start", False) or getattr(args, "unit_dir", None)
                or os.environ.get(UNIT_DIR_ENV))


def _resolve(args: argparse.Namespace, need_manager: bool) -> tuple[Kind, Path, bool]:
    """(kind, file path, talk to the manager?) for a handler's arguments."""
    forced: Kind | None = getattr(args, "manager", None)
    override = getattr(args, "unit_dir", None)
    quiet = _quiet(args)
    if quiet or not need_manager:
        kind = forced or default_kind()
        found, _ = (None, "") if quiet else detect_manager()
        return kind, unit_dir(kind, override) / file_name(kind), (not quiet and found == kind)
    found, reason = detect_manager()
    if found is None:
        raise _no_manager(reason)
    if forced and forced != found:
        raise UserError(f"--manager {forced} was asked for, but this machine runs {found}; "
                        f"drop --manager or pass --no-start to only write the file.")
    return found, unit_dir(found, override) / file_name(found), True


def _is_ours(kind: Kind, path: Path) -> bool:
    try:
        if kind == "systemd":
            return path.read_text(encoding="utf-8").startswith(MARKER)
        return plistlib.loads(path.read_bytes()).get("Label") == LABEL
    except (OSError, ValueError, plistlib.InvalidFileException):
        return False


def _run_all(commands: Sequence[Command], path: Path) -> None:
    for c in commands:
        try:
            r = run_quiet(c)
        except CommandNotFound as e:
            raise UserError(f"{e}; the service file is at {path}.") from None
        except subprocess.TimeoutExpired:
            raise UserError(f"`{c.display()}` did not finish in {c.timeout:.0f} s; "
                            f"check `earthkamal-agent service status`.") from None
        if r.returncode != 0:
            lines = (r.stderr or r.stdout or b"").decode("utf-8", "replace").strip().splitlines()
            last = lines[-1] if lines else f"exit code {r.returncode}"
            raise UserError(f"`{c.display()}` failed: {last} (the service file is at {path}).")


def _loaded_launchd() -> bool:
    ok, _ = _probe(status_argv("launchd")[0])
    return ok


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)


# ---------------------------------------------------------------- handlers

def cli_install(args: argparse.Namespace) -> int:
    """``service install [--no-start] [--unit-dir DIR] [--manager systemd|launchd]``."""
    kind, path, talk = _resolve(args, need_manager=True)
    if path.exists() and not _is_ours(kind, path):
        raise UserError(f"{path} exists and was not written by earthkamal-agent; move it away "
                        "and run `earthkamal-agent service install` again.")
    argv = exec_argv()
    env = service_env(argv)
    if kind == "systemd":
        data = render_unit(argv, env).encode("utf-8")
    else:
        log_dir = default_log_dir()
        log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = render_plist(argv, env, log_dir)
    _write_atomic(path, data)
    print(f"wrote {path}")
    if not talk:
        hint = ("systemctl --user daemon-reload && systemctl --user enable --now " + UNIT_NAME
                if kind == "systemd" else f"launchctl bootstrap gui/{os.getuid()} {path}")
        print(f"not started (--no-start); to start it: {hint}")
        return 0
    loaded = _loaded_launchd() if kind == "launchd" else False
    _run_all(install_argv(kind, path, loaded=loaded), path)
    print(f"started {UNIT_NAME if kind == 'systemd' else LABEL} ({kind})")
    return 0


def cli_uninstall(args: argparse.Namespace) -> int:
    """``service uninstall [--no-start] [--unit-dir DIR] [--manager ...]``: undo install."""
    kind, path, talk = _resolve(args, need_manager=False)
    if not path.exists():
        print(f"nothing to remove: {path} does not exist")
        return 0
    if not _is_ours(kind, path):
        raise UserError(f"{path} was not written by earthkamal-agent; leaving it in place.")
    if talk:
        loaded = _loaded_launchd() if kind == "launchd" else True
        _run_all(uninstall_argv(kind, loaded=loaded), path)
    path.unlink()
    if talk:
        _run_all(reload_argv(kind), path)
    print(f"removed {path}")
    return 0


def _parse_status(kind: Kind, text: str) -> dict[str, str]:
    if kind == "systemd":
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    out: dict[str, str] = {}
    for key in ("state", "pid", "last exit code"):
        m = re.search(rf"^\s*{key} = (.+)$", text, re.MULTILINE)
        if m:
            out[key.replace(" ", "_")] = m.group(1).strip()
    return out


def cli_status(args: argparse.Namespace) -> int:
    """``service status [--json] [--unit-dir DIR]``: 0 when the service runs, else 3."""
    kind, path, talk = _resolve(args, need_manager=False)
    info: dict[str, object] = {"manager": kind if talk else None, "file": str(path),
                               "installed": path.exists() and _is_ours(kind, path)}
    running = False
    if talk:
        try:
            out = run_quiet(status_argv(kind)[0]).stdout.decode("utf-8", "replace")
        except (CommandNotFound, subprocess.TimeoutExpired, OSError):
            out = ""
        fields = _parse_status(kind, out)
        info["service"] = fields
        running = (fields.get("ActiveState") == "active" if kind == "systemd"
                   else fields.get("state") == "running")
    else:
        info["reason"] = "" if _quiet(args) else detect_manager()[1]
    info["running"] = running
    if getattr(args, "json", False):
        print(json.dumps(info, indent=2))
    else:
        print(f"file: {path} ({'installed' if info['installed'] else 'not installed'})")
        if talk:
            f = info["service"]
            assert isinstance(f, dict)
            state = (f"{f.get('ActiveState', '?')} ({f.get('SubState', '?')})"
                     + (f", {f['StatusText']}" if f.get("StatusText") else "")
                     if kind == "systemd" else f.get("state", "not loaded"))
            print(f"{kind}: {state}")
        else:
            why = info.get("reason") or "not asked: --no-start or --unit-dir"
            print(f"manager: none ({why})")
    return 0 if running else 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``install|uninstall|status`` with their flags; each sets ``args.handler``."""
    sub = parser.add_subparsers(dest="service_action", required=True, metavar="ACTION")
    for name, handler, text in (
        ("install", cli_install, "write the user unit / launchd agent and start it"),
        ("uninstall", cli_uninstall, "stop the service and remove what install wrote"),
        ("status", cli_status, "show whether the service is installed and running"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--no-start", action="store_true",
                       help="only write/remove the file; do not call systemctl/launchctl")
        p.add_argument("--unit-dir", metavar="DIR", default=None,
                       help="folder for the unit file (implies --no-start)")
        p.add_argument("--manager", choices=KINDS, default=None,
                       help="systemd or launchd (default: what this machine runs)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(handler=handler)
