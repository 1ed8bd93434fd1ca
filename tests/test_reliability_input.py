"""Hostile and broken input: every case ends in an exact state and sentence, never a
traceback, never a lost job.

Most cases share one agent run per group (module-scoped fixtures: one repo, many tags or
spool files, one ``run --once``), so the corpus stays cheap. The groups: tag names, spool
files, ``.earthkamal.yml``, ``config/deploy.yml``, build files, missing/old tools, keyring,
notification server, registry, disk full, two agents, CLI misuse.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import cli, commit, git, jobs, make_repo, wait_for
from tests.infra import need, need_bin

DEPLOY_YML = {
    "service": "ekinput", "image": "ektest/ekinput", "servers": ["127.0.0.1"],
    "registry": {"server": "127.0.0.1:5999", "username": "u",
                 "password": ["KAMAL_REGISTRY_PASSWORD"]},
    "builder": {"arch": "amd64"},
}
APP = {
    ".earthkamal.yml": "tags: ['*']\n",
    "config/deploy.yml": json.dumps(DEPLOY_YML) + "\n",
    ".kamal/secrets": "KAMAL_REGISTRY_PASSWORD=$KAMAL_REGISTRY_PASSWORD\n",
    "Dockerfile": "FROM scratch\nLABEL service=ekinput\n",
}
NO_TOOLS = {"docker_binary": "false", "kamal_binary": "/nonexistent/kamal",
            "earthly_binary": "/nonexistent/earthly", "approvals": "none"}


def user_config(home: Path, **values) -> None:
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "config.yml").write_text(json.dumps({**NO_TOOLS, **values}))


def no_traceback(home: Path, *texts: str) -> None:
    for t in texts:
        assert "Traceback" not in t, t
    for p in [home / "agent-stderr.log", *(home / "logs").glob("*.log")]:
        if p.exists():
            assert "Traceback" not in p.read_text(errors="replace"), p


def run_once(home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    res = cli(home, "run", "--once", *args, env=env, check=False)
    (home / "agent-stderr.log").open("ab").write(res.stderr)
    assert res.returncode == 0, res.stderr.decode()
    return res


def one_sentence(res: subprocess.CompletedProcess, start: str) -> str:
    err = res.stderr.decode()
    assert res.returncode == 1, (res.returncode, err)
    assert err.startswith("earthkamal-agent: " + start), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def by_tag(home: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for j in jobs(home):
        out.setdefault(j["tag"], []).append(j)
    return out


# -- tag names ---------------------------------------------------------------------------------
def _bad_version(tag: str) -> tuple[str, str]:
    return "failed", f"The tag {tag!r} is not a valid Docker image tag (allowed: "


LONG_OK = "v" + "a" * 200  # fine for git, too long for a Docker tag
LONG_BAD = "v" + "a" * 300  # longer than a file name may be: git refuses it
TAG_CASES = [
    # (id, tag, how: "tag" | "update-ref" | "tree" | "blob", expected: None = git refuses)
    ("semicolon-space", "v1;rm -rf", "tag", None),
    ("semicolon", "v1;rm", "tag", _bad_version("v1;rm")),
    ("dollar-paren", "v$(id)", "tag", _bad_version("v$(id)")),
    ("backticks", "v`id`", "tag", _bad_version("v`id`")),
    ("pipe", "v1|cat", "tag", _bad_version("v1|cat")),
    ("redirect", "v1>x", "tag", _bad_version("v1>x")),
    ("and-and", "v1&&x", "tag", _bad_version("v1&&x")),
    ("quotes", "v1'\"q", "tag", _bad_version("v1'\"q")),
    ("space", "v1 2", "tag", None),
    ("dotdot", "v1..2", "tag", None),
    ("leading-dash-git-tag", "-v1", "tag", None),
    ("leading-dash-update-ref", "-v2", "update-ref", _bad_version("-v2")),
    ("unicode", "vü1.0", "tag", _bad_version("vü1.0")),
    ("255-plus-bytes", LONG_BAD, "tag", None),
    ("200-bytes", LONG_OK, "tag", _bad_version(LONG_OK)),
    ("dot-lock", "v1.lock", "tag", None),
    ("at-brace", "v1@{0}", "tag", None),
    ("tree", "on-a-tree", "tree",
     ("refused", "tag on-a-tree points to a tree, not a commit; only tags on commits are "
                 "released")),
    ("blob", "on-a-blob", "blob",
     ("refused", "tag on-a-blob points to a blob, not a commit; only tags on commits are "
                 "released")),
]


@pytest.fixture(scope="module")
def tag_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("tags")
    home = base / "home"
    # one destination per case, so that no case is superseded by a newer tag in the queue
    dests = {c[1]: f"d{i}" for i, c in enumerate(TAG_CASES)}
    repo = make_repo(base / "app", {**APP, ".earthkamal.yml": json.dumps(
        {"tags": ["*"], "destinations": dests})})
    user_config(home)
    cli(home, "install", str(repo))
    refused = {}
    for _id, name, how, _exp in TAG_CASES:
        if how == "tag":
            res = git(repo, "tag", name, check=False)
        elif how == "update-ref":
            res = git(repo, "update-ref", f"refs/tags/{name}", "HEAD", check=False)
        else:
            obj = "HEAD^{tree}" if how == "tree" else "HEAD:Dockerfile"
            res = git(repo, "tag", name, obj, check=False)
        refused[name] = res.returncode != 0
    git(repo, "tag", "v9.9.9-control")  # a good tag after all the bad ones
    res = run_once(home)
    return home, repo, refused, res


@pytest.mark.parametrize("name,how,expected", [c[1:] for c in TAG_CASES],
                         ids=[c[0] for c in TAG_CASES])
def test_tag_names(tag_run, name, how, expected):
    home, repo, refused, res = tag_run
    js = by_tag(home)
    if expected is None:
        assert refused[name], f"git accepted {name!r}"
        assert name not in js
    else:
        assert not refused[name], f"git refused {name!r}"
        assert len(js[name]) == 1, js.get(name)
        state, reason = expected
        assert js[name][0]["state"] == state, js[name]
        assert js[name][0]["reason"].startswith(reason), js[name][0]["reason"]
        if state == "failed":
            assert js[name][0]["reason"].endswith("or set `version: sha` to use the commit SHA.")
    # nothing broke: the control tag behind them got through to the build
    ctl = js["v9.9.9-control"][0]
    assert ctl["state"] == "failed" and ctl["step"] == "build", ctl
    no_traceback(home, res.stderr.decode())


# -- spool files -------------------------------------------------------------------------------
def _old(p: Path) -> None:
    t = time.time() - 120
    os.utime(p, (t, t), follow_symlinks=False)


SPOOL_HEAD = b"earthkamal-spool 1\nrepo %s\nhook reference-transaction\nstate committed\n"
SPOOL_CASES = [
    ("empty", "incomplete: empty or cut short before its `end` line"),
    ("truncated", "incomplete: cut short before its `end` line"),
    ("garbage", "not an earthkamal spool file (bad first line)"),
    ("binary", "binary content"),
    ("not-utf8", "not valid UTF-8"),
    ("huge", f"too large ({(1 << 20) + 10} bytes, limit {1 << 20})"),
    ("unregistered", "from an unregistered repo /not/registered/.git"),
    ("symlink", "is a symlink; spool entries must be regular files"),
    ("directory", "not a regular file"),
    ("fifo", "not a regular file"),
    ("malformed-ref", "malformed ref line 'zz yy refs/tags/v1'"),
    ("relative-repo", "repo path is not absolute"),
    ("missing-state", "missing `state` line"),
]


@pytest.fixture(scope="module")
def spool_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("spool")
    home = base / "home"
    repo = make_repo(base / "app", APP)
    user_config(home)
    cli(home, "install", str(repo))
    sp = home / "spool"
    gitdir = str(repo / ".git").encode()
    z, one = b"0" * 40, b"1" * 40
    files = {
        "empty": b"",
        "garbage": b"#!/bin/sh\nrm -rf /\n",
        "truncated": SPOOL_HEAD % gitdir + z + b" " + one + b" refs/tags/v1\n",
        "binary": b"earthkamal-spool 1\n\x00\x01\x02\nend\n",
        "not-utf8": b"earthkamal-spool 1\nrepo /\xff\xfe\nend\n",
        "huge": b"x" * ((1 << 20) + 10),
        "unregistered": SPOOL_HEAD % b"/not/registered/.git" + z + b" " + one
        + b" refs/tags/v1\nend\n",
        "malformed-ref": SPOOL_HEAD % gitdir + b"zz yy refs/tags/v1\nend\n",
        "relative-repo": SPOOL_HEAD % b"relative/.git" + b"end\n",
        "missing-state": b"earthkamal-spool 1\nrepo " + gitdir + b"\nhook x\nend\n",
    }
    for name, data in files.items():
        p = sp / f"{name}.ev"
        p.write_bytes(data)
        _old(p)
    target = base / "elsewhere"
    target.write_bytes(SPOOL_HEAD % gitdir + b"end\n")
    (sp / "symlink.ev").symlink_to(target)
    (sp / "directory.ev").mkdir()
    os.mkfifo(sp / "fifo.ev")
    for n in ("symlink", "directory", "fifo"):
        _old(sp / f"{n}.ev")
    # a hook that has just created its file and not yet written it (the shell opens the file,
    # then printf writes): young and empty, it must be left alone
    (sp / "young-empty.ev").write_bytes(b"")
    (sp / "young-partial.ev").write_bytes(b"earthkamal-sp")
    git(repo, "tag", "v1.0.0")  # and a real one among them
    res = run_once(home, "--hold")
    return home, target, res


@pytest.mark.parametrize("name,why", SPOOL_CASES, ids=[c[0] for c in SPOOL_CASES])
def test_bad_spool_files(spool_run, name, why):
    home, target, res = spool_run
    rej = home / "spool-rejected"
    assert not os.path.lexists(home / "spool" / f"{name}.ev")
    assert (rej / f"{name}.ev.why").read_text() == why + "\n"
    assert f"spool file {name}.ev moved to" in (home / "logs" / "agent.log").read_text()
    assert target.exists()  # a symlink is moved, never followed
    assert [j["tag"] for j in jobs(home)] == ["v1.0.0"]  # the good event still went through
    no_traceback(home, res.stderr.decode())


@pytest.mark.parametrize("name", ["young-empty", "young-partial"])
def test_spool_file_mid_write_is_left_for_the_hook(spool_run, name):
    """The hook's file exists (created by the redirection) before printf has written it: a
    young file without a complete first line is a hook mid-write, like one without `end`."""
    home, _target, _res = spool_run
    assert (home / "spool" / f"{name}.ev").exists(), (
        f"{name}.ev was rejected: "
        f"{(home / 'spool-rejected' / f'{name}.ev.why').read_text().strip()!r}; the tag of a "
        "hook that is still writing is lost until the next reconcile")


# -- .earthkamal.yml --------------------------------------------------------------------------
CONFIG_CASES = [
    ("not-yaml", "tags: [v*\n", "not valid YAML at line 2 "),
    ("a-list", "- v*\n", "the file must be a mapping of keys (like `tags: [v*]`), got a list."),
    ("a-string", "just words\n",
     "the file must be a mapping of keys (like `tags: [v*]`), got a string."),
    ("tags-number", "tags: 5\n", "`tags` must be a list of strings, got a number."),
    ("builder-choice", "builder: podman\n",
     "`builder` must be one of auto, earthly, dockerfile, got 'podman'."),
    ("duration", "approval_timeout: soon\n",
     "`approval_timeout` must be a duration like 30m, 24h or 2d, got 'soon'."),
    ("bool-string", "require_signed_tags: 'yes'\n",
     "`require_signed_tags` must be true or false, got a string."),
    ("unknown-key", "deploy: now\n", "unknown key `deploy`; known keys are "),
    ("shell-string-gate", "gate_command: make test\n",
     "`gate_command` must be a list of arguments like [make, test] (no shell string), "
     "got a string."),
    ("earthly-target", "earthly: {target: docker}\n",
     "`earthly.target` must look like +docker, got 'docker'."),
    ("destination", "destinations: {'v*': 'prod; rm -rf /'}\n",
     "`destinations` maps 'v*' to 'prod; rm -rf /'; a destination must be a plain name like "
     "production."),
    ("secret-name", "dockerfile: {secrets: [npm-token]}\n",
     "`dockerfile.secrets` must be a list of names like NPM_TOKEN."),
    ("approval-policy", "approval: sometimes\n",
     "`approval` must be required, auto, or a map of destination to required/auto, "
     "got 'sometimes'."),
]


@pytest.fixture(scope="module")
def config_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("config")
    home = base / "home"
    repo = make_repo(base / "app", {**APP, ".earthkamal.yml": ""})
    user_config(home)
    cli(home, "install", str(repo))
    for i, (_id, text, _why) in enumerate(CONFIG_CASES):
        commit(repo, {".earthkamal.yml": text})
        git(repo, "tag", f"v1.{i}.0")
    commit(repo, {".earthkamal.yml": ""})  # empty file: the defaults
    git(repo, "tag", "v2.0.0")
    res = run_once(home, "--hold")
    return home, res


@pytest.mark.parametrize("i,text,why", [(i, c[1], c[2]) for i, c in enumerate(CONFIG_CASES)],
                         ids=[c[0] for c in CONFIG_CASES])
def test_bad_repo_config(config_run, i, text, why):
    home, res = config_run
    j = by_tag(home)[f"v1.{i}.0"]
    assert len(j) == 1
    assert j[0]["state"] == "failed" and j[0]["step"] == "config", j[0]
    assert j[0]["reason"].startswith(f".earthkamal.yml at v1.{i}.0: {why}"), j[0]["reason"]
    no_traceback(home, res.stderr.decode())


def test_empty_repo_config_means_defaults(config_run):
    home, _res = config_run
    j = by_tag(home)["v2.0.0"]
    assert [x["state"] for x in j] == ["detected"]


# -- config/deploy.yml, build files, tools ----------------------------------------------------
ERB_DEPLOY = ("<% img = 'ektest/ek' + 'erb' %>\nservice: ekinput\nimage: <%= img %>\n"
              "servers: [127.0.0.1]\nregistry: {server: '127.0.0.1:5999', username: u, "
              "password: [KAMAL_REGISTRY_PASSWORD]}\nbuilder: {arch: amd64}\n")
BUILD_FAILS = "the build failed (docker build exit 1)"
PIPE_CASES = [
    # id, files changed in the commit (None deletes), user config, (state, step, reason start)
    ("deploy-not-yaml", {"config/deploy.yml": "service: [oops\n"}, {},
     ("failed", "resolve", "/config/deploy.yml is not valid YAML at line 2 ")),
    ("deploy-empty", {"config/deploy.yml": ""}, {},
     ("failed", "resolve", "config/deploy.yml has no `service`; set it, e.g. `service: myapp`.")),
    ("deploy-list", {"config/deploy.yml": "- a\n"}, {},
     ("failed", "resolve", "/config/deploy.yml must be a mapping of Kamal settings")),
    ("deploy-service-type", {"config/deploy.yml": json.dumps({**DEPLOY_YML,
                                                             "service": "my app!"})}, {},
     ("failed", "resolve", "config/deploy.yml: `service` 'my app!' may only contain ")),
    ("deploy-no-arch", {"config/deploy.yml": json.dumps({**DEPLOY_YML, "builder": {}})}, {},
     ("failed", "resolve", "config/deploy.yml has no `builder.arch`; Kamal 2.11 requires it")),
    ("deploy-missing", {"config/deploy.yml": None}, {},
     ("failed", "resolve", "/config/deploy.yml is missing: the Kamal config needs this file.")),
    ("erb-without-kamal", {"config/deploy.yml": ERB_DEPLOY}, {},
     ("failed", "resolve", "config/deploy.yml uses ERB (<% ... %>) that only Kamal can "
                           "evaluate; install Kamal")),
    ("erb-with-kamal", {"config/deploy.yml": ERB_DEPLOY}, {"kamal_binary": "kamal"},
     ("failed", "build", BUILD_FAILS)),
    ("no-dockerfile", {"Dockerfile": None}, {},
     ("failed", "check build files",
      "the tagged commit has no Dockerfile (and no Earthfile); commit one")),
    ("no-stage", {".earthkamal.yml": "tags: ['*']\ndockerfile: {target: prod}\n"}, {},
     ("failed", "check build files",
      "Dockerfile has no stage named prod; fix `dockerfile.target`")),
    ("no-earthfile", {".earthkamal.yml": "tags: ['*']\nbuilder: earthly\n"}, {},
     ("failed", "check build files", "the tagged commit has no Earthfile; commit one, or set "
                         "`builder: dockerfile`")),
    ("no-earthly-target", {"Earthfile": "VERSION 0.8\nother:\n    FROM scratch\n"}, {},
     ("failed", "check build files",
      "the Earthfile at this commit has no target +docker; add it, or set "
      "`earthly.target` in .earthkamal.yml")),
    ("docker-missing", {}, {"docker_binary": "/nonexistent/docker"},
     ("failed", "build", "`/nonexistent/docker` is not installed or not on PATH; "
      "install it, or set `docker_binary`")),
    ("earthly-missing", {"Earthfile": "VERSION 0.8\ndocker:\n    FROM scratch\n"}, {},
     ("failed", "build", "`/nonexistent/earthly` is not installed or not on PATH; "
      "install it, or set `earthly_binary`")),
    ("kamal-missing-falls-back-to-yaml", {}, {},
     ("failed", "build", BUILD_FAILS)),
]


@pytest.mark.parametrize("files,user,expected", [c[1:] for c in PIPE_CASES],
                         ids=[c[0] for c in PIPE_CASES])
def test_broken_app_files_and_tools(tmp_path, files, user, expected):
    if user.get("kamal_binary") == "kamal":
        need_bin("kamal")
    home = tmp_path / "home"
    repo = make_repo(tmp_path / "app", APP)
    user_config(home, **user)
    cli(home, "install", str(repo))
    for name, text in files.items():
        if text is None:
            git(repo, "rm", "-q", name)
        else:
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", "broken")
    git(repo, "tag", "v1.0.0")
    res = run_once(home)
    [j] = jobs(home)
    state, step, reason = expected
    assert (j["state"], j["step"]) == (state, step), j
    assert not j["reason"].startswith("internal error"), j["reason"]
    if reason.startswith("/"):
        assert reason in j["reason"], j["reason"]
    else:
        assert j["reason"].startswith(reason), j["reason"]
    if files.get("config/deploy.yml") == ERB_DEPLOY and user.get("kamal_binary") == "kamal":
        assert j["image"] == "127.0.0.1:5999/ektest/ekerb:v1.0.0", j
    no_traceback(home, res.stderr.decode())


def test_git_too_old(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "git").write_text(f"#!/bin/sh\n[ \"$1\" = version ] && echo 'git version 2.20.1' "
                              f"&& exit 0\nexec {shutil.which('git')} \"$@\"\n")
    (fake / "git").chmod(0o755)
    repo = make_repo(tmp_path / "app")
    res = cli(tmp_path / "home", "install", str(repo), check=False,
              env={"PATH": f"{fake}:{os.environ['PATH']}"})
    one_sentence(res, "git 2.20 is too old: the agent needs ")


def test_git_missing(tmp_path):
    repo = make_repo(tmp_path / "app")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(sys.executable, bindir / "python3")
    res = cli(tmp_path / "home", "install", str(repo), check=False,
              env={"PATH": str(bindir)})
    one_sentence(res, "`git` is not installed or not on PATH; install it.")


# -- keyring ------------------------------------------------------------------------------------
FAIL_BACKEND = {"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}


NO_BUS = "There is no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS is unset), so the OS keyring"
NO_STORE = "No OS keyring is available (keyring chose keyring.backends.fail.Keyring)"


@pytest.mark.parametrize("bus,sentence", [(False, NO_BUS), (True, NO_STORE)],
                         ids=["no-bus", "fail-backend"])
def test_keyring_absent_secrets_set(tmp_path, bus, sentence):
    env = {**FAIL_BACKEND, "DBUS_SESSION_BUS_ADDRESS": "unix:path=/nonexistent/bus"} if bus \
        else FAIL_BACKEND
    res = cli(tmp_path / "home", "secrets", "set", "NPM_TOKEN", input=b"x", check=False,
              env=env)
    one_sentence(res, sentence)


def test_keyring_absent_build_secret(tmp_path):
    home = tmp_path / "home"
    repo = make_repo(tmp_path / "app", {**APP, ".earthkamal.yml":
                                        "tags: ['*']\ndockerfile: {secrets: [NPM_TOKEN]}\n"})
    user_config(home)
    cli(home, "install", str(repo))
    git(repo, "tag", "v1.0.0")
    res = run_once(home, env=FAIL_BACKEND)
    [j] = jobs(home)
    assert j["state"] == "failed", j
    assert j["reason"].startswith(NO_BUS), j["reason"]
    no_traceback(home, res.stderr.decode())


def test_keyring_locked(tmp_path, os_keyring):
    with os_keyring.locked():
        res = cli(tmp_path / "home", "secrets", "set", "NPM_TOKEN", input=b"x", check=False,
                  env=os_keyring.env)
    one_sentence(res, "The OS keyring is locked; unlock it")


def test_keyring_locked_build_secret(tmp_path, os_keyring):
    home = tmp_path / "home"
    repo = make_repo(tmp_path / "app", {**APP, ".earthkamal.yml":
                                        "tags: ['*']\ndockerfile: {secrets: [NPM_TOKEN]}\n"})
    user_config(home)
    cli(home, "install", str(repo))
    cli(home, "secrets", "set", "NPM_TOKEN", input=b"tok", env=os_keyring.env)
    git(repo, "tag", "v1.0.0")
    with os_keyring.locked():
        res = run_once(home, env=os_keyring.env)
    [j] = jobs(home)
    assert j["state"] == "failed" and j["reason"].startswith("The OS keyring is locked"), j
    no_traceback(home, res.stderr.decode())


# -- notification server, registry (real docker) ------------------------------------------------
FAKE_KAMAL = """#!/bin/sh
[ "$1" = deploy ] && {{ echo deploy >> '{log}'; exit 0; }}
exec '{real}' "$@"
"""


def _docker_app(tmp_path, docker_engine, registry, keyring, service, **kw):
    from tests.pipeline_env import setup_app

    e = setup_app(tmp_path, docker_engine, registry, keyring, service=service, **kw)
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    (bindir / "kamal").write_text(FAKE_KAMAL.format(log=tmp_path / "deploys",
                                                    real=shutil.which("kamal")))
    (bindir / "kamal").chmod(0o755)
    e.env["PATH"] = f"{bindir}:{e.env['PATH']}"
    e.cli("secrets", "set", "APP_SECRET", "--repo", str(e.app_root), input=b"s")
    return e


def test_notification_server_crashes_mid_approval(tmp_path, docker_engine, base_image, registry,
                                                  desktop, desktop_keyring):
    need_bin("kamal")
    from tests.pipeline_env import tag

    e = _docker_app(tmp_path, docker_engine, registry, desktop_keyring, "ekdbus",
                    extra_env={**desktop.env, **desktop_keyring.env},
                    user_extra={"approvals": "dbus"})
    try:
        tag(e, "v1.0.0", "dbus")
        a = e.agent()
        job = e.wait_state("v1.0.0", "awaiting_approval", "failed")
        assert job["state"] == "awaiting_approval", job
        desktop.wait_shown("Deploy ekdbus v1.0.0 to the default destination?", timeout=30)
        desktop.kill_server()  # dunst vanishes with the question on screen
        time.sleep(1)
        assert a.proc.poll() is None
        assert e.job("v1.0.0")["state"] == "awaiting_approval"
        e.cli("approve", str(job["id"]))
        assert e.wait_state("v1.0.0", "deployed", "failed")["state"] == "deployed"
        assert (tmp_path / "deploys").read_text() == "deploy\n"
        no_traceback(e.home)
    finally:
        e.stop()
        desktop.start_server()


def test_notification_server_absent(tmp_path, docker_engine, base_image, registry, os_keyring):
    """The keyring's bus has no org.freedesktop.Notifications: the CLI still approves."""
    need_bin("kamal")
    from tests.pipeline_env import tag

    e = _docker_app(tmp_path, docker_engine, registry, os_keyring, "eknodbus",
                    user_extra={"approvals": "dbus"})
    try:
        tag(e, "v1.0.0", "nodbus")
        e.agent()
        job = e.wait_state("v1.0.0", "awaiting_approval", "failed")
        assert job["state"] == "awaiting_approval", job
        wait_for(lambda: "use `earthkamal-agent approve JOB`" in e.agents[-1].stderr()
                 or "could not show the approval" in e.agents[-1].stderr(), timeout=10)
        e.cli("approve", str(job["id"]))
        assert e.wait_state("v1.0.0", "deployed", "failed")["state"] == "deployed"
        no_traceback(e.home)
    finally:
        e.stop()


