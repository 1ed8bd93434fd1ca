"""Load: 200 tags pushed at once and 200 fetched, 10 repos tagged together, and the queue
draining in order with supersede applied. The agent's RSS is sampled the whole time."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import AgentProcess, cli, commit, git, home_without_tools, make_repo, wait_for

RSS_LIMIT_KB = 80 * 1024
N = 200


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.samples.append(int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.05)

    def stop(self) -> int:
        self.halt.set()
        self.join()
        return max(self.samples)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return home_without_tools(tmp_path)


def _many_tags(repo: Path, prefix: str, n: int) -> None:
    head = git(repo, "rev-parse", "HEAD").stdout.decode().strip()
    lines = "".join(f"create refs/tags/{prefix}{i} {head}\n" for i in range(n))
    git(repo, "update-ref", "--stdin", input=lines.encode())


def _count(home: Path) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for j in _all_jobs(home):
        out[(j["repo"], j["tag"])] = out.get((j["repo"], j["tag"]), 0) + 1
    return out


def _all_jobs(home: Path) -> list[dict]:
    db = sqlite3.connect(home / "jobs.db")
    rows = db.execute("SELECT r.name, j.tag, j.id, j.state FROM jobs j JOIN repos r ON "
                      "r.id = j.repo_id ORDER BY j.id").fetchall()
    db.close()
    return [{"repo": r, "tag": t, "id": i, "state": s} for r, t, i, s in rows]


def test_200_pushed_and_200_fetched_all_once_rss_bounded(tmp_path, home):
    bare = make_repo(tmp_path / "deploy.git", bare=True)
    other = make_repo(tmp_path / "other")
    cli(home, "install", str(bare))
    cli(home, "install", str(other))
    src = make_repo(tmp_path / "src")
    _many_tags(src, "v1.0.", N)
    _many_tags(src, "v2.0.", N)
    agent = AgentProcess(home, "--hold").start()
    rss = RssSampler(agent.proc.pid)
    rss.start()
    try:
        git(src, "push", "-q", str(bare), "main", *[f"v1.0.{i}" for i in range(N)])
        git(other, "fetch", "-q", "--tags", str(src))
        wait_for(lambda: len(_all_jobs(home)) >= 3 * N, timeout=120, interval=0.3,
                 what=f"{3 * N} jobs")
        time.sleep(1)
    finally:
        peak = rss.stop()
        agent.stop()
    counts = _count(home)
    want = {("deploy", f"v1.0.{i}") for i in range(N)} | \
        {("other", f"v{m}.0.{i}") for m in (1, 2) for i in range(N)}
    assert set(counts) == want
    assert set(counts.values()) == {1}, [k for k, v in counts.items() if v != 1][:5]
    assert not list((home / "spool").glob("*.ev"))
    assert not list((home / "spool-rejected").iterdir())
    print(f"load: {len(counts)} jobs, agent peak RSS {peak // 1024} MB")
    assert peak < RSS_LIMIT_KB, f"agent RSS peaked at {peak // 1024} MB"


def test_ten_repos_tagged_together(tmp_path, home):
    repos = [make_repo(tmp_path / f"r{i}") for i in range(10)]
    for r in repos:
        cli(home, "install", str(r))
    agent = AgentProcess(home, "--hold").start()
    rss = RssSampler(agent.proc.pid)
    rss.start()
    try:
        go = threading.Barrier(10)

        def tag(r: Path) -> None:
            go.wait()
            git(r, "tag", "v1.0.0")
            git(r, "tag", "-a", "v1.0.1", "-m", "annotated")

        ts = [threading.Thread(target=tag, args=(r,)) for r in repos]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wait_for(lambda: len(_all_jobs(home)) >= 20, timeout=60, what="20 jobs")
        time.sleep(0.5)
    finally:
        peak = rss.stop()
        agent.stop()
    counts = _count(home)
    assert counts == {(f"r{i}", t): 1 for i in range(10) for t in ("v1.0.0", "v1.0.1")}
    assert peak < RSS_LIMIT_KB


DEST_CFG = json.dumps({"tags": ["v*"], "destinations": {"*-rc*": "staging", "*": "production"}})
DEPLOY = json.dumps({"service": "ekload", "image": "ektest/ekload", "servers": ["127.0.0.1"],
                     "registry": {"server": "127.0.0.1:5999"}, "builder": {"arch": "amd64"}})


def test_queue_drains_in_order_with_supersede(tmp_path, home):
    repo = make_repo(tmp_path / "app", {".earthkamal.yml": DEST_CFG, "config/deploy.yml": DEPLOY,
                                        "config/deploy.staging.yml": "{}\n",
                                        "config/deploy.production.yml": "{}\n",
                                        "Dockerfile": "FROM scratch\nLABEL service=ekload\n"})
    cli(home, "install", str(repo))
    order = ["v1.0.0", "v1.1.0-rc1", "v1.1.0-rc2", "v1.1.0", "v1.2.0-rc1"]
    for i, t in enumerate(order):
        commit(repo, {"n": str(i)})
        git(repo, "tag", t)
    cli(home, "run", "--once", "--hold")
    first = _all_jobs(home)
    assert [j["tag"] for j in first] == order  # ids in the order the tags were made
    commit(repo, {"n": "moved"})
    git(repo, "tag", "-f", "v1.1.0")  # the tag moves before anything was built
    cli(home, "run", "--once")  # builder fails fast (docker_binary: false)
    got = _all_jobs(home)
    states = [(j["tag"], j["state"]) for j in got]
    assert states == [
        ("v1.0.0", "superseded"),       # a newer production tag exists
        ("v1.1.0-rc1", "superseded"),   # newer staging tags exist
        ("v1.1.0-rc2", "superseded"),
        ("v1.1.0", "superseded"),       # the tag moved
        ("v1.2.0-rc1", "failed"),       # the newest staging tag was built (and failed)
        ("v1.1.0", "failed"),           # the moved tag's new job was built (and failed)
    ], states
    db = sqlite3.connect(home / "jobs.db")
    for j in got:
        path = [(a, b) for a, b in db.execute(
            "SELECT from_state, to_state FROM transitions WHERE job_id=? ORDER BY id",
            (j["id"],))]
        if j["state"] == "superseded":
            assert path == [(None, "detected"), ("detected", "superseded")], (j, path)
        else:
            assert path[-1] == ("building", "failed") and len(path) == 4, (j, path)
    db.close()
