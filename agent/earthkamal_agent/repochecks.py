"""Per-repo checks for `doctor`: hook placement and the config at HEAD."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .doctor import Check
from .paths import Paths


def checks_for(paths: Paths) -> list[Callable[[], list[Check]]]:
    from .store import Store

    if not paths.db.exists():
        return []
    store = Store(paths.db)
    repos = store.repos()
    store.close()
    return [lambda r=r: check_repo(r) for r in repos]


def check_repo(r) -> list[Check]:  # noqa: ANN001
    from . import hookinstall

    out: list[Check] = []
    name = f"repo {r.name}"
    try:
        loc = hookinstall.locate(r.worktree or r.common_dir)
    except Exception as e:  # noqa: BLE001
        return [Check(f"{name}: repository", False, str(e),
                      f"`earthkamal-agent uninstall {r.worktree or r.common_dir}` if it is gone")]
    hook = Path(loc.hooks_dir) / loc.hook_name
    ok = hook.exists() and hookinstall.is_ours(hook) and os.access(hook, os.X_OK)
    moved = r.hook_path and str(hook) != r.hook_path
    out.append(Check(
        f"{name}: hook", ok and not moved,
        f"{hook}" + (" (core.hooksPath changed since install)" if moved else ""),
        f"`earthkamal-agent install {r.worktree or r.common_dir}` to (re)install it"))
    if r.chained_path:
        out.append(Check(f"{name}: chained hook", Path(r.chained_path).exists(), r.chained_path,
                         "the hook that was there before install is missing; reinstall it"))
    if loc.bare:
        return out
    out += _config_checks(name, loc.common_dir)
    return out


def _config_checks(name: str, common_dir: str) -> list[Check]:
    from . import kamal, snapshot
    from . import repo as gitrepo
    from .builders import BuildSpec
    from .builders import select as select_builder
    from .config import REPO_FILE, parse_repo_config

    out: list[Check] = []
    try:
        head = str(gitrepo.open_repo(common_dir).revparse_single("HEAD^{commit}").id)
        cfg = parse_repo_config(gitrepo.read_file(common_dir, head, REPO_FILE),
                                f"{REPO_FILE} at HEAD")
        out.append(Check(f"{name}: {REPO_FILE}", True, "valid at HEAD"))
    except Exception as e:  # noqa: BLE001
        return [Check(f"{name}: {REPO_FILE}", False, str(e), "fix the file and commit it")]
    with tempfile.TemporaryDirectory(prefix="earthkamal-doctor-") as tmp:
        try:
            app = snapshot.export(common_dir, head, Path(tmp) / "app")
            names = kamal.resolve(app, "v0.0.0", None)
            out.append(Check(f"{name}: config/deploy.yml", True,
                             f"service {names.service}, image {names.repository}, "
                             f"arch {','.join(names.arch)}"))
            builder = select_builder(cfg["builder"], app)
            section = cfg.builder_settings(builder.name)
            builder.check(BuildSpec(app, names.absolute_image, f"linux/{names.arch[0]}",
                                    section, {}))
            out.append(Check(f"{name}: {builder.name}", True, "build file and target present"))
            missing = [n for n in names.registry_password_secrets
                       if n not in kamal.secret_names(app, None)]
            out.append(Check(f"{name}: .kamal/secrets", not missing,
                             "registry password referenced" if not missing else
                             f"no line for {', '.join(missing)}",
                             f"add `{missing[0]}=${missing[0]}` to .kamal/secrets" if missing
                             else ""))
        except Exception as e:  # noqa: BLE001
            out.append(Check(f"{name}: release config", False, str(e), "fix it and commit"))
    return out
