"""Permissions: private state, refused approvals, foreign spool files, symlinked state paths."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from tests.helpers import cli, git, home_without_tools, jobs, make_repo
from tests.infra import need

APP = {".earthkamal.yml": "tags: ['v*']\n", "README": "x\n"}


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return home_without_tools(tmp_path)


@pytest.fixture
def repo(tmp_path: Path, home: Path) -> Path:
    r = make_repo(tmp_path / "app", APP)
    cli(home, "install", str(r))
    return r


def test_state_dirs_0700_and_files_0600(home, repo):
    os.umask(0o022)
    (home / "spool").chmod(0o755)  # loosened by someone: tightened on start
    git(repo, "tag", "v1.0.0")
    cli(home, "run", "--once")  # the job fails at the resolve step (no deploy.yml): a log
    [j] = jobs(home)
    assert j["state"] == "failed", j
    for d in ("", "spool", "spool-rejected", "logs", "builds", "run"):
        assert _mode(home / d) == 0o700, d
    files = [home / "jobs.db", home / "logs" / "agent.log", home / "logs" / f"job-{j['id']}.log",
             home / "run" / "agent.lock"]
    files += [p for p in home.glob("jobs.db-*")]
    for f in files:
        assert _mode(f) == 0o600, (f, oct(_mode(f)))


def test_approve_refused_when_not_awaiting(home, repo):
    git(repo, "tag", "v1.0.0")
    cli(home, "run", "--once", "--hold")
    res = cli(home, "approve", "1", check=False)
    assert res.returncode == 1
    assert res.stderr.decode() == (
        "earthkamal-agent: job 1 (v1.0.0) is detected, not waiting for approval; only a job in "
        "awaiting_approval can be approved.\n")
    assert jobs(home)[0]["state"] == "detected"


def test_foreign_spool_file_moved_aside_and_logged(home, repo):
    need("chown", os.geteuid() == 0, "chown to nobody needs root")
    nobody = pwd.getpwnam("nobody").pw_uid
    head = git(repo, "rev-parse", "HEAD").stdout.decode().strip()
    git(repo, "update-ref", "refs/tags/v2.0.0", head)
    for f in (home / "spool").glob("*.ev"):
        f.unlink()  # only the forged file remains
    forged = home / "spool" / "666.0.ev"
    forged.write_text(f"earthkamal-spool 1\nrepo {repo / '.git'}\nhook reference-transaction\n"
                      f"state committed\n{'0' * 40} {head} refs/tags/v2.0.0\nend\n")
    os.chown(forged, nobody, nobody)
    # the tag itself is still found by reconcile; the forged file is not what made the job
    cli(home, "run", "--once", "--hold")
    assert not forged.exists()
    why = (home / "spool-rejected" / "666.0.ev.why").read_text()
    assert why == f"owned by another user (uid {nobody}); ignored\n"
    assert "spool file 666.0.ev moved to" in (home / "logs" / "agent.log").read_text()
    assert [(j["tag"], j["origin"]) for j in jobs(home)] == [("v2.0.0", "reconcile")]


@pytest.mark.parametrize("which", ["spool", "logs", "run", "home", "jobs.db"])
def test_symlinked_state_path_refused(tmp_path, home, repo, which):
    cli(home, "run", "--once", "--hold")
    elsewhere = tmp_path / f"elsewhere-{which.replace('.', '-')}"
    target = home if which == "home" else home / which
    if target.is_dir():
        target.rename(elsewhere)
    else:
        target.rename(elsewhere)
    target.symlink_to(elsewhere)
    for args in (["run", "--once", "--hold"],):
        res = cli(home, *args, check=False)
        err = res.stderr.decode()
        assert res.returncode == 1, (args, res.returncode, err)
        assert err.startswith(f"earthkamal-agent: {target} is a symlink"), err
        assert err.count("\n") == 1 and "Traceback" not in err, err
