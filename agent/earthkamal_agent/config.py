"""`.earthkamal.yml` (per repo, read from the tagged commit) and the user config.

The schema below is the one source for validation, the defaults and the commented template
that `earthkamal-agent init` writes (and the README's reference), the way Kamal keeps its
configuration docs as commented example files.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

REPO_FILE = ".earthkamal.yml"


class ConfigError(UserError):
    """Invalid configuration: the message names the file, the key and the problem."""


@dataclass(frozen=True)
class Key:
    name: str
    kind: str          # str, bool, int, list, map, duration, choice:<a|b>, argv, policy
    default: Any
    doc: str
    example: str = ""


REPO_SCHEMA: tuple[Key, ...] = (
    Key("tags", "list", ["v*"], "Glob patterns of the tags that release; other tags are ignored.",
        '["v*"]'),
    Key("destinations", "map", {}, "Tag pattern -> Kamal destination (`-d`), first match wins; "
        "null or no match means Kamal's default destination.",
        '\n  "v*-rc*": staging\n  "v*": production'),
    Key("builder", "choice:auto|earthly|dockerfile", "auto",
        "auto: Earthly when the commit has an Earthfile, else the Dockerfile through BuildKit."),
    Key("earthly", "map", {}, "Earthly builder: target (default +docker), image (the name the "
        "target saves with SAVE IMAGE; default: Kamal's image ref), image_arg (an ARG the target "
        "takes for the image ref), args (build args), secrets (keyring names passed as --secret), "
        "remote_cache (a registry ref).", "\n  target: +docker\n  image_arg: IMAGE"),
    Key("dockerfile", "map", {}, "Dockerfile builder: file (default Dockerfile), context "
        "(default .), target, args, secrets.", "\n  file: Dockerfile"),
    Key("version", "choice:tag|sha", "tag", "The image version: the tag name, or the commit SHA "
        "(Kamal's own default)."),
    Key("sanitize_version", "bool", False, "Turn a tag that is not a valid Docker tag into one "
        "(characters outside [A-Za-z0-9_.-] become '-', e.g. release/1.0 -> release-1.0)."),
    Key("gate", "list", [], "Test targets that must pass before the image is built: Earthly "
        "targets (+test) or Dockerfile stages.", "[+test, +lint]"),
    Key("gate_command", "argv", [], "A command run in the snapshot before the build; non-zero "
        "stops the job.", "[make, test]"),
    Key("add_service_label", "bool", False, "Add the `service` label Kamal requires when the "
        "built image lacks it (one extra BuildKit layer)."),
    Key("latest", "bool", False, "Also push `latest` (or `latest-<destination>`)."),
    Key("publish", "choice:agent|earthly", "agent", "Who pushes: the agent (tag, label check, "
        "push with the keyring password), or Earthly itself (SAVE IMAGE --push)."),
    Key("approval", "policy", "required", "required | auto, or a map destination -> policy.",
        "\n  production: required\n  staging: auto"),
    Key("approval_timeout", "duration", "24h", "A waiting approval expires after this (s, m, h, "
        "d)."),
    Key("secrets", "list", None, "App secrets (keyring names) Kamal gets in its environment; "
        "default: every NAME in .kamal/secrets* lines of the form NAME=$NAME."),
    Key("require_signed_tags", "bool", False, "Only build tags that `git verify-tag` accepts."),
    Key("keep_failed_snapshot", "bool", False, "Keep the build dir of a failed job for "
        "debugging."),
)

USER_SCHEMA: tuple[Key, ...] = (
    Key("buildkit_host", "str", None, "BuildKit host every Earthly build uses (one shared daemon "
        "and cache); default: Earthly's own."),
    Key("earthly_binary", "str", "earthly", "`earthly`, or `earth` for EarthBuild."),
    Key("earthly_env_prefix", "str", None, "EARTHLY or EARTH; default follows the binary."),
    Key("earthly_config", "str", None, "An Earthly config file passed as --config."),
    Key("docker_binary", "str", "docker", "The docker client."),
    Key("kamal_binary", "str", "kamal", "The kamal command."),
    Key("builds_per_host", "int", 1, "Builds at once per BuildKit host."),
    Key("approvals", "choice:auto|dbus|osascript|none", "auto", "Notification backend."),
    Key("keep_jobs", "int", 200, "Finished jobs kept in history."),
    Key("keep_days", "int", 30, "Days finished jobs are kept."),
    Key("use_docker_config", "bool", False, "Push with ~/.docker/config.json instead of a "
        "temporary one holding the keyring password."),
    Key("require_signed_tags", "bool", False, "Signed tags only, for every repo."),
    Key("ssh_agent", "choice:auto|user|private", "auto", "auto: a private ssh-agent when an SSH "
        "key is stored in the keyring (secret SSH_PRIVATE_KEY), else yours."),
)

_DUR = re.compile(r"^(\d+)\s*([smhd]?)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_duration(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value > 0 else None
    m = _DUR.match(str(value).strip())
    if not m:
        return None
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _type_name(v: Any) -> str:
    return {bool: "true/false", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "nothing"}.get(type(v), type(v).__name__)


def _check(where: str, key: Key, v: Any) -> Any:
    bad = f"{where}: `{key.name}`"
    k = key.kind
    if k == "str":
        if not isinstance(v, str):
            raise ConfigError(f"{bad} must be a string, got {_type_name(v)}.")
    elif k == "bool":
        if not isinstance(v, bool):
            raise ConfigError(f"{bad} must be true or false, got {_type_name(v)}.")
    elif k == "int":
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{bad} must be a positive number, got {v!r}.")
    elif k == "list":
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(i, str) and i for i in v):
            raise ConfigError(f"{bad} must be a list of strings, got {_type_name(v)}.")
    elif k == "argv":
        if not isinstance(v, list) or not all(isinstance(i, str) for i in v):
            raise ConfigError(f"{bad} must be a list of arguments like [make, test] "
                              f"(no shell string), got {_type_name(v)}.")
    elif k == "map":
        if not isinstance(v, dict):
            raise ConfigError(f"{bad} must be a mapping, got {_type_name(v)}.")
    elif k == "duration":
        if parse_duration(v) is None:
            raise ConfigError(f"{bad} must be a duration like 30m, 24h or 2d, got {v!r}.")
    elif k.startswith("choice:"):
        opts = k[7:].split("|")
        if v not in opts:
            raise ConfigError(f"{bad} must be one of {', '.join(opts)}, got {v!r}.")
    elif k == "policy":
        ok = v in ("required", "auto") or (
            isinstance(v, dict) and all(p in ("required", "auto") for p in v.values()))
        if not ok:
            raise ConfigError(f"{bad} must be required, auto, or a map of destination to "
                              f"required/auto, got {v!r}.")
    return v


@dataclass
class RepoConfig:
    """A validated `.earthkamal.yml` (defaults filled in)."""

    values: dict[str, Any] = field(default_factory=dict)
    source: str = "defaults"

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def tag_matches(self, tag: str) -> bool:
        return any(fnmatch.fnmatchcase(tag, p) for p in self.values["tags"])

    def destination_for(self, tag: str) -> str | None:
        for pattern, dest in self.values["destinations"].items():
            if fnmatch.fnmatchcase(tag, str(pattern)):
                return dest or None
        return None

    def builder_settings(self, builder: str) -> dict:
        """The `earthly:` or `dockerfile:` section for the builder that will run (a copy)."""
        return dict(self.values["earthly" if builder == "earthly" else "dockerfile"])

    def approval_for(self, destination: str | None) -> str:
        pol = self.values["approval"]
        if isinstance(pol, dict):
            return pol.get(destination or "default", pol.get("default", "required"))
        return pol

    @property
    def approval_timeout(self) -> float:
        return parse_duration(self.values["approval_timeout"]) or 86400.0


def validate(data: Any, where: str, schema: tuple[Key, ...]) -> dict[str, Any]:
    """Check a parsed YAML mapping against ``schema``; return the values with defaults."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the file must be a mapping of keys (like `tags: [v*]`), "
                          f"got {_type_name(data)}.")
    known = {k.name: k for k in schema}
    for name in data:
        if name not in known:
            raise ConfigError(f"{where}: unknown key `{name}`; known keys are "
                              f"{', '.join(sorted(known))}.")
    out: dict[str, Any] = {}
    for key in schema:
        if key.name in data and data[key.name] is not None:
            out[key.name] = _check(where, key, data[key.name])
        else:
            d = key.default
            out[key.name] = (list(d) if isinstance(d, list)
                             else dict(d) if isinstance(d, dict) else d)
    return out


