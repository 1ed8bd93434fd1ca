"""More of the whole chain, every component real except the kamal-proxy image (issue 4).

Each test tags a sample app in a registered repo and lets a real agent build (BuildKit), push
(password registry, or Kamal's local registry on localhost:5555), ask for approval (dunst on a
private D-Bus session, or the CLI) and run the real `kamal deploy --skip-push` over real SSH:

- Kamal's local registry: the server is a network namespace with its own dockerd that can only
  pull through Kamal's SSH reverse tunnel;
- approved = deployed: a registry tag re-pushed after the approval is not deployed;
- supersede, approval_timeout expiry, retry of an expired job;
- `approval: auto` for a destination;
- reject on the desktop; a dismissed notification is not an approval;
- the CLI's one-sentence refusals, cancel, `deploy TAG` of a tag from the install baseline;
- secrets: a missing app secret; an SSH key held only by the agent's private ssh-agent;
- Kamal's deploy lock, retry after release; deployed / failed notifications.

Every service name is this module's own (``ekmore-*``); each app routes through the shared
kamal-proxy by its own ``proxy.host`` so other apps on the engine do not get in the way.

The agents here run with a private ``/dev/shm`` (a mount namespace with its own tmpfs): every
agent that starts deletes *all* ``/dev/shm/earthkamal-<uid>-job*`` scratch dirs, including
those of other agents' jobs in flight (their temporary DOCKER_CONFIG), so agents of other test
runs on the machine would make these tests fail at random, and ours theirs.
``test_agent_start_keeps_other_agents_scratch`` shows that bug on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import AgentProcess, git, make_repo, wait_for
from tests.infra import need, need_bin
from tests.infra.apps import SampleApp, remove_deployed, write_sample_app
from tests.pipeline_env import STANDIN, Env, tag, user_config

pytestmark = pytest.mark.slow

KAMAL_STATE = Path("/root/.kamal")  # Kamal's host-side state on the "servers" (this machine)


# -- helpers -----------------------------------------------------------------------------------

# argv prefix: the rest runs with a /dev/shm of its own (same pid, so signals reach the agent)
PRIVATE_SHM = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs -o mode=1777 ekmore-shm /dev/shm && exec "$@"', "sh"]


class IsolatedAgent(AgentProcess):
    """`earthkamal-agent run` with a private /dev/shm."""

    def start(self, wait_ready: bool = True) -> IsolatedAgent:
        self.home.mkdir(parents=True, exist_ok=True)
        self._err = open(self.log, "ab")
        offset = self.log.stat().st_size
        self.proc = subprocess.Popen([*PRIVATE_SHM, sys.executable, "-m", "earthkamal_agent",
                                      "run", *self.args], env=self.env, stdout=self._err,
                                     stderr=self._err)
        if wait_ready:
            wait_for(lambda: self.proc.poll() is not None or b"running (PID" in
                     self.log.read_bytes()[offset:], timeout=30, what="agent start")
            assert self.proc.poll() is None, self.log.read_text()
        return self


def _agent(e: Env) -> IsolatedAgent:
    a = IsolatedAgent(e.home, env=e.env)
    e.agents.append(a)
    return a.start()


def _run_once(e: Env) -> None:
    """`earthkamal-agent run --once` (private /dev/shm), checked."""
    env = {**os.environ, "EARTHKAMAL_HOME": str(e.home), **e.env}
    r = subprocess.run([*PRIVATE_SHM, sys.executable, "-m", "earthkamal_agent", "run", "--once"],
                       env=env, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")


def _get(url: str, host: str, timeout: float = 3) -> str | None:
    req = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


def _one_sentence_error(res: subprocess.CompletedProcess) -> str:
    """The CLI refused: exit 1, one line `earthkamal-agent: ...` on stderr, no traceback."""
    err = res.stderr.decode()
    assert res.returncode == 1, (res.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("earthkamal-agent: "), err
    assert "Traceback" not in err
    return lines[0]


def _job_log(e: Env, job: dict) -> str:
    p = e.home / "logs" / f"job-{job['id']}.log"
    return p.read_text(errors="replace") if p.exists() else ""


def _deployed_containers(engine, service: str) -> list[str]:
    return engine.run("ps", "-a", "--filter", f"label=service={service}", "--format",
                      "{{.Names}}", check=False).stdout.split()


def _clear_kamal_locks(service: str) -> None:
    """A lock left by an interrupted earlier run of this module (our service names only)."""
    if KAMAL_STATE.is_dir():
        for p in KAMAL_STATE.glob(f"lock-{service}*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in KAMAL_STATE.glob(f"{service}*-audit.log"):
            p.unlink(missing_ok=True)


class Chain:
    """Builds test apps; stops their agents and removes their deploys afterwards."""

    def __init__(self, tmp_path, docker_engine, registry, desktop, keyring):
        self.tmp_path = tmp_path
        self.engine = docker_engine
        self.registry = registry
        self.desktop = desktop
        self.keyring = keyring
        self.envs: list[Env] = []
        self.cleanups: list = []

    def app(self, service: str, *, ssh, approvals: str = "none", local_registry: bool = False,
            image: str | None = None, files: dict[str, str] | None = None,
            secrets: str | None = None, pre_tags: tuple[str, ...] = (),
            app_secret: str | None = "ekmore-app-secret-51c9",
            engines: tuple = ()) -> Env:
        _clear_kamal_locks(service)
        for eng in (self.engine, *engines):
            remove_deployed(eng, service)
            self.cleanups.append(lambda eng=eng: remove_deployed(eng, service))
        self.cleanups.append(lambda: _clear_kamal_locks(service))
        base = self.tmp_path / service
        home = base / "home"
        env = {**self.engine.env, **self.keyring.env, **self.desktop.env,
               "DBUS_SESSION_BUS_ADDRESS": self.desktop.bus_address,
               "EARTHLY_STANDIN_STATE": str(base / "earthly"),
               "SSH_AUTH_SOCK": str(base / "no-such-agent.sock")}
        env["PATH"] = f"{STANDIN / 'earthly'}:" + os.environ["PATH"]
        user_config(home, self.engine, approvals=approvals)
        root = base / "repo"
        server = "localhost:5555" if local_registry else self.registry.server
        app = write_sample_app(
            root, service=service, image=image or f"ektest/{service}", registry_server=server,
            registry_username=None if local_registry else self.registry.username, ssh=ssh,
            local_registry=local_registry)
        cfg = json.loads(app.deploy_yml.read_text())
        cfg["proxy"]["host"] = f"{service}.test"
        app.deploy_yml.write_text(json.dumps(cfg, indent=2) + "\n")
        if secrets is not None:
            app.secrets_file.write_text(secrets)
        for name, text in (files or {}).items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        make_repo(root, files={})
        for t in pre_tags:
            git(root, "tag", t)
        e = Env(home=home, env=env, registry=self.registry, app_root=root, app=app)
        self.envs.append(e)
        e.cli("install", str(root))
        if not local_registry:
            e.cli("secrets", "set", "KAMAL_REGISTRY_PASSWORD", "--repo", str(root),
                  input=self.registry.password.encode())
        if app_secret:
            e.cli("secrets", "set", "APP_SECRET", "--repo", str(root), input=app_secret.encode())
        return e

    def close(self) -> None:
        for e in self.envs:
            e.stop()
        for fn in reversed(self.cleanups):
            fn()


def _url(e: Env, path: str = "/version") -> str:
    return e.app.url(path)


def _host(e: Env) -> str:
    return f"{e.app.service}.test"


def _serves(e: Env, text: str, timeout: float = 30) -> None:
    seen: list[str | None] = []

    def ok() -> bool:
        seen.append(_get(_url(e), _host(e)))
        return seen[-1] == text + "\n"

    try:
        wait_for(ok, timeout=timeout, interval=0.3, what=f"{e.app.service} to serve {text}")
    except AssertionError:
        raise AssertionError(f"{e.app.service} served {seen[-3:]}, not {text!r}") from None


def _kamal(e: Env, *args: str) -> subprocess.CompletedProcess:
    env = SampleApp.kamal_env(e.registry.password)
    return subprocess.run(e.app.kamal_argv(*args), cwd=e.app_root, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def chain(tmp_path, docker_engine, base_image, kamal_proxy_image, registry, desktop,
          desktop_keyring):
    need("kamal", shutil.which("kamal") is not None, "`kamal` not on PATH")
    c = Chain(tmp_path, docker_engine, registry, desktop, desktop_keyring)
    yield c
    c.close()


# -- 1. Kamal's local registry through the SSH tunnel -----------------------------------------

def test_local_registry_deploy_through_tunnel(chain, local_registry, netns_host):
    service = "ekmore-local"
    e = chain.app(service, ssh=netns_host.ssh, local_registry=True, image=service,
                  secrets="APP_SECRET=$APP_SECRET\n", engines=(netns_host.engine,))
    assert e.app.repository == "localhost:5555/ekmore-local"
    # The server cannot reach the registry except through Kamal's tunnel.
    assert netns_host.http_get("http://127.0.0.1:5555/v2/", timeout=2) is None
    _agent(e)
    tag(e, "v1.0.0", "local-one")
    job = e.wait_state("v1.0.0", "awaiting_approval", "failed", timeout=180)
    assert job["state"] == "awaiting_approval", job
    assert job["image"] == "localhost:5555/ekmore-local:v1.0.0"
    assert "v1.0.0" in local_registry.tags(service)
    assert job["digest"] and job["digest"].startswith("sha256:")
    e.cli("approve", str(job["id"]))
    job = e.wait_state("v1.0.0", "deployed", "failed", timeout=180)
    assert job["state"] == "deployed", f"{job}\n{_job_log(e, job)}"

    def body() -> str | None:
        r = netns_host.run("timeout", "5", "busybox", "wget", "-q", "-O", "-", "--header",
                           f"Host: {_host(e)}", _url(e), timeout=10)
        return r.stdout if r.returncode == 0 else None

    wait_for(lambda: body() == "local-one\n", timeout=20, interval=0.3,
             what="the app to answer in the namespace")
    assert netns_host.engine.image_exists("localhost:5555/ekmore-local:v1.0.0")
    assert "docker login" not in _job_log(e, job)  # local registry: no login anywhere


# -- 2. approved = deployed: the registry tag moved after the approval -------------------------

def test_registry_tag_repushed_after_approval_is_not_deployed(chain, ssh_host, docker_engine,
                                                              registry, tmp_path):
    service = "ekmore-pin"
    e = chain.app(service, ssh=ssh_host)
    tag(e, "v1.0.0", "pinned")
    _run_once(e)
    job = e.job("v1.0.0")
    assert job["state"] == "awaiting_approval", f"{job}\n{_job_log(e, job)}"
    approved_digest = job["digest"]
    e.cli("approve", str(job["id"]))
    # Someone pushes another image to the same <repository>:<version>.
    ref = e.app.image_ref("v1.0.0")
    cfg = Path(tempfile.mkdtemp(prefix="ek-repush-", dir=tmp_path))
    denv = {"DOCKER_CONFIG": str(cfg)}
    docker_engine.run("login", "-u", registry.username, "--password-stdin", registry.server,
                      input=registry.password, env=denv)
    chain.cleanups.append(lambda: docker_engine.run("rmi", ref, check=False))
    docker_engine.run("tag", "earthkamal-test/busybox:latest", ref)
    docker_engine.run("push", ref, env=denv, timeout=120)
    moved = registry.manifest_digest(f"ektest/{service}", "v1.0.0")
    assert moved and moved != approved_digest
    _run_once(e)
    job = e.job("v1.0.0")
    assert job["state"] == "awaiting_approval", f"{job}\n{_job_log(e, job)}"
    reason = job["reason"] or ""
    assert "registry tag" in reason and ref in reason and "deploy refused" in reason, reason
    assert job["digest"] == moved
    assert _deployed_containers(docker_engine, service) == []
    assert "kamal deploy" not in _job_log(e, job).split("verify approval")[-1]


# -- 3. supersede, expiry, retry of an expired job ---------------------------------------------

def test_supersede_withdraws_and_timeout_expires_and_retry_asks_again(chain, ssh_host, desktop):
    service = "ekmore-sup"
    e = chain.app(service, ssh=ssh_host, approvals="dbus",
                  files={".earthkamal.yml": "approval_timeout: 1h\n"})
    _agent(e)
    mark = len(desktop.shown())
    tag(e, "v1.0.0", "sup-one")
    j1 = e.wait_state("v1.0.0", "awaiting_approval", "failed", timeout=180)
    assert j1["state"] == "awaiting_approval", f"{j1}\n{_job_log(e, j1)}"
    n1 = desktop.wait_shown(f"Deploy {service} v1.0.0 to the default destination?",
                            timeout=30, after=mark)
    # the second release times out quickly (the config is read from the tagged commit)
    (e.app_root / ".earthkamal.yml").write_text("approval_timeout: 2s\n")
    tag(e, "v1.0.1", "sup-two")
    j1 = e.wait_state("v1.0.0", "superseded", timeout=180)
    assert "v1.0.1" in (j1["reason"] or ""), j1
    # its notification is withdrawn: dunst closed it (it is in the history, not displayed)
    wait_for(lambda: any(str(h.get("id")) == n1["id"] for h in desktop.history()),
             timeout=10, what="dunst to close the superseded request")
    n2 = desktop.wait_shown(f"Deploy {service} v1.0.1 to the default destination?",
                            timeout=60, after=mark)
    j2 = e.wait_state("v1.0.1", "expired", timeout=60)
    assert "approval_timeout" in (j2["reason"] or ""), j2
    wait_for(lambda: any(str(h.get("id")) == n2["id"] for h in desktop.history()),
             timeout=10, what="dunst to close the expired request")
    # retry asks again (a new notification), with a fresh timeout
    mark2 = len(desktop.shown())
    out = e.cli("retry", str(j2["id"])).stdout.decode()
    assert str(j2["id"]) in out
    desktop.wait_shown(f"Deploy {service} v1.0.1 to the default destination?", timeout=15,
                       after=mark2)
    assert e.job("v1.0.1")["state"] in ("awaiting_approval", "expired")
    assert _deployed_containers(chain.engine, service) == []


# -- 4. approval: auto for a destination --------------------------------------------------------

def test_auto_approval_for_destination_deploys_without_a_click(chain, ssh_host, desktop,
                                                               docker_engine):
    service = "ekmore-auto"
    secrets = "KAMAL_REGISTRY_PASSWORD=$KAMAL_REGISTRY_PASSWORD\nAPP_SECRET=$APP_SECRET\n"
    e = chain.app(service, ssh=ssh_host, approvals="dbus", files={
        ".earthkamal.yml": 'destinations:\n  "v*": production\napproval:\n  production: auto\n',
        "config/deploy.production.yml": json.dumps(
            {"env": {"clear": {"RELEASE_STAGE": "production"}}}) + "\n",
        ".kamal/secrets.production": secrets,
    })
    chain.cleanups.append(lambda: docker_engine.run(
        "exec", "kamal-proxy", "kamal-proxy", "remove", f"{service}-web-production",
        check=False))
    _agent(e)
    mark = len(desktop.shown())
    tag(e, "v1.0.0", "auto-one")
    job = e.wait_state("v1.0.0", "deployed", "failed", "awaiting_approval", timeout=240)
    assert job["state"] == "deployed", f"{job}\n{_job_log(e, job)}"
    assert job["destination"] == "production"
    _serves(e, "auto-one")
    assert f"{service}-web-production-v1.0.0" in _deployed_containers(docker_engine, service)
    desktop.wait_shown(f"Deployed {service} v1.0.0", timeout=15, after=mark)
    asked = [n for n in desktop.shown()[mark:] if n["summary"].startswith("Deploy ")]
    assert asked == [], asked
    assert "$ kamal deploy --skip-push --version=v1.0.0 -d production" in _job_log(e, job)


# -- 5. reject on the desktop; a dismissed notification does not approve -----------------------

def test_reject_from_desktop_and_dismiss_is_not_approval(chain, ssh_host, desktop):
    service = "ekmore-rej"
    e = chain.app(service, ssh=ssh_host, approvals="dbus")
    _agent(e)
    mark = len(desktop.shown())
    tag(e, "v1.0.0", "rej-one")
    j1 = e.wait_state("v1.0.0", "awaiting_approval", "failed", timeout=180)
    assert j1["state"] == "awaiting_approval", f"{j1}\n{_job_log(e, j1)}"
    n1 = desktop.wait_shown(f"Deploy {service} v1.0.0 to the default destination?",
                            timeout=30, after=mark)
    desktop.click("reject", int(n1["id"]))
    j1 = e.wait_state("v1.0.0", "rejected", timeout=30)
    assert "desktop" in (j1["reason"] or ""), j1

    tag(e, "v1.0.1", "rej-two")
    j2 = e.wait_state("v1.0.1", "awaiting_approval", "failed", timeout=180)
    assert j2["state"] == "awaiting_approval", f"{j2}\n{_job_log(e, j2)}"
    n2 = desktop.wait_shown(f"Deploy {service} v1.0.1 to the default destination?",
                            timeout=30, after=mark)
    desktop.close_all()  # the user dismisses it (NotificationClosed, reason 2)
    wait_for(lambda: any(str(h.get("id")) == n2["id"] for h in desktop.history()),
             timeout=10, what="dunst to close the request")
    time.sleep(2)
    j2 = e.job("v1.0.1")
    assert j2["state"] == "awaiting_approval", j2
    assert _deployed_containers(chain.engine, service) == []
    # still answerable from the terminal
    assert "Canceled" in e.cli("cancel", str(j2["id"])).stdout.decode()
    assert e.job("v1.0.1")["state"] == "canceled"


# -- 6. the CLI: refusals, cancel, deploy TAG from the install baseline ------------------------

def test_cli_refusals_cancel_and_deploy_of_baseline_tag(chain, ssh_host, docker_engine):
    service = "ekmore-cli"
    e = chain.app(service, ssh=ssh_host, pre_tags=("v0.9.0",))
    _agent(e)
    # v0.9.0 existed at install: recorded as released, never built by itself
    time.sleep(1.5)
    assert [j for j in e.jobs() if j["tag"] == "v0.9.0"] == []
    line = _one_sentence_error(e.cli("approve", "9999", check=False))
    assert "no job 9999" in line

    out = e.cli("deploy", "v0.9.0", "--repo", str(e.app_root)).stdout.decode()
    assert "Queued v0.9.0" in out, out
    job = e.wait_state("v0.9.0", "awaiting_approval", "failed", timeout=180)
    assert job["state"] == "awaiting_approval", f"{job}\n{_job_log(e, job)}"
    assert "Canceled" in e.cli("cancel", str(job["id"])).stdout.decode()
    assert e.job("v0.9.0")["state"] == "canceled"
    line = _one_sentence_error(e.cli("approve", str(job["id"]), check=False))
    assert "canceled" in line and "not waiting for approval" in line, line
    line = _one_sentence_error(e.cli("cancel", str(job["id"]), check=False))
    assert "cannot be canceled" in line, line
    line = _one_sentence_error(e.cli("reject", str(job["id"]), check=False))
    assert "canceled" in line, line

    # deploy TAG again: the canceled job starts over, then deploys once approved
    out = e.cli("deploy", "v0.9.0", "--repo", str(e.app_root)).stdout.decode()
    assert "queued again" in out, out
    job = e.wait_state("v0.9.0", "awaiting_approval", "failed", timeout=180)
    assert job["state"] == "awaiting_approval", f"{job}\n{_job_log(e, job)}"
    e.cli("approve", str(job["id"]))
    job = e.wait_state("v0.9.0", "deployed", "failed", timeout=180)
    assert job["state"] == "deployed", f"{job}\n{_job_log(e, job)}"
    _serves(e, "v0-initial")
    line = _one_sentence_error(e.cli("approve", str(job["id"]), check=False))
    assert "deployed" in line, line
    line = _one_sentence_error(e.cli("deploy", "v9.9.9", "--repo", str(e.app_root),
                                     check=False))
    assert "no tag v9.9.9" in line, line


# -- 7. secrets: a missing app secret; the SSH key only in the keyring -------------------------

def _ssh_without_keys(ssh_host, tmp_path: Path) -> dict:
    """An ssh: section naming no key at all: only an ssh-agent can authenticate."""
    cfg = tmp_path / "ssh_config_agent_only"
    cfg.write_text(f"Host {ssh_host.host}\n  UserKnownHostsFile {ssh_host.known_hosts}\n"
                   "  StrictHostKeyChecking yes\n")
    return {"user": ssh_host.user, "port": ssh_host.port, "keys_only": False,
            "config": str(cfg)}


def test_missing_app_secret_fails_and_ssh_key_from_keyring_deploys(chain, ssh_host, tmp_path,
                                                                   docker_engine):
    need_bin("ssh-agent", "ssh-add", "pgrep")
    service = "ekmore-sec"
    e = chain.app(service, ssh=_ssh_without_keys(ssh_host, tmp_path), app_secret=None)
    # OpenSSH with that config and no agent cannot log in: the key is nowhere else
    probe = subprocess.run(["ssh", "-F", str(tmp_path / "ssh_config_agent_only"), "-p",
                            str(ssh_host.port), "-o", "BatchMode=yes", "-o",
                            "IdentityAgent=none", f"root@{ssh_host.host}", "true"],
                           capture_output=True, timeout=30)
    assert probe.returncode != 0
    _agent(e)
    tag(e, "v1.0.0", "sec-one")
    job = e.wait_state("v1.0.0", "awaiting_approval", "failed", timeout=180)
    assert job["state"] == "awaiting_approval", f"{job}\n{_job_log(e, job)}"
    e.cli("approve", str(job["id"]))
    job = e.wait_state("v1.0.0", "failed", "deployed", timeout=120)
    assert job["state"] == "failed", job
    reason = job["reason"] or ""
    assert "APP_SECRET" in reason and "earthkamal-agent secrets set APP_SECRET" in reason, reason
    assert _deployed_containers(docker_engine, service) == []

    e.cli("secrets", "set", "APP_SECRET", "--repo", str(e.app_root), input=b"sec-value-77")
    e.cli("secrets", "set", "SSH_PRIVATE_KEY", "--repo", str(e.app_root),
          input=ssh_host.key_path.read_bytes())
    tag(e, "v1.0.1", "sec-two")
    job = e.wait_state("v1.0.1", "awaiting_approval", "failed", timeout=180)
    assert job["state"] == "awaiting_approval", f"{job}\n{_job_log(e, job)}"
    e.cli("approve", str(job["id"]))
    job = e.wait_state("v1.0.1", "deployed", "failed", timeout=180)
    log = _job_log(e, job)
    assert job["state"] == "deployed", f"{job}\n{log}"
    assert "private ssh-agent started" in log
    _serves(e, "sec-two")
    assert _get(_url(e, "/secret-set"), _host(e)) == "set\n"
    sock = e.home / "run" / f"ssh-agent-{job['id']}.sock"
    left = subprocess.run(["pgrep", "-f", f"ssh-agent -D -a {sock}"], capture_output=True,
                          text=True)
    assert left.stdout.strip() == "", f"ssh-agent still running: {left.stdout}"
    assert not sock.exists()
    key_text = ssh_host.key_path.read_text().strip().splitlines()[1]
    assert key_text not in log


# -- 8 + 9. Kamal's deploy lock; deployed / failed notifications --------------------------------

def test_kamal_lock_fails_then_retry_deploys_with_notifications(chain, ssh_host, desktop,
                                                               docker_engine):
    service = "ekmore-lock"
    e = chain.app(service, ssh=ssh_host, approvals="dbus")
    r = _kamal(e, "lock", "acquire", "-m", "test")
    assert r.returncode == 0, r.stdout + r.stderr
    chain.cleanups.append(lambda: _kamal(e, "lock", "release"))
    _agent(e)
    mark = len(desktop.shown())
    tag(e, "v1.0.0", "lock-one")
    job = e.wait_state("v1.0.0", "awaiting_approval", "failed", timeout=180)
    assert job["state"] == "awaiting_approval", f"{job}\n{_job_log(e, job)}"
    e.cli("approve", str(job["id"]))
    job = e.wait_state("v1.0.0", "failed", "deployed", timeout=120)
    assert job["state"] == "failed", job
    reason = job["reason"] or ""
    assert "lock" in reason and f"earthkamal-agent retry {job['id']}" in reason, reason
    failed = wait_for(lambda: [n for n in desktop.shown()[mark:]
                               if n["summary"].startswith(f"{job['repo']} v1.0.0")
                               and "failed" in n["summary"]], timeout=15,
                      what="a failure notification")
    assert "lock" in failed[-1]["body"]
    assert _deployed_containers(docker_engine, service) == []

    r = _kamal(e, "lock", "release")
    assert r.returncode == 0, r.stdout + r.stderr
    out = e.cli("retry", str(job["id"]))
    assert "deploy again" in out.stdout.decode(), out.stdout
    job = e.wait_state("v1.0.0", "deployed", "failed", timeout=180)
    assert job["state"] == "deployed", f"{job}\n{_job_log(e, job)}"
    _serves(e, "lock-one")
    n = desktop.wait_shown(f"Deployed {service} v1.0.0", timeout=15, after=mark)
    assert "default destination" in n["body"]


# -- the scratch-dir bug on its own ------------------------------------------------------------

def test_agent_start_keeps_other_agents_scratch(tmp_path, docker_engine):
    """Another agent's (other EARTHKAMAL_HOME) in-flight scratch dir survives our start.

    Runs inside a private /dev/shm so the bug, if present, harms no real agent.
    """
    need("mount namespace", os.geteuid() == 0 and shutil.which("unshare") is not None,
         "needs root and unshare")
    home = tmp_path / "home"
    user_config(home, docker_engine)
    other = f"/dev/shm/earthkamal-{os.getuid()}-job1-otheragent"
    script = (f"mkdir -p {other}/docker-config && \"$@\"; rc=$?; "
              f"test -d {other}/docker-config || {{ echo WIPED >&2; exit 99; }}; exit $rc")
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f"mount -t tmpfs -o mode=1777 ekmore-shm /dev/shm && {script}", "sh",
            sys.executable, "-m", "earthkamal_agent", "run", "--once"]
    r = subprocess.run(argv, env={**os.environ, "EARTHKAMAL_HOME": str(home)},
                       capture_output=True, timeout=120)
    err = r.stderr.decode(errors="replace")
    assert "WIPED" not in err, ("starting an agent deleted another agent's scratch dir "
                                f"{other}")
    assert r.returncode == 0, err
