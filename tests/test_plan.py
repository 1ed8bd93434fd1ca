"""`earthkamal-agent plan --json`: the image ref equals what real `kamal config` resolves.

Each case is a small committed repo (deploy.yml, Dockerfile, .earthkamal.yml). The plan runs
through the CLI once with Kamal on PATH and once with `kamal_binary` pointing at a missing
program (so `kamal.resolve` reads deploy.yml itself); both must name the image the way
`kamal config --version=V [-d D]` prints it as `:absolute_image:`. ERB needs Kamal: without
it the plan is one sentence. Kamal calls are kept to two per case (~1 s each).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import cli, git, make_repo
from tests.infra import need_bin

DOCKERFILE = "FROM scratch\nLABEL service=app\nCOPY README /README\n"

BASE = """\
service: app
image: {image}
servers:
  web:
    hosts: [192.0.2.10]
registry:
{registry}
builder:
  arch: amd64
"""

# name: (deploy.yml, extra files, .earthkamal.yml, tag, destination, env, absolute image)
CASES = {
    "dockerhub": (BASE.format(image="user/app", registry=(
        "  username: user\n  password: [KAMAL_REGISTRY_PASSWORD]")), {}, "", "v1.0.0", None, {},
        "user/app:v1.0.0"),
    "ghcr": (BASE.format(image="org/app", registry=(
        "  server: ghcr.io\n  username: bot\n  password: [GHCR_TOKEN]")), {}, "", "v1.0.0",
        None, {}, "ghcr.io/org/app:v1.0.0"),
    "port": (BASE.format(image="team/app", registry=(
        "  server: registry.example.com:5000\n  username: u\n  password: [PW]")), {}, "",
        "v1.0.0", None, {}, "registry.example.com:5000/team/app:v1.0.0"),
    "localhost": (BASE.format(image="app", registry="  server: localhost:5555"), {}, "",
                  "v1.0.0", None, {}, "localhost:5555/app:v1.0.0"),
    "registry_path": (BASE.format(image="app", registry=(
        "  server: us-docker.pkg.dev/proj/repo\n  username: _json_key\n  password: [GCP_KEY]")),
        {}, "", "v1.0.0", None, {}, "us-docker.pkg.dev/proj/repo/app:v1.0.0"),
    "destination": (BASE.format(image="org/app", registry=(
        "  server: ghcr.io\n  username: bot\n  password: [GHCR_TOKEN]")),
        {"config/deploy.staging.yml": "registry:\n  server: registry.example.com:5000\n"},
        'destinations:\n  "v*-rc*": staging\n', "v2.0.0-rc1", "staging", {},
        "registry.example.com:5000/org/app:v2.0.0-rc1"),
    "anchors": ("""\
x-registry: &reg
  server: ghcr.io
  username: bot
  password: [GHCR_TOKEN]
x-hosts: &hosts [192.0.2.10]
service: app
image: org/anchored
servers:
  web:
    hosts: *hosts
registry:
  <<: *reg
builder:
  arch: amd64
