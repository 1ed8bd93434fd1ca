"""Snapshot time: the agent's `snapshot.export` against `git worktree add --detach`.

Generated repos of 1k and 10k files (a few bytes to a few KB each, spread over nested dirs,
one commit). For each size, interleaved (which one goes first alternates), >= 7 runs each after
one untimed warm-up of both:

  * `earthkamal_agent.snapshot.export(common_dir, commit, dest)`  (in this process, as in the
    daemon: libgit2 `checkout_tree` into a fresh dir)
  * `git worktree add --detach DIR COMMIT`                         (the baseline: git's own
    checkout of the same commit into a fresh dir; it also writes an index)

Removing the dirs (and `git worktree prune`) happens between runs, untimed.

    python bench/snapshot.py [--runs 7] [--sizes 1000,10000]

Last line: `ratio: <worst median export / median worktree> (target <= 1.2)`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import TempDir, git, make_repo, median, ms  # noqa: E402

TARGET = 1.2


def generate(repo: Path, n: int) -> str:
    """``n`` files in dirs of ~50 (two levels), committed; returns the commit id."""
    for i in range(n):
        d = repo / f"d{i // 2500:02d}" / f"s{(i // 50) % 50:02d}"
        d.mkdir(parents=True, exist_ok=True)
        size = 16 + (i * 7919) % 4000
        (d / f"f{i:05d}.txt").write_text((f"file {i} " * (size // 8 + 1))[:size] + "\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"{n} files")
    return git(repo, "rev-parse", "HEAD").stdout.decode().strip()


def time_export(common: str, commit: str, dest: Path) -> float:
    from earthkamal_agent import snapshot

    t0 = time.perf_counter()
    snapshot.export(common, commit, dest)
    dt = time.perf_counter() - t0
    snapshot.remove(dest)
    return dt


def time_worktree(repo: Path, commit: str, dest: Path) -> float:
    t0 = time.perf_counter()
    git(repo, "worktree", "add", "-q", "--detach", str(dest), commit)
    dt = time.perf_counter() - t0
    shutil.rmtree(dest)
    git(repo, "worktree", "prune")
    return dt


def count_files(commit: str, repo: Path) -> int:
    return len(git(repo, "ls-tree", "-r", "--name-only", commit).stdout.splitlines())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--sizes", default="1000,10000")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    ratios = []
    with TempDir("snapshot") as tmp:
        for n in sizes:
            repo = make_repo(tmp / f"repo-{n}")
            commit = generate(repo, n)
            common = str(repo / ".git")
            files = count_files(commit, repo)
            out = tmp / "out"
            time_export(common, commit, out)  # warm-up: page cache, pygit2 import
            time_worktree(repo, commit, out)
            exp, wt = [], []
            for i in range(a.runs):
                if i % 2 == 0:
                    exp.append(time_export(common, commit, out))
                    wt.append(time_worktree(repo, commit, out))
                else:
                    wt.append(time_worktree(repo, commit, out))
                    exp.append(time_export(common, commit, out))
            me, mw = median(exp), median(wt)
            ratios.append(me / mw)
            print(f"{files:>6} files: snapshot.export median {ms(me)} "
                  f"(min {ms(min(exp))}, max {ms(max(exp))}); git worktree add median {ms(mw)} "
                  f"(min {ms(min(wt))}, max {ms(max(wt))}); ratio {me / mw:.2f}")
    worst = max(ratios)
    verdict = "" if worst <= TARGET else "  MISSES"
    print(f"ratio: {worst:.2f} (target <= {TARGET}){verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
