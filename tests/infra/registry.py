"""A real password-protected image registry (pytest plugin).

Fixture ``registry`` (session scope) -> :class:`Registry`: Debian's ``docker-registry serve
CONFIG`` on ``127.0.0.1:<free port>`` with htpasswd (bcrypt, ``htpasswd -B``) auth and storage
in a temporary directory. ``127.0.0.1:PORT`` is a *remote* registry for Kamal (it logs in) and
Docker allows plain http to 127.0.0.0/8, so no TLS is needed.

Helpers use urllib only: :meth:`Registry.tags`, :meth:`Registry.manifest_digest`. :meth:`stop`
and :meth:`start` take the registry down and bring it back on the same port and storage, to
simulate an outage; a test that stops it must start it again (``with registry.down(): ...``).
Repositories are shared by the whole session: use image names of the test's own.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra import need, stop_process

MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
    ]
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """A running ``docker-registry``; ``server`` is what goes in ``registry.server``."""

    def __init__(self, root: Path, *, username: str = "ektest", password: str | None = None):
        self.root = root
        self.username = username
        # Distinctive, so tests can assert it never shows up in logs or files.
        self.password = password or f"ekpw-{secrets.token_hex(12)}"
        self.port = free_port()
        self.server = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.server}"
        self.storage = root / "storage"
        self.config_path = root / "config.yml"
        self.htpasswd_path = root / "htpasswd"
        self.log_path = root / "registry.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["htpasswd", "-B", "-b", "-c", str(self.htpasswd_path), self.username, self.password],
            check=True,
            capture_output=True,
        )
        cfg = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.server, "secret": secrets.token_hex(16)},
            "auth": {"htpasswd": {"realm": "earthkamal-test", "path": str(self.htpasswd_path)}},
        }
        # JSON is YAML.
        self.config_path.write_text(json.dumps(cfg, indent=2))

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20) -> None:
        if self.running:
            return
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            ["docker-registry", "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log_path.read_text()[-2000:]}")
            if self._status("/v2/", auth=False) in (200, 401):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("docker-registry did not answer")
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc)

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """``with registry.down():`` the registry refuses connections inside the block."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    # -- HTTP helpers ----------------------------------------------------------------------
    def _request(
        self,
        path: str,
        *,
        method: str = "GET",
        auth: bool = True,
        headers: dict[str, str] | None = None,
    ) -> urllib.request.Request:
        req = urllib.request.Request(self.url + path, method=method, headers=headers or {})
        if auth:
            tok = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            req.add_header("Authorization", f"Basic {tok}")
        return req

    def _status(self, path: str, *, auth: bool = True) -> int | None:
        try:
            with urllib.request.urlopen(self._request(path, auth=auth), timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def tags(self, repo: str) -> list[str]:
        """Tags of ``repo`` (without the server part); [] when the repository is unknown."""
        try:
            with urllib.request.urlopen(self._request(f"/v2/{repo}/tags/list"), timeout=10) as r:
                data = json.load(r)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return []
            raise
        return sorted(data.get("tags") or [])

    def manifest_digest(self, repo: str, tag: str) -> str | None:
        """``Docker-Content-Digest`` of ``repo:tag`` (docker v2 / OCI, index or manifest)."""
        for method in ("HEAD", "GET"):
            req = self._request(
                f"/v2/{repo}/manifests/{tag}", method=method, headers={"Accept": MANIFEST_ACCEPT}
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    digest = r.headers.get("Docker-Content-Digest")
                    if digest:
                        return digest
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                raise
        return None


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    need(
        "docker-registry",
        shutil.which("docker-registry") is not None,
        "`docker-registry` not on PATH (Debian package docker-registry)",
    )
    need(
        "htpasswd",
        shutil.which("htpasswd") is not None,
        "`htpasswd` not on PATH (Debian package apache2-utils)",
    )
    root = Path(tempfile.mkdtemp(prefix="ek-registry-"))
    reg = Registry(root)
    try:
        reg.start()
        yield reg
    finally:
        reg.stop()
        shutil.rmtree(root, ignore_errors=True)
