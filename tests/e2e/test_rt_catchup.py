"""rt markets left running: a stall past boundaries, a kill -9 with downtime, and a restart
before the first processed round leave no filled slot unprocessed, none processed twice,
no acknowledged entry lost and no id reused (docs/protocol.md, *Resume and catch-up*)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ledger import read_rows
from tests.e2e.test_crash import _plain, free_port, prosumer, start_server

D = 2  # s per slot: rounds compressed in time
GRACE = "0.5"


def rt(*extra: str) -> tuple[str, ...]:
    return ("--mode", "rt", "--duration", str(D), "--meter-grace", GRACE, "--durability", "ack", *extra)


def check_every_filled_slot_processed_once(ledger: str) -> set[int]:
    """Every slot with fills whose grace has passed has exactly one `rounds` row and its
    p2p rows; returns the filled slots."""
    fills = read_rows(ledger, "settlements")
    rounds = read_rows(ledger, "rounds")
    p2p = read_rows(ledger, "transactions")
    processed = Counter(r["current_round_start"] for r in rounds)
    assert all(n == 1 for n in processed.values()), processed
    last = max(r["time"] for r in rounds)
    filled = {f["time_delivery_start"] for f in fills if f["time_delivery_start"] + D <= last - D}
    assert filled, "the prosumers traded nothing"
    missing = sorted(s for s in filled if processed[s] != 1)
    assert not missing, f"filled slots never processed: {missing}"
    # Every metered fill is paid (p2p rows); a party without a reading generated and
    # consumed nothing (PROTOCOL.md), so an unmetered fill moves no energy.
    metered = Counter(m["time_interval_start"] for m in read_rows(ledger, "meters"))
    paid = {r["time_delivery_start"] for r in p2p if r["kind"] == "p2p"}
    unpaid = sorted(s for s in filled if metered[s] == 2 and s not in paid)
    assert not unpaid, f"metered fills never paid: {unpaid}"
    # Rounds stay on the wall clock's boundaries; a late slot says by how much (time - end).
    assert all(r["time"] % D == 0 for r in rounds)
    return filled


async def test_a_stall_past_boundaries_leaves_no_filled_slot_unprocessed(tmp_path: Path) -> None:
    ledger, port = f"sqlite:///{tmp_path}/stall.db", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await start_server(tmp_path, ledger, port, *rt())
    clients = [await prosumer(url, p) for p in ("P1", "P2")]
    await asyncio.sleep(3 * D)
    proc.send_signal(signal.SIGSTOP)  # past two boundaries
    await asyncio.sleep(5)
    proc.send_signal(signal.SIGCONT)
    await asyncio.sleep(4 * D)
    for c in clients:
        await c.disconnect()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    filled = check_every_filled_slot_processed_once(ledger)
    rounds = read_rows(ledger, "rounds")
    late = [r for r in rounds if r["time"] > r["current_round_start"] + D]
    assert late, "the stall made no slot late: the test did not stall the server"
    assert len(filled) >= 4


async def test_kill9_with_downtime_then_restart_processes_every_filled_slot(tmp_path: Path) -> None:
    ledger, port = f"sqlite:///{tmp_path}/down.db", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await start_server(tmp_path, ledger, port, *rt())
    clients = [await prosumer(url, p) for p in ("P1", "P2")]
    await asyncio.sleep(3 * D)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    await asyncio.sleep(3 * D)  # three boundaries of downtime
    before = {f["time_delivery_start"] for f in read_rows(ledger, "settlements")}
    proc = await start_server(tmp_path, ledger, port, *rt())
    await asyncio.sleep(3 * D)  # the clients reconnect and trade on
    for c in clients:
        await c.disconnect()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    processed = {r["current_round_start"] for r in read_rows(ledger, "rounds")}
    assert before <= processed, f"fills from before the crash never processed: {sorted(before - processed)}"
    check_every_filled_slot_processed_once(ledger)


async def test_rt_accepts_orders_as_soon_as_it_listens(tmp_path: Path) -> None:
    ledger, port = f"sqlite:///{tmp_path}/first.db", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await start_server(tmp_path, ledger, port, "--mode", "rt", "--duration", "60")
    try:
        p1 = await _plain(url, "P1")
        slot = (int(time.time()) // 60 + 4) * 60  # four minutes ahead
        reply = await p1.call(
            "bid", {"quantity": 10, "price": 0.2, "time_delivery": [slot, slot + 60]}, namespace="/market"
        )
        assert reply["ok"], reply
        await p1.disconnect()
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()


async def bid(sio: Any, slot: int, client_id: str, q: int = 10) -> dict[str, Any]:
    msg = {"id": client_id, "quantity": q, "price": 0.2, "time_delivery": [slot, slot + 900]}
    reply: dict[str, Any] = await sio.call("bid", msg, namespace="/market")
    return reply


async def test_restart_before_the_first_processed_round_keeps_the_book_and_never_reuses_ids(tmp_path: Path) -> None:
    ledger, port = f"sqlite:///{tmp_path}/early.db", free_port()
    url = f"http://127.0.0.1:{port}"
    args = ("--mode", "rt", "--duration", "900", "--durability", "ack")
    proc = await start_server(tmp_path, ledger, port, *args)
    p1 = await _plain(url, "P1")
    slot = (int(time.time()) // 900 + 3) * 900
    first = [await bid(p1, slot, f"b{i}") for i in range(5)]
    assert all(r["ok"] for r in first), first
    cancelled = await p1.call("cancel", {"uuid": first[4]["entry"]["uuid"]}, namespace="/market")
    assert cancelled["ok"], cancelled
    proc.send_signal(signal.SIGKILL)  # before any slot is processed: `rounds` is empty
    await proc.wait()
    await p1.disconnect()
    assert read_rows(ledger, "rounds") == []

    proc = await start_server(tmp_path, ledger, port, *args)
    try:
        p1 = await _plain(url, "P1")
        again = await bid(p1, slot, "b0")
        assert again["ok"] and again.get("duplicate") is True, again  # the book came back
        # A cancelled client id stays cancelled: its retry is a duplicate, not a new order.
        retried = await bid(p1, slot, "b4")
        assert retried["ok"] and retried.get("duplicate") is True, retried
        new = await bid(p1, slot, "b5")
        assert new["ok"] and not new.get("duplicate"), new
        old_uuids = {r["entry"]["uuid"] for r in first}
        assert new["entry"]["uuid"] not in old_uuids  # ids never reused across restarts
        # The restored open entries can be cancelled; the cancelled one is not open.
        assert (await p1.call("cancel", {"uuid": first[0]["entry"]["uuid"]}, namespace="/market"))["ok"]
        gone = await p1.call("cancel", {"uuid": first[4]["entry"]["uuid"]}, namespace="/market")
        assert gone["error"]["code"] == "not_found", gone
        await p1.disconnect()
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    stored = {r["id"] for r in read_rows(ledger, "entries")}
    assert new["entry"]["uuid"] in stored  # acknowledged, so stored (not shadowed by an old row)
    assert len(stored) == 6


async def test_cancelling_an_entry_whose_gate_closed_answers_closed(tmp_path: Path) -> None:
    ledger, port = f"sqlite:///{tmp_path}/gate.db", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await start_server(tmp_path, ledger, port, *rt())
    try:
        p1 = await _plain(url, "P1")
        await asyncio.sleep(0.2)
        slot = (int(time.time()) // D + 3) * D
        reply = await p1.call(
            "bid", {"quantity": 10, "price": 0.2, "time_delivery": [slot, slot + D]}, namespace="/market"
        )
        assert reply["ok"], reply
        await asyncio.sleep(max(0.0, slot - D - time.time()) + 0.3)  # its gate has closed (round slot - D)
        gone = await p1.call("cancel", {"uuid": reply["entry"]["uuid"]}, namespace="/market")
        assert gone["error"]["code"] == "closed", gone
        await p1.disconnect()
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()


async def test_sigterm_with_a_client_connected_exits_within_seconds(tmp_path: Path) -> None:
    ledger, port = f"sqlite:///{tmp_path}/term.db", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await start_server(tmp_path, ledger, port, *rt())
    p1 = await _plain(url, "P1")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert time.monotonic() - t0 < 5
    await p1.disconnect()


async def test_sigterm_in_sim_mode_stores_acknowledged_open_entries(tmp_path: Path) -> None:
    ledger, port = f"sqlite:///{tmp_path}/simterm.db", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await start_server(tmp_path, ledger, port)  # sim, `round` durability
    from tests.e2e.test_crash import controller

    ctl = await controller(url)
    assert (await ctl.call("step", {"time": 600}, namespace="/simulation"))["ok"]
    p1 = await _plain(url, "P1")
    reply = await p1.call("bid", {"quantity": 10, "price": 0.2, "time_delivery": [780, 840]}, namespace="/market")
    assert reply["ok"], reply
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    for c in (p1, ctl):
        await c.disconnect()
    assert reply["entry"]["uuid"] in {r["id"] for r in read_rows(ledger, "entries")}
