"""The `earthkamal-agent` command line.

Handlers import what they need lazily so `status` stays fast. Every handler returns an exit
code; a :class:`UserError` becomes one sentence on stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import __version__
from .errors import UserError
from .paths import Paths, default_paths


def _paths() -> Paths:
    return default_paths().ensure()


def _store(paths: Paths):
    from .store import Store

    return Store(paths.db)


def _job_arg(store, job: str):
    try:
        j = store.job(int(job.lstrip("#")))
    except ValueError:
        j = None
    if j is None:
        raise UserError(f"there is no job {job}; `earthkamal-agent status` lists the jobs.")
    return j


# -- install / uninstall ---------------------------------------------------------------------
def cmd_install(a: argparse.Namespace) -> int:
    from . import hookinstall, repo

    paths = _paths()
    loc = hookinstall.locate(a.path)
    if a.config_hook:
        inst = hookinstall.install_config_hook(paths, loc)
    else:
        try:
            inst = hookinstall.install_hook(paths, loc, allow_shared=a.shared_hooks_path)
        except UserError as e:
            if loc.hooks_path_config and gitcli_version() >= hookinstall.CONFIG_HOOKS_GIT:
                raise UserError(f"{e} With git 2.54+ you can also pass --config-hook: the hook "
                                "then runs from git config, beside the shared ones.") from None
            raise
    store = _store(paths)
    existing = store.repo_by_dir(loc.common_dir)
    baseline = []
    for name, t in repo.list_tags(loc.common_dir).items():
        baseline.append((name, t.commit_oid if isinstance(t, repo.TagTarget) else
                         repo.raw_target(loc.common_dir, name) or ""))
    # Only the first install sets the baseline: tags made since were seen by the hook.
    rec = store.add_repo(loc.common_dir, loc.worktree, hookinstall.repo_name(loc), loc.bare,
                         inst.hook_path, inst.chained_path, loc.hook_name,
                         baseline if existing is None else [])
    if existing and not inst.changed:
        print(f"{rec.name} is already registered ({loc.common_dir}); nothing to do.")
    else:
        chained = f", chaining the existing hook ({inst.chained_path})" if inst.chained_path else ""
        print(f"Registered {rec.name}: {loc.hook_name} hook in {inst.hook_path}{chained}.")
        if existing is None:
            print(f"{len(baseline)} existing tag(s) recorded as already released; "
                  "new tags matching .earthkamal.yml `tags:` (default v*) will be built.")
    _hint_agent(paths)
    _config_hint(loc)
    return 0


def gitcli_version() -> tuple[int, int]:
    from . import gitcli

    return gitcli.version()


def _hint_agent(paths: Paths) -> None:
    from .lockfile import agent_running

    if agent_running(paths.lock) is None:
        print("The agent is not running: start it with `earthkamal-agent service install` "
              "(or `earthkamal-agent run` in a terminal).")


def _config_hint(loc) -> None:
    from pathlib import Path

    root = Path(loc.worktree) if loc.worktree else None
    if root and not (root / ".earthkamal.yml").exists():
        print("No .earthkamal.yml yet: `earthkamal-agent init` writes a commented one "
              "(defaults: tags v*, Earthfile if present, else Dockerfile).")


def cmd_uninstall(a: argparse.Namespace) -> int:
    from . import hookinstall

    paths = _paths()
    store = _store(paths)
    from pathlib import Path

    p = Path(a.path).expanduser().absolute()
    rec = None
    try:
        loc = hookinstall.locate(p)
        rec = store.repo_by_dir(loc.common_dir)
    except UserError:
        for r in store.repos():
            if p in (Path(r.common_dir), Path(r.worktree or "/nonexistent")):
                rec = r
    if rec is None:
        raise UserError(f"{p} is not registered; `earthkamal-agent status` lists the repos.")
    if rec.hook_path and Path(rec.hook_path).is_relative_to(paths.home):
        from .runner import run_quiet

        for c in hookinstall.config_unhook_commands(rec.common_dir):
            run_quiet(c)
        Path(rec.hook_path).unlink(missing_ok=True)
    elif rec.hook_path:
        hookinstall.uninstall_hook(rec.hook_path)
    store.remove_repo(rec.id)
    print(f"Unregistered {rec.name}; its hook is removed"
          f"{' and the previous hook restored' if rec.chained_path else ''}.")
    return 0


# -- run -------------------------------------------------------------------------------------
def cmd_run(a: argparse.Namespace) -> int:
    from .daemon import Agent, setup_logging

    paths = _paths()
    setup_logging(paths, a.verbose)
    return Agent(paths, once=a.once, hold=a.hold).run()


# -- status / logs ---------------------------------------------------------------------------
def _age(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d"


def _last_log_line(paths: Paths, job_id: int) -> str:
    p = paths.logs / f"job-{job_id}.log"
    try:
        with open(p, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 4096))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1][:200] if lines else ""
    except OSError:
        return ""


def status_data(paths: Paths, limit: int = 50) -> dict:
    """The `status --json` document (schema 1; see README)."""
    from .lockfile import agent_running

    now = time.time()
    info = agent_running(paths.lock)
    agent = {"running": info is not None, "pid": None, "started_at": None, "uptime_s": None,
             "version": __version__, "state_dir": str(paths.home)}
    if info:
        started = float(info.get("started", now))
        agent.update(pid=int(info.get("pid", 0)) or None, started_at=started,
                     uptime_s=round(now - started, 1), version=info.get("version", __version__))
    from .store import FINISHED

    repos, jobs = [], []
    if paths.db.exists():
        store = _store(paths)
        names = {}
        for r in store.repos():
            names[r.id] = r.name
            repos.append({"id": r.id, "name": r.name, "path": r.worktree or r.common_dir,
                          "common_dir": r.common_dir, "bare": r.bare, "hook": r.hook_path,
                          "chained_hook": r.chained_path})
        for j in store.jobs(limit=limit):
            active = j.state not in FINISHED
            jobs.append({
                "id": j.id, "repo": names.get(j.repo_id), "tag": j.tag, "commit": j.commit_oid,
                "state": j.state, "step": j.step, "reason": j.reason,
                "destination": j.destination, "version": j.version, "image": j.image,
                "digest": j.digest, "origin": j.origin, "created_at": j.created_at,
                "updated_at": j.updated_at, "age_s": round(now - j.created_at, 1),
                "step_elapsed_s": round(now - j.step_started_at, 1)
                if (active and j.step_started_at) else None,
                "last_log_line": _last_log_line(paths, j.id) if active else None,
                "changes": j.extra.get("changes"),
            })
        store.close()
    return {"schema": 1, "agent": agent, "repos": repos, "jobs": jobs}


def cmd_status(a: argparse.Namespace) -> int:
    paths = default_paths()
    data = status_data(paths, a.limit)
    if a.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    ag = data["agent"]
    if ag["running"]:
        print(f"agent: running (PID {ag['pid']}, up {_age(ag['uptime_s'] or 0)}, "
              f"v{ag['version']})")
    else:
        print("agent: not running (start it with `earthkamal-agent service install`, or "
              "`earthkamal-agent run` in a terminal)")
    print(f"state: {ag['state_dir']}")
    if not data["repos"]:
        print("repos: none (register one with `earthkamal-agent install PATH`)")
    else:
        print("repos:")
        for r in data["repos"]:
            print(f"  {r['name']:<16} {r['path']}")
    if not data["jobs"]:
        print("jobs: none yet (push a tag like `git tag v1.0.0` in a registered repo)")
        return 0
    print("jobs:")
    rows = [("ID", "REPO", "TAG", "STATE", "DEST", "AGE", "STEP / REASON")]
    for j in data["jobs"]:
        detail = j["reason"] or ""
        if j["state"] == "awaiting_approval":
            detail = f"earthkamal-agent approve {j['id']} | reject {j['id']}"
            ch = j.get("changes") or {}
            if ch.get("since"):
                detail += f" ({ch.get('count')} commits since {ch['since']})"
            elif ch:
                detail += " (first deploy)"
        elif j["step_elapsed_s"] is not None and j["step"]:
            detail = f"{j['step']} {_age(j['step_elapsed_s'])}"
            if j["last_log_line"]:
                detail += f": {j['last_log_line'][:60]}"
        rows.append((str(j["id"]), j["repo"] or "?", j["tag"], j["state"],
                     j["destination"] or "-", _age(j["age_s"]), detail))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        cells = "  ".join(c.ljust(w) for c, w in zip(r[:6], widths, strict=True))
        print(f"  {cells}  {r[6]}")
    return 0


def cmd_logs(a: argparse.Namespace) -> int:
    paths = default_paths()
    store = _store(paths)
    job = _job_arg(store, a.job)
    p = paths.logs / f"job-{job.id}.log"
    if not p.exists():
        print(f"job {job.id} has no log yet (state {job.state}).", file=sys.stderr)
        return 0 if not a.follow else _follow(p, store, job.id)
    with open(p, "rb") as f:
        sys.stdout.write(f.read().decode("utf-8", "replace"))
        sys.stdout.flush()
    return _follow(p, store, job.id) if a.follow else 0


def _follow(p, store, job_id: int) -> int:
    from .store import TERMINAL

    pos = p.stat().st_size if p.exists() else 0
    while True:
        if p.exists():
            with open(p, "rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
                if chunk:
                    sys.stdout.write(chunk.decode("utf-8", "replace"))
                    sys.stdout.flush()
        job = store.job(job_id)
        if job is None or job.state in TERMINAL or job.state == "awaiting_approval":
            return 0
        time.sleep(0.3)


# -- decisions and manual paths --------------------------------------------------------------
def cmd_decide(a: argparse.Namespace) -> int:
    from . import actions

    paths = _paths()
    store = _store(paths)
    job = _job_arg(store, a.job)
    msg = getattr(actions, a.func_name)(paths, store, job)
    print(msg)
    return 0


def cmd_deploy(a: argparse.Namespace) -> int:
    from . import actions

    paths = _paths()
    print(actions.deploy_tag(paths, _store(paths), a.tag, a.repo))
    return 0


def cmd_rollback(a: argparse.Namespace) -> int:
    from . import actions

    paths = _paths()
    print(actions.rollback(paths, _store(paths), a.destination, a.repo))
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from . import plan

    return plan.cli_plan(_paths(), a.tag, a.repo, a.json)


def cmd_init(a: argparse.Namespace) -> int:
    from . import initcmd

    return initcmd.cli_init(a.path)


def cmd_secrets(a: argparse.Namespace) -> int:
    from . import secrets

    if a.action == "set":
        if not a.name:
            raise UserError("name the secret: `earthkamal-agent secrets set NAME`.")
        return secrets.cli_set(a.name, a.repo, sys.stdin.isatty())
    if a.action == "list":
        return secrets.cli_list(a.repo)
    if not a.name:
        raise UserError("name the secret: `earthkamal-agent secrets delete NAME`.")
    return secrets.cli_delete(a.name, a.repo)


def cmd_service(a: argparse.Namespace) -> int:
    from . import service

    return {"install": service.cli_install, "uninstall": service.cli_uninstall,
            "status": service.cli_status}[a.action](a)


def cmd_doctor(a: argparse.Namespace) -> int:
    from . import doctor
    from .repochecks import checks_for

    return doctor.cli_doctor(a.json, extra=checks_for(default_paths()))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="earthkamal-agent",
        description="Release a Kamal app by pushing a git tag: build with Earthly/BuildKit, "
        "push, approve on the desktop, kamal deploy.")
    p.add_argument("--version", action="version", version=f"earthkamal-agent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("install", help="register a repo and install its git hook")
    s.add_argument("path", nargs="?", default=".")
    s.add_argument("--shared-hooks-path", action="store_true",
                   help="install into a core.hooksPath outside the repo (affects other repos)")
    s.add_argument("--config-hook", action="store_true",
                   help="git >= 2.54: register the hook in git config instead of a hook file")
    s.set_defaults(func=cmd_install)
    s = sub.add_parser("uninstall", help="unregister a repo and restore its previous hook")
    s.add_argument("path", nargs="?", default=".")
    s.set_defaults(func=cmd_uninstall)
    s = sub.add_parser("run", help="run the agent in the foreground (for systemd/launchd)")
    s.add_argument("--once", action="store_true", help="drain, process what is ready, exit")
    s.add_argument("--hold", action="store_true",
                   help="record jobs but start no builds or deploys (they wait in `detected`)")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("status", help="the agent, the repos and the jobs")
    s.add_argument("--json", action="store_true")
    s.add_argument("--limit", type=int, default=50)
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("logs", help="a job's log")
    s.add_argument("job")
    s.add_argument("-f", "--follow", action="store_true")
    s.set_defaults(func=cmd_logs)
    for name, helptext in (("approve", "approve a job waiting for approval"),
                           ("reject", "reject a job waiting for approval"),
                           ("retry", "run a failed or interrupted job again"),
                           ("cancel", "cancel a job")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("job")
        s.set_defaults(func=cmd_decide, func_name=name)
    s = sub.add_parser("deploy", help="enqueue a tag by hand (as if it had just been made)")
    s.add_argument("tag")
    s.add_argument("--repo", default=".")
    s.set_defaults(func=cmd_deploy)
    s = sub.add_parser("rollback", help="deploy the previous deployed version again")
    s.add_argument("destination", nargs="?")
    s.add_argument("--repo", default=".")
    s.set_defaults(func=cmd_rollback)
    s = sub.add_parser("plan", help="what a tag would do, running nothing")
    s.add_argument("tag", nargs="?")
    s.add_argument("--repo", default=".")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plan)
    s = sub.add_parser("init", help="write a commented .earthkamal.yml")
    s.add_argument("path", nargs="?", default=".")
    s.set_defaults(func=cmd_init)
    s = sub.add_parser("secrets", help="registry password, SSH key and app secrets in the keyring")
    s.add_argument("action", choices=["set", "list", "delete"])
    s.add_argument("name", nargs="?")
    s.add_argument("--repo", default=None)
    s.set_defaults(func=cmd_secrets)
    s = sub.add_parser("service", help="the systemd user unit or launchd agent")
    s.add_argument("action", choices=["install", "uninstall", "status"])
    s.add_argument("--unit-dir", default=None, help=argparse.SUPPRESS)
    s.add_argument("--no-start", action="store_true", help="write the unit, start nothing")
    s.add_argument("--manager", choices=["systemd", "launchd"], default=None,
                   help="the service manager (default: detected)")
    s.add_argument("--json", action="store_true", help="status as JSON")
    s.set_defaults(func=cmd_service)
    s = sub.add_parser("doctor", help="check every prerequisite")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if not getattr(a, "func", None):
        p.print_help()
        return 2
    try:
        return a.func(a) or 0
    except UserError as e:
        print(f"earthkamal-agent: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - a bug still gets one sentence, details in debug
        if os.environ.get("EARTHKAMAL_DEBUG"):
            raise
        print(f"earthkamal-agent: unexpected error: {type(e).__name__}: {e} "
              "(set EARTHKAMAL_DEBUG=1 for the traceback and please report it).", file=sys.stderr)
        return 70


if __name__ == "__main__":
    raise SystemExit(main())
