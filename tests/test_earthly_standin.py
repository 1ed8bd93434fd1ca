"""Pins the Earthly 0.8.16 / EarthBuild stand-in (tests/standins/earthly/earthly).

Grammar tests run the script without any engine. Build tests use the real Docker engine
(``docker_engine`` / ``base_image`` fixtures from tests/infra/docker.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.infra import need

STANDIN = Path(__file__).parent / "standins" / "earthly" / "earthly"
EARTH = STANDIN.with_name("earth")

EARTHFILE = """\
VERSION 0.8
FROM {base}
WORKDIR /app
ARG --global TAG=dev

docker:
    ARG GREETING=hello
    COPY hello.txt .
    RUN echo "$GREETING $TAG" > greeting.txt
    LABEL service={service}
    CMD ["cat", "/app/greeting.txt"]
    SAVE IMAGE --push {image}:$TAG

needs-arg:
    ARG --required WHO
    RUN echo "$WHO"

fails:
    RUN echo about to fail && exit 3

priv:
    RUN --privileged echo hi

secret:
    RUN --secret TOKEN test "$(printf %s "$TOKEN" | md5sum | cut -c1-32)" = "{secret}" \\
        && echo secret-ok
    SAVE IMAGE {image}:secret

slow:
    RUN sleep {sleep}
    SAVE IMAGE {image}:slow

dep:
    RUN echo from-dep > /dep.txt

uses-dep:
    FROM +dep
    RUN test -f /dep.txt
    SAVE IMAGE {image}:uses-dep

all:
    BUILD +docker --TAG=built
