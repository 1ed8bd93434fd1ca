"""A real Docker engine for the tests (pytest plugin, session scope).

Fixtures:

``docker_engine`` -> :class:`DockerEngine`
    Reuses a dockerd that already answers on ``/run/earthkamal-test/docker.sock``; otherwise
    starts Debian's ``dockerd`` there (under ``setsid``) and stops it at the end of the session.
    Only one engine per machine: a second daemon started beside another one breaks the first
    one's bridge (``--bridge=none``) or gets its bridges blocked (``--iptables=false``), so this
    fixture never starts one when the socket answers. Use ``engine.docker`` (Debian's
    ``/usr/bin/docker``, which does BuildKit builds without the buildx plugin) with
    ``engine.env``; never the ``docker`` that happens to be first on PATH.

``base_image`` -> ``"earthkamal-test/busybox:latest"``
    No image can be pulled here. This one is a root made of Debian's static busybox and its
    applet links (plus /etc/passwd, /etc/group, /etc/nsswitch.conf, /tmp), ``docker import``-ed.
    Built once per engine and reused afterwards.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.infra import need, stop_process, stop_stale_daemon

RUN_DIR = Path("/run/earthkamal-test")
SOCKET = RUN_DIR / "docker.sock"
HOST = f"unix://{SOCKET}"
DATA_ROOT = Path("/var/lib/earthkamal-test/docker")
EXEC_ROOT = RUN_DIR / "exec"
PIDFILE = RUN_DIR / "docker.pid"
LOGFILE = Path("/var/lib/earthkamal-test/dockerd.log")
DOCKER_CLIENT = "/usr/bin/docker"  # Debian's client; /usr/local/bin/docker lacks buildx
BUSYBOX = "/bin/busybox"
BASE_IMAGE = "earthkamal-test/busybox:latest"


@dataclass
class DockerEngine:
    """Handle on the test engine. ``run`` raises CalledProcessError unless ``check=False``."""

    host: str = HOST
    docker: str = DOCKER_CLIENT
    env: dict[str, str] = field(default_factory=dict)
    started_by_us: bool = False

    def full_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """os.environ + DOCKER_HOST/DOCKER_BUILDKIT (+ ``extra``), for child processes."""
        env = dict(os.environ)
        env.pop("DOCKER_CONTEXT", None)
        env.update(self.env)
        if extra:
            env.update(extra)
        return env

    def run(
        self,
        *args: str,
        check: bool = True,
        input: bytes | str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker ARGS...`` against the test engine; text output captured."""
        text_input = input.decode() if isinstance(input, bytes) else input
        return subprocess.run(
            [self.docker, *args],
            env=self.full_env(env),
            cwd=cwd,
            input=text_input,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def answers(self) -> bool:
        return _answers(self.docker, self.host)

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False).returncode == 0

    def remove_containers(self, *names: str) -> None:
        """Force-remove containers by name or id, ignoring the ones that do not exist."""
        if names:
            self.run("rm", "-f", *names, check=False)


def _answers(docker: str, host: str) -> bool:
    if host.startswith("unix://") and not Path(host[len("unix://") :]).exists():
        return False
    try:
        r = subprocess.run(
            [docker, "--host", host, "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and bool(r.stdout.strip())


def _start_dockerd() -> subprocess.Popen[bytes]:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    EXEC_ROOT.mkdir(parents=True, exist_ok=True)
    stop_stale_daemon(PIDFILE)  # a dockerd of a killed run that no longer answers
    if SOCKET.exists():  # stale socket from a dead daemon
        SOCKET.unlink()
    log = LOGFILE.open("ab")
    env = dict(os.environ)
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    proc = subprocess.Popen(
        [
            "setsid",
            "dockerd",
            "--host",
            HOST,
            "--data-root",
            str(DATA_ROOT),
            "--exec-root",
            str(EXEC_ROOT),
            "--pidfile",
            str(PIDFILE),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env=env,
    )
    log.close()
    return proc


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    need("docker client", Path(DOCKER_CLIENT).exists(), f"{DOCKER_CLIENT} missing (docker.io)")
    env = {"DOCKER_HOST": HOST, "DOCKER_BUILDKIT": "1"}
    if _answers(DOCKER_CLIENT, HOST):
        yield DockerEngine(env=env)
        return
    need("dockerd", shutil.which("dockerd") is not None, "dockerd not on PATH (docker.io)")
    need("dockerd", os.geteuid() == 0, "starting dockerd needs root")
    proc = _start_dockerd()
    deadline = time.monotonic() + 60
    while not _answers(DOCKER_CLIENT, HOST):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = LOGFILE.read_text(errors="replace")[-2000:] if LOGFILE.exists() else ""
            stop_process(proc, timeout=30)  # setsid execs dockerd in place: same pid
            need("dockerd", False, f"dockerd did not come up; log tail:\n{tail}")
        time.sleep(0.2)
    try:
        yield DockerEngine(env=env, started_by_us=True)
    finally:
        stop_process(proc, timeout=30)  # setsid execs dockerd in place: same pid


def busybox_rootfs_tar(busybox: str = BUSYBOX) -> bytes:
    """A tar of a minimal root: static busybox, every applet as a symlink, basic /etc files."""
    applets = subprocess.run(
        [busybox, "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add_dir(name: str, mode: int = 0o755) -> None:
            ti = tarfile.TarInfo(name)
            ti.type = tarfile.DIRTYPE
            ti.mode = mode
            tar.addfile(ti)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = mode
            tar.addfile(ti, io.BytesIO(data))

        dirs = {
            "bin",
            "sbin",
            "usr",
            "usr/bin",
            "usr/sbin",
            "etc",
            "root",
            "var",
            "var/www",
            "home",
            "proc",
            "sys",
            "dev",
            "run",
        }
        dirs |= {str(Path(a.lstrip("/")).parent) for a in applets}
        for d in sorted(dirs):
            add_dir(d)
        add_dir("tmp", 0o1777)
        add_file("bin/busybox", Path(busybox).read_bytes(), 0o755)
        for a in sorted(set(applets)):
            rel = a.lstrip("/")
            if rel == "bin/busybox":
                continue
            ti = tarfile.TarInfo(rel)
            ti.type = tarfile.SYMTYPE
            ti.linkname = "/bin/busybox"
            tar.addfile(ti)
        add_file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        )
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        add_file("etc/nsswitch.conf", b"hosts: files dns\npasswd: files\ngroup: files\n")
    return buf.getvalue()


@pytest.fixture(scope="session")
def base_image(docker_engine: DockerEngine) -> str:
    """``earthkamal-test/busybox:latest`` on the test engine (imported once, then reused)."""
    if docker_engine.image_exists(BASE_IMAGE):
        return BASE_IMAGE
    need("busybox-static", Path(BUSYBOX).exists(), f"{BUSYBOX} missing (busybox-static)")
    data = busybox_rootfs_tar()
    r = subprocess.run(
        [docker_engine.docker, "import", "--change", 'CMD ["/bin/sh"]', "-", BASE_IMAGE],
        input=data,
        env=docker_engine.full_env(),
        capture_output=True,
        check=False,
        timeout=120,
    )
    if r.returncode != 0:
        raise RuntimeError(f"docker import failed: {r.stderr.decode(errors='replace')}")
    return BASE_IMAGE