def _load_yaml(text: str | bytes, where: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).split("\n")[0]
        raise ConfigError(f"{where}: not valid YAML{at} ({problem}).") from None


def parse_repo_config(text: bytes | None, where: str) -> RepoConfig:
    if text is None:
        return RepoConfig(validate({}, where, REPO_SCHEMA), "defaults")
    data = _load_yaml(text, where)
    values = validate(data, where, REPO_SCHEMA)
    for pattern, dest in values["destinations"].items():
        plain = isinstance(dest, str) and _NAME.match(dest.replace("-", "_"))
        if dest is not None and not plain:
            raise ConfigError(f"{where}: `destinations` maps {pattern!r} to {dest!r}; a "
                              "destination must be a plain name like production.")
    for sec in ("earthly", "dockerfile"):
        sub = values[sec]
        allowed = {"earthly": {"target", "image", "image_arg", "args", "secrets", "remote_cache"},
                   "dockerfile": {"file", "context", "target", "args", "secrets"}}[sec]
        for k in sub:
            if k not in allowed:
                raise ConfigError(f"{where}: unknown key `{sec}.{k}`; known: "
                                  f"{', '.join(sorted(allowed))}.")
        if "args" in sub and not isinstance(sub["args"], dict):
            raise ConfigError(f"{where}: `{sec}.args` must be a mapping of NAME: value.")
        if "secrets" in sub and (not isinstance(sub["secrets"], list)
                                 or not all(isinstance(s, str) and _NAME.match(s)
                                            for s in sub["secrets"])):
            raise ConfigError(f"{where}: `{sec}.secrets` must be a list of names like NPM_TOKEN.")
    if values["secrets"] is not None:
        for s in values["secrets"]:
            if not _NAME.match(s):
                raise ConfigError(f"{where}: `secrets` entry {s!r} is not a valid name.")
    target = values["earthly"].get("target", "+docker")
    if not isinstance(target, str) or not re.match(r"^(\./[\w./-]*)?\+[A-Za-z0-9._-]+$", target):
        raise ConfigError(f"{where}: `earthly.target` must look like +docker, got {target!r}.")
    return RepoConfig(values, where)


def load_user_config(path: Path) -> dict[str, Any]:
    """The per-user settings (config.yml in the user config dir); defaults when absent."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return validate({}, str(path), USER_SCHEMA)
    return validate(_load_yaml(text, str(path)), str(path), USER_SCHEMA)


def template(schema: tuple[Key, ...] = REPO_SCHEMA) -> str:
    """The commented `.earthkamal.yml` that `init` writes: every key, its doc and default."""
    import yaml

    out = ["# .earthkamal.yml: how earthkamal-agent releases this repo. Read from the tagged",
           "# commit, so a change here ships with the release. Uncomment what you need.", ""]
    for key in schema:
        out.append(f"# {key.doc}")
        shown = key.example or (yaml.safe_dump(key.default, default_flow_style=True).strip()
                                if key.default is not None else "")
        shown = shown.removesuffix("\n...").strip() if "\n" not in key.example else key.example
        line = f"{key.name}:" + (shown if shown.startswith("\n") else f" {shown}")
        if key.name == "tags":
            out.append(line)
        else:
            out.extend("# " + part for part in line.split("\n"))
        out.append("")
    return "\n".join(out)
