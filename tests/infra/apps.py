"""A minimal Kamal 2.11 sample app for tests (plain functions, no fixtures).

:func:`write_sample_app` writes, under ``root``:

- ``Dockerfile``: ``FROM earthkamal-test/busybox:latest``, ``LABEL service=<service>``, busybox
  httpd on port ``app_port`` wrapped in sh with a TERM trap (httpd as PID 1 ignores SIGTERM,
  which would make every container stop take 10 s).
- ``version.txt`` (``version_file=True``): the text the app serves at ``/version`` and ``/``.
  Commit a different value before each tag; the agent builds from the tagged commit, so the
  served text proves which commit was deployed. With ``version_file=False`` the value comes
  from build arg ``APP_VERSION`` (default ``dev``).
- ``/up`` answers 200 ``ok``; ``/secret-set`` is ``set`` when ``APP_SECRET`` reached the
  container's environment (the value itself is never served).
- ``config/deploy.yml``: servers ``[127.0.0.1]``, registry (``password: [KAMAL_REGISTRY_PASSWORD]``
  unless ``local_registry``), ``builder.arch: amd64``, ``ssh`` from the :class:`SshHost`,
  ``proxy`` with ``run: {bind_ips: [127.0.0.1], http_port, https_port}`` and a ``/up``
  healthcheck, ``env.secret: [APP_SECRET]``, short deploy/drain timeouts.
- ``.kamal/secrets``: ``KAMAL_REGISTRY_PASSWORD=$KAMAL_REGISTRY_PASSWORD`` and
  ``APP_SECRET=$APP_SECRET``; the values come from the kamal process environment.
- ``Earthfile`` (``earthfile=True``): ``VERSION 0.8``, target ``+docker`` doing the same build,
  ending in ``SAVE IMAGE $IMAGE:$TAG`` (``ARG IMAGE=<repository>``, ``ARG TAG=latest``).

It does not run git: call :func:`git_commit_all` (or your own git) to commit the tree.
All proxy ports default to the shared per-engine ones in :mod:`tests.infra.proxy`.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# No module-level imports of sibling plugins: pytest loads tests/infra/* as plugins in name
# order and warns ("cannot be rewritten") about any plugin imported before its turn.
BASE_IMAGE = "earthkamal-test/busybox:latest"  # == tests.infra.docker.BASE_IMAGE

START_SH = """\
#!/bin/sh
# busybox httpd ignores SIGTERM as PID 1: run it as a child and stop it from a trap.
if [ -n "${APP_SECRET:-}" ]; then echo set > /www/secret-set; else echo unset > /www/secret-set; fi
httpd -f -p "${APP_PORT:-80}" -h /www &
pid=$!
trap 'kill "$pid" 2>/dev/null; exit 0' TERM INT
wait "$pid"
"""


@dataclass
class SampleApp:
    """What :func:`write_sample_app` wrote; paths are absolute."""

    root: Path
    service: str
    image: str
    registry_server: str
    repository: str  # "<registry_server>/<image>", what Kamal pulls as "<repository>:<version>"
    deploy_yml: Path
    secrets_file: Path
    version_file: Path | None
    earthfile: Path | None
    app_port: int
    proxy_http_port: int
    proxy_https_port: int

    def image_ref(self, version: str) -> str:
        return f"{self.repository}:{version}"

    def url(self, path: str = "/version") -> str:
        """URL through the kamal-proxy published on 127.0.0.1 (plain HTTP)."""
        return f"http://127.0.0.1:{self.proxy_http_port}{path}"

    def set_version(self, text: str) -> None:
        """Change the served version text (commit it before tagging)."""
        if self.version_file is None:
            raise ValueError("app was written with version_file=False")
        self.version_file.write_text(text + "\n")

    @staticmethod
    def kamal_env(
        registry_password: str | None,
        app_secret: str = "app-secret-value",
        base: dict[str, str] | None = None,
    ) -> dict[str, str]:
        """Environment for a ``kamal`` process: secrets set, ``VERSION`` removed."""
        env = dict(os.environ if base is None else base)
        env.pop("VERSION", None)
        env["KAMAL_REGISTRY_PASSWORD"] = registry_password or ""
        env["APP_SECRET"] = app_secret
        return env

    def kamal_argv(self, *args: str, kamal: str = "kamal") -> list[str]:
        """``kamal ARGS -c <deploy.yml>`` (run it with ``cwd=self.root``)."""
        return [kamal, *args, "-c", str(self.deploy_yml)]


def _dockerfile(service: str, app_port: int, version_file: bool) -> str:
    lines = [
        f"FROM {BASE_IMAGE}",
        f"LABEL service={service}",
        "RUN mkdir -p /www && echo ok > /www/up",
    ]
    if version_file:
        lines.append("COPY version.txt /www/version")
    else:
        lines += ["ARG APP_VERSION=dev", 'RUN echo "$APP_VERSION" > /www/version']
    lines += [
        "RUN cp /www/version /www/index.html",
        "COPY start.sh /start.sh",
        f"ENV APP_PORT={app_port}",
        f"EXPOSE {app_port}",
        'CMD ["/bin/sh", "/start.sh"]',
        "",
    ]
    return "\n".join(lines)


def _earthfile(service: str, repository: str, app_port: int, version_file: bool) -> str:
    lines = [
        "VERSION 0.8",
        "",
        "docker:",
        f"    FROM {BASE_IMAGE}",
        f"    ARG IMAGE={repository}",
        "    ARG TAG=latest",
        "    RUN mkdir -p /www && echo ok > /www/up",
    ]
    if version_file:
        lines.append("    COPY version.txt /www/version")
    else:
        lines += ["    ARG APP_VERSION=dev", '    RUN echo "$APP_VERSION" > /www/version']
    lines += [
        "    RUN cp /www/version /www/index.html",
        "    COPY start.sh /start.sh",
        f"    ENV APP_PORT={app_port}",
        f"    EXPOSE {app_port}",
        f"    LABEL service={service}",
        '    CMD ["/bin/sh", "/start.sh"]',
        "    SAVE IMAGE $IMAGE:$TAG",
        "",
    ]
    return "\n".join(lines)


def write_sample_app(
    root: Path,
    *,
    service: str,
    image: str,
    registry_server: str,
    registry_username: str | None,
    ssh: Any,
    app_port: int = 80,
    proxy_http_port: int | None = None,
    proxy_https_port: int | None = None,
    version_file: bool = True,
    earthfile: bool = False,
    local_registry: bool = False,
    initial_version: str = "v0-initial",
    extra_config: dict[str, Any] | None = None,
) -> SampleApp:
    """Write the sample app under ``root`` (created) and return a :class:`SampleApp`.

    ``proxy_http_port``/``proxy_https_port`` default to the shared
    :data:`tests.infra.proxy.PROXY_HTTP_PORT` / ``PROXY_HTTPS_PORT`` (18080/18443).
    ``ssh`` is the ``ssh_host`` fixture object (anything with ``kamal_ssh()``, or a dict used
    as the ``ssh:`` section verbatim). ``local_registry=True`` writes a registry section with
    only ``server`` (Kamal's local mode needs ``localhost:PORT``). ``extra_config`` is merged
    into deploy.yml at top level (shallow).
    """
    from tests.infra.proxy import PROXY_HTTP_PORT, PROXY_HTTPS_PORT

    proxy_http_port = PROXY_HTTP_PORT if proxy_http_port is None else proxy_http_port
    proxy_https_port = PROXY_HTTPS_PORT if proxy_https_port is None else proxy_https_port
    root = Path(root)
    (root / "config").mkdir(parents=True, exist_ok=True)
    (root / ".kamal").mkdir(parents=True, exist_ok=True)
    repository = f"{registry_server}/{image}" if registry_server else image

    (root / "Dockerfile").write_text(_dockerfile(service, app_port, version_file))
    (root / "start.sh").write_text(START_SH)
    (root / ".dockerignore").write_text(".git\n.kamal\nconfig\n")
    vfile: Path | None = None
    if version_file:
        vfile = root / "version.txt"
        vfile.write_text(initial_version + "\n")
    efile: Path | None = None
    if earthfile:
        efile = root / "Earthfile"
        efile.write_text(_earthfile(service, repository, app_port, version_file))

    registry: dict[str, Any] = {"server": registry_server}
    if not local_registry and registry_username is not None:
        registry["username"] = registry_username
        registry["password"] = ["KAMAL_REGISTRY_PASSWORD"]
    ssh_section = ssh if isinstance(ssh, dict) else ssh.kamal_ssh()
    config: dict[str, Any] = {
        "service": service,
        "image": image,
        "servers": {"web": ["127.0.0.1"]},
        "registry": registry,
        "builder": {"arch": "amd64"},
        "ssh": ssh_section,
        "env": {"clear": {"APP_NAME": service}, "secret": ["APP_SECRET"]},
        "proxy": {
            "app_port": app_port,
            "healthcheck": {"path": "/up", "interval": 1, "timeout": 2},
            "run": {
                "bind_ips": ["127.0.0.1"],
                "http_port": proxy_http_port,
                "https_port": proxy_https_port,
            },
        },
        "deploy_timeout": 20,
        "drain_timeout": 2,
    }
    if extra_config:
        config.update(extra_config)
    deploy_yml = root / "config" / "deploy.yml"
    deploy_yml.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML

    secrets_file = root / ".kamal" / "secrets"
    secrets_file.write_text(
        "KAMAL_REGISTRY_PASSWORD=$KAMAL_REGISTRY_PASSWORD\nAPP_SECRET=$APP_SECRET\n"
    )
    return SampleApp(
        root=root,
        service=service,
        image=image,
        registry_server=registry_server,
        repository=repository,
        deploy_yml=deploy_yml,
        secrets_file=secrets_file,
        version_file=vfile,
        earthfile=efile,
        app_port=app_port,
        proxy_http_port=proxy_http_port,
        proxy_https_port=proxy_https_port,
    )


def git_commit_all(root: Path, message: str, *, tag: str | None = None) -> str:
    """``git init`` (if needed), commit everything, optionally tag; returns the commit id."""
    env = dict(os.environ)
    env.update(
        {
            "GIT_AUTHOR_NAME": "Test",
            "GIT_AUTHOR_EMAIL": "test@example.invalid",
            "GIT_COMMITTER_NAME": "Test",
            "GIT_COMMITTER_EMAIL": "test@example.invalid",
        }
    )

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], env=env, check=True, capture_output=True, text=True
        ).stdout.strip()

    if not (Path(root) / ".git").exists():
        git("init", "-q", "-b", "main")
    git("add", "-A")
    git("commit", "-q", "--allow-empty", "-m", message)
    if tag:
        git("tag", tag)
    return git("rev-parse", "HEAD")


def remove_deployed(engine: Any, service: str) -> None:
    """Undo a test's deploys of ``service`` on the test engine, quickly and without Kamal.

    Removes the service from the kamal-proxy (if running), every container labelled
    ``service=<service>`` and every image labelled so (Kamal's own prune rule).
    """
    # Kamal names the proxy service after the role: <service>-web for the default role.
    for name in (f"{service}-web", service):
        engine.run("exec", "kamal-proxy", "kamal-proxy", "remove", name, check=False)
    ids = engine.run(
        "ps", "-aq", "--filter", f"label=service={service}", check=False
    ).stdout.split()
    if ids:
        engine.run("rm", "-f", *ids, check=False)
    imgs = engine.run(
        "images", "-q", "--filter", f"label=service={service}", check=False
    ).stdout.split()
    if imgs:
        engine.run("rmi", "-f", *sorted(set(imgs)), check=False)
