"""Setting up an agent that builds and publishes for real (docker, registry, keyring)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import AgentProcess, cli, git, jobs, make_repo, wait_for
from tests.infra.apps import write_sample_app

STANDIN = Path(__file__).parent / "standins" / "earthly"


@dataclass
class Env:
    home: Path
    env: dict
    registry: object
    app_root: Path | None = None
    app: object = None
    agents: list = field(default_factory=list)

    def cli(self, *args: str, **kw):
        return cli(self.home, *args, env=self.env, **kw)

    def jobs(self) -> list[dict]:
        return jobs(self.home, self.env)

    def job(self, tag: str) -> dict:
        return [j for j in self.jobs() if j["tag"] == tag][0]

    def agent(self, *args: str) -> AgentProcess:
        a = AgentProcess(self.home, *args, env=self.env).start()
        self.agents.append(a)
        return a

    def wait_state(self, tag: str, *states: str, timeout: float = 120) -> dict:
        def done():
            js = [j for j in self.jobs() if j["tag"] == tag]
            return js[0] if js and js[0]["state"] in states else None
        try:
            return wait_for(done, timeout=timeout, interval=0.2, what=f"{tag} in {states}")
        except AssertionError:
            js = [j for j in self.jobs() if j["tag"] == tag]
            log = ""
            if js:
                p = self.home / "logs" / f"job-{js[0]['id']}.log"
                log = p.read_text() if p.exists() else ""
            agent = self.agents[-1].stderr() if self.agents else ""
            raise AssertionError(f"{tag} not in {states}: {js}\n--- job log ---\n{log}\n"
                                 f"--- agent ---\n{agent}") from None

    def stop(self) -> None:
        for a in self.agents:
            a.stop()


def user_config(home: Path, docker_engine, **extra) -> None:
    cfg = home / "config"
    cfg.mkdir(parents=True, exist_ok=True)
    data = {"docker_binary": docker_engine.docker, "earthly_binary": str(STANDIN / "earthly"),
            "approvals": "none", **extra}
    (cfg / "config.yml").write_text(json.dumps(data))


def unique(name: str) -> str:
    return name + hashlib.sha1(str(Path.cwd()).encode() + name.encode()).hexdigest()[:0]


def setup_app(tmp_path: Path, docker_engine, registry, keyring, *, service: str, ssh=None,
              earthfile: bool = False, extra_env: dict | None = None,
              extra_config: dict | None = None, local_registry: bool = False,
              registry_server: str | None = None, user_extra: dict | None = None) -> Env:
    home = tmp_path / "home"
    env = {**docker_engine.env, **keyring.env, "EARTHLY_STANDIN_STATE": str(tmp_path / "earthly"),
           **(extra_env or {})}
    env["PATH"] = f"{STANDIN / 'earthly'}:" + __import__("os").environ["PATH"]
    user_config(home, docker_engine, **(user_extra or {}))
    root = tmp_path / service
    app = write_sample_app(
        root, service=service, image=f"ektest/{service}",
        registry_server=registry_server or registry.server,
        registry_username=None if local_registry else registry.username,
        ssh=ssh or {"user": "root"}, earthfile=earthfile, local_registry=local_registry,
        extra_config=extra_config)
    make_repo(root, files={})
    e = Env(home=home, env=env, registry=registry, app_root=root, app=app)
    e.cli("install", str(root))
    if not local_registry:
        e.cli("secrets", "set", "KAMAL_REGISTRY_PASSWORD", "--repo", str(root),
              input=registry.password.encode())
    return e


def tag(e: Env, name: str, version_text: str | None = None) -> None:
    if version_text is not None:
        (e.app_root / "version.txt").write_text(version_text + "\n")
        git(e.app_root, "commit", "-qam", f"release {name}")
    git(e.app_root, "tag", name)


__all__ = ["Env", "setup_app", "tag", "make_repo"]
