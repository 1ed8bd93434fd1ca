"""A plain Dockerfile built through BuildKit (`docker build` with DOCKER_BUILDKIT=1).

For repos without an Earthfile, like newly generated Rails apps. Gates are Dockerfile stages
built with ``--target``. Build secrets reach BuildKit as ``--secret id=NAME,src=FILE`` from a
0600 file in the job's private scratch dir (memory-backed when /dev/shm exists), deleted
right after the build.
"""

from __future__ import annotations

import re

from ..errors import UserError
from ..runner import Command, Result
from . import BuildSpec, host_arch

_STAGE = re.compile(r"^\s*FROM\s+\S+(?:\s+AS\s+([A-Za-z0-9._-]+))?", re.IGNORECASE | re.M)


def docker_env() -> dict[str, str | None]:
    return {"DOCKER_BUILDKIT": "1", "BUILDKIT_PROGRESS": "plain", "NO_COLOR": "1"}


class DockerfileBuilder:
    name = "dockerfile"

    def _file(self, spec: BuildSpec) -> str:
        return spec.settings.get("file") or "Dockerfile"

    def check(self, spec: BuildSpec) -> None:
        f = spec.app_dir / self._file(spec)
        if not f.exists():
            raise UserError(f"the tagged commit has no {self._file(spec)} (and no Earthfile); "
                            "commit one, or set `dockerfile.file` in .earthkamal.yml.")
        target = spec.settings.get("target")
        if target and target not in _STAGE.findall(f.read_text(errors="replace")):
            raise UserError(f"{self._file(spec)} has no stage named {target}; fix "
                            "`dockerfile.target` in .earthkamal.yml.")

    def _argv(self, spec: BuildSpec, tag: str | None, target: str | None) -> list[str]:
        docker = spec.user.get("docker_binary") or "docker"
        argv = [docker, "build", "--progress=plain", "--platform", spec.platform,
                "-f", self._file(spec)]
        if tag:
            argv += ["-t", tag]
        if target:
            argv += ["--target", target]
        for k, v in sorted((spec.settings.get("args") or {}).items()):
            argv += ["--build-arg", f"{k}={v}"]
        for name in sorted(spec.secrets):
            argv += ["--secret", f"id={name},src={self.secret_file(spec, name)}"]
        argv.append(spec.settings.get("context") or ".")
        return argv

    def secret_file(self, spec: BuildSpec, name: str) -> str:
        assert spec.tmp_dir is not None
        return str(spec.tmp_dir / f"secret-{name}")

    def gate_commands(self, spec: BuildSpec, gates: list[str]) -> list[tuple[str, Command]]:
        return [(g, Command(tuple(self._argv(spec, None, g.lstrip("+"))), env=docker_env(),
                            cwd=str(spec.app_dir), timeout=3600, label=f"gate {g}"))
                for g in gates]

    def build_command(self, spec: BuildSpec) -> Command:
        return Command(tuple(self._argv(spec, spec.image_ref, spec.settings.get("target"))),
                       env=docker_env(), cwd=str(spec.app_dir), timeout=3600, label="build")

    def built_image(self, spec: BuildSpec, result: Result) -> str:
        return spec.image_ref

    def should_retry(self, result: Result) -> bool:
        return False

    def explain(self, spec: BuildSpec, result: Result, what: str) -> str:
        tail = "\n".join(result.tail)
        if result.timed_out:
            return f"{what} timed out."
        if "Cannot connect to the Docker daemon" in tail or "connect: no such file" in tail:
            return ("the Docker engine is not reachable (BuildKit runs inside it); start Docker "
                    "or set DOCKER_HOST for the agent, then `earthkamal-agent retry`.")
        if "exec format error" in tail:
            return (f"emulation failed building {spec.platform}: install QEMU binfmt support or "
                    "build on a machine of that architecture.")
        if spec.platform.split("/")[-1] != host_arch() and (
                "failed to create LLB definition" in tail
                or "no match for platform in manifest" in tail):
            return (f"the base image has no {spec.platform} variant on this {host_arch()} "
                    f"machine and BuildKit could not fetch one; provide the base image for "
                    f"{spec.platform} or set builder.arch to {host_arch()} "
                    f"({_error_line(result) or result.last_line()}).")
        line = _error_line(result) or result.last_line() or "see the job log"
        return f"{what} failed (docker build exit {result.returncode}): {line}"


def _error_line(result: Result) -> str:
    for line in reversed(result.tail):
        if line.lstrip().lower().startswith(("error", "failed to solve")):
            return line.strip()
    return ""
