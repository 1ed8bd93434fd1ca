"""Kamal's local-registry setup, for real, on one machine (pytest plugin, session scope).

Kamal 2.8+ treats a ``registry.server`` of ``localhost:PORT`` as *local*: no ``docker login``;
on ``deploy -P`` it opens an SSH reverse tunnel (``-R 127.0.0.1:PORT``) from each server back
to the registry on the deploying machine, and the server pulls ``localhost:PORT/IMAGE:VERSION``.
The tunnel is open only during "Pull app image" (30 s timeout).

That cannot work with the server on the same loopback and engine as the registry (the tunnel's
listen port collides with the registry's own port, and a shared engine would pull without the
tunnel), so the fixtures here build a separate "server":

``netns_host`` -> :class:`NetnsHost`
    ``ip netns add ektest-srv`` (loopback only, no route out), its own ``dockerd`` (own socket,
    data root ``/var/lib/earthkamal-test/docker-ns``, exec root) started with
    ``nsenter --net=/run/netns/ektest-srv unshare --mount --propagation private dockerd ...``
    (``ip netns exec`` remounts /sys, leaving /sys/fs/cgroup empty, and dockerd fails), and an
    sshd in the namespace on 127.0.0.1:2222 with ``AllowTcpForwarding remote`` and
    ``PermitListen 127.0.0.1:5555``. Kamal reaches it through
    ``ssh.proxy_command: nsenter --net=/run/netns/ektest-srv busybox nc %h %p`` (in
    ``host.ssh.kamal_ssh()``). The base image and the kamal-proxy stand-in are copied into its
    engine with ``docker save | docker load`` (it cannot pull anything else). At session end all
    containers on that engine are removed, dockerd and sshd stopped and the namespace deleted
    (images stay in the data root for the next run).

``local_registry`` -> :class:`LocalRegistry`
    An image tagged ``registry:3`` built from Debian's ``docker-registry`` binary (dynamically
    linked, so libc and the loader are copied in), started on the *test* engine (the deploying
    machine's) with Kamal's exact ``kamal registry setup`` command:
    ``docker start kamal-docker-registry || docker run --detach -p 127.0.0.1:5555:5000 --name
    kamal-docker-registry registry:3`` (``kamal registry setup`` itself refuses without the buildx
    plugin, which Debian 12 lacks). Removed at session end if this fixture created it.
    A stopped registry shows up in Kamal as ``Errno::ECONNREFUSED ... port 5555``.

Requires root, ``ip`` (iproute2), ``nsenter``/``unshare`` (util-linux), ``busybox`` and dockerd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.infra import need, stop_process, stop_stale_daemon
from tests.infra.docker import BASE_IMAGE, DockerEngine, _answers

NS_NAME = "ektest-srv"
NS_RUN = Path("/run/earthkamal-test-ns")
NS_SOCKET = NS_RUN / "docker.sock"
NS_DATA = Path("/var/lib/earthkamal-test/docker-ns")
NS_SSH_PORT = 2222
LOCAL_REGISTRY_PORT = 5555
LOCAL_REGISTRY_SERVER = f"localhost:{LOCAL_REGISTRY_PORT}"
REGISTRY_CONTAINER = "kamal-docker-registry"
REGISTRY_IMAGE = "registry:3"


def ns_argv(*argv: str, name: str = NS_NAME) -> list[str]:
    """argv running ``argv`` in the namespace's network (host mounts and filesystem)."""
    return ["nsenter", f"--net=/run/netns/{name}", *argv]


@dataclass
class NetnsHost:
    name: str
    engine: DockerEngine  # the namespace's own dockerd
    ssh: object  # tests.infra.sshd.SshHost, with proxy_command set

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace's network, output captured, not checked."""
        return subprocess.run(
            ns_argv(*argv, name=self.name), capture_output=True, text=True, timeout=timeout
        )

    def http_get(self, url: str, timeout: int = 5) -> str | None:
        """Body of ``url`` fetched from inside the namespace (busybox wget), None on error."""
        r = self.run(
            "timeout", str(timeout), "busybox", "wget", "-q", "-O", "-", url, timeout=timeout + 5
        )
        return r.stdout if r.returncode == 0 else None


