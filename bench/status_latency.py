"""Wall time of `earthkamal-agent status --json` against a bare Python start-up.

A temp store is filled with ~200 jobs (200 tags made while no agent runs, then
`run --once --hold` drains them), then the agent runs (`--hold`, idle) so `status` sees a live
lock as in real use. Interleaved, round-robin, >= 20 runs each:

  * `python -m earthkamal_agent status --json`   (the same interpreter as this script)
  * `earthkamal-agent status --json`              (the console script found on PATH, if any;
                                                  if PATH finds a pyenv/asdf shim, the real
                                                  script next to the interpreter is timed too)
  * `python -c 'import sqlite3'`                  (the baseline: interpreter start + sqlite3)

The ratio is median(python -m ... status) / median(baseline). When it misses its target (or
with --profile) the start-up is profiled with `python -X importtime` and the heaviest imports
are printed with the chain that pulls them in.

    python bench/status_latency.py [--runs 20] [--jobs 200] [--profile]

Last line: `ratio: <status/baseline> (target <= 2.5; median <= 150 ms)`.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Agent, TempDir, cli, git, make_repo, median  # noqa: E402

TARGET_MS = 150.0
TARGET_RATIO = 2.5
WORK = """
import io, json, time
from earthkamal_agent import cli
from earthkamal_agent.daemon import agent_running  # import cost excluded from the timing
p = cli.default_paths()
best_d = best_j = 1e9
for _ in range(5):
    t0 = time.perf_counter(); d = cli.status_data(p, 50); t1 = time.perf_counter()
    json.dump(d, io.StringIO(), indent=2); t2 = time.perf_counter()
    best_d, best_j = min(best_d, t1 - t0), min(best_j, t2 - t1)
print(best_d * 1e3, best_j * 1e3)
"""


def run_once(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def importtime(env: dict) -> list[tuple[int, int, int, str]]:
    """(self_us, cumulative_us, depth, module) in the order -X importtime prints them."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "earthkamal_agent",
                          "status", "--json"], env=env, capture_output=True, text=True)
    rows = []
    for line in res.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum, name = line[len("import time:"):].split("|", 2)
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append((int(self_us), int(cum), depth, name.strip()))
    return rows


def chain(rows: list[tuple[int, int, int, str]], i: int) -> list[str]:
    """Module i and the modules that imported it (children print before their parent)."""
    out = [rows[i][3]]
    depth = rows[i][2]
    for j in range(i + 1, len(rows)):
        if rows[j][2] < depth:
            out.append(rows[j][3])
            depth = rows[j][2]
            if depth == 0:
                break
    return out


