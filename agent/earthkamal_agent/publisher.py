"""The publish stage: the built image checked, tagged Kamal's way, pushed, digest verified.

Two publishers behind one small interface: :class:`RegistryPublisher` (the agent tags and
pushes with the keyring password through a temporary DOCKER_CONFIG) and
:class:`EarthlyPublisher` (``SAVE IMAGE --push`` already pushed; the agent verifies). The
commands themselves are data in :mod:`publish`.
"""

from __future__ import annotations

from typing import Protocol

from . import kamal, publish
from .jobrun import JobRun, StageFailed, platform_of
from .runner import run_quiet


class Publisher(Protocol):
    def publish(self, c: JobRun) -> str:
        """Publish the job's image; return the digest the registry serves."""


class RegistryPublisher:
    """The agent tags the built image Kamal's way and pushes it with a temporary login."""

    def publish(self, c: JobRun) -> str:
        names = c.names
        built = check_image(c, must_exist=True)
        refs = release_refs(c)
        for ref in refs:
            if ref != built:
                c.run_ok(publish.tag_command(c.user, built, ref), "docker tag")
        config_dir = login(c, names)
        digest = None
        for ref in refs:
            c.step(f"push {ref}")
            res = c.run(publish.push_command(c.user, ref, config_dir), "push")
            if not res.ok:
                where = names.registry_server or "Docker Hub"
                raise StageFailed(f"pushing {ref} failed: "
                                  f"{publish.push_error(res.output)} ({where}).")
            if ref == names.absolute_image:
                digest = publish.pushed_digest(res.output)
        c.step("verify digest")
        remote = registry_digest(c, names, names.version)
        if digest and remote != digest:
            raise StageFailed(f"the registry serves {remote} for {names.absolute_image}, "
                              f"not the pushed {digest}; another push raced this one.")
        c.log(f"published {names.absolute_image} {remote}")
        return remote


class EarthlyPublisher:
    """`publish: earthly`: SAVE IMAGE --push already pushed; check what is local, verify."""

    def publish(self, c: JobRun) -> str:
        check_image(c, must_exist=False)
        digest = registry_digest(c, c.names, c.names.version)
        c.log(f"published {c.names.absolute_image} {digest}")
        return digest


def select(cfg) -> Publisher:  # noqa: ANN001
    return EarthlyPublisher() if cfg["publish"] == "earthly" else RegistryPublisher()


def release_refs(c: JobRun) -> list[str]:
    """``<repository>:<version>``, and ``latest[-dest]`` with `latest: true`."""
    refs = [c.names.absolute_image]
    if c.cfg["latest"]:
        refs.append(c.names.latest_image)
    return refs


def check_image(c: JobRun, must_exist: bool) -> str | None:
    """Kamal's `service` label and the servers' architecture, before anything is pushed.

    Returns the local image to publish (relabelled with `add_service_label`), or None when
    it is not in the local engine and need not be (Earthly pushed it itself).
    """
    assert c.app and c.names and c.cfg
    c.move("publishing", step="check image")
    names = c.names
    built = c.store.job(c.job.id).extra.get("built_image") or names.absolute_image
    info_res = run_quiet(publish.inspect_command(c.user, built))
    if info_res.returncode != 0:
        if not must_exist:
            return None
        raise StageFailed(f"the build reported image {built}, but Docker does not have "
                          "it; check the target's SAVE IMAGE name (`earthly.image`).")
    info = publish.parse_inspect(info_res.stdout)
    problem = publish.label_problem(info["labels"], names.service, built)
    if problem and c.cfg["add_service_label"]:
        c.step("add service label")
        c.run_ok(publish.add_label_command(c.user, built, names.service, names.absolute_image,
                                           str(c.app)), "adding the service label")
        built, problem = names.absolute_image, None
    if problem:
        raise StageFailed(problem)
    problem = publish.arch_problem(info["arch"], platform_of(names).split("/")[1], built)
    if problem:
        raise StageFailed(problem)
    return built


def registry_creds(c: JobRun, names: kamal.KamalNames) -> tuple[str | None, str | None]:
    if names.local_registry or not names.registry_username:
        return None, None
    app_secrets = kamal.secret_names(c.app, c.job.destination) if c.app else {}
    for name in names.registry_password_secrets:
        value = c.secret(app_secrets.get(name, name))
        if value:
            return names.registry_username, value
    wanted = names.registry_password_secrets[0] if names.registry_password_secrets else \
        "KAMAL_REGISTRY_PASSWORD"
    var = app_secrets.get(wanted, wanted)
    raise StageFailed(f"the registry password {var} is not in the keyring; add it with "
                      f"`earthkamal-agent secrets set {var} --repo {c.scope}`.")


def login(c: JobRun, names: kamal.KamalNames) -> str | None:
    if names.local_registry:
        ensure_local_registry(c, names)
        return None
    if c.user.get("use_docker_config"):
        return None
    user, password = registry_creds(c, names)
    config_dir = c.scratch / "docker-config"
    config_dir.mkdir(mode=0o700, exist_ok=True)
    if user and password:
        c.step("registry login")
        res = c.run(publish.login_command(c.user, names.registry_server or "docker.io", user,
                                          password, str(config_dir)), "login")
        if not res.ok:
            raise StageFailed(f"the registry {names.registry_server or 'Docker Hub'} refused "
                              f"the login for {user}: {res.last_line()}; check the password "
                              "with `earthkamal-agent secrets set`.")
    return str(config_dir)


def ensure_local_registry(c: JobRun, names: kamal.KamalNames) -> None:
    port = (names.registry_server or "localhost:5555").rpartition(":")[2] or "5555"
    c.step("local registry")
    start, run_cmd = publish.local_registry_commands(c.user, port)
    if c.run(start, "start local registry").ok:
        return
    res = c.run(run_cmd, "run local registry")
    if not res.ok:
        raise StageFailed(f"Kamal's local registry (kamal-docker-registry on port {port}) "
                          f"could not be started: {res.last_line()}")


def registry_digest(c: JobRun, names: kamal.KamalNames, tag: str) -> str:
    from .registry import RegistryError, manifest_digest

    user, password = registry_creds(c, names) if c.app else (None, None)
    try:
        return manifest_digest(names.repository, tag, user, password)
    except RegistryError as e:
        raise StageFailed(f"could not read {names.repository}:{tag} back from the "
                          f"registry: {e}.") from None