"""


def run(args, cwd, env=None, prog=STANDIN, timeout=120):
    e = dict(os.environ)
    e.pop("EARTHLY_BUILDKIT_HOST", None)
    e["NO_COLOR"] = "1"
    e.update(env or {})
    return subprocess.run(
        [str(prog), *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture()
def project(tmp_path):
    """A project dir with an Earthfile; no engine needed to parse it."""
    (tmp_path / "hello.txt").write_text("hi\n")
    (tmp_path / "Earthfile").write_text(
        EARTHFILE.format(base="scratch", service="x", image="ek-standin/x", secret="0", sleep=1)
    )
    state = tmp_path / "state"
    return tmp_path, {"EARTHLY_STANDIN_STATE": str(state), "HOME": str(tmp_path / "home")}


# ------------------------------------------------------------------ grammar, no engine


@pytest.mark.parametrize("prog,expected", [(STANDIN, "earthly version v0.8.16 "),
                                           (EARTH, "earth version v0.8.18 ")])
def test_version(project, prog, expected):
    d, env = project
    r = run(["--version"], d, env, prog=prog)
    assert r.returncode == 0
    assert r.stdout.startswith(expected)


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--satellite", "s", "+docker"], 1, "flag provided but not defined: -satellite"),
        (["--org", "o", "+docker"], 1, "flag provided but not defined: -org"),
        (["--auth-token=t", "+docker"], 1, "flag provided but not defined: -auth-token"),
        (["--bogus", "+docker"], 1, "flag provided but not defined: -bogus"),
        (["+docker", "--push"], 1, "parse args +docker --push: no value provided for --push"),
        (["+docker", "extra"], 1, "invalid arguments +docker extra"),
        ([], 1, "no target reference provided. Try earthly +<target-name>"),
        (["docker"], 1, "invalid target docker"),
        (["+nope"], 1, "target nope not found"),
        (["+needs-arg"], 1, "value not supplied for required ARG: WHO"),
        (["+docker", "--EARTHLY_TARGET=x"], 1,
         "built-in arg EARTHLY_TARGET cannot be passed on the command line"),
        (["+priv"], 9, "earthly --allow-privileged (earthly -P) flag is required"),
        (["--secret", "EK_UNSET_SECRET", "+docker"], 1,
         'failed to set secret "EK_UNSET_SECRET" via --secret flag without a value'),
        (["--secret-file", "X", "+docker"], 1, 'unable to parse --secret-file argument: "X"'),
        (["--config", "/nonexistent/cfg.yml", "+docker"], 1,
         "read config: open /nonexistent/cfg.yml: no such file or directory"),
        (["--interactive", "+docker"], 1, "--interactive is not implemented by the stand-in"),
        (["github.com/earthly/earthly+docker"], 1, "remote target"),
        (["ls"], 1, "subcommand is not implemented by the stand-in"),
        (["--push=maybe", "+docker"], 1, 'invalid boolean value "maybe"'),
    ],
)
def test_grammar_errors(project, args, code, message):
    d, env = project
    r = run(args, d, env)
    assert r.returncode == code, r.stderr
    assert message in r.stderr
    assert not (d / "state" / "history").exists()  # refused before any "buildkitd" contact


def test_unknown_flag_prints_incorrect_usage_on_stdout(project):
    d, env = project
    r = run(["--satellite", "s", "+docker"], d, env)
    assert r.stdout.startswith("Incorrect Usage: flag provided but not defined: -satellite")
    assert "Error: flag provided but not defined: -satellite" in r.stderr


def test_build_arg_flag_after_target_warns(project):
    d, env = project
    r = run(["+needs-arg", "--build-arg=WHO=x"], d, env)
    assert 'Found a flag named "build-arg=WHO=x"' in r.stderr
    assert r.returncode == 1  # WHO itself was never given


@pytest.mark.parametrize(
    "earthfile,message",
    [
        ("docker:\n    RUN true\n", "No version specified in ./Earthfile"),
        ("VERSION 0.9\ndocker:\n    RUN true\n", "Earthfile version is invalid"),
        ("VERSION\ndocker:\n    RUN true\n", "unexpected VERSION arguments"),
        ("VERSION 0.8\ndocker:\n    FROBNICATE x\n", "unknown command 'FROBNICATE'"),
        ("VERSION 0.8\ndocker:\n    RUN --bogus true\n", "unknown flag `bogus'"),
        ("VERSION 0.8\nt:\n    RUN true\nt:\n    RUN true\n", 'duplicate target "t"'),
    ],
)
def test_earthfile_errors(tmp_path, earthfile, message):
    (tmp_path / "Earthfile").write_text(earthfile)
    r = run(["+docker"], tmp_path, {"EARTHLY_STANDIN_STATE": str(tmp_path / "s")})
    assert r.returncode == 1
    assert message in r.stderr


def test_no_earthfile(tmp_path):
    r = run(["+docker"], tmp_path, {"EARTHLY_STANDIN_STATE": str(tmp_path / "s")})
    assert r.returncode == 1
    assert "No Earthfile nor build.earth file found for target +docker" in r.stderr


def test_earth_warns_for_earthly_env(project):
    d, env = project
    r = run(["--version"], d, {**env, "EARTHLY_VERBOSE": "1"}, prog=EARTH)
    assert "WARNING: EARTHLY_VERBOSE is deprecated. Use EARTH_VERBOSE." in r.stderr
    r = run(["--version"], d, {**env, "EARTHLY_VERBOSE": "1"})
    assert "deprecated" not in r.stderr


def test_docker_unreachable_is_exit_1(project):
    d, env = project
    r = run(["+docker"], d, {**env, "DOCKER_HOST": f"unix://{d}/no.sock"})
    assert r.returncode == 1
    assert "Is docker installed and running?" in r.stderr
    assert "Error: build new buildkitd client: docker not available" in r.stderr


@pytest.mark.parametrize("how", ["flag", "env", "config"])
def test_unreachable_buildkit_host_is_exit_6(project, how):
    d, env = project
    host = "tcp://127.0.0.1:1"
    env = {**env, "EARTHLY_STANDIN_CONNECT_TIMEOUT": "2"}
    args = ["+docker"]
    if how == "flag":
        args = ["--buildkit-host", host, *args]
    elif how == "env":
        env["EARTHLY_BUILDKIT_HOST"] = host
    else:
        cfg = d / "cfg.yml"
        cfg.write_text(f"global:\n  buildkit_host: {host}\n")
        args = ["--config", str(cfg), *args]
    r = run(args, d, env)
    assert r.returncode == 6, r.stderr
    assert "buildkitd | Connecting to tcp://127.0.0.1:1..." in r.stderr
    assert "could not connect to buildkit" in r.stderr
    assert "buildkitd did not respond (in time)" in r.stderr


# ------------------------------------------------------------------ builds on the engine


@pytest.fixture()
def built(tmp_path, docker_engine, base_image, request):
    name = f"ek-standin/{request.node.name.lower().replace('[', '-').replace(']', '')}"[:100]
    (tmp_path / "hello.txt").write_text("hi\n")
    (tmp_path / "Earthfile").write_text(
        EARTHFILE.format(base=base_image, service="svc", image=name,
                         secret=hashlib.md5(b"s3cret").hexdigest(), sleep=20)
    )
    env = docker_engine.full_env(
        {"EARTHLY_STANDIN_STATE": str(tmp_path / "state"), "HOME": str(tmp_path / "home")}
    )
    yield tmp_path, env, name, docker_engine
    out = docker_engine.run("images", "--format", "{{.Repository}}:{{.Tag}}", name, check=False)
    for ref in out.stdout.split():
        docker_engine.run("rmi", ref, check=False)


def history(d: Path) -> list[list[str]]:
    p = d / "state" / "history"
    return [ln.split() for ln in p.read_text().splitlines()] if p.exists() else []


def test_build_outputs_image(built):
    d, env, name, eng = built
    r = run(["+docker", "--TAG=v1", "--GREETING=hey"], d, env)
    assert r.returncode == 0, r.stderr
    assert f"Image +docker output as {name}:v1" in r.stderr
    assert f"Did not push image {name}:v1" in r.stderr
    out = eng.run("run", "--rm", f"{name}:v1")
    assert out.stdout.strip() == "hey v1"
    label = eng.run("inspect", "-f", "{{ .Config.Labels.service }}", f"{name}:v1")
    assert label.stdout.strip() == "svc"
    h = history(d)
    assert len(h) == 1 and h[0][4] == "0"


def test_arg_file_and_no_output(built):
    d, env, name, eng = built
    (d / ".arg").write_text("TAG=fromfile\n")
    r = run(["--no-output", "+docker"], d, env)
    assert r.returncode == 0, r.stderr
    assert "output as" not in r.stderr
    assert not eng.image_exists(f"{name}:fromfile")
    r = run(["--ci", "--output", "+docker"], d, env)
    assert r.returncode == 0, r.stderr
    assert eng.image_exists(f"{name}:fromfile")


def test_build_and_from_target(built):
    d, env, name, eng = built
    r = run(["+all"], d, env)
    assert r.returncode == 0, r.stderr
    assert f"Image +docker output as {name}:built" in r.stderr
    r = run(["+uses-dep"], d, env)
    assert r.returncode == 0, r.stderr
    assert eng.image_exists(f"{name}:uses-dep")


def test_run_failure(built):
    d, env, _, _ = built
    r = run(["+fails"], d, env)
    assert r.returncode == 1
    assert "did not complete successfully. Exit code 3" in r.stderr


@pytest.mark.parametrize("source", ["env", "secret-file", "dotsecret", "provider"])
def test_secrets(built, source):
    d, env, name, eng = built
    args = ["+secret"]
    if source == "env":
        env = {**env, "TOKEN": "s3cret"}
        args = ["--secret", "TOKEN", *args]
    elif source == "secret-file":
        (d / "tok").write_text("s3cret")
        args = ["--secret-file", f"TOKEN={d / 'tok'}", *args]
    elif source == "dotsecret":
        (d / ".secret").write_text("TOKEN=s3cret\n")
    else:
        prov = d / "provider.sh"
        prov.write_text('#!/bin/sh\n[ "$1" = TOKEN ] || exit 2\nprintf s3cret\n')
        prov.chmod(0o755)
        (d / "cfg.yml").write_text(f"global:\n  secret_provider: {prov}\n")
        args = ["--config", str(d / "cfg.yml"), *args]
    r = run(args, d, env)
    assert r.returncode == 0, r.stderr
    assert "secret-ok" in r.stderr
    assert "s3cret" not in r.stderr.replace("secret-ok", "")


def test_secret_not_found_via_provider(built):
    d, env, _, _ = built
    prov = d / "provider.sh"
    prov.write_text("#!/bin/sh\nexit 2\n")
    prov.chmod(0o755)
    (d / "cfg.yml").write_text(f"global:\n  secret_provider: {prov}\n")
    r = run(["--config", str(d / "cfg.yml"), "+secret"], d, env)
    assert r.returncode == 1
    assert "unable to lookup secret TOKEN: not found" in r.stderr


def test_fail_once_inconsistent(built):
    d, env, _, _ = built
    (d / "state").mkdir(exist_ok=True)
    (d / "state" / "fail-once-inconsistent").touch()
    r = run(["+docker"], d, env)
    assert r.returncode == 1
    assert "failed to get edge: inconsistent graph state" in r.stderr
    assert not (d / "state" / "fail-once-inconsistent").exists()
    assert run(["+docker"], d, env).returncode == 0


def test_foreign_platform_without_qemu(built):
    d, env, _, _ = built
    need("no binfmt qemu-aarch64", not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists(),
         "QEMU emulation is installed here")
    r = run(["--platform", "linux/arm64", "+docker"], d, env)
    assert r.returncode == 255
    assert "You may have to manually install QEMU" in r.stderr


def test_push_to_registry(built, registry):
    d, env, _, eng = built
    repo = f"{registry.server}/ek-standin-push"
    (d / "Earthfile").write_text((d / "Earthfile").read_text().replace(built[2], repo))
    cfg = d / "dockercfg"
    cfg.mkdir()
    auth = base64.b64encode(f"{registry.username}:{registry.password}".encode()).decode()
    (cfg / "config.json").write_text(json.dumps({"auths": {registry.server: {"auth": auth}}}))
    r = run(["--push", "+docker", "--TAG=p1"], d, {**env, "DOCKER_CONFIG": str(cfg)})
    assert r.returncode == 0, r.stderr
    assert f"Pushed image +docker as {repo}:p1" in r.stderr
    assert "p1" in registry.tags("ek-standin-push")
    eng.run("rmi", f"{repo}:p1", check=False)


def _wait_active(d: Path, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        act = d / "state" / "active"
        if act.exists() and len(list(act.iterdir())) >= n:
            return
        time.sleep(0.1)
    raise AssertionError("stand-in did not register as active")


def _spawn(args, d, env):
    e = {**env, "NO_COLOR": "1"}
    return subprocess.Popen([str(STANDIN), *args], cwd=d, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_same_settings_share_the_daemon(built):
    d, env, _, _ = built
    (d / "Earthfile").write_text((d / "Earthfile").read_text().replace("sleep 20", "sleep 2"))
    procs = [_spawn(["--no-cache", "+slow"], d, env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    h = history(d)
    assert len({row[3] for row in h}) == 1
    (s1, e1), (s2, e2) = [(float(r[0]), float(r[1])) for r in h]
    assert s1 < e2 and s2 < e1  # they overlapped


def test_different_settings_restart_kills_running_build(built):
    d, env, _, _ = built
    first = _spawn(["--no-cache", "+slow"], d, env)
    _wait_active(d, 1)
    time.sleep(1)
    second = run(["--debug", "+docker"], d, env)
    out, errs = first.communicate(timeout=60)
    assert first.returncode == 7, errs
    assert "It seems that buildkitd is shutting down or it has crashed" in errs
    assert second.returncode == 0, second.stderr
    assert "Settings do not match. Restarting buildkit daemon" in second.stderr
    h = history(d)
    assert len({row[3] for row in h}) == 2
    assert (d / "state" / "restarts").exists()


def test_sigterm_cancels(built):
    d, env, _, _ = built
    p = _spawn(["--no-cache", "+slow"], d, env)
    _wait_active(d, 1)
    time.sleep(1)
    p.send_signal(signal.SIGTERM)
    out, errs = p.communicate(timeout=60)
    assert p.returncode == 2
    assert "Received signal terminated. Cleaning up before exiting..." in out
    assert "Canceled" in errs
    assert not list((d / "state" / "active").iterdir())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
