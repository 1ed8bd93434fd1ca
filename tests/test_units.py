"""Pure parts: commands as data, config validation, the state machine, redaction, the runner."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from earthkamal_agent import config, publish, store
from earthkamal_agent.builders import BuildSpec, earthly
from earthkamal_agent.builders.dockerfile import DockerfileBuilder
from earthkamal_agent.errors import UserError
from earthkamal_agent.redact import MASK, Redactor
from earthkamal_agent.runner import Command, run


def spec(tmp_path: Path, **kw) -> BuildSpec:
    base = dict(app_dir=tmp_path, image_ref="ghcr.io/acme/app:v1", platform="linux/amd64",
                settings={}, user={}, secrets={}, tmp_dir=tmp_path)
    base.update(kw)
    return BuildSpec(**base)


@pytest.mark.parametrize("binary,prefix", [("earthly", "EARTHLY"), ("earth", "EARTH"),
                                           ("/opt/bin/earth", "EARTH")])
def test_earthly_argv_global_flags_before_target(tmp_path, binary, prefix):
    s = spec(tmp_path, user={"earthly_binary": binary, "buildkit_host": "tcp://127.0.0.1:8372",
                             "earthly_config": "/etc/earthly.yml"},
             settings={"args": {"RUBY": "3.3"}, "image_arg": "IMAGE", "remote_cache": "r/c"},
             secrets={"NPM_TOKEN": "s3cr3t-value"})
    c = earthly.command(s, "+docker", push=False)
    argv = list(c.argv)
    assert argv[0] == binary
    t = argv.index("+docker")
    assert argv[1:t] == ["--buildkit-host", "tcp://127.0.0.1:8372", "--config", "/etc/earthly.yml",
                         "--platform", "linux/amd64", "--secret", "NPM_TOKEN",
                         "--remote-cache", "r/c"]
    assert argv[t + 1:] == ["--IMAGE=ghcr.io/acme/app:v1", "--RUBY=3.3"]
    assert "s3cr3t-value" not in " ".join(argv)
    assert c.env["NPM_TOKEN"] == "s3cr3t-value" and "NPM_TOKEN" in c.secret_env
    assert c.env["NO_COLOR"] == "1" and c.env[f"{prefix}_NO_COLOR"] == "1"
    assert "--build-arg" not in argv


def test_earthly_push_flag_and_exit_code_sentences(tmp_path):
    s = spec(tmp_path, push=True)
    assert "--push" in earthly.command(s, "+docker", push=True).argv[:-1]
    from earthkamal_agent.runner import Result

    b = earthly.EarthlyBuilder()
    assert "cannot reach the BuildKit daemon" in b.explain(s, Result(6, [], 0), "the build")
    assert "emulation failed" in b.explain(s, Result(255, [], 0), "the build")
    assert "privileged" in b.explain(s, Result(9, [], 0), "the build")
    assert b.should_retry(Result(1, ["Error: failed to get edge: inconsistent graph state"], 0))


def test_earthly_check_target(tmp_path):
    (tmp_path / "Earthfile").write_text("VERSION 0.8\nbuild:\n    FROM alpine\ndocker:\n"
                                        "    FROM +build\n    SAVE IMAGE app\n")
    b = earthly.EarthlyBuilder()
    b.check(spec(tmp_path))
    with pytest.raises(UserError, match="no target \\+image"):
        b.check(spec(tmp_path, settings={"target": "+image"}))


def test_dockerfile_argv(tmp_path):
    b = DockerfileBuilder()
    s = spec(tmp_path, settings={"args": {"A": "1"}, "target": "prod"},
             user={"docker_binary": "/usr/bin/docker"}, secrets={"TOKEN": "t0ken-value"})
    c = b.build_command(s)
    assert list(c.argv) == ["/usr/bin/docker", "build", "--progress=plain", "--platform",
                            "linux/amd64", "-f", "Dockerfile", "-t", "ghcr.io/acme/app:v1",
                            "--target", "prod", "--build-arg", "A=1", "--secret",
                            f"id=TOKEN,src={tmp_path}/secret-TOKEN", "."]
    assert c.env["DOCKER_BUILDKIT"] == "1"
    assert "t0ken-value" not in " ".join(c.argv)


def test_publish_commands_keep_password_off_argv():
    c = publish.login_command({}, "ghcr.io", "me", "pa55word", "/tmp/x")
    assert "pa55word" not in " ".join(c.argv) and c.stdin == b"pa55word"
    assert c.env["DOCKER_CONFIG"] == "/tmp/x"
    assert publish.label_problem({}, "myapp", "img:1").startswith(
        "Image img:1 is missing the 'service' label")
    assert publish.label_problem({"service": "myapp"}, "myapp", "i") is None
    assert "arm64" in publish.arch_problem("arm64", "amd64", "i")
    start, run_ = publish.local_registry_commands({}, "5555")
    assert list(run_.argv) == ["docker", "run", "--detach", "-p", "127.0.0.1:5555:5000",
                               "--name", "kamal-docker-registry", "registry:3"]
    assert list(start.argv) == ["docker", "start", "kamal-docker-registry"]


@pytest.mark.parametrize("text,message", [
    (b"tags: 5\n", "`tags` must be a list of strings, got a number."),
    (b"bogus: 1\n", "unknown key `bogus`"),
    (b"- a\n- b\n", "the file must be a mapping"),
    (b"tags: [\n", "not valid YAML at line"),
    (b"approval: maybe\n", "`approval` must be required, auto"),
    (b"approval_timeout: soon\n", "must be a duration like 30m"),
    (b"builder: make\n", "`builder` must be one of auto, earthly, dockerfile"),
    (b"earthly: {target: docker}\n", "`earthly.target` must look like +docker"),
    (b"gate_command: make test\n", "must be a list of arguments like [make, test]"),
    (b"destinations: {'v*': 'prod uction'}\n", "a destination must be a plain name"),
])
def test_repo_config_errors(text, message):
    with pytest.raises(config.ConfigError) as e:
        config.parse_repo_config(text, ".earthkamal.yml at v1")
    assert message in str(e.value) and str(e.value).startswith(".earthkamal.yml at v1: ")


def test_repo_config_policies():
    c = config.parse_repo_config(b"destinations: {'v*-rc*': staging, 'v*': production}\n"
                                 b"approval: {staging: auto}\napproval_timeout: 2h\n", "x")
    assert c.destination_for("v1.0.0-rc1") == "staging"
    assert c.destination_for("v1.0.0") == "production"
    assert c.approval_for("staging") == "auto" and c.approval_for("production") == "required"
    assert c.approval_timeout == 7200
    assert config.parse_repo_config(None, "x").tag_matches("v1") is True
    assert config.parse_repo_config(config.template().encode(), "x")["tags"] == ["v*"]


def test_state_machine(tmp_path):
    s = store.Store(tmp_path / "db")
    r = s.add_repo("/r/.git", "/r", "r", False, None, None, None, [])
    j, created = s.create_job(r.id, "v1", None, "a" * 40, "test")
    assert created and not s.create_job(r.id, "v1", None, "a" * 40, "test")[1]
    with pytest.raises(store.TransitionError):
        s.transition(j.id, "deployed")
    for st in ("snapshotting", "building", "publishing", "awaiting_approval", "approved",
               "deploying", "deployed"):
        s.transition(j.id, st)
    assert [t["to_state"] for t in s.transitions(j.id)][-1] == "deployed"
    j2, _ = s.create_job(r.id, "v1", None, "b" * 40, "test")  # tag -f
    assert s.job(j.id).state == "deployed"  # a deployed job is history, not superseded
    j3, _ = s.create_job(r.id, "v1", None, "c" * 40, "test")
    assert s.job(j2.id).state == "superseded" and s.job(j2.id).superseded_by == j3.id
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_prune_keeps_count_and_age(tmp_path):
    s = store.Store(tmp_path / "db")
    r = s.add_repo("/r/.git", "/r", "r", False, None, None, None, [])
    ids = []
    for i in range(10):
        j, _ = s.create_job(r.id, f"v{i}", None, f"{i:040x}", "t", state="ignored")
        ids.append(j.id)
    pending, _ = s.create_job(r.id, "vp", None, "f" * 40, "t")
    removed = s.prune(keep=4, max_age_s=3600)
    assert sorted(removed) == ids[:7]  # the newest 4 rows include the pending one
    assert s.job(pending.id) is not None
    s.db.execute("UPDATE jobs SET updated_at=0")
    assert pending.id not in s.prune(keep=100, max_age_s=3600)


def test_redactor():
    r = Redactor(["hunter2-secret"])
    assert r("pw is hunter2-secret!") == f"pw is {MASK}!"
    assert MASK in r("password=abc123 ok") and "abc123" not in r("password=abc123 ok")
    assert "tok" not in r("Authorization: Bearer tok123456").split("Bearer ")[1]
    assert r("https://user:pa55@host/x") == f"https://user:{MASK}@host/x"


def test_runner_streams_redacts_and_times_out():
    lines: list[str] = []
    res = run(Command(("sh", "-c", 'echo "$SECRET here"; echo second'),
                      env={"SECRET": "v3ry-secret"}, secret_env=frozenset({"SECRET"})),
              log=lines.append)
    assert res.ok and f"{MASK} here" in lines and "v3ry-secret" not in "\n".join(lines)
    t0 = time.monotonic()
    res = run(Command(("sleep", "30"), timeout=0.5))
    assert res.timed_out and time.monotonic() - t0 < 10
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    res = run(Command(("sleep", "30")), cancel=cancel)
    assert res.canceled


def test_command_refuses_non_argv():
    with pytest.raises(TypeError):
        Command(("sh", 5))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Command(())


def test_init_writes_once(tmp_path):
    from tests.helpers import cli

    home = tmp_path / "h"
    out = cli(home, "init", str(tmp_path)).stdout.decode()
    assert "Wrote" in out and "builder: dockerfile" in out
    (tmp_path / ".earthkamal.yml").write_text("tags: [x*]\n")
    out = cli(home, "init", str(tmp_path)).stdout.decode()
    assert "already exists; not overwriting" in out
    assert (tmp_path / ".earthkamal.yml").read_text() == "tags: [x*]\n"


def test_config_hook_commands_and_old_git_sentence(tmp_path):
    from earthkamal_agent import hookinstall

    from tests.helpers import cli, make_repo

    cmds = hookinstall.config_hook_commands("/r/.git", "/s/reference-transaction",
                                            "reference-transaction")
    assert [list(c.argv) for c in cmds] == [
        ["git", "config", "--local", "hook.earthkamal.command", "/s/reference-transaction"],
        ["git", "config", "--local", "hook.earthkamal.event", "reference-transaction"]]
    r = make_repo(tmp_path / "r")
    res = cli(tmp_path / "h", "install", str(r), "--config-hook", check=False)
    from earthkamal_agent import gitcli

    if gitcli.version() < (2, 54):
        assert res.returncode == 1 and "config hooks need git 2.54 or newer" in res.stderr.decode()
    else:
        assert res.returncode == 0


def test_kamal_names_cached_per_config_bytes(tmp_path):
    from earthkamal_agent import namecache

    from tests.infra import need_bin

    need_bin("kamal")
    app = tmp_path / "app"
    (app / "config").mkdir(parents=True)
    deploy = ("service: ekcache\nimage: acme/ekcache\nservers: [127.0.0.1]\n"
              "registry: {server: ghcr.io, username: acme, password: [KAMAL_REGISTRY_PASSWORD]}\n"
              "builder: {arch: amd64}\n")
    (app / "config/deploy.yml").write_text(deploy)
    cache = tmp_path / "cache"
    first = namecache.resolve(cache, app, "v1.0.0", None)
    assert first.source == "kamal config" and first.absolute_image == "ghcr.io/acme/ekcache:v1.0.0"
    second = namecache.resolve(cache, app, "v1.0.1", None)
    assert second.source == "kamal config, cached"
    assert second.absolute_image == "ghcr.io/acme/ekcache:v1.0.1" and second.version == "v1.0.1"
    assert dataclasses_equal_but_version(first, second)
    with pytest.raises(UserError, match="not a valid Docker image tag"):
        namecache.resolve(cache, app, "release/1.0", None)
    (app / "config/deploy.yml").write_text(deploy.replace("acme/ekcache",
                                                          "acme/<%= 'ekcache' %>"))
    third = namecache.resolve(cache, app, "v1.0.2", None)
    assert third.source == "kamal config"  # ERB: always Kamal


def dataclasses_equal_but_version(a, b) -> bool:
    import dataclasses

    skip = {"version", "absolute_image", "source"}
    return all(getattr(a, f.name) == getattr(b, f.name)
               for f in dataclasses.fields(a) if f.name not in skip)