def profile(env: dict) -> None:
    best: dict[str, tuple[int, int, int, str]] = {}
    runs = [importtime(env) for _ in range(3)]
    rows = min(runs, key=lambda r: sum(x[0] for x in r))  # the least disturbed run
    total = sum(r[0] for r in rows)
    print(f"profile (python -X importtime -m earthkamal_agent status --json, best of 3): "
          f"{total / 1000:.1f} ms spent importing")
    tops = [r for r in rows if r[2] == 0]
    print("  top-level imports (cumulative):")
    for r in sorted(tops, key=lambda r: -r[1])[:8]:
        print(f"    {r[1] / 1000:7.1f} ms  {r[3]}")
    print("  heaviest third-party / stdlib packages (cumulative) and who pulls them in:")
    for i, r in enumerate(rows):
        root = r[3].split(".")[0]
        if root in ("earthkamal_agent",) or "." in r[3]:
            continue
        if root not in best or r[1] > best[root][2]:
            best[root] = (i, r[0], r[1], root)
    for i, _self, cum, _root in sorted(best.values(), key=lambda b: -b[2])[:8]:
        print(f"    {cum / 1000:7.1f} ms  {' <- '.join(chain(rows, i))}")
    ek = [r for r in rows if r[3].startswith("earthkamal_agent")]
    print("  earthkamal_agent modules (cumulative):")
    for r in sorted(ek, key=lambda r: -r[1])[:8]:
        print(f"    {r[1] / 1000:7.1f} ms  {r[3]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--profile", action="store_true", help="profile imports even if on target")
    a = ap.parse_args()

    with TempDir("status") as tmp:
        home = tmp / "home"
        repo = make_repo(tmp / "app")
        cli(home, "install", str(repo))
        for i in range(a.jobs):
            git(repo, "tag", f"v2.{i // 100}.{i % 100}")
        cli(home, "run", "--once", "--hold")
        con = sqlite3.connect(f"file:{home / 'jobs.db'}?mode=ro", uri=True)
        n_jobs = con.execute("SELECT count(*) FROM jobs").fetchone()[0]
        con.close()
        env = {**os.environ, "EARTHKAMAL_HOME": str(home)}

        cmds: dict[str, list[str]] = {
            "python -m earthkamal_agent status --json":
                [sys.executable, "-m", "earthkamal_agent", "status", "--json"],
        }
        # Every distinct `earthkamal-agent` on PATH (a pyenv shim and the real script, say).
        seen = set()
        for d in os.environ.get("PATH", "").split(os.pathsep):
            exe = Path(d or ".") / "earthkamal-agent"
            if exe.is_file() and os.access(exe, os.X_OK) and str(exe) not in seen:
                seen.add(str(exe))
                head = exe.read_bytes()[:4000]
                shim = b"libexec/pyenv" in head or b"asdf exec" in head
                label = f"{exe} status --json" + (" [version-manager shim]" if shim else "")
                cmds[label] = [str(exe), "status", "--json"]
        if not seen:
            print("(no earthkamal-agent console script on PATH; timing python -m only)")
        cmds["what-if: python -c 'import earthkamal_agent.cli, .store, json' (no daemon)"] = [
            sys.executable, "-c", "import json, earthkamal_agent.cli, earthkamal_agent.store"]
        cmds["baseline: python -c 'import sqlite3'"] = [sys.executable, "-c", "import sqlite3"]

        with Agent(home, "--hold"):
            out = subprocess.run(cmds["python -m earthkamal_agent status --json"], env=env,
                                 capture_output=True, check=True).stdout
            doc = json.loads(out)
            assert doc["agent"]["running"], "status does not see the running agent"
            for argv in cmds.values():  # warm the page cache, not counted
                run_once(argv, env)
            times: dict[str, list[float]] = {k: [] for k in cmds}
            for i in range(a.runs):
                keys = list(cmds)
                if i % 2:
                    keys.reverse()
                for k in keys:
                    times[k].append(run_once(cmds[k], env))
            status_ms = median(times["python -m earthkamal_agent status --json"]) * 1e3
            base_ms = median(times["baseline: python -c 'import sqlite3'"]) * 1e3
            ratio = status_ms / base_ms
            print(f"status_latency: store with {n_jobs} jobs, agent running (--hold), "
                  f"{a.runs} runs each, interleaved; status --json printed "
                  f"{len(doc['jobs'])} jobs ({len(out)} bytes)")
            for k, v in times.items():
                m = median(v) * 1e3
                print(f"  {k:<78} median {m:7.1f} ms  min {min(v) * 1e3:6.1f}  max "
                      f"{max(v) * 1e3:6.1f}  (x{m / base_ms:.2f})")
            ok = status_ms <= TARGET_MS and ratio <= TARGET_RATIO
            print(f"median {status_ms:.1f} ms (target <= {TARGET_MS:g} ms: "
                  f"{'OK' if status_ms <= TARGET_MS else 'MISSES'}), ratio target <= "
                  f"{TARGET_RATIO:g}: {'OK' if ratio <= TARGET_RATIO else 'MISSES'}")
            if a.profile or not ok:
                profile(env)
                work = subprocess.run([sys.executable, "-c", WORK], env=env, check=True,
                                      capture_output=True, text=True).stdout.split()
                print(f"  after the imports: status_data() {float(work[0]):.1f} ms, "
                      f"json.dump {float(work[1]):.1f} ms (in-process, best of 5)")
    print(f"ratio: {ratio:.2f} (status/baseline; target <= {TARGET_RATIO:g}; median "
          f"<= {TARGET_MS:g} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
