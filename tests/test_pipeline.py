"""Build and publish for real: git tag → snapshot → BuildKit/Earthly → registry with a password."""

from __future__ import annotations

import hashlib

import pytest

from tests.helpers import git
from tests.pipeline_env import setup_app, tag


def _tree_state(root):
    """Bytes of the working tree files and the index, to prove the agent touched neither."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if ".git" in p.relative_to(root).parts[:1] and p.name not in ("index",):
            continue
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    h.update((root / ".git/index").read_bytes())
    return h.hexdigest()


@pytest.fixture
def docker_app(tmp_path, docker_engine, base_image, registry, os_keyring):
    e = setup_app(tmp_path, docker_engine, registry, os_keyring, service="ekpipe")
    yield e
    e.stop()


def test_tag_builds_and_pushes_with_kamal_names(docker_app, docker_engine):
    e = docker_app
    # uncommitted and staged changes, and a working-copy-only .env, must not be touched or built
    (e.app_root / "version.txt").write_text("uncommitted\n")
    (e.app_root / "staged.txt").write_text("staged\n")
    git(e.app_root, "add", "staged.txt")
    (e.app_root / ".env").write_text("LEAK=1\n")
    before = _tree_state(e.app_root)
    git(e.app_root, "tag", "v1.0.0")
    e.agent()
    job = e.wait_state("v1.0.0", "awaiting_approval", "failed")
    assert job["state"] == "awaiting_approval", job
    assert _tree_state(e.app_root) == before
    repo = "ektest/ekpipe"
    assert job["image"] == f"{e.registry.server}/{repo}:v1.0.0"
    assert "v1.0.0" in e.registry.tags(repo)
    assert job["digest"] == e.registry.manifest_digest(repo, "v1.0.0")
    label = docker_engine.run("image", "inspect", "--format", "{{.Config.Labels.service}}",
                              job["image"]).stdout.strip()
    assert label == "ekpipe"
    # the snapshot had the committed version.txt, not the working copy's
    out = docker_engine.run("run", "--rm", "--entrypoint", "cat", job["image"],
                            "/www/version").stdout
    assert "uncommitted" not in out
    assert not (e.home / "builds" / f"job-{job['id']}" / ".env").exists()
    log = (e.home / "logs" / f"job-{job['id']}.log").read_text()
    assert e.registry.password not in log


def test_failure_paths_have_sentences(docker_app, registry):
    e = docker_app
    root = e.app_root
    # 1. version not a valid Docker tag
    git(root, "tag", "v1.2.3+build.5")
    e.cli("run", "--once")  # (queued together, the older tag would be superseded by the newer)
    # 2. missing label
    (root / "Dockerfile").write_text((root / "Dockerfile").read_text().replace(
        "LABEL service=", "LABEL other="))
    git(root, "commit", "-qam", "no label")
    git(root, "tag", "v2.0.0")
    e.cli("run", "--once")
    j = e.job("v1.2.3+build.5")
    assert j["state"] == "failed" and "is not a valid Docker image tag" in j["reason"], j
    j = e.job("v2.0.0")
    assert j["state"] == "failed", j
    assert j["reason"].startswith("Image ") and "is missing the 'service' label" in j["reason"]
    assert "v2.0.0" not in registry.tags("ektest/ekpipe")


def test_wrong_registry_password_and_registry_down(docker_app, registry):
    e = docker_app
    e.cli("secrets", "set", "KAMAL_REGISTRY_PASSWORD", "--repo", str(e.app_root),
          input=b"wrong-password")
    tag(e, "v3.0.0", "three")
    e.cli("run", "--once")
    j = e.job("v3.0.0")
    assert j["state"] == "failed" and "refused the login" in j["reason"], j
    e.cli("secrets", "set", "KAMAL_REGISTRY_PASSWORD", "--repo", str(e.app_root),
          input=registry.password.encode())
    with registry.down():
        tag(e, "v3.0.1", "three.1")
        e.cli("run", "--once")
    j = e.job("v3.0.1")
    assert j["state"] == "failed", j
    assert "refused the login" in j["reason"] or "unreachable" in j["reason"], j


def test_missing_dockerfile_and_docker_down(docker_app):
    e = docker_app
    git(e.app_root, "rm", "-q", "Dockerfile")
    git(e.app_root, "commit", "-qm", "no dockerfile")
    git(e.app_root, "tag", "v4.0.0")
    e.cli("run", "--once")
    j = e.job("v4.0.0")
    assert j["state"] == "failed" and "has no Dockerfile (and no Earthfile)" in j["reason"], j


def test_earthly_standin_build(tmp_path, docker_engine, base_image, registry, os_keyring):
    e = setup_app(tmp_path, docker_engine, registry, os_keyring, service="ekearth",
                  earthfile=True)
    try:
        # No image config: the agent reads "Image +docker output as NAME" and retags it.
        tag(e, "v1.0.0")
        e.cli("run", "--once")
        j = e.job("v1.0.0")
        if j["state"] != "awaiting_approval":
            print((e.home / "logs" / f"job-{j['id']}.log").read_text())
        assert j["state"] == "awaiting_approval", j
        assert "v1.0.0" in registry.tags("ektest/ekearth")
        hist = (tmp_path / "earthly" / "history").read_text().split("\n")
        assert hist[0]
    finally:
        e.stop()




def test_publish_left_to_earthly(tmp_path, docker_engine, base_image, registry, os_keyring):
    """`publish: earthly`: SAVE IMAGE --push pushes, with the temporary registry login."""
    e = setup_app(tmp_path, docker_engine, registry, os_keyring, service="ekepush",
                  earthfile=True)
    try:
        ef = e.app_root / "Earthfile"
        text = ef.read_text().replace("    SAVE IMAGE $IMAGE:$TAG", "    ARG REF\n"
                                      "    SAVE IMAGE --push $REF")
        ef.write_text(text)
        (e.app_root / ".earthkamal.yml").write_text("publish: earthly\nearthly:\n"
                                                    "  image_arg: REF\n")
        git(e.app_root, "add", "-A")
        git(e.app_root, "commit", "-qm", "earthly pushes")
        tag(e, "v1.0.0")
        e.cli("run", "--once")
        j = e.job("v1.0.0")
        log = (e.home / "logs" / f"job-{j['id']}.log").read_text()
        assert j["state"] == "awaiting_approval", log
        assert "--push" in [ln for ln in log.splitlines() if "$ " in ln and "+docker" in ln][0]
        assert "Pushed image +docker as" in log
        assert j["digest"] == registry.manifest_digest("ektest/ekepush", "v1.0.0")
        assert registry.password not in log
    finally:
        e.stop()


def test_snapshot_includes_submodules_and_only_committed_files(tmp_path):
    from earthkamal_agent import snapshot

    from tests.helpers import commit, make_repo

    lib = make_repo(tmp_path / "lib", files={"lib.txt": "library v1\n"})
    app = make_repo(tmp_path / "app", files={"app.txt": "app\n"})
    git(app, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib), "vendor/lib")
    git(app, "commit", "-qm", "add submodule")
    head = git(app, "rev-parse", "HEAD").stdout.decode().strip()
    (app / "app.txt").write_text("uncommitted\n")
    (app / ".secret").write_text("TOKEN=x\n")
    index = (app / ".git/index").read_bytes()
    out = snapshot.export(str(app / ".git"), head, tmp_path / "snap")
    assert (out / "vendor/lib/lib.txt").read_text() == "library v1\n"
    assert (out / "app.txt").read_text() == "app\n"
    assert not (out / ".secret").exists()
    assert (app / ".git/index").read_bytes() == index
    assert (app / "app.txt").read_text() == "uncommitted\n"
    commit(lib, {"lib.txt": "library v2\n"})  # a newer lib commit does not leak in
    out = snapshot.export(str(app / ".git"), head, tmp_path / "snap")
    assert (out / "vendor/lib/lib.txt").read_text() == "library v1\n"
