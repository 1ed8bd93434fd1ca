"""The whole chain, every component real except the kamal-proxy image:

git tag → hook → agent → BuildKit build → push to a password registry → notification shown
by dunst on a real D-Bus session → its Deploy action → real Kamal 2.11 over real SSH → the app
answers with the new version. Then v1.0.1 the same way, then `rollback`. Secrets come from
gnome-keyring and must appear in no log, job record, argv or file the agent wrote.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import git, wait_for
from tests.infra import need
from tests.infra.apps import remove_deployed
from tests.pipeline_env import setup_app, tag

pytestmark = pytest.mark.slow

SERVICE = "ekchain"
APP_SECRET = "app-secret-9f3c1e77d2"


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.read().decode()
    except OSError:
        return None


def _server_side(pid: str) -> bool:
    """True for processes under sshd: Kamal's commands on the "server", which here is this
    machine (Kamal itself runs `docker login -p` there, which is the server's business)."""
    seen = 0
    while pid not in ("0", "1") and seen < 64:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            return False
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if comm == "sshd":
            return True
        pid = stat[stat.rindex(")") + 2:].split()[1]
        seen += 1
    return False


class CmdlineSampler(threading.Thread):
    """Reads every process's /proc/PID/cmdline while the chain runs (secret-on-argv check),
    except the server side's."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: set[bytes] = set()
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            line = f.read()
                        if line not in self.seen and not _server_side(pid):
                            self.seen.add(line)
                    except OSError:
                        pass
            time.sleep(0.05)


def _files_under(*roots: Path):
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                try:
                    yield p, p.read_bytes()
                except OSError:
                    pass


@pytest.fixture
def chain(tmp_path, docker_engine, base_image, kamal_proxy_image, registry, ssh_host, desktop,
          desktop_keyring):
    need("kamal", shutil.which("kamal") is not None, "`kamal` not on PATH")
    remove_deployed(docker_engine, SERVICE)
    e = setup_app(tmp_path, docker_engine, registry, desktop_keyring, service=SERVICE,
                  ssh=ssh_host, extra_env={**desktop.env, **desktop_keyring.env,
                                           "DBUS_SESSION_BUS_ADDRESS": desktop.bus_address},
                  user_extra={"approvals": "dbus"})
    e.cli("secrets", "set", "APP_SECRET", "--repo", str(e.app_root), input=APP_SECRET.encode())
    yield e
    e.stop()
    remove_deployed(docker_engine, SERVICE)


def _deploy_by_click(e, desktop, tagname: str, text: str) -> dict:
    job = e.wait_state(tagname, "awaiting_approval", "failed", timeout=180)
    assert job["state"] == "awaiting_approval", job
    summary = f"Deploy {SERVICE} {tagname} to the default destination?"
    desktop.wait_shown(summary, timeout=30)
    desktop.click("approve")
    job = e.wait_state(tagname, "deployed", "failed", timeout=180)
    assert job["state"] == "deployed", job
    seen = []

    def serves() -> bool:
        seen.append(_get(e.app.url("/version")))
        return seen[-1] == text + "\n"

    try:
        wait_for(serves, timeout=30, what=f"the app to serve {text}")
    except AssertionError:
        raise AssertionError(f"app served {seen[-3:]}, not {text!r}") from None
    return job


def test_tag_to_deployed_and_rollback(chain, desktop, registry, docker_engine, tmp_path):
    e = chain
    sampler = CmdlineSampler()
    sampler.start()
    e.agent()
    try:
        tag(e, "v1.0.0", "release-one")
        j1 = _deploy_by_click(e, desktop, "v1.0.0", "release-one")
        assert _get(e.app.url("/secret-set")) == "set\n"
        tag(e, "v1.0.1", "release-two")
        j2 = _deploy_by_click(e, desktop, "v1.0.1", "release-two")
        assert j2["digest"] != j1["digest"]
        out = e.cli("rollback", "--repo", str(e.app_root)).stdout.decode()
        assert "v1.0.0" in out and "waiting for approval" in out
        e.wait_state("v1.0.0", "awaiting_approval")
        e.cli("approve", str(j1["id"]))
        e.wait_state("v1.0.0", "deployed", "failed", timeout=180)
        assert e.job("v1.0.0")["state"] == "deployed"
        wait_for(lambda: _get(e.app.url("/version")) == "release-one\n", timeout=30)
    finally:
        sampler.halt.set()
        sampler.join()
    e.stop()
    secrets = [registry.password.encode(), APP_SECRET.encode()]
    for cmdline in sampler.seen:
        for s in secrets:
            assert s not in cmdline, f"secret on a command line: {cmdline[:200]!r}"
    scan_roots = [e.home, e.app_root, Path("/dev/shm")]
    for path, data in _files_under(*scan_roots):
        if path.name == "hook.log":
            continue
        for s in secrets:
            assert s not in data, f"secret found in {path}"
    assert registry.password not in e.agents[0].stderr()


def test_tag_moved_after_approval_is_not_deployed(chain, desktop, docker_engine):
    e = chain
    tag(e, "v2.0.0", "two")
    e.cli("run", "--once")
    job = e.job("v2.0.0")
    assert job["state"] == "awaiting_approval", job
    e.cli("approve", str(job["id"]))
    # the tag moves before the agent gets to deploy: the approval does not carry over
    (e.app_root / "version.txt").write_text("sneaky\n")
    git(e.app_root, "commit", "-qam", "sneaky")
    git(e.app_root, "tag", "-f", "v2.0.0")
    e.cli("run", "--once", "--hold")
    states = sorted((j["id"], j["state"]) for j in e.jobs() if j["tag"] == "v2.0.0")
    assert states[0][1] == "superseded"
    assert _get(e.app.url("/version")) != "sneaky\n"
