"""`earthkamal-agent plan [TAG]`: what a tag would do, computed by the pipeline's own
functions, running nothing but `kamal config` (which only resolves names).

For a tag that does not exist yet the plan is made against HEAD.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from . import kamal, snapshot
from . import repo as gitrepo
from .builders import BuildSpec
from .builders import select as select_builder
from .config import REPO_FILE, load_user_config, parse_repo_config
from .errors import UserError
from .imageref import validate_version
from .paths import Paths


def _head(common_dir: str) -> str:
    repo = gitrepo.open_repo(common_dir)
    try:
        return str(repo.revparse_single("HEAD^{commit}").id)
    except KeyError:
        raise UserError("the repo has no commits; commit first.") from None


def _changes(paths: Paths, common: str, commit: str, dest: str | None) -> dict:
    """What the approval would show: commits since the version last deployed there."""
    from .history import changes
    from .store import Store

    if not paths.db.exists():
        return changes_none()
    store = Store(paths.db)
    try:
        rec = store.repo_by_dir(common)
        return changes(store, rec.id, common, commit, dest) if rec else changes_none()
    finally:
        store.close()


def changes_none() -> dict:
    return {"since": None, "count": None, "subjects": []}


def make_plan(paths: Paths, tag: str | None, repo_path: str) -> dict:
    from . import hookinstall

    loc = hookinstall.locate(Path(repo_path))
    common = loc.common_dir
    if tag is None:
        tags = sorted(t for t, v in gitrepo.list_tags(common).items()
                      if isinstance(v, gitrepo.TagTarget))
        tag = tags[-1] if tags else "v0.0.0"
    target = gitrepo.resolve_tag(common, tag)
    commit = target.commit_oid if target else _head(common)
    user = load_user_config(paths.user_config)
    cfg_text = gitrepo.read_file(common, commit, REPO_FILE)
    cfg = parse_repo_config(cfg_text, f"{REPO_FILE} at {tag}")
    files_read = [REPO_FILE if cfg_text is not None else f"{REPO_FILE} (absent: defaults)"]
    dest = cfg.destination_for(tag)
    plan: dict = {"tag": tag, "tag_exists": target is not None, "commit": commit,
                  "matches_tags": cfg.tag_matches(tag), "destination": dest,
                  "changes": _changes(paths, common, commit, dest)}
    with tempfile.TemporaryDirectory(prefix="earthkamal-plan-") as tmp:
        app = snapshot.export(common, commit, Path(tmp) / "app")
        for f in ("Earthfile", "Dockerfile", "config/deploy.yml",
                  f"config/deploy.{dest}.yml" if dest else "", ".kamal/secrets"):
            if f and (app / f).exists():
                files_read.append(f)
        version = validate_version(commit if cfg["version"] == "sha" else tag,
                                   sanitize=cfg["sanitize_version"])
        names = kamal.resolve(app, version, dest, kamal_binary=user.get("kamal_binary") or
                              "kamal")
        builder = select_builder(cfg["builder"], app)
        section = cfg.builder_settings(builder.name)
        masked = {n: "********" for n in section.get("secrets") or []}
        arch = names.arch[0] if len(names.arch) == 1 else ",".join(names.arch)
        spec = BuildSpec(app_dir=app, image_ref=names.absolute_image, platform=f"linux/{arch}",
                         settings=section, user=user, secrets=masked,
                         push=cfg["publish"] == "earthly", tmp_dir=Path(tmp))
        builder.check(spec)
        build = builder.build_command(spec)
        gates = builder.gate_commands(spec, list(cfg["gate"]))
        deploy = kamal.deploy_command(app, names, {})
        plan.update({
            "files": files_read,
            "builder": builder.name,
            "platform": spec.platform,
            "gate": [{"name": g, "argv": list(c.argv)} for g, c in gates]
            + ([{"name": "gate_command", "argv": cfg["gate_command"]}]
               if cfg["gate_command"] else []),
            "build": {"argv": list(build.argv), "env": build.public_env(),
                      "cwd": "<snapshot of the commit>"},
            "service": names.service,
            "image": names.absolute_image,
            "repository": names.repository,
            "version": names.version,
            "names_from": names.source,
            "push": {"by": cfg["publish"], "registry": names.registry_server or "docker.io",
                     "local_registry": names.local_registry,
                     "refs": [names.absolute_image] + (
                         [names.latest_image] if cfg["latest"] else [])},
            "approval": {"policy": cfg.approval_for(dest),
                         "timeout_s": cfg.approval_timeout},
            "deploy": {"argv": list(deploy.argv),
                       "secrets": sorted(set(kamal.secret_names(app, dest).values()))},
        })
    return plan


def cli_plan(paths: Paths, tag: str | None, repo_path: str, as_json: bool) -> int:
    p = make_plan(paths, tag, repo_path)
    if as_json:
        json.dump(p, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    w = sys.stdout.write
    w(f"{p['tag']} -> commit {p['commit'][:12]}"
      f"{'' if p['tag_exists'] else ' (tag does not exist yet: planned against HEAD)'}\n")
    if not p["matches_tags"]:
        w("  this tag does not match `tags:` in .earthkamal.yml: it would be ignored\n")
    w(f"  read:     {', '.join(p['files'])}\n")
    w(f"  builder:  {p['builder']} for {p['platform']}\n")
    for g in p["gate"]:
        w(f"  gate:     {' '.join(g['argv'])}\n")
    w(f"  build:    {' '.join(p['build']['argv'])}\n")
    w(f"  image:    {p['image']} (service {p['service']}, names from {p['names_from']})\n")
    w(f"  push:     {', '.join(p['push']['refs'])} by {p['push']['by']}\n")
    ch = p["changes"]
    w(f"  changes:  {ch['count']} commits since {ch['since']}\n" if ch["since"]
      else "  changes:  first deploy to this destination\n")
    w(f"  approval: {p['approval']['policy']} for {p['destination'] or 'the default destination'}"
      f", expires after {int(p['approval']['timeout_s'] // 3600)}h\n")
    w(f"  deploy:   {' '.join(p['deploy']['argv'])}\n")
    if p["deploy"]["secrets"]:
        w(f"  secrets:  {', '.join(p['deploy']['secrets'])} (from the keyring)\n")
    return 0
