"""`microte cosim` started N times in a row (issue #18 item 5): how many starts fail.

    python bench/cosim_starts.py --starts 20 [--rounds 1] [--no-weather] [--buildings [--houses 30]]

Each start is the real command (a broker on a free port pair and the federates as
subprocesses) on scenarios/feeder.toml; a start fails when the command exits non-zero or
runs past `--timeout`. `--buildings` adds the buildings federate: the scenario gets a
`[cosim.buildings]` table with `--houses` PEM houses (docs/grid.md). Prints one line per
start, the count and the seconds per start.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--starts", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--no-weather", action="store_true")
    p.add_argument("--buildings", action="store_true", help="with the buildings federate")
    p.add_argument("--houses", type=int, default=30, help="houses of the buildings federate")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args()
    failed, seconds = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        scenario = ROOT / "scenarios" / "feeder.toml"
        if args.buildings:  # feeder.toml names no file, so a copy elsewhere is the same scenario
            text = scenario.read_text() + f"\n[cosim.buildings]\nhouses = {args.houses}\n"
            scenario = Path(tmp) / "feeder_buildings.toml"
            scenario.write_text(text)
        for i in range(args.starts):
            ledger = f"sqlite:///{tmp}/run{i}.db"
            cmd = [sys.executable, "-m", "controller", "cosim", str(scenario)]
            cmd += ["--rounds", str(args.rounds), "--ledger", ledger] + (["--no-weather"] if args.no_weather else [])
            started = time.perf_counter()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
                ok = done.returncode == 0 and (not args.buildings or '"buildings"' in done.stdout)
                why = "" if ok else (done.stderr.strip().splitlines()[-1:] or ["no buildings summary"])
            except subprocess.TimeoutExpired:
                ok, why = False, [f"ran past {args.timeout:g} s"]
            failed += not ok
            seconds.append(time.perf_counter() - started)
            print(f"start {i + 1:2d}: {'ok' if ok else 'FAILED'} in {seconds[-1]:.1f} s {why or ''}", flush=True)
    mean, median = statistics.mean(seconds), statistics.median(seconds)
    print(f"{args.starts - failed} of {args.starts} starts succeeded", end="")
    print(f"; {mean:.1f} s per start (median {median:.1f}, max {max(seconds):.1f})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
