"""Secret leak scan after a full pipeline run: tag → build (with a build secret) → push with
the registry password → approve → real `kamal deploy` over real SSH with the key from the
keyring in the agent's private ssh-agent.

Then every place a secret could land is scanned for every secret (raw, and the base64 form
Docker writes into a config.json): job and agent logs, every row of every table in the
database, the spool, snapshot dirs, the agent's stderr, every process's /proc/PID/cmdline
sampled during the run (except processes under sshd: the "server" side), and every file
under the state dir, the agent's HOME/cache, /tmp and /dev/shm (except the server side's own
files: the sshd fixture's dir, which holds the key the test started from and the remote
docker config Kamal logs in with on the "server").
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.infra import need
from tests.infra.apps import remove_deployed
from tests.pipeline_env import setup_app, tag
from tests.test_deploy_chain import CmdlineSampler

SERVICE = "ekleaks"
MAX_READ = 64 << 20


@pytest.fixture
def leak_app(tmp_path, docker_engine, base_image, kamal_proxy_image, registry, ssh_host,
             os_keyring):
    need("kamal", shutil.which("kamal") is not None, "`kamal` not on PATH")
    remove_deployed(docker_engine, SERVICE)
    ssh = {"user": "root", "port": ssh_host.port, "config": str(ssh_host.ssh_config_path)}
    e = setup_app(tmp_path, docker_engine, registry, os_keyring, service=SERVICE, ssh=ssh)
    vals = {
        "APP_SECRET": f"leak-app-{secrets.token_hex(10)}",
        "BUILD_TOKEN": f"leak-build-{secrets.token_hex(10)}",
    }
    for name, value in vals.items():
        e.cli("secrets", "set", name, "--repo", str(e.app_root), input=value.encode())
    key = ssh_host.key_path.read_text()
    e.cli("secrets", "set", "SSH_PRIVATE_KEY", "--repo", str(e.app_root), input=key.encode())
    df = e.app_root / "Dockerfile"
    lines = df.read_text().splitlines()
    lines.insert(1, "RUN --mount=type=secret,id=BUILD_TOKEN test -s /run/secrets/BUILD_TOKEN")
    df.write_text("\n".join(lines) + "\n")
    (e.app_root / ".earthkamal.yml").write_text("dockerfile: {secrets: [BUILD_TOKEN]}\n")
    from tests.helpers import git

    git(e.app_root, "add", "-A")
    git(e.app_root, "commit", "-qm", "build secret")
    e.secret_values = {**vals, "KAMAL_REGISTRY_PASSWORD": registry.password,
                       "SSH_PRIVATE_KEY": key}
    yield e
    e.stop()
    remove_deployed(docker_engine, SERVICE)


def _needles(values: dict[str, str], username: str) -> dict[str, bytes]:
    out = {}
    for name, v in values.items():
        if name == "SSH_PRIVATE_KEY":
            # the key's base64 body lines past the fixed OpenSSH header (the first two lines
            # are the same for every ed25519 key), each distinctive on its own
            body = [ln for ln in v.splitlines() if ln and not ln.startswith("-----")]
            for i, ln in enumerate(body):
                if i >= 2 and len(ln) >= 40:
                    out[f"{name}[{i}]"] = ln.encode()
            continue
        out[name] = v.encode()
    pw = values["KAMAL_REGISTRY_PASSWORD"]
    out["docker auth"] = base64.b64encode(f"{username}:{pw}".encode())
    return out


def _server_side_roots(ssh_host) -> list[Path]:
    return [ssh_host.root.resolve(), ssh_host.key_path.parent.resolve(), Path("/root/.kamal")]


def _files(roots: list[Path], skip: list[Path]):
    seen = set()
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            d = Path(dirpath)
            if any(d == s or s in d.parents for s in skip):
                dirnames[:] = []
                continue
            for f in filenames:
                p = d / f
                if p in seen or p.is_symlink() or not p.is_file():
                    continue
                seen.add(p)
                try:
                    with open(p, "rb") as fh:
                        yield p, fh.read(MAX_READ)
                except OSError:
                    pass


def test_no_secret_anywhere_after_a_full_run(leak_app, registry, ssh_host, tmp_path):
    e = leak_app
    sampler = CmdlineSampler()
    sampler.start()
    try:
        tag(e, "v1.0.0", "leaks-one")
        e.agent()
        job = e.wait_state("v1.0.0", "awaiting_approval", "failed", timeout=180)
        assert job["state"] == "awaiting_approval", job
        e.cli("approve", str(job["id"]))
        job = e.wait_state("v1.0.0", "deployed", "failed", timeout=180)
        assert job["state"] == "deployed", job
        log = (e.home / "logs" / f"job-{job['id']}.log").read_text()
        assert "private ssh-agent started for this deploy" in log
    finally:
        sampler.halt.set()
        sampler.join()
    e.stop()
    needles = _needles(e.secret_values, registry.username)
    places = 0
    leaks: list[str] = []

    def scan(where: str, data: bytes) -> None:
        nonlocal places
        places += 1
        for name, n in needles.items():
            if n in data:
                leaks.append(f"{name} in {where}")

    for cmdline in sampler.seen:
        scan(f"cmdline {cmdline[:120]!r}", cmdline)
    scan("agent stderr", e.agents[0].log.read_bytes())
    db = sqlite3.connect(e.home / "jobs.db")
    for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'"):
        for row in db.execute(f"SELECT * FROM {table}"):  # noqa: S608 - our own table names
            scan(f"db {table} row", repr(row).encode())
    db.close()
    agent_home = Path(e.env.get("HOME") or os.environ["HOME"])
    roots = [e.home, agent_home, Path(e.env.get("XDG_CACHE_HOME", agent_home / ".cache")),
             Path("/tmp"), Path("/dev/shm")]
    # Other tests' own tmp dirs (their harness logs in to the session's registry itself) are not
    # the agent's files; this test's tmp dir, the state dir and everything else are scanned.
    others = [d for d in tmp_path.parent.iterdir() if d != tmp_path and d.is_dir()]
    others += [d for d in tmp_path.parent.parent.iterdir() if d != tmp_path.parent]
    for p, data in _files(roots, _server_side_roots(ssh_host) + others):
        scan(str(p), data)
    print(f"leak scan: {places} places scanned ({len(sampler.seen)} command lines), "
          f"{len(needles)} secret patterns, {len(leaks)} leaks")
    assert places > 100
    assert not leaks, "\n".join(leaks[:20])
