"""The deploy stage's checks and environment: what was approved is what is deployed, and
secrets reach only Kamal's process (through its environment or a private ssh-agent).

:class:`KamalDeployer` is the Deployer: it verifies the pins, builds the environment and the
`kamal deploy`/`kamal rollback` command (data, from :mod:`kamal`), and reads the result.
"""

from __future__ import annotations

import os
from typing import Protocol

from . import kamal
from . import repo as gitrepo
from .jobrun import JobRun, StageFailed
from .publisher import registry_digest
from .runner import Command, Result

SSH_KEY_SECRET = "SSH_PRIVATE_KEY"


class Deployer(Protocol):
    def prepare(self, c: JobRun) -> tuple[dict[str, str | None], object] | None:
        """Check the approval still holds; return (environment, cleanup handle) or None."""

    def command(self, c: JobRun, env: dict[str, str | None]) -> Command:
        """The deploy command."""

    def outcome(self, c: JobRun, res: Result) -> str | None:
        """None when deployed, else the one-sentence reason."""


class KamalDeployer:
    def prepare(self, c: JobRun) -> tuple[dict[str, str | None], object] | None:
        if not pins_hold(c):
            return None
        return deploy_env(c)

    def command(self, c: JobRun, env: dict[str, str | None]) -> Command:
        binary = c.user.get("kamal_binary") or "kamal"
        if c.job.extra.get("rollback"):
            return kamal.rollback_command(c.app, c.job.version, c.job.destination, env,
                                          kamal_binary=binary)
        return kamal.deploy_command(c.app, c.names, env, kamal_binary=binary)

    def outcome(self, c: JobRun, res: Result) -> str | None:
        rollback = bool(c.job.extra.get("rollback"))
        if res.ok and rollback and kamal.rollback_missing(res.output):
            return (f"kamal rollback found no {c.job.version} container on the hosts (Kamal "
                    "keeps only recent ones); deploy it again with "
                    f"`earthkamal-agent deploy {c.job.tag}` instead.")
        if res.ok:
            return None
        if kamal.lock_error(res.output):
            return ("Kamal's deploy lock is held on the servers (another deploy is running); "
                    f"when it is done, `earthkamal-agent retry {c.job.id}`.")
        line = kamal.error_line(res.output) or res.last_line()
        return (f"kamal {'rollback' if rollback else 'deploy'} failed (exit {res.returncode}): "
                f"{line}")


def pins_hold(c: JobRun) -> bool:
    """What was approved is what is deployed: tag commit and registry digest unchanged."""
    job = c.job
    target = gitrepo.resolve_tag(c.repo.common_dir, job.tag)
    if target is None or target.commit_oid != job.approved_commit:
        now = target.commit_oid[:12] if target else "nothing (deleted)"
        c.store.transition(job.id, "superseded" if target else "canceled",
                           reason=f"tag {job.tag} now points to {now}, not the approved "
                           f"{(job.approved_commit or '')[:12]}; deploy refused")
        return False
    if c.names.local_registry and job.approved_digest is None:
        return True
    remote = registry_digest(c, c.names, c.job.version)
    if remote != job.approved_digest:
        c.store.transition(job.id, "awaiting_approval", reason=(
            f"the registry tag {c.names.absolute_image} now points to {remote[:19]}, not the "
            f"approved {(job.approved_digest or '')[:19]}; deploy refused, approve again"),
            digest=remote)
        return False
    return True


def deploy_env(c: JobRun) -> tuple[dict[str, str | None], object]:
    needed = kamal.secret_names(c.app, c.job.destination)
    env: dict[str, str | None] = {"VERSION": None}
    missing = []
    wanted = set(needed.values())
    if c.cfg.get("secrets"):
        wanted |= set(c.cfg["secrets"])
    for var in sorted(wanted):
        value = c.secret(var)
        if value is not None:
            env[var] = value
        elif var not in os.environ:
            missing.append(var)
    if missing:
        raise StageFailed(f"the deploy needs {', '.join(missing)} (referenced in "
                          f".kamal/secrets) but the keyring has no such secret; add it with "
                          f"`earthkamal-agent secrets set {missing[0]} --repo {c.scope}`.")
    for n in c.names.registry_password_secrets:
        if n not in needed:
            raise StageFailed(f"deploy.yml's registry.password names {n}, but the secrets "
                              f"file Kamal reads has no `{n}=${n}` line; add it to "
                              ".kamal/secrets.")
    proc = None
    key = c.secret(SSH_KEY_SECRET)
    mode = c.user.get("ssh_agent") or "auto"
    if key and mode in ("auto", "private"):
        from . import sshagent

        proc, sock = sshagent.start(c.paths.run, c.job.id, key, c.log)
        env["SSH_AUTH_SOCK"] = sock
    return env, proc
