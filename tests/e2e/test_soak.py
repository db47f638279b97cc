"""Short soak of an rt market with faults (the long form is bench/soak.py): 2 s slots, 48
prosumers in 4 load processes, then SIGSTOP past boundaries, kill -9 and restart, the
ledger locked by another process for 5 s, and a load process killed and restarted.
Afterwards every filled slot whose grace passed is processed exactly once, every metered
fill is paid, no acknowledged entry is lost, and p2p money is conserved."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

from controller.sim import LISTENING
from ledger import read_rows
from tests.e2e.test_crash import free_port
from tests.e2e.test_rt_catchup import check_every_filled_slot_processed_once

WORKER = str(Path(__file__).with_name("soak_worker.py"))
N, PROCESSES = 48, 4
TOKENS = {f"P{i}": f"tok-{i}" for i in range(N)}


async def start_market(
    tmp: Path, ledger: str, port: int, tokens: dict[str, str] = TOKENS
) -> asyncio.subprocess.Process:
    registry = tmp / "registry.toml"
    entry = '[[participants]]\nid = "{}"\ntoken = "{}"\nrole = "prosumer"\n'
    registry.write_text("".join(entry.format(p, t) for p, t in tokens.items()))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", "market", "--registry", str(registry), "--port", str(port),
        "--ledger", ledger, "--mode", "rt", "--duration", "2", "--meter-grace", "0.5", "--durability", "ack",
        "--log-level", "ERROR", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert line.decode().startswith(LISTENING), line
    return proc


async def start_worker(
    url: str, ids: list[str], out: Path, tokens: dict[str, str] = TOKENS
) -> asyncio.subprocess.Process:
    mine = json.dumps({p: tokens[p] for p in ids})
    return await asyncio.create_subprocess_exec(sys.executable, WORKER, url, mine, str(out))


def lock_ledger(path: str, seconds: float) -> threading.Thread:
    """Another process-like writer holding the SQLite write lock."""

    def hold() -> None:
        con = sqlite3.connect(path, timeout=10)
        con.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        con.rollback()
        con.close()

    t = threading.Thread(target=hold)
    t.start()
    return t


async def test_short_soak_with_stall_kill9_locked_ledger_and_churn(tmp_path: Path) -> None:
    db = f"{tmp_path}/soak.db"
    ledger, port = f"sqlite:///{db}", free_port()
    url = f"http://127.0.0.1:{port}"
    server = await start_market(tmp_path, ledger, port)
    ids = list(TOKENS)
    groups = [ids[k::PROCESSES] for k in range(PROCESSES)]
    outs = [tmp_path / f"acked-{k}.txt" for k in range(PROCESSES)]
    workers = [await start_worker(url, g, o) for g, o in zip(groups, outs, strict=True)]
    try:
        await asyncio.sleep(10)
        server.send_signal(signal.SIGSTOP)  # a stall past two boundaries
        await asyncio.sleep(5)
        server.send_signal(signal.SIGCONT)
        await asyncio.sleep(8)
        server.send_signal(signal.SIGKILL)  # a crash with 5 s of downtime
        await server.wait()
        await asyncio.sleep(5)
        server = await start_market(tmp_path, ledger, port)
        await asyncio.sleep(8)
        holder = lock_ledger(db, 5)  # the ledger locked by another writer
        await asyncio.sleep(7)
        holder.join()
        workers[0].kill()  # participant churn: a load process dies and comes back
        await workers[0].wait()
        await asyncio.sleep(3)
        workers[0] = await start_worker(url, groups[0], outs[0])
        await asyncio.sleep(10)
    finally:
        for w in workers:
            if w.returncode is None:
                w.kill()
                await w.wait()
        if server.returncode is None:
            server.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(server.wait(), 15) == 0

    report = check_ledger(ledger, outs)
    assert report["filled"] >= 15, report
    assert report["acked"] > 500, report


def check_ledger(ledger: str, outs: list[Path]) -> dict[str, int]:
    """The soak's promises on a finished ledger (asserts); returns what was counted."""
    filled = check_every_filled_slot_processed_once(ledger)
    acked = {line.split()[0] for o in outs for line in o.read_text().splitlines() if line}
    stored = {r["id"] for r in read_rows(ledger, "entries")}
    lost = acked - stored
    assert not lost, f"{len(lost)} acknowledged entries not in the ledger, e.g. {sorted(lost)[:3]}"
    rows = read_rows(ledger, "transactions")
    assert len({r["id"] for r in rows}) == len(rows)
    sold: dict[int, int] = {}
    for f in read_rows(ledger, "settlements"):
        sold[f["time_delivery_start"]] = sold.get(f["time_delivery_start"], 0) + f["quantity"]
    p2p: dict[int, int] = {}
    for r in rows:
        if r["kind"] == "p2p":
            assert r["amount_buy"] == r["amount_sell"] and r["quantity"] > 0  # money conserved
            p2p[r["time_delivery_start"]] = p2p.get(r["time_delivery_start"], 0) + r["quantity"]
    assert all(q <= sold.get(s, 0) for s, q in p2p.items())  # never more energy than was traded
    late = sum(1 for r in read_rows(ledger, "rounds") if r["time"] > r["current_round_start"] + r["duration"])
    return {"filled": len(filled), "acked": len(acked), "rounds": len(read_rows(ledger, "rounds")), "late": late}
