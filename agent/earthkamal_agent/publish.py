"""Publishing: check the built image, tag it Kamal's way, push it, verify the digest.

The registry password comes from the keyring and reaches only `docker login` (on stdin) with a
temporary DOCKER_CONFIG in the job's private scratch dir, deleted after the push; the user's
~/.docker/config.json is untouched unless `use_docker_config` is set.
"""

from __future__ import annotations

import json
import re

from .runner import Command

_PUSH_DIGEST = re.compile(r"digest: (sha256:[0-9a-f]{64})")


def docker(user: dict) -> str:
    return user.get("docker_binary") or "docker"


def inspect_command(user: dict, image: str) -> Command:
    return Command((docker(user), "image", "inspect", "--format", "{{json .}}", image),
                   timeout=60, label="inspect")


def parse_inspect(stdout: bytes) -> dict:
    info = json.loads(stdout.decode() or "{}")
    cfg = info.get("Config") or {}
    return {"id": info.get("Id"), "labels": cfg.get("Labels") or {},
            "arch": info.get("Architecture"), "os": info.get("Os"),
            "repo_digests": info.get("RepoDigests") or []}


def label_problem(labels: dict, service: str, image: str) -> str | None:
    """Kamal's own wording when the `service` label is missing or wrong."""
    got = labels.get("service")
    if got == service:
        return None
    if got is None:
        return (f"Image {image} is missing the 'service' label; add `LABEL service={service}` "
                "to the Dockerfile/Earthfile, or set `add_service_label: true` in .earthkamal.yml.")
    return (f"Image {image} has label service={got}, but Kamal's service is {service}; "
            f"change the label to `service={service}`.")


def arch_problem(arch: str | None, want: str, image: str) -> str | None:
    if arch == want:
        return None
    return (f"the image {image} is {arch or 'of unknown architecture'} but Kamal's builder.arch "
            f"is {want}: the servers would not run it; build for linux/{want} (the agent passes "
            f"--platform linux/{want}; check the Earthfile's FROM --platform or the base image).")


def add_label_command(user: dict, image: str, service: str, out: str, cwd: str) -> Command:
    """One BuildKit layer adding the service label (Dockerfile on stdin)."""
    dockerfile = f"FROM {image}\nLABEL service=\"{service}\"\n".encode()
    return Command((docker(user), "build", "--progress=plain", "-t", out, "-"),
                   env={"DOCKER_BUILDKIT": "1"}, stdin=dockerfile, cwd=cwd, timeout=600,
                   label="add service label")


def tag_command(user: dict, src: str, dst: str) -> Command:
    return Command((docker(user), "tag", src, dst), timeout=60, label="tag")


def login_command(user: dict, server: str, username: str, password: str,
                  config_dir: str) -> Command:
    return Command((docker(user), "login", "--username", username, "--password-stdin", server),
                   env={"DOCKER_CONFIG": config_dir}, stdin=password.encode(), timeout=120,
                   label="docker login")


def push_command(user: dict, ref: str, config_dir: str | None) -> Command:
    env = {"DOCKER_CONFIG": config_dir} if config_dir else {}
    return Command((docker(user), "push", ref), env=env, timeout=3600, label="push")


def local_registry_commands(user: dict, port: str) -> list[Command]:
    """Kamal's own way to start its local registry: start it, else run it."""
    return [
        Command((docker(user), "start", "kamal-docker-registry"), timeout=60,
                label="start local registry"),
        Command((docker(user), "run", "--detach", "-p", f"127.0.0.1:{port}:5000", "--name",
                 "kamal-docker-registry", "registry:3"), timeout=120, label="run local registry"),
    ]


def pushed_digest(output: str) -> str | None:
    found = _PUSH_DIGEST.findall(output)
    return found[-1] if found else None


def push_error(output: str) -> str:
    text = output.lower()
    if "unauthorized" in text or "authentication required" in text or "denied" in text:
        return "the registry refused the credentials"
    if "connection refused" in text or "no such host" in text or "i/o timeout" in text:
        return "the registry is unreachable"
    return output.strip().splitlines()[-1] if output.strip() else "unknown error"
