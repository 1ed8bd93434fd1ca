"""Warm rebuild: tag after a one-line source change vs a cold build, through the agent.

A generated app (Dockerfile: the test base image, a RUN that does real work, generating ~5000
files, a 64 MB random blob and its checksum plus a busy loop, a small RUN, then `COPY src/` of
~200 source files and the `service` label) is released by the agent for real: `git tag`, then
`python -m earthkamal_agent run --once` (snapshot, `kamal config` when Kamal is on PATH,
`docker build` through BuildKit, tag, `docker login`/push to a password-protected registry with
the keyring password, digest check), timed from `git tag` to the job reaching
`awaiting_approval` (`run --once` returning; the job state is checked).

  * cold: a fresh build arg `SEED` (committed in .earthkamal.yml `dockerfile.args`) that the
    work RUN uses, so nothing after the base image is cached; every layer is pushed.
  * warm: the next tag changes one line of one source file; the RUN layers come from the cache
    and only the COPY layer is rebuilt and pushed.
  * floor (printed, not in the ratio): one more tag on the same commit, so every layer is
    cached and already in the registry: the agent's fixed cost (start-up, `kamal config`,
    docker build/inspect/push round trips).

Rounds alternate cold, warm (>= 3 of each); medians. It needs what the tests use, started the
same way: the Docker engine (reused when `/run/earthkamal-test/docker.sock` answers, else
Debian's dockerd started as in tests/infra/docker.py; root), Debian's `docker-registry` and
`htpasswd` (tests/infra/registry.py), gnome-keyring on a private D-Bus (tests/infra/keyring.py).

    python bench/warm_rebuild.py [--rounds 3] [--files 5000] [--mb 64] [--loop 500000]

Last line: `ratio: <warm/cold> (target <= 0.25)`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _common import TempDir, git, median  # noqa: E402

TARGET = 0.25
# The agent keeps per-job scratch dirs in /dev/shm. Agents before pipeline._scratch_prefix
# deleted every agent's dirs of the same user when they started, failing our job mid-build; as
# root, give our agent a private /dev/shm (mount namespace) so other agents on this shared
# machine (test runs, other checkouts) can neither see nor disturb it.
PRIVATE_SHM: list[str] = []
if os.geteuid() == 0 and shutil.which("unshare"):
    PRIVATE_SHM = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec "$@"', "sh"]
SERVICE = "ekbenchwarm"
IMAGE = "ekbench/warm"


def dockerfile(base: str, files: int, mb: int, loop: int) -> str:
    return (f"FROM {base}\n"
            "ARG SEED=0\n"
            "RUN mkdir -p /gen && cd /gen && i=0 && "
            f"while [ $i -lt {files} ]; do echo \"$SEED $i\" > f$i; i=$((i+1)); done && "
            f"dd if=/dev/urandom of=/gen/blob bs=1M count={mb} 2>/dev/null && "
            "sha256sum /gen/blob f1 > /gen/sums && "
            f"j=0 && while [ $j -lt {loop} ]; do j=$((j+1)); done\n"
            "RUN mkdir -p /www && echo ok > /www/up\n"
            "COPY src/ /app/src/\n"
            f"LABEL service={SERVICE}\n")


def engine():
    """(DockerEngine, dockerd Popen or None): reuse the test engine or start it."""
    from tests.infra import docker as d

    eng = d.DockerEngine(env={"DOCKER_HOST": d.HOST, "DOCKER_BUILDKIT": "1"})
    if d._answers(d.DOCKER_CLIENT, d.HOST):
        return eng, None
    if os.geteuid() != 0:
        raise SystemExit("no engine on the test socket and starting dockerd needs root")
    proc = d._start_dockerd()
    deadline = time.monotonic() + 60
    while not d._answers(d.DOCKER_CLIENT, d.HOST):
        if proc.poll() is not None or time.monotonic() > deadline:
            d._stop(proc)
            raise SystemExit(f"dockerd did not come up (log: {d.LOGFILE})")
        time.sleep(0.2)
    return eng, proc


def base_image(eng) -> str:
    from tests.infra import docker as d

    if not eng.image_exists(d.BASE_IMAGE):
        subprocess.run([eng.docker, "import", "--change", 'CMD ["/bin/sh"]', "-", d.BASE_IMAGE],
                       input=d.busybox_rootfs_tar(), env=eng.full_env(), check=True,
                       capture_output=True, timeout=120)
    return d.BASE_IMAGE


class Agent:
    def __init__(self, home: Path, env: dict) -> None:
        self.home = home
        self.env = {**os.environ, **env, "EARTHKAMAL_HOME": str(home)}
        self.env.pop("VERSION", None)

    def cli(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "earthkamal_agent", *args]
        if args[0] == "run" and PRIVATE_SHM:
            argv = [*PRIVATE_SHM, *argv]
        r = subprocess.run(argv, env=self.env, capture_output=True, input=input, timeout=900)
        if r.returncode != 0:
            raise SystemExit(f"earthkamal-agent {' '.join(args)} exited {r.returncode}:\n"
                             f"{r.stdout.decode()}{r.stderr.decode()}")
        return r

    def job(self, tag: str) -> dict:
        jobs = json.loads(self.cli("status", "--json").stdout)["jobs"]
        return [j for j in jobs if j["tag"] == tag][0]


def release(agent: Agent, app: Path, tag: str) -> float:
    t0 = time.perf_counter()
    git(app, "tag", tag)
    agent.cli("run", "--once")
    dt = time.perf_counter() - t0
    j = agent.job(tag)
    if j["state"] not in ("awaiting_approval", "superseded"):
        log = (agent.home / "logs" / f"job-{j['id']}.log").read_text(errors="replace")
        raise SystemExit(f"{tag} ended {j['state']}: {j['reason']}\n{log[-3000:]}")
    return dt


def commit(app: Path, msg: str) -> None:
    git(app, "add", "-A")
    git(app, "commit", "-q", "-m", msg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--loop", type=int, default=500000)
    a = ap.parse_args()

    from tests.infra.apps import write_sample_app
    from tests.infra.keyring import start_keyring
    from tests.infra.registry import Registry

    eng, dockerd = engine()
    reg = kr = None
    with TempDir("warm") as tmp:
        try:
            base = base_image(eng)
            reg = Registry(tmp / "registry")
            reg.start()
            kr = start_keyring(tmp / "keyring")
            home = tmp / "home"
            (home / "config").mkdir(parents=True)
            (home / "config" / "config.yml").write_text(json.dumps(
                {"docker_binary": eng.docker, "approvals": "none"}))
            agent = Agent(home, {**eng.env, **kr.env})
            app = tmp / "app"
            write_sample_app(app, service=SERVICE, image=IMAGE, registry_server=reg.server,
                             registry_username=reg.username, ssh={"user": "root"})
            (app / "Dockerfile").write_text(dockerfile(base, a.files, a.mb, a.loop))
            src = app / "src"
            for i in range(200):
                (src / f"m{i // 20}").mkdir(parents=True, exist_ok=True)
                (src / f"m{i // 20}" / f"f{i}.py").write_text(
                    "".join(f"def f{i}_{k}():\n    return {k}\n" for k in range(20)))
            git(app, "init", "-q", "-b", "main")
            git(app, "config", "gc.auto", "0")
            commit(app, "initial")
            agent.cli("install", str(app))
            agent.cli("secrets", "set", "KAMAL_REGISTRY_PASSWORD", "--repo", str(app),
                      input=reg.password.encode())
            cold, warm, floor = [], [], []
            for r in range(a.rounds):
                (app / ".earthkamal.yml").write_text(
                    f"builder: dockerfile\ndockerfile:\n  args:\n    SEED: {uuid.uuid4().hex}\n")
                commit(app, f"round {r}: fresh seed")
                cold.append(release(agent, app, f"v{r}.0.0"))
                f = src / "m3" / "f61.py"
                f.write_text(re.sub(r"^    return 7( \+ \d+)?$", f"    return 7 + {r + 1}",
                                    f.read_text(), count=1, flags=re.M))
                commit(app, f"round {r}: one-line change")
                warm.append(release(agent, app, f"v{r}.0.1"))
                floor.append(release(agent, app, f"v{r}.0.2"))
                print(f"round {r + 1}: cold {cold[-1]:.2f} s, warm {warm[-1]:.2f} s, floor "
                      f"{floor[-1]:.2f} s", flush=True)
            pushed = reg.tags(IMAGE)
            assert all(f"v{r}.0.{k}" in pushed for r in range(a.rounds) for k in (0, 1, 2)), pushed
        finally:
            if kr is not None:
                kr.stop()
            if reg is not None:
                reg.stop()
                out = eng.run("images", "--format", "{{.Repository}}:{{.Tag}}",
                              f"{reg.server}/{IMAGE}", check=False).stdout.split()
                if out:
                    eng.run("rmi", "-f", *out, check=False)
            if dockerd is not None:
                from tests.infra import docker as d

                d._stop(dockerd)
    mc, mw = median(cold), median(warm)
    print(f"cold: median {mc:.2f} s (min {min(cold):.2f}, max {max(cold):.2f}) over "
          f"{len(cold)}")
    print(f"warm: median {mw:.2f} s (min {min(warm):.2f}, max {max(warm):.2f}) over "
          f"{len(warm)}")
    print(f"floor (same commit re-tagged, all cached): median {median(floor):.2f} s")
    ratio = mw / mc
    verdict = "" if ratio <= TARGET else "  MISSES"
    print(f"ratio: {ratio:.2f} (target <= {TARGET}){verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
