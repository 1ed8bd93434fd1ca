"""The trigger path with real git, the real hook, inotify and a real agent process."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

from tests.helpers import AgentProcess, cli, commit, git, jobs, make_repo, status, wait_for


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def repo(tmp_path: Path, home: Path) -> Path:
    r = make_repo(tmp_path / "app")
    cli(home, "install", str(r))
    return r


@pytest.fixture
def agent(home: Path, repo: Path):
    a = AgentProcess(home, "--hold").start()
    yield a
    a.stop()


def by_tag(home: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for j in jobs(home):
        out.setdefault(j["tag"], []).append(j)
    return out


def test_lightweight_and_annotated_tags_become_jobs(home, repo, agent):
    head = git(repo, "rev-parse", "HEAD").stdout.decode().strip()
    git(repo, "tag", "v1.0.0")
    git(repo, "tag", "-a", "v1.0.1", "-m", "annotated")
    wait_for(lambda: len(jobs(home)) == 2, what="two jobs")
    js = by_tag(home)
    assert js["v1.0.0"][0]["commit"] == head
    assert js["v1.0.1"][0]["commit"] == head  # the tag object peeled to the commit
    assert js["v1.0.1"][0]["state"] == "detected"
    st = status(home)
    assert st["agent"]["running"] and st["agent"]["pid"] == agent.proc.pid


def test_fifty_tags_while_stopped_all_once(home, repo):
    for i in range(50):
        git(repo, "tag", f"v2.0.{i}")
    assert len(list((home / "spool").glob("*.ev"))) == 50
    a = AgentProcess(home, "--hold").start()
    try:
        wait_for(lambda: len(jobs(home)) == 50, what="50 jobs")
        js = by_tag(home)
        assert sorted(js) == sorted(f"v2.0.{i}" for i in range(50))
        assert all(len(v) == 1 for v in js.values())
        wait_for(lambda: not list((home / "spool").glob("*.ev")), what="spool drained")
    finally:
        a.stop()


def test_pack_refs_and_gc_make_no_jobs(home, repo, agent):
    git(repo, "tag", "v3.0.0")
    wait_for(lambda: len(jobs(home)) == 1)
    git(repo, "pack-refs", "--all")
    git(repo, "gc", "-q")
    git(repo, "tag", "v3.0.1")  # a marker: once it shows up, earlier noise was processed
    wait_for(lambda: len(jobs(home)) == 2)
    assert sorted(j["tag"] for j in jobs(home)) == ["v3.0.0", "v3.0.1"]


def test_tag_delete_cancels_and_force_supersedes(home, repo, agent):
    git(repo, "tag", "v4.0.0")
    git(repo, "tag", "v4.1.0")
    wait_for(lambda: len(jobs(home)) == 2)
    git(repo, "tag", "-d", "v4.0.0")
    wait_for(lambda: by_tag(home)["v4.0.0"][0]["state"] == "canceled", what="canceled")
    commit(repo, {"f": "2"})
    git(repo, "tag", "-f", "v4.1.0")
    wait_for(lambda: len(by_tag(home)["v4.1.0"]) == 2, what="second job for moved tag")
    old, new = sorted(by_tag(home)["v4.1.0"], key=lambda j: j["id"])
    assert old["state"] == "superseded" and new["state"] == "detected"
    assert old["commit"] != new["commit"]


def test_existing_tags_are_baseline_and_never_built(tmp_path, home):
    r = make_repo(tmp_path / "old")
    git(r, "tag", "v0.9.0")
    cli(home, "install", str(r))
    cli(home, "run", "--once", "--hold")
    assert jobs(home) == []


def test_tags_outside_policy_are_ignored_and_visible(home, repo, agent):
    git(repo, "tag", "nightly-1")
    wait_for(lambda: jobs(home))
    j = jobs(home)[0]
    assert j["state"] == "ignored" and "v*" in j["reason"]


def test_invalid_config_fails_job_with_sentence(home, repo, agent):
    commit(repo, {".earthkamal.yml": "tags: 5\n"})
    git(repo, "tag", "v5.0.0")
    wait_for(lambda: jobs(home))
    j = jobs(home)[0]
    assert j["state"] == "failed"
    assert j["reason"] == (".earthkamal.yml at v5.0.0: `tags` must be a list of strings, "
                           "got a number.")


CHAIN_HOOK = """#!/bin/sh
echo "$1" >> "{log}"
cat >> "{log}"
"""


def test_existing_hook_keeps_receiving_same_lines(tmp_path, home):
    r = make_repo(tmp_path / "chained")
    log = tmp_path / "hook.log"
    hook = r / ".git/hooks/reference-transaction"
    hook.write_text(CHAIN_HOOK.format(log=log))
    hook.chmod(0o755)
    original = hook.read_bytes()

    git(r, "tag", "t-before")
    before = log.read_text()
    log.unlink()
    cli(home, "install", str(r))
    git(r, "tag", "t-during")
    during = log.read_text()
    log.unlink()
    cli(home, "uninstall", str(r))
    assert hook.read_bytes() == original
    git(r, "tag", "t-after")
    after = log.read_text()
    norm = [s.replace("t-before", "X").replace("t-during", "X").replace("t-after", "X")
            for s in (before, during, after)]
    assert norm[0] == norm[1] == norm[2]
    assert "prepared" in before and "committed" in before
    assert list((home / "spool").glob("*.ev"))  # and ours saw the tag


def test_chained_hook_can_still_abort_a_transaction(tmp_path, home):
    r = make_repo(tmp_path / "veto")
    hook = r / ".git/hooks/reference-transaction"
    hook.write_text('#!/bin/sh\n[ "$1" = prepared ] && exit 1\nexit 0\n')
    hook.chmod(0o755)
    cli(home, "install", str(r))
    res = git(r, "tag", "v6.0.0", check=False)
    assert res.returncode != 0  # the user's own hook still decides, as before


def test_install_twice_is_noop_and_uninstall_restores(tmp_path, home):
    r = make_repo(tmp_path / "twice")
    first = cli(home, "install", str(r)).stdout.decode()
    hook = (r / ".git/hooks/reference-transaction").read_bytes()
    second = cli(home, "install", str(r)).stdout.decode()
    assert "Registered" in first and "nothing to do" in second
    assert (r / ".git/hooks/reference-transaction").read_bytes() == hook
    cli(home, "uninstall", str(r))
    assert not (r / ".git/hooks/reference-transaction").exists()
    assert status(home)["repos"] == []


def test_husky_hooks_path_inside_repo(tmp_path, home):
    r = make_repo(tmp_path / "husky")
    (r / ".husky/_").mkdir(parents=True)
    git(r, "config", "core.hooksPath", ".husky/_")
    cli(home, "install", str(r))
    assert (r / ".husky/_/reference-transaction").exists()
    git(r, "tag", "v7.0.0")
    assert list((home / "spool").glob("*.ev"))


def test_hooks_path_outside_repo_refused(tmp_path, home):
    r = make_repo(tmp_path / "corp")
    shared = tmp_path / "company-hooks"
    shared.mkdir()
    git(r, "config", "core.hooksPath", str(shared))
    res = cli(home, "install", str(r), check=False)
    assert res.returncode == 1
    err = res.stderr.decode()
    assert err.startswith("earthkamal-agent: core.hooksPath points outside this repo")
    assert "Traceback" not in err and not list(shared.iterdir())
    cli(home, "install", str(r), "--shared-hooks-path")
    assert (shared / "reference-transaction").exists()


def test_linked_worktree_is_the_same_repo(tmp_path, home):
    r = make_repo(tmp_path / "main")
    wt = tmp_path / "wt"
    git(r, "worktree", "add", "-q", str(wt))
    cli(home, "install", str(wt))
    assert "nothing to do" in cli(home, "install", str(r)).stdout.decode()
    git(wt, "tag", "v8.0.0")
    cli(home, "run", "--once", "--hold")
    assert [j["tag"] for j in jobs(home)] == ["v8.0.0"]
    assert len(status(home)["repos"]) == 1


def test_push_into_bare_repo_and_fetch_tags(tmp_path, home):
    bare = make_repo(tmp_path / "deploy.git", bare=True)
    src = make_repo(tmp_path / "src")
    cli(home, "install", str(bare))
    assert (bare / "hooks/post-receive").exists()
    git(src, "tag", "v9.0.0")
    git(src, "push", "-q", str(bare), "main", "v9.0.0")
    # fetch --tags into another registered repo
    other = make_repo(tmp_path / "other")
    cli(home, "install", str(other))
    git(src, "tag", "v9.1.0")
    git(other, "fetch", "-q", "--tags", str(src))
    cli(home, "run", "--once", "--hold")
    got = sorted((j["repo"], j["tag"]) for j in jobs(home))
    assert ("deploy", "v9.0.0") in got
    assert ("other", "v9.1.0") in got and ("other", "v9.0.0") in got


def test_hook_never_blocks_git(tmp_path, home, repo):
    spool = home / "spool"
    spool.chmod(0o500)
    try:
        assert git(repo, "tag", "v10.0.0", check=False).returncode == 0
    finally:
        spool.chmod(0o700)
    hook = repo / ".git/hooks/reference-transaction"
    text = hook.read_text().replace(str(spool), str(tmp_path / "gone/spool"))
    hook.write_text(text)
    assert git(repo, "tag", "v10.0.1", check=False).returncode == 0
    assert git(repo, "tag", "-d", "v10.0.1", check=False).returncode == 0


def test_second_agent_refused(home, repo, agent):
    res = cli(home, "run", check=False)
    assert res.returncode == 1
    assert f"already running (PID {agent.proc.pid})" in res.stderr.decode()
    assert "Traceback" not in res.stderr.decode()


def test_sigkill_after_detection_then_restart(home, repo):
    a = AgentProcess(home, "--hold").start()
    git(repo, "tag", "v11.0.0")
    wait_for(lambda: jobs(home))
    a.stop(signal.SIGKILL)
    assert not status(home)["agent"]["running"]
    b = AgentProcess(home, "--hold").start()
    try:
        git(repo, "tag", "v11.0.1")
        wait_for(lambda: len(jobs(home)) == 2)
        assert sorted(j["tag"] for j in jobs(home)) == ["v11.0.0", "v11.0.1"]
    finally:
        b.stop()


def test_sigterm_stops_cleanly(home, repo):
    a = AgentProcess(home, "--hold").start()
    assert a.stop(signal.SIGTERM) == 0
    assert "stopped" in a.stderr()


def test_tags_made_without_hooks_are_reconciled(home, repo):
    # A libgit2/JGit GUI client never runs hooks: update the ref directly.
    head = git(repo, "rev-parse", "HEAD").stdout.decode().strip()
    (repo / ".git/refs/tags/v12.0.0").write_text(head + "\n")
    cli(home, "run", "--once", "--hold")
    assert [j["tag"] for j in jobs(home)] == ["v12.0.0"]


@pytest.mark.parametrize("content,reason", [
    (b"", "incomplete: empty"),
    (b"earthkamal-spool 1\nrepo /x\n", "incomplete: cut short"),
    (b"earthkam", "incomplete: empty or cut short"),
    (b"\x00\x01\x02binary", "binary content"),
    (b"garbage\n", "bad first line"),
    (b"earthkamal-spool 1\nrepo /not/registered\nhook reference-transaction\nstate committed\n"
     b"0000000000000000000000000000000000000000 " + b"1" * 40 + b" refs/tags/v1\nend\n",
     "unregistered repo"),
    (b"earthkamal-spool 1\nrepo relative\nhook x\nstate committed\nend\n", "not absolute"),
    (b"earthkamal-spool 1\nrepo /x\nhook x\nstate committed\nzz yy refs/tags/v1\nend\n",
     "malformed ref line"),
])
def test_bad_spool_files_are_moved_aside(home, repo, content, reason):
    bad = home / "spool" / "999.0.ev"
    bad.write_bytes(content)
    old = os.stat(bad).st_mtime - 120  # past the grace a hook has to finish writing
    os.utime(bad, (old, old))
    git(repo, "tag", "v13.0.0")
    cli(home, "run", "--once", "--hold")
    assert [j["tag"] for j in jobs(home)] == ["v13.0.0"]  # the good one still went through
    why = (home / "spool-rejected" / "999.0.ev.why").read_text()
    assert reason in why
    assert not bad.exists()


def test_symlinked_spool_file_refused(home, repo, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("earthkamal-spool 1\n")
    (home / "spool" / "1.0.ev").symlink_to(target)
    cli(home, "run", "--once", "--hold")
    assert "symlink" in (home / "spool-rejected" / "1.0.ev.why").read_text()
    assert target.exists()


@pytest.mark.parametrize("setup,sentence", [
    ("missing", "does not exist; pass the path of a git repository."),
    ("plain", "is not a git repository; run `git init` there or pass another path."),
    ("empty", "has no commits yet; commit something first"),
])
def test_install_errors_are_one_sentence(tmp_path, home, setup, sentence):
    p = tmp_path / "x"
    if setup == "plain":
        p.mkdir()
    elif setup == "empty":
        git(tmp_path, "init", "-q", str(p))
    res = cli(home, "install", str(p), check=False)
    assert res.returncode == 1
    err = res.stderr.decode()
    assert sentence in err and "Traceback" not in err and err.count("\n") == 1


def test_state_dir_is_private(home, repo):
    cli(home, "run", "--once", "--hold")
    for d in ("", "spool", "logs", "run", "builds"):
        assert stat.S_IMODE(os.stat(home / d).st_mode) == 0o700, d
    assert stat.S_IMODE(os.stat(home / "jobs.db").st_mode) == 0o600


def test_status_works_with_agent_stopped_and_is_newest_first(home, repo):
    git(repo, "tag", "v14.0.0")
    git(repo, "tag", "v14.0.1")
    cli(home, "run", "--once", "--hold")
    st = status(home)
    assert st["schema"] == 1 and st["agent"]["running"] is False
    assert [j["tag"] for j in st["jobs"]] == ["v14.0.1", "v14.0.0"]
    text = cli(home, "status").stdout.decode()
    assert "agent: not running" in text and "v14.0.1" in text


def test_incomplete_spool_file_waits_for_its_end_line(home, repo):
    head = git(repo, "rev-parse", "HEAD").stdout.decode().strip()
    git(repo, "update-ref", "refs/tags/v15.0.0", head)  # no hook for update-ref? it has one
    for f in (home / "spool").glob("*.ev"):
        f.unlink()
    part = home / "spool" / "77.0.ev"
    text = (f"earthkamal-spool 1\nrepo {repo / '.git'}\nhook reference-transaction\n"
            f"state committed\n{'0' * 40} {head} refs/tags/v15.0.0\n")
    part.write_text(text)  # a hook mid-write: no `end` yet
    cli(home, "run", "--once", "--hold")
    assert part.exists() and not (home / "spool-rejected" / "77.0.ev").exists()
    part.write_text(text + "end\n")
    cli(home, "run", "--once", "--hold")
    assert not part.exists()
    assert [j["tag"] for j in jobs(home)] == ["v15.0.0"]