""", {}, "", "v1.0.0", None, {}, "ghcr.io/org/anchored:v1.0.0"),
    "erb": (BASE.format(image="org/app", registry=(
        '  server: <%= ENV["EK_PLAN_REGISTRY"] %>\n  username: bot\n'
        "  password: [GHCR_TOKEN]")), {}, "", "v1.0.0", None,
        {"EK_PLAN_REGISTRY": "quay.io"}, "quay.io/org/app:v1.0.0"),
}


def _repo(root: Path, deploy: str, extra: dict[str, str], ek: str, tag: str | None) -> Path:
    files = {"README": "plan\n", "Dockerfile": DOCKERFILE, "config/deploy.yml": deploy,
             ".kamal/secrets": "KAMAL_REGISTRY_PASSWORD=$KAMAL_REGISTRY_PASSWORD\n", **extra}
    if ek:
        files[".earthkamal.yml"] = ek
    make_repo(root, files=files)
    if tag:
        git(root, "tag", tag)
    return root


def _home(tmp: Path, name: str, **user) -> Path:
    home = tmp / name
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "config.yml").write_text(json.dumps({"approvals": "none", **user}))
    return home


def _plan(home: Path, repo: Path, tag: str | None, env: dict | None = None,
          check: bool = True) -> subprocess.CompletedProcess:
    args = ["plan", *([tag] if tag else []), "--repo", str(repo), "--json"]
    return cli(home, *args, env=env, check=check)


def _kamal_absolute_image(app: Path, version: str, dest: str | None, env: dict) -> str:
    e = {**os.environ, **env}
    e.pop("VERSION", None)
    r = subprocess.run(["kamal", "config", f"--version={version}",
                        *(["-d", dest] if dest else [])], cwd=app, env=e,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"^:absolute_image: (\S+)$", r.stdout, re.M)
    assert m, r.stdout
    return m.group(1)


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan-homes")
    return {"kamal": _home(tmp, "with-kamal"),
            "nokamal": _home(tmp, "without-kamal", kamal_binary=str(tmp / "no" / "kamal"))}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_image_matches_kamal_config(case, tmp_path, homes):
    need_bin("kamal")
    deploy, extra, ek, tag, dest, env, expected = CASES[case]
    repo = _repo(tmp_path / "app", deploy, extra, ek, tag)
    kamal_says = _kamal_absolute_image(repo, tag, dest, env)
    assert kamal_says == expected  # the table is Kamal's truth, not ours

    p = json.loads(_plan(homes["kamal"], repo, tag, env=env).stdout)
    assert p["tag_exists"] and p["destination"] == dest
    assert p["names_from"] == "kamal config"
    assert p["image"] == kamal_says
    assert p["repository"] == kamal_says.rsplit(":", 1)[0]
    assert p["version"] == tag
    assert p["build"]["argv"][p["build"]["argv"].index("-t") + 1] == kamal_says
    assert "--platform" in p["build"]["argv"] and "linux/amd64" in p["build"]["argv"]
    assert p["push"]["local_registry"] == (case == "localhost")
    assert p["deploy"]["argv"][:3] == ["kamal", "deploy", "--skip-push"]
    assert f"--version={tag}" in p["deploy"]["argv"]
    if dest:
        assert p["deploy"]["argv"][-2:] == ["-d", dest]
        assert f"config/deploy.{dest}.yml" in p["files"]

    r = _plan(homes["nokamal"], repo, tag, env=env, check=False)
    if case == "erb":
        assert r.returncode == 1, r.stdout
        err = r.stderr.decode()
        assert err.startswith("earthkamal-agent: config/deploy.yml uses ERB"), err
        assert "only Kamal can evaluate" in err and "Traceback" not in err
        return
    assert r.returncode == 0, r.stderr.decode()
    q = json.loads(r.stdout)
    assert q["names_from"] == "deploy.yml"
    assert q["image"] == kamal_says
    assert q["build"] == p["build"]


@pytest.mark.parametrize("bad,fixed", [("v1.2.3+build.5", "v1.2.3-build.5"),
                                       ("release/1.0", "release-1.0")])
def test_versions_docker_rejects_get_the_sentence(bad, fixed, tmp_path, homes):
    deploy, extra, ek, *_ = CASES["ghcr"]
    repo = _repo(tmp_path / "app", deploy, extra, ek, None)
    r = _plan(homes["nokamal"], repo, bad, check=False)
    assert r.returncode == 1
    err = r.stderr.decode().strip()
    assert err == (
        f"earthkamal-agent: The tag {bad!r} is not a valid Docker image tag (allowed: letters, "
        "digits, '_', '.' and '-', starting with a letter, digit or '_', at most 128 "
        f"characters); set `sanitize_version: true` in .earthkamal.yml to release it as "
        f"{fixed!r}, or set `version: sha` to use the commit SHA."), err


def test_plan_for_missing_tag_uses_head(tmp_path, homes):
    deploy, extra, ek, *_ = CASES["ghcr"]
    repo = _repo(tmp_path / "app", deploy, extra, ek, "v1.0.0")
    (repo / "README").write_text("newer\n")
    git(repo, "commit", "-qam", "after the tag")
    head = git(repo, "rev-parse", "HEAD").stdout.decode().strip()
    tagged = git(repo, "rev-parse", "v1.0.0^{commit}").stdout.decode().strip()
    assert head != tagged
    p = json.loads(_plan(homes["nokamal"], repo, "v9.9.9").stdout)
    assert (p["tag"], p["tag_exists"], p["commit"]) == ("v9.9.9", False, head)
    assert p["image"] == "ghcr.io/org/app:v9.9.9"
    p = json.loads(_plan(homes["nokamal"], repo, "v1.0.0").stdout)
    assert (p["tag_exists"], p["commit"]) == (True, tagged)
    text = cli(homes["nokamal"], "plan", "v9.9.9", "--repo", str(repo)).stdout.decode()
    assert "tag does not exist yet: planned against HEAD" in text


@pytest.mark.parametrize("builder", ["earthly", "dockerfile"])
def test_secret_values_are_masked(builder, tmp_path, homes):
    value = "ek-plan-secret-0f6c1a9d"
    deploy, extra, _, *_ = CASES["ghcr"]
    files = dict(extra)
    if builder == "earthly":
        files["Earthfile"] = ("VERSION 0.8\ndocker:\n    FROM scratch\n    LABEL service=app\n"
                              "    SAVE IMAGE ghcr.io/org/app:latest\n")
    ek = (f"builder: {builder}\n{builder}:\n  secrets: [NPM_TOKEN]\n"
          "secrets: [APP_SECRET]\n")
    repo = _repo(tmp_path / "app", deploy, files, ek, "v1.0.0")
    env = {"NPM_TOKEN": value, "APP_SECRET": value, "KAMAL_REGISTRY_PASSWORD": value}
    r = _plan(homes["nokamal"], repo, "v1.0.0", env=env)
    out = r.stdout.decode()
    assert value not in out + r.stderr.decode()
    p = json.loads(out)
    argv = p["build"]["argv"]
    if builder == "earthly":
        i = argv.index("--secret")
        assert argv[i + 1] == "NPM_TOKEN"  # the name only; the value goes by environment
        assert p["build"]["env"]["NPM_TOKEN"] == "********"
    else:
        secret = [a for a in argv if a.startswith("id=NPM_TOKEN,")]
        assert secret and secret[0].startswith("id=NPM_TOKEN,src="), argv
        assert "NPM_TOKEN" not in p["build"]["env"]
    assert "KAMAL_REGISTRY_PASSWORD" in p["deploy"]["secrets"]
    assert not any(value in a for a in p["deploy"]["argv"])
