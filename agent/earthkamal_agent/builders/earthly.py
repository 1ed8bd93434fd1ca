"""Earthly (or EarthBuild's `earth`) on the one shared BuildKit daemon.

argv shape: ``earthly [global flags] +target --ARG=value``. Every build uses the same
buildkit host and config from the user config, so no invocation restarts the daemon under
another. Build secrets go as ``--secret NAME`` with the value in the environment only.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError
from ..runner import Command, Result
from . import BuildSpec, host_arch

_OUTPUT = re.compile(r"Image (\S*\+[\w.-]+) output as (\S+)")
_PUSHED = re.compile(r"Pushed image (\S*\+[\w.-]+) as (\S+)")
_TARGET_LINE = re.compile(r"^([A-Za-z0-9._-]+):\s*(#.*)?$")


def env_prefix(user: dict) -> str:
    if user.get("earthly_env_prefix"):
        return str(user["earthly_env_prefix"])
    return "EARTH" if Path(user.get("earthly_binary") or "earthly").name == "earth" else "EARTHLY"


def global_flags(spec: BuildSpec, push: bool) -> list[str]:
    """Flags before the target: the same for every repo except platform, secrets, push."""
    flags: list[str] = []
    if spec.user.get("buildkit_host"):
        flags += ["--buildkit-host", spec.user["buildkit_host"]]
    if spec.user.get("earthly_config"):
        flags += ["--config", spec.user["earthly_config"]]
    flags += ["--platform", spec.platform]
    for name in sorted(spec.secrets):
        flags += ["--secret", name]
    cache = spec.settings.get("remote_cache")
    if cache:
        flags += ["--remote-cache", cache]
    if push:
        flags.append("--push")
    return flags


def build_args(spec: BuildSpec) -> list[str]:
    args = {str(k): str(v) for k, v in (spec.settings.get("args") or {}).items()}
    if spec.settings.get("image_arg"):
        args[spec.settings["image_arg"]] = spec.image_ref
    return [f"--{k}={v}" for k, v in sorted(args.items())]


def command(spec: BuildSpec, target: str, push: bool = False, with_args: bool = True) -> Command:
    binary = spec.user.get("earthly_binary") or "earthly"
    prefix = env_prefix(spec.user)
    env: dict[str, str | None] = {"NO_COLOR": "1", "FORCE_COLOR": None, f"{prefix}_NO_COLOR": "1"}
    env.update(spec.secrets)
    argv = [binary, *global_flags(spec, push), target, *(build_args(spec) if with_args else [])]
    return Command(tuple(argv), env=env, cwd=str(spec.app_dir), secret_env=frozenset(spec.secrets),
                   timeout=float(spec.settings.get("timeout", 3600)), label=f"earthly {target}")


def targets(earthfile: Path) -> set[str]:
    """Target names: unindented ``name:`` lines."""
    return {m.group(1) for line in earthfile.read_text(errors="replace").splitlines()
            if (m := _TARGET_LINE.match(line))}


class EarthlyBuilder:
    name = "earthly"

    def target(self, spec: BuildSpec) -> str:
        return spec.settings.get("target") or "+docker"

    def check(self, spec: BuildSpec) -> None:
        ef = spec.app_dir / "Earthfile"
        if not ef.exists():
            raise UserError("the tagged commit has no Earthfile; commit one, or set "
                            "`builder: dockerfile` in .earthkamal.yml to build the Dockerfile.")
        target = self.target(spec)
        if target.startswith("+") and target[1:] not in targets(ef):
            raise UserError(f"the Earthfile at this commit has no target {target}; add it, or set "
                            "`earthly.target` in .earthkamal.yml to the target that saves the "
                            "image.")

    def gate_commands(self, spec: BuildSpec, gates: list[str]) -> list[tuple[str, Command]]:
        return [(g, command(spec, g, with_args=False)) for g in gates]

    def build_command(self, spec: BuildSpec) -> Command:
        return command(spec, self.target(spec), push=spec.push)

    def built_image(self, spec: BuildSpec, result: Result) -> str:
        if spec.settings.get("image_arg"):
            return spec.image_ref
        if spec.settings.get("image"):
            return spec.settings["image"]
        target = self.target(spec)
        for line in result.tail + result.output.splitlines():
            m = _OUTPUT.search(line) or _PUSHED.search(line)
            if m and m.group(1).endswith(target):
                return m.group(2)
        raise UserError(f"Earthly did not report an image for {target}; make sure the target "
                        "ends with SAVE IMAGE, or set `earthly.image` in .earthkamal.yml.")

    def should_retry(self, result: Result) -> bool:
        return "inconsistent graph state" in "\n".join(result.tail)

    def explain(self, spec: BuildSpec, result: Result, what: str) -> str:
        code = result.returncode
        host = spec.user.get("buildkit_host") or "Earthly's default"
        if result.timed_out:
            return f"{what} timed out."
        if code == 6:
            return (f"Earthly cannot reach the BuildKit daemon ({host}); start Docker (Earthly "
                    "starts its earthly-buildkitd container there) or fix `buildkit_host` in "
                    "the agent's config.yml, then `earthkamal-agent retry`.")
        if code == 7:
            return ("the BuildKit daemon crashed or was restarted by another Earthly run with "
                    "different settings; retry the job (all builds share one daemon).")
        if code == 9:
            return (f"{what} needs privileged mode (RUN --privileged); the agent does not pass "
                    "--allow-privileged; remove --privileged from the Earthfile.")
        if code == 255:
            return (f"emulation failed building {spec.platform} on this {host_arch()} machine; "
                    "install QEMU binfmt support for that architecture or build on a "
                    f"{spec.platform.split('/')[-1]} machine.")
        if code == 2:
            return f"{what} was canceled."
        tail = "\n".join(result.tail)
        if "docker not available" in tail or "Is docker installed and running" in tail:
            return ("Earthly cannot reach Docker to start its BuildKit daemon; start Docker (or "
                    "set `buildkit_host` in the agent's config.yml to a running BuildKit), then "
                    "`earthkamal-agent retry`.")
        return f"{what} failed (Earthly exit {code}): {result.last_line() or 'see the job log'}"
