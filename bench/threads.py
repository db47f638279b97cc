"""CPU of each thread of a `microte sim` run and of its market server, per round.

    python bench/threads.py [--every 0.25] -- microte sim SCENARIO ... [--ledger URL]

Runs the command (its `microte market` child is found by its command line), reads every
thread's user + system time from /proc/PID/task/*/stat every `--every` seconds, and prints
what each thread used between the samples at 20 % and 60 % of the run (the rounds, past the
start-up and before the summary), as a share of the wall time and in ms per round (the
rounds/s of the command's own summary), and the market server's peak resident memory
(VmHWM, read at each sample). A round whose CPU adds up to its wall time ran as a
serial chain: that is how docs/benchmarks.md reads it. Linux only; never asserts.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT), *(p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench")]

from bench.profile_sim import thread_cpu  # noqa: E402


def threads(pid: int | None) -> dict[str, float]:
    """CPU seconds of each live thread of `pid` by `main:tid` or `tid` (`thread_cpu`, keyed
    for printing): nothing once it is gone."""
    if pid is None:
        return {}
    try:
        cpu = thread_cpu(pid)
    except OSError:  # it has exited
        return {}
    return {(f"main:{tid}" if tid == pid else str(tid)): seconds for tid, seconds in cpu.items()}


def peak_rss_mib(pid: int | None) -> float:
    """The peak resident memory of `pid` so far (VmHWM), MiB; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text() if pid is not None else ""
    except OSError:
        return 0.0
    m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(m.group(1)) / 1024 if m else 0.0


def _server(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in children:
            if b"market" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
                return int(child)
    except OSError:
        pass
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--every", type=float, default=0.25)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cmd = [c for c in args.command if c != "--"] if args.command[:1] == ["--"] else args.command
    if not cmd:
        sys.exit("give the command after --")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server: int | None = None
    samples: list[tuple[float, dict[str, float], dict[str, float]]] = []
    peak = 0.0
    while proc.poll() is None:
        server = server or _server(proc.pid)
        samples.append((time.monotonic(), threads(proc.pid), threads(server)))
        peak = max(peak, peak_rss_mib(server))
        time.sleep(args.every)
    out = proc.stdout.read() if proc.stdout else ""
    m = re.search(r"Simulated (\d+) rounds in ([\d.]+) s", out)
    ran = [s for s in samples if s[2]]
    if m is None or len(ran) < 5:
        sys.exit(f"no rounds to measure (exit {proc.returncode}):\n{out[-2000:]}")
    rate = int(m.group(1)) / float(m.group(2))
    (ta, ca, sa), (tb, cb, sb) = ran[len(ran) // 5], ran[len(ran) * 3 // 5]
    wall = tb - ta
    print(f"{m.group(0)} ({rate:.1f} rounds/s); window {wall:.2f} s, ~{wall * rate:.0f} rounds")
    print(f"server peak RSS {peak:.0f} MiB")
    for side, before, after in (("sim", ca, cb), ("server", sa, sb)):
        for name in sorted(after):
            used = after[name] - before.get(name, 0.0)
            if used > 0.02:
                per_round = 1000 * used / (wall * rate)
                print(f"{side:7s} {name:20s} busy {100 * used / wall:5.1f} %  {per_round:6.2f} ms/round")


if __name__ == "__main__":
    main()
