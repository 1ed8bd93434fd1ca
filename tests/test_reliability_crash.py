"""Crash injection: SIGKILL the agent at each pipeline point, restart it, check the invariants.

The agent's tools are wrapped by a small sh script (user config ``docker_binary`` /
``kamal_binary``, and first on PATH) that records every call and, when the test has put a
``hold-<tool>-<phase>-<before|after>`` file in the control dir, claims it (``mv``, so only
one process holds), writes ``at-...`` with its PID and waits. The test then knows the agent is
inside that step and SIGKILLs it. Real docker engine, registry and keyring throughout; the
deploy itself is recorded, not performed (``kamal deploy`` calls are counted, which is what
"no double deploy" needs); ``kamal config`` is the real Kamal.

Invariants after every crash and restart: one job per tag, the expected number of deploys,
a re-run build reaches the registry with the digest the job records, an interrupted deploy
waits in ``interrupted`` for a person, no snapshot dir of a finished job, no scratch dir in
/dev/shm, no ssh-agent left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.infra import need_bin
from tests.pipeline_env import setup_app, tag

SERVICE = "ekcrash"

WRAPPER = r"""#!/bin/sh
# reliability-test wrapper for {tool}
ctl='{ctl}'
phase=
skip=
for a in "$@"; do
  if [ -n "$skip" ]; then skip=; continue; fi
  case $a in
    --config|-H|--host|--context|-c|-d) skip=1 ;;
    -*) ;;
    *) phase=$a; break ;;
  esac
done
printf '%s %s\n' "$$" "$*" >> "$ctl/{tool}.calls"
hold() {{
  if mv "$ctl/hold-{tool}-$phase-$1" "$ctl/held-{tool}-$phase-$1-$$" 2>/dev/null; then
    echo $$ > "$ctl/at-{tool}-$phase-$1"
    while [ -e "$ctl/held-{tool}-$phase-$1-$$" ]; do sleep 0.05; done
  fi
}}
hold before
if [ '{tool}' = kamal ] && [ "$phase" = deploy ]; then
  printf '%s\n' "$*" >> "$ctl/deploys"
  echo "  Finished all in 0.1 seconds"
  rc=0
else
  '{real}' "$@"
  rc=$?
fi
hold after
if mv "$ctl/killparent-{tool}-$phase" "$ctl/killed-{tool}-$phase" 2>/dev/null; then
  kill -9 "$PPID"
