"""The kamal-proxy stand-in image (pytest plugin, session scope).

Kamal 2.11 boots ``basecamp/kamal-proxy:v0.9.2`` (``docker run ... IMAGE kamal-proxy run``)
and drives it with ``docker exec kamal-proxy kamal-proxy deploy|stop|resume|remove SERVICE``.
The real image cannot be pulled here, so ``kamal_proxy_image`` builds the stand-in from
``tests/standins/kamal-proxy`` (FROM ``earthkamal-test/busybox``) under exactly that name, and
reuses it when the engine already has it (delete the image to force a rebuild after editing the
stand-in). It serves plain HTTP on container ports 80/443, forwarding to the deployed target.

Per engine there is one ``kamal-proxy`` container and its published ports are those of its
first boot: every test deploying to the shared engine must use :data:`PROXY_HTTP_PORT` /
:data:`PROXY_HTTPS_PORT` (``write_sample_app`` defaults to them).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.infra.docker import BASE_IMAGE, DockerEngine

PROXY_IMAGE = "basecamp/kamal-proxy:v0.9.2"
STANDIN_DIR = Path(__file__).resolve().parents[1] / "standins" / "kamal-proxy"
PROXY_HTTP_PORT = 18080
PROXY_HTTPS_PORT = 18443
_HASH_LABEL = "earthkamal.test.standin-hash"


def _standin_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(STANDIN_DIR.iterdir()):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_proxy_image(engine: DockerEngine, *, force: bool = False) -> str:
    """Build the stand-in unless an image built from the same sources already exists."""
    want = _standin_hash()
    if not force and engine.image_exists(PROXY_IMAGE):
        have = engine.run(
            "image",
            "inspect",
            "--format",
            '{{index .Config.Labels "' + _HASH_LABEL + '"}}',
            PROXY_IMAGE,
            check=False,
        ).stdout.strip()
        if have == want:
            return PROXY_IMAGE
    r = engine.run(
        "build",
        "--build-arg",
        f"BASE={BASE_IMAGE}",
        "--label",
        f"{_HASH_LABEL}={want}",
        "-t",
        PROXY_IMAGE,
        str(STANDIN_DIR),
        check=False,
        timeout=300,
    )
    if r.returncode != 0:
        raise RuntimeError(f"building {PROXY_IMAGE} failed:\n{r.stdout}\n{r.stderr}")
    # A kamal-proxy container still running an older stand-in would keep serving it (Kamal
    # only boots the proxy when none runs): remove it; the next deploy boots a fresh one.
    new_id = engine.run("image", "inspect", "--format", "{{.Id}}", PROXY_IMAGE).stdout.strip()
    old_id = engine.run(
        "container", "inspect", "--format", "{{.Image}}", "kamal-proxy", check=False
    ).stdout.strip()
    if old_id and old_id != new_id:
        engine.remove_containers("kamal-proxy")
    return PROXY_IMAGE


@pytest.fixture(scope="session")
def kamal_proxy_image(docker_engine: DockerEngine, base_image: str) -> str:
    """``basecamp/kamal-proxy:v0.9.2`` (the stand-in) present on the test engine."""
    return build_proxy_image(docker_engine)
