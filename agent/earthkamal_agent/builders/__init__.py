"""Builders turn a snapshot into a local image. One file per builder.

A builder is pure where it can be: it returns :class:`~earthkamal_agent.runner.Command`
objects for the gate and the build, and reads the result. The pipeline runs the commands.
"""

from __future__ import annotations

import platform as _platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..runner import Command, Result


@dataclass(frozen=True)
class BuildSpec:
    """Everything a builder needs for one job."""

    app_dir: Path
    image_ref: str                      # <repository>:<version>, the name Kamal pulls
    platform: str                       # linux/<arch> from Kamal's builder.arch
    settings: dict                      # the builder's section of .earthkamal.yml
    user: dict                          # the user config (binaries, buildkit host)
    secrets: dict[str, str] = field(default_factory=dict)  # build secrets: NAME -> value
    push: bool = False                  # the builder pushes itself (publish: earthly)
    tmp_dir: Path | None = None         # private scratch space for this job


class Builder(Protocol):
    name: str

    def check(self, spec: BuildSpec) -> None:
        """Raise UserError when the snapshot cannot be built (file or target missing)."""

    def gate_commands(self, spec: BuildSpec, gates: list[str]) -> list[tuple[str, Command]]:
        """(gate name, command) for each quality gate."""

    def build_command(self, spec: BuildSpec) -> Command:
        """The build itself."""

    def built_image(self, spec: BuildSpec, result: Result) -> str:
        """The local image the build produced."""

    def explain(self, spec: BuildSpec, result: Result, what: str) -> str:
        """One sentence for a failed gate or build."""

    def should_retry(self, result: Result) -> bool:
        """A transient failure worth one more try."""


def host_arch() -> str:
    m = _platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(m, m)


def select(name: str, app_dir: Path) -> Builder:
    """The builder for ``builder:`` (auto: Earthly when there is an Earthfile)."""
    from .dockerfile import DockerfileBuilder
    from .earthly import EarthlyBuilder

    if name == "auto":
        name = "earthly" if (app_dir / "Earthfile").exists() else "dockerfile"
    return EarthlyBuilder() if name == "earthly" else DockerfileBuilder()
