"""Memory and CPU of an idle agent, against an idle Python process.

The agent (`run`, pipeline loaded; approvals and keyring are imported lazily) runs with one
registered repo and nothing to do. After it has started
and settled (its start-up drain and reconcile are over), a window of N seconds (default 60) is
measured; a baseline `python -c 'import time; time.sleep(...)'` started at the same time is
measured over the same window, the same way:

  * RSS: VmRSS from /proc/PID/status, sampled every 0.5 s, max over the window (VmHWM, the
    peak since process start, is printed too);
  * CPU: utime+stime from /proc/PID/stat, end minus start of the window, scaled to CPU-s per
    minute (resolution: one clock tick, usually 10 ms);
  * wake-ups: voluntary + involuntary context switches of all threads (/proc/PID/task/*/status)
    over the window, per minute: a finer idle signal than CPU ticks.

    python bench/idle_footprint.py [--seconds 60]

Last line: `ratio: <RSS agent/baseline> RSS, <CPU agent/baseline> CPU (targets ...)`.
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Agent, TempDir, cli, make_repo  # noqa: E402

TARGET_RSS_MB = 40.0
TARGET_CPU_PER_MIN = 0.05
TICK = os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "(comm)"; fields[0] is state (3rd)
    return (int(fields[11]) + int(fields[12])) / TICK  # utime (14th), stime (15th)


def ctx_switches(pid: int) -> int:
    n = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (t / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    n += int(line.split()[1])
        except OSError:
            pass
    return n


class Probe:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss_max = 0
        self.cpu0 = cpu_s(pid)
        self.ctx0 = ctx_switches(pid)

    def sample(self) -> None:
        self.rss_max = max(self.rss_max, status_kb(self.pid, "VmRSS"))

    def finish(self, window: float) -> dict:
        self.sample()
        cpu = cpu_s(self.pid) - self.cpu0
        return {"rss_mb": self.rss_max / 1024, "hwm_mb": status_kb(self.pid, "VmHWM") / 1024,
                "cpu_s": cpu, "cpu_per_min": cpu / window * 60,
                "wakeups_per_min": (ctx_switches(self.pid) - self.ctx0) / window * 60,
                "threads": len(list(Path(f"/proc/{self.pid}/task").iterdir()))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measured window (default 60)")
    ap.add_argument("--settle", type=float, default=3.0, help="wait after start-up (default 3)")
    a = ap.parse_args()
    if not Path("/proc/self/stat").exists():
        raise SystemExit("idle_footprint needs Linux /proc")

    with TempDir("idle") as tmp:
        home = tmp / "home"
        repo = make_repo(tmp / "app")
        cli(home, "install", str(repo))
        base = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1e6)"])
        try:
            with Agent(home, "--verbose") as agent:  # full pipeline loaded, nothing to do
                time.sleep(a.settle)
                pa, pb = Probe(agent.pid), Probe(base.pid)
                t0 = time.monotonic()
                while time.monotonic() - t0 < a.seconds:
                    pa.sample()
                    pb.sample()
                    time.sleep(min(0.5, max(0.0, a.seconds - (time.monotonic() - t0))))
                window = time.monotonic() - t0
                ra, rb = pa.finish(window), pb.finish(window)
                alive = agent.proc.poll() is None
        finally:
            base.kill()
            base.wait()
    if not alive:
        raise SystemExit("the agent died during the window")

    print(f"idle_footprint: window {window:.1f} s after {a.settle:g} s settle, one registered "
          f"repo, full agent (not --hold); CPU resolution {1 / TICK * 1000:.0f} ms")
    for name, r in (("agent", ra), ("baseline python sleep", rb)):
        print(f"  {name:<22} RSS max {r['rss_mb']:6.1f} MB (VmHWM {r['hwm_mb']:5.1f} MB)   "
              f"CPU {r['cpu_s']:.2f} s = {r['cpu_per_min']:.3f} CPU-s/min   "
              f"wake-ups {r['wakeups_per_min']:7.1f}/min   threads {r['threads']}")
    rss_ratio = ra["rss_mb"] / rb["rss_mb"]
    floor = 1 / TICK / window * 60  # one tick over the window, per minute
    cpu_ratio = ra["cpu_per_min"] / max(rb["cpu_per_min"], floor)
    ok_r = ra["rss_mb"] <= TARGET_RSS_MB
    ok_c = ra["cpu_per_min"] <= TARGET_CPU_PER_MIN
    print(f"RSS {ra['rss_mb']:.1f} MB (target <= {TARGET_RSS_MB:g} MB: "
          f"{'OK' if ok_r else 'MISSES'}); "
          f"CPU {ra['cpu_per_min']:.3f} CPU-s/min (target <= {TARGET_CPU_PER_MIN:g}: "
          f"{'OK' if ok_c else 'MISSES'})"
          + ("; baseline CPU below one tick, ratio taken against one tick"
             if rb["cpu_per_min"] < floor else ""))
    print(f"ratio: {rss_ratio:.2f} RSS, {cpu_ratio:.2f} CPU (agent/baseline; targets RSS <= "
          f"{TARGET_RSS_MB:g} MB, CPU <= {TARGET_CPU_PER_MIN:g} CPU-s/min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