def _copy_images(src: DockerEngine, dst: DockerEngine, *refs: str) -> None:
    todo = [r for r in refs if not dst.image_exists(r)]
    if not todo:
        return
    save = subprocess.Popen([src.docker, "save", *todo], stdout=subprocess.PIPE, env=src.full_env())
    try:
        subprocess.run(
            [dst.docker, "load", "-q"],
            stdin=save.stdout,
            env=dst.full_env(),
            check=True,
            capture_output=True,
            timeout=120,
        )
    finally:
        if save.stdout:
            save.stdout.close()
        save.wait(timeout=60)


@pytest.fixture(scope="session")
def netns_host(
    docker_engine: DockerEngine, base_image: str, kamal_proxy_image: str
) -> Iterator[NetnsHost]:
    from tests.infra.sshd import start_sshd, wait_for_ssh

    need("netns host", os.geteuid() == 0, "network namespaces need root")
    for b in ("ip", "nsenter", "unshare", "busybox", "dockerd"):
        need(b, shutil.which(b) is not None, f"`{b}` not on PATH")
    if Path(f"/run/netns/{NS_NAME}").exists():
        subprocess.run(["ip", "netns", "del", NS_NAME], check=False, capture_output=True)
    subprocess.run(["ip", "netns", "add", NS_NAME], check=True, capture_output=True)
    subprocess.run(
        ["ip", "-n", NS_NAME, "link", "set", "lo", "up"], check=True, capture_output=True
    )
    root = Path(tempfile.mkdtemp(prefix="ek-netns-"))
    dockerd: subprocess.Popen[bytes] | None = None
    ssh = None
    host_str = f"unix://{NS_SOCKET}"
    engine = DockerEngine(
        host=host_str, env={"DOCKER_HOST": host_str, "DOCKER_BUILDKIT": "1"}, started_by_us=True
    )
    try:
        NS_RUN.mkdir(parents=True, exist_ok=True)
        (NS_RUN / "exec").mkdir(exist_ok=True)
        NS_DATA.mkdir(parents=True, exist_ok=True)
        stop_stale_daemon(NS_RUN / "docker.pid")
        if NS_SOCKET.exists():
            NS_SOCKET.unlink()
        log = (root / "dockerd.log").open("ab")
        dockerd = subprocess.Popen(
            ns_argv(
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "dockerd",
                "--host",
                host_str,
                "--data-root",
                str(NS_DATA),
                "--exec-root",
                str(NS_RUN / "exec"),
                "--pidfile",
                str(NS_RUN / "docker.pid"),
            ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env={**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        log.close()
        deadline = time.monotonic() + 60
        while not _answers(engine.docker, host_str):
            if dockerd.poll() is not None or time.monotonic() > deadline:
                tail = (root / "dockerd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"dockerd in netns {NS_NAME} did not come up:\n{tail}")
            time.sleep(0.2)
        _copy_images(docker_engine, engine, base_image, kamal_proxy_image)

        ssh = start_sshd(
            root / "ssh",
            docker_host=host_str,
            port=NS_SSH_PORT,
            extra_config="AllowTcpForwarding remote\n"
            f"PermitListen 127.0.0.1:{LOCAL_REGISTRY_PORT}\n",
            popen_prefix=ns_argv(),
            proxy_command=f"nsenter --net=/run/netns/{NS_NAME} busybox nc %h %p",
        )
        wait_for_ssh(ssh)
        yield NetnsHost(name=NS_NAME, engine=engine, ssh=ssh)
    finally:
        if dockerd is not None and dockerd.poll() is None:
            ids = engine.run("ps", "-aq", check=False).stdout.split()
            if ids:
                engine.run("rm", "-f", *ids, check=False)
        if ssh is not None:
            ssh.stop()
        stop_process(dockerd, timeout=30)
        subprocess.run(["ip", "netns", "del", NS_NAME], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


REGISTRY_CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: /var/lib/registry
  delete:
    enabled: true
http:
  addr: :5000
"""


def build_registry3_image(engine: DockerEngine, binary: str = "/usr/bin/docker-registry") -> str:
    """Tag ``registry:3`` = Debian's docker-registry + its shared libs on the busybox base."""
    if engine.image_exists(REGISTRY_IMAGE):
        return REGISTRY_IMAGE
    with tempfile.TemporaryDirectory(prefix="ek-registry3-") as d:
        ctx = Path(d)
        rootfs = ctx / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy2(binary, rootfs / "bin" / "registry")
        ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
        for line in ldd.splitlines():
            parts = line.split()
            lib = next((p for p in parts if p.startswith("/")), None)
            if lib:
                dest = rootfs / lib.lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.realpath(lib), dest)
        for cfg in ("etc/distribution/config.yml", "etc/docker/registry/config.yml"):
            (rootfs / cfg).parent.mkdir(parents=True, exist_ok=True)
            (rootfs / cfg).write_text(REGISTRY_CONFIG)
        (ctx / "Dockerfile").write_text(
            f"FROM {BASE_IMAGE}\n"
            "COPY rootfs/ /\n"
            "RUN mkdir -p /var/lib/registry\n"
            'VOLUME ["/var/lib/registry"]\n'
            "EXPOSE 5000\n"
            'ENTRYPOINT ["/bin/registry"]\n'
            'CMD ["serve", "/etc/distribution/config.yml"]\n'
        )
        engine.run("build", "-t", REGISTRY_IMAGE, str(ctx), timeout=300)
    return REGISTRY_IMAGE


@dataclass
class LocalRegistry:
    server: str  # "localhost:5555", what goes in registry.server
    container: str
    engine: DockerEngine

    def tags(self, repo: str) -> list[str]:
        import json

        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{LOCAL_REGISTRY_PORT}/v2/{repo}/tags/list", timeout=5
            ) as r:
                return sorted(json.load(r).get("tags") or [])
        except OSError:
            return []


@pytest.fixture(scope="session")
def local_registry(docker_engine: DockerEngine, base_image: str) -> Iterator[LocalRegistry]:
    need(
        "docker-registry",
        shutil.which("docker-registry") is not None,
        "`docker-registry` not on PATH (Debian package docker-registry)",
    )
    build_registry3_image(docker_engine)
    existed = (
        docker_engine.run("container", "inspect", REGISTRY_CONTAINER, check=False).returncode == 0
    )
    # Kamal's `kamal registry setup` command, verbatim (run locally).
    if docker_engine.run("start", REGISTRY_CONTAINER, check=False).returncode != 0:
        docker_engine.run(
            "run",
            "--detach",
            "-p",
            f"127.0.0.1:{LOCAL_REGISTRY_PORT}:5000",
            "--name",
            REGISTRY_CONTAINER,
            REGISTRY_IMAGE,
        )
    reg = LocalRegistry(
        server=LOCAL_REGISTRY_SERVER, container=REGISTRY_CONTAINER, engine=docker_engine
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{LOCAL_REGISTRY_PORT}/v2/", timeout=2):
                break
        except OSError as e:
            if time.monotonic() > deadline:
                logs = docker_engine.run("logs", REGISTRY_CONTAINER, check=False)
                raise RuntimeError(f"registry:3 did not answer: {logs.stdout}{logs.stderr}") from e
            time.sleep(0.2)
    try:
        yield reg
    finally:
        if not existed:
            docker_engine.remove_containers(REGISTRY_CONTAINER)
