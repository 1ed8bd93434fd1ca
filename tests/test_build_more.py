"""More build/publish paths for real (issue 3 "Must show"): docker engine, registry, keyring,
the Earthly stand-in (tests/standins/README.md).

Each test tags one or more commits (every commit carries its own .earthkamal.yml, Earthfile,
Dockerfile or deploy.yml, since the agent reads them from the tagged commit) and then runs the
agent once (`run --once`), so one agent start covers several scenarios. Every failure must
end the job in `failed` with its one sentence, and the job log must end with that sentence.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import cli, git, wait_for
from tests.infra import need
from tests.infra.docker import BASE_IMAGE
from tests.infra.registry import free_port
from tests.pipeline_env import Env, setup_app, tag


# -- helpers -----------------------------------------------------------------------------------
def commit_tag(e: Env, name: str, files: dict[str, str] | None = None,
               remove: tuple[str, ...] = (), run: bool = False) -> None:
    """Write ``files`` (relative paths), delete ``remove``, commit everything, tag ``name``;
    with ``run``, then `run --once` (one tag per run: a queued older tag of the same
    destination is superseded by a newer one before it builds)."""
    for rel, text in (files or {}).items():
        p = e.app_root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for rel in remove:
        git(e.app_root, "rm", "-q", "--ignore-unmatch", rel)
    (e.app_root / "version.txt").write_text(f"{name}\n")
    git(e.app_root, "add", "-A")
    git(e.app_root, "commit", "-qm", f"release {name}")
    git(e.app_root, "tag", name)
    if run:
        e.cli("run", "--once")


def job_log(e: Env, job: dict) -> str:
    p = e.home / "logs" / f"job-{job['id']}.log"
    return p.read_text() if p.exists() else ""


def assert_failed(e: Env, tag_name: str, *parts: str) -> tuple[dict, str]:
    """The job failed, its reason contains every part, and its log records the sentence."""
    j = e.job(tag_name)
    log = job_log(e, j)
    assert j["state"] == "failed", f"{j}\n--- log ---\n{log}"
    for part in parts:
        assert part in j["reason"], f"{part!r} not in {j['reason']!r}\n--- log ---\n{log}"
    assert f"FAILED: {j['reason']}" in log, log
    shown = e.cli("logs", str(j["id"])).stdout.decode()
    assert f"FAILED: {j['reason']}" in shown
    return j, log


def assert_published(e: Env, tag_name: str, repo: str) -> tuple[dict, str]:
    j = e.job(tag_name)
    log = job_log(e, j)
    assert j["state"] in ("awaiting_approval", "superseded"), f"{j}\n--- log ---\n{log}"
    assert f"published {j['image']} sha256:" in log, log
    assert tag_name in e.registry.tags(repo)
    return j, log


def argv_lines(log: str) -> list[str]:
    """The commands the job ran: log lines ``[HH:MM:SS ]$ argv``, without the prefix."""
    return [m.group(1) for ln in log.splitlines()
            if (m := re.match(r"^(?:\d\d:\d\d:\d\d )?\$ (.*)$", ln))]


def earthfile(repository: str, service: str | None, *, run: str = "RUN true",
              extra: str = "") -> str:
    label = f"    LABEL service={service}\n" if service else ""
    return ("VERSION 0.8\n\n"
            "docker:\n"
            f"    FROM {BASE_IMAGE}\n"
            f"    {run}\n"
            "    RUN mkdir -p /www && echo ok > /www/up\n"
            "    COPY version.txt /www/version\n"
            f"{label}"
            f"    SAVE IMAGE {repository}:latest\n"
            f"{extra}")


def dockerfile(service: str | None, *, run: str = "RUN true", head: str = "") -> str:
    label = f"LABEL service={service}\n" if service else ""
    return (f"{head}FROM {BASE_IMAGE}\n{run}\nRUN mkdir -p /www && echo ok > /www/up\n"
            f"COPY version.txt /www/version\n{label}")


def history(tmp_path: Path) -> list[tuple[float, float, int, str, int]]:
    p = tmp_path / "earthly" / "history"
    if not p.exists():
        return []
    out = []
    for ln in p.read_text().splitlines():
        s, end, pid, h, code = ln.split()
        out.append((float(s), float(end), int(pid), h, int(code)))
    return out


def deploy_yml(e: Env, **changes) -> str:
    data = json.loads((e.app_root / "config" / "deploy.yml").read_text())
    for k, v in changes.items():
        data[k] = v
    return json.dumps(data, indent=2) + "\n"


def token() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
def apps(tmp_path, docker_engine, base_image, registry, os_keyring):
    """``apps(service, **setup_app kwargs)`` -> Env; all stopped at the end."""
    made: list[Env] = []

    def make(service: str, **kw) -> Env:
        e = setup_app(tmp_path, docker_engine, registry, os_keyring, service=service, **kw)
        made.append(e)
        return e

    yield make
    for e in made:
        e.stop()


# -- Earthly failure paths -------------------------------------------------------------------
def test_earthly_failure_paths_then_inconsistent_graph_retry(apps, tmp_path, registry):
    e = apps("ekefail", earthfile=True)
    repo = "ektest/ekefail"
    full = f"{registry.server}/{repo}"
    commit_tag(e, "v1.0.0", {".earthkamal.yml": "builder: earthly\n"}, remove=("Earthfile",),
               run=True)
    commit_tag(e, "v1.1.0", {".earthkamal.yml": "earthly:\n  target: +image\n",
                             "Earthfile": earthfile(full, "ekefail")}, run=True)
    commit_tag(e, "v1.2.0", {".earthkamal.yml": "builder: earthly\n",
                             "Earthfile": earthfile(full, "ekefail", run="RUN false")}, run=True)
    commit_tag(e, "v1.3.0", {"Earthfile": earthfile(full, None, run=f"RUN echo {token()}")},
               run=True)

    assert_failed(e, "v1.0.0", "the tagged commit has no Earthfile; commit one, or set "
                  "`builder: dockerfile`")
    assert_failed(e, "v1.1.0", "the Earthfile at this commit has no target +image; add it, or "
                  "set `earthly.target`")
    _, log = assert_failed(e, "v1.2.0", "the build failed (Earthly exit 1)")
    assert "RUN false" in log or "did not complete successfully" in log
    j, _ = assert_failed(e, "v1.3.0", "is missing the 'service' label",
                         "LABEL service=ekefail", "add_service_label: true")
    assert j["reason"].startswith("Image ")
    assert not set(registry.tags(repo)) & {"v1.0.0", "v1.1.0", "v1.2.0", "v1.3.0"}

    # "inconsistent graph state" on the shared daemon: retried once, then the job succeeds.
    (tmp_path / "earthly").mkdir(exist_ok=True)
    fault = tmp_path / "earthly" / "fail-once-inconsistent"
    fault.touch()
    before = len(history(tmp_path))
    commit_tag(e, "v1.4.0", {"Earthfile": earthfile(full, "ekefail")})
    e.cli("run", "--once")
    j, log = assert_published(e, "v1.4.0", repo)
    assert not fault.exists()
    assert "inconsistent graph state" in log
    assert "transient BuildKit error (inconsistent graph state); retrying once" in log
    runs = history(tmp_path)[before:]
    assert [r[4] for r in runs] == [1, 0], runs


# -- BuildKit / Docker unreachable -----------------------------------------------------------
def test_buildkit_unreachable(apps, docker_engine, registry):
    closed = free_port()
    host = f"tcp://127.0.0.1:{closed}"
    e = apps("ekbkdown", earthfile=True, user_extra={"buildkit_host": host},
             extra_env={"EARTHLY_STANDIN_CONNECT_TIMEOUT": "2"})
    missing = f"unix://{e.home}/no-such-docker.sock"
    tag(e, "v1.0.0")  # Earthfile: the Earthly builder, pointed at a closed port
    cli(e.home, "run", "--once", env={**e.env, "DOCKER_HOST": missing})
    commit_tag(e, "v1.1.0", {".earthkamal.yml": "builder: dockerfile\n"})
    cli(e.home, "run", "--once", env={**e.env, "DOCKER_HOST": missing})

    j, log = assert_failed(e, "v1.0.0", f"Earthly cannot reach the BuildKit daemon ({host}); "
                           "start Docker")
    assert "could not connect to buildkit" in log
    assert any(f"--buildkit-host {host}" in ln for ln in argv_lines(log)), log
    j, log = assert_failed(e, "v1.1.0", "the Docker engine is not reachable (BuildKit runs "
                           "inside it); start Docker or set DOCKER_HOST")
    assert not set(registry.tags("ektest/ekbkdown")) & {"v1.0.0", "v1.1.0"}


# -- one shared BuildKit, builds_per_host ----------------------------------------------------
@pytest.mark.parametrize("limit", [1, 2])
def test_two_repos_share_buildkit_within_limit(limit, apps, tmp_path, registry):
    extra = {"builds_per_host": 2} if limit == 2 else None
    names = [f"ekshare{limit}a", f"ekshare{limit}b"]
    envs = [apps(n, earthfile=True, user_extra=extra) for n in names]
    slow = f"RUN echo {token()} && sleep 4"  # fresh per run: no cache hit
    for e, n in zip(envs, names, strict=True):
        full = f"{registry.server}/ektest/{n}"
        commit_tag(e, "v1.0.0", {"Earthfile": earthfile(full, n, run=slow)})
    e = envs[0]
    e.agent()
    # both repos share the state dir and the tag name: wait for each repo's own job
    def final():
        js = {x["repo"]: x for x in e.jobs()}
        done = all(js.get(n, {}).get("state") in ("awaiting_approval", "failed") for n in names)
        return js if done else None

    js = wait_for(final, timeout=180, interval=0.2, what="both repos' jobs to finish")
    for n in names:
        assert js[n]["state"] == "awaiting_approval", js[n]
        assert "v1.0.0" in registry.tags(f"ektest/{n}")
    runs = sorted(history(tmp_path))
    assert len(runs) == 2 and all(r[4] == 0 for r in runs), runs
    assert len({r[3] for r in runs}) == 1  # same settings hash: nobody restarted the daemon
    (s1, e1, *_), (s2, e2, *_) = runs
    if limit == 1:
        assert s2 >= e1, f"builds overlapped with builds_per_host 1: {runs}"
    else:
        assert s2 < e1, f"builds_per_host 2 but the builds ran one after the other: {runs}"


# -- gates -----------------------------------------------------------------------------------
def test_gates_stop_the_build_and_passing_gates_build(apps, registry):
    e = apps("ekgate", earthfile=True)
    repo = "ektest/ekgate"
    full = f"{registry.server}/{repo}"
    failing_test = f"\ntest:\n    FROM {BASE_IMAGE}\n    RUN echo {token()} && false\n"
    passing_test = f"\ntest:\n    FROM {BASE_IMAGE}\n    RUN echo {token()}\n"
    commit_tag(e, "v1.0.0", {".earthkamal.yml": "gate: [+test]\n",
                             "Earthfile": earthfile(full, "ekgate", extra=failing_test)}, run=True)
    stage = f"FROM {BASE_IMAGE} AS test\nRUN echo {token()} && exit 3\n\n"
    commit_tag(e, "v1.1.0", {".earthkamal.yml": "builder: dockerfile\ngate: [test]\n",
                             "Dockerfile": dockerfile("ekgate", head=stage)}, run=True)
    commit_tag(e, "v1.2.0", {".earthkamal.yml": "gate: [+test]\n",
                             "Earthfile": earthfile(full, "ekgate", extra=passing_test)}, run=True)
    stage = f"FROM {BASE_IMAGE} AS test\nRUN echo {token()}\n\n"
    commit_tag(e, "v1.3.0", {".earthkamal.yml": "builder: dockerfile\ngate: [test]\n",
                             "Dockerfile": dockerfile("ekgate", head=stage)}, run=True)

    j, log = assert_failed(e, "v1.0.0", "gate +test failed (Earthly exit 1)")
    assert j["reason"].startswith("gate +test ")
    assert "-- gate +test" in log and "-- build" not in log
    j, log = assert_failed(e, "v1.1.0", "gate test failed (docker build exit 1)")
    assert "-- gate test" in log and "-- build" not in log
    assert not set(registry.tags(repo)) & {"v1.0.0", "v1.1.0"}

    for name, gate in (("v1.2.0", "+test"), ("v1.3.0", "test")):
        j, log = assert_published(e, name, repo)
        assert log.index(f"-- gate {gate}") < log.index("-- build") < log.index("published")
        argvs = argv_lines(log)
        builds = [a for a in argvs if ("earthly" in a or " build " in a) and "--platform" in a]
        assert len(builds) >= 2, argvs  # the gate and the build, both for Kamal's arch
        assert all("--platform linux/amd64" in a for a in builds), builds


# -- platform follows builder.arch -----------------------------------------------------------
def test_platform_follows_builder_arch(apps, docker_engine, registry):
    need("an amd64 engine without arm64 emulation",
         not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists()
         and docker_engine.run("info", "-f", "{{.Architecture}}").stdout.strip() == "x86_64",
         "this test needs an x86_64 engine without qemu-aarch64 binfmt")
    e = apps("ekarch", earthfile=True)
    repo = "ektest/ekarch"
    full = f"{registry.server}/{repo}"
    arm = deploy_yml(e, builder={"arch": "arm64"})
    # 1. Earthly, RUN on arm64 without QEMU: the stand-in exits 255 like Earthly.
    commit_tag(e, "v1.0.0", {"config/deploy.yml": arm,
                             "Earthfile": earthfile(full, "ekarch", run=f"RUN echo {token()}")},
               run=True)
    # 2. The image the config names (`earthly.image`) is a prebuilt amd64 one: refused.
    prebuilt = "ektest-prebuilt/ekarch:amd64"
    docker_engine.run("build", "-t", prebuilt, "-",
                      input=f"FROM {BASE_IMAGE}\nLABEL service=ekarch\n")
    assert docker_engine.run("image", "inspect", "-f", "{{.Architecture}}",
                             prebuilt).stdout.strip() == "amd64"
    scratch = ("VERSION 0.8\ndocker:\n    FROM scratch\n    COPY version.txt /version\n"
               "    LABEL service=ekarch\n    SAVE IMAGE ektest-scratch/ekarch:latest\n")
    commit_tag(e, "v1.1.0", {".earthkamal.yml": f"earthly:\n  image: {prebuilt}\n",
                             "Earthfile": scratch}, run=True)
    # 3. Dockerfile builder, arm64, an image without RUN: built and pushed for arm64.
    commit_tag(e, "v1.2.0", {".earthkamal.yml": "builder: dockerfile\n",
                             "Dockerfile": "FROM scratch\nCOPY version.txt /version\n"
                                           "LABEL service=ekarch\n"}, run=True)
    # 4. Dockerfile builder, arm64, RUN on the amd64-only base image.
    commit_tag(e, "v1.3.0", {".earthkamal.yml": "builder: dockerfile\n",
                             "Dockerfile": dockerfile("ekarch", run=f"RUN echo {token()}")},
               run=True)

    j, log = assert_failed(e, "v1.0.0", "emulation failed building linux/arm64 on this amd64 "
                           "machine; install QEMU binfmt support")
    assert any("--platform linux/arm64" in a for a in argv_lines(log)), log
    j, log = assert_failed(e, "v1.1.0", f"the image {prebuilt} is amd64 but Kamal's "
                           "builder.arch is arm64")
    assert "-- push" not in log
    j, log = assert_published(e, "v1.2.0", repo)
    assert any("--platform linux/arm64" in a for a in argv_lines(log)), log
    arch = docker_engine.run("image", "inspect", "-f", "{{.Architecture}}", j["image"])
    assert arch.stdout.strip() == "arm64"
    j = e.job("v1.3.0")
    assert j["state"] == "failed", j
    assert not set(registry.tags(repo)) & {"v1.0.0", "v1.1.0", "v1.3.0"}
    # The base image has no linux/arm64 variant here; the sentence must say so, not quote
    # BuildKit's attempt to reach Docker Hub.
    assert "linux/arm64" in j["reason"], j["reason"]


# -- add_service_label, latest ---------------------------------------------------------------
def test_add_service_label_and_latest(apps, docker_engine, registry):
    e = apps("eklabel")
    repo = "ektest/eklabel"
    commit_tag(e, "v1.0.0", {".earthkamal.yml": "add_service_label: true\nlatest: true\n",
                             "Dockerfile": dockerfile(None, run=f"RUN echo {token()}")})
    e.cli("run", "--once")
    j, log = assert_published(e, "v1.0.0", repo)
    assert j["state"] == "awaiting_approval"
    assert "-- add service label" in log
    assert set(registry.tags(repo)) >= {"v1.0.0", "latest"}
    assert registry.manifest_digest(repo, "latest") == registry.manifest_digest(repo, "v1.0.0")
    assert j["digest"] == registry.manifest_digest(repo, "v1.0.0")
    label = docker_engine.run("image", "inspect", "-f", "{{.Config.Labels.service}}",
                              j["image"]).stdout.strip()
    assert label == "eklabel"
    assert f"-- push {registry.server}/{repo}:latest" in log


# -- Kamal's local registry (stock Rails config) ---------------------------------------------
def test_local_registry_rails_style(apps, docker_engine, local_registry):
    service = "eklocalreg"
    e = apps(service, local_registry=True, registry_server=local_registry.server)
    cfg = json.loads((e.app_root / "config" / "deploy.yml").read_text())
    cfg["image"] = service  # Rails: `image: myapp`, no namespace, no username/password
    assert cfg["registry"] == {"server": "localhost:5555"}
    name = local_registry.container

    def restore() -> None:
        if docker_engine.run("start", name, check=False).returncode != 0:
            docker_engine.run("run", "--detach", "-p", "127.0.0.1:5555:5000", "--name", name,
                              "registry:3")

    try:
        # running already
        commit_tag(e, "v1.0.0", {"config/deploy.yml": json.dumps(cfg, indent=2)})
        e.cli("run", "--once")
        j = e.job("v1.0.0")
        log = job_log(e, j)
        assert j["state"] == "awaiting_approval", f"{j}\n{log}"
        assert j["image"] == f"localhost:5555/{service}:v1.0.0"
        assert "v1.0.0" in local_registry.tags(service)
        assert "registry login" not in log
        # stopped: Kamal's `docker start kamal-docker-registry` brings it back
        docker_engine.run("stop", name)
        commit_tag(e, "v1.1.0")
        e.cli("run", "--once")
        j = e.job("v1.1.0")
        assert j["state"] == "awaiting_approval", f"{j}\n{job_log(e, j)}"
        assert "v1.1.0" in local_registry.tags(service)
        # removed: `docker run --detach -p 127.0.0.1:5555:5000 --name ... registry:3`
        docker_engine.run("rm", "-f", name)
        commit_tag(e, "v1.2.0")
        e.cli("run", "--once")
        j = e.job("v1.2.0")
        log = job_log(e, j)
        assert j["state"] == "awaiting_approval", f"{j}\n{log}"
        assert "v1.2.0" in local_registry.tags(service)
        assert any("run --detach -p 127.0.0.1:5555:5000 --name kamal-docker-registry "
                   "registry:3" in a for a in argv_lines(log)), log
    finally:
        restore()


# -- logs and status while a build runs ------------------------------------------------------
def test_logs_follow_and_status_while_building(apps):
    e = apps("eklogs")
    commit_tag(e, "v1.0.0", {".earthkamal.yml": "builder: dockerfile\n",
                             "Dockerfile": dockerfile("eklogs", run=f"RUN echo {token()} && "
                                                      "sleep 5")})
    e.agent()

    def building():
        js = [j for j in e.jobs() if j["tag"] == "v1.0.0"]
        return js[0] if js and js[0]["state"] == "building" and js[0]["step"] == "build" \
            else None

    j = wait_for(building, timeout=60, interval=0.1, what="v1.0.0 building")
    follow = subprocess.Popen(
        [sys.executable, "-m", "earthkamal_agent", "logs", str(j["id"]), "-f"],
        env={**os.environ, **e.env, "EARTHKAMAL_HOME": str(e.home)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.5)  # let the build print
    text = e.cli("status").stdout.decode()
    row = [ln for ln in text.splitlines() if re.match(rf"\s+{j['id']}\s", ln)]
    assert row, text
    assert re.search(r"\bbuilding\b.*\bbuild \d+s: \S", row[0]), row[0]
    assert follow.poll() is None, "logs -f exited while the job was building"
    out, err = follow.communicate(timeout=120)
    assert follow.returncode == 0, err
    final = e.job("v1.0.0")
    assert final["state"] == "awaiting_approval", f"{final}\n{job_log(e, final)}"
    out = out.decode()
    assert "-- build" in out and "== awaiting_approval" in out, out
    whole = e.cli("logs", str(j["id"])).stdout.decode()
    assert whole == job_log(e, final)
    assert out.strip() and whole.endswith(out[-200:])


def test_second_agent_elsewhere_leaves_running_job_alone(apps, tmp_path):
    """Another agent of the same user (another state dir: a test run, a second checkout) must
    not delete this agent's per-job scratch dir (/dev/shm/earthkamal-<uid>-job*) mid-build."""
    e = apps("ekscratch")
    commit_tag(e, "v1.0.0", {".earthkamal.yml": "builder: dockerfile\n",
                             "Dockerfile": dockerfile("ekscratch", run=f"RUN echo {token()} && "
                                                      "sleep 3")})
    e.agent()
    wait_for(lambda: [j for j in e.jobs() if j["tag"] == "v1.0.0" and j["state"] == "building"],
             timeout=60, interval=0.1, what="v1.0.0 building")
    other = tmp_path / "other-home"
    cli(other, "run", "--once", env={**e.env, "EARTHKAMAL_HOME": str(other)})
    j = e.wait_state("v1.0.0", "awaiting_approval", "failed", timeout=120)
    assert j["state"] == "awaiting_approval", f"{j}\n{job_log(e, j)}"
