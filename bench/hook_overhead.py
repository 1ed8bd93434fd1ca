"""What the reference-transaction hook adds to ref-changing git commands.

Two repos, one with the hook installed (`earthkamal-agent install`) and one without, measured
INTERLEAVED: every iteration runs `git tag X` + `git tag -d X` in both (which repo goes first
alternates), so drift on a shared machine hits both sides alike. Each git command is timed on
its own (wall time from spawn to exit, the same Python `subprocess.run` for both sides).

Spool: by default the agent runs (`run --hold`) during the measurement, so every spool file is
consumed as in real use (`--spool clean` instead deletes spool files between iterations with no
agent running). Then `git commit --allow-empty` is measured the same way: a branch update, no
tag lines, where the hook should exit without writing anything.

Finally the hook's parts are timed in a shell loop (no Python in the loop) to say what costs
what: starting /bin/sh for the hook, the `prepared` early exit, a `committed` branch-only pass,
a `committed` tag pass (printf + `mv`), and a bare `mv`; plus how many times git runs the hook
per command.

    python bench/hook_overhead.py [--cycles 40] [--spool agent|clean]

Last line: `ratio: <hooked/unhooked per tag command> (target added <= 5 ms)`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Agent, TempDir, cli, git, make_repo, median  # noqa: E402

TARGET_ADDED_MS = 5.0


def timed_git(cwd: Path, *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["git", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def shell_loop(script: str, n: int, cwd: Path, env: dict | None = None) -> float:
    """Seconds per iteration of `script` run n times inside one sh process."""
    loop = f'i=0; while [ "$i" -lt {n} ]; do {script}; i=$((i + 1)); done'
    best = None
    for _ in range(3):  # best of 3 loops: the least disturbed one
        t0 = time.perf_counter()
        subprocess.run(["sh", "-c", loop], cwd=cwd, check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dt = (time.perf_counter() - t0) / n
        best = dt if best is None else min(best, dt)
    return best


def hook_invocations(tmp: Path) -> dict[str, str]:
    """How often git runs reference-transaction per command (a logging hook, no agent)."""
    r = make_repo(tmp / "probe")
    log = tmp / "probe.log"
    hook = r / ".git/hooks/reference-transaction"
    hook.write_text(f'#!/bin/sh\necho "$1" >> "{log}"\ncat > /dev/null\n')
    hook.chmod(0o755)
    out = {}
    for name, args in (("git tag X", ("tag", "probe-x")),
                       ("git tag -d X", ("tag", "-d", "probe-x")),
                       ("git commit", ("commit", "-q", "--allow-empty", "-m", "p"))):
        log.write_text("")
        git(r, *args)
        phases = log.read_text().split()
        out[name] = f"{len(phases)} ({', '.join(phases)})"
    return out


def components(tmp: Path, hook_src: Path, spool_in_hook: str, n: int) -> dict[str, float]:
    scratch = tmp / "parts"
    spool = scratch / "spool"
    spool.mkdir(parents=True)
    hook = scratch / "reference-transaction"
    hook.write_text(hook_src.read_text().replace(spool_in_hook, str(spool)))
    hook.chmod(0o755)
    z = "0" * 40
    o = "1" * 40
    (scratch / "tag.in").write_text(f"{z} {o} refs/tags/v1.2.3\n")
    (scratch / "branch.in").write_text(f"{o} {'2' * 40} refs/heads/main\n")
    (scratch / "a").write_text("x")
    parts = {
        "exec /bin/sh (`sh -c :`)": shell_loop("sh -c :", n, scratch),
        "exec /bin/true (any external command)": shell_loop("/bin/true", n, scratch),
        "hook `prepared` (early exit)": shell_loop("./reference-transaction prepared <tag.in",
                                                   n, scratch),
        "hook `committed`, branch only": shell_loop(
            "./reference-transaction committed <branch.in", n, scratch),
        "hook `committed`, one tag (printf+mv)": shell_loop(
            "./reference-transaction committed <tag.in", n, scratch),
        "`mv -f` alone": shell_loop("mv -f a b; mv -f b a", n, scratch) / 2,
        "printf > tmp file alone (builtin)": shell_loop("printf 'x\\n' >c", n, scratch),
    }
    shutil.rmtree(spool)
    return parts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=40, help="tag/untag cycles per repo (>= 40)")
    ap.add_argument("--commits", type=int, default=40, help="commits per repo")
    ap.add_argument("--spool", choices=("agent", "clean"), default="agent",
                    help="agent: run the agent (--hold) to consume spool files (default); "
                         "clean: no agent, delete spool files after each iteration")
    ap.add_argument("--loop", type=int, default=200, help="iterations per hook-part shell loop")
    a = ap.parse_args()

    with TempDir("hook") as tmp:
        home = tmp / "home"
        hooked = make_repo(tmp / "hooked")
        plain = make_repo(tmp / "plain")
        cli(home, "install", str(hooked))
        hook_file = hooked / ".git/hooks/reference-transaction"
        assert hook_file.exists() and not (plain / ".git/hooks/reference-transaction").exists()
        spool = home / "spool"
        agent = Agent(home, "--hold").start() if a.spool == "agent" else None
        try:
            for r in (hooked, plain):  # warm up caches, both sides
                for _ in range(3):
                    timed_git(r, "tag", "warm")
                    timed_git(r, "tag", "-d", "warm")
            tag_t = {hooked: [], plain: []}
            add_t = {hooked: [], plain: []}
            del_t = {hooked: [], plain: []}
            files_per = {"tag": [], "tag -d": []}
            for i in range(a.cycles):
                order = (hooked, plain) if i % 2 == 0 else (plain, hooked)
                for r in order:
                    n0 = len(list(spool.glob("*.ev"))) if agent is None else 0
                    add_t[r].append(timed_git(r, "tag", f"bench-{i}"))
                    n1 = len(list(spool.glob("*.ev"))) if agent is None else 0
                    del_t[r].append(timed_git(r, "tag", "-d", f"bench-{i}"))
                    n2 = len(list(spool.glob("*.ev"))) if agent is None else 0
                    if agent is None and r is hooked:
                        files_per["tag"].append(n1 - n0)
                        files_per["tag -d"].append(n2 - n1)
                    tag_t[r] += [add_t[r][-1], del_t[r][-1]]
                if agent is None:
                    for f in spool.glob("*.ev"):
                        f.unlink()
            com_t = {hooked: [], plain: []}
            for i in range(a.commits):
                order = (hooked, plain) if i % 2 == 0 else (plain, hooked)
                for r in order:
                    com_t[r].append(timed_git(r, "commit", "-q", "--allow-empty", "-m", f"c{i}"))
            leftover = len(list(spool.glob("*.ev")))
        finally:
            if agent is not None:
                agent.stop()
        parts = components(tmp, hook_file, str(spool), a.loop)
        calls = hook_invocations(tmp)
        sh = os.path.realpath(shutil.which("sh") or "/bin/sh")

    th, tp = median(tag_t[hooked]) * 1e3, median(tag_t[plain]) * 1e3
    ch, cp = median(com_t[hooked]) * 1e3, median(com_t[plain]) * 1e3
    gitv = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.split()[-1]
    print(f"hook_overhead: git {gitv}, "
          f"/bin/sh -> {sh}, spool mode: {a.spool}"
          + (" (agent --hold consumed the spool during the measure)" if a.spool == "agent"
             else " (no agent; spool files deleted after each iteration)"))
    print(f"tag/untag: {a.cycles} cycles per repo = {len(tag_t[hooked])} ref-changing commands "
          f"each, interleaved; spool files left at end: {leftover}")
    print(f"  median per command  unhooked {tp:7.2f} ms   hooked {th:7.2f} ms   "
          f"added {th - tp:+.2f} ms")
    for name, d in (("git tag X", add_t), ("git tag -d X", del_t)):
        h, p_ = median(d[hooked]) * 1e3, median(d[plain]) * 1e3
        extra = ""
        key = "tag -d" if "-d" in name else "tag"
        if files_per[key]:
            extra = f"  (spool files per command: {median(files_per[key]):g})"
        print(f"    {name:<13} unhooked {p_:7.2f} ms   hooked {h:7.2f} ms   added {h - p_:+.2f} ms"
              + extra)
    print(f"git commit --allow-empty: {a.commits} per repo, interleaved")
    print(f"  median per commit   unhooked {cp:7.2f} ms   hooked {ch:7.2f} ms   "
          f"added {ch - cp:+.2f} ms  (ratio {ch / cp:.2f})")
    print("hook invocations per command: "
          + "; ".join(f"{k}: {v}" for k, v in calls.items()))
    print(f"hook parts (per invocation, best of 3 shell loops of {a.loop}):")
    for k, v in parts.items():
        print(f"  {k:<40} {v * 1e3:6.2f} ms")
    added = th - tp
    verdict = "OK" if added <= TARGET_ADDED_MS else "MISSES"
    print(f"added per tag command {added:+.2f} ms (target <= {TARGET_ADDED_MS:g} ms: {verdict})")
    print(f"ratio: {th / tp:.2f} (hooked/unhooked per tag command; target added <= "
          f"{TARGET_ADDED_MS:g} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