fi
exit $rc
"""

POINTS = ["after_detection", "during_snapshot", "during_build", "after_push_before_digest",
          "awaiting_approval", "after_approval_recorded", "during_kamal_deploy",
          "after_kamal_exits"]


class Crash:
    def __init__(self, e, ctl: Path) -> None:
        self.e = e
        self.ctl = ctl

    def hold(self, tool: str, phase: str, when: str) -> None:
        (self.ctl / f"hold-{tool}-{phase}-{when}").touch()

    def wait_at(self, tool: str, phase: str, when: str, timeout: float = 120) -> int:
        p = self.ctl / f"at-{tool}-{phase}-{when}"
        wait_for(p.exists, timeout=timeout, interval=0.05, what=f"{tool} {phase} {when}")
        time.sleep(0.1)
        return int(p.read_text().strip() or 0)

    def release_all(self) -> None:
        for p in self.ctl.glob("held-*"):
            p.unlink(missing_ok=True)
        for p in self.ctl.glob("hold-*"):
            p.unlink(missing_ok=True)

    def deploys(self) -> int:
        p = self.ctl / "deploys"
        return len(p.read_text().splitlines()) if p.exists() else 0

    def kill_agent(self) -> None:
        a = self.e.agents[-1]
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=10)

    def restart(self, *args: str):
        return self.e.agent(*args)


def _write_wrappers(ctl: Path, bindir: Path, docker_engine) -> dict[str, str]:
    bindir.mkdir(parents=True)
    real_kamal = shutil.which("kamal")
    out = {}
    for tool, real in (("docker", docker_engine.docker), ("kamal", real_kamal)):
        p = bindir / tool
        p.write_text(WRAPPER.format(tool=tool, ctl=ctl, real=real))
        p.chmod(0o755)
        out[tool] = str(p)
    return out


def _keygen(path: Path) -> bytes:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ek-crash",
                    "-f", str(path)], check=True, capture_output=True)
    key = path.read_bytes()
    path.unlink()
    return key


@pytest.fixture
def crash_env(tmp_path, docker_engine, base_image, registry, os_keyring):
    need_bin("kamal", "ssh-agent", "ssh-add", "ssh-keygen")
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    bindir = tmp_path / "wrapbin"
    wrappers = _write_wrappers(ctl, bindir, docker_engine)
    e = setup_app(tmp_path, docker_engine, registry, os_keyring, service=SERVICE,
                  user_extra={"docker_binary": wrappers["docker"],
                              "kamal_binary": wrappers["kamal"]})
    # `kamal deploy` is run as plain `kamal` (see the bug report), so the wrapper is also
    # first on PATH.
    e.env["PATH"] = f"{bindir}:{e.env['PATH']}"
    e.cli("secrets", "set", "APP_SECRET", "--repo", str(e.app_root), input=b"crash-app-secret")
    e.cli("secrets", "set", "SSH_PRIVATE_KEY", "--repo", str(e.app_root),
          input=_keygen(tmp_path / "deploykey"))
    c = Crash(e, ctl)
    yield c
    c.release_all()
    e.stop()
    _kill_ssh_agents(e.home)
    _kill_recorded(ctl)


def _procs_with(needle: bytes) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read():
                    out.append(int(pid))
        except OSError:
            pass
    return out


def _ssh_agents(home: Path) -> list[int]:
    return _procs_with(f"-a\0{home / 'run'}".encode())


def _kill_ssh_agents(home: Path) -> None:
    for pid in _ssh_agents(home):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_recorded(ctl: Path) -> None:
    for p in ctl.glob("at-*"):
        try:
            os.kill(int(p.read_text().strip()), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _job_rows(e, tagname: str) -> list[dict]:
    return [j for j in e.jobs() if j["tag"] == tagname]


def _invariants(c: Crash, tagname: str, state: str, deploys: int) -> dict:
    e = c.e
    rows = _job_rows(e, tagname)
    assert len(rows) == 1, f"{tagname} has {len(rows)} jobs: {rows}"
    job = rows[0]
    assert job["state"] == state, job
    assert c.deploys() == deploys, f"kamal deploy ran {c.deploys()} times, expected {deploys}"
    if state in ("awaiting_approval", "deployed", "interrupted"):
        assert job["digest"] and job["digest"] == e.registry.manifest_digest(
            f"ektest/{SERVICE}", tagname), job
    e.stop()
    keep = {f"job-{job['id']}"} if state in ("awaiting_approval", "approved",
                                             "interrupted") else set()
    left = {p.name for p in (e.home / "builds").iterdir()}
    assert left <= keep, f"snapshot dirs left behind: {sorted(left - keep)}"
    shm = list(Path("/dev/shm").glob(f"earthkamal-{os.getuid()}-job*"))
    assert not shm, f"scratch dirs left in /dev/shm: {shm}"
    socks = list((e.home / "run").glob("ssh-agent-*.sock"))
    agents = _ssh_agents(e.home)
    assert not agents and not socks, (f"ssh-agent left behind after the crash: pids {agents}, "
                                      f"sockets {socks}")
    return job


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_point_then_restart(crash_env: Crash, point: str):
    c, e = crash_env, crash_env.e
    t = "v1.0.0"
    if point == "after_detection":
        tag(e, t, "crash-detected")  # before the start: see the spool race in the report
        e.agent("--hold")
        e.wait_state(t, "detected")
        c.kill_agent()
        c.restart()
        e.wait_state(t, "awaiting_approval", "failed")
        _invariants(c, t, "awaiting_approval", 0)
        return
    if point in ("during_snapshot", "during_build", "after_push_before_digest"):
        tool, phase, when, state = {
            "during_snapshot": ("kamal", "config", "before", "snapshotting"),
            "during_build": ("docker", "build", "before", "building"),
            "after_push_before_digest": ("docker", "push", "after", "publishing"),
        }[point]
        c.hold(tool, phase, when)
        tag(e, t, f"crash-{point}")
        e.agent()
        c.wait_at(tool, phase, when)
        job = _job_rows(e, t)[0]
        assert job["state"] == state and job["digest"] is None, job
        if point == "during_snapshot":
            assert (e.home / "builds" / f"job-{job['id']}").is_dir()
        c.kill_agent()
        c.restart()
        e.wait_state(t, "awaiting_approval", "failed")
        _invariants(c, t, "awaiting_approval", 0)
        return
    # the deploy side: get to awaiting_approval first
    tag(e, t, f"crash-{point}")
    e.agent()
    job = e.wait_state(t, "awaiting_approval", "failed")
    assert job["state"] == "awaiting_approval", job
    if point == "awaiting_approval":
        c.kill_agent()
        c.restart()
        time.sleep(1)
        assert _job_rows(e, t)[0]["state"] == "awaiting_approval"
        e.cli("approve", str(job["id"]))
        e.wait_state(t, "deployed", "failed")
        _invariants(c, t, "deployed", 1)
    elif point == "after_approval_recorded":
        c.kill_agent()
        e.cli("approve", str(job["id"]))  # recorded while no agent runs
        c.restart()
        e.wait_state(t, "deployed", "failed")
        _invariants(c, t, "deployed", 1)
    elif point == "during_kamal_deploy":
        c.hold("kamal", "deploy", "before")
        e.cli("approve", str(job["id"]))
        c.wait_at("kamal", "deploy", "before")
        assert _job_rows(e, t)[0]["state"] == "deploying"
        c.kill_agent()
        c.restart()
        got = e.wait_state(t, "interrupted")
        assert "agent stopped during `kamal deploy`" in got["reason"], got
        assert f"earthkamal-agent retry {job['id']}" in got["reason"], got
        time.sleep(1)
        _invariants(c, t, "interrupted", 0)  # never re-run on its own
    elif point == "after_kamal_exits":
        (c.ctl / "killparent-kamal-deploy").touch()
        agent = e.agents[-1]
        e.cli("approve", str(job["id"]))
        wait_for(lambda: agent.proc.poll() is not None, timeout=60, what="kamal to kill the agent")
        assert c.deploys() == 1
        assert _job_rows(e, t)[0]["state"] == "deploying"
        c.restart()
        got = e.wait_state(t, "interrupted")
        time.sleep(1)
        assert "agent stopped during `kamal deploy`" in got["reason"], got
        _invariants(c, t, "interrupted", 1)


def test_interrupted_deploy_runs_again_only_when_a_person_retries(crash_env: Crash):
    c, e = crash_env, crash_env.e
    t = "v2.0.0"
    tag(e, t, "retry-after-crash")
    e.agent()
    job = e.wait_state(t, "awaiting_approval", "failed")
    (c.ctl / "killparent-kamal-deploy").touch()
    e.cli("approve", str(job["id"]))
    wait_for(lambda: e.agents[-1].proc.poll() is not None, timeout=60, what="agent killed")
    c.restart()
    e.wait_state(t, "interrupted")
    time.sleep(1.5)
    assert c.deploys() == 1
    out = e.cli("retry", str(job["id"])).stdout.decode()
    assert "will deploy again (same approved image)" in out
    e.wait_state(t, "deployed", "failed")
    assert e.job(t)["state"] == "deployed"
    assert c.deploys() == 2
    assert len(_job_rows(e, t)) == 1


def test_restart_stops_the_killed_agents_build(crash_env: Crash):
    """A SIGKILLed agent cannot stop its children (they run in their own sessions); the next
    agent must, or the old `docker build` goes on beside the re-run."""
    c, e = crash_env, crash_env.e
    t = "v3.0.0"
    c.hold("docker", "build", "before")
    tag(e, t, "orphan-build")
    e.agent()
    orphan = c.wait_at("docker", "build", "before")
    c.kill_agent()
    c.restart()
    e.wait_state(t, "awaiting_approval", "failed")
    time.sleep(1)
    assert not _alive(orphan), (f"the killed agent's build (PID {orphan}) still runs after the "
                                "restart; the new agent neither stopped nor waited for it")


def test_deploy_uses_the_configured_kamal_binary(crash_env: Crash):
    """User config `kamal_binary` must be what runs `kamal deploy`, not whatever is on PATH."""
    c, e = crash_env, crash_env.e
    e.env["PATH"] = e.env["PATH"].split(":", 1)[1]  # the wrapper only via kamal_binary
    t = "v4.0.0"
    tag(e, t, "kamal-binary")
    e.agent()
    job = e.wait_state(t, "awaiting_approval", "failed")
    assert job["state"] == "awaiting_approval", job
    e.cli("approve", str(job["id"]))
    job = e.wait_state(t, "deployed", "failed")
    assert c.deploys() == 1, f"the configured kamal_binary was not used: {job}"
    assert job["state"] == "deployed", job
