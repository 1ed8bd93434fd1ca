"""A tiny Docker registry v2 client: read a tag's manifest digest (Basic or Bearer auth)."""

from __future__ import annotations

import base64
import json
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request

_ACCEPT = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])


class RegistryError(Exception):
    """The registry could not be asked, or refused."""


def split_repository(repository: str) -> tuple[str, str]:
    """('host[:port]', 'path') the way Docker splits a repository; Docker Hub by default."""
    first, _, rest = repository.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    path = repository if "/" in repository else f"library/{repository}"
    return "registry-1.docker.io", path


def _loopback(host: str) -> bool:
    h = host.rsplit(":", 1)[0] if not host.startswith("[") else host
    return h in ("localhost", "[::1]") or h.startswith("127.")


def manifest_digest(repository: str, tag: str, username: str | None = None,
                    password: str | None = None, timeout: float = 15) -> str:
    """The Docker-Content-Digest the registry serves for ``repository:tag``."""
    host, path = split_repository(repository)
    schemes = ["https", "http"] if _loopback(host) else ["https"]
    last: Exception | None = None
    for scheme in schemes:
        url = f"{scheme}://{host}/v2/{path}/manifests/{urllib.parse.quote(tag)}"
        try:
            return _head(url, username, password, timeout)
        except RegistryError:
            raise
        except (urllib.error.URLError, ssl.SSLError, OSError) as e:
            last = e
    raise RegistryError(f"cannot reach the registry {host}: {getattr(last, 'reason', last)}")


def _head(url: str, username: str | None, password: str | None, timeout: float) -> str:
    headers = {"Accept": _ACCEPT}
    if username and password:
        headers["Authorization"] = "Basic " + base64.b64encode(
            f"{username}:{password}".encode()).decode()
    req = urllib.request.Request(url, method="HEAD", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - http(s) only
            return _digest(r.headers)
    except urllib.error.HTTPError as e:
        if e.code == 401 and "bearer" in (e.headers.get("WWW-Authenticate") or "").lower():
            token = _token(e.headers["WWW-Authenticate"], username, password, timeout)
            headers["Authorization"] = f"Bearer {token}"
            req = urllib.request.Request(url, method="HEAD", headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
                    return _digest(r.headers)
            except urllib.error.HTTPError as e2:
                raise RegistryError(_http_sentence(e2.code)) from None
        raise RegistryError(_http_sentence(e.code)) from None


def _digest(headers) -> str:  # noqa: ANN001
    d = headers.get("Docker-Content-Digest")
    if not d:
        raise RegistryError("the registry sent no Docker-Content-Digest")
    return d


def _token(challenge: str, username: str | None, password: str | None, timeout: float) -> str:
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = params.pop("realm", "")
    if not realm.startswith(("https://", "http://")):
        raise RegistryError("the registry sent an unusable auth challenge")
    url = realm + "?" + urllib.parse.urlencode(params)
    headers = {}
    if username and password:
        headers["Authorization"] = "Basic " + base64.b64encode(
            f"{username}:{password}".encode()).decode()
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RegistryError(_http_sentence(e.code)) from None
    return body.get("token") or body.get("access_token") or ""


def _http_sentence(code: int) -> str:
    if code in (401, 403):
        return f"the registry refused the credentials (HTTP {code})"
    if code == 404:
        return "the registry has no such tag (HTTP 404)"
    return f"the registry answered HTTP {code}"
