"""A real SSH server for Kamal to deploy to (pytest plugin, session scope).

Fixture ``ssh_host`` -> :class:`SshHost`: Debian's ``/usr/sbin/sshd`` with its own config on
``127.0.0.1:<free port>`` only, key-only root login (``PermitRootLogin prohibit-password``),
fresh ed25519 host and client keys in a temporary directory (``StrictModes no`` because that
directory may be world-readable), and ``SetEnv DOCKER_HOST=<test engine> PATH=/usr/sbin:...``
so every remote ``docker`` is Debian's client talking to the test engine. ``SetEnv
DOCKER_CONFIG=<tmp>/remote-docker-config`` keeps the hosts' ``docker login`` (Kamal logs in on
every deploy) out of root's ``~/.docker``. Kamal still keeps its host-side state (locks, env
files) under ``/root/.kamal`` on the "server", which is this machine.

For Kamal put in ``config/deploy.yml``::

    ssh: {user: root, port: PORT, keys_only: true, keys: [KEY_PATH], config: SSH_CONFIG_PATH}

(Kamal always passes ``port`` itself, default 22, so the port must be in deploy.yml; the ssh
config file supplies ``UserKnownHostsFile`` with the host key, so host keys are verified.)
For plain OpenSSH use ``ssh -F ssh_config_path 127.0.0.1 CMD`` (see :meth:`SshHost.ssh_argv`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.infra import need, stop_process
from tests.infra.docker import HOST as ENGINE_HOST
from tests.infra.docker import DockerEngine
from tests.infra.registry import free_port

SSHD = "/usr/sbin/sshd"


@dataclass
class SshHost:
    host: str
    port: int
    user: str
    key_path: Path
    ssh_config_path: Path
    known_hosts: Path
    root: Path
    docker_host: str
    proxy_command: str | None = None  # for a server in another network namespace
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def kamal_ssh(self) -> dict[str, object]:
        """The ``ssh:`` section of a deploy.yml that reaches this server."""
        return {
            "user": self.user,
            "port": self.port,
            "keys_only": True,
            "keys": [str(self.key_path)],
            "config": str(self.ssh_config_path),
            **({"proxy_command": self.proxy_command} if self.proxy_command else {}),
        }

    def ssh_argv(self, *command: str) -> list[str]:
        """argv for OpenSSH running ``command`` on the server (remote shell parses it)."""
        return ["ssh", "-F", str(self.ssh_config_path), self.host, *command]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc)


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )


def start_sshd(
    root: Path,
    *,
    docker_host: str = ENGINE_HOST,
    listen: str = "127.0.0.1",
    port: int | None = None,
    extra_config: str = "",
    popen_prefix: list[str] | None = None,
    proxy_command: str | None = None,
) -> SshHost:
    """Generate keys + config under ``root`` and start sshd (``popen_prefix`` e.g. nsenter)."""
    root.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege-separation dir
    port = port or free_port()
    host_key = root / "ssh_host_ed25519_key"
    client_key = root / "id_ed25519"
    _keygen(host_key, "earthkamal-test-host")
    _keygen(client_key, "earthkamal-test-client")
    authorized = root / "authorized_keys"
    shutil.copyfile(client_key.with_suffix(".pub"), authorized)
    host_pub = host_key.with_suffix(".pub").read_text().split()
    known_hosts = root / "known_hosts"
    hostpat = listen if port == 22 else f"[{listen}]:{port}"
    known_hosts.write_text(f"{hostpat} {host_pub[0]} {host_pub[1]}\n")
    sshd_config = root / "sshd_config"
    sshd_config.write_text(
        "\n".join(
            [
                f"Port {port}",
                f"ListenAddress {listen}",
                f"HostKey {host_key}",
                f"PidFile {root / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "PrintMotd no",
                "MaxStartups 100:30:200",
                "MaxSessions 100",
                "LogLevel ERROR",
                "Subsystem sftp /usr/lib/openssh/sftp-server",
                f"SetEnv DOCKER_HOST={docker_host} DOCKER_CONFIG={root / 'remote-docker-config'}"
                " PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                extra_config,
                "",
            ]
        )
    )
    ssh_config = root / "ssh_config"
    ssh_config.write_text(
        "\n".join(
            [
                f"Host {listen}",
                f"  HostName {listen}",
                f"  Port {port}",
                "  User root",
                f"  IdentityFile {client_key}",
                "  IdentitiesOnly yes",
                f"  UserKnownHostsFile {known_hosts}",
                "  StrictHostKeyChecking yes",
                "  BatchMode yes",
                *([f"  ProxyCommand {proxy_command}"] if proxy_command else []),
                "",
            ]
        )
    )
    log = (root / "sshd.log").open("ab")
    proc = subprocess.Popen(
        [*(popen_prefix or []), SSHD, "-D", "-e", "-f", str(sshd_config)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    log.close()
    host = SshHost(
        host=listen,
        port=port,
        user="root",
        key_path=client_key,
        ssh_config_path=ssh_config,
        known_hosts=known_hosts,
        root=root,
        docker_host=docker_host,
        proxy_command=proxy_command,
        _proc=proc,
    )
    return host


def wait_for_ssh(host: SshHost, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if host._proc is not None and host._proc.poll() is not None:
            break
        r = subprocess.run(host.ssh_argv("true"), capture_output=True, text=True, timeout=15)
        if r.returncode == 0:
            return
        last = r.stderr
        time.sleep(0.2)
    log = (host.root / "sshd.log").read_text(errors="replace")[-2000:]
    host.stop()
    raise RuntimeError(f"sshd did not accept the test key: {last}\nsshd log:\n{log}")


@pytest.fixture(scope="session")
def ssh_host(docker_engine: DockerEngine) -> Iterator[SshHost]:
    need("sshd", Path(SSHD).exists(), f"{SSHD} missing (openssh-server)")
    need(
        "ssh",
        shutil.which("ssh") is not None and shutil.which("ssh-keygen") is not None,
        "ssh / ssh-keygen missing (openssh-client)",
    )
    need("sshd", os.geteuid() == 0, "root login over SSH needs the tests to run as root")
    root = Path(tempfile.mkdtemp(prefix="ek-sshd-"))
    host = start_sshd(root, docker_host=docker_engine.host)
    try:
        wait_for_ssh(host)
        yield host
    finally:
        host.stop()
        shutil.rmtree(root, ignore_errors=True)
