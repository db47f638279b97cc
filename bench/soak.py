"""Long soak of an rt market with faults (the short form runs in `make test`:
tests/e2e/test_soak.py). 2 s slots for `--minutes`, `--participants` prosumers in
`--processes` load processes; every minute one fault in turn: SIGSTOP for 5 s (past two
boundaries), kill -9 with 5 s of downtime and a restart on the same ledger, the ledger
locked by another writer for 5 s, a load process killed and restarted. Then the promises
of docs/reliability.md are checked on the ledger and a summary is printed.

    python bench/soak.py [--minutes 11] [--participants 60] [--processes 4]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.test_crash import free_port
from tests.e2e.test_soak import check_ledger, lock_ledger, start_market, start_worker


async def soak(minutes: float, participants: int, processes: int) -> dict[str, int]:
    tokens = {f"P{i}": f"tok-{i}" for i in range(participants)}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        db = f"{tmp}/soak.db"
        ledger, port = f"sqlite:///{db}", free_port()
        url = f"http://127.0.0.1:{port}"
        server = await start_market(tmp, ledger, port, tokens)
        ids = list(tokens)
        groups = [ids[k::processes] for k in range(processes)]
        outs = [tmp / f"acked-{k}.txt" for k in range(processes)]
        workers = [await start_worker(url, g, o, tokens) for g, o in zip(groups, outs, strict=True)]
        faults = {"stall": 0, "kill9": 0, "locked": 0, "churn": 0}
        end = time.monotonic() + minutes * 60
        k = 0
        try:
            while time.monotonic() < end - 60:
                await asyncio.sleep(45)
                kind = list(faults)[k % 4]
                k += 1
                faults[kind] += 1
                print(f"{time.strftime('%H:%M:%S')} fault: {kind}", flush=True)
                if kind == "stall":
                    server.send_signal(signal.SIGSTOP)
                    await asyncio.sleep(5)
                    server.send_signal(signal.SIGCONT)
                elif kind == "kill9":
                    server.send_signal(signal.SIGKILL)
                    await server.wait()
                    await asyncio.sleep(5)
                    server = await start_market(tmp, ledger, port, tokens)
                elif kind == "locked":
                    await asyncio.to_thread(lock_ledger(db, 5).join)
                else:
                    i = k % processes
                    workers[i].kill()
                    await workers[i].wait()
                    await asyncio.sleep(3)
                    workers[i] = await start_worker(url, groups[i], outs[i], tokens)
            await asyncio.sleep(max(0.0, end - time.monotonic()))
        finally:
            for w in workers:
                if w.returncode is None:
                    w.kill()
                    await w.wait()
            if server.returncode is None:
                server.send_signal(signal.SIGTERM)
                await asyncio.wait_for(server.wait(), 15)
        report = check_ledger(ledger, outs)  # raises AssertionError naming what broke
        return {**report, **faults}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=11.0)
    ap.add_argument("--participants", type=int, default=60)
    ap.add_argument("--processes", type=int, default=4)
    a = ap.parse_args()
    t0 = time.monotonic()
    r = asyncio.run(soak(a.minutes, a.participants, a.processes))
    print(f"\nsoak of {a.minutes} min, {a.participants} prosumers in {a.processes} processes: all checks passed")
    cols = ["rounds", "filled", "late", "acked", "stall", "kill9", "locked", "churn"]
    print("| rounds rows | filled slots | processed late | acknowledged entries | stalls | kill -9 | locked | churn |")
    print("|---" * len(cols) + "|")
    print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