class SlowServer(threading.Thread):
    """Accepts, says nothing for a while, then hangs up: a registry that is slow and broken."""

    def __init__(self, delay: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.delay = delay

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Timer(self.delay, conn.close).start()


@pytest.mark.parametrize("kind", ["down", "slow"])
def test_registry_down_or_slow(tmp_path, docker_engine, base_image, registry, os_keyring, kind):
    need_bin("kamal")
    from tests.infra.registry import free_port
    from tests.pipeline_env import tag

    srv = None
    if kind == "slow":
        srv = SlowServer()
        srv.start()
        server = f"127.0.0.1:{srv.port}"
    else:
        server = f"127.0.0.1:{free_port()}"
    e = _docker_app(tmp_path, docker_engine, registry, os_keyring, f"ekreg{kind}",
                    registry_server=server)
    try:
        tag(e, "v1.0.0", kind)
        t0 = time.monotonic()
        res = run_once(e.home, env=e.env)
        assert time.monotonic() - t0 < 90
        [j] = e.jobs()
        assert j["state"] == "failed" and j["step"] == "registry login", j
        assert j["reason"].startswith(f"the registry {server} refused the login for ektest: "), j
        assert not (tmp_path / "deploys").exists()
        no_traceback(e.home, res.stderr.decode())
    finally:
        if srv:
            srv.sock.close()


# -- disk full, two agents ----------------------------------------------------------------------
def test_disk_full_while_writing_logs(tmp_path):
    need("tmpfs mount", os.geteuid() == 0, "mounting a small tmpfs needs root")
    home = tmp_path / "home"
    repo = make_repo(tmp_path / "app", APP)
    user_config(home)
    cli(home, "install", str(repo))
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(logs)],
                   check=True)
    try:
        fd = os.open(logs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"x" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        git(repo, "tag", "v1.0.0")   # fails at the build; its log cannot be written
        res = cli(home, "run", "--once", check=False)
        err = res.stderr.decode()
        assert res.returncode == 0, err
        got = {j["tag"]: (j["state"], j["step"]) for j in jobs(home)}
        assert got == {"v1.0.0": ("failed", "build")}, got
        assert "Traceback" not in err and "Logging error" not in err, err
    finally:
        subprocess.run(["umount", "-l", str(logs)], check=False)


def test_two_agents_started_at_once(tmp_path):
    home = tmp_path / "home"
    repo = make_repo(tmp_path / "app", APP)
    user_config(home)
    cli(home, "install", str(repo))
    env = {**os.environ, "EARTHKAMAL_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-m", "earthkamal_agent", "run", "--hold"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs), timeout=30,
                 what="one agent to give up")
        time.sleep(0.5)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        assert winner.poll() is None
        err = loser.stderr.read().decode()
        assert loser.returncode == 1, err
        assert err.splitlines()[-1].startswith(
            f"earthkamal-agent: another earthkamal-agent is already running (PID {winner.pid})")
        assert "Traceback" not in err
        git(repo, "tag", "v1.0.0")
        wait_for(lambda: [j["tag"] for j in jobs(home)] == ["v1.0.0"], timeout=20)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=20)


