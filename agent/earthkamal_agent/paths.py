"""Where the agent keeps its state, config, logs and build dirs.

Everything lives under one state dir (``EARTHKAMAL_HOME`` overrides it, which is how tests
and several agents on one machine stay apart). Directories are created 0700.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from .errors import UserError

APP = "earthkamal-agent"


@dataclass(frozen=True)
class Paths:
    """The agent's directories and files."""

    home: Path
    config_dir: Path

    @property
    def spool(self) -> Path:
        return self.home / "spool"

    @property
    def rejected(self) -> Path:
        """Spool files that could not be read are moved here with a reason file."""
        return self.home / "spool-rejected"

    @property
    def db(self) -> Path:
        return self.home / "jobs.db"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def builds(self) -> Path:
        return self.home / "builds"

    @property
    def run(self) -> Path:
        """Sockets and the lock: the agent's private runtime files."""
        return self.home / "run"

    @property
    def lock(self) -> Path:
        return self.run / "agent.lock"

    @property
    def agent_log(self) -> Path:
        return self.logs / "agent.log"

    @property
    def user_config(self) -> Path:
        return self.config_dir / "config.yml"

    def ensure(self) -> Paths:
        """Create every directory 0700 and refuse symlinked ones."""
        for d in (self.home, self.spool, self.rejected, self.logs, self.builds, self.run):
            ensure_private_dir(d)
        return self


class UnsafePathError(UserError):
    """A state path is a symlink or not owned by us."""


def ensure_private_dir(path: Path) -> None:
    """Make ``path`` a 0700 directory we own; refuse a symlink in its place."""
    if path.is_symlink():
        raise UnsafePathError(
            f"{path} is a symlink; the agent keeps its state only in a real directory it owns. "
            "Remove the link and run the command again."
        )
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise UnsafePathError(
            f"{path} belongs to another user (uid {st.st_uid}); "
            "set EARTHKAMAL_HOME to a directory of your own."
        )
    if st.st_mode & 0o077:
        path.chmod(0o700)


def default_paths() -> Paths:
    """The paths for this user, honouring EARTHKAMAL_HOME and EARTHKAMAL_CONFIG."""
    home = os.environ.get("EARTHKAMAL_HOME")
    cfg = os.environ.get("EARTHKAMAL_CONFIG")
    home_p = Path(home).absolute() if home else Path(platformdirs.user_state_dir(APP))
    cfg_p = (
        Path(cfg).absolute()
        if cfg
        else (home_p / "config" if home else Path(platformdirs.user_config_dir(APP)))
    )
    return Paths(home=home_p, config_dir=cfg_p)


def data_path(*parts: str) -> Path:
    """A template shipped with the package (hooks/, systemd/, launchd/).

    In a wheel they live in ``earthkamal_agent/data``; in a source checkout (editable install)
    they are the top-level folders of the project.
    """
    here = Path(__file__).resolve().parent
    packaged = here.joinpath("data", *parts)
    if packaged.exists():
        return packaged
    return here.parent.parent.joinpath(*parts)
