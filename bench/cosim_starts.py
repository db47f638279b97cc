"""`microte cosim` started N times in a row (issue #18 item 5): how many starts fail.

    python bench/cosim_starts.py --starts 20 [--rounds 1] [--no-weather]

Each start is the real command (a broker on a free port pair and the federates as
subprocesses) on scenarios/feeder.toml; a start fails when the command exits non-zero or
runs past `--timeout`. Prints one line per start and the count.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.starts):
            ledger = f"sqlite:///{tmp}/run{i}.db"
            cmd = [sys.executable, "-m", "controller", "cosim", str(ROOT / "scenarios" / "feeder.toml")]
            cmd += ["--rounds", str(args.rounds), "--ledger", ledger] + (["--no-weather"] if args.no_weather else [])
            started = time.perf_counter()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
                ok = done.returncode == 0
                why = "" if ok else done.stderr.strip().splitlines()[-1:]
            except subprocess.TimeoutExpired:
                ok, why = False, [f"ran past {args.timeout:g} s"]
            failed += not ok
            print(f"start {i + 1:2d}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - started:.1f} s {why or ''}")
    print(f"{args.starts - failed} of {args.starts} starts succeeded")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
