"""Registering a repo: find where git runs its hooks, install ours, chain what was there.

The hook file is ours when it carries the marker line. An existing hook is renamed to
``<hook>.earthkamal-chained`` and run by ours with the same arguments and stdin; uninstall
puts it back byte for byte.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import gitcli
from .errors import UserError
from .paths import Paths, data_path

MARKER = "# earthkamal-agent-hook v1"
CHAINED_SUFFIX = ".earthkamal-chained"
MIN_GIT = (2, 28)


@dataclass(frozen=True)
class Location:
    """Where a repo keeps its git data and runs its hooks."""

    common_dir: str
    worktree: str | None
    bare: bool
    hooks_dir: str
    hooks_path_config: str | None   # core.hooksPath as configured, if any
    hooks_path_inside: bool         # that dir lies inside the repo (husky's .husky/_)

    @property
    def hook_name(self) -> str:
        return "post-receive" if self.bare else "reference-transaction"


def _sh_quote_inner(s: str) -> str:
    """Text for inside a single-quoted sh string."""
    return s.replace("'", "'\\''")


def render(hook_name: str, spool: Path, common_dir: str, chained: str) -> str:
    """The hook script with absolute paths baked in."""
    text = data_path("hooks", hook_name).read_text()
    return (text.replace("@SPOOL@", _sh_quote_inner(str(spool)))
            .replace("@REPO@", _sh_quote_inner(common_dir))
            .replace("@CHAINED@", _sh_quote_inner(chained)))


def locate(path: str | os.PathLike) -> Location:
    """Resolve a path to its repo, or raise UserError with what is wrong."""
    p = Path(path).expanduser().absolute()
    if not p.exists():
        raise UserError(f"{p} does not exist; pass the path of a git repository.")
    version = gitcli.version()
    if version < MIN_GIT:
        raise UserError(
            f"git {'.'.join(map(str, version))} is too old: the agent needs the "
            "reference-transaction hook of git 2.28 or newer; upgrade git."
        )
    info = gitcli.rev_parse(p, "--git-common-dir", "--is-bare-repository")
    if info is None or len(info) < 2:
        raise UserError(f"{p} is not a git repository; run `git init` there or pass another path.")
    common, bare_s = info[0], info[1]
    bare = bare_s == "true"
    common_dir = str(Path(p, common).resolve()) if not os.path.isabs(common) else str(
        Path(common).resolve())
    top = None if bare else gitcli.rev_parse(p, "--show-toplevel")
    worktree = top[0] if top else None
    # A bare "deploy remote" may be empty until the first push; a working repo may not.
    if not bare and not gitcli.has_commits(p):
        raise UserError(
            f"{p} has no commits yet; commit something first so tags have a commit to point at."
        )
    configured = gitcli.config_get(p, "core.hooksPath")
    hooks = gitcli.git_path(p, "hooks")
    hooks_dir = str(Path(p, hooks).resolve()) if not os.path.isabs(hooks) else hooks
    inside = False
    if configured:
        roots = [common_dir] + ([str(Path(worktree).resolve())] if worktree else [])
        inside = any(Path(hooks_dir).resolve().is_relative_to(r) for r in roots)
    return Location(common_dir, worktree, bare, hooks_dir, configured, inside)


@dataclass(frozen=True)
class Installed:
    hook_path: str
    chained_path: str | None
    changed: bool


def install_hook(paths: Paths, loc: Location, allow_shared: bool = False) -> Installed:
    """Write our hook into the repo's hooks dir, chaining an existing one."""
    if loc.hooks_path_config and not loc.hooks_path_inside and not allow_shared:
        raise UserError(
            f"core.hooksPath points outside this repo ({loc.hooks_dir}), a hooks dir shared "
            "with other repos; installing there would affect all of them. Pass "
            "--shared-hooks-path to install there anyway, or unset core.hooksPath for this repo."
        )
    hooks_dir = Path(loc.hooks_dir)
    hooks_dir.mkdir(parents=True, exist_ok=True)
    hook = hooks_dir / loc.hook_name
    chained = hooks_dir / (loc.hook_name + CHAINED_SUFFIX)
    if hook.exists() or hook.is_symlink():
        if not is_ours(hook):
            if chained.exists() or chained.is_symlink():
                raise UserError(
                    f"{chained} already exists beside a foreign {hook.name} hook; move one of "
                    "them away and run install again."
                )
            os.rename(hook, chained)
    want = render(loc.hook_name, paths.spool, loc.common_dir, str(chained))
    if hook.exists() and hook.read_text(errors="replace") == want:
        return Installed(str(hook), str(chained) if chained.exists() else None, False)
    tmp = hook.with_name(f".{hook.name}.earthkamal-tmp")
    tmp.write_text(want)
    tmp.chmod(0o755)
    os.rename(tmp, hook)
    return Installed(str(hook), str(chained) if (chained.exists() or chained.is_symlink())
                     else None, True)


def is_ours(hook: Path) -> bool:
    try:
        with open(hook, "rb") as f:
            return MARKER.encode() in f.read(4096)
    except OSError:
        return False


def uninstall_hook(hook_path: str) -> bool:
    """Remove our hook and put a chained one back. True when something changed."""
    hook = Path(hook_path)
    chained = hook.with_name(hook.name + CHAINED_SUFFIX)
    changed = False
    if hook.exists() and is_ours(hook):
        hook.unlink()
        changed = True
    if (chained.exists() or chained.is_symlink()) and not hook.exists():
        os.rename(chained, hook)
        changed = True
    return changed


CONFIG_HOOKS_GIT = (2, 54)
CONFIG_HOOK_NAME = "earthkamal"


def config_hook_commands(cwd: str, script: str, hook_name: str) -> list:
    """git >= 2.54 config hooks: run ours in addition to any hook file, whatever hooksPath."""
    return [gitcli.git(cwd, "config", "--local", f"hook.{CONFIG_HOOK_NAME}.command", script),
            gitcli.git(cwd, "config", "--local", f"hook.{CONFIG_HOOK_NAME}.event", hook_name)]


def config_unhook_commands(cwd: str) -> list:
    return [gitcli.git(cwd, "config", "--local", "--remove-section",
                       f"hook.{CONFIG_HOOK_NAME}")]


def install_config_hook(paths: Paths, loc: Location) -> Installed:
    """Write the hook script into the agent's own dir and register it as a config hook."""
    from .runner import run_quiet

    if gitcli.version() < CONFIG_HOOKS_GIT:
        raise UserError(
            f"config hooks need git 2.54 or newer (this is git "
            f"{'.'.join(map(str, gitcli.version()))}); install without --config-hook."
        )
    d = paths.home / "hooks" / re.sub(r"[^A-Za-z0-9_.-]", "_", loc.common_dir.strip("/"))
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    script = d / loc.hook_name
    script.write_text(render(loc.hook_name, paths.spool, loc.common_dir, "/nonexistent"))
    script.chmod(0o755)
    for c in config_hook_commands(loc.common_dir, str(script), loc.hook_name):
        res = run_quiet(c)
        if res.returncode != 0:
            raise UserError(f"git config failed: {res.stderr.decode().strip()}")
    return Installed(str(script), None, True)


def repo_name(loc: Location) -> str:
    """A short display name: the worktree dir, or the bare dir without .git."""
    base = Path(loc.worktree) if loc.worktree else Path(loc.common_dir)
    name = base.name
    return name[:-4] if name.endswith(".git") else name
