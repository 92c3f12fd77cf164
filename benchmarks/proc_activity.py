"""Which processes on this machine wake up and use CPU, and how often: a window of /proc, Linux only.

    python benchmarks/proc_activity.py [--seconds 20] [--top 15] [--exclude RayTrainWorker]

For each process: context switches per second (every thread's voluntary + involuntary switches, i.e. how often it
wakes up) and CPU use in % of one core over the window; the excluded ones (by a substring of their command line) are
listed but not counted in the total. Run it beside ``gorp run`` while a stage trains to see what competes with the
training worker for the cores: ``pipeline_overhead.py`` shows that it matters when the worker's torch threads take
every core.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter


def snapshot() -> dict[str, tuple[str, int, int]]:
    """pid -> (command line, context switches of all its threads, CPU ticks)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            switches = 0
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                            switches += int(line.split()[1])
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2 :].split()
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read().replace("\0", " ").strip() or stat[stat.index("(") + 1 : stat.rindex(")")]
            out[pid] = (cmd, switches, int(fields[11]) + int(fields[12]))  # utime + stime
        except (OSError, ValueError, IndexError):  # the process ended meanwhile
            continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--exclude", action="append", default=[], help="substring of a command line not to count")
    args = ap.parse_args()
    ticks = os.sysconf("SC_CLK_TCK")
    before = snapshot()
    time.sleep(args.seconds)
    after = snapshot()
    wakeups, cpu = Counter(), Counter()
    for pid, (cmd, switches, used) in after.items():
        if pid in before and pid != str(os.getpid()):
            key = f"{pid} {cmd[:70]}"
            wakeups[key] = (switches - before[pid][1]) / args.seconds
            cpu[key] = 100.0 * (used - before[pid][2]) / ticks / args.seconds

    def counted(key: str) -> bool:
        return not any(x in key for x in args.exclude)

    total_w = sum(v for k, v in wakeups.items() if counted(k))
    total_c = sum(v for k, v in cpu.items() if counted(k))
    print(f"{args.seconds:.0f} s window; counted processes: {total_w:.0f} wake-ups/s, {total_c:.1f}% of one core")
    print(f"{'wake-ups/s':>10} {'CPU %':>6}  process")
    for key, w in wakeups.most_common(args.top):
        print(f"{w:10.0f} {cpu[key]:6.1f}  {key}{'' if counted(key) else '  (excluded)'}")


if __name__ == "__main__":
    main()
