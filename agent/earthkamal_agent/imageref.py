"""Docker image names and tags, checked the way Docker's reference grammar does.

Pure functions, standard library only. Kamal itself checks neither the version nor the
repository (it happily prints ``ghcr.io/ghcr.io/app:release/1.0``); Docker then refuses the name
at push or pull time. Checking here turns that late failure into a sentence naming the part of
the config to fix.

Sanitizing a version (``sanitize_version: true``): every character outside ``[A-Za-z0-9_.-]``
becomes ``-`` (one for one, no collapsing), a result starting with ``.`` or ``-`` gets ``_``
put in front, and the result is cut to 128 characters. So ``v1.2.3+build.5`` becomes
``v1.2.3-build.5``, ``release/1.0`` becomes ``release-1.0`` and ``-rc1`` becomes ``_-rc1``.
Different tags can sanitize to the same version (``a/b`` and ``a+b`` both give ``a-b``).
"""

from __future__ import annotations

import re

from .errors import UserError

TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_DOMAIN_COMPONENT = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOST = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?"
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
NAME_MAX = 255
_RULE = ("letters, digits, '_', '.' and '-', starting with a letter, digit or '_', "
         "at most 128 characters")


def sanitize_version(tag: str) -> str:
    """The documented sanitized form of ``tag`` (see the module docstring)."""
    out = re.sub(r"[^A-Za-z0-9_.-]", "-", tag)
    if out[:1] in (".", "-"):
        out = "_" + out
    return out[:128]


def validate_version(tag: str, sanitize: bool = False) -> str:
    """Return ``tag`` as the image version, or raise UserError when Docker would refuse it.

    With ``sanitize`` an invalid tag is turned into a valid one instead (module docstring).
    """
    if TAG_RE.fullmatch(tag):
        return tag
    if not tag:
        raise UserError("The image version is empty; a Docker tag needs at least one "
                        "character.")
    fixed = sanitize_version(tag)
    if sanitize:
        return fixed
    raise UserError(
        f"The tag {tag!r} is not a valid Docker image tag (allowed: {_RULE}); set "
        f"`sanitize_version: true` in .earthkamal.yml to release it as {fixed!r}, or set "
        "`version: sha` to use the commit SHA."
    )


def looks_like_host(component: str) -> bool:
    """Docker's rule for "the first name component is a registry": '.' or ':' or localhost."""
    return "." in component or ":" in component or component == "localhost"


def _check_path(parts: list[str], where: str, fix: str) -> None:
    for part in parts:
        if part == "":
            raise UserError(f"{where} has an empty name component (a leading, trailing or "
                            f"doubled '/'); {fix}.")
        if not _PATH_COMPONENT.fullmatch(part):
            lower = part.lower()
            hint = (f" (Docker names are lowercase: use {lower!r})"
                    if lower != part and _PATH_COMPONENT.fullmatch(lower) else "")
            raise UserError(
                f"{where} has the invalid name component {part!r}{hint}; components are "
                "lowercase letters and digits separated by '.', '_', '__' or '-'.")


def _split_host(first: str, where: str) -> str:
    if not _HOST.fullmatch(first):
        raise UserError(f"{where} starts with {first!r}, which is not a registry host like "
                        "ghcr.io, registry.example.com:5000 or localhost:5555.")
    return first


def validate_repository(server: str | None, image: str) -> str:
    """Return Kamal's repository ``[server, image].compact.join("/")`` after checking it.

    ``server`` is Kamal's ``registry.server`` (a host, optionally with port and a path such
    as ``us-docker.pkg.dev/proj/repo``), ``image`` Kamal's ``image``. Errors say which of the
    two is wrong.
    """
    srv_where = f"registry.server {server!r}"
    img_where = f"image {image!r}"
    if not isinstance(image, str) or not image.strip():
        raise UserError("The image is empty; set `image:` in config/deploy.yml, e.g. "
                        "`image: myorg/myapp`.")
    host = None
    if server:
        if _SCHEME.match(server):
            bare = _SCHEME.sub("", server).rstrip("/")
            raise UserError(f"{srv_where} has a URL scheme; Docker wants a bare host, so set "
                            f"`registry.server: {bare}`.")
        if "@" in server or any(":" in p for p in server.split("/")[1:]):
            raise UserError(f"{srv_where} contains a tag or digest; registry.server is only "
                            "the registry host (and optional path), without ':tag' or '@'.")
        first, *rest = server.split("/")
        host = _split_host(first, srv_where)
        _check_path(rest, srv_where, "write it like ghcr.io or us-docker.pkg.dev/proj/repo")
    if _SCHEME.match(image):
        raise UserError(f"{img_where} has a URL scheme; put the registry host in "
                        "`registry.server` and only the name (like myorg/myapp) in `image`.")
    if "@" in image:
        raise UserError(f"{img_where} contains a digest ('@...'); `image` is the name only, "
                        "the agent adds the version as the tag.")
    parts = image.split("/")
    if server:
        first = parts[0]
        if first.lower() == host.lower() or first.lower() == host.split(":")[0].lower():
            raise UserError(f"{img_where} repeats the registry host {first!r} that "
                            f"registry.server already adds; set `image: "
                            f"{'/'.join(parts[1:]) or 'myapp'}`.")
        if ":" in parts[-1]:
            name = parts[-1].split(":")[0]
            raise UserError(f"{img_where} contains a tag; `image` is the name only (the agent "
                            f"tags it with the version), so set `image: "
                            f"{'/'.join(parts[:-1] + [name])}`.")
        if ":" in first or first == "localhost":
            raise UserError(f"{img_where} starts with a registry host {first!r} although "
                            "registry.server is set; put the host only in registry.server.")
        _check_path(parts, img_where, "write it like myorg/myapp")
    else:
        if len(parts) > 1 and looks_like_host(parts[0]):
            host = _split_host(parts[0], img_where)
            parts = parts[1:]
        if ":" in parts[-1]:
            name = parts[-1].split(":")[0]
            prefix = [host] if host else []
            raise UserError(f"{img_where} contains a tag; `image` is the name only (the agent "
                            f"tags it with the version), so set `image: "
                            f"{'/'.join(prefix + parts[:-1] + [name])}`.")
        _check_path(parts, img_where, "write it like myorg/myapp")
    repository = "/".join(p for p in (server, image) if p)
    comps = repository.split("/")
    if host and any(c.lower() == host.lower() for c in comps[1:]):
        where = img_where if not server or host.lower() not in server.lower().split("/")[1:] \
            else srv_where
        raise UserError(f"{where} repeats the registry host {host!r} (the name would be "
                        f"{repository!r}); name the host once.")
    if len(repository) > NAME_MAX:
        raise UserError(f"The image name {repository!r} is {len(repository)} characters long; "
                        f"Docker allows at most {NAME_MAX}, so shorten `image` or "
                        "registry.server.")
    return repository


def registry_host(repository: str) -> str:
    """The registry Docker pushes ``repository`` to (``docker.io`` when none is named)."""
    first, sep, _ = repository.partition("/")
    if sep and looks_like_host(first):
        return first
    return "docker.io"