# -- CLI misuse ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_home(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    home = base / "home"
    repo = make_repo(base / "app", APP)
    user_config(home)
    cli(home, "install", str(repo))
    git(repo, "tag", "v1.0.0")
    run_once(home, "--hold")
    return home, repo


CLI_CASES = [
    ("logs-unknown", ["logs", "999"], "there is no job 999; `earthkamal-agent status` lists"),
    ("logs-not-a-number", ["logs", "abc"], "there is no job abc;"),
    ("approve-unknown", ["approve", "42"], "there is no job 42;"),
    ("approve-not-waiting", ["approve", "1"],
     "job 1 (v1.0.0) is detected, not waiting for approval; only a job in awaiting_approval "
     "can be approved."),
    ("reject-not-waiting", ["reject", "1"],
     "job 1 (v1.0.0) is detected, not waiting for approval; only a job in awaiting_approval "
     "can be rejected."),
    ("retry-detected", ["retry", "1"],
     "job 1 (v1.0.0) is detected; only failed, interrupted, expired, canceled, rejected or "
     "superseded jobs can be retried."),
    ("secret-lowercase", ["secrets", "set", "lower"], "Invalid secret name 'lower': use "),
    ("secret-digit", ["secrets", "set", "1ABC"], "Invalid secret name '1ABC': use "),
    ("secret-dash", ["secrets", "set", "A-B"], "Invalid secret name 'A-B': use "),
    ("secret-shell", ["secrets", "set", "$(id)"], "Invalid secret name '$(id)': use "),
    ("secret-no-name", ["secrets", "set"], "name the secret: `earthkamal-agent secrets set NAME`."),
    ("deploy-unknown-tag", ["deploy", "v7.7.7", "--repo", "{repo}"],
     "there is no tag v7.7.7 in app; create it with `git tag v7.7.7`."),
    ("deploy-unregistered", ["deploy", "v1", "--repo", "/"], "/ is not a git repository"),
    ("rollback-nothing", ["rollback", "--repo", "{repo}"],
     "there is no earlier deployed version of app for the default destination to roll back to."),
    ("uninstall-unknown", ["uninstall", "/nonexistent/x"], "/nonexistent/x is not registered"),
]


@pytest.mark.parametrize("args,sentence", [c[1:] for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(cli_home, args, sentence):
    home, repo = cli_home
    args = [a.replace("{repo}", str(repo)) for a in args]
    res = cli(home, *args, check=False, input=b"value", env=FAIL_BACKEND)
    one_sentence(res, sentence)
    assert [(j["tag"], j["state"]) for j in jobs(home)] == [("v1.0.0", "detected")]
