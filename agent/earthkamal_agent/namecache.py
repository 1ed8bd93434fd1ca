"""Kamal's names for an unchanged config, without starting Ruby again.

`kamal config` costs about a second per release. For a deploy.yml (and destination file) with
no ERB, what Kamal resolves depends only on those bytes, the destination and the Kamal
installed, so the result for one version is reused for the next with only the version
replaced. Files with ERB (which can read the environment) always go to Kamal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

from . import kamal
from .imageref import validate_version

_VERSION = 1


def _key(app_dir: Path, destination: str | None, kamal_binary: str) -> str | None:
    h = hashlib.sha256(f"v{_VERSION}\0{destination or ''}\0".encode())
    files = [app_dir / "config" / "deploy.yml"]
    if destination:
        files.append(app_dir / "config" / f"deploy.{destination}.yml")
    for f in files:
        try:
            data = f.read_bytes()
        except OSError:
            return None
        if b"<%" in data:
            return None
        h.update(data + b"\0")
    exe = shutil.which(kamal_binary)
    if exe:
        st = os.stat(exe)
        h.update(f"{os.path.realpath(exe)}\0{st.st_mtime_ns}\0{st.st_size}".encode())
    return h.hexdigest()


def resolve(cache_dir: Path, app_dir: Path, version: str, destination: str | None,
            kamal_binary: str = "kamal") -> kamal.KamalNames:
    """kamal.resolve, reusing the answer for the same config bytes (see module doc)."""
    key = _key(app_dir, destination, kamal_binary)
    path = cache_dir / f"{key}.json" if key else None
    if path is not None:
        try:
            data = json.loads(path.read_text())
            names = kamal.KamalNames(**{k: tuple(v) if isinstance(v, list) else v
                                        for k, v in data.items()})
            v = validate_version(version)
            return dataclasses.replace(names, version=v,
                                       absolute_image=f"{names.repository}:{v}",
                                       source=f"{names.source}, cached")
        except (OSError, ValueError, TypeError):
            pass
    names = kamal.resolve(app_dir, version, destination, kamal_binary=kamal_binary)
    if path is not None:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(names)))
        os.replace(tmp, path)
    return names
