"""Signed-tag gate: with `require_signed_tags`, only tags `git verify-tag` accepts are built.

SSH signing with keys made here (ssh-keygen); the allowed signers file is configured in the
repo's own config (the agent runs `git verify-tag` in the repo's common dir). The accepted
tag goes through the real pipeline (docker engine, registry, keyring) to awaiting_approval;
unsigned, badly signed and lightweight tags end `refused` with git's reason.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import git
from tests.infra import need_bin
from tests.pipeline_env import setup_app

REFUSED = "is not signed by an allowed key"


def _key(path: Path, comment: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(path)], check=True, capture_output=True)
    return path


@pytest.fixture(params=["repo-config", "user-config"])
def signed_app(request, tmp_path, docker_engine, base_image, registry, os_keyring):
    need_bin("ssh-keygen")
    where = request.param
    e = setup_app(tmp_path, docker_engine, registry, os_keyring, service="eksigned",
                  user_extra={"require_signed_tags": True} if where == "user-config" else {})
    root = e.app_root
    if where == "repo-config":
        (root / ".earthkamal.yml").write_text("require_signed_tags: true\n")
        git(root, "add", "-A")
        git(root, "commit", "-qm", "signed tags only")
    good = _key(tmp_path / "good", "good@example.com")
    bad = _key(tmp_path / "bad", "bad@example.com")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"test@example.com {(tmp_path / 'good.pub').read_text()}")
    for k, v in (("gpg.format", "ssh"), ("user.signingkey", str(good)),
                 ("gpg.ssh.allowedSignersFile", str(allowed))):
        git(root, "config", k, v)
    e.keys = {"good": good, "bad": bad}
    yield e
    e.stop()


def test_only_verified_tags_are_built(signed_app):
    e = signed_app
    root = e.app_root
    git(root, "tag", "-s", "v1.0.0", "-m", "signed by an allowed key")
    git(root, "tag", "-a", "v1.0.1", "-m", "annotated, unsigned")
    git(root, "-c", f"user.signingkey={e.keys['bad']}", "tag", "-s", "v1.0.2", "-m", "bad key")
    git(root, "tag", "v1.0.3")  # lightweight
    assert git(root, "verify-tag", "v1.0.0", check=False).returncode == 0
    e.cli("run", "--once")
    by = {j["tag"]: j for j in e.jobs()}
    assert sorted(by) == ["v1.0.0", "v1.0.1", "v1.0.2", "v1.0.3"]
    assert by["v1.0.0"]["state"] == "awaiting_approval", by["v1.0.0"]
    assert by["v1.0.0"]["digest"] == e.registry.manifest_digest("ektest/eksigned", "v1.0.0")
    expected = {
        "v1.0.1": "error: no signature found",
        "v1.0.2": "No principal matched.",
        "v1.0.3": "error: v1.0.3: cannot verify a non-tag object of type commit.",
    }
    for t, why in expected.items():
        j = by[t]
        assert (j["state"], j["step"]) == ("refused", "verify"), j
        assert j["reason"] == (f"tag {t} {REFUSED} ({why}); require_signed_tags is on"), j
        assert t not in e.registry.tags("ektest/eksigned")
        assert not (e.home / "builds" / f"job-{j['id']}").exists()


KINDS = {
    "signed-allowed": (["-s", "-m", "ok"], None),
    "unsigned-annotated": (["-a", "-m", "unsigned"], "error: no signature found"),
    "signed-unknown-key": (["-s", "-m", "bad key"], "No principal matched."),
    "lightweight": ([], "error: {tag}: cannot verify a non-tag object of type commit."),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_of_tag_alone(signed_app, kind, request):
    """One tag per run, so nothing else in the queue can change its outcome."""
    e = signed_app
    flags, why = KINDS[kind]
    # a tag of its own per case: the registry is shared by the session
    t = f"v2.{list(KINDS).index(kind)}.{int('user-config' in request.node.name)}"
    pre = ["-c", f"user.signingkey={e.keys['bad']}"] if kind == "signed-unknown-key" else []
    git(e.app_root, *pre, "tag", *flags, t)
    e.cli("run", "--once")
    [j] = e.jobs()
    if why is None:
        assert j["state"] == "awaiting_approval", j
        return
    why = why.format(tag=t)
    assert (j["state"], j["step"]) == ("refused", "verify"), j
    assert j["reason"] == f"tag {t} {REFUSED} ({why}); require_signed_tags is on", j
    assert t not in e.registry.tags("ektest/eksigned")
